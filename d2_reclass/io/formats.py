"""What a checkpoint file is, from its first bytes, and what a loaded one holds.

* :func:`describe_foreign` names files that certainly are not checkpoints (images, archives,
  JSON, HTML error pages, Git LFS pointers, safetensors) from their first bytes, and
  :func:`describe_text` what kind of text a file is;
* :func:`checkpoint_format` classifies a loaded object (detectron2 ``.pth``, model-zoo or
  Caffe2 ``.pkl``, pycls, plain state dict), and :func:`check_state_dict` checks that every
  entry of a state dict is something a model can load.

Every refusal is a :class:`CheckpointError` naming the file and the fix.
"""
import codecs
import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMATS",
    "REFETCH_HINT",
    "ZIP_MAGIC",
    "PICKLE_PROTO",
    "PICKLE_STOP",
    "TORCH_LEGACY_MAGIC",
    "check_state_dict",
    "checkpoint_format",
    "describe_foreign",
    "describe_text",
]

#: What :func:`checkpoint_format` can return.
CHECKPOINT_FORMATS = ("d2 pth", "model-zoo pkl", "caffe2 pkl", "pycls pyth", "state dict")

#: How messages about a damaged file end.
REFETCH_HINT = "download or save it again"

ZIP_MAGIC = b"PK\x03\x04"  # torch's zip format (torch >= 1.6)
PICKLE_PROTO = b"\x80"  # PROTO opcode: first byte of every pickle of protocol >= 2
PICKLE_STOP = b"."  # STOP opcode: last byte of a complete pickle
#: The first object torch's legacy (pre-1.6, non-zip) format pickles, before the real payload.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


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


def describe_text(head: bytes) -> Optional[str]:
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


def describe_foreign(head: bytes) -> Optional[str]:
    """Name the format of a file that certainly is not a checkpoint, else None.

    Plain text is not decided here: a protocol-0 pickle is text too.
    """
    if head.startswith(PICKLE_PROTO):
        return None
    for magic, what in _FOREIGN_SIGNATURES:
        if head.startswith(magic):
            return what
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if head[8:10] == b'{"':
        return "a safetensors file, which detectron2 cannot read"
    text = describe_text(head)
    if text is not None and text != "text":
        return text
    return None


# ------------------------------------------------------------------------------------------------
# What a loaded checkpoint holds
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
                f"detectron2 model; {REFETCH_HINT}."
            )
        problem = _unloadable(value)
        if problem is not None:
            raise CheckpointError(
                f"Checkpoint {path}: state dict entry {key!r} holds {problem}, where a model "
                f"parameter needs a tensor or a numeric array. The file is damaged or was "
                f"edited: {REFETCH_HINT}, or delete that entry from the state dict and save "
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
