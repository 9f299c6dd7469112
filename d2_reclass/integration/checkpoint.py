"""ReclassCheckpointer: a DetectionCheckpointer that fits class-dependent heads on load.

It loads everything DetectionCheckpointer loads and keeps all it does (PathManager URLs,
``?matching_heuristics=True``, Detectron1/Caffe2 name matching, ``module.`` prefixes,
``pixel_mean``/``cell_anchors`` handling). The differences: files are read safely
(:mod:`d2_reclass.io.serialization`), the engine fits every class-dependent tensor *before*
fvcore's shape check (so none is "skipped"), further checkpoints (``MODEL.RECLASS.COMBINE``)
give the classes the loaded one does not know, and saved checkpoints store the class names.
"""
import dataclasses
import logging
import os
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.data import DatasetCatalog
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _strip_prefix_if_present
from torch.nn.parallel import DistributedDataParallel

from ..classes import normalize_class_name, union_classes
from ..data.class_lists import (
    CLASSES_KEY,
    check_source_dataset,
    dataset_classes,
    kept_target_classes,
    labelled_classes,
    read_stored_classes,
    source_classes,
    stored_classes,
)
from ..engine.combine import combine_state_dicts
from ..engine.keys import select_and_rename
from ..engine.report import ReclassReport
from ..engine.surgery import (
    ClassSpec,
    SourceCheckpoint,
    class_map_by_space,
    describe_class_change,
    reclass_state_dict,
)
from ..engine.unclaimed import unclaimed_class_tensors, unclaimed_message
from ..errors import (
    CheckpointError,
    ClassMismatchError,
    CombineError,
    ConfigError,
    ResumeClassMismatchError,
)
from ..io.serialization import check_state_dict, existing_local_path, load_checkpoint_file
from ..layouts import STUFF, THING, find_layouts
from ..new_classes import (
    NewClassExamples,
    NewClassInit,
    NewClassReport,
    apply_new_class_entries,
    init_new_classes,
    unsupported_reason,
)
from ..options import ReclassOptions
from .config import options_from_config
from .probe import attach_probe

__all__ = ["ReclassCheckpointer", "check_resume"]

logger = logging.getLogger(__name__)

def resume_mismatch_message(source: str, difference: str, tensors: Sequence[str] = ()) -> str:
    """The one message for resuming from a checkpoint trained for other classes."""
    return (
        f"Cannot resume from {source}: it was trained for other classes than the model's "
        f"({difference}). Its optimizer and scheduler state belong to those classes and cannot "
        "be mapped. Use a new OUTPUT_DIR, or start without --resume with MODEL.WEIGHTS "
        f"{source} to map its weights to the model's classes."
        + "".join(f"\n{t}" for t in tensors)
    )


def check_resume(
    save_dir: str,
    thing_classes: Optional[Sequence[str]],
    stuff_classes: Optional[Sequence[str]] = None,
    *,
    trust_pickle: bool = False,
) -> None:
    """Raise before anything is written when ``--resume`` would resume from a checkpoint in
    ``save_dir`` that stores other class names than the target's (a reorder included).

    Checkpoints that store no names are checked when they are loaded instead.

    Raises:
        ResumeClassMismatchError: naming the checkpoint, both class lists and what to do.
    """
    marker = os.path.join(save_dir, "last_checkpoint")
    if not PathManager.isfile(marker):
        return
    with PathManager.open(marker) as f:
        path = os.path.join(save_dir, f.read().strip())
    if not PathManager.isfile(path):
        return
    stored = read_stored_classes(path, trust_pickle=trust_pickle)
    for space, target in ((THING, thing_classes), (STUFF, stuff_classes)):
        source = stored.get(f"{space}_classes")
        spec = ClassSpec(source, target)
        if source and target and [normalize_class_name(c) for c in source] != [
                normalize_class_name(c) for c in target]:
            raise ResumeClassMismatchError(resume_mismatch_message(
                path, f"{space} classes: {describe_class_change(spec, None, None)}"))


