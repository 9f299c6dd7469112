"""Which config keys hold a model's class counts, by meta-architecture and head.

AUTO_NUM_CLASSES sets these keys before the model is built, so it must know them from the
config alone. detectron2's architectures are known here; a project registers a function for
its own with :func:`register_num_classes_keys` (its layouts module does, next to its
layouts). Keys are set only where the config's model uses them: a Faster R-CNN run never logs
a RetinaNet key.
"""
from typing import Callable, List, Optional, Tuple

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

from ..errors import ClassListError
from .core import STUFF, THING

__all__ = [
    "DefaultConfigFn",
    "NumClassesCheckFn",
    "NumClassesKeysFn",
    "add_registered_defaults",
    "check_num_classes_config",
    "detectron2_num_classes_keys",
    "num_classes_keys",
    "registered_num_classes_keys",
    "register_default_config",
    "register_num_classes_check",
    "register_num_classes_keys",
]

#: ``fn(cfg) -> [(config key, class space), ...]`` for the configs it knows, else None.
NumClassesKeysFn = Callable[[CfgNode], Optional[List[Tuple[str, str]]]]

_KEY_FNS: List[NumClassesKeysFn] = []

#: ``fn(cfg)``: raises a :class:`~d2_reclass.errors.ReclassError` where a class count of the
#: config disagrees with a file the config names (Detic's vocabulary), else returns None.
NumClassesCheckFn = Callable[[CfgNode], None]

_CHECK_FNS: List[NumClassesCheckFn] = []

#: ``fn(cfg)``: adds a project's config keys with their defaults to ``cfg`` (its own
#: ``add_*_config``) when that project is already imported; never imports it.
DefaultConfigFn = Callable[[CfgNode], None]

_DEFAULT_FNS: List[DefaultConfigFn] = []


def register_num_classes_keys(fn: NumClassesKeysFn) -> NumClassesKeysFn:
    """Register ``fn(cfg)``, which returns the (key, space) pairs a config's model reads its
    class counts from, or None for configs of other architectures. Usable as a decorator;
    functions registered later are asked first."""
    _KEY_FNS.insert(0, fn)
    return fn


def register_num_classes_check(fn: NumClassesCheckFn) -> NumClassesCheckFn:
    """Register ``fn(cfg)``, run on every prepared config once its class counts are set: it
    raises, naming the keys and files, where the model it describes could not be built for
    them. Usable as a decorator."""
    _CHECK_FNS.append(fn)
    return fn


def register_default_config(fn: DefaultConfigFn) -> DefaultConfigFn:
    """Register ``fn(cfg)``, which adds a project's keys with their defaults (its own
    ``add_*_config``) to ``cfg``, so that a class count the user left at the project's default
    is told from one somebody set. Usable as a decorator; run in registration order."""
    _DEFAULT_FNS.append(fn)
    return fn


def add_registered_defaults(cfg: CfgNode) -> None:
    """Run every registered default-config function (:func:`register_default_config`)."""
    for fn in _DEFAULT_FNS:
        fn(cfg)


def check_num_classes_config(cfg: CfgNode) -> None:
    """Run every registered check (:func:`register_num_classes_check`) on ``cfg``, then
    detectron2's own (the fed loss's class counts)."""
    for fn in _CHECK_FNS:
        fn(cfg)
    _check_fed_loss_counts(cfg)


def _check_fed_loss_counts(cfg: CfgNode) -> None:
    # modeling/roi_heads/fast_rcnn.py: with ROI_BOX_HEAD.USE_FED_LOSS (detectron2 0.6+; also
    # CenterNet2's and Detic's key), FastRCNNOutputLayers reads the class_image_count of
    # DATASETS.TRAIN[0] and asserts, with no key named, that it counts NUM_CLASSES classes.
    box, train = cfg.MODEL.get("ROI_BOX_HEAD", {}), cfg.DATASETS.TRAIN
    if not box.get("USE_FED_LOSS", False) or not train or train[0] not in MetadataCatalog.list():
        return
    counts = MetadataCatalog.get(train[0]).get("class_image_count", None)
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if counts is not None and len(counts) != k:
        raise ClassListError(
            f"MODEL.ROI_BOX_HEAD.USE_FED_LOSS reads the class_image_count of DATASETS.TRAIN[0] "
            f"{train[0]!r}, which counts {len(counts)} classes, but MODEL.ROI_HEADS.NUM_CLASSES "
            f"is {k}. Train on a dataset registered with the counts of the model's {k} classes, "
            "or set MODEL.ROI_BOX_HEAD.USE_FED_LOSS False (to evaluate, the fed loss is not "
            "used).")


def num_classes_keys(cfg: CfgNode) -> List[Tuple[str, str]]:
    """The (key, space) pairs that size the class-dependent heads of ``cfg``'s model: those of
    the first registered function that knows the config, else detectron2's."""
    keys = registered_num_classes_keys(cfg)
    return keys if keys is not None else detectron2_num_classes_keys(cfg)


def registered_num_classes_keys(cfg: CfgNode) -> Optional[List[Tuple[str, str]]]:
    """The keys of the first registered function that knows ``cfg``; None when none does."""
    for fn in _KEY_FNS:
        keys = fn(cfg)
        if keys is not None:
            return keys
    return None


def detectron2_num_classes_keys(cfg: CfgNode) -> List[Tuple[str, str]]:
    """The keys detectron2's own meta-architectures read (any other is taken for an R-CNN)."""
    # modeling/meta_arch: RetinaNet reads RETINANET; SemanticSegmentor SEM_SEG_HEAD; the R-CNNs
    # ROI_HEADS, Panoptic FPN both; PointRend's point heads POINT_HEAD. An architecture nobody
    # registered is taken for an R-CNN-style project (ROI_HEADS, and SEM_SEG_HEAD for stuff).
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return [("MODEL.RETINANET.NUM_CLASSES", THING)]
    keys = []
    if arch != "SemanticSegmentor":
        keys.append(("MODEL.ROI_HEADS.NUM_CLASSES", THING))
        if "PointRend" in cfg.MODEL.ROI_HEADS.NAME + cfg.MODEL.ROI_MASK_HEAD.NAME:
            keys.append(("MODEL.POINT_HEAD.NUM_CLASSES", THING))
    if arch != "GeneralizedRCNN":
        keys.append(("MODEL.SEM_SEG_HEAD.NUM_CLASSES", STUFF))
        if cfg.MODEL.SEM_SEG_HEAD.NAME == "PointRendSemSegHead":
            keys.append(("MODEL.POINT_HEAD.NUM_CLASSES", STUFF))
    return keys
