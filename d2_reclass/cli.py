"""The ``d2-reclass`` command line: ``inspect`` and ``convert`` checkpoints offline.

Exit codes: 0 success, 1 a user error (one line on stderr, no traceback), 2 usage.
"""
import argparse
import json
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tabulate import tabulate

from .checkpoint import CLASSES_KEY, stored_classes
from .errors import ClassListError, ReclassError
from .layouts import THING, find_layouts, retarget
from .new_classes import NEW_CLASS_INITS, NewClassExamples, NewClassReport, init_new_classes
from .recognize import guess_architecture, recognize_layouts
from .serialization import checkpoint_format, load_checkpoint_file, same_file, save_checkpoint_file
from .surgery import MODES, ClassSpec, reclass_state_dict

__all__ = ["main", "inspect_checkpoint", "convert_checkpoint"]

logger = logging.getLogger(__name__)


def _local(path: str) -> str:
    from detectron2.utils.file_io import PathManager

    return PathManager.get_local_path(path)


def _weights(obj: Any, path: str) -> Dict[str, Any]:
    fmt = checkpoint_format(obj, path)
    if fmt == "caffe2 pkl":
        from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

        blobs = obj.get("blobs", obj)
        blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return convert_c2_detectron_names(blobs)[0]
    if fmt == "pycls pyth":
        return dict(obj["model_state"])
    return dict(obj["model"]) if fmt in ("d2 pth", "model-zoo pkl") else dict(obj)


def _shape(v: Any) -> List[int]:
    return list(getattr(v, "shape", ()))


def inspect_checkpoint(path: str, *, trust_pickle: bool = False) -> Dict[str, Any]:
    """What a checkpoint holds: format, architecture guess, class-dependent tensors, classes."""
    local = _local(path)
    obj = load_checkpoint_file(local, trust_pickle=trust_pickle, progress=True)
    fmt = checkpoint_format(obj, local)
    weights = _weights(obj, local)
    shapes = {k: _shape(v) for k, v in weights.items()}
    layouts, notes = recognize_layouts(shapes)
    counts = sorted({(lay.space, lay.num_classes) for lay in layouts if lay.num_classes})
    extras = obj if isinstance(obj, dict) else {}
    return {
        "path": path,
        "format": fmt,
        "architecture": guess_architecture(list(shapes)),
        "tensors": len(weights),
        "bytes": int(sum(getattr(v, "nbytes", 0) or
                         (v.numel() * v.element_size() if torch.is_tensor(v) else 0)
                         for v in weights.values())),
        "class_dependent": [
            {"key": lay.key, "shape": shapes[lay.key], "space": lay.space,
             "classes": lay.num_classes, "layout": lay.describe()}
            for lay in layouts
        ],
        "num_classes": {space: k for space, k in counts},
        "stored_classes": stored_classes(extras),
        "iteration": extras.get("iteration"),
        "optimizer_state": "optimizer" in extras or "trainer" in extras,
        "scheduler_state": "scheduler" in extras or "trainer" in extras,
        "notes": notes,
    }


def _print_inspect(info: Dict[str, Any]) -> None:
    print(f"{info['path']}: {info['format']}, looks like {info['architecture']}")
    print(f"{info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB of weights; "
          f"iteration {info['iteration']}; optimizer state: {info['optimizer_state']}; "
          f"scheduler state: {info['scheduler_state']}")
    for space, k in info["num_classes"].items():
        print(f"{space} classes: {k}")
    for kind, names in info["stored_classes"].items():
        print(f"stored {kind}: {', '.join(names)}")
    if not info["stored_classes"]:
        print("stored class names: none")
    rows = [(t["key"], tuple(t["shape"]), t["space"], t["classes"], t["layout"])
            for t in info["class_dependent"]]
    print(tabulate(rows, headers=["tensor", "shape", "space", "classes", "layout"],
                   tablefmt="pipe"))
    for note in info["notes"]:
        print(f"note: {note}")


def _model_from_config(config_file: str, classes: Sequence[str]):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from .config import add_reclass_config, apply_num_classes, merge_config_file

    cfg = get_cfg()
    try:
        from detectron2.projects.point_rend import add_pointrend_config

        add_pointrend_config(cfg)
    except ImportError:
        pass
    add_reclass_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.MODEL.DEVICE = "cpu"
    apply_num_classes(cfg, classes)
    return build_model(cfg), cfg


