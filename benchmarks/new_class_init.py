#!/usr/bin/env python
"""New classes from labelled examples: MODEL.RECLASS.NEW_CLASS_INIT head / relative / imprint
against reinitialising every class, box AP against fine-tuning iterations, over seeds.

    .venv/bin/python benchmarks/new_class_init.py            # 3 seeds, the defaults below
    .venv/bin/python benchmarks/new_class_init.py --seeds 5 --iters 300

The task (synthetic shapes, real PNG + COCO json, :mod:`d2_reclass.data.synthetic`), harder than
the demo's: 96 px images with up to 4 objects that may overlap by 30 %, unlabelled clutter
(lines, blobs), and every object in a random colour, so that only its shape names its class.

* Source: 8 classes (square, circle, triangle, diamond, hexagon, cross, pentagon, ellipse),
  600 train images; a ResNet-18 FPN Faster R-CNN (``configs/Base-Shapes-RCNN.yaml`` at 96 px)
  trained from scratch here, once (cached).
* Target: 5 classes. Kept: square, triangle, circle. New: star and octagon, each labelled in
  only 10 train images (plus 60 images of the kept classes alone), the few-shot case.
* Each init starts from the source weights, MODE map (reinit: MODE reinit, every class row
  fresh), loaded by ReclassCheckpointer with examples from the target train set
  (INIT_IMAGES 16, so all 10 images of each new class), then fine-tunes the whole model with
  detectron2's optimizer, LR schedule and train loader; evaluated (COCO box AP on 60 val
  images) at the iterations of ``--eval-at``.
* Seeds vary the fine-tuning (data order, fresh rows) and NEW_CLASS_INIT's choice of images;
  the source model is the same for all (training it per seed would not fit the time budget).

Everything runs in one process with one torch thread (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=1``): on the shared 2-core machine this is measured on, a second thread
only waits for the other processes. Results are cached under ``data/bench/new_class_init/``
keyed by a hash of every setting and of the code they depend on; ``--force`` recomputes.
Writes ``new_class_init.json``, the tables (``new_class_init.md``) and a plot
(``new_class_init.png``, matplotlib) there, and copies the plot to ``docs/``.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "data", "bench", "new_class_init")

SOURCE_CLASSES = ["square", "circle", "triangle", "diamond", "hexagon", "cross", "pentagon",
                  "ellipse"]
KEPT = ["square", "triangle", "circle"]
NEW = ["star", "octagon"]
TARGET_CLASSES = KEPT + NEW
SCENE = dict(image_size=96, max_objects=4, clutter=4, overlap=0.3, random_colours=True)
#: split -> (classes, images, generator seed, first class of every image)
SPLITS = {
    "source_train": (SOURCE_CLASSES, 600, 11, None),
    "source_val": (SOURCE_CLASSES, 60, 12, None),
    "target_base": (KEPT, 60, 21, None),
    "target_star": (TARGET_CLASSES, 10, 22, "star"),
    "target_octagon": (TARGET_CLASSES, 10, 23, "octagon"),
    "target_val": (TARGET_CLASSES, 60, 24, None),
}
#: The model: the demo's small Faster R-CNN at 96 px.
MODEL_OPTS = ["INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 96,
              "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 96,
              "DATALOADER.NUM_WORKERS", 0, "TEST.DETECTIONS_PER_IMAGE", 20]
SOURCE_SOLVER = ["SOLVER.IMS_PER_BATCH", 8, "SOLVER.BASE_LR", 0.02, "SOLVER.WARMUP_ITERS", 50,
                 "SOLVER.MAX_ITER", 600, "SOLVER.STEPS", (480,), "SEED", 1]
#: Fine-tuning: the demo's (a quarter of the from-scratch LR, LR / 10 for the last quarter),
#: with a smaller batch: the target train set has 80 images.
TARGET_SOLVER = ["SOLVER.IMS_PER_BATCH", 4, "SOLVER.BASE_LR", 0.005, "SOLVER.WARMUP_ITERS", 20]
#: Bump when fine_tune, train or evaluate change what a run computes (the cache key).
RUNS_VERSION = 1
INITS = {  # label -> (MODE, NEW_CLASS_INIT)
    "reinit": ("reinit", "head"),
    "head": ("map", "head"),
    "relative": ("map", "relative"),
    "imprint": ("map", "imprint"),
}

for _msg in (r"`torch.jit.script` is deprecated", r"pkg_resources is deprecated",
             r"torch.meshgrid: in an upcoming release"):
    warnings.filterwarnings("ignore", message=_msg)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def digest(*parts) -> str:
    """A short hash of ``parts``; paths of files in the repository are hashed by content, and
    of directories by the names and contents of the Python files under them (so that a cached
    run goes stale when the code it ran changes)."""
    h = hashlib.sha256()
    for p in parts:
        path = os.path.join(ROOT, p) if isinstance(p, str) else ""
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
        elif path and os.path.isdir(path):
            for file in sorted(os.path.join(d, f) for d, _, names in os.walk(path)
                               for f in names if f.endswith(".py")):
                h.update(os.path.relpath(file, ROOT).encode())
                with open(file, "rb") as f:
                    h.update(f.read())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


# ----------------------------------------------------------------------------- data
def make_data(force: bool) -> str:
    """Write every split (once) under the cache; register them; return the directory."""
    from d2_reclass import register_coco_dataset
    from d2_reclass.data.synthetic import make_shapes_dataset

    data_dir = os.path.join(CACHE, "data-" + digest(SPLITS, SCENE, "d2_reclass/data/synthetic.py"))
    done = os.path.join(data_dir, "done")
    if force or not os.path.exists(done):
        shutil.rmtree(data_dir, ignore_errors=True)
        for split, (classes, n, seed, first) in SPLITS.items():
            make_shapes_dataset(data_dir, split, classes, n, seed=seed, first_class=first,
                                **SCENE)
        _merge(data_dir, ["target_base", "target_star", "target_octagon"], "target_train",
               TARGET_CLASSES)
        open(done, "w").close()
    for split in ("source_train", "source_val", "target_train", "target_val"):
        register_coco_dataset(f"nci_{split}", os.path.join(data_dir, f"{split}.json"),
                              data_dir if split == "target_train" else
                              os.path.join(data_dir, split))
    return data_dir


def _merge(data_dir: str, parts: Sequence[str], name: str, classes: Sequence[str]) -> None:
    """One COCO json of several splits (each with ids 1..K of its own class list)."""
    images, annotations = [], []
    for part in parts:
        with open(os.path.join(data_dir, f"{part}.json")) as f:
            data = json.load(f)
        names = {c["id"]: c["name"] for c in data["categories"]}
        ids = {}
        for img in data["images"]:
            ids[img["id"]] = len(images) + 1
            images.append(dict(img, id=ids[img["id"]],
                               file_name=os.path.join(part, img["file_name"])))
        for ann in data["annotations"]:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=ids[ann["image_id"]],
                                    category_id=list(classes).index(names[ann["category_id"]])
                                    + 1))
    out = {"info": {"description": f"{name}: {', '.join(parts)}"}, "licenses": [],
           "images": images, "annotations": annotations,
           "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    with open(os.path.join(data_dir, f"{name}.json"), "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------- model, training
def config(opts: Sequence):
    from detectron2.config import get_cfg

    from d2_reclass import add_reclass_config, merge_config_file, prepare_reclass_config

    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, "configs", "Base-Shapes-RCNN.yaml"))
    cfg.merge_from_list([str(v) if not isinstance(v, str) else v for v in [*MODEL_OPTS, *opts]])
    return prepare_reclass_config(cfg)[0]


def train(model, cfg, iterations: int, seed: int, evaluate=None, eval_at: Sequence[int] = ()):
    """Train ``model`` as DefaultTrainer would (its optimizer, LR schedule and train loader,
    seeded), evaluating after each iteration in ``eval_at``; returns {iteration: metrics}."""
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    seed_all_rng(seed)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    scheduler = DefaultTrainer.build_lr_scheduler(cfg, optimizer)
    loader = iter(build_detection_train_loader(cfg))
    curve = {}
    model.train()
    with EventStorage(0) as storage:
        for i in range(1, iterations + 1):
            storage.iter = i
            losses = sum(model(next(loader)).values())
            if not torch.isfinite(losses):  # as detectron2's trainer: never save a NaN model
                raise FloatingPointError(f"Loss became infinite or NaN at iteration {i}")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()
            if i in eval_at:
                curve[i] = evaluate(model)
                model.train()
    return curve


def evaluate(model, dataset: str, classes: Sequence[str]) -> Dict[str, float]:
    """COCO box AP (%) on ``dataset``, overall and per class, with the model in eval mode."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    results = []
    dicts = DatasetCatalog.get(dataset)  # loading sets the id map in the metadata
    meta = MetadataCatalog.get(dataset)
    to_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    with torch.no_grad():
        for d in dicts:
            image = read_image(d["file_name"], format="BGR")  # 96 px: the test resize is a no-op
            out = model([{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
                          "height": d["height"], "width": d["width"]}])[0]["instances"]
            for box, score, cls in zip(out.pred_boxes.tensor.tolist(), out.scores.tolist(),
                                       out.pred_classes.tolist()):
                results.append({"image_id": d["image_id"], "category_id": to_id[cls],
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(meta.json_file)
        if not results:
            return {"AP": 0.0, **{f"AP-{c}": 0.0 for c in classes}}
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {"AP": 100 * float(ev.stats[0])}
    precision = ev.eval["precision"]  # [IoU, recall, class, area, max dets], cat-id order
    for k, name in enumerate(gt.cats[i]["name"] for i in sorted(gt.cats)):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[f"AP-{name}"] = float(100 * np.mean(p)) if p.size else 0.0
    return out


def source_model(data_dir: str, force: bool) -> dict:
    """Train (once) the 8-class source model; its weights path, metrics and seconds."""
    from d2_reclass import ReclassCheckpointer, ReclassTrainer

    opts = [*SOURCE_SOLVER, "DATASETS.TRAIN", ("nci_source_train",),
            "DATASETS.TEST", ("nci_source_val",)]
    run_dir = os.path.join(CACHE, "source-" + digest(os.path.basename(data_dir), MODEL_OPTS, opts,
                                                      "configs/Base-Shapes-RCNN.yaml"))
    record_path = os.path.join(run_dir, "record.json")
    if not force and os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    cfg = config(opts)
    torch.manual_seed(cfg.SEED)
    model = ReclassTrainer.build_model(cfg)
    t0 = time.time()
    max_iter = cfg.SOLVER.MAX_ITER
    train(model, cfg, max_iter, cfg.SEED)
    seconds = time.time() - t0
    ReclassCheckpointer.from_config(cfg, model, run_dir).save("model_final")
    metrics = evaluate(model, "nci_source_val", SOURCE_CLASSES)
    record = {"weights": os.path.join(run_dir, "model_final.pth"), "seconds": seconds,
              "iterations": max_iter, "metrics": metrics}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def fine_tune(label: str, seed: int, source: dict, iterations: int,
              eval_at: Sequence[int]) -> dict:
    """One fine-tune from the source weights with init ``label``: its AP curve and init cost."""
    from d2_reclass import ReclassCheckpointer, ReclassTrainer

    mode, new_class_init = INITS[label]
    steps = (round(iterations * 0.75),)
    cfg = config([*TARGET_SOLVER, "SOLVER.MAX_ITER", iterations, "SOLVER.STEPS", steps,
                  "DATASETS.TRAIN", ("nci_target_train",), "DATASETS.TEST", ("nci_target_val",),
                  "MODEL.RECLASS.MODE", mode, "MODEL.RECLASS.NEW_CLASS_INIT", new_class_init,
                  "MODEL.RECLASS.SEED", seed, "SEED", seed])
    torch.manual_seed(seed)
    model = ReclassTrainer.build_model(cfg)
    checkpointer = ReclassCheckpointer.from_config(cfg, model)
    t0 = time.perf_counter()
    checkpointer.load(source["weights"])
    load_seconds = time.perf_counter() - t0
    report = checkpointer.report.new_classes

    def run_eval(m):
        return evaluate(m, "nci_target_val", TARGET_CLASSES)

    t0 = time.perf_counter()
    curve = {0: run_eval(model)}
    curve.update(train(model, cfg, iterations, seed, run_eval, eval_at))
    return {
        "curve": {str(k): v for k, v in curve.items()},
        "seconds": time.perf_counter() - t0,
        "load_seconds": load_seconds,
        "init": report.to_dict() if report is not None else None,
    }


# ----------------------------------------------------------------------------- summaries
def mean_ap(metrics: Dict[str, float], classes: Sequence[str]) -> float:
    return sum(metrics[f"AP-{c}"] for c in classes) / len(classes)


def iterations_to(curve: Dict[int, float], fraction: float = 0.95) -> int:
    """The first evaluated iteration whose value reaches ``fraction`` of the final one."""
    final = curve[max(curve)]
    return min(i for i, v in curve.items() if v >= fraction * final)


def summarise(runs: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Per init: per iteration, new/all AP of every seed; iterations to 95 % of the final AP
    on the curve averaged over seeds (one seed's curve, evaluated on 60 images, is too noisy
    to say when it arrives), and on each seed's curve (for the spread)."""
    out = {}
    for label, per_seed in runs.items():
        curves_new = [{int(i): mean_ap(m, NEW) for i, m in r["curve"].items()} for r in per_seed]
        curves_all = [{int(i): m["AP"] for i, m in r["curve"].items()} for r in per_seed]
        iters = sorted(curves_new[0])
        mean_new = {i: statistics.mean(c[i] for c in curves_new) for i in iters}
        mean_all = {i: statistics.mean(c[i] for c in curves_all) for i in iters}
        out[label] = {
            "iterations": iters,
            "new": [[c[i] for c in curves_new] for i in iters],
            "all": [[c[i] for c in curves_all] for i in iters],
            "to95_new": iterations_to(mean_new),
            "to95_all": iterations_to(mean_all),
            "to95_new_per_seed": [iterations_to(c) for c in curves_new],
            "to95_all_per_seed": [iterations_to(c) for c in curves_all],
        }
    return out


def _ms(values: Sequence[float]) -> str:
    m = statistics.mean(values)
    return f"{m:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def _seeds(values: Sequence[int]) -> str:
    return "per seed " + ", ".join(str(v) for v in values)


def tables(summary: Dict[str, dict], runs: Dict[str, List[dict]]) -> str:
    """Markdown: the headline table, then AP of the new classes against iterations."""
    from tabulate import tabulate

    rows = []
    for label, s in summary.items():
        costs = [r["init"] for r in runs[label] if r["init"] and r["init"]["images_read"]]
        cost = (f"{statistics.mean(c['seconds'] for c in costs):.2f} s "
                f"({statistics.mean(c['seconds_per_image'] for c in costs):.3f} s/img)"
                if costs else "0")
        start = statistics.mean(s["new"][0]) / max(statistics.mean(s["new"][-1]), 1e-9)
        rows.append([label, _ms(s["new"][0]), _ms(s["new"][-1]), f"{100 * start:.0f} %",
                     _ms(s["all"][0]), _ms(s["all"][-1]),
                     f"{s['to95_new']} ({_seeds(s['to95_new_per_seed'])})",
                     f"{s['to95_all']} ({_seeds(s['to95_all_per_seed'])})", cost])
    n = next(iter(summary.values()))["iterations"][-1]
    head = tabulate(rows, headers=["init", "AP new, it 0", f"AP new, it {n}", "it 0 / final",
                                   "AP all, it 0", f"AP all, it {n}", "its to 95% (new)",
                                   "its to 95% (all)", "init cost"], tablefmt="pipe",
                    disable_numparse=True)
    labels = list(summary)
    curve_rows = [[i] + [_ms(summary[label]["new"][j]) for label in labels]
                  for j, i in enumerate(summary[labels[0]]["iterations"])]
    curve = tabulate(curve_rows, headers=["iteration"] + [f"AP new, {label}" for label in labels],
                     tablefmt="pipe", disable_numparse=True)
    return head + "\n\n" + curve + "\n"


def plot(summary: Dict[str, dict], path: str) -> None:
    """AP against iteration, one line per init (mean over seeds, band: min to max), two panels:
    the new classes and all classes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here, and none wanted in a benchmark
    import matplotlib.pyplot as plt

    colours = {"reinit": "tab:gray", "head": "tab:red", "relative": "tab:blue",
               "imprint": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    for ax, (key, title) in zip(axes, (("new", "AP of the new classes (star, octagon)"),
                                       ("all", "AP of all 5 classes"))):
        for label, s in summary.items():
            iters = s["iterations"]
            ax.fill_between(iters, [min(v) for v in s[key]], [max(v) for v in s[key]],
                            color=colours[label], alpha=0.2, linewidth=0)
            ax.plot(iters, [statistics.mean(v) for v in s[key]], color=colours[label],
                    linewidth=2, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("fine-tuning iteration")
        ax.set_xticks(iters)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("box AP (%)")
    axes[0].legend(title="init (mean; band: min-max over seeds)", fontsize="small",
                   loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=150, help="fine-tuning iterations")
    parser.add_argument("--eval-at", type=int, nargs="+", default=[10, 25, 50, 100, 150])
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    parser.add_argument("--force", action="store_true", help="ignore the cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    from d2_reclass.logger import install_detectron2_forwarding

    install_detectron2_forwarding()
    logging.getLogger("d2_reclass").setLevel(logging.WARNING)

    data_dir = make_data(args.force)
    source = source_model(data_dir, args.force)
    m = source["metrics"]
    print(f"source model: {source['iterations']} iterations in {source['seconds']:.0f} s; val AP "
          f"{m['AP']:.1f}; " + ", ".join(f"{c} {m[f'AP-{c}']:.1f}" for c in SOURCE_CLASSES),
          flush=True)

    eval_at = sorted(i for i in args.eval_at if i <= args.iters)
    # What a fine-tune's result depends on; the benchmark's own reporting code is left out,
    # so that changing a table reuses the runs. Change RUNS_VERSION with fine_tune or train.
    key = digest(RUNS_VERSION, source["weights"], args.iters, eval_at, TARGET_SOLVER, INITS,
                 "d2_reclass/new_classes/", "d2_reclass/integration/checkpoint.py")
    runs: Dict[str, List[dict]] = {label: [] for label in args.inits}
    for seed in range(args.seeds):
        for label in args.inits:
            path = os.path.join(CACHE, f"run-{key}-{label}-{seed}.json")
            if os.path.exists(path) and not args.force:
                with open(path) as f:
                    run = json.load(f)
            else:
                run = fine_tune(label, seed, source, args.iters, eval_at)
                with open(path, "w") as f:
                    json.dump(run, f)
            runs[label].append(run)
            curve = {int(i): v for i, v in run["curve"].items()}
            print(f"seed {seed} {label:8s}: AP new " + " ".join(
                f"{i}:{mean_ap(curve[i], NEW):.1f}" for i in sorted(curve))
                + f"  ({run['seconds']:.0f} s)", flush=True)
    summary = summarise(runs)
    text = tables(summary, runs)
    print("\n" + text)
    with open(os.path.join(CACHE, "new_class_init.md"), "w") as f:
        f.write(text)
    with open(os.path.join(CACHE, "new_class_init.json"), "w") as f:
        json.dump({"source": source, "summary": summary, "runs": runs}, f)
    png = os.path.join(CACHE, "new_class_init.png")
    plot(summary, png)
    shutil.copy(png, os.path.join(ROOT, "docs", "new_class_init.png"))
    print(f"plot: {os.path.relpath(png, ROOT)} (copied to docs/)")
    print(f"benchmark finished in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
