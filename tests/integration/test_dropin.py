"""Drop-in parity: detectron2's own test behaviours, run against d2_reclass's classes.

ReclassCheckpointer, ReclassFastRCNNOutputLayers (also as re-typed by ``adopt``) and
ReclassTrainer replace DetectionCheckpointer, FastRCNNOutputLayers and DefaultTrainer in
existing projects, so what detectron2's tests (tests/ at upstream e8806d60, the pinned build's
tests) check of the stock classes must hold for ours. Each test restates one such behaviour
on real models and files, with the stock class run through the same steps as the reference
wherever it can be. The checkpointer's own options are given as ``reclass=ReclassOptions(...)``
so that every other keyword is a checkpointable, as DetectionCheckpointer takes it.
"""
import copy
import io
import os
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from d2_fixtures import BASE_CONFIG, SIX, THREE, assert_same_state, params, small_model
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformRotated
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.rotated_fast_rcnn import RotatedFastRCNNOutputLayers
from detectron2.structures import Boxes, BoxMode, Instances, RotatedBoxes
from detectron2.utils.events import EventStorage
from detectron2.utils.file_io import PathManager as GLOBAL_PATH_MANAGER
from iopath.common.file_io import PathHandler, PathManager
from PIL import Image
from torch import nn

from d2_reclass import (
    CLASSES_KEY,
    ReclassCheckpointer,
    ReclassFastRCNNOutputLayers,
    ReclassTrainer,
    ReclassTrainerMixin,
    UnsafeCheckpointError,
    adopt_box_predictors,
    merge_config_file,
)

CLS = "roi_heads.box_predictor.cls_score.weight"
DATASET = "d2_reclass_dropin_train"
DATASET_CLASSES = ["square", "circle"]
#: ReclassCheckpointer's keyword options before ReclassOptions: names a project may also give
#: its own checkpointables (``DetectionCheckpointer(model, dir, mode=..., seed=...)``).
OPTION_NAMES = [
    "mode", "seed", "only", "rename", "trust_pickle", "source_classes", "target_classes",
    "class_map", "source_dataset", "source_stuff_classes", "target_stuff_classes",
]


# ---------------------------------------------------------------------------- checkpointer
def complex_model():
    """The model of upstream test_checkpoint.py, and a state dict whose ``layer1`` keys reach
    ``block1.layer1`` only through detectron2's name-matching heuristics."""
    torch.manual_seed(0)
    m = nn.Module()
    m.block1 = nn.Module()
    m.block1.layer1 = nn.Linear(2, 3)
    m.layer2 = nn.Linear(3, 2)
    m.res = nn.Module()
    m.res.layer2 = nn.Linear(3, 2)
    state = {
        "layer1.weight": torch.rand(3, 2), "layer1.bias": torch.rand(3),
        "layer2.weight": torch.rand(2, 3), "layer2.bias": torch.rand(2),
        "res.layer2.weight": torch.rand(2, 3), "res.layer2.bias": torch.rand(2),
    }
    return m, state


@pytest.mark.parametrize("checkpointer", [DetectionCheckpointer, ReclassCheckpointer])
def test_load_with_matching_heuristics(checkpointer, tmp_path):
    """Mirrors test_checkpoint.py::test_load_with_matching_heuristics."""
    model, state = complex_model()
    torch.save({"model": state}, tmp_path / "checkpoint.pth")
    with torch.no_grad():
        model.block1.layer1.weight.fill_(1)  # torch.rand is below 1: a load must change it
    ckpt = checkpointer(model, str(tmp_path))

    ckpt.load(str(tmp_path / "checkpoint.pth"))
    assert torch.equal(model.block1.layer1.weight, torch.ones(3, 2))
    assert torch.equal(model.res.layer2.weight, state["res.layer2.weight"])

    ckpt.load(str(tmp_path / "checkpoint.pth?matching_heuristics=True"))
    assert torch.equal(model.block1.layer1.weight, state["layer1.weight"])
    assert torch.equal(model.block1.layer1.bias, state["layer1.bias"])


