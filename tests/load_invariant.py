"""The load invariant, as one reusable check.

A load through :class:`d2_reclass.ReclassCheckpointer` gives every tensor that is not a class
entry exactly what stock :class:`detectron2.checkpoint.DetectionCheckpointer` gives it, bit for
bit, and every module's ``_load_from_state_dict`` sees the same state-dict ``version`` (from the
checkpoint's ``_metadata``) as under stock. :func:`check_load_invariant` loads one file both
ways into two identical fresh models and compares.

Use it from any test (pytest puts ``tests/`` on ``sys.path``)::

    from load_invariant import check_load_invariant

    result = check_load_invariant(
        lambda: build_my_model(num_classes=3, seed=2),   # the same model on every call
        "source.pth",
        reclass=ReclassOptions(target_classes=["dog", "person", "gadget"]))
    assert result.versions["sem_seg_head"] == [2]       # what the module saw, under both

Versions are recorded by wrapping each module's own ``_load_from_state_dict`` for the load, not
with ``register_load_state_dict_pre_hook``: torch runs those hooks inside
``nn.Module._load_from_state_dict``, which a module's override may never call (PointRend's
``PointRendROIHeads``, one of the versioned modules, does not), so hooks would miss exactly the
modules that convert by version.
"""
import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from d2_reclass import ReclassCheckpointer, ReclassOptions, ReclassReport, find_layouts

__all__ = ["InvariantResult", "check_load_invariant", "recorded_versions", "same_bits"]


