#!/usr/bin/env python
"""The d2_reclass demo: map a trained detector's heads to a new class set, against reinit.

    .venv/bin/python tools/demo.py          # what `make demo` runs
    .venv/bin/python tools/demo.py --force  # regenerate and retrain everything

1. Writes two synthetic COCO-format tasks under ``data/demo/``: "source" (square, circle,
   triangle, diamond, hexagon, cross) and "target" (triangle, square, star: two source classes
   in another order, plus one the source never saw).
2. Trains the source model with ``tools/train_net.py --config-file configs/shapes_source.yaml``.
3. Fine-tunes it to the target task twice, with ``configs/shapes_target_map.yaml`` (head rows
   mapped by class name) and ``configs/shapes_target_reinit.yaml`` (every class row fresh),
   same seeds and iterations; evaluates both before the first iteration (``--eval-only``) and
   at the end.
4. Prints one table of box AP, AP50 and per-class AP, the two ``reclass_report.json`` paths,
   and saves the mapped model's predictions on a val image to ``data/demo/predictions.png``.

Every step runs ``tools/train_net.py`` as a subprocess, exactly as a user would; the commands
are printed. Results are cached under ``data/demo/`` keyed by a hash of everything that defines
them (dataset settings, generator code, config files, command-line options), so a rerun takes
seconds and a changed setting retrains only what depends on it.

Measured on a 2-core x86 CPU (no GPU): about 6 minutes from nothing (source model 3.7 min,
each fine-tune 1 min, each evaluation 4 s plus 7 s of start-up), 5 s when everything is cached.
"""
import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "demo")
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
TARGET_CONFIGS = {"map": "configs/shapes_target_map.yaml",
                  "reinit": "configs/shapes_target_reinit.yaml"}
BASE_CONFIG = "configs/Base-Shapes-RCNN.yaml"
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


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


@contextlib.contextmanager
def timed(what: str):
    t0 = time.time()
    yield
    print(f"   [{what}: {time.time() - t0:.1f} s]", flush=True)


def cached(run_dir: str, force: bool = False) -> Optional[dict]:
    """The record of a finished step in ``run_dir``; a half-finished one is deleted."""
    done = os.path.join(run_dir, DONE)
    if os.path.exists(done) and not force:
        with open(done) as f:
            return json.load(f)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    return None


def mark_done(run_dir: str, record: dict) -> dict:
    with open(os.path.join(run_dir, DONE), "w") as f:
        json.dump(record, f, indent=2)
    return record


# ----------------------------------------------------------------------------- datasets
def dataset_args(data_dir: str) -> List[str]:
    """``--coco-dataset NAME JSON IMAGE_ROOT`` for every task and split."""
    args = []
    for task, (_, splits) in TASKS.items():
        for split in splits:
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


def prepare_datasets(force: bool = False) -> str:
    """Write both tasks under data/demo/datasets-<hash>/ (once); return that directory."""
    from d2_reclass.synthetic import make_shapes_dataset

    data_dir = os.path.join(DATA, "datasets-" + digest(TASKS, "d2_reclass/synthetic.py"))
    if cached(data_dir, force) is not None:
        print(f"   cached: {rel(data_dir)}")
        return data_dir
    for task, (classes, splits) in TASKS.items():
        for split, (n, seed) in splits.items():
            make_shapes_dataset(os.path.join(data_dir, task), split, classes, n, seed=seed)
            print(f"   {task}/{split}: {n} images of {', '.join(classes)} (seed {seed})")
    mark_done(data_dir, {"tasks": TASKS})
    return data_dir


# ----------------------------------------------------------------------------- train_net.py
_PROGRESS = re.compile(r"eta: (\S+)\s+iter: (\d+)\s+total_loss: (\S+)")


