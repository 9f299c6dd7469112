"""The engine: fit a checkpoint's class-dependent tensors to a model's classes.

Pure: a state dict, the model's state dict and its layouts in; a new state dict and a
:class:`ReclassReport` out. The input state dict is never modified, and nothing is returned
unless every check passed, so an error leaves the caller's data as it was.

Modes:

* ``map``: every target class found in the source copies all its entries; the background
  block is carried; other classes get fresh entries from the head's own init.
* ``reinit``: every class entry of a changed class space is fresh.
* ``strict``: any class-dependent mismatch raises :class:`ClassMismatchError`.
* ``auto``: ``map`` when both class lists are known, else ``reinit`` when counts differ, else
  unchanged.
"""
import dataclasses
import logging
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .classes import ClassMapping, build_class_mapping, normalize_class_name
from .errors import CheckpointError, ClassListError, ClassMismatchError
from .fresh import seeded_generator
from .layouts import KEYPOINT, STUFF, THING, ClassLayout
from .options import MODES
from .report import ReclassReport, SpaceReport, TensorAction

__all__ = ["ClassSpec", "MODES", "describe_class_change", "reclass_state_dict"]

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
    """

    source: Optional[Sequence[str]] = None
    target: Optional[Sequence[str]] = None
    class_map: Union[None, Sequence[str], Dict[str, str]] = None
    source_what: str = ""
    target_what: str = ""


def _named(space: str, spec: ClassSpec) -> ClassSpec:
    """``spec`` with both lists named: by the caller, else by the space's MODEL.RECLASS key."""
    keys = _KEYS.get(space)
    source_what = keys.source if keys else f"the checkpoint's {space} classes"
    target_what = keys.target if keys else f"the model's {space} classes"
    return dataclasses.replace(spec, source_what=spec.source_what or source_what,
                               target_what=spec.target_what or target_what)


def _source_names_hint(space: str) -> str:
    """How to give a space's source class names, in config keys (CLASS_MAP covers things)."""
    keys = _KEYS.get(space)
    if keys is None:
        return f"give its {space} class names, or use MODE reinit"
    by_index = ", map classes by index with CLASS_MAP 'target=INDEX'" if space == THING else ""
    return (f"set {keys.source} or SOURCE_DATASET (a dataset with {space}_classes, e.g. "
            f"{keys.dataset}){by_index}, or use MODE reinit")


