"""The engine: fit checkpoints' class-dependent tensors to a model's classes.

Pure: a state dict (and, to combine, further checkpoints), the model's state dict and its
layouts in; a new state dict and a :class:`ReclassReport` out. No input is ever modified, and
nothing is returned unless every check passed, so an error leaves the caller's data as it was.

:func:`reclass_state_dict` runs four phases, each a function below:

1. :func:`_read_heads`: what the checkpoints hold: for every class-dependent tensor, the class
   count each checkpoint's tensor implies, or that its shape changed for another reason;
2. :func:`_count_classes`: the classes of each space, on both sides (every head must agree);
3. :func:`_resolve_space`: each space is unchanged, reinitialised, or mapped by name (classes
   kept, reordered, split, merged, new; from the first checkpoint that knows them);
4. :func:`_refit_tensors`: every tensor, each target entry made from a weighted set of source
   entries (:mod:`d2_reclass.entries`): copies gathered bit for bit, merges computed by the
   head's rule (:mod:`d2_reclass.layouts`), new classes drawn from the head's own init.

Modes:

* ``map``: every target class found in the source copies all its entries (merged classes
  combine their parts'); the background block is carried; other classes get fresh entries.
* ``reinit``: every class entry of a changed class space is fresh.
* ``strict``: any class-dependent mismatch raises :class:`ClassMismatchError`.
* ``auto``: ``map`` when both class lists are known, else ``reinit`` when counts differ, else
  unchanged.
"""
import dataclasses
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..classes import (
    ClassMapping,
    _parse_class_map,
    build_class_mapping,
    did_you_mean,
    normalize_class_name,
)
from ..entries import CLASS, NON_CLASS, EntrySources
from ..errors import CheckpointError, ClassListError, ClassMismatchError
from ..fresh import seeded_generator
from ..layouts import KEYPOINT, STUFF, THING, ClassLayout, SourceAxis
from ..options import MODES
from .keys import copy_state_dict
from .report import NOT_RECOGNISED, ReclassReport, SpaceReport, TensorAction

__all__ = ["ClassSpec", "MODES", "SourceCheckpoint", "class_map_by_space",
           "describe_class_change", "reclass_state_dict"]

logger = logging.getLogger(__name__)


class _SpaceKeys(NamedTuple):
    """The MODEL.RECLASS keys that name one class space's lists, for messages."""

    source: str
    target: str
    dataset: str  # a builtin dataset whose metadata lists this space's classes


_KEYS = {
    THING: _SpaceKeys(
        "MODEL.RECLASS.SOURCE_CLASSES", "MODEL.RECLASS.TARGET_CLASSES", "coco_2017_train"),
    STUFF: _SpaceKeys(
        "MODEL.RECLASS.SOURCE_STUFF_CLASSES", "MODEL.RECLASS.TARGET_STUFF_CLASSES",
        "coco_2017_train_panoptic_separated"),
}


@dataclass
class ClassSpec:
    """What is known about one class space.

    Attributes:
        source: the checkpoint's class names, or None.
        target: the model's class names, or None.
        class_map: ``"target=source"`` overrides for name matching.
        source_what, target_what: how messages name these lists (config key, file, option);
            empty: the space's own ``MODEL.RECLASS`` key (``SOURCE_CLASSES`` /
            ``TARGET_CLASSES``, ``SOURCE_STUFF_CLASSES`` / ``TARGET_STUFF_CLASSES``).
        known: class names the training data has: a new target class among them is a real
            class even when its name is close to a source class (see
            :func:`~d2_reclass.classes.build_class_mapping`).
    """

    source: Optional[Sequence[str]] = None
    target: Optional[Sequence[str]] = None
    class_map: Union[None, Sequence[str], Dict[str, str]] = None
    source_what: str = ""
    target_what: str = ""
    known: Sequence[str] = ()


