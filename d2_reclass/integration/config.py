"""Config keys (``MODEL.RECLASS``), class-list resolution, and YAML loading with zoo bases."""
import logging
import os
from dataclasses import fields
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import yaml
from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import HTTPURLHandler

from ..data.class_lists import (
    check_source_dataset,
    explicit_target,
    target_classes,
    use_checkpoint_classes,
)
from ..errors import ConfigError
from ..layouts import STUFF, THING
from ..layouts.num_classes import check_num_classes_config, num_classes_keys
from ..options import ReclassOptions, check_option_values, preserve_method
from .probe import default_config, probed_num_classes_keys

__all__ = [
    "ConfigChange",
    "ModelZooConfigHandler",
    "add_reclass_config",
    "apply_num_classes",
    "log_config_changes",
    "merge_config_file",
    "options_from_config",
    "prepare_reclass_config",
]

logger = logging.getLogger(__name__)

MODEL_ZOO_PREFIX = "model_zoo://"


def add_reclass_config(cfg: CN) -> None:
    """Add ``cfg.MODEL.RECLASS`` with its defaults. Idempotent; only sets defaults."""
    if "RECLASS" in cfg.MODEL:
        return
    _C = cfg.MODEL.RECLASS = CN()
    # How checkpoint heads are fitted to the model's classes: "auto" (map when both class lists
    # are known, else reinit when counts differ, else load unchanged), "map" (copy rows class by
    # class by name), "reinit" (fresh rows from the head's own init), "strict" (raise).
    _C.MODE = "auto"
    # The checkpoint's thing classes, in its order. Empty: the names the checkpoint stores
    # (d2_reclass writes them), else SOURCE_DATASET's metadata, else unknown.
    _C.SOURCE_CLASSES = []
    # A registered dataset whose metadata gives the checkpoint's classes (e.g. coco_2017_train,
    # lvis_v1_train). Used when neither SOURCE_CLASSES nor the checkpoint names them.
    _C.SOURCE_DATASET = ""
    # The model's thing classes. Empty: the classes of DATASETS.TRAIN (which must all agree).
    _C.TARGET_CLASSES = []
    # The same two for semantic-segmentation ("stuff") heads; empty: from the same datasets.
    _C.SOURCE_STUFF_CLASSES = []
    _C.TARGET_STUFF_CLASSES = []
    # "target=source" pairs overriding name matching, e.g. ["automobile=car"]; "target=" marks
    # a class as new on purpose; "vehicle=car+truck+bus" merges classes into one, and two
    # targets naming one source ("alive tree=tree", "dead tree=tree") split it.
    _C.CLASS_MAP = []
    # Seeds fresh rows, together with each parameter's name: every rank and rerun agrees.
    _C.SEED = 0
    # Set ROI_HEADS / RETINANET / SEM_SEG_HEAD / POINT_HEAD NUM_CLASSES from the target
    # classes before the model is built.
    _C.AUTO_NUM_CLASSES = True
    # Take only checkpoint keys with these prefixes (e.g. ["backbone."]); empty: all.
    _C.ONLY = []
    # "old_prefix=new_prefix" renames applied to checkpoint keys after ONLY.
    _C.RENAME = []
    # Allow full unpickling of .pkl / legacy .pth files. Only for files you trust.
    _C.TRUST_PICKLE = False
    # How a mapped target class that no source class maps to starts: "head" (the head's own
    # init), "relative" (every entry copied from the source class that scores highest on its
    # labelled examples in DATASETS.TRAIN), "imprint" (box classifier rows from the mean box
    # feature of those examples, the other entries from the relative), "auto" (imprint when
    # DATASETS.TRAIN is set, else head). Measured in benchmarks/new_class_init.py; see
    # d2_reclass/new_classes/. MODE reinit keeps the head's init for every class.
    _C.NEW_CLASS_INIT = "auto"
    # At most this many labelled images per new class are read for NEW_CLASS_INIT (chosen by
    # SEED and the class name); the rest of the dataset is never read for it.
    _C.INIT_IMAGES = 16
    # Further checkpoints, storing their class names, to combine with MODEL.WEIGHTS: a target
    # class takes its rows from the first of MODEL.WEIGHTS and these that knows it; every other
    # tensor is MODEL.WEIGHTS's (e.g. a base model, then its copy fine-tuned on novel classes).
    _C.COMBINE = []
    # The checkpoints of COMBINE may differ from MODEL.WEIGHTS in tensors that are not class
    # rows (an error otherwise: their classes were trained on other features).
    _C.COMBINE_ALLOW_DIFFERENT_WEIGHTS = False
    # Keep the checkpoint's classes: the target classes are its classes (stored names,
    # SOURCE_CLASSES or SOURCE_DATASET), in order, then the training datasets' classes it does
    # not know. A dataset labelling only the new classes is the normal case
    # (d2_reclass/data/class_lists.py).
    _C.KEEP_SOURCE_CLASSES = False
    # How the checkpoint's classes survive training on data that does not label them:
    # "pseudo_labels" (the frozen source model labels them on every training image),
    # "distill" (their outputs are distilled from it), "frozen_rows" (only the new classes'
    # entries train), "none"; "auto": pseudo_labels with KEEP_SOURCE_CLASSES, else none.
    # Measured in benchmarks/keep_old.py; see d2_reclass/preserve/.
    _C.PRESERVE = "auto"
    # PRESERVE pseudo_labels: the source model's detections with at least this score label the
    # old classes (those overlapping a labelled box are dropped: that object is labelled).
    _C.PSEUDO_LABEL_SCORE = 0.5
    # PRESERVE distill: the weight of the distillation loss (KL of softmax heads' old classes
    # and background; Bernoulli KL of sigmoid heads' old classes).
    _C.DISTILL_WEIGHT = 1.0
    # Keep the source model's outputs per training image (keyed by the augmented image's
    # content, so a flip is another entry), computing each once: exact, and the saving grows
    # with the epochs; off: computed for every batch.
    _C.TEACHER_CACHE = True
    # PRESERVE pseudo_labels / distill: after the last iteration, the weights become
    # (1 - SOURCE_AVERAGE) x the fine-tuned ones + SOURCE_AVERAGE x the source model's, on
    # every tensor but the new classes' entries: the old classes get back some of what the
    # fine-tune cost them, the new ones lose some of what they learnt (measured in
    # docs/keep_old.md; d2_reclass/preserve/averaging.py). 0, the default: off; above 0 with
    # another PRESERVE method (no teacher), an error.
    _C.SOURCE_AVERAGE = 0.0


