"""Class lists and name-based class mapping.

A :class:`ClassMapping` says, for every target class, which source class (if any) its rows are
copied from. Names match after normalising case, spaces, ``_`` and ``-``; explicit
``"target=source"`` entries take precedence over name matches.
"""
import difflib
import logging
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from .errors import ClassListError

__all__ = [
    "ClassMapping",
    "build_class_mapping",
    "check_class_list",
    "class_list_difference",
    "normalize_class_name",
    "pick_source_classes",
]

logger = logging.getLogger(__name__)

# How alike (difflib's ratio, on normalised names) a new target class and a source class that
# nothing maps from must be for the new class to be taken for a misspelling of it: at
# _TYPO_RATIO (one typo in most names) mapping refuses; at _CLOSE_RATIO (about two edits) the
# name may be a real new class, so mapping goes on with a warning and the report flags the pair.
_TYPO_RATIO = 0.85
_CLOSE_RATIO = 0.75


def normalize_class_name(name: str) -> str:
    """The form used to compare class names: lower case, ``_``/``-`` as spaces, single spaces."""
    return " ".join(re.sub(r"[_\-]", " ", name).lower().split())


def check_class_list(classes: Sequence[str], what: str) -> Tuple[str, ...]:
    """Validate a class list and return it as a tuple.

    Raises:
        ClassListError: naming ``what`` (a config key or file) if the list is empty, has an empty
            or non-string name, or two names that are equal after normalisation.
    """
    classes = tuple(classes)
    if not classes:
        raise ClassListError(f"{what} is empty; give at least one class name.")
    seen: Dict[str, str] = {}
    for i, name in enumerate(classes):
        # Names are compared normalised: one made only of spaces, "_" and "-" is empty too.
        if not isinstance(name, str) or not normalize_class_name(name):
            raise ClassListError(f"{what}[{i}] is {name!r}; class names must be non-empty strings.")
        key = normalize_class_name(name)
        if key in seen:
            raise ClassListError(
                f"{what} names the class {name!r} twice (as {seen[key]!r} and {name!r}); "
                "each class must appear once."
            )
        seen[key] = name
    return classes


def _close_names(name: str, choices: Iterable[str], cutoff: float) -> List[str]:
    """Up to 3 of ``choices`` whose normalised names are at least ``cutoff`` alike, best first."""
    by_norm = {normalize_class_name(c): c for c in choices}
    close = difflib.get_close_matches(normalize_class_name(name), list(by_norm), n=3, cutoff=cutoff)
    return [by_norm[c] for c in close]


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """' Did you mean ...?' naming the closest of ``choices``, or '' if none is close."""
    close = _close_names(name, choices, cutoff)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def _parse_class_map(class_map: Union[None, Sequence[str], Dict[str, str]]) -> Dict[str, str]:
    """``{target: source}``; an empty source declares the target class new on purpose."""
    if not class_map:
        return {}
    if isinstance(class_map, dict):
        return {t.strip(): (s or "").strip() for t, s in class_map.items()}
    out = {}
    for entry in class_map:
        target, sep, source = entry.partition("=")
        if not sep or not target.strip():
            raise ClassListError(
                f"CLASS_MAP entry {entry!r} is not of the form 'target=source' "
                "(e.g. 'automobile=car', or 'gadget=' for a class that is new on purpose)."
            )
        out[target.strip()] = source.strip()
    return out


@dataclass(frozen=True)
class ClassMapping:
    """Where each target class comes from.

    Attributes:
        source (tuple[str] or None): the checkpoint's classes, None if only their count is known.
        target (tuple[str]): the model's classes.
        source_index (tuple[int or None]): for each target class, the source index whose rows it
            takes, or None for a class the source never had (its rows are fresh).
        num_source (int): number of source classes.
        close (tuple[tuple[str, str]]): (new target class, dropped source class) pairs whose
            names are close enough to be one class spelt two ways; mapping kept them apart.
    """

    source: Optional[Tuple[str, ...]]
    target: Tuple[str, ...]
    source_index: Tuple[Optional[int], ...]
    num_source: int
    close: Tuple[Tuple[str, str], ...] = ()

    def source_name(self, i: int) -> str:
        return self.source[i] if self.source is not None else f"#{i}"

    @property
    def kept(self) -> List[Tuple[str, str, int]]:
        """(target name, source name, source index) for every target class found in the source."""
        return [
            (t, self.source_name(s), s)
            for t, s in zip(self.target, self.source_index)
            if s is not None
        ]

    @property
    def new(self) -> List[str]:
        return [t for t, s in zip(self.target, self.source_index) if s is None]

    @property
    def dropped(self) -> List[str]:
        used = set(self.source_index)
        return [self.source_name(i) for i in range(self.num_source) if i not in used]

    @property
    def is_identity(self) -> bool:
        return self.source_index == tuple(range(self.num_source))

    def to_dict(self) -> dict:
        return {
            "source": list(self.source) if self.source is not None else None,
            "target": list(self.target),
            "kept": [{"target": t, "source": s, "source_index": i} for t, s, i in self.kept],
            "new": self.new,
            "dropped": self.dropped,
            "close": [{"target": t, "source": s} for t, s in self.close],
        }


