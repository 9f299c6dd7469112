"""Which classes: every answer d2_reclass gives to "what are the checkpoint's / the model's /
the data's classes?", in one place.

The sources, each read here and nowhere else:

* a checkpoint's stored names (:data:`CLASSES_KEY`, which :class:`ReclassCheckpointer` writes);
* ``MODEL.RECLASS.SOURCE_CLASSES`` / ``SOURCE_DATASET``: the checkpoint's classes, named;
* a registered dataset's own ``thing_classes`` / ``stuff_classes`` (loaded once when stock
  ``register_coco_instances`` has not set them yet), also once it was mapped to the model's,
  and how many annotations use each (:func:`class_usage`): the classes a model trained on it
  counts (:func:`trained_classes`) and those its labels teach (:func:`labelled_classes`);
* ``MODEL.RECLASS.TARGET_CLASSES``, else the classes of ``DATASETS.TRAIN``;
* ``MODEL.RECLASS.KEEP_SOURCE_CLASSES``: the checkpoint's classes, then the datasets' new ones;
* evaluation: the classes ``MODEL.WEIGHTS`` (and ``COMBINE``) store.

Configs are read, never built or frozen here: the integration (:mod:`d2_reclass.integration`)
decides when to ask.
"""
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from ..classes import class_name_problem, did_you_mean, pick_source_classes, union_classes
from ..errors import CheckpointError, ClassListError, ConfigError, DatasetError
from ..io.serialization import existing_local_path, load_checkpoint_file
from ..options import check_keep_source_classes, config_key
from .datasets import CocoCategories, read_coco_categories

__all__ = [
    "CLASSES_KEY",
    "ClassUsage",
    "MappedDatasetLoader",
    "check_source_dataset",
    "checkpoint_thing_classes",
    "class_usage",
    "dataset_classes",
    "keep_source_target",
    "kept_target_classes",
    "labelled_classes",
    "read_stored_classes",
    "source_classes",
    "stored_classes",
    "stored_eval_classes",
    "stored_thing_classes",
    "target_classes",
    "target_classes_what",
    "train_classes",
    "trained_classes",
    "use_checkpoint_classes",
]

logger = logging.getLogger(__name__)

#: Top-level checkpoint entry holding ``{"thing_classes": [...], "stuff_classes": [...]}``.
#: Plain DetectionCheckpointer ignores it, so the files stay loadable by stock detectron2.
CLASSES_KEY = "d2_reclass"


# ------------------------------------------------------------------------------ checkpoints
def stored_classes(checkpoint: Dict[str, Any], *, source: str = "the checkpoint"
                   ) -> Dict[str, List[str]]:
    """``{"thing_classes": [...], "stuff_classes": [...]}`` stored in a loaded checkpoint.

    Raises :class:`CheckpointError` naming ``source`` if the entry is there but is not a dict
    whose ``*_classes`` items are lists of names (a damaged or hand-edited file); other items
    of the entry are ignored.
    """
    stored = checkpoint.get(CLASSES_KEY) if isinstance(checkpoint, dict) else None
    if stored is None:
        return {}
    if isinstance(stored, dict):
        lists = {k: v for k, v in stored.items() if isinstance(k, str) and k.endswith("_classes")}
        if all(_is_name_list(v) for v in lists.values()):
            return {k: list(v) for k, v in lists.items() if v}
    raise CheckpointError(
        f"Checkpoint {source}: its '{CLASSES_KEY}' entry holds {stored!r:.80}, not the class "
        f"names d2_reclass saves ({{'thing_classes': [name, ...]}}). The file is damaged or was "
        f"edited: save it again, or delete that entry and give the checkpoint's classes with "
        f"MODEL.RECLASS.SOURCE_CLASSES."
    )


def _is_name_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value)


def read_stored_classes(path: str, *, trust_pickle: bool = False) -> Dict[str, List[str]]:
    """The class names stored in the checkpoint at ``path`` (local, URL or detectron2://)."""
    return stored_classes(load_checkpoint_file(existing_local_path(path),
                                               trust_pickle=trust_pickle), source=path)


@functools.lru_cache(maxsize=16)
def _stored_thing_classes(local: str, mtime: float, size: int,
                          trust_pickle: bool) -> Tuple[str, ...]:
    # Keyed by the file's stamp: target_classes() is asked several times per run.
    return tuple(read_stored_classes(local, trust_pickle=trust_pickle).get("thing_classes", ()))


