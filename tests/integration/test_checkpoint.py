"""ReclassCheckpointer: everything DetectionCheckpointer does still holds, plus class surgery."""
import copy
import io
import logging
import math
import os
import pickle
import pickletools
import random
import re
import struct
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
from conftest import COCO_STUFF, SEMANTIC_FPN, build_model
from d2_fixtures import (
    SIX,
    THREE,
    THREE_FROM_SIX,
    StorageHandler,
    assert_same_state,
    captured_logs,
    params,
    small_model,
)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager

from d2_reclass import (
    CLASSES_KEY,
    CheckpointError,
    ClassListError,
    ClassMismatchError,
    ConfigError,
    ReclassCheckpointer,
    ReclassError,
    ReclassOptions,
    ResumeClassMismatchError,
    check_resume,
)
from d2_reclass.engine.report import ReclassReport

CLS = "roi_heads.box_predictor.cls_score.weight"
BBOX = "roi_heads.box_predictor.bbox_pred.weight"
LOGGERS = ("fvcore.common.checkpoint", "d2_reclass", "detectron2")

SIX_TO_THREE = ReclassOptions(source_classes=SIX, target_classes=THREE)


@pytest.fixture(scope="module")
def six():
    return small_model(6, seed=1)


@pytest.fixture(scope="module")
def six_pth(six, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "six.pth")
    torch.save({"model": six.state_dict()}, path)
    return path


def _expect_mapped(model, source_state):
    """THREE's rows of cls_score / bbox_pred came from SIX's, background from background."""
    new = model.state_dict()
    for t, s in enumerate(THREE_FROM_SIX):
        if s is not None:
            assert torch.equal(new[CLS][t], source_state[CLS][s])
            assert torch.equal(new[BBOX][4 * t: 4 * t + 4], source_state[BBOX][4 * s: 4 * s + 4])
    assert torch.equal(new[CLS][3], source_state[CLS][6])


def test_same_classes_load_exactly_like_detection_checkpointer(six, six_pth):
    stock, ours = small_model(6, seed=2), small_model(6, seed=3)
    DetectionCheckpointer(stock).load(six_pth)
    ckpt = ReclassCheckpointer(ours)
    ckpt.load(six_pth)
    assert_same_state(params(stock), params(ours))
    assert_same_state(params(ours), params(six))
    assert ckpt.report is not None and not ckpt.report.changed


def test_saved_names_map_with_no_source_key_and_nothing_is_skipped(six, tmp_path):
    options = ReclassOptions(target_classes=SIX)
    ReclassCheckpointer(six, str(tmp_path), reclass=options).save("model_final", iteration=9)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert saved[CLASSES_KEY] == {"thing_classes": SIX}
    assert saved["iteration"] == 9

    target = small_model(3, seed=4)
    ckpt = ReclassCheckpointer(target, reclass=ReclassOptions(target_classes=THREE))
    with captured_logs(*LOGGERS) as logs:
        ckpt.load(str(tmp_path / "model_final.pth"))
    _expect_mapped(target, six.state_dict())
    assert not [m for m in logs if "Skip loading parameter" in m]
    assert any("triangle       | triangle [2]" in m for m in logs), logs
    space = ckpt.report.spaces["thing"]
    assert space.resolution == "map" and space.mapping.new == ["star"]
    assert ckpt.report.tensor(CLS).action == "mapped"


def test_stock_checkpointer_skips_what_reclass_maps(six_pth):
    """The problem this package exists for, shown on the same file."""
    stock = small_model(3, seed=4)
    before = params(stock)
    with captured_logs(*LOGGERS) as logs:
        DetectionCheckpointer(stock).load(six_pth)
    assert any("Skip loading parameter" in m and CLS in m for m in logs)
    assert torch.equal(stock.state_dict()[CLS], before[CLS])


def test_model_zoo_pkl_maps_with_source_classes(six, tmp_path):
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        state = {k: v.numpy() for k, v in six.state_dict().items()}
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    target = small_model(3, seed=4)
    ReclassCheckpointer(target, reclass=SIX_TO_THREE).load(str(path))
    _expect_mapped(target, six.state_dict())