def class_map_by_space(
    class_map: Union[None, Sequence[str], Dict[str, str]],
    targets: Mapping[str, Optional[Sequence[str]]],
) -> Dict[str, Dict[str, str]]:
    """``CLASS_MAP`` split by class space: each entry goes to every space whose target classes
    name its target (both, for a class a panoptic stuff list shares with the things).

    Args:
        class_map: ``"target=source"`` entries (or a dict), as MODEL.RECLASS.CLASS_MAP.
        targets: per space, its target class names; None: unknown.

    Returns:
        ``{space: {target: source}}``; entries whose target no known list names go to the
        thing space when its names are unknown (its mapping then says what is missing).

    Raises:
        ClassListError: an entry names a target class that no known target list has.
    """
    entries = _parse_class_map(class_map)
    known = {space: {normalize_class_name(n) for n in names}
             for space, names in targets.items() if names is not None}
    out: Dict[str, Dict[str, str]] = {space: {} for space in targets}
    for target, source in entries.items():
        spaces = [space for space, names in known.items()
                  if normalize_class_name(target) in names]
        if not spaces and THING in known:
            every = [n for space in (THING, STUFF) for n in targets.get(space) or ()]
            lists = " or ".join(_KEYS[space].target for space in (THING, STUFF)
                                if space in known)
            raise ClassListError(
                f"CLASS_MAP names the target class {target!r}, which is not in {lists}."
                + did_you_mean(target, every))
        for space in spaces or [THING]:
            out.setdefault(space, {})[target] = source
    return out


def _named(space: str, spec: ClassSpec) -> ClassSpec:
    """``spec`` with both lists named: by the caller, else by the space's MODEL.RECLASS key."""
    keys = _KEYS.get(space)
    source_what = keys.source if keys else f"the checkpoint's {space} classes"
    target_what = keys.target if keys else f"the model's {space} classes"
    return dataclasses.replace(spec, source_what=spec.source_what or source_what,
                               target_what=spec.target_what or target_what)


def _source_names_hint(space: str) -> str:
    """How to give a space's source class names, in config keys."""
    keys = _KEYS.get(space)
    if keys is None:
        return f"give its {space} class names, or use MODE reinit"
    return (f"set {keys.source} or SOURCE_DATASET (a dataset with {space}_classes, e.g. "
            f"{keys.dataset}), map classes by index with CLASS_MAP 'target=INDEX', or use "
            "MODE reinit")


@dataclass(frozen=True)
class SourceCheckpoint:
    """A further checkpoint whose class entries target classes may take (combining; see
    :mod:`d2_reclass.engine.combine`, which also checks that its other tensors are the first's).

    Attributes:
        state_dict: its tensors (not modified).
        classes: per class space, its class names in its order; a space it names no classes
            of takes nothing from it.
        name: how messages and the report name it (a file).
    """

    state_dict: Mapping[str, torch.Tensor]
    classes: Mapping[str, Sequence[str]]
    name: str


@dataclass
class _Reading:
    layout: ClassLayout
    num_classes: Optional[int]  # K the checkpoint tensor implies, if any
    agnostic: bool  # the checkpoint tensor has the one-block agnostic length


@dataclass
class _Head:
    """One class-dependent tensor of the model and how each checkpoint's tensor reads.

    ``readings[c]`` is None where checkpoint ``c`` has no such tensor, or one whose shape
    differs for another reason than classes: its classes get no entries from it here.
    """

    key: str
    layouts: List[ClassLayout]
    readings: List[Optional[List[_Reading]]] = field(default_factory=list)


class _Further(NamedTuple):
    """A further checkpoint that names the classes of a space."""

    index: int  # among the engine's checkpoints (0 is the first)
    names: List[str]
    name: str  # the checkpoint, for messages
    what: str  # its class list, for messages


def _read(layout: ClassLayout, ckpt: torch.Tensor, model: torch.Tensor) -> Optional[_Reading]:
    if ckpt.dim() != model.dim() or layout.axis >= model.dim():
        return None
    n = ckpt.shape[layout.axis]
    k = layout.count_classes(n)
    agnostic = layout.is_agnostic_length(n)
    if k is None and not agnostic:
        return None
    return _Reading(layout, k, agnostic)


def _same_classes(spec: ClassSpec) -> bool:
    norm = [normalize_class_name(c) for c in spec.source], [
        normalize_class_name(c) for c in spec.target
    ]
    return norm[0] == norm[1]


