"""Coverage matrix: does ReclassCheckpointer map every class-dependent tensor of every model?

Run (from the repository root)::

    .venv/bin/python benchmarks/coverage_matrix.py            # the whole matrix
    .venv/bin/python benchmarks/coverage_matrix.py --fast     # the 6 representative configs
    .venv/bin/python benchmarks/coverage_matrix.py --only cascade --only keypoint
    .venv/bin/python benchmarks/coverage_matrix.py --list     # the configs, nothing built


What each config builds and checks is in ``tests/zoo_cases.py`` (the default suite runs its
representative configs in ``tests/projects/test_coverage_matrix.py``).
"""
import argparse
import logging
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from zoo_cases import FAST, Result, list_cases, run_case  # noqa: E402

from d2_reclass.threads import configure_torch_threads  # noqa: E402


def run_matrix(names: Optional[Sequence[str]] = None, *, only: Sequence[str] = (),
               verbose: bool = False) -> List[Result]:
    """Run the named cases (default: all), or those whose name contains any of ``only``."""
    cases = list_cases()
    if names is not None:
        by_name = {c.name: c for c in cases}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"unknown configs: {missing}")
        cases = [by_name[n] for n in names]
    if only:
        cases = [c for c in cases if any(o.lower() in c.name.lower() for o in only)]
    results = []
    with tempfile.TemporaryDirectory(prefix="d2_reclass_matrix_") as workdir:
        for i, case in enumerate(cases):
            r = run_case(case, workdir)
            results.append(r)
            if verbose:
                print(f"[{i + 1}/{len(cases)}] {r.status:7s} {r.seconds:6.1f}s  {r.name}"
                      + (f"  ({r.reason})" if r.status != "ok" else ""), file=sys.stderr,
                      flush=True)
    return results


def format_table(results: Sequence[Result]) -> str:
    rows = [(r.name, r.kind, r.status, r.thing, r.stuff, r.class_tensors or "", r.forward,
             f"{r.seconds:.1f}", (f"[{r.skip_kind}] " if r.skip_kind else "") + r.reason)
            for r in results]
    return tabulate(rows, headers=["config", "kind", "status", "thing", "stuff",
                                   "class tensors", "forward", "s", "reason / notes"],
                    tablefmt="pipe")


def summary_line(results: Sequence[Result], seconds: Optional[float] = None) -> str:
    n = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    buildable = n["ok"] + n["failed"]
    line = (f"{len(results)} configs: {n['ok']} ok, {n['skipped']} skipped, {n['failed']} failed"
            f" ({100.0 * n['ok'] / buildable if buildable else 0:.0f}% of the "
            f"{buildable} buildable ok)")
    if seconds is not None:
        line += f", in {seconds:.0f} s"
    return line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the representative configs")
    parser.add_argument("--only", action="append", default=[],
                        help="configs whose name contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the configs and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-config progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.list:
        for c in list_cases():
            print(f"{c.kind:8s} {c.name}")
        return 0
    t0 = time.perf_counter()
    results = run_matrix(list(FAST) if args.fast else None, only=args.only,
                         verbose=not args.quiet)
    elapsed = time.perf_counter() - t0
    print(format_table(results))
    print()
    print(summary_line(results, elapsed))
    for kind in sorted({r.kind for r in results}):  # the zoo's, detectron2's projects', Detic's
        print(f"  {kind}: " + summary_line([r for r in results if r.kind == kind]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    configure_torch_threads()
    sys.exit(main())
