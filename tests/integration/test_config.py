"""MODEL.RECLASS keys, class-list resolution, NUM_CLASSES, and every shipped YAML config."""
import glob
import os
import re

import pytest
import torch
from d2_fixtures import BASE_CONFIG, REPO
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.projects.point_rend import add_pointrend_config

from d2_reclass import (
    CLASSES_KEY,
    ClassListError,
    ConfigError,
    add_reclass_config,
    apply_num_classes,
    merge_config_file,
)
from d2_reclass.data.class_lists import dataset_classes, target_classes, train_classes
from d2_reclass.integration.config import prepare_reclass_config
from d2_reclass.layouts import THING
from d2_reclass.layouts.num_classes import (
    _CHECK_FNS,
    num_classes_keys,
    register_num_classes_check,
    register_num_classes_keys,
)

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


def _counts(cfg):
    m = cfg.MODEL
    return (m.ROI_HEADS.NUM_CLASSES, m.RETINANET.NUM_CLASSES, m.SEM_SEG_HEAD.NUM_CLASSES,
            m.POINT_HEAD.NUM_CLASSES)


@pytest.mark.parametrize("arch, roi, mask_head, expected", [
    # (ROI_HEADS, RETINANET, SEM_SEG_HEAD, POINT_HEAD) after setting 3 things and 2 stuff
    ("GeneralizedRCNN", "StandardROIHeads", "MaskRCNNConvUpsampleHead", (3, 80, 54, 80)),
    ("GeneralizedRCNN", "PointRendROIHeads", "PointRendMaskHead", (3, 80, 54, 3)),
    ("GeneralizedRCNN", "StandardROIHeads", "ImplicitPointRendMaskHead", (3, 80, 54, 3)),
    ("RetinaNet", "StandardROIHeads", "MaskRCNNConvUpsampleHead", (80, 3, 54, 80)),
    ("PanopticFPN", "StandardROIHeads", "MaskRCNNConvUpsampleHead", (3, 80, 2, 80)),
    ("SemanticSegmentor", "StandardROIHeads", "MaskRCNNConvUpsampleHead", (80, 80, 2, 80)),
    # An architecture nobody registered is taken for an R-CNN-style project.
    ("SomeProjectRCNN", "StandardROIHeads", "MaskRCNNConvUpsampleHead", (3, 80, 2, 80)),
])
def test_apply_num_classes_sets_only_the_keys_the_model_reads(arch, roi, mask_head, expected):
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.ROI_HEADS.NAME = arch, roi
    cfg.MODEL.ROI_MASK_HEAD.NAME = mask_head
    before = _counts(cfg)
    changes = apply_num_classes(cfg, ["a", "b", "c"], ["things", "sky"])
    assert _counts(cfg) == expected
    keys = ["MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "MODEL.POINT_HEAD.NUM_CLASSES"]
    assert sorted(changes) == sorted((k, b, a) for k, b, a in zip(keys, before, expected)
                                     if b != a)
    assert apply_num_classes(cfg, ["a", "b", "c"], ["things", "sky"]) == []


def test_point_rend_semantic_counts_stuff_classes():
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "PointRendSemSegHead"
    apply_num_classes(cfg, None, ["road", "car"])
    assert cfg.MODEL.POINT_HEAD.NUM_CLASSES == 2 and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 2
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80


def test_a_registered_project_decides_its_keys():
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "CfgTestProjectArch"

    @register_num_classes_keys
    def _keys(c):
        return [("MODEL.SEM_SEG_HEAD.NUM_CLASSES", THING)] \
            if c.MODEL.META_ARCHITECTURE == "CfgTestProjectArch" else None

    assert num_classes_keys(cfg) == [("MODEL.SEM_SEG_HEAD.NUM_CLASSES", THING)]
    assert apply_num_classes(cfg, ["a", "b", "c"]) == [("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 54, 3)]
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    assert num_classes_keys(cfg) == [("MODEL.ROI_HEADS.NUM_CLASSES", THING)]


def test_a_registered_check_runs_on_every_prepared_config():
    seen = []

    @register_num_classes_check
    def _check(c):
        seen.append(c.MODEL.ROI_HEADS.NUM_CLASSES)
        if c.MODEL.META_ARCHITECTURE == "CfgTestCheckedArch":
            raise ClassListError(f"vocabulary has 5 rows, NUM_CLASSES is "
                                 f"{c.MODEL.ROI_HEADS.NUM_CLASSES}")

    cfg = _cfg()
    add_reclass_config(cfg)
    cfg.MODEL.RECLASS.TARGET_CLASSES = ["a", "b", "c"]
    prepare_reclass_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "CfgTestCheckedArch"
    # The check sees the counts AUTO_NUM_CLASSES set, not the config's 80.
    with pytest.raises(ClassListError, match="NUM_CLASSES is 3"):
        prepare_reclass_config(cfg)
    assert seen == [3, 3]
    _CHECK_FNS.remove(_check)


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


def test_eval_only_targets_the_classes_the_weights_store(tmp_path):
    weights = str(tmp_path / "fine_tuned.pth")
    torch.save({"model": {}, CLASSES_KEY: {"thing_classes": ["a", "b", "c"]}}, weights)
    cfg = _cfg()
    cfg.merge_from_list(["MODEL.WEIGHTS", weights, "DATASETS.TRAIN", ("coco_2017_train",)])
    prepared, changes = prepare_reclass_config(cfg, eval_only=True)
    assert prepared.MODEL.RECLASS.TARGET_CLASSES == ["a", "b", "c"]
    assert [(c.key, c.old, c.new, c.source) for c in changes] == [
        ("MODEL.ROI_HEADS.NUM_CLASSES", 80, 3, f"the checkpoint {weights}")]
    assert cfg.MODEL.RECLASS.TARGET_CLASSES == []  # the caller's config untouched
    # Training, or explicit target classes, never read the weights' classes.
    assert prepare_reclass_config(cfg)[0].MODEL.ROI_HEADS.NUM_CLASSES == 80
    cfg.MODEL.RECLASS.TARGET_CLASSES = ["x", "y"]
    assert prepare_reclass_config(cfg, eval_only=True)[0].MODEL.ROI_HEADS.NUM_CLASSES == 2


def test_fed_loss_counts_must_match_num_classes():
    cfg = _cfg()
    cfg.merge_from_list(["MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True,
                         "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True,
                         "DATASETS.TRAIN", ("lvis_v1_train",),
                         "MODEL.RECLASS.TARGET_CLASSES", ["a", "b", "c"]])
    with pytest.raises(ClassListError, match=r"USE_FED_LOSS reads the class_image_count of "
                       r"DATASETS.TRAIN\[0\] 'lvis_v1_train', which counts 1203 classes, but "
                       r"MODEL.ROI_HEADS.NUM_CLASSES is 3\. Train on a dataset registered with "
                       r"the counts of the model's 3 classes, or set "
                       r"MODEL.ROI_BOX_HEAD.USE_FED_LOSS False"):
        prepare_reclass_config(cfg)
    cfg.MODEL.RECLASS.TARGET_CLASSES = []
    assert prepare_reclass_config(cfg)[0].MODEL.ROI_HEADS.NUM_CLASSES == 1203
