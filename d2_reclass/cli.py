"""The ``d2-reclass`` command line: ``inspect``, ``convert`` and ``combine`` checkpoints offline.

Exit codes: 0 success, 1 a user error (one line on stderr, no traceback), 2 usage.

torch and detectron2 are imported inside the functions that use them: importing them takes
seconds, and ``--help`` / ``--version`` need neither.
"""
import argparse
import contextlib
import json
import logging
import numbers
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence
from urllib.error import HTTPError, URLError

from . import __version__
from .errors import CheckpointError, ClassListError, ReclassError

if TYPE_CHECKING:
    from .new_classes import NewClassReport

__all__ = ["main", "inspect_checkpoint", "convert_checkpoint", "combine_checkpoints"]

logger = logging.getLogger(__name__)


def _local(path: str) -> str:
    """``path`` as a local file name: URLs and ``detectron2://`` paths are downloaded (cached).

    Raises:
        CheckpointError: the download failed; the message names ``path`` and what to do.
    """
    from detectron2.utils.file_io import PathManager

    # iopath logs a failed download itself; the error raised below says it once, with the fix.
    download_log = logging.getLogger("iopath.common.download")
    download_log.addFilter(_drop_record)
    try:
        return PathManager.get_local_path(path)
    except OSError as e:  # urllib's URLError and HTTPError, timeouts, an unwritable cache
        if isinstance(e, HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        elif isinstance(e, URLError):
            reason = str(e.reason)
        else:
            reason = e.strerror or str(e)
        raise CheckpointError(
            f"Cannot download {path}: {reason}. Check the URL and the network, or download the "
            "file yourself and pass its local path."
        ) from None
    finally:
        download_log.removeFilter(_drop_record)


def _drop_record(record: logging.LogRecord) -> bool:
    return False


def _weights(obj: Any, path: str) -> Dict[str, Any]:
    """The state dict ``obj`` holds, every entry checked by :func:`check_state_dict` before
    anything reads it (CheckpointError naming ``path`` and the key otherwise)."""
    from .engine.keys import copy_state_dict
    from .io.serialization import check_state_dict, checkpoint_format

    fmt = checkpoint_format(obj, path)
    if fmt == "caffe2 pkl":
        from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

        blobs = obj.get("blobs", obj)
        # Dropped before the check, as detectron2 drops them before its own.
        blobs = {k: v for k, v in blobs.items()
                 if not (isinstance(k, str) and k.endswith("_momentum"))}
        check_state_dict(blobs, path)
        return convert_c2_detectron_names(blobs)[0]
    if fmt == "pycls pyth":
        weights = copy_state_dict(obj["model_state"])
    else:
        # With the module versions: the output file must load as the input does.
        weights = copy_state_dict(obj["model"] if fmt in ("d2 pth", "model-zoo pkl") else obj)
    check_state_dict(weights, path)
    return weights


def _shape(v: Any) -> List[int]:
    return list(getattr(v, "shape", ()))


def inspect_checkpoint(path: str, *, trust_pickle: bool = False) -> Dict[str, Any]:
    """What a checkpoint holds: format, architecture guess, class-dependent tensors, classes."""
    import torch

    from .data.class_lists import stored_classes
    from .engine.recognize import guess_architecture, recognize_layouts
    from .io.serialization import checkpoint_format, load_checkpoint_file

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
        "stored_classes": stored_classes(extras, source=path),
        "iteration": extras.get("iteration"),
        "optimizer_state": "optimizer" in extras or "trainer" in extras,
        "scheduler_state": "scheduler" in extras or "trainer" in extras,
        "notes": notes,
    }