def stored_thing_classes(path: str, *, trust_pickle: bool = False) -> List[str]:
    """The thing classes stored in the checkpoint at ``path`` (empty if it stores none).

    Raises:
        CheckpointError: the file is missing or not a checkpoint.
    """
    local = existing_local_path(path)
    stat = os.stat(local)
    return list(_stored_thing_classes(local, stat.st_mtime, stat.st_size, trust_pickle))


def source_classes(stored: Dict[str, List[str]], kind: str, explicit: Optional[Sequence[str]],
                   source_dataset: str = "", *, resuming: bool = False
                   ) -> Tuple[Optional[List[str]], str]:
    """(names, where they came from) of a loaded checkpoint's ``kind`` classes: ``explicit``
    (SOURCE_(STUFF_)CLASSES) > the names it ``stored`` > ``source_dataset``'s.

    Resuming reads the run's own last checkpoint, not MODEL.WEIGHTS, which the explicit keys
    and SOURCE_DATASET describe: only the names it stores count then.
    """
    key = "SOURCE_CLASSES" if kind == "thing" else "SOURCE_STUFF_CLASSES"
    stored_names = (stored.get(f"{kind}_classes"),
                    f"the {kind} class list stored in the checkpoint")
    if resuming:
        return pick_source_classes([stored_names])
    return pick_source_classes([
        (explicit, f"MODEL.RECLASS.{key}"), stored_names,
        (dataset_classes(source_dataset, kind, what="MODEL.RECLASS.SOURCE_DATASET")
         if source_dataset else None, f"MODEL.RECLASS.SOURCE_DATASET ({source_dataset})")])


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
        names = dataset_classes(source_dataset, what="MODEL.RECLASS.SOURCE_DATASET")
        if names:
            return names
    raise ClassListError(
        f"MODEL.RECLASS.KEEP_SOURCE_CLASSES keeps the checkpoint's classes, but {weights_key} "
        f"{weights} stores no class names. Name them with MODEL.RECLASS.SOURCE_CLASSES "
        "'[\"a\", \"b\", ...]' (in the order of its class rows) or MODEL.RECLASS.SOURCE_DATASET "
        "(a registered dataset with its classes, e.g. coco_2017_train), or store them once with "
        f"`d2-reclass convert {weights} --out named.pth --classes A,B --source-classes A,B`.")


# ------------------------------------------------------------------------------ datasets
class MappedDatasetLoader:
    """Base of the DatasetCatalog entries that load a dataset with classes other than its own
    (:mod:`d2_reclass.data.mapping`): its own classes stay readable here.

    Attributes:
        own_metadata (dict): the dataset's metadata before mapping.
        loader (callable): the loader it was registered with.
    """

    own_metadata: Dict[str, Any]
    loader: Any

    def load_own(self) -> List[dict]:
        """The dicts its own loader returns: category ids index its own classes."""
        raise NotImplementedError


#: Datasets loaded once to read their classes, whose loader set none: never loaded again.
_LOADED_WITHOUT_CLASSES = set()


def _thing_or_stuff(kind: str) -> str:
    return "thing_classes" if kind == "thing" else "stuff_classes"


def _json_where(name: str, what: str, json_file: str) -> str:
    return f"{what or 'Dataset'} {name!r}: its json {json_file}"


def _own_metadata(name: str) -> Dict[str, Any]:
    """The metadata of dataset ``name`` as its own loader sets it (also once it was mapped)."""
    loader = DatasetCatalog[name] if name in DatasetCatalog else None
    if isinstance(loader, MappedDatasetLoader):
        return loader.own_metadata
    return MetadataCatalog.get(name).as_dict()


def _load_for_classes(name: str, what: str = "") -> None:
    """Load dataset ``name`` as detectron2's data loader would, for the metadata it sets.

    Stock ``register_coco_instances`` fills ``thing_classes`` only when the dataset is first
    loaded; the model must be built with the right class count before that.
    """
    meta = MetadataCatalog.get(name)
    if name in _LOADED_WITHOUT_CLASSES or name not in DatasetCatalog.list() \
            or meta.get("thing_classes", None) or meta.get("stuff_classes", None):
        return
    if meta.get("json_file", None) and PathManager.isfile(meta.json_file):
        # Stock load_coco_json takes a damaged category list as it is (a null name becomes a
        # class, two categories with one id become one) or fails with a bare KeyError: check
        # the file first, for one error naming its entry.
        read_coco_categories(meta.json_file, _json_where(name, what, meta.json_file))
    logger.info(f"Loading dataset {name!r} to read its class names (its metadata has none yet).")
    try:
        DatasetCatalog.get(name)
    except Exception as e:  # a registered loader may raise anything; name the dataset
        raise DatasetError(
            f"Dataset {name!r} could not be loaded to read its class names: "
            f"{type(e).__name__}: {e}. Check the files it was registered with (its classes "
            "are read by name to map its labels to the model's classes)."
        ) from e
    if not (meta.get("thing_classes", None) or meta.get("stuff_classes", None)):
        _LOADED_WITHOUT_CLASSES.add(name)


