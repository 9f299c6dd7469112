"""Read and write checkpoint files without running code from them.

Loading:

* torch files (zip format, or the legacy pickle format) go through
  ``torch.load(..., weights_only=True)``;
* pickle files (Detectron/Caffe2/detectron2 model-zoo ``.pkl``) go through a restricted unpickler
  that only builds containers, scalars and numpy arrays;
* anything outside those allow-lists is refused before it is created, with an
  :class:`UnsafeCheckpointError`; ``trust_pickle=True`` (``MODEL.RECLASS.TRUST_PICKLE True`` /
  ``--trust-pickle``) lifts the restriction for a file the user trusts.

The reader is chosen from the file's first bytes, not its name, so a torch file named ``.pkl``
or a pickle named ``.pth`` still loads safely. Every failure is a :class:`CheckpointError` naming
the file and the fix.

Checking: :func:`check_state_dict` refuses a state dict with an entry a model cannot load (a
string, ``None``, a nested dict, an object array, ...) before anything reads it, naming the file
and the key.

Saving writes a temporary file next to the target and renames it into place, so the target is
either the old file or the complete new one, never a partial write.
"""
import codecs
import importlib
import importlib.util
import io
import logging
import os
import pickle
import re
import secrets
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from .errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "CHECKPOINT_FORMATS",
    "PROGRESS_MIN_BYTES",
    "check_output_path",
    "load_checkpoint_file",
    "save_checkpoint_file",
    "same_file",
    "checkpoint_format",
    "check_state_dict",
]

logger = logging.getLogger(__name__)

#: What :func:`checkpoint_format` can return.
CHECKPOINT_FORMATS = ("d2 pth", "model-zoo pkl", "caffe2 pkl", "pycls pyth", "state dict")

#: Files at least this large get a progress bar when ``progress=True``.
PROGRESS_MIN_BYTES = 64 * 1024 * 1024

_TRUST_HINT = (
    "if you trust this file, load it anyway with MODEL.RECLASS.TRUST_PICKLE True "
    "(or --trust-pickle); that lets the file run code on this machine"
)
_REFETCH_HINT = "download or save it again"
_HEAD_BYTES = 512
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # PROTO opcode: first byte of every pickle of protocol >= 2
_PICKLE_STOP = b"."  # STOP opcode: last byte of a complete pickle
# The first object torch's legacy (pre-1.6, non-zip) format pickles, before the real payload.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ------------------------------------------------------------------------------------------------
# What a file looks like
# ------------------------------------------------------------------------------------------------

_FOREIGN_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras/TensorFlow weights), which detectron2 cannot read"),
    (b"PK\x05\x06", "an empty zip archive"),
)


def _describe_text(head: bytes) -> Optional[str]:
    """Say what kind of text ``head`` is, or None if it is binary."""
    # Incremental decoding tolerates a multi-byte character cut off at the end of ``head``.
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    text = text.lstrip("\ufeff \t\r\n")
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if text[:1] in ("{", "["):
        return "JSON text"
    if text[:1] == "<":
        return "HTML or XML text (often an error page saved by a failed download)"
    return "text"


def _describe_foreign(head: bytes) -> Optional[str]:
    """Name the format of a file that certainly is not a checkpoint, else None.

    Plain text is not decided here: a protocol-0 pickle is text too.
    """
    if head.startswith(_PICKLE_PROTO):
        return None
    for magic, what in _FOREIGN_SIGNATURES:
        if head.startswith(magic):
            return what
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if head[8:10] == b'{"':
        return "a safetensors file, which detectron2 cannot read"
    text = _describe_text(head)
    if text is not None and text != "text":
        return text
    return None


# ------------------------------------------------------------------------------------------------
# Restricted unpickling
# ------------------------------------------------------------------------------------------------


class _Refused(Exception):
    """Raised inside unpickling when the file asks for something outside the allow-list.

    ``global_name`` is the ``module.name`` asked for, when the refusal is of a global (and so may
    be a garbled name in a damaged file rather than a request for something unsafe).
    """

    def __init__(self, what: str, global_name: Optional[str] = None):
        super().__init__(what)
        self.what = what
        self.global_name = global_name


_LATIN1_NAMES = {"latin1", "latin_1", "iso8859_1", "iso_8859_1", "l1"}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes ``bytes`` at pickle protocol <= 2 as _codecs.encode(str, "latin1"); any
    # other codec would only be there to do something else, so it is refused. The name is
    # compared, not looked up: a lookup would import whatever codec module the file names.
    if not isinstance(encoding, str) or encoding.lower().replace("-", "_") not in _LATIN1_NAMES:
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1")


