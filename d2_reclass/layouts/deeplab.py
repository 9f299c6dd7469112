"""Layouts of detectron2's DeepLab project (``projects/DeepLab/deeplab/semantic_seg.py``),
registered by class name: nothing here imports the project."""
from typing import List

from torch import nn

from ..fresh import NORMAL_0001
from .core import STUFF, ClassLayout, class_rows, register_layout

__all__: List[str] = []

_MODULE = "detectron2.projects.deeplab.semantic_seg"


@register_layout(f"{_MODULE}.DeepLabV3Head", f"{_MODULE}.DeepLabV3PlusHead")
def _deeplab(m: nn.Module) -> List[ClassLayout]:
    # DeepLabV3(Plus)Head.forward: channel k of the predictor is stuff class k.
    # DeepLabV3PlusHead without num_classes (Panoptic-DeepLab's instance head) has no
    # predictor and no class-dependent tensor.
    if not hasattr(m, "predictor"):
        return []
    return class_rows(m.predictor, "predictor", NORMAL_0001, space=STUFF, classifier=True,
                      num_classes=m.predictor.out_channels, kind="per-pixel class",
                      config_key="MODEL.SEM_SEG_HEAD.NUM_CLASSES")