def dataset_classes(name: str, kind: str = "thing", *, what: str = "") -> Optional[List[str]]:
    """The ``thing_classes`` / ``stuff_classes`` the dataset ``name`` itself names (its own
    list, also once :func:`~d2_reclass.data.mapping.map_datasets_to_classes` has mapped it), or
    None if unset.

    A dataset whose metadata has no classes yet is loaded once, as detectron2's data loader
    would load it, since loading is what sets them for stock ``register_coco_instances``.

    Raises:
        ClassListError: ``name`` is not a registered dataset (with close-match suggestions).
        DatasetError: the dataset had to be loaded and its loader failed, or it names a class
            that is not a non-empty string, or (loaded from a COCO json) its json's category
            list is damaged: naming the dataset, the file and the entry.
    """
    if name not in DatasetCatalog.list() and name not in MetadataCatalog.list():
        raise ClassListError(
            f"{what or 'Dataset'} {name!r} is not a registered dataset."
            + did_you_mean(name, DatasetCatalog.list())
            + " Register it first (e.g. tools/train_net.py --coco-dataset NAME JSON IMAGES)."
        )
    loader = DatasetCatalog[name] if name in DatasetCatalog else None
    if not isinstance(loader, MappedDatasetLoader):
        _load_for_classes(name, what)
    classes = _own_metadata(name).get(_thing_or_stuff(kind))
    if classes:
        _check_names(name, list(classes), kind, what)
    return list(classes) if classes else None


def _check_names(name: str, classes: List[Any], kind: str, what: str) -> None:
    """Raise, naming the dataset, its file and the entry, when a class name is not a non-empty
    string (a COCO category whose name is null or a number becomes such a class)."""
    bad = next(((i, p) for i, p in enumerate(map(class_name_problem, classes)) if p), None)
    if bad is None:
        return
    json_file = _own_metadata(name).get("json_file")
    if json_file and kind == "thing":
        read_coco_categories(json_file, _json_where(name, what, json_file))  # names the entry
    i, problem = bad
    read_from = f" (its json: {json_file})" if json_file else ""
    raise DatasetError(
        f"{what or 'Dataset'} {name!r}{read_from}: its {kind}_classes[{i}] {problem}; class "
        f"names are non-empty strings. Fix the name where the dataset is registered.")


@dataclass(frozen=True)
class ClassUsage:
    """A dataset's own thing classes and how its annotations use them.

    Attributes:
        classes (tuple[str]): its own thing classes (the indices of its dicts' category ids).
        annotations (tuple[int]): for each class, how many annotations name it.
        roots (tuple[int]): the indices of its root categories (a COCO category that is
            another's supercategory and owns no annotation, see
            :attr:`~d2_reclass.data.datasets.CocoCategories.roots`); none without a COCO json.
    """

    classes: Tuple[str, ...]
    annotations: Tuple[int, ...]
    roots: Tuple[int, ...]


#: name -> (its own loader, annotations per class) counted from its dicts.
_COUNTED: Dict[str, Tuple[Any, Tuple[int, ...]]] = {}


def _count_from_dicts(name: str, num_classes: int, what: str) -> Tuple[int, ...]:
    """Annotations per own class of dataset ``name``, from the dicts its own loader returns
    (once per loader: a dataset without a COCO json)."""
    loader = DatasetCatalog[name]
    own = loader.loader if isinstance(loader, MappedDatasetLoader) else loader
    if name in _COUNTED and _COUNTED[name][0] is own:
        return _COUNTED[name][1]
    logger.info(f"Loading dataset {name!r} to count the annotations of each of its classes.")
    try:
        dicts = loader.load_own() if isinstance(loader, MappedDatasetLoader) else loader()
    except Exception as e:  # a registered loader may raise anything; name the dataset
        raise DatasetError(f"{what or 'Dataset'} {name!r} could not be loaded to count its "
                           f"labels per class: {type(e).__name__}: {e}.") from e
    counts = [0] * num_classes
    for d in dicts:
        for a in d.get("annotations", ()):
            c = a.get("category_id")
            if c is None:
                continue
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise DatasetError(
                    f"{what or 'Dataset'} {name!r}: an annotation of "
                    f"{d.get('file_name', 'an image')} has category_id {c!r}, but the dataset "
                    f"names {num_classes} classes; fix the annotation file.")
            counts[c] += 1
    _COUNTED[name] = (own, tuple(counts))
    return tuple(counts)


