#!/usr/bin/env python
"""The d2_reclass demo: change a trained detector's classes by name, and add a class while
keeping the old ones.

    .venv/bin/python tools/demo.py                 # what `make demo` runs (seed 1)
    .venv/bin/python tools/demo.py --seeds 1 2 3   # more fine-tuning seeds
    .venv/bin/python tools/demo.py --force         # regenerate and retrain everything

1. Writes three synthetic COCO-format tasks under ``data/demo/datasets/``: "source" (square,
   circle, triangle, diamond, hexagon, cross), "target" (triangle, square, star: two source
   classes in another order, plus one the source never saw) and "add" (scenes of the six
   source classes and star, whose train json labels only star; ``add/val_old.json`` holds
   add/val's old-class labels).
2. Trains the source model with ``tools/train_net.py --config-file configs/shapes_source.yaml``
   into that config's OUTPUT_DIR, ``output/shapes_source/``, whose ``model_final.pth`` is the
   MODEL.WEIGHTS of every other config.
3. Part 1, changing the class set: fine-tunes it to the target task with
   ``configs/shapes_target_map_imprint.yaml`` (head rows mapped by class name, the new class
   imprinted from its labelled examples: the default NEW_CLASS_INIT) and
   ``configs/shapes_target_reinit.yaml`` (every class row fresh), each evaluated before the
   first iteration (``--eval-only``, in ``OUTPUT_DIR/seed<s>/iter0/``) and at the end
   (``train/``); ``--modes`` adds ``map`` (``configs/shapes_target_map.yaml``, the new class
   from the head's init). Part 2, adding star: fine-tunes it on add/train (star labels only)
   with ``configs/shapes_add_star.yaml`` (KEEP_SOURCE_CLASSES: the old classes kept by the
   source model's pseudo-labels) and the same with ``MODEL.RECLASS.PRESERVE none`` (naive),
   into ``output/shapes_add_star/seed<s>/{keep-old,naive}/``, and evaluates the model they
   start from (``iter0/``) and the source model on add/val's old-class labels (``source/``).
   Every run uses ``SEED s MODEL.RECLASS.SEED s`` (seed 1, the default, is what the configs
   hold). After the source model, ``--jobs`` (2) of these train_net.py processes run at once.
4. Prints box AP, AP50 and per-class AP of part 1 (mean and min-max when several seeds are
   given), part 2's old-class AP (against the source's) and star AP, the
   ``reclass_report.json`` paths, and saves the first mapped model's predictions on a val
   image to ``output/demo_predictions.png``. The 3-seed tables, with the ``map`` runs, are
   ``make bench``'s (benchmarks/map_vs_reinit.py; docs/keep_old.md for adding classes).

Reproducibility: every run is seeded, and every process uses the same number of torch threads
(1 unless OMP_NUM_THREADS is set; see d2_reclass/threads.py). At a given thread count a rerun
writes bit-identical weights and prints the same table; the count itself changes the order of
floating-point sums and so the numbers, which is why it is printed with the results and is part
of every cache key. What varies legitimately, with the training seed and the seed of the fresh
rows, is shown as the spread over the seeds, not as one run.

Every step runs ``tools/train_net.py`` as a subprocess, exactly as a user would; the commands
are printed. Each step's directory holds ``demo_done.json`` with a hash of everything that
defines the step (dataset settings, config files, command-line options, the code of
tools/train_net.py and d2_reclass, thread count, the source weights), so a rerun takes seconds
and a change redoes only what depends on it.

Timings: docs/benchmarks.md, "The demo".
"""
import argparse
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS_DIR = os.path.join(ROOT, "data", "demo", "datasets")
PREDICTIONS_PNG = os.path.join(ROOT, "output", "demo_predictions.png")
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")

SOURCE_CLASSES = ["square", "circle", "triangle", "diamond", "hexagon", "cross"]
TARGET_CLASSES = ["triangle", "square", "star"]
KEPT = [c for c in TARGET_CLASSES if c in SOURCE_CLASSES]
#: Part 2 adds this class to the six source classes, from labels of it alone.
ADD_CLASS = "star"
ADD_CLASSES = SOURCE_CLASSES + [ADD_CLASS]