def options_from_config(cfg: CN) -> ReclassOptions:
    """The :class:`ReclassOptions` of ``cfg.MODEL.RECLASS`` (defaults where the config has no
    such node); target classes default to those of DATASETS.TRAIN
    (:func:`~d2_reclass.data.class_lists.target_classes`).

    Raises:
        ConfigError, ClassListError: naming the MODEL.RECLASS key at fault.
    """
    r = cfg.MODEL.get("RECLASS", None) or {}
    values = {f.name: r[f.name.upper()] for f in fields(ReclassOptions) if f.name.upper() in r}
    check_option_values(values)
    values["target_classes"] = target_classes(cfg, "thing")
    values["target_stuff_classes"] = target_classes(cfg, "stuff")
    options = ReclassOptions(**values)
    check_source_dataset(options.source_dataset)
    return options


class ConfigChange(NamedTuple):
    """One key prepare_reclass_config set: a NUM_CLASSES key from the target classes, or
    FILTER_EMPTY_ANNOTATIONS for pseudo-labels; ``key`` went from ``old`` to ``new``."""

    key: str
    old: Union[int, bool]
    new: Union[int, bool]
    source: str  # where the classes came from, for the log line


def apply_num_classes(
    cfg: CN,
    thing_classes: Optional[Sequence[str]],
    stuff_classes: Optional[Sequence[str]] = None,
) -> List[Tuple[str, int, int]]:
    """Set the NUM_CLASSES keys that ``cfg``'s model reads (:func:`num_classes_keys`; for a
    project nothing registered knows, those the probe finds sizing its heads:
    :func:`~d2_reclass.integration.probe.probed_num_classes_keys`) from the class lists;
    returns (key, old, new) for changes, for the caller to log once logging is set up. Keys of
    heads the model does not have are left as they are.

    Must run before the model is built (``cfg`` must not be frozen).
    """
    counts = {THING: len(thing_classes or ()), STUFF: len(stuff_classes or ())}
    changes = []
    for key, space in probed_num_classes_keys(cfg) or num_classes_keys(cfg):
        node, leaf = _node(cfg, key)
        # POINT_HEAD exists only after add_pointrend_config.
        if not counts[space] or node is None or leaf not in node:
            continue
        if node[leaf] != counts[space]:
            changes.append((key, node[leaf], counts[space]))
            node[leaf] = counts[space]
    return changes


