"""Loads that are not class-aware, told in the log.

fvcore's ``Checkpointer._load_model`` drops every tensor whose shape differs from the model's
before ``model.load_state_dict`` runs, so a stock ``DetectionCheckpointer`` (the eval-only path
of a stock ``train_net.py``, ``DefaultPredictor``) loading a checkpoint trained for another
number of classes skips the class rows and the model predicts from their random init, with
only fvcore's "Skip loading parameter" lines to show it. :func:`warn_on_skipped_class_heads`
puts a load-state-dict pre-hook on the model that sees exactly that: the state to load lacks a
class-dependent tensor while the rest of its head is there. It then logs a warning naming the
line to change.
"""
import logging
from typing import List, Sequence

from torch import nn

from ..layouts import find_layouts

__all__ = ["SKIPPED_HEADS_FIX", "warn_on_skipped_class_heads"]

logger = logging.getLogger(__name__)

#: The lines that load class-aware, as the warning names them.
SKIPPED_HEADS_FIX = (
    "Load with d2_reclass instead: in an eval-only path, "
    "`ReclassCheckpointer.from_config(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, "
    "resume=False)` instead of `DetectionCheckpointer(model).resume_or_load(...)`; for a "
    "predictor, `ReclassPredictor(cfg)` instead of `DefaultPredictor(cfg)`."
)


class _SkippedHeadsCheck:
    """The pre-hook; a class (not a closure) so that a model carrying it still pickles."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
        skipped = skipped_class_keys(state_dict, self.keys, prefix)
        if skipped:
            logger.warning(
                f"[d2_reclass] The weights loaded into this model have no {', '.join(skipped)}, "
                "although the rest of those heads is there: the loader is not class-aware and "
                "skipped them (fvcore drops tensors whose class count differs from the model's), "
                "so they keep their random init and the model's predictions for every class are "
                f"garbage. {SKIPPED_HEADS_FIX}")


def skipped_class_keys(state_dict, keys: Sequence[str], prefix: str = "") -> List[str]:
    """The class-dependent ``keys`` missing from ``state_dict`` whose head (their first
    name part, e.g. ``roi_heads`` for ``roi_heads.box_predictor.*``) is loaded otherwise."""
    loaded = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    heads = {k.split(".")[0] for k in loaded}
    skipped = []
    for key in keys:
        if key not in loaded and key.split(".")[0] in heads:
            skipped.append(key)
    return skipped


def warn_on_skipped_class_heads(model: nn.Module) -> nn.Module:
    """Make every later ``model.load_state_dict`` warn (see the module docstring) when the
    state it loads lacks the model's class-dependent tensors but not the rest of their heads.

    Loads through :class:`~d2_reclass.ReclassCheckpointer` fit those tensors and never warn;
    neither does a checkpoint without the heads (an ImageNet backbone). Returns ``model``.
    """
    keys = sorted({lay.key for lay in find_layouts(model)})
    if keys:
        model.register_load_state_dict_pre_hook(_SkippedHeadsCheck(keys))
    return model
