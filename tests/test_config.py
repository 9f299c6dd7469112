"""MODEL.RECLASS keys, class-list resolution, NUM_CLASSES, and every shipped YAML config."""
import glob
import os
import re

import pytest
from d2_fixtures import BASE_CONFIG, REPO
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.projects.point_rend import add_pointrend_config

from d2_reclass import (
    ClassListError,
    ConfigError,
    add_reclass_config,
    apply_num_classes,
    merge_config_file,
)
from d2_reclass.config import dataset_classes, target_classes, train_classes

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def _cfg():
    cfg = get_cfg()
    add_pointrend_config(cfg)
    add_reclass_config(cfg)
    return cfg


def test_defaults_and_idempotence():
    cfg = _cfg()
    r = cfg.MODEL.RECLASS
    assert (r.MODE, r.SEED, r.AUTO_NUM_CLASSES, r.TRUST_PICKLE) == ("auto", 0, True, False)
    assert r.SOURCE_CLASSES == [] and r.TARGET_CLASSES == [] and r.CLASS_MAP == []
    r.MODE = "map"
    add_reclass_config(cfg)
    assert cfg.MODEL.RECLASS.MODE == "map"


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_shipped_config_loads(path):
    """Catches keys a config sets that no add_*_config defines."""
    cfg = _cfg()
    merge_config_file(cfg, path)
    assert cfg.MODEL.META_ARCHITECTURE


def test_model_zoo_base_is_resolved():
    cfg = _cfg()
    merge_config_file(cfg, os.path.join(REPO, "configs", "shapes_target_map.yaml"))
    assert cfg.MODEL.RECLASS.MODE == "map"
    assert cfg.MODEL.RESNETS.DEPTH == 18  # from Base-Shapes-RCNN.yaml
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"  # from the model zoo's base


def test_apply_num_classes_sets_every_head_and_reports_changes():
    cfg = _cfg()
    changes = apply_num_classes(cfg, ["a", "b", "c"], ["things", "sky"])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.MODEL.RETINANET.NUM_CLASSES == 3
    assert cfg.MODEL.POINT_HEAD.NUM_CLASSES == 3 and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 2
    assert ("MODEL.ROI_HEADS.NUM_CLASSES", 80, 3) in changes
    assert apply_num_classes(cfg, ["a", "b", "c"], ["things", "sky"]) == []


def test_point_rend_semantic_counts_stuff_classes():
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    apply_num_classes(cfg, None, ["road", "car"])
    assert cfg.MODEL.POINT_HEAD.NUM_CLASSES == 2


def test_target_classes_precedence_and_the_union_of_train_sets():
    for name, classes in (("cfgtest_a", ["x", "y"]), ("cfgtest_b", ["y", "x"])):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda: [])
            MetadataCatalog.get(name).set(thing_classes=classes)
    cfg = _cfg()
    cfg.DATASETS.TRAIN = ("cfgtest_a",)
    assert target_classes(cfg) == ["x", "y"]
    cfg.MODEL.RECLASS.TARGET_CLASSES = ["z"]
    assert target_classes(cfg) == ["z"]
    # Several training datasets: the first's classes, then each later one's new classes.
    assert train_classes(["cfgtest_a", "cfgtest_b"]) == ["x", "y"]
    assert train_classes(["cfgtest_b", "cfgtest_a"]) == ["y", "x"]


def test_unknown_dataset_suggests_a_registered_one():
    with pytest.raises(ClassListError, match="'coco_2017_trian' is not a registered dataset. "
                       "Did you mean 'coco_2017_train'"):
        dataset_classes("coco_2017_trian", what="MODEL.RECLASS.SOURCE_DATASET")
    assert len(dataset_classes("lvis_v1_train")) == 1203


def test_a_yaml_setting_reclass_keys_without_add_reclass_config_names_the_call(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(f'_BASE_: "{BASE_CONFIG}"\nMODEL:\n  RECLASS:\n    MODE: "map"\n')
    cfg = get_cfg()
    with pytest.raises(ConfigError, match=re.escape(
            f"{config} sets MODEL.RECLASS keys, but the config has no MODEL.RECLASS: call "
            "d2_reclass.add_reclass_config(cfg) before merging config files or opts into it.")):
        merge_config_file(cfg, str(config))
    add_reclass_config(cfg)
    merge_config_file(cfg, str(config))
    assert cfg.MODEL.RECLASS.MODE == "map"
