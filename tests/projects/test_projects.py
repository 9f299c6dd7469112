"""ReclassTrainerMixin on detectron2's own project trainers: PointRend and DeepLab, on the CPU.

Each project's ``Trainer(DefaultTrainer)`` is written here as its ``projects/*/train_net.py``
writes it (evaluator chosen by the dataset's ``evaluator_type``, a sem-seg ``DatasetMapper`` with
the project's augmentations, DeepLab's poly LR scheduler), and used as the README says:
``class Trainer(ReclassTrainerMixin, ProjectTrainer)``. The configs are built as the projects'
``setup(args)`` builds them (``add_*_config``, the project's keys, trailing opts, ``freeze()``),
made tiny; the datasets are real files registered with detectron2's stock functions; the source
checkpoints are plain ``{"model": state_dict}`` files that store no class names.

Per project, one module-scoped run (build the trainer, ``resume_or_load(resume=False)``, train 2
iterations) is shared by the tests that inspect it; the projects' ``--eval-only`` and
``--resume`` paths then run on its output.
"""
import json
import os
from types import SimpleNamespace
from typing import Dict, List

import detectron2.data.transforms as T
import numpy as np
import pytest
import torch
from conftest import assert_rows, entries, pick, point_rend_cfg
from d2_fixtures import SIX, THREE, THREE_FROM_SIX
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
)
from detectron2.data.datasets import load_sem_seg, register_coco_instances
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config, build_lr_scheduler
from PIL import Image

from d2_reclass import ReclassTrainerMixin, add_reclass_config
from d2_reclass.data.synthetic import make_shapes_dataset

IGNORE = 255
#: The DeepLab source checkpoint's stuff classes, and the target dataset's: two of them in
#: another order, then one the checkpoint never had.
SOURCE_STUFF = ["sky", "grass", "road", "water", "sand"]
TARGET_STUFF = ["road", "sky", "lava"]
TARGET_STUFF_FROM_SOURCE = [2, 0, None]

# ---------------------------------------------------------------------------------------------
# The projects' trainers, written as their train_net.py write them
# ---------------------------------------------------------------------------------------------


def sem_seg_train_augmentations(cfg) -> List[T.Augmentation]:
    """The projects' semantic-segmentation training augmentations: resize the short edge, crop
    with a per-category area limit when INPUT.CROP is enabled, flip."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    augs.append(T.RandomFlip())
    return augs


def _train_loader(cfg):
    # Both projects: the sem-seg mapper for SemanticSegmentor, detectron2's default otherwise.
    mapper = None
    if "SemanticSegmentor" in cfg.MODEL.META_ARCHITECTURE:
        mapper = DatasetMapper(cfg, is_train=True, augmentations=sem_seg_train_augmentations(cfg))
    return build_detection_train_loader(cfg, mapper=mapper)


class PointRendTrainer(DefaultTrainer):
    """projects/PointRend/train_net.py's Trainer: COCO or sem-seg evaluators by
    ``evaluator_type``, the sem-seg mapper for semantic models."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "sem_seg":
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        raise NotImplementedError(f"no evaluator for {dataset_name} of type {evaluator_type}")

    @classmethod
    def build_train_loader(cls, cfg):
        return _train_loader(cfg)


