"""Layouts: which entries of which tensor belong to which class.

A :class:`ClassLayout` describes one axis of one state-dict tensor as::

    [offset non-class entries] + repeat x ([K class blocks] + [background block]?)

with every block ``block`` entries long. Layouts are discovered from the model's *modules*
(by type, through :func:`register_layout`), never by matching parameter names, so subclasses
and renamed attributes are found too. Each layout function names the detectron2 code that
reads the layout it describes.

Shape shorthand: K = number of classes, A = anchors per location, B = box_dim (4, or 5 for
rotated boxes), R = mask resolution.
"""
import logging
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from .fresh import MSRA, NORMAL_0001, NORMAL_001, ZERO, InitSpec, retinanet_prior_bias

__all__ = [
    "ClassLayout",
    "register_layout",
    "find_layouts",
    "layouts_for_module",
    "prefixed_layouts",
    "retarget",
    "THING",
    "STUFF",
    "KEYPOINT",
]

logger = logging.getLogger(__name__)

#: Class spaces. Detection heads share the "thing" classes; semantic-segmentation heads use the
#: "stuff" classes (for Panoptic FPN, index 0 is the merged "things"); keypoint heads have
#: keypoints, which are never mapped by name, only reinitialised when their count changes.
THING, STUFF, KEYPOINT = "thing", "stuff", "keypoint"


@dataclass(frozen=True)
class ClassLayout:
    """The class structure of one axis of one tensor.

    Attributes:
        key (str): the state-dict key (relative to the module while a layout function runs).
        space (str): the class space, :data:`THING`, :data:`STUFF` or :data:`KEYPOINT`.
        num_classes (int or None): K in the model; None for a class-agnostic tensor of a head
            that does not know K.
        init (InitSpec): the head's own init, used for fresh entries.
        axis (int): the class axis (1 for input columns and ConvTranspose weights).
        block (int): entries per class (B for box regressors, R*R for coarse mask fcs).
        repeat (int): anchor-major repetitions (A for RetinaNet: channel a*K + k).
        offset (int): leading entries that belong to no class (copied as they are).
        background (bool): a trailing background block after the K classes (softmax heads).
        agnostic (bool): the model's tensor is one class-agnostic block.
        can_be_agnostic (bool): the head also exists in a class-agnostic form, one block long.
        requires (tuple[str]): keys whose shapes must agree between checkpoint and model for
            this reading to hold (RetinaNet's A is read from its box regressor).
        keep_model (bool): a buffer computed from the dataset; the model's own value is kept.
        kind (str): a short description for reports ("softmax + background", ...).
    """

    key: str
    space: str
    num_classes: Optional[int]
    init: InitSpec
    axis: int = 0
    block: int = 1
    repeat: int = 1
    offset: int = 0
    background: bool = False
    agnostic: bool = False
    can_be_agnostic: bool = False
    requires: Tuple[str, ...] = ()
    keep_model: bool = False
    kind: str = ""

    def length(self, num_classes: int, agnostic: bool = False) -> int:
        """Length of the class axis for ``num_classes`` classes (or the agnostic form)."""
        per_repeat = 1 if agnostic else num_classes + int(self.background)
        return self.offset + self.repeat * per_repeat * self.block

    def count_classes(self, length: int) -> Optional[int]:
        """K such that ``length(K) == length``, or None if no K fits."""
        span = length - self.offset
        unit = self.repeat * self.block
        if span <= 0 or span % unit:
            return None
        k = span // unit - int(self.background)
        return k if k >= 1 else None

    def is_agnostic_length(self, length: int) -> bool:
        return self.can_be_agnostic and length == self.length(1, agnostic=True)

    def source_positions(
        self,
        source_index: Sequence[Optional[int]],
        num_source: int,
        *,
        source_agnostic: bool = False,
        target_agnostic: bool = False,
    ) -> torch.Tensor:
        """For each entry of the target axis, the source entry it copies, or -1 for fresh.

        Args:
            source_index: for each target class, its source class index or None.
            num_source: K of the source tensor (ignored when ``source_agnostic``).
            source_agnostic, target_agnostic: whether either side is the one-block form. An
                agnostic source feeds every target class; an agnostic target from a
                class-specific source is all fresh.
        """
        out: List[int] = list(range(self.offset))
        src_classes = 1 if source_agnostic else num_source + int(self.background)
        src_span = src_classes * self.block
        blocks: List[Optional[int]]
        if target_agnostic:
            blocks = [0 if source_agnostic else None]
        else:
            blocks = [0] * len(source_index) if source_agnostic else list(source_index)
            if self.background:
                blocks.append(None if source_agnostic else num_source)
        for a in range(self.repeat):
            base = self.offset + a * src_span
            for b in blocks:
                if b is None:
                    out.extend([-1] * self.block)
                else:
                    start = base + b * self.block
                    out.extend(range(start, start + self.block))
        return torch.tensor(out, dtype=torch.long)

    def describe(self) -> str:
        parts = [self.kind] if self.kind else []
        if self.agnostic:
            parts.append("class-agnostic")
        return ", ".join(parts)


