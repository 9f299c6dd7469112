"""Layouts: which entries of which tensor belong to which class (the value types and registry).

A :class:`ClassLayout` describes one axis of one state-dict tensor as one or more segments::

    [offset non-class entries] + repeat x ([K class blocks] + [background block]?)

with every block ``block`` entries long (a second segment on the same axis is a
:class:`ClassSegment`). Layouts are discovered from the model's *modules* (by type, through
:func:`register_layout`), never by matching parameter names, so subclasses and renamed
attributes are found too. Each layout function names the code that reads the layout it
describes; they live one module per model family beside this one (``detectron2.py``,
``point_rend.py``, ``deeplab.py``, and the projects'). A family registers by the qualified name
of its module classes, so nothing here imports a project that is not installed.

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

Shape shorthand: K = number of classes.
"""
import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import torch
from torch import nn

from ..entries import BACKGROUND, CLASS, NON_CLASS, EntrySources, SourceIndex, source_parts
from ..fresh import ZERO, InitSpec

__all__ = [
    "ClassLayout",
    "ClassSegment",
    "LayoutFn",
    "PROBED_ATTR",
    "SourceAxis",
    "class_rows",
    "register_layout",
    "find_layouts",
    "layouts_for_module",
    "prefixed_layouts",
    "merge_weights",
    "no_object_weights",
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
        keep_model (bool): a buffer computed from the dataset; the model's own value is kept
            when the classes change, and its length is not read as a class count.
        vocabulary (bool): the model's class vocabulary as its config defines it (Detic's
            zero-shot text embeddings, fed-loss frequencies read from a file): always the
            model's own value, never taken from a checkpoint, also when the classes look
            unchanged. Unless ``keep_model``, the checkpoint's tensor still gives its class
            count (Detic's embedding columns do; a frequency file's length need not).
        kind (str): a short description for reports ("softmax + background", ...).
        config_key (str): the config key that sets this head's class count, for messages
            ("MODEL.ROI_HEADS.NUM_CLASSES"); empty when no config key is known.
        opaque (bool): which entry belongs to which class is unknown (the probe found the
            axis grows by ``block`` > 1 entries per class, or carries extra entries, and no
            layout is registered): never mapped by name; when the classes change, every entry
            is drawn from ``init`` (``strict`` raises).
        seed_key (str): the key whose seed draws fresh entries; empty: ``key``. Two names of one
            shared tensor (a module registered under two prefixes) give the same one, so that
            both get identical values.
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
    vocabulary: bool = False
    kind: str = ""
    config_key: str = ""
    opaque: bool = False
    seed_key: str = ""

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


