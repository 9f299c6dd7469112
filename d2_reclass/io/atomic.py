"""Atomic file writing: an output is either as it was or complete, never partly written.

:func:`atomic_file` gives a temporary file next to the output; when the block that writes it
ends, it is flushed to disk and moved onto the output in one step (a hard link where an
existing output must not be replaced, a rename otherwise). :func:`check_output_path` makes the
same refusals before any work is done.
"""
import contextlib
import logging
import os
import secrets
from typing import BinaryIO, Iterator, Optional

from ..errors import CheckpointError

__all__ = ["atomic_file", "check_output_path", "same_file"]

logger = logging.getLogger(__name__)


def same_file(a: str, b: str) -> bool:
    """True if paths ``a`` and ``b`` name the same existing file (links resolved).

    False when either does not exist, so it is safe to ask before an output is written.
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        logger.warning("Could not remove temporary file %s", path)


def _exists_error(path: str) -> CheckpointError:
    return CheckpointError(
        f"Output checkpoint {path} already exists; pass --force to overwrite it, or choose "
        f"another path."
    )


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished ``tmp`` onto ``path`` in one step."""
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link fails if ``path`` appeared while saving (another rank, another run), where a
    # rename would silently replace it. Filesystems without hard links fall back to a rename.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:
        if os.path.lexists(path):
            raise _exists_error(path) from None
        os.replace(tmp, path)
    else:
        _remove_quietly(tmp)  # ``path`` is complete now; a leftover link only wastes a name


def check_output_path(path: str, *, overwrite: bool = False, source: Optional[str] = None) -> str:
    """Check that :func:`save_checkpoint_file` may write ``path``, before any work is done.

    Refuses, as it does, the input file ``source``, a directory, an existing file unless
    ``overwrite``, and a missing parent directory. Touches nothing.

    Returns:
        The absolute directory the file will be written to.

    Raises:
        CheckpointError: naming ``path`` and the fix.
    """
    if source is not None and same_file(source, path):
        raise CheckpointError(
            f"Refusing to write {path}: it is the input checkpoint {source}; write the result "
            f"to a new path."
        )
    if os.path.isdir(path):
        raise CheckpointError(
            f"Cannot write checkpoint {path}: it is a directory; give a file path in it."
        )
    if os.path.lexists(path) and not overwrite:
        raise _exists_error(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"Cannot write checkpoint {path}: directory {directory} does not exist; create it "
            f"first."
        )
    return directory


@contextlib.contextmanager
def atomic_file(path: str, *, overwrite: bool = False,
                source: Optional[str] = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into, published onto ``path`` when the
    block ends.

    Guarantees: ``path`` is either left as it was or holds the complete new file. The data goes
    to a temporary file in the same directory, flushed to disk, then moved onto ``path``; if the
    block raises anything (Ctrl-C included), the temporary file is removed, ``path`` is
    untouched, and the exception propagates.

    Raises:
        CheckpointError: the refusals of :func:`check_output_path` (before the block runs), or
            ``path`` appearing meanwhile when not ``overwrite``.
    """
    directory = check_output_path(path, overwrite=overwrite, source=source)
    # A dot-name so globs over the output directory do not pick up an unfinished file, and a
    # random part so concurrent writers never share one.
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    )
    try:
        # "xb": never reuse an existing file; open() (unlike mkstemp) gives the usual umask mode.
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except BaseException:
        _remove_quietly(tmp)
        raise
