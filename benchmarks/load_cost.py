"""Load cost: ReclassCheckpointer against stock DetectionCheckpointer, same files, same run.

Run (from the repository root)::

    .venv/bin/python benchmarks/load_cost.py                 # every row, 5 runs per loader
    .venv/bin/python benchmarks/load_cost.py --runs 7 --cache-dir data/bench
    .venv/bin/python benchmarks/load_cost.py --row mask_rcnn_R50_FPN_coco80/pth   # one row

What is measured, per row (a checkpoint file and a target model):

* **cold time**: wall time of the first ``checkpointer.load(path)`` in a fresh process. The
  model is built (and the checkpointer constructed) before the clock starts; reading the file,
  matching, the class surgery (reclass) and ``load_state_dict`` are inside it. This is what a
  training run pays once.
* **warm time**: the same process then loads the same file ``--warm-loads`` more times (3 by
  default, garbage collected before each) and keeps the fastest: the steady state, with imports
  done, the allocator warm and the file in the page cache, where a slower reader shows most.
* **memory**: before the cold load the process collects garbage and reads its resident set size
  (``/proc/self/statm``); after it, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. "peak MB" is
  that peak **minus the RSS right before the load**: the extra memory the load needed at its
  worst. The whole-process peaks are printed too ("proc peak"); the model build is identical on
  both sides, so they differ only by the load. (The orchestrating process imports no torch, so
  the peak a child inherits from it at exec is small; it is the same for both loaders anyway.)
* both loaders run ``--runs`` processes (at least 5) per row, alternating (stock, reclass, then
  reclass, stock, ...) so that drift from other load on the machine hits both alike; the tables
  give medians over the processes and the ratios reclass / stock of the medians.
* every process runs torch with 1 thread (``torch.set_num_threads(1)`` and
  ``OMP_NUM_THREADS=1``): the same for both loaders, and it keeps them off each other's cores.

Rows: each checkpoint in both formats, loaded into a model built for the SAME classes (both
loaders just load: the apples-to-apples comparison), plus one row per checkpoint (``.pth``)
loaded into a model built for 3 classes: ReclassCheckpointer maps the heads (mode ``map``, two
kept classes and a new one), while stock DetectionCheckpointer skips every class-dependent
tensor with a warning, so it does less work there (and leaves those heads at their init).
``--row`` names rows as ``KEY/FORMAT`` and ``KEY/pth->3``; ``--help`` lists them.

Checkpoints, generated once into ``--cache-dir`` (default ``data/bench/``, git-ignored) from
randomly initialised models with the real shapes, each saved as a d2 ``.pth``
(``torch.save({"model": state_dict})``) and a model-zoo-style ``.pkl`` (``pickle`` protocol 2 of
``{"model": {name: ndarray}, "__author__": "d2_reclass bench"}``):

* ``mask_rcnn_R50_FPN_coco80``: ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``, the
  80 COCO classes;
* ``cascade_mask_rcnn_X101_FPN_lvis1203``: the zoo has no buildable cascade X101 config (its
  X152 cascade uses deformable conv, which needs compiled ops), so it is
  ``LVISv1-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_1x.yaml`` (X101-32x8d FPN, 1203 LVIS
  classes) with the cascade settings of ``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``:
  ``MODEL.ROI_HEADS.NAME CascadeROIHeads``, ``MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True``,
  ``MODEL.RPN.POST_NMS_TOPK_TRAIN 2000`` (3 box predictors of 1204 logits, a 1203-channel mask
  predictor).
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

CHECKPOINTS = {
    "mask_rcnn_R50_FPN_coco80": {
        "config": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        "opts": [],
        "dataset": "coco_2017_train",
    },
    "cascade_mask_rcnn_X101_FPN_lvis1203": {
        "config": "LVISv1-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_1x.yaml",
        "opts": ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
                 "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
                 "MODEL.RPN.POST_NMS_TOPK_TRAIN", 2000],
        "dataset": "lvis_v1_train",
    },
}
FORMATS = ("pth", "pkl")
LOADERS = ("stock", "reclass")
NEW_CLASS = "gadget"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------------------
# In a subprocess: build, generate, load (torch and detectron2 are imported only here)
# -------------------------------------------------------------------------------------------


def _classes(key: str) -> List[str]:
    from detectron2.data import MetadataCatalog

    return list(MetadataCatalog.get(CHECKPOINTS[key]["dataset"]).thing_classes)


def _build(key: str, num_classes: Optional[int] = None, seed: int = 0):
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    spec = CHECKPOINTS[key]
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(spec["config"]))
    cfg.merge_from_list(list(spec["opts"]))
    cfg.MODEL.DEVICE = "cpu"
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _paths(cache_dir: str, key: str) -> Dict[str, str]:
    return {fmt: os.path.join(cache_dir, f"{key}.{fmt}") for fmt in FORMATS}


def _generate(cache_dir: str, key: str) -> None:
    """Write ``key``'s .pth and .pkl unless both exist (each written to a temp name, renamed)."""
    import pickle

    import torch

    paths = _paths(cache_dir, key)
    if all(os.path.exists(p) for p in paths.values()):
        return
    os.makedirs(cache_dir, exist_ok=True)
    state = _build(key).state_dict()
    tmp = paths["pth"] + ".tmp"
    torch.save({"model": state}, tmp)
    os.replace(tmp, paths["pth"])
    tmp = paths["pkl"] + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()},
                     "__author__": "d2_reclass bench"}, f, protocol=2)
    os.replace(tmp, paths["pkl"])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(cache_dir: str, key: str, fmt: str, loader: str, target: str,
            warm_loads: int) -> dict:
    import gc
    import logging
    import resource

    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_reclass import ReclassCheckpointer, ReclassOptions

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the same for both loaders; keeps them off each other's cores
    names = _classes(key)
    target_names = names if target == "same" else [names[1], names[0], NEW_CLASS]
    model = _build(key, len(target_names), seed=1)
    if loader == "stock":
        ckpt = DetectionCheckpointer(model)
    else:
        options = ReclassOptions(mode="map" if target != "same" else "auto",
                                 source_classes=names, target_classes=target_names)
        ckpt = ReclassCheckpointer(model, reclass=options)
    path = _paths(cache_dir, key)[fmt]

    def timed_load() -> float:
        gc.collect()  # the previous load's garbage must not be collected on this one's clock
        t0 = time.perf_counter()
        ckpt.load(path)
        return time.perf_counter() - t0

    gc.collect()
    rss_before = _rss_bytes()
    cold = timed_load()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    changed = None
    if loader == "reclass" and ckpt.report is not None:
        changed = len(ckpt.report.tensors)
    warm = [timed_load() for _ in range(warm_loads)]
    return {"seconds": cold, "warm": warm, "rss_before": rss_before, "peak": peak,
            "changed": changed}