def class_usage(name: str, *, what: str = "") -> Optional[ClassUsage]:
    """How the annotations of dataset ``name`` use its own thing classes (None: it names none).

    A dataset registered with a COCO json (its metadata's ``json_file``, e.g. by stock
    ``register_coco_instances``) is counted from the file, read once per file (checked as
    :func:`~d2_reclass.data.datasets.read_coco_categories` checks it); any other from the dicts
    its loader returns, loaded once.

    Raises:
        ClassListError: ``name`` is not registered.
        DatasetError: its file or its loader fails, or its class list is damaged.
    """
    classes = dataset_classes(name, what=what)
    if not classes:
        return None
    categories = _coco_categories(name, classes, what)
    if categories is not None:
        return ClassUsage(tuple(classes), categories.annotations, categories.roots)
    return ClassUsage(tuple(classes), _count_from_dicts(name, len(classes), what), ())


def _coco_categories(name: str, classes: List[str], what: str) -> Optional[CocoCategories]:
    """The categories of the COCO json dataset ``name`` was registered with, when it has one
    whose categories are its ``classes`` (else its classes come from elsewhere)."""
    json_file = _own_metadata(name).get("json_file")
    if not (json_file and PathManager.isfile(json_file)):
        return None
    categories = read_coco_categories(json_file, _json_where(name, what, json_file))
    return categories if list(categories.names) == classes else None


def trained_classes(name: str, *, what: str = "") -> Optional[List[str]]:
    """The thing classes a model trained on dataset ``name`` takes from it (when no
    TARGET_CLASSES names them): its own classes as stock detectron2 counts them, a class that
    no annotation uses too, except a root category of its COCO json (another category's
    supercategory that owns no annotation: the grouping Roboflow exports write above every
    class). None: it names no thing classes."""
    classes = dataset_classes(name, what=what)
    if not classes:
        return None
    categories = _coco_categories(name, classes, what)
    roots = categories.roots if categories is not None else ()
    return [c for i, c in enumerate(classes) if i not in roots]


def labelled_classes(name: str, *, what: str = "") -> List[str]:
    """The thing classes of dataset ``name`` that at least one annotation uses, in its order
    (what KEEP_SOURCE_CLASSES may add to the checkpoint's classes)."""
    usage = class_usage(name, what=what)
    return [] if usage is None else [c for c, n in zip(usage.classes, usage.annotations) if n]


def check_source_dataset(source_dataset: str) -> None:
    """Raise now when SOURCE_DATASET names no registered dataset: names a checkpoint stores
    would otherwise hide the typo until a checkpoint without them is loaded.

    Raises:
        ClassListError: naming the key, with close matches.
    """
    if source_dataset:
        dataset_classes(source_dataset, what=config_key("source_dataset"))


def train_classes(datasets: Sequence[str], kind: str = "thing") -> Optional[List[str]]:
    """The classes of the datasets ``datasets`` (DATASETS.TRAIN) together, None if unknown:
    the first dataset's classes, then each later dataset's classes not named before (old data
    and new data train one model over all their classes, each mapped by name; see
    :func:`~d2_reclass.data.mapping.map_datasets_to_classes`). Thing classes are each
    dataset's :func:`trained_classes`: a COCO file's root category is not a class."""
    if kind == "thing":
        return union_classes([trained_classes(name, what="DATASETS.TRAIN") or []
                              for name in datasets]) or None
    return union_classes([dataset_classes(name, kind, what="DATASETS.TRAIN") or []
                          for name in datasets]) or None


# ------------------------------------------------------------------------------ the model's
def kept_target_classes(source: Sequence[str],
                        dataset_lists: Sequence[Sequence[str]]) -> List[str]:
    """``source`` in its order, then every class of ``dataset_lists`` it lacks (by normalised
    name), in the order they first appear. Pure; the result never repeats a name."""
    return union_classes([source, *dataset_lists])


