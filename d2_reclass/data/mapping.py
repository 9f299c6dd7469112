"""Datasets matched to the model's classes by name.

A registered dataset's ``category_id`` values are indices into its own ``thing_classes``; a
model's classes are names. :func:`map_datasets_to_classes` re-registers every dataset whose
thing classes differ from the model's (another order, or a subset such as a dataset that
lists only a new class), so that detectron2's own data path (``DatasetCatalog.get``, any
mapper and data loader, ``COCOEvaluator``) sees the model's class indices:

- every dict's ``category_id`` becomes the model's index of its class, by name;
- the metadata's ``thing_classes`` is the model's list, and for COCO-format datasets
  ``thing_dataset_id_to_contiguous_id`` is ``{j + 1: j}`` with ``json_file`` a copy of the
  dataset's json whose categories are the model's classes (class ``j`` has id ``j + 1``), so
  that COCOEvaluator's per-class table names the right classes and classes the dataset does
  not list are evaluated on nothing (their AP is NaN, left out of the mean).

A dataset whose labels name a class the model lacks is an error naming both lists. A class
the model lacks that no annotation uses (a category defined in an annotation tool and never
labelled, a full taxonomy of which a few classes are used, the root category of a Roboflow
export) is left out, with one log line: it maps to no class of the model, and no label needs
it to. Semantic-segmentation labels are pixel values read by the mapper, so stuff classes are
checked, not mapped.
"""
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager
from tabulate import tabulate

from ..classes import check_class_list, close_names, normalize_class_name, shown_classes
from ..errors import ClassListError, DatasetError
from ..io.atomic import atomic_file
from .class_lists import MappedDatasetLoader, class_usage, dataset_classes

__all__ = [
    "CLASS_INDEXED_METADATA",
    "map_datasets_to_classes",
    "remap_category_ids",
]

logger = logging.getLogger(__name__)

#: Metadata keys indexed by the dataset's own class order: replaced when the classes are mapped.
CLASS_INDEXED_METADATA = (
    "thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id", "json_file")

def remap_category_ids(dicts: Iterable[dict], table: Sequence[Optional[int]],
                       names: Optional[Sequence[str]] = None) -> List[dict]:
    """Copies of detectron2 dataset dicts whose annotations' ``category_id`` ``i`` is
    ``table[i]``; the input dicts are not modified (a loader may cache them).

    Args:
        table: for each of the dicts' classes, its new id; None for a class left out, which no
            annotation may use.
        names: the dicts' class names, for messages.

    Raises:
        DatasetError: an annotation's ``category_id`` is outside ``table`` or left out.
    """
    out = []
    for d in dicts:
        if "annotations" not in d:
            out.append(d)
            continue
        annotations = []
        for a in d["annotations"]:
            c = a.get("category_id")
            if c is None:
                annotations.append(a)
                continue
            if not 0 <= c < len(table):
                raise DatasetError(
                    f"An annotation of {d.get('file_name', 'an image')} has category_id {c}, "
                    f"but its dataset names {len(table)} classes; fix the annotation file.")
            if table[c] is None:
                name = repr(names[c]) if names else f"#{c}"
                raise DatasetError(
                    f"An annotation of {d.get('file_name', 'an image')} has the class {name}, "
                    "which the model lacks: no annotation used it when the dataset was mapped "
                    "to the model's classes (its files changed during the run?). Restart the "
                    "run, or add the class to the model's classes.")
            annotations.append(dict(a, category_id=table[c]))
        out.append(dict(d, annotations=annotations))
    return out


def _index_table(own: Sequence[str], target: Sequence[str]) -> List[Optional[int]]:
    """For each of the dataset's classes, the target index of its name (None if absent)."""
    by_name = {normalize_class_name(t): j for j, t in enumerate(target)}
    return [by_name.get(normalize_class_name(c)) for c in own]


def _set_metadata(name: str, values: Dict[str, Any]) -> None:
    """Replace the metadata of ``name`` by ``values`` (Metadata refuses changing a key)."""
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(**{k: v for k, v in values.items() if k != "name"})


