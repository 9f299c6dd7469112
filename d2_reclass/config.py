"""Config keys (``MODEL.RECLASS``), class-list resolution, and YAML loading with zoo bases."""
import logging
import os
from typing import List, Optional, Sequence, Tuple

import yaml
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .classes import did_you_mean
from .errors import ClassListError

__all__ = [
    "add_reclass_config",
    "apply_num_classes",
    "dataset_classes",
    "merge_config_file",
    "train_classes",
]

logger = logging.getLogger(__name__)

MODEL_ZOO_PREFIX = "model_zoo://"


def add_reclass_config(cfg: CN) -> None:
    """Add ``cfg.MODEL.RECLASS`` with its defaults. Idempotent; only sets defaults."""
    if "RECLASS" in cfg.MODEL:
        return
    _C = cfg.MODEL.RECLASS = CN()
    # How checkpoint heads are fitted to the model's classes: "auto" (map when both class lists
    # are known, else reinit when counts differ, else load unchanged), "map" (copy rows class by
    # class by name), "reinit" (fresh rows from the head's own init), "strict" (raise).
    _C.MODE = "auto"
    # The checkpoint's thing classes, in its order. Empty: the names the checkpoint stores
    # (d2_reclass writes them), else SOURCE_DATASET's metadata, else unknown.
    _C.SOURCE_CLASSES = []
    # A registered dataset whose metadata gives the checkpoint's classes (e.g. coco_2017_train,
    # lvis_v1_train). Used when neither SOURCE_CLASSES nor the checkpoint names them.
    _C.SOURCE_DATASET = ""
    # The model's thing classes. Empty: the classes of DATASETS.TRAIN (which must all agree).
    _C.TARGET_CLASSES = []
    # The same two for semantic-segmentation ("stuff") heads; empty: from the same datasets.
    _C.SOURCE_STUFF_CLASSES = []
    _C.TARGET_STUFF_CLASSES = []
    # "target=source" pairs overriding name matching, e.g. ["automobile=car"]; "target=" marks
    # a class as new on purpose.
    _C.CLASS_MAP = []
    # Seeds fresh rows, together with each parameter's name: every rank and rerun agrees.
    _C.SEED = 0
    # Set ROI_HEADS / RETINANET / SEM_SEG_HEAD / POINT_HEAD NUM_CLASSES from the target
    # classes before the model is built.
    _C.AUTO_NUM_CLASSES = True
    # Take only checkpoint keys with these prefixes (e.g. ["backbone."]); empty: all.
    _C.ONLY = []
    # "old_prefix=new_prefix" renames applied to checkpoint keys after ONLY.
    _C.RENAME = []
    # Allow full unpickling of .pkl / legacy .pth files. Only for files you trust.
    _C.TRUST_PICKLE = False


def _thing_or_stuff(kind: str) -> str:
    return "thing_classes" if kind == "thing" else "stuff_classes"


def dataset_classes(name: str, kind: str = "thing", *, what: str = "") -> Optional[List[str]]:
    """The ``thing_classes`` / ``stuff_classes`` of a registered dataset, or None if unset.

    Raises:
        ClassListError: ``name`` is not a registered dataset (with close-match suggestions).
    """
    if name not in DatasetCatalog.list() and name not in MetadataCatalog.list():
        raise ClassListError(
            f"{what or 'Dataset'} {name!r} is not a registered dataset."
            + did_you_mean(name, DatasetCatalog.list())
            + " Register it first (e.g. tools/train_net.py --coco-dataset NAME JSON IMAGES)."
        )
    classes = MetadataCatalog.get(name).get(_thing_or_stuff(kind), None)
    return list(classes) if classes else None


def train_classes(datasets: Sequence[str], kind: str = "thing") -> Optional[List[str]]:
    """The classes shared by every dataset in ``datasets`` (DATASETS.TRAIN), None if unknown.

    Raises:
        ClassListError: the datasets disagree.
    """
    found: List[Tuple[str, List[str]]] = []
    for name in datasets:
        classes = dataset_classes(name, kind, what="DATASETS.TRAIN")
        if classes is not None:
            found.append((name, classes))
    for name, classes in found[1:]:
        if classes != found[0][1]:
            raise ClassListError(
                f"DATASETS.TRAIN mixes class lists: {found[0][0]!r} has {len(found[0][1])} "
                f"{kind} classes and {name!r} has {len(classes)} (or another order). Train on "
                "datasets with one class list, or set MODEL.RECLASS.TARGET_CLASSES."
            )
    return found[0][1] if found else None


def target_classes(cfg: CN, kind: str = "thing") -> Optional[List[str]]:
    """TARGET_(STUFF_)CLASSES, else the classes of DATASETS.TRAIN, else None."""
    key = "TARGET_CLASSES" if kind == "thing" else "TARGET_STUFF_CLASSES"
    explicit = list(cfg.MODEL.RECLASS[key])
    return explicit or train_classes(cfg.DATASETS.TRAIN, kind)


def apply_num_classes(
    cfg: CN,
    thing_classes: Optional[Sequence[str]],
    stuff_classes: Optional[Sequence[str]] = None,
) -> List[Tuple[str, int, int]]:
    """Set every NUM_CLASSES key from the class lists; returns (key, old, new) for changes,
    for the caller to log once logging is set up.

    Must run before the model is built (``cfg`` must not be frozen).
    """
    keys = []
    if thing_classes:
        keys += [(k, len(thing_classes)) for k in (
            "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES")]
        if cfg.MODEL.META_ARCHITECTURE != "SemanticSegmentor":
            keys.append(("MODEL.POINT_HEAD.NUM_CLASSES", len(thing_classes)))
    if stuff_classes:
        keys.append(("MODEL.SEM_SEG_HEAD.NUM_CLASSES", len(stuff_classes)))
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
            keys.append(("MODEL.POINT_HEAD.NUM_CLASSES", len(stuff_classes)))
    changes = []
    for key, value in keys:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if node is not None else None
        # POINT_HEAD exists only after add_pointrend_config.
        if node is None or leaf not in node:
            continue
        if node[leaf] != value:
            changes.append((key, node[leaf], value))
            node[leaf] = value
    return changes


def merge_config_file(cfg: CN, path: str) -> None:
    """Merge a YAML config into ``cfg``, resolving ``_BASE_: model_zoo://<config>`` too.

    detectron2 resolves ``_BASE_`` only relative to the file; this lets a config in
    ``configs/`` hold only its differences from a model-zoo config. YAML is read with
    ``yaml.safe_load``.
    """
    with PathManager.open(path) as f:
        data = yaml.safe_load(f) or {}
    base = data.pop("_BASE_", None)
    if base:
        if base.startswith(MODEL_ZOO_PREFIX):
            from detectron2 import model_zoo

            cfg.merge_from_file(model_zoo.get_config_file(base[len(MODEL_ZOO_PREFIX):]))
        else:
            merge_config_file(cfg, os.path.join(os.path.dirname(path), base))
    cfg.merge_from_other_cfg(CN(data))