def describe_class_change(spec: ClassSpec, k_src: Optional[int], k_tgt: Optional[int]) -> str:
    """How the checkpoint's classes differ from the model's, in words, for error messages."""
    if spec.source is not None and spec.target is not None:
        if sorted(map(normalize_class_name, spec.source)) == sorted(
                map(normalize_class_name, spec.target)):
            return (f"the same {len(spec.target)} classes in another order (checkpoint: "
                    f"{_listing(spec.source)}; model: {_listing(spec.target)})")
        return (f"checkpoint {len(spec.source)}, model {len(spec.target)} (checkpoint: "
                f"{_listing(spec.source)}; model: {_listing(spec.target)})")
    return f"checkpoint {k_src}, model {k_tgt}" + (
        " (same count, but the names differ)" if k_src == k_tgt else "")


def _listing(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit
                                       else "")


def _consensus(values: Dict[str, int], what: str, exc: type) -> Optional[int]:
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        listing = "; ".join(f"{k}: {v}" for k, v in values.items())
        raise exc(f"{what} disagree on the number of classes ({listing}).")
    return distinct[0] if distinct else None


def reclass_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    layouts: Sequence[ClassLayout],
    *,
    classes: Optional[Mapping[str, ClassSpec]] = None,
    mode: str = "auto",
    seed: int = 0,
    source: str = "checkpoint",
    more: Sequence[SourceCheckpoint] = (),
) -> Tuple[Dict[str, torch.Tensor], ReclassReport]:
    """Return a copy of ``state_dict`` whose class-dependent tensors fit the model.

    Args:
        state_dict: the checkpoint's tensors (not modified).
        model_state: the model's state dict: target shapes, and dataset-derived buffers.
        layouts: the model's class layouts (:func:`find_layouts`).
        classes: per class space, what is known of the source and target class names.
        mode: one of :data:`MODES`.
        seed: seeds fresh entries, with each tensor's key.
        source: names the checkpoint in error messages and the report.
        more: further checkpoints to combine with this one: a target class that
            ``state_dict`` does not know takes its entries from the first of them that knows
            it. Every tensor that is not a class entry (the background block included) is
            ``state_dict``'s.

    Returns:
        The new state dict (tensors not touched are shared with ``state_dict``) and a report.
        Tensors that mismatch for reasons other than classes are left as they are, for fvcore
        to skip with its usual warning, and listed in ``report.mismatches``.

    Raises:
        ClassListError: class lists malformed or disagreeing with the checkpoint's head rows.
        ClassMismatchError: in ``strict`` mode, naming every mismatched tensor.
        CheckpointError: the checkpoint's heads disagree with each other on the class count.
    """
    if mode not in MODES:
        raise ClassListError(f"MODEL.RECLASS.MODE is {mode!r}; it must be one of {MODES}.")
    classes = dict(classes or {})
    report = ReclassReport(mode=mode, seed=seed, source=source,
                           more_sources=[m.name for m in more])
    states = [state_dict] + [m.state_dict for m in more]

    heads = _read_heads(states, model_state, layouts, report)
    _list_unrecognised(state_dict, model_state, layouts, report)
    strict_errors: List[str] = []
    for space in sorted({lay.space for head in heads.values() for lay in head.layouts}):
        spec = _named(space, classes.get(space, ClassSpec()))
        # A further checkpoint takes part in a space only where it names its classes.
        further = [_Further(i, list(m.classes[space]), m.name, f"the {space} classes of {m.name}")
                   for i, m in enumerate(more, 1) if m.classes.get(space)]
        k_src, k_tgt = _count_classes(space, heads, spec, source, further)
        report.spaces[space] = _resolve_space(space, spec, k_src, k_tgt, mode, source,
                                              further, len(more), strict_errors)
    _raise_if_strict(report, heads, state_dict, model_state, strict_errors, source)
    return _refit_tensors(heads, report, states, model_state, seed), report