def train_env() -> Dict[str, str]:
    """The environment of train_net.py runs: one intra-op thread unless OMP_NUM_THREADS is set.

    Measured on the 2-core machine this demo targets: with torch's default two threads an
    iteration takes 0.41 s when nothing else runs, but 3-6 s as soon as any other process
    (or the data-loader worker) wants a core, as the threads wait on each other at every op;
    with one thread it takes 0.5 s either way, and inference is 4x faster (0.035 s per image).
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_net(args: Sequence[str], log_path: str) -> None:
    """Run tools/train_net.py with ``args``; full output to ``log_path``, progress to stdout."""
    cmd = [sys.executable, TRAIN_NET, *args]
    env = train_env()
    print(f"   $ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
          + shlex.join([rel(cmd[0]), rel(cmd[1]), *cmd[2:]]), flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
    checked against detectron2's own by :func:`check_against_detectron2`.
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
def train_source(data_dir: str, force: bool = False) -> dict:
    """Train (once) the six-class source model; return its record (weights path, metrics)."""
    opts: List[str] = []
    run_dir = os.path.join(DATA, "source-" + digest(
        os.path.basename(data_dir), BASE_CONFIG, SOURCE_CONFIG, opts))
    weights = os.path.join(run_dir, "model_final.pth")
    record = cached(run_dir, force)
    if record is None:
        t0 = time.time()
        train_net(["--config-file", SOURCE_CONFIG, *dataset_args(data_dir),
                   "OUTPUT_DIR", rel(run_dir), *opts], os.path.join(run_dir, "train.log"))
        record = mark_done(run_dir, {
            "weights": rel(weights), "seconds": time.time() - t0,
            "metrics": evaluate_run(run_dir, data_dir, "source")})
    else:
        print(f"   cached: {record['weights']} (trained in {record['seconds']:.0f} s)")
    return record


def target_run_dir(mode: str, source: dict, extra_opts: Sequence[str] = ()) -> str:
    """Where the fine-tune of ``source`` in ``mode`` with ``extra_opts`` lives."""
    key = digest(source["weights"], BASE_CONFIG, TARGET_CONFIGS[mode], list(extra_opts))
    return os.path.join(DATA, f"target_{mode}-{key}")


def eval_iteration0(mode: str, data_dir: str, source: dict, force: bool = False) -> dict:
    """--eval-only of the source weights through the target config: the model as fine-tuning
    starts, heads mapped (or reinitialised) to the target classes."""
    run_dir = os.path.join(target_run_dir(mode, source), "iter0")
    record = cached(run_dir, force)
    if record is None:
        train_net(["--eval-only", "--config-file", TARGET_CONFIGS[mode], *dataset_args(data_dir),
                   "MODEL.WEIGHTS", source["weights"], *TARGET_CLASSES_OPT,
                   "OUTPUT_DIR", rel(run_dir)], os.path.join(run_dir, "eval.log"))
        record = mark_done(run_dir, {"metrics": evaluate_run(run_dir, data_dir, "target")})
    else:
        print(f"   cached: {rel(run_dir)}")
    return record


def fine_tune(mode: str, data_dir: str, source: dict, extra_opts: Sequence[str] = (),
              force: bool = False) -> dict:
    """Fine-tune the source model to the target task in ``mode``; evaluated at the end."""
    train_dir = os.path.join(target_run_dir(mode, source, extra_opts), "train")
    record = cached(train_dir, force)
    if record is None:
        t0 = time.time()
        train_net(["--config-file", TARGET_CONFIGS[mode], *dataset_args(data_dir),
                   "MODEL.WEIGHTS", source["weights"], "OUTPUT_DIR", rel(train_dir),
                   *extra_opts], os.path.join(train_dir, "train.log"))
        record = mark_done(train_dir, {
            "seconds": time.time() - t0, "weights": rel(os.path.join(train_dir, "model_final.pth")),
            "report": rel(os.path.join(train_dir, "reclass_report.json")),
            "max_iter": solver_max_iter(train_dir),
            "metrics": evaluate_run(train_dir, data_dir, "target")})
    else:
        print(f"   cached: {rel(train_dir)} (trained in {record['seconds']:.0f} s)")
    return record


def solver_max_iter(run_dir: str) -> int:
    """SOLVER.MAX_ITER of a finished run, from the config.yaml detectron2 wrote there."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])


