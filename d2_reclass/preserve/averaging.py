"""MODEL.RECLASS.SOURCE_AVERAGE: the final weights leaned back toward the source model's.

Fine-tuning on the new classes moves every shared weight, and the old classes pay for it even
when they are labelled (joint training on full labels loses a few percent of their AP on the
keep-old benchmark). Averaging the fine-tuned weights with the weights they started from keeps
most of what the fine-tune learnt and most of what the source knew (both models lie on one
fine-tuning path, so their average is a model too). The starting weights are the source
model's, laid out for the model's classes by the same surgery as the load; the new classes'
entries, which the source has no counterpart for, stay as trained.

The average is taken once, right after the optimizer step of the last iteration, so the
final checkpoint and the final evaluation hold it; the checkpoints on the way do not. The
starting weights come from the teacher (the source model as loaded from its file), not from a
copy taken at the first iteration, so a resumed run averages with the same weights.
"""
import logging
from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from ..engine import ClassSpec, reclass_state_dict
from ..layouts import THING, find_layouts
from .frozen_rows import new_entry_masks

__all__ = ["SourceAverage", "average_with_source", "source_weights"]

logger = logging.getLogger(__name__)


def average_with_source(state: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
                        keep: Mapping[str, torch.Tensor], weight: float
                        ) -> Dict[str, torch.Tensor]:
    """``(1 - weight) * state + weight * source`` on every floating-point tensor of ``state``
    that ``source`` holds, except the entries where ``keep`` (bool masks by key) is True, which
    stay ``state``'s; every other tensor is ``state``'s. Pure: nothing is modified."""
    out = {}
    for key, value in state.items():
        other = source.get(key)
        if other is None or not value.is_floating_point() or other.shape != value.shape:
            out[key] = value
            continue
        mixed = torch.lerp(value, other.to(value), weight)
        mask = keep.get(key)
        out[key] = mixed if mask is None else torch.where(mask.to(value.device), value, mixed)
    return out


def source_weights(model: nn.Module, source_model: nn.Module, source_classes: Sequence[str],
                   target_classes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``source_model``'s weights laid out for ``model``'s classes, class entries mapped by name
    (a class the source lacks gets the head's fresh init: the average leaves those entries
    alone). Raises as the load does when the two disagree."""
    state, _ = reclass_state_dict(
        source_model.state_dict(), model.state_dict(), find_layouts(model),
        classes={THING: ClassSpec(source=list(source_classes), target=list(target_classes))},
        mode="map", source="the source model (MODEL.WEIGHTS)")
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


class SourceAverage:
    """Averages ``trainer.model`` with the source's weights after the step of iteration
    ``max_iter - 1`` (see the module doc); :attr:`applied` says whether it has run.

    Wraps ``trainer.run_step`` (a detectron2 ``SimpleTrainer``'s), so that it runs before
    every hook of that iteration, the checkpointer's included. Every rank computes the same
    average from the same file and the same weights: nothing is broadcast.
    """

    def __init__(self, trainer, source_model: nn.Module, source_classes: Sequence[str],
                 target_classes: Sequence[str], new: Sequence[int], *, weight: float,
                 max_iter: int):
        model = trainer.model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.model, self.weight, self.max_iter = model, weight, max_iter
        # Computed now, so that a layout the surgery refuses fails before training, not after.
        self.source = source_weights(model, source_model, source_classes, target_classes)
        self.keep = new_entry_masks(model, new)
        self.applied = False
        run_step = trainer.run_step

        def step():
            run_step()
            if trainer.iter + 1 >= self.max_iter and not self.applied:
                self.apply()

        trainer.run_step = step

    @torch.no_grad()
    def apply(self) -> None:
        """Write the average into the model's parameters and buffers, in place."""
        state = self.model.state_dict()
        mixed = average_with_source(state, self.source, self.keep, self.weight)
        for key, value in state.items():
            if mixed[key] is not value:
                value.copy_(mixed[key])
        self.applied = True
        logger.info(
            f"[Preservation] MODEL.RECLASS.SOURCE_AVERAGE {self.weight:g}: the final weights are "
            f"{1 - self.weight:g} x the fine-tuned ones + {self.weight:g} x the source model's, on "
            "every tensor but the new classes' entries.")
