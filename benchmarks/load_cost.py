"""Load cost: ReclassCheckpointer against stock DetectionCheckpointer, same files, same run.

Run (from the repository root)::

    .venv/bin/python benchmarks/load_cost.py                 # every row, 5 runs per loader
    .venv/bin/python benchmarks/load_cost.py --runs 7 --cache-dir data/bench
    .venv/bin/python benchmarks/load_cost.py --row mask_rcnn_R50_FPN_coco80/pth   # one row
    .venv/bin/python benchmarks/load_cost.py --scale --loads 7   # the class-count cases

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

``--scale`` measures instead how the cost grows with the number of classes (LVIS's 1,203), each
case in one process with the two loaders interleaved (``--loads`` loads each, the fastest kept:
on a shared machine fresh processes vary by x1.3-1.7 where interleaved loads agree to a few
percent), every load ``MODE map`` with both class lists named, the log set up as a project's:

* Mask R-CNN R50-FPN (``mask_rcnn_R_50_FPN_3x.yaml``) and Cascade Mask R-CNN R50-FPN
  (``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``: three box predictors, each with 1,204 logits
  and class-specific boxes at 1,203 classes), their checkpoints for the 80 COCO classes and
  for the 1,203 LVIS v1 classes;
* cases: ``80 -> 3`` and ``1203 -> 3`` (two kept classes, swapped, and a new one), ``80
  reversed`` and ``1203 reversed`` (a pure reorder), ``80 -> 1203`` (the 80 classes and the
  first 1,123 LVIS classes COCO lacks, sorted by name: 80 moved, 1,123 new);
* growth: the cost over stock (reclass minus stock, fastest loads) per 1,000 classes, for a
  reorder (80 reversed to 1203 reversed) and for new classes (80 -> 3 to 80 -> 1203).

Stock DetectionCheckpointer skips every class tensor of another shape, so in the ``-> 3`` and
``80 -> 1203`` cases it does less than ReclassCheckpointer, which maps them.

``--imprint 100x1 100x4`` measures ``NEW_CLASS_INIT imprint`` instead: per ``NxM`` one load of
the 1,203-class R50 checkpoint into a model whose last N classes are new, M example images each
(128 px, a box of one new and one kept class per image): the images read, the time per image,
and the rest (planning, the rules, writing the rows), with a digest of the rows written.
"""
import argparse
import json
import os
import platform
import re
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
#: The checkpoints of ``--scale`` (``.pth`` only), with the COCO R50 one above.
SCALE_CHECKPOINTS = {
    "mask_rcnn_R50_FPN_lvis1203": {
        "config": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        "opts": ["MODEL.ROI_HEADS.NUM_CLASSES", 1203],
        "dataset": "lvis_v1_train",
    },
    "cascade_mask_rcnn_R50_FPN_coco80": {
        "config": "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml",
        "opts": [],
        "dataset": "coco_2017_train",
    },
    "cascade_mask_rcnn_R50_FPN_lvis1203": {
        "config": "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml",
        "opts": ["MODEL.ROI_HEADS.NUM_CLASSES", 1203],
        "dataset": "lvis_v1_train",
    },
}
#: ``--scale`` cases: label -> (checkpoint, target: "3", "reversed" or "lvis").
SCALE_CASES = {
    "R50 80 -> 3": ("mask_rcnn_R50_FPN_coco80", "3"),
    "R50 80 reversed": ("mask_rcnn_R50_FPN_coco80", "reversed"),
    "R50 1203 -> 3": ("mask_rcnn_R50_FPN_lvis1203", "3"),
    "R50 1203 reversed": ("mask_rcnn_R50_FPN_lvis1203", "reversed"),
    "R50 80 -> 1203": ("mask_rcnn_R50_FPN_coco80", "lvis"),
    "Cascade 80 -> 3": ("cascade_mask_rcnn_R50_FPN_coco80", "3"),
    "Cascade 80 reversed": ("cascade_mask_rcnn_R50_FPN_coco80", "reversed"),
    "Cascade 1203 reversed": ("cascade_mask_rcnn_R50_FPN_lvis1203", "reversed"),
    "Cascade 80 -> 1203": ("cascade_mask_rcnn_R50_FPN_coco80", "lvis"),
}
#: Growth lines: (what, fewer-classes case, more-classes case) per model.
SCALE_GROWTH = [
    (model, what, f"{model} {small}", f"{model} {large}")
    for model in ("R50", "Cascade")
    for what, small, large in (("reorder", "80 reversed", "1203 reversed"),
                               ("new classes", "80 -> 3", "80 -> 1203"))
]
FORMATS = ("pth", "pkl")
LOADERS = ("stock", "reclass")
NEW_CLASS = "gadget"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------------------
# In a subprocess: build, generate, load (torch and detectron2 are imported only here)
# -------------------------------------------------------------------------------------------


