"""Trainer integration: ReclassTrainer, a mixin for existing trainers, and class-count checks."""
import contextlib
import contextvars
import functools
import logging
import os
from typing import List, Optional, Sequence, Tuple

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import Checkpointer
from torch import nn

from ..data.class_lists import dataset_classes, target_classes, target_classes_what
from ..data.mapping import map_datasets_to_classes
from ..errors import ClassListError, ConfigError
from ..layouts import STUFF, THING, find_layouts
from ..new_classes import broadcast_thing_heads
from ..preserve import attach_preservation, preservation_summary
from .checkpoint import ReclassCheckpointer
from .config import log_config_changes, prepare_reclass_config
from .fast_rcnn import use_reclass_box_predictors
from .preservation import preservation_from_config
from .probe import attach_probe
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
#: Trainer attributes: the checkpointer behind the ``checkpointer`` property, the config the
#: mixin prepared (kept from before ``self.cfg`` exists), whether the mixin's hooks were built.
_CHECKPOINTER = "_d2_reclass_checkpointer"
_PREPARED_CFG = "_d2_reclass_cfg"
_OWN_HOOKS = "_d2_reclass_hooks_built"
#: Checkpointers replaced by a ReclassCheckpointer without losing anything: their load and save
#: are ReclassCheckpointer's parents'. A subclass (an EMA checkpointer, a project's format) is not.
_REPLACEABLE = (DetectionCheckpointer, Checkpointer)


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

    Trainers that build themselves hold too: an ``__init__`` that skips DefaultTrainer's
    (its config is prepared all the same), a DetectionCheckpointer assigned at any time
    (:attr:`checkpointer` makes it ours), a ``build_hooks`` that does not call ``super()`` or
    gives a hook its own stock checkpointer (pointed at ours before loading and training),
    AMPTrainer as the loop, and model-shaped checkpointables such as an EMA's ``ema_state``.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A trainer's own __init__ that skips DefaultTrainer.__init__ (MaskDINO, DiffusionDet:
        # ``super(DefaultTrainer, self).__init__()``) would skip the mixin's too: wrap it, so the
        # config is prepared whichever __init__ runs first.
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _preparing_init(init)

    def __init__(self, cfg, *args, **kwargs):
        with _prepared_for_training(self, cfg) as cfg:
            super().__init__(cfg, *args, **kwargs)

    @property
    def checkpointer(self):
        """The trainer's checkpointer: a :class:`ReclassCheckpointer` whoever assigns it.

        DefaultTrainer.__init__ assigns a stock DetectionCheckpointer, and so do trainers that
        build themselves (MaskDINO assigns one again after ``build_hooks``); each becomes a
        ReclassCheckpointer with the same model, directory and checkpointables, and one with
        the same ones as the current checkpointer keeps that object, which the hooks hold.

        Raises:
            ConfigError: on assignment, a DetectionCheckpointer subclass, which cannot be
                replaced without losing what it adds.
        """
        try:
            return self.__dict__[_CHECKPOINTER]
        except KeyError:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute 'checkpointer'") from None

    @checkpointer.setter
    def checkpointer(self, value) -> None:
        checkpointer = self._reclass_checkpointer(value, "self.checkpointer")
        cfg = self.__dict__.get(_PREPARED_CFG)
        if isinstance(checkpointer, ReclassCheckpointer) and cfg is not None:
            # resume_or_load writes the report there: the load's log names it for the full
            # mapping.
            checkpointer.report_file = os.path.join(cfg.OUTPUT_DIR, REPORT_FILE)
        self.__dict__[_CHECKPOINTER] = checkpointer

    def _reclass_checkpointer(self, value, where: str):
        """``value`` as a ReclassCheckpointer: itself when it is one, or anything but a
        checkpointer (checked where it is used); a stock one converted (see
        :attr:`checkpointer`)."""
        if isinstance(value, ReclassCheckpointer) or not isinstance(value, Checkpointer):
            return value
        if type(value) not in _REPLACEABLE:
            name = type(value).__name__
            raise ConfigError(
                f"{where} of {type(self).__name__} is an instance of {name}, a subclass of "
                f"{type(value).__mro__[1].__name__}: ReclassTrainerMixin would lose what {name} "
                "adds by replacing it with a ReclassCheckpointer, and a stock checkpointer loads "
                "class rows by index. Derive it from ReclassCheckpointer instead (`class "
                f"{name}(ReclassCheckpointer)`, from d2_reclass) and build it with `{name}"
                ".from_config(cfg, model, save_dir, **checkpointables)`; the trainer then keeps "
                "it as it is.")
        current = self.__dict__.get(_CHECKPOINTER)
        if isinstance(current, ReclassCheckpointer) and _same_target(current, value):
            return current
        ours = ReclassCheckpointer.from_config(
            self._prepared_cfg(), value.model, value.save_dir, save_to_disk=value.save_to_disk,
            **value.checkpointables)
        ours.path_manager = value.path_manager
        return ours

    def _prepared_cfg(self):
        cfg = self.__dict__.get(_PREPARED_CFG)
        if cfg is None:
            raise ConfigError(
                f"{type(self).__name__} was built without ReclassTrainerMixin preparing its "
                "config (the mixin's __init__ did not run). Put the mixin first "
                f"in the class line, `class Trainer(ReclassTrainerMixin, YourTrainer)`, and build "
                "the trainer with `Trainer(cfg)`.")
        return cfg

    def _checked_checkpointers(self, where: str, *, required: bool = True):
        """The trainer's ReclassCheckpointer, after pointing every hook that saves through a
        stock checkpointer (a ``build_hooks`` that builds its own) at one of ours.

        Raises:
            ConfigError: ``required`` and ``self.checkpointer`` is not a checkpointer; a hook
                holds a DetectionCheckpointer subclass.
        """
        for hook in getattr(self, "_hooks", ()):
            for attr in ("checkpointer", "_checkpointer"):  # PeriodicCheckpointer, BestCheckpointer
                held = getattr(hook, attr, None)
                if isinstance(held, Checkpointer) and not isinstance(held, ReclassCheckpointer):
                    setattr(hook, attr, self._reclass_checkpointer(
                        held, f"The checkpointer of {type(hook).__name__}"))
                    logger.info(f"[ReclassTrainer] {type(hook).__name__} now saves through a "
                                "ReclassCheckpointer (it was given a stock checkpointer).")
        checkpointer = self.__dict__.get(_CHECKPOINTER)
        if required and not isinstance(checkpointer, ReclassCheckpointer):
            raise ConfigError(
                f"{type(self).__name__}.{where} needs self.checkpointer to load through, but it "
                f"is {type(checkpointer).__name__ if checkpointer is not None else 'not set'}. "
                "Assign a DetectionCheckpointer in __init__, as DefaultTrainer.__init__ does "
                "(`self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, "
                "trainer=weakref.proxy(self))`); the mixin makes it a ReclassCheckpointer.")
        return checkpointer

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
        # A project with no registered layouts: its class tensors as the probe finds them.
        attach_probe(model, cfg)
        # A stock DetectionCheckpointer loading into this model (a project's eval-only path)
        # skips class rows of another length: say so, naming the line to change.
        return warn_on_skipped_class_heads(model)

    def build_hooks(self):
        # self.checkpointer is already ours (the property), so PeriodicCheckpointer saves the
        # class names. First, so that what preservation did is logged before the final
        # evaluation.
        self.__dict__[_OWN_HOOKS] = True
        return [hooks.CallbackHook(after_train=lambda trainer: self._log_preservation()),
                *super().build_hooks()]

    def resume_or_load(self, resume: bool = True) -> None:
        with _no_empty_metrics_on_failure(self.cfg.OUTPUT_DIR):
            checkpointer = self._checked_checkpointers("resume_or_load")
            check_num_classes(checkpointer.model, target_classes(self.cfg, "thing"),
                              target_classes(self.cfg, "stuff"))
            super().resume_or_load(resume=resume)
        report = getattr(self.checkpointer, "report", None)
        if report is not None and report.new_classes is not None:
            broadcast_thing_heads(checkpointer.model)
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
        self._checked_checkpointers("train", required=False)
        # A project that trains without resume_or_load still keeps the old classes.
        self._attach_preservation()
        with _no_empty_metrics_on_failure(self.cfg.OUTPUT_DIR):
            results = super().train()
        if not self.__dict__.get(_OWN_HOOKS):  # a build_hooks that does not call super()
            self._log_preservation()
        return results

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


def _preparing_init(init):
    """``init`` (a trainer class's own __init__), run with the config prepared for training."""
    @functools.wraps(init)
    def __init__(self, cfg, *args, **kwargs):
        with _prepared_for_training(self, cfg) as cfg:
            init(self, cfg, *args, **kwargs)
    return __init__


@contextlib.contextmanager
def _prepared_for_training(trainer, cfg):
    """Yield ``cfg`` prepared (:func:`prepare_reclass_config`, datasets mapped) for building
    ``trainer``, kept on it for its checkpointer; the outermost __init__ prepares, those it
    calls get what it passes them."""
    if _PREPARED_CFG in trainer.__dict__:
        yield cfg
        return
    cfg, changes = prepare_reclass_config(cfg)
    log_config_changes(changes)
    map_config_datasets(cfg)
    trainer.__dict__[_PREPARED_CFG] = cfg
    token = _BUILDING_TRAINER.set(True)
    try:
        with _ddp_on_cpu(cfg):
            yield cfg
    finally:
        _BUILDING_TRAINER.reset(token)


def _same_target(a: Checkpointer, b: Checkpointer) -> bool:
    """Whether ``a`` and ``b`` save the same model, into the same place, with the same
    checkpointable objects (MaskDINO's second DetectionCheckpointer repeats its first)."""
    return (a.model is b.model and a.save_dir == b.save_dir and a.save_to_disk == b.save_to_disk
            and a.checkpointables.keys() == b.checkpointables.keys()
            and all(a.checkpointables[k] is b.checkpointables[k] for k in a.checkpointables))


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
