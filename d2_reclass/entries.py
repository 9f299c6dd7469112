"""Weighted sets of source entries: what the engine builds every class axis from.

Each entry ``e`` of a target tensor's class axis is a weighted set of entries of one source
checkpoint's tensor, plus a constant::

    target[e] = sum_r weight[r, e] * source_c[index[r, e]] + shift[e],   c = checkpoint[e]

* a copy (a kept, reordered or split class, a carried background block, a non-class entry) is
  one source entry of weight 1 and no shift. It is gathered, never computed: bit-for-bit;
* a merge (several source classes into one target class) is one source entry per part, with
  the weights and shift of the layout's merge rule (:mod:`d2_reclass.layouts`);
* a fresh entry (a class no source knows) has an empty set; the head's own init draws it.

Shape shorthand: E = entries on the target axis, R = the size of the largest set.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence, Tuple, Union

import torch

__all__ = ["EntrySources", "SourceIndex", "source_parts", "NON_CLASS", "BACKGROUND", "CLASS"]

#: What an entry of a class axis belongs to (:attr:`EntrySources.kind`).
NON_CLASS, BACKGROUND, CLASS = 0, 1, 2


#: Where one target class takes its entries from: a source class index (a copy), a tuple of
#: several (merged by each layout's rule), or None (fresh).
SourceIndex = Union[None, int, Tuple[int, ...]]


def source_parts(index: SourceIndex) -> Tuple[int, ...]:
    """``index`` as a tuple of source class indices: () fresh, one a copy, several a merge."""
    if index is None:
        return ()
    return (index,) if isinstance(index, int) else tuple(index)


@dataclass(frozen=True)
class EntrySources:
    """For each entry of a target axis, the weighted set of source entries it is made of.

    Attributes:
        index (LongTensor[R, E]): source entries; ``-1`` past the end of an entry's set.
        weight (float64 Tensor[R, E]): the weight of each source entry (0 past the end).
        shift (float64 Tensor[E]): added after the weighted sum.
        checkpoint (LongTensor[E]): which source checkpoint an entry's set is taken from.
        kind (LongTensor[E]): :data:`NON_CLASS`, :data:`BACKGROUND` or :data:`CLASS`.
    """

    index: torch.Tensor
    weight: torch.Tensor
    shift: torch.Tensor
    checkpoint: torch.Tensor
    kind: torch.Tensor

    def __len__(self) -> int:
        return self.index.shape[1]

    # Cached: the engine asks each plan several times (at 1,000 classes and more, each a pass
    # over the axis); the fields are never modified.
    @cached_property
    def fresh(self) -> torch.Tensor:
        """Entries with an empty set: drawn from the head's init."""
        return self.index[0] < 0

    @cached_property
    def copies(self) -> torch.Tensor:
        """Entries that are one source entry, unchanged."""
        single = (self.index[1:] < 0).all(dim=0)
        return ~self.fresh & single & (self.weight[0] == 1) & (self.shift == 0)

    @cached_property
    def merged(self) -> torch.Tensor:
        """Entries computed from their set (several source entries, or a weight or shift)."""
        return ~self.fresh & ~self.copies

    def is_identity(self, length: int) -> bool:
        """Whether this is every entry of a ``length``-long first checkpoint's axis, in order."""
        return len(self) == length and bool(self.copies.all()) and not bool(
            self.checkpoint.any()) and torch.equal(self.index[0], torch.arange(length))

    def select(self, entries: torch.Tensor) -> "EntrySources":
        """The entries at positions ``entries`` (a LongTensor), in that order."""
        return EntrySources(self.index[:, entries], self.weight[:, entries], self.shift[entries],
                            self.checkpoint[entries], self.kind[entries])

    @staticmethod
    def cat(parts: Sequence["EntrySources"]) -> "EntrySources":
        """The entries of ``parts`` one after the other (sets padded to the largest)."""
        depth = max(p.index.shape[0] for p in parts)

        def pad(t: torch.Tensor, value: float) -> torch.Tensor:
            extra = depth - t.shape[0]
            return torch.cat([t, t.new_full((extra, t.shape[1]), value)]) if extra else t

        return EntrySources(
            torch.cat([pad(p.index, -1) for p in parts], dim=1),
            torch.cat([pad(p.weight, 0.0) for p in parts], dim=1),
            torch.cat([p.shift for p in parts]),
            torch.cat([p.checkpoint for p in parts]),
            torch.cat([p.kind for p in parts]),
        )