def _import_first(*modules: str) -> Any:
    """Import the first module of ``modules`` that exists (numpy 2 renamed numpy.core)."""
    for name in modules:
        try:
            with warnings.catch_warnings():
                # numpy 2 warns on numpy.core; the spelling is the file's choice, not ours.
                warnings.simplefilter("ignore", DeprecationWarning)
                return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {modules} can be imported")


@lru_cache(maxsize=None)
def _allowed_globals() -> Dict[Tuple[str, str], Callable[..., Any]]:
    """``(module, name)`` -> object, for every global a model-zoo pickle needs.

    Names are keyed as the file spells them; Python 2 files say ``__builtin__`` where Python 3
    says ``builtins``, and numpy 2 files say ``numpy._core`` where numpy 1 says ``numpy.core``.
    """
    multiarray = _import_first("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = _import_first("numpy._core.numeric", "numpy.core.numeric")
    allowed: Dict[Tuple[str, str], Callable[..., Any]] = {}
    safe_builtins = {
        "dict": dict,
        "list": list,
        "tuple": tuple,
        "set": set,
        "frozenset": frozenset,
        "str": str,
        "bytes": bytes,
        "bytearray": bytearray,
        "int": int,
        "float": float,
        "complex": complex,
        "bool": bool,
        "slice": slice,
    }
    for module in ("builtins", "__builtin__"):
        for name, obj in safe_builtins.items():
            allowed[(module, name)] = obj
    allowed[("_codecs", "encode")] = _latin1_encode
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # Pickle protocol 5 rebuilds contiguous arrays from a buffer with _frombuffer.
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that can only build what model-zoo files contain.

    Every global a pickle refers to (classes and functions it calls to rebuild objects) passes
    through :meth:`find_class`, so refusing there refuses the object before anything runs.

    It is pickle's pure-Python unpickler, not the C one: the C unpickler sizes its memo as an
    array by the largest index a file names, so one damaged byte in a PUT index made it
    allocate and zero gigabytes (3 GB for an 11-byte pickle; up to 64 GB); the Python one keeps
    the memo in a dict. Model-zoo files are a few opcodes per array around large strings, so it
    reads them as fast (a 252 MB Mask R-CNN .pkl: 1.4-1.8 s against C's 1.8-2.0 s, 2-core CPU).
    """

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}", f"{module}.{name}")
        return obj


def _is_unresolvable(qualname: str) -> bool:
    """True if ``qualname`` cannot name anything: a garbled or cut-off name.

    A refused global that cannot exist comes from a damaged file, not from a file asking for
    something unsafe. The name is only looked up from already-imported modules, and submodules
    only located (``find_spec`` does not run them): importing a module named by an untrusted file
    would run that module's code. Names whose top-level module is not imported are left
    undecided (False).
    """
    parts = qualname.split(".")
    if not all(part.isidentifier() for part in parts):
        return True
    obj: Any = sys.modules.get(parts[0])
    if obj is None:
        return False
    prefix = parts[0]
    for part in parts[1:]:
        prefix = f"{prefix}.{part}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 2 warns when numpy.core is looked at
            found = hasattr(obj, part)
        if found:
            obj = getattr(obj, part)
        elif prefix in sys.modules:
            obj = sys.modules[prefix]
        elif hasattr(obj, "__path__"):  # a package: the name may be a submodule not yet imported
            try:
                return importlib.util.find_spec(prefix) is None
            except (ImportError, ValueError):
                return True
        else:
            return True
    return False


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
        f"{_REFETCH_HINT}."
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
        f"{_REFETCH_HINT} or free memory."
    )


def _missing_code_error(path: str, cause: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Cannot load checkpoint {path}: it refers to code that is not available here "
        f"({_first_line(cause)}); install the package it was saved with, or the file is "
        f"corrupted ({_REFETCH_HINT})."
    )


def _ends_like_pickle(f: Any) -> bool:
    """True if the file's last byte is pickle's STOP opcode, as every complete pickle's is."""
    f.seek(-1, io.SEEK_END)
    return f.read(1) == _PICKLE_STOP


def _unpickle(f: Any, path: str, head: bytes, trust_pickle: bool) -> Any:
    """Load the first pickle in ``f``, restricted unless ``trust_pickle``."""
    try:
        if trust_pickle:
            return pickle.load(f, encoding="latin1")
        return _RestrictedUnpickler(f, encoding="latin1").load()
    except MemoryError:
        raise _out_of_memory_error(path) from None
    except _Refused as refused:
        truncated = not _ends_like_pickle(f)
        garbled = refused.global_name is not None and _is_unresolvable(refused.global_name)
        if truncated or garbled:
            raise _damaged_error(path, truncated, refused) from None
        raise _refused_error(path, refused.what, _PICKLE_ALLOWS) from None
    except (ImportError, AttributeError) as e:
        # Only a trusted load imports anything; the restricted one refuses unknown names first.
        raise _missing_code_error(path, e) from e
    except Exception as e:
        if not head.startswith(_PICKLE_PROTO):
            # Not a protocol >= 2 pickle, and not an older one either: say what it is instead.
            what = _describe_text(head)
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
                f"({reason}); the file may be damaged ({_REFETCH_HINT}), or {_TRUST_HINT}."
            ) from None
        what = match.group(1)
        if _is_unresolvable(what):
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
    if head.startswith(_ZIP_MAGIC):
        return _torch_load(torch_source, path, trust_pickle)
    foreign = _describe_foreign(head)
    if foreign is not None:
        raise CheckpointError(
            f"{path} is not a checkpoint: it looks like {foreign}. Expected a torch file (.pth) "
            f"or a pickle (.pkl); check the path."
        )
    # torch's legacy format is a pickled magic number followed by the payload; reading that
    # first pickle also reads any plain pickle whole, so one pass tells them apart.
    obj = _unpickle(f, path, head, trust_pickle)
    if type(obj) is int and obj == _TORCH_LEGACY_MAGIC:
        f.seek(0)
        return _torch_load(torch_source, path, trust_pickle)
    return obj


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
            f"{_REFETCH_HINT}."
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
    directory = check_output_path(path, overwrite=overwrite, source=source)
    # A dot-name so globs over the output directory do not pick up an unfinished file, and a
    # random part so concurrent writers never share one.
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    )
    try:
        # "xb": never reuse an existing file; open() (unlike mkstemp) gives the usual umask mode.
        with open(tmp, "xb") as f:
            total = _weight_bytes(obj) if progress else 0
            if _shows_progress(progress, total):
                with _progress_bar(path, total, "Saving") as bar:
                    torch.save(obj, _ProgressWriter(f, bar))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except CheckpointError:
        _remove_quietly(tmp)
        raise
    except OSError as e:
        _remove_quietly(tmp)
        raise CheckpointError(
            f"Cannot write checkpoint {path}: {e.strerror or e}; nothing was written."
        ) from e
    except MemoryError:
        _remove_quietly(tmp)
        raise
    except Exception as e:
        _remove_quietly(tmp)
        raise CheckpointError(
            f"Cannot save checkpoint {path}: the object cannot be serialized "
            f"({_first_line(e)}); nothing was written."
        ) from e
    except BaseException:  # KeyboardInterrupt, SystemExit: clean up, then let them through
        _remove_quietly(tmp)
        raise
    logger.info("Saved checkpoint to %s", path)