class _MappedLoader(MappedDatasetLoader):
    """A DatasetCatalog entry: the dataset's own loader, its dicts' ids mapped to the model's.

    The own loader runs with the dataset's own metadata in place (stock ``load_coco_json``
    sets ``thing_classes`` and refuses another value), which is then put back.

    Attributes:
        name (str): the dataset.
        loader (callable): the loader it was registered with.
        own_metadata (dict): its metadata before mapping (what its loader sets, after a load).
        target (tuple[str]): the model's thing classes.
        table (list[int or None]): for each of its own classes, the model's index (None: left
            out, as no annotation used it when it was mapped).
    """

    def __init__(self, name: str, loader: Callable[[], list], own_metadata: Dict[str, Any],
                 target: Sequence[str]):
        self.name, self.loader, self.own_metadata = name, loader, dict(own_metadata)
        self.target = tuple(target)
        self.table = _index_table(self.own_metadata.get("thing_classes") or (), self.target)

    def load_own(self) -> List[dict]:
        mapped = MetadataCatalog.get(self.name).as_dict()
        _set_metadata(self.name, self.own_metadata)
        try:
            return self.loader()
        finally:
            self.own_metadata = MetadataCatalog.get(self.name).as_dict()
            _set_metadata(self.name, mapped)

    def __call__(self) -> List[dict]:
        dicts = self.load_own()
        own = self.own_metadata.get("thing_classes")
        if own is None or _index_table(own, self.target) != self.table:
            raise DatasetError(
                f"Dataset {self.name!r} names the classes {shown_classes(own or [], 12)} since it "
                f"was mapped to the model's classes {shown_classes(self.target, 12)}; its files "
                "changed during the run.")
        return remap_category_ids(dicts, self.table, own)


def _mapped_coco_json(name: str, json_file: str, target: Sequence[str]) -> str:
    """A copy of the COCO json ``json_file`` whose categories are ``target`` (class ``j`` has
    id ``j + 1``), its annotations' ids mapped by name; written once, named by its content.

    Raises:
        DatasetError: the json cannot be read, or names a class ``target`` lacks.
    """
    with PathManager.open(json_file, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw + json.dumps(list(target)).encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), "d2_reclass", f"{name}-{digest}.json")
    if os.path.isfile(path):
        return path
    try:
        data = json.loads(raw)
        by_name = {normalize_class_name(t): j + 1 for j, t in enumerate(target)}
        # A category the model lacks maps to nothing: no annotation may use it.
        ids = {c["id"]: by_name.get(normalize_class_name(c["name"])) for c in data["categories"]}
        data["categories"] = [{"id": j + 1, "name": t} for j, t in enumerate(target)]
        for a in data.get("annotations", []):
            a["category_id"] = ids[a["category_id"]]
            if a["category_id"] is None:
                raise KeyError(f"an annotation (id {a.get('id')}) has a class the model lacks")
    except (ValueError, KeyError, TypeError, ClassListError) as e:
        raise DatasetError(
            f"Dataset {name!r}: its json {json_file} could not be mapped to the model's classes "
            f"({type(e).__name__}: {e}); it must be COCO-format, every annotation's "
            "category_id one of its categories.") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path, overwrite=True) as f:
        f.write(json.dumps(data).encode())
    return path


def _mapped_metadata(name: str, own: Dict[str, Any], target: Sequence[str]) -> Dict[str, Any]:
    """The metadata of ``name`` once its classes are the model's ``target``."""
    out = {k: v for k, v in own.items() if k not in CLASS_INDEXED_METADATA}
    out["thing_classes"] = list(target)
    if own.get("json_file"):
        out["json_file"] = _mapped_coco_json(name, own["json_file"], target)
        out["thing_dataset_id_to_contiguous_id"] = {j + 1: j for j in range(len(target))}
        logger.info(f"Dataset {name!r}: evaluation reads {out['json_file']}, a copy of "
                    f"{own['json_file']} whose category ids are the model's (class j: id j+1).")
    return out


def _check_covered(name: str, own: Sequence[str], target: Sequence[str], what: str,
                   target_what: str, fix: str) -> Tuple[List[str], List[str]]:
    """(the classes of dataset ``name`` that the model's ``target`` lacks and that no annotation
    uses, the root categories among them): those are left out. Raise if a class the model
    lacks has labels."""
    missing = [i for i, j in enumerate(_index_table(own, target)) if j is None]
    if not missing:
        return [], []
    usage = class_usage(name, what=what)
    labelled = [own[i] for i in missing if usage.annotations[i]]
    if not labelled:
        return [own[i] for i in missing], [own[i] for i in missing if i in usage.roots]
    unlisted = [t for t in target if normalize_class_name(t) not in
                {normalize_class_name(c) for c in own}]
    hints = "".join(f" Is {close[0]!r} of {target_what} meant to be {c!r}?" for c in labelled[:3]
                    for close in [close_names(c, unlisted, 0.75)] if close)
    classes = f"class {labelled[0]!r}" if len(labelled) == 1 else \
        f"classes {shown_classes(labelled)[1:-1]}"
    raise ClassListError(
        f"{what} {name!r} has the thing {classes}, not among {target_what}: its labels cannot "
        f"be mapped to the model's classes by name.{hints} {what} {name!r}: "
        f"{shown_classes(own, 12)}; {target_what}: {shown_classes(target, 12)}. {fix}".rstrip())


