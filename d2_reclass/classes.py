"""Class lists and name-based class mapping.

A :class:`ClassMapping` says, for every target class, which source class its rows are copied
from, which source classes they are merged from, or that it is new. Names match after
normalising case, spaces, ``_`` and ``-``; explicit ``"target=source"`` entries take precedence
over name matches, and ``"target=a+b"`` merges. When several checkpoints are combined, each
target class takes its rows from the first checkpoint that knows it.
"""
import difflib
import functools
import logging
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from .entries import SourceIndex, source_parts
from .errors import ClassListError

__all__ = [
    "ClassMapping",
    "build_class_mapping",
    "check_class_list",
    "class_list_difference",
    "class_name_problem",
    "close_names",
    "normalize_class_name",
    "pick_source_classes",
    "shown_classes",
    "union_classes",
]

logger = logging.getLogger(__name__)

# How alike (difflib's ratio, on normalised names) a new target class and a source class that
# nothing maps from must be for the new class to be taken for a misspelling of it: at
# _TYPO_RATIO (one typo in most names) mapping refuses; at _CLOSE_RATIO (about two edits) it
# refuses too unless the data names the class (then it is a real new class: mapping goes on
# with a warning and the report flags the pair). CLASS_MAP "name=" declares a class new.
_TYPO_RATIO = 0.85
_CLOSE_RATIO = 0.75


#: ``_`` and ``-`` as spaces, for :func:`normalize_class_name`.
_SEPARATORS = str.maketrans("_-", "  ")


def normalize_class_name(name: str) -> str:
    """The form used to compare class names: lower case, ``_``/``-`` as spaces, single spaces.

    Raises:
        ClassListError: ``name`` is not a string (a class list that skipped
            :func:`class_name_problem`, e.g. a COCO category whose name is null).
    """
    if not isinstance(name, str):
        raise ClassListError(f"Class name {name!r} is not a string; {_NAMES_ARE_STRINGS}")
    return _normalized(name)


# Cached: one load compares each name of a class list about ten times (checks, matching, the
# report), which at LVIS's 1,203 classes made the normalising a tenth of the load's own cost.
# Behind the type check: an unhashable "name" (a list in a damaged json) is our error, not
# the cache's TypeError.
@functools.lru_cache(maxsize=16384)
def _normalized(name: str) -> str:
    return " ".join(name.translate(_SEPARATORS).lower().split())


_NAMES_ARE_STRINGS = "class names are non-empty strings."


def class_name_problem(name: object) -> Optional[str]:
    """Why ``name`` cannot be a class name, in a few words ("is null", "is the number 5 (not a
    string)", "is empty"), or None when it can: a string that is not empty once normalised
    (one made only of spaces, ``_`` and ``-`` is empty too)."""
    if name is None:
        return "is null (no name)"
    if isinstance(name, bool) or not isinstance(name, (str, int, float)):
        return f"is {name!r}, not a string"
    if not isinstance(name, str):
        return f"is the number {name!r}, not a string (write it quoted: \"{name}\")"
    if not normalize_class_name(name):
        return f"is {name!r}, which is empty once spaces, '_' and '-' are dropped"
    return None


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
        if class_name_problem(name):
            raise ClassListError(f"{what}[{i}] is {name!r}; class names must be non-empty strings.")
        key = normalize_class_name(name)
        if key in seen:
            raise ClassListError(
                f"{what} names the class {name!r} twice (as {seen[key]!r} and {name!r}); "
                "each class must appear once."
            )
        seen[key] = name
    return classes


def shown_classes(classes: Sequence[object], most: int = 8, noun: str = "classes") -> str:
    """A class list for a message: whole up to ``most`` names, else its first ``most`` names
    and its length, "(1000 classes)" (a message about a 1,000-category file stays short)."""
    if len(classes) <= most:
        return str(list(classes))
    return f"[{', '.join(map(repr, classes[:most]))}, ... ({len(classes)} {noun})]"


def close_names(name: str, choices: Iterable[str], cutoff: float) -> List[str]:
    """Up to 3 of ``choices`` whose normalised names are at least ``cutoff`` alike, best first."""
    return _close_names(name, {normalize_class_name(c): c for c in choices}, cutoff)


def _close_names(name: str, by_norm: Dict[str, str], cutoff: float) -> List[str]:
    """:func:`close_names` among choices given as ``{normalised name: name}``."""
    close = difflib.get_close_matches(normalize_class_name(name), list(by_norm), n=3, cutoff=cutoff)
    return [by_norm[c] for c in close]


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """' Did you mean ...?' naming the closest of ``choices``, or '' if none is close."""
    return _did_you_mean(close_names(name, choices, cutoff))


