"""The preservation of a yacs config: MODEL.RECLASS.PRESERVE's method with its teacher, the
source model built as the config builds the student and loaded from MODEL.WEIGHTS."""
from typing import Sequence

from detectron2.modeling import META_ARCH_REGISTRY, build_model

from ..data.class_lists import checkpoint_thing_classes, target_classes
from ..options import ReclassOptions, preserve_method
from ..preserve import Preservation, Teacher, ignores_unsure, teacher_class_index
from .checkpoint import ReclassCheckpointer
from .config import apply_num_classes
from .probe import attach_probe

__all__ = ["build_teacher", "preservation_from_config"]


def build_teacher(cfg, source_classes: Sequence[str], *, score: float) -> Teacher:
    """The source model of a yacs config: built as the config builds the student, but for
    ``source_classes``, with MODEL.WEIGHTS loaded unchanged; detections from ``score`` up, or,
    for a model that ignores the unsure ones (:func:`ignores_unsure`), from the config's own
    test threshold up."""
    t = cfg.clone()
    t.defrost()
    r = t.MODEL.RECLASS
    apply_num_classes(t, source_classes)
    unsure = ignores_unsure(META_ARCH_REGISTRY.get(t.MODEL.META_ARCHITECTURE))
    for heads in (t.MODEL.ROI_HEADS, t.MODEL.RETINANET):
        heads.SCORE_THRESH_TEST = min(heads.SCORE_THRESH_TEST, score) if unsure else score
    model = attach_probe(build_model(t), t)  # a project no layout knows: probed
    options = ReclassOptions(
        mode="map", source_classes=r.SOURCE_CLASSES or None, source_dataset=r.SOURCE_DATASET,
        target_classes=list(source_classes), only=r.ONLY, rename=r.RENAME,
        trust_pickle=r.TRUST_PICKLE, new_class_init="head")
    ReclassCheckpointer(model, reclass=options).load(t.MODEL.WEIGHTS)
    return Teacher(model, cache=r.TEACHER_CACHE)


def preservation_from_config(cfg) -> Preservation:
    """The :class:`Preservation` of a prepared yacs config (teacher built and loaded)."""
    r = cfg.MODEL.RECLASS
    method = preserve_method(r.PRESERVE, r.KEEP_SOURCE_CLASSES)
    target = target_classes(cfg, "thing") or []
    if method == "none":
        return Preservation("none", [], len(target))
    source = checkpoint_thing_classes(cfg.MODEL.WEIGHTS, r.SOURCE_CLASSES, r.SOURCE_DATASET,
                                      trust_pickle=r.TRUST_PICKLE)
    index = teacher_class_index(source, target)
    teacher = build_teacher(cfg, source, score=r.PSEUDO_LABEL_SCORE) \
        if method in ("pseudo_labels", "distill") else None
    return Preservation(method, index, len(target), teacher, score=r.PSEUDO_LABEL_SCORE,
                        distill_weight=r.DISTILL_WEIGHT, source_average=r.SOURCE_AVERAGE,
                        source_classes=list(source), target_classes=list(target),
                        max_iter=cfg.SOLVER.MAX_ITER)
