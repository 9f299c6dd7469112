"""Layouts: which entries of which tensor belong to which class.

A :class:`ClassLayout` describes one axis of one state-dict tensor as one or more segments::

    [offset non-class entries] + repeat x ([K class blocks] + [background block]?)

with every block ``block`` entries long (a second segment on the same axis is a
:class:`ClassSegment`). Layouts are discovered from the model's *modules* (by type, through
:func:`register_layout`), never by matching parameter names, so subclasses and renamed
attributes are found too. Each layout function names the detectron2 code that reads the layout
it describes.

A layout also says how its entries of several source classes merge into one target class
(``CLASS_MAP "vehicle=car+truck+bus"``), as its ``merge`` rule:

* :data:`MEAN`: the mean of the parts. Box regression, mask and point-logit rows, and every
  classifier's weights: a linear layer with averaged rows outputs the average of its parts.
* :data:`MEAN_LOG_COUNT`: the mean plus log(count), for a classifier's bias (softmax heads:
  box classifier, semantic heads; sigmoid / focal heads: RetinaNet, FCOS). The merged logit is
  then mean(z) + log n, which never exceeds the parts' log-sum-exp (Jensen: mean(e^z) >=
  e^mean(z)), with equality when the parts agree. For a softmax, log-sum-exp is the logit of
  the union (its probability is the sum of the parts'). For a sigmoid over mutually exclusive
  classes it is below the union's log-odds, logit(sum p) >= log sum p/(1-p) = log-sum-exp.
  Either way the merged class scores no more than its parts together, and as much when they
  agree.
* :data:`SUM`: the sum of the parts, for input columns fed with the class's own logits
  (PointRend's point head): when the parts' logits agree, the layer computes what it did.

Shape shorthand: K = number of classes, A = anchors per location, B = box_dim (4, or 5 for
rotated boxes), R = mask resolution, C = channels of the implicit point head.
"""
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type

import torch
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from .entries import BACKGROUND, CLASS, NON_CLASS, EntrySources, SourceIndex, source_parts
from .fresh import MSRA, NORMAL_0001, NORMAL_001, ZERO, InitSpec, retinanet_prior_bias

__all__ = [
    "ClassLayout",
    "ClassSegment",
    "SourceAxis",
    "register_layout",
    "find_layouts",
    "layouts_for_module",
    "prefixed_layouts",
    "retarget",
    "THING",
    "STUFF",
    "KEYPOINT",
    "MEAN",
    "MEAN_LOG_COUNT",
    "SUM",
]

logger = logging.getLogger(__name__)

#: Class spaces. Detection heads share the "thing" classes; semantic-segmentation heads use the
#: "stuff" classes (for Panoptic FPN, index 0 is the merged "things"); keypoint heads have
#: keypoints, which are never mapped by name, only reinitialised when their count changes.
THING, STUFF, KEYPOINT = "thing", "stuff", "keypoint"

#: Merge rules (see the module docstring).
MEAN, MEAN_LOG_COUNT, SUM = "mean", "mean + log(count)", "sum"

def merge_weights(rule: str, count: int) -> Tuple[float, float]:
    """(weight of each part, shift) merging ``count`` parts by ``rule``; (1, 0) for one part."""
    if count == 1:
        return 1.0, 0.0
    if rule == SUM:
        return 1.0, 0.0
    if rule == MEAN_LOG_COUNT:
        return 1.0 / count, math.log(count)
    if rule == MEAN:
        return 1.0 / count, 0.0
    raise ValueError(f"Unknown merge rule {rule!r}; use one of {MEAN!r}, {MEAN_LOG_COUNT!r}, "
                     f"{SUM!r}.")


@dataclass(frozen=True)
class ClassSegment:
    """One run of class blocks on an axis: ``offset`` non-class entries, then ``repeat`` x
    (K blocks + a background block if ``background``), every block ``block`` entries long."""

    offset: int = 0
    block: int = 1
    repeat: int = 1
    background: bool = False

    def length(self, num_classes: int, agnostic: bool = False) -> int:
        return self.offset + self.repeat * self.per_repeat(num_classes, agnostic) * self.block

    def per_repeat(self, num_classes: int, agnostic: bool = False) -> int:
        """Blocks in one repeat: the K classes and the background, or the one agnostic block."""
        return 1 if agnostic else num_classes + int(self.background)