@functools.lru_cache(maxsize=8)
def _single_sources(source_index: Tuple[SourceIndex, ...]) -> Optional[torch.Tensor]:
    """Each target class's one source class (-1: none), or None when a class merges several.

    Cached: every class tensor of a model reads the same mapping (8 of them in a cascade), and
    this is the one pass of Python over its classes; callers never modify the tensor.
    """
    flat = [-1 if i is None else i if isinstance(i, int) else -2 for i in source_index]
    return None if -2 in flat else torch.tensor(flat, dtype=torch.long)


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
        background = not target_agnostic and any(seg.background
                                                  for seg in layout.all_segments())
        single = None
        if not target_agnostic and not checkpoint and not first.agnostic:
            single = _single_sources(tuple(source_index))
        if single is not None:
            # One checkpoint and no merge (the common case): each class is one source block of
            # weight 1, or none; tensor work, whatever the number of classes.
            index = torch.cat([single, torch.tensor([first.num_classes] if background else [],
                                                    dtype=torch.long)]).view(1, -1)
            kind = torch.full((index.shape[1],), CLASS, dtype=torch.long)
            kind[len(single):] = BACKGROUND
            return _ClassSlots(index, (index >= 0).to(torch.float64),
                               torch.zeros(index.shape[1], dtype=torch.float64),
                               torch.zeros(index.shape[1], dtype=torch.long), kind)
        if target_agnostic:
            parts: List[Tuple[int, ...]] = [(0,) if first.agnostic else ()]
            cps: List[int] = [0]
        else:
            parts, cps = [], []
            for j, index in enumerate(source_index):
                c = checkpoint[j] if checkpoint else 0
                source = sources[c]
                parts.append(() if source is None else (0,) if source.agnostic
                             else source_parts(index))
                cps.append(c)
        kinds = [CLASS] * len(parts)
        if background:
            parts.append(() if first.agnostic else (first.num_classes,))
            cps.append(0)
            kinds.append(BACKGROUND)
        return _ClassSlots._of_parts(layout.merge, parts, cps, kinds)

    @staticmethod
    def _of_parts(merge: str, parts: List[Tuple[int, ...]], checkpoint: List[int],
                  kinds: List[int]) -> "_ClassSlots":
        """The slots of blocks ``parts`` (per target block, its source blocks), merged by
        ``merge``."""
        lengths = [len(p) for p in parts]
        depth = max(1, max(lengths))
        rules = {n: merge_weights(merge, n) if n else (0.0, 0.0) for n in set(lengths)}
        if depth == 1:
            index = torch.tensor([[p[0] if p else -1 for p in parts]], dtype=torch.long)
        else:
            index = torch.tensor([[p[r] if r < len(p) else -1 for p in parts]
                                  for r in range(depth)], dtype=torch.long)
        weight = torch.tensor([rules[n][0] for n in lengths], dtype=torch.float64)
        used = torch.arange(depth).view(-1, 1) < torch.tensor(lengths).view(1, -1)
        return _ClassSlots(index, torch.where(used, weight, 0.0),
                           torch.tensor([rules[n][1] for n in lengths], dtype=torch.float64),
                           torch.tensor(checkpoint, dtype=torch.long),
                           torch.tensor(kinds, dtype=torch.long))

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
#: The model attribute holding the layouts the probe found for tensors no registered layout
#: claims (set by d2_reclass.integration.probe; read by :func:`find_layouts`).
PROBED_ATTR = "_d2_reclass_probed"
#: Layout functions by module type, or by the qualified name of a class ("pkg.module.Class"),
#: so that a project's layouts register without importing the project.
_LAYOUTS: Dict[Union[type, str], LayoutFn] = {}


def register_layout(
    *module_types: Union[Type[nn.Module], str]
) -> Callable[[LayoutFn], LayoutFn]:
    """Register ``fn(module) -> list[ClassLayout]`` for modules of these types (and subclasses).

    A type may be given as its qualified name, ``"package.module.ClassName"`` (its
    ``__module__`` and ``__qualname__``): the function applies whenever such a module is in a
    model, and the package is never imported here. Keys in the returned layouts are relative
    to the module. A registered module claims its whole subtree: layouts of its children are
    not searched separately, so a parent can assign its children's class space (PointRend's
    semantic head does). Example, for a DETR-style head with K+1 "no object"-last logits
    (:func:`class_rows` gives a classifier's bias the classifier's merge rule)::

        @register_layout("models.detr.DETR")
        def _detr(m):
            init = linear_default_init(m.class_embed)
            return class_rows(m.class_embed, "class_embed", init, init, space=THING,
                              num_classes=m.class_embed.out_features - 1, background=True,
                              classifier=True)

    Fresh-entry inits for the common heads: :func:`~d2_reclass.fresh.linear_default_init`,
    :func:`~d2_reclass.fresh.prior_bias_init`, :func:`~d2_reclass.fresh.xavier_uniform_init`,
    ``NORMAL_001`` (all exported by ``d2_reclass``); [docs/api.md](docs/api.md) has the recipe.
    """

    def deco(fn: LayoutFn) -> LayoutFn:
        for t in module_types:
            _LAYOUTS[t] = fn
        return fn

    return deco


def _lookup(module: nn.Module) -> Optional[LayoutFn]:
    for t in type(module).__mro__:
        fn = _LAYOUTS.get(t) or _LAYOUTS.get(f"{t.__module__}.{t.__qualname__}")
        if fn is not None:
            return fn
    return None


def prefixed_layouts(layouts: List[ClassLayout], prefix: str) -> List[ClassLayout]:
    """``layouts`` with ``prefix`` put before their keys (and the keys they require)."""
    return [replace(lay, key=prefix + lay.key, requires=tuple(prefix + r for r in lay.requires))
            for lay in layouts]


