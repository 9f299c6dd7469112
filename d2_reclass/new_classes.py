"""New classes that detect from the first iteration: initialise them from labelled examples.

After mapping, a target class that no source class maps to holds the head's own init (tiny
random rows, zero bias): it is never predicted until training teaches it. With
``MODEL.RECLASS.NEW_CLASS_INIT`` it starts from what the source model already knows about it,
measured on a few of the user's own labelled images:

* ``head``: the head's own init (nothing here runs).
* ``auto`` (the default): ``imprint`` where labelled examples are given, else ``head``:
  imprint measured best in ``benchmarks/new_class_init.py`` (see the README).
* ``relative``: the source model's classifiers score the new class's ground-truth boxes; the
  source class with the highest mean probability is its *relative*, and every class entry of
  every thing head (box classifier and regressor of every cascade stage, mask predictor,
  RetinaNet/FCOS anchors, PointRend) is copied from the relative ("van" starts as "car"). The
  relative may be a class the target dropped: its entries come from the checkpoint.
* ``imprint``: for each box classifier that reads a feature vector (every
  ``FastRCNNOutputLayers``; each cascade stage through its own box head), the new class's
  ``cls_score`` row is ``scale * mean / |mean|``, the normalised mean box-head feature of its
  ground-truth boxes (pooled by the model's own box pooler), and its bias is calibrated
  (below). Every other entry comes from the relative: a box regressor row maps features to
  box *deltas*, which the mean feature says nothing about; mask rows, RetinaNet/FCOS
  channels and PointRend rows read per-pixel or per-location features, not the box feature
  whose mean is imprinted.

Calibration of an imprinted row, per classifier (no constant is chosen by hand):

* ``scale`` is the mean L2 norm of the kept classes' rows (of the source's class rows when no
  class is kept): the new row is as long as the rows it competes with.
* The bias makes the new class's examples score like the kept classes score on theirs: with
  the log-odds of class k on a box x, ``z_k(x) - logsumexp_{j != k} z_j(x)`` over the kept
  classes and background (``z_k(x)`` for sigmoid classifiers), the bias is chosen so that the
  median log-odds of the new class on its examples equals the median log-odds of the kept
  classes on theirs. Medians, so that one occluded or mislabelled box does not move the row.
  The kept-class boxes are those in the images already read; when there are none, up to
  ``max_images`` images with kept classes are read for them, and when no class is kept the
  reference is the source classifier's confidence in its top class on the new examples.

Examples are the non-crowd, non-empty boxes of ``DATASETS.TRAIN`` (dataset dicts), at most
``max_images`` images per new class, chosen by ranking the images holding that class by
``sha256(seed, class name, file name)``: the choice depends neither on the order of the
dataset dicts nor on the global RNG, and an image keeps its rank when the dataset grows. The
images are read with the test-time transform and the model runs in eval mode without
gradients; nothing else of the dataset is read. Every step is deterministic, so every rank of
a distributed run computes the same entries (the trainer also broadcasts them from rank 0, in
case GPUs of different kinds round differently).

A class falls back to ``head``, with the reason in the report, when the data has no labelled
instance of it, when all its boxes are crowd or empty, when none of its chosen images can be
read, or when the model has no classifier that can score boxes. Entries are computed in full
before any is returned: an error leaves the model as it was.

Only thing classes are initialised; a new *stuff* class of a semantic head keeps the head's
init (its labels are per-pixel masks, which this module does not read).

Shape shorthand: K = target classes, S = source classes, D = box-head feature width,
R = boxes, A = anchors per location.
"""
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation, read_image
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils import comm
from PIL import Image
from tabulate import tabulate
from torch import distributed as dist
from torch import nn

from .classes import ClassMapping, normalize_class_name, union_classes
from .dataset_classes import remap_category_ids
from .entries import CLASS
from .errors import ConfigError, DatasetError
from .layouts import THING, ClassLayout, SourceAxis, find_layouts
from .options import NEW_CLASS_INITS, check_option_values

__all__ = [
    "NEW_CLASS_INITS",
    "NewClassExamples",
    "NewClassInit",
    "NewClassReport",
    "apply_new_class_entries",
    "broadcast_thing_heads",
    "choose_images",
    "init_new_classes",
]