class SourceAxis(NamedTuple):
    """How one source checkpoint's tensor reads on a layout's axis: its K, or agnostic."""

    num_classes: int
    agnostic: bool = False


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
        segments (tuple[ClassSegment]): further class segments on the same axis, after the one
            the fields above describe (Implicit PointRend's parameters: weights, then biases).
        merge (str): how entries of several source classes merge into one target class:
            :data:`MEAN`, :data:`MEAN_LOG_COUNT` or :data:`SUM`.
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
    segments: Tuple[ClassSegment, ...] = ()
    merge: str = MEAN
    agnostic: bool = False
    can_be_agnostic: bool = False
    requires: Tuple[str, ...] = ()
    keep_model: bool = False
    kind: str = ""

    def all_segments(self) -> Tuple[ClassSegment, ...]:
        """Every class segment of the axis, in order: this layout's own, then ``segments``."""
        own = ClassSegment(self.offset, self.block, self.repeat, self.background)
        return (own,) + self.segments

    def length(self, num_classes: int, agnostic: bool = False) -> int:
        """Length of the class axis for ``num_classes`` classes (or the agnostic form)."""
        return sum(seg.length(num_classes, agnostic) for seg in self.all_segments())

    def count_classes(self, length: int) -> Optional[int]:
        """K such that ``length(K) == length``, or None if no K fits."""
        segments = self.all_segments()
        # length(K) = fixed + K * unit: offsets and background blocks, then one block per class.
        fixed = sum(seg.offset + seg.repeat * int(seg.background) * seg.block for seg in segments)
        unit = sum(seg.repeat * seg.block for seg in segments)
        span = length - fixed
        if span <= 0 or span % unit:
            return None
        return span // unit

    def is_agnostic_length(self, length: int) -> bool:
        return self.can_be_agnostic and length == self.length(1, agnostic=True)

    def entry_sources(
        self,
        source_index: Sequence[SourceIndex],
        sources: Sequence[Optional[SourceAxis]],
        *,
        checkpoint: Sequence[int] = (),
        target_agnostic: bool = False,
    ) -> EntrySources:
        """For each entry of the target axis, the weighted set of source entries it is made of.

        Args:
            source_index: for each target class, where it comes from (:data:`SourceIndex`);
                the parts of a merged class combine by this layout's ``merge`` rule.
            sources: for each source checkpoint, how its tensor reads on this axis; None where
                it has no usable tensor, whose classes are fresh here. The first checkpoint
                must be given: the non-class entries and the background block are its own.
            checkpoint: for each target class, the checkpoint its source classes belong to;
                empty: all belong to the first.
            target_agnostic: the model's tensor is the one-block agnostic form: it takes the
                first checkpoint's agnostic block, or is fresh from a class-specific source.
                An agnostic source feeds every target class of its checkpoint.

        Returns:
            The :class:`EntrySources` of the whole axis: copies of single source entries for
            kept, reordered and split classes and for the non-class and background entries.
        """
        slots = _ClassSlots.of(self, source_index, sources, checkpoint, target_agnostic)
        starts = [_segment_starts(self, s) if s is not None else None for s in sources]
        runs: List[EntrySources] = []
        for i, seg in enumerate(self.all_segments()):
            runs.append(_plain_run(starts[0][i] - seg.offset, seg.offset))
            for a in range(seg.repeat):
                # Where repeat ``a`` of this segment starts in each checkpoint's tensor.
                bases = torch.tensor([
                    start[i] + a * seg.per_repeat(s.num_classes, s.agnostic) * seg.block
                    if s is not None else 0 for start, s in zip(starts, sources)])
                runs.append(slots.blocks(bases, seg.block, seg.background))
        return EntrySources.cat(runs)

    def describe(self) -> str:
        parts = [self.kind] if self.kind else []
        if self.agnostic:
            parts.append("class-agnostic")
        return ", ".join(parts)


def _segment_starts(layout: ClassLayout, source: SourceAxis) -> List[int]:
    """Where each segment's first class block starts on a source axis read as ``source``."""
    starts, position = [], 0
    for seg in layout.all_segments():
        starts.append(position + seg.offset)
        position += seg.length(source.num_classes, source.agnostic)
    return starts


def _plain_run(start: int, length: int) -> EntrySources:
    """``length`` non-class entries copied from the first checkpoint's ``start`` onwards."""
    return EntrySources(
        torch.arange(start, start + length).view(1, -1),
        torch.ones(1, length, dtype=torch.float64), torch.zeros(length, dtype=torch.float64),
        torch.zeros(length, dtype=torch.long), torch.full((length,), NON_CLASS))


@dataclass(frozen=True)
class _ClassSlots:
    """The blocks of one repeat of a segment, at class level: for each target block (the
    target classes, then the background), its source blocks with their weights.

    ``index[r, j]`` is a block number within one repeat of the source (-1 past the end).
    """

    index: torch.Tensor  # [R, J]
    weight: torch.Tensor  # [R, J] float64
    shift: torch.Tensor  # [J] float64
    checkpoint: torch.Tensor  # [J]
    kind: torch.Tensor  # [J]

    @staticmethod
    def of(layout: ClassLayout, source_index: Sequence[SourceIndex],
           sources: Sequence[Optional[SourceAxis]], checkpoint: Sequence[int],
           target_agnostic: bool) -> "_ClassSlots":
        first = sources[0]
        slots: List[Tuple[Tuple[int, ...], int, int]] = []  # (blocks, checkpoint, kind)
        if target_agnostic:
            slots.append(((0,) if first.agnostic else (), 0, CLASS))
        else:
            for j, index in enumerate(source_index):
                c = checkpoint[j] if checkpoint else 0
                source = sources[c]
                parts = () if source is None else (0,) if source.agnostic else source_parts(index)
                slots.append((parts, c, CLASS))
            if any(seg.background for seg in layout.all_segments()):
                slots.append(((() if first.agnostic else (first.num_classes,)), 0, BACKGROUND))
        depth = max(1, max(len(parts) for parts, _, _ in slots))
        rules = [merge_weights(layout.merge, len(parts)) if parts else (0.0, 0.0)
                 for parts, _, _ in slots]
        index = torch.tensor([[parts[r] if r < len(parts) else -1 for parts, _, _ in slots]
                              for r in range(depth)], dtype=torch.long)
        weight = torch.tensor([[w if r < len(parts) else 0.0 for (parts, _, _), (w, _) in
                                zip(slots, rules)] for r in range(depth)], dtype=torch.float64)
        return _ClassSlots(index, weight, torch.tensor([shift for _, shift in rules],
                                                       dtype=torch.float64),
                           torch.tensor([c for _, c, _ in slots]),
                           torch.tensor([k for _, _, k in slots]))

    def blocks(self, bases: torch.Tensor, block: int, background: bool) -> EntrySources:
        """The entries of one repeat: ``bases[c]`` is where it starts in checkpoint c."""
        depth, count = self.index.shape
        if not background:  # the segment has no background block: leave its slot out
            count = int((self.kind != BACKGROUND).sum())
        index = self.index[:, :count]
        entries = bases[self.checkpoint[:count]].view(1, -1, 1) + index.unsqueeze(2) * block \
            + torch.arange(block).view(1, 1, -1)
        entries = torch.where(index.unsqueeze(2) >= 0, entries, -1).reshape(depth, -1)
        return EntrySources(
            entries, self.weight[:, :count].repeat_interleave(block, dim=1),
            self.shift[:count].repeat_interleave(block),
            self.checkpoint[:count].repeat_interleave(block),
            self.kind[:count].repeat_interleave(block))


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


def _rows(layer: nn.Module, name: str, weight_init: InitSpec, bias_init: InitSpec = ZERO, *,
          classifier: bool = False, **kw) -> List[ClassLayout]:
    """Layouts for a layer whose output rows (weight dim 0, bias) are class-dependent.

    A ``classifier`` layer's rows are class logits: merged classes raise the bias by
    log(count) (:data:`MEAN_LOG_COUNT`); other rows merge by their mean.
    """
    out = [ClassLayout(f"{name}.weight", init=weight_init, merge=MEAN, **kw)]
    if getattr(layer, "bias", None) is not None:
        out.append(ClassLayout(f"{name}.bias", init=bias_init,
                               merge=MEAN_LOG_COUNT if classifier else MEAN, **kw))
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
                background=True, classifier=True, kind="softmax + background")
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
                 num_classes=k, repeat=a, requires=("bbox_pred.weight",), classifier=True,
                 kind=f"{a} anchors x classes")


