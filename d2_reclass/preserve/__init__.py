"""Keep the checkpoint's classes through training on labels of the new classes only.

``MODEL.RECLASS.PRESERVE`` chooses how (:data:`~d2_reclass.options.PRESERVE_METHODS`):

* ``pseudo_labels`` (the default with KEEP_SOURCE_CLASSES): the frozen source model labels the
  old classes on every training image (:mod:`.pseudo_labels`);
* ``distill``: the old classes' outputs are distilled from it (:mod:`.distill`);
* ``frozen_rows``: only the new classes' entries train (:mod:`.frozen_rows`);
* ``none``: plain fine-tuning.

The source model is the :class:`~.teacher.Teacher`. :func:`attach_preservation` puts a method
onto any detectron2 ``SimpleTrainer`` (its model, data loader and optimizer) after the
weights are loaded; :func:`~d2_reclass.integration.preservation.preservation_from_config`
builds what it needs from a yacs config.
"""
import logging
from dataclasses import dataclass, field
from typing import List, Optional

from .distill import OutputDistiller
from .frozen_rows import FrozenEntries
from .pseudo_labels import IGNORE, PseudoLabeledLoader, add_pseudo_labels, ignores_unsure
from .teacher import Teacher, teacher_class_index

__all__ = [
    "FrozenEntries",
    "IGNORE",
    "OutputDistiller",
    "Preservation",
    "PseudoLabeledLoader",
    "Teacher",
    "add_pseudo_labels",
    "attach_preservation",
    "ignores_unsure",
    "preservation_summary",
    "teacher_class_index",
]

logger = logging.getLogger(__name__)


@dataclass
class Preservation:
    """What keeps the old classes: the method, its teacher (None for frozen_rows / none), and
    where the teacher's classes are among the model's.

    Attributes:
        method (str): pseudo_labels, distill, frozen_rows or none.
        class_index (list[int or None]): per source class, the model's class id.
        num_classes (int): the model's thing classes.
        teacher (Teacher or None)
        score, distill_weight (float): PSEUDO_LABEL_SCORE, DISTILL_WEIGHT.
        attached (list): what :func:`attach_preservation` installed (loader, distiller, ...).
    """

    method: str
    class_index: List[Optional[int]]
    num_classes: int
    teacher: Optional[Teacher] = None
    score: float = 0.5
    distill_weight: float = 1.0
    attached: list = field(default_factory=list)

    @property
    def new_classes(self) -> List[int]:
        """The model's class ids that no source class maps to."""
        old = {i for i in self.class_index if i is not None}
        return [t for t in range(self.num_classes) if t not in old]


def attach_preservation(trainer, preservation: Preservation) -> Preservation:
    """Install ``preservation`` on a detectron2 ``SimpleTrainer`` (or subclass: AMPTrainer)
    whose model holds the loaded weights, before its first iteration.

    pseudo_labels wraps ``trainer.data_loader``; distill hooks ``trainer.model``; frozen_rows
    hooks its parameters and ``trainer.optimizer``. Returns ``preservation``.
    """
    p = preservation
    if p.method == "pseudo_labels":
        if getattr(trainer, "_data_loader_iter_obj", None) is not None:
            raise RuntimeError("attach_preservation: the trainer's data loader is already "
                               "being iterated; attach before training starts.")
        trainer.data_loader = PseudoLabeledLoader(trainer.data_loader, p.teacher, p.class_index,
                                                  score=p.score,
                                                  ignore_unsure=ignores_unsure(trainer.model))
        p.attached.append(trainer.data_loader)
    elif p.method == "distill":
        p.attached.append(OutputDistiller(trainer.model, p.teacher, p.class_index,
                                          weight=p.distill_weight))
    elif p.method == "frozen_rows":
        p.attached.append(FrozenEntries(trainer.model, trainer.optimizer, p.new_classes))
    if p.method != "none":
        old = sum(i is not None for i in p.class_index)
        n = len(p.new_classes)
        train = "1 new class trains" if n == 1 else f"{n} new classes train"
        logger.info(f"[Preservation] MODEL.RECLASS.PRESERVE {p.method}: keeping {old} source "
                    f"classes while {train}.")
    return p


def preservation_summary(preservation: Preservation) -> Optional[str]:
    """One line saying what ``preservation`` did so far (pseudo-labels added, the teacher's
    passes and time), or None for ``none``."""
    p = preservation
    if p.method == "none":
        return None
    parts = [f"[Preservation] MODEL.RECLASS.PRESERVE {p.method}"]
    for attached in p.attached:
        if isinstance(attached, PseudoLabeledLoader):
            parts.append(f"{attached.added} pseudo-labels of old classes added"
                         + (f", {attached.ignored} unsure objects ignored"
                            if attached.ignore_unsure else ""))
    t = p.teacher
    if t is not None and t.images:
        parts.append(f"teacher: {t.images} images, {t.runs} run in {t.calls} forward passes, "
                     f"{t.cached} from its cache, {t.seconds:.1f} s")
    return "; ".join(parts) + "."
