"""Recognise detectron2's standard class-dependent heads from a checkpoint's keys and shapes.

For offline surgery without a config (``d2-reclass inspect`` / ``convert``): box predictors
(cascade stages too), the mask predictor, RetinaNet/FCOS heads (A read from the box
regressor), semantic-segmentation predictors and keypoint heads. With a config, the model's
modules give the layouts instead (:func:`find_layouts`), which covers every registered head.
"""
import re
from typing import Dict, List, Mapping, Sequence, Tuple

from ..fresh import MSRA, NORMAL_0001, NORMAL_001, ZERO, InitSpec, retinanet_prior_bias
from ..layouts import KEYPOINT, MEAN, MEAN_LOG_COUNT, STUFF, THING, ClassLayout

__all__ = ["recognize_layouts", "guess_architecture"]

Shapes = Mapping[str, Sequence[int]]


def recognize_layouts(shapes: Shapes) -> Tuple[List[ClassLayout], List[str]]:
    """Layouts of the standard heads found in ``shapes`` (key -> shape), and notes on what
    could not be told (each a sentence for the user).

    ``num_classes`` of each layout is the checkpoint's own K.
    """
    layouts: List[ClassLayout] = []
    notes: List[str] = []
    for key, shape in shapes.items():
        m = re.fullmatch(r"(.*box_predictor(?:\.\d+)?\.)cls_score\.weight", key)
        if m:
            layouts += _box_predictor(m.group(1), shapes, notes)
        m = re.fullmatch(r"(.*mask_head\.)predictor\.weight", key)
        if m:
            k = shape[0]
            layouts += [ClassLayout(m.group(1) + f"predictor.{p}", THING, None if k == 1 else k,
                                    NORMAL_0001 if p == "weight" else ZERO, agnostic=k == 1,
                                    can_be_agnostic=True, kind="mask per class")
                        for p in ("weight", "bias") if m.group(1) + f"predictor.{p}" in shapes]
        m = re.fullmatch(r"(head\.)cls_score\.weight", key)
        if m:
            layouts += _retinanet(m.group(1), shapes, notes)
        m = re.fullmatch(r"(sem_seg_head\.)predictor\.weight", key)
        if m:
            layouts += [ClassLayout(f"sem_seg_head.predictor.{p}", STUFF, shape[0],
                                    MSRA if p == "weight" else ZERO, merge=_classifier(p),
                                    kind="per-pixel class")
                        for p in ("weight", "bias") if f"sem_seg_head.predictor.{p}" in shapes]
        m = re.fullmatch(r"(.*keypoint_head\.)score_lowres\.weight", key)
        if m:
            k = shape[1]
            layouts += [
                ClassLayout(m.group(1) + "score_lowres.weight", KEYPOINT, k, MSRA, axis=1,
                            kind="keypoint heatmaps"),
                ClassLayout(m.group(1) + "score_lowres.bias", KEYPOINT, k, ZERO,
                            kind="keypoint heatmaps"),
            ]
    if any("point_head" in k or "coarse_head" in k for k in shapes):
        notes.append("PointRend heads are recognised only with --config-file (their class "
                     "columns depend on the config).")
    return [lay for lay in layouts if lay.key in shapes], notes


def _box_predictor(prefix: str, shapes: Shapes, notes: List[str]) -> List[ClassLayout]:
    k = shapes[prefix + "cls_score.weight"][0] - 1
    out = [ClassLayout(prefix + f"cls_score.{p}", THING, k, NORMAL_001 if p == "weight" else ZERO,
                       background=True, merge=_classifier(p), kind="softmax + background")
           for p in ("weight", "bias")]
    rows = shapes.get(prefix + "bbox_pred.weight", [None])[0]
    if rows is None:
        return out
    if rows in (4, 5) and k != 1:
        box_dim, agnostic = rows, True
    elif rows % k == 0 and rows // k in (4, 5):
        box_dim, agnostic = rows // k, False
    else:
        notes.append(f"{prefix}bbox_pred has {rows} rows, which fits neither {k} classes x 4/5 "
                     "nor a class-agnostic regressor; it is left as it is.")
        return out
    return out + [
        ClassLayout(prefix + f"bbox_pred.{p}", THING, None if agnostic else k,
                    NORMAL_0001 if p == "weight" else ZERO, block=box_dim, agnostic=agnostic,
                    can_be_agnostic=True, kind=f"class-major x {box_dim}")
        for p in ("weight", "bias")
    ]


def _retinanet(prefix: str, shapes: Shapes, notes: List[str]) -> List[ClassLayout]:
    box = shapes.get(prefix + "bbox_pred.weight")
    cls = shapes[prefix + "cls_score.weight"][0]
    if box is None or box[0] % 4 or cls % (box[0] // 4):
        notes.append(f"{prefix}cls_score: cannot tell anchors from classes without its box "
                     "regressor; it is left as it is.")
        return []
    a = box[0] // 4
    init: Dict[str, InitSpec] = {"weight": NORMAL_001,
                                 "bias": InitSpec("constant", retinanet_prior_bias(0.01))}
    return [ClassLayout(prefix + f"cls_score.{p}", THING, cls // a, init[p], repeat=a,
                        requires=(prefix + "bbox_pred.weight",), merge=_classifier(p),
                        kind=f"{a} anchors x classes")
            for p in ("weight", "bias")]


def _classifier(param: str) -> str:
    """The merge rule of a classifier's ``weight`` or ``bias`` (see d2_reclass.layouts)."""
    return MEAN_LOG_COUNT if param == "bias" else MEAN


def guess_architecture(keys: Sequence[str]) -> str:
    """A plain-words guess of the meta-architecture from state-dict keys."""
    keys = list(keys)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"^head\.ctrness"):
        return "FCOS"
    if has(r"^head\.cls_score"):
        return "RetinaNet"
    if has(r"point_head\."):
        return "PointRend"
    parts = []
    if has(r"roi_heads\.box_predictor\.\d+\."):
        parts.append("Cascade R-CNN")
    elif has(r"roi_heads\.box_predictor"):
        parts.append("Faster R-CNN")
    if has(r"roi_heads\.mask_head"):
        parts[-1:] = [p.replace("Faster", "Mask") if "Faster" in p else p + " with masks"
                      for p in parts[-1:]] or ["Mask R-CNN"]
    if has(r"roi_heads\.keypoint_head"):
        parts.append("keypoints")
    if has(r"^sem_seg_head\."):
        parts = ["Panoptic FPN"] if parts else ["Semantic FPN"]
    return " + ".join(parts) if parts else "unknown (no detectron2 head keys)"
