#!/usr/bin/env python
"""Box AP against fine-tuning iterations: MODEL.RECLASS.MODE map vs reinit.

    .venv/bin/python benchmarks/map_vs_reinit.py              # N = SOLVER.MAX_ITER of the configs
    .venv/bin/python benchmarks/map_vs_reinit.py --iters 400  # a longer schedule

Reuses the demo's cached datasets and source model (``tools/demo.py`` trains them first when
they are missing), then fine-tunes the source model to the target task (triangle, square, star)
with ``configs/shapes_target_map.yaml`` and ``configs/shapes_target_reinit.yaml``, both with
``TEST.EVAL_PERIOD = N / 4`` so that detectron2 evaluates at N/4, N/2, 3N/4 and N (the configs'
LR steps scaled to N); iteration 0 is the demo's ``--eval-only`` run. Every later number comes
from detectron2's ``metrics.json``. The runs are cached under ``data/demo/`` like the demo's.

Machine: a 2-core x86 CPU, no GPU, 24 GiB; torch 2.14.1 CPU, detectron2 0.7.2 without compiled
ops, train_net.py run with OMP_NUM_THREADS=1 (see tools/demo.py: train_env). Command:
``.venv/bin/python benchmarks/map_vs_reinit.py``: 140 s with the demo's cache in place (two
fine-tunes of 100 iterations at 0.5 s each, 8 evaluations at 4 s), plus about 4 minutes when the
source model must be trained first.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import demo  # noqa: E402  (tools/demo.py)


def ap_by_iteration(run_dir: str, max_iter: int) -> dict:
    """{iterations done: {metric: value}} from the evaluations in a run's metrics.json."""
    out = {}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            record = json.loads(line)
            if "bbox/AP" in record:
                # EvalHook's periodic results are stored at the index of the iteration just
                # finished (24 after 25 iterations); the final one, run after training, at
                # MAX_ITER itself.
                done = min(record["iteration"] + 1, max_iter)
                out[done] = {k[len("bbox/"):]: v for k, v in record.items()
                             if k.startswith("bbox/")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=0,
                        help="fine-tuning iterations N (default: SOLVER.MAX_ITER of the configs)")
    parser.add_argument("--points", type=int, default=4, help="evaluations after iteration 0")
    args = parser.parse_args()
    t0 = time.time()

    data_dir, source = demo.prepare()
    curves = {}
    for mode in ("map", "reinit"):
        demo.step(f"MODEL.RECLASS.MODE {mode}")
        start = demo.eval_iteration0(mode, data_dir, source)
        solver = demo.config_solver(demo.TARGET_CONFIGS[mode])
        n = args.iters or solver.MAX_ITER
        if n % args.points:
            sys.exit(f"--iters {n} is not a multiple of --points {args.points}")
        # The LR steps keep their place in the schedule when --iters changes its length.
        steps = tuple(round(s * n / solver.MAX_ITER) for s in solver.STEPS)
        opts = ["SOLVER.MAX_ITER", str(n), "SOLVER.STEPS", str(steps),
                "TEST.EVAL_PERIOD", str(n // args.points)]
        run = demo.fine_tune(mode, data_dir, source, extra_opts=opts)
        run_dir = os.path.join(demo.ROOT, os.path.dirname(run["weights"]))
        curves[mode] = {0: start["metrics"], **ap_by_iteration(run_dir, n)}

    from tabulate import tabulate

    iters = sorted(set(curves["map"]) & set(curves["reinit"]))
    kept, new = demo.KEPT, [c for c in demo.TARGET_CLASSES if c not in demo.KEPT]

    def mean(m, classes):
        return sum(m[f"AP-{c}"] for c in classes) / len(classes)

    rows = []
    for i in iters:
        mp, ri = curves["map"][i], curves["reinit"][i]
        rows.append([i, mp["AP"], ri["AP"], mp["AP50"], ri["AP50"], mean(mp, kept), mean(ri, kept),
                     mean(mp, new), mean(ri, new)])
    headers = ["iteration", "map AP", "reinit AP", "map AP50", "reinit AP50",
               f"map AP {'+'.join(kept)}", f"reinit AP {'+'.join(kept)}",
               f"map AP {'+'.join(new)}", f"reinit AP {'+'.join(new)}"]
    demo.step("Box AP (%) on the target val set against fine-tuning iterations")
    print(tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".1f"))
    print(f"\nbenchmark finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
