"""The same options for LazyConfig (Python) configs: a ``reclass`` dict beside ``train``.

    reclass = dict(mode="map", source_dataset="coco_2017_train", target_classes=[],
                   class_map=[], seed=0, only=[], rename=[], trust_pickle=False,
                   new_class_init="imprint", init_images=16, combine=[],
                   combine_allow_different_weights=False)

``train.init_checkpoint`` is the checkpoint; the target classes default to the metadata of
``dataloader.train.dataset.names``. Keys mirror ``MODEL.RECLASS`` in lower case. New classes
take their examples from ``dataloader.train.dataset.names``, read as
``dataloader.test.mapper`` reads images (its augmentations and image format).
"""
from typing import Any, Dict, List, Optional, Tuple

from .config import train_classes
from .dataset_classes import map_datasets_to_classes
from .errors import ConfigError
from .new_classes import NewClassExamples
from .options import ReclassOptions

__all__ = ["lazy_new_class_examples", "lazy_reclass_options", "lazy_target_classes",
           "apply_lazy_num_classes", "map_lazy_datasets"]

_KEYS = ("mode", "source_classes", "source_dataset", "target_classes", "class_map", "seed",
         "only", "rename", "trust_pickle", "source_stuff_classes", "target_stuff_classes",
         "new_class_init", "init_images", "combine", "combine_allow_different_weights")


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
    explicit = list(_reclass(cfg).get(key) or [])
    return explicit or train_classes(_train_names(cfg), kind)


def lazy_reclass_options(cfg) -> ReclassOptions:
    """The :class:`ReclassOptions` of a LazyConfig's ``reclass`` dict, target classes
    defaulting to those of the training datasets."""
    options = _reclass(cfg)
    # OmegaConf lists become plain lists; scalars pass as they are.
    out = {k: v if isinstance(v, (str, int, float, bool)) else list(v)
           for k, v in options.items() if v is not None}
    out["target_classes"] = lazy_target_classes(cfg, "thing")
    out["target_stuff_classes"] = lazy_target_classes(cfg, "stuff")
    return ReclassOptions(**out)


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
    """Set ``num_classes`` where the zoo's LazyConfig models keep it; returns the changes."""
    thing, stuff = lazy_target_classes(cfg, "thing"), lazy_target_classes(cfg, "stuff")
    changes = []
    for path, classes in (("model.roi_heads.num_classes", thing), ("model.num_classes", thing),
                          ("model.sem_seg_head.num_classes", stuff)):
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