def keep_source_target(cfg, dataset_lists: Sequence[Sequence[str]]) -> Optional[List[str]]:
    """The target thing classes of a yacs config with KEEP_SOURCE_CLASSES on, else None.

    Args:
        dataset_lists: the labelled thing classes of each training dataset
            (:func:`labelled_classes`; None entries skipped): a class that no annotation uses
            is never added.
    """
    r = cfg.MODEL.get("RECLASS", None) or {}
    if not r.get("KEEP_SOURCE_CLASSES", False):
        return None
    check_keep_source_classes(True, r.get("MODE", "auto"), r.get("TARGET_CLASSES", ()))
    source = checkpoint_thing_classes(
        cfg.MODEL.WEIGHTS, r.get("SOURCE_CLASSES", ()), r.get("SOURCE_DATASET", ""),
        trust_pickle=bool(r.get("TRUST_PICKLE", False)))
    return kept_target_classes(source, [c for c in dataset_lists if c])


def explicit_target(cfg, kind: str) -> List[str]:
    """TARGET_(STUFF_)CLASSES of a yacs config, empty when unset."""
    key = "TARGET_CLASSES" if kind == "thing" else "TARGET_STUFF_CLASSES"
    return list(cfg.MODEL.get("RECLASS", {}).get(key, None) or [])


def target_classes(cfg, kind: str = "thing") -> Optional[List[str]]:
    """The model's classes: TARGET_(STUFF_)CLASSES, else (thing classes with
    KEEP_SOURCE_CLASSES) the checkpoint's classes then the new ones of DATASETS.TRAIN, else the
    classes of DATASETS.TRAIN (all its datasets' classes, see :func:`train_classes`), else None.

    The one place the model's class list is decided; :func:`target_classes_what` names it.
    """
    if kind == "thing" and cfg.MODEL.get("RECLASS", {}).get("KEEP_SOURCE_CLASSES", False):
        return keep_source_target(cfg, [labelled_classes(name, what="DATASETS.TRAIN")
                                        for name in cfg.DATASETS.TRAIN])
    return explicit_target(cfg, kind) or train_classes(cfg.DATASETS.TRAIN, kind)


def target_classes_what(cfg, kind: str = "thing") -> str:
    """How messages name where :func:`target_classes` took the model's classes from."""
    if kind == "thing" and cfg.MODEL.get("RECLASS", {}).get("KEEP_SOURCE_CLASSES", False):
        return ("MODEL.RECLASS.KEEP_SOURCE_CLASSES: the checkpoint's classes, then the new ones "
                f"of DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}")
    if explicit_target(cfg, kind):
        return f"MODEL.RECLASS.TARGET_{'' if kind == 'thing' else 'STUFF_'}CLASSES"
    return f"the classes of DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}"


# ------------------------------------------------------------------------------ evaluation
def stored_eval_classes(cfg) -> Dict[str, List[str]]:
    """The classes to evaluate MODEL.WEIGHTS with: ``thing_classes`` / ``stuff_classes`` as it
    stores them (with MODEL.RECLASS.COMBINE, every class of all those files); empty lists for
    what none stores.

    Raises:
        CheckpointError: a file is missing or cannot be read.
    """
    r = cfg.MODEL.RECLASS
    stored = [read_stored_classes(path, trust_pickle=r.TRUST_PICKLE)
              for path in [cfg.MODEL.WEIGHTS, *r.COMBINE]]
    return {key: union_classes([s.get(key, []) for s in stored])
            for key in ("thing_classes", "stuff_classes")}


def use_checkpoint_classes(cfg) -> None:
    """Set MODEL.RECLASS.TARGET_(STUFF_)CLASSES, when TARGET_CLASSES is empty, to the classes
    MODEL.WEIGHTS (and MODEL.RECLASS.COMBINE) store (:func:`stored_eval_classes`): a checkpoint
    that names its classes is evaluated with them, whatever NUM_CLASSES the base config has.
    ``cfg`` must not be frozen and must have MODEL.RECLASS (``add_reclass_config``).

    Raises:
        CheckpointError: a checkpoint is missing or unreadable.
    """
    r = cfg.MODEL.RECLASS
    if r.TARGET_CLASSES or not cfg.MODEL.WEIGHTS:
        return
    stored = stored_eval_classes(cfg)
    r.TARGET_CLASSES = stored["thing_classes"]
    r.TARGET_STUFF_CLASSES = stored["stuff_classes"]
    if r.TARGET_CLASSES and "KEEP_SOURCE_CLASSES" in r:
        # The checkpoint's own classes are the model's: KEEP_SOURCE_CLASSES (which adds a
        # training run's new classes to its source's) has nothing left to decide.
        r.KEEP_SOURCE_CLASSES = False
