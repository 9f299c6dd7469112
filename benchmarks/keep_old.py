#!/usr/bin/env python
"""Add classes and keep the old ones, from labels of the new classes only:
MODEL.RECLASS.KEEP_SOURCE_CLASSES with each MODEL.RECLASS.PRESERVE method, against naive
fine-tuning and joint training on fully labelled data, over seeds.

    .venv/bin/python benchmarks/keep_old.py                  # everything, cached runs reused
    .venv/bin/python benchmarks/keep_old.py --groups main    # only some groups of runs

The task (synthetic shapes, :mod:`d2_reclass.data.synthetic`, the demo's colours and shapes at
64 px so that the whole benchmark fits a shared 2-core CPU):

* Source: the demo's 6 classes (square, circle, triangle, diamond, hexagon, cross), 400
  train images; a ResNet-18 FPN Faster R-CNN (``configs/Base-Shapes-RCNN.yaml``) and a
  RetinaNet on the same backbone, trained from scratch here, once (cached). The weaker source
  is the Faster R-CNN trained for a quarter of the iterations.
* Target: the 6 classes + star and octagon (new: the source calls stars "diamond" and
  octagons "circle"). 200 train images holding all 8 classes; the new-only training set
  labels only star and octagon (its json lists only them), the joint one labels all; 250 val
  images, fully labelled (with 50, about 12 objects a class, the source fine-tuned on its own
  data moved between 97 % and 104 % of its old-class AP from one evaluation to the next: too
  coarse for goals at 98-99 %).
* Every fine-tune is ``ReclassTrainer`` as tools/train_net.py runs it (the trainer mixin,
  ReclassCheckpointer, the data loader), from the source weights with
  ``MODEL.RECLASS.KEEP_SOURCE_CLASSES True`` (NEW_CLASS_INIT auto: imprint), batch 2,
  BatchNorm frozen, LR 0.001 after 20 warmup iterations, constant, so that one 300-iteration
  run evaluated at 100 and 300 gives both schedules. Wall time excludes the evaluations; peak
  memory is the process's resident-set high-water mark during training minus its size before.
* Rows: naive (PRESERVE none, new-only labels), each PRESERVE method, joint training on the
  fully labelled set (the upper bound), the weaker source, and rehearsal (the source's own
  training data, 100 images, beside the new-only set in DATASETS.TRAIN).

``--timing`` times naive and pseudo_labels back to back (the table's ratios between runs move
with the shared machine's load). Runs go in priority order (``GROUPS``) and each is cached as
JSON under ``data/bench/keep_old/``, keyed by every setting and RUNS_VERSION; a rerun redoes
only what is missing. Writes ``keep_old.json``, ``keep_old.md`` there and ``docs/keep_old.png``.
Everything runs in one process with one torch thread.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.new_class_init import config, digest, evaluate, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "data", "bench", "keep_old")

OLD = ["square", "circle", "triangle", "diamond", "hexagon", "cross"]
NEW = ["star", "octagon"]
ALL = OLD + NEW
SCENE = dict(image_size=64, max_objects=3)
#: split -> (classes drawn, images, generator seed)
SPLITS = {"source_train": (OLD, 400, 31), "target_train": (ALL, 200, 32),
          "target_val": (ALL, 250, 33)}
REHEARSAL_IMAGES = 100
SIZE_OPTS = ["INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64,
             "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64, "DATALOADER.NUM_WORKERS", 0,
             "TEST.DETECTIONS_PER_IMAGE", 20, "DATASETS.TEST", ()]
RETINANET_OPTS = [
    "MODEL.META_ARCHITECTURE", "RetinaNet",
    "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
    "MODEL.RETINANET.NUM_CONVS", 2,
    "MODEL.ANCHOR_GENERATOR.SIZES", [[s, s * 1.26, s * 1.59] for s in (8, 16, 32, 64, 128)],
]
ARCHS = {"faster": [], "retinanet": RETINANET_OPTS}
#: Source training: iterations per architecture (the weaker source: a quarter), and the
#: architecture whose full source gives the backbone. RetinaNet from scratch reached old-class
#: AP 10 in 500 iterations (and diverged to NaN at LR 0.02); from the Faster R-CNN source's
#: ResNet and FPN (trained on the same images), as a user's model starts from a pretrained
#: backbone, it learns its head in 2000.
SOURCE_ITERS = {"faster": 500, "retinanet": 2000}
SOURCE_BACKBONE = {"retinanet": "faster"}
_SOURCE_SOLVER = ["SOLVER.IMS_PER_BATCH", 4, "SOLVER.WARMUP_ITERS", 50, "SEED", 1]
#: RetinaNet at the Faster R-CNN's LR 0.02 diverged to NaN; 0.01 with the gradient norm
#: clipped trains.
SOURCE_SOLVERS = {
    "faster": [*_SOURCE_SOLVER[:2], "SOLVER.BASE_LR", 0.02, *_SOURCE_SOLVER[2:]],
    "retinanet": [*_SOURCE_SOLVER[:2], "SOLVER.BASE_LR", 0.01, *_SOURCE_SOLVER[2:],
                  "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
                  "norm", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5.0],
}
#: Fine-tuning: batch 2 at the LR per image the source ended at (Faster R-CNN 0.002 / 4
#: images, RetinaNet 0.001 / 4), BatchNorm statistics frozen (FrozenBN loads the source's): at
#: batch 2, trainable BatchNorm drifted and cost joint training 7 points of old-class AP; at LR
#: 0.0025 (2.5x the source's last), joint training on full labels fell to 90 % of the
#: source's old-class AP by 300 iterations, at 0.001 it kept 101 % (seed 1).
TARGET_SOLVER = ["SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 20,
                 "SOLVER.STEPS", (), "SOLVER.CHECKPOINT_PERIOD", 100000,
                 "MODEL.RESNETS.NORM", "FrozenBN"]
TARGET_LR = {"faster": 0.001, "retinanet": 0.0005}
#: Per architecture: bump when its fine-tuning (this file's fine_tune, or d2_reclass's code it
#: runs) changes.
RUNS_VERSION = {"faster": 6, "retinanet": 5}
SEEDS = (1, 2, 3)
#: method -> (training datasets, MODEL.RECLASS.PRESERVE)
METHODS = {
    "naive": (("ko_target_new",), "none"),
    "auto": (("ko_target_new",), "auto"),
    "pseudo_labels": (("ko_target_new",), "pseudo_labels"),
    "distill": (("ko_target_new",), "distill"),
    "frozen_rows": (("ko_target_new",), "frozen_rows"),
    "joint": (("ko_target_full",), "none"),
    "rehearsal": (("ko_source_rehearsal", "ko_target_new"), "none"),
    "pseudo_labels_score_0.3": (("ko_target_new",), "pseudo_labels"),
    "pseudo_labels_average_0.3": (("ko_target_new",), "pseudo_labels"),
    "auto_average_0.3": (("ko_target_new",), "auto"),
}
#: Further config options of a method.
METHOD_OPTS = {"pseudo_labels_score_0.3": ["MODEL.RECLASS.PSEUDO_LABEL_SCORE", 0.3],
               "pseudo_labels_average_0.3": ["MODEL.RECLASS.SOURCE_AVERAGE", 0.3],
               "auto_average_0.3": ["MODEL.RECLASS.SOURCE_AVERAGE", 0.3]}
#: The long schedule; every run of it is also evaluated at SHORT (and at EVAL_AT for the plot).
LONG, SHORT = 300, 100
EVAL_AT = (0, 50, SHORT, 200, LONG)
#: Groups of runs in priority order: (arch, source, method, iterations, teacher cache). The
#: RetinaNet groups come last: its source model alone costs as much as a whole group.
GROUPS = {
    "joint": [("faster", "full", "joint", LONG, True)],
    "main": [("faster", "full", m, LONG, True) for m in ("naive", "pseudo_labels")],
    "weak": [("faster", "weak", m, LONG, True) for m in ("naive", "pseudo_labels")],
    "methods": [("faster", "full", m, LONG, True) for m in ("distill", "frozen_rows")],
    "rehearsal": [("faster", "full", "rehearsal", LONG, True)],
    "retinanet": [("retinanet", "full", m, LONG, True)
                  for m in ("joint", "naive", "pseudo_labels")],
    "nocache": [("faster", "full", "pseudo_labels", LONG, False)],
    "retinanet_methods": [("retinanet", "full", m, LONG, True)
                          for m in ("distill", "frozen_rows")],
    "retinanet_weak": [("retinanet", "weak", m, LONG, True)
                       for m in ("naive", "pseudo_labels", "frozen_rows")],
    # A weak sigmoid model scores few detections >= 0.5: a lower PSEUDO_LABEL_SCORE.
    "low_score": [(arch, kind, "pseudo_labels_score_0.3", LONG, True)
                  for arch, kind in (("retinanet", "weak"), ("retinanet", "full"))],
    # The final weights averaged with the source's (MODEL.RECLASS.SOURCE_AVERAGE 0.3).
    "average": [(arch, kind, "pseudo_labels_average_0.3", LONG, True)
                for arch in ("faster", "retinanet") for kind in ("full", "weak")],
}
#: Only the first seed of these groups (a time measurement: its APs equal the cached run's).
ONE_SEED = {"nocache"}

#: Datasets listing only the new classes need their ids mapped to the model's by name.
BY_NAME = importlib.util.find_spec("d2_reclass.data.mapping") is not None

for _msg in (r"`torch.jit.script` is deprecated", r"pkg_resources is deprecated",
             r"torch.meshgrid: in an upcoming release"):
    import warnings

    warnings.filterwarnings("ignore", message=_msg)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- data
def _shapes_data(prefix: str, splits: dict, derived, derive: Callable[[str], None],
                 force: bool) -> str:
    """The directory of ``splits`` (split -> (classes drawn, images, generator seed)) and the
    jsons ``derive`` writes from them, made once: keyed by the splits, the scene, ``derived``
    (what else ``derive`` reads) and the generator's code."""
    from d2_reclass.data.synthetic import make_shapes_dataset

    data_dir = os.path.join(CACHE, prefix + digest(splits, SCENE, derived,
                                                   "d2_reclass/data/synthetic.py"))
    if force or not os.path.exists(os.path.join(data_dir, "done")):
        shutil.rmtree(data_dir, ignore_errors=True)
        for split, (classes, n, seed) in splits.items():
            make_shapes_dataset(data_dir, split, classes, n, seed=seed, **SCENE)
        derive(data_dir)
        open(os.path.join(data_dir, "done"), "w").close()
    return data_dir


