"""The same options for LazyConfig (Python) configs: a ``reclass`` dict beside ``train``.

    reclass = dict(mode="map", source_dataset="coco_2017_train", target_classes=[],
                   class_map=[], seed=0, only=[], rename=[], trust_pickle=False,
                   new_class_init="imprint", init_images=16, combine=[],
                   combine_allow_different_weights=False, keep_source_classes=False,
                   preserve="auto", pseudo_label_score=0.5, distill_weight=1.0,
                   teacher_cache=True, source_average=0.0)

``train.init_checkpoint`` is the checkpoint; the target classes default to the metadata of
``dataloader.train.dataset.names`` (with ``keep_source_classes``: the checkpoint's classes,
then their new ones). :func:`lazy_preservation` builds what ``preserve`` needs. Keys mirror
``MODEL.RECLASS`` in lower case. New classes take their examples from
``dataloader.train.dataset.names``, read as ``dataloader.test.mapper`` reads images (its
augmentations and image format).
"""
from typing import Any, Dict, List, Optional, Tuple

from ..data.class_lists import (
    check_source_dataset,
    checkpoint_thing_classes,
    kept_target_classes,
    labelled_classes,
    train_classes,
)
from ..data.mapping import map_datasets_to_classes
from ..errors import ConfigError
from ..layouts import STUFF
from ..new_classes import NewClassExamples
from ..options import ReclassOptions, check_keep_source_classes, preserve_method
from ..preserve import Preservation, Teacher, teacher_class_index
from .checkpoint import ReclassCheckpointer
from .probe import attach_lazy_probe, probed_lazy_fields
from .trainer import check_num_classes

__all__ = ["lazy_new_class_examples", "lazy_reclass_options", "lazy_target_classes",
           "apply_lazy_num_classes", "check_lazy_num_classes", "map_lazy_datasets",
           "lazy_preservation"]

_KEYS = ("mode", "source_classes", "source_dataset", "target_classes", "class_map", "seed",
         "only", "rename", "trust_pickle", "source_stuff_classes", "target_stuff_classes",
         "new_class_init", "init_images", "combine", "combine_allow_different_weights",
         "keep_source_classes", "preserve", "pseudo_label_score", "distill_weight",
         "teacher_cache", "source_average")


def _reclass(cfg) -> Dict[str, Any]:
    options = dict(cfg.get("reclass", None) or {})
    unknown = sorted(set(options) - set(_KEYS))
    if unknown:
        raise ConfigError(f"reclass.{unknown[0]} is not an option; use one of {_KEYS}.")
    return options


def _train_names(cfg, split: str = "train") -> List[str]:
    loader = cfg.dataloader.get(split, None) if "dataloader" in cfg else None
    names = loader.dataset.get("names", ()) if loader is not None and "dataset" in loader else ()
    return [names] if isinstance(names, str) else list(names)


def lazy_target_classes(cfg, kind: str = "thing") -> Optional[List[str]]:
    """``reclass.target_(stuff_)classes``, else the classes of the training datasets."""
    key = "target_classes" if kind == "thing" else "target_stuff_classes"
    options = _reclass(cfg)
    explicit = list(options.get(key) or [])
    if kind == "thing" and options.get("keep_source_classes", False):
        check_keep_source_classes(True, options.get("mode", "auto"), explicit,
                                  name=lambda option: f"reclass.{option}")
        return kept_target_classes(_source_classes(cfg), [
            labelled_classes(name, what="dataloader.train.dataset.names")
            for name in _train_names(cfg)])
    return explicit or train_classes(_train_names(cfg), kind)


def _source_classes(cfg) -> List[str]:
    options = _reclass(cfg)
    return checkpoint_thing_classes(
        cfg.train.get("init_checkpoint", "") if "train" in cfg else "",
        list(options.get("source_classes") or []), options.get("source_dataset", ""),
        trust_pickle=bool(options.get("trust_pickle", False)),
        weights_key="train.init_checkpoint")


def lazy_reclass_options(cfg) -> ReclassOptions:
    """The :class:`ReclassOptions` of a LazyConfig's ``reclass`` dict, target classes
    defaulting to those of the training datasets."""
    options = _reclass(cfg)
    # OmegaConf lists become plain lists; scalars pass as they are.
    out = {k: v if isinstance(v, (str, int, float, bool)) else list(v)
           for k, v in options.items() if v is not None}
    out["target_classes"] = lazy_target_classes(cfg, "thing")
    out["target_stuff_classes"] = lazy_target_classes(cfg, "stuff")
    reclass = ReclassOptions(**out)
    check_source_dataset(reclass.source_dataset)
    return reclass


