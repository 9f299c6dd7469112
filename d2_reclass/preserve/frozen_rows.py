"""PRESERVE frozen_rows: only the new classes' entries train; everything else stays as loaded.

The entries of the new classes are found through the engine's layouts (every class-dependent
tensor, on every class axis), so every head the layouts know is covered. Their gradients pass;
every other entry's gradient is zeroed (so clipping and optimizer statistics see only the new
classes), and after every optimizer step every other entry, every other parameter and every
buffer (BatchNorm statistics) is written back: weight decay and momentum cannot move them, and
the old classes' entries stay bit for bit what was loaded.
"""
import logging
from typing import Dict, Sequence

import torch
from torch import nn

from ..entries import CLASS
from ..layouts import THING, SourceAxis, find_layouts

__all__ = ["FrozenEntries", "new_entry_masks"]

logger = logging.getLogger(__name__)


def new_entry_masks(model: nn.Module, new: Sequence[int]) -> Dict[str, torch.Tensor]:
    """For each thing-class tensor of ``model`` with entries of the classes ``new``: a bool
    mask of its shape, True at exactly those entries (on every class axis of the tensor)."""
    masks: Dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for lay in find_layouts(model):
        if lay.space != THING or lay.keep_model or lay.agnostic or lay.num_classes is None \
                or lay.key not in state:
            continue
        k = lay.num_classes
        index = [t if t in new else None for t in range(k)]
        sources = lay.entry_sources(index, [SourceAxis(k)])
        of_new = (sources.kind == CLASS) & sources.copies
        shape = [1] * state[lay.key].dim()
        shape[lay.axis] = -1
        mask = of_new.view(shape).expand_as(state[lay.key])
        # An entry is a new class's when it is one on any class axis of the tensor.
        masks[lay.key] = masks[lay.key] | mask if lay.key in masks else mask.clone()
    return masks


class FrozenEntries:
    """Train only the entries of classes ``new`` of ``model`` with ``optimizer``.

    Registers gradient hooks on the parameters holding new-class entries and a post-step hook
    on the optimizer; :meth:`remove` undoes both.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, new: Sequence[int]):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.model = model
        masks = new_entry_masks(model, new)
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())
        self._masks = {k: masks[k].to(p.device) for k, p in self._params.items() if k in masks}
        self._saved = {k: t.detach().clone() for k, t in
                       [*self._params.items(), *self._buffers.items()]}
        self._handles = [self._params[k].register_hook(self._mask_grad(m))
                         for k, m in self._masks.items()]
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))
        logger.info(f"[FrozenEntries] training {sum(int(m.sum()) for m in self._masks.values())} "
                    f"new-class entries in {len(self._masks)} tensors; everything else frozen.")

    @staticmethod
    def _mask_grad(mask: torch.Tensor):
        return lambda grad: grad * mask

    @torch.no_grad()
    def restore(self) -> None:
        """Write back every entry but the new classes' (after each optimizer step)."""
        for k, p in self._params.items():
            mask = self._masks.get(k)
            p.copy_(self._saved[k] if mask is None else torch.where(mask, p, self._saved[k]))
        for k, b in self._buffers.items():
            b.copy_(self._saved[k])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