# name -> (classes, {split: (number of images, seed)}); registered as shapes_<name>_<split>,
# the names configs/shapes_*.yaml train and test on.
TASKS = {
    "source": (SOURCE_CLASSES, {"train": (800, 1), "val": (100, 2)}),
    "target": (TARGET_CLASSES, {"train": (400, 3), "val": (100, 4)}),
    # Scenes of all seven classes; every train image holds a star (its first object).
    "add": (ADD_CLASSES, {"train": (160, 5), "val": (100, 6)}),
}
#: task -> {split: the only classes its json keeps labels of}: a user's new-only data, whose
#: old-class objects are in the images, unlabelled (its json lists only star, as a user's would).
ONLY_LABELS = {"add": {"train": [ADD_CLASS]}}
#: task -> {name: (split whose images it labels, the classes it keeps)}: extra label files,
#: registered as shapes_<task>_<name>. add/val_old.json: the six old classes of add/val, on
#: which the six-class source model is evaluated (old-class AP compares with the 7-class
#: models' on add/val: per-class AP never reads another class's labels).
EXTRA_LABELS = {"add": {"val_old": ("val", SOURCE_CLASSES)}}

SOURCE_CONFIG = "configs/shapes_source.yaml"
#: The fine-tunes compared, each a config file (its own OUTPUT_DIR), by the name the tables use.
TARGET_CONFIGS = {"map": "configs/shapes_target_map.yaml",
                  "map-imprint": "configs/shapes_target_map_imprint.yaml",
                  "reinit": "configs/shapes_target_reinit.yaml"}
#: What each name means, printed with the tables.
TARGET_LEGEND = {
    "map": "rows mapped by class name, the new class from the head's init (NEW_CLASS_INIT head)",
    "map-imprint": "the same with NEW_CLASS_INIT at its default, auto, which imprints the new "
    "class from its labelled examples",
    "reinit": "every class row fresh (MODE reinit): what stock detectron2 gives at best",
}
BASE_CONFIG = "configs/Base-Shapes-RCNN.yaml"
#: The fine-tunes part 1 of the demo shows (the default init against reinit); the bench
#: (benchmarks/map_vs_reinit.py) runs every TARGET_CONFIGS entry.
DEMO_MODES = ("map-imprint", "reinit")
#: Part 2: adding star while keeping the old classes, and each method's train_net.py opts.
ADD_CONFIG = "configs/shapes_add_star.yaml"
ADD_METHODS = {"keep-old": [], "naive": ["MODEL.RECLASS.PRESERVE", "none"]}
ADD_LEGEND = {
    "keep-old": "KEEP_SOURCE_CLASSES True (PRESERVE auto: the source model's detections label "
    "the old objects)",
    "naive": "the same with PRESERVE none: the unlabelled old objects train as background",
}
#: Fine-tuning seeds: each sets SEED (data order, flips, RPN/ROI sampling) and
#: MODEL.RECLASS.SEED (the fresh class rows). The configs hold the first. The demo runs one;
#: benchmarks/map_vs_reinit.py the spread over BENCH_SEEDS.
DEFAULT_SEEDS = (1,)
BENCH_SEEDS = (1, 2, 3)
#: Target class names for an --eval-only run of the *source* weights through a target config:
#: without them, train_net.py takes the six class names stored in the checkpoint.
TARGET_CLASSES_OPT = ["MODEL.RECLASS.TARGET_CLASSES", json.dumps(TARGET_CLASSES)]
DONE = "demo_done.json"

# Deprecation noise from detectron2 0.7.2 on torch 2.x, printed by this process's imports.
for _msg in (r"`torch.jit.script` is deprecated", r"pkg_resources is deprecated",
             r"torch.meshgrid: in an upcoming release"):
    warnings.filterwarnings("ignore", message=_msg)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- small helpers
