#!/usr/bin/env python
"""The d2_reclass demo: map a trained detector's heads to a new class set, against reinit.

    .venv/bin/python tools/demo.py                 # what `make demo` runs
    .venv/bin/python tools/demo.py --seeds 1 2 3   # the fine-tuning seeds (this is the default)
    .venv/bin/python tools/demo.py --force         # regenerate and retrain everything

1. Writes two synthetic COCO-format tasks under ``data/demo/datasets/``: "source" (square,
   circle, triangle, diamond, hexagon, cross) and "target" (triangle, square, star: two source
   classes in another order, plus one the source never saw).
2. Trains the source model with ``tools/train_net.py --config-file configs/shapes_source.yaml``
   into that config's OUTPUT_DIR, ``output/shapes_source/``, whose ``model_final.pth`` is the
   MODEL.WEIGHTS of both target configs.
3. For every seed s, fine-tunes it to the target task three times, with
   ``configs/shapes_target_map.yaml`` (head rows mapped by class name, the new class from the
   head's init), ``configs/shapes_target_map_imprint.yaml`` (the same with the default
   NEW_CLASS_INIT, which imprints the new class from its labelled examples) and
   ``configs/shapes_target_reinit.yaml`` (every class row fresh), all with ``SEED s
   MODEL.RECLASS.SEED s`` (seed 1 is what the configs hold), into each config's
   ``OUTPUT_DIR/seed<s>/``; each is evaluated before the first iteration (``--eval-only``, in
   ``iter0/``) and at the end (``train/``).
4. Prints box AP, AP50 and per-class AP as the mean and min-max over the seeds, AP per seed,
   the ``reclass_report.json`` paths, and saves the seed-1 mapped model's predictions on a val
   image to ``output/demo_predictions.png``.

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

Measured on a 2-core x86-64 CPU (no GPU) shared with other processes, with two of the three
target configs: from nothing 9 minutes at a load average of 1-3 (source model 3 min, each of
the 6 fine-tunes 51 s, each evaluation 7 s, mostly start-up) and 14-16 minutes at 3-4; 8-10 s
when everything is cached. The third config adds 3 fine-tunes and 3 evaluations.
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
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS_DIR = os.path.join(ROOT, "data", "demo", "datasets")
PREDICTIONS_PNG = os.path.join(ROOT, "output", "demo_predictions.png")
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")

SOURCE_CLASSES = ["square", "circle", "triangle", "diamond", "hexagon", "cross"]
TARGET_CLASSES = ["triangle", "square", "star"]
KEPT = [c for c in TARGET_CLASSES if c in SOURCE_CLASSES]

# name -> (classes, {split: (number of images, seed)}); registered as shapes_<name>_<split>,
# the names configs/shapes_*.yaml train and test on.
TASKS = {
    "source": (SOURCE_CLASSES, {"train": (800, 1), "val": (100, 2)}),
    "target": (TARGET_CLASSES, {"train": (400, 3), "val": (100, 4)}),
}

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
#: Fine-tuning seeds: each sets SEED (data order, flips, RPN/ROI sampling) and
#: MODEL.RECLASS.SEED (the fresh class rows). The target configs hold the first.
DEFAULT_SEEDS = (1, 2, 3)
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
    (tools/train_net.py, d2_reclass/*.py) and of the torch thread count it runs with.

    Call :func:`prepare` (which sets the count) first.
    """
    code = sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "d2_reclass", "*.py")))
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
    """``--coco-dataset NAME JSON IMAGE_ROOT`` for every split of ``tasks``."""
    args = []
    for task in tasks:
        for split in TASKS[task][1]:
            args += ["--coco-dataset", f"shapes_{task}_{split}",
                     rel(os.path.join(data_dir, task, f"{split}.json")),
                     rel(os.path.join(data_dir, task, split))]
    return args


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

    key = digest(TASKS, "d2_reclass/data/synthetic.py")
    if cached(DATASETS_DIR, key, force) is not None:
        print(f"   cached: {rel(DATASETS_DIR)}")
        return DATASETS_DIR, key
    for task, (classes, splits) in TASKS.items():
        for split, (n, seed) in splits.items():
            make_shapes_dataset(os.path.join(DATASETS_DIR, task), split, classes, n, seed=seed)
            print(f"   {task}/{split}: {n} images of {', '.join(classes)} (seed {seed})")
    mark_done(DATASETS_DIR, key, {"tasks": TASKS})
    return DATASETS_DIR, key


# ----------------------------------------------------------------------------- train_net.py
_PROGRESS = re.compile(r"eta: (\S+)\s+iter: (\d+)\s+total_loss: (\S+)")


