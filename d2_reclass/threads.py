"""The number of intra-op threads torch uses in the tools and benchmarks.

torch starts one OpenMP thread per core. The threads meet at a barrier after every op, so on a
small machine where anything else wants a core (another process, a data-loader worker) each op
waits for the slowest of them. Measured on a 2-core x86-64 VM with a load average of about 3.5
from other processes: a 20-iteration ``tools/train_net.py`` fine-tune of the demo's model took
50-68 s (2.1-2.4 s per iteration) with torch's default of two threads and 16-22 s (0.5-0.7 s
per iteration) with one. The thread count also changes the order of floating-point sums, so
training results repeat bit for bit only at a fixed count.
"""
import os

import torch

__all__ = ["configure_torch_threads"]


def configure_torch_threads() -> int:
    """Set torch's intra-op thread count for this process and the processes it starts.

    The count is ``OMP_NUM_THREADS`` when that is set, else 1. ``OMP_NUM_THREADS`` is then set
    in ``os.environ`` too, so that processes started afterwards (``launch`` workers,
    subprocesses) use the same count.

    Returns:
        int: the thread count now in effect.

    Raises:
        ValueError: ``OMP_NUM_THREADS`` is set to anything but a positive integer.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    # torch's own reading of OMP_NUM_THREADS is capped at the number of cores it sees, so an
    # explicit value is applied here rather than trusted to have been applied at import.
    if value and not (value.isdigit() and int(value) > 0):
        raise ValueError(f"OMP_NUM_THREADS={value!r}: expected a positive integer (the number "
                         "of torch threads per process), or leave it unset for 1.")
    count = int(value) if value else 1
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)
    return count