# ------------------------------------------------------------------------------------------------
# Classifying
# ------------------------------------------------------------------------------------------------


def _is_weight(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _is_weight_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors or arrays."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and _is_weight(v) for k, v in obj.items())
    )


def _describe_object(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:8]]
        more = ", ..." if len(obj) > 8 else ""
        return f"a dict with keys [{', '.join(keys)}{more}]" if keys else "an empty dict"
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _no_weights_error(path: str, found: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {path} contains no model weights: expected a 'model' entry or a state dict "
        f"(parameter names to tensors); found {found}. Check that this is a model checkpoint."
    )


def _describe_value(value: Any) -> str:
    """What a state dict entry holds, in a few words, for an error message."""
    if value is None:
        return "None"
    if isinstance(value, (str, bytes, int, float, complex, np.generic)):
        # A numpy scalar shows its plain value (numpy 2's repr would add "np.float32(...)").
        text = repr(value.item() if isinstance(value, np.generic) else value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"{_describe_object(value)} ({text})"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"{_describe_object(value)} of {len(value)} items"
    return _describe_object(value)


def _unloadable(value: Any) -> Optional[str]:
    """Why ``value`` cannot be loaded into a model parameter, or None if it can.

    Tensors must be ordinary dense CPU tensors (``load_state_dict`` copies them); numpy arrays
    must be what ``torch.from_numpy`` takes, as detectron2 converts them with it.
    """
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            return f"a {value.layout} {value.device.type} tensor of dtype {value.dtype}"
        return None
    if isinstance(value, np.ndarray):
        try:
            torch.from_numpy(value)
        except (TypeError, ValueError, RuntimeError):
            return f"a numpy array of dtype {value.dtype.str}, which torch cannot hold"
        return None
    return _describe_value(value)


def check_state_dict(state: Any, path: str, *, allow_empty: bool = False) -> None:
    """Check that ``state`` is a state dict whose every entry a detectron2 model can load.

    Guarantees: if this returns, ``state`` is a dict whose keys are all strings and whose values
    are all dense CPU ``torch.Tensor`` s or numpy arrays that ``torch.from_numpy`` accepts
    (numbers or bools, native byte order), at least one of them; so detectron2's conversion,
    matching and ``load_state_dict`` cannot fail on a value's type. Otherwise it raises
    :class:`CheckpointError` naming ``path`` and saying what to do: that the file holds no
    weights at all (not a dict, or no tensor in it: an optimizer or metrics file), or which key
    is not a string or which entry holds what instead of a tensor. ``state`` is never modified.

    Entries detectron2 drops by name before loading (Caffe2 ``*_momentum`` blobs, pycls
    ``*num_batches_tracked``) must be dropped before this check, as detectron2 drops them before
    its own; entries beside the state dict (``iteration``, ``__author__``, ...) are not its
    business. ``allow_empty`` accepts an empty dict: the state of a model with no parameters.
    """
    if not isinstance(state, dict) or not (any(map(_is_weight, state.values()))
                                           or (allow_empty and not state)):
        found = _describe_object(state)
        if isinstance(state, dict) and state:
            found += " and no tensors or arrays"
        raise _no_weights_error(path, found)
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"Checkpoint {path} has a state dict key {key!r} ({_describe_object(key)}), but "
                f"parameter names are strings: the file is damaged or was not written for a "
                f"detectron2 model; {_REFETCH_HINT}."
            )
        problem = _unloadable(value)
        if problem is not None:
            raise CheckpointError(
                f"Checkpoint {path}: state dict entry {key!r} holds {problem}, where a model "
                f"parameter needs a tensor or a numeric array. The file is damaged or was "
                f"edited: {_REFETCH_HINT}, or delete that entry from the state dict and save "
                f"the file again."
            )


