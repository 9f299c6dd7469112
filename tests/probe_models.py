"""Minimal meta-architectures of projects d2_reclass has no layouts for, for the probe's tests.

Each keeps the class-tensor conventions of the project it is named after (read from their
upstream code), at a tiny size, with its own NUM_CLASSES key, registered in detectron2's
META_ARCH_REGISTRY under a test name:

* ``ProbeDetrLike`` (DETR's d2 wrapper): ``detr.class_embed`` nn.Linear(D, K + 1), "no object"
  last, torch's default init; ``criterion.empty_weight`` buffer ones(K + 1), 0.1 last.
* ``ProbeSparseLike`` / ``SparseLike`` (SparseR-CNN / DiffusionDet / detrex DINO): per-stage
  ``head.head_series.{i}.class_logits`` nn.Linear(D, K) with a focal prior bias; a DINO
  ``label_enc`` nn.Embedding(K, D); per-layer ``class_embed.{i}`` also registered as
  ``decoder.class_embed.{i}`` (one module under two prefixes); and a head no project has,
  ``head.head_series.{i}.class_boxes`` nn.Linear(D, 4K): four entries per class, in an order
  shapes cannot tell.
"""
import math

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from d2_reclass import add_reclass_config

D = 8
DETR_KEY = "MODEL.PROBE_DETR.NUM_CLASSES"
SPARSE_KEY = "MODEL.PROBE_SPARSE.NUM_CLASSES"
PRIOR = -math.log((1 - 0.01) / 0.01)


class _Criterion(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        weight = torch.ones(num_classes + 1)
        weight[-1] = 0.1
        self.register_buffer("empty_weight", weight)


class _Detr(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.input_proj = nn.Linear(D, D)
        self.class_embed = nn.Linear(D, num_classes + 1)
        self.bbox_embed = nn.Linear(D, 4)


@META_ARCH_REGISTRY.register()
class ProbeDetrLike(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        k = cfg.MODEL.PROBE_DETR.NUM_CLASSES
        self.detr = _Detr(k)
        self.criterion = _Criterion(k)
        self.to(cfg.MODEL.DEVICE)


class _Stage(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.class_logits = nn.Linear(D, num_classes)
        self.class_boxes = nn.Linear(D, 4 * num_classes)
        self.bboxes_delta = nn.Linear(D, 4)


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(D, D)


class SparseLike(nn.Module):
    """``ProbeSparseLike``'s model, built from plain arguments (for LazyConfig)."""

    def __init__(self, num_classes: int):
        super().__init__()
        k = num_classes
        self.head = nn.Module()
        self.head.head_series = nn.ModuleList(_Stage(k) for _ in range(2))
        for stage in self.head.head_series:
            nn.init.xavier_uniform_(stage.class_logits.weight)
            nn.init.constant_(stage.class_logits.bias, PRIOR)
        self.label_enc = nn.Embedding(k, D)
        embed = nn.Linear(D, k)
        nn.init.constant_(embed.bias, PRIOR)
        self.class_embed = nn.ModuleList([embed, nn.Linear(D, k)])
        nn.init.constant_(self.class_embed[1].bias, PRIOR)
        self.decoder = _Decoder()
        self.decoder.class_embed = self.class_embed  # DINO: one module, two prefixes


@META_ARCH_REGISTRY.register()
class ProbeSparseLike(SparseLike):
    def __init__(self, cfg):
        super().__init__(cfg.MODEL.PROBE_SPARSE.NUM_CLASSES)
        self.to(cfg.MODEL.DEVICE)


class LazyDetector(nn.Module):
    """A LazyConfig model whose head holds the class count (``model.head.num_classes``, a field
    detectron2's LazyConfig models do not have), and a criterion that follows it."""

    def __init__(self, head: nn.Module, criterion: nn.Module):
        super().__init__()
        self.head, self.criterion = head, criterion


def probe_cfg(arch: str, num_classes: int, opts=()):
    """A config for ``arch`` (``ProbeDetrLike`` / ``ProbeSparseLike``) at ``num_classes``."""
    cfg = get_cfg()
    add_reclass_config(cfg)
    cfg.MODEL.PROBE_DETR = CN({"NUM_CLASSES": 80})
    cfg.MODEL.PROBE_SPARSE = CN({"NUM_CLASSES": 80})
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.DEVICE = "cpu"
    key = DETR_KEY if arch == "ProbeDetrLike" else SPARSE_KEY
    cfg.merge_from_list([key, num_classes, *opts])
    return cfg
