"""Reading and writing checkpoint files: real files in tmp_path, real torch and numpy, no mocks.

Every refusal test also checks that nothing was created or changed: an unsafe pickle must be
stopped before it runs, and a failed save must leave the directory as it was.
"""
import contextlib
import io
import json
import os
import pickle
import pickletools
import pty
import resource
import struct
import sys
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from d2_reclass.errors import CheckpointError, ReclassError, UnsafeCheckpointError
from d2_reclass.io import serialization
from d2_reclass.io.serialization import (
    checkpoint_format,
    load_checkpoint_file,
    same_file,
    save_checkpoint_file,
)

TRUST_OPTIONS = ("MODEL.RECLASS.TRUST_PICKLE True", "--trust-pickle")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def listing(directory: Path) -> Dict[str, bytes]:
    """Every file under ``directory`` (hidden ones too) with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def d2_checkpoint() -> Dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": {
            "roi_heads.box_predictor.cls_score.weight": torch.randn(4, 8),
            "roi_heads.box_predictor.cls_score.bias": torch.randn(4),
            "backbone.bottom_up.stem.conv1.norm.num_batches_tracked": torch.tensor(7),
        },
        "iteration": 99,
        "scheduler": {"base_lrs": [0.02], "last_epoch": 99},
    }


def assert_same_checkpoint(actual: Any, expected: Any) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_checkpoint(actual[key], value)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key
        elif isinstance(value, np.ndarray):
            assert actual[key].dtype == value.dtype, key
            np.testing.assert_array_equal(actual[key], value)
        else:
            assert actual[key] == value, key


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


class _Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 did: every string, text or bytes, as a byte string (BINSTRING).

    That is what Detectron/Caffe2 model-zoo files hold; Python 3 reads them back with
    ``encoding="latin1"``, and numpy rebuilds array data from those latin-1 strings.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


class _WritesFile:
    """Unpickling it opens (creates) ``target`` for writing."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