def checkpoint_format(obj: Any, path: str) -> str:
    """Classify an object returned by :func:`load_checkpoint_file`; one of CHECKPOINT_FORMATS.

    * ``"model-zoo pkl"``: a dict with ``"model"`` and ``"__author__"`` (detectron2 model zoo);
    * ``"d2 pth"``: a dict with ``"model"`` (detectron2/fvcore Checkpointer output);
    * ``"pycls pyth"``: a dict with ``"model_state"``;
    * ``"caffe2 pkl"``: a dict with ``"blobs"``, or, from a ``.pkl``, a flat dict of arrays
      (Detectron/Caffe2 ImageNet models);
    * ``"state dict"``: a flat dict of names to tensors (or arrays).

    The weights entry must be a mapping holding tensors or arrays. Raises
    :class:`CheckpointError` naming ``path`` for anything holding no weights (a dict with only
    ``"iteration"``, a list, ...).
    """
    if isinstance(obj, Mapping):
        for key, fmt in (("model", None), ("model_state", "pycls pyth"), ("blobs", "caffe2 pkl")):
            if key not in obj:
                continue
            weights = obj[key]
            if not isinstance(weights, Mapping) or not any(map(_is_weight, weights.values())):
                held = _describe_object(weights)
                if isinstance(weights, Mapping) and weights:
                    held += " and no tensors or arrays"
                raise _no_weights_error(path, f"'{key}' holding {held}")
            if fmt is None:
                fmt = "model-zoo pkl" if "__author__" in obj else "d2 pth"
            return fmt
        if _is_weight_dict(obj):
            from_pkl = os.fspath(path).endswith(".pkl")
            if from_pkl and all(isinstance(v, np.ndarray) for v in obj.values()):
                return "caffe2 pkl"
            return "state dict"
    raise _no_weights_error(path, _describe_object(obj))