def make_data(force: bool) -> str:
    """Write the splits (once) and the derived jsons; register them; return the directory."""
    from d2_reclass import register_coco_dataset

    data_dir = _shapes_data("data-", SPLITS, REHEARSAL_IMAGES, _derive, force)
    for name, split in (("source_train", "source_train"), ("target_val", "target_val"),
                        ("target_full", "target_train"), ("target_new", "target_train"),
                        ("source_rehearsal", "source_train")):
        register_coco_dataset(f"ko_{name}", os.path.join(data_dir, f"{name}.json"),
                              os.path.join(data_dir, split))
    return data_dir


def _derive(data_dir: str) -> None:
    """target_new.json: only the new classes, labelled and listed; target_full.json: a copy of
    the fully labelled set; source_rehearsal.json: the first images of the source set."""
    with open(os.path.join(data_dir, "target_train.json")) as f:
        full = json.load(f)
    names = {c["id"]: c["name"] for c in full["categories"]}
    new_ids = {name: i + 1 for i, name in enumerate(NEW)}
    new = dict(full, categories=[{"id": i, "name": n} for n, i in new_ids.items()],
               annotations=[dict(a, category_id=new_ids[names[a["category_id"]]])
                            for a in full["annotations"] if names[a["category_id"]] in NEW])
    with open(os.path.join(data_dir, "source_train.json")) as f:
        source = json.load(f)
    keep = {img["id"] for img in source["images"][:REHEARSAL_IMAGES]}
    rehearsal = dict(source, images=[i for i in source["images"] if i["id"] in keep],
                     annotations=[a for a in source["annotations"] if a["image_id"] in keep])
    for name, data in (("target_new", new), ("target_full", full),
                       ("source_rehearsal", rehearsal)):
        with open(os.path.join(data_dir, f"{name}.json"), "w") as f:
            json.dump(data, f)