def _spec(key: str) -> dict:
    return CHECKPOINTS[key] if key in CHECKPOINTS else SCALE_CHECKPOINTS[key]


def _classes(key: str) -> List[str]:
    from detectron2.data import MetadataCatalog

    return list(MetadataCatalog.get(_spec(key)["dataset"]).thing_classes)


def _build(key: str, num_classes: Optional[int] = None, seed: int = 0):
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    spec = _spec(key)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(spec["config"]))
    cfg.merge_from_list(list(spec["opts"]))
    cfg.MODEL.DEVICE = "cpu"
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _paths(cache_dir: str, key: str) -> Dict[str, str]:
    formats = FORMATS if key in CHECKPOINTS else ("pth",)
    return {fmt: os.path.join(cache_dir, f"{key}.{fmt}") for fmt in formats}


def _generate(cache_dir: str, key: str) -> None:
    """Write ``key``'s .pth and .pkl (only the .pth for the scale checkpoints) unless they
    exist (each written to a temp name, renamed)."""
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
    if "pkl" not in paths:
        return
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


def _scale_target(names: List[str], target: str) -> List[str]:
    """The target classes of a ``--scale`` case whose checkpoint has ``names``."""
    if target == "3":
        return [names[1], names[0], NEW_CLASS]
    if target == "reversed":
        return names[::-1]
    from detectron2.data import MetadataCatalog

    from d2_reclass.classes import normalize_class_name

    have = {normalize_class_name(n) for n in names}
    lvis = MetadataCatalog.get("lvis_v1_train").thing_classes
    extra = [c for c in lvis if normalize_class_name(c) not in have][:1203 - len(names)]
    return sorted(names + extra)


def _scale_worker(cache_dir: str, case: str, loads: int) -> dict:
    """Stock and reclass loads of one ``--scale`` case, interleaved in this process."""
    import gc
    import logging

    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_reclass import ReclassCheckpointer, ReclassOptions

    logging.basicConfig(level=logging.WARNING)  # d2_reclass's INFO lines reach stderr
    torch.set_num_threads(1)
    key, target = SCALE_CASES[case]
    names = _classes(key)
    target_names = _scale_target(names, target)
    model = _build(key, len(target_names), seed=1)
    loaders = {
        "stock": DetectionCheckpointer(model),
        "reclass": ReclassCheckpointer(model, reclass=ReclassOptions(
            mode="map", source_classes=names, target_classes=target_names)),
    }
    path = _paths(cache_dir, key)["pth"]
    times: Dict[str, List[float]] = {loader: [] for loader in LOADERS}
    cpu: Dict[str, List[float]] = {loader: [] for loader in LOADERS}
    for i in range(loads):
        for loader in (LOADERS if i % 2 == 0 else LOADERS[::-1]):
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            loaders[loader].load(path)
            times[loader].append(time.perf_counter() - t0)
            cpu[loader].append(time.process_time() - c0)
    report = loaders["reclass"].report
    space = report.spaces["thing"].mapping
    return {"times": times, "cpu": cpu, "source": len(names), "target": len(target_names),
            "new": len(space.new), "tensors": len(report.tensors)}