def lazy_new_class_examples(cfg) -> Optional[NewClassExamples]:
    """The examples of the training datasets, read with the test mapper's augmentations and
    image format; None without training datasets."""
    from detectron2.config import instantiate

    names = _train_names(cfg)
    if not names:
        return None
    mapper = cfg.dataloader.get("test", {}).get("mapper", {}) if "dataloader" in cfg else {}
    augmentations = [instantiate(a) for a in mapper.get("augmentations", None) or []]
    return NewClassExamples(datasets=tuple(names), augmentations=tuple(augmentations),
                            image_format=mapper.get("image_format", None) or "BGR")


def apply_lazy_num_classes(cfg) -> List[Tuple[str, int, int]]:
    """Set ``num_classes`` where the zoo's LazyConfig models keep it, and in every other
    ``num_classes`` field of ``cfg.model`` that the probe finds sizing a head
    (:func:`~d2_reclass.integration.probe.probed_lazy_fields`); returns the changes."""
    return _set_num_classes(cfg, lazy_target_classes(cfg, "thing"),
                            lazy_target_classes(cfg, "stuff"), probed_lazy_fields(cfg))


def check_lazy_num_classes(cfg, model) -> None:
    """Raise before the first iteration if a head of ``model`` (instantiated from
    ``cfg.model``) was built for another number of classes than the target classes: a head
    sized by a field :func:`apply_lazy_num_classes` does not reach.

    Raises:
        ClassListError: naming the head, both counts and the fix.
    """
    check_num_classes(
        model, lazy_target_classes(cfg, "thing"), lazy_target_classes(cfg, "stuff"),
        what="the class list (reclass.target_classes, else dataloader.train.dataset.names)",
        fix="Set the field of cfg.model that sizes this head to that count (d2_reclass sets "
        "the num_classes fields it finds, and no other).")


def _set_num_classes(cfg, thing, stuff, probed=()) -> List[Tuple[str, int, int]]:
    changes = []
    fields = [(path, stuff if space == STUFF else thing) for path, space in probed]
    for path, classes in (("model.roi_heads.num_classes", thing), ("model.num_classes", thing),
                          ("model.sem_seg_head.num_classes", stuff), *fields):
        *parents, leaf = path.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if node is not None and part in node else None
        if classes and node is not None and leaf in node and node[leaf] != len(classes):
            changes.append((path, node[leaf], len(classes)))
            node[leaf] = len(classes)
    return changes


def map_lazy_datasets(cfg) -> None:
    """Map the datasets of ``dataloader.train`` and ``dataloader.test`` to the model's classes
    by name (see :func:`~d2_reclass.map_datasets_to_classes`); call it before instantiating
    the data loaders.

    Raises:
        ClassListError: a dataset names a class the model lacks.
    """
    thing, stuff = lazy_target_classes(cfg, "thing"), lazy_target_classes(cfg, "stuff")
    for split in ("train", "test"):
        map_datasets_to_classes(_train_names(cfg, split), thing, stuff,
                                what=f"dataloader.{split}.dataset.names",
                                target_what="the model's classes (reclass.target_classes, else "
                                "those of dataloader.train)",
                                fix="Add the missing classes to reclass.target_classes.")


def lazy_preservation(cfg):
    """The :class:`~d2_reclass.preserve.Preservation` of a LazyConfig's ``reclass`` dict, its
    teacher (for pseudo_labels / distill) instantiated from ``cfg.model`` for the checkpoint's
    classes and loaded from ``train.init_checkpoint``."""
    import copy

    from detectron2.config import instantiate

    options = lazy_reclass_options(cfg)
    method = preserve_method(options.preserve, options.keep_source_classes)
    target = list(options.target_classes or [])
    if method == "none":
        return Preservation("none", [], len(target))
    source = _source_classes(cfg)
    teacher = None
    if method in ("pseudo_labels", "distill"):
        tcfg = copy.deepcopy(cfg)
        _set_num_classes(tcfg, source, None, probed_lazy_fields(tcfg))
        for path in ("model.roi_heads.box_predictor", "model"):
            node = tcfg
            for part in path.split(".")[1:]:
                node = node.get(part) if node is not None else None
            if node is not None and "test_score_thresh" in node:
                node.test_score_thresh = options.pseudo_label_score
        model = attach_lazy_probe(instantiate(tcfg.model), tcfg).to(cfg.train.device)
        ReclassCheckpointer(model, reclass=ReclassOptions(
            mode="map", source_classes=options.source_classes,
            source_dataset=options.source_dataset, target_classes=source, only=options.only,
            rename=options.rename, trust_pickle=options.trust_pickle, new_class_init="head",
        )).load(cfg.train.init_checkpoint)
        teacher = Teacher(model, cache=options.teacher_cache)
    return Preservation(method, teacher_class_index(source, target), len(target), teacher,
                        score=options.pseudo_label_score, distill_weight=options.distill_weight,
                        source_average=options.source_average, source_classes=list(source),
                        target_classes=list(target), max_iter=cfg.train.max_iter)