def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def digest(*parts) -> str:
    """A short hash of ``parts``; files are hashed by their content."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str) and os.path.isfile(os.path.join(ROOT, p)):
            with open(os.path.join(ROOT, p), "rb") as f:
                h.update(f.read())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()[:10]


def run_key(*parts) -> str:
    """:func:`digest` of ``parts``, of this repository's code that train_net.py runs
    (tools/train_net.py, every d2_reclass/**/*.py) and of the torch thread count it runs with.

    Call :func:`prepare` (which sets the count) first.
    """
    code = sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "d2_reclass", "**", "*.py"),
                                            recursive=True))
    return digest(*parts, TRAIN_NET, *code, {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]})


def config_chain(config: str) -> List[str]:
    """``config`` and the files of this repository it inherits from (``_BASE_``), for cache
    keys: a change in a base changes every config built on it."""
    import yaml

    chain = []
    while config:
        chain.append(config)
        with open(os.path.join(ROOT, config)) as f:
            base = yaml.safe_load(f).get("_BASE_", "")
        config = "" if not base or "://" in base else rel(
            os.path.join(ROOT, os.path.dirname(config), base))
    return chain


def seed_opts(seed: int) -> List[str]:
    """train_net.py opts for fine-tuning seed ``seed``."""
    return ["SEED", str(seed), "MODEL.RECLASS.SEED", str(seed)]


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


@contextlib.contextmanager
def timed(what: str):
    t0 = time.time()
    yield
    print(f"   [{what}: {time.time() - t0:.1f} s]", flush=True)


def cached(run_dir: str, key: str, force: bool = False) -> Optional[dict]:
    """The record of the step finished in ``run_dir`` with ``key``, else None.

    A directory without such a record (half-finished, or made with other settings) is deleted,
    so the step starts from nothing.
    """
    done = os.path.join(run_dir, DONE)
    if os.path.exists(done) and not force:
        with open(done) as f:
            record = json.load(f)
        if record.get("key") == key:
            return record
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    return None


def mark_done(run_dir: str, key: str, record: dict) -> dict:
    """Store ``record`` as the result of the step in ``run_dir`` made with ``key``."""
    record = {"key": key, **record}
    with open(os.path.join(run_dir, DONE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def load_config(config: str):
    """A config file in configs/ (with its bases), as train_net.py reads it."""
    from detectron2.config import get_cfg

    from d2_reclass import add_reclass_config, merge_config_file

    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, config))
    return cfg


def target_dir(mode: str, seed: int) -> str:
    """Where the demo's fine-tune in ``mode`` with ``seed`` lives: under the config's OUTPUT_DIR."""
    return os.path.join(ROOT, load_config(TARGET_CONFIGS[mode]).OUTPUT_DIR, f"seed{seed}")


# ----------------------------------------------------------------------------- datasets
def dataset_args(data_dir: str, tasks: Sequence[str] = tuple(TASKS)) -> List[str]:
    """``--coco-dataset NAME JSON IMAGE_ROOT`` for every split (and extra label file) of
    ``tasks``."""
    args = []
    for task in tasks:
        files = [(split, split) for split in TASKS[task][1]]
        files += [(name, split) for name, (split, _) in EXTRA_LABELS.get(task, {}).items()]
        for name, split in files:
            args += ["--coco-dataset", f"shapes_{task}_{name}",
                     rel(os.path.join(data_dir, task, f"{name}.json")),
                     rel(os.path.join(data_dir, task, split))]
    return args


def keep_labels(json_in: str, json_out: str, classes: Sequence[str]) -> None:
    """Write ``json_in`` to ``json_out`` with only the labels and categories of ``classes``
    (the images and category ids unchanged)."""
    with open(json_in) as f:
        data = json.load(f)
    data["categories"] = [c for c in data["categories"] if c["name"] in classes]
    ids = {c["id"] for c in data["categories"]}
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in ids]
    with open(json_out, "w") as f:
        json.dump(data, f)


def register_datasets(data_dir: str) -> None:
    """Register every task and split in this process, as ``--coco-dataset`` does."""
    from d2_reclass import register_coco_dataset

    args = dataset_args(data_dir)
    for i in range(0, len(args), 4):
        register_coco_dataset(args[i + 1], os.path.join(ROOT, args[i + 2]),
                              os.path.join(ROOT, args[i + 3]))


def prepare_datasets(force: bool = False) -> Tuple[str, str]:
    """Write both tasks under data/demo/datasets/ (once); return (that directory, its key)."""
    from d2_reclass.data.synthetic import make_shapes_dataset

    key = digest(TASKS, ONLY_LABELS, EXTRA_LABELS, "d2_reclass/data/synthetic.py")
    if cached(DATASETS_DIR, key, force) is not None:
        print(f"   cached: {rel(DATASETS_DIR)}")
        return DATASETS_DIR, key
    for task, (classes, splits) in TASKS.items():
        out = os.path.join(DATASETS_DIR, task)
        for split, (n, seed) in splits.items():
            only = ONLY_LABELS.get(task, {}).get(split)
            json_file = make_shapes_dataset(out, split, classes, n, seed=seed,
                                            first_class=only[0] if only else None)
            if only:
                keep_labels(json_file, json_file, only)
            print(f"   {task}/{split}: {n} images of {', '.join(classes)} (seed {seed})"
                  + (f", labels of {', '.join(only)} only" if only else ""))
        for name, (split, kept) in EXTRA_LABELS.get(task, {}).items():
            keep_labels(os.path.join(out, f"{split}.json"), os.path.join(out, f"{name}.json"),
                        kept)
            print(f"   {task}/{name}: the labels of {', '.join(kept)} in {task}/{split}")
    mark_done(DATASETS_DIR, key, {"tasks": TASKS})
    return DATASETS_DIR, key


# ----------------------------------------------------------------------------- train_net.py
_PROGRESS = re.compile(r"eta: (\S+)\s+iter: (\d+)\s+total_loss: (\S+)")


def train_net(args: Sequence[str], log_path: str, tag: str = "") -> None:
    """Run tools/train_net.py with ``args``; full output to ``log_path``, progress to stdout
    (each line prefixed with ``tag``: runs may go on side by side).

    It inherits this process's environment, OMP_NUM_THREADS included (set by :func:`prepare`).
    """
    cmd = [sys.executable, TRAIN_NET, *args]
    tag = f"[{tag}] " if tag else ""
    print(f"   {tag}$ OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
          + shlex.join([rel(cmd[0]), rel(cmd[1]), *cmd[2:]]), flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            m = _PROGRESS.search(line)
            if m:
                print(f"     {tag}iter {int(m.group(2)) + 1:4d}  total_loss {m.group(3):<7} "
                      f"eta {m.group(1)}", flush=True)
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        sys.exit(f"{tail}\n\ntools/train_net.py failed (exit {proc.returncode}); full log: "
                 f"{rel(log_path)}")


def coco_metrics(gt_json: str, results_json: str, classes: Sequence[str]) -> Dict[str, float]:
    """Box AP / AP50, overall and per class, from a COCOEvaluator results file (in %).

    Per-class AP is computed as detectron2's COCOEvaluator does; the overall numbers are
    checked against detectron2's own by :func:`evaluate_run`.
    """
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        with open(results_json) as f:
            dets = json.load(f)
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, **{f"AP-{c}": 0.0 for c in classes},
                    **{f"AP50-{c}": 0.0 for c in classes}}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {"AP": 100 * ev.stats[0], "AP50": 100 * ev.stats[1]}
    # precision: [IoU thresholds, recall, class, area range, max dets]; classes in cat-id order.
    precision = ev.eval["precision"]
    cat_names = [gt.cats[i]["name"] for i in sorted(gt.cats)]
    for k, name in enumerate(cat_names):
        for key, p in ((f"AP-{name}", precision[:, :, k, 0, -1]),
                       (f"AP50-{name}", precision[0, :, k, 0, -1])):
            p = p[p > -1]
            out[key] = float(100 * np.mean(p)) if p.size else float("nan")
    return out


def detectron2_metrics(run_dir: str) -> Dict[str, float]:
    """detectron2's own box AP / AP50 for a run: metrics.json after training, else the
    evaluator's ``copypaste:`` lines in log.txt (--eval-only writes no metrics.json)."""
    metrics = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as f:
            records = [json.loads(line) for line in f if "bbox/AP" in line]
        if records:
            return {"AP": records[-1]["bbox/AP"], "AP50": records[-1]["bbox/AP50"]}
    with open(os.path.join(run_dir, "log.txt")) as f:
        lines = [ln.split("copypaste: ", 1)[1].strip() for ln in f if "copypaste: " in ln]
    header = lines.index("AP,AP50,AP75,APs,APm,APl")
    values = [float(v) for v in lines[header + 1].split(",")]
    return {"AP": values[0], "AP50": values[1]}