def _scale(args: argparse.Namespace, command: str) -> int:
    """``--scale``: every case, then the growth lines."""
    from tabulate import tabulate

    load_at_start = _load_average()
    t_start = time.perf_counter()
    for key in dict.fromkeys(key for key, _ in SCALE_CASES.values()):
        _run_child(["--cache-dir", args.cache_dir, "--generate", key])
    rows, extra, raw = [], {}, {}
    for case in SCALE_CASES:
        r = _run_child(["--cache-dir", args.cache_dir, "--scale-worker", case,
                        "--loads", str(args.loads)])
        st, rc = (min(r["times"][loader]) * 1e3 for loader in LOADERS)
        med = [statistics.median(r["times"][loader]) * 1e3 for loader in LOADERS]
        cpu_st, cpu_rc = (min(r["cpu"][loader]) * 1e3 for loader in LOADERS)
        extra[case] = rc - st
        raw[case] = r
        rows.append([case, f"{r['source']} -> {r['target']}", r["new"], r["tensors"],
                     f"{st:.0f}", f"{rc:.0f}", f"{rc / st:.2f}", f"{med[1] / med[0]:.2f}",
                     f"{rc - st:+.0f}", f"{cpu_st:.0f}", f"{cpu_rc:.0f}",
                     f"{cpu_rc / cpu_st:.2f}"])
        print(f"  done: {case}", file=sys.stderr, flush=True)
    print(f"command: {command}")
    print()
    print(tabulate(rows, tablefmt="pipe", disable_numparse=True, headers=[
        "case", "classes", "new", "class tensors", "stock ms", "reclass ms", "ratio",
        "ratio of medians", "reclass - stock ms", "stock CPU ms", "reclass CPU ms",
        "CPU ratio"]))
    print()
    for model, what, small, large in SCALE_GROWTH:
        more = raw[large]["target"] - raw[small]["target"] if what == "new classes" \
            else raw[large]["source"] - raw[small]["source"]
        per_1000 = (extra[large] - extra[small]) / more * 1000
        print(f"{model}, {what}: {per_1000:+.1f} ms per 1,000 classes over stock ({small}: "
              f"{extra[small]:+.0f} ms, {large}: {extra[large]:+.0f} ms)")
    raw_path = os.path.join(args.cache_dir, "load_cost_scale_runs.json")
    with open(raw_path, "w") as f:
        json.dump(raw, f, indent=1)
    print()
    print(f"Each case in one process, the loaders interleaved, {args.loads} loads each; times are "
          f"the fastest load (wall clock; CPU: the process's CPU time, which other processes on "
          f"a shared machine disturb less), 'ratio of medians' the wall medians'; 1 torch thread. "
          f"{_cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load "
          f"average (1/5/15 min) {load_at_start} at start, {_load_average()} at end; total "
          f"{time.perf_counter() - t_start:.0f} s; every load in {raw_path}")
    return 0


#: ``--imprint``: the checkpoint whose model reads the examples (1,203 LVIS classes).
IMPRINT_CHECKPOINT = "mask_rcnn_R50_FPN_lvis1203"