class DeepLabTrainer(DefaultTrainer):
    """projects/DeepLab/train_net.py's Trainer: a sem-seg evaluator, the sem-seg mapper, and the
    project's ``build_lr_scheduler`` (which adds WarmupPolyLR)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type == "sem_seg":
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        raise NotImplementedError(f"no evaluator for {dataset_name} of type {evaluator_type}")

    @classmethod
    def build_train_loader(cls, cfg):
        return _train_loader(cfg)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


class ReclassPointRendTrainer(ReclassTrainerMixin, PointRendTrainer):
    """PointRend's trainer with d2_reclass, as the README's one line adds it."""


class ReclassDeepLabTrainer(ReclassTrainerMixin, DeepLabTrainer):
    """DeepLab's trainer with d2_reclass, as the README's one line adds it."""


# ---------------------------------------------------------------------------------------------
# Configs, as the projects' setup(args) builds them, made tiny
# ---------------------------------------------------------------------------------------------

#: Training on the CPU, 2 iterations of 2 images.
TRAIN_OPTS = [
    "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.MAX_ITER", 2, "SOLVER.BASE_LR", 0.001, "SOLVER.CHECKPOINT_PERIOD", 1000,
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 128,
]
#: PointRend R-18 FPN with 64 channels everywhere and few proposals. (The coarse mask head
#: reduces its input to CONV_DIM channels but never widens it: CONV_DIM must not exceed the FPN's.)
POINT_REND_TINY = [
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 64, "MODEL.ROI_MASK_HEAD.FC_DIM", 64,
    "MODEL.POINT_HEAD.FC_DIM", 64,
    "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128], [256]],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 256, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 128, "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "TEST.DETECTIONS_PER_IMAGE", 10,
    # Pixels at unit scale, not Caffe2's 0-255: the randomly initialised backbone (FrozenBN is
    # the identity) then keeps its features small enough that the untrained box classifier
    # scores some boxes above SCORE_THRESH_TEST, so the evaluator has predictions to score.
    "MODEL.PIXEL_STD", [57.375, 57.120, 58.395],
]
#: The keys deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16.yaml and its base set over
#: Base-RCNN-DilatedC5.yaml, but for the backbone's and head's sizes (DEEPLAB_TINY), the crop
#: and image sizes and the solver (TRAIN_OPTS).
DEEPLAB_V3_PLUS = [
    "MODEL.META_ARCHITECTURE", "SemanticSegmentor", "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.BACKBONE.NAME", "build_resnet_deeplab_backbone",
    "MODEL.PIXEL_MEAN", [123.675, 116.280, 103.530], "MODEL.PIXEL_STD", [58.395, 57.120, 57.375],
    "MODEL.RESNETS.NORM", "SyncBN", "MODEL.RESNETS.OUT_FEATURES", ["res2", "res5"],
    "MODEL.RESNETS.RES5_MULTI_GRID", [1, 2, 4], "MODEL.RESNETS.STEM_TYPE", "deeplab",
    "MODEL.RESNETS.STRIDE_IN_1X1", False,
    "MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusHead",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res2", "res5"],
    "MODEL.SEM_SEG_HEAD.PROJECT_FEATURES", ["res2"], "MODEL.SEM_SEG_HEAD.NORM", "SyncBN",
    "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS", [6, 12, 18], "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT", 0.1,
    "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 4, "MODEL.SEM_SEG_HEAD.LOSS_TYPE", "hard_pixel_mining",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 19,
    "SOLVER.LR_SCHEDULER_NAME", "WarmupPolyLR", "INPUT.FORMAT", "RGB",
    "INPUT.CROP.ENABLED", True, "INPUT.CROP.TYPE", "absolute",
]
#: The project's R-50 layout (DeepLab stem, multi-grid) at 1/8 of its width; 64 px crops.
DEEPLAB_TINY = [
    "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 32, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16,
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 32, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
    "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [8], "INPUT.CROP.SIZE", (64, 64),
]


def point_rend_setup(opts: List) -> CfgNode:
    """The user's frozen config: PointRend's COCO instance-segmentation config (80 classes, as
    the project ships it) with MODEL.RECLASS, then ``opts``."""
    cfg = point_rend_cfg(80)
    add_reclass_config(cfg)
    cfg.merge_from_list(POINT_REND_TINY + TRAIN_OPTS + opts)
    cfg.freeze()
    return cfg


def deeplab_setup(opts: List) -> CfgNode:
    """The user's frozen config: DeepLabV3+ as the project builds it (Cityscapes' 19 classes),
    with MODEL.RECLASS, then ``opts``."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_reclass_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-DilatedC5.yaml"))
    cfg.merge_from_list(DEEPLAB_V3_PLUS + DEEPLAB_TINY + TRAIN_OPTS + opts)
    cfg.freeze()
    return cfg


