"""Trainer integration: ReclassTrainer, a mixin for existing trainers, and class-count checks."""
import contextlib
import contextvars
import functools
import logging
import os
from typing import List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from torch import nn

from ..data.class_lists import dataset_classes, target_classes, target_classes_what
from ..data.mapping import map_datasets_to_classes
from ..errors import ClassListError
from ..layouts import STUFF, THING, find_layouts
from ..new_classes import broadcast_thing_heads
from ..preserve import attach_preservation, preservation_summary
from .checkpoint import ReclassCheckpointer
from .config import log_config_changes, prepare_reclass_config
from .fast_rcnn import use_reclass_box_predictors
from .preservation import preservation_from_config
from .stock_loads import warn_on_skipped_class_heads

__all__ = [
    "REPORT_FILE",
    "ReclassTrainer",
    "ReclassTrainerMixin",
    "check_num_classes",
    "map_config_datasets",
]

logger = logging.getLogger(__name__)

#: True while ReclassTrainerMixin.__init__ builds the trainer's model; build_model reached
#: otherwise builds a model to evaluate (a project's --eval-only: ``Trainer.build_model(cfg)``).
_BUILDING_TRAINER = contextvars.ContextVar("d2_reclass_building_trainer", default=False)

REPORT_FILE = "reclass_report.json"
#: The model attribute holding the (thing, stuff) classes its build prepared it for.
_BUILT_FOR = "_d2_reclass_built_for"


def check_num_classes(
    model: nn.Module,
    thing_classes: Optional[Sequence[str]],
    stuff_classes: Optional[Sequence[str]] = None,
    *,
    what: str = "DATASETS.TRAIN",
    fix: str = "",
) -> None:
    """Raise if any class-dependent head of ``model`` disagrees with the dataset's classes.

    Catches, before the first iteration, what otherwise fails as a CUDA assert mid-training,
    an evaluator assert at the end, or silently (NUM_CLASSES one too large: a class is never
    trained; one too small: the last class is trained as background). Heads are compared with
    the class list of their own space, and a module's ``num_classes`` attribute with the space
    of the class tensors it holds (a module holding none is not compared).

    Args:
        fix: what to tell the user to do; default: set the head's NUM_CLASSES key.

    Raises:
        ClassListError: naming the head, both counts and the config key that sizes it.
    """
    expected = {THING: thing_classes, STUFF: stuff_classes}
    layouts = find_layouts(model)
    problems = []
    for lay in layouts:
        classes = expected.get(lay.space)
        if classes and lay.num_classes is not None and not lay.agnostic \
                and lay.num_classes != len(classes):
            problems.append((lay.key, lay.num_classes, len(classes), lay.config_key))
    for name, m in model.named_modules():
        k = getattr(m, "num_classes", None)
        inside = [lay for lay in layouts if name and lay.key.startswith(name + ".")]
        classes = expected.get(inside[0].space) if inside else None
        if classes and isinstance(k, int) and k != len(classes) \
                and not any(p[0].startswith(name + ".") for p in problems):
            problems.append((name, k, len(classes), inside[0].config_key))
    if problems:
        key, k, n, cfg_key = problems[0]
        hint = " (one too many: the model would keep a class that never appears)" if k == n + 1 \
            else " (one too few: the last class would be trained as background)" if k == n - 1 \
            else ""
        setting = f"Set {cfg_key} {n}" if cfg_key else f"Build {key} for {n} classes"
        fix = fix or f"{setting}, or leave MODEL.RECLASS.AUTO_NUM_CLASSES on."
        raise ClassListError(
            f"The model was built for {k} classes at {key}, but {what} has {n}{hint}. {fix} "
            "Mismatched: " + ", ".join(p[0] for p in problems)
        )