def _imprint_dataset(cache_dir: str, count: int, new: List[str], kept: List[str]) -> List[dict]:
    """``count`` 128 px images (seeded noise, written once), image i with a box of new class
    ``i % len(new)`` and one of kept class ``i % len(kept)``; category ids index new + kept."""
    import numpy as np
    from PIL import Image

    root = os.path.join(cache_dir, "imprint_images")
    os.makedirs(root, exist_ok=True)
    dicts = []
    for i in range(count):
        path = os.path.join(root, f"{i:05d}.png")
        if not os.path.exists(path):
            pixels = np.random.default_rng(i).integers(0, 256, (128, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path + ".tmp.png")
            os.replace(path + ".tmp.png", path)
        dicts.append({"file_name": path, "image_id": i, "height": 128, "width": 128,
                      "annotations": [
                          {"bbox": [8, 8, 60, 60], "bbox_mode": 0, "category_id": i % len(new)},
                          {"bbox": [64, 64, 120, 120], "bbox_mode": 0,
                           "category_id": len(new) + i % len(kept)}]})
    return dicts


def _imprint_worker(cache_dir: str, new_classes: int, per_class: int) -> dict:
    """One ReclassCheckpointer load with NEW_CLASS_INIT imprint: ``new_classes`` new classes
    (of 1,203), ``per_class`` images each (INIT_IMAGES), every image also a kept-class box."""
    import hashlib
    import logging

    import torch

    from d2_reclass import NewClassExamples, ReclassCheckpointer, ReclassOptions

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    names = _classes(IMPRINT_CHECKPOINT)
    new = [f"new class {i}" for i in range(new_classes)]
    kept = names[:len(names) - new_classes]
    target = kept + new
    dicts = _imprint_dataset(cache_dir, new_classes * per_class, new, kept)
    model = _build(IMPRINT_CHECKPOINT, len(target), seed=1)
    ckpt = ReclassCheckpointer(
        model, examples=NewClassExamples(dataset_dicts=dicts, class_names=new + kept),
        reclass=ReclassOptions(mode="map", source_classes=names, target_classes=target,
                               new_class_init="imprint", init_images=per_class))
    t0 = time.perf_counter()
    ckpt.load(_paths(cache_dir, IMPRINT_CHECKPOINT)["pth"])
    load = time.perf_counter() - t0
    report = ckpt.report.new_classes
    digest = hashlib.sha256()
    for key in report.changed:  # what imprint wrote, to compare two versions of the code
        digest.update(model.state_dict()[key].numpy().tobytes())
    return {"new_classes": new_classes, "per_class": per_class, "load": load,
            "seconds": report.seconds, "images": report.images_read,
            "per_image": report.seconds_per_image,
            "imprinted": sum(c.method == "imprint" for c in report.classes),
            "digest": digest.hexdigest()[:16]}


def _imprint(args: argparse.Namespace, command: str) -> int:
    """``--imprint``: the cost of NEW_CLASS_INIT imprint against the images it reads."""
    from tabulate import tabulate

    load_at_start = _load_average()
    t_start = time.perf_counter()
    _run_child(["--cache-dir", args.cache_dir, "--generate", IMPRINT_CHECKPOINT])
    rows = []
    for case in args.imprint:
        new_classes, per_class = (int(x) for x in case.split("x"))
        r = _run_child(["--cache-dir", args.cache_dir, "--imprint-worker", str(new_classes),
                        str(per_class)])
        images = r["images"]
        other = r["seconds"] - images * r["per_image"]  # planning, rules, writing the rows
        rows.append([case, r["imprinted"], images, 2 * images, f"{r['seconds']:.1f}",
                     f"{r['per_image'] * 1e3:.0f}", f"{r['seconds'] / images * 1e3:.0f}",
                     f"{other:.2f}", f"{other / new_classes * 1e3:.1f}",
                     f"{r['load']:.1f}", r["digest"]])
        print(f"  done: {case}", file=sys.stderr, flush=True)
    print(f"command: {command}")
    print()
    print(tabulate(rows, tablefmt="pipe", disable_numparse=True, headers=[
        "new classes x images each", "imprinted", "images read", "boxes read", "imprint s",
        "ms per image (read + model)", "ms per image, all in", "rest s", "rest ms per class",
        "whole load s", "rows written (sha256)"]))
    print()
    print(f"Mask R-CNN R50-FPN, 1,203 LVIS classes, new classes replacing the last ones; 128 px "
          f"images, each with a box of one new class and one of a kept class (the reference "
          f"for calibration); 1 torch thread. {_cpu_model()}, {os.cpu_count()} CPUs; load "
          f"average {load_at_start} at start, {_load_average()} at end; total "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0


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
    parser.add_argument("--scale", action="store_true",
                        help="the class-count cases (see the module docstring) instead of the rows")
    parser.add_argument("--loads", type=int, default=7,
                        help="--scale: interleaved loads per loader in each case's process")
    parser.add_argument("--worker", nargs=4, metavar=("KEY", "FORMAT", "LOADER", "TARGET"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--scale-worker", choices=sorted(SCALE_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--imprint", nargs="+", metavar="NxM",
                        help="NEW_CLASS_INIT imprint's cost instead: N new classes, M images "
                             "each, one load per NxM (e.g. 100x1 100x2 100x4)")
    parser.add_argument("--imprint-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generate", metavar="KEY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.generate:
        _generate(args.cache_dir, args.generate)
        print(json.dumps({"ok": True}))
        return 0
    if args.worker:
        print(json.dumps(_worker(args.cache_dir, *args.worker, warm_loads=args.warm_loads)))
        return 0
    if args.scale_worker:
        print(json.dumps(_scale_worker(args.cache_dir, args.scale_worker, args.loads)))
        return 0
    if args.imprint_worker:
        print(json.dumps(_imprint_worker(args.cache_dir, *args.imprint_worker)))
        return 0
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    if args.warm_loads < 1:
        parser.error("--warm-loads must be at least 1")

    from tabulate import tabulate

    python = os.path.relpath(sys.executable, REPO)
    if python.startswith(os.pardir):  # an interpreter outside the repository: say which
        python = sys.executable
    command = shlex.join([python, os.path.relpath(os.path.abspath(__file__), REPO)]
                         + list(sys.argv[1:] if argv is None else argv))
    if args.imprint:
        if not all(re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", case) for case in args.imprint):
            parser.error("--imprint takes NxM cases, e.g. 100x1 100x4")
        return _imprint(args, command)
    if args.scale:
        if args.loads < 3:
            parser.error("--loads must be at least 3")
        return _scale(args, command)
    rows = [r for r in ROWS if (not args.only or r[0] in args.only)
            and (not args.row or _row_id(*r) in args.row)]
    if not rows:
        parser.error("--only and --row select no row together")
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
