"""The labelled examples of new classes: where they come from (:class:`NewClassExamples`),
which images each class reads (chosen by seed and class name), and one pass of the model over
them.
"""
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation, read_image
from detectron2.structures import BoxMode
from PIL import Image
from torch import nn

from ..classes import ClassMapping, normalize_class_name, union_classes
from ..data.mapping import remap_category_ids
from ..errors import ConfigError, DatasetError
from .scoring import Box, Example, box_paths, detected_boxes, run_image

__all__ = ["Collected", "NewClassExamples", "Plan", "choose_images", "class_index", "collect",
           "image_boxes", "plan_images", "portable_names"]

logger = logging.getLogger(__name__)


#: What reading an image may raise when the file is missing, truncated or not an image.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class NewClassExamples:
    """Where the labelled examples of new classes come from, and how images are read.

    Give registered ``datasets`` (loaded only when a new class needs examples) or the
    ``dataset_dicts`` themselves.

    Which images serve as examples is decided by their names relative to their image roots
    (see :func:`portable_names`), so that it does not change when the data moves: a
    registered dataset's root is its metadata's ``image_root`` (``register_coco_instances``
    sets it); give ``image_roots`` for ``dataset_dicts`` (without, the directory common to
    all their images is the root).

    Attributes:
        datasets (tuple[str]): registered datasets, e.g. DATASETS.TRAIN.
        dataset_dicts (list[dict] or None): detectron2 dataset dicts instead of ``datasets``.
        class_names (tuple[str] or None): the names of the dicts' ``category_id`` values (for
            ``datasets``: their ``thing_classes``); None: category ids are target indices.
        augmentations (tuple[Augmentation]): the test-time transform.
        image_format (str): as INPUT.FORMAT.
        image_roots (tuple[str]): the directories the ``dataset_dicts``' file names are
            under (added to the registered datasets' own).
    """

    datasets: Tuple[str, ...] = ()
    dataset_dicts: Optional[Sequence[dict]] = None
    class_names: Optional[Tuple[str, ...]] = None
    augmentations: Tuple[Any, ...] = ()
    image_format: str = "BGR"
    image_roots: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "augmentations", tuple(self.augmentations))
        object.__setattr__(self, "image_roots", tuple(self.image_roots))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if bool(self.datasets) == (self.dataset_dicts is not None):
            raise ConfigError("NewClassExamples takes registered datasets or dataset_dicts "
                              "(one of the two), e.g. NewClassExamples(datasets=('my_train',)).")

    @classmethod
    def from_config(cls, cfg) -> "NewClassExamples":
        """The examples of DATASETS.TRAIN, read with the test-time resize and INPUT.FORMAT."""
        return cls(datasets=tuple(cfg.DATASETS.TRAIN),
                   augmentations=tuple(build_augmentation(cfg, is_train=False)),
                   image_format=cfg.INPUT.FORMAT)

    def roots(self) -> Tuple[str, ...]:
        """The image roots: ``image_roots`` and each registered dataset's ``image_root``."""
        registered = (MetadataCatalog.get(name).get("image_root") for name in self.datasets)
        return self.image_roots + tuple(r for r in registered if r)

    def load(self) -> Tuple[List[dict], Optional[List[str]]]:
        """The dataset dicts and the names of their category ids.

        Raises:
            DatasetError: a dataset fails to load, or the datasets name different classes.
        """
        if self.dataset_dicts is not None:
            return list(self.dataset_dicts), _optional_list(self.class_names)
        loaded: List[Tuple[List[dict], Optional[List[str]]]] = []
        for name in self.datasets:
            try:
                dicts = DatasetCatalog.get(name)
            except Exception as e:  # a registered loader may raise anything; name the dataset
                raise DatasetError(
                    f"Dataset {name!r} (DATASETS.TRAIN) could not be loaded for the examples of "
                    f"MODEL.RECLASS.NEW_CLASS_INIT: {type(e).__name__}: {e}. Fix its files, or "
                    "set MODEL.RECLASS.NEW_CLASS_INIT head.") from e
            # Named by the classes it loads with: its own, or the model's once mapped to them.
            loaded.append((dicts, _optional_list(MetadataCatalog.get(name).get("thing_classes"))))
        if self.class_names is not None:
            return [d for dicts, _ in loaded for d in dicts], list(self.class_names)
        return _on_one_class_list(loaded)


def _on_one_class_list(loaded: Sequence[Tuple[List[dict], Optional[List[str]]]]
                       ) -> Tuple[List[dict], Optional[List[str]]]:
    """The dicts of several datasets with their category ids on one class list (their union,
    by name), and that list; None when a dataset names no classes (ids are the model's)."""
    if any(names is None for _, names in loaded):
        return [d for dicts, _ in loaded for d in dicts], None
    union = union_classes([names for _, names in loaded])
    by_name = {normalize_class_name(c): j for j, c in enumerate(union)}
    out: List[dict] = []
    for dicts, names in loaded:
        out += remap_category_ids(dicts, [by_name[normalize_class_name(c)] for c in names])
    return out, union