class _LocalDirHandler(PathHandler):
    """Upstream's test handler: maps ``dropin_test://NAME`` to a directory and implements only
    what DetectionCheckpointer.load needs (``get_local_path``, ``open``)."""

    PREFIX = "dropin_test://"

    def __init__(self, root):
        super().__init__()
        self.root = str(root)

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return os.path.join(self.root, path[len(self.PREFIX):])

    def _open(self, path, mode="r", **kwargs):
        return open(self._get_local_path(path), mode, **kwargs)


class _LocalDirHandlerWithExists(_LocalDirHandler):
    """The same, plus ``exists``, which fvcore's resume (``has_checkpoint``) needs."""

    def _exists(self, path, **kwargs):
        return os.path.exists(self._get_local_path(path))


def own_path_manager(handler):
    """A PathManager that knows ``handler``; detectron2's global one does not."""
    manager = PathManager()
    manager.register_handler(handler)
    return manager


def test_custom_path_manager_handler(tmp_path):
    """Mirrors test_checkpoint.py::test_custom_path_manager_handler (handler on path_manager)."""
    model, state = complex_model()
    torch.save({"model": state}, tmp_path / "checkpoint.pth")
    uri = _LocalDirHandler.PREFIX + "checkpoint.pth"
    assert not GLOBAL_PATH_MANAGER.exists(uri)
    ckpt = ReclassCheckpointer(model, save_dir=str(tmp_path))
    ckpt.path_manager = own_path_manager(_LocalDirHandler(tmp_path))

    ckpt.load(uri)
    assert torch.equal(model.layer2.weight, state["layer2.weight"])
    ckpt.load(uri + "?matching_heuristics=True")
    assert torch.equal(model.block1.layer1.weight, state["layer1.weight"])


@pytest.mark.parametrize("checkpointer", [DetectionCheckpointer, ReclassCheckpointer])
def test_save_and_resume_through_own_path_manager(checkpointer, tmp_path):
    """Mirrors test_engine.py::test_checkpoint_resume, with save_dir on a custom handler."""
    model, _ = complex_model()
    extra = nn.Linear(2, 2)
    save_dir = _LocalDirHandler.PREFIX + "run"
    os.makedirs(tmp_path / "run")
    manager = own_path_manager(_LocalDirHandlerWithExists(tmp_path))
    ckpt = checkpointer(model, save_dir, extra=extra)
    ckpt.path_manager = manager
    ckpt.save("model_0000009", iteration=9)

    fresh, _ = complex_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_extra = nn.Linear(2, 2)
    resumed = checkpointer(fresh, save_dir, extra=fresh_extra)
    resumed.path_manager = manager
    assert resumed.has_checkpoint()
    extra_data = resumed.resume_or_load("unused.pth", resume=True)
    assert extra_data["iteration"] == 9
    assert_same_state(params(fresh), params(model))
    assert_same_state(params(fresh_extra), params(extra))


def _tiny_checkpointable(seed):
    """A checkpointable as projects pass them (an EMA copy, a discriminator): a seeded module."""
    torch.manual_seed(seed)
    return nn.Linear(2, 2)


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_checkpointable_with_an_option_name_is_saved_and_restored(name, tmp_path):
    """Mirrors test_engine.py's Checkpointer(model, d, opt=..., trainer=...): any name works."""
    saved = {}
    for checkpointer in (DetectionCheckpointer, ReclassCheckpointer):
        out = tmp_path / checkpointer.__name__
        out.mkdir()  # fvcore's save writes into an existing save_dir
        original = _tiny_checkpointable(0)
        checkpointer(complex_model()[0], str(out), **{name: original}).save("ckpt")
        saved[checkpointer] = torch.load(out / "ckpt.pth", weights_only=True)

        restored = _tiny_checkpointable(1)
        checkpointer(complex_model()[0], str(out), **{name: restored}).load(str(out / "ckpt.pth"))
        assert_same_state(params(restored), params(original))
    ours, stock = saved[ReclassCheckpointer], saved[DetectionCheckpointer]
    assert ours.keys() == stock.keys()
    assert_same_state(ours[name], stock[name])


