"""Fresh values for class rows that have no source: the head's own init, seeded per parameter.

Every draw uses a private ``torch.Generator`` seeded from ``(seed, parameter name)``, never the
global RNG. detectron2's trainer seeds each rank differently and wraps the model in DDP before
loading, so this is what keeps every rank (and every rerun) bit-identical without a broadcast.
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "InitSpec",
    "NORMAL_001",
    "ZERO",
    "linear_default_init",
    "prior_bias_init",
    "retinanet_prior_bias",
    "seeded_generator",
    "torch_default_init",
    "xavier_uniform_init",
]


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose state depends only on ``seed`` and ``name``."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def retinanet_prior_bias(prior_prob: float) -> float:
    """The classification bias detectron2's RetinaNet/FCOS heads start from: -log((1-p)/p)."""
    return -math.log((1 - prior_prob) / prior_prob)


@dataclass(frozen=True)
class InitSpec:
    """How a head initialises one tensor, as detectron2 does in the head's ``__init__``.

    ``kind`` is one of:

    * ``"normal"``: N(0, value) — ``nn.init.normal_(w, std=value)``.
    * ``"constant"``: every entry equal to ``value`` — biases, the RetinaNet prior.
    * ``"msra"``: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, as
      ``fvcore.nn.weight_init.c2_msra_fill`` and the keypoint head use.
    * ``"xavier"``: ``kaiming_uniform_(a=1)``, as ``c2_xavier_fill``.
    * ``"xavier_uniform"``: ``nn.init.xavier_uniform_``, U(+-sqrt(6 / (fan_in + fan_out))) of
      the tensor drawn (the target's shape, so fan_out counts the target classes), as
      DETR-family heads that xavier every weight (SparseR-CNN, DiffusionDet) do.
    * ``"uniform"``: U(-value, value); :func:`torch_default_init` gives the bound with which
      torch's own ``nn.Linear`` / ``nn.Conv*d`` initialise weight and bias, for heads that keep
      torch's default (Mask2Former's ``class_embed``, a DETR-style head).
    """

    kind: str
    value: float = 0.0

    def draw(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """A float32 CPU tensor of ``shape`` drawn from this init with ``generator``."""
        out = torch.empty(tuple(shape), dtype=torch.float32)
        if self.kind == "normal":
            return out.normal_(0.0, self.value, generator=generator)
        if self.kind == "constant":
            return out.fill_(self.value)
        if self.kind == "msra":
            return torch.nn.init.kaiming_normal_(
                out, mode="fan_out", nonlinearity="relu", generator=generator
            )
        if self.kind == "xavier":
            return torch.nn.init.kaiming_uniform_(out, a=1, generator=generator)
        if self.kind == "uniform":
            return out.uniform_(-self.value, self.value, generator=generator)
        if self.kind == "xavier_uniform":
            return torch.nn.init.xavier_uniform_(out, generator=generator)
        raise ValueError(f"Unknown init kind {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"uniform(+-{self.value:.4g})"
        if self.kind in ("msra", "xavier", "xavier_uniform"):
            return self.kind
        return f"{self.kind}({self.value:.4g})"


def torch_default_init(layer: torch.nn.Module) -> InitSpec:
    """The init of a layer that keeps torch's own (``nn.Linear`` / ``nn.Conv*d``
    ``reset_parameters``), for its weight and its bias alike: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    ``kaiming_uniform_(a=sqrt(5))`` of the weight has exactly this bound, and torch draws the
    bias from it too; fan_in is the weight's entries per output row (in_features, or
    in_channels / groups x kernel size), read from the layer's weight.
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or not weight[0].numel():
        raise ValueError(f"torch_default_init needs a layer with a 2-d or larger weight, not "
                         f"{type(layer).__name__}")
    return InitSpec("uniform", 1.0 / math.sqrt(weight[0].numel()))


def linear_default_init(layer: torch.nn.Module) -> InitSpec:
    """The init of an ``nn.Linear`` / ``nn.Conv*d`` left at torch's default, for its weight and
    its bias alike (the same as :func:`torch_default_init`, under the name a recipe looks for)."""
    return torch_default_init(layer)


def prior_bias_init(prior_prob: float) -> InitSpec:
    """A sigmoid / focal classifier's bias: every entry -log((1-p)/p), so a class starts at
    probability ``prior_prob`` (RetinaNet, FCOS, SparseR-CNN, DiffusionDet; DINO's p = 0.01)."""
    return InitSpec("constant", retinanet_prior_bias(prior_prob))


def xavier_uniform_init() -> InitSpec:
    """``nn.init.xavier_uniform_`` of the target tensor (its fan_out counts the target's
    classes), for heads that xavier their weights."""
    return InitSpec("xavier_uniform")


NORMAL_001 = InitSpec("normal", 0.01)
NORMAL_0001 = InitSpec("normal", 0.001)
ZERO = InitSpec("constant", 0.0)
MSRA = InitSpec("msra")
XAVIER = InitSpec("xavier")