LayoutFn = Callable[[nn.Module], List[ClassLayout]]
_LAYOUTS: Dict[type, LayoutFn] = {}


def register_layout(*module_types: Type[nn.Module]) -> Callable[[LayoutFn], LayoutFn]:
    """Register ``fn(module) -> list[ClassLayout]`` for modules of these types (and subclasses).

    Keys in the returned layouts are relative to the module. A registered module claims its
    whole subtree: layouts of its children are not searched separately, so a parent can assign
    its children's class space (PointRend's semantic head does). Example, for a DETR-style head
    with K+1 "no object"-last logits::

        @register_layout(DETR)
        def _detr(m):
            k = m.class_embed.out_features - 1
            return [ClassLayout("class_embed.weight", THING, k, NORMAL_001, background=True),
                    ClassLayout("class_embed.bias", THING, k, ZERO, background=True)]
    """

    def deco(fn: LayoutFn) -> LayoutFn:
        for t in module_types:
            _LAYOUTS[t] = fn
        return fn

    return deco


def _lookup(module: nn.Module) -> Optional[LayoutFn]:
    for t in type(module).__mro__:
        if t in _LAYOUTS:
            return _LAYOUTS[t]
    return None


def prefixed_layouts(layouts: List[ClassLayout], prefix: str) -> List[ClassLayout]:
    """``layouts`` with ``prefix`` put before their keys (and the keys they require)."""
    return [replace(lay, key=prefix + lay.key, requires=tuple(prefix + r for r in lay.requires))
            for lay in layouts]


def layouts_for_module(module: nn.Module) -> List[ClassLayout]:
    """Layouts of ``module`` and its subtree, with keys relative to ``module``."""
    found: List[ClassLayout] = []
    claimed: List[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(c) for c in claimed):
            continue
        fn = _lookup(m)
        if fn is None:
            continue
        prefix = name + "." if name else ""
        found.extend(prefixed_layouts(fn(m), prefix))
        claimed.append(prefix)
        if not name:
            break
    return found


