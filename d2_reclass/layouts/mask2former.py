"""Layouts of Mask2Former and MaskFormer (``mask2former`` package: github.com/facebookresearch/
Mask2Former, on the registry as ``maskformer2``), registered by class name: nothing here imports
the project.

Every Mask2Former task sizes its heads with one key, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``; which
class list that K counts depends on the task the model was built for:

* semantic and panoptic segmentation: the dataset's ``stuff_classes`` (for panoptic datasets
  that list holds the things too, as Mask2Former's COCO / ADE20K panoptic metadata do);
* instance segmentation: its ``thing_classes``.

A layout function sees one module, and the task is known only to the meta-architecture
(``MaskFormer``'s test-time switches ``semantic_on`` / ``panoptic_on`` / ``instance_on`` and the
``metadata`` of the dataset it was built for). So the layout is registered on ``MaskFormer``,
which claims its subtree and gives the layouts of its transformer decoder and criterion the
task's space (:func:`task_space`); the same function decides the space of the NUM_CLASSES key
from the config, before the model exists, so AUTO_NUM_CLASSES and the layouts always agree. A
decoder or criterion found outside a ``MaskFormer`` is taken as an instance (thing) head.

Shape shorthand: K = number of classes, D = the decoder's hidden dimension.
"""
from dataclasses import replace
from typing import Any, List, Optional

from torch import nn

from ..data.class_lists import dataset_classes
from ..fresh import torch_default_init
from .core import (
    STUFF,
    THING,
    ClassLayout,
    class_rows,
    layouts_for_module,
    no_object_weights,
    prefixed_layouts,
    register_layout,
)
from .num_classes import register_num_classes_keys

__all__ = ["SEM_SEG_KEY", "task_space"]

_PACKAGE = "mask2former"
_DECODERS = f"{_PACKAGE}.modeling.transformer_decoder"
#: The one config key sizing every Mask2Former head (its decoders' and MaskFormerHead's
#: from_config read it).
SEM_SEG_KEY = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"


def task_space(semantic_on: bool, panoptic_on: bool, instance_on: bool,
               thing_names: bool, stuff_names: bool) -> str:
    """The class space K counts in a MaskFormer built with these test-time switches for a
    dataset whose metadata has (``thing_names``) / (``stuff_names``) class lists.

    Instance-only models count things. Semantic and panoptic models count the stuff list, except
    a model whose switches are all on but whose dataset names things only: upstream's ADE20K
    instance-segmentation config (``maskformer2_R50_bs16_160k``) leaves SEMANTIC_ON and
    PANOPTIC_ON on for its 100 thing classes.
    """
    if not (semantic_on or panoptic_on):
        return THING
    if instance_on and thing_names and not stuff_names:
        return THING
    return STUFF


def _names(metadata: Any, key: str) -> bool:
    return bool(metadata is not None and metadata.get(key, None))


@register_layout(f"{_PACKAGE}.maskformer_model.MaskFormer")
def _mask_former(m: nn.Module) -> List[ClassLayout]:
    # maskformer_model.py: MaskFormer holds the task switches and the metadata its
    # panoptic_inference reads; its children's class layouts follow the task.
    space = task_space(m.semantic_on, m.panoptic_on, m.instance_on,
                       _names(m.metadata, "thing_classes"), _names(m.metadata, "stuff_classes"))
    found: List[ClassLayout] = []
    for name, child in m.named_children():
        found += [replace(lay, space=space)
                  for lay in prefixed_layouts(layouts_for_module(child), f"{name}.")]
    return found


@register_layout(f"{_DECODERS}.mask2former_transformer_decoder.MultiScaleMaskedTransformerDecoder",
                 f"{_DECODERS}.maskformer_transformer_decoder.StandardTransformerDecoder")
def _class_embed(m: nn.Module) -> List[ClassLayout]:
    # mask2former_transformer_decoder.py / maskformer_transformer_decoder.py (MaskFormer):
    # class_embed = nn.Linear(D, K + 1), left at nn.Linear's own init. The last logit is "no
    # object": criterion.py's loss_labels gives unmatched queries class K, and
    # maskformer_model.py's inference drops it (softmax(...)[..., :-1]). Without
    # mask_classification there is no class_embed.
    if not getattr(m, "mask_classification", True):
        return []
    layer = m.class_embed
    init = torch_default_init(layer)
    return class_rows(layer, "class_embed", init, init, space=THING,
                      num_classes=layer.out_features - 1, background=True, classifier=True,
                      kind="softmax + no object (last)", config_key=SEM_SEG_KEY)


@register_layout(f"{_PACKAGE}.modeling.criterion.SetCriterion")
def _criterion(m: nn.Module) -> List[ClassLayout]:
    # criterion.py, SetCriterion.__init__: empty_weight = ones(K + 1) with NO_OBJECT_WEIGHT
    # last, loss_labels' cross-entropy class weights: set from the config, never learnt, so the
    # model's own whenever the classes change.
    return [no_object_weights(m.num_classes, SEM_SEG_KEY)]


@register_num_classes_keys
def _mask_former_keys(cfg) -> Optional[List]:
    # maskformer_model.py builds every head from SEM_SEG_HEAD.NUM_CLASSES; the space is the
    # one the built model's layouts will have (task_space with the same inputs: the switches
    # and DATASETS.TRAIN[0], the dataset MaskFormer takes its metadata from).
    if cfg.MODEL.META_ARCHITECTURE != "MaskFormer" or "MASK_FORMER" not in cfg.MODEL:
        return None
    test = cfg.MODEL.MASK_FORMER.TEST
    train = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
    things = bool(train and dataset_classes(train, "thing", what="DATASETS.TRAIN"))
    stuff = bool(train and dataset_classes(train, "stuff", what="DATASETS.TRAIN"))
    return [(SEM_SEG_KEY, task_space(test.SEMANTIC_ON, test.PANOPTIC_ON, test.INSTANCE_ON,
                                     things, stuff))]