@dataclass
class _Reading:
    layout: ClassLayout
    num_classes: Optional[int]  # K the checkpoint tensor implies, if any
    agnostic: bool  # the checkpoint tensor has the one-block agnostic length


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
    report = ReclassReport(mode=mode, seed=seed, source=source)

    by_key: Dict[str, List[ClassLayout]] = defaultdict(list)
    for lay in layouts:
        if lay.key in state_dict and lay.key in model_state:
            by_key[lay.key].append(lay)

    readings: Dict[str, List[_Reading]] = {}
    for key, lays in by_key.items():
        ckpt, model = state_dict[key], model_state[key]
        if lays[0].keep_model:
            continue
        axes = {lay.axis for lay in lays}
        other_dims_agree = ckpt.dim() == model.dim() and all(
            ckpt.shape[d] == model.shape[d] for d in range(model.dim()) if d not in axes
        )
        requires_agree = all(
            r not in state_dict or r not in model_state
            or state_dict[r].shape == model_state[r].shape
            for lay in lays for r in lay.requires
        )
        reads = [_read(lay, ckpt, model) for lay in lays]
        if other_dims_agree and requires_agree and all(r is not None for r in reads):
            readings[key] = reads
        elif ckpt.shape != model.shape:
            report.mismatches.append(TensorAction(
                key, lays[0].space, tuple(ckpt.shape), tuple(model.shape), "skipped",
                layout="not a class change"))

    # Input columns (offset > 0) read K as the checkpoint's width minus the *model's* non-class
    # width, so a different feature width (PointRend's point head on a narrower FPN) reads as a
    # different K. When the class rows of the same space agree on another K, such a column
    # mismatch is not about classes: it is skipped like any other, not taken for a class change.
    for space in sorted({r.layout.space for reads in readings.values() for r in reads}):
        row_counts = {r.num_classes for reads in readings.values() for r in reads
                      if r.layout.space == space and not r.layout.offset and not r.agnostic
                      and r.num_classes is not None}
        if len(row_counts) != 1:
            continue
        for key in [key for key, reads in readings.items() if any(
                r.layout.space == space and r.layout.offset and r.num_classes not in row_counts
                for r in reads)]:
            del readings[key]
            if state_dict[key].shape != model_state[key].shape:
                report.mismatches.append(TensorAction(
                    key, space, tuple(state_dict[key].shape), tuple(model_state[key].shape),
                    "skipped", layout="not a class change"))

    # Class counts per space, on each side; every head must agree.
    spaces = sorted({lay.space for lays in by_key.values() for lay in lays})
    specs = {space: _named(space, classes.get(space, ClassSpec())) for space in spaces}
    src_counts: Dict[str, Optional[int]] = {}
    tgt_counts: Dict[str, Optional[int]] = {}
    for space in spaces:
        spec = specs[space]
        src = {key: r.num_classes for key, reads in readings.items() for r in reads
               if r.layout.space == space and r.num_classes is not None and not r.agnostic}
        ambiguous = {key: r.num_classes for key, reads in readings.items() for r in reads
                     if r.layout.space == space and r.agnostic and r.num_classes is not None}
        k_src = _consensus(src, f"The class-dependent tensors of {source}", CheckpointError)
        if k_src is None and ambiguous:
            k_src = spec.source and len(spec.source)
        tgt = {lay.key: lay.num_classes for lays in by_key.values() for lay in lays
               if lay.space == space and lay.num_classes is not None and not lay.agnostic}
        k_tgt = _consensus(tgt, "The model's class-dependent heads", ClassListError)
        if spec.source is not None and k_src is not None and len(spec.source) != k_src:
            raise ClassListError(
                f"{spec.source_what} has {len(spec.source)} names, but {source} has heads for "
                f"{k_src} {space} classes ({', '.join(src)}). Give the checkpoint's own class "
                "list, in its order."
            )
        if spec.target is not None and k_tgt is not None and len(spec.target) != k_tgt:
            raise ClassListError(
                f"{spec.target_what} has {len(spec.target)} names, but the model was built for "
                f"{k_tgt} {space} classes. Build it with NUM_CLASSES = {len(spec.target)} "
                "(MODEL.RECLASS.AUTO_NUM_CLASSES does this)."
            )
        src_counts[space], tgt_counts[space] = k_src or (spec.source and len(spec.source)), k_tgt

    # Resolve each space to map / reinit / unchanged.
    mappings: Dict[str, ClassMapping] = {}
    strict_errors: List[str] = []
    for space in spaces:
        spec = specs[space]
        k_src, k_tgt = src_counts[space], tgt_counts[space]
        if k_tgt is None:
            k_tgt = len(spec.target) if spec.target is not None else k_src
        if k_src is None:
            k_src = k_tgt
        names_known = spec.source is not None and spec.target is not None
        same = k_src == k_tgt and (not names_known or _same_classes(spec))
        if same:
            resolution = "unchanged"
        elif mode == "strict":
            resolution = "strict"
            strict_errors.append(f"{space} classes: {describe_class_change(spec, k_src, k_tgt)}")
        elif space == KEYPOINT:
            resolution = "reinit"
        elif mode == "map" or (mode == "auto" and names_known):
            resolution = "map"
        else:
            resolution = "reinit"
        target_names = spec.target if spec.target is not None else [f"#{i}" for i in range(k_tgt)]
        if resolution == "map":
            if spec.target is None:
                raise ClassListError(
                    f"MODE map needs the model's {space} class names: set {spec.target_what}, "
                    f"or train on registered datasets whose metadata has {space}_classes."
                )
            if spec.source is None and not spec.class_map:
                # The caller's source_what names a list that is missing here; say where the
                # config takes it from.
                raise ClassListError(
                    f"MODE map needs the {space} class names of {source}, which stores none: "
                    f"{_source_names_hint(space)}."
                )
            mapping = build_class_mapping(
                spec.source, spec.target, spec.class_map, num_source=k_src,
                source_what=spec.source_what, target_what=spec.target_what)
        elif resolution == "unchanged":
            mapping = ClassMapping(
                tuple(spec.source) if spec.source is not None else None, tuple(target_names),
                tuple(range(k_tgt)), k_src)
        else:
            mapping = ClassMapping(
                tuple(spec.source) if spec.source is not None else None, tuple(target_names),
                (None,) * k_tgt, k_src)
        mappings[space] = mapping
        report.spaces[space] = SpaceReport(
            space, resolution, k_src, k_tgt, mapping,
            spec.source_what if spec.source is not None else None)

    if strict_errors or (mode == "strict" and report.mismatches):
        strict_spaces = {s for s, r in report.spaces.items() if r.resolution == "strict"}
        keys = [k for k in readings if by_key[k][0].space in strict_spaces]
        keys += [m.key for m in report.mismatches]
        tensors = [f"  {k}: checkpoint {tuple(state_dict[k].shape)}, model "
                   f"{tuple(model_state[k].shape)}" for k in keys]
        problems = strict_errors or ["tensors differ for reasons other than classes"]
        error = ClassMismatchError(
            f"MODEL.RECLASS.MODE is 'strict' and {source} does not fit the model: "
            + "; ".join(problems) + ".\n" + "\n".join(tensors) + "\nTo fix: set "
            "MODEL.RECLASS.MODE to 'map' (with class names) or 'reinit' to adapt the heads, or "
            "build the model with the checkpoint's NUM_CLASSES."
        )
        error.problems, error.tensors = problems, tensors
        raise error

    # Keep torch's per-module ``_metadata`` (state-dict versions), as load_state_dict and fvcore
    # do: without it, modules with versioned state dicts (PointRend's heads) would take the
    # checkpoint for an old format and apply their upgrade conversions on load.
    out = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = type(metadata)(metadata)  # type: ignore[attr-defined]
    for key, lays in by_key.items():
        lay0 = lays[0]
        resolution = report.spaces[lay0.space].resolution
        ckpt, model = state_dict[key], model_state[key]
        if lay0.keep_model:
            if resolution != "unchanged" or ckpt.shape != model.shape:
                out[key] = model.detach().clone()
                report.tensors.append(TensorAction(
                    key, lay0.space, tuple(ckpt.shape), tuple(model.shape), "model's own",
                    layout=lay0.kind))
            continue
        if key not in readings:
            continue
        new, copied, fresh = _refit(key, ckpt, model, readings[key], mappings, seed)
        if new is None:
            continue
        out[key] = new
        # "fresh" when no *class* entry was copied; a carried background block does not count.
        carried = lay0.offset + (lay0.repeat * lay0.block if lay0.background else 0)
        action = "copied" if fresh == 0 else ("fresh" if copied <= carried else "mapped")
        report.tensors.append(TensorAction(
            key, lay0.space, tuple(ckpt.shape), tuple(model.shape), action,
            copied - lay0.offset, fresh, lay0.describe()))
    return out, report