def build_class_mapping(
    source: Optional[Sequence[str]],
    target: Sequence[str],
    class_map: Union[None, Sequence[str], Dict[str, str]] = None,
    *,
    num_source: Optional[int] = None,
    source_what: str = "source classes",
    target_what: str = "target classes",
) -> ClassMapping:
    """Match target classes to source classes by name.

    Args:
        source: source class names, or None when the checkpoint has none (then ``class_map``
            may name source classes by index, e.g. ``"cat=15"``).
        target: target class names.
        class_map: ``"target=source"`` entries (or a dict) that override name matching.
        num_source: the number of source classes; required when ``source`` is None.
        source_what, target_what: how errors name the two lists (a config key or a file).

    Returns:
        The mapping. A new target class whose name is close to a source class that nothing
        maps from (about two edits) is logged as a warning and listed in ``close``.

    Raises:
        ClassListError: on malformed lists, a class map naming an unknown class (with
            close-match suggestions), or a new target class one typo away from a source class
            that nothing maps from.
    """
    target = check_class_list(target, target_what)
    if source is not None:
        source = check_class_list(source, source_what)
        num_source = len(source)
    elif num_source is None:
        raise ClassListError(f"{source_what} are unknown; give their names or their count.")

    src_by_norm = {normalize_class_name(s): i for i, s in enumerate(source or ())}
    tgt_by_norm = {normalize_class_name(t): i for i, t in enumerate(target)}
    index: List[Optional[int]] = [src_by_norm.get(normalize_class_name(t)) for t in target]

    declared_new = set()
    for tname, sname in _parse_class_map(class_map).items():
        ti = tgt_by_norm.get(normalize_class_name(tname))
        if ti is None:
            raise ClassListError(
                f"CLASS_MAP names the target class {tname!r}, which is not in {target_what}."
                + did_you_mean(tname, target)
            )
        if not sname:
            index[ti] = None
            declared_new.add(ti)
            continue
        si = src_by_norm.get(normalize_class_name(sname))
        if si is None and sname.isdigit() and int(sname) < num_source and source is None:
            si = int(sname)
        if si is None:
            hint = did_you_mean(sname, source) if source is not None else (
                f" The source has no class names; name source classes by index 0..{num_source - 1}."
            )
            raise ClassListError(
                f"CLASS_MAP maps {tname!r} to the source class {sname!r}, which is not in "
                f"{source_what}." + hint
            )
        index[ti] = si

    close = () if source is None else _check_new_classes(
        source, target, index, declared_new, source_what, target_what)
    return ClassMapping(
        source=source, target=target, source_index=tuple(index), num_source=num_source,
        close=close,
    )


def _check_new_classes(
    source: Sequence[str],
    target: Sequence[str],
    index: Sequence[Optional[int]],
    declared_new: Set[int],
    source_what: str,
    target_what: str,
) -> Tuple[Tuple[str, str], ...]:
    """Refuse or flag new target classes whose names are close to a source class left unused.

    Mapping would otherwise silently throw away what the checkpoint knew about that class.
    Classes declared new with ``CLASS_MAP 'name='`` are not checked.

    Returns:
        The (target, source) pairs close enough to warn about (each logged as a warning).

    Raises:
        ClassListError: a new class is one typo away from an unused source class.
    """
    used = set(index)
    unused = [s for i, s in enumerate(source) if i not in used]
    close = []
    for ti, (tname, si) in enumerate(zip(target, index)):
        if si is not None or ti in declared_new:
            continue
        hint = did_you_mean(tname, unused, cutoff=_TYPO_RATIO)
        if hint:
            raise ClassListError(
                f"{target_what} names {tname!r}, which is not in {source_what}.{hint} "
                f"Fix the name, or declare it new on purpose with CLASS_MAP '{tname}='."
            )
        near = _close_names(tname, unused, _CLOSE_RATIO)
        if near:
            close.append((tname, near[0]))
            logger.warning(
                f"{target_what} names {tname!r}, which is not in {source_what}, so it gets fresh "
                f"rows; the close source class {near[0]!r} maps to nothing and what the "
                f"checkpoint knew about it is dropped. If they are one class, map it with "
                f"CLASS_MAP '{tname}={near[0]}'; if {tname!r} is new on purpose, declare it with "
                f"CLASS_MAP '{tname}='."
            )
    return tuple(close)


def class_list_difference(a: Sequence[str], b: Sequence[str]) -> Optional[str]:
    """How two class lists differ after name normalisation, in a few words; None if they agree."""
    if len(a) != len(b):
        return f"{len(a)} names against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if normalize_class_name(x) != normalize_class_name(y):
            return f"#{i} is {x!r} against {y!r}"
    return None


def pick_source_classes(
    candidates: Sequence[Tuple[Optional[Sequence[str]], str]],
) -> Tuple[Optional[List[str]], str]:
    """The first given class list of ``candidates`` (in order of precedence) and its name.

    Each candidate is ``(names or None, how messages name it)``. A later candidate that was
    given too and differs is not used, and a warning says so: nothing given is dropped
    silently. Returns ``(None, "the source classes")`` when none was given.
    """
    names, what = next(((list(n), w) for n, w in candidates if n), (None, "the source classes"))
    for other, other_what in candidates:
        difference = class_list_difference(names, other) if other and other_what != what \
            else None
        if difference:
            logger.warning(f"Not using {other_what}: {what} comes first and differs from it "
                           f"({difference}).")
    return names, what
