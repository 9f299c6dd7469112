"""Read and write checkpoint files without running code from them.

Loading:

* torch files (zip format, or the legacy pickle format) go through
  ``torch.load(..., weights_only=True)``;
* pickle files (Detectron/Caffe2/detectron2 model-zoo ``.pkl``) go through a restricted unpickler
  that only builds containers, scalars and numpy arrays (:mod:`d2_reclass.io.unpickling`);
* anything outside those allow-lists is refused before it is created, with an
  :class:`UnsafeCheckpointError`; ``trust_pickle=True`` (``MODEL.RECLASS.TRUST_PICKLE True`` /
  ``--trust-pickle``) lifts the restriction for a file the user trusts.

The reader is chosen from the file's first bytes, not its name (:mod:`d2_reclass.io.formats`), so
a torch file named ``.pkl`` or a pickle named ``.pth`` still loads safely. Every failure is a
:class:`CheckpointError` naming the file and the fix.

Checking: :func:`check_state_dict` refuses a state dict with an entry a model cannot load (a
string, ``None``, a nested dict, an object array, ...) before anything reads it, naming the file
and the key; :func:`checkpoint_format` says what a loaded file holds (both from
:mod:`d2_reclass.io.formats`).

Saving writes a temporary file next to the target and renames it into place, so the target is
either the old file or the complete new one, never a partial write (:mod:`d2_reclass.io.atomic`).
"""
import io
import logging
import os
import pickle
import re
import sys
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from detectron2.utils.file_io import PathManager
from tqdm import tqdm

from ..errors import CheckpointError, UnsafeCheckpointError
from .atomic import atomic_file, check_output_path, same_file
from .formats import (
    CHECKPOINT_FORMATS,
    PICKLE_PROTO,
    PICKLE_STOP,
    REFETCH_HINT,
    TORCH_LEGACY_MAGIC,
    ZIP_MAGIC,
    check_state_dict,
    checkpoint_format,
    describe_foreign,
    describe_text,
)
from .unpickling import Refused, RestrictedUnpickler, is_unresolvable

__all__ = [
    "CHECKPOINT_FORMATS",
    "PROGRESS_MIN_BYTES",
    "check_output_path",
    "existing_local_path",
    "load_checkpoint_file",
    "save_checkpoint_file",
    "same_file",
    "checkpoint_format",
    "check_state_dict",
]

logger = logging.getLogger(__name__)

#: Files at least this large get a progress bar when ``progress=True``.
PROGRESS_MIN_BYTES = 64 * 1024 * 1024

_TRUST_HINT = (
    "if you trust this file, load it anyway with MODEL.RECLASS.TRUST_PICKLE True "
    "(or --trust-pickle); that lets the file run code on this machine"
)
_HEAD_BYTES = 512


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


def _shows_progress(progress: bool, size: int) -> bool:
    """True if a byte progress bar for ``size`` bytes would help a person: asked for, the data
    large, and stderr a terminal someone watches.

    Counting bytes means passing every read or write through Python (:class:`_ProgressReader`)
    instead of letting torch read the path with its own reader as stock detectron2 does; that
    costs time on every load, so it is paid only when someone sees the bar. Logs and CI (stderr
    not a terminal) get neither. Remote files need nothing here: PathManager has downloaded
    them, with iopath's own progress bar, before they reach this module.
    """
    if not progress or size < PROGRESS_MIN_BYTES or sys.stderr is None:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr is no terminal
        return False


def _progress_bar(path: str, total: Optional[int], verb: str) -> tqdm:
    return tqdm(
        total=total,
        desc=f"{verb} {os.path.basename(path)}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
    )