class ReclassTrainerMixin:
    """Mix into a :class:`DefaultTrainer` subclass: ``class Trainer(ReclassTrainerMixin, T)``.

    On construction it works on a copy of the config (frozen or not): MODEL.RECLASS gets its
    defaults if the config has none, its keys are checked, and with AUTO_NUM_CLASSES every
    NUM_CLASSES follows the target classes (``self.cfg`` shows the counts used). Box
    predictors become ReclassFastRCNNOutputLayers before the optimizer and DDP exist, loads
    and saves go through :class:`ReclassCheckpointer`, class counts are checked against the
    datasets, and ``reclass_report.json`` is written into OUTPUT_DIR. With
    MODEL.RECLASS.NEW_CLASS_INIT relative / imprint, :meth:`resume_or_load` initialises new
    classes from DATASETS.TRAIN examples right after the mapped weights load, before the first
    optimizer step, and gives every rank rank 0's heads. Multi-process CPU runs (gloo) work too.
    After the load, MODEL.RECLASS.PRESERVE (:mod:`d2_reclass.preserve`) is attached to the
    training loop as :attr:`preservation`.
    """

    def __init__(self, cfg, *args, **kwargs):
        cfg, changes = prepare_reclass_config(cfg)
        log_config_changes(changes)
        map_config_datasets(cfg)
        token = _BUILDING_TRAINER.set(True)
        try:
            with _ddp_on_cpu(cfg):
                super().__init__(cfg, *args, **kwargs)
        finally:
            _BUILDING_TRAINER.reset(token)

    @classmethod
    def build_model(cls, cfg):
        # Also reached without __init__ (evaluation: Trainer.build_model(cfg)): prepare here
        # too; a prepared config is left as it is. There, the model is built for the classes
        # MODEL.WEIGHTS stores, which a project's stock DetectionCheckpointer then loads whole.
        cfg, changes = prepare_reclass_config(
            cfg, eval_only=not _BUILDING_TRAINER.get() and _stores_names(cfg.MODEL.WEIGHTS))
        log_config_changes(changes)
        model = super().build_model(cfg)
        # Evaluation maps DATASETS.TEST to the classes the model was built for, which may be
        # the checkpoint's rather than those the caller's config names.
        setattr(model, _BUILT_FOR, (target_classes(cfg, "thing"), target_classes(cfg, "stuff")))
        use_reclass_box_predictors(model, cfg)
        # A stock DetectionCheckpointer loading into this model (a project's eval-only path)
        # skips class rows of another length: say so, naming the line to change.
        return warn_on_skipped_class_heads(model)

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a DetectionCheckpointer, then calls build_hooks,
        # whose PeriodicCheckpointer keeps a reference to self.checkpointer: swap it here,
        # first, so that every save (and the class names it stores) goes through ours.
        old = self.checkpointer
        self.checkpointer = ReclassCheckpointer.from_config(
            self.cfg, old.model, old.save_dir, **old.checkpointables)
        # resume_or_load writes the report there: the load's log names it for the full mapping.
        self.checkpointer.report_file = os.path.join(self.cfg.OUTPUT_DIR, REPORT_FILE)
        # First, so that what preservation did is logged before the final evaluation.
        return [hooks.CallbackHook(after_train=lambda trainer: self._log_preservation()),
                *super().build_hooks()]

    def resume_or_load(self, resume: bool = True) -> None:
        with _no_empty_metrics_on_failure(self.cfg.OUTPUT_DIR):
            check_num_classes(self.checkpointer.model, target_classes(self.cfg, "thing"),
                              target_classes(self.cfg, "stuff"))
            super().resume_or_load(resume=resume)
        report = self.checkpointer.report
        if report is not None and report.new_classes is not None:
            broadcast_thing_heads(self.checkpointer.model)
        if report is not None and comm.is_main_process():
            PathManager.mkdirs(self.cfg.OUTPUT_DIR)
            path = os.path.join(self.cfg.OUTPUT_DIR, REPORT_FILE)
            report.to_json(path)
            logger.info(f"[ReclassTrainer] Wrote {path}")
        self._attach_preservation()

    def _attach_preservation(self) -> None:
        if getattr(self, "preservation", None) is None:
            # After the load: frozen_rows keeps what was loaded; every rank builds its teacher.
            self.preservation = attach_preservation(self._trainer,
                                                    preservation_from_config(self.cfg))

    def train(self):
        # A project that trains without resume_or_load still keeps the old classes.
        self._attach_preservation()
        with _no_empty_metrics_on_failure(self.cfg.OUTPUT_DIR):
            return super().train()

    def _log_preservation(self) -> None:
        summary = preservation_summary(self.preservation)
        if summary:
            logger.info(summary)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # Also reached without __init__ (evaluation: Trainer.test(cfg, model)).
        built_for = getattr(getattr(model, "module", model), _BUILT_FOR, None)
        map_config_datasets(cfg, train=False, classes=built_for)
        for name in cfg.DATASETS.TEST:
            check_num_classes(
                model, _classes_loaded_as(name, "thing"), _classes_loaded_as(name, "stuff"),
                what=f"DATASETS.TEST {name!r}",
                fix="Evaluate on a dataset with the model's classes, or set "
                "MODEL.RECLASS.TARGET_CLASSES to the dataset's classes to map the model's heads "
                "to them.")
        return super().test(cfg, model, evaluators)