def _did_you_mean(close: Sequence[str]) -> str:
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
    """Where each target class takes its entries from.

    Attributes:
        source (tuple[str] or None): the checkpoint's classes, None if only their count is known.
        target (tuple[str]): the model's classes.
        source_index (tuple): for each target class, a source class index whose entries it
            copies (several targets may copy one source class: a split), a tuple of indices
            whose entries it merges (by each head's rule, see :mod:`d2_reclass.layouts`), or
            None for a class no source knows (fresh entries).
        num_source (int): number of source classes.
        close (tuple[tuple[str, str]]): (new target class, dropped source class) pairs whose
            names are close enough to be one class spelt two ways; mapping kept them apart.
        checkpoint (tuple[int]): when combining checkpoints, for each target class the one its
            indices refer to: 0 the first (``source``), i the i-th of ``more``. Empty: one
            checkpoint.
        more (tuple[tuple[str]]): the class names of the further checkpoints, in order.
    """

    source: Optional[Tuple[str, ...]]
    target: Tuple[str, ...]
    source_index: Tuple[SourceIndex, ...]
    num_source: int
    close: Tuple[Tuple[str, str], ...] = ()
    checkpoint: Tuple[int, ...] = ()
    more: Tuple[Tuple[str, ...], ...] = ()

    def checkpoint_of(self, j: int) -> int:
        """The checkpoint target class ``j`` takes its entries from."""
        return self.checkpoint[j] if self.checkpoint else 0

    def num_classes_of(self, checkpoint: int) -> int:
        return len(self.more[checkpoint - 1]) if checkpoint else self.num_source

    def source_name(self, i: int, checkpoint: int = 0) -> str:
        names = self.more[checkpoint - 1] if checkpoint else self.source
        return names[i] if names is not None else f"#{i}"

    def parts(self, j: int) -> Tuple[int, ...]:
        """The source class indices target class ``j`` takes its entries from."""
        return source_parts(self.source_index[j])

    @property
    def kept(self) -> List[Tuple[str, str, int]]:
        """(target name, source name, source index) for every target class copied from one
        source class."""
        return [(t, self.source_name(p[0], self.checkpoint_of(j)), p[0])
                for j, (t, p) in enumerate(self._targets()) if len(p) == 1]

    @property
    def merged(self) -> List[Tuple[str, Tuple[str, ...], Tuple[int, ...]]]:
        """(target name, source names, source indices) for every merged target class."""
        return [(t, tuple(self.source_name(i, self.checkpoint_of(j)) for i in p), p)
                for j, (t, p) in enumerate(self._targets()) if len(p) > 1]

    @property
    def split(self) -> List[Tuple[str, Tuple[str, ...]]]:
        """(source name, target names) for every source class copied into several targets."""
        copies: Dict[Tuple[int, int], List[str]] = {}
        for j, (t, p) in enumerate(self._targets()):
            if len(p) == 1:
                copies.setdefault((self.checkpoint_of(j), p[0]), []).append(t)
        return [(self.source_name(i, c), tuple(ts)) for (c, i), ts in copies.items()
                if len(ts) > 1]

    @property
    def new(self) -> List[str]:
        return [t for t, p in self._targets() if not p]

    @property
    def dropped(self) -> List[str]:
        """Classes of the (first) checkpoint that no target class takes entries from."""
        return self.unused(0)

    def unused(self, checkpoint: int) -> List[str]:
        """Classes of ``checkpoint`` that no target class takes entries from."""
        checkpoints = self.checkpoint or (0,) * len(self.target)
        used = {i for c, index in zip(checkpoints, self.source_index) if c == checkpoint
                for i in source_parts(index)}
        names = self.more[checkpoint - 1] if checkpoint else self.source
        return [names[i] if names is not None else f"#{i}"
                for i in range(self.num_classes_of(checkpoint)) if i not in used]

    @property
    def is_identity(self) -> bool:
        return self.source_index == tuple(range(self.num_source)) and not self.more

    def _targets(self) -> List[Tuple[str, Tuple[int, ...]]]:
        return [(t, source_parts(index)) for t, index in zip(self.target, self.source_index)]

    def to_dict(self) -> dict:
        out = {
            "source": list(self.source) if self.source is not None else None,
            "target": list(self.target),
            "kept": [{"target": t, "source": s, "source_index": i} for t, s, i in self.kept],
            "merged": [{"target": t, "sources": list(s), "source_indices": list(i)}
                       for t, s, i in self.merged],
            "split": [{"source": s, "targets": list(ts)} for s, ts in self.split],
            "new": self.new,
            "dropped": self.dropped,
            "close": [{"target": t, "source": s} for t, s in self.close],
        }
        if self.more:
            out["checkpoint"] = [self.checkpoint_of(j) for j in range(len(self.target))]
            out["more"] = [{"source": list(names), "dropped": self.unused(c + 1)}
                           for c, names in enumerate(self.more)]
        return out