def _optional_list(names: Optional[Sequence[str]]) -> Optional[List[str]]:
    return list(names) if names is not None else None


def image_boxes(dataset_dicts: Sequence[dict], class_index: Callable[[int], Optional[int]],
                 classes: Sequence[int]) -> Tuple[List[List[Box]], Dict[int, Dict[str, int]]]:
    """Per dict, its usable boxes of ``classes``; per class, counts of all / crowd / empty.

    Usable: not crowd, positive width and height.
    """
    wanted = set(classes)
    counts = {c: {"all": 0, "crowd": 0, "empty": 0} for c in classes}
    per_image: List[List[Box]] = []
    for d in dataset_dicts:
        boxes = []
        for ann in d.get("annotations", ()):
            target = class_index(ann["category_id"])
            if target not in wanted:
                continue
            counts[target]["all"] += 1
            if ann.get("iscrowd", 0):
                counts[target]["crowd"] += 1
                continue
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"],
                                             BoxMode.XYXY_ABS)
            if not (x1 > x0 and y1 > y0):
                counts[target]["empty"] += 1
                continue
            boxes.append(Box(target, (float(x0), float(y0), float(x1), float(y1))))
        per_image.append(boxes)
    return per_image, counts


def choose_images(names: Sequence[str], key: str, seed: int, max_images: int) -> List[int]:
    """Indices of up to ``max_images`` of ``names``, the lowest ranks by
    ``sha256(seed, key, name)``: fixed by the seed, the key and the names alone, whatever the
    order of the list and whatever the global RNG, unchanged for the images already chosen
    when the list grows, and the same in every process (no broadcast needed).

    ``names`` should travel with the data, as :func:`portable_names` gives them: ranked by
    absolute paths, the choice would change when the dataset moves.
    """
    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{int(seed)}:{key}:{names[i]}".encode()).digest()

    return sorted(range(len(names)), key=rank)[:max_images]


def portable_names(dataset_dicts: Sequence[dict], image_roots: Sequence[str] = ()) -> List[str]:
    """Per dict, its ``file_name`` relative to its image root, with ``/`` separators: a name
    that travels with the data.

    The root of a file is the deepest of ``image_roots`` that holds it; files under none of
    them take the deepest directory common to all such files of ``dataset_dicts``. Moving
    the whole dataset (or each image root) elsewhere keeps every name; a file under a given
    root keeps its name when the dataset grows (without roots, only while the images added
    lie under the same common directory).

    Why the relative path: detectron2's loaders join the image root into ``file_name``, so
    the absolute path names the machine's directory, not the image. The basename alone would
    collide where datasets reuse names in subdirectories (``seq1/000001.jpg``,
    ``seq2/000001.jpg``), and a content hash would read every candidate image of a class
    (all of COCO's persons) where only ``max_images`` are needed.
    """
    files = [os.path.abspath(str(d["file_name"])) if "file_name" in d else None
             for d in dataset_dicts]
    roots = sorted({os.path.abspath(r) for r in image_roots}, key=len, reverse=True)

    def root_of(f: str) -> Optional[str]:
        return next((r for r in roots if os.path.commonpath([r, f]) == r), None)

    own = [root_of(f) if f is not None else None for f in files]
    loose = [os.path.dirname(f) for f, r in zip(files, own) if f is not None and r is None]
    common = os.path.commonpath(loose) if loose else ""
    return [f"#{i}" if f is None else os.path.relpath(f, r or common).replace(os.sep, "/")
            for i, (f, r) in enumerate(zip(files, own))]


def class_index(mapping: ClassMapping,
                 dataset_classes: Optional[Sequence[str]]) -> Callable[[int], Optional[int]]:
    """category_id of the dicts -> target class index (by normalised name when named)."""
    k = len(mapping.target)
    if dataset_classes is None:
        return lambda c: c if 0 <= c < k else None
    by_name = {normalize_class_name(t): i for i, t in enumerate(mapping.target)}
    table = [by_name.get(normalize_class_name(n)) for n in dataset_classes]
    return lambda c: table[c] if 0 <= c < len(table) else None


def _read_image(d: dict, boxes: List[Box], augmentations, image_format: str):
    """(CHW tensor, boxes in its coordinates) after the test-time transform."""
    image = read_image(d["file_name"], format=image_format)
    aug = T.AugInput(image)
    transforms = T.AugmentationList(list(augmentations))(aug)
    xyxy = transforms.apply_box(np.array([b.xyxy for b in boxes], dtype=np.float64))
    moved = [Box(b.target, tuple(float(v) for v in row)) for b, row in zip(boxes, xyxy)]
    tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
    return tensor, moved


@dataclass
class Plan:
    """Which images serve which classes."""

    chosen: Dict[int, List[int]]  # new class -> dataset indices
    reference: List[int]  # dataset indices read for kept-class reference boxes
    notes: Dict[int, str]  # new class -> why it has no images


