"""Layouts of SparseR-CNN (github.com/PeizeSun/SparseR-CNN, package ``sparsercnn``) and
DiffusionDet (github.com/ShoufaChen/DiffusionDet, package ``diffusiondet``), registered by class
name: nothing here imports either project.

Both build a ``DynamicHead`` (``model.head``) of ``NUM_HEADS`` independent ``RCNNHead`` stages
(``head_series.{i}``), each with its own ``class_logits``; with a focal (or, for DiffusionDet,
federated) loss it has K rows, otherwise K + 1 with "no object" last. Their criteria hold
``empty_weight`` (K + 1, softmax only) and DiffusionDet's ``fed_loss_cls_weights`` (K, from the
training data): the model's own.

Shape shorthand: K = number of classes, D = HIDDEN_DIM.
"""
from typing import List, Optional

from torch import nn

from ..fresh import ZERO, InitSpec, linear_default_init, xavier_uniform_init
from .core import THING, ClassLayout, class_rows, no_object_weights, register_layout
from .num_classes import register_num_classes_keys

__all__ = ["DIFFUSIONDET_KEY", "SPARSE_RCNN_KEY"]

SPARSE_RCNN_KEY = "MODEL.SparseRCNN.NUM_CLASSES"
DIFFUSIONDET_KEY = "MODEL.DiffusionDet.NUM_CLASSES"
_KEYS = {"sparsercnn": SPARSE_RCNN_KEY, "diffusiondet": DIFFUSIONDET_KEY}


def _key(m: nn.Module) -> str:
    return _KEYS.get(type(m).__module__.partition(".")[0], "")


@register_layout("sparsercnn.head.DynamicHead", "diffusiondet.head.DynamicHead")
def _dynamic_head(m: nn.Module) -> List[ClassLayout]:
    # head.py, DynamicHead._reset_parameters: every weight xavier_uniform_; with a focal (or
    # fed) loss, the class bias -log((1-p)/p), p = PRIOR_PROB (bias_value); without, the bias
    # keeps nn.Linear's default and the last of K + 1 logits is "no object" (loss.py gives
    # unmatched boxes class K).
    k = m.num_classes
    prior = getattr(m, "bias_value", None)
    out: List[ClassLayout] = []
    for i, stage in enumerate(m.head_series):
        layer = stage.class_logits
        background = layer.out_features == k + 1
        bias = InitSpec("constant", float(prior)) if prior is not None and not background \
            else linear_default_init(layer)
        out += class_rows(layer, f"head_series.{i}.class_logits", xavier_uniform_init(), bias,
                          space=THING, num_classes=k, background=background, classifier=True,
                          kind="softmax + no object (last)" if background else "sigmoid (focal)",
                          config_key=_key(m))
    return out


@register_layout("sparsercnn.loss.SetCriterion", "diffusiondet.loss.SetCriterionDynamicK")
def _criterion(m: nn.Module) -> List[ClassLayout]:
    # loss.py: empty_weight = ones(K + 1), eos_coef last, without the focal loss;
    # DiffusionDet's fed_loss_cls_weights (K) from DATASETS.TRAIN's class_image_count. Both
    # set from the config and data, never learnt.
    out = []
    if hasattr(m, "empty_weight"):
        out.append(no_object_weights(m.num_classes, _key(m)))
    if hasattr(m, "fed_loss_cls_weights"):
        out.append(ClassLayout("fed_loss_cls_weights", THING, m.num_classes, ZERO,
                               keep_model=True, kind="fed-loss class weights (data)",
                               config_key=_key(m)))
    return out


@register_num_classes_keys
def _keys(cfg) -> Optional[List]:
    # detector.py: SparseRCNN / DiffusionDet read their own NUM_CLASSES (DiffusionDet's LVIS
    # configs also set ROI_HEADS.NUM_CLASSES, which no DiffusionDet code reads).
    for arch, key in (("SparseRCNN", SPARSE_RCNN_KEY), ("DiffusionDet", DIFFUSIONDET_KEY)):
        if cfg.MODEL.META_ARCHITECTURE == arch and arch in cfg.MODEL:
            return [(key, THING)]
    return None