# ---------------------------------------------------------------------------------------------
# 1. What the checkpoints hold
# ---------------------------------------------------------------------------------------------
def _read_heads(
    states: Sequence[Mapping[str, torch.Tensor]],
    model_state: Mapping[str, torch.Tensor],
    layouts: Sequence[ClassLayout],
    report: ReclassReport,
) -> Dict[str, _Head]:
    """Every class-dependent tensor that the first checkpoint and the model both hold, with
    each checkpoint's reading of it.

    A tensor of the first checkpoint whose shape differs from the model's for another reason
    than classes is listed in ``report.mismatches`` ("skipped": fvcore skips it, as stock
    detectron2 does); it is refitted from no checkpoint.
    """
    by_key: Dict[str, List[ClassLayout]] = defaultdict(list)
    for lay in layouts:
        if lay.key in states[0] and lay.key in model_state:
            by_key[lay.key].append(lay)
    heads = {key: _Head(key, lays) for key, lays in by_key.items()}
    for state in states:
        readings = {key: _read_tensor(head.layouts, state, model_state)
                    for key, head in heads.items() if not head.layouts[0].keep_model}
        _drop_column_misreads(readings)
        for key, head in heads.items():
            head.readings.append(readings.get(key))
    for key, head in heads.items():
        ckpt, model = states[0][key], model_state[key]
        lay0 = head.layouts[0]
        if not (lay0.keep_model or lay0.vocabulary) and head.readings[0] is None \
                and ckpt.shape != model.shape:
            report.mismatches.append(TensorAction(
                key, head.layouts[0].space, tuple(ckpt.shape), tuple(model.shape), "skipped",
                layout="not a class change"))
    return heads


def _list_unrecognised(
    state_dict: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    layouts: Sequence[ClassLayout],
    report: ReclassReport,
) -> None:
    """List in ``report.mismatches`` (``layout="not recognised"``) every tensor of the
    checkpoint whose shape differs from the model's and that no layout claims: fvcore skips it
    as stock detectron2 does, and ``strict`` raises for it; it may be a class head d2_reclass
    does not know (register a layout for it)."""
    claimed = {lay.key for lay in layouts}
    for key, ckpt in state_dict.items():
        model = model_state.get(key)
        if key in claimed or model is None or not hasattr(ckpt, "shape") \
                or tuple(ckpt.shape) == tuple(model.shape):
            continue
        report.mismatches.append(TensorAction(
            key, "", tuple(ckpt.shape), tuple(model.shape), "skipped", layout=NOT_RECOGNISED))


def _read_tensor(
    lays: Sequence[ClassLayout], state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
) -> Optional[List[_Reading]]:
    """How ``state``'s tensor reads on each of its class axes; None when it is missing or its
    shape differs from the model's elsewhere than on class axes (or in a required tensor)."""
    key = lays[0].key
    if key not in state:
        return None
    ckpt, model = state[key], model_state[key]
    axes = {lay.axis for lay in lays}
    other_dims_agree = ckpt.dim() == model.dim() and all(
        ckpt.shape[d] == model.shape[d] for d in range(model.dim()) if d not in axes)
    requires_agree = all(
        r not in state or r not in model_state or state[r].shape == model_state[r].shape
        for lay in lays for r in lay.requires)
    reads = [_read(lay, ckpt, model) for lay in lays]
    if other_dims_agree and requires_agree and all(r is not None for r in reads):
        return reads
    return None


def _drop_column_misreads(readings: Dict[str, Optional[List[_Reading]]]) -> None:
    """Set to None the readings of axes with leading non-class entries that disagree with the
    class rows of their space.

    Such an axis (PointRend's input columns, Implicit PointRend's parameters) reads K from its
    length minus the *model's* non-class entries, so a different feature width (a point head
    on a narrower FPN) reads as a different K. When the plain class rows of the same space
    agree on another K, the difference is not about classes.
    """
    reads = [r for rs in readings.values() if rs is not None for r in rs]
    for space in sorted({r.layout.space for r in reads}):
        row_counts = {r.num_classes for r in reads if r.layout.space == space
                      and not r.layout.offset and not r.agnostic and r.num_classes is not None}
        if len(row_counts) != 1:
            continue
        for key, rs in readings.items():
            if rs is not None and any(r.layout.space == space and r.layout.offset
                                      and r.num_classes not in row_counts for r in rs):
                readings[key] = None


