"""COCO-format files: their categories read and checked, and datasets registered with their
class names known up front.

Annotation tools (Roboflow, CVAT, Label Studio, labelme2coco, pylabel) write COCO files that
stock ``load_coco_json`` reads whole: every category becomes a class, the ones no annotation
uses too. :func:`read_coco_categories` reads what d2_reclass needs to know about them: each
category's name, how many annotations use it, and which one is a root category (see
:attr:`CocoCategories.roots`). A damaged category list is one :class:`DatasetError` naming the
file and the entry.
"""
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.file_io import PathManager

from ..classes import class_name_problem, normalize_class_name, shown_classes
from ..errors import DatasetError

__all__ = ["CocoCategories", "coco_json_classes", "read_coco_categories", "register_coco_dataset"]

_COCO_HINT = (
    "pass a COCO-format annotation file, whose 'categories' list every class as "
    '{"id": ..., "name": ...}'
)
_FIX_ENTRY = ("fix that entry in the file (or the class in the annotation tool that wrote it, "
              "and export again)")


@dataclass(frozen=True)
class CocoCategories:
    """The categories of a COCO json in the order ``load_coco_json`` gives them contiguous ids
    (ascending category id), and how the file's annotations use them.

    Attributes:
        json_file (str): the file read.
        ids (tuple[int]): the category ids, ascending.
        names (tuple[str]): their names (each checked by :func:`class_name_problem`).
        supercategories (tuple[str or None]): their ``supercategory`` (None when absent).
        annotations (tuple[int]): for each category, how many annotations name it.
    """

    json_file: str
    ids: Tuple[int, ...]
    names: Tuple[str, ...]
    supercategories: Tuple[Optional[str], ...]
    annotations: Tuple[int, ...]

    @property
    def roots(self) -> Tuple[int, ...]:
        """Indices of the root categories: a category that is another category's
        ``supercategory`` and that no annotation uses. Roboflow exports write one (id 0,
        supercategory ``"none"``, named after the project) above every real class; it is a
        grouping, not a class, and a model given a row for it would never see a label."""
        parents = {normalize_class_name(s) for s, n in zip(self.supercategories, self.names)
                   if isinstance(s, str) and normalize_class_name(s) != normalize_class_name(n)}
        return tuple(i for i, (n, count) in enumerate(zip(self.names, self.annotations))
                     if count == 0 and normalize_class_name(n) in parents)


def _read_json(json_file: str) -> Tuple[Any, str, str]:
    """(the parsed file, '', '') or (None, what is wrong in words, what to do)."""
    try:
        with PathManager.open(json_file) as f:
            return json.load(f), "", ""
    except FileNotFoundError:
        return None, "does not exist", "check the JSON path (--coco-dataset NAME JSON IMAGE_ROOT)"
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}", "check the path and its permissions"
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        return None, f"is not valid JSON ({e})", _COCO_HINT