def test_options_and_a_same_named_checkpointable_work_together(tmp_path):
    """Mirrors DetectionCheckpointer's **checkpointables, beside reclass=ReclassOptions(...)."""
    from d2_reclass import ReclassOptions

    six = small_model(6, seed=1)
    torch.save({"model": six.state_dict()}, tmp_path / "six.pth")
    target = small_model(3, seed=2)
    mode_module = _tiny_checkpointable(0)
    ckpt = ReclassCheckpointer(
        target, str(tmp_path), reclass=ReclassOptions(
            mode="map", source_classes=SIX, target_classes=THREE), mode=mode_module)
    ckpt.load(str(tmp_path / "six.pth"))
    new, old = target.state_dict(), six.state_dict()
    assert torch.equal(new[CLS][0], old[CLS][SIX.index("triangle")])
    assert torch.equal(new[CLS][1], old[CLS][SIX.index("square")])

    ckpt.save("mapped")
    saved = torch.load(tmp_path / "mapped.pth", weights_only=True)
    assert saved[CLASSES_KEY] == {"thing_classes": THREE}
    assert_same_state(saved["mode"], params(mode_module))


def test_a_checkpointable_named_trust_pickle_does_not_trust_pickles(tmp_path):
    """Mirrors DetectionCheckpointer's **checkpointables: trust_pickle=obj is only an object."""
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"layer2.weight": np.zeros((2, 3), np.float32)},
                     "__author__": "test", "ratio": Fraction(1, 3)}, f)
    model, _ = complex_model()
    before = params(model)
    with pytest.raises(UnsafeCheckpointError, match="fractions.Fraction"):
        ReclassCheckpointer(model, trust_pickle=_tiny_checkpointable(0)).load(str(path))
    assert_same_state(params(model), before)


def test_checkpoint_of_a_model_without_parameters_loads_back(tmp_path):
    """Mirrors DetectionCheckpointer.save then load of a model with no parameters of its own."""
    extra = _tiny_checkpointable(0)
    ReclassCheckpointer(nn.Module(), str(tmp_path), extra=extra).save("ckpt")
    restored = _tiny_checkpointable(1)
    ReclassCheckpointer(nn.Module(), str(tmp_path), extra=restored).load(
        str(tmp_path / "ckpt.pth"))
    assert_same_state(params(restored), params(extra))


# ---------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    """Two 64 px images with one box each, registered in memory with thing_classes."""
    root = tmp_path_factory.mktemp("dropin_images")
    records = []
    for i, (box, category) in enumerate((([8, 10, 30, 24], 0), ([20, 16, 28, 36], 1))):
        pixels = np.full((64, 64, 3), 90, np.uint8)
        x, y, w, h = box
        pixels[y:y + h, x:x + w] = (220, 40, 40) if category == 0 else (40, 200, 60)
        file_name = str(root / f"{i}.png")
        Image.fromarray(pixels).save(file_name)
        records.append({"file_name": file_name, "image_id": i, "height": 64, "width": 64,
                        "annotations": [{"bbox": box, "bbox_mode": BoxMode.XYWH_ABS,
                                         "category_id": category}]})
    DatasetCatalog.register(DATASET, lambda: copy.deepcopy(records))
    MetadataCatalog.get(DATASET).set(thing_classes=DATASET_CLASSES)
    yield
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def plain_cfg(output_dir, max_iter):
    """A frozen plain get_cfg() config, as a project's train_net.py hands it to its trainer:
    the small shapes model, no add_reclass_config."""
    cfg = get_cfg()
    merge_config_file(cfg, BASE_CONFIG)
    cfg.merge_from_list([
        "DATASETS.TRAIN", (DATASET,), "DATASETS.TEST", (),
        "MODEL.ROI_HEADS.NUM_CLASSES", len(DATASET_CLASSES),
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", (),
        "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(output_dir), "SEED", 0,
    ])
    cfg.freeze()
    assert "RECLASS" not in cfg.MODEL
    return cfg


def train(trainer_class, cfg, resume=False):
    """What a project's train_net.py main() does with its trainer."""
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


class ProjectTrainer(ReclassTrainerMixin, DefaultTrainer):
    """A project's trainer with the mixin, as the README shows."""