class _SourceLists:
    """The class lists of the source checkpoints, for finding a class by name: the first
    checkpoint that knows it wins (for a merge, the first that knows every part)."""

    def __init__(self, lists: Sequence[Tuple[Optional[Sequence[str]], str]], num_source: int):
        self.names = [names for names, _ in lists]
        self.whats = [what for _, what in lists]
        self.num_source = num_source
        self.index = [{normalize_class_name(n): i for i, n in enumerate(names or ())}
                      for names in self.names]

    def knowing(self, name: str) -> Dict[int, int]:
        """{checkpoint: class index} of every checkpoint that has a class called ``name``; a
        checkpoint without names takes indices (``"15"``) instead."""
        key = normalize_class_name(name)
        found = {c: idx[key] for c, idx in enumerate(self.index) if key in idx}
        if not found and self.names[0] is None and name.isdigit() and \
                int(name) < self.num_source:
            found[0] = int(name)
        return found

    def find(self, name: str) -> Optional[Tuple[int, int]]:
        """(checkpoint, index) of ``name`` in the first checkpoint that knows it."""
        key = normalize_class_name(name)
        for c, idx in enumerate(self.index):  # the first that knows it: no dict per class
            if key in idx:
                return c, idx[key]
        found = self.knowing(name)  # a checkpoint without names: the index as a name
        return min(found.items()) if found else None

    def described(self) -> str:
        return " or ".join(self.whats)

    def all_names(self) -> List[str]:
        return [n for names in self.names for n in names or ()]

    def resolve(self, target: str, source: str) -> Tuple[int, SourceIndex]:
        """(checkpoint, source index) of CLASS_MAP's ``"target=source"``, where ``source`` is
        one class or ``"a+b+c"``: classes merged into ``target``, all from one checkpoint.

        A source that names a class as a whole is that class, ``+`` or not.

        Raises:
            ClassListError: an unknown class, an empty or repeated part, or a merge of
                classes that no one checkpoint knows together.
        """
        whole = self.find(source)
        if whole is not None:
            return whole
        parts = [p.strip() for p in source.split("+")]
        if len(parts) == 1:
            hint = did_you_mean(source, self.all_names()) if self.names[0] is not None else (
                f" The source has no class names; name source classes by index "
                f"0..{self.num_source - 1}.")
            raise ClassListError(
                f"CLASS_MAP maps {target!r} to the source class {source!r}, which is not in "
                f"{self.described()}." + hint)
        bad = [p for p in parts if not p] or [p for i, p in enumerate(parts)
                                              if normalize_class_name(p) in map(
                                                  normalize_class_name, parts[:i])]
        if bad:
            raise ClassListError(
                f"CLASS_MAP entry '{target}={source}' merges an empty or repeated class "
                f"({bad[0]!r}); write each source class once, e.g. 'vehicle=car+truck+bus'.")
        known = []
        for part in parts:
            found = self.knowing(part)
            if not found:
                raise ClassListError(
                    f"CLASS_MAP merges {part!r} into {target!r}, but {part!r} is not in "
                    f"{self.described()}." + did_you_mean(part, self.all_names())
                    + " Every class after '=' must be a source class.")
            known.append(found)
        together = sorted(set.intersection(*(set(found) for found in known)))
        if not together:
            where = "; ".join(f"{p}: {', '.join(self.whats[c] for c in sorted(found))}"
                              for p, found in zip(parts, known))
            raise ClassListError(
                f"CLASS_MAP merges {', '.join(map(repr, parts))} into {target!r}, but no one "
                f"checkpoint knows them all ({where}). A merged class takes its entries from one "
                "checkpoint: merge classes of the same checkpoint.")
        c = together[0]
        return c, tuple(found[c] for found in known)