# ----------------------------------------------------------------------------- sources
def _source_dir(arch: str, iterations: int) -> Tuple[str, list, Optional[str]]:
    """The source's cache directory, its config options and the weights of its backbone."""
    opts = [*SIZE_OPTS, *ARCHS[arch], *SOURCE_SOLVERS[arch], "SOLVER.MAX_ITER", iterations,
            "SOLVER.STEPS", (round(iterations * 0.8),), "DATASETS.TRAIN", ("ko_source_train",)]
    backbone = None
    if arch in SOURCE_BACKBONE:
        b = SOURCE_BACKBONE[arch]
        backbone = os.path.join(_source_dir(b, SOURCE_ITERS[b])[0], "model_final.pth")
    tag = digest(SPLITS, SCENE, opts, "configs/Base-Shapes-RCNN.yaml",
                 *([os.path.basename(os.path.dirname(backbone))] if backbone else []))
    return os.path.join(CACHE, f"source-{arch}-{iterations}-{tag}"), opts, backbone


def _source_iters(arch: str, kind: str) -> int:
    return SOURCE_ITERS[arch] if kind == "full" else SOURCE_ITERS[arch] // 4


def source_cached(arch: str, kind: str) -> bool:
    run_dir = _source_dir(arch, _source_iters(arch, kind))[0]
    return os.path.exists(os.path.join(run_dir, "record.json"))


def source_model(arch: str, iterations: int, force: bool) -> dict:
    """Train (once) a 6-class source model; its weights path (storing the class names),
    seconds and metrics on the target val set (old classes only)."""
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_reclass import ReclassCheckpointer, ReclassTrainer

    run_dir, opts, backbone = _source_dir(arch, iterations)
    record_path = os.path.join(run_dir, "record.json")
    if not force and os.path.exists(record_path):
        with open(record_path) as f:
            # The weights are next to the record, wherever the cache was copied to.
            return dict(json.load(f), weights=os.path.join(run_dir, "model_final.pth"))
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    cfg = config(opts)
    torch.manual_seed(cfg.SEED)
    model = ReclassTrainer.build_model(cfg)
    if backbone is not None:  # stock loading: the heads' keys are missing, and stay at init
        DetectionCheckpointer(model).load(backbone)
    t0 = time.time()
    train(model, cfg, iterations, cfg.SEED)
    seconds = time.time() - t0
    ReclassCheckpointer.from_config(cfg, model, run_dir).save("model_final")
    record = {"weights": os.path.join(run_dir, "model_final.pth"), "seconds": seconds,
              "backbone": backbone and os.path.basename(os.path.dirname(backbone)),
              "iterations": iterations, "metrics": evaluate(model, "ko_target_val", ALL)}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


