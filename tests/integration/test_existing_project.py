"""An existing detectron2 project, written as its users write one, plus the README's lines.

The project has its own ``Trainer(DefaultTrainer)`` with a custom ``build_evaluator``,
registers its data with stock ``register_coco_instances``, merges a model-zoo config with stock
``merge_from_file``, freezes the config and calls ``default_setup``. The only d2_reclass lines
are the README's: ``add_reclass_config(cfg)`` and ``class Trainer(ReclassTrainerMixin, ...)``.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from d2_fixtures import REPO, SIX, THREE, THREE_FROM_SIX, captured_logs, small_model
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer

from d2_reclass import (
    ConfigError,
    ReclassCheckpointer,
    ReclassOptions,
    ReclassTrainerMixin,
    add_reclass_config,
)
from d2_reclass.data.synthetic import make_shapes_dataset

CLS = "roi_heads.box_predictor.cls_score"
BOX = "roi_heads.box_predictor.bbox_pred"
ZOO = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"

#: The user's project file; {data} and {zoo} are filled in by the fixture.
PROJECT = '''
import os

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator

from d2_reclass import ReclassTrainerMixin, add_reclass_config

register_coco_instances("pets_train", {{}}, "{data}/train.json", "{data}/train")
register_coco_instances("pets_val", {{}}, "{data}/val.json", "{data}/val")


class MyTrainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "my_eval")
        return COCOEvaluator(dataset_name, output_dir=output_folder)


class Trainer(ReclassTrainerMixin, MyTrainer):
    pass


def setup(args):
    cfg = get_cfg()
    add_reclass_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("{zoo}"))
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, args=(args,))
'''

#: The user's config: the repo's small model config (whose base is a model-zoo config), a
#: 6-class checkpoint that stores no names, and the checkpoint's classes. LR 0 keeps the
#: loaded rows as they are through the two iterations, so the saved file shows the mapping.
CONFIG = '''
_BASE_: "{repo}/configs/Base-Shapes-RCNN.yaml"
MODEL:
  WEIGHTS: "{weights}"
  RECLASS:
    MODE: "map"
    SOURCE_CLASSES: {six}
DATASETS:
  TRAIN: ("pets_train",)
  TEST: ("pets_val",)
SOLVER:
  BASE_LR: 0.0
  MAX_ITER: 2
  IMS_PER_BATCH: 2
DATALOADER:
  NUM_WORKERS: 0
OUTPUT_DIR: "{out}"
'''


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """THREE-class COCO-format data and a SIX-class checkpoint written as stock code writes it."""
    root = tmp_path_factory.mktemp("project")
    make_shapes_dataset(str(root), "train", THREE, 4, seed=1)
    make_shapes_dataset(str(root), "val", THREE, 2, seed=2)
    source = small_model(6, seed=1)
    torch.save({"model": source.state_dict()}, root / "six.pth")
    return root, source.state_dict()


@pytest.fixture(scope="module")
def project_run(shapes):
    root, _ = shapes
    (root / "train_net.py").write_text(PROJECT.format(data=root, zoo=ZOO))
    out = root / "out"
    (root / "config.yaml").write_text(CONFIG.format(
        repo=REPO, weights=root / "six.pth", six=list(SIX), out=out))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(root / "train_net.py"), "--config-file", str(root / "config.yaml")],
        capture_output=True, text=True, timeout=300, cwd=str(root), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_the_readme_lines_map_rows_by_name_in_a_stock_project(shapes, project_run):
    _, source = shapes
    out, _ = project_run
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": THREE}
    cls_w, box_w = final["model"][CLS + ".weight"], final["model"][BOX + ".weight"]
    assert cls_w.shape == (4, 256) and box_w.shape == (12, 256)
    for target, src in enumerate(THREE_FROM_SIX):
        if src is None:
            continue
        assert torch.equal(cls_w[target], source[CLS + ".weight"][src])
        assert torch.equal(box_w[4 * target:4 * target + 4],
                           source[BOX + ".weight"][4 * src:4 * src + 4])
    assert torch.equal(cls_w[3], source[CLS + ".weight"][6])  # background, carried


def test_what_d2_reclass_logs_reaches_log_txt_and_the_console(project_run):
    out, console = project_run
    log = (out / "log.txt").read_text()
    for text in (log, console):
        assert re.search(r"\| thing +\| triangle +\| triangle \[2\] +\|", text)
        # star is new: the default NEW_CLASS_INIT imprints it, and both tables say so.
        assert re.search(r"\| thing +\| star +\| new: imprint \(relative \w+\) +\|", text)
        assert re.search(r"NEW_CLASS_INIT \w+: 1 new class, ", text)
        assert re.search(r"\| star +\| imprint +\|", text)
        assert "AUTO_NUM_CLASSES: MODEL.ROI_HEADS.NUM_CLASSES 80 -> 3 (the classes of " \
               "DATASETS.TRAIN ('pets_train',))" in text
        assert f"[ReclassTrainer] Wrote {out / 'reclass_report.json'}" in text
        assert "Skip loading parameter" not in text
    assert log.count("| thing   | triangle       | triangle [2]") == 1
    assert (out / "reclass_report.json").is_file()
    # The user's own evaluator ran on the target classes.
    assert (out / "my_eval" / "coco_instances_results.json").is_file()


# ------------------------------------------------------------------------------------------
# In-process: the trainer's config, missing keys, bad keys, and datasets with no metadata yet
# ------------------------------------------------------------------------------------------
class UserTrainer(DefaultTrainer):
    """A project's trainer: nothing d2_reclass in it."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        raise NotImplementedError("not evaluated here")


