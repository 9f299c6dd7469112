"""init_new_classes: the new thing classes' entries from labelled examples, computed in full
before any is returned, and written into a model in place."""
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.utils import comm
from torch import distributed as dist
from torch import nn

from ..classes import ClassMapping
from ..layouts import THING, find_layouts
from ..options import check_option_values
from .examples import class_index, collect, image_boxes, plan_images
from .report import NewClassInit, NewClassReport
from .rules import init_one, learned_class_rows, read_classifiers, relative_entries
from .scoring import box_paths, unsupported_reason

__all__ = ["apply_new_class_entries", "broadcast_thing_heads", "init_new_classes"]


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
    image_roots: Sequence[str] = (),
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
        seed: with each class name and each image's name relative to its image root,
            decides which images are chosen (the same wherever the data lies).
        dataset_classes: the names of the dicts' ``category_id`` values; None: they are
            target class indices.
        augmentations: the test-time transform (e.g. ``build_augmentation(cfg, False)``).
        image_format: as INPUT.FORMAT.
        image_roots: the directories the dicts' file names are under (a registered dataset's
            ``image_root``); without, the directory common to all of them (see
            :func:`~d2_reclass.new_classes.examples.portable_names`).

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
    reason = unsupported_reason(model) if method != "head" and new else None
    if method == "head" or not new or reason:
        report.classes = [NewClassInit(mapping.target[t], t, "head", reason=reason or "")
                          for t in new]
        return {}, report
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if not any(learned_class_rows(lay) for lay in find_layouts(model)):
        # Nothing an example could score or write (Detic's zero-shot classifier is the model's
        # own vocabulary): say so without reading any image.
        report.classes = [NewClassInit(
            mapping.target[t], t, "head", reason="the model has no learned class rows (its "
            "classes are a vocabulary, e.g. Detic's zero-shot classifier); head init")
            for t in new]
        return {}, report
    kept = [t for t, s in enumerate(mapping.source_index) if s is not None]

    per_image, counts = image_boxes(dataset_dicts, class_index(mapping, dataset_classes),
                                     new + kept)
    imprint = method == "imprint"
    plan = plan_images(dataset_dicts, per_image, counts, mapping, new, kept, imprint, seed,
                       max_images, dataset_classes, image_roots)
    collected = collect(model, dataset_dicts, per_image, plan, kept, imprint, source_state,
                         mapping.num_source, augmentations, image_format)

    paths = box_paths(model)
    model_state = model.state_dict()
    classifiers = read_classifiers(paths, collected.reference, kept, model_state,
                                   collected.negatives) if imprint else {}
    relatives: Dict[int, int] = {}
    imprinted: Dict[Tuple[str, int], Tuple[torch.Tensor, float]] = {}
    for t in new:
        init, rows = init_one(t, mapping, plan, collected, paths, classifiers, source_state,
                               method)
        report.classes.append(init)
        if init.relative_index is not None:
            relatives[t] = init.relative_index
        for prefix, row in rows.items():
            imprinted[(prefix, t)] = row

    entries = relative_entries(model_state, source_state, find_layouts(model), mapping,
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