@pytest.mark.usefixtures("shapes_dataset")
def test_trainer_on_a_plain_config_trains_and_saves_like_default_trainer(tmp_path):
    """Mirrors test_engine.py::test_default_trainer, then DefaultTrainer.train's checkpoint."""
    stock = train(DefaultTrainer, plain_cfg(tmp_path / "stock", max_iter=2))
    stock_saved = torch.load(tmp_path / "stock" / "model_final.pth", weights_only=True)

    trainer = ReclassTrainer(plain_cfg(tmp_path / "ours", max_iter=2))
    assert trainer.model is trainer._trainer.model
    # The load's log names the file resume_or_load writes the full report to.
    assert trainer.checkpointer.report_file == str(tmp_path / "ours" / "reclass_report.json")
    predictor = trainer.model.roi_heads.box_predictor
    assert isinstance(predictor, ReclassFastRCNNOutputLayers)
    assert predictor.class_names == tuple(DATASET_CLASSES)
    trainer.resume_or_load(resume=False)
    trainer.train()

    saved = torch.load(tmp_path / "ours" / "model_final.pth", weights_only=True)
    assert set(saved) == set(stock_saved) | {CLASSES_KEY}
    assert saved[CLASSES_KEY] == {"thing_classes": DATASET_CLASSES}
    assert saved["iteration"] == stock_saved["iteration"] == 1
    assert_same_state(saved["model"], params(trainer.model))
    assert saved["model"].keys() == stock.model.state_dict().keys()
    assert (tmp_path / "ours" / "last_checkpoint").read_text() == "model_final.pth"

    replacement = nn.Linear(1, 1)
    trainer.model = replacement
    assert trainer.model is replacement and trainer._trainer.model is replacement


@pytest.mark.usefixtures("shapes_dataset")
def test_mixin_trainer_on_a_plain_config_resumes_where_it_stopped(tmp_path):
    """Mirrors test_engine.py::test_checkpoint_resume through DefaultTrainer.resume_or_load."""
    train(ProjectTrainer, plain_cfg(tmp_path, max_iter=1))
    first = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert first["iteration"] == 0

    resumed = ProjectTrainer(plain_cfg(tmp_path, max_iter=2))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1
    assert_same_state(params(resumed.model), first["model"])
    resumed.train()
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 1


# ---------------------------------------------------------------------------- box predictor
class ProjectPredictor(FastRCNNOutputLayers):
    """A project's predictor subclass, at module level so that pickle finds it by name."""

    def project_method(self):
        return "kept"


def seeded_predictor(kind, num_classes=3):
    """A predictor built from explicit arguments after seeding, as upstream test_fast_rcnn.py
    builds them: stock ("plain", "rotated"), a project subclass ("project") or ours ("ours")."""
    torch.manual_seed(132)
    if kind == "rotated":
        return RotatedFastRCNNOutputLayers(
            ShapeSpec(channels=8), box2box_transform=Box2BoxTransformRotated((10, 10, 5, 5, 1)),
            num_classes=num_classes)
    cls = {"plain": FastRCNNOutputLayers, "project": ProjectPredictor, "ours": (
        ReclassFastRCNNOutputLayers)}[kind]
    return cls(ShapeSpec(channels=8), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
               num_classes=num_classes)


def _torch_save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": _torch_save_load,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("round_trip", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("kind", ["plain", "rotated", "project"])
def test_adopted_predictor_round_trips_like_stock(kind, round_trip):
    """Mirrors stock predictors' pickle, torch.save and deepcopy (test_roi_heads.py deepcopies)."""
    trip = ROUND_TRIPS[round_trip]
    features = torch.rand(4, 8)
    stock = seeded_predictor(kind)
    assert type(trip(stock)) is type(stock)  # the reference: stock round-trips

    predictor = ReclassFastRCNNOutputLayers.adopt(seeded_predictor(kind), class_names=THREE)
    back = trip(predictor)
    assert isinstance(back, ReclassFastRCNNOutputLayers) and isinstance(back, type(stock))
    assert back.class_names == tuple(THREE)
    assert_same_state(params(back), params(predictor))
    for got, want in zip(back(features), predictor(features)):
        assert torch.equal(got, want)
    if kind == "project":
        assert back.project_method() == "kept"


