"""The built-in layouts of DETR's d2 wrapper, SparseR-CNN, DiffusionDet and detrex's DETR family
(``d2_reclass/layouts/detr.py``, ``sparse_rcnn.py``, ``detrex.py``).

The projects are not on a package registry, so their heads are mirrored here at a tiny size:
the same attributes, shapes, inits and qualified class names as upstream (where layouts are
registered); ``benchmarks/third_party.py`` runs the real projects from fetched checkouts.
"""
import math

import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from torch import nn

from d2_reclass import ClassSpec, find_layouts, reclass_state_dict
from d2_reclass.layouts import THING
from d2_reclass.layouts.num_classes import num_classes_keys

D = 8
PRIOR = -math.log(99)
FIVE = ["cat", "dog", "bird", "fish", "cow"]
TARGET = ["fish", "cat", "zebra"]  # a subset in another order, and a new class
FROM = [3, 0]  # TARGET's kept classes, in FIVE


def _named(cls, module: str, name: str):
    """``cls`` under the qualified name upstream's class has (what the registry matches)."""
    cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    return cls


class _DetrLinear(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.num_classes = k
        self.class_embed = nn.Linear(D, k + 1)  # models/detr.py: "no object" last
        self.bbox_embed = nn.Linear(D, 4)


class _DetrCriterion(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.num_classes = k
        weight = torch.ones(k + 1)
        weight[-1] = 0.1
        self.register_buffer("empty_weight", weight)


DETR = _named(_DetrLinear, "models.detr", "DETR")
DetrCriterion = _named(_DetrCriterion, "models.detr", "SetCriterion")


class _Stage(nn.Module):
    def __init__(self, k, focal):
        super().__init__()
        self.class_logits = nn.Linear(D, k if focal else k + 1)


class _DynamicHead(nn.Module):
    def __init__(self, k, focal=True, stages=2):
        super().__init__()
        self.num_classes = k
        self.head_series = nn.ModuleList(_Stage(k, focal) for _ in range(stages))
        if focal:
            self.bias_value = -math.log((1 - 0.01) / 0.01)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif focal and p.shape[-1] == k:
                nn.init.constant_(p, self.bias_value)


class _FedCriterion(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.num_classes = k
        self.register_buffer("fed_loss_cls_weights", torch.arange(1.0, k + 1))


SparseHead = _named(type("SparseHead", (_DynamicHead,), {}), "sparsercnn.head", "DynamicHead")
DiffusionHead = _named(type("DiffusionHead", (_DynamicHead,), {}), "diffusiondet.head",
                       "DynamicHead")
DiffusionCriterion = _named(_FedCriterion, "diffusiondet.loss", "SetCriterionDynamicK")


class _Dino(nn.Module):
    def __init__(self, k, layers=2):
        super().__init__()
        self.num_classes = k
        embed = nn.Linear(D, k)
        embed.bias.data = torch.ones(k) * PRIOR
        self.label_enc = nn.Embedding(k, D)
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.class_embed = nn.ModuleList(nn.Linear(D, k) for _ in range(layers + 1))
        for layer in self.class_embed:
            layer.load_state_dict(embed.state_dict())
        self.transformer.decoder.class_embed = self.class_embed  # dino.py: the same modules


Dino = _named(_Dino, "projects.dino.modeling.dino", "DINO")


class _Deformable(nn.Module):
    def __init__(self, k, layers=3):
        super().__init__()
        self.num_classes = k
        embed = nn.Linear(D, k)
        self.class_embed = nn.ModuleList([embed for _ in range(layers)])  # one layer, repeated


Deformable = _named(_Deformable, "projects.deformable_detr.modeling.deformable_detr",
                    "DeformableDETR")


def _pair(build, seed=1):
    torch.manual_seed(seed)
    source = build(len(FIVE))
    torch.manual_seed(seed + 1)
    target = build(len(TARGET))
    return source.state_dict(), target


def _reclass(source, target):
    return reclass_state_dict(source, target.state_dict(), find_layouts(target),
                              classes={THING: ClassSpec(FIVE, TARGET)})


def _model(**children):
    model = nn.Module()
    for name, child in children.items():
        setattr(model, name, child)
    return model


def test_detr_no_object_last_buffer_kept_and_key():
    source, target = _pair(lambda k: _model(detr=DETR(k), criterion=DetrCriterion(k)))
    buffer = target.state_dict()["criterion.empty_weight"].clone()
    out, report = _reclass(source, target)
    w = out["detr.class_embed.weight"]
    assert torch.equal(w[[0, 1, 3]], source["detr.class_embed.weight"][FROM + [5]])
    assert w[2].abs().max() <= 1 / math.sqrt(D)  # nn.Linear's default for the new class
    assert torch.equal(out["criterion.empty_weight"], buffer)
    assert report.tensor("criterion.empty_weight").action == "model's own"
    cfg = get_cfg()
    cfg.MODEL.DETR = CN({"NUM_CLASSES": 80})
    cfg.MODEL.META_ARCHITECTURE = "Detr"
    assert num_classes_keys(cfg) == [("MODEL.DETR.NUM_CLASSES", THING)]


@pytest.mark.parametrize("head", [SparseHead, DiffusionHead])
def test_sparse_rcnn_stages_focal_prior_and_xavier(head):
    source, target = _pair(lambda k: _model(head=head(k)))
    out, _ = _reclass(source, target)
    for i in range(2):
        key = f"head.head_series.{i}.class_logits"
        assert torch.equal(out[f"{key}.weight"][:2], source[f"{key}.weight"][FROM])
        assert out[f"{key}.bias"][2].item() == pytest.approx(-math.log(99))
        bound = math.sqrt(6 / (D + len(TARGET)))  # xavier_uniform_ with the target's fan_out
        assert out[f"{key}.weight"][2].abs().max() <= bound


def test_sparse_rcnn_softmax_no_object_last():
    source, target = _pair(lambda k: _model(head=SparseHead(k, focal=False)))
    out, _ = _reclass(source, target)
    w = out["head.head_series.0.class_logits.weight"]
    assert torch.equal(w[[0, 1, 3]], source["head.head_series.0.class_logits.weight"][FROM + [5]])


def test_diffusiondet_fed_loss_weights_are_the_models_own():
    source, target = _pair(lambda k: _model(head=DiffusionHead(k),
                                            criterion=DiffusionCriterion(k)))
    out, _ = _reclass(source, target)
    assert torch.equal(out["criterion.fed_loss_cls_weights"], torch.arange(1.0, 4))


def test_detrex_dino_both_prefixes_identical_and_label_enc():
    source, target = _pair(Dino)
    out, _ = _reclass(source, target)
    for i in range(3):
        for part in ("weight", "bias"):
            own = out[f"class_embed.{i}.{part}"]
            assert torch.equal(own, out[f"transformer.decoder.class_embed.{i}.{part}"])
            assert torch.equal(own[:2], source[f"class_embed.{i}.{part}"][FROM])
        assert out[f"class_embed.{i}.bias"][2].item() == pytest.approx(PRIOR)
    assert torch.equal(out["label_enc.weight"][:2], source["label_enc.weight"][FROM])
    assert out["label_enc.weight"].shape == (3, D)  # K rows, no extra one


def test_detrex_one_layer_repeated_gets_one_value():
    source, target = _pair(Deformable)
    out, _ = _reclass(source, target)
    assert all(torch.equal(out[f"class_embed.{i}.weight"], out["class_embed.0.weight"])
               for i in range(3))
