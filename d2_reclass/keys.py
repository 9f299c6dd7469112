"""Selecting and renaming checkpoint keys (``MODEL.RECLASS.ONLY`` / ``RENAME``)."""
from typing import Dict, Sequence, TypeVar

from .errors import ClassListError, ReclassError

__all__ = ["select_and_rename"]

T = TypeVar("T")


def select_and_rename(
    state_dict: Dict[str, T], only: Sequence[str] = (), rename: Sequence[str] = ()
) -> Dict[str, T]:
    """Keep the keys starting with a prefix in ``only`` (all if empty), then apply
    ``"old_prefix=new_prefix"`` renames (the longest matching prefix wins). Returns a new dict.

    Raises:
        ReclassError: a prefix in ``only`` or ``rename`` matches no key, or a rename is
            malformed: a typo here would otherwise silently load nothing.
    """
    out = dict(state_dict)
    if only:
        unused = [p for p in only if not any(k.startswith(p) for k in out)]
        if unused:
            raise ReclassError(
                f"MODEL.RECLASS.ONLY prefix {unused[0]!r} matches no checkpoint key; keys start "
                f"with {sorted({k.split('.')[0] + '.' for k in out})}."
            )
        out = {k: v for k, v in out.items() if any(k.startswith(p) for p in only)}
    pairs = []
    for entry in rename:
        old, sep, new = entry.partition("=")
        if not sep or not old:
            raise ClassListError(
                f"MODEL.RECLASS.RENAME entry {entry!r} is not of the form 'old_prefix=new_prefix'."
            )
        if not any(k.startswith(old) for k in out):
            raise ReclassError(f"MODEL.RECLASS.RENAME prefix {old!r} matches no checkpoint key.")
        pairs.append((old, new))
    pairs.sort(key=lambda p: -len(p[0]))
    renamed = {}
    for k, v in out.items():
        for old, new in pairs:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    return renamed