class _AnyShape(tuple):
    """A shape equal to every shape: lets detectron2's name-matching heuristics pair a
    class-dependent key whatever its class count, leaving the shape decision to the engine."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = tuple.__hash__


class ReclassCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that maps or reinitialises class-dependent tensors.

    It takes the parent's arguments unchanged, plus one keyword, ``reclass``: the
    :class:`ReclassOptions` (default: ``MODE auto`` and nothing else known), and
    ``examples``: the :class:`NewClassExamples` whose labelled images initialise new classes
    (``new_class_init``) right after the mapped weights are loaded; needed for ``relative`` /
    ``imprint``, while ``auto`` without them keeps the head's init. After
    :meth:`load`, :attr:`report` holds the :class:`ReclassReport` of that load (None for a
    resume, which never does surgery).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        reclass: Optional[ReclassOptions] = None,
        examples: Optional[NewClassExamples] = None,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ):
        _check_no_options_as_keywords(checkpointables)
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if reclass is not None and not isinstance(reclass, ReclassOptions):
            raise ConfigError(
                f"ReclassCheckpointer(reclass=...) takes a ReclassOptions, not "
                f"{type(reclass).__name__}; e.g. reclass=ReclassOptions(mode='map').")
        self.reclass = reclass or ReclassOptions()
        check_source_dataset(self.reclass.source_dataset)
        self.examples = examples
        self.report: Optional[ReclassReport] = None
        #: Where the full report of a load is written (a trainer's reclass_report.json), for
        #: the log to name; empty: nowhere yet.
        self.report_file = ""
        self._resuming = False
        self._loading = ""
        self._loading_checkpointables: List[str] = []

    @classmethod
    def from_config(cls, cfg, model: torch.nn.Module, save_dir: str = "", **checkpointables):
        """Build from ``cfg.MODEL.RECLASS`` (its defaults where the config has none); new
        classes take their examples from DATASETS.TRAIN."""
        examples = NewClassExamples.from_config(cfg) if cfg.DATASETS.TRAIN else None
        attach_probe(model, cfg)  # a project with no registered layouts: probe its model
        return cls(model, save_dir, reclass=options_from_config(cfg), examples=examples,
                   **checkpointables)

    # ------------------------------------------------------------------ loading
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        self.report = None
        # A DDP model's workers may lack the file: DetectionCheckpointer.load then loads it on
        # the main worker and syncs the others, so only a single-process load is checked here.
        if path and not isinstance(self.model, DistributedDataParallel):
            existing_local_path(path, self.path_manager)
        self._loading = path
        self._loading_checkpointables = list(
            self.checkpointables if checkpointables is None else checkpointables)
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading = ""
            self._loading_checkpointables = []

    def _torch_load(self, f: str) -> Any:
        data = load_checkpoint_file(f, trust_pickle=self.reclass.trust_pickle, progress=True)
        if not isinstance(data, dict):  # DetectionCheckpointer._load_file looks "model" up in it
            check_state_dict(data, f)  # raises: a file holding no dict holds no weights
        return data

    def _load_file(self, filename: str) -> Dict[str, Any]:
        # detectron2 unpickles .pkl (and torch.loads .pyth) itself; read them safely instead,
        # then give them the same shape as DetectionCheckpointer._load_file does.
        if filename.endswith(".pkl"):
            data = self._torch_load(filename)
            if isinstance(data, dict) and "model" in data and "__author__" in data:
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            if isinstance(data, dict) and "blobs" in data:
                data = data["blobs"]
            data = _without_suffix(data, "_momentum")
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            data = self._torch_load(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise CheckpointError(
                    f"{filename} is not a pycls checkpoint: it has no 'model_state' entry."
                )
            state = _without_suffix(data["model_state"], "num_batches_tracked")
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _load_model(self, checkpoint: Dict[str, Any]):
        source = self._loading or "the checkpoint"
        state = self._weights(checkpoint, source)
        classes = self._class_specs(stored_classes(checkpoint, source=source))
        layouts = find_layouts(self.model)
        model_state = self.model.state_dict()
        examples = None
        if self._resuming:
            # The run's own checkpoint holds every class already: nothing is combined.
            try:
                reclass_state_dict(state, model_state, layouts, classes=classes, mode="strict",
                                   seed=self.reclass.seed, source=source)
            except ClassMismatchError as e:
                if not e.problems:  # no class change: the config changed since the save
                    raise CheckpointError(
                        f"Cannot resume from {source}: tensors have another shape than the "
                        "model's, and not because of classes (the config changed since it was "
                        "saved). Resume with the config it was trained with, or use a new "
                        "OUTPUT_DIR.\n" + "\n".join(e.tensors)) from None
                raise ResumeClassMismatchError(
                    resume_mismatch_message(source, "; ".join(e.problems), e.tensors)) from None
        else:
            self._check_unclaimed(state, model_state, layouts, classes, source)
            source_state = state
            options = dict(classes=classes, mode=self.reclass.mode, seed=self.reclass.seed,
                           source=source)
            if self.reclass.combine:
                more = [self._further_checkpoint(path) for path in self.reclass.combine]
                state, self.report = combine_state_dicts(
                    state, more, model_state, layouts, **options,
                    allow_different_weights=self.reclass.combine_allow_different_weights)
            else:
                state, self.report = reclass_state_dict(state, model_state, layouts, **options)
            _warn_non_finite(state, layouts, source)
            _warn_opaque(self.report, source)
            if self.reclass.mode == "auto":
                _warn_unasked_reinit(self.report, source)
            for name in _model_shaped(checkpoint, self._loading_checkpointables, layouts):
                checkpoint[name] = self._reclass_model_shaped(checkpoint[name], name, source,
                                                              model_state, layouts, classes)
            # Read before anything is loaded: a dataset that fails leaves the model as it was.
            examples = self._new_class_examples()
        checkpoint["model"] = state
        incompatible = super()._load_model(checkpoint)
        if examples is not None:
            self._init_new_classes(source_state, *examples)
        if self.report is not None and (self.report.changed or self.report.mismatches) \
                and logger.isEnabledFor(logging.INFO):  # nothing formatted that is not shown
            logger.info(f"[ReclassCheckpointer] {source}:\n"
                        f"{self.report.log_text(self.report_file)}")
        if self.report is not None and self.report.unrecognised:
            _warn_unrecognised(self.report, source)
        return incompatible

    def _check_unclaimed(self, state, model_state, layouts, classes, source: str) -> None:
        """Warn (raise, in ``strict`` mode) where the thing names change at the same count and
        the model has unclaimed tensors that may be its class heads
        (:func:`~d2_reclass.engine.unclaimed.unclaimed_class_tensors`)."""
        suspects = unclaimed_class_tensors(state, model_state, layouts, classes)
        if not suspects:
            return
        strict = self.reclass.mode == "strict"
        message = unclaimed_message(suspects, classes[THING], source, strict)
        if strict:
            raise ClassMismatchError(message, [message], suspects)
        logger.warning(f"[ReclassCheckpointer] {message}")

    def _weights(self, checkpoint: Dict[str, Any], source: str) -> Dict[str, torch.Tensor]:
        """The state dict of a loaded checkpoint as the engine reads it: tensors, no
        ``module.`` prefix, names matched for Caffe2 / ``matching_heuristics`` files, and
        MODEL.RECLASS.ONLY / RENAME applied."""
        state = checkpoint["model"]
        # Every entry is checked before anything converts, matches or loads it, so a value that
        # is not a tensor (a damaged or edited file) is one CheckpointError, model untouched.
        check_state_dict(state, source, allow_empty=not self.model.state_dict())
        self._convert_ndarray_to_tensor(state)
        _strip_prefix_if_present(state, "module.")
        if checkpoint.get("matching_heuristics", False):
            state = self._align_by_name(state, c2=checkpoint.get("__author__") == "Caffe2")
            checkpoint["matching_heuristics"] = False
        return select_and_rename(state, self.reclass.only, self.reclass.rename)

    def _reclass_model_shaped(self, entry: Dict[str, torch.Tensor], name: str, source: str,
                              model_state, layouts, classes) -> Dict[str, torch.Tensor]:
        """A checkpointable holding a copy of the model's weights (an EMA's ``ema_state``),
        mapped as ``model`` is: a source EMA applied to the model must have its rows.

        Raises:
            CombineError: with MODEL.RECLASS.COMBINE, which combines ``model`` only.
        """
        what = f"{source} [{name}]"
        if self.reclass.combine:
            raise CombineError(
                f"{source} holds {name!r}, a copy of the model's weights (an EMA), and "
                "MODEL.RECLASS.COMBINE combines the 'model' weights only. Load without it: "
                "resume_or_load(path, resume=False) loads the model alone (a trainer's EMA then "
                "starts from the combined model).")
        check_state_dict(entry, what)
        self._convert_ndarray_to_tensor(entry)
        _strip_prefix_if_present(entry, "module.")
        entry = select_and_rename(entry, self.reclass.only, self.reclass.rename)
        mapped, _ = reclass_state_dict(entry, model_state, layouts, classes=classes,
                                       mode=self.reclass.mode, seed=self.reclass.seed,
                                       source=what)
        logger.info(f"[ReclassCheckpointer] {what}: the model's class tensors in it mapped as "
                    "the model's.")
        return mapped

    def _new_class_examples(self) -> Optional[Tuple[List[dict], Optional[List[str]], float]]:
        """(dataset dicts, their class names, seconds to load them) when this load has new
        thing classes for NEW_CLASS_INIT relative / imprint to initialise, else None.

        Raises:
            ConfigError: examples are needed but the checkpointer has none.
            DatasetError: the datasets fail to load.
        """
        space = self.report.spaces.get(THING)
        # Only where classes are mapped: MODE reinit asks for the head's init for every class.
        if self.reclass.new_class_init == "head" or space is None or space.resolution != "map" \
                or not space.mapping.new:
            return None
        unsupported = unsupported_reason(self.model)
        if unsupported:
            # Known before anything is read or loaded: the mapped load goes on with head init.
            log = logger.info if self.reclass.new_class_init == "auto" else logger.warning
            log(f"[ReclassCheckpointer] MODEL.RECLASS.NEW_CLASS_INIT "
                f"{self.reclass.new_class_init}: {unsupported} for "
                f"{', '.join(space.mapping.new)}.")
            self._head_init(space, unsupported)
            return None
        if self.examples is None and self.reclass.new_class_init == "auto":
            self._head_init(space, "no labelled examples were given (DATASETS.TRAIN is empty); "
                            "head init")
            return None
        if self.examples is None:
            raise ConfigError(
                f"MODEL.RECLASS.NEW_CLASS_INIT is {self.reclass.new_class_init!r}, which reads "
                f"labelled examples of the new classes ({', '.join(space.mapping.new)}), but "
                "there are none: set DATASETS.TRAIN (or pass ReclassCheckpointer(..., "
                "examples=NewClassExamples(...))), or use NEW_CLASS_INIT head.")
        t0 = time.perf_counter()
        dicts, names = self.examples.load()
        return dicts, names, time.perf_counter() - t0

    def _head_init(self, space, reason: str) -> None:
        """Report every new thing class as keeping the head's init, for ``reason``."""
        self.report.new_classes = NewClassReport(
            self.reclass.new_class_init, self.reclass.init_images, self.reclass.seed,
            classes=[NewClassInit(name, j, "head", reason=reason)
                     for j, (name, index) in enumerate(zip(space.mapping.target,
                                                           space.mapping.source_index))
                     if index is None])

    def _init_new_classes(self, source_state: Dict[str, Any], dicts: List[dict],
                          names: Optional[List[str]], seconds_dataset: float) -> None:
        """Initialise the new thing classes of the loaded model from ``dicts``' examples."""
        r, examples = self.reclass, self.examples
        entries, report = init_new_classes(
            self.model, dicts, self.report.spaces[THING].mapping, source_state,
            method=r.new_class_init, max_images=r.init_images, seed=r.seed,
            # Without target names the model's classes are the datasets' ids, in order.
            dataset_classes=names if r.target_classes else None,
            augmentations=examples.augmentations, image_format=examples.image_format,
            image_roots=examples.roots())
        apply_new_class_entries(self.model, entries)
        report.seconds_dataset = seconds_dataset
        report.seconds += seconds_dataset
        self.report.new_classes = report

    def _further_checkpoint(self, path: str) -> SourceCheckpoint:
        """A checkpoint of MODEL.RECLASS.COMBINE, read as the loaded one is.

        Raises:
            CheckpointError: it is missing or not a checkpoint.
            CombineError: it stores no class names (combining goes by names).
        """
        checkpoint = self._load_file(
            existing_local_path(path, self.path_manager, "MODEL.RECLASS.COMBINE"))
        stored = stored_classes(checkpoint, source=path)
        if not stored:
            raise CombineError(
                f"MODEL.RECLASS.COMBINE names {path}, which stores no class names, and combining "
                "goes by names. Store them with `d2-reclass convert "
                f"{path} --out named.pth --classes A,B --source-classes A,B`, or combine on the "
                f"command line: `d2-reclass combine ... {path} --names {path}=A,B`.")
        return SourceCheckpoint(self._weights(checkpoint, path), {
            THING: stored.get("thing_classes"), STUFF: stored.get("stuff_classes")}, path)

    def _class_specs(self, stored: Dict[str, List[str]]) -> Dict[str, ClassSpec]:
        """Per class space, what is known of the checkpoint's and the model's classes."""
        r = self.reclass
        thing_source, thing_what = self._source(stored, "thing", r.source_classes)
        stuff_source, stuff_what = self._source(stored, "stuff", r.source_stuff_classes)
        data_classes = self._data_classes()
        thing_target = r.target_classes
        if r.keep_source_classes and thing_target is None and thing_source:
            # The Python API's form of KEEP_SOURCE_CLASSES: no target resolved from a config.
            # A class that no annotation uses is never added (labelled=True).
            thing_target = kept_target_classes(thing_source, [self._data_classes(labelled=True)])
        # One CLASS_MAP for both spaces: each entry applies where its target class is.
        class_map = class_map_by_space(r.class_map, {THING: thing_target,
                                                     STUFF: r.target_stuff_classes})
        return {
            THING: ClassSpec(thing_source, thing_target, class_map[THING], thing_what,
                             "MODEL.RECLASS.TARGET_CLASSES", known=data_classes),
            STUFF: ClassSpec(stuff_source, r.target_stuff_classes, class_map[STUFF], stuff_what,
                             "MODEL.RECLASS.TARGET_STUFF_CLASSES"),
        }

    def _data_classes(self, labelled: bool = False) -> List[str]:
        """The thing classes the training data names (each dataset's own, before mapping; with
        ``labelled``, only those that at least one annotation uses).

        Only registered datasets are asked: this is what the data knows of the class names, and
        an example dataset that is not registered fails where its examples are read (or is never
        read, when the model's new classes cannot use examples)."""
        if self.examples is None:
            return []
        if self.examples.class_names is not None:
            return list(self.examples.class_names)
        return union_classes([labelled_classes(name) if labelled else dataset_classes(name) or []
                              for name in self.examples.datasets
                              if name in DatasetCatalog.list()])

    def _source(self, stored: Dict[str, List[str]], kind: str, explicit):
        """(names, what) of the loaded checkpoint's classes (:func:`source_classes`)."""
        return source_classes(stored, kind, explicit, self.reclass.source_dataset,
                              resuming=self._resuming)

    def _align_by_name(self, state: Dict[str, torch.Tensor], c2: bool) -> Dict[str, torch.Tensor]:
        # detectron2's heuristics drop any pair whose shapes differ; let class-dependent keys
        # pair by name alone so the engine, not the heuristics, decides what to do with them.
        # Their result is a plain dict, without _metadata, under stock too: the checkpoint's
        # module names are not the model's, so no module sees a version either way.
        model_state: Dict[str, Any] = dict(self.model.state_dict())
        for lay in find_layouts(self.model):
            model_state[lay.key] = SimpleNamespace(shape=_AnyShape(model_state[lay.key].shape))
        return align_and_update_state_dicts(model_state, state, c2_conversion=c2)

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Save as DetectionCheckpointer does, plus the model's class names (CLASSES_KEY)."""
        classes = {}
        if self.reclass.target_classes:
            classes["thing_classes"] = list(self.reclass.target_classes)
        if self.reclass.target_stuff_classes:
            classes["stuff_classes"] = list(self.reclass.target_stuff_classes)
        if classes:
            kwargs.setdefault(CLASSES_KEY, classes)
        super().save(name, **kwargs)