# ---------------------------------------------------------------------------------------------
# 2. Classes per space
# ---------------------------------------------------------------------------------------------
def _count_classes(
    space: str,
    heads: Mapping[str, _Head],
    spec: ClassSpec,
    source: str,
    further: Sequence[_Further],
) -> Tuple[List[Optional[int]], Optional[int]]:
    """K of ``space`` in the first checkpoint and each of ``further``, and in the model; each
    side's heads must agree, and agree with the class lists given.

    Raises:
        CheckpointError: a checkpoint's heads disagree on K.
        ClassListError: the model's heads disagree, or a class list has another length.
    """
    counts = []
    first = _Further(0, spec.source, source, spec.source_what)
    for checkpoint, names, name, what in [first, *further]:
        found = {key: r.num_classes for key, head in heads.items()
                 for r in head.readings[checkpoint] or () if r.layout.space == space
                 and r.num_classes is not None and not r.agnostic}
        k = _consensus(found, f"The class-dependent tensors of {name}", CheckpointError)
        if names is not None and k is not None and len(names) != k:
            raise ClassListError(
                f"{what} has {len(names)} names, but {name} has heads for {k} {space} classes "
                f"({', '.join(found)}). Give the checkpoint's own class list, in its order.")
        counts.append(k or (names and len(names)))
    targets = {lay.key: lay.num_classes for head in heads.values() for lay in head.layouts
               if lay.space == space and lay.num_classes is not None and not lay.agnostic}
    k_tgt = _consensus(targets, "The model's class-dependent heads", ClassListError)
    if spec.target is not None and k_tgt is not None and len(spec.target) != k_tgt:
        raise ClassListError(
            f"{spec.target_what} has {len(spec.target)} names, but the model was built for "
            f"{k_tgt} {space} classes. Build it with NUM_CLASSES = {len(spec.target)} "
            "(MODEL.RECLASS.AUTO_NUM_CLASSES does this).")
    return counts, k_tgt


# ---------------------------------------------------------------------------------------------
# 3. Resolving each space
# ---------------------------------------------------------------------------------------------
def _resolve_space(
    space: str,
    spec: ClassSpec,
    k_src: Sequence[Optional[int]],
    k_tgt: Optional[int],
    mode: str,
    source: str,
    further: Sequence[_Further],
    num_further: int,
    strict_errors: List[str],
) -> SpaceReport:
    """How ``space`` is fitted: ``unchanged``, ``reinit``, ``map`` (with its mapping), or
    ``strict`` (its problem appended to ``strict_errors``, raised once all are known).

    The mapping numbers checkpoints as the engine does (0 the first, i the i-th of the
    ``num_further`` further ones), those that name no class of ``space`` included."""
    k_first = k_src[0]
    if k_tgt is None:
        k_tgt = len(spec.target) if spec.target is not None else k_first
    if k_first is None:
        k_first = k_tgt
    names_known = spec.source is not None and spec.target is not None
    if k_first == k_tgt and (not names_known or _same_classes(spec)):
        resolution = "unchanged"
    elif mode == "strict":
        resolution = "strict"
        strict_errors.append(f"{space} classes: {describe_class_change(spec, k_first, k_tgt)}")
    elif space == KEYPOINT:
        resolution = "reinit"
    elif mode == "map" or (mode == "auto" and names_known):
        resolution = "map"
    else:
        resolution = "reinit"
    source_names = tuple(spec.source) if spec.source is not None else None
    if resolution == "map":
        mapping = _name_mapping(space, spec, k_first, source, further, num_further)
    elif resolution == "unchanged":
        mapping = ClassMapping(source_names, _target_names(spec, k_tgt), tuple(range(k_tgt)),
                               k_first)
    else:
        mapping = ClassMapping(source_names, _target_names(spec, k_tgt), (None,) * k_tgt,
                               k_first)
    return SpaceReport(space, resolution, k_first, k_tgt, mapping,
                       spec.source_what if spec.source is not None else None)


def _target_names(spec: ClassSpec, k_tgt: int) -> Tuple[str, ...]:
    return tuple(spec.target) if spec.target is not None else tuple(f"#{i}" for i in range(k_tgt))