def config_solver(config: str):
    """The SOLVER node of a config file in configs/ (with its bases)."""
    from detectron2.config import get_cfg

    from d2_reclass import add_reclass_config, merge_config_file

    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, config))
    return cfg.SOLVER


# ----------------------------------------------------------------------------- output
def results_table(rows: Sequence[tuple]) -> str:
    """``rows``: (label, metrics dict) -> pipe table of AP, AP50 and per-class AP."""
    from tabulate import tabulate

    headers = ["model", "AP", "AP50", *(f"AP {c}" for c in TARGET_CLASSES)]
    body = [[label, m["AP"], m["AP50"], *(m[f"AP-{c}"] for c in TARGET_CLASSES)]
            for label, m in rows]
    return tabulate(body, headers=headers, tablefmt="pipe", floatfmt=".1f")


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
    from detectron2.data import MetadataCatalog
    from detectron2.data import transforms as T
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
    vis = Visualizer(bgr[:, :, ::-1], MetadataCatalog.get("shapes_target_val"), scale=4.0)
    cv2.imwrite(out_png, vis.draw_instance_predictions(instances).get_image()[:, :, ::-1])
    names = [TARGET_CLASSES[i] for i in instances.pred_classes.tolist()]
    print(f"   {image['file_name']}: {len(instances)} detections with score >= {score}: "
          + ", ".join(f"{n} {s:.2f}" for n, s in zip(names, instances.scores.tolist())))
    return len(instances)


# ----------------------------------------------------------------------------- main
def prepare(force: bool = False):
    """Datasets and source model, from the cache when possible: (data_dir, source record)."""
    step("1. Datasets")
    with timed("datasets"):
        data_dir = prepare_datasets(force)
    step(f"2. Source model ({len(SOURCE_CLASSES)} classes): {SOURCE_CONFIG}")
    with timed("source model"):
        source = train_source(data_dir, force)
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
    parser.add_argument("--force", action="store_true", help="ignore the cache under data/demo")
    args = parser.parse_args(argv)
    t_start = time.time()
    os.makedirs(DATA, exist_ok=True)

    data_dir, source = prepare(args.force)
    rows, reports, finals = [], {}, {}
    for mode in ("map", "reinit"):
        step(f"3. Target model, MODEL.RECLASS.MODE {mode}: {TARGET_CONFIGS[mode]}")
        with timed(f"{mode}, iteration 0 (--eval-only)"):
            start = eval_iteration0(mode, data_dir, source, args.force)
        with timed(f"{mode}, fine-tune"):
            finals[mode] = fine_tune(mode, data_dir, source, force=args.force)
        reports[mode] = finals[mode]["report"]
        rows.append((f"{mode}, iteration 0", start["metrics"]))
    for mode in ("map", "reinit"):
        rows.append((f"{mode}, iteration {finals[mode]['max_iter']}", finals[mode]["metrics"]))

    step("4. Results on the target val set (box AP, %)")
    print(f"source model on the source val set: AP {source['metrics']['AP']:.1f}, AP50 "
          f"{source['metrics']['AP50']:.1f}; "
          + ", ".join(f"{c} AP {source['metrics'][f'AP-{c}']:.1f}" for c in KEPT))
    print()
    print(results_table(rows))
    print(f"\nAt iteration 0, map keeps what the source model knew of {' and '.join(KEPT)}; "
          "reinit is not at 0 AP because its class rows are fresh but near 0, so every box gets "
          "about the same score for each class (the background row and the box head are kept): "
          "a class-agnostic detector, right about one time in three.\n")
    for mode, path in reports.items():
        print(f"reclass report ({mode}): {path}")
    png = os.path.join(DATA, "predictions.png")
    save_predictions(os.path.join(ROOT, finals["map"]["weights"]), data_dir, png)
    print(f"predictions of the mapped model: {rel(png)}")
    print(f"\ndemo finished in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