def _check_no_options_as_keywords(checkpointables: Dict[str, Any]) -> None:
    """Refuse a ReclassOptions field passed as a keyword (``mode="map"``): DetectionCheckpointer
    takes every extra keyword for a checkpointable, and fvcore's error would not say why."""
    options = {f.name for f in dataclasses.fields(ReclassOptions)}
    for name, value in checkpointables.items():
        if name in options and not callable(getattr(value, "state_dict", None)):
            raise ConfigError(
                f"ReclassCheckpointer(..., {name}={value!r}): the reclass options are one "
                f"keyword, reclass=ReclassOptions({name}={value!r}); any other keyword is a "
                "checkpointable (an object with state_dict()), as for DetectionCheckpointer.")


def _model_shaped(checkpoint: Dict[str, Any], names: Sequence[str], layouts) -> List[str]:
    """The entries among ``names`` (the checkpointables being loaded) that hold the model's own
    class tensors by name, as a d2go-style EMA's ``ema_state`` does: {parameter name: tensor}."""
    keys = {lay.key for lay in layouts}
    found = []
    for name in names:
        entry = checkpoint.get(name)
        if name != "model" and isinstance(entry, dict) and any(
                isinstance(k, str) and k.replace("module.", "", 1) in keys for k in entry):
            found.append(name)
    return found