def evaluate_run(run_dir: str, data_dir: str, task: str, labels: str = "val"
                 ) -> Dict[str, float]:
    """Metrics of the last evaluation written to ``run_dir/inference`` (against
    ``task/labels.json``), checked against what detectron2 itself reported for it."""
    gt_json = os.path.join(data_dir, task, f"{labels}.json")
    with open(gt_json) as f:
        classes = [c["name"] for c in json.load(f)["categories"]]
    ours = coco_metrics(gt_json, os.path.join(run_dir, "inference", "coco_instances_results.json"),
                        classes)
    theirs = detectron2_metrics(run_dir)
    for key in ("AP", "AP50"):
        if abs(ours[key] - theirs[key]) > 0.05:
            raise RuntimeError(f"{rel(run_dir)}: {key} {ours[key]:.2f} here but "
                               f"{theirs[key]:.2f} in detectron2's output")
    return ours


# ----------------------------------------------------------------------------- the steps
def train_source(data_dir: str, data_key: str, force: bool = False) -> dict:
    """Train (once) the six-class source model into the source config's OUTPUT_DIR; return its
    record (weights path relative to the repository, seconds, metrics on the source val set)."""
    run_dir = os.path.join(ROOT, load_config(SOURCE_CONFIG).OUTPUT_DIR)
    weights = os.path.join(run_dir, "model_final.pth")
    key = run_key(data_key, BASE_CONFIG, SOURCE_CONFIG)
    record = cached(run_dir, key, force)
    if record is not None and digest(rel(weights)) != record["weights_digest"]:
        # Something else (train_net.py run by hand with other options) wrote to this
        # OUTPUT_DIR since: the stored metrics would not describe these weights.
        print(f"   {rel(weights)} is not the model the demo trained there: training again")
        record = cached(run_dir, key, force=True)
    if record is None:
        t0 = time.time()
        train_net(["--config-file", SOURCE_CONFIG, *dataset_args(data_dir, ["source"])],
                  os.path.join(run_dir, "train.log"))
        record = mark_done(run_dir, key, {
            "weights": rel(weights), "weights_digest": digest(rel(weights)),
            "seconds": time.time() - t0, "metrics": evaluate_run(run_dir, data_dir, "source")})
    else:
        print(f"   cached: {record['weights']} (trained in {record['seconds']:.0f} s)")
    return record