def test_caffe2_pkl_background_first_rows_are_mapped(tmp_path):
    """Detectron1 keeps background at row 0; detectron2's conversion moves it last, and the
    name-matching heuristics must not drop the class rows whose count differs."""
    rng = np.random.default_rng(0)
    cls_w = rng.normal(size=(7, 256)).astype(np.float32)  # bg + 6 classes
    bbox_w = rng.normal(size=(28, 256)).astype(np.float32)  # (bg + 6) * 4
    blobs = {"cls_score_w": cls_w, "cls_score_b": rng.normal(size=7).astype(np.float32),
             "bbox_pred_w": bbox_w, "bbox_pred_b": rng.normal(size=28).astype(np.float32)}
    path = tmp_path / "c2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    target = small_model(3, seed=4)
    with captured_logs(*LOGGERS) as logs:
        ReclassCheckpointer(target, reclass=SIX_TO_THREE).load(str(path))
    new = target.state_dict()
    assert torch.equal(new[CLS][0], torch.from_numpy(cls_w[1 + 2]))  # triangle
    assert torch.equal(new[CLS][1], torch.from_numpy(cls_w[1 + 0]))  # square
    assert torch.equal(new[CLS][3], torch.from_numpy(cls_w[0]))  # background, moved last
    assert torch.equal(new[BBOX][0:4], torch.from_numpy(bbox_w[4 + 8: 4 + 12]))
    assert not [m for m in logs if "will not be loaded" in m]


def test_matching_heuristics_query_pairs_keys_by_suffix(six, tmp_path):
    stripped = {k.split(".", 1)[1]: v for k, v in six.state_dict().items()
                if not k.startswith("pixel_")}
    path = tmp_path / "stripped.pth"
    torch.save({"model": stripped}, path)
    target = small_model(3, seed=4)
    ReclassCheckpointer(target, reclass=SIX_TO_THREE).load(
        f"{path}?matching_heuristics=True")
    _expect_mapped(target, six.state_dict())
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(target.state_dict()[key], six.state_dict()[key])


def test_custom_path_manager_handler_and_module_prefix(six, tmp_path):
    torch.save({"model": {"module." + k: v for k, v in six.state_dict().items()}},
               tmp_path / "ddp.pth")
    if StorageHandler.PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(StorageHandler(tmp_path))
    PathManager._path_handlers[StorageHandler.PREFIX].root = tmp_path
    model = small_model(6, seed=5)
    ReclassCheckpointer(model).load(StorageHandler.PREFIX + "ddp.pth")
    assert_same_state(params(model), params(six))


