"""ReclassTrainer and tools/train_net.py end to end on the CPU, on real files."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from d2_fixtures import REPO, THREE, small_model
from detectron2.data import MetadataCatalog

from d2_reclass import ClassListError, ReclassCheckpointer, ReclassOptions, check_num_classes
from d2_reclass.data.synthetic import make_shapes_dataset

COCO = list(MetadataCatalog.get("coco_2017_train").thing_classes)
NAMES = ["dog", "person", "gadget"]  # drawn as THREE's shapes
CLS = "roi_heads.box_predictor.cls_score.weight"
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def test_off_by_one_num_classes_is_named_before_training():
    with pytest.raises(ClassListError, match=r"built for 4 classes at roi_heads\.box_predictor"
                       r".*has 3 \(one too many.*Set MODEL\.ROI_HEADS\.NUM_CLASSES 3"):
        check_num_classes(small_model(4), THREE)
    with pytest.raises(ClassListError, match="one too few: the last class would be trained as "
                       "background"):
        check_num_classes(small_model(2), THREE)
    check_num_classes(small_model(3), THREE)


@pytest.fixture(scope="module")
def coco_task(tmp_path_factory):
    """A 3-class COCO-format dataset named with COCO names (+1 new) and an 80-class
    COCO-shaped checkpoint that stores no class names."""
    root = tmp_path_factory.mktemp("task")
    for split, n, seed in (("train", 8, 1), ("val", 4, 2)):
        path = make_shapes_dataset(str(root), split, THREE, n, seed=seed)
        with open(path) as f:
            data = json.load(f)
        for cat, name in zip(data["categories"], NAMES):
            cat["name"] = name
        with open(path, "w") as f:
            json.dump(data, f)
    ckpt = root / "coco80.pth"
    source = small_model(80, seed=1)
    torch.save({"model": source.state_dict()}, ckpt)
    return root, str(ckpt), source.state_dict()


def _datasets(root):
    args = []
    for split in ("train", "val"):
        args += ["--coco-dataset", f"t_{split}", str(root / f"{split}.json"), str(root / split)]
    return args


def _train_net(root, *args, timeout=300, returncode=0):
    """Run tools/train_net.py; ``args`` are its flags first, then KEY VALUE opts."""
    opts = ["DATASETS.TRAIN", '("t_train",)', "DATASETS.TEST", '("t_val",)',
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]
    proc = subprocess.run([sys.executable, TRAIN_NET, *_datasets(root), *args, *opts],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(coco_task, tmp_path_factory):
    root, ckpt, _ = coco_task
    out = tmp_path_factory.mktemp("out")
    log = _train_net(root, "--config-file", "configs/shapes_target_map.yaml",
                     "MODEL.WEIGHTS", ckpt, "MODEL.RECLASS.SOURCE_DATASET", "coco_2017_train",
                     "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out))
    return out, log


def test_train_net_maps_an_80_class_checkpoint_trains_and_evaluates(coco_task, trained):
    _, _, source = coco_task
    out, log = trained
    assert "Skip loading parameter" not in log
    assert "| dog            | dog [16]" in log  # the mapping table, logged once
    assert log.count("| dog            | dog [16]") == 1
    assert "AUTO_NUM_CLASSES: MODEL.ROI_HEADS.NUM_CLASSES 80 -> 3" in log
    assert "Evaluation results for t_val" in log
    report = json.loads((out / "reclass_report.json").read_text())
    kept = report["spaces"]["thing"]["mapping"]["kept"]
    assert [(k["target"], k["source_index"]) for k in kept] == [("dog", 16), ("person", 0)]
    assert report["spaces"]["thing"]["mapping"]["new"] == ["gadget"]
    final = torch.load(out / "model_final.pth", weights_only=True)
    # Saved by the trainer's PeriodicCheckpointer: it must be ours, storing the names.
    assert final["d2_reclass"] == {"thing_classes": NAMES}


def test_eval_only_with_the_base_config_uses_the_stored_classes(coco_task, trained):
    root, _, _ = coco_task
    out, _ = trained
    log = _train_net(root, "--eval-only", "--config-file", "configs/Base-Shapes-RCNN.yaml",
                     "MODEL.WEIGHTS", str(out / "model_final.pth"),
                     "OUTPUT_DIR", str(out / "eval"))
    # The classes came from the checkpoint, and the log line says so.
    assert ("AUTO_NUM_CLASSES: MODEL.ROI_HEADS.NUM_CLASSES 80 -> 3 (the classes of the "
            f"checkpoint {out / 'model_final.pth'})") in log
    assert "MODEL.RECLASS.TARGET_CLASSES" not in log
    assert "Skip loading parameter" not in log
    assert "Evaluation results for t_val" in log
    # The evaluator's class histogram: the model's 3 classes are the dataset's.
    assert "|    dog     |" in log and "|   gadget   |" in log


def test_a_run_that_fails_before_training_leaves_no_empty_metrics_json(coco_task, tmp_path):
    root, ckpt, _ = coco_task
    # MODE map, and the checkpoint stores no class names: the load fails, in resume_or_load.
    log = _train_net(root, "--config-file", "configs/shapes_target_map.yaml",
                     "MODEL.WEIGHTS", ckpt, "OUTPUT_DIR", str(tmp_path), returncode=1)
    assert f"ClassListError: MODE map needs the thing class names of {ckpt}, which stores none" \
        in log
    # default_setup's files stay (they say what ran); detectron2's JSONWriter had created an
    # empty metrics.json when the trainer was built, which is gone.
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "log.txt"]


def test_resume_with_reordered_classes_fails_before_anything_is_written(coco_task, trained):
    root, _, _ = coco_task
    out, _ = trained
    before = {p: (out / p).read_bytes() for p in ("config.yaml", "log.txt", "last_checkpoint")}
    files = sorted(os.listdir(out))
    log = _train_net(root, "--resume", "--config-file", "configs/shapes_target_map.yaml",
                     "MODEL.RECLASS.TARGET_CLASSES", '["person", "dog", "gadget"]',
                     "OUTPUT_DIR", str(out), returncode=1)
    assert (f"ResumeClassMismatchError: Cannot resume from {out / 'model_final.pth'}: it was "
            "trained for other classes than the model's (thing classes: the same 3 classes in "
            "another order (checkpoint: dog, person, gadget; model: person, dog, gadget)).") in log
    assert "Use a new OUTPUT_DIR, or start without --resume" in log
    assert {p: (out / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(out)) == files


def test_the_saved_model_maps_by_stored_names_with_no_source_key(trained):
    out, _ = trained
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    model = small_model(2, seed=3)
    ReclassCheckpointer(model,
        reclass=ReclassOptions(target_classes=["gadget", "dog"])).load(str(out / "model_final.pth"))
    new = model.state_dict()[CLS]
    assert torch.equal(new[0], final[CLS][2]) and torch.equal(new[1], final[CLS][0])
    assert torch.equal(new[2], final[CLS][3])


@pytest.mark.slow
def test_two_process_launch_with_reinit_keeps_ranks_identical(coco_task, tmp_path):
    root, ckpt, _ = coco_task
    worker = os.path.join(REPO, "tests", "ddp_train_worker.py")
    cmd = [sys.executable, worker, str(tmp_path), "--num-gpus", "2",
           "--config-file", "configs/shapes_target_reinit.yaml", *_datasets(root)]
    opts = ["DATASETS.TRAIN", '("t_train",)', "DATASETS.TEST", "()", "MODEL.WEIGHTS", ckpt,
            "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd + opts, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("loaded", "final"):
        r0 = torch.load(tmp_path / f"rank0_{stage}.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"rank1_{stage}.pt", weights_only=True)
        assert r0.keys() == r1.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (stage, k)
    loaded = torch.load(tmp_path / "rank0_loaded.pt", weights_only=True)
    assert loaded[CLS].shape == (4, 256)
    # reinit: every class row fresh from N(0, 0.01); background carried over.
    assert abs(float(loaded[CLS][:3].std()) - 0.01) < 0.002


def test_the_lazy_demo_config_is_seeded_as_its_yaml_twin():
    from detectron2.config import LazyConfig, get_cfg
    from detectron2.engine.defaults import _try_get_key

    from d2_reclass import add_reclass_config, merge_config_file

    lazy = LazyConfig.load(os.path.join(REPO, "configs", "lazy_shapes_target_map.py"))
    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, os.path.join(REPO, "configs", "shapes_target_map.yaml"))
    # default_setup's own lookup: -1 would mean "Using a generated random seed".
    assert _try_get_key(lazy, "SEED", "train.seed", default=-1) == cfg.SEED == 1
    r = cfg.MODEL.RECLASS
    assert (lazy.reclass["mode"], lazy.reclass["seed"], lazy.reclass["new_class_init"]) == (
        r.MODE, r.SEED, r.NEW_CLASS_INIT)


def test_a_lazy_head_sized_by_a_field_not_set_is_refused_before_training():
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import DatasetCatalog

    from d2_reclass.integration.lazy import apply_lazy_num_classes, check_lazy_num_classes

    for name, classes in (("t_lazy3", ["a", "b", "c"]), ("t_lazy4", ["a", "b", "c", "d"])):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda: [])
            MetadataCatalog.get(name).set(thing_classes=classes)
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "lazy_shapes_target_map.py"))
    cfg.dataloader.train.dataset.names = "t_lazy3"
    assert apply_lazy_num_classes(cfg) == [("model.roi_heads.num_classes", 80, 3)]
    model = instantiate(cfg.model)
    check_lazy_num_classes(cfg, model)  # built for its 3 classes: passes
    # A head sized by a field the setter does not reach stays at its count: here 3, for 4.
    cfg.dataloader.train.dataset.names = "t_lazy4"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ClassListError, match=re.escape(
            "The model was built for 3 classes at roi_heads.box_predictor.cls_score.weight, "
            "but the class list (reclass.target_classes, else "
            "dataloader.train.dataset.names) has 4 (one too few: the last class would be "
            "trained as background). Set the field of cfg.model that sizes this head")):
        check_lazy_num_classes(cfg, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_lazyconfig_train_net_maps_init_checkpoint(coco_task, tmp_path):
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    root, _, _ = coco_task
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
    torch.manual_seed(0)
    source = instantiate(cfg.model).state_dict()
    ckpt = tmp_path / "coco80_lazy.pth"
    torch.save({"model": source}, ckpt)
    out = tmp_path / "out"
    script = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
    cmd = [sys.executable, script, "--config-file", "configs/lazy_mask_rcnn_subset_map.py",
           *_datasets(root),
           f"train.init_checkpoint={ckpt}", f"train.output_dir={out}", "train.device=cpu",
           "train.max_iter=1", "dataloader.train.dataset.names=t_train",
           "dataloader.train.total_batch_size=1", "dataloader.train.num_workers=0",
           "dataloader.train.mapper.augmentations=[]", "dataloader.test.dataset.names=t_val",
           "dataloader.test.num_workers=0", "dataloader.evaluator.dataset_name=t_val"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "num_classes: model.roi_heads.num_classes 80 -> 3" in log
    assert "Skip loading parameter" not in log
    report = json.loads((out / "reclass_report.json").read_text())
    assert report["spaces"]["thing"]["mapping"]["new"] == ["gadget"]
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": NAMES}
    mask = "roi_heads.mask_head.predictor.weight"
    assert final["model"][mask].shape[0] == 3


def test_evaluating_on_a_dataset_with_other_classes_says_how_to_map():
    from d2_fixtures import small_cfg
    from detectron2.data import DatasetCatalog

    from d2_reclass import ReclassTrainer

    if "t_other_val" not in DatasetCatalog.list():
        # Labelled: a class that no annotation uses would be left out, not refused.
        DatasetCatalog.register("t_other_val", lambda: [{"file_name": "x.png", "annotations": [
            {"category_id": 0}, {"category_id": 1}]}])
        MetadataCatalog.get("t_other_val").set(thing_classes=["a", "b"])
    # Without class names for the model, only the count can be checked.
    cfg = small_cfg(3, opts=["DATASETS.TEST", ("t_other_val",), "DATASETS.TRAIN", ()])
    with pytest.raises(ClassListError, match="DATASETS.TEST 't_other_val' has 2 .* set "
                       "MODEL.RECLASS.TARGET_CLASSES to the dataset's classes"):
        ReclassTrainer.test(cfg, small_model(3))
    # With them (here the 80 of DATASETS.TRAIN, coco_2017_train), the names are.
    cfg = small_cfg(80, opts=["DATASETS.TEST", ("t_other_val",)])
    with pytest.raises(ClassListError, match=re.escape(
            "DATASETS.TEST 't_other_val' has the thing classes 'a', 'b', not among the classes "
            "of DATASETS.TRAIN ('coco_2017_train',): its labels cannot be mapped to the model's "
            "classes by name. DATASETS.TEST 't_other_val': ['a', 'b']; the classes of "
            "DATASETS.TRAIN ('coco_2017_train',): ['person', 'bicycle', 'car', 'motorcycle', "
            "'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light', 'fire hydrant', "
            "'stop sign', ... (80 classes)]. Evaluate on datasets whose classes the model has, "
            "or add a dataset with the missing classes to DATASETS.TRAIN (or set "
            "MODEL.RECLASS.TARGET_CLASSES).")):
        ReclassTrainer.test(cfg, small_model(80))