def find_layouts(model: nn.Module) -> List[ClassLayout]:
    """Every class-dependent tensor of ``model``, with full state-dict keys.

    DataParallel / DistributedDataParallel wrappers are looked through, as fvcore's
    Checkpointer does, so keys carry no ``module.`` prefix.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return layouts_for_module(model)


def retarget(
    layouts: Sequence[ClassLayout], shapes: Mapping[str, Sequence[int]], num_classes: int
) -> Tuple[List[ClassLayout], Dict[str, torch.Tensor]]:
    """The same heads built for ``num_classes``: their layouts, and meta tensors of their
    shapes (the engine reads target shapes only; meta tensors cost no memory).

    Dataset-derived buffers (``keep_model``) are left out: they have no shape to derive.
    """
    new = [replace(lay, num_classes=None if lay.agnostic else num_classes)
           for lay in layouts if not lay.keep_model]
    targets: Dict[str, torch.Tensor] = {}
    for lay in new:
        shape = list(targets[lay.key].shape if lay.key in targets else shapes[lay.key])
        shape[lay.axis] = lay.length(num_classes, agnostic=lay.agnostic)
        targets[lay.key] = torch.empty(shape, device="meta")
    return new, targets


def _rows(layer: nn.Module, name: str, weight_init: InitSpec, bias_init: InitSpec = ZERO,
          **kw) -> List[ClassLayout]:
    """Layouts for a layer whose output rows (weight dim 0, bias) are class-dependent."""
    out = [ClassLayout(f"{name}.weight", init=weight_init, **kw)]
    if getattr(layer, "bias", None) is not None:
        out.append(ClassLayout(f"{name}.bias", init=bias_init, **kw))
    return out


# ---------------------------------------------------------------------------------------------
# detectron2 heads
# ---------------------------------------------------------------------------------------------


@register_layout(FastRCNNOutputLayers)
def _fast_rcnn(m: FastRCNNOutputLayers) -> List[ClassLayout]:
    # Read by FastRCNNOutputLayers.losses/inference: K+1 logits with background last (also with
    # sigmoid CE, which ignores the last), and box deltas viewed as (R, K, B) in
    # fast_rcnn_inference / box_reg_loss, or (R, B) when class-agnostic.
    k = m.num_classes
    box_dim = len(m.box2box_transform.weights)
    agnostic = m.bbox_pred.out_features == box_dim and k != 1
    out = _rows(m.cls_score, "cls_score", NORMAL_001, space=THING, num_classes=k,
                background=True, kind="softmax + background")
    out += _rows(m.bbox_pred, "bbox_pred", NORMAL_0001, space=THING, num_classes=k,
                 block=box_dim, agnostic=agnostic, can_be_agnostic=True,
                 kind=f"class-major x {box_dim}")
    if "fed_loss_cls_weights" in dict(m.named_buffers(recurse=False)):
        # Computed from the training set's class frequencies in __init__: never sliced.
        out.append(ClassLayout("fed_loss_cls_weights", THING, k, ZERO, keep_model=True,
                               kind="dataset frequencies"))
    return out


@register_layout(MaskRCNNConvUpsampleHead)
def _mask_rcnn(m: MaskRCNNConvUpsampleHead) -> List[ClassLayout]:
    # Read by mask_rcnn_loss / mask_rcnn_inference: one channel per class, or 1 when agnostic.
    agnostic = m.predictor.out_channels == 1
    return _rows(m.predictor, "predictor", NORMAL_0001, space=THING,
                 num_classes=None if agnostic else m.predictor.out_channels,
                 agnostic=agnostic, can_be_agnostic=True, kind="mask per class")


@register_layout(RetinaNetHead)
def _retinanet(m: RetinaNetHead) -> List[ClassLayout]:
    # RetinaNet.forward permutes logits with permute_to_N_HWA_K, i.e. channel a*K + k; FCOSHead
    # is a RetinaNetHead with A = 1. A is read from the box regressor (A*4 channels), which must
    # agree with the checkpoint, so an anchor-count change is never taken for a class change.
    a = m.bbox_pred.out_channels // 4
    k = m.cls_score.out_channels // a
    bias = m.cls_score.bias.detach()
    # A freshly built head holds exactly -log((1-p)/p) with its configured prior p.
    prior = float(bias[0]) if bool((bias == bias[0]).all()) else retinanet_prior_bias(0.01)
    return _rows(m.cls_score, "cls_score", NORMAL_001, InitSpec("constant", prior), space=THING,
                 num_classes=k, repeat=a, requires=("bbox_pred.weight",),
                 kind=f"{a} anchors x classes")


@register_layout(SemSegFPNHead)
def _sem_seg_fpn(m: SemSegFPNHead) -> List[ClassLayout]:
    # Read by SemSegFPNHead.forward: channel k is stuff class k (Panoptic FPN: 0 = "things").
    return _rows(m.predictor, "predictor", MSRA, space=STUFF,
                 num_classes=m.predictor.out_channels, kind="per-pixel class")


@register_layout(KRCNNConvDeconvUpsampleHead)
def _keypoint(m: KRCNNConvDeconvUpsampleHead) -> List[ClassLayout]:
    # A ConvTranspose2d weight is (in, out, k, k): keypoints are axis 1 of the weight.
    k = m.score_lowres.out_channels
    return [
        ClassLayout("score_lowres.weight", KEYPOINT, k, MSRA, axis=1, kind="keypoint heatmaps"),
        ClassLayout("score_lowres.bias", KEYPOINT, k, ZERO, kind="keypoint heatmaps"),
    ]


def _register_projects() -> None:
    """Layouts of detectron2's bundled projects, each registered when it can be imported.

    Each project is tried on its own: PointRend's package imports cv2 (for a data augmentation),
    and an install without OpenCV must still get DeepLab's layouts.
    """
    try:
        from detectron2.projects.deeplab.semantic_seg import DeepLabV3Head, DeepLabV3PlusHead
    except ImportError as e:  # a detectron2 installed without its projects
        logger.debug(f"detectron2's DeepLab project not available, layouts not registered: {e}")
    else:
        _register_deeplab(DeepLabV3Head, DeepLabV3PlusHead)
    try:
        from detectron2.projects.point_rend.mask_head import ConvFCHead
        from detectron2.projects.point_rend.point_head import StandardPointHead
        from detectron2.projects.point_rend.semantic_seg import PointRendSemSegHead
    except ImportError as e:  # no projects, or no cv2 (imported by point_rend/__init__.py)
        logger.debug(f"detectron2's PointRend project not available, layouts not registered: {e}")
    else:
        _register_point_rend(ConvFCHead, StandardPointHead, PointRendSemSegHead)


def _register_deeplab(*head_types: type) -> None:
    @register_layout(*head_types)
    def _deeplab(m: nn.Module) -> List[ClassLayout]:
        # DeepLabV3PlusHead without num_classes (Panoptic-DeepLab's instance head) has no
        # predictor and no class-dependent tensor.
        if not hasattr(m, "predictor"):
            return []
        return _rows(m.predictor, "predictor", NORMAL_0001, space=STUFF,
                     num_classes=m.predictor.out_channels, kind="per-pixel class")


def _register_point_rend(ConvFCHead: type, StandardPointHead: type,
                         PointRendSemSegHead: type) -> None:
    @register_layout(ConvFCHead)
    def _coarse_mask(m: ConvFCHead) -> List[ClassLayout]:
        # ConvFCHead.forward views the fc output as (N, K, R, R): class-major blocks of R*R.
        # Implicit PointRend's parameter head (1-d output_shape) predicts the point head's
        # parameters, whose last layer is per class inside one flat vector: two class segments
        # on one axis with non-class entries between them, which ClassLayout cannot describe
        # yet. Not covered: fvcore skips that layer, as stock detectron2 does.
        if len(m.output_shape) != 3:
            return []
        k, h, w = m.output_shape
        return _rows(m.prediction, "prediction", NORMAL_0001, space=THING, num_classes=k,
                     block=h * w, kind=f"class-major x {h}x{w}")

    @register_layout(StandardPointHead)
    def _point_head_thing(m: StandardPointHead) -> List[ClassLayout]:
        return _point_head(m, THING)

    @register_layout(PointRendSemSegHead)
    def _point_rend_sem_seg(m: PointRendSemSegHead) -> List[ClassLayout]:
        coarse = layouts_for_module(m.coarse_sem_seg_head)
        return prefixed_layouts(coarse, "coarse_sem_seg_head.") + prefixed_layouts(
            _point_head(m.point_head, STUFF), "point_head.")


def _point_head(m: nn.Module, space: str) -> List[ClassLayout]:
    # StandardPointHead.forward concatenates the K coarse logits *after* the fine-grained
    # features, into the first fc and (coarse_pred_each_layer) into every later layer and the
    # predictor: the last K input columns of those layers are class-dependent.
    agnostic = m.predictor.out_channels == 1
    k = _point_head_num_classes(m)
    layers = [(f"fc{i + 1}", fc, MSRA, i == 0 or m.coarse_pred_each_layer)
              for i, fc in enumerate(m.fc_layers)]
    layers.append(("predictor", m.predictor, NORMAL_0001,
                   not m.fc_layers or m.coarse_pred_each_layer))
    out = [
        ClassLayout(f"{name}.weight", space, k, init, axis=1, offset=layer.in_channels - k,
                    kind="coarse logits as input columns")
        for name, layer, init, has_coarse in layers
        if has_coarse and k is not None
    ]
    out += _rows(m.predictor, "predictor", NORMAL_0001, space=space,
                 num_classes=None if agnostic else k, agnostic=agnostic, can_be_agnostic=True,
                 kind="point logits")
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


_register_projects()