def test_pixel_mean_and_cell_anchor_keys_are_not_reported(six):
    state = {k: v for k, v in six.state_dict().items() if not k.startswith("pixel_")}
    state["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)
    incompatible = ReclassCheckpointer(small_model(6))._load_model({"model": state})
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []


def test_resume_does_no_surgery_and_restores_iteration(six, tmp_path):
    opt = torch.optim.SGD(six.parameters(), lr=0.1)
    options = ReclassOptions(target_classes=SIX)
    ReclassCheckpointer(six, str(tmp_path), reclass=options, optimizer=opt).save(
        "model_0000004", iteration=4)
    model = small_model(6, seed=6)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    options = ReclassOptions(target_classes=SIX)
    ckpt = ReclassCheckpointer(model, str(tmp_path), reclass=options, optimizer=opt2)
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 4 and ckpt.report is None
    assert_same_state(params(model), params(six))


def test_resume_with_changed_classes_is_one_clear_error(six, tmp_path):
    options = ReclassOptions(target_classes=SIX)
    ReclassCheckpointer(six, str(tmp_path), reclass=options).save("model_0000004")
    model = small_model(3, seed=7)
    before = params(model)
    ckpt = ReclassCheckpointer(model, str(tmp_path), reclass=ReclassOptions(target_classes=THREE))
    with pytest.raises(ResumeClassMismatchError, match="Use a new OUTPUT_DIR, or start without "
                       "--resume") as e:
        ckpt.resume_or_load("", resume=True)
    msg = str(e.value)
    assert msg.startswith(f"Cannot resume from {tmp_path / 'model_0000004.pth'}: it was trained "
                          "for other classes than the model's (thing classes: checkpoint 6, "
                          "model 3 (checkpoint: square, circle, triangle, diamond, hexagon, "
                          "cross; model: triangle, square, star)).")
    assert f"{CLS}: checkpoint (7, 256), model (4, 256)" in msg
    # Nothing of strict mode's advice, which would contradict "start without --resume".
    assert "strict" not in msg and "set MODEL.RECLASS.MODE" not in msg
    assert_same_state(params(model), before)


def test_resume_with_reordered_classes_says_another_order(six, tmp_path):
    ReclassCheckpointer(six, str(tmp_path), reclass=ReclassOptions(target_classes=SIX)).save(
        "model_0000004")
    options = ReclassOptions(target_classes=SIX[::-1])
    ckpt = ReclassCheckpointer(small_model(6, seed=7), str(tmp_path), reclass=options)
    with pytest.raises(ResumeClassMismatchError, match=r"the same 6 classes in another order "
                       r"\(checkpoint: square, circle, .*; model: cross, hexagon, "):
        ckpt.resume_or_load("", resume=True)


def test_check_resume_reads_stored_names_before_anything_is_written(six, tmp_path):
    ReclassCheckpointer(six, str(tmp_path), reclass=ReclassOptions(target_classes=SIX)).save(
        "model_0000004")
    with open(tmp_path / "last_checkpoint", "w") as f:
        f.write("model_0000004.pth")
    files = sorted(os.listdir(tmp_path))
    check_resume(str(tmp_path), SIX)  # same classes: resuming is fine
    with pytest.raises(ResumeClassMismatchError, match=r"model_0000004.pth: it was trained for "
                       r"other classes than the model's \(thing classes: the same 6 classes in "
                       r"another order"):
        check_resume(str(tmp_path), SIX[::-1])
    check_resume(str(tmp_path / "elsewhere"), THREE)  # nothing to resume from
    assert sorted(os.listdir(tmp_path)) == files


def test_only_takes_the_backbone_of_a_mask_rcnn_into_a_retinanet(tmp_path):
    mask_rcnn = small_model(6, seed=1, mask=True)
    torch.save({"model": mask_rcnn.state_dict()}, tmp_path / "mask.pth")
    retina = small_model(3, seed=2, opts=[
        "MODEL.META_ARCHITECTURE", "RetinaNet",
        "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"])
    before = params(retina)
    options = ReclassOptions(only=["backbone.bottom_up."])
    ReclassCheckpointer(retina, reclass=options).load(str(tmp_path / "mask.pth"))
    after, source = retina.state_dict(), mask_rcnn.state_dict()
    key = "backbone.bottom_up.res4.0.conv1.weight"
    assert torch.equal(after[key], source[key])
    assert torch.equal(after["head.cls_score.weight"], before["head.cls_score.weight"])
    lateral = "backbone.fpn_lateral2.weight"
    assert torch.equal(after[lateral], before[lateral])


def test_rename_moves_prefixes(six, tmp_path):
    torch.save({"model": {"detector." + k: v for k, v in six.state_dict().items()}},
               tmp_path / "wrapped.pth")
    model = small_model(6, seed=8)
    options = ReclassOptions(rename=["detector.="])
    ReclassCheckpointer(model, reclass=options).load(str(tmp_path / "wrapped.pth"))
    assert_same_state(params(model), params(six))


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"only": ["bakbone."]}, ReclassError, "ONLY prefix 'bakbone.' matches no checkpoint key"),
    ({"rename": ["backbone"]}, ConfigError,
     "reclass option 'rename' entry 'backbone' is not of the form 'old_prefix=new_prefix'"),
    ({"mode": "map", "target_classes": THREE}, ClassListError, "SOURCE_CLASSES or SOURCE_DATASET"),
    ({"mode": "strict"}, ClassMismatchError, "checkpoint 6, model 3"),
    ({"source_classes": SIX[:5], "target_classes": THREE}, ClassListError,
     "SOURCE_CLASSES has 5 names, but .* has heads for 6"),
    ({"source_classes": SIX, "target_classes": ["triangel", "square", "star"]}, ClassListError,
     "Did you mean 'triangle'"),
])
def test_bad_input_is_one_error_and_leaves_the_model_untouched(six_pth, kwargs, exc, message):
    model = small_model(3, seed=9)
    before = params(model)
    with pytest.raises(exc, match=message):
        ReclassCheckpointer(model, reclass=ReclassOptions(**kwargs)).load(six_pth)
    assert_same_state(params(model), before)


@pytest.mark.parametrize("keyword, value", [("mode", "map"), ("target_classes", THREE)])
def test_options_as_keywords_are_one_config_error(keyword, value):
    """DetectionCheckpointer takes every extra keyword for a checkpointable; an option passed
    that way is named, with the one keyword that takes it."""
    with pytest.raises(ConfigError) as info:
        ReclassCheckpointer(small_model(3), **{keyword: value})
    assert str(info.value) == (
        f"ReclassCheckpointer(..., {keyword}={value!r}): the reclass options are one keyword, "
        f"reclass=ReclassOptions({keyword}={value!r}); any other keyword is a checkpointable "
        "(an object with state_dict()), as for DetectionCheckpointer.")


def test_an_option_named_checkpointable_with_state_dict_is_still_one():
    model, other = small_model(3), small_model(3, seed=4)
    assert ReclassCheckpointer(model, mode=other).checkpointables["mode"] is other