def _name_mapping(space: str, spec: ClassSpec, k_src: int, source: str,
                  further: Sequence[_Further], num_further: int) -> ClassMapping:
    """The ``map`` resolution's mapping, by names (and CLASS_MAP), across the checkpoints."""
    if spec.target is None:
        raise ClassListError(
            f"MODE map needs the model's {space} class names: set {spec.target_what}, "
            f"or train on registered datasets whose metadata has {space}_classes.")
    if spec.source is None and not spec.class_map:
        # The caller's source_what names a list that is missing here; say where the config
        # takes it from.
        raise ClassListError(
            f"MODE map needs the {space} class names of {source}, which stores none: "
            f"{_source_names_hint(space)}.")
    mapping = build_class_mapping(
        spec.source, spec.target, spec.class_map, num_source=k_src,
        source_what=spec.source_what, target_what=spec.target_what,
        more=[(f.names, f.what) for f in further], known=spec.known)
    if not num_further:
        return mapping
    # build_class_mapping numbers only the checkpoints it was given.
    names = {f.index: tuple(f.names) for f in further}
    index = [0] + [f.index for f in further]
    return dataclasses.replace(
        mapping, checkpoint=tuple(index[c] for c in mapping.checkpoint),
        more=tuple(names.get(i, ()) for i in range(1, num_further + 1)))


def _raise_if_strict(
    report: ReclassReport,
    heads: Mapping[str, _Head],
    state_dict: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    strict_errors: List[str],
    source: str,
) -> None:
    """In ``strict`` mode, raise one error naming every class change and mismatched tensor."""
    if not strict_errors and not (report.mode == "strict" and report.mismatches):
        return
    strict_spaces = {s for s, r in report.spaces.items() if r.resolution == "strict"}
    keys = [k for k, head in heads.items()
            if head.readings[0] is not None and head.layouts[0].space in strict_spaces]
    unrecognised = {m.key for m in report.unrecognised}
    keys += [m.key for m in report.mismatches]
    tensors = [f"  {k}: checkpoint {tuple(state_dict[k].shape)}, model "
               f"{tuple(model_state[k].shape)}" + (f" ({NOT_RECOGNISED})" if k in unrecognised
                                                   else "") for k in keys]
    what = strict_errors or ["tensors differ for reasons other than classes"
                             + (" or are not recognised" if unrecognised else "")]
    hint = (" A tensor marked 'not recognised' may be a class head d2_reclass has no layout "
            "for: register one (d2_reclass.register_layout), or load it as stock does with "
            "another mode (it is skipped)." if unrecognised else "")
    opaque = [k for k in keys if k in heads and heads[k].layouts[0].opaque]
    if opaque:
        hint += (f" {', '.join(opaque)}: which of its entries belongs to which class is unknown "
                 "(it grows by several entries per class and no layout is registered): "
                 "register its layout (d2_reclass.register_layout; the recipe is in "
                 "docs/api.md), or MODE auto re-initialises it.")
    raise ClassMismatchError(
        f"MODEL.RECLASS.MODE is 'strict' and {source} does not fit the model: "
        + "; ".join(what) + ".\n" + "\n".join(tensors) + "\nTo fix: set "
        "MODEL.RECLASS.MODE to 'map' (with class names) or 'reinit' to adapt the heads, or "
        "build the model with the checkpoint's NUM_CLASSES." + hint,
        strict_errors, tensors)


# ---------------------------------------------------------------------------------------------
# 4. Refitting each tensor
# ---------------------------------------------------------------------------------------------
def _refit_tensors(
    heads: Mapping[str, _Head],
    report: ReclassReport,
    states: Sequence[Mapping[str, torch.Tensor]],
    model_state: Mapping[str, torch.Tensor],
    seed: int,
) -> Dict[str, torch.Tensor]:
    """The first checkpoint's state dict with every refitted tensor replaced (each listed in
    ``report.tensors``); tensors left as they were are the checkpoint's own objects."""
    # Keeps torch's per-module ``_metadata`` (see d2_reclass.engine.keys): without it, modules with
    # versioned state dicts (PointRend's heads) would take the checkpoint for an old format.
    out = copy_state_dict(states[0])
    for key, head in heads.items():
        refit = _refit_head(head, report.spaces[head.layouts[0].space], states, model_state[key],
                            seed)
        if refit is not None:
            out[key], action = refit
            report.tensors.append(action)
    return out


