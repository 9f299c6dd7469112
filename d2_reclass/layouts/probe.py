"""Class-dependent tensors read from the model itself: how its shapes follow a class count.

The same architecture built for other class counts (by :mod:`d2_reclass.integration.probe`, on
the ``meta`` device where it can) tells, for every state-dict tensor, whether an axis grows with
the count and how: ``length = a*K + b``. This module is the pure part: shapes in, class axes
and :class:`~d2_reclass.layouts.core.ClassLayout`\\ s out.

* ``a = 1, b = 0``: one entry per class; ``a = 1, b = 1``: one per class and an extra entry
  *last* (detectron2's background, DETR's "no object"). These map by name like any registered
  head.
* A buffer (``empty_weight``, fed-loss frequencies, a vocabulary) is the model's own: its value
  is kept (``keep_model``), whatever its ``a`` and ``b``.
* Anything else (``a > 1``, or ``b > 1``): which entry belongs to which class cannot be read
  from shapes. The layout is ``opaque``: never mapped; re-initialised when the classes change,
  and an error in ``strict`` mode.

Registered layouts keep precedence (:func:`~d2_reclass.layouts.core.find_layouts`).

Shape shorthand: K = number of classes.
"""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..fresh import NORMAL_001, ZERO, InitSpec, torch_default_init
from .core import MEAN, MEAN_LOG_COUNT, THING, ClassLayout

__all__ = ["Build", "ClassAxis", "fit_class_axes", "probe_counts", "probed_layouts"]

Shapes = Mapping[str, Tuple[int, ...]]


@dataclass(frozen=True)
class ClassAxis:
    """One axis of one tensor whose length is ``a*K + b``, K being ``config_key``'s count.

    Attributes:
        key: the state-dict key.
        axis: the axis that grows with K.
        a: entries per class.
        b: entries that belong to no class.
        buffer: the tensor is a buffer (computed, not learnt).
        config_key: the config key (or LazyConfig field) whose count sizes it.
        space: its class space.
    """

    key: str
    axis: int
    a: int
    b: int
    buffer: bool
    config_key: str = ""
    space: str = THING

    @property
    def by_name(self) -> bool:
        """One entry per class, plus at most one last: mapped by name."""
        return self.a == 1 and self.b in (0, 1)


#: The state-dict shapes of a model built with these class counts (per config key).
Build = Tuple[Shapes, Mapping[str, int]]


def probe_counts(counts: Mapping[str, int]) -> List[Dict[str, int]]:
    """The two sets of class counts to build besides ``counts``: key i moved by the i-th prime
    from 3, then by that prime plus one. An axis that grows with key i then fits no other key's
    counts (``a*P_i == a'*P_j`` and ``a*(P_i + 1) == a'*(P_j + 1)`` give ``i == j``), so three
    builds read every key at once."""
    primes: List[int] = []
    n = 3
    while len(primes) < len(counts):
        if all(n % p for p in primes):
            primes.append(n)
        n += 2
    return [{key: k + p + extra for (key, k), p in zip(counts.items(), primes)}
            for extra in (0, 1)]


def fit_class_axes(
    builds: Sequence[Build],
    buffers: Set[str],
    spaces: Mapping[str, str] = {},
) -> List[ClassAxis]:
    """The class axes of a model built several times (``builds``, the first as configured):
    every axis whose lengths fit ``a*K + b`` over the builds, with a whole ``a`` >= 1 and
    ``b`` >= 0, for the counts K of one config key (the first that fits).

    A tensor whose lengths change otherwise (or whose number of dimensions changes) is not read
    as class-dependent; keys missing from a build are left out. ``spaces`` gives each config
    key's class space (default: thing).
    """
    base, counts = builds[0]
    found = []
    for key, shape in base.items():
        others = [shapes.get(key) for shapes, _ in builds[1:]]
        if any(o is None or len(o) != len(shape) for o in others):
            continue
        for axis in range(len(shape)):
            lengths = [shape[axis]] + [o[axis] for o in others]
            if len(set(lengths)) == 1:
                continue
            for config_key in counts:
                fit = _line([(b[1][config_key], n) for b, n in zip(builds, lengths)])
                if fit is not None:
                    found.append(ClassAxis(key, axis, *fit, key in buffers, config_key,
                                           spaces.get(config_key, THING)))
                    break
    return found


def _line(points: Sequence[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    """(a, b) with ``length == a*K + b`` at every (K, length) point, a >= 1 and b >= 0."""
    (k0, n0), *rest = points
    other = next(((k, n) for k, n in rest if k != k0), None)
    if other is None:
        return None
    a, remainder = divmod(other[1] - n0, other[0] - k0)
    b = n0 - a * k0
    if remainder or a < 1 or b < 0 or any(n != a * k + b for k, n in points):
        return None
    return a, b


def probed_layouts(
    axes: Sequence[ClassAxis],
    model: nn.Module,
    counts: Mapping[str, int],
) -> List[ClassLayout]:
    """The layouts of ``axes`` in ``model`` (built for ``counts``: K per config key).

    Fresh entries take the head's init as far as the module tells it: an ``nn.Linear`` /
    ``nn.Conv*d`` keeps torch's default unless its tensor holds one value throughout (a prior
    bias, a zero init: that value); an ``nn.Embedding`` N(0, 1); any other tensor its one value
    when it has one, else N(0, 0.01) (matrices) or zero. Two names of one tensor (a module
    shared under two prefixes) draw fresh entries from one seed, so they stay identical.
    """
    state = model.state_dict(keep_vars=True)
    first_name: Dict[int, str] = {}
    for key, value in state.items():
        first_name.setdefault(id(value), key)
    out = []
    for ax in axes:
        k = counts.get(ax.config_key)
        value = state.get(ax.key)
        if k is None or value is None:
            continue
        seed_key = first_name[id(value)]
        out.append(ClassLayout(
            ax.key, ax.space, k, _fresh_init(model, ax.key, value), axis=ax.axis,
            block=ax.a if not ax.by_name else 1, offset=ax.b if not ax.by_name else 0,
            background=ax.by_name and ax.b == 1, merge=_merge_rule(ax), keep_model=ax.buffer,
            kind=_describe(ax), config_key=ax.config_key, opaque=not ax.by_name and not ax.buffer,
            seed_key=seed_key if seed_key != ax.key else ""))
    return out


def _merge_rule(ax: ClassAxis) -> str:
    # A 1-d learnt tensor on the class axis is read as a classifier's bias (its merged
    # logit rises by log(count), as registered classifiers' do); everything else merges by mean.
    return MEAN_LOG_COUNT if ax.key.endswith(".bias") and ax.axis == 0 else MEAN


def _describe(ax: ClassAxis) -> str:
    rows = f"{ax.a}*K" if ax.a > 1 else "K"
    rows += f"+{ax.b}" if ax.b else ""
    what = "buffer, the model's own" if ax.buffer else (
        "no-object / background last" if ax.by_name and ax.b else
        "by name" if ax.by_name else "order unknown")
    return f"found by probe: {rows} ({what})"


def _fresh_init(model: nn.Module, key: str, value: torch.Tensor) -> InitSpec:
    owner, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        module = None
    data = value.detach()
    constant = data.numel() > 0 and data.device.type != "meta" and bool(
        (data == data.reshape(-1)[0]).all())
    if constant:
        return InitSpec("constant", float(data.reshape(-1)[0]))
    if isinstance(module, nn.Embedding) and name == "weight":
        return InitSpec("normal", 1.0)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name in ("weight", "bias"):
        return torch_default_init(module)
    return NORMAL_001 if data.dim() > 1 else ZERO
