"""Checkpoint files: read them without running code from them, check what they hold, and
write them atomically.

:mod:`.serialization` is the entry point; it reads with :mod:`.formats` (what a file is, from
its first bytes) and :mod:`.unpickling` (the restricted unpickler), and writes with
:mod:`.atomic` (a temporary file renamed into place).
"""
from .serialization import (
    CHECKPOINT_FORMATS,
    PROGRESS_MIN_BYTES,
    check_output_path,
    check_state_dict,
    checkpoint_format,
    existing_local_path,
    load_checkpoint_file,
    same_file,
    save_checkpoint_file,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "PROGRESS_MIN_BYTES",
    "check_output_path",
    "check_state_dict",
    "checkpoint_format",
    "existing_local_path",
    "load_checkpoint_file",
    "same_file",
    "save_checkpoint_file",
]