class _RunsShell:
    """Unpickling it runs a shell command that creates ``target``."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _Interrupts:
    """Pickling it raises KeyboardInterrupt, as Ctrl-C during a long save would."""

    def __reduce__(self):
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------------
# Loading: what loads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", ["model_final.pth", "model.pt", "weights.bin"])
def test_loads_torch_files(tmp_path, name, legacy):
    expected = d2_checkpoint()
    path = write(tmp_path / name, torch_bytes(expected, legacy))
    loaded = load_checkpoint_file(path)
    assert_same_checkpoint(loaded, expected)
    assert checkpoint_format(loaded, path) == "d2 pth"


def test_loads_python2_model_zoo_pickle(tmp_path):
    weight = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    bias = np.array([0.5, -1.25, 3.0, 1e-8], dtype=np.float32)
    data = py2_pickle(
        {
            "model": {"cls_score.weight": weight, "cls_score.bias": bias},
            "__author__": b"Detectron",
            "note": b"caf\xe9",  # a Python 2 str with a non-ASCII byte: latin-1 maps it 1:1
        }
    )
    # Really Python-2 shaped: byte strings only, none of Python 3's text or bytes opcodes.
    opcodes = {op.name for op, _, _ in pickletools.genops(data)}
    assert "SHORT_BINSTRING" in opcodes
    assert not opcodes & {"BINUNICODE", "SHORT_BINUNICODE", "SHORT_BINBYTES", "BINBYTES"}
    assert b"_codecs" not in data

    path = write(tmp_path / "model_final_280758.pkl", data)
    loaded = load_checkpoint_file(path)

    assert loaded["__author__"] == "Detectron"
    assert loaded["note"] == "caf\u00e9"
    assert_same_checkpoint(loaded["model"], {"cls_score.weight": weight, "cls_score.bias": bias})
    assert checkpoint_format(loaded, path) == "model-zoo pkl"


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_loads_python3_pickles(tmp_path, protocol):
    # Protocol 2 writes bytes through _codecs.encode; 5 rebuilds arrays with _frombuffer; 0 is
    # text, which must not be mistaken for a text file.
    expected = {
        "model": {
            "conv1.weight": np.random.RandomState(0).randn(2, 3, 3, 3).astype(np.float32),
            "fc.bias": np.zeros(5, dtype=np.float64),
        },
        "__author__": "Detectron2 Model Zoo",
        "extra": {
            "scale": np.float32(2.5),
            "names": ("a", "b"),
            "ids": {1, 2},
            "raw": b"\x00\xff",
            "empty": b"",
        },
    }
    path = write(tmp_path / "model.pkl", pickle.dumps(expected, protocol=protocol))
    loaded = load_checkpoint_file(path)
    assert_same_checkpoint(loaded["model"], expected["model"])
    assert loaded["extra"] == expected["extra"]
    assert type(loaded["extra"]["scale"]) is np.float32


def _with_metadata(values):
    """A state dict as ``Module.state_dict()`` returns it: an OrderedDict with ``_metadata``."""
    state = OrderedDict(values)
    state._metadata = OrderedDict([("", {"version": 1}), ("head", {"version": 2})])
    return state


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickled_state_dict_keeps_its_module_versions(tmp_path, protocol):
    """The restricted unpickler restores an OrderedDict's ``_metadata`` (a BUILD of its
    attributes), as plain pickle does: versioned modules then see their version."""
    state = _with_metadata([("head.weight", np.ones((2, 3), dtype=np.float32))])
    path = write(tmp_path / "model.pkl", pickle.dumps(
        {"model": state, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))
    loaded = load_checkpoint_file(path)["model"]
    assert type(loaded) is OrderedDict and loaded._metadata == state._metadata
    assert pickle.loads(pickle.dumps(state, protocol=protocol))._metadata == state._metadata


def test_saved_state_dict_keeps_its_module_versions(tmp_path):
    """save_checkpoint_file (the CLI's output) keeps ``_metadata``; the safe torch loader reads
    it back."""
    state = _with_metadata([("head.weight", torch.ones(2, 3))])
    path = str(tmp_path / "out.pth")
    save_checkpoint_file({"model": state}, path)
    assert load_checkpoint_file(path)["model"]._metadata == state._metadata


def test_loads_caffe2_pickles(tmp_path):
    blobs = {
        "conv1_w": np.ones((2, 3, 7, 7), dtype=np.float32),
        "conv1_w_momentum": np.zeros((2, 3, 7, 7), dtype=np.float32),
        "pred_b": np.arange(3, dtype=np.float32),
    }
    path = write(tmp_path / "model_final.pkl", py2_pickle({"blobs": blobs}))
    loaded = load_checkpoint_file(path)
    assert_same_checkpoint(loaded["blobs"], blobs)
    assert checkpoint_format(loaded, path) == "caffe2 pkl"

    # ImageNet models (R-50.pkl) are a flat dict of arrays.
    flat = write(tmp_path / "R-50.pkl", py2_pickle(blobs))
    loaded = load_checkpoint_file(flat)
    assert_same_checkpoint(loaded, blobs)
    assert checkpoint_format(loaded, flat) == "caffe2 pkl"


def test_huge_memo_index_loads_without_a_huge_allocation(tmp_path):
    # A pickle may store an object under any memo index (one damaged byte makes one huge). C's
    # unpickler allocates an array twice that long: 64 GB for this file of 228 bytes.
    arrays = {"model": {"w": np.arange(3, dtype=np.float32)}, "__author__": "x"}
    data = pickletools.optimize(pickle.dumps(arrays, protocol=2))
    assert data[2:3] == pickle.EMPTY_DICT
    data = data[:3] + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1) + data[3:]
    path = write(tmp_path / "model.pkl", data)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert_same_checkpoint(load_checkpoint_file(path), arrays)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 256 * 1024


def test_reader_follows_content_not_extension(tmp_path):
    expected = d2_checkpoint()
    torch_as_pkl = write(tmp_path / "model.pkl", torch_bytes(expected))
    assert_same_checkpoint(load_checkpoint_file(torch_as_pkl), expected)

    arrays = {"model": {"w": np.ones(3, dtype=np.float32)}, "__author__": "x"}
    pickle_as_pth = write(tmp_path / "model.pth", pickle.dumps(arrays, protocol=4))
    assert_same_checkpoint(load_checkpoint_file(pickle_as_pth), arrays)


@contextlib.contextmanager
def terminal_stderr() -> Iterator[Callable[[], str]]:
    """Make ``sys.stderr`` a real terminal (a pseudo-terminal) inside the block; yields a function
    returning everything written to it so far."""
    main_fd, tty_fd = pty.openpty()
    os.set_blocking(main_fd, False)
    shown = []

    def drain() -> str:
        sys.stderr.flush()
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except BlockingIOError:
                break
            shown.append(chunk)
        return b"".join(shown).decode("utf-8", "replace")

    saved = sys.stderr
    with open(tty_fd, "w") as tty:
        sys.stderr = tty
        try:
            yield drain
        finally:
            sys.stderr = saved
            os.close(main_fd)


PROGRESS_FILES = ["zip.pth", "legacy.pth", "py2.pkl", "py3.pkl"]


def progress_files(tmp_path: Path):
    """(path, expected content) of a file in each format the progress reader must handle."""
    expected = d2_checkpoint()
    arrays = {"model": {"w": np.arange(10, dtype=np.float32)}, "__author__": "x"}
    contents = [
        (torch_bytes(expected), expected),
        (torch_bytes(expected, legacy=True), expected),
        (py2_pickle(arrays), arrays),
        (pickle.dumps(arrays, protocol=4), arrays),
    ]
    return [(write(tmp_path / name, data), want) for name, (data, want) in
            zip(PROGRESS_FILES, contents)]


def test_progress_bar_on_a_terminal_loads_the_same(tmp_path, monkeypatch):
    # Threshold 0: every file is "large", so on a terminal each goes through the progress reader.
    monkeypatch.setattr(serialization, "PROGRESS_MIN_BYTES", 0)
    out = tmp_path / "out" / "saved.pth"
    out.parent.mkdir()
    with terminal_stderr() as shown:
        for path, want in progress_files(tmp_path):
            assert_same_checkpoint(load_checkpoint_file(path, progress=True), want)
        save_checkpoint_file(d2_checkpoint(), str(out), progress=True)
        text = shown()
    for name in PROGRESS_FILES:
        assert f"Loading {name}" in text
    assert "Saving saved.pth" in text
    assert_same_checkpoint(load_checkpoint_file(str(out)), d2_checkpoint())


def test_no_progress_bar_without_a_terminal_or_for_small_files(tmp_path, monkeypatch, capsys):
    # Not a terminal (pytest's capture): nothing is printed, however large the file.
    monkeypatch.setattr(serialization, "PROGRESS_MIN_BYTES", 0)
    for path, want in progress_files(tmp_path):
        assert_same_checkpoint(load_checkpoint_file(path, progress=True), want)
    assert capsys.readouterr() == ("", "")

    # A terminal, but every file is smaller than the threshold: nothing is printed either.
    monkeypatch.setattr(serialization, "PROGRESS_MIN_BYTES", 1 << 30)
    with terminal_stderr() as shown:
        for path, want in progress_files(tmp_path):
            assert_same_checkpoint(load_checkpoint_file(path, progress=True), want)
        assert shown() == ""


# ------------------------------------------------------------------------------------------------
# Loading: unsafe files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["top", "inside-model-zoo-dict"])
@pytest.mark.parametrize(
    "payload, refused",
    [(_WritesFile, "io.open"), (_RunsShell, f"{os.system.__module__}.system")],
    ids=["open-w", "os.system"],
)
def test_refuses_code_in_pickle_before_it_runs(tmp_path, payload, refused, nested):
    marker = tmp_path / "created_by_pickle"
    evil = payload(str(marker))
    if nested:
        evil = {"model": {"w": np.zeros(2, dtype=np.float32), "x": evil}, "__author__": "Detectron"}
    path = write(tmp_path / "model_final.pkl", pickle.dumps(evil, protocol=2))
    before = listing(tmp_path)

    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)

    assert_names(str(info.value), path, f"`{refused}`", *TRUST_OPTIONS)
    assert not marker.exists()
    assert listing(tmp_path) == before


def test_refuses_hand_written_protocol0_pickle(tmp_path):
    marker = tmp_path / "pwned"
    data = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    path = write(tmp_path / "R-50.pkl", data)
    with pytest.raises(UnsafeCheckpointError, match=r"`os\.system`"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_refuses_codecs_other_than_latin1(tmp_path):
    # _codecs.encode is allowed only as Python 3 uses it for bytes: with latin-1.
    path = write(tmp_path / "model.pkl", b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(UnsafeCheckpointError, match="rot13"):
        load_checkpoint_file(path)


def test_trust_pickle_loads_what_is_refused_otherwise(tmp_path):
    checkpoint = {"model": {"w": np.ones(2, dtype=np.float32)}, "ratio": Fraction(1, 3)}
    path = write(tmp_path / "model.pkl", pickle.dumps(checkpoint, protocol=2))

    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    assert_names(str(info.value), path, "`fractions.Fraction`", *TRUST_OPTIONS)

    loaded = load_checkpoint_file(path, trust_pickle=True)
    assert loaded["ratio"] == Fraction(1, 3)
    assert_same_checkpoint(loaded["model"], checkpoint["model"])


def test_trusted_pickle_needing_missing_code(tmp_path):
    # Importing a module that does not exist runs nothing, so trusting this file is harmless.
    path = write(tmp_path / "model.pkl", b"cno_such_module_d2r\nThing\n)R.")
    with pytest.raises(UnsafeCheckpointError, match="`no_such_module_d2r.Thing`"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path, trust_pickle=True)
    assert_names(str(info.value), path, "code that is not available", "no_such_module_d2r")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_weights_only_refusal_and_trust(tmp_path, legacy):
    checkpoint = {"model": {"w": torch.ones(2)}, "ratio": Fraction(2, 3)}
    path = write(tmp_path / "model_final.pth", torch_bytes(checkpoint, legacy))

    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    assert_names(str(info.value), path, "`fractions.Fraction`", *TRUST_OPTIONS)

    loaded = load_checkpoint_file(path, trust_pickle=True)
    assert loaded["ratio"] == Fraction(2, 3)
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_torch_refuses_code_before_it_runs(tmp_path):
    marker = tmp_path / "created_by_torch_file"
    path = write(tmp_path / "model.pth", torch_bytes({"model": _RunsShell(str(marker))}))
    before = listing(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    assert_names(str(info.value), path, "system`", *TRUST_OPTIONS)
    assert not marker.exists()
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Loading: broken files and non-checkpoints
# ------------------------------------------------------------------------------------------------


def load_error(path: str, exact: type = CheckpointError) -> str:
    """Load ``path``, expecting exactly ``exact`` (not a subclass); return the message."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    assert type(info.value) is exact, repr(info.value)
    assert isinstance(info.value, ReclassError) and isinstance(info.value, OSError)
    return str(info.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope" / "model_final.pth")
    assert_names(load_error(path), path, "does not exist", "check the path")
    url = "https://dl.fbaipublicfiles.com/detectron2/model_final.pkl"
    assert_names(load_error(url), url, "PathManager.get_local_path")
    assert not (tmp_path / "nope").exists()


def test_directory(tmp_path):
    assert_names(load_error(str(tmp_path)), str(tmp_path), "is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "model.pth", torch_bytes(d2_checkpoint()))
    os.chmod(path, 0)
    try:
        assert_names(load_error(path), path, "Permission denied")
    finally:
        os.chmod(path, 0o644)


@pytest.mark.parametrize("name", ["model.pth", "model.pkl"])
def test_empty_file(tmp_path, name):
    path = write(tmp_path / name, b"")
    assert_names(load_error(path), path, "is empty (0 bytes)", "download or save it again")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_pth(tmp_path, legacy):
    data = torch_bytes(d2_checkpoint(), legacy)
    path = write(tmp_path / "model_final.pth", data[: len(data) // 2])
    message = load_error(path)
    assert_names(message, path, "download or save it again")
    if not legacy:  # the zip format's directory sits at the end, so a cut is recognized as such
        assert "truncated" in message


@pytest.mark.parametrize("make", [pickle.dumps, py2_pickle], ids=["py3", "py2"])
def test_truncated_pkl(tmp_path, make):
    data = make({"model": {"w": np.ones((16, 16), dtype=np.float32)}, "__author__": "x"})
    path = write(tmp_path / "model_final.pkl", data[: len(data) // 2])
    assert_names(load_error(path), path, "truncated", "download or save it again")


def test_pickle_cut_inside_a_global_name_is_truncated_not_unsafe(tmp_path):
    data = pickle.dumps({"w": np.ones(3, dtype=np.float32)}, protocol=2)
    cut = data.index(b"_reconstruct") + 4  # the GLOBAL now names "..._rec"
    path = write(tmp_path / "model.pkl", data[:cut])
    assert_names(load_error(path), path, "truncated")


def test_corrupted_pth(tmp_path):
    data = bytearray(torch_bytes(d2_checkpoint()))
    data[200:400] = bytes(200)  # zeroes over the first records' headers
    path = write(tmp_path / "model_final.pth", bytes(data))
    assert_names(load_error(path), path, "corrupted", "download or save it again")


def test_corrupted_pkl(tmp_path):
    data = bytearray(pickle.dumps({"model": {"w": np.ones(3)}}, protocol=2))
    data[2] = 0xFF  # not a pickle opcode
    path = write(tmp_path / "model_final.pkl", bytes(data))
    assert_names(load_error(path), path, "corrupted", "download or save it again")


def test_png_image(tmp_path):
    path = str(tmp_path / "model_final.pth")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, format="PNG")
    assert_names(load_error(path), path, "not a checkpoint", "looks like a PNG image")


@pytest.mark.parametrize("name", ["model.pkl", "model.pth"])
def test_json_file(tmp_path, name):
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump({"model": {"w": [1.0, 2.0]}}, f)
    assert_names(load_error(path), path, "not a checkpoint", "looks like JSON text")


@pytest.mark.parametrize("name", ["model.pkl", "model.pth"])
def test_text_file(tmp_path, name):
    path = write(tmp_path / name, b"MODEL:\n  WEIGHTS: model_final.pth\n")
    assert_names(load_error(path), path, "not a checkpoint", "looks like text")


def test_git_lfs_pointer(tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n"
    path = write(tmp_path / "model.pth", pointer)
    assert_names(load_error(path), path, "Git LFS pointer", "git lfs pull")


def test_checkpoint_without_weights(tmp_path):
    path = write(tmp_path / "last.pth", torch_bytes({"iteration": 5000}))
    loaded = load_checkpoint_file(path)  # it is a valid file ...
    with pytest.raises(CheckpointError) as info:  # ... with nothing to load into a model
        checkpoint_format(loaded, path)
    assert_names(str(info.value), path, "contains no model weights", "'model' entry", "iteration")


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------


def test_save_writes_a_loadable_file_and_nothing_else(tmp_path):
    path = str(tmp_path / "model_reclassed.pth")
    save_checkpoint_file(d2_checkpoint(), path)
    assert_same_checkpoint(load_checkpoint_file(path), d2_checkpoint())
    assert list(listing(tmp_path)) == ["model_reclassed.pth"]


def test_save_uses_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = str(tmp_path / "model.pth")
        save_checkpoint_file(d2_checkpoint(), path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_save_refuses_existing_file_unless_overwrite(tmp_path):
    path = write(tmp_path / "model.pth", b"precious bytes")
    before = listing(tmp_path)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint_file(d2_checkpoint(), path)
    assert_names(str(info.value), path, "already exists", "--force")
    assert listing(tmp_path) == before

    save_checkpoint_file(d2_checkpoint(), path, overwrite=True)
    assert_same_checkpoint(load_checkpoint_file(path), d2_checkpoint())
    assert list(listing(tmp_path)) == ["model.pth"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_save_leaves_nothing_behind(tmp_path, existing):
    path = str(tmp_path / "model.pth")
    if existing:
        write(tmp_path / "model.pth", b"the old checkpoint")
    before = listing(tmp_path)
    unpicklable = {"model": {"w": torch.ones(2)}, "hook": lambda x: x}
    with pytest.raises(CheckpointError) as info:
        save_checkpoint_file(unpicklable, path, overwrite=True)
    assert_names(str(info.value), path, "cannot be serialized", "nothing was written")
    assert listing(tmp_path) == before  # no partial file, no temporary file


def test_interrupted_save_leaves_nothing_behind(tmp_path):
    path = str(tmp_path / "model.pth")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_file({"model": {"w": torch.ones(2)}, "x": _Interrupts()}, path)
    assert listing(tmp_path) == {}


def test_save_into_missing_directory(tmp_path):
    path = str(tmp_path / "missing" / "model.pth")
    with pytest.raises(CheckpointError, match="does not exist; create it first"):
        save_checkpoint_file(d2_checkpoint(), path)
    assert listing(tmp_path) == {}


def test_save_onto_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint_file(d2_checkpoint(), str(tmp_path), overwrite=True)


def test_save_refuses_to_overwrite_its_source(tmp_path):
    source = write(tmp_path / "model_final.pth", torch_bytes(d2_checkpoint()))
    link = tmp_path / "link.pth"
    link.symlink_to(source)
    before = listing(tmp_path)
    for target in (source, str(link)):
        with pytest.raises(CheckpointError) as info:
            save_checkpoint_file({"model": {}}, target, overwrite=True, source=source)
        assert_names(str(info.value), target, "is the input checkpoint", "new path")
    assert listing(tmp_path) == before


def test_same_file(tmp_path):
    a = write(tmp_path / "a.pth", b"x")
    b = write(tmp_path / "b.pth", b"x")  # same bytes, another file
    (tmp_path / "sym.pth").symlink_to(a)
    os.link(a, tmp_path / "hard.pth")
    assert same_file(a, a)
    assert same_file(a, str(tmp_path / "." / "a.pth"))
    assert same_file(a, str(tmp_path / "sym.pth"))
    assert same_file(a, str(tmp_path / "hard.pth"))
    assert not same_file(a, b)
    assert not same_file(a, str(tmp_path / "missing.pth"))
    assert not same_file(str(tmp_path / "missing.pth"), str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------------------------
# checkpoint_format
# ------------------------------------------------------------------------------------------------

_T = torch.zeros(2)
_A = np.zeros(2, dtype=np.float32)


@pytest.mark.parametrize(
    "obj, path, expected",
    [
        ({"model": {"w": _T}, "iteration": 3}, "model_final.pth", "d2 pth"),
        ({"model": {"w": _A}, "__author__": "Detectron2 Model Zoo"}, "m.pkl", "model-zoo pkl"),
        ({"blobs": {"conv1_w": _A}}, "model_final.pkl", "caffe2 pkl"),
        ({"conv1_w": _A, "pred_b": _A}, "R-50.pkl", "caffe2 pkl"),
        ({"model_state": {"stem.conv.w": _T}, "epoch": 99}, "RegNetX-4.0GF.pyth", "pycls pyth"),
        ({"backbone.conv1.weight": _T}, "weights.pth", "state dict"),
        ({"conv1_w": _A}, "weights.pth", "state dict"),
    ],
)
def test_checkpoint_format(obj, path, expected):
    assert checkpoint_format(obj, path) == expected
    assert expected in serialization.CHECKPOINT_FORMATS


@pytest.mark.parametrize(
    "obj, found",
    [
        ({"iteration": 5}, "'iteration'"),
        ({}, "an empty dict"),
        ([_T], "a list"),
        (3, "an int"),
        ({"model": {}}, "'model' holding an empty dict"),
        ({"model": _T}, "'model' holding a Tensor"),
        ({"model": {"lr": 0.1}}, "'model' holding a dict with keys ['lr'] and no tensors"),
        ({"blobs": []}, "'blobs' holding a list"),
        ({"w": _T, "iteration": 5}, "'iteration'"),
    ],
)
def test_checkpoint_format_without_weights(obj, found):
    with pytest.raises(CheckpointError) as info:
        checkpoint_format(obj, "out/last_checkpoint.pth")
    assert_names(str(info.value), "out/last_checkpoint.pth", "contains no model weights", found)


# ------------------------------------------------------------------------------------------------
# check_state_dict
# ------------------------------------------------------------------------------------------------


def test_check_state_dict_accepts_what_detectron2_loads():
    state = OrderedDict(
        [("conv.weight", torch.randn(2, 3)), ("conv.bias", np.zeros(2, dtype=np.float32)),
         ("bn.num_batches_tracked", torch.tensor(7)), ("mask", np.ones(3, dtype=bool)),
         ("half", np.zeros(2, dtype=np.float16)), ("scalar", np.array(2.5))]
    )
    state._metadata = {"": {"version": 1}}  # what Module.state_dict() attaches
    expected = {k: v.copy() if isinstance(v, np.ndarray) else v.clone() for k, v in state.items()}
    serialization.check_state_dict(state, "model_final.pth")
    assert_same_checkpoint(state, expected)  # checked, not converted
    assert state._metadata == {"": {"version": 1}}


@pytest.mark.parametrize(
    "key, value, holds",
    [
        ("a.weight", "abc", "a str ('abc')"),
        ("a.weight", "x" * 100, "a str ('" + "x" * 30),
        ("a.weight", [1.0, 2.0], "a list of 2 items"),
        ("a.weight", None, "None"),
        ("a.weight", 3, "an int (3)"),
        ("a.weight", np.float32(0.5), "a float32 (0.5)"),
        ("a.weight", {"w": _T}, "a dict with keys ['w']"),
        ("a.weight", np.array([1, "a"], dtype=object), "a numpy array of dtype |O, which torch"),
        ("a.weight", np.array(["ab"]), "a numpy array of dtype <U2"),
        ("a.weight", np.zeros(2, dtype=">f4"), "a numpy array of dtype >f4"),
        ("a.weight", torch.eye(2).to_sparse(),
         "a torch.sparse_coo cpu tensor of dtype torch.float32"),
        ("a.weight", torch.zeros(2, device="meta"), "a torch.strided meta tensor"),
    ],
)
def test_check_state_dict_names_the_entry_that_is_no_weight(key, value, holds):
    state = {"b.weight": _T, key: value}
    with pytest.raises(CheckpointError, match="where a model parameter needs a tensor") as info:
        serialization.check_state_dict(state, "out/model.pth")
    assert_names(str(info.value), "Checkpoint out/model.pth", f"entry {key!r} holds {holds}",
                 "download or save it again", "delete that entry")


@pytest.mark.parametrize("key", [7, None, ("res2", 0), b"a.weight"])
def test_check_state_dict_refuses_keys_that_are_not_names(key):
    with pytest.raises(CheckpointError, match="parameter names are strings") as info:
        serialization.check_state_dict({"b.weight": _T, key: _T}, "out/model.pth")
    assert_names(str(info.value), "out/model.pth", f"key {key!r}", "download or save it again")


@pytest.mark.parametrize(
    "state, found",
    [({}, "an empty dict"), ([_T], "a list"), (None, "a NoneType"), (_T, "a Tensor"),
     ({"lr": 0.1, "iteration": 3}, "['lr', 'iteration'] and no tensors")],
)
def test_check_state_dict_without_weights(state, found):
    with pytest.raises(CheckpointError, match="contains no model weights") as info:
        serialization.check_state_dict(state, "out/metrics.pth")
    assert_names(str(info.value), "out/metrics.pth", found, "Check that this is a model checkpoint")