def _warn_unrecognised(report: ReclassReport, source: str) -> None:
    listing = ", ".join(f"{t.key} {t.checkpoint_shape} -> {t.model_shape}"
                        for t in report.unrecognised[:6])
    more = f", ... ({len(report.unrecognised)} in all)" if len(report.unrecognised) > 6 else ""
    logger.warning(
        f"[ReclassCheckpointer] {len(report.unrecognised)} tensors of {source} have another shape "
        f"than the model's and no class layout recognises them: {listing}{more}. They are "
        "skipped, as stock DetectionCheckpointer skips them. If one is a class head, register "
        "its layout (d2_reclass.register_layout) to map it by class name.")


def _warn_opaque(report: ReclassReport, source: str) -> None:
    """Say which tensors were re-initialised because their class order is unknown."""
    keys = [t.key for t in report.tensors if t.action == "fresh" and "order unknown" in t.layout]
    if keys:
        logger.warning(
            f"[ReclassCheckpointer] {source}: {', '.join(keys)} re-initialised with the head's "
            "init: each grows by several entries per class (found by the probe), and which "
            "entry is which class's is unknown, so its trained rows cannot follow the class "
            "names. Register its layout (d2_reclass.register_layout; docs/api.md) to map it.")


def _without_suffix(state: Any, suffix: str) -> Any:
    """``state`` without the entries detectron2 drops by name (keys ending in ``suffix``), as
    detectron2 drops them before its own type check; anything but a dict is returned as it is,
    for :func:`check_state_dict` to refuse. A plain dict, as detectron2's: Caffe2 and pycls
    files carry no module versions, and stock's copy keeps none either."""
    if not isinstance(state, dict):
        return state
    return {k: v for k, v in state.items() if not (isinstance(k, str) and k.endswith(suffix))}