def _refit_head(
    head: _Head,
    space: SpaceReport,
    states: Sequence[Mapping[str, torch.Tensor]],
    model: torch.Tensor,
    seed: int,
) -> Optional[Tuple[torch.Tensor, TensorAction]]:
    """The tensor to load for ``head`` and what was done, or None to load the checkpoint's
    own (it already fits, or its shape differs for another reason than classes)."""
    lay0 = head.layouts[0]
    ckpt = states[0][head.key]
    if lay0.keep_model or lay0.vocabulary:
        # A vocabulary is the model's whatever the checkpoint holds: loading the checkpoint's
        # is only left to fvcore where it is the same, bit for bit.
        if ckpt.shape == model.shape and (torch.equal(ckpt, model.detach().to(ckpt.device))
                                          if lay0.vocabulary else space.resolution == "unchanged"):
            return None
        return model.detach().clone(), TensorAction(
            head.key, lay0.space, tuple(ckpt.shape), tuple(model.shape), "model's own",
            layout=lay0.kind)
    if head.readings[0] is None or (space.resolution == "unchanged" and ckpt.shape == model.shape):
        return None
    # Heads that share one tensor under two names (seed_key) draw the same fresh entries.
    seed_key = lay0.seed_key or head.key
    if lay0.opaque:
        # Which entry is which class's is unknown (found by the probe, no layout registered):
        # never loaded as it is, never guessed; the head's init throughout.
        fresh = lay0.init.draw(model.shape, seeded_generator(seed, seed_key)).to(
            dtype=ckpt.dtype, device=ckpt.device)
        return fresh, TensorAction(head.key, lay0.space, tuple(ckpt.shape), tuple(model.shape),
                                   "fresh", 0, model.shape[lay0.axis], lay0.describe())
    plans = {lay.axis: _entry_plan(head, i, space.mapping) for i, lay in enumerate(head.layouts)}
    if ckpt.shape == model.shape and all(
            plan.is_identity(model.shape[axis]) for axis, plan in plans.items()):
        return None
    tensors = [state[head.key] if reads is not None else None
               for state, reads in zip(states, head.readings)]
    new = _assemble(plans, tensors, model.shape, lay0.init, seed, seed_key)
    return new, _tensor_action(head, plans[lay0.axis], ckpt, model)


def _entry_plan(head: _Head, i: int, mapping: ClassMapping) -> EntrySources:
    """The weighted source entries of every entry of ``head``'s ``i``-th class axis."""
    layout = head.layouts[i]
    sources: List[Optional[SourceAxis]] = []
    for c, reads in enumerate(head.readings):
        # A further checkpoint that names no class of this space gives it nothing.
        if reads is None or (c and not (c <= len(mapping.more) and mapping.more[c - 1])):
            sources.append(None)
            continue
        k = mapping.num_classes_of(c)
        # A one-block tensor reads as agnostic, unless its checkpoint really has one class.
        agnostic = reads[i].agnostic and not (reads[i].num_classes == k == 1)
        sources.append(SourceAxis(k, agnostic))
    return layout.entry_sources(
        mapping.source_index, sources, checkpoint=mapping.checkpoint,
        target_agnostic=layout.agnostic and len(mapping.target) != 1)


def _assemble(
    plans: Mapping[int, EntrySources],
    tensors: Sequence[Optional[torch.Tensor]],
    shape: torch.Size,
    init,
    seed: int,
    key: str,
) -> torch.Tensor:
    """A tensor of ``shape`` whose class axes are ``plans``' entries, taken from ``tensors``
    (one per checkpoint; the first's gives the dtype and device); entries from no checkpoint
    are those of the whole tensor drawn from ``init`` with ``seeded_generator(seed, key)``.

    An entry on several class axes (a point head's class row x coarse-logit column) exists in
    a checkpoint only if every axis takes it from that checkpoint; otherwise, like every entry
    with no source, it is drawn from the head's init.
    """
    ref = tensors[0]
    axes = sorted(plans)
    chosen = {c: [torch.nonzero(~plans[a].fresh & (plans[a].checkpoint == c)).flatten()
                  for a in axes] for c, t in enumerate(tensors) if t is not None}
    for c, sel in chosen.items():
        if all(len(s) == shape[a] for a, s in zip(axes, sel)):
            # One checkpoint gives every entry (a reorder, a subset): its gather, a new tensor,
            # is the result, with no scatter into a second one.
            values = _gather(tensors[c], {a: plans[a].select(s) for a, s in zip(axes, sel)})
            return values.to(dtype=ref.dtype, device=ref.device)
    filled = sum(math.prod(len(s) for s in sel) for sel in chosen.values())
    if filled < math.prod(len(plans[a]) for a in axes):
        out = init.draw(shape, seeded_generator(seed, key)).to(dtype=ref.dtype, device=ref.device)
    else:
        out = torch.empty(shape, dtype=ref.dtype, device=ref.device)
    for c, sel in chosen.items():
        if all(len(s) for s in sel):
            values = _gather(tensors[c], {a: plans[a].select(s) for a, s in zip(axes, sel)})
            _put(out, dict(zip(axes, sel)), values)
    return out


