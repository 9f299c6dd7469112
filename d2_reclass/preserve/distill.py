"""PRESERVE distill: the old classes' outputs are distilled from the frozen source model.

The student's classification outputs of the old classes are pulled towards the teacher's on
the same inputs, as one more loss, ``loss_distill``:

* softmax box heads (Faster / Mask R-CNN, Cascade R-CNN's first stage): on the student's own
  sampled proposals, the teacher's box head scores the same boxes on its own features; the
  loss is KL(teacher || student) of the softmax over the old classes and background
  (mean over boxes). KL of probabilities, not L2 of logits, which diverged (logits grow to
  40-50 while training on new-only labels);
* sigmoid heads (RetinaNet): every anchor's old-class logits, the Bernoulli KL of each, summed
  and divided by the number of images times 100 anchors (the loss's scale then matches the
  focal loss's, normalised by a few dozen foreground anchors per image).

Both are exactly zero when the student's old outputs equal the teacher's. The losses are
computed in forward hooks of the student's own modules (its box pooler, box predictor or
dense head, and the model), so the project's model class and trainer are unchanged.

Shape shorthand: R = boxes, K = model classes, S = teacher classes, A = anchors per location.
"""
import logging
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import nn

from ..errors import ConfigError
from .teacher import Teacher

__all__ = ["OutputDistiller", "softmax_distill_loss", "sigmoid_distill_loss"]

logger = logging.getLogger(__name__)

#: Anchors per image the sigmoid loss is normalised by (see the module doc).
_DENSE_NORM = 100.0


def softmax_distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                         old: Sequence[int], teacher_old: Sequence[int]) -> torch.Tensor:
    """KL(teacher || student) of the softmax over the old classes and background.

    Args:
        student: (R, K + 1) logits, background last; teacher: (R, S + 1) logits.
        old: the old classes' indices among the student's; teacher_old: the same classes'
            indices among the teacher's, in the same order.
    """
    if not len(student):
        return student.sum() * 0.0
    s = student[:, [*old, student.shape[1] - 1]]
    t = teacher[:, [*teacher_old, teacher.shape[1] - 1]].detach()
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean",
                    log_target=True)


def sigmoid_distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                         old: Sequence[int], teacher_old: Sequence[int], num_classes: int,
                         teacher_classes: int) -> torch.Tensor:
    """Summed Bernoulli KL of the old classes' per-anchor logits, per image / 100 anchors.

    Args:
        student, teacher: per feature level, (N, A * K, H, W) and (N, A * S, H, W) logits.
        num_classes, teacher_classes: K and S.
    """
    total = student[0].sum() * 0.0
    for s, t in zip(student, teacher):
        n, _, h, w = s.shape
        s = s.view(n, -1, num_classes, h, w)[:, :, list(old)]
        t = t.detach().view(n, -1, teacher_classes, h, w)[:, :, list(teacher_old)]
        p = torch.sigmoid(t)
        # KL(p || q) = BCE(q; p) - BCE(p; p): zero when the logits agree.
        total = total + (F.binary_cross_entropy_with_logits(s, p, reduction="sum")
                         - F.binary_cross_entropy_with_logits(t, p, reduction="sum"))
    return total / (student[0].shape[0] * _DENSE_NORM)


def _first(module: nn.Module) -> nn.Module:
    # Cascade R-CNN keeps one box head / predictor per stage: the first stage is distilled.
    return module[0] if isinstance(module, nn.ModuleList) else module


class OutputDistiller:
    """Adds ``loss_distill`` to the loss dict of a training ``model``'s forward, from hooks.

    Args:
        model: the student (DDP looked through); a :class:`GeneralizedRCNN` with a softmax box
            predictor, or a :class:`RetinaNet`.
        teacher: the frozen source model.
        class_index: for each teacher class, the student's class id or None.
        weight: the loss weight.

    Raises:
        ConfigError: a model it cannot distill (named).
    """

    def __init__(self, model: nn.Module, teacher: Teacher,
                 class_index: Sequence[Optional[int]], *, weight: float = 1.0):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.model, self.teacher, self.weight = model, teacher.model, weight
        pairs = [(s, t) for t, s in enumerate(class_index) if s is not None]
        self.old = [s for s, _ in pairs]
        self.teacher_old = [t for _, t in pairs]
        self._inputs: Optional[list] = None
        self._boxes: Optional[list] = None
        self._student: Optional[object] = None
        if isinstance(model, GeneralizedRCNN) and hasattr(model.roi_heads, "box_predictor"):
            rh = model.roi_heads
            self._handles = [
                rh.box_pooler.register_forward_pre_hook(self._keep_boxes),
                _first(rh.box_predictor).register_forward_hook(self._keep_student),
            ]
            self._loss = self._box_loss
        elif isinstance(model, RetinaNet):
            self._handles = [model.head.register_forward_hook(self._keep_student)]
            self._loss = self._dense_loss
        else:
            raise ConfigError(f"MODEL.RECLASS.PRESERVE distill covers R-CNN box heads and "
                              f"RetinaNet, not {type(model).__name__}: use PRESERVE "
                              "pseudo_labels or frozen_rows.")
        self._handles += [model.register_forward_pre_hook(self._start),
                          model.register_forward_hook(self._add_loss)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # ------------------------------------------------------------------ hooks
    def _start(self, module, args):
        self._inputs = args[0] if module.training else None
        self._boxes = self._student = None

    def _keep_boxes(self, module, args):
        if self._inputs is not None and self._boxes is None:
            self._boxes = [b.clone() for b in args[1]]

    def _keep_student(self, module, args, output):
        if self._inputs is not None and self._student is None:
            self._student = output

    def _add_loss(self, module, args, output):
        if self._inputs is None or not isinstance(output, dict) or self._student is None:
            return output
        loss = self._loss()
        self._inputs = self._boxes = self._student = None
        return {**output, "loss_distill": self.weight * loss}

    # ------------------------------------------------------------------ losses
    def _teacher_features(self):
        t = self.teacher
        images = t.preprocess_image(self._inputs)
        return t.backbone(images.tensor)

    def _box_loss(self) -> torch.Tensor:
        t = self.teacher
        with torch.no_grad():
            features = self._teacher_features()
            rh = t.roi_heads
            pooled = rh.box_pooler([features[f] for f in rh.box_in_features], self._boxes)
            scores = _first(rh.box_predictor)(_first(rh.box_head)(pooled))[0]
        return softmax_distill_loss(self._student[0], scores, self.old, self.teacher_old)

    def _dense_loss(self) -> torch.Tensor:
        t = self.teacher
        with torch.no_grad():
            features = self._teacher_features()
            logits = t.head([features[f] for f in t.head_in_features])[0]
        student: List[torch.Tensor] = self._student[0]
        return sigmoid_distill_loss(student, logits, self.old, self.teacher_old,
                                    self.model.num_classes, t.num_classes)