def test_class_map_applies_to_stuff_heads(tmp_path):
    """One CLASS_MAP for both spaces, as the README says: a merge and a rename of stuff classes
    (which used to come out fresh: the stuff space got no class map)."""
    src = build_model(SEMANTIC_FPN, stuff_classes=len(COCO_STUFF), seed=1)
    torch.save({"model": src.state_dict(), CLASSES_KEY: {"stuff_classes": COCO_STUFF}},
               tmp_path / "stuff.pth")
    model = build_model(SEMANTIC_FPN, stuff_classes=3, seed=2)
    checkpointer = ReclassCheckpointer(model, reclass=ReclassOptions(
        target_stuff_classes=["things", "open water", "heaven"],
        class_map=["open water=river+sea+water", "heaven=sky"]))
    checkpointer.load(str(tmp_path / "stuff.pth"))
    w, b = (model.state_dict()[f"sem_seg_head.predictor.{p}"] for p in ("weight", "bias"))
    sw, sb = (src.state_dict()[f"sem_seg_head.predictor.{p}"] for p in ("weight", "bias"))
    parts = [COCO_STUFF.index(c) for c in ("river", "sea", "water")]
    sky = COCO_STUFF.index("sky")
    assert torch.equal(w[0], sw[0]) and torch.equal(w[2], sw[sky]) and torch.equal(b[2], sb[sky])
    # A classifier's merge: mean of the parts, bias + log 3.
    torch.testing.assert_close(w[1].double(), sw[parts].double().mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(b[1].double(), sb[parts].double().mean() + math.log(3), rtol=0,
                               atol=1e-6)
    table = checkpointer.report.mapping_table()
    assert "| open water     | river [20] + sea [24] + water [34] (merged)" in table
    assert "| heaven         | sky [40]" in table


def test_unrecognised_mismatch_is_a_warning_and_skipped_as_stock(six, six_pth):
    """A tensor of another shape that no layout claims: listed, warned about, skipped."""
    model = small_model(6, opts=["MODEL.FPN.OUT_CHANNELS", 128], seed=2)
    key = "backbone.fpn_lateral2.weight"
    before = model.state_dict()[key].clone()
    shapes = tuple(six.state_dict()[key].shape), tuple(before.shape)
    assert shapes == ((64, 64, 1, 1), (128, 64, 1, 1))
    checkpointer = ReclassCheckpointer(model, reclass=ReclassOptions(mode="map",
                                                                     source_classes=SIX,
                                                                     target_classes=SIX))
    with captured_logs(*LOGGERS) as logs:
        checkpointer.load(six_pth)
    assert key in {t.key for t in checkpointer.report.unrecognised}
    assert torch.equal(model.state_dict()[key], before)
    warned = [m for m in logs if m.startswith("[ReclassCheckpointer]") and "no class layout" in m]
    assert len(warned) == 1 and f"{key} (64, 64, 1, 1) -> (128, 64, 1, 1)" in warned[0]
    assert "register its layout (d2_reclass.register_layout)" in warned[0]
    with pytest.raises(ClassMismatchError, match=rf"{key}: checkpoint \(64, 64, 1, 1\), model "
                       r"\(128, 64, 1, 1\) \(not recognised\)"):
        ReclassCheckpointer(model, reclass=ReclassOptions(mode="strict")).load(six_pth)


def test_resume_with_a_changed_config_names_the_config_not_classes(six, tmp_path):
    torch.save({"model": six.state_dict(), CLASSES_KEY: {"thing_classes": SIX}},
               tmp_path / "model_0000009.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    model = small_model(6, opts=["MODEL.FPN.OUT_CHANNELS", 128], seed=2)
    before = params(model)
    with pytest.raises(CheckpointError, match=r"^Cannot resume from .*model_0000009\.pth: "
                       r"tensors have another shape than the model's, and not because of "
                       r"classes .*\n  backbone\.fpn_lateral2\.weight: checkpoint \(64, 64, 1, "
                       r"1\), model \(128, 64, 1, 1\) \(not recognised\)"):
        ReclassCheckpointer(model, str(tmp_path), reclass=ReclassOptions(
            target_classes=SIX)).resume_or_load("", resume=True)
    assert_same_state(params(model), before)


def test_missing_file_names_the_key_to_fix(tmp_path):
    with pytest.raises(CheckpointError, match="not found. Check MODEL.WEIGHTS"):
        ReclassCheckpointer(small_model(3)).load(str(tmp_path / "nope.pth"))


def test_source_dataset_gives_coco_names(tmp_path):
    from detectron2.data import MetadataCatalog

    coco = MetadataCatalog.get("coco_2017_train").thing_classes
    src = small_model(80, seed=1)
    torch.save({"model": src.state_dict()}, tmp_path / "coco.pth")
    target = small_model(3, seed=2)
    options = ReclassOptions(source_dataset="coco_2017_train",
                             target_classes=["dog", "person", "gadget"])
    ReclassCheckpointer(target, reclass=options).load(str(tmp_path / "coco.pth"))
    new, old = target.state_dict(), src.state_dict()
    assert torch.equal(new[CLS][0], old[CLS][coco.index("dog")])
    assert torch.equal(new[CLS][1], old[CLS][0])
    assert torch.equal(new[CLS][3], old[CLS][80])


def test_an_unasked_reinit_is_a_warning_naming_the_keys(six, tmp_path):
    torch.save({"model": six.state_dict()}, tmp_path / "nameless.pth")
    with captured_logs(*LOGGERS) as logs:
        ReclassCheckpointer(small_model(3)).load(str(tmp_path / "nameless.pth"))
    assert any("nameless.pth: every thing class row is re-initialised (6 -> 3 classes), because "
               "the thing class names of the checkpoint or of the model are unknown. To keep the "
               "rows of the classes the two share, give both: MODEL.RECLASS.SOURCE_CLASSES" in m
               for m in logs)
    for options in (ReclassOptions(mode="reinit"),
                    ReclassOptions(source_classes=SIX, target_classes=THREE)):
        with captured_logs(*LOGGERS) as logs:
            ReclassCheckpointer(small_model(3), reclass=options).load(
                str(tmp_path / "nameless.pth"))
        assert not any("re-initialised" in m for m in logs)


def test_non_finite_class_rows_are_named_in_a_warning(six, tmp_path):
    state = {k: v.clone() for k, v in six.state_dict().items()}
    state[CLS][2, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pth")
    with captured_logs(*LOGGERS) as logs:
        ReclassCheckpointer(small_model(6)).load(str(tmp_path / "nan.pth"))
    assert any(CLS in m and "NaN or Inf" in m for m in logs)


# ------------------------------------------------------------------------------------------------
# Damaged and edited checkpoints: a clean load or one ReclassError, the model untouched
# ------------------------------------------------------------------------------------------------

STEM = "backbone.bottom_up.stem.conv1.weight"
FORMATS = ("pth", "pkl")


def mutation_source(six) -> Dict[str, Any]:
    """The checkpoint every mutation starts from: the six-class model's tensors of at most 64k
    elements (its big convolutions would only make every file slower to write), its class
    names, and entries detectron2 passes through untouched."""
    state = {k: v for k, v in six.state_dict().items() if v.numel() <= 65536}
    assert CLS in state and BBOX in state and STEM in state
    return {"model": state, "iteration": 9, "__author__": "d2_reclass tests",
            CLASSES_KEY: {"thing_classes": list(SIX)}}


def as_numpy(obj: Any) -> Any:
    """``obj`` with every tensor a numpy array, as model-zoo ``.pkl`` files hold them."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: as_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_numpy(v) for v in obj)
    return obj


def checkpoint_bytes(obj: Any, fmt: str) -> bytes:
    """``obj`` as a ``.pth`` (torch.save) or a model-zoo ``.pkl`` (pickle protocol 2)."""
    buf = io.BytesIO()
    if fmt == "pth":
        torch.save(obj, buf)
    else:
        pickle.dump(as_numpy(obj), buf, protocol=2)
    return buf.getvalue()


def payload_ranges(data: bytes, fmt: str) -> List[Tuple[int, int]]:
    """Where ``data`` holds raw tensor bytes; everything else is structure (names, shapes,
    dtypes, zip records, pickle opcodes), where a flipped byte changes more than a value."""
    if fmt == "pth":
        ranges = []
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if "/data/" in info.filename:
                    start = info.header_offset + 30 + sum(
                        struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30]))
                    ranges.append((start, start + info.compress_size))
        return ranges
    ops = [pos for _, _, pos in pickletools.genops(data)] + [len(data)]
    # Array bytes are the argument of one opcode; its first bytes (opcode, length) stay structure.
    return [(a + 9, b) for a, b in zip(ops, ops[1:]) if b - a > 64]


def structure_offsets(data: bytes, fmt: str) -> List[int]:
    payload = sorted(payload_ranges(data, fmt))
    offsets, at = [], 0
    for start, end in payload:
        offsets.extend(range(at, start))
        at = end
    offsets.extend(range(at, len(data)))
    return offsets


def byte_mutations(data: bytes, fmt: str, rng: random.Random, flips: int, cuts: int,
                   inserts: int) -> Iterator[Tuple[str, bytes]]:
    """(description, damaged bytes): flipped bytes, truncations, inserted junk; three in four
    aimed at the structure, the rest anywhere."""
    structure = structure_offsets(data, fmt)

    def offset() -> int:
        return rng.choice(structure) if rng.random() < 0.75 else rng.randrange(len(data))

    for _ in range(flips):
        at, mask = offset(), rng.randrange(1, 256)
        damaged = bytearray(data)
        damaged[at] ^= mask
        yield f"{fmt} byte {at} ^= {mask:#x}", bytes(damaged)
    for _ in range(cuts):
        at = rng.randrange(1, len(data))
        yield f"{fmt} cut to {at} bytes", data[:at]
    for _ in range(inserts):
        at, junk = offset(), bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
        yield f"{fmt} {len(junk)} junk bytes at {at}", data[:at] + junk + data[at:]


def _put(key: Any, value: Any) -> Callable[[Dict[str, Any]], Any]:
    def edit(ckpt):
        ckpt["model"][key] = value
        return ckpt
    return edit


def _top(key: str, value: Any) -> Callable[[Dict[str, Any]], Any]:
    def edit(ckpt):
        ckpt[key] = value
        return ckpt
    return edit


def _without(key: str) -> Callable[[Dict[str, Any]], Any]:
    def edit(ckpt):
        del ckpt[key]
        return ckpt
    return edit


def _prefixed(ckpt):
    ckpt["model"] = {"module." + k: v for k, v in ckpt["model"].items()}
    return ckpt


NO_WEIGHTS = "contains no model weights"
#: (what, formats, edit of the loaded checkpoint, None for a clean load or what the
#: CheckpointError must say). numpy values only go into .pkl files: in a .pth torch's safe
#: loader refuses numpy already, which the byte mutations cover.
STRUCTURAL_EDITS = [
    ("str value", FORMATS, _put(CLS, "weights"), rf"entry '{CLS}' holds a str \('weights'\)"),
    ("list value", FORMATS, _put(STEM, [0.5, 1.5]), rf"entry '{STEM}' holds a list of 2 items"),
    ("None value", FORMATS, _put(BBOX, None), rf"entry '{BBOX}' holds None"),
    ("int value", FORMATS, _put(CLS, 3), rf"entry '{CLS}' holds an int \(3\)"),
    ("float value", FORMATS, _put(STEM, 0.25), rf"entry '{STEM}' holds a float \(0.25\)"),
    ("bytes value", FORMATS, _put(CLS, b"\x00\x01"), rf"entry '{CLS}' holds a bytes"),
    ("tuple value", FORMATS, _put(BBOX, (torch.zeros(2), torch.ones(2))),
     rf"entry '{BBOX}' holds a tuple of 2 items"),
    ("nested dict value", FORMATS, _put(CLS, {"weight": torch.zeros(7, 256)}),
     rf"entry '{CLS}' holds a dict with keys \['weight'\]"),
    ("new non-tensor key", FORMATS, _put("roi_heads.note", "trained on shapes"),
     r"entry 'roi_heads.note' holds a str"),
    ("object array", ("pkl",), _put(CLS, np.array([1, "a", None], dtype=object)),
     rf"entry '{CLS}' holds a numpy array of dtype \|O, which torch cannot hold"),
    ("string array", ("pkl",), _put(STEM, np.array(["ab", "cd"])),
     rf"entry '{STEM}' holds a numpy array of dtype <U2"),
    ("datetime array", ("pkl",), _put(CLS, np.array(["2024-05-01"], dtype="M8[D]")),
     rf"entry '{CLS}' holds a numpy array of dtype <M8\[D\]"),
    ("numpy scalar", ("pkl",), _put(BBOX, np.float32(2.5)),
     rf"entry '{BBOX}' holds a float32 \(2.5\)"),
    ("sparse tensor", ("pth",), _put(CLS, torch.eye(7, 256).to_sparse()),
     rf"entry '{CLS}' holds a torch.sparse_coo cpu tensor"),
    ("meta tensor", ("pth",), _put(STEM, torch.empty(64, 3, 7, 7, device="meta")),
     rf"entry '{STEM}' holds a torch.strided meta tensor"),
    ("int key", FORMATS, _put(7, torch.zeros(3)), r"state dict key 7 \(an int\)"),
    ("tuple key", FORMATS, _put(("res2", 0), torch.zeros(3)), r"state dict key \('res2', 0\)"),
    ("None key", FORMATS, _put(None, torch.zeros(3)), r"state dict key None"),
    ("model a list", FORMATS, lambda c: _top("model", list(c["model"].values()))(c),
     rf"{NO_WEIGHTS}.*found a list"),
    ("model a tensor", ("pth",), _top("model", torch.zeros(3)), rf"{NO_WEIGHTS}.*found a Tensor"),
    ("model a str", FORMATS, _top("model", "weights"), rf"{NO_WEIGHTS}.*found a str"),
    ("model None", FORMATS, _top("model", None), rf"{NO_WEIGHTS}.*found a NoneType"),
    ("model empty", FORMATS, _top("model", {}), rf"{NO_WEIGHTS}.*found an empty dict"),
    ("model without tensors", FORMATS, _top("model", {"lr": 0.02, "momentum": 0.9}),
     rf"{NO_WEIGHTS}.*'lr', 'momentum'\] and no tensors"),
    ("no 'model'", FORMATS, _without("model"), rf"{NO_WEIGHTS}.*'iteration'"),
    ("checkpoint a list", FORMATS, lambda c: [c["model"]], rf"{NO_WEIGHTS}.*found a list"),
    ("checkpoint None", FORMATS, lambda c: None, rf"{NO_WEIGHTS}.*found a NoneType"),
    ("checkpoint an int", FORMATS, lambda c: 7, rf"{NO_WEIGHTS}.*found an int"),
    ("checkpoint a tensor", ("pth",), lambda c: c["model"][CLS], rf"{NO_WEIGHTS}.*a Tensor"),
    ("stored classes a str", FORMATS, _top(CLASSES_KEY, "square,circle"),
     rf"'{CLASSES_KEY}' entry holds 'square,circle'"),
    ("stored classes a list", FORMATS, _top(CLASSES_KEY, SIX), rf"'{CLASSES_KEY}' entry holds \["),
    ("stored class list a str", FORMATS, _top(CLASSES_KEY, {"thing_classes": "square"}),
     rf"'{CLASSES_KEY}' entry holds \{{'thing_classes': 'square'\}}"),
    ("stored class names ints", FORMATS, _top(CLASSES_KEY, {"thing_classes": [1, 2, 3]}),
     rf"'{CLASSES_KEY}' entry holds"),
    ("stored class list None", FORMATS, _top(CLASSES_KEY, {"stuff_classes": None}),
     rf"'{CLASSES_KEY}' entry holds"),
    # What detectron2 passes through or converts must keep loading.
    ("as saved", FORMATS, lambda c: c, None),
    ("extras of any type", FORMATS,
     lambda c: {**c, "iteration": "nine", "scheduler": None, "cfg": "MODEL:\n  MASK_ON: False",
                "__author__": 5, "trainer": [1, 2]}, None),
    ("other items beside the class names", FORMATS,
     _top(CLASSES_KEY, {"thing_classes": SIX, "note": 5, 3: None}), None),
    ("module. prefix", FORMATS, _prefixed, None),
    ("no stored classes", FORMATS, _without(CLASSES_KEY), None),
]


@pytest.fixture(scope="module")
def three():
    """One three-class target for every mutation: a failed load must leave it as it was, and a
    clean one maps it afresh, so cases do not depend on each other."""
    return small_model(3, seed=10)


def _load_outcome(model, path: str) -> Optional[ReclassError]:
    """Load ``path`` into ``model`` (SIX -> THREE by name); the ReclassError, or None if it
    loaded. Any other exception propagates."""
    ckpt = ReclassCheckpointer(model, reclass=SIX_TO_THREE)
    try:
        ckpt.load(path)
    except ReclassError as e:
        return e
    return None


# torch notes that it validates the sparse tensor one edit stores; that is expected here.
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("what, formats, edit, expected", STRUCTURAL_EDITS,
                         ids=[e[0] for e in STRUCTURAL_EDITS])
def test_edited_checkpoint_loads_or_is_one_checkpoint_error(six, three, tmp_path, what, formats,
                                                           edit, expected):
    model = three
    for fmt in formats:
        path = str(tmp_path / f"edited.{fmt}")
        with open(path, "wb") as f:
            f.write(checkpoint_bytes(edit(copy.deepcopy(mutation_source(six))), fmt))
        before = params(model)
        with captured_logs(*LOGGERS):  # a clean load warns of the keys the edit left out
            error = _load_outcome(model, path)
        if expected is None:
            assert error is None, f"{fmt}: {error}"
            _expect_mapped(model, six.state_dict())
            continue
        assert isinstance(error, CheckpointError), f"{fmt}: {error!r}"
        assert re.search(expected, str(error)), f"{fmt}: {error}"
        assert path in str(error)
        assert_same_state(params(model), before)


def test_entries_detectron2_drops_by_name_may_hold_anything(six, tmp_path):
    """Caffe2 ``*_momentum`` blobs and pycls ``*num_batches_tracked`` entries are dropped before
    any type check, by stock DetectionCheckpointer and so here: whatever they hold, they load."""
    rng = np.random.default_rng(1)
    cls_w = rng.normal(size=(7, 256)).astype(np.float32)
    c2 = tmp_path / "c2.pkl"
    with open(c2, "wb") as f:
        pickle.dump({"blobs": {"cls_score_w": cls_w, "cls_score_b": np.zeros(7, np.float32),
                               "cls_score_w_momentum": "not kept", "cls_score_b_momentum": None},
                     "cfg": "MODEL:\n  TYPE: generalized_rcnn"}, f, protocol=2)
    pycls = tmp_path / "pycls.pyth"
    torch.save({"model_state": {**six.state_dict(), "stem.bn.num_batches_tracked": "not kept"},
                "epoch": 99}, pycls)
    for path in (c2, pycls):
        DetectionCheckpointer(small_model(6, seed=11)).load(str(path))  # stock loads it too

    target = small_model(3, seed=12)
    ReclassCheckpointer(target, reclass=SIX_TO_THREE).load(str(c2))
    assert torch.equal(target.state_dict()[CLS][0], torch.from_numpy(cls_w[1 + 2]))  # triangle
    target = small_model(3, seed=12)
    ReclassCheckpointer(target, reclass=SIX_TO_THREE).load(str(pycls))
    _expect_mapped(target, six.state_dict())


def run_byte_mutations(six, model, tmp_path, seed: int, flips: int, cuts: int,
                       inserts: int) -> Dict[str, int]:
    """Load every byte mutation of both formats into ``model``; count outcomes. Fails on any
    exception that is not a ReclassError, and on any change to the model by a load that
    failed."""
    rng = random.Random(seed)
    before = params(model)
    counts = {"loaded": 0, "CheckpointError": 0, "other ReclassError": 0}
    for fmt in FORMATS:
        data = checkpoint_bytes(mutation_source(six), fmt)
        for i, (what, damaged) in enumerate(byte_mutations(data, fmt, rng, flips, cuts, inserts)):
            path = str(tmp_path / f"damaged{i}.{fmt}")
            with open(path, "wb") as f:
                f.write(damaged)
            try:
                with captured_logs(*LOGGERS):
                    error = _load_outcome(model, path)
            except Exception as e:  # anything but a ReclassError is the bug this test is for
                pytest.fail(f"{what}: {type(e).__module__}.{type(e).__name__} escaped: {e}")
            os.unlink(path)
            if error is None:
                counts["loaded"] += 1
                before = params(model)  # a damaged value may load; later cases start from it
                continue
            assert_same_state(params(model), before)
            if isinstance(error, CheckpointError):
                counts["CheckpointError"] += 1
                assert path in str(error), f"{what}: {error}"
            else:
                counts["other ReclassError"] += 1
    return counts


def test_damaged_bytes_load_or_are_one_reclass_error(six, three, tmp_path):
    """Seeded byte flips, truncations and inserted junk in a .pth and a model-zoo .pkl."""
    counts = run_byte_mutations(six, three, tmp_path, seed=0, flips=60, cuts=20, inserts=20)
    assert sum(counts.values()) == 200
    # Both outcomes happen: the mutations reach the structure, and damage to values alone loads.
    assert counts["CheckpointError"] >= 50 and counts["loaded"] >= 10, counts


@pytest.mark.slow
def test_many_damaged_bytes_load_or_are_one_reclass_error(six, three, tmp_path):
    counts = run_byte_mutations(six, three, tmp_path, seed=1, flips=600, cuts=200, inserts=200)
    assert sum(counts.values()) == 2000
    assert counts["CheckpointError"] >= 500 and counts["loaded"] >= 100, counts


def test_a_1203_class_load_logs_one_screen_that_names_the_report_file(tmp_path):
    lvis = list(MetadataCatalog.get("lvis_v1_train").thing_classes)
    source = small_model(1203, seed=1)
    path = tmp_path / "lvis.pth"
    torch.save({"model": source.state_dict()}, path)
    target = small_model(1203, seed=2)
    ckpt = ReclassCheckpointer(target, reclass=ReclassOptions(source_classes=lvis,
                                                              target_classes=lvis[::-1]))
    ckpt.report_file = str(tmp_path / "out" / "reclass_report.json")
    with captured_logs(*LOGGERS) as logs:
        ckpt.load(str(path))
    [text] = [m for m in logs if m.startswith("[ReclassCheckpointer]")]
    assert "\nthing: 1 kept, 1202 reordered, 0 merged, 0 new, 0 dropped\n" in text
    assert f"(1203 rows in all; every row is in {ckpt.report_file}):" in text
    assert f"| {lvis[1202]} " in text and f"| {lvis[1196]} " not in text
    assert len(text.splitlines()) < 30
    order = list(range(1203))[::-1] + [1203]
    assert torch.equal(target.state_dict()[CLS], source.state_dict()[CLS][order])


def test_the_report_is_formatted_only_when_the_log_shows_it(six_pth, monkeypatch):
    def refuse(self, full_report=""):
        raise AssertionError("the report was formatted")

    monkeypatch.setattr(ReclassReport, "log_text", refuse)
    package = logging.getLogger("d2_reclass")
    level = package.level
    try:
        package.setLevel(logging.WARNING)
        target = small_model(3, seed=4)
        ReclassCheckpointer(target, reclass=SIX_TO_THREE).load(six_pth)
        assert target.state_dict()[CLS].shape[0] == 4  # loaded, mapped, nothing formatted
        package.setLevel(logging.INFO)
        with pytest.raises(AssertionError, match="the report was formatted"):
            ReclassCheckpointer(small_model(3, seed=4), reclass=SIX_TO_THREE).load(six_pth)
    finally:
        package.setLevel(level)