def _put(out: torch.Tensor, selected: Mapping[int, torch.Tensor], values: torch.Tensor) -> None:
    """``out``'s entries at the outer product of ``selected`` (per class axis) set to
    ``values``: one ``index_copy_`` along a single class axis (an advanced index of a
    broadcast grid costs several times more at 1,000 classes), the grid over several axes."""
    if len(selected) > 1:
        out[_grid(selected, out.shape)] = values
        return
    (axis, entries), = selected.items()
    out.index_copy_(axis, entries.to(out.device), values.to(out))


def _gather(source: torch.Tensor, plans: Mapping[int, EntrySources]) -> torch.Tensor:
    """The entries ``plans`` describe (none fresh), from one checkpoint's tensor: copies
    gathered as they are, merged entries computed in float64 and rounded once."""
    exact = source
    for axis, plan in plans.items():
        exact = exact.index_select(axis, plan.index[0].to(source.device))
    if all(bool(plan.copies.all()) for plan in plans.values()):
        return exact
    computed = source.double()
    copies = torch.ones((), dtype=torch.bool, device=source.device)
    for axis, plan in plans.items():
        computed = _weighted_sum(computed, axis, plan)
        copies = copies & _along(plan.copies.to(source.device), axis, source.dim())
    return torch.where(copies, exact, computed.to(source.dtype))


def _weighted_sum(values: torch.Tensor, axis: int, plan: EntrySources) -> torch.Tensor:
    """``sum_r weight[r] * values[index[r]] + shift`` along ``axis``, for every entry."""
    shape = list(values.shape)
    shape[axis] = len(plan)
    out = values.new_zeros(shape)
    for index, weight in zip(plan.index.to(values.device), plan.weight.to(values.device)):
        used = torch.nonzero(index >= 0).flatten()
        if len(used):
            taken = values.index_select(axis, index[used])
            out.index_add_(axis, used, taken * _along(weight[used], axis, values.dim()))
    return out + _along(plan.shift.to(values.device), axis, values.dim())


def _along(values: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """``values`` (1-d) shaped to broadcast along ``axis`` of a ``dims``-d tensor."""
    shape = [1] * dims
    shape[axis] = -1
    return values.view(shape)


def _grid(selected: Mapping[int, torch.Tensor], shape: torch.Size) -> Tuple[torch.Tensor, ...]:
    """Advanced index of the outer product of ``selected`` entries per class axis (every
    entry of the other axes up to the last class axis)."""
    last = max(selected)
    return tuple(
        _along(selected.get(axis, torch.arange(shape[axis])), axis, last + 1)
        for axis in range(last + 1))


def _tensor_action(head: _Head, plan: EntrySources, ckpt: torch.Tensor,
                   model: torch.Tensor) -> TensorAction:
    """The report's line for a refitted tensor, counted along its first class axis.

    ``copied`` counts class and background entries copied, ``merged`` those computed from
    several; "fresh" means no class entry came from a checkpoint (a carried background block
    does not count).
    """
    copied = int((plan.copies & (plan.kind != NON_CLASS)).sum())
    merged, fresh = int(plan.merged.sum()), int(plan.fresh.sum())
    taken = int((~plan.fresh & (plan.kind == CLASS)).sum())
    if not fresh:
        action = "merged" if merged else "copied"
    else:
        action = "mapped" if taken else "fresh"
    lay0 = head.layouts[0]
    return TensorAction(head.key, lay0.space, tuple(ckpt.shape), tuple(model.shape), action,
                        copied, fresh, lay0.describe(), merged)
