"""The restricted unpickler: builds what model-zoo pickles hold, refuses anything else.

Detectron/Caffe2/detectron2 model-zoo ``.pkl`` files are pickles of containers, scalars and
numpy arrays. :class:`RestrictedUnpickler` resolves only the globals those need (builtins
containers and scalars, ``collections.OrderedDict``, numpy arrays, dtypes and scalars, and
``_codecs.encode`` to latin-1 for Python 2 bytes); any other global raises :class:`Refused`
before it is created, so no code from the file runs. :func:`is_unresolvable` tells a refused
name that cannot exist (a damaged file) from a request for something unsafe.
"""
import codecs
import importlib
import importlib.util
import pickle
import sys
import warnings
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

__all__ = ["Refused", "RestrictedUnpickler", "is_unresolvable"]


class Refused(Exception):
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
        raise Refused(f"_codecs.encode(..., {encoding!r})")
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


class RestrictedUnpickler(pickle._Unpickler):
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
            raise Refused(f"{module}.{name}", f"{module}.{name}")
        return obj


def is_unresolvable(qualname: str) -> bool:
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