def _stores_names(weights: str) -> bool:
    """Whether MODEL.WEIGHTS may store class names: a local ``.pth`` file (d2_reclass writes
    them). Other files (URLs, Caffe2 ``.pkl``) are left to the project's own checkpointer,
    unread: none stores names."""
    return weights.endswith(".pth") and os.path.isfile(weights)


def map_config_datasets(cfg, *, train: bool = True,
                        classes: Optional[Tuple[Optional[List[str]], Optional[List[str]]]] = None
                        ) -> None:
    """Map DATASETS.TEST (and DATASETS.TRAIN when ``train``) to the model's classes by name,
    before any data loader is built: ``classes`` (thing, stuff) when given, else the config's
    (:func:`~d2_reclass.data.class_lists.target_classes`).

    Raises:
        ClassListError: a dataset names a class the model lacks (naming both lists).
    """
    thing, stuff = classes or (target_classes(cfg, "thing"), target_classes(cfg, "stuff"))
    target_what = "the classes the model was built for" if classes \
        else target_classes_what(cfg, "thing")
    explicit = bool(cfg.MODEL.get("RECLASS", {}).get("TARGET_CLASSES", None))
    key = "MODEL.RECLASS.TARGET_CLASSES"
    for what, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN if train else ()),
                        ("DATASETS.TEST", cfg.DATASETS.TEST)):
        if what == "DATASETS.TRAIN":
            # Only an explicit list can lack a training class (else it is their union).
            fix = f"Add the missing classes to {key}, or leave {key} empty: the model then " \
                "has the classes of every DATASETS.TRAIN dataset, each one's labels mapped by name."
        elif explicit:
            fix = "Evaluate on datasets whose classes the model has, or add the missing " \
                f"classes to {key}."
        else:
            fix = "Evaluate on datasets whose classes the model has, or add a dataset with the " \
                f"missing classes to DATASETS.TRAIN (or set {key})."
        map_datasets_to_classes(names, thing, stuff, what=what, target_what=target_what,
                                fix=fix)


def _classes_loaded_as(name: str, kind: str):
    """The classes whose indices dataset ``name`` loads with (the model's, once mapped)."""
    dataset_classes(name, kind)  # loads it for its metadata if needed
    classes = MetadataCatalog.get(name).get(f"{kind}_classes", None)
    return list(classes) if classes else None


@contextlib.contextmanager
def _no_empty_metrics_on_failure(output_dir: str):
    """On an exception, remove ``output_dir/metrics.json`` if it is empty, then re-raise.

    detectron2's JSONWriter creates that file when the trainer is built; a run that fails
    before any iteration is logged (a class-count error, a checkpoint that cannot be mapped)
    would leave it empty, looking like a run that produced metrics. A file with lines (a run
    that trained, or an earlier run in the same directory) is kept.
    """
    try:
        yield
    except BaseException:
        path = os.path.join(output_dir, "metrics.json")
        if comm.is_main_process() and os.path.isfile(path) and os.path.getsize(path) == 0:
            os.remove(path)
        raise


@contextlib.contextmanager
def _ddp_on_cpu(cfg):
    """Let DefaultTrainer wrap a CPU model in DDP when several processes run.

    detectron2's create_ddp_model always passes ``device_ids=[local_rank]``, which torch
    rejects for CPU modules; for ``MODEL.DEVICE cpu`` with world size > 1 it gets
    ``device_ids=None`` for the duration of the trainer's construction. GPU runs are untouched.
    """
    if cfg.MODEL.DEVICE != "cpu" or comm.get_world_size() == 1:
        yield
        return
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class ReclassTrainer(ReclassTrainerMixin, DefaultTrainer):
    """:class:`DefaultTrainer` with d2_reclass's config preparation, checkpointer, predictor and
    checks, and an evaluator for COCO-format and semantic-segmentation datasets."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "sem_seg":
            return SemSegEvaluator(dataset_name, output_dir=output_folder)
        return COCOEvaluator(dataset_name, output_dir=output_folder)