class _ProgressReader:
    """A seekable binary file that advances a progress bar by the bytes read.

    Exposes only what ``torch.load`` and ``pickle`` use (no ``fileno``, so torch reads legacy
    storages through ``read`` too instead of going around the bar).
    """

    def __init__(self, f: io.BufferedReader, bar: tqdm):
        self._f = f
        self._bar = bar

    def _count(self, n: int) -> None:
        # Zip readers seek back and forth; counting bytes read (capped at the size) keeps the bar
        # monotonic where following the position would jump.
        n = min(n, max(0, (self._bar.total or 0) - self._bar.n))
        if n:
            self._bar.update(n)

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._count(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self._count(n or 0)
        return n

    def readline(self, size: int = -1) -> bytes:
        data = self._f.readline(size)
        self._count(len(data))
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class _ProgressWriter:
    """A binary file that advances a progress bar by the bytes written (what torch.save uses)."""

    def __init__(self, f: io.BufferedWriter, bar: tqdm):
        self._f = f
        self._bar = bar

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._bar.update(n)
        return n

    def flush(self) -> None:
        self._f.flush()


def _weight_bytes(obj: Any, depth: int = 0) -> int:
    """Bytes of tensors and arrays in ``obj``: the size estimate for the save progress bar."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if depth > 8:  # a checkpoint is a few levels deep; do not walk arbitrary object graphs
        return 0
    if isinstance(obj, Mapping):
        return sum(_weight_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_weight_bytes(v, depth + 1) for v in obj)
    return 0


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    detail = text[0] if text else ""
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


_PICKLE_ALLOWS = "a pickle loaded safely may only hold containers, scalars and numpy arrays"
_TORCH_ALLOWS = "torch's safe loader (weights_only) only allows tensors, containers and scalars"


def _refused_error(path: str, what: str, allows: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"Refused to load {path}: it asks to create `{what}`, and {allows}; {_TRUST_HINT}."
    )


def _damaged_error(path: str, truncated: bool, cause: BaseException) -> CheckpointError:
    state = "truncated (cut off before its end)" if truncated else "corrupted"
    return CheckpointError(
        f"Cannot read checkpoint {path}: the file is {state} ({_first_line(cause)}); "
        f"{REFETCH_HINT}."
    )


_TRUNCATION_SIGNS = ("truncated", "central directory", "unpack requires a buffer", "unexpected eof")


def _looks_truncated(error: BaseException) -> bool:
    """True if ``error`` is what readers raise when the data stops early."""
    text = str(error).lower()
    return isinstance(error, EOFError) or any(sign in text for sign in _TRUNCATION_SIGNS)


def _out_of_memory_error(path: str) -> CheckpointError:
    # Damaged files often claim a huge length for some record; a real checkpoint can also be
    # bigger than memory. Both read the same, so the message names both.
    size = os.path.getsize(path)
    return CheckpointError(
        f"Ran out of memory reading checkpoint {path} ({size} bytes): the file is corrupted (it "
        f"declares data larger than memory) or needs more memory than is available; "
        f"{REFETCH_HINT} or free memory."
    )


def _missing_code_error(path: str, cause: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Cannot load checkpoint {path}: it refers to code that is not available here "
        f"({_first_line(cause)}); install the package it was saved with, or the file is "
        f"corrupted ({REFETCH_HINT})."
    )


def _ends_like_pickle(f: Any) -> bool:
    """True if the file's last byte is pickle's STOP opcode, as every complete pickle's is."""
    f.seek(-1, io.SEEK_END)
    return f.read(1) == PICKLE_STOP


def _unpickle(f: Any, path: str, head: bytes, trust_pickle: bool) -> Any:
    """Load the first pickle in ``f``, restricted unless ``trust_pickle``."""
    try:
        if trust_pickle:
            return pickle.load(f, encoding="latin1")
        return RestrictedUnpickler(f, encoding="latin1").load()
    except MemoryError:
        raise _out_of_memory_error(path) from None
    except Refused as refused:
        truncated = not _ends_like_pickle(f)
        garbled = refused.global_name is not None and is_unresolvable(refused.global_name)
        if truncated or garbled:
            raise _damaged_error(path, truncated, refused) from None
        raise _refused_error(path, refused.what, _PICKLE_ALLOWS) from None
    except (ImportError, AttributeError) as e:
        # Only a trusted load imports anything; the restricted one refuses unknown names first.
        raise _missing_code_error(path, e) from e
    except Exception as e:
        if not head.startswith(PICKLE_PROTO):
            # Not a protocol >= 2 pickle, and not an older one either: say what it is instead.
            what = describe_text(head)
            what = f"it looks like {what}" if what else "its content is not a recognized format"
            raise CheckpointError(
                f"{path} is not a checkpoint: {what}. Expected a torch file (.pth) or a pickle "
                f"(.pkl); check the path."
            ) from e
        raise _damaged_error(path, _looks_truncated(e) or not _ends_like_pickle(f), e) from e


# torch names a refused global in one of two phrasings, depending on why it refused it.
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _torch_load(source: Any, path: str, trust_pickle: bool) -> Any:
    """``torch.load`` of ``source`` (``path`` itself, or a progress reader over it)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=not trust_pickle)
    except MemoryError:
        raise _out_of_memory_error(path) from None
    except pickle.UnpicklingError as e:
        if trust_pickle or "Weights only load failed" not in str(e):
            raise _damaged_error(path, _looks_truncated(e), e) from e
        # torch keeps the specific reason in the chained error; its own message is a long essay.
        reason = str(e.__context__ or e).strip().splitlines()[0]
        match = _UNSAFE_GLOBAL.search(reason)
        if match is None:
            # e.g. "Unsupported operand 149": garbled data, or a pickle feature the safe loader
            # lacks (torch.save(..., pickle_protocol=4) writes one).
            raise UnsafeCheckpointError(
                f"Refused to load {path}: torch's safe loader (weights_only) cannot read it "
                f"({reason}); the file may be damaged ({REFETCH_HINT}), or {_TRUST_HINT}."
            ) from None
        what = match.group(1)
        if is_unresolvable(what):
            raise _damaged_error(path, False, e.__context__ or e) from None
        raise _refused_error(path, what, _TORCH_ALLOWS) from None
    except (ImportError, AttributeError) as e:
        if trust_pickle:  # a class pickled in the file whose module is not installed
            raise _missing_code_error(path, e) from e
        raise _damaged_error(path, _looks_truncated(e), e) from e
    except Exception as e:
        raise _damaged_error(path, _looks_truncated(e), e) from e


def _load_open(f: Any, path: str, head: bytes, trust_pickle: bool, torch_source: Any) -> Any:
    """Load the file ``f`` is open on; torch files are read from ``torch_source``.

    ``torch_source`` is ``path`` unless a progress bar is shown: given a path, torch reads the
    file with its own (C++) reader, as stock ``DetectionCheckpointer`` does; given a file object
    it reads through Python calls, which only the progress bar needs.
    """
    if head.startswith(ZIP_MAGIC):
        return _torch_load(torch_source, path, trust_pickle)
    foreign = describe_foreign(head)
    if foreign is not None:
        raise CheckpointError(
            f"{path} is not a checkpoint: it looks like {foreign}. Expected a torch file (.pth) "
            f"or a pickle (.pkl); check the path."
        )
    # torch's legacy format is a pickled magic number followed by the payload; reading that
    # first pickle also reads any plain pickle whole, so one pass tells them apart.
    obj = _unpickle(f, path, head, trust_pickle)
    if type(obj) is int and obj == TORCH_LEGACY_MAGIC:
        f.seek(0)
        return _torch_load(torch_source, path, trust_pickle)
    return obj


def existing_local_path(path: str, path_manager=PathManager, key: str = "MODEL.WEIGHTS") -> str:
    """``path`` (local, URL or detectron2://, query dropped) as a local file that exists.

    Raises:
        CheckpointError: there is no such file; the message names ``key``, where it was given.
    """
    local = path_manager.get_local_path(path.split("?")[0])
    if not os.path.isfile(local):
        raise CheckpointError(
            f"Checkpoint {path!r} not found. Check {key} (or the path you gave)."
        )
    return local


def load_checkpoint_file(path: str, *, trust_pickle: bool = False, progress: bool = False) -> Any:
    """Read a local checkpoint file and return the object it holds, unchanged.

    Resolve URLs and ``detectron2://`` paths with ``PathManager.get_local_path`` first.

    Guarantees:

    * Without ``trust_pickle`` no code from the file runs: torch files load with
      ``weights_only=True``; pickle files may only build builtins containers and scalars,
      ``collections.OrderedDict`` and numpy arrays, dtypes and scalars. Anything else raises
      :class:`UnsafeCheckpointError` before it is created. Python 2 pickles (Detectron/Caffe2
      model zoo) load, their ``str`` decoded as latin-1 as detectron2 does.
    * With ``trust_pickle`` the file loads as detectron2 would (plain ``pickle`` /
      ``torch.load(weights_only=False)``): only for files the user trusts.
    * Every failure is a :class:`CheckpointError` naming the file and saying what to do: missing,
      empty, truncated or corrupted files, and files that are not checkpoints (an image, JSON,
      text); nothing is returned from a partial read.
    * ``progress`` shows a byte progress bar on stderr for files of at least
      :data:`PROGRESS_MIN_BYTES` when stderr is a terminal; nothing else is printed. Otherwise
      torch files are read as fast as stock ``torch.load(path)`` reads them.
    """
    path = os.fspath(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        hint = (
            "it looks like a URL: resolve it with PathManager.get_local_path() first"
            if "://" in path
            else "check the path"
        )
        raise CheckpointError(f"Checkpoint file {path} does not exist; {hint}.") from None
    except OSError as e:
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {e.strerror or e}; check the path and its permissions."
        ) from None
    if os.path.isdir(path):
        raise CheckpointError(f"Checkpoint {path} is a directory; pass the checkpoint file in it.")
    if size == 0:
        raise CheckpointError(
            f"Checkpoint file {path} is empty (0 bytes): it was not written completely; "
            f"{REFETCH_HINT}."
        )
    if trust_pickle:
        logger.info("Loading %s with trust_pickle: code in the file can run", path)
    try:
        with open(path, "rb") as raw:
            head = raw.read(_HEAD_BYTES)
            raw.seek(0)
            if not _shows_progress(progress, size):
                return _load_open(raw, path, head, trust_pickle, torch_source=path)
            with _progress_bar(path, size, "Loading") as bar:
                reader = _ProgressReader(raw, bar)
                return _load_open(reader, path, head, trust_pickle, torch_source=reader)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {e.strerror or e}; check its permissions."
        ) from e


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------


def save_checkpoint_file(
    obj: Any,
    path: str,
    *,
    overwrite: bool = False,
    progress: bool = False,
    source: Optional[str] = None,
) -> None:
    """Write ``obj`` to ``path`` with ``torch.save``, atomically.

    Guarantees:

    * ``path`` is either left as it was or holds the complete new file: the data goes to a
      temporary file in the same directory, is flushed to disk, then renamed onto ``path``. On any
      error (including an object that cannot be pickled, or Ctrl-C) the temporary file is
      removed and ``path`` is untouched.
    * An existing ``path`` is refused unless ``overwrite`` (the ``--force`` option).
    * ``source``: the file ``obj`` was read from; writing onto it is refused even with
      ``overwrite``, so a failed run can always be redone from the original.
    * ``progress`` shows a byte progress bar on stderr for large outputs when it is a terminal.

    Raises :class:`CheckpointError` for all of the above, naming the file.
    """
    path = os.fspath(path)
    try:
        with atomic_file(path, overwrite=overwrite, source=source) as f:
            total = _weight_bytes(obj) if progress else 0
            if _shows_progress(progress, total):
                with _progress_bar(path, total, "Saving") as bar:
                    torch.save(obj, _ProgressWriter(f, bar))
            else:
                torch.save(obj, f)
    except (CheckpointError, MemoryError):
        raise
    except OSError as e:
        raise CheckpointError(
            f"Cannot write checkpoint {path}: {e.strerror or e}; nothing was written."
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"Cannot save checkpoint {path}: the object cannot be serialized "
            f"({_first_line(e)}); nothing was written."
        ) from e
    logger.info("Saved checkpoint to %s", path)


