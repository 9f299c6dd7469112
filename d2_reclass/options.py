"""ReclassOptions: everything that decides how a checkpoint's class heads are fitted, as one value.

The same options come from ``MODEL.RECLASS``
(:func:`~d2_reclass.integration.config.options_from_config`), from a LazyConfig's ``reclass``
dict (:func:`~d2_reclass.integration.lazy.lazy_reclass_options`), or from code. A plain value:
reading configs and datasets into it belongs to the integration. :class:`ReclassCheckpointer`
takes them as one keyword, ``reclass=``, so that none of them can shadow a checkpointable of
the same name (``DetectionCheckpointer(model, dir, mode=...)`` saves an object called ``mode``).

Values are checked when the options are made, before any model, data loader or file exists:
a typo in a mode or a malformed class map is one :class:`ConfigError` naming the key; a
SOURCE_DATASET that names no registered dataset, when the options are read from a config or
handed to a checkpointer (the catalog is the integration's to ask).
"""
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .classes import _parse_class_map, check_class_list, did_you_mean
from .errors import ConfigError

__all__ = ["MODES", "NEW_CLASS_INITS", "PRESERVE_METHODS", "ReclassOptions",
           "check_keep_source_classes", "check_option_values", "config_key", "preserve_method"]

#: The values of ``MODEL.RECLASS.MODE``; see :mod:`d2_reclass.engine.surgery`.
MODES = ("auto", "map", "reinit", "strict")
#: The values of ``MODEL.RECLASS.NEW_CLASS_INIT``; see :mod:`d2_reclass.new_classes`.
NEW_CLASS_INITS = ("auto", "head", "relative", "imprint")

#: The values of ``MODEL.RECLASS.PRESERVE``; see :mod:`d2_reclass.preserve`.
PRESERVE_METHODS = ("auto", "pseudo_labels", "distill", "frozen_rows", "none")

_CLASS_LISTS = ("source_classes", "target_classes", "source_stuff_classes",
                "target_stuff_classes")


def config_key(option: str) -> str:
    """The config key of an option: ``"class_map"`` -> ``"MODEL.RECLASS.CLASS_MAP"``."""
    return f"MODEL.RECLASS.{option.upper()}"


def preserve_method(preserve: str, keep_source_classes: bool) -> str:
    """The preservation method that runs: ``preserve``, with ``auto`` resolved (pseudo-labels
    when the source classes are kept, else none)."""
    if preserve != "auto":
        return preserve
    return "pseudo_labels" if keep_source_classes else "none"


def check_option_values(values: Dict[str, Any], name: Callable[[str], str] = config_key) -> None:
    """Raise one clear error for the first option value that cannot work.

    Args:
        values: option name (lower case, as :class:`ReclassOptions` fields) -> value; options
            not present are not checked.
        name: how messages name an option (a config key by default).

    Raises:
        ConfigError: a mode, new-class init, image count, seed, prefix list, rename or flag of
            the wrong kind; a source average without a method that has a teacher.
        ClassListError: a malformed class list or class map entry.
    """
    mode = values.get("mode", "auto")
    if mode not in MODES:
        raise ConfigError(
            f"{name('mode')} is {mode!r}; use one of {', '.join(MODES)}."
            + did_you_mean(str(mode), MODES))
    init = values.get("new_class_init", "auto")
    if init not in NEW_CLASS_INITS:
        raise ConfigError(
            f"{name('new_class_init')} is {init!r}; use one of {', '.join(NEW_CLASS_INITS)}."
            + did_you_mean(str(init), NEW_CLASS_INITS))
    images = values.get("init_images", 16)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError(f"{name('init_images')} is {images!r}; it must be an integer >= 1 "
                          "(images read per new class).")
    seed = values.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{name('seed')} is {seed!r}; it must be an integer.")
    preserve = values.get("preserve", "auto")
    if preserve not in PRESERVE_METHODS:
        raise ConfigError(
            f"{name('preserve')} is {preserve!r}; use one of {', '.join(PRESERVE_METHODS)}."
            + did_you_mean(str(preserve), PRESERVE_METHODS))
    for option, low, high in (("pseudo_label_score", 0.0, 1.0), ("distill_weight", 0.0, None),
                              ("source_average", 0.0, 1.0)):
        value = values.get(option, 0.5)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low \
                or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(f"{name(option)} is {value!r}; it must be a number {bound}.")
    method = preserve_method(preserve, bool(values.get("keep_source_classes", False)))
    if values.get("source_average", 0.0) > 0 and method not in ("pseudo_labels", "distill"):
        # Silently skipped, the user would take an unaveraged model for an averaged one.
        raise ConfigError(
            f"{name('source_average')} is {values['source_average']!r}, but it averages with "
            f"the source model that PRESERVE pseudo_labels or distill load as their teacher, "
            f"and the method is {method!r}"
            + (" (every entry but the new classes' stays the source's anyway)"
               if method == "frozen_rows" else "")
            + f". Set {name('keep_source_classes')} True (PRESERVE auto is then "
            f"pseudo_labels), or {name('source_average')} 0.")
    if values.get("keep_source_classes", False) and values.get("mode", "auto") == "reinit":
        check_keep_source_classes(True, "reinit", (), name=name)
    for option in ("trust_pickle", "combine_allow_different_weights", "keep_source_classes",
                   "teacher_cache"):
        flag = values.get(option, False)
        if not isinstance(flag, bool):
            raise ConfigError(f"{name(option)} is {flag!r}; use True or False.")
    dataset = values.get("source_dataset", "")
    if not isinstance(dataset, str):
        raise ConfigError(f"{name('source_dataset')} is {dataset!r}; give a dataset name.")
    for option in ("only", "rename", "class_map", "combine", *_CLASS_LISTS):
        value = values.get(option) or ()
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f"{name(option)} is {value!r}; it must be a list of strings, e.g. "
                f"{name(option)} [\"a\", \"b\"] in YAML.")
    for entry in values.get("rename") or ():
        old, sep, _ = entry.partition("=")
        if not sep or not old:
            raise ConfigError(
                f"{name('rename')} entry {entry!r} is not of the form 'old_prefix=new_prefix' "
                "(e.g. 'detector.=' to drop a wrapper's prefix).")
    _parse_class_map(values.get("class_map"))
    for option in _CLASS_LISTS:
        if values.get(option):
            check_class_list(values[option], name(option))


