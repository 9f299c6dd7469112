"""Keep the checkpoint's classes through training on labels of the new classes only.

``MODEL.RECLASS.PRESERVE`` chooses how (:data:`~d2_reclass.options.PRESERVE_METHODS`):

* ``pseudo_labels`` (the default with KEEP_SOURCE_CLASSES): the frozen source model labels the
  old classes on every training image (:mod:`.pseudo_labels`);
* ``distill``: the old classes' outputs are distilled from it (:mod:`.distill`);
* ``frozen_rows``: only the new classes' entries train (:mod:`.frozen_rows`);
* ``none``: plain fine-tuning.

With a teacher (pseudo_labels, distill), ``MODEL.RECLASS.SOURCE_AVERAGE`` then leans the final
weights back toward the source's (:mod:`.averaging`).

The source model is the :class:`~.teacher.Teacher`. :func:`attach_preservation` puts a method
onto any detectron2 ``SimpleTrainer`` (its model, data loader and optimizer) after the
weights are loaded; :func:`~d2_reclass.integration.preservation.preservation_from_config`
builds what it needs from a yacs config.
"""
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .averaging import SourceAverage, average_with_source, source_weights
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
    "SourceAverage",
    "Teacher",
    "add_pseudo_labels",
    "attach_preservation",
    "average_with_source",
    "ignores_unsure",
    "preservation_summary",
    "source_weights",
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
        score, distill_weight, source_average (float): PSEUDO_LABEL_SCORE, DISTILL_WEIGHT,
            SOURCE_AVERAGE.
        source_classes, target_classes (list[str]): the teacher's and the model's class names
            (what the source average maps the teacher's weights by).
        max_iter (int or None): the iteration the run ends at (the source average's moment).
        attached (list): what :func:`attach_preservation` installed (loader, distiller, ...).
    """

    method: str
    class_index: List[Optional[int]]
    num_classes: int
    teacher: Optional[Teacher] = None
    score: float = 0.5
    distill_weight: float = 1.0
    source_average: float = 0.0
    source_classes: Sequence[str] = ()
    target_classes: Sequence[str] = ()
    max_iter: Optional[int] = None
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
    hooks its parameters and ``trainer.optimizer``; a source average (with a teacher, a
    ``source_average`` above 0 and a ``max_iter``) wraps ``trainer.run_step``. Returns
    ``preservation``.
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
    if p.teacher is not None and p.source_average > 0 and p.max_iter is not None:
        p.attached.append(SourceAverage(trainer, p.teacher.model, p.source_classes,
                                        p.target_classes, p.new_classes,
                                        weight=p.source_average, max_iter=p.max_iter))
    if p.method != "none":
        old = sum(i is not None for i in p.class_index)
        n = len(p.new_classes)
        train = "1 new class trains" if n == 1 else f"{n} new classes train"
        average = (f" At iteration {p.max_iter}, the weights are averaged with the source "
                   f"model's (SOURCE_AVERAGE {p.source_average:g}).") \
            if any(isinstance(a, SourceAverage) for a in p.attached) else ""
        logger.info(f"[Preservation] MODEL.RECLASS.PRESERVE {p.method}: keeping {old} source "
                    f"classes while {train}.{average}")
    return p


def preservation_summary(preservation: Preservation) -> Optional[str]:
    """One line saying what ``preservation`` did so far (pseudo-labels added, the teacher's
    passes and time, the source average once taken), or None for ``none``."""
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
    parts += [f"final weights averaged with the source model's ({a.weight:g} of it, "
              "SOURCE_AVERAGE)" for a in p.attached if isinstance(a, SourceAverage) and a.applied]
    return "; ".join(parts) + "."