logger = logging.getLogger(__name__)

#: What reading an image may raise when the file is missing, truncated or not an image.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class NewClassExamples:
    """Where the labelled examples of new classes come from, and how images are read.

    Give registered ``datasets`` (loaded only when a new class needs examples) or the
    ``dataset_dicts`` themselves.

    Attributes:
        datasets (tuple[str]): registered datasets, e.g. DATASETS.TRAIN.
        dataset_dicts (list[dict] or None): detectron2 dataset dicts instead of ``datasets``.
        class_names (tuple[str] or None): the names of the dicts' ``category_id`` values (for
            ``datasets``: their ``thing_classes``); None: category ids are target indices.
        augmentations (tuple[Augmentation]): the test-time transform.
        image_format (str): as INPUT.FORMAT.
    """

    datasets: Tuple[str, ...] = ()
    dataset_dicts: Optional[Sequence[dict]] = None
    class_names: Optional[Tuple[str, ...]] = None
    augmentations: Tuple[Any, ...] = ()
    image_format: str = "BGR"

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "augmentations", tuple(self.augmentations))
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


# ------------------------------------------------------------------------------ report
@dataclass
class NewClassInit:
    """How one new class was initialised.

    Attributes:
        name (str), index (int): the target class and its index.
        method (str): what it got: ``imprint``, ``relative`` or ``head`` (a fallback).
        relative (str or None), relative_index (int or None): the source class its entries
            (all of them for ``relative``, those not imprinted for ``imprint``) come from.
        score (float or None): the relative's mean probability on the class's examples.
        images (int): images read for it; instances (int): its boxes used.
        unreadable (list[str]): chosen images that could not be read (skipped).
        reason (str): why it fell back, or how it was calibrated.
        imprint (dict): per classifier (state-dict prefix): scale, bias, reference log-odds.
    """

    name: str
    index: int
    method: str
    relative: Optional[str] = None
    relative_index: Optional[int] = None
    score: Optional[float] = None
    images: int = 0
    instances: int = 0
    unreadable: List[str] = field(default_factory=list)
    reason: str = ""
    imprint: Dict[str, Dict[str, float]] = field(default_factory=dict)


@dataclass
class NewClassReport:
    """What NEW_CLASS_INIT did: per new class, the changed tensors, and what it cost.

    Attributes:
        method (str): the requested method.
        max_images (int), seed (int): the options it ran with.
        classes (list[NewClassInit]): one per new class.
        changed (list[str]): state-dict keys whose new-class entries changed.
        images_read (int): distinct images read (each once, whatever the classes it serves).
        seconds (float): total time, dataset loading included.
        seconds_dataset (float): of which loading the dataset dicts.
        seconds_per_image (float): reading, transforming and running one image, on average.
    """

    method: str
    max_images: int
    seed: int
    classes: List[NewClassInit] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    images_read: int = 0
    seconds: float = 0.0
    seconds_dataset: float = 0.0
    seconds_per_image: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [(c.name, c.method, "" if c.relative is None else c.relative,
                 "" if c.score is None else f"{c.score:.3f}", c.images, c.instances, c.reason)
                for c in self.classes]
        return tabulate(rows, headers=["new class", "init", "relative", "score", "images",
                                       "boxes", "note"], tablefmt="pipe")

    def __str__(self) -> str:
        return (f"NEW_CLASS_INIT {self.method}: {len(self.classes)} new classes, "
                f"{self.images_read} images read in {self.seconds:.2f} s "
                f"({self.seconds_per_image:.3f} s per image, {self.seconds_dataset:.2f} s "
                f"loading the dataset dicts)\n{self.table()}")


# ------------------------------------------------------------------------------ examples
class _Box(NamedTuple):
    target: int  # target class index
    xyxy: Tuple[float, float, float, float]  # absolute, in the image's own coordinates


def _image_boxes(dataset_dicts: Sequence[dict], class_index: Callable[[int], Optional[int]],
                 classes: Sequence[int]) -> Tuple[List[List[_Box]], Dict[int, Dict[str, int]]]:
    """Per dict, its usable boxes of ``classes``; per class, counts of all / crowd / empty.

    Usable: not crowd, positive width and height.
    """
    wanted = set(classes)
    counts = {c: {"all": 0, "crowd": 0, "empty": 0} for c in classes}
    per_image: List[List[_Box]] = []
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
            boxes.append(_Box(target, (float(x0), float(y0), float(x1), float(y1))))
        per_image.append(boxes)
    return per_image, counts