def plan_images(dataset_dicts: Sequence[dict], per_image: List[List[Box]], counts, mapping,
          new: List[int], kept: List[int], imprint: bool, seed: int, max_images: int,
          dataset_classes: Optional[Sequence[str]], image_roots: Sequence[str] = ()) -> Plan:
    """The images each new class reads (at most ``max_images``, by :func:`choose_images` on
    their :func:`portable_names` under ``image_roots``), and for imprint, when those hold no
    kept-class box, up to ``max_images`` images that do."""
    files = portable_names(dataset_dicts, image_roots)
    chosen: Dict[int, List[int]] = {}
    notes: Dict[int, str] = {}
    holding_of: Dict[int, List[int]] = {t: [] for t in new}  # one pass, not one per class
    for i, boxes in enumerate(per_image):
        for t in dict.fromkeys(b.target for b in boxes):
            if t in holding_of:
                holding_of[t].append(i)
    for t in new:
        name = mapping.target[t]
        holding = holding_of[t]
        if not holding:
            notes[t] = _no_examples_reason(name, counts[t], dataset_classes)
            continue
        picks = choose_images([files[i] for i in holding], normalize_class_name(name), seed,
                              max_images)
        chosen[t] = sorted(holding[j] for j in picks)
    reference: List[int] = []
    if imprint and kept:
        read = sorted({i for picks in chosen.values() for i in picks})
        if not any(b.target in kept for i in read for b in per_image[i]):
            holding = [i for i, boxes in enumerate(per_image)
                       if any(b.target in kept for b in boxes)]
            picks = choose_images([files[i] for i in holding], "kept classes", seed, max_images)
            reference = sorted(holding[j] for j in picks)
    return Plan(chosen, reference, notes)


def _no_examples_reason(name: str, count: Dict[str, int],
                        dataset_classes: Optional[Sequence[str]]) -> str:
    if count["all"] == 0:
        where = "" if dataset_classes is None or normalize_class_name(name) in {
            normalize_class_name(c) for c in dataset_classes} else " (not one of its classes)"
        return f"no labelled instance of {name!r} in the training data{where}; head init"
    return (f"all {count['all']} labelled instances of {name!r} are crowd ({count['crowd']}) or "
            f"empty ({count['empty']}) boxes; head init")


class Collected(NamedTuple):
    by_class: Dict[int, List[Example]]  # new class -> its examples
    reference: List[Example]  # kept-class examples, for calibration
    negatives: List[Example]  # kept-class objects the model detects, unlabelled (imprint only)
    unreadable: Dict[int, str]  # dataset index -> what failed
    read: List[int]  # dataset indices read
    seconds: float  # reading, transforming and running them


def collect(model: nn.Module, dataset_dicts: Sequence[dict], per_image: List[List[Box]],
             plan: Plan, kept: List[int], want_reference: bool,
             source_state: Mapping[str, torch.Tensor], num_source: int, augmentations,
             image_format: str) -> Collected:
    """Read each planned image once and run the model on its boxes of interest; with
    ``want_reference`` (imprint), also on the kept-class objects it detects there that no box
    labels (:func:`~d2_reclass.new_classes.scoring.detected_boxes`): the objects an imprinted
    row must not fire on, in new-only data the only kept-class boxes there are."""
    serves: Dict[int, set] = {}
    for t, picks in plan.chosen.items():
        for i in picks:
            serves.setdefault(i, set()).add(t)
    for i in plan.reference:
        serves.setdefault(i, set())
    paths = box_paths(model)
    out = Collected({}, [], [], {}, [], 0.0)
    modes = {m: m.training for m in model.modules()}
    t0 = time.perf_counter()
    model.eval()
    try:
        with torch.no_grad():
            for i in sorted(serves):
                try:
                    image, labelled = _read_image(dataset_dicts[i], per_image[i],
                                                  augmentations, image_format)
                except _UNREADABLE as e:
                    out.unreadable[i] = f"{dataset_dicts[i].get('file_name')}: " \
                                        f"{type(e).__name__}: {e}"
                    logger.warning(f"[NEW_CLASS_INIT] skipped an unreadable image: "
                                   f"{out.unreadable[i]}")
                    continue
                out.read.append(i)
                boxes = [b for b in labelled if b.target in serves[i]
                         or (want_reference and b.target in kept)]
                if want_reference and kept:
                    # Every labelled box is known, whichever class it serves.
                    found = detected_boxes(model, image, labelled, kept)
                    out.negatives.extend(run_image(model, image, found, paths, source_state,
                                                   num_source) if found else [])
                for e in run_image(model, image, boxes, paths, source_state, num_source):
                    if e.target in serves[i]:
                        out.by_class.setdefault(e.target, []).append(e)
                    elif e.target in kept:
                        out.reference.append(e)
    finally:
        for m, training in modes.items():
            m.training = training
    return out._replace(seconds=time.perf_counter() - t0)