def _log_left_out(name: str, left_out: Sequence[str], roots: Sequence[str], what: str,
                  target_what: str) -> None:
    """One line naming the classes of ``name`` that mapping leaves out (shortened past a few)."""
    if not left_out:
        return
    root = "" if not roots else (
        f" ({shown_classes(roots)[1:-1]}: the supercategory of the others, a root category as "
        "Roboflow exports write, not a class)")
    one = len(left_out) == 1
    logger.info(
        f"{what} {name!r}: {len(left_out)} {'category' if one else 'categories'} that no "
        f"annotation uses, not among {target_what}, {'is' if one else 'are'} left out (no label "
        f"maps to {'it' if one else 'them'}): {shown_classes(left_out, noun='categories')}{root}.")


def map_datasets_to_classes(
    dataset_names: Sequence[str],
    thing_classes: Optional[Sequence[str]],
    stuff_classes: Optional[Sequence[str]] = None,
    *,
    what: str = "Dataset",
    target_what: str = "the model's classes",
    fix: str = "",
) -> List[Tuple[str, str, int]]:
    """Make every dataset of ``dataset_names`` load with the model's class indices, by name.

    A dataset whose thing classes are ``thing_classes`` (in order, after name normalisation) is
    left as it is; one whose classes are a reordering or a subset of them is re-registered (see
    the module docstring). Idempotent: a dataset already mapped to these classes is left as it
    is; mapped to others, it is mapped again from its own classes. Call it before the data
    loaders are built.

    Args:
        dataset_names: registered datasets (e.g. DATASETS.TRAIN + DATASETS.TEST).
        thing_classes: the model's thing classes; None: nothing is mapped.
        stuff_classes: the model's stuff classes; a dataset naming others is an error.
        what, target_what, fix: how errors name the datasets (``"DATASETS.TRAIN"``) and the
            model's list (a config key), and what they tell the user to do.

    Returns:
        (dataset, its class, model index) for every class of every dataset mapped now (also
        logged as a table).

    A class the model lacks that no annotation of the dataset uses is left out (it maps to
    nothing; one log line names such classes when the dataset is mapped).

    Raises:
        ClassListError: a dataset's labels name a class the model lacks (naming both lists),
            or its stuff classes differ from ``stuff_classes``.
        DatasetError: a dataset had to be loaded for its classes and failed.
    """
    rows: List[Tuple[str, str, int]] = []
    target = check_class_list(thing_classes, target_what) if thing_classes else None
    for name in dict.fromkeys(dataset_names):
        own_stuff = dataset_classes(name, "stuff", what=what)
        if stuff_classes and own_stuff and _index_table(own_stuff, stuff_classes) != list(
                range(len(stuff_classes))):
            raise ClassListError(
                f"{what} {name!r} has the stuff classes {own_stuff}, but the model's are "
                f"{list(stuff_classes)}. Semantic-segmentation labels are pixel values that the "
                "mapper reads, which d2_reclass does not map: give the dataset the model's stuff "
                "classes in the model's order, or set MODEL.RECLASS.TARGET_STUFF_CLASSES to the "
                "dataset's.")
        own = dataset_classes(name, "thing", what=what)
        if target is None or not own:
            continue
        left_out, roots = _check_covered(name, own, target, what, target_what, fix)
        mapped = _map_one(name, own, target)
        if mapped is not None:
            _log_left_out(name, left_out, roots, what, target_what)
            rows += mapped
    if rows:
        logger.info("Datasets mapped to the model's classes by name:\n" + tabulate(
            rows, headers=["dataset", "its class", "model index"], tablefmt="pipe"))
    return rows


def _map_one(name: str, own: Sequence[str], target: Tuple[str, ...]
             ) -> Optional[List[Tuple[str, str, int]]]:
    """Re-register ``name`` with ``target``'s indices; the rows of the log table (its classes
    the model has), None when nothing had to change."""
    loader = DatasetCatalog[name]
    if isinstance(loader, _MappedLoader):
        if loader.target == target:
            return None
        own_metadata, loader = loader.own_metadata, loader.loader
    else:
        own_metadata = MetadataCatalog.get(name).as_dict()
    table = _index_table(own, target)
    mapped = _MappedLoader(name, loader, own_metadata, target)
    if table == list(range(len(target))):
        if mapped.loader is not DatasetCatalog[name]:  # mapped before: back to its own loader
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, mapped.loader)
            _set_metadata(name, own_metadata)
        return None
    metadata = _mapped_metadata(name, own_metadata, target)
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, mapped)
    _set_metadata(name, metadata)
    return [(name, c, j) for c, j in zip(own, table) if j is not None]
