"""Layouts of DETR's detectron2 wrapper (github.com/facebookresearch/detr, ``d2/``), registered
by class name: nothing here imports the project.

``d2/train_net.py`` puts the checkout root on ``sys.path``, so the modules are ``models.detr``
(also ``detr.models.detr`` for a checkout imported as a package); the meta-architecture
``Detr`` (``d2/detr/detr.py``) holds ``detr`` (``models.detr.DETR``, or ``DETRsegm`` around it
with MASK_ON) and ``criterion`` (``models.detr.SetCriterion``), both built for
``MODEL.DETR.NUM_CLASSES``.

Shape shorthand: K = number of classes, D = the transformer's hidden dimension.
"""
from typing import List, Optional

from torch import nn

from ..fresh import linear_default_init
from .core import THING, ClassLayout, class_rows, no_object_weights, register_layout
from .num_classes import register_num_classes_keys

__all__ = ["DETR_KEY"]

DETR_KEY = "MODEL.DETR.NUM_CLASSES"
_PACKAGES = ("models", "detr.models")


@register_layout(*(f"{p}.detr.DETR" for p in _PACKAGES))
def _detr(m: nn.Module) -> List[ClassLayout]:
    # models/detr.py: class_embed = nn.Linear(D, K + 1) at torch's default init, one layer for
    # every decoder output. The last logit is "no object": SetCriterion.loss_labels gives
    # unmatched queries class K, and d2/detr/detr.py's inference drops it ([..., :-1]).
    layer = m.class_embed
    init = linear_default_init(layer)
    return class_rows(layer, "class_embed", init, init, space=THING,
                      num_classes=layer.out_features - 1, background=True, classifier=True,
                      kind="softmax + no object (last)", config_key=DETR_KEY)


@register_layout(*(f"{p}.detr.SetCriterion" for p in _PACKAGES))
def _criterion(m: nn.Module) -> List[ClassLayout]:
    # models/detr.py, SetCriterion.__init__: empty_weight = ones(K + 1) with eos_coef
    # (MODEL.DETR.NO_OBJECT_WEIGHT) last: set from the config, never learnt.
    return [no_object_weights(m.num_classes, DETR_KEY)]


@register_num_classes_keys
def _detr_keys(cfg) -> Optional[List]:
    # d2/detr/detr.py: Detr.__init__ reads MODEL.DETR.NUM_CLASSES for DETR and its criterion.
    if cfg.MODEL.META_ARCHITECTURE != "Detr" or "DETR" not in cfg.MODEL:
        return None
    return [(DETR_KEY, THING)]