def _node(cfg: CN, key: str):
    """(parent node, leaf name) of a dotted key; the node is None when a parent is missing."""
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if node is not None else None
    return node, leaf


def prepare_reclass_config(cfg: CN, *, eval_only: bool = False
                           ) -> Tuple[CN, List[ConfigChange]]:
    """A copy of ``cfg`` ready to build a model for its target classes, and what changed.

    The copy has ``MODEL.RECLASS`` (its defaults when the config has none), its keys are
    checked, and with AUTO_NUM_CLASSES every NUM_CLASSES key equals the number of target
    classes. It is frozen when ``cfg`` was. ``cfg`` itself is never modified, and preparing a
    prepared config changes nothing.

    Args:
        eval_only: the model is built to evaluate MODEL.WEIGHTS (``--eval-only``). When no
            TARGET_(STUFF_)CLASSES are set, they become the classes MODEL.WEIGHTS (and
            COMBINE) store, so that a fine-tuned checkpoint is evaluated with its own classes
            whatever DATASETS.TRAIN names; what no file stores stays DATASETS.TRAIN's.

    Raises:
        ConfigError, ClassListError: a MODEL.RECLASS key cannot work (named), or a class count
            disagrees with a file the config names (a project's check, e.g. Detic's vocabulary).
        DatasetError: a training dataset had to be loaded for its classes and failed.
        CheckpointError: with ``eval_only``, MODEL.WEIGHTS cannot be read.
    """
    out = cfg.clone()
    out.defrost()
    add_reclass_config(out)
    r = out.MODEL.RECLASS
    check_option_values({k.lower(): v for k, v in r.items() if k != "AUTO_NUM_CLASSES"})
    stored = _stored_targets(out) if eval_only else set()
    changes: List[ConfigChange] = []
    if r.AUTO_NUM_CLASSES:
        for kind in ("thing", "stuff"):
            classes = target_classes(out, kind)
            source = f"MODEL.RECLASS.TARGET_{'' if kind == 'thing' else 'STUFF_'}CLASSES" \
                if explicit_target(out, kind) else f"DATASETS.TRAIN {tuple(out.DATASETS.TRAIN)}"
            if kind in stored:
                source = _stored_in(out)
            if kind == "thing" and r.KEEP_SOURCE_CLASSES:
                source = "MODEL.RECLASS.KEEP_SOURCE_CLASSES: the checkpoint's, then the new ones " \
                    f"of DATASETS.TRAIN {tuple(out.DATASETS.TRAIN)}"
            for key, old, new in apply_num_classes(
                    out, classes if kind == "thing" else None,
                    classes if kind == "stuff" else None):
                changes.append(ConfigChange(key, old, new, source))
    check_num_classes_config(out)
    if out.DATALOADER.FILTER_EMPTY_ANNOTATIONS and preserve_method(
            r.PRESERVE, r.KEEP_SOURCE_CLASSES) == "pseudo_labels":
        # Images without a labelled box hold old-class objects, which the pseudo-labels label.
        out.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
        changes.append(ConfigChange("DATALOADER.FILTER_EMPTY_ANNOTATIONS", True, False,
                                        "MODEL.RECLASS.PRESERVE pseudo_labels"))
    if cfg.is_frozen():
        out.freeze()
    return out, changes


def _stored_targets(cfg: CN) -> set:
    """For evaluation: set TARGET_(STUFF_)CLASSES of ``cfg`` (none set yet) to the classes
    MODEL.WEIGHTS stores; returns the kinds ("thing", "stuff") set."""
    r = cfg.MODEL.RECLASS
    if r.TARGET_CLASSES or r.TARGET_STUFF_CLASSES:
        return set()
    use_checkpoint_classes(cfg)
    return {kind for kind, names in (("thing", r.TARGET_CLASSES),
                                     ("stuff", r.TARGET_STUFF_CLASSES)) if names}


def _stored_in(cfg: CN) -> str:
    """The checkpoints :func:`_stored_targets` read, for log lines."""
    paths = [cfg.MODEL.WEIGHTS, *cfg.MODEL.RECLASS.COMBINE]
    return f"the checkpoint{'s' if len(paths) > 1 else ''} {', '.join(paths)}"