@dataclass
class InvariantResult:
    """What :func:`check_load_invariant` compared (it raised if anything differed).

    Attributes:
        compared: the state-dict keys compared bit for bit (every key not in ``class_keys``).
        class_keys: the keys left out of the comparison.
        versions: module name -> the ``version`` its ``_load_from_state_dict`` saw, once per
            call (the same under both loaders); ``""`` is the model itself.
        report: the ReclassCheckpointer's report of the load (None for a resume).
        stock_state, reclass_state: the two models' state dicts after loading.
    """

    compared: List[str]
    class_keys: Set[str]
    versions: Dict[str, List[Optional[int]]]
    report: Optional[ReclassReport]
    stock_state: Dict[str, torch.Tensor] = field(repr=False)
    reclass_state: Dict[str, torch.Tensor] = field(repr=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True iff ``a`` and ``b`` have the same dtype, shape and bytes (so ``-0.0 != 0.0`` and
    a NaN equals the same NaN, unlike ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bytes(a), _bytes(b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


@contextlib.contextmanager
def recorded_versions(model: nn.Module) -> Iterator[Dict[str, List[Optional[int]]]]:
    """While inside, every module of ``model`` records the ``version`` of each
    ``_load_from_state_dict`` call (``local_metadata.get("version")``) under its name; the
    module's own method then runs unchanged."""
    seen: Dict[str, List[Optional[int]]] = defaultdict(list)
    wrapped = []
    for name, module in model.named_modules():
        own = module._load_from_state_dict

        def record(state_dict, prefix, local_metadata, *args, _name=name, _own=own):
            seen[_name].append(local_metadata.get("version"))
            return _own(state_dict, prefix, local_metadata, *args)

        # An instance attribute wins over the class's method for this one module.
        module.__dict__["_load_from_state_dict"] = record
        wrapped.append(module)
    try:
        yield seen
    finally:
        for module in wrapped:
            del module.__dict__["_load_from_state_dict"]


def _load(checkpointer, path: str, resume: bool) -> None:
    if resume:
        checkpointer.resume_or_load(path, resume=True)
    else:
        checkpointer.load(path)


def check_load_invariant(
    build_model: Callable[[], nn.Module],
    checkpoint_path: str,
    *,
    reclass: Optional[ReclassOptions] = None,
    class_keys: Optional[Set[str]] = None,
    stock_path: Optional[str] = None,
    resume: bool = False,
) -> InvariantResult:
    """Load ``checkpoint_path`` with ``ReclassCheckpointer(reclass=reclass)`` into one fresh
    ``build_model()`` and ``stock_path`` (default: the same file) with stock
    ``DetectionCheckpointer`` into another; raise ``AssertionError`` unless every tensor not in
    ``class_keys`` is bit-identical and every module saw the same state-dict versions.

    Args:
        build_model: returns the same model (same weights) on every call: seed it.
        checkpoint_path: the file ReclassCheckpointer loads (path, URL or detectron2://).
        reclass: its options (default: ``ReclassOptions()``).
        class_keys: tensors allowed to differ; None: every key a layout of the model claims
            (:func:`d2_reclass.find_layouts`). Pass ``set()`` when classes are unchanged, to
            require the whole model bit for bit.
        stock_path: the file stock loads, where ReclassCheckpointer reads another one that
            should load the same (a RENAMEd copy, a ``convert`` output, a combination's first).
        resume: load with ``resume_or_load(path, resume=True)``, both checkpointers' save
            directory being ``checkpoint_path``'s, whose ``last_checkpoint`` names the file.

    Returns:
        An :class:`InvariantResult` of what was compared.
    """
    stock_model, reclass_model = build_model(), build_model()
    initial = stock_model.state_dict()
    different_init = [k for k, v in reclass_model.state_dict().items()
                      if k not in initial or not same_bits(initial[k], v)]
    assert not different_init and len(initial) == len(reclass_model.state_dict()), (
        "build_model() gives different models on two calls (first different tensors: "
        f"{different_init[:3]}); seed it, or the comparison means nothing.")
    if class_keys is None:
        class_keys = {lay.key for lay in find_layouts(reclass_model)}
    save_dir = os.path.dirname(checkpoint_path) if resume else ""
    if resume:
        assert os.path.isfile(os.path.join(save_dir, "last_checkpoint")), (
            f"resume=True needs {save_dir}/last_checkpoint naming the checkpoint")

    with recorded_versions(stock_model) as stock_versions:
        _load(DetectionCheckpointer(stock_model, save_dir), stock_path or checkpoint_path, resume)
    checkpointer = ReclassCheckpointer(reclass_model, save_dir, reclass=reclass)
    with recorded_versions(reclass_model) as reclass_versions:
        _load(checkpointer, checkpoint_path, resume)

    stock, ours = stock_model.state_dict(), reclass_model.state_dict()
    assert list(stock) == list(ours)
    compared = [k for k in stock if k not in class_keys]
    differ = [k for k in compared if not same_bits(stock[k], ours[k])]
    assert not differ, (
        f"{len(differ)} tensors that are not class entries load differently from stock "
        f"DetectionCheckpointer (of {len(compared)} compared): "
        + ", ".join(f"{k} ({_how(stock[k], ours[k])})" for k in differ[:8]))
    version_differ = _version_differences(stock_versions, reclass_versions)
    assert not version_differ, (
        f"{sum(len(m) for m in version_differ.values())} modules saw other state-dict versions "
        "than under stock: " + "; ".join(
            f"stock {s}, ReclassCheckpointer {r}: {_listing(m)}"
            for (s, r), m in version_differ.items()))
    return InvariantResult(compared, set(class_keys), dict(stock_versions), checkpointer.report,
                           stock, ours)


def _version_differences(stock: Dict[str, list], ours: Dict[str, list]
                         ) -> Dict[Tuple[str, str], List[str]]:
    """(stock's versions, ours) -> the modules that saw them, where the two differ."""
    out: Dict[Tuple[str, str], List[str]] = defaultdict(list)
    for m in sorted(set(stock) | set(ours)):
        if stock.get(m) != ours.get(m):
            out[str(stock.get(m)), str(ours.get(m))].append(m or "<model>")
    return dict(out)


def _listing(names: List[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit
                                       else "")


def _how(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"stock {tuple(a.shape)} {a.dtype}, ours {tuple(b.shape)} {b.dtype}"
    if a.is_floating_point():
        return f"max |diff| {float((a.double() - b.double()).abs().max()):.3g}"
    return f"{int((a != b).sum())} entries differ"
