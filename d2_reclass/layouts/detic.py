"""Layouts of Detic (github.com/facebookresearch/Detic, package ``detic``), registered by class
name: nothing here imports the project.

Detic's box predictor, ``DeticFastRCNNOutputLayers`` (every cascade stage, and its Res5 heads),
classifies with a ``ZeroShotClassifier`` when ``ROI_BOX_HEAD.USE_ZEROSHOT_CLS`` (every shipped
config): a class-agnostic projection to the CLIP text-embedding space, then one logit per column
of ``zs_weight``, the text embeddings of the model's class names read from
``ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH`` plus a zero column for the background. Those columns are the
model's own vocabulary: never mapped from a checkpoint, which may hold another one. Its box
regressor is then class-agnostic (an ``nn.Sequential`` ending in 4 outputs).

Shape shorthand: K = number of classes, D = embedding size (ZEROSHOT_WEIGHT_DIM).
"""
from dataclasses import replace
from typing import List, Optional, Tuple

import numpy as np
from detectron2.config import CfgNode
from torch import nn

from ..errors import ClassListError, ConfigError
from ..fresh import NORMAL_0001, ZERO
from .centernet import prior_init
from .core import THING, ClassLayout, class_rows, register_layout
from .detectron2 import ROI_HEADS_KEY, fast_rcnn_layouts
from .num_classes import (
    detectron2_num_classes_keys,
    register_num_classes_check,
    register_num_classes_keys,
)

__all__: List[str] = []

_MODULE = "detic.modeling.roi_heads"
#: The ROI heads that build DeticFastRCNNOutputLayers (detic_roi_heads.py, res5_roi_heads.py).
DETIC_ROI_HEADS = ("DeticCascadeROIHeads", "CustomRes5ROIHeads")
VOCABULARY_KEY = "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH"


@register_layout(f"{_MODULE}.detic_fast_rcnn.DeticFastRCNNOutputLayers")
def _detic_fast_rcnn(m: nn.Module) -> List[ClassLayout]:
    # roi_heads/detic_fast_rcnn.py and zero_shot_classifier.py.
    zs_weight = getattr(m.cls_score, "zs_weight", None)
    if zs_weight is None:
        # Without USE_ZEROSHOT_CLS: detectron2's cls_score and bbox_pred, and with
        # USE_SIGMOID_CE a cls_score bias started at the prior (PRIOR_PROB, not stored).
        out = fast_rcnn_layouts(m)
        if getattr(m, "use_sigmoid_ce", False):
            prior = prior_init(m.cls_score.bias)
            out = [replace(lay, init=prior) if lay.key == "cls_score.bias" else lay
                   for lay in out]
    else:
        _check_agnostic_box_regressor(m)
        out = []
        # zs_weight is D x (K+1), a buffer (a parameter with ZEROSHOT_WEIGHT_PATH 'rand');
        # reset_cls_test replaces it by a plain attribute, outside the state dict.
        if "zs_weight" in dict(m.cls_score.named_buffers(recurse=False)) or \
                "zs_weight" in dict(m.cls_score.named_parameters(recurse=False)):
            out.append(ClassLayout(
                "cls_score.zs_weight", THING, zs_weight.shape[1] - 1, ZERO, axis=1,
                background=True, vocabulary=True,
                kind="zero-shot vocabulary (ZEROSHOT_WEIGHT_PATH), the model's own",
                config_key=ROI_HEADS_KEY))
    if getattr(m, "with_softmax_prop", False):
        # WITH_SOFTMAX_PROP (WSDDN): prop_score ends in K+1 softmax logits, background last.
        last = len(m.prop_score) - 1
        out += class_rows(m.prop_score[last], f"prop_score.{last}", NORMAL_0001, space=THING,
                          num_classes=m.num_classes, background=True, classifier=True,
                          kind="proposal scores, softmax + background", config_key=ROI_HEADS_KEY)
    if "freq_weight" in dict(m.named_buffers(recurse=False)):
        # USE_FED_LOSS / IGNORE_ZERO_CATS: image counts per class read from CAT_FREQ_PATH (its
        # length is that file's class count, zero-extended to K when shorter).
        out.append(ClassLayout("freq_weight", THING, m.num_classes, ZERO, keep_model=True,
                               vocabulary=True, kind="fed-loss class frequencies (CAT_FREQ_PATH)",
                               config_key=ROI_HEADS_KEY))
    return out


def _check_agnostic_box_regressor(m: nn.Module) -> None:
    """Raise unless ``m.bbox_pred`` (a Linear, or a Sequential ending in one) has the box
    coder's B outputs: the class-agnostic regressor Detic builds with its zero-shot classifier,
    which has no class entries."""
    box_dim = len(m.box2box_transform.weights)
    last = m.bbox_pred[-1] if isinstance(m.bbox_pred, nn.Sequential) else m.bbox_pred
    if getattr(last, "out_features", None) != box_dim:
        raise ValueError(f"its zero-shot classifier's bbox_pred ends in {last}, not the "
                         f"class-agnostic regressor of {box_dim} outputs Detic builds")


@register_num_classes_check
def _check_vocabulary(cfg: CfgNode) -> None:
    # zero_shot_classifier.py asserts that its vocabulary has NUM_CLASSES rows only once the
    # model is being built, with a tensor shape for a message.
    box = cfg.MODEL.ROI_BOX_HEAD
    if not box.get("USE_ZEROSHOT_CLS", False) or cfg.MODEL.ROI_HEADS.NAME not in DETIC_ROI_HEADS \
            or box.ZEROSHOT_WEIGHT_PATH == "rand":
        return
    path = box.ZEROSHOT_WEIGHT_PATH
    try:
        rows = np.load(path, mmap_mode="r").shape[0]  # reads the header only; never unpickles
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{VOCABULARY_KEY} {path!r} cannot be read as a .npy file of class embeddings "
            f"({type(e).__name__}: {e}). Detic reads it relative to the working directory: give "
            "an absolute path.") from e
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if rows != k:
        raise ClassListError(
            f"{VOCABULARY_KEY} {path!r} holds the embeddings of {rows} classes, but "
            f"{ROI_HEADS_KEY} is {k}. Detic classifies with that vocabulary, one row per class "
            f"in the model's class order: give the CLIP text embeddings of the model's {k} "
            "class names (Detic's tools/dump_clip_features.py writes them), or set "
            f"{ROI_HEADS_KEY} {rows} with the classes of that vocabulary.")


@register_num_classes_keys
def _detic_keys(cfg: CfgNode) -> Optional[List[Tuple[str, str]]]:
    # Detic's CustomRCNN reads ROI_HEADS.NUM_CLASSES like detectron2's R-CNNs (with CenterNet
    # proposals, centernet.py's function answers). add_detic_config also adds
    # MODEL.DETR.NUM_CLASSES, read only by its DeformableDetr: a CustomRCNN config is known, not
    # a project for the probe to read.
    if cfg.MODEL.META_ARCHITECTURE != "CustomRCNN" or "WITH_IMAGE_LABELS" not in cfg \
            or cfg.MODEL.PROPOSAL_GENERATOR.NAME == "CenterNet":
        return None
    return detectron2_num_classes_keys(cfg)
