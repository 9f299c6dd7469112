"""The teacher: the frozen source model, run on the student's own training images.

It runs in eval mode without gradients, on every rank for that rank's batch (nothing is
broadcast: every rank builds it from the same file). The images a call has to run go through
one forward pass together, as the student's batch does: one pass per image cost the teacher
about half again as much on a CPU. An image's detections can therefore differ in their last
bits with the images beside it (padding, the kernels' blocking); they are still a function of
the data order alone, so a rerun with the same seed gives the same labels on every rank.
Its detections are in the coordinates of the image it is given, the augmented training image.
With ``cache`` on they are kept per image, keyed by the image tensor's content, so an image
(and each flip of it) costs one forward pass per run, not one per epoch: later epochs get the
detections of the batch the image first came in.

Shape shorthand: N = detections of one image, M = the mask head's resolution.
"""
import hashlib
import logging
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances
from torch import nn

from ..classes import normalize_class_name

__all__ = ["Teacher", "teacher_class_index"]

logger = logging.getLogger(__name__)


def teacher_class_index(source: Sequence[str], target: Sequence[str]) -> List[Optional[int]]:
    """For each source (teacher) class, the index of the same class among the model's target
    classes (normalised names), or None when the model dropped it."""
    where = {normalize_class_name(c): i for i, c in enumerate(target)}
    return [where.get(normalize_class_name(c)) for c in source]


class Teacher:
    """A frozen detectron2 model answering "what does the source model see in these images?".

    Attributes:
        model (nn.Module): the source model, in eval mode, its parameters without gradients.
        cache (bool): keep each image's detections (see the module doc).
        calls (int), images (int), cached (int), seconds (float): forward passes, images
            seen, images answered from the cache, time spent in :meth:`detect` (for the log
            and the benchmark); :attr:`runs`: images run.
    """

    def __init__(self, model: nn.Module, *, cache: bool = True):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache = cache
        self._store: Dict[bytes, Instances] = {}
        self.calls = self.images = self.cached = 0
        self.seconds = 0.0

    @property
    def runs(self) -> int:
        """Images run through the model: every image seen that the cache did not answer."""
        return self.images - self.cached

    @staticmethod
    def _key(image: torch.Tensor) -> bytes:
        h = hashlib.sha1(str((tuple(image.shape), str(image.dtype))).encode())
        h.update(image.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    @torch.no_grad()
    def _run(self, images: Sequence[torch.Tensor]) -> List[Instances]:
        """Detections on ``images`` (CHW, the model's input format), on CPU: boxes in the
        images' own coordinates; masks, for mask heads, as M x M probabilities in their boxes
        (pasted by :meth:`masks`), so a cache stays small. One forward pass for all of them.
        """
        if not images:
            return []
        self.calls += 1
        inputs = [{"image": im, "height": im.shape[-2], "width": im.shape[-1]} for im in images]
        if isinstance(self.model, GeneralizedRCNN):
            outputs = self.model.inference(inputs, do_postprocess=False)
        else:  # dense detectors: postprocessing to the image's own size is the identity
            outputs = [out["instances"] for out in self.model(inputs)]
        return [out.to("cpu") for out in outputs]

    def detect(self, images: Sequence[torch.Tensor]) -> List[Instances]:
        """The teacher's detections on each of ``images``, in their coordinates (CPU)."""
        t0 = time.perf_counter()
        try:
            return self._detect(images)
        finally:
            self.seconds += time.perf_counter() - t0

    def _detect(self, images: Sequence[torch.Tensor]) -> List[Instances]:
        self.images += len(images)
        if not self.cache:
            return self._run(images)
        keys = [self._key(im) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        # An image twice in one batch is run once.
        first = {keys[i]: i for i in reversed(missing)}
        todo = sorted(first.values())
        if todo:
            for i, out in zip(todo, self._run([images[i] for i in todo])):
                self._store[keys[i]] = out
        self.cached += len(images) - len(todo)
        return [self._store[k] for k in keys]

    @staticmethod
    def masks(detections: Instances) -> Optional[torch.Tensor]:
        """Bool masks (N, H, W) of ``detections`` at their image's size, or None without masks.
        """
        if not detections.has("pred_masks"):
            return None
        masks = detections.pred_masks
        if masks.dim() == 4:  # M x M probabilities in the boxes
            return paste_masks_in_image(masks[:, 0], detections.pred_boxes,
                                        detections.image_size, threshold=0.5)
        return masks.bool()