def save_source(cfg, path: str) -> Dict[str, torch.Tensor]:
    """Build ``cfg``'s model with stock detectron2 (seeded) and save it as a plain
    ``{"model": state_dict}``, with no class names; return the state dict."""
    torch.manual_seed(1)
    state = build_model(cfg).state_dict()
    torch.save({"model": state}, path)
    return state


def run_trainer(trainer_cls, setup, opts: List, source, out) -> SimpleNamespace:
    """Construct from ``setup(opts)``, load (``resume=False``), snapshot the loaded weights,
    train."""
    cfg = setup(opts)
    before = cfg.dump()
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=False)
    loaded = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    return SimpleNamespace(trainer_cls=trainer_cls, setup=setup, opts=opts, cfg=cfg,
                           user_cfg_before=before, trainer=trainer, loaded=loaded,
                           source=source, out=out)


def final_checkpoint(run) -> Dict:
    """The run's ``model_final.pth``, as saved by its PeriodicCheckpointer."""
    return torch.load(run.out / "model_final.pth", weights_only=True)


def assert_trained(run, keys: List[str]) -> None:
    """Training updated ``keys`` (class-dependent tensors included: the optimizer holds the
    parameters of the model as loaded)."""
    final = final_checkpoint(run)["model"]
    for key in keys:
        assert final[key].shape == run.loaded[key].shape
        assert not torch.equal(final[key], run.loaded[key]), key


def assert_resumes(run) -> None:
    """``--resume`` with the user's unchanged config, as the projects' main() calls
    ``trainer.resume_or_load(resume=args.resume)``: the trainer continues after the iteration
    of its own last checkpoint (model_final.pth), with that checkpoint's weights."""
    trainer = run.trainer_cls(run.setup(run.opts))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    final = final_checkpoint(run)["model"]
    state = trainer.model.state_dict()
    assert state.keys() == final.keys()
    for key, value in state.items():
        assert torch.equal(value, final[key]), key


# ---------------------------------------------------------------------------------------------
# PointRend instance segmentation
# ---------------------------------------------------------------------------------------------

BOX = "roi_heads.box_predictor."
COARSE = "roi_heads.mask_head.coarse_head.prediction."
POINT = "roi_heads.mask_head.point_head."
COARSE_SIDE = 7  # ROI_MASK_HEAD.OUTPUT_SIDE_RESOLUTION
FINE_CHANNELS = 64  # the point head's fine-grained features: p2, FPN.OUT_CHANNELS


@pytest.fixture(scope="module")
def point_rend(tmp_path_factory):
    """A 3-class COCO shapes dataset (triangle, square, star) with polygon masks, a 6-class
    PointRend checkpoint, and the mixin trainer's run mapping it with SOURCE_CLASSES."""
    root = tmp_path_factory.mktemp("point_rend")
    for split, n, seed in (("train", 4, 1), ("val", 2, 2)):
        json_path = make_shapes_dataset(str(root), split, THREE, n, image_size=64, seed=seed)
        register_coco_instances(f"projects_shapes_{split}", {}, json_path, str(root / split))
    source_cfg = point_rend_cfg(6)
    source_cfg.merge_from_list(POINT_REND_TINY + TRAIN_OPTS)
    source = save_source(source_cfg, str(root / "six.pth"))
    opts = [
        "MODEL.WEIGHTS", str(root / "six.pth"), "MODEL.RECLASS.SOURCE_CLASSES", SIX,
        "DATASETS.TRAIN", ("projects_shapes_train",), "DATASETS.TEST", (),
        "OUTPUT_DIR", str(root / "out"),
    ]
    return run_trainer(ReclassPointRendTrainer, point_rend_setup, opts, source, root / "out")


