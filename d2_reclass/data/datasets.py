"""Registering COCO-format datasets with their class names known up front."""
import json
from typing import Any, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.file_io import PathManager

from ..errors import DatasetError

__all__ = ["register_coco_dataset", "coco_json_classes"]

_COCO_HINT = (
    "pass a COCO-format annotation file, whose 'categories' list every class as "
    '{"id": ..., "name": ...}'
)


def _read_json(json_file: str) -> Any:
    try:
        with PathManager.open(json_file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(
            f"Dataset json {json_file} does not exist; check the JSON path "
            "(--coco-dataset NAME JSON IMAGE_ROOT)."
        ) from None
    except OSError as e:
        raise DatasetError(
            f"Cannot read dataset json {json_file}: {e.strerror or e}; check the path and its "
            "permissions."
        ) from None
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        raise DatasetError(f"Dataset json {json_file} is not valid JSON ({e}); {_COCO_HINT}.") \
            from None


def coco_json_classes(json_file: str) -> List[str]:
    """Category names of a COCO json, ordered by category id as ``load_coco_json`` orders them.

    Raises:
        DatasetError: naming ``json_file``, if it is missing or unreadable, is not JSON, or has
            no non-empty ``categories`` list of entries with ``id`` and ``name``.
    """
    data = _read_json(json_file)
    if not isinstance(data, dict):
        found = "no JSON object at the top (a COCO file is one object)"
    elif "categories" not in data:
        found = "no 'categories'"
    elif not isinstance(data["categories"], list):
        found = "'categories' that is not a list"
    elif not data["categories"]:
        found = "an empty 'categories' list"
    else:
        found = ""
    if found:
        raise DatasetError(f"Dataset json {json_file} has {found}; {_COCO_HINT}.")
    cats = data["categories"]
    try:
        return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    except (KeyError, TypeError):
        raise DatasetError(
            f"Dataset json {json_file} has 'categories' entries without an 'id' or 'name' "
            f"(or with ids that do not sort); {_COCO_HINT}."
        ) from None


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """``register_coco_instances`` plus ``thing_classes`` in the metadata right away.

    detectron2 fills ``thing_classes`` only when the dataset is first loaded; class mapping and
    AUTO_NUM_CLASSES need them before the model is built. Registering a name twice with the
    same files is a no-op (``launch`` runs setup in every worker). The json is read before
    anything is registered, so a bad file leaves no half-registered name behind.

    Raises:
        DatasetError: ``json_file`` gives no class names (see :func:`coco_json_classes`).
    """
    if name in DatasetCatalog.list():
        return
    classes = coco_json_classes(json_file)
    register_coco_instances(name, {}, json_file, image_root)
    MetadataCatalog.get(name).set(thing_classes=classes)