def train_net(args: Sequence[str], log_path: str) -> None:
    """Run tools/train_net.py with ``args``; full output to ``log_path``, progress to stdout.

    It inherits this process's environment, OMP_NUM_THREADS included (set by :func:`prepare`).
    """
    cmd = [sys.executable, TRAIN_NET, *args]
    print(f"   $ OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
          + shlex.join([rel(cmd[0]), rel(cmd[1]), *cmd[2:]]), flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            m = _PROGRESS.search(line)
            if m:
                print(f"     iter {int(m.group(2)) + 1:4d}  total_loss {m.group(3):<7} "
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


def evaluate_run(run_dir: str, data_dir: str, task: str) -> Dict[str, float]:
    """Metrics of the last evaluation written to ``run_dir/inference``, checked against
    what detectron2 itself reported for it."""
    classes = TASKS[task][0]
    ours = coco_metrics(os.path.join(data_dir, task, "val.json"),
                        os.path.join(run_dir, "inference", "coco_instances_results.json"), classes)
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
    for config in TARGET_CONFIGS.values():
        weights = load_config(config).MODEL.WEIGHTS
        if os.path.normpath(weights) != os.path.normpath(source["weights"]):
            sys.exit(f"{config}: MODEL.WEIGHTS is {weights!r}, but {SOURCE_CONFIG} writes its "
                     f"model to {source['weights']!r}: make them agree.")


def eval_iteration0(mode: str, seed: int, data_dir: str, source: dict,
                    force: bool = False) -> dict:
    """--eval-only of the source weights through the target config in ``mode`` with ``seed``:
    the model as fine-tuning starts, heads mapped (or reinitialised) to the target classes."""
    config = TARGET_CONFIGS[mode]
    opts = [*seed_opts(seed), *TARGET_CLASSES_OPT]
    run_dir = os.path.join(target_dir(mode, seed), "iter0")
    key = run_key(source["weights"], *config_chain(config), opts)
    record = cached(run_dir, key, force)
    if record is None:
        train_net(["--eval-only", "--config-file", config, *dataset_args(data_dir, ["target"]),
                   *opts, "OUTPUT_DIR", rel(run_dir)], os.path.join(run_dir, "eval.log"))
        record = mark_done(run_dir, key, {
            "metrics": evaluate_run(run_dir, data_dir, "target")})
    else:
        print(f"   cached: {rel(run_dir)}")
    return record


def fine_tune(mode: str, seed: int, data_dir: str, source: dict, force: bool = False) -> dict:
    """Fine-tune the source model to the target task in ``mode`` with ``seed``, evaluated at
    the end; return its record (weights, reclass report, iterations, seconds, metrics)."""
    config = TARGET_CONFIGS[mode]
    opts = seed_opts(seed)
    run_dir = os.path.join(target_dir(mode, seed), "train")
    key = run_key(source["weights"], *config_chain(config), opts)
    record = cached(run_dir, key, force)
    if record is None:
        t0 = time.time()
        train_net(["--config-file", config, *dataset_args(data_dir, ["target"]), *opts,
                   "OUTPUT_DIR", rel(run_dir)], os.path.join(run_dir, "train.log"))
        record = mark_done(run_dir, key, {
            "seconds": time.time() - t0, "weights": rel(os.path.join(run_dir, "model_final.pth")),
            "report": rel(os.path.join(run_dir, "reclass_report.json")),
            "max_iter": int(load_config(config).SOLVER.MAX_ITER),
            "metrics": evaluate_run(run_dir, data_dir, "target")})
    else:
        print(f"   cached: {rel(run_dir)} (trained in {record['seconds']:.0f} s)")
    return record


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
    args = parser.parse_args(argv)
    t_start = time.time()

    data_dir, source = prepare(args.force)
    starts: Dict[str, List[dict]] = {}
    finals: Dict[str, List[dict]] = {}
    for mode in TARGET_CONFIGS:
        step(f"3. Target model, {mode}: {TARGET_CONFIGS[mode]}, "
             f"seeds {args.seeds}")
        starts[mode], finals[mode] = [], []
        for seed in args.seeds:
            with timed(f"{mode}, seed {seed}, iteration 0 (--eval-only)"):
                starts[mode].append(eval_iteration0(mode, seed, data_dir, source, args.force))
            with timed(f"{mode}, seed {seed}, fine-tune"):
                finals[mode].append(fine_tune(mode, seed, data_dir, source, args.force))
    rows = [(f"{mode}, iteration 0", [r["metrics"] for r in starts[mode]])
            for mode in TARGET_CONFIGS]
    rows += [(f"{mode}, iteration {finals[mode][0]['max_iter']}",
              [r["metrics"] for r in finals[mode]]) for mode in TARGET_CONFIGS]

    step("4. Results on the target val set (box AP, %)")
    m = source["metrics"]
    print(f"source model (one model, {SOURCE_CONFIG}) on the source val set: AP {m['AP']:.1f}, "
          f"AP50 {m['AP50']:.1f}; " + ", ".join(f"{c} AP {m[f'AP-{c}']:.1f}" for c in KEPT))
    print(f"\nMean and (min-max) over {len(args.seeds)} fine-tuning seeds {args.seeds}, "
          f"{os.environ['OMP_NUM_THREADS']} torch thread(s) per process:\n")
    print("\n".join(f"{mode}: {TARGET_LEGEND[mode]}" for mode in TARGET_CONFIGS) + "\n")
    print(results_table(rows))
    print()
    print(per_seed_table(rows, args.seeds))
    print(f"\nAt iteration 0, map keeps what the source model knew of {' and '.join(KEPT)}; "
          "reinit is not at 0 AP because its class rows are fresh but near 0, so every box gets "
          "about the same score for each class (the background row and the box head are kept): "
          "a class-agnostic detector, right about one time in three, and which classes it gets "
          "right depends on the fresh rows' seed.\n")
    for mode in TARGET_CONFIGS:
        print(f"reclass report ({mode}, seed {args.seeds[0]}): {finals[mode][0]['report']}")
    save_predictions(os.path.join(ROOT, finals["map"][0]["weights"]), data_dir, PREDICTIONS_PNG)
    print(f"predictions of the mapped model (seed {args.seeds[0]}): {rel(PREDICTIONS_PNG)}")
    print(f"\ndemo finished in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
