"""Layouts of detrex's DETR-family detectors (github.com/IDEA-Research/detrex, ``projects/``),
registered by class name: nothing here imports detrex.

detrex's ``tools/train_net.py`` puts the checkout root on ``sys.path``, so a project's model is
``projects.<name>.modeling.<module>.<Class>``, built from a LazyConfig whose ``model.num_classes``
sizes every head. The heads:

* ``class_embed``: one ``nn.Linear(D, K)`` (focal loss, bias -log(99): p = 0.01 hard-coded) or
  ``(D, K + 1)`` (DETR's cross-entropy, "no object" last, torch's default init); per decoder
  layer a ``ModuleList`` of copies, or of one layer repeated, and with box refinement the same
  modules again as ``transformer.decoder.class_embed`` (one module under two prefixes: both
  names get identical values);
* ``label_enc``: ``nn.Embedding(K, D)`` (DINO, DINO-EVA, Align-DETR, Focus-DETR): exactly K rows,
  row c the embedding of class c, N(0, 1);
* the criterion's ``empty_weight`` (K + 1, ``loss_class_type="ce_loss"``): the model's own.

Shape shorthand: K = number of classes, D = the embedding dimension.
"""
from dataclasses import replace
from typing import Dict, List

from torch import nn

from ..fresh import InitSpec, linear_default_init, prior_bias_init
from .core import (
    THING,
    ClassLayout,
    class_rows,
    layouts_for_module,
    no_object_weights,
    prefixed_layouts,
    register_layout,
)

__all__ = ["DETREX_KEY"]

#: The LazyConfig field that sizes every head (criteria read it as "${..num_classes}").
DETREX_KEY = "model.num_classes"
#: detrex's focal heads' prior probability (hard-coded in each project's __init__).
_PRIOR = 0.01
_MODELS = (
    "detr.modeling.detr.DETR",
    "deformable_detr.modeling.deformable_detr.DeformableDETR",
    "deta.modeling.deformable_detr.DeformableDETR",
    "dab_deformable_detr.modeling.dab_deformable_detr.DabDeformableDETR",
    "h_deformable_detr.modeling.h_deformable_detr.HDeformableDETR",
    "align_detr.modeling.aligndetr.AlignDETR",
    "dino.modeling.dino.DINO",
    "dino_eva.modeling.dino.DINO",
    "focus_detr.modeling.focus_detr.FOCUS_DETR",
)


@register_layout(*(f"projects.{name}" for name in _MODELS))
def _detector(m: nn.Module) -> List[ClassLayout]:
    k = m.num_classes
    layers = [m.class_embed] if isinstance(m.class_embed, nn.Linear) else list(m.class_embed)
    embeds = list({id(layer): layer for layer in layers}.values())  # one layer repeated: once
    # Every name of every class_embed layer (decoder aliases and repeats included); fresh rows
    # are drawn from the seed of the first name under class_embed, so all names agree.
    names: Dict[int, List[str]] = {id(layer): [] for layer in embeds}
    for name, module in m.named_modules(remove_duplicate=False):
        if id(module) in names:
            names[id(module)].append(name)
    out: List[ClassLayout] = []
    for layer in embeds:
        background = layer.out_features == k + 1
        bias = linear_default_init(layer) if background else prior_bias_init(_PRIOR)
        own = sorted(names[id(layer)], key=lambda n: (not n.startswith("class_embed"), n))
        for name in own:
            for lay in class_rows(layer, name, linear_default_init(layer), bias, space=THING,
                                  num_classes=k, background=background, classifier=True,
                                  kind="softmax + no object (last)" if background
                                  else "sigmoid (focal)", config_key=DETREX_KEY):
                seed_key = own[0] + lay.key[len(name):] if name != own[0] else ""
                out.append(replace(lay, seed_key=seed_key))
    label_enc = getattr(m, "label_enc", None)
    if isinstance(label_enc, nn.Embedding) and label_enc.num_embeddings == k:
        # dino.py: label_enc(gt_classes) embeds denoising queries by contiguous class id.
        out.append(ClassLayout("label_enc.weight", THING, k, InitSpec("normal", 1.0),
                               kind="label embedding", config_key=DETREX_KEY))
    # This module claims its subtree: its criterion's layouts are found here.
    for name, child in m.named_children():
        if name not in ("class_embed", "label_enc"):
            out += prefixed_layouts(layouts_for_module(child), f"{name}.")
    return out


@register_layout("detrex.modeling.criterion.criterion.SetCriterion")
def _criterion(m: nn.Module) -> List[ClassLayout]:
    # detrex/modeling/criterion/criterion.py: empty_weight = ones(K + 1), eos_coef last, only
    # with loss_class_type "ce_loss"; set from the config, never learnt.
    if not hasattr(m, "empty_weight"):
        return []
    return [no_object_weights(m.num_classes, DETREX_KEY)]
