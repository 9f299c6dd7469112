"""PRESERVE pseudo_labels: the source model labels the old classes on every training image.

A dataset that labels only the new classes still shows old-class objects; trained on as they
are, those objects are background, and the model forgets the old classes. Here every training
batch, exactly as the project's own mapper and loader made it (augmented images, instances in
their coordinates), gets the teacher's detections of the old classes added to its instances:

* detections scoring at least ``score``, classes mapped to the model's by name;
* except those overlapping a labelled box (IoU >= ``overlap``): that object is labelled, and
  the source model's name for it is wrong whenever it is a new class (it calls stars
  "diamond");
* with masks when the instances carry masks (mask heads), pasted at the image's size;
* for a RetinaNet (:func:`ignores_unsure`), the teacher's other old-class detections (below
  ``score``, down to its own test threshold) that overlap no label are added with class -1:
  RetinaNet's anchor labelling leaves the anchors matched to such a box out of its losses, so
  an object the teacher is unsure of is trained neither as its class nor as background. A
  focal-loss model scores many of its objects below ``score`` (a weak one, most); unlabelled,
  they were trained as background and forgotten.

Shape shorthand: G = labelled instances of an image, P = its pseudo-labels, H x W = its size.
"""
import logging
from typing import Iterator, List, Optional, Sequence, Union

import torch
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks, pairwise_iou
from torch import nn

from ..errors import ConfigError
from .teacher import Teacher

__all__ = ["IGNORE", "PseudoLabeledLoader", "add_pseudo_labels", "ignores_unsure"]

#: The class of an unsure detection's box: RetinaNet labels the anchors matched to it -1,
#: which its losses skip.
IGNORE = -1

logger = logging.getLogger(__name__)


def _bit_masks(masks, image_size) -> BitMasks:
    if isinstance(masks, BitMasks):
        return masks
    if isinstance(masks, PolygonMasks):
        return BitMasks.from_polygon_masks(masks, *image_size)
    return BitMasks(torch.as_tensor(masks).bool())


def add_pseudo_labels(
    instances: Instances,
    detections: Instances,
    class_index: Sequence[Optional[int]],
    *,
    score: float = 0.5,
    overlap: float = 0.5,
    masks: Optional[torch.Tensor] = None,
    ignore_unsure: bool = False,
) -> Instances:
    """``instances`` (the labels of one image) followed by the pseudo-labels of ``detections``
    and, with ``ignore_unsure``, the boxes of its unsure detections with class :data:`IGNORE`.

    Pure: neither input is modified. Labelled instances come first and unchanged (their masks
    become :class:`BitMasks` when pseudo-labels with masks are added to polygons).

    Args:
        instances: ``gt_boxes``, ``gt_classes`` (model class ids) and maybe ``gt_masks``.
        detections: the teacher's ``pred_boxes``, ``scores``, ``pred_classes`` (teacher ids)
            on the same image, in the same coordinates.
        class_index: for each teacher class, the model's class id, or None (not kept).
        score: the lowest score that becomes a label.
        overlap: a detection whose IoU with a labelled box reaches this is dropped.
        masks: bool (N, H, W) masks of ``detections``, needed when ``instances`` has masks.
        ignore_unsure: also add the old-class detections below ``score`` that overlap no
            label (IoU < ``overlap`` with every labelled box and pseudo-label), as IGNORE.

    Returns:
        Instances with G + P entries (P: pseudo-labels, then unsure boxes); P may be 0.

    Raises:
        ConfigError: the instances carry masks the detections lack, or another per-instance
            field (keypoints) that pseudo-labels cannot give.
    """
    mapped = torch.tensor([-1 if i is None else i for i in class_index], dtype=torch.long)
    classes = mapped[detections.pred_classes.long()] if len(detections) else \
        torch.zeros(0, dtype=torch.long)
    old = classes >= 0
    sure = detections.scores >= score
    keep = sure & old
    boxes = detections.pred_boxes.tensor.to(instances.gt_boxes.tensor)
    if len(instances) and keep.any():
        iou = pairwise_iou(Boxes(boxes), instances.gt_boxes)  # N x G
        keep &= iou.max(dim=1).values < overlap
    idx = keep.nonzero().flatten()
    labels = classes[idx]
    if ignore_unsure:
        unsure = ~sure & old
        known = torch.cat([instances.gt_boxes.tensor, boxes[idx]])
        if len(known) and unsure.any():
            unsure &= pairwise_iou(Boxes(boxes), Boxes(known)).max(dim=1).values < overlap
        unsure_idx = unsure.nonzero().flatten()
        idx = torch.cat([idx, unsure_idx])
        labels = torch.cat([labels, torch.full_like(unsure_idx, IGNORE)])
    out = Instances(instances.image_size)
    out.gt_boxes = Boxes(torch.cat([instances.gt_boxes.tensor, boxes[idx]]))
    out.gt_classes = torch.cat([instances.gt_classes, labels.to(instances.gt_classes)])
    if instances.has("gt_masks"):
        if masks is None:
            raise ConfigError("MODEL.RECLASS.PRESERVE pseudo_labels: the training instances have "
                          "masks, but the source model gives none (it has no mask head): use "
                          "PRESERVE distill or frozen_rows.")
        own = _bit_masks(instances.gt_masks, instances.image_size)
        new = BitMasks(masks[idx].to(own.tensor.device))
        out.gt_masks = BitMasks.cat([own, new]) if len(own) or len(new) else own
    for name in instances.get_fields():
        if name not in ("gt_boxes", "gt_classes", "gt_masks"):
            # Other per-instance fields (keypoints, ...) have no pseudo-label counterpart.
            raise ConfigError(f"MODEL.RECLASS.PRESERVE pseudo_labels cannot label the "
                              f"instances' {name!r}: use PRESERVE distill or frozen_rows.")
    return out