def _warn_unasked_reinit(report: ReclassReport, source: str) -> None:
    """MODE auto re-initialises a class space whose names are unknown on one side: say so, since
    what the checkpoint knew about the classes the model keeps is then lost."""
    for space in (THING, STUFF):
        fitted = report.spaces.get(space)
        if fitted is None or fitted.resolution != "reinit":
            continue
        key = "SOURCE_CLASSES" if space == THING else "SOURCE_STUFF_CLASSES"
        logger.warning(
            f"[ReclassCheckpointer] {source}: every {space} class row is re-initialised "
            f"({fitted.num_source} -> {fitted.num_target} classes), because the {space} class "
            "names of the checkpoint or of the model are unknown. To keep the rows of the "
            f"classes the two share, give both: MODEL.RECLASS.{key} or SOURCE_DATASET for the "
            "checkpoint (or CLASS_MAP 'target=INDEX'), and the model's target classes or "
            "DATASETS.TRAIN; MODE reinit does this on purpose, without this warning.")


def _warn_non_finite(state: Dict[str, torch.Tensor], layouts, source: str) -> None:
    for key in sorted({lay.key for lay in layouts}):
        value = state.get(key)
        if value is not None and value.is_floating_point() and not _all_finite(value):
            logger.warning(
                f"[ReclassCheckpointer] {key} in {source} holds NaN or Inf values; the "
                "checkpoint is damaged there and the model will predict garbage for it."
            )


def _all_finite(value: torch.Tensor) -> bool:
    """Whether every entry is finite. A sum is NaN or infinite whenever an entry is, and costs
    a twentieth of ``isfinite(value).all()`` on a 1,203-class box regressor; only a sum that
    overflows from finite entries needs the full check."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())