def _print_inspect(info: Dict[str, Any]) -> None:
    from tabulate import tabulate

    print(f"{info['path']}: {info['format']}, looks like {info['architecture']}")
    print(f"{info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB of weights; "
          f"{_iterations(info['iteration'])}; optimizer state: {info['optimizer_state']}; "
          f"scheduler state: {info['scheduler_state']}")
    for space, k in info["num_classes"].items():
        print(f"{space} classes: {k}")
    for kind, names in info["stored_classes"].items():
        print(f"stored {kind}: {', '.join(names)}")
    if not info["stored_classes"]:
        print("stored class names: none. Name its classes (in its order) with --source-classes "
              "or --source-dataset when converting, --names when combining, or "
              "MODEL.RECLASS.SOURCE_CLASSES when training; or store them once: d2-reclass "
              f"convert {info['path']} --out NAMED.pth --classes A,B,... --source-classes "
              "A,B,...")
    rows = [(t["key"], tuple(t["shape"]), t["space"], t["classes"], t["layout"])
            for t in info["class_dependent"]]
    print(tabulate(rows, headers=["tensor", "shape", "space", "classes", "layout"],
                   tablefmt="pipe"))
    for note in info["notes"]:
        print(f"note: {note}")


def _iterations(iteration: Any) -> str:
    """The training progress a checkpoint stores, in words: detectron2 stores the index of the
    last iteration run (399 after 400), from which ``--resume`` goes on."""
    if not isinstance(iteration, numbers.Integral):
        return "no iteration stored"
    return f"{int(iteration) + 1} iterations trained (stored iteration {iteration})"


def _model_from_config(config_file: str, classes: Sequence[str]):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from .integration.config import add_reclass_config, apply_num_classes, merge_config_file

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


def _check_arguments(path: str, out: str, config_file: str, force: bool) -> None:
    """The checks that need no download and no loading, so that they fail before either."""
    from .io.serialization import check_output_path

    if not out.endswith((".pth", ".pt")):
        raise ReclassError(f"--out {out}: write a .pth file (torch format, loads with "
                           "weights_only=True).")
    # A URL is not a local file yet, so only a local input can be --out here; the downloaded
    # file is checked again when the output is saved.
    check_output_path(out, overwrite=force, source=path)
    if config_file and not os.path.isfile(config_file):
        raise ReclassError(f"--config-file {config_file} does not exist; check the path.")


