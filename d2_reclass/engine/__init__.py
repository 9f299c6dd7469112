"""The engine: a checkpoint's class-dependent tensors fitted to a model's classes, by name.

Pure: state dicts, layouts and class names in, state dicts and a :class:`ReclassReport` out; it
reads neither detectron2's config nor its data catalog. :mod:`.surgery` is one checkpoint onto
a model, :mod:`.combine` several, :mod:`.live` a model already built (its own tensors as the
checkpoint), :mod:`.recognize` the heads of a checkpoint with no model (``d2-reclass inspect``),
:mod:`.keys` the key handling every path shares (ONLY, RENAME, ``_metadata``-keeping copies).
"""
from .combine import combine_state_dicts
from .live import reclass_model
from .report import ReclassReport
from .surgery import ClassSpec, SourceCheckpoint, reclass_state_dict

__all__ = [
    "ClassSpec",
    "ReclassReport",
    "SourceCheckpoint",
    "combine_state_dicts",
    "reclass_model",
    "reclass_state_dict",
]