def test_point_rend_rows_are_mapped_by_name(point_rend):
    """After ``resume_or_load(resume=False)``, every class-dependent tensor of the box predictor,
    the coarse mask head and the point head holds the 6-class checkpoint's rows of "triangle"
    then "square" (bit for bit), the background row carried over, and a new row for "star"."""
    new, src = point_rend.loaded, point_rend.source
    dst, idx, fresh = entries(THREE_FROM_SIX, len(SIX), background=True)
    assert fresh == [2]
    assert_rows(new[BOX + "cls_score.weight"], src[BOX + "cls_score.weight"], dst, idx)
    assert_rows(new[BOX + "cls_score.bias"], src[BOX + "cls_score.bias"], dst, idx)
    dst, idx, _ = entries(THREE_FROM_SIX, len(SIX), block=4)
    assert_rows(new[BOX + "bbox_pred.weight"], src[BOX + "bbox_pred.weight"], dst, idx)
    assert_rows(new[BOX + "bbox_pred.bias"], src[BOX + "bbox_pred.bias"], dst, idx)
    dst, idx, _ = entries(THREE_FROM_SIX, len(SIX), block=COARSE_SIDE ** 2)
    assert new[COARSE + "weight"].shape == (3 * COARSE_SIDE ** 2, 64)
    assert_rows(new[COARSE + "weight"], src[COARSE + "weight"], dst, idx)
    assert_rows(new[COARSE + "bias"], src[COARSE + "bias"], dst, idx)
    dst, idx, _ = entries(THREE_FROM_SIX, len(SIX))
    assert new[POINT + "predictor.weight"].shape == (3, FINE_CHANNELS + 3, 1)
    assert_rows(new[POINT + "predictor.bias"], src[POINT + "predictor.bias"], dst, idx)
    # The predictor's rows, and within them its input columns: fine-grained features, then
    # the coarse logits of each class (the point head appends them to every layer).
    cols, col_idx, new_cols = entries(THREE_FROM_SIX, len(SIX), offset=FINE_CHANNELS)
    rows = pick(pick(new[POINT + "predictor.weight"], dst), cols, axis=1)
    assert torch.equal(rows, pick(pick(src[POINT + "predictor.weight"], idx), col_idx, axis=1))
    assert new_cols == [FINE_CHANNELS + 2]
    for layer in ("fc1", "fc2", "fc3"):
        key = POINT + f"{layer}.weight"
        assert_rows(new[key], src[key], cols, col_idx, axis=1)
    assert not any(torch.equal(new[BOX + "cls_score.weight"][2], row)
                   for row in src[BOX + "cls_score.weight"])


def test_point_rend_trainer_config_has_the_target_class_count(point_rend):
    """The trainer's config has both NUM_CLASSES keys set to the dataset's 3 classes; the
    user's frozen 80-class config is unchanged and still frozen."""
    trainer_cfg = point_rend.trainer.cfg
    assert trainer_cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert trainer_cfg.MODEL.POINT_HEAD.NUM_CLASSES == 3
    assert point_rend.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert point_rend.cfg.MODEL.POINT_HEAD.NUM_CLASSES == 80
    assert point_rend.cfg.is_frozen()
    assert point_rend.cfg.dump() == point_rend.user_cfg_before


def test_point_rend_trains_and_saves_the_class_names(point_rend):
    """Two iterations train every PointRend loss; ``model_final.pth`` (saved by the trainer's
    PeriodicCheckpointer) stores the target classes, and the report names the mapping."""
    trainer = point_rend.trainer
    assert trainer.iter == 2  # max_iter, once training has ended
    assert len(trainer.storage.history("loss_mask_point").values()) == 2
    losses = {k: v for k, v in trainer.storage.latest().items() if k.startswith("loss_")}
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_mask_point",
                           "loss_rpn_cls", "loss_rpn_loc"}
    assert all(np.isfinite(value) for value, _ in losses.values())
    assert_trained(point_rend, [BOX + "cls_score.weight", COARSE + "weight",
                                POINT + "predictor.weight"])
    final = final_checkpoint(point_rend)
    assert final["d2_reclass"] == {"thing_classes": THREE}
    assert final["model"][POINT + "predictor.weight"].shape == (3, FINE_CHANNELS + 3, 1)
    report = json.loads((point_rend.out / "reclass_report.json").read_text())
    kept = report["spaces"]["thing"]["mapping"]["kept"]
    assert [(k["target"], k["source_index"]) for k in kept] == [("triangle", 2), ("square", 0)]
    assert report["spaces"]["thing"]["mapping"]["new"] == ["star"]