def _dataset_classes(name: str) -> List[str]:
    """The thing classes of the registered dataset ``name`` (``--source-dataset``).

    Raises:
        ClassListError: ``name`` is not registered, or its metadata has no thing classes.
    """
    from .data.class_lists import dataset_classes

    names = dataset_classes(name, what="--source-dataset")
    if not names:
        raise ClassListError(
            f"--source-dataset {name} has no thing_classes in its metadata; pass the "
            "checkpoint's classes with --source-classes instead.")
    return names


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

    The source class names are ``source_classes``, else the names stored in the checkpoint,
    else those of ``source_dataset``; a warning is logged when a list given loses to a
    different one, or overrides different stored names. The report names the list used.

    ``new_class_init`` relative / imprint initialise new classes from the labelled examples of
    ``coco_datasets`` ((name, json, image root) each), running the model of ``config_file``;
    ``auto`` imprints when both are given, else keeps the head's init.

    Nothing is written unless every check passed; the checks on the arguments (``out``, the
    class lists, the dataset, the config file, the new-class init) run before anything is
    downloaded or loaded. ``out`` is written atomically and never over ``path`` (nor over an
    existing file unless ``force``).
    """
    from .classes import check_class_list, pick_source_classes
    from .data.class_lists import CLASSES_KEY
    from .engine.surgery import ClassSpec, reclass_state_dict
    from .io.serialization import save_checkpoint_file
    from .layouts import THING

    _check_arguments(path, out, config_file, force)
    classes = list(check_class_list(classes, "--classes"))
    if source_classes:
        check_class_list(source_classes, "--source-classes")
    # Checked even when stored names will win, so that a mistyped name never passes silently.
    from_dataset = _dataset_classes(source_dataset) if source_dataset else None

    new_class_init = _check_new_class_init(new_class_init, init_images, config_file,
                                           coco_datasets)

    local, weights, stored = _read_checkpoint(path, trust_pickle)
    source, what = pick_source_classes([
        (source_classes, "--source-classes"), (stored, f"the class list stored in {path}"),
        (from_dataset, f"--source-dataset {source_dataset}")])
    if mode == "map" and source is None and not class_map:
        raise ClassListError(
            f"--mode map needs the class names of {path}, which stores none: pass "
            "--source-classes or --source-dataset, map classes by index with --class-map "
            "TARGET=INDEX, or use --mode reinit.")
    layouts, target, model, cfg = _target_heads(path, weights, classes, config_file)
    new, report = reclass_state_dict(
        weights, target, layouts,
        classes={THING: ClassSpec(source, classes, list(class_map), what, "--classes")},
        mode=mode, seed=seed, source=path)
    thing = report.spaces.get(THING)
    if source is None and thing is not None and thing.resolution == "reinit" and mode == "auto":
        logger.warning(
            f"{path} stores no class names and none were given, so every class row of its "
            f"heads is re-initialised ({thing.num_source} -> {thing.num_target} classes, "
            "nothing kept). To keep rows by name, pass --source-classes A,B,... (the "
            "checkpoint's classes, in its order) or --source-dataset NAME; pass --mode reinit "
            "if a fresh head is what you want.")
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
                      coco_datasets: Sequence[Sequence[str]]) -> "NewClassReport":
    """Initialise the new classes of ``converted`` (updated in place) from the datasets'
    examples, the model of ``cfg`` holding the converted weights."""
    import time

    from detectron2.data.detection_utils import build_augmentation

    from .data.datasets import register_coco_dataset
    from .engine.keys import copy_state_dict
    from .new_classes import NewClassExamples, init_new_classes

    own = model.state_dict()
    misfit = [k for k, v in own.items() if k not in converted or converted[k].shape != v.shape]
    if misfit:
        raise ReclassError(
            f"--new-class-init {method} runs the model of --config-file with the checkpoint's "
            f"weights, but {len(misfit)} of its tensors are not in the checkpoint with the "
            f"model's shape (first: {misfit[0]}). Pass the config the checkpoint was trained "
            "with, or use --new-class-init head.")
    model.load_state_dict(copy_state_dict(converted, [(k, converted[k]) for k in own]))
    for name, json_file, image_root in coco_datasets:
        register_coco_dataset(name, json_file, image_root)
    t0 = time.perf_counter()
    examples = NewClassExamples(
        datasets=tuple(d[0] for d in coco_datasets),
        augmentations=tuple(build_augmentation(cfg, is_train=False)),
        image_format=cfg.INPUT.FORMAT)
    dicts, names = examples.load()
    loaded = time.perf_counter() - t0
    entries, report = init_new_classes(model, dicts, mapping, weights, method=method,
                                       max_images=max_images, seed=seed, dataset_classes=names,
                                       image_roots=examples.roots())
    converted.update(entries)
    report.seconds_dataset, report.seconds = loaded, report.seconds + loaded
    return report


def _read_checkpoint(path: str, trust_pickle: bool):
    """(local file, weights as tensors, the thing class names it stores or None) of ``path``."""
    import numpy as np
    import torch

    from .data.class_lists import stored_classes
    from .engine.keys import copy_state_dict
    from .io.serialization import load_checkpoint_file

    local = _local(path)
    obj = load_checkpoint_file(local, trust_pickle=trust_pickle, progress=True)
    weights = _weights(obj, local)
    if isinstance(obj, dict) and "ema_state" in obj:
        # The EMA copy is often the model a project evaluates; leaving it out silently would
        # hand the user the other weights.
        logger.warning(
            f"{path} also holds EMA weights ('ema_state'): its 'model' weights are the ones "
            "read, and no EMA state is written. To reclass the EMA weights instead, save them "
            "as the model of a checkpoint of their own (torch.save({'model': "
            "ckpt['ema_state']}, PATH)) and pass that.")
    weights = copy_state_dict(weights, [(k, torch.as_tensor(v) if isinstance(v, np.ndarray)
                                         else v) for k, v in weights.items()])
    return local, weights, stored_classes(obj if isinstance(obj, dict) else {}, source=path).get(
        "thing_classes")


def _target_heads(path: str, weights: Dict[str, Any], classes: Sequence[str], config_file: str):
    """(layouts, target state dict, model, cfg) of the heads built for ``classes``: from the
    model of ``config_file``, else from the standard heads recognised in ``path``'s ``weights``
    (model and cfg None)."""
    from .engine.recognize import recognize_layouts
    from .layouts import THING, find_layouts, retarget

    if config_file:
        model, cfg = _model_from_config(config_file, classes)
        return find_layouts(model), model.state_dict(), model, cfg
    found, notes = recognize_layouts({k: _shape(v) for k, v in weights.items()})
    layouts = [lay for lay in found if lay.space == THING]
    if not layouts:
        raise ReclassError(
            f"{path}: no standard detectron2 class-dependent head found "
            f"({'; '.join(notes) or 'no box predictor, mask, RetinaNet or sem-seg keys'}); "
            "pass --config-file to build the model and read its heads.")
    return (*retarget(layouts, {k: _shape(v) for k, v in weights.items()}, len(classes)), None,
            None)


def _parse_names(entries: Sequence[str], paths: Sequence[str]) -> Dict[str, List[str]]:
    """``--names CHECKPOINT=a,b,c`` entries as {checkpoint: class names}.

    Raises:
        ClassListError: an entry is malformed or names a checkpoint not combined.
    """
    from .classes import check_class_list

    out = {}
    for entry in entries:
        path, sep, names = entry.rpartition("=")
        if not sep or path not in paths:
            raise ClassListError(
                f"--names {entry!r}: write CHECKPOINT=class,class,... with CHECKPOINT one of "
                f"the checkpoints combined ({', '.join(paths)}).")
        out[path] = list(check_class_list([c.strip() for c in names.split(",")],
                                          f"--names {path}"))
    return out


def combine_checkpoints(
    paths: Sequence[str],
    out: str,
    classes: Optional[Sequence[str]] = None,
    *,
    names: Sequence[str] = (),
    class_map: Sequence[str] = (),
    config_file: str = "",
    seed: int = 0,
    force: bool = False,
    trust_pickle: bool = False,
    allow_different_weights: bool = False,
):
    """Write ``out``: one checkpoint whose target classes each take their entries from the
    first of ``paths`` that knows them, every other tensor from the first. Returns the report.

    Args:
        paths: the checkpoints, in order of precedence (e.g. base model, then novel model).
        classes: the target classes; default: every class of ``paths``, in order of appearance.
        names: ``"CHECKPOINT=a,b,c"`` class names of checkpoints that store none (or to
            override stored ones).
        class_map: ``"target=source"`` overrides, merges (``"vehicle=car+truck"``) and splits.
        allow_different_weights: the checkpoints' non-class tensors may differ.
        config_file, seed, force, trust_pickle: as :func:`convert_checkpoint`.

    Nothing is written unless every check passed; the arguments are checked before anything is
    downloaded or loaded.

    Raises:
        ClassListError: a checkpoint with no class names, or a malformed list or map.
        CombineError: non-class tensors differ (and that was not allowed), or a checkpoint
            gives no class.
    """
    from .classes import check_class_list, union_classes
    from .data.class_lists import CLASSES_KEY
    from .engine.combine import combine_state_dicts
    from .engine.surgery import ClassSpec, SourceCheckpoint
    from .io.serialization import save_checkpoint_file
    from .layouts import THING

    if len(paths) < 2:
        raise ReclassError("combine needs at least two checkpoints (e.g. base.pth novel.pth).")
    for path in paths:
        _check_arguments(path, out, config_file, force)
    given = _parse_names(names, paths)
    if classes is not None:
        classes = list(check_class_list(classes, "--classes"))
    checkpoints = []
    for path in paths:
        local, weights, stored = _read_checkpoint(path, trust_pickle)
        what = f"--names {path}" if path in given else f"the class list stored in {path}"
        source = given.get(path, stored)
        if source is None:
            raise ClassListError(
                f"{path} stores no class names, and combining goes by names: pass "
                f"--names {path}=CLASS,CLASS,... (its classes, in its order).")
        checkpoints.append((path, local, weights, source, what))
    classes = classes or union_classes([c[3] for c in checkpoints])
    first_path, first_local, first_weights, first_names, first_what = checkpoints[0]
    layouts, target, _, _ = _target_heads(first_path, first_weights, classes, config_file)
    more = [SourceCheckpoint(weights, {THING: names}, path)
            for path, _, weights, names, _ in checkpoints[1:]]
    new, report = combine_state_dicts(
        first_weights, more, target, layouts,
        classes={THING: ClassSpec(first_names, classes, list(class_map), first_what,
                                  "--classes")},
        mode="map", seed=seed, source=first_path,
        allow_different_weights=allow_different_weights,
        allow_option="--allow-different-weights")
    save_checkpoint_file({"model": new, CLASSES_KEY: {"thing_classes": classes}}, out,
                         overwrite=force, progress=True, source=first_local)
    return report


def _read_classes(args) -> Optional[List[str]]:
    """The target classes of ``--classes`` / ``--classes-file``; None when neither is given."""
    if args.classes_file:
        try:
            with open(args.classes_file) as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ClassListError(f"--classes-file {args.classes_file}: {e.strerror}.") from None
        return names
    return [c.strip() for c in args.classes.split(",")] if args.classes else None


#: The ``--mode`` values: MODEL.RECLASS.MODE's without ``strict``, which only checks (an offline
#: conversion that refuses every change has nothing to write). Literal, so that ``--help`` does
#: not import torch; tests/test_cli.py checks them against :data:`d2_reclass.options.MODES`.
_MODES = ("auto", "map", "reinit")
#: :data:`d2_reclass.options.NEW_CLASS_INITS`, literal for the same reason (and checked the same).
_NEW_CLASS_INITS = ("auto", "head", "relative", "imprint")

_HELP = {
    "checkpoint": "a .pth / .pkl file, URL or detectron2:// path",
    "classes-file": "target classes, one per line (instead of --classes)",
    "class-map": "overrides of the by-name mapping, one TARGET=SOURCE per argument: "
    "'automobile=car' (a target from a source class of another name), "
    "'vehicle=car+truck+bus' (merge: one target from several source classes), "
    "'gadget=' (a class new on purpose, not a misspelt source class); two targets of one source "
    "split it ('alive tree=tree' 'dead tree=tree')",
    "config-file": "a detectron2 config (YAML) of the model: its modules give the class-"
    "dependent heads; default: detectron2's standard heads recognised from key names and shapes",
    "force": "overwrite an existing --out",
    "trust-pickle": "fully unpickle a .pkl or legacy file (this can run code the file names: "
    "only for files you trust); by default only containers, scalars and numpy arrays are read",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2-reclass", description="Inspect and convert detectron2 checkpoints between "
        "class sets (offline; no trainer needed).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect", help="describe a checkpoint's class-dependent tensors",
        description="Describe a checkpoint: its format, the architecture its keys suggest, "
        "every class-dependent tensor with its class count, the class names it stores (as "
        "d2_reclass and d2-reclass convert write them), its iteration and whether it holds "
        "optimizer or scheduler state.")
    p.add_argument("checkpoint", help=_HELP["checkpoint"])
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--trust-pickle", action="store_true", help=_HELP["trust-pickle"])

    p = sub.add_parser(
        "convert", help="fit a checkpoint's heads to other classes",
        description="Fit a checkpoint's class-dependent heads to other classes. The checkpoint's "
        "own class names are taken from --source-classes, else the names it stores (written by "
        "d2_reclass), else --source-dataset; a warning says when a list given is not used or "
        "overrides different stored names, and the report names the list used.")
    p.add_argument("checkpoint", help=_HELP["checkpoint"])
    p.add_argument("--out", required=True, help="output .pth (not the input)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--classes", help="target classes, comma-separated, in order")
    group.add_argument("--classes-file", help=_HELP["classes-file"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source-classes",
                     help="the checkpoint's classes, comma-separated, in its order; used even "
                     "when the checkpoint stores other names")
    src.add_argument("--source-dataset", default="",
                     help="a registered dataset (e.g. coco_2017_train) whose thing classes the "
                     "checkpoint has; used only when the checkpoint stores no names")
    p.add_argument("--mode", default="auto", choices=_MODES,
                   help="map: copy rows class by class by name (needs the checkpoint's class "
                   "names); reinit: fresh rows from each head's own init for every class; auto "
                   "(default): map when the checkpoint's class names are known, else reinit "
                   "the heads whose class count changed")
    p.add_argument("--class-map", nargs="+", default=[], metavar="TARGET=SOURCE",
                   help=_HELP["class-map"])
    p.add_argument("--config-file", default="", help=_HELP["config-file"])
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the fresh rows (together with each tensor's name) and the choice "
                   "of --init-images; default 0")
    p.add_argument("--new-class-init", default="auto", choices=_NEW_CLASS_INITS,
                   help="how classes new to the checkpoint start: relative / imprint run the "
                   "model of --config-file on --coco-dataset examples; auto (default): imprint "
                   "when both are given, else head")
    p.add_argument("--init-images", type=int, default=16,
                   help="labelled images read per new class for --new-class-init (default 16)")
    p.add_argument("--coco-dataset", nargs=3, action="append", default=[],
                   metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="labelled examples for --new-class-init (repeatable)")
    p.add_argument("--force", action="store_true", help=_HELP["force"])
    p.add_argument("--trust-pickle", action="store_true", help=_HELP["trust-pickle"])

    p = sub.add_parser(
        "combine", help="one checkpoint from several: each class from the first that knows it",
        description="Combine checkpoints (e.g. a base model and its copy fine-tuned on novel "
        "classes, as TFA does): each target class takes its rows from the first checkpoint "
        "that knows it (by the names it stores, or --names), every other tensor comes from the "
        "first. Non-class tensors that differ are an error unless --allow-different-weights.")
    p.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                   help="two or more .pth / .pkl files, URLs or detectron2:// paths, first first")
    p.add_argument("--out", required=True, help="output .pth (not an input)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--classes", help="target classes, comma-separated, in order (default: "
                       "every class of the checkpoints, in order of appearance)")
    group.add_argument("--classes-file", help=_HELP["classes-file"])
    p.add_argument("--names", nargs="+", default=[], metavar="CHECKPOINT=A,B,...",
                   help="the classes of a checkpoint that stores none, in its order")
    p.add_argument("--class-map", nargs="+", default=[], metavar="TARGET=SOURCE",
                   help=_HELP["class-map"])
    p.add_argument("--allow-different-weights", action="store_true",
                   help="the checkpoints' non-class tensors may differ (the first's are used)")
    p.add_argument("--config-file", default="", help=_HELP["config-file"])
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the fresh rows of classes no checkpoint knows (together with "
                   "each tensor's name); default 0")
    p.add_argument("--force", action="store_true", help=_HELP["force"])
    p.add_argument("--trust-pickle", action="store_true", help=_HELP["trust-pickle"])
    return parser


class _CommandLineFormatter(logging.Formatter):
    """``d2-reclass: warning: ...``: the shape of the command's error lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"d2-reclass: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """Show d2_reclass's warnings on stderr, as ``d2-reclass: warning: ...``, while inside.

    Nothing else configures logging in a command-line run, and a warning (a class list that
    was not used, a class name close to a dropped one) must reach the user.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_CommandLineFormatter())
    package_logger = logging.getLogger("d2_reclass")
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``d2-reclass``; returns the exit code (0 success, 1 an error on one stderr line)."""
    args = build_parser().parse_args(argv)
    with _warnings_on_stderr(), warnings.catch_warnings():
        # Warnings about the libraries' own imports, which say nothing about the command:
        # fvcore decorates functions with torch.jit.script when detectron2.modeling is imported
        # (torch 2.14 deprecates it), and detectron2.model_zoo imports pkg_resources.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated",
                                category=UserWarning)
        try:
            return _run(args)
        except ReclassError as e:
            print(f"d2-reclass: error: {e}", file=sys.stderr)
            return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        info = inspect_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            _print_inspect(info)
        return 0
    if args.command == "combine":
        report = combine_checkpoints(
            args.checkpoints, args.out, _read_classes(args), names=args.names,
            class_map=args.class_map, config_file=args.config_file, seed=args.seed,
            force=args.force, trust_pickle=args.trust_pickle,
            allow_different_weights=args.allow_different_weights)
    else:
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

if __name__ == "__main__":
    sys.exit(main())
