"""Layouts of detectron2's PointRend project (``projects/PointRend/point_rend``), registered by
class name: nothing here imports the project (whose package needs OpenCV).

Shape shorthand: K = number of classes, R = mask resolution, C = channels of the implicit
point head.
"""
import logging
from typing import List, Optional

from torch import nn

from ..fresh import MSRA, NORMAL_0001
from .core import (
    STUFF,
    SUM,
    THING,
    ClassLayout,
    ClassSegment,
    class_rows,
    layouts_for_module,
    prefixed_layouts,
    register_layout,
)

__all__: List[str] = []

logger = logging.getLogger(__name__)

_MODULE = "detectron2.projects.point_rend"
POINT_HEAD_KEY = "MODEL.POINT_HEAD.NUM_CLASSES"


@register_layout(f"{_MODULE}.mask_head.ConvFCHead")
def _coarse_mask(m: nn.Module) -> List[ClassLayout]:
    # mask_head.py: ConvFCHead.forward views the fc output as (N, K, R, R): class-major blocks
    # of R*R. With a 1-d output_shape it is Implicit PointRend's parameter head, whose layout
    # only its mask head knows (below).
    if len(m.output_shape) != 3:
        return []
    k, h, w = m.output_shape
    return class_rows(m.prediction, "prediction", NORMAL_0001, space=THING, num_classes=k,
                      block=h * w, kind=f"class-major x {h}x{w}",
                      config_key="MODEL.ROI_HEADS.NUM_CLASSES")


@register_layout(f"{_MODULE}.mask_head.ImplicitPointRendMaskHead")
def _implicit_point_rend(m: nn.Module) -> List[ClassLayout]:
    # mask_head.py / point_head.py: the parameter head predicts every parameter of the point
    # head's MLP as one flat vector, which ImplicitPointHead._parse_params splits as [weights
    # of each layer] + [biases of each layer]. The last layer's are per class: its weights,
    # viewed as (K, C), end the weights; its biases (K) end the vector. Two class segments on
    # one axis: K blocks of C after the other layers' weights, then K blocks of 1 after the
    # other layers' biases.
    head = m.point_head
    agnostic = head.num_classes == 1
    segments = (ClassSegment(offset=sum(head.num_bias_params[:-1])),)
    return class_rows(m.parameter_head.prediction, "parameter_head.prediction", NORMAL_0001,
                      space=THING, num_classes=None if agnostic else head.num_classes,
                      offset=sum(head.num_weight_params[:-1]), block=head.channels,
                      segments=segments, agnostic=agnostic, can_be_agnostic=True,
                      kind=f"point-head parameters: {head.channels} weights + 1 bias per class",
                      config_key=POINT_HEAD_KEY)


@register_layout(f"{_MODULE}.point_head.StandardPointHead")
def _point_head_thing(m: nn.Module) -> List[ClassLayout]:
    return _point_head(m, THING)


@register_layout(f"{_MODULE}.semantic_seg.PointRendSemSegHead")
def _point_rend_sem_seg(m: nn.Module) -> List[ClassLayout]:
    # semantic_seg.py: a coarse semantic head refined by a point head, both per stuff class.
    coarse = layouts_for_module(m.coarse_sem_seg_head)
    return prefixed_layouts(coarse, "coarse_sem_seg_head.") + prefixed_layouts(
        _point_head(m.point_head, STUFF), "point_head.")


def _point_head(m: nn.Module, space: str) -> List[ClassLayout]:
    # point_head.py: StandardPointHead.forward concatenates the K coarse logits *after* the
    # fine-grained features, into the first fc and (coarse_pred_each_layer) into every later
    # layer and the predictor: the last K input columns of those layers are class-dependent.
    agnostic = m.predictor.out_channels == 1
    k = _point_head_num_classes(m)
    layers = [(f"fc{i + 1}", fc, MSRA, i == 0 or m.coarse_pred_each_layer)
              for i, fc in enumerate(m.fc_layers)]
    layers.append(("predictor", m.predictor, NORMAL_0001,
                   not m.fc_layers or m.coarse_pred_each_layer))
    out = [
        ClassLayout(f"{name}.weight", space, k, init, axis=1, offset=layer.in_channels - k,
                    merge=SUM, kind="coarse logits as input columns", config_key=POINT_HEAD_KEY)
        for name, layer, init, has_coarse in layers
        if has_coarse and k is not None
    ]
    # Point logits are mask logits (sigmoid per class) for instances, class logits (softmax)
    # for semantic segmentation.
    out += class_rows(m.predictor, "predictor", NORMAL_0001, space=space,
                      num_classes=None if agnostic else k, agnostic=agnostic,
                      can_be_agnostic=True, classifier=space == STUFF, kind="point logits",
                      config_key=POINT_HEAD_KEY)
    return out


def _point_head_num_classes(m: nn.Module) -> Optional[int]:
    # StandardPointHead does not store K. Later layers' inputs are fc_dim + K when coarse logits
    # are appended to every layer; otherwise the predictor's rows are K unless class-agnostic.
    if m.coarse_pred_each_layer and m.fc_layers:
        return m.predictor.in_channels - m.fc_layers[-1].out_channels
    if m.predictor.out_channels != 1:
        return m.predictor.out_channels
    logger.warning("A class-agnostic PointRend point head without COARSE_PRED_EACH_LAYER does not "
                   "reveal its class count; its coarse-logit input columns are not mapped.")
    return None