def test_point_rend_eval_only_evaluates_the_target_classes(point_rend):
    """The project's ``--eval-only`` path (``Trainer.build_model(cfg)``, a stock
    DetectionCheckpointer, ``Trainer.test``) on the user's 80-class config builds 3 classes,
    loads model_final.pth entirely and reports COCO AP per target class."""
    cfg = point_rend_setup([
        "MODEL.WEIGHTS", str(point_rend.out / "model_final.pth"),
        "DATASETS.TRAIN", ("projects_shapes_train",), "DATASETS.TEST", ("projects_shapes_val",),
        "OUTPUT_DIR", str(point_rend.out / "eval"),
    ])
    model = ReclassPointRendTrainer.build_model(cfg)
    assert model.roi_heads.num_classes == 3
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False)
    final = final_checkpoint(point_rend)["model"]
    assert model.state_dict().keys() == final.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[key]), key
    results = ReclassPointRendTrainer.test(cfg, model)
    for task in ("bbox", "segm"):
        per_class = sorted(k for k in results[task] if k.startswith("AP-"))
        assert per_class == ["AP-square", "AP-star", "AP-triangle"]


def test_point_rend_resumes_with_the_same_config(point_rend):
    """``--resume`` with the config whose SOURCE_CLASSES describe MODEL.WEIGHTS (6 classes)
    resumes from the run's own 3-class checkpoint (see :func:`assert_resumes`)."""
    assert_resumes(point_rend)


# ---------------------------------------------------------------------------------------------
# DeepLab semantic segmentation
# ---------------------------------------------------------------------------------------------

HEAD = "sem_seg_head.predictor."
#: Mean colour of each TARGET_STUFF class in the images.
STUFF_COLOURS = [(90, 90, 90), (120, 170, 230), (230, 80, 20)]


