"""Layouts: which entries of which tensor belong to which class.

:mod:`.core` holds the value types (:class:`ClassLayout`, merge rules) and the registry; every
other module here holds the layouts of one model family, each registered on import (by module
type, or by qualified class name for projects that may not be installed).
"""
from . import deeplab as _deeplab  # noqa: F401  (registration only)
from . import detectron2 as _detectron2  # noqa: F401
from . import mask2former as _mask2former  # noqa: F401
from . import point_rend as _point_rend  # noqa: F401
from .core import (
    KEYPOINT,
    MEAN,
    MEAN_LOG_COUNT,
    PROBED_ATTR,
    STUFF,
    SUM,
    THING,
    ClassLayout,
    ClassSegment,
    LayoutFn,
    SourceAxis,
    class_rows,
    find_layouts,
    layouts_for_module,
    merge_weights,
    prefixed_layouts,
    register_layout,
    retarget,
)

__all__ = [
    "KEYPOINT",
    "MEAN",
    "MEAN_LOG_COUNT",
    "PROBED_ATTR",
    "STUFF",
    "SUM",
    "THING",
    "ClassLayout",
    "ClassSegment",
    "LayoutFn",
    "SourceAxis",
    "class_rows",
    "find_layouts",
    "layouts_for_module",
    "merge_weights",
    "prefixed_layouts",
    "register_layout",
    "retarget",
]

# Projects' layouts last: they also register their config keys with ..num_classes, which reads
# this package's class spaces.
from . import centernet as _centernet  # noqa: E402,F401  (registration only)
from . import detic as _detic  # noqa: E402,F401
from . import detr as _detr  # noqa: E402,F401
from . import detrex as _detrex  # noqa: E402,F401
from . import sparse_rcnn as _sparse_rcnn  # noqa: E402,F401
