"""ReclassCheckpointer: everything DetectionCheckpointer does still holds, plus class surgery."""
import os
import pickle

import numpy as np
import pytest
import torch
from d2_fixtures import (
    SIX,
    THREE,
    THREE_FROM_SIX,
    assert_same_state,
    captured_logs,
    params,
    small_model,
)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

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

CLS = "roi_heads.box_predictor.cls_score.weight"
BBOX = "roi_heads.box_predictor.bbox_pred.weight"
LOGGERS = ("fvcore.common.checkpoint", "d2_reclass", "detectron2")


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
    ReclassCheckpointer(six, str(tmp_path),
        reclass=ReclassOptions(target_classes=SIX)).save("model_final", iteration=9)
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
    ReclassCheckpointer(target,
        reclass=ReclassOptions(source_classes=SIX, target_classes=THREE)).load(str(path))
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
        ReclassCheckpointer(target,
            reclass=ReclassOptions(source_classes=SIX, target_classes=THREE)).load(str(path))
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
    ReclassCheckpointer(target,
        reclass=ReclassOptions(source_classes=SIX, target_classes=THREE)).load(
        f"{path}?matching_heuristics=True")
    _expect_mapped(target, six.state_dict())
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(target.state_dict()[key], six.state_dict()[key])


class _TestHandler(PathHandler):
    """A custom PathManager prefix, as users register for their storage."""

    PREFIX = "reclass-test://"

    def __init__(self, root):
        super().__init__()
        self.root = root

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return str(self.root / path[len(self.PREFIX):])

    def _open(self, path, mode="r", **kwargs):
        return open(self._get_local_path(path), mode)

    def _exists(self, path, **kwargs):
        return (self.root / path[len(self.PREFIX):]).exists()


def test_custom_path_manager_handler_and_module_prefix(six, tmp_path):
    torch.save({"model": {"module." + k: v for k, v in six.state_dict().items()}},
               tmp_path / "ddp.pth")
    if _TestHandler.PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(_TestHandler(tmp_path))
    PathManager._path_handlers[_TestHandler.PREFIX].root = tmp_path
    model = small_model(6, seed=5)
    ReclassCheckpointer(model).load(_TestHandler.PREFIX + "ddp.pth")
    assert_same_state(params(model), params(six))


def test_pixel_mean_and_cell_anchor_keys_are_not_reported(six):
    state = {k: v for k, v in six.state_dict().items() if not k.startswith("pixel_")}
    state["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)
    incompatible = ReclassCheckpointer(small_model(6))._load_model({"model": state})
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []


def test_resume_does_no_surgery_and_restores_iteration(six, tmp_path):
    opt = torch.optim.SGD(six.parameters(), lr=0.1)
    ReclassCheckpointer(six, str(tmp_path),
        reclass=ReclassOptions(target_classes=SIX), optimizer=opt).save(
        "model_0000004", iteration=4)
    model = small_model(6, seed=6)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = ReclassCheckpointer(model, str(tmp_path),
        reclass=ReclassOptions(target_classes=SIX), optimizer=opt2)
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 4 and ckpt.report is None
    assert_same_state(params(model), params(six))


def test_resume_with_changed_classes_is_one_clear_error(six, tmp_path):
    ReclassCheckpointer(six, str(tmp_path),
        reclass=ReclassOptions(target_classes=SIX)).save("model_0000004")
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
    ckpt = ReclassCheckpointer(small_model(6, seed=7), str(tmp_path),
                               reclass=ReclassOptions(target_classes=SIX[::-1]))
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
    ReclassCheckpointer(retina,
        reclass=ReclassOptions(only=["backbone.bottom_up."])).load(str(tmp_path / "mask.pth"))
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
    ReclassCheckpointer(model,
        reclass=ReclassOptions(rename=["detector.="])).load(str(tmp_path / "wrapped.pth"))
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


def test_non_finite_class_rows_are_named_in_a_warning(six, tmp_path):
    state = {k: v.clone() for k, v in six.state_dict().items()}
    state[CLS][2, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pth")
    with captured_logs(*LOGGERS) as logs:
        ReclassCheckpointer(small_model(6)).load(str(tmp_path / "nan.pth"))
    assert any(CLS in m and "NaN or Inf" in m for m in logs)
