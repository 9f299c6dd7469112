"""In-memory reclass of a live model: resize class-dependent layers in place.

Prunes (or extends, or reorders) a trained model's classes with no retraining, e.g. a COCO
model cut to 3 classes for deployment. Parameters are replaced, layer attributes
(``out_features``, ``in_channels``, ...) and ``num_classes`` attributes follow.
"""
import logging
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..classes import check_class_list
from ..errors import ClassListError
from ..layouts import THING, find_layouts, retarget
from .report import ReclassReport
from .surgery import ClassSpec, reclass_state_dict

__all__ = ["reclass_model", "model_class_names"]

logger = logging.getLogger(__name__)


def model_class_names(model: nn.Module) -> Optional[List[str]]:
    """The thing class names a model carries (ReclassFastRCNNOutputLayers.class_names)."""
    for m in model.modules():
        names = getattr(m, "class_names", None)
        if names:
            return list(names)
    return None


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value
    if name != "weight":
        return
    # Keep the layer's own size attributes true, so repr, export and re-init see the new size.
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = value.shape[0], value.shape[1]
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        module.in_channels, module.out_channels = value.shape[0], value.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = value.shape[0], value.shape[1] * module.groups


def reclass_model(
    model: nn.Module,
    target_classes: Sequence[str],
    *,
    source_classes: Optional[Sequence[str]] = None,
    class_map: Optional[Sequence[str]] = None,
    mode: str = "map",
    seed: int = 0,
) -> ReclassReport:
    """Change a live model's thing classes in place; returns the report.

    Rows of classes found in ``source_classes`` (default: the names the model carries) are
    copied, others are fresh from the head's init, dropped classes disappear. The result is what
    loading the model's own weights into a model built for ``target_classes`` would give.
    Dataset-derived buffers (federated-loss class weights) are mapped like class rows, merged
    classes at their parts' mean and new classes at the mean of all: only the training loss
    reads them.

    Raises:
        ClassListError: no source names and ``mode="map"``, or malformed lists.
    """
    target = list(check_class_list(target_classes, "target_classes"))
    source = list(source_classes) if source_classes else model_class_names(model)
    if source is None and mode == "map" and not class_map:
        raise ClassListError(
            "reclass_model(mode='map') needs the model's current class names: pass "
            "source_classes=[...] (e.g. MetadataCatalog.get('coco_2017_train').thing_classes)."
        )
    layouts = [lay for lay in find_layouts(model) if lay.space == THING]
    state = model.state_dict()
    new_layouts, targets = retarget(layouts, {k: v.shape for k, v in state.items()}, len(target))
    new, report = reclass_state_dict(
        {k: state[k] for k in targets}, targets, new_layouts,
        classes={THING: ClassSpec(source, target, class_map, "source_classes", "target_classes")},
        mode=mode, seed=seed, source="the model")
    old_k = report.spaces[THING].num_source if THING in report.spaces else None
    for key in targets:
        _set_tensor(model, key, new[key])
    mapping = report.spaces[THING].mapping if THING in report.spaces else None
    for lay in layouts:
        if lay.keep_model and mapping is not None:
            old = state[lay.key]
            value = torch.stack([old[list(mapping.parts(j))].mean() if mapping.parts(j)
                                 else old.mean() for j in range(len(target))])
            _set_tensor(model, lay.key, value)
    for m in model.modules():
        if getattr(m, "num_classes", None) == old_k and old_k is not None:
            m.num_classes = len(target)
        shape = getattr(m, "output_shape", None)
        if isinstance(shape, tuple) and len(shape) == 3 and shape[0] == old_k:
            m.output_shape = (len(target),) + shape[1:]
        if getattr(m, "class_names", None):
            m.class_names = tuple(target)
    logger.info("[reclass_model] %d -> %d classes:\n%s", len(source or []), len(target), report)
    return report