def layouts_for_module(
    module: nn.Module, unreadable: Optional[List[Tuple[str, str]]] = None
) -> List[ClassLayout]:
    """Layouts of ``module`` and its subtree, with keys relative to ``module``.

    A layout function that cannot read its module (a third-party head built otherwise than it
    expects: an ``nn.Sequential`` where a ``Linear`` was assumed) never fails the search: that
    module's tensors are left unrecognised, a warning names it, and ``(module name, reason)``
    is appended to ``unreadable`` when given.
    """
    found: List[ClassLayout] = []
    claimed: List[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(c) for c in claimed):
            continue
        fn = _lookup(m)
        if fn is None:
            continue
        prefix = name + "." if name else ""
        claimed.append(prefix)
        try:
            layouts = fn(m)
        except Exception as e:  # third-party code: any attribute or shape may differ
            reason = f"{type(e).__name__}: {e}"
            logger.warning(
                f"Cannot read the class layout of {name or 'the model'} "
                f"({type(m).__name__}): {reason}. Its tensors are not recognised as class "
                "tensors; register a layout for it (d2_reclass.register_layout).")
            if unreadable is not None:
                unreadable.append((name, reason))
            layouts = []
        found.extend(prefixed_layouts(layouts, prefix))
        if not name:
            break
    return found


def find_layouts(
    model: nn.Module, unreadable: Optional[List[Tuple[str, str]]] = None
) -> List[ClassLayout]:
    """Every class-dependent tensor of ``model``, with full state-dict keys: the registered
    layouts, then those the probe left on the model (:data:`PROBED_ATTR`) for tensors no
    registered layout claims.

    DataParallel / DistributedDataParallel wrappers are looked through, as fvcore's
    Checkpointer does, so keys carry no ``module.`` prefix. ``unreadable`` is as in
    :func:`layouts_for_module`.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    found = layouts_for_module(model, unreadable)
    probed = getattr(model, PROBED_ATTR, None)
    if probed:
        # Registered layouts keep precedence: they carry the exact init and interleaving.
        claimed = {lay.key for lay in found}
        found += [lay for lay in probed if lay.key not in claimed]
    return found


def retarget(
    layouts: Sequence[ClassLayout], shapes: Mapping[str, Sequence[int]], num_classes: int
) -> Tuple[List[ClassLayout], Dict[str, torch.Tensor]]:
    """The same heads built for ``num_classes``: their layouts, and meta tensors of their
    shapes (the engine reads target shapes only; meta tensors cost no memory).

    Dataset-derived buffers (``keep_model``) and vocabularies are left out: they have no shape
    to derive (a config gives them).
    """
    new = [replace(lay, num_classes=None if lay.agnostic else num_classes)
           for lay in layouts if not lay.keep_model and not lay.vocabulary]
    targets: Dict[str, torch.Tensor] = {}
    for lay in new:
        shape = list(targets[lay.key].shape if lay.key in targets else shapes[lay.key])
        shape[lay.axis] = lay.length(num_classes, agnostic=lay.agnostic)
        targets[lay.key] = torch.empty(shape, device="meta")
    return new, targets


def no_object_weights(num_classes: int, config_key: str) -> ClassLayout:
    """The layout of a DETR-style set criterion's ``empty_weight``: K + 1 cross-entropy class
    weights, the no-object weight (``eos_coef``) last. Set from the config, never learnt, so
    always the model's own (DETR, Mask2Former, SparseR-CNN, DiffusionDet and detrex write it
    alike)."""
    return ClassLayout("empty_weight", THING, num_classes, ZERO, background=True,
                       keep_model=True, kind="loss weights + no object (config)",
                       config_key=config_key)


def class_rows(layer: nn.Module, name: str, weight_init: InitSpec, bias_init: InitSpec = ZERO,
               *, classifier: bool = False, **kw: Any) -> List[ClassLayout]:
    """Layouts for a layer whose output rows (weight dim 0, bias) are class-dependent.

    A ``classifier`` layer's rows are class logits: merged classes raise the bias by
    log(count) (:data:`MEAN_LOG_COUNT`); other rows merge by their mean.
    """
    out = [ClassLayout(f"{name}.weight", init=weight_init, merge=MEAN, **kw)]
    if getattr(layer, "bias", None) is not None:
        out.append(ClassLayout(f"{name}.bias", init=bias_init,
                               merge=MEAN_LOG_COUNT if classifier else MEAN, **kw))
    return out
