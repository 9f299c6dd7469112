#!/usr/bin/env python
"""Box AP against fine-tuning iterations: MODEL.RECLASS.MODE map vs reinit, over seeds.

    .venv/bin/python benchmarks/map_vs_reinit.py              # N = SOLVER.MAX_ITER of the configs
    .venv/bin/python benchmarks/map_vs_reinit.py --iters 400  # a longer schedule
    .venv/bin/python benchmarks/map_vs_reinit.py --seeds 1 2 3 4 5

Reuses the demo's datasets, source model and iteration-0 evaluations (``tools/demo.py`` makes
them first when they are missing), then fine-tunes the source model to the target task
(triangle, square, star) with each of the demo's target configs (``TARGET_CONFIGS`` in
tools/demo.py: map with the head's init for the new class, map with the default init, reinit)
for every seed (``SEED s MODEL.RECLASS.SEED s``, as the
demo) and N iterations (the configs' LR steps moved to the same fraction of N), saving a
checkpoint every N / 4. Each checkpoint is then evaluated by ``tools/train_net.py --eval-only``;
iteration N is the evaluation at the end of training.

Checkpoints, not detectron2's periodic evaluation (TEST.EVAL_PERIOD): every evaluation during
training iterates a new test data loader, which draws its base seed from the global torch RNG,
and that RNG also samples the RPN and ROI-head training proposals, so periodic evaluation
changes the training that follows it. Saving does not, so with the default N these runs train
exactly as the demo's, and the iteration-N row equals the demo's table.

Runs live in ``output/map_vs_reinit/`` and are cached like the demo's; the intermediate
checkpoints (98 MB each) are deleted once evaluated. Machine, timings and the table:
docs/benchmarks.md, "Map vs reinit".
"""
import argparse
import glob
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import demo  # noqa: E402  (tools/demo.py)

RUNS = os.path.join(demo.ROOT, "output", "map_vs_reinit")


def schedule_opts(mode: str, n: int, points: int) -> List[str]:
    """train_net.py opts for N = ``n`` iterations and a checkpoint every ``n / points``."""
    solver = demo.load_config(demo.TARGET_CONFIGS[mode]).SOLVER
    if n % points:
        sys.exit(f"--iters {n} is not a multiple of --points {points}")
    # The LR steps keep their place in the schedule when --iters changes its length.
    steps = tuple(round(s * n / solver.MAX_ITER) for s in solver.STEPS)
    return ["SOLVER.MAX_ITER", str(n), "SOLVER.STEPS", str(steps),
            "SOLVER.CHECKPOINT_PERIOD", str(n // points)]


def fine_tune_curve(mode: str, seed: int, data_dir: str, source: dict, n: int,
                    points: int) -> Dict[int, dict]:
    """{iterations done: metrics} of one fine-tune in ``mode`` with ``seed``, for every
    checkpoint after iteration 0 (cached; iteration 0 is the demo's)."""
    config = demo.TARGET_CONFIGS[mode]
    opts = [*demo.seed_opts(seed), *schedule_opts(mode, n, points)]
    run_dir = os.path.join(RUNS, f"{mode}-{n}iters-seed{seed}")
    key = demo.run_key(source["weights"], *demo.config_chain(config), opts)
    record = demo.cached(run_dir, key)
    if record is not None:
        print(f"   cached: {demo.rel(run_dir)}")
    else:
        train_dir = os.path.join(run_dir, "train")
        t0 = time.time()
        demo.train_net(["--config-file", config, *demo.dataset_args(data_dir, ["target"]),
                        *opts, "OUTPUT_DIR", demo.rel(train_dir)],
                       os.path.join(train_dir, "train.log"))
        seconds = time.time() - t0
        curve = {n: demo.evaluate_run(train_dir, data_dir, "target")}
        period = n // points
        for done in range(period, n, period):
            # PeriodicCheckpointer names a checkpoint after the index of its last iteration.
            weights = os.path.join(train_dir, f"model_{done - 1:07d}.pth")
            eval_dir = os.path.join(run_dir, f"iter{done}")
            demo.train_net(["--eval-only", "--config-file", config,
                            *demo.dataset_args(data_dir, ["target"]),
                            "MODEL.WEIGHTS", demo.rel(weights), "OUTPUT_DIR", demo.rel(eval_dir)],
                           os.path.join(eval_dir, "eval.log"))
            curve[done] = demo.evaluate_run(eval_dir, data_dir, "target")
        for path in glob.glob(os.path.join(train_dir, "model_0*.pth")):
            os.remove(path)
        record = demo.mark_done(run_dir, key, {
            "seconds": seconds, "curve": {str(k): v for k, v in sorted(curve.items())}})
    return {int(k): v for k, v in record["curve"].items()}


def mean_ap(metrics: dict, classes: Sequence[str]) -> float:
    """The mean of the per-class AP of ``classes``."""
    return statistics.mean(metrics[f"AP-{c}"] for c in classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=0,
                        help="fine-tuning iterations N (default: SOLVER.MAX_ITER of the configs)")
    parser.add_argument("--points", type=int, default=4, help="evaluations after iteration 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(demo.BENCH_SEEDS),
                        help="fine-tuning seeds (SEED and MODEL.RECLASS.SEED); default: "
                        "%(default)s")
    args = parser.parse_args()
    t0 = time.time()

    data_dir, source = demo.prepare()
    # curves[mode][seed]: {iterations done: metrics}
    curves: Dict[str, Dict[int, Dict[int, dict]]] = {}
    for mode, config in demo.TARGET_CONFIGS.items():
        n = args.iters or int(demo.load_config(config).SOLVER.MAX_ITER)
        curves[mode] = {}
        for seed in args.seeds:
            demo.step(f"{mode} ({config}), seed {seed}, {n} iterations")
            start = demo.eval_iteration0(mode, seed, data_dir, source)
            curves[mode][seed] = {0: start["metrics"],
                                  **fine_tune_curve(mode, seed, data_dir, source, n, args.points)}

    from tabulate import tabulate

    kept, new = demo.KEPT, [c for c in demo.TARGET_CLASSES if c not in demo.KEPT]
    columns = [("AP", lambda m: m["AP"]), (f"AP {'+'.join(kept)}", lambda m: mean_ap(m, kept)),
               (f"AP {'+'.join(new)}", lambda m: mean_ap(m, new))]
    iters = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs.values())))
    rows = []
    for i in iters:
        row = [i]
        for _, value in columns:
            for mode in demo.TARGET_CONFIGS:
                row.append(demo.spread([value(curve[i]) for curve in curves[mode].values()]))
        rows.append(row)
    headers = ["iteration", *(f"{mode} {name}" for name, _ in columns
                              for mode in demo.TARGET_CONFIGS)]
    demo.step("Box AP (%) on the target val set against fine-tuning iterations")
    print(f"Mean and (min-max) over seeds {args.seeds}, {os.environ['OMP_NUM_THREADS']} torch "
          "thread(s) per process:\n")
    print(tabulate(rows, headers=headers, tablefmt="pipe", colalign=["right"] * len(headers)))
    print(f"\nbenchmark finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
