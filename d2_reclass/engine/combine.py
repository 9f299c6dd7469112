"""Combining checkpoints: one model whose classes come from several checkpoints.

The use case is few-shot detection as TFA does it: a base model trained on the base classes,
and a copy of it fine-tuned on the novel classes *in its last layers only* (the box
predictor), so that every other tensor is still the base model's. Combining takes each target
class's entries from the first listed checkpoint that knows the class (by the names it stores
or is given), and every other tensor from the first checkpoint.

Pure, like the engine: state dicts in, a state dict and a report out, nothing modified, and
nothing returned unless every check passed:

* the checkpoints' non-class tensors (every tensor no layout claims) must be equal: classes
  trained on other features would score garbage. When they differ on purpose, say so
  (``MODEL.RECLASS.COMBINE_ALLOW_DIFFERENT_WEIGHTS`` / ``--allow-different-weights``): the
  first checkpoint's are used, and a warning lists how many differ;
* every further checkpoint must give at least one target class: one whose classes are all
  known to checkpoints listed before it is a mistake (the same file twice, or the wrong order).
"""
import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..classes import union_classes
from ..errors import CombineError
from ..layouts import ClassLayout
from .report import ReclassReport
from .surgery import ClassSpec, SourceCheckpoint, reclass_state_dict

__all__ = ["combine_state_dicts", "union_classes"]

logger = logging.getLogger(__name__)


def combine_state_dicts(
    state_dict: Mapping[str, torch.Tensor],
    more: Sequence[SourceCheckpoint],
    model_state: Mapping[str, torch.Tensor],
    layouts: Sequence[ClassLayout],
    *,
    classes: Optional[Mapping[str, ClassSpec]] = None,
    mode: str = "map",
    seed: int = 0,
    source: str = "checkpoint",
    allow_different_weights: bool = False,
    allow_option: str = "MODEL.RECLASS.COMBINE_ALLOW_DIFFERENT_WEIGHTS True",
) -> Tuple[Dict[str, torch.Tensor], ReclassReport]:
    """``state_dict`` combined with ``more``: :func:`reclass_state_dict` with further
    checkpoints, once they are checked to share every non-class tensor.

    Args:
        state_dict, model_state, layouts, classes, mode, seed, source: as
            :func:`reclass_state_dict`; ``state_dict`` is the first checkpoint.
        more: the further checkpoints, in order of precedence.
        allow_different_weights: the non-class tensors may differ; the first's are used.
        allow_option: how messages name the option that allows it.

    Raises:
        CombineError: naming the files and tensors, when non-class tensors differ and that is
            not allowed, or when a further checkpoint gives no target class.
        ClassListError, CheckpointError, ClassMismatchError: as :func:`reclass_state_dict`.
    """
    class_keys = {lay.key for lay in layouts}
    for other in more:
        differ = _differing(state_dict, other.state_dict, class_keys)
        if not differ:
            continue
        listing = ", ".join(differ[:5]) + (f", ... ({len(differ)} in all)" if len(differ) > 5
                                           else "")
        if not allow_different_weights:
            raise CombineError(
                f"Cannot combine {source} with {other.name}: {len(differ)} tensors that are not "
                f"class entries differ ({listing}), so the classes of {other.name} were trained "
                f"on other features than those of {source}, whose tensors the model takes. "
                "Combining is meant for a copy fine-tuned only in its class layers (as TFA "
                f"fine-tunes the box predictor). If this is intended, set {allow_option}.")
        logger.warning(
            f"Combining {source} with {other.name}: {len(differ)} non-class tensors differ "
            f"({listing}); those of {source} are used, as {allow_option} says.")
    new, report = reclass_state_dict(state_dict, model_state, layouts, classes=classes,
                                     mode=mode, seed=seed, source=source, more=more)
    _check_each_gives_a_class(report, more, source)
    _warn_if_first_gives_fewer(report, more, source)
    return new, report


def _differing(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
               class_keys: set) -> List[str]:
    """Keys of both ``a`` and ``b``, not class-dependent, whose tensors are not equal."""
    return [k for k in a if k in b and k not in class_keys and (
        a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]))]


def _warn_if_first_gives_fewer(report: ReclassReport, more: Sequence[SourceCheckpoint],
                               source: str) -> None:
    """Warn when a further checkpoint gives more target classes than the first: the usual sign
    of a base and a novel checkpoint listed the wrong way round, since the first gives the
    background entries and every other tensor."""
    given: Dict[int, int] = {}
    for space in report.spaces.values():
        m = space.mapping
        if m is None or space.resolution != "map":
            continue
        for j in range(len(m.target)):
            if m.parts(j):
                given[m.checkpoint_of(j)] = given.get(m.checkpoint_of(j), 0) + 1
    first = given.get(0, 0)
    for c, other in enumerate(more, 1):
        if given.get(c, 0) > first:
            logger.warning(
                f"Combining: {source} is listed first, so the model takes its background "
                f"entries and every tensor that is not a class entry, but {other.name} gives "
                f"more of the target classes ({given[c]} against {first}). If {other.name} is "
                f"the base model, list it first: `d2-reclass combine {other.name} {source} "
                f"...`, or MODEL.WEIGHTS {other.name} with MODEL.RECLASS.COMBINE "
                f"['{source}'].")
            return


def _check_each_gives_a_class(report: ReclassReport, more: Sequence[SourceCheckpoint],
                              source: str) -> None:
    """Raise when a further checkpoint gives no target class of any space."""
    givers = {c for space in report.spaces.values() if space.mapping is not None
              for c in space.mapping.checkpoint}
    names = [source] + [m.name for m in more]
    for c, other in enumerate(more, 1):
        if c in givers:
            continue
        known = sorted({n for space in other.classes.values() for n in space or ()})
        raise CombineError(
            f"{other.name} gives no class to the model: every target class it knows "
            f"({', '.join(known[:8]) or 'none'}) is taken from a checkpoint listed before it "
            f"({', '.join(names[:c])}), since the first that knows a class gives it. Drop it, "
            "list it earlier, or add its classes to the target classes.")