@register_layout(SemSegFPNHead)
def _sem_seg_fpn(m: SemSegFPNHead) -> List[ClassLayout]:
    # Read by SemSegFPNHead.forward: channel k is stuff class k (Panoptic FPN: 0 = "things").
    return _rows(m.predictor, "predictor", MSRA, space=STUFF, classifier=True,
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
        from detectron2.projects.point_rend.mask_head import (
            ConvFCHead,
            ImplicitPointRendMaskHead,
        )
        from detectron2.projects.point_rend.point_head import StandardPointHead
        from detectron2.projects.point_rend.semantic_seg import PointRendSemSegHead
    except ImportError as e:  # no projects, or no cv2 (imported by point_rend/__init__.py)
        logger.debug(f"detectron2's PointRend project not available, layouts not registered: {e}")
    else:
        _register_point_rend(ConvFCHead, ImplicitPointRendMaskHead, StandardPointHead,
                             PointRendSemSegHead)


def _register_deeplab(*head_types: type) -> None:
    @register_layout(*head_types)
    def _deeplab(m: nn.Module) -> List[ClassLayout]:
        # DeepLabV3PlusHead without num_classes (Panoptic-DeepLab's instance head) has no
        # predictor and no class-dependent tensor.
        if not hasattr(m, "predictor"):
            return []
        return _rows(m.predictor, "predictor", NORMAL_0001, space=STUFF, classifier=True,
                     num_classes=m.predictor.out_channels, kind="per-pixel class")


def _register_point_rend(ConvFCHead: type, ImplicitPointRendMaskHead: type,
                         StandardPointHead: type, PointRendSemSegHead: type) -> None:
    @register_layout(ConvFCHead)
    def _coarse_mask(m: ConvFCHead) -> List[ClassLayout]:
        # ConvFCHead.forward views the fc output as (N, K, R, R): class-major blocks of R*R.
        # With a 1-d output_shape it is Implicit PointRend's parameter head, whose layout only
        # its mask head knows (below).
        if len(m.output_shape) != 3:
            return []
        k, h, w = m.output_shape
        return _rows(m.prediction, "prediction", NORMAL_0001, space=THING, num_classes=k,
                     block=h * w, kind=f"class-major x {h}x{w}")

    @register_layout(ImplicitPointRendMaskHead)
    def _implicit_point_rend(m: ImplicitPointRendMaskHead) -> List[ClassLayout]:
        # The parameter head predicts every parameter of the point head's MLP as one flat
        # vector, which ImplicitPointHead._parse_params splits as [weights of each layer] +
        # [biases of each layer]. The last layer's are per class: its weights, viewed as
        # (K, C), end the weights; its biases (K) end the vector. Two class segments on one
        # axis: K blocks of C after the other layers' weights, then K blocks of 1 after the
        # other layers' biases.
        head = m.point_head
        agnostic = head.num_classes == 1
        segments = (ClassSegment(offset=sum(head.num_bias_params[:-1])),)
        return _rows(m.parameter_head.prediction, "parameter_head.prediction", NORMAL_0001,
                     space=THING, num_classes=None if agnostic else head.num_classes,
                     offset=sum(head.num_weight_params[:-1]), block=head.channels,
                     segments=segments, agnostic=agnostic, can_be_agnostic=True,
                     kind=f"point-head parameters: {head.channels} weights + 1 bias per class")

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
                    merge=SUM, kind="coarse logits as input columns")
        for name, layer, init, has_coarse in layers
        if has_coarse and k is not None
    ]
    # Point logits are mask logits (sigmoid per class) for instances, class logits (softmax)
    # for semantic segmentation.
    out += _rows(m.predictor, "predictor", NORMAL_0001, space=space,
                 num_classes=None if agnostic else k, agnostic=agnostic, can_be_agnostic=True,
                 classifier=space == STUFF, kind="point logits")
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