def choose_images(file_names: Sequence[str], key: str, seed: int, max_images: int) -> List[int]:
    """Indices of up to ``max_images`` of ``file_names``, the lowest ranks by
    ``sha256(seed, key, file name)``: fixed by the seed and the key alone, whatever the order
    of the list, and unchanged for the images already chosen when the list grows."""
    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{int(seed)}:{key}:{file_names[i]}".encode()).digest()

    return sorted(range(len(file_names)), key=rank)[:max_images]


def _class_index(mapping: ClassMapping,
                 dataset_classes: Optional[Sequence[str]]) -> Callable[[int], Optional[int]]:
    """category_id of the dicts -> target class index (by normalised name when named)."""
    k = len(mapping.target)
    if dataset_classes is None:
        return lambda c: c if 0 <= c < k else None
    by_name = {normalize_class_name(t): i for i, t in enumerate(mapping.target)}
    table = [by_name.get(normalize_class_name(n)) for n in dataset_classes]
    return lambda c: table[c] if 0 <= c < len(table) else None


# ------------------------------------------------------------------------------ the model
class _BoxPath(NamedTuple):
    """One box classifier and the way to its input feature (a cascade stage each)."""

    prefix: str  # state-dict prefix of the predictor, e.g. "roi_heads.box_predictor.1."
    predictor: nn.Module  # a FastRCNNOutputLayers
    box_features: Callable[[Dict[str, torch.Tensor], List[Boxes]], torch.Tensor]  # (R, D)


def _box_paths(model: nn.Module) -> List[_BoxPath]:
    """Every box classifier of ``model`` with the pooler and box head that feed it."""
    names = {id(m): n for n, m in model.named_modules()}
    paths: List[_BoxPath] = []
    for m in model.modules():
        if isinstance(m, CascadeROIHeads):
            stages = list(zip(m.box_head, m.box_predictor))
        elif isinstance(m, StandardROIHeads):
            stages = [(m.box_head, m.box_predictor)]
        elif isinstance(m, Res5ROIHeads):
            paths.append(_BoxPath(names[id(m.box_predictor)] + ".", m.box_predictor,
                                  _res5_features(m)))
            continue
        else:
            continue
        for head, predictor in stages:
            paths.append(_BoxPath(names[id(predictor)] + ".", predictor,
                                  _pooled_features(m, head)))
    return paths


