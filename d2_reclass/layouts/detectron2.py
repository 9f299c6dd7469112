"""Layouts of detectron2's own heads (``detectron2/modeling``).

Shape shorthand: K = number of classes, A = anchors per location, B = box_dim (4, or 5 for
rotated boxes).
"""
from typing import List

from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

from ..fresh import MSRA, NORMAL_0001, NORMAL_001, ZERO, InitSpec, retinanet_prior_bias
from .core import KEYPOINT, STUFF, THING, ClassLayout, class_rows, register_layout

__all__ = ["fast_rcnn_layouts"]

ROI_HEADS_KEY = "MODEL.ROI_HEADS.NUM_CLASSES"
SEM_SEG_KEY = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"


@register_layout(FastRCNNOutputLayers)
def fast_rcnn_layouts(m: FastRCNNOutputLayers) -> List[ClassLayout]:
    # modeling/roi_heads/fast_rcnn.py: losses/inference read K+1 logits with background last
    # (also with sigmoid CE, which ignores the last), and box deltas viewed as (R, K, B) in
    # fast_rcnn_inference / box_reg_loss, or (R, B) when class-agnostic.
    k = m.num_classes
    box_dim = len(m.box2box_transform.weights)
    agnostic = m.bbox_pred.out_features == box_dim and k != 1
    out = class_rows(m.cls_score, "cls_score", NORMAL_001, space=THING, num_classes=k,
                     background=True, classifier=True, kind="softmax + background",
                     config_key=ROI_HEADS_KEY)
    out += class_rows(m.bbox_pred, "bbox_pred", NORMAL_0001, space=THING, num_classes=k,
                      block=box_dim, agnostic=agnostic, can_be_agnostic=True,
                      kind=f"class-major x {box_dim}", config_key=ROI_HEADS_KEY)
    if "fed_loss_cls_weights" in dict(m.named_buffers(recurse=False)):
        # Computed from the training set's class frequencies in __init__: never sliced.
        out.append(ClassLayout("fed_loss_cls_weights", THING, k, ZERO, keep_model=True,
                               kind="dataset frequencies", config_key=ROI_HEADS_KEY))
    return out


@register_layout(MaskRCNNConvUpsampleHead)
def _mask_rcnn(m: MaskRCNNConvUpsampleHead) -> List[ClassLayout]:
    # modeling/roi_heads/mask_head.py: mask_rcnn_loss / mask_rcnn_inference read one channel
    # per class, or 1 when class-agnostic.
    agnostic = m.predictor.out_channels == 1
    return class_rows(m.predictor, "predictor", NORMAL_0001, space=THING,
                      num_classes=None if agnostic else m.predictor.out_channels,
                      agnostic=agnostic, can_be_agnostic=True, kind="mask per class",
                      config_key=ROI_HEADS_KEY)


@register_layout(RetinaNetHead)
def _retinanet(m: RetinaNetHead) -> List[ClassLayout]:
    # modeling/meta_arch/retinanet.py: RetinaNet.forward permutes logits with
    # permute_to_N_HWA_K, i.e. channel a*K + k; FCOSHead (fcos.py) is a RetinaNetHead with
    # A = 1. A is read from the box regressor (A*4 channels), which must agree with the
    # checkpoint, so an anchor-count change is never taken for a class change.
    a = m.bbox_pred.out_channels // 4
    k = m.cls_score.out_channels // a
    bias = m.cls_score.bias.detach()
    # A freshly built head holds exactly -log((1-p)/p) with its configured prior p.
    prior = float(bias[0]) if bool((bias == bias[0]).all()) else retinanet_prior_bias(0.01)
    # FCOS exists only as a LazyConfig, whose key is the model's num_classes.
    key = "model.num_classes" if type(m).__name__ == "FCOSHead" \
        else "MODEL.RETINANET.NUM_CLASSES"
    return class_rows(m.cls_score, "cls_score", NORMAL_001, InitSpec("constant", prior),
                      space=THING, num_classes=k, repeat=a, requires=("bbox_pred.weight",),
                      classifier=True, kind=f"{a} anchors x classes", config_key=key)


@register_layout(SemSegFPNHead)
def _sem_seg_fpn(m: SemSegFPNHead) -> List[ClassLayout]:
    # modeling/meta_arch/semantic_seg.py: channel k is stuff class k (Panoptic FPN: 0 =
    # "things").
    return class_rows(m.predictor, "predictor", MSRA, space=STUFF, classifier=True,
                      num_classes=m.predictor.out_channels, kind="per-pixel class",
                      config_key=SEM_SEG_KEY)


@register_layout(KRCNNConvDeconvUpsampleHead)
def _keypoint(m: KRCNNConvDeconvUpsampleHead) -> List[ClassLayout]:
    # modeling/roi_heads/keypoint_head.py. A ConvTranspose2d weight is (in, out, k, k):
    # keypoints are axis 1 of the weight.
    k = m.score_lowres.out_channels
    key = "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS"
    return [
        ClassLayout("score_lowres.weight", KEYPOINT, k, MSRA, axis=1, kind="keypoint heatmaps",
                    config_key=key),
        ClassLayout("score_lowres.bias", KEYPOINT, k, ZERO, kind="keypoint heatmaps",
                    config_key=key),
    ]
