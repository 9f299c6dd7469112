"""Which config keys hold a model's class counts, by meta-architecture and head.

AUTO_NUM_CLASSES sets these keys before the model is built, so it must know them from the
config alone. detectron2's architectures are known here; a project registers a function for
its own with :func:`register_num_classes_keys` (its layouts module does, next to its
layouts). Keys are set only where the config's model uses them: a Faster R-CNN run never logs
a RetinaNet key.
"""
from typing import Callable, List, Optional, Tuple

from detectron2.config import CfgNode

from .layouts.core import STUFF, THING  # not .layouts: project layouts import this module

__all__ = [
    "NumClassesCheckFn",
    "NumClassesKeysFn",
    "check_num_classes_config",
    "num_classes_keys",
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


def check_num_classes_config(cfg: CfgNode) -> None:
    """Run every registered check (:func:`register_num_classes_check`) on ``cfg``."""
    for fn in _CHECK_FNS:
        fn(cfg)


def num_classes_keys(cfg: CfgNode) -> List[Tuple[str, str]]:
    """The (key, space) pairs that size the class-dependent heads of ``cfg``'s model: those of
    the first registered function that knows the config, else detectron2's."""
    for fn in _KEY_FNS:
        keys = fn(cfg)
        if keys is not None:
            return keys
    return _detectron2_keys(cfg)


def _detectron2_keys(cfg: CfgNode) -> List[Tuple[str, str]]:
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