class PseudoLabeledLoader:
    """Wraps a detectron2 training data loader (an iterable of batches: lists of dicts with an
    augmented ``image`` and ``instances``): each batch comes out with the teacher's
    pseudo-labels added to every image's instances (:func:`add_pseudo_labels`).

    Every other attribute is the wrapped loader's.
    """

    def __init__(self, loader, teacher: Teacher, class_index: Sequence[Optional[int]], *,
                 score: float = 0.5, overlap: float = 0.5, ignore_unsure: bool = False):
        self.loader = loader
        self.teacher = teacher
        self.class_index = list(class_index)
        self.score, self.overlap, self.ignore_unsure = score, overlap, ignore_unsure
        self.added = 0  # pseudo-labels added so far
        self.ignored = 0  # unsure boxes added as IGNORE so far

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)

    def label(self, batch: List[dict]) -> List[dict]:
        """``batch`` with pseudo-labels; the input dicts are not modified."""
        detections = self.teacher.detect([d["image"] for d in batch])
        out = []
        for d, det in zip(batch, detections):
            d = dict(d)
            inst = d["instances"]
            masks = Teacher.masks(det) if inst.has("gt_masks") else None
            d["instances"] = add_pseudo_labels(inst, det, self.class_index, score=self.score,
                                               overlap=self.overlap, masks=masks,
                                               ignore_unsure=self.ignore_unsure)
            ignored = int((d["instances"].gt_classes[len(inst):] == IGNORE).sum())
            self.added += len(d["instances"]) - len(inst) - ignored
            self.ignored += ignored
            out.append(d)
        return out

    def __iter__(self) -> Iterator[List[dict]]:
        for batch in self.loader:
            yield self.label(batch)


def ignores_unsure(model: Union[nn.Module, type]) -> bool:
    """Whether ``model`` (or a model of this class) gets the boxes of the teacher's unsure
    detections as IGNORE: a RetinaNet, whose anchors matched to such a box are labelled -1,
    which its losses skip.

    A focal-loss head scores real objects low (the loss stops pushing a box's score up once it
    is classified, and a weak or young model stays below 0.5 on most of its objects), so an
    unsure detection is often an object, and training it as background forgets it. A softmax
    R-CNN's score is a probability against every class and background: below 0.5 its teacher
    thinks background likelier, and its unsure detections are mostly parts, offsets and
    clutter that the student should keep suppressing (ignoring them cost the benchmark's
    Faster R-CNN about a point of old-class AP). FCOS one-hot encodes its labels, where a -1
    cannot go.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return issubclass(model if isinstance(model, type) else type(model), RetinaNet)
