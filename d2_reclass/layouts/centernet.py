"""Layouts of CenterNet2 (github.com/xingyizhou/CenterNet2, package ``centernet``), registered by
class name: nothing here imports the project.

CenterNet2 is a GeneralizedRCNN whose proposals come from CenterNet (``CENTERNET.ONLY_PROPOSAL``:
one class-agnostic heatmap) and whose cascade stages are ``CustomFastRCNNOutputLayers``:
detectron2's box predictor with a sigmoid-prior bias and its own fed-loss buffer. One-stage
CenterNet (``CenterNetDetector``) predicts one heatmap channel per class instead.

Shape shorthand: K = number of classes.
"""
import sys
from dataclasses import replace
from typing import List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from torch import nn

from ..fresh import NORMAL_001, ZERO, InitSpec, retinanet_prior_bias
from .core import THING, ClassLayout, class_rows, register_layout
from .detectron2 import ROI_HEADS_KEY, fast_rcnn_layouts
from .num_classes import register_default_config, register_num_classes_keys

__all__: List[str] = []

_MODULE = "centernet.modeling"
CENTERNET_KEY = "MODEL.CENTERNET.NUM_CLASSES"
#: centernet/config.py's default PRIOR_PROB (ROI_BOX_HEAD and CENTERNET alike).
DEFAULT_PRIOR = 0.01


def prior_init(bias: torch.Tensor, default_prob: float = DEFAULT_PRIOR) -> InitSpec:
    """The constant a sigmoid head's bias starts from: a freshly built head holds exactly
    -log((1-p)/p) with its configured prior p; a trained one falls back to ``default_prob``."""
    bias = bias.detach()
    if len(bias) and bool((bias == bias[0]).all()):
        return InitSpec("constant", float(bias[0]))
    return InitSpec("constant", retinanet_prior_bias(default_prob))


@register_layout(f"{_MODULE}.roi_heads.custom_fast_rcnn.CustomFastRCNNOutputLayers")
def _custom_fast_rcnn(m: nn.Module) -> List[ClassLayout]:
    # roi_heads/custom_fast_rcnn.py: detectron2's K+1 logits (background last) and box deltas.
    # With ROI_BOX_HEAD.USE_SIGMOID_CE, __init__ sets every cls_score bias to the prior
    # -log((1-p)/p), p = ROI_BOX_HEAD.PRIOR_PROB, so a new class starts near p, not 0.5. With
    # USE_FED_LOSS it registers freq_weight: per-class image counts read from CAT_FREQ_PATH, the
    # model's own, whose length is that file's class count.
    out = fast_rcnn_layouts(m)
    if getattr(m, "use_sigmoid_ce", False):
        cfg = getattr(m, "cfg", None)
        prob = cfg.MODEL.ROI_BOX_HEAD.PRIOR_PROB if cfg is not None else DEFAULT_PRIOR
        prior = InitSpec("constant", retinanet_prior_bias(prob))
        out = [replace(lay, init=prior) if lay.key == "cls_score.bias" else lay for lay in out]
    if "freq_weight" in dict(m.named_buffers(recurse=False)):
        out.append(ClassLayout("freq_weight", THING, m.num_classes, ZERO, keep_model=True,
                               vocabulary=True, kind="fed-loss class frequencies (CAT_FREQ_PATH)",
                               config_key=ROI_HEADS_KEY))
    return out


@register_layout(f"{_MODULE}.dense_heads.centernet_head.CenterNetHead")
def _centernet_head(m: nn.Module) -> List[ClassLayout]:
    # dense_heads/centernet_head.py: cls_logits has one heatmap channel per class (focal loss on
    # its sigmoid), its bias started at the prior CENTERNET.PRIOR_PROB. With ONLY_PROPOSAL there
    # is none: agn_hm is one class-agnostic channel.
    logits: Optional[nn.Module] = getattr(m, "cls_logits", None)
    if logits is None:
        return []
    return class_rows(logits, "cls_logits", NORMAL_001, prior_init(logits.bias), space=THING,
                      num_classes=logits.out_channels, classifier=True,
                      kind="per-class heatmap (sigmoid)", config_key=CENTERNET_KEY)


@register_num_classes_keys
def _centernet_keys(cfg: CfgNode) -> Optional[List[Tuple[str, str]]]:
    # centernet/config.py adds MODEL.CENTERNET; CenterNetHead reads CENTERNET.NUM_CLASSES only
    # for cls_logits, which ONLY_PROPOSAL leaves out (CenterNet2's and Detic's proposals).
    if "CENTERNET" not in cfg.MODEL or cfg.MODEL.PROPOSAL_GENERATOR.NAME != "CenterNet":
        return None
    keys = [] if cfg.MODEL.META_ARCHITECTURE == "CenterNetDetector" else [(ROI_HEADS_KEY, THING)]
    if not cfg.MODEL.CENTERNET.ONLY_PROPOSAL:
        keys.append((CENTERNET_KEY, THING))
    return keys


@register_default_config
def _centernet_defaults(cfg: CfgNode) -> None:
    # centernet/config.py's add_centernet_config (CENTERNET.NUM_CLASSES 80, ...). A config with
    # MODEL.CENTERNET was made by it, so the module is already imported whenever it matters.
    config = sys.modules.get("centernet.config")
    if config is not None and "CENTERNET" not in cfg.MODEL:
        config.add_centernet_config(cfg)