def _pooled_features(roi_heads: nn.Module, head: nn.Module):
    # As StandardROIHeads._forward_box / CascadeROIHeads._run_stage feed their predictors.
    def run(features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        x = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
        return torch.flatten(head(x), start_dim=1)

    return run


def _res5_features(roi_heads: nn.Module):
    # As Res5ROIHeads.forward feeds its predictor: res5 on the pooled box, then a mean.
    def run(features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        x = roi_heads._shared_roi_transform([features[f] for f in roi_heads.in_features], boxes)
        return x.mean(dim=[2, 3])

    return run


def _dense_head(model: nn.Module) -> Optional[Tuple[str, RetinaNetHead]]:
    """(state-dict prefix, head) of a RetinaNet / FCOS model, else None."""
    if isinstance(model, DenseDetector) and isinstance(model.head, RetinaNetHead):
        return "head.", model.head
    return None


def _source_rows(source_state: Mapping[str, torch.Tensor], prefix: str, rows: int,
                 width: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The checkpoint's (weight, bias) of ``prefix + "cls_score"`` if its shape fits."""
    w = source_state.get(prefix + "cls_score.weight")
    b = source_state.get(prefix + "cls_score.bias")
    if w is None or b is None or w.shape[0] != rows or w.shape[1:2] != (width,):
        return None
    return w, b


def _probs(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    return logits.sigmoid() if sigmoid else F.softmax(logits, dim=-1)


class _Example(NamedTuple):
    target: int
    features: Dict[str, torch.Tensor]  # per box path prefix: (D,)
    source_probs: Optional[torch.Tensor]  # (S,), the source classes' probabilities


def _run_image(model: nn.Module, image: torch.Tensor, boxes: List[_Box], paths: List[_BoxPath],
               source_state: Mapping[str, torch.Tensor], num_source: int) -> List[_Example]:
    """Box features and source-class probabilities of ``boxes`` (transformed) in one image."""
    device = next(model.parameters()).device
    images = model.preprocess_image([{"image": image}])
    features = model.backbone(images.tensor)
    gt = torch.tensor([b.xyxy for b in boxes], dtype=torch.float32, device=device)
    per_path: Dict[str, torch.Tensor] = {}
    probs: List[torch.Tensor] = []
    for path in paths:
        x = path.box_features(features, [Boxes(gt)])
        per_path[path.prefix] = x
        rows = _source_rows(source_state, path.prefix, num_source + 1, x.shape[1])
        if rows is not None:
            logits = F.linear(x, rows[0].to(x), rows[1].to(x))
            sigmoid = bool(getattr(path.predictor, "use_sigmoid_ce", False))
            probs.append(_probs(logits, sigmoid)[:, :num_source])
    dense = _dense_head(model)
    if dense is not None:
        dense_probs = _dense_source_probs(model, dense, features, gt, images.image_sizes[0],
                                          source_state, num_source)
        if dense_probs is not None:
            probs.append(dense_probs)
    # Cascade inference averages its stages' probabilities; so does the relative's score.
    mean = torch.stack(probs).mean(dim=0) if probs else None
    return [_Example(b.target, {p: x[i] for p, x in per_path.items()},
                     None if mean is None or not bool(torch.isfinite(mean[i]).all()) else mean[i])
            for i, b in enumerate(boxes)]


def _dense_source_probs(model, dense, features, gt: torch.Tensor, image_size,
                        source_state, num_source: int) -> Optional[torch.Tensor]:
    """(R, S): per box, the mean source-class probability over the anchors the model's own
    matcher assigns to it (label_anchors, as in training); NaN rows for boxes no anchor takes."""
    prefix, head = dense
    weight = source_state.get(prefix + "cls_score.weight")
    bias = source_state.get(prefix + "cls_score.bias")
    conv = head.cls_score
    anchors_per_location = head.bbox_pred.out_channels // 4  # as the layout reads A
    if weight is None or bias is None or weight.shape[1:] != conv.weight.shape[1:] \
            or weight.shape[0] != anchors_per_location * num_source:
        return None
    feats = [features[f] for f in model.head_in_features]
    logits = [F.conv2d(head.cls_subnet(f), weight.to(f), bias.to(f), conv.stride, conv.padding,
                       conv.dilation) for f in feats]
    probs = torch.cat([permute_to_N_HWA_K(x, num_source) for x in logits], dim=1)[0].sigmoid()
    anchors = model.anchor_generator(feats)
    out = torch.full((len(gt), num_source), float("nan"), device=gt.device)
    for i in range(len(gt)):
        # One box at a time, labelled 0: its positive anchors are those labelled 0.
        inst = Instances(image_size, gt_boxes=Boxes(gt[i:i + 1]),
                         gt_classes=torch.zeros(1, dtype=torch.long, device=gt.device))
        labels, _ = model.label_anchors(anchors, [inst])
        positive = labels[0] == 0
        if bool(positive.any()):
            out[i] = probs[positive].mean(dim=0)
    return out


def _read_image(d: dict, boxes: List[_Box], augmentations, image_format: str):
    """(CHW tensor, boxes in its coordinates) after the test-time transform."""
    image = read_image(d["file_name"], format=image_format)
    aug = T.AugInput(image)
    transforms = T.AugmentationList(list(augmentations))(aug)
    xyxy = transforms.apply_box(np.array([b.xyxy for b in boxes], dtype=np.float64))
    moved = [_Box(b.target, tuple(float(v) for v in row)) for b, row in zip(boxes, xyxy)]
    tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
    return tensor, moved


# ------------------------------------------------------------------------------ the choice
@dataclass
class _Plan:
    """Which images serve which classes."""

    chosen: Dict[int, List[int]]  # new class -> dataset indices
    reference: List[int]  # dataset indices read for kept-class reference boxes
    notes: Dict[int, str]  # new class -> why it has no images


def _plan(dataset_dicts: Sequence[dict], per_image: List[List[_Box]], counts, mapping,
          new: List[int], kept: List[int], imprint: bool, seed: int, max_images: int,
          dataset_classes: Optional[Sequence[str]]) -> _Plan:
    """The images each new class reads (at most ``max_images``, by :func:`choose_images`), and
    for imprint, when those hold no kept-class box, up to ``max_images`` images that do."""
    files = [str(d.get("file_name", i)) for i, d in enumerate(dataset_dicts)]
    chosen: Dict[int, List[int]] = {}
    notes: Dict[int, str] = {}
    for t in new:
        name = mapping.target[t]
        holding = [i for i, boxes in enumerate(per_image) if any(b.target == t for b in boxes)]
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
    return _Plan(chosen, reference, notes)


def _no_examples_reason(name: str, count: Dict[str, int],
                        dataset_classes: Optional[Sequence[str]]) -> str:
    if count["all"] == 0:
        where = "" if dataset_classes is None or normalize_class_name(name) in {
            normalize_class_name(c) for c in dataset_classes} else " (not one of its classes)"
        return f"no labelled instance of {name!r} in the training data{where}; head init"
    return (f"all {count['all']} labelled instances of {name!r} are crowd ({count['crowd']}) or "
            f"empty ({count['empty']}) boxes; head init")


# ------------------------------------------------------------------------------ running
class _Collected(NamedTuple):
    by_class: Dict[int, List[_Example]]  # new class -> its examples
    reference: List[_Example]  # kept-class examples, for calibration
    unreadable: Dict[int, str]  # dataset index -> what failed
    read: List[int]  # dataset indices read
    seconds: float  # reading, transforming and running them


def _collect(model: nn.Module, dataset_dicts: Sequence[dict], per_image: List[List[_Box]],
             plan: _Plan, kept: List[int], want_reference: bool,
             source_state: Mapping[str, torch.Tensor], num_source: int, augmentations,
             image_format: str) -> _Collected:
    """Read each planned image once and run the model on its boxes of interest."""
    serves: Dict[int, set] = {}
    for t, picks in plan.chosen.items():
        for i in picks:
            serves.setdefault(i, set()).add(t)
    for i in plan.reference:
        serves.setdefault(i, set())
    paths = _box_paths(model)
    out = _Collected({}, [], {}, [], 0.0)
    modes = {m: m.training for m in model.modules()}
    t0 = time.perf_counter()
    model.eval()
    try:
        with torch.no_grad():
            for i in sorted(serves):
                boxes = [b for b in per_image[i] if b.target in serves[i]
                         or (want_reference and b.target in kept)]
                try:
                    image, boxes = _read_image(dataset_dicts[i], boxes, augmentations,
                                               image_format)
                except _UNREADABLE as e:
                    out.unreadable[i] = f"{dataset_dicts[i].get('file_name')}: " \
                                        f"{type(e).__name__}: {e}"
                    logger.warning(f"[NEW_CLASS_INIT] skipped an unreadable image: "
                                   f"{out.unreadable[i]}")
                    continue
                out.read.append(i)
                for e in _run_image(model, image, boxes, paths, source_state, num_source):
                    if e.target in serves[i]:
                        out.by_class.setdefault(e.target, []).append(e)
                    elif e.target in kept:
                        out.reference.append(e)
    finally:
        for m, training in modes.items():
            m.training = training
    return out._replace(seconds=time.perf_counter() - t0)


def _init_one(t: int, mapping: ClassMapping, plan: _Plan, collected: _Collected,
              paths: List[_BoxPath], kept: List[int], source_state, model_state,
              method: str) -> Tuple[NewClassInit, Dict[str, Tuple[torch.Tensor, float]]]:
    """How new class ``t`` is initialised, and its imprinted (row, bias) per classifier."""
    name = mapping.target[t]
    if t in plan.notes:
        return NewClassInit(name, t, "head", reason=plan.notes[t]), {}
    picks = plan.chosen[t]
    bad = [collected.unreadable[i] for i in picks if i in collected.unreadable]
    examples = collected.by_class.get(t, [])
    init = NewClassInit(name, t, "head", images=len(picks) - len(bad),
                        instances=len(examples), unreadable=bad)
    if not examples:
        init.reason = (f"none of its {len(picks)} chosen images could be read (first: "
                       f"{bad[0]}); head init")
        return init, {}
    scored = [e.source_probs for e in examples if e.source_probs is not None]
    if not scored:
        init.reason = ("the model has no box or dense classifier with the checkpoint's class "
                       "rows to score its examples; head init")
        return init, {}
    mean = torch.stack(scored).mean(dim=0)
    r = int(mean.argmax())
    init.method, init.relative, init.relative_index = "relative", mapping.source_name(r), r
    init.score = float(mean[r])
    if method != "imprint":
        return init, {}
    if not paths:
        init.reason = ("no box classifier to imprint (RetinaNet/FCOS classify per location); "
                       "all entries from the relative")
        return init, {}
    rows: Dict[str, Tuple[torch.Tensor, float]] = {}
    notes = []
    for path in paths:
        feats = torch.stack([e.features[path.prefix] for e in examples])
        row, bias, info, note = _imprint(path, feats, collected.reference, kept, source_state,
                                         mapping.num_source, model_state)
        if row is None:
            notes.append(f"{path.prefix[:-1]}: {note}; its row from the relative")
            continue
        rows[path.prefix] = (row, bias)
        init.imprint[path.prefix[:-1]] = info
        if note not in notes:
            notes.append(note)
    if rows:
        init.method = "imprint"
    init.reason = "; ".join(notes)
    return init, rows


# ------------------------------------------------------------------------------ imprinting
def _log_odds(logits: torch.Tensor, classes: torch.Tensor, competitors: List[int],
              sigmoid: bool) -> torch.Tensor:
    """Per row, the log-odds of class ``classes[i]`` against ``competitors`` (itself left
    out): what decides its softmax probability; the logit itself for a sigmoid classifier."""
    own = logits.gather(1, classes[:, None])[:, 0]
    if sigmoid:
        return own
    others = logits[:, competitors].clone()
    for col, c in enumerate(competitors):
        others[classes == c, col] = float("-inf")
    return own - torch.logsumexp(others, dim=1)


def _imprint(path: _BoxPath, new_feats: torch.Tensor, reference: List[_Example],
             kept: List[int], source_state: Mapping[str, torch.Tensor], num_source: int,
             model_state: Mapping[str, torch.Tensor]):
    """One new class's imprinted row in one classifier (see the module docstring).

    Returns:
        (row (D,) or None, bias or None, numbers for the report, note): None when the row
        cannot be defined (the note says why).
    """
    x = new_feats.double()
    mean = x.mean(dim=0)
    norm = float(mean.norm())
    if not norm > 0:
        return None, None, {}, "its box features are all zero"
    direction = mean / norm
    weight = model_state[path.prefix + "cls_score.weight"].double().cpu()
    bias = model_state[path.prefix + "cls_score.bias"].double().cpu()
    sigmoid = bool(getattr(path.predictor, "use_sigmoid_ce", False))
    competitors = kept + [weight.shape[0] - 1]  # the kept classes and background
    ref = [e for e in reference if path.prefix in e.features]
    if ref:
        scale = float(weight[kept].norm(dim=1).mean())
        ref_x = torch.stack([e.features[path.prefix] for e in ref]).double()
        labels = torch.tensor([e.target for e in ref])
        target = float(_log_odds(ref_x @ weight.T + bias, labels, competitors, sigmoid).median())
        note = "calibrated on the kept classes"
    else:
        rows = _source_rows(source_state, path.prefix, num_source + 1, x.shape[1])
        if rows is None:
            return None, None, {}, "no kept class to calibrate against and no source rows"
        src_w, src_b = rows[0].double().cpu(), rows[1].double().cpu()
        scale = float(src_w[:num_source].norm(dim=1).mean())
        logits = x @ src_w.T + src_b
        top = logits[:, :num_source].argmax(dim=1)
        target = float(_log_odds(logits, top, list(range(num_source + 1)), sigmoid).median())
        note = "calibrated on the source classes (no kept-class example)"
    rest = torch.zeros(len(x), dtype=torch.float64) if sigmoid else torch.logsumexp(
        (x @ weight.T + bias)[:, competitors], dim=1)
    # The new class's log-odds on example i is scale * direction . x_i + b - rest_i: linear in
    # b, so the b that puts its median at the reference is exact.
    b = target - float((scale * (x @ direction) - rest).median())
    info = {"scale": scale, "bias": b, "reference_log_odds": target, "mean_feature_norm": norm}
    return scale * direction, b, info, note


# ------------------------------------------------------------------------------ entries
def _relative_entries(model_state: Mapping[str, torch.Tensor],
                      source_state: Mapping[str, torch.Tensor], layouts: Sequence[ClassLayout],
                      mapping: ClassMapping, relatives: Dict[int, int]) -> Dict[str, torch.Tensor]:
    """Every thing tensor with each new class's entries copied from its relative's, the
    engine's layouts placing them; every other entry is the model's own, bit for bit."""
    if not relatives:
        return {}
    index = list(mapping.source_index)
    for t, r in relatives.items():
        index[t] = r
    by_key: Dict[str, List[ClassLayout]] = {}
    for lay in layouts:
        if lay.space == THING and not lay.keep_model and not lay.agnostic:
            by_key.setdefault(lay.key, []).append(lay)
    out: Dict[str, torch.Tensor] = {}
    for key, lays in by_key.items():
        src, own = source_state.get(key), model_state.get(key)
        if src is not None and own is not None:
            value = _copy_relatives(src, own, lays, index, mapping.num_source, list(relatives))
            if value is not None:
                out[key] = value
    return out


def _copy_relatives(src: torch.Tensor, own: torch.Tensor, lays: List[ClassLayout],
                    index: List[Optional[int]], num_source: int,
                    new: List[int]) -> Optional[torch.Tensor]:
    """``own`` with the entries of classes ``new`` (on every class axis) gathered from
    ``src`` through ``index``; None when ``src`` does not read as ``num_source`` classes
    (it differs for other reasons, and the engine skipped it too).

    The engine's own layouts place every entry (:meth:`ClassLayout.entry_sources`): an entry is
    taken from ``src`` when it belongs to a new class on some class axis and is a plain copy of
    one source entry on every class axis.
    """
    axes = {lay.axis for lay in lays}
    if src.dim() != own.dim() or any(
            src.shape[d] != own.shape[d] for d in range(own.dim()) if d not in axes):
        return None
    only_new = [index[t] if t in new else None for t in range(len(index))]
    gathered = src
    copy = torch.ones(own.shape, dtype=torch.bool)
    of_new = torch.zeros(own.shape, dtype=torch.bool)
    for lay in sorted(lays, key=lambda lay: lay.axis):
        n = src.shape[lay.axis]
        src_agnostic = lay.is_agnostic_length(n) and not (lay.count_classes(n) == num_source == 1)
        if not src_agnostic and lay.count_classes(n) != num_source:
            return None
        axis = [SourceAxis(num_source, src_agnostic)]
        every = lay.entry_sources(index, axis)
        new_entries = lay.entry_sources(only_new, axis)
        positions = torch.where(every.copies, every.index[0], -1)
        gathered = gathered.index_select(lay.axis, positions.clamp(min=0).to(src.device))
        shape = [1] * own.dim()
        shape[lay.axis] = -1
        copy &= (positions >= 0).view(shape)
        of_new |= ((new_entries.kind == CLASS) & new_entries.copies).view(shape)
    return torch.where((copy & of_new).to(own.device), gathered.to(own), own)


def apply_new_class_entries(model: nn.Module, entries: Mapping[str, torch.Tensor]) -> None:
    """Write ``entries`` (state-dict key -> tensor) into ``model`` in place.

    Parameters keep their identity, so an optimizer built before (and DDP) still holds them.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    state = model.state_dict()
    with torch.no_grad():
        for key, value in entries.items():
            state[key].copy_(value)


def broadcast_thing_heads(model: nn.Module) -> None:
    """Give every rank rank 0's class-dependent thing tensors; a no-op in one process.

    Every rank computes the same new-class entries (the computation is deterministic), but
    GPUs of different kinds may round differently, and DDP, already built, never reconciles
    parameters that differ. Call it on every rank after every rank's load, only when
    new-class init ran (``report.new_classes`` is set): that depends only on the config and
    the checkpoint, which all ranks share, so no rank waits alone.
    """
    if comm.get_world_size() == 1:
        return
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    state = model.state_dict()
    for key in sorted({lay.key for lay in find_layouts(model) if lay.space == THING}):
        dist.broadcast(state[key], src=0)


# ------------------------------------------------------------------------------ the function
def init_new_classes(
    model: nn.Module,
    dataset_dicts: Sequence[dict],
    mapping: ClassMapping,
    source_state: Mapping[str, torch.Tensor],
    *,
    method: str = "imprint",
    max_images: int = 16,
    seed: int = 0,
    dataset_classes: Optional[Sequence[str]] = None,
    augmentations: Sequence[Any] = (),
    image_format: str = "BGR",
) -> Tuple[Dict[str, torch.Tensor], NewClassReport]:
    """Entries for the new classes of ``model`` from labelled examples (see the module doc).

    Args:
        model: a detectron2 model holding the mapped weights (DDP is looked through). It is
            run in eval mode without gradients, and left as it was: nothing is written into it.
        dataset_dicts: detectron2 dataset dicts (e.g. ``DatasetCatalog.get("my_train")``).
        mapping: the thing-class mapping of the load (``report.spaces["thing"].mapping``);
            target classes whose ``source_index`` is None are the new ones.
        source_state: the checkpoint's tensors under the model's keys; only the
            class-dependent ones are read (a relative may be a class the target dropped).
        method: one of :data:`NEW_CLASS_INITS` (``auto`` is ``imprint``: examples are given).
        max_images: at most this many images are read per new class.
        seed: with each class name, decides which images are chosen.
        dataset_classes: the names of the dicts' ``category_id`` values; None: they are
            target class indices.
        augmentations: the test-time transform (e.g. ``build_augmentation(cfg, False)``).
        image_format: as INPUT.FORMAT.

    Returns:
        The changed tensors (state-dict key -> full tensor, only new-class entries differing
        from the model's) and a :class:`NewClassReport`. Apply them with
        :func:`apply_new_class_entries`.

    Raises:
        ConfigError: ``method`` or ``max_images`` cannot work (named as their config keys).
    """
    t0 = time.perf_counter()
    check_option_values({"new_class_init": method, "init_images": max_images})
    report = NewClassReport(method, max_images, seed)
    method = "imprint" if method == "auto" else method
    new = [t for t, s in enumerate(mapping.source_index) if s is None]
    if method == "head" or not new:
        report.classes = [NewClassInit(mapping.target[t], t, "head") for t in new]
        return {}, report
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    kept = [t for t, s in enumerate(mapping.source_index) if s is not None]

    per_image, counts = _image_boxes(dataset_dicts, _class_index(mapping, dataset_classes),
                                     new + kept)
    imprint = method == "imprint"
    plan = _plan(dataset_dicts, per_image, counts, mapping, new, kept, imprint, seed,
                 max_images, dataset_classes)
    collected = _collect(model, dataset_dicts, per_image, plan, kept, imprint, source_state,
                         mapping.num_source, augmentations, image_format)

    paths = _box_paths(model)
    model_state = model.state_dict()
    relatives: Dict[int, int] = {}
    imprinted: Dict[Tuple[str, int], Tuple[torch.Tensor, float]] = {}
    for t in new:
        init, rows = _init_one(t, mapping, plan, collected, paths, kept, source_state,
                               model_state, method)
        report.classes.append(init)
        if init.relative_index is not None:
            relatives[t] = init.relative_index
        for prefix, row in rows.items():
            imprinted[(prefix, t)] = row

    entries = _relative_entries(model_state, source_state, find_layouts(model), mapping,
                                relatives)
    for (prefix, t), (row, bias) in imprinted.items():
        for key, value in ((prefix + "cls_score.weight", row), (prefix + "cls_score.bias", bias)):
            tensor = entries.get(key, model_state[key].detach().clone())
            tensor[t] = torch.as_tensor(value).to(tensor)
            entries[key] = tensor
    entries = {k: v for k, v in entries.items() if not torch.equal(v, model_state[k])}
    report.changed = sorted(entries)
    report.images_read = len(collected.read)
    report.seconds_per_image = collected.seconds / max(len(collected.read), 1)
    report.seconds = time.perf_counter() - t0
    return entries, report