def convert_checkpoint(
    path: str,
    out: str,
    classes: Sequence[str],
    *,
    source_classes: Optional[Sequence[str]] = None,
    source_dataset: str = "",
    mode: str = "auto",
    class_map: Sequence[str] = (),
    config_file: str = "",
    seed: int = 0,
    force: bool = False,
    trust_pickle: bool = False,
    new_class_init: str = "auto",
    init_images: int = 16,
    coco_datasets: Sequence[Sequence[str]] = (),
):
    """Write ``out``: ``path``'s weights with every class-dependent tensor fitted to ``classes``,
    the class names stored, optimizer/scheduler state and iteration dropped. Returns the report.

    ``new_class_init`` relative / imprint initialise new classes from the labelled examples of
    ``coco_datasets`` ((name, json, image root) each), running the model of ``config_file``;
    ``auto`` imprints when both are given, else keeps the head's init.

    Nothing is written unless every check passed; ``out`` is written atomically and never
    over ``path`` (nor over an existing file unless ``force``).
    """
    from .config import dataset_classes

    new_class_init = _check_new_class_init(new_class_init, init_images, config_file,
                                           coco_datasets)

    local = _local(path)
    if same_file(local, out):
        raise ReclassError(f"--out {out} is the input checkpoint; write to another file.")
    if not out.endswith((".pth", ".pt")):
        raise ReclassError(f"--out {out}: write a .pth file (torch format, loads with "
                           "weights_only=True).")
    obj = load_checkpoint_file(local, trust_pickle=trust_pickle, progress=True)
    weights = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
               for k, v in _weights(obj, local).items()}
    stored = stored_classes(obj if isinstance(obj, dict) else {})
    # Checked even when unused, so that a mistyped name never passes silently.
    from_dataset = dataset_classes(source_dataset, what="--source-dataset") \
        if source_dataset else None
    if source_classes:
        source, what = list(source_classes), "--source-classes"
    elif stored.get("thing_classes"):
        source, what = stored["thing_classes"], "the classes stored in the checkpoint"
    elif from_dataset:
        source, what = from_dataset, "--source-dataset"
    else:
        source, what = None, "the source classes"
    if config_file:
        model, cfg = _model_from_config(config_file, classes)
        layouts, target = find_layouts(model), model.state_dict()
    else:
        found, notes = recognize_layouts({k: _shape(v) for k, v in weights.items()})
        layouts = [lay for lay in found if lay.space == THING]
        if not layouts:
            raise ReclassError(
                f"{path}: no standard detectron2 class-dependent head found "
                f"({'; '.join(notes) or 'no box predictor, mask, RetinaNet or sem-seg keys'}); "
                "pass --config-file to build the model and read its heads.")
        layouts, target = retarget(layouts, {k: _shape(v) for k, v in weights.items()},
                                   len(classes))
    new, report = reclass_state_dict(
        weights, target, layouts,
        classes={THING: ClassSpec(source, list(classes), list(class_map), what, "--classes")},
        mode=mode, seed=seed, source=path)
    thing = report.spaces.get(THING)
    if new_class_init != "head" and thing is not None and thing.resolution == "map" \
            and thing.mapping.new:
        report.new_classes = _init_new_classes(
            model, cfg, weights, new, report.spaces[THING].mapping, method=new_class_init,
            max_images=init_images, seed=seed, coco_datasets=coco_datasets)
    save_checkpoint_file({"model": new, CLASSES_KEY: {"thing_classes": list(classes)}}, out,
                         overwrite=force, progress=True, source=local)
    return report


def _check_new_class_init(method: str, images: int, config_file: str,
                          coco_datasets: Sequence[Sequence[str]]) -> str:
    """The method to run (``auto``: imprint with --config-file and --coco-dataset, else head);
    raises before anything is read when an explicit --new-class-init cannot run."""
    from .options import check_option_values

    check_option_values({"new_class_init": method, "init_images": images},
                        name=lambda option: "--" + option.replace("_", "-"))
    if method == "auto":
        return "imprint" if config_file and coco_datasets else "head"
    if method == "head":
        return method
    if not config_file:
        raise ReclassError(f"--new-class-init {method} runs the model on labelled examples: "
                           "pass --config-file (the config the checkpoint was built with).")
    if not coco_datasets:
        raise ReclassError(f"--new-class-init {method} reads labelled examples of the new "
                           "classes: pass --coco-dataset NAME JSON IMAGE_ROOT.")
    return method


