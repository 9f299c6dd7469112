"""Checkpoint keys: copying a state dict with its module versions, and selecting and renaming
keys (``MODEL.RECLASS.ONLY`` / ``RENAME``).

A state dict from ``Module.state_dict()`` is an ``OrderedDict`` whose ``_metadata`` attribute
holds each module's ``version``; ``load_state_dict`` hands every module's entry to its
``_load_from_state_dict``, and modules that convert old formats by version (PointRend's heads,
Mask2Former's ``MaskFormerHead``, ``FrozenBatchNorm2d``) treat a state dict without it as an old
file. ``dict(state)`` or a comprehension drops it: every copy here goes through
:func:`copy_state_dict`.
"""
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, TypeVar

from ..errors import ClassListError, ReclassError

__all__ = ["copy_state_dict", "select_and_rename"]

T = TypeVar("T")


def copy_state_dict(
    state_dict: Mapping[str, T],
    items: Optional[Iterable[Tuple[str, T]]] = None,
    rename: Optional[Callable[[str], str]] = None,
) -> "OrderedDict[str, T]":
    """A new ``OrderedDict`` of ``items`` (default: all of ``state_dict``'s) that carries a
    copy of ``state_dict``'s ``_metadata``, if it has one.

    Args:
        state_dict: the state dict whose module versions the copy keeps.
        items: the (key, value) pairs of the copy, already renamed by the caller.
        rename: applied to every module name in ``_metadata`` (as to the keys); a module name
            is the key prefix without its trailing dot, ``""`` for the root module, which is
            never renamed. Where two names end up equal, the renamed one wins.

    The metadata is copied, never shared: fvcore's prefix strip rewrites it in place.
    """
    out: "OrderedDict[str, T]" = OrderedDict(state_dict.items() if items is None else items)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return out
    kept, renamed = [], []
    for name, entry in metadata.items():
        new = rename(name + ".")[:-1] if rename is not None and name else name
        (kept if new == name else renamed).append((new, entry))
    out._metadata = type(metadata)(kept + renamed)  # type: ignore[attr-defined]
    return out


def select_and_rename(
    state_dict: Mapping[str, T], only: Sequence[str] = (), rename: Sequence[str] = ()
) -> Dict[str, T]:
    """Keep the keys starting with a prefix in ``only`` (all if empty), then apply
    ``"old_prefix=new_prefix"`` renames (the longest matching prefix wins). Returns a new
    ``OrderedDict`` carrying ``state_dict``'s ``_metadata`` (module names renamed as the keys
    are; the entries of modules not selected are kept, as load_state_dict ignores them).

    Raises:
        ReclassError: a prefix in ``only`` or ``rename`` matches no key, or a rename is
            malformed: a typo here would otherwise silently load nothing.
    """
    items = list(state_dict.items())
    if only:
        unused = [p for p in only if not any(k.startswith(p) for k, _ in items)]
        if unused:
            raise ReclassError(
                f"MODEL.RECLASS.ONLY prefix {unused[0]!r} matches no checkpoint key; keys start "
                f"with {sorted({k.split('.')[0] + '.' for k, _ in items})}."
            )
        items = [(k, v) for k, v in items if any(k.startswith(p) for p in only)]
    pairs = []
    for entry in rename:
        old, sep, new = entry.partition("=")
        if not sep or not old:
            raise ClassListError(
                f"MODEL.RECLASS.RENAME entry {entry!r} is not of the form 'old_prefix=new_prefix'."
            )
        if not any(k.startswith(old) for k, _ in items):
            raise ReclassError(f"MODEL.RECLASS.RENAME prefix {old!r} matches no checkpoint key.")
        pairs.append((old, new))
    pairs.sort(key=lambda p: -len(p[0]))

    def renamed(key: str) -> str:
        for old, new in pairs:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    return copy_state_dict(state_dict, [(renamed(k), v) for k, v in items],
                           renamed if pairs else None)