def _refit(
    key: str,
    ckpt: torch.Tensor,
    model: torch.Tensor,
    reads: List[_Reading],
    mappings: Dict[str, ClassMapping],
    seed: int,
) -> Tuple[Optional[torch.Tensor], int, int]:
    """The refitted tensor (None when it would equal ``ckpt``), and entries copied / fresh."""
    positions: Dict[int, torch.Tensor] = {}
    for r in reads:
        lay, mapping = r.layout, mappings[r.layout.space]
        # A one-block tensor reads as agnostic, unless the space really has one class.
        src_agnostic = r.agnostic and not (r.num_classes == mapping.num_source == 1)
        tgt_agnostic = lay.agnostic and len(mapping.target) != 1
        positions[lay.axis] = lay.source_positions(
            mapping.source_index, mapping.num_source,
            source_agnostic=src_agnostic, target_agnostic=tgt_agnostic)
    first = positions[reads[0].layout.axis]
    copied, fresh = int((first >= 0).sum()), int((first < 0).sum())
    if ckpt.shape == model.shape and all(
        bool((p == torch.arange(len(p))).all()) for p in positions.values()
    ):
        return None, copied, fresh

    needs_fresh = any(bool((p < 0).any()) for p in positions.values())
    if needs_fresh:
        out = reads[0].layout.init.draw(model.shape, seeded_generator(seed, key)).to(ckpt.dtype)
        out = out.to(ckpt.device)
    else:
        out = torch.empty(model.shape, dtype=ckpt.dtype, device=ckpt.device)
    # Copy the block where every class axis has a source: gather from the checkpoint, then
    # scatter into the target positions (an outer product of per-axis indices).
    sub = ckpt
    index = []
    last_axis = max(positions)
    for axis in range(last_axis + 1):
        p = positions.get(axis, torch.arange(model.shape[axis]))
        dst = torch.nonzero(p >= 0).flatten()
        sub = sub.index_select(axis, p[dst].to(ckpt.device))
        shape = [1] * (last_axis + 1)
        shape[axis] = -1
        index.append(dst.view(shape).to(ckpt.device))
    out[tuple(index)] = sub
    return out, copied, fresh