def write_sem_seg_split(root, split: str, num_images: int, seed: int):
    """``num_images`` 64x64 images of TARGET_STUFF regions (road below, sky above, a lava
    rectangle) and their PNG label maps with an IGNORE border; returns (images, labels) dirs."""
    rng = np.random.default_rng(seed)
    image_dir, label_dir = root / f"{split}_images", root / f"{split}_labels"
    image_dir.mkdir()
    label_dir.mkdir()
    colours = np.zeros((IGNORE + 1, 3))
    colours[:len(STUFF_COLOURS)] = STUFF_COLOURS
    for i in range(num_images):
        label = np.zeros((64, 64), dtype=np.uint8)
        label[: int(rng.integers(16, 40))] = 1
        y, x = (int(v) for v in rng.integers(8, 40, size=2))
        label[y:y + 16, x:x + 20] = 2
        label[0, :] = IGNORE
        image = colours[label] + rng.normal(0, 10, (64, 64, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(image_dir / f"{i}.png")
        Image.fromarray(label).save(label_dir / f"{i}.png")
    return image_dir, label_dir


def register_sem_seg(name: str, image_dir, label_dir) -> None:
    """Register with detectron2's ``load_sem_seg`` and the metadata SemSegEvaluator reads."""
    DatasetCatalog.register(name, lambda: load_sem_seg(str(label_dir), str(image_dir), "png",
                                                       "png"))
    MetadataCatalog.get(name).set(stuff_classes=TARGET_STUFF, ignore_label=IGNORE,
                                  evaluator_type="sem_seg", image_root=str(image_dir),
                                  sem_seg_root=str(label_dir))


@pytest.fixture(scope="module")
def deeplab(tmp_path_factory):
    """A 3-class semantic-segmentation dataset (road, sky, lava), a 5-class DeepLabV3+
    checkpoint, and the mixin trainer's run mapping it with SOURCE_STUFF_CLASSES."""
    root = tmp_path_factory.mktemp("deeplab")
    for split, n, seed in (("train", 4, 1), ("val", 2, 2)):
        register_sem_seg(f"projects_stuff_{split}", *write_sem_seg_split(root, split, n, seed))
    source_cfg = deeplab_setup(["MODEL.SEM_SEG_HEAD.NUM_CLASSES", len(SOURCE_STUFF)])
    source = save_source(source_cfg, str(root / "five.pth"))
    opts = [
        "MODEL.WEIGHTS", str(root / "five.pth"),
        "MODEL.RECLASS.SOURCE_STUFF_CLASSES", SOURCE_STUFF,
        "DATASETS.TRAIN", ("projects_stuff_train",), "DATASETS.TEST", (),
        "OUTPUT_DIR", str(root / "out"),
    ]
    return run_trainer(ReclassDeepLabTrainer, deeplab_setup, opts, source, root / "out")


def test_deeplab_predictor_rows_are_mapped_by_name(deeplab):
    """The DeepLabV3+ predictor holds the checkpoint's "road" then "sky" rows bit for bit, and
    a new row for "lava"; the trainer's config has SEM_SEG_HEAD.NUM_CLASSES 3, the user's
    frozen config keeps 19."""
    new, src = deeplab.loaded, deeplab.source
    dst, idx, fresh = entries(TARGET_STUFF_FROM_SOURCE, len(SOURCE_STUFF))
    assert new[HEAD + "weight"].shape == (3, 32, 1, 1)
    assert_rows(new[HEAD + "weight"], src[HEAD + "weight"], dst, idx)
    assert_rows(new[HEAD + "bias"], src[HEAD + "bias"], dst, idx)
    assert not any(torch.equal(new[HEAD + "weight"][fresh[0]], row)
                   for row in src[HEAD + "weight"])
    assert deeplab.trainer.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    assert deeplab.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19
    assert deeplab.cfg.is_frozen()
    assert deeplab.cfg.dump() == deeplab.user_cfg_before


def test_deeplab_trains_with_poly_lr_and_saves_the_stuff_classes(deeplab):
    """Two iterations with the project's WarmupPolyLR and sem-seg mapper; ``model_final.pth``
    stores the target stuff classes, and the report names the mapping."""
    trainer = deeplab.trainer
    assert trainer.iter == 2  # max_iter, once training has ended
    # One loss: detectron2 records it as total_loss only.
    assert len(trainer.storage.history("total_loss").values()) == 2
    assert type(trainer.scheduler).__name__ == "WarmupPolyLR"
    assert np.isfinite(trainer.storage.latest()["total_loss"][0])
    assert_trained(deeplab, [HEAD + "weight"])
    final = final_checkpoint(deeplab)
    assert final["d2_reclass"] == {"stuff_classes": TARGET_STUFF}
    assert final["model"][HEAD + "weight"].shape == (3, 32, 1, 1)
    report = json.loads((deeplab.out / "reclass_report.json").read_text())
    kept = report["spaces"]["stuff"]["mapping"]["kept"]
    assert [(k["target"], k["source_index"]) for k in kept] == [("road", 2), ("sky", 0)]
    assert report["spaces"]["stuff"]["mapping"]["new"] == ["lava"]


def test_deeplab_eval_only_evaluates_the_target_classes(deeplab):
    """The project's ``--eval-only`` path on the user's 19-class config builds 3 classes, loads
    model_final.pth entirely and reports IoU per target class."""
    cfg = deeplab_setup([
        "MODEL.WEIGHTS", str(deeplab.out / "model_final.pth"),
        "DATASETS.TRAIN", ("projects_stuff_train",), "DATASETS.TEST", ("projects_stuff_val",),
        "OUTPUT_DIR", str(deeplab.out / "eval"),
    ])
    model = ReclassDeepLabTrainer.build_model(cfg)
    assert model.sem_seg_head.predictor.out_channels == 3
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False)
    final = final_checkpoint(deeplab)["model"]
    assert model.state_dict().keys() == final.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[key]), key
    results = ReclassDeepLabTrainer.test(cfg, model)
    per_class = sorted(k for k in results["sem_seg"] if k.startswith("IoU-"))
    assert per_class == ["IoU-lava", "IoU-road", "IoU-sky"]


def test_deeplab_resumes_with_the_same_config(deeplab):
    """``--resume`` with the config whose SOURCE_STUFF_CLASSES describe MODEL.WEIGHTS (5
    classes) resumes from the run's own 3-class checkpoint (see :func:`assert_resumes`)."""
    assert_resumes(deeplab)