def check_target_weights(source: dict) -> None:
    """Exit unless every target config's MODEL.WEIGHTS is the source model the demo wrote."""
    for config in [*TARGET_CONFIGS.values(), ADD_CONFIG]:
        weights = load_config(config).MODEL.WEIGHTS
        if os.path.normpath(weights) != os.path.normpath(source["weights"]):
            sys.exit(f"{config}: MODEL.WEIGHTS is {weights!r}, but {SOURCE_CONFIG} writes its "
                     f"model to {source['weights']!r}: make them agree.")


def eval_only(config: str, opts: List[str], run_dir: str, data_dir: str, source: dict,
              task: str, labels: str = "val", force: bool = False, tag: str = "") -> dict:
    """(Once) ``tools/train_net.py --eval-only`` with ``config`` and ``opts`` into ``run_dir``;
    return its record (metrics against ``task/labels.json``)."""
    key = run_key(source["weights"], *config_chain(config), opts, labels)
    record = cached(run_dir, key, force)
    if record is None:
        tasks = ["source", task] if config == SOURCE_CONFIG and task != "source" else [task]
        train_net(["--eval-only", "--config-file", config, *dataset_args(data_dir, tasks),
                   *opts, "OUTPUT_DIR", rel(run_dir)], os.path.join(run_dir, "eval.log"), tag)
        record = mark_done(run_dir, key, {
            "metrics": evaluate_run(run_dir, data_dir, task, labels)})
    else:
        print(f"   cached: {rel(run_dir)}")
    return record


def train(config: str, opts: List[str], run_dir: str, data_dir: str, source: dict, task: str,
          force: bool = False, tag: str = "") -> dict:
    """(Once) fine-tune the source model with ``config`` and ``opts`` into ``run_dir``,
    evaluated at the end; return its record (weights, reclass report, iterations, seconds,
    metrics)."""
    key = run_key(source["weights"], *config_chain(config), opts)
    record = cached(run_dir, key, force)
    if record is None:
        t0 = time.time()
        train_net(["--config-file", config, *dataset_args(data_dir, [task]), *opts,
                   "OUTPUT_DIR", rel(run_dir)], os.path.join(run_dir, "train.log"), tag)
        record = mark_done(run_dir, key, {
            "seconds": time.time() - t0, "weights": rel(os.path.join(run_dir, "model_final.pth")),
            "report": rel(os.path.join(run_dir, "reclass_report.json")),
            "max_iter": int(load_config(config).SOLVER.MAX_ITER),
            "metrics": evaluate_run(run_dir, data_dir, task)})
    else:
        print(f"   cached: {rel(run_dir)} (trained in {record['seconds']:.0f} s)")
    return record


def eval_iteration0(mode: str, seed: int, data_dir: str, source: dict,
                    force: bool = False) -> dict:
    """--eval-only of the source weights through the target config in ``mode`` with ``seed``:
    the model as fine-tuning starts, heads mapped (or reinitialised) to the target classes."""
    return eval_only(TARGET_CONFIGS[mode], [*seed_opts(seed), *TARGET_CLASSES_OPT],
                     os.path.join(target_dir(mode, seed), "iter0"), data_dir, source, "target",
                     force=force, tag=f"{mode} s{seed} iter0")


def fine_tune(mode: str, seed: int, data_dir: str, source: dict, force: bool = False) -> dict:
    """Fine-tune the source model to the target task in ``mode`` with ``seed`` (see
    :func:`train`)."""
    return train(TARGET_CONFIGS[mode], seed_opts(seed),
                 os.path.join(target_dir(mode, seed), "train"), data_dir, source, "target",
                 force, tag=f"{mode} s{seed}")


def add_dir(name: str) -> str:
    """Where part 2's run ``name`` lives: under ADD_CONFIG's OUTPUT_DIR."""
    return os.path.join(ROOT, load_config(ADD_CONFIG).OUTPUT_DIR, name)