def build_class_mapping(
    source: Optional[Sequence[str]],
    target: Sequence[str],
    class_map: Union[None, Sequence[str], Dict[str, str]] = None,
    *,
    num_source: Optional[int] = None,
    source_what: str = "source classes",
    target_what: str = "target classes",
    more: Sequence[Tuple[Sequence[str], str]] = (),
    known: Iterable[str] = (),
) -> ClassMapping:
    """Match target classes to source classes by name.

    Args:
        source: source class names, or None when the checkpoint has none (then ``class_map``
            may name source classes by index, e.g. ``"cat=15"``).
        target: target class names.
        class_map: ``"target=source"`` entries (or a dict) that override name matching;
            ``"target=a+b+c"`` merges source classes into one target, and several targets
            naming one source split it.
        num_source: the number of source classes; required when ``source`` is None.
        source_what, target_what: how errors name the two lists (a config key or a file).
        more: (class names, how errors name them) of further checkpoints, for combining:
            every target class takes its entries from the first checkpoint that knows it (for
            a merge, the first that knows all its parts).
        known: class names the data has (the training datasets' classes), which are real
            classes even when close to a source class.

    Returns:
        The mapping. A new target class in ``known`` whose name is close to a source class
        that nothing maps from (about two edits) is logged as a warning and listed in
        ``close``.

    Raises:
        ClassListError: on malformed lists, a class map naming an unknown class (with
            close-match suggestions), a merge no one checkpoint can make, a new target class
            one typo away from a source class that nothing maps from, or one about two edits
            away that ``known`` lacks too (not declared new with CLASS_MAP ``'name='``).
    """
    target = check_class_list(target, target_what)
    if source is not None:
        source = check_class_list(source, source_what)
        num_source = len(source)
    elif num_source is None:
        raise ClassListError(f"{source_what} are unknown; give their names or their count.")
    lists = _SourceLists([(source, source_what)] + [
        (check_class_list(names, what), what) for names, what in more], num_source)

    tgt_by_norm = {normalize_class_name(t): i for i, t in enumerate(target)}
    found = [lists.find(t) if source is not None else None for t in target]
    checkpoint = [f[0] if f else 0 for f in found]
    index: List[SourceIndex] = [f[1] if f else None for f in found]

    declared_new = set()
    for tname, sname in _parse_class_map(class_map).items():
        ti = tgt_by_norm.get(normalize_class_name(tname))
        if ti is None:
            raise ClassListError(
                f"CLASS_MAP names the target class {tname!r}, which is not in {target_what}."
                + did_you_mean(tname, target)
            )
        if not sname:
            index[ti], checkpoint[ti] = None, 0
            declared_new.add(ti)
            continue
        checkpoint[ti], index[ti] = lists.resolve(tname, sname)

    mapping = ClassMapping(
        source=source, target=target, source_index=tuple(index), num_source=num_source,
        checkpoint=tuple(checkpoint) if more else (),
        more=tuple(names for names in lists.names[1:]))
    if source is None:
        return mapping
    unused = [n for c in range(1 + len(mapping.more)) for n in mapping.unused(c)]
    close = _check_new_classes(target, index, declared_new, unused, lists.described(),
                               target_what, {normalize_class_name(n) for n in known})
    return replace(mapping, close=close)


def _check_new_classes(
    target: Sequence[str],
    index: Sequence[SourceIndex],
    declared_new: Set[int],
    unused: Sequence[str],
    source_what: str,
    target_what: str,
    known: Set[str],
) -> Tuple[Tuple[str, str], ...]:
    """Refuse or flag new target classes whose names are close to a source class left unused.

    Mapping would otherwise silently throw away what the checkpoint knew about that class, and
    train a misspelt class from scratch. Classes declared new with ``CLASS_MAP 'name='`` are
    not checked; ``known`` (normalised names the data has) are real classes, only flagged.

    Returns:
        The (target, source) pairs close enough to warn about (each logged as a warning).

    Raises:
        ClassListError: a new class is one typo away from an unused source class, or about
            two edits away and not in ``known``.
    """
    close: List[Tuple[str, str]] = []
    if not unused:  # nothing dropped: no new class can be a misspelt one
        return ()
    by_norm = {normalize_class_name(c): c for c in unused}  # once, not once per new class
    for ti, (tname, si) in enumerate(zip(target, index)):
        if si is not None or ti in declared_new:
            continue
        hint = _did_you_mean(_close_names(tname, by_norm, _TYPO_RATIO))
        if hint:
            raise ClassListError(
                f"{target_what} names {tname!r}, which is not in {source_what}.{hint} "
                f"Fix the name, or declare it new on purpose with CLASS_MAP '{tname}='."
            )
        near = _close_names(tname, by_norm, _CLOSE_RATIO)
        if near and normalize_class_name(tname) not in known:
            raise ClassListError(
                f"{target_what} names {tname!r}, which is in neither {source_what} nor the "
                f"training data, while the close name {near[0]!r} is in {source_what}. Fix the "
                f"name (CLASS_MAP '{tname}={near[0]}' maps it), or declare it new on purpose "
                f"with CLASS_MAP '{tname}='."
            )
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


def union_classes(class_lists: Sequence[Sequence[str]]) -> List[str]:
    """Every class of ``class_lists``, once (names compared normalised), in order of appearance."""
    seen, out = set(), []
    for names in class_lists:
        for name in names:
            if normalize_class_name(name) not in seen:
                seen.add(normalize_class_name(name))
                out.append(name)
    return out