def check_keep_source_classes(keep: bool, mode: str, target_classes: Sequence[str],
                              name: Callable[[str], str] = config_key) -> None:
    """Raise when KEEP_SOURCE_CLASSES is combined with an option that contradicts it.

    Raises:
        ConfigError: with MODE reinit (which discards every class row) or with explicit
            TARGET_CLASSES (which KEEP_SOURCE_CLASSES computes).
    """
    if not keep:
        return
    if mode == "reinit":
        raise ConfigError(
            f"{name('keep_source_classes')} keeps what the checkpoint knows of its classes, "
            f"but {name('mode')} reinit starts every class row fresh: use {name('mode')} auto "
            f"(or map), or set {name('keep_source_classes')} False.")
    if target_classes:
        raise ConfigError(
            f"{name('keep_source_classes')} makes the target classes the checkpoint's followed "
            f"by the datasets' new ones, but {name('target_classes')} is also set "
            f"({', '.join(target_classes)}): set one of the two.")


def _strings(value: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    return tuple(value) if value else None


@dataclass(frozen=True)
class ReclassOptions:
    """How a checkpoint's class-dependent tensors are fitted to a model; mirrors MODEL.RECLASS.

    Attributes:
        mode (str): one of :data:`MODES`.
        source_classes, target_classes (tuple[str] or None): thing classes of the checkpoint
            and of the model; None: unknown (source: stored names, then ``source_dataset``).
        source_stuff_classes, target_stuff_classes: the same for semantic heads.
        class_map (tuple[str]): ``"target=source"`` overrides; ``"target="`` declares it new.
        seed (int): seeds fresh entries, with each parameter's name.
        source_dataset (str): a registered dataset naming the checkpoint's classes.
        only, rename (tuple[str]): checkpoint key prefixes to keep / ``"old=new"`` renames.
        trust_pickle (bool): allow full unpickling of files the user trusts.
        new_class_init (str): one of :data:`NEW_CLASS_INITS`: how mapped classes that no source
            class maps to start (see :mod:`d2_reclass.new_classes`); ``auto``: ``imprint``
            where labelled examples are given, else ``head``.
        init_images (int): at most this many labelled images are read per new class.
        combine (tuple[str]): further checkpoints (storing their class names) whose classes
            the model takes where the first checkpoint does not know them.
        combine_allow_different_weights (bool): the combined checkpoints' non-class tensors
            may differ (the first's are used).
        keep_source_classes (bool): the target classes are the checkpoint's, then the new
            ones (:mod:`d2_reclass.data.class_lists`); without target classes, the
            checkpointer takes the checkpoint's, then those of the examples' datasets.
        preserve (str): one of :data:`PRESERVE_METHODS` (:mod:`d2_reclass.preserve`).
        pseudo_label_score, distill_weight, teacher_cache, source_average: as the
            MODEL.RECLASS keys.
    """

    mode: str = "auto"
    source_classes: Optional[Tuple[str, ...]] = None
    target_classes: Optional[Tuple[str, ...]] = None
    source_stuff_classes: Optional[Tuple[str, ...]] = None
    target_stuff_classes: Optional[Tuple[str, ...]] = None
    class_map: Tuple[str, ...] = ()
    seed: int = 0
    source_dataset: str = ""
    only: Tuple[str, ...] = ()
    rename: Tuple[str, ...] = ()
    trust_pickle: bool = False
    new_class_init: str = "auto"
    init_images: int = 16
    combine: Tuple[str, ...] = ()
    combine_allow_different_weights: bool = False
    keep_source_classes: bool = False
    preserve: str = "auto"
    pseudo_label_score: float = 0.5
    distill_weight: float = 1.0
    teacher_cache: bool = True
    source_average: float = 0.0

    def __post_init__(self) -> None:
        # Lists from YAML, OmegaConf or callers become tuples: the options are one frozen value.
        for option in _CLASS_LISTS:
            object.__setattr__(self, option, _strings(getattr(self, option)))
        for option in ("class_map", "only", "rename", "combine"):
            value = getattr(self, option)
            if not isinstance(value, str):
                object.__setattr__(self, option, tuple(value or ()))
        check_option_values({f.name: getattr(self, f.name) for f in fields(self)},
                            name=lambda option: f"reclass option {option!r}")