def rotated_rcnn_cfg():
    """The small shapes model with upstream test_rroi_heads.py's rotated RPN and ROI heads."""
    cfg = get_cfg()
    merge_config_file(cfg, BASE_CONFIG)
    cfg.merge_from_list([
        "MODEL.PROPOSAL_GENERATOR.NAME", "RRPN",
        "MODEL.ANCHOR_GENERATOR.NAME", "RotatedAnchorGenerator",
        "MODEL.ANCHOR_GENERATOR.ANGLES", [[-90, 0, 90]],
        "MODEL.RPN.BBOX_REG_WEIGHTS", (1, 1, 1, 1, 1),
        "MODEL.ROI_HEADS.NAME", "RROIHeads", "MODEL.ROI_HEADS.NUM_CLASSES", 3,
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignRotated",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", (10, 10, 5, 5, 1),
    ])
    return cfg


@pytest.mark.parametrize("rotated", [False, True], ids=["faster_rcnn", "rotated_rcnn"])
def test_model_with_adopted_predictors_saves_whole(rotated, tmp_path):
    """Mirrors torch.save(model) of stock models (rotated heads as in test_rroi_heads.py)."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(rotated_rcnn_cfg()) if rotated else small_model(3)
    torch.save(model, tmp_path / "stock.pt")  # the reference: the stock model saves
    assert adopt_box_predictors(model, class_names=THREE) == 1
    torch.save(model, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(back.roi_heads.box_predictor) is type(model.roi_heads.box_predictor)
    assert back.roi_heads.box_predictor.class_names == tuple(THREE)
    assert_same_state(params(back), params(model))


#: Upstream test_fast_rcnn.py's seeded losses: (loss_cls, loss_box_reg).
UPSTREAM_LOSSES = {"plain": (1.7951188087, 4.0357131958), "rotated": (1.7920907736, 4.0410838127)}


def upstream_proposal(rotated):
    """The two proposals and ground truths of upstream test_fast_rcnn.py."""
    proposal = Instances((10, 10))
    if rotated:
        proposal.proposal_boxes = RotatedBoxes(
            torch.tensor([[2, 1.95, 2.4, 1.7, 0], [4.65, 5.25, 4.7, 5.5, 0]]))
        proposal.gt_boxes = RotatedBoxes(torch.tensor([[2.0, 2, 2, 2, 0], [4, 4, 4, 4, 0]]))
    else:
        proposal.proposal_boxes = Boxes(torch.tensor([[0.8, 1.1, 3.2, 2.8], [2.3, 2.5, 7, 8]]))
        proposal.gt_boxes = Boxes(torch.tensor([[1.0, 1, 3, 3], [2, 2, 6, 6]]))
    proposal.gt_classes = torch.tensor([1, 2])
    return proposal


@pytest.mark.parametrize("kind,build", [
    ("plain", "ours"), ("plain", "adopted"), ("rotated", "adopted")])
def test_losses_equal_upstream_values(kind, build):
    """Mirrors test_fast_rcnn.py::test_fast_rcnn and ::test_fast_rcnn_rotated."""
    predictor = seeded_predictor("ours" if build == "ours" else kind, num_classes=5)
    if build == "adopted":
        ReclassFastRCNNOutputLayers.adopt(predictor)
    predictions = predictor(torch.rand(2, 8))
    with EventStorage():
        losses = predictor.losses(predictions, [upstream_proposal(kind == "rotated")])
    expected_cls, expected_box = UPSTREAM_LOSSES[kind]
    assert torch.allclose(losses["loss_cls"], torch.tensor(expected_cls))
    assert torch.allclose(losses["loss_box_reg"], torch.tensor(expected_box))


@pytest.mark.parametrize("kind", ["ours", "plain", "rotated", "project"])
def test_predictor_is_scriptable(kind):
    """Mirrors test_roi_heads.py::test_StandardROIHeads_scriptability for the predictor."""
    predictor = seeded_predictor(kind)
    if kind != "ours":
        ReclassFastRCNNOutputLayers.adopt(predictor, class_names=THREE)
    scripted = torch.jit.script(predictor.eval())
    features = torch.rand(5, 8)
    for got, want in zip(scripted(features), predictor(features)):
        assert torch.equal(got, want)