def log_config_changes(changes: Sequence[ConfigChange]) -> None:
    """Log each change: INFO where the key had its default (detectron2's, or for a key a
    project adds, that project's: :func:`~d2_reclass.layouts.num_classes.register_default_config`),
    else a WARNING, since a value somebody set disagreed with the classes."""
    defaults = default_config()
    for change in changes:
        if not change.key.endswith("NUM_CLASSES"):
            logger.info(f"{change.source}: {change.key} {change.old} -> {change.new} (images "
                        "without labelled boxes are trained on, with pseudo-labels)")
            continue
        node, leaf = _node(defaults, change.key)
        # A key no default config has (a project found by the probe): its default is unknown.
        if node is None or leaf not in node or change.old == node.get(leaf):
            logger.info(f"AUTO_NUM_CLASSES: {change.key} {change.old} -> {change.new} "
                        f"(the classes of {change.source})")
        else:
            logger.warning(
                f"AUTO_NUM_CLASSES: {change.key} was set to {change.old}, but {change.source} "
                f"has {change.new} classes; using {change.new}. Set it to {change.new} (or "
                "MODEL.RECLASS.AUTO_NUM_CLASSES False to keep your value and get an error).")


class ModelZooConfigHandler(HTTPURLHandler):
    """Serves detectron2's model-zoo configs, asked for by their upstream URL, from the installed
    detectron2 (``detectron2/model_zoo/configs``), with no download.

    The configs in ``configs/`` name their model-zoo base as
    ``_BASE_: "https://raw.githubusercontent.com/facebookresearch/detectron2/<commit>/configs/..."``:
    one of the three forms stock ``cfg.merge_from_file`` does not join to the config's own
    folder. With d2_reclass imported this handler answers from the installed copy (so the base
    matches the detectron2 that builds the model, and works offline); without it, stock
    detectron2 downloads the file. Other files under the prefix are downloaded as before.
    """

    PREFIX = "https://raw.githubusercontent.com/facebookresearch/detectron2/"

    def _get_supported_prefixes(self) -> List[str]:
        return [self.PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs) -> str:
        return installed_zoo_config(path) or super()._get_local_path(path, force=force, **kwargs)

    def _isfile(self, path: str, **kwargs) -> bool:
        # detectron2's merge_from_file asserts isfile() on the file it is given.
        return installed_zoo_config(path) is not None or super()._isfile(path, **kwargs)

    _exists = _isfile


def installed_zoo_config(url: str) -> Optional[str]:
    """The installed model-zoo file for an upstream config URL (any commit), or None."""
    if not url.startswith(ModelZooConfigHandler.PREFIX):
        return None
    ref, sep, relative = url[len(ModelZooConfigHandler.PREFIX):].partition("/configs/")
    if not sep or "/" in ref:
        return None
    import detectron2.model_zoo

    root = os.path.join(os.path.dirname(detectron2.model_zoo.__file__), "configs")
    local = os.path.normpath(os.path.join(root, relative))
    return local if local.startswith(root + os.sep) and os.path.isfile(local) else None


PathManager.register_handler(ModelZooConfigHandler())


def merge_config_file(cfg: CN, path: str) -> None:
    """``cfg.merge_from_file(path)``, also resolving the shorthand ``_BASE_: model_zoo://<config>``.

    The configs shipped in ``configs/`` need no shorthand (stock ``merge_from_file`` reads
    them, see :class:`ModelZooConfigHandler`); this is for your own configs written with it.
    YAML is read with ``yaml.safe_load``.
    """
    with PathManager.open(path) as f:
        data = yaml.safe_load(f) or {}
    if "RECLASS" in (data.get("MODEL") or {}) and "RECLASS" not in cfg.MODEL:
        raise ConfigError(
            f"{path} sets MODEL.RECLASS keys, but the config has no MODEL.RECLASS: call "
            "d2_reclass.add_reclass_config(cfg) before merging config files or opts into it.")
    base = data.pop("_BASE_", None)
    if base:
        if base.startswith(MODEL_ZOO_PREFIX):
            from detectron2 import model_zoo

            cfg.merge_from_file(model_zoo.get_config_file(base[len(MODEL_ZOO_PREFIX):]))
        elif base.startswith(("http://", "https://")):
            cfg.merge_from_file(base)  # a model-zoo config by URL: read as detectron2 reads it
        else:
            # Resolved as fvcore resolves it: relative to this file unless absolute.
            merge_config_file(cfg, os.path.join(os.path.dirname(path), os.path.expanduser(base)))
    cfg.merge_from_other_cfg(CN(data))