def add_source(data_dir: str, source: dict, force: bool = False) -> dict:
    """The six-class source model on add/val's old-class labels: the reference for the old
    classes' AP after adding star."""
    return eval_only(SOURCE_CONFIG, ["MODEL.WEIGHTS", source["weights"],
                                     "DATASETS.TEST", '("shapes_add_val_old",)'],
                     add_dir("source"), data_dir, source, "add", "val_old", force, "source")


def add_iteration0(seed: int, data_dir: str, source: dict, force: bool = False) -> dict:
    """The model as part 2's fine-tunes start (the source's rows, star imprinted from its
    labels): an --eval-only with the seven classes named, KEEP_SOURCE_CLASSES's list (which
    eval-only leaves aside, evaluating the checkpoint's own classes)."""
    opts = [*seed_opts(seed), "MODEL.RECLASS.KEEP_SOURCE_CLASSES", "False",
            "MODEL.RECLASS.TARGET_CLASSES", json.dumps(ADD_CLASSES)]
    return eval_only(ADD_CONFIG, opts, add_dir(f"seed{seed}/iter0"), data_dir, source, "add",
                     force=force, tag=f"add s{seed} iter0")


def add_fine_tune(method: str, seed: int, data_dir: str, source: dict,
                  force: bool = False) -> dict:
    """Part 2's fine-tune with ``method`` (ADD_METHODS) and ``seed`` (see :func:`train`)."""
    return train(ADD_CONFIG, [*seed_opts(seed), *ADD_METHODS[method]],
                 add_dir(f"seed{seed}/{method}"), data_dir, source, "add", force,
                 tag=f"{method} s{seed}")


def run_side_by_side(jobs: Dict[Tuple, Callable[[], dict]], lanes: int) -> Dict[Tuple, dict]:
    """Run ``jobs`` (name -> step), at most ``lanes`` at a time, in the order given; return
    name -> record. Each step is a train_net.py process with its own torch threads, so the
    records do not depend on ``lanes``; only the wall time does."""
    def run(name):
        with timed(" ".join(str(n) for n in name)):
            return jobs[name]()

    with ThreadPoolExecutor(max(1, lanes)) as pool:
        futures = {name: pool.submit(run, name) for name in jobs}
        return {name: f.result() for name, f in futures.items()}


