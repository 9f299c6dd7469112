"""Load cost: ReclassCheckpointer against stock DetectionCheckpointer, same files, same run.

Run (from the repository root)::

    .venv/bin/python benchmarks/load_cost.py                 # 5 runs per loader and row
    .venv/bin/python benchmarks/load_cost.py --runs 7 --cache-dir data/bench

What is measured, per row (a checkpoint file and a target model):

* **time**: wall time of ``checkpointer.load(path)`` alone. The model is built (and the
  checkpointer constructed) before the clock starts; reading the file, matching, the class
  surgery (reclass) and ``load_state_dict`` are inside it.
* **memory**: every load runs in a fresh subprocess, which builds the model, collects garbage,
  reads its resident set size (``/proc/self/statm``), loads, then reads
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. "peak MB" is that peak **minus the RSS right
  before the load**: the extra memory the load needed at its worst. The whole-process peaks are
  printed too ("proc peak"); the model build is identical on both sides, so they differ only by
  the load. (The orchestrating process imports no torch, so the peak a child inherits from it
  at exec is small; it is the same for both loaders anyway.)
* both loaders run ``--runs`` times (at least 5) per row, alternating (stock, reclass, then
  reclass, stock, ...) so that drift from other load on the machine hits both alike; the table
  gives medians and the ratios reclass / stock of the medians.

Rows: each checkpoint in both formats, loaded into a model built for the SAME classes (both
loaders just load: the apples-to-apples comparison), plus one row per checkpoint (``.pth``)
loaded into a model built for 3 classes: ReclassCheckpointer maps the heads (mode ``map``, two
kept classes and a new one), while stock DetectionCheckpointer skips every class-dependent
tensor with a warning, so it does less work there (and leaves those heads at their init).

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


def _worker(cache_dir: str, key: str, fmt: str, loader: str, target: str) -> dict:
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
        ckpt = ReclassCheckpointer(model,
            reclass=ReclassOptions(mode="map" if target != "same" else "auto",
                                   source_classes=names, target_classes=target_names))
    path = _paths(cache_dir, key)[fmt]
    gc.collect()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    ckpt.load(path)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    changed = None
    if loader == "reclass" and ckpt.report is not None:
        changed = len(ckpt.report.tensors)
    return {"seconds": seconds, "rss_before": rss_before, "peak": peak, "changed": changed}


# -------------------------------------------------------------------------------------------
# The orchestrator
# -------------------------------------------------------------------------------------------


def _run_child(args: List[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__)] + args
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(x: float) -> float:
    return x / 2**20


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="loads per loader and row (>= 5)")
    parser.add_argument("--cache-dir", default=os.path.join(REPO, "data", "bench"))
    parser.add_argument("--only", choices=sorted(CHECKPOINTS), action="append")
    parser.add_argument("--worker", nargs=4, metavar=("KEY", "FORMAT", "LOADER", "TARGET"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--generate", metavar="KEY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.generate:
        _generate(args.cache_dir, args.generate)
        print(json.dumps({"ok": True}))
        return 0
    if args.worker:
        print(json.dumps(_worker(args.cache_dir, *args.worker)))
        return 0
    if args.runs < 5:
        parser.error("--runs must be at least 5")

    from tabulate import tabulate

    keys = args.only or list(CHECKPOINTS)
    t_start = time.perf_counter()
    for key in keys:
        t0 = time.perf_counter()
        existed = all(os.path.exists(p) for p in _paths(args.cache_dir, key).values())
        _run_child(["--cache-dir", args.cache_dir, "--generate", key])
        sizes = ", ".join(f"{fmt} {_mb(os.path.getsize(p)):.0f} MB"
                          for fmt, p in _paths(args.cache_dir, key).items())
        print(f"{key}: {'cached' if existed else f'generated in {time.perf_counter() - t0:.0f} s'}"
              f" ({sizes})", file=sys.stderr, flush=True)

    rows_spec = [(key, fmt, "same") for key in keys for fmt in FORMATS]
    rows_spec += [(key, "pth", "3") for key in keys]
    table, raw = [], []
    for key, fmt, target in rows_spec:
        results: Dict[str, List[dict]] = {loader: [] for loader in LOADERS}
        for i in range(args.runs):
            order = LOADERS if i % 2 == 0 else LOADERS[::-1]
            for loader in order:
                results[loader].append(_run_child(
                    ["--cache-dir", args.cache_dir, "--worker", key, fmt, loader, target]))
        med = {loader: {
            "s": statistics.median(r["seconds"] for r in rs),
            "inc": statistics.median(_mb(r["peak"] - r["rss_before"]) for r in rs),
            "proc": statistics.median(_mb(r["peak"]) for r in rs),
        } for loader, rs in results.items()}
        st, rc = med["stock"], med["reclass"]
        label = key if target == "same" else f"{key} -> 3 classes (stock skips heads)"
        spread = {loader: f"{min(r['seconds'] for r in rs):.2f}-{max(r['seconds'] for r in rs):.2f}"
                  for loader, rs in results.items()}
        table.append([label, fmt, f"{st['s']:.2f}", f"{rc['s']:.2f}", f"{rc['s'] / st['s']:.2f}",
                      f"{st['inc']:.0f}", f"{rc['inc']:.0f}", f"{rc['inc'] / st['inc']:.2f}",
                      f"{st['proc']:.0f}", f"{rc['proc']:.0f}", spread["stock"],
                      spread["reclass"]])
        raw.append({"checkpoint": key, "format": fmt, "target": target, "runs": results})
        print(f"  done: {label} {fmt}", file=sys.stderr, flush=True)

    print(tabulate(table, tablefmt="pipe", headers=[
        "checkpoint", "format", "stock median s", "reclass median s", "time ratio",
        "stock peak MB", "reclass peak MB", "memory ratio", "stock proc peak MB",
        "reclass proc peak MB", "stock min-max s", "reclass min-max s"], disable_numparse=True))
    raw_path = os.path.join(args.cache_dir, "load_cost_runs.json")
    with open(raw_path, "w") as f:
        json.dump(raw, f, indent=1)
    print()
    print(f"{args.runs} loads per loader and row, alternating, each in a fresh subprocess "
          "(1 torch thread); medians. peak MB = ru_maxrss at the end minus the RSS right before "
          "the load; proc peak = ru_maxrss of the whole process (model build identical).")
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"total {time.perf_counter() - t_start:.0f} s; every run in {raw_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