def _entry(value: Any, most: int = 120) -> str:
    """A file's entry as JSON, cut at ``most`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= most else text[:most] + " ..."


def _categories_problem(data: Any) -> Tuple[str, str]:
    """(what is wrong with a COCO json's category list or its annotations' category ids, as
    "has ..." words naming the entry, what to do); ('', '') when nothing is."""
    problem = _top_level_problem(data)
    if problem:
        return problem, _COCO_HINT
    return _entry_problem(data), _FIX_ENTRY


def _top_level_problem(data: Any) -> str:
    if not isinstance(data, dict):
        return "has no JSON object at the top (a COCO file is one object)"
    if "categories" not in data:
        return "has no 'categories'"
    if not isinstance(data["categories"], list):
        return "has 'categories' that is not a list"
    if not data["categories"]:
        return "has an empty 'categories' list"
    return ""


def _entry_problem(data: Dict[str, Any]) -> str:
    cats = data["categories"]
    first: Dict[Any, int] = {}
    for i, c in enumerate(cats):
        at = f"has categories[{i}] = {_entry(c)}"
        if not isinstance(c, dict):
            return f"{at}, not an object like {{\"id\": 1, \"name\": \"cat\"}}"
        if "id" not in c or "name" not in c:
            return f"{at}, without an 'id' or 'name'"
        if isinstance(c["id"], bool) or not isinstance(c["id"], int):
            return f"{at}, whose 'id' {_entry(c['id'])} is not an integer (COCO ids are numbers)"
        problem = class_name_problem(c["name"])
        if problem:
            return f"{at}, whose 'name' {problem}"
        if c["id"] in first:
            j = first[c["id"]]
            return (f"has categories[{j}] = {_entry(cats[j])} and categories[{i}] = {_entry(c)} "
                    f"with the same id {c['id']}; each category needs its own id")
        first[c["id"]] = i
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        return "has 'annotations' that is not a list"
    for k, a in enumerate(anns):
        cid = a.get("category_id") if isinstance(a, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int) or cid not in first:
            return (f"has annotations[{k}] = {_entry(a, 100)}, whose category_id "
                    f"{_entry(cid)} is none of the categories' ids "
                    f"{shown_classes(sorted(first), noun='ids')}")
    return ""


def _parse(data: Any, json_file: str) -> CocoCategories:
    cats = sorted(data["categories"], key=lambda c: c["id"])
    counts: Dict[int, int] = {c["id"]: 0 for c in cats}
    for a in data.get("annotations", []):
        counts[a["category_id"]] += 1
    return CocoCategories(
        json_file, tuple(c["id"] for c in cats), tuple(c["name"] for c in cats),
        tuple(c.get("supercategory") if isinstance(c.get("supercategory"), str) else None
              for c in cats),
        tuple(counts[c["id"]] for c in cats))


@functools.lru_cache(maxsize=32)
def _read_checked(json_file: str, stamp: Tuple[float, int]
                  ) -> Tuple[Optional[CocoCategories], str, str]:
    """(the categories, '', '') or (None, what is wrong, what to do). Keyed by the file's stamp:
    a run asks about one file several times (the model's classes, then the mapping of each
    dataset), and a big json takes seconds to parse; only this summary is kept."""
    data, problem, fix = _read_json(json_file)
    if not problem:
        problem, fix = _categories_problem(data)
    return (None, problem, fix) if problem else (_parse(data, json_file), "", "")


def _stamp(json_file: str) -> Tuple[float, int]:
    try:
        stat = os.stat(PathManager.get_local_path(json_file))
    except (OSError, ValueError):
        return (0.0, -1)  # unreadable: _read_json says why
    return (stat.st_mtime, stat.st_size)


def read_coco_categories(json_file: str, where: str = "") -> CocoCategories:
    """The categories of the COCO json ``json_file`` and how its annotations use them, checked.

    Args:
        where: how messages name the file, e.g. ``"DATASETS.TRAIN 'rf': its json x.json"``
            (default ``"Dataset json <json_file>"``).

    Raises:
        DatasetError: naming the file and the entry at fault, if it is missing or unreadable,
            is not JSON, has no non-empty ``categories`` list, or a category that is not an
            object with an integer ``id`` (each its own) and a non-empty string ``name``, or an
            annotation whose ``category_id`` is no category's.
    """
    categories, problem, fix = _read_checked(json_file, _stamp(json_file))
    if problem:
        raise DatasetError(f"{where or f'Dataset json {json_file}'} {problem}; {fix}.")
    return categories


def coco_json_classes(json_file: str, where: str = "") -> List[str]:
    """Category names of a COCO json, ordered by category id as ``load_coco_json`` orders them.

    Raises:
        DatasetError: naming ``json_file`` (as ``where`` says) and the entry (see
            :func:`read_coco_categories`).
    """
    return list(read_coco_categories(json_file, where).names)


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
    classes = coco_json_classes(json_file, f"Dataset {name!r}: its json {json_file}")
    register_coco_instances(name, {}, json_file, image_root)
    MetadataCatalog.get(name).set(thing_classes=classes)