def _init_new_classes(model, cfg, weights: Dict[str, Any], converted: Dict[str, Any], mapping,
                      *, method: str, max_images: int, seed: int,
                      coco_datasets: Sequence[Sequence[str]]) -> NewClassReport:
    """Initialise the new classes of ``converted`` (updated in place) from the datasets'
    examples, the model of ``cfg`` holding the converted weights."""
    import time

    from detectron2.data.detection_utils import build_augmentation

    from .datasets import register_coco_dataset

    own = model.state_dict()
    misfit = [k for k, v in own.items() if k not in converted or converted[k].shape != v.shape]
    if misfit:
        raise ReclassError(
            f"--new-class-init {method} runs the model of --config-file with the checkpoint's "
            f"weights, but {len(misfit)} of its tensors are not in the checkpoint with the "
            f"model's shape (first: {misfit[0]}). Pass the config the checkpoint was trained "
            "with, or use --new-class-init head.")
    model.load_state_dict({k: converted[k] for k in own})
    for name, json_file, image_root in coco_datasets:
        register_coco_dataset(name, json_file, image_root)
    t0 = time.perf_counter()
    dicts, names = NewClassExamples(
        datasets=tuple(d[0] for d in coco_datasets),
        augmentations=tuple(build_augmentation(cfg, is_train=False)),
        image_format=cfg.INPUT.FORMAT).load()
    loaded = time.perf_counter() - t0
    entries, report = init_new_classes(model, dicts, mapping, weights, method=method,
                                       max_images=max_images, seed=seed, dataset_classes=names)
    converted.update(entries)
    report.seconds_dataset, report.seconds = loaded, report.seconds + loaded
    return report


def _read_classes(args) -> List[str]:
    if args.classes_file:
        try:
            with open(args.classes_file) as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ClassListError(f"--classes-file {args.classes_file}: {e.strerror}.") from None
        return names
    return [c.strip() for c in args.classes.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2-reclass", description="Inspect and convert detectron2 checkpoints between "
        "class sets (offline; no trainer needed).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a checkpoint's class-dependent tensors")
    p.add_argument("checkpoint", help="a .pth / .pkl file, URL or detectron2:// path")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--trust-pickle", action="store_true",
                   help="fully unpickle a legacy file you trust")

    p = sub.add_parser("convert", help="fit a checkpoint's heads to other classes")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output .pth (not the input)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--classes", help="target classes, comma-separated, in order")
    group.add_argument("--classes-file", help="target classes, one per line")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source-classes", help="the checkpoint's classes, comma-separated")
    src.add_argument("--source-dataset", default="",
                     help="a registered dataset whose classes the checkpoint has")
    p.add_argument("--mode", default="auto", choices=[m for m in MODES if m != "strict"])
    p.add_argument("--class-map", nargs="+", default=[], metavar="TARGET=SOURCE")
    p.add_argument("--config-file", default="", help="build the model to read its heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-class-init", default="auto", choices=NEW_CLASS_INITS,
                   help="how classes new to the checkpoint start: relative / imprint run the "
                   "model of --config-file on --coco-dataset examples; auto (default): imprint "
                   "when both are given, else head")
    p.add_argument("--init-images", type=int, default=16,
                   help="labelled images read per new class for --new-class-init")
    p.add_argument("--coco-dataset", nargs=3, action="append", default=[],
                   metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="labelled examples for --new-class-init (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--trust-pickle", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            info = inspect_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_inspect(info)
            return 0
        source = [c.strip() for c in args.source_classes.split(",")] if args.source_classes \
            else None
        report = convert_checkpoint(
            args.checkpoint, args.out, _read_classes(args), source_classes=source,
            source_dataset=args.source_dataset, mode=args.mode, class_map=args.class_map,
            config_file=args.config_file, seed=args.seed, force=args.force,
            trust_pickle=args.trust_pickle, new_class_init=args.new_class_init,
            init_images=args.init_images, coco_datasets=args.coco_dataset)
        print(report)
        print(f"Wrote {args.out}")
        return 0
    except ReclassError as e:
        print(f"d2-reclass: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
