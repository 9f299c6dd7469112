"""What the source model says about labelled boxes: their box-head features and the source
classes' probabilities, through the model's own pooler, box heads and classifiers.

Shape shorthand: S = source classes, D = box-head feature width, R = boxes.
"""
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import nn

__all__ = ["Box", "BoxPath", "Example", "box_paths", "detected_boxes", "run_image",
           "source_rows", "unsupported_reason"]


class Box(NamedTuple):
    target: int  # target class index
    xyxy: Tuple[float, float, float, float]  # absolute, in the image's own coordinates


class BoxPath(NamedTuple):
    """One box classifier and the way to its input feature (a cascade stage each)."""

    prefix: str  # state-dict prefix of the predictor, e.g. "roi_heads.box_predictor.1."
    predictor: nn.Module  # a FastRCNNOutputLayers
    box_features: Callable[[Dict[str, torch.Tensor], List[Boxes]], torch.Tensor]  # (R, D)


def box_paths(model: nn.Module) -> List[BoxPath]:
    """Every box classifier of ``model`` with the pooler and box head that feed it."""
    names = {id(m): n for n, m in model.named_modules()}
    paths: List[BoxPath] = []
    for m in model.modules():
        if isinstance(m, CascadeROIHeads):
            stages = list(zip(m.box_head, m.box_predictor))
        elif isinstance(m, StandardROIHeads):
            stages = [(m.box_head, m.box_predictor)]
        elif isinstance(m, Res5ROIHeads):
            paths.append(BoxPath(names[id(m.box_predictor)] + ".", m.box_predictor,
                                  _res5_features(m)))
            continue
        else:
            continue
        for head, predictor in stages:
            paths.append(BoxPath(names[id(predictor)] + ".", predictor,
                                  _pooled_features(m, head)))
    return paths