# ----------------------------------------------------------------------------- output
def spread(values: Sequence[float]) -> str:
    """``values`` as "mean (min-max)", or the value alone when there is one."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def results_table(rows: Sequence[Tuple[str, Sequence[dict]]]) -> str:
    """``rows``: (label, metrics of each seed) -> pipe table of AP, AP50 and per-class AP,
    each as the mean and min-max over the seeds."""
    from tabulate import tabulate

    keys = ["AP", "AP50", *(f"AP-{c}" for c in TARGET_CLASSES)]
    headers = ["model", "AP", "AP50", *(f"AP {c}" for c in TARGET_CLASSES)]
    body = [[label, *(spread([m[k] for m in runs]) for k in keys)] for label, runs in rows]
    return tabulate(body, headers=headers, tablefmt="pipe",
                    colalign=["left"] + ["right"] * (len(headers) - 1))


def per_seed_table(rows: Sequence[Tuple[str, Sequence[dict]]], seeds: Sequence[int]) -> str:
    """``rows`` as in :func:`results_table` -> pipe table of AP for each seed."""
    from tabulate import tabulate

    body = [[label, *(m["AP"] for m in runs)] for label, runs in rows]
    return tabulate(body, headers=["model", *(f"AP seed {s}" for s in seeds)],
                    tablefmt="pipe", floatfmt=".1f")


def add_table(done: Dict[Tuple, dict], seeds: Sequence[int]) -> str:
    """Part 2's pipe table: the old classes' mean AP (and as % of the source's) and the added
    class's AP, for the source, iteration 0 and each method after fine-tuning."""
    from tabulate import tabulate

    def old(m: dict) -> float:
        return statistics.mean(m[f"AP-{c}"] for c in SOURCE_CLASSES)

    ref = old(done[("source on add/val_old",)]["metrics"])
    runs = [(f"+ {ADD_CLASS}, iteration 0", [done[("add", s, "iteration 0")] for s in seeds])]
    runs += [(f"{method}, iteration {done[(method, seeds[0])]['max_iter']}",
              [done[(method, s)] for s in seeds]) for method in ADD_METHODS]
    body = [["source model (6 classes)", f"{ref:.1f}", "100", "-"]]
    body += [[label, spread([old(r["metrics"]) for r in records]),
              spread([100 * old(r["metrics"]) / ref for r in records]),
              spread([r["metrics"][f"AP-{ADD_CLASS}"] for r in records])]
             for label, records in runs]
    return tabulate(body, headers=["model", "AP old classes (6)", "% of source",
                                   f"AP {ADD_CLASS}"], tablefmt="pipe",
                    colalign=["left", "right", "right", "right"])


def pick_val_image(data_dir: str) -> dict:
    """The first target val image showing every target class (else the most classes)."""
    with open(os.path.join(data_dir, "target", "val.json")) as f:
        data = json.load(f)
    cats = {i["id"]: set() for i in data["images"]}
    for a in data["annotations"]:
        cats[a["image_id"]].add(a["category_id"])
    best = max(data["images"], key=lambda i: (len(cats[i["id"]]), -i["id"]))
    return best


def save_predictions(weights: str, data_dir: str, out_png: str, score: float = 0.5) -> int:
    """Draw the model's detections on a target val image with the target class names."""
    import cv2
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.utils.colormap import colormap
    from detectron2.utils.visualizer import Visualizer

    from d2_reclass import (
        ReclassCheckpointer,
        ReclassTrainer,
        add_reclass_config,
        apply_num_classes,
        merge_config_file,
    )

    register_datasets(data_dir)
    val = os.path.join(data_dir, "target")
    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, TARGET_CONFIGS["map"]))
    cfg.merge_from_list(["MODEL.WEIGHTS", weights, *TARGET_CLASSES_OPT,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(score)])
    apply_num_classes(cfg, TARGET_CLASSES)
    cfg.freeze()
    model = ReclassTrainer.build_model(cfg).eval()
    ReclassCheckpointer.from_config(cfg, model).load(weights)

    image = pick_val_image(data_dir)
    bgr = cv2.imread(os.path.join(val, "val", image["file_name"]))
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    inp = resize.get_transform(bgr).apply_image(bgr)
    with torch.no_grad():
        out = model([{"image": torch.as_tensor(inp.transpose(2, 0, 1).copy()),
                      "height": bgr.shape[0], "width": bgr.shape[1]}])[0]
    instances = out["instances"].to("cpu")
    names = [TARGET_CLASSES[i] for i in instances.pred_classes.tolist()]
    # One fixed colour per class: draw_instance_predictions would draw them from the global
    # numpy RNG, and the picture would change from run to run.
    palette = colormap(rgb=True, maximum=1)
    vis = Visualizer(bgr[:, :, ::-1], scale=4.0).overlay_instances(
        boxes=instances.pred_boxes,
        labels=[f"{n} {s:.0%}" for n, s in zip(names, instances.scores.tolist())],
        assigned_colors=[palette[i] for i in instances.pred_classes.tolist()])
    os.makedirs(os.path.dirname(out_png), exist_ok=True)
    cv2.imwrite(out_png, vis.get_image()[:, :, ::-1])
    print(f"   {image['file_name']}: {len(instances)} detections with score >= {score}: "
          + ", ".join(f"{n} {s:.2f}" for n, s in zip(names, instances.scores.tolist())))
    return len(instances)