# -------------------------------------------------------------------------------------------
# The orchestrator
# -------------------------------------------------------------------------------------------


def _run_child(args: List[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__)] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(x: float) -> float:
    return x / 2**20


def _row_id(key: str, fmt: str, target: str) -> str:
    return f"{key}/{fmt}" if target == "same" else f"{key}/{fmt}->{target}"


#: Every row: each checkpoint in both formats into a model with the same classes, then each
#: ``.pth`` into a 3-class model (mapped by reclass, skipped by stock).
ROWS = [(key, fmt, "same") for key in CHECKPOINTS for fmt in FORMATS]
ROWS += [(key, "pth", "3") for key in CHECKPOINTS]


def _spread(times: List[float]) -> str:
    return f"{min(times):.2f}-{max(times):.2f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _measure_row(args: argparse.Namespace, key: str, fmt: str, target: str) -> Dict[str, list]:
    """``--runs`` worker results per loader, the loaders alternating."""
    results: Dict[str, List[dict]] = {loader: [] for loader in LOADERS}
    for i in range(args.runs):
        order = LOADERS if i % 2 == 0 else LOADERS[::-1]
        for loader in order:
            results[loader].append(_run_child(
                ["--cache-dir", args.cache_dir, "--warm-loads", str(args.warm_loads),
                 "--worker", key, fmt, loader, target]))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="fresh processes per loader and row (>= 5)")
    parser.add_argument("--warm-loads", type=int, default=3,
                        help="loads after the cold one in each process; the fastest is 'warm'")
    parser.add_argument("--cache-dir", default=os.path.join(REPO, "data", "bench"))
    parser.add_argument("--only", choices=sorted(CHECKPOINTS), action="append",
                        help="only the rows of this checkpoint (repeatable)")
    parser.add_argument("--row", choices=[_row_id(*r) for r in ROWS], action="append",
                        help="only this row (repeatable); default: every row")
    parser.add_argument("--worker", nargs=4, metavar=("KEY", "FORMAT", "LOADER", "TARGET"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--generate", metavar="KEY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.generate:
        _generate(args.cache_dir, args.generate)
        print(json.dumps({"ok": True}))
        return 0
    if args.worker:
        print(json.dumps(_worker(args.cache_dir, *args.worker, warm_loads=args.warm_loads)))
        return 0
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    if args.warm_loads < 1:
        parser.error("--warm-loads must be at least 1")

    from tabulate import tabulate

    rows = [r for r in ROWS if (not args.only or r[0] in args.only)
            and (not args.row or _row_id(*r) in args.row)]
    if not rows:
        parser.error("--only and --row select no row together")
    python = os.path.relpath(sys.executable, REPO)
    if python.startswith(os.pardir):  # an interpreter outside the repository: say which
        python = sys.executable
    command = shlex.join([python, os.path.relpath(os.path.abspath(__file__), REPO)]
                         + list(sys.argv[1:] if argv is None else argv))
    load_at_start = _load_average()
    t_start = time.perf_counter()
    for key in dict.fromkeys(r[0] for r in rows):
        t0 = time.perf_counter()
        existed = all(os.path.exists(p) for p in _paths(args.cache_dir, key).values())
        _run_child(["--cache-dir", args.cache_dir, "--generate", key])
        sizes = ", ".join(f"{fmt} {_mb(os.path.getsize(p)):.0f} MB"
                          for fmt, p in _paths(args.cache_dir, key).items())
        print(f"{key}: {'cached' if existed else f'generated in {time.perf_counter() - t0:.0f} s'}"
              f" ({sizes})", file=sys.stderr, flush=True)

    times, memory, raw = [], [], []
    for key, fmt, target in rows:
        results = _measure_row(args, key, fmt, target)
        cold = {loader: [r["seconds"] for r in rs] for loader, rs in results.items()}
        warm = {loader: [min(r["warm"]) for r in rs] for loader, rs in results.items()}
        med = {loader: {
            "cold": statistics.median(cold[loader]),
            "warm": statistics.median(warm[loader]),
            "inc": statistics.median(_mb(r["peak"] - r["rss_before"]) for r in rs),
            "proc": statistics.median(_mb(r["peak"]) for r in rs),
        } for loader, rs in results.items()}
        st, rc = med["stock"], med["reclass"]
        label = key if target == "same" else f"{key} -> 3 classes (stock skips heads)"
        times.append([label, fmt, f"{st['cold']:.2f}", f"{rc['cold']:.2f}",
                      f"{rc['cold'] / st['cold']:.2f}", f"{st['warm']:.3f}", f"{rc['warm']:.3f}",
                      f"{rc['warm'] / st['warm']:.2f}", _spread(cold["stock"]),
                      _spread(cold["reclass"]), _spread(warm["stock"]), _spread(warm["reclass"])])
        memory.append([label, fmt, f"{st['inc']:.0f}", f"{rc['inc']:.0f}",
                       f"{rc['inc'] / st['inc']:.2f}", f"{st['proc']:.0f}", f"{rc['proc']:.0f}"])
        raw.append({"checkpoint": key, "format": fmt, "target": target, "runs": results})
        print(f"  done: {label} {fmt}", file=sys.stderr, flush=True)

    print(f"command: {command}")
    print()
    print(tabulate(times, tablefmt="pipe", disable_numparse=True, headers=[
        "checkpoint", "format", "cold stock s", "cold reclass s", "cold ratio", "warm stock s",
        "warm reclass s", "warm ratio", "cold stock min-max", "cold reclass min-max",
        "warm stock min-max", "warm reclass min-max"]))
    print()
    print(tabulate(memory, tablefmt="pipe", disable_numparse=True, headers=[
        "checkpoint", "format", "stock peak MB", "reclass peak MB", "memory ratio",
        "stock proc peak MB", "reclass proc peak MB"]))
    raw_path = os.path.join(args.cache_dir, "load_cost_runs.json")
    with open(raw_path, "w") as f:
        json.dump(raw, f, indent=1)
    print()
    print(f"{args.runs} processes per loader and row, alternating; every process runs torch with "
          f"1 thread (set_num_threads(1), OMP_NUM_THREADS=1). cold = its first load; warm = the "
          f"fastest of the {args.warm_loads} loads after it. Times and memory are medians over "
          f"the processes; ratio = reclass / stock. peak MB = ru_maxrss after the cold load "
          f"minus the RSS right before it; proc peak = ru_maxrss of the whole process (model "
          f"build identical).")
    print(f"{_cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}, Python "
          f"{platform.python_version()}; load average (1/5/15 min) {load_at_start} at start, "
          f"{_load_average()} at end; total {time.perf_counter() - t_start:.0f} s; every run in "
          f"{raw_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
