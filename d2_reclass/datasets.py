"""Registering COCO-format datasets with their class names known up front."""
import json
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.file_io import PathManager

from .errors import CheckpointError

__all__ = ["register_coco_dataset", "coco_json_classes"]


def coco_json_classes(json_file: str) -> List[str]:
    """Category names of a COCO json, ordered by category id as ``load_coco_json`` orders them."""
    try:
        with PathManager.open(json_file) as f:
            cats = json.load(f)["categories"]
        return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{json_file} is not a readable COCO-format json with 'categories': {e}"
        ) from None


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """``register_coco_instances`` plus ``thing_classes`` in the metadata right away.

    detectron2 fills ``thing_classes`` only when the dataset is first loaded; class mapping and
    AUTO_NUM_CLASSES need them before the model is built. Registering a name twice with the
    same files is a no-op (``launch`` runs setup in every worker).
    """
    if name in DatasetCatalog.list():
        return
    register_coco_instances(name, {}, json_file, image_root)
    MetadataCatalog.get(name).set(thing_classes=coco_json_classes(json_file))
