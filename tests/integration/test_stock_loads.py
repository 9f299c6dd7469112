"""The eval-only path of a stock train_net.py, and a predictor, with a checkpoint of other classes.

A project's eval path is ``model = Trainer.build_model(cfg)``, a stock
``DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS)`` and ``Trainer.test(cfg,
model)``. fvcore skips the class heads of another length there: the model built by the mixin
says so in the log, naming the line to change, and the documented lines load class-aware.
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from d2_fixtures import BASE_CONFIG, SIX, THREE, captured_logs, small_model
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import COCOEvaluator

from d2_reclass import (
    ReclassCheckpointer,
    ReclassOptions,
    ReclassPredictor,
    ReclassTrainerMixin,
    add_reclass_config,
)
from d2_reclass.data.synthetic import make_shapes_dataset
from d2_reclass.integration.stock_loads import SKIPPED_HEADS_FIX, warn_on_skipped_class_heads

CLS = "roi_heads.box_predictor.cls_score.weight"
HEAD_KEYS = ("roi_heads.box_predictor.bbox_pred.bias, roi_heads.box_predictor.bbox_pred.weight, "
             "roi_heads.box_predictor.cls_score.bias, roi_heads.box_predictor.cls_score.weight")


class MyTrainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name,
                             output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "eval"))


class Trainer(ReclassTrainerMixin, MyTrainer):
    pass


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Validation data whose json orders THREE as square, star, triangle; a six-class
    checkpoint storing its names; the project's eval-only config (target THREE)."""
    root = tmp_path_factory.mktemp("eval_only")
    make_shapes_dataset(str(root), "val", ["square", "star", "triangle"], 2, seed=4)
    if "sl_val" not in DatasetCatalog.list():
        register_coco_instances("sl_val", {}, str(root / "val.json"), str(root / "val"))
    six = small_model(6, seed=1)
    ReclassCheckpointer(six, str(root), reclass=ReclassOptions(target_classes=SIX)).save("six")
    config = root / "config.yaml"
    config.write_text(json.dumps({
        "_BASE_": BASE_CONFIG, "DATASETS": {"TRAIN": [], "TEST": ["sl_val"]},
        "MODEL": {"WEIGHTS": str(root / "six.pth"),
                  "RECLASS": {"TARGET_CLASSES": THREE, "NEW_CLASS_INIT": "head"}},
        "OUTPUT_DIR": str(root / "out")}))
    args = default_argument_parser().parse_args(["--config-file", str(config), "--eval-only"])
    cfg = get_cfg()
    add_reclass_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg, six.state_dict()


def test_the_stock_eval_path_is_told_which_line_to_change(project):
    cfg, _ = project
    model = Trainer.build_model(cfg)
    with captured_logs("d2_reclass") as logs:
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=False)
    assert logs == [
        f"[d2_reclass] The weights loaded into this model have no {HEAD_KEYS}, although the "
        "rest of those heads is there: the loader is not class-aware and skipped them (fvcore "
        "drops tensors whose class count differs from the model's), so they keep their random "
        f"init and the model's predictions for every class are garbage. {SKIPPED_HEADS_FIX}"]
    assert "ReclassCheckpointer.from_config(cfg, model).resume_or_load(" in SKIPPED_HEADS_FIX


def test_the_documented_eval_lines_map_the_heads_and_the_dataset_by_name(project):
    cfg, source = project
    model = Trainer.build_model(cfg)
    with captured_logs("d2_reclass") as logs:
        ReclassCheckpointer.from_config(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                   resume=False)
    assert not any("not class-aware" in m for m in logs)
    loaded = model.state_dict()[CLS]
    assert torch.equal(loaded[0], source[CLS][2]) and torch.equal(loaded[1], source[CLS][0])
    results = Trainer.test(cfg, model)["bbox"]
    # The per-class table names the model's classes, whatever the json's order.
    assert {k for k in results if k.startswith("AP-")} == {f"AP-{c}" for c in THREE}
    assert list(MetadataCatalog.get("sl_val").thing_classes) == THREE


def test_checkpoints_without_the_heads_or_with_them_whole_are_not_reported(project):
    cfg, source = project
    model = warn_on_skipped_class_heads(small_model(6))
    with captured_logs("d2_reclass") as logs:
        # An ImageNet-style backbone, then a checkpoint of the model's own classes.
        model.load_state_dict({k: v for k, v in source.items() if k.startswith("backbone.")},
                              strict=False)
        model.load_state_dict(source)
    assert logs == []
    # The model still pickles (the hook is no closure).
    assert pickle.loads(pickle.dumps(model)).state_dict().keys() == model.state_dict().keys()


def test_reclass_predictor_maps_what_default_predictor_would_skip(project):
    cfg, source = project
    predictor = ReclassPredictor(cfg)
    loaded = predictor.model.state_dict()[CLS]
    assert loaded.shape[0] == 4
    assert torch.equal(loaded[0], source[CLS][2]) and torch.equal(loaded[1], source[CLS][0])
    assert predictor.class_names == THREE
    assert list(predictor.metadata.thing_classes) == THREE
    out = predictor(np.zeros((128, 128, 3), dtype=np.uint8))["instances"]
    assert out.pred_classes.numel() == 0 or int(out.pred_classes.max()) < 3


def test_reclass_predictor_takes_the_checkpoints_classes_when_the_config_names_none(project):
    cfg, source = project
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RECLASS.TARGET_CLASSES = []
    predictor = ReclassPredictor(cfg)
    assert predictor.class_names == SIX
    assert torch.equal(predictor.model.state_dict()[CLS], source[CLS])