# ----------------------------------------------------------------------------- main
def prepare(force: bool = False) -> Tuple[str, dict]:
    """Thread count, datasets and source model, from the cache when possible:
    (data_dir, source record)."""
    from d2_reclass.threads import configure_torch_threads

    threads = configure_torch_threads()
    step(f"1. Datasets (torch threads per process: {threads}, OMP_NUM_THREADS)")
    with timed("datasets"):
        data_dir, data_key = prepare_datasets(force)
    step(f"2. Source model ({len(SOURCE_CLASSES)} classes): {SOURCE_CONFIG}")
    with timed("source model"):
        source = train_source(data_dir, data_key, force)
    check_target_weights(source)
    m = source["metrics"]
    print(f"   source model, val: AP {m['AP']:.1f}, AP50 {m['AP50']:.1f}; "
          + ", ".join(f"{c} AP {m[f'AP-{c}']:.1f} / AP50 {m[f'AP50-{c}']:.1f}"
                      for c in SOURCE_CLASSES))
    weak = [c for c in KEPT if not m[f"AP50-{c}"] >= 50]
    if weak:
        print(f"   WARNING: the source model is weak on {weak} (AP50 < 50): the comparison "
              "below means little. Train longer (SOLVER.MAX_ITER in configs/).")
    return data_dir, source


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="ignore the cache")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="fine-tuning seeds (SEED and MODEL.RECLASS.SEED); default: "
                        "%(default)s")
    parser.add_argument("--modes", nargs="+", choices=list(TARGET_CONFIGS),
                        default=list(DEMO_MODES), help="part 1's fine-tunes; default: "
                        "%(default)s")
    parser.add_argument("--jobs", type=int, default=2,
                        help="train_net.py processes at once after the source model (each "
                        "with its own torch threads; the results do not depend on it); "
                        "default: %(default)s")
    args = parser.parse_args(argv)
    t_start, load_start = time.time(), os.getloadavg()

    data_dir, source = prepare(args.force)
    step(f"3. Fine-tunes, {args.jobs} at a time: part 1, changing the class set "
         f"({', '.join(args.modes)}); part 2, adding {ADD_CLASS} ({ADD_CONFIG}: "
         f"{', '.join(ADD_METHODS)}); seeds {args.seeds}")
    f = args.force
    # Longest first, so that the lanes finish together.
    jobs: Dict[Tuple, Callable[[], dict]] = {}
    for seed in args.seeds:
        for method in ADD_METHODS:
            jobs[(method, seed)] = partial(add_fine_tune, method, seed, data_dir, source, f)
        for mode in args.modes:
            jobs[(mode, seed)] = partial(fine_tune, mode, seed, data_dir, source, f)
    for seed in args.seeds:
        jobs[("add", seed, "iteration 0")] = partial(add_iteration0, seed, data_dir, source, f)
        for mode in args.modes:
            jobs[(mode, seed, "iteration 0")] = partial(eval_iteration0, mode, seed, data_dir,
                                                        source, f)
    jobs[("source on add/val_old",)] = partial(add_source, data_dir, source, f)
    done = run_side_by_side(jobs, args.jobs)

    m = source["metrics"]
    step("4. Part 1, changing the class set by name: results on the target val set (box AP, %)")
    print(f"source model (one model, {SOURCE_CONFIG}) on the source val set: AP {m['AP']:.1f}, "
          f"AP50 {m['AP50']:.1f}; " + ", ".join(f"{c} AP {m[f'AP-{c}']:.1f}" for c in KEPT))
    print(f"\n{'Mean and (min-max) over' if len(args.seeds) > 1 else 'Fine-tuning'} seeds "
          f"{args.seeds}, {os.environ['OMP_NUM_THREADS']} torch thread(s) per process:\n")
    print("\n".join(f"{mode}: {TARGET_LEGEND[mode]}" for mode in args.modes) + "\n")
    finals = {mode: [done[(mode, s)] for s in args.seeds] for mode in args.modes}
    rows = [(f"{mode}, iteration 0", [done[(mode, s, "iteration 0")]["metrics"]
                                      for s in args.seeds]) for mode in args.modes]
    rows += [(f"{mode}, iteration {finals[mode][0]['max_iter']}",
              [r["metrics"] for r in finals[mode]]) for mode in args.modes]
    print(results_table(rows))
    if len(args.seeds) > 1:
        print()
        print(per_seed_table(rows, args.seeds))
    print(f"\nAt iteration 0, mapping keeps what the source model knew of {' and '.join(KEPT)}; "
          "reinit is not at 0 AP because its class rows are fresh but near 0, so every box gets "
          "about the same score for each class (the background row and the box head are kept): "
          "a class-agnostic detector, right about one time in three, and which classes it gets "
          "right depends on the fresh rows' seed. The spread over seeds 1-3 and the map run "
          "with the head's init: make bench (benchmarks/map_vs_reinit.py).\n")
    for mode in args.modes:
        print(f"reclass report ({mode}, seed {args.seeds[0]}): {finals[mode][0]['report']}")

    step(f"5. Part 2, adding {ADD_CLASS} from labels of {ADD_CLASS} only, keeping the six old "
         "classes: results on add/val (box AP, %)")
    print("\n".join(f"{method}: {ADD_LEGEND[method]}" for method in ADD_METHODS) + "\n")
    print(add_table(done, args.seeds))
    print("\nThe old classes' objects are in the training images, unlabelled: naive "
          "fine-tuning learns them as background. The 3-seed benchmark (RetinaNet, every "
          "PRESERVE method, joint training): docs/keep_old.md.\n")
    for method in ADD_METHODS:
        print(f"reclass report ({method}, seed {args.seeds[0]}): "
              f"{done[(method, args.seeds[0])]['report']}")

    mapped = [mode for mode in args.modes if mode != "reinit"]
    if mapped:
        save_predictions(os.path.join(ROOT, finals[mapped[0]][0]["weights"]), data_dir,
                         PREDICTIONS_PNG)
        print(f"predictions of the {mapped[0]} model (seed {args.seeds[0]}): "
              f"{rel(PREDICTIONS_PNG)}")
    load_end = os.getloadavg()
    print(f"\ndemo finished in {time.time() - t_start:.0f} s (load average at the start "
          f"{load_start[0]:.1f}, at the end {load_end[0]:.1f}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