# ----------------------------------------------------------------------------- fine-tuning
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the VmHWM high-water mark to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def fine_tune(arch: str, source: dict, method: str, iterations: int, cache: bool, seed: int,
              eval_at: Sequence[int], datasets: Optional[Sequence[str]] = None,
              val: Tuple[str, Sequence[str]] = ("ko_target_val", ALL),
              save_to: Optional[str] = None) -> dict:
    """One fine-tune through ReclassTrainer; AP on ``val`` (dataset, classes) at each of
    ``eval_at``, training seconds up to each, peak memory, teacher statistics. ``datasets``
    replaces the method's training datasets; the final weights go to ``save_to`` if given."""
    from detectron2.engine import DefaultTrainer, HookBase
    from detectron2.utils.env import seed_all_rng

    from d2_reclass import ReclassTrainerMixin

    preserve = METHODS[method][1]
    datasets = tuple(datasets or METHODS[method][0])
    out_dir = os.path.join(CACHE, f"tmp-run-{os.getpid()}")  # groups may run side by side
    shutil.rmtree(out_dir, ignore_errors=True)
    opts = [*SIZE_OPTS, *ARCHS[arch], *TARGET_SOLVER, "SOLVER.BASE_LR", TARGET_LR[arch],
            "SOLVER.MAX_ITER", iterations,
            "MODEL.WEIGHTS", source["weights"], "MODEL.RECLASS.KEEP_SOURCE_CLASSES", True,
            "MODEL.RECLASS.PRESERVE", preserve, "MODEL.RECLASS.TEACHER_CACHE", cache,
            "MODEL.RECLASS.SEED", seed, "SEED", seed, "DATASETS.TRAIN", datasets,
            "OUTPUT_DIR", out_dir, *METHOD_OPTS.get(method, [])]
    cfg = config(opts)
    curve: Dict[int, dict] = {}
    clock = {"train": 0.0, "eval": 0.0, "at": {}}

    class Evaluate(HookBase):
        """Evaluates at the iterations of ``eval_at``; its own time is kept apart."""

        def before_train(self):
            clock["start"] = time.perf_counter()

        def after_step(self):
            i = self.trainer.iter + 1
            if i in eval_at:
                t0 = time.perf_counter()
                clock["at"][i] = t0 - clock["start"] - clock["eval"]
                curve[i] = evaluate_as_if_final(self.trainer, val)
                self.trainer.model.train()
                clock["eval"] += time.perf_counter() - t0

    class Trainer(ReclassTrainerMixin, DefaultTrainer):
        def build_writers(self):
            return []

        def build_hooks(self):
            return [*super().build_hooks(), Evaluate()]

    seed_all_rng(seed)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    if 0 in eval_at:
        curve[0] = evaluate(trainer.model, *val)
        trainer.model.train()
    rss0 = _rss_mb("VmRSS")
    _reset_peak_rss()
    trainer.train()
    peak = _rss_mb("VmHWM") - rss0
    teacher = trainer.preservation.teacher
    record = {
        "curve": {str(k): v for k, v in curve.items()},
        "train_seconds": {str(k): v for k, v in clock["at"].items()},
        "peak_rss_mb": peak,
        "teacher": None if teacher is None else {
            "seconds": teacher.seconds, "calls": teacher.calls, "images": teacher.images,
            "runs": teacher.runs, "cached": teacher.cached},
        "pseudo_labels": getattr(trainer.preservation.attached[0], "added", None)
        if trainer.preservation.attached else None,
        "classes": list(trainer.checkpointer.reclass.target_classes or []),
    }
    del trainer
    if save_to is not None:
        shutil.copyfile(os.path.join(out_dir, "model_final.pth"), save_to)
    shutil.rmtree(out_dir, ignore_errors=True)
    return record


