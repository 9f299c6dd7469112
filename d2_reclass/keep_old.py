"""MODEL.RECLASS.KEEP_SOURCE_CLASSES: the model's classes are the checkpoint's, then the new ones.

"I have a model for N classes and labels for one more class only": with the key on, the target
classes are the checkpoint's classes in their order, followed by the training datasets'
classes that the checkpoint does not know. The checkpoint's classes are, in this order of
precedence, ``SOURCE_CLASSES``, the names the checkpoint stores, ``SOURCE_DATASET``'s
(as :class:`~d2_reclass.ReclassCheckpointer` reads them). How the old classes survive training
on labels of the new ones is :mod:`d2_reclass.preserve`'s job.
"""
import functools
import os
from typing import List, Optional, Sequence, Tuple

from .classes import union_classes
from .errors import ClassListError, ConfigError

__all__ = ["check_keep_source_classes", "checkpoint_thing_classes", "keep_source_target",
           "kept_target_classes", "stored_thing_classes"]


def kept_target_classes(source: Sequence[str],
                        dataset_lists: Sequence[Sequence[str]]) -> List[str]:
    """``source`` in its order, then every class of ``dataset_lists`` it lacks (by normalised
    name), in the order they first appear. Pure; the result never repeats a name."""
    return union_classes([source, *dataset_lists])


@functools.lru_cache(maxsize=16)
def _stored_thing_classes(local: str, mtime: float, size: int,
                          trust_pickle: bool) -> Tuple[str, ...]:
    # Keyed by the file's stamp: target_classes() is asked several times per run.
    from .checkpoint import read_stored_classes

    return tuple(read_stored_classes(local, trust_pickle=trust_pickle).get("thing_classes", ()))


def stored_thing_classes(path: str, *, trust_pickle: bool = False) -> List[str]:
    """The thing classes stored in the checkpoint at ``path`` (empty if it stores none).

    Raises:
        CheckpointError: the file is missing or not a checkpoint.
    """
    from .checkpoint import _existing_local_path

    local = _existing_local_path(path)
    stat = os.stat(local)
    return list(_stored_thing_classes(local, stat.st_mtime, stat.st_size, trust_pickle))


def checkpoint_thing_classes(weights: str, source_classes: Sequence[str] = (),
                             source_dataset: str = "", *, trust_pickle: bool = False,
                             weights_key: str = "MODEL.WEIGHTS") -> List[str]:
    """The checkpoint's thing classes as ReclassCheckpointer reads them: ``source_classes``,
    else the names stored in ``weights``, else ``source_dataset``'s.

    Raises:
        ConfigError: no checkpoint is given.
        ClassListError: none of the three names the classes (the message says how to).
    """
    if source_classes:
        return list(source_classes)
    if not weights:
        raise ConfigError(
            f"MODEL.RECLASS.KEEP_SOURCE_CLASSES keeps the classes of the checkpoint, but "
            f"{weights_key} is empty: set it to the model whose classes to keep.")
    stored = stored_thing_classes(weights, trust_pickle=trust_pickle)
    if stored:
        return stored
    if source_dataset:
        from .config import dataset_classes

        names = dataset_classes(source_dataset, what="MODEL.RECLASS.SOURCE_DATASET")
        if names:
            return names
    raise ClassListError(
        f"MODEL.RECLASS.KEEP_SOURCE_CLASSES keeps the checkpoint's classes, but {weights_key} "
        f"{weights} stores no class names. Name them with MODEL.RECLASS.SOURCE_CLASSES "
        "'[\"a\", \"b\", ...]' (in the order of its class rows) or MODEL.RECLASS.SOURCE_DATASET "
        "(a registered dataset with its classes, e.g. coco_2017_train), or store them once with "
        f"`d2-reclass convert {weights} --out named.pth --classes A,B --source-classes A,B`.")


def check_keep_source_classes(keep: bool, mode: str, target_classes: Sequence[str],
                              name=lambda option: f"MODEL.RECLASS.{option.upper()}") -> None:
    """Raise when KEEP_SOURCE_CLASSES is combined with an option that contradicts it.

    Raises:
        ConfigError: with MODE reinit (which discards every class row) or with explicit
            TARGET_CLASSES (which KEEP_SOURCE_CLASSES computes).
    """
    if not keep:
        return
    if mode == "reinit":
        raise ConfigError(
            f"{name('keep_source_classes')} keeps what the checkpoint knows of its classes, "
            f"but {name('mode')} reinit starts every class row fresh: use {name('mode')} auto "
            f"(or map), or set {name('keep_source_classes')} False.")
    if target_classes:
        raise ConfigError(
            f"{name('keep_source_classes')} makes the target classes the checkpoint's followed "
            f"by the datasets' new ones, but {name('target_classes')} is also set "
            f"({', '.join(target_classes)}): set one of the two.")


def keep_source_target(cfg, dataset_lists: Sequence[Sequence[str]]) -> Optional[List[str]]:
    """The target thing classes of a yacs config with KEEP_SOURCE_CLASSES on, else None.

    Args:
        dataset_lists: the thing classes of each training dataset (None entries skipped).
    """
    r = cfg.MODEL.get("RECLASS", None) or {}
    if not r.get("KEEP_SOURCE_CLASSES", False):
        return None
    check_keep_source_classes(True, r.get("MODE", "auto"), r.get("TARGET_CLASSES", ()))
    source = checkpoint_thing_classes(
        cfg.MODEL.WEIGHTS, r.get("SOURCE_CLASSES", ()), r.get("SOURCE_DATASET", ""),
        trust_pickle=bool(r.get("TRUST_PICKLE", False)))
    return kept_target_classes(source, [c for c in dataset_lists if c])