def _pooled_features(roi_heads: nn.Module, head: nn.Module):
    # As StandardROIHeads._forward_box / CascadeROIHeads._run_stage feed their predictors.
    def run(features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        x = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
        return torch.flatten(head(x), start_dim=1)

    return run


def _res5_features(roi_heads: nn.Module):
    # As Res5ROIHeads.forward feeds its predictor: res5 on the pooled box, then a mean.
    def run(features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        x = roi_heads._shared_roi_transform([features[f] for f in roi_heads.in_features], boxes)
        return x.mean(dim=[2, 3])

    return run


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why ``relative`` / ``imprint`` cannot run on ``model``, or None when they can.

    Both run the model's own ``preprocess_image`` and ``backbone`` on the example images (as
    detectron2's meta-architectures have them) and score the examples' boxes with a box
    classifier (``FastRCNNOutputLayers`` in standard, cascade or Res5 ROI heads) or a
    RetinaNet / FCOS head. Another model (a MaskFormer, whose queries are scored without
    boxes) gets the head's init instead, decided before anything is loaded.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    name = type(model).__name__
    if not box_paths(model) and _dense_head(model) is None:
        return (f"the model ({name}) has no box classifier or RetinaNet/FCOS head to score the "
                "new classes' examples with; head init")
    if not callable(getattr(model, "preprocess_image", None)) \
            or not isinstance(getattr(model, "backbone", None), nn.Module):
        return (f"the model ({name}) has no preprocess_image and backbone to run the examples "
                "through; head init")
    return None


def _dense_head(model: nn.Module) -> Optional[Tuple[str, RetinaNetHead]]:
    """(state-dict prefix, head) of a RetinaNet / FCOS model, else None."""
    if isinstance(model, DenseDetector) and isinstance(model.head, RetinaNetHead):
        return "head.", model.head
    return None


def source_rows(source_state: Mapping[str, torch.Tensor], prefix: str, rows: int,
                 width: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The checkpoint's (weight, bias) of ``prefix + "cls_score"`` if its shape fits."""
    w = source_state.get(prefix + "cls_score.weight")
    b = source_state.get(prefix + "cls_score.bias")
    if w is None or b is None or w.shape[0] != rows or w.shape[1:2] != (width,):
        return None
    return w, b


def _probs(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    return logits.sigmoid() if sigmoid else F.softmax(logits, dim=-1)


class Example(NamedTuple):
    target: int
    features: Dict[str, torch.Tensor]  # per box path prefix: (D,)
    source_probs: Optional[torch.Tensor]  # (S,), the source classes' probabilities


def run_image(model: nn.Module, image: torch.Tensor, boxes: List[Box], paths: List[BoxPath],
               source_state: Mapping[str, torch.Tensor], num_source: int) -> List[Example]:
    """Box features and source-class probabilities of ``boxes`` (transformed) in one image."""
    device = next(model.parameters()).device
    images = model.preprocess_image([{"image": image}])
    features = model.backbone(images.tensor)
    gt = torch.tensor([b.xyxy for b in boxes], dtype=torch.float32, device=device)
    per_path: Dict[str, torch.Tensor] = {}
    probs: List[torch.Tensor] = []
    for path in paths:
        x = path.box_features(features, [Boxes(gt)])
        per_path[path.prefix] = x
        rows = source_rows(source_state, path.prefix, num_source + 1, x.shape[1])
        if rows is not None:
            logits = F.linear(x, rows[0].to(x), rows[1].to(x))
            sigmoid = bool(getattr(path.predictor, "use_sigmoid_ce", False))
            probs.append(_probs(logits, sigmoid)[:, :num_source])
    dense = _dense_head(model)
    if dense is not None:
        dense_probs = _dense_source_probs(model, dense, features, gt, images.image_sizes[0],
                                          source_state, num_source)
        if dense_probs is not None:
            probs.append(dense_probs)
    # Cascade inference averages its stages' probabilities; so does the relative's score.
    mean = torch.stack(probs).mean(dim=0) if probs else None
    return [Example(b.target, {p: x[i] for p, x in per_path.items()},
                     None if mean is None or not bool(torch.isfinite(mean[i]).all()) else mean[i])
            for i, b in enumerate(boxes)]


def detected_boxes(model: nn.Module, image: torch.Tensor, labelled: List[Box],
                   classes: List[int], score: float = 0.5, overlap: float = 0.5) -> List[Box]:
    """The model's own detections of ``classes`` in ``image`` (transformed, as
    :func:`run_image` takes it) with at least ``score`` that overlap no ``labelled`` box
    (IoU < ``overlap``): the objects the model already knows there, as the pseudo-labels of
    :mod:`d2_reclass.preserve` take them (same defaults). Empty for a model whose output has no
    ``instances``."""
    height, width = image.shape[1:]
    out = model([{"image": image, "height": height, "width": width}])[0]
    if "instances" not in out:
        return []
    found = out["instances"].to("cpu")
    found = found[(found.scores >= score) & torch.isin(found.pred_classes,
                                                       torch.tensor(classes, dtype=torch.long))]
    if labelled and len(found):
        known = Boxes(torch.tensor([b.xyxy for b in labelled], dtype=torch.float32))
        found = found[pairwise_iou(found.pred_boxes, known).max(dim=1).values < overlap]
    return [Box(int(c), tuple(float(v) for v in xyxy)) for c, xyxy in
            zip(found.pred_classes.tolist(), found.pred_boxes.tensor.tolist())]


def _dense_source_probs(model, dense, features, gt: torch.Tensor, image_size,
                        source_state, num_source: int) -> Optional[torch.Tensor]:
    """(R, S): per box, the mean source-class probability over the anchors the model's own
    matcher assigns to it (label_anchors, as in training); NaN rows for boxes no anchor takes."""
    prefix, head = dense
    weight = source_state.get(prefix + "cls_score.weight")
    bias = source_state.get(prefix + "cls_score.bias")
    conv = head.cls_score
    anchors_per_location = head.bbox_pred.out_channels // 4  # as the layout reads A
    if weight is None or bias is None or weight.shape[1:] != conv.weight.shape[1:] \
            or weight.shape[0] != anchors_per_location * num_source:
        return None
    feats = [features[f] for f in model.head_in_features]
    logits = [F.conv2d(head.cls_subnet(f), weight.to(f), bias.to(f), conv.stride, conv.padding,
                       conv.dilation) for f in feats]
    probs = torch.cat([permute_to_N_HWA_K(x, num_source) for x in logits], dim=1)[0].sigmoid()
    anchors = model.anchor_generator(feats)
    out = torch.full((len(gt), num_source), float("nan"), device=gt.device)
    for i in range(len(gt)):
        # One box at a time, labelled 0: its positive anchors are those labelled 0.
        inst = Instances(image_size, gt_boxes=Boxes(gt[i:i + 1]),
                         gt_classes=torch.zeros(1, dtype=torch.long, device=gt.device))
        labels, _ = model.label_anchors(anchors, [inst])
        positive = labels[0] == 0
        if bool(positive.any()):
            out[i] = probs[positive].mean(dim=0)
    return out
