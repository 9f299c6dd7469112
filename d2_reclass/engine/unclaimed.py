"""Tensors no layout claims that may be class heads: the last guard of a same-count load.

When a model's class heads are unknown (no registered layout, and no probe could rebuild the
model: a bare ``ReclassCheckpointer(model)``), a checkpoint for the same number of classes loads
with no shape change, so nothing else would notice that its classes are other ones (reordered,
renamed). :func:`unclaimed_class_tensors` lists the tensors that may be those heads: whoever
loads then warns (``auto``, ``map``, ``reinit``) or raises (``strict``), never passes in silence.
"""
from typing import List, Mapping, Sequence

import torch

from ..classes import normalize_class_name
from ..layouts import THING, ClassLayout
from .surgery import ClassSpec

__all__ = ["unclaimed_class_tensors", "unclaimed_message"]


def unclaimed_class_tensors(
    state_dict: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    layouts: Sequence[ClassLayout],
    classes: Mapping[str, ClassSpec],
) -> List[str]:
    """Keys of tensors that may hold the thing classes in the checkpoint's order while the
    model's classes are others of the same count.

    Only asked when both thing class lists are known, have the same length K, and differ, and
    no layout claims a thing tensor of the model (where one does, the registry knows its heads
    and the engine maps them). A candidate is a floating-point tensor of the model with K or
    K + 1 entries on its first axis, of the same shape in the checkpoint.
    """
    spec = classes.get(THING)
    if spec is None or spec.source is None or spec.target is None:
        return []
    source = [normalize_class_name(c) for c in spec.source]
    target = [normalize_class_name(c) for c in spec.target]
    if len(source) != len(target) or source == target:
        return []
    if any(lay.space == THING for lay in layouts):
        return []
    k = len(target)
    claimed = {lay.key for lay in layouts}
    return [key for key, value in model_state.items()
            if key not in claimed and key in state_dict and value.is_floating_point()
            and value.dim() >= 1 and value.shape[0] in (k, k + 1)
            and tuple(state_dict[key].shape) == tuple(value.shape)]


def unclaimed_message(keys: Sequence[str], spec: ClassSpec, source: str, strict: bool) -> str:
    """The one message for :func:`unclaimed_class_tensors`'s result."""
    k = len(spec.target)
    listing = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    what = ("MODEL.RECLASS.MODE is 'strict', and" if strict else "")
    return (
        f"{what} {source} was trained for other classes than the model's at the same count "
        f"({k}), and the model has tensors with {k} or {k + 1} rows that no class layout "
        f"claims: {listing}. If they are class heads, their rows would load in the checkpoint's "
        "class order. Register their layout (d2_reclass.register_layout; the recipe is in "
        "docs/api.md), or build the model from its config so that d2_reclass probes it "
        "(ReclassCheckpointer.from_config, ReclassTrainerMixin)."
        + ("" if strict else " They are loaded as they are.")).strip()