def evaluate_as_if_final(trainer, val: Tuple[str, Sequence[str]]) -> dict:
    """AP of ``trainer.model`` as a run ending at this iteration would leave it: with the
    source average (MODEL.RECLASS.SOURCE_AVERAGE) taken on a copy of the weights if the run
    has one still to come, so that one long run evaluated on the way gives the shorter
    schedules (the LR is constant after warmup)."""
    from d2_reclass.preserve import SourceAverage, average_with_source

    model = trainer.model
    pending = [a for a in trainer.preservation.attached
               if isinstance(a, SourceAverage) and not a.applied]
    if not pending:
        return evaluate(model, *val)
    a = pending[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(average_with_source(state, a.source, a.keep, a.weight))
    try:
        return evaluate(model, *val)
    finally:
        model.load_state_dict(state)


TIMING_ROUNDS = 3


def timing(source: dict) -> None:
    """Wall time of naive, pseudo_labels cached and pseudo_labels per batch, interleaved for
    TIMING_ROUNDS rounds in this process (seed 1, LONG iterations, timed at SHORT and LONG), so
    that the shared machine's load is about the same for each; every run and the medians'
    ratios to naive go to timing.json and are printed as a table."""
    from tabulate import tabulate

    kinds = (("naive", True), ("pseudo_labels", True), ("pseudo_labels", False))
    out = []
    for _ in range(TIMING_ROUNDS):
        for method, cache in kinds:
            load = os.getloadavg()[0]
            r = fine_tune("faster", source, method, LONG, cache, 1, [SHORT, LONG])
            out.append({"method": method, "cache": cache, "load": load,
                        "teacher": r["teacher"], "train_seconds": r["train_seconds"],
                        "ap": {it: old_new(m) for it, m in r["curve"].items()}})
            print(json.dumps(out[-1]), flush=True)
    median = {(m, c, it): statistics.median(r["train_seconds"][str(it)] for r in out
                                            if (r["method"], r["cache"]) == (m, c))
              for m, c in kinds for it in (SHORT, LONG)}
    rows = [[m + ("" if m == "naive" else ", cached" if c else ", per batch"),
             *(f"{median[m, c, it]:.1f} s ({median[m, c, it] / median['naive', True, it]:.2f}x)"
               for it in (SHORT, LONG))] for m, c in kinds]
    print(tabulate(rows, headers=["run", f"{SHORT} iterations", f"{LONG} iterations"],
                   tablefmt="pipe", disable_numparse=True))
    with open(os.path.join(CACHE, "timing.json"), "w") as f:
        json.dump({"runs": out, "median_seconds": {f"{m}/{'cache' if c else 'batch'}/{it}": v
                                                   for (m, c, it), v in median.items()}},
                  f, indent=2)


# ----------------------------------------------------------------------------- chains
#: --chain: three additions in a row to the Faster R-CNN source, each from its own images
#: labelled with its new class only, each step's final model the next step's source; SHORT
#: iterations a step, the method PRESERVE auto picks (pseudo_labels) against naive.
CHAIN_NEW = ["star", "octagon", "pentagon"]
CHAIN_CLASSES = OLD + CHAIN_NEW
CHAIN_IMAGES = 150  # training images per step, all 9 classes drawn, one labelled
#: split -> (classes drawn, images, generator seed); apart from SPLITS, whose digest keys the
#: cached source models.
CHAIN_SPLITS = {"chain_train": (CHAIN_CLASSES, CHAIN_IMAGES * len(CHAIN_NEW), 34),
                "chain_val": (CHAIN_CLASSES, 250, 35)}
CHAIN_METHODS = ("auto", "auto_average_0.3", "naive")
CHAIN_GOAL = 95.0


def make_chain_data(force: bool) -> None:
    """Write the chain's images (once) and one json per step (its images, its class only);
    register them as ko_chain_step{1,2,3} and ko_chain_val."""
    from d2_reclass import register_coco_dataset

    data_dir = _shapes_data("chain-data-", CHAIN_SPLITS, CHAIN_IMAGES, _derive_chain, force)
    for k in range(len(CHAIN_NEW)):
        register_coco_dataset(f"ko_chain_step{k + 1}",
                              os.path.join(data_dir, f"chain_step{k + 1}.json"),
                              os.path.join(data_dir, "chain_train"))
    register_coco_dataset("ko_chain_val", os.path.join(data_dir, "chain_val.json"),
                          os.path.join(data_dir, "chain_val"))


def _derive_chain(data_dir: str) -> None:
    """chain_step{k}.json: the k-th CHAIN_IMAGES images of chain_train, labelled and listed
    with CHAIN_NEW[k - 1] only."""
    with open(os.path.join(data_dir, "chain_train.json")) as f:
        full = json.load(f)
    names = {c["id"]: c["name"] for c in full["categories"]}
    for k, name in enumerate(CHAIN_NEW):
        images = full["images"][k * CHAIN_IMAGES:(k + 1) * CHAIN_IMAGES]
        ids = {img["id"] for img in images}
        step = dict(full, images=images, categories=[{"id": 1, "name": name}],
                    annotations=[dict(a, category_id=1) for a in full["annotations"]
                                 if a["image_id"] in ids and names[a["category_id"]] == name])
        with open(os.path.join(data_dir, f"chain_step{k + 1}.json"), "w") as f:
            json.dump(step, f)


def chain(source: dict, seeds: Sequence[int], force: bool) -> Dict[str, List[List[dict]]]:
    """Per method, per seed, the chain's steps (each a fine_tune record with its weights);
    every step cached under CACHE, keyed by its source's key."""
    make_chain_data(force)
    out: Dict[str, List[List[dict]]] = {}
    for method in CHAIN_METHODS:
        for seed in seeds:
            # Keyed by the source's bytes: the source's cache directory is named after every
            # split, the chain's not among them.
            with open(source["weights"], "rb") as f:
                key = digest(RUNS_VERSION["faster"], hashlib.sha256(f.read()).hexdigest())
            weights, steps = source["weights"], []
            for k, name in enumerate(CHAIN_NEW):
                key = digest(key, method, seed, k, CHAIN_SPLITS, CHAIN_IMAGES, TARGET_SOLVER,
                             TARGET_LR, SIZE_OPTS, METHODS[method][1])
                run_dir = os.path.join(CACHE, f"chain-{method}-{seed}-{k + 1}-{key}")
                path = os.path.join(run_dir, "record.json")
                if os.path.exists(path) and not force:
                    with open(path) as f:
                        run = json.load(f)
                else:
                    shutil.rmtree(run_dir, ignore_errors=True)
                    os.makedirs(run_dir)
                    run = fine_tune("faster", {"weights": weights}, method, SHORT, True, seed,
                                    [0, SHORT], datasets=[f"ko_chain_step{k + 1}"],
                                    val=("ko_chain_val", CHAIN_CLASSES),
                                    save_to=os.path.join(run_dir, "model_final.pth"))
                    with open(path, "w") as f:
                        json.dump(run, f)
                weights = os.path.join(run_dir, "model_final.pth")
                steps.append(run)
                m = run["curve"][str(SHORT)]
                print(f"chain {method} seed {seed} step {k + 1} (+{name}): "
                      f"{run['classes'][-1]} AP {m[f'AP-{name}']:.1f}, original classes "
                      f"{statistics.mean(m[f'AP-{c}'] for c in OLD):.1f}; train "
                      f"{run['train_seconds'][str(SHORT)]:.0f} s", flush=True)
            out.setdefault(method, []).append(steps)
    return out


def chain_source_ap(source: dict) -> float:
    """The source's original-class AP on the chain's val set (evaluated once, cached)."""
    path = os.path.join(os.path.dirname(source["weights"]),
                        f"chain_val-{digest(CHAIN_SPLITS, SCENE)}.json")
    if not os.path.exists(path):
        from d2_reclass import ReclassCheckpointer, ReclassTrainer

        cfg = config([*SIZE_OPTS, "DATASETS.TRAIN", ("ko_source_train",)])
        model = ReclassTrainer.build_model(cfg)
        ReclassCheckpointer.from_config(cfg, model).load(source["weights"])
        metrics = evaluate(model, "ko_chain_val", CHAIN_CLASSES)
        with open(path, "w") as f:
            json.dump(metrics, f)
    with open(path) as f:
        metrics = json.load(f)
    return statistics.mean(metrics[f"AP-{c}"] for c in OLD)


def chain_table(runs: Dict[str, List[List[dict]]], source_old: float) -> str:
    """Per method and step, at iteration 0 and SHORT: the original classes' AP in % of the
    source's and each added class's AP, absolute and in % of its AP right after its step,
    mean (min–max) over seeds; then the goals, per seed."""
    from tabulate import tabulate

    rows, goal_rows = [], []
    for method, per_seed in runs.items():
        for k, name in enumerate(CHAIN_NEW):
            for it in (0, SHORT):
                cells = []
                old = [100 * statistics.mean(s[k]["curve"][str(it)][f"AP-{c}"] for c in OLD)
                       / source_old for s in per_seed]
                for j, added in enumerate(CHAIN_NEW[:k + 1]):
                    ap = [s[k]["curve"][str(it)][f"AP-{added}"] for s in per_seed]
                    own = [s[j]["curve"][str(SHORT)][f"AP-{added}"] for s in per_seed]
                    kept = [100 * a / o for a, o in zip(ap, own) if o > 0]
                    cells.append(spread(ap) + (f" ({spread(kept)} %)" if j < k else ""))
                cells += ["—"] * (len(CHAIN_NEW) - len(cells))
                rows.append([method, f"{k + 1}: +{name}", it, spread(old) + " %", *cells])
        last = len(CHAIN_NEW) - 1
        old = [100 * statistics.mean(s[last]["curve"][str(SHORT)][f"AP-{c}"] for c in OLD)
               / source_old for s in per_seed]
        kept = {added: [100 * s[last]["curve"][str(SHORT)][f"AP-{added}"]
                        / s[j]["curve"][str(SHORT)][f"AP-{added}"] for s in per_seed]
                for j, added in enumerate(CHAIN_NEW[:last])}
        goal_rows.append([method, _goal_cell(old), *(_goal_cell(v) for v in kept.values())])
    head = ["method", "step", "its", "original 6 / source's"] + [f"AP {c}" for c in CHAIN_NEW]
    goal_head = ["method", "original 6 / source's"] + [
        f"{c} / right after its step" for c in CHAIN_NEW[:-1]]
    return (tabulate(rows, headers=head, tablefmt="pipe", disable_numparse=True)
            + f"\n\nGoals after all {len(CHAIN_NEW)} steps (per seed, goal {CHAIN_GOAL:.0f} %):\n\n"
            + tabulate(goal_rows, headers=goal_head, tablefmt="pipe", disable_numparse=True)
            + "\n")


def _goal_cell(values: List[float]) -> str:
    met = sum(v >= CHAIN_GOAL for v in values)
    return (f"{', '.join(f'{v:.1f}' for v in values)} % (met on {met} of {len(values)} "
            "seeds)")


def chain_plot(runs: Dict[str, List[List[dict]]], source_old: float, path: str) -> None:
    """Per method, the original classes (% of the source's) and each added class's AP after
    every step (mean over seeds, band: min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False,
                             sharey=True)
    for ax, (method, per_seed) in zip(axes[0], runs.items()):
        steps = list(range(len(CHAIN_NEW) + 1))
        series = {"original 6 (% of source)": [[100.0] * len(per_seed)] + [
            [100 * statistics.mean(s[k]["curve"][str(SHORT)][f"AP-{c}"] for c in OLD)
             / source_old for s in per_seed] for k in range(len(CHAIN_NEW))]}
        for j, added in enumerate(CHAIN_NEW):
            series[f"{added} AP"] = [None] * (j + 1) + [
                [s[k]["curve"][str(SHORT)][f"AP-{added}"] for s in per_seed]
                for k in range(j, len(CHAIN_NEW))]
        for label, values in series.items():
            xs = [x for x, v in zip(steps, values) if v is not None]
            vs = [v for v in values if v is not None]
            ax.plot(xs, [statistics.mean(v) for v in vs], marker="o", label=label)
            ax.fill_between(xs, [min(v) for v in vs], [max(v) for v in vs], alpha=0.2)
        ax.set_title(f"chain, {method}")
        ax.set_xticks(steps)
        ax.set_xticklabels(["source"] + [f"+{c}" for c in CHAIN_NEW])
        ax.set_ylabel("box AP / %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- summaries
def old_new(metrics: dict) -> Dict[str, float]:
    return {"old": statistics.mean(metrics[f"AP-{c}"] for c in OLD),
            "new": statistics.mean(metrics[f"AP-{c}"] for c in NEW) if f"AP-{NEW[0]}" in metrics
            and not any(metrics[f"AP-{c}"] != metrics[f"AP-{c}"] for c in NEW) else float("nan"),
            "all": metrics["AP"]}


def spread(values: Sequence[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def table(runs: Dict[str, List[dict]], sources: Dict[str, dict]) -> str:
    """The pipe table: one row per (arch, source, method, iterations)."""
    from tabulate import tabulate

    rows = []
    for (arch, src) in (("faster", "full"), ("faster", "weak"), ("retinanet", "full"),
                        ("retinanet", "weak")):
        if f"{arch}/{src}" not in sources:
            continue
        s = old_new(sources[f"{arch}/{src}"]["metrics"])
        label = "weaker source" if src == "weak" else "source"
        rows.append([f"{arch}: {label} model ({sources[f'{arch}/{src}']['iterations']} its)",
                     "—", f"{s['old']:.1f}", "—", "—", "—", "—", "—"])
        start = [old_new(r["curve"]["0"]) for r in runs.get(f"{arch}/{src}/naive", [])
                 if "0" in r["curve"]]
        if start:
            rows.append([f"{arch}: mapped + imprinted (new-only data), iteration 0", 0,
                         spread([x["old"] for x in start]), spread([x["new"] for x in start]),
                         spread([x["all"] for x in start]), "—", "—", "—"])
        for it in (SHORT, LONG):
            for method in METHODS:
                key = f"{arch}/{src}/{method}"
                per_seed = [r for r in runs.get(key, []) if str(it) in r["curve"]
                            and r.get("cache", True)]
                if not per_seed:
                    continue
                m = [old_new(r["curve"][str(it)]) for r in per_seed]
                plain = {r["seed"]: r for r in runs.get(f"{arch}/{src}/naive", [])
                         if str(it) in r["train_seconds"]}
                time_ratio = [r["train_seconds"][str(it)] / plain[r["seed"]]["train_seconds"][
                    str(it)] for r in per_seed if r["seed"] in plain]
                mem_ratio = [r["peak_rss_mb"] / plain[r["seed"]]["peak_rss_mb"]
                             for r in per_seed if r["seed"] in plain and r["iterations"]
                             == plain[r["seed"]]["iterations"]]
                # The teacher's share of the same run's training time: unlike the ratio to
                # another run, it does not move with the shared machine's load.
                share = [100 * r["teacher"]["seconds"] * int(it) / r["iterations"]
                         / r["train_seconds"][str(it)] for r in per_seed
                         if r["teacher"] and r["teacher"]["calls"]]  # distill's is not timed
                rows.append([f"{arch}: {method}" + (", weaker source" if src == "weak" else ""),
                             it, spread([x["old"] for x in m]), spread([x["new"] for x in m]),
                             spread([x["all"] for x in m]),
                             spread(time_ratio) if time_ratio else "—",
                             spread(share) if share else "—",
                             spread(mem_ratio) if mem_ratio else "—"])
    return tabulate(rows, headers=["run", "its", "old-class AP", "new-class AP", "AP (all 8)",
                                   "wall time / naive", "teacher % of time",
                                   "peak memory / naive"],
                    tablefmt="pipe", disable_numparse=True)


#: The issue's goals for the default method: old-class AP as a share of the source's (full and
#: weaker source), new-class AP as a share of joint training's (same seed).
OLD_GOAL = {"full": 98.0, "weak": 80.0}
NEW_GOAL = 95.0


def goals(runs: Dict[str, List[dict]], sources: Dict[str, dict]) -> str:
    """Per architecture, source and schedule, pseudo_labels' old-class AP in % of the source's
    and new-class AP in % of joint training's, each seed's (min–max) and on how many seeds the
    goal is met."""
    from tabulate import tabulate

    def cell(values: List[float], goal: float) -> str:
        met = sum(v >= goal for v in values)
        return (f"{min(values):.1f}–{max(values):.1f} % (goal {goal:.0f} %: met on {met} of "
                f"{len(values)} seeds)")

    rows = []
    for key in sorted(sources):
        arch, kind = key.split("/")
        source_old = old_new(sources[key]["metrics"])["old"]
        joint = {r["seed"]: r for r in runs.get(f"{arch}/full/joint", [])}
        for it in (SHORT, LONG):
            per_seed = [r for r in runs.get(f"{key}/pseudo_labels", []) if str(it) in r["curve"]]
            if not per_seed:
                continue
            old = [100 * old_new(r["curve"][str(it)])["old"] / source_old for r in per_seed]
            new = [100 * old_new(r["curve"][str(it)])["new"]
                   / old_new(joint[r["seed"]]["curve"][str(it)])["new"]
                   for r in per_seed if kind == "full" and r["seed"] in joint
                   and str(it) in joint[r["seed"]]["curve"]]
            rows.append([f"{arch}, {'weaker source' if kind == 'weak' else 'source'}", it,
                         cell(old, OLD_GOAL[kind]), cell(new, NEW_GOAL) if new else "—"])
    if not rows:
        return ""
    return "\n\nGoals (pseudo_labels, per seed):\n\n" + tabulate(
        rows, headers=["", "its", "old-class AP / source's", "new-class AP / joint's"],
        tablefmt="pipe", disable_numparse=True) + "\n"


def cache_note(runs: Dict[str, List[dict]]) -> str:
    """The teacher's cost with and without its per-image cache, on the same runs."""
    lines = []
    for key, uncached in runs.items():
        if not key.endswith("/nocache"):
            continue
        cached = {r["seed"]: r for r in runs.get(key[:-len("/nocache")], [])}
        for r in uncached:
            c = cached.get(r["seed"])
            if c is None:
                continue
            it = str(r["iterations"])
            same = all(c["curve"][i] == r["curve"][i] for i in r["curve"])
            lines.append(
                f"\nTeacher cost, {key[:-len('/nocache')]}, seed {r['seed']}, {it} iterations: "
                f"{r['teacher']['seconds']:.0f} s per batch ({r['teacher']['calls']} forward "
                f"passes) vs {c['teacher']['seconds']:.0f} s cached per image "
                f"({c['teacher']['calls']} passes, {c['teacher']['cached']} of "
                f"{c['teacher']['images']} images from the cache); training wall time "
                f"{r['train_seconds'][it]:.0f} s vs {c['train_seconds'][it]:.0f} s; APs "
                + ("identical." if same else "not identical: without the cache an image "
                   "seen again is run with other batch-mates, which changes its detections' "
                   "last bits, and training follows."))
    return "".join(lines) + ("\n" if lines else "")


def plot(runs: Dict[str, List[dict]], path: str) -> None:
    """Old- and new-class AP against iterations, naive vs pseudo_labels (mean over seeds,
    band: min to max), one panel per architecture and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in ARCHS if any(runs.get(f"{a}/full/{m}") for m in METHODS)]
    if not archs:
        return
    fig, axes = plt.subplots(len(archs), 2, figsize=(10, 3.6 * len(archs)), squeeze=False)
    for row, arch in enumerate(archs):
        for col, part in enumerate(("old", "new")):
            ax = axes[row][col]
            for method, colour in (("naive", "tab:red"), ("pseudo_labels", "tab:green"),
                                   ("joint", "tab:grey")):
                per_seed = runs.get(f"{arch}/full/{method}", [])
                if not per_seed:
                    continue
                iters = sorted(int(i) for i in per_seed[0]["curve"])
                values = [[old_new(r["curve"][str(i)])[part] for r in per_seed] for i in iters]
                ax.plot(iters, [statistics.mean(v) for v in values], color=colour, marker="o",
                        label=method)
                ax.fill_between(iters, [min(v) for v in values], [max(v) for v in values],
                                color=colour, alpha=0.2)
            ax.set_title(f"{arch}: {part}-class AP")
            ax.set_xlabel("iteration")
            ax.set_ylabel("box AP")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--force", action="store_true", help="ignore the cache")
    parser.add_argument("--sources-only", action="store_true",
                        help="only make the data and train the source models")
    parser.add_argument("--timing", action="store_true",
                        help="time naive, pseudo_labels cached and per batch, interleaved, "
                        "TIMING_ROUNDS rounds (seed 1, LONG iterations), into timing.json")
    parser.add_argument("--chain", action="store_true",
                        help="three additions in a row (CHAIN_NEW), each from its own "
                        "new-only labels, PRESERVE auto vs naive; table and "
                        "docs/keep_old_chain.png")
    parser.add_argument("--report-only", action="store_true",
                        help="tables and plot from the cached runs; run nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    load_start = os.getloadavg()
    from d2_reclass.logger import install_detectron2_forwarding

    install_detectron2_forwarding()
    logging.getLogger("d2_reclass").setLevel(logging.WARNING)
    os.makedirs(CACHE, exist_ok=True)
    make_data(args.force)

    sources: Dict[str, dict] = {}

    def get_source(arch: str, kind: str) -> Optional[dict]:
        key = f"{arch}/{kind}"
        if key not in sources and args.report_only and not source_cached(arch, kind):
            return None
        if key not in sources:
            iters = _source_iters(arch, kind)
            sources[key] = source_model(arch, iters, args.force)
            m = old_new(sources[key]["metrics"])
            print(f"source {key}: {iters} iterations in {sources[key]['seconds']:.0f} s; "
                  f"old-class AP {m['old']:.1f}", flush=True)
        return sources[key]

    if args.timing:
        timing(get_source("faster", "full"))
        return
    if args.chain:
        source = get_source("faster", "full")
        runs = chain(source, args.seeds, args.force)
        text = chain_table(runs, chain_source_ap(source))
        print("\n" + text)
        with open(os.path.join(CACHE, "chain.md"), "w") as f:
            f.write(text)
        png = os.path.join(ROOT, "docs", "keep_old_chain.png")
        chain_plot(runs, chain_source_ap(source), png)
        print(f"plot: {os.path.relpath(png, ROOT)}; {time.time() - t_start:.0f} s")
        return
    if args.sources_only:
        for arch, kind in (("faster", "full"), ("faster", "weak"), ("retinanet", "full"),
                           ("retinanet", "weak")):
            get_source(arch, kind)
        return
    runs: Dict[str, List[dict]] = {}
    for group in args.groups:
        seeds = args.seeds[:1] if group in ONE_SEED else args.seeds
        for seed in seeds:
            for arch, kind, method, iterations, cache in GROUPS[group]:
                source = get_source(arch, kind)
                if source is None:
                    continue
                if METHODS[method][0] != ("ko_target_full",) and not BY_NAME:
                    print(f"skipped {arch} {kind} {method}: its new-only dataset needs the "
                          "by-name mapping of dataset ids (d2_reclass.data.mapping)")
                    continue
                eval_at = list(EVAL_AT) if iterations == LONG else [SHORT]
                key = digest(RUNS_VERSION[arch], SPLITS, source["weights"], arch, method,
                             iterations, cache, seed, eval_at, TARGET_SOLVER, TARGET_LR,
                             SIZE_OPTS, METHODS[method])
                path = os.path.join(CACHE, f"run-{arch}-{kind}-{method}-{iterations}-"
                                    f"{'cache' if cache else 'nocache'}-{seed}-{key}.json")
                if os.path.exists(path) and not args.force:
                    with open(path) as f:
                        run = json.load(f)
                elif args.report_only:
                    continue
                else:
                    t0 = time.time()
                    run = fine_tune(arch, source, method, iterations, cache, seed, eval_at)
                    run.update(arch=arch, source=kind, method=method, iterations=iterations,
                               cache=cache, seed=seed, wall=time.time() - t0)
                    with open(path, "w") as f:
                        json.dump(run, f)
                runs.setdefault(f"{arch}/{kind}/{method}" + ("" if cache else "/nocache"),
                                []).append(run)
                last = max(int(i) for i in run["curve"])
                m = old_new(run["curve"][str(last)])
                print(f"seed {seed} {arch} {kind} {method} {iterations} "
                      f"{'cache' if cache else 'no cache'}: it {last} old {m['old']:.1f} "
                      f"new {m['new']:.1f} all {m['all']:.1f}; train "
                      f"{run['train_seconds'][str(last)]:.0f} s, peak +{run['peak_rss_mb']:.0f} MB"
                      + (f", teacher {run['teacher']['seconds']:.1f} s "
                         f"({run['teacher']['cached']}/{run['teacher']['images']} cached)"
                         if run["teacher"] else ""), flush=True)
    text = table(runs, sources) + goals(runs, sources) + cache_note(runs)
    footer = (f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"1 torch thread; load average {load_start[0]:.1f} at start, "
              f"{os.getloadavg()[0]:.1f} at end; {time.time() - t_start:.0f} s in all.\n")
    print("\n" + text + footer)
    with open(os.path.join(CACHE, "keep_old.md"), "w") as f:
        f.write(text + "\n" + footer)
    with open(os.path.join(CACHE, "keep_old.json"), "w") as f:
        json.dump({"sources": sources, "runs": runs}, f)
    png = os.path.join(ROOT, "docs", "keep_old.png")
    plot(runs, png)
    print(f"plot: {os.path.relpath(png, ROOT)}")


if __name__ == "__main__":
    main()