class Trainer(ReclassTrainerMixin, UserTrainer):
    pass


@pytest.fixture(scope="module")
def registered(shapes):
    """``shapes`` registered with stock register_coco_instances, metadata not yet loaded."""
    root, _ = shapes
    name = "existing_project_train"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(root / "train.json"), str(root / "train"))
    assert MetadataCatalog.get(name).get("thing_classes", None) is None
    return name


def _user_cfg(root, dataset, *, reclass_keys: bool = True, opts=()):
    cfg = get_cfg()
    if reclass_keys:
        add_reclass_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(ZOO))
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-Shapes-RCNN.yaml"))
    cfg.merge_from_list(["DATASETS.TRAIN", (dataset,), "DATASETS.TEST", (),
                         "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
                         "OUTPUT_DIR", str(root / "inproc"), *opts])
    cfg.freeze()
    return cfg


def test_a_frozen_config_is_prepared_on_a_copy_from_stock_registered_data(shapes, registered):
    root, _ = shapes
    cfg = _user_cfg(root, registered, opts=["MODEL.ROI_HEADS.NUM_CLASSES", 4])
    with captured_logs("d2_reclass") as logs:
        trainer = Trainer(cfg)
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert trainer.cfg.is_frozen()
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 4 and cfg.is_frozen()  # the user's cfg as it was
    assert list(MetadataCatalog.get(registered).thing_classes) == THREE
    assert trainer.model.roi_heads.box_predictor.cls_score.out_features == 4
    assert ("AUTO_NUM_CLASSES: MODEL.ROI_HEADS.NUM_CLASSES was set to 4, but DATASETS.TRAIN "
            "('existing_project_train',) has 3 classes; using 3. Set it to 3 (or "
            "MODEL.RECLASS.AUTO_NUM_CLASSES False to keep your value and get an error).") in logs


def test_without_add_reclass_config_the_mixin_uses_the_defaults(shapes, registered, tmp_path):
    root, source = shapes
    six = small_model(6, seed=1)
    ReclassCheckpointer(six, str(tmp_path), reclass=ReclassOptions(target_classes=SIX)).save(
        "named")
    cfg = _user_cfg(root, registered, reclass_keys=False,
                    opts=["MODEL.WEIGHTS", str(tmp_path / "named.pth")])
    trainer = Trainer(cfg)
    assert trainer.cfg.MODEL.RECLASS.MODE == "auto" and "RECLASS" not in cfg.MODEL
    trainer.resume_or_load(resume=False)
    # auto mode with names stored in the checkpoint: mapped by name.
    loaded = trainer.model.state_dict()[CLS + ".weight"]
    assert torch.equal(loaded[0], source[CLS + ".weight"][2])
    assert torch.equal(loaded[1], source[CLS + ".weight"][0])


def test_a_mistyped_mode_is_a_config_error_before_any_data_is_loaded(shapes):
    root, _ = shapes
    loads = []
    name = "existing_project_counted"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: loads.append(1) or [])
        MetadataCatalog.get(name).set(thing_classes=THREE)
    cfg = _user_cfg(root, name, opts=["MODEL.RECLASS.MODE", "mapp"])
    with pytest.raises(ConfigError, match=r"^MODEL\.RECLASS\.MODE is 'mapp'; use one of auto, "
                       r"map, reinit, strict\. Did you mean 'map'\?$"):
        Trainer(cfg)
    assert loads == []


def test_a_dataset_that_cannot_be_loaded_for_its_classes_is_named(shapes, tmp_path):
    root, _ = shapes
    name = "existing_project_missing_json"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(tmp_path / "nope.json"), str(tmp_path))
    from d2_reclass import DatasetError

    with pytest.raises(DatasetError, match=f"Dataset '{name}' could not be loaded to read its "
                       "class names: .*nope.json.*Check the files it was registered with"):
        Trainer(_user_cfg(root, name))


def test_stock_merge_from_file_reads_every_shipped_config():
    from detectron2.projects.point_rend import add_pointrend_config

    for path in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if not path.endswith(".yaml"):
            continue
        cfg = get_cfg()
        add_pointrend_config(cfg)
        add_reclass_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs", path))
        assert cfg.MODEL.META_ARCHITECTURE, path


def test_zoo_bases_are_served_from_the_installed_detectron2():
    from d2_reclass.integration.config import ModelZooConfigHandler, installed_zoo_config

    url = ModelZooConfigHandler.PREFIX + "0123abc/configs/COCO-Detection/../Base-RCNN-FPN.yaml"
    assert installed_zoo_config(url) == os.path.normpath(
        model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    assert installed_zoo_config(ModelZooConfigHandler.PREFIX + "x/configs/../../setup.py") is None
    assert installed_zoo_config(ModelZooConfigHandler.PREFIX + "x/README.md") is None


def test_the_readme_integration_snippet_is_what_these_tests_use():
    readme = open(os.path.join(REPO, "README.md")).read()
    snippet = readme.split("### In an existing project (trainer mixin)", 1)[1].split("```")[1]
    assert "add_reclass_config(cfg)" in snippet
    assert "class Trainer(ReclassTrainerMixin, " in snippet
    for line in textwrap.dedent(PROJECT).splitlines():
        if "d2_reclass" in line:
            assert line.startswith("from d2_reclass import")
