"""CenterNet2 (the registry's ``centernet2==1.0.post20221121``, upstream xingyizhou/CenterNet2)
with d2_reclass.

The wheel ships the ``centernet`` package but none of upstream's YAML configs, so the configs are
set here key by key as upstream's write them: ``configs/Base-CenterNet2.yaml`` with
``LVIS_CenterNet2_R50_Fed_1x.yaml``'s sigmoid CE and fed loss (two-stage CenterNet2: CenterNet
proposals, a 3-stage cascade of ``CustomFastRCNNOutputLayers``), and
``Base-CenterNet-FPN.yaml`` (one-stage ``CenterNetDetector``, one heatmap channel per class). The
trunk is ResNet-18 instead of R-50 and the box head's FC_DIM 256, to keep them small on the CPU.

The two-stage source checkpoint has LVIS's 1203 classes, trained as the LVIS config trains (on
``lvis_v1_train``); the one-stage one COCO's 80. Targets have "dog" and "person" (in another
order) and the new "gadget". Fed-loss frequency files are written as upstream's
``tools/get_lvis_cat_info.py`` writes them (image counts per category id).

detectron2 (since 0.6) reads ``ROI_BOX_HEAD.USE_FED_LOSS`` too: ``CustomCascadeROIHeads`` first
builds detectron2's own box predictors, which then need DATASETS.TRAIN's ``class_image_count``
metadata (LVIS has it). The 3-class training set is therefore registered with its counts.
"""
import json
import math
import os
from typing import Dict, List, Sequence

import pytest
import torch
from conftest import COCO_CLASSES, TARGET, TARGET_SOURCE, assert_std
from d2_fixtures import register_shapes_val, save_mapped_checkpoint
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from load_invariant import check_load_invariant

from d2_reclass import (
    CLASSES_KEY,
    ClassListError,
    ClassMismatchError,
    ReclassCheckpointer,
    ReclassOptions,
    add_reclass_config,
    check_num_classes,
    prepare_reclass_config,
)
from d2_reclass.layouts import find_layouts

pytest.importorskip("centernet", reason="CenterNet2 (centernet2, requirements/projects.txt) is "
                    "not installed")
from centernet.config import add_centernet_config  # noqa: E402

#: -log((1 - 0.01) / 0.01): CenterNet2's PRIOR_PROB 0.01 as a sigmoid bias.
PRIOR = -math.log(99.0)
STAGES = (0, 1, 2)
LVIS = "lvis_v1_train"
LVIS_CLASSES: List[str] = list(MetadataCatalog.get(LVIS).thing_classes)
LVIS_SOURCE = [LVIS_CLASSES.index(c) if c in LVIS_CLASSES else None for c in TARGET]
#: The 3-class training set: its image counts per class (metadata and CAT_FREQ_PATH alike).
TRAIN = "centernet2_three_train"
TRAIN_COUNTS = [{"id": i + 1, "image_count": 7 + i} for i in range(len(TARGET))]


def write_cat_info(path: str, counts: Sequence[dict]) -> str:
    with open(path, "w") as f:
        json.dump(list(counts), f)
    return path


def centernet2_cfg(num_classes: int, cat_info: str, *, one_stage: bool = False,
                   train: str = TRAIN, opts=()):
    """CenterNet2's train_net.py ``setup`` (``add_centernet_config``, the config's keys, opts),
    with the integration's ``add_reclass_config``."""
    cfg = get_cfg()
    add_centernet_config(cfg)
    add_reclass_config(cfg)
    m = cfg.MODEL
    m.PROPOSAL_GENERATOR.NAME = "CenterNet"
    m.BACKBONE.NAME = "build_p67_resnet_fpn_backbone"
    m.WEIGHTS = ""
    m.RESNETS.DEPTH, m.RESNETS.RES2_OUT_CHANNELS = 18, 64
    m.RESNETS.OUT_FEATURES = m.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    c = m.CENTERNET
    c.REG_WEIGHT, c.NOT_NORM_REG, c.INFERENCE_TH = 1.0, True, 0.0001
    c.PRE_NMS_TOPK_TRAIN, c.POST_NMS_TOPK_TRAIN = 4000, 2000
    c.PRE_NMS_TOPK_TEST, c.POST_NMS_TOPK_TEST = 1000, 256
    c.NMS_TH_TRAIN = c.NMS_TH_TEST = 0.9
    c.POS_WEIGHT = c.NEG_WEIGHT = 0.5
    c.IGNORE_HIGH_FP = 0.85
    if one_stage:  # Base-CenterNet-FPN.yaml
        m.META_ARCHITECTURE = "CenterNetDetector"
        c.NUM_CLASSES = num_classes
    else:  # Base-CenterNet2.yaml + LVIS_CenterNet2_R50_Fed_1x.yaml
        c.ONLY_PROPOSAL = c.WITH_AGN_HM = True
        m.ROI_HEADS.NAME = "CustomCascadeROIHeads"
        m.ROI_HEADS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
        m.ROI_HEADS.IOU_THRESHOLDS = [0.6]
        m.ROI_HEADS.NMS_THRESH_TEST = 0.7
        m.ROI_HEADS.NUM_CLASSES = num_classes
        m.ROI_BOX_CASCADE_HEAD.IOUS = [0.6, 0.7, 0.8]
        b = m.ROI_BOX_HEAD
        b.NAME, b.NUM_FC, b.POOLER_RESOLUTION, b.FC_DIM = "FastRCNNConvFCHead", 2, 7, 256
        b.CLS_AGNOSTIC_BBOX_REG = b.MULT_PROPOSAL_SCORE = True
        b.USE_SIGMOID_CE = b.USE_FED_LOSS = True
        b.CAT_FREQ_PATH = cat_info
        cfg.DATASETS.TRAIN = (train,)
    m.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


def build(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, str]:
    """The 3-class training set (registered), the class-count files, and the source
    checkpoints: two-stage on LVIS, one-stage on COCO."""
    from detectron2.data.datasets.lvis_v1_category_image_count import (
        LVIS_CATEGORY_IMAGE_COUNT,
    )

    from d2_reclass.data.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("centernet2")
    train_json = make_shapes_dataset(str(root), "train", ["square", "circle", "triangle"], 4,
                                     image_size=96, seed=0)
    with open(train_json) as f:
        data = json.load(f)
    for category, name in zip(data["categories"], TARGET):  # shapes named as the target
        category["name"] = name
    with open(train_json, "w") as f:
        json.dump(data, f)
    if TRAIN not in MetadataCatalog.list():
        register_coco_instances(TRAIN, {"class_image_count": TRAIN_COUNTS}, train_json,
                                str(root / "train"))
    out = {"lvis_counts": write_cat_info(str(root / "lvis.json"), LVIS_CATEGORY_IMAGE_COUNT),
           "target_counts": write_cat_info(str(root / "three.json"), TRAIN_COUNTS)}
    sources = (("two_stage", len(LVIS_CLASSES), False), ("one_stage", len(COCO_CLASSES), True))
    for name, k, one_stage in sources:
        model = build(centernet2_cfg(k, out["lvis_counts"], one_stage=one_stage, train=LVIS),
                      seed=1)
        out[name] = str(root / f"{name}.pth")
        torch.save({"model": model.state_dict()}, out[name])
    return out


def source(files, name: str) -> Dict[str, torch.Tensor]:
    return torch.load(files[name], weights_only=True)["model"]


def map_to_target(source_dataset: str) -> ReclassOptions:
    return ReclassOptions(mode="map", source_dataset=source_dataset, target_classes=TARGET)


def test_cascade_rows_map_by_name_with_the_sigmoid_prior_for_new_classes(files):
    cfg = centernet2_cfg(3, files["target_counts"])
    result = check_load_invariant(lambda: build(cfg, seed=2), files["two_stage"],
                                  reclass=map_to_target(LVIS))
    state, src, report = result.reclass_state, source(files, "two_stage"), result.report
    kept = [i for i, s in enumerate(LVIS_SOURCE) if s is not None]
    assert len(kept) == 2
    for s in STAGES:
        p = f"roi_heads.box_predictor.{s}."
        weight, bias = state[p + "cls_score.weight"], state[p + "cls_score.bias"]
        for t in kept:  # dog, person: the checkpoint's rows, bit for bit
            assert torch.equal(weight[t], src[p + "cls_score.weight"][LVIS_SOURCE[t]])
            assert torch.equal(bias[t], src[p + "cls_score.bias"][LVIS_SOURCE[t]])
        assert torch.equal(weight[3], src[p + "cls_score.weight"][1203])  # background kept
        assert torch.equal(bias[3], src[p + "cls_score.bias"][1203])
        # gadget: this head's own init, the sigmoid prior, not 0.
        assert bias[2].item() == pytest.approx(PRIOR, abs=1e-6)
        assert_std(weight[2], 0.01)
        # The class-agnostic box regressor is the checkpoint's.
        assert torch.equal(state[p + "bbox_pred.weight"], src[p + "bbox_pred.weight"])
        # freq_weight: the model's own counts (sqrt of 7, 8, 9), never the checkpoint's.
        assert torch.equal(state[p + "freq_weight"], torch.tensor([7.0, 8.0, 9.0]) ** 0.5)
        assert report.tensor(p + "cls_score.weight").layout == "softmax + background"
        assert report.tensor(p + "freq_weight").action == "model's own"
        assert "fed-loss class frequencies" in report.tensor(p + "freq_weight").layout
    assert report.spaces["thing"].resolution == "map"


def test_fed_loss_frequencies_stay_the_models_own_at_three_to_three_classes(files, tmp_path):
    # Same class count, other frequencies: stock (and a same-shape load) would take the
    # checkpoint's; the fed loss must sample by the model's own training set.
    other = [{"id": i + 1, "image_count": 50 + i} for i in range(len(TARGET))]
    source_cfg = centernet2_cfg(3, write_cat_info(str(tmp_path / "a.json"), other))
    path = str(tmp_path / "three.pth")
    torch.save({"model": build(source_cfg, seed=1).state_dict()}, path)
    cfg = centernet2_cfg(3, files["target_counts"])
    result = check_load_invariant(lambda: build(cfg, seed=2), path, reclass=ReclassOptions(
        source_classes=TARGET, target_classes=TARGET))
    for s in STAGES:
        key = f"roi_heads.box_predictor.{s}.freq_weight"
        assert torch.equal(result.reclass_state[key], torch.tensor([7.0, 8.0, 9.0]) ** 0.5)
        assert torch.equal(result.stock_state[key], torch.tensor([50.0, 51.0, 52.0]) ** 0.5)
        assert result.report.tensor(key).action == "model's own"
    assert result.report.spaces["thing"].resolution == "unchanged"


def test_unchanged_classes_load_exactly_as_stock(files):
    cfg = centernet2_cfg(len(LVIS_CLASSES), files["lvis_counts"], train=LVIS)
    result = check_load_invariant(lambda: build(cfg, seed=3), files["two_stage"],
                                  class_keys=set())
    assert not result.report.tensors and not result.report.mismatches


def test_one_stage_heatmap_channels_map_by_name(files):
    cfg = centernet2_cfg(3, "", one_stage=True)
    model = build(cfg, seed=2)
    assert [lay.key for lay in find_layouts(model)] == [
        "proposal_generator.centernet_head.cls_logits.weight",
        "proposal_generator.centernet_head.cls_logits.bias"]
    result = check_load_invariant(lambda: build(cfg, seed=2), files["one_stage"],
                                  reclass=map_to_target("coco_2017_train"))
    state, src = result.reclass_state, source(files, "one_stage")
    key = "proposal_generator.centernet_head.cls_logits."
    for t, s in enumerate(TARGET_SOURCE):
        if s is not None:
            assert torch.equal(state[key + "weight"][t], src[key + "weight"][s])
            assert torch.equal(state[key + "bias"][t], src[key + "bias"][s])
    assert state[key + "bias"][2].item() == pytest.approx(PRIOR, abs=1e-6)
    assert_std(state[key + "weight"][2], 0.01)
    assert result.report.tensor(key + "weight").layout == "per-class heatmap (sigmoid)"


@pytest.mark.parametrize("one_stage", [False, True])
def test_strict_raises_for_changed_classes(files, one_stage):
    cfg = centernet2_cfg(3, files["target_counts"], one_stage=one_stage)
    model = build(cfg, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = ReclassCheckpointer(model, reclass=ReclassOptions(mode="strict"))
    k = len(COCO_CLASSES) if one_stage else len(LVIS_CLASSES)
    with pytest.raises(ClassMismatchError, match=f"thing classes: checkpoint {k}, model 3"):
        checkpointer.load(files["one_stage" if one_stage else "two_stage"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_auto_num_classes_sets_the_keys_each_model_reads(files):
    two, changes = prepare_reclass_config(centernet2_cfg(80, files["target_counts"]))
    # CenterNet2's proposals are class-agnostic: only the cascade's key is read.
    assert [(c.key, c.new) for c in changes] == [("MODEL.ROI_HEADS.NUM_CLASSES", 3)]
    one, changes = prepare_reclass_config(centernet2_cfg(
        80, "", one_stage=True, opts=["MODEL.RECLASS.TARGET_CLASSES", TARGET]))
    assert [(c.key, c.new) for c in changes] == [("MODEL.CENTERNET.NUM_CLASSES", 3)]
    assert one.MODEL.ROI_HEADS.NUM_CLASSES == 80 and one.MODEL.RETINANET.NUM_CLASSES == 80


def test_auto_num_classes_compares_centernet_keys_with_centernets_default(files):
    from d2_fixtures import captured_logs

    from d2_reclass.integration.config import log_config_changes

    # 80 is add_centernet_config's default for CENTERNET.NUM_CLASSES (detectron2 has no such
    # key): an INFO line. A value somebody set (20) disagreeing with the classes: a WARNING.
    opts = ["MODEL.RECLASS.TARGET_CLASSES", TARGET]
    for num_classes, message in (
            (80, "AUTO_NUM_CLASSES: MODEL.CENTERNET.NUM_CLASSES 80 -> 3 (the classes of "
                 "MODEL.RECLASS.TARGET_CLASSES)"),
            (20, "AUTO_NUM_CLASSES: MODEL.CENTERNET.NUM_CLASSES was set to 20, but "
                 "MODEL.RECLASS.TARGET_CLASSES has 3 classes; using 3. Set it to 3 (or "
                 "MODEL.RECLASS.AUTO_NUM_CLASSES False to keep your value and get an error).")):
        _, changes = prepare_reclass_config(centernet2_cfg(num_classes, "", one_stage=True,
                                                           opts=opts))
        with captured_logs("d2_reclass") as logs:
            log_config_changes(changes)
        assert logs == [message]


def test_class_count_check_names_the_centernet_key(files):
    model = build(centernet2_cfg(80, "", one_stage=True))
    with pytest.raises(ClassListError, match=r"built for 80 classes at proposal_generator.*"
                       r"Set MODEL.CENTERNET.NUM_CLASSES 3") as e:
        check_num_classes(model, TARGET)
    assert "RETINANET" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# CenterNet2's own training loop with the integration lines
# ---------------------------------------------------------------------------------------------


def centernet2_do_train(cfg, model, resume: bool = False) -> ReclassCheckpointer:
    """CenterNet2's train_net.py ``do_train`` (not part of the wheel), written as upstream
    writes it: optimizer, scheduler, RESET_ITER, mapper and loader choices, the loop. The one
    integration line: ``ReclassCheckpointer.from_config`` where upstream builds a
    ``DetectionCheckpointer``. Returns the checkpointer, for the test to inspect."""
    from centernet.data.custom_build_augmentation import build_custom_augmentation
    from centernet.data.custom_dataset_dataloader import build_custom_train_loader
    from detectron2.checkpoint import PeriodicCheckpointer
    from detectron2.data import DatasetMapper, build_detection_train_loader
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.utils.events import EventStorage

    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = ReclassCheckpointer.from_config(  # was: DetectionCheckpointer(
        cfg, model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler)
    start_iter = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume).get(
        "iteration", -1) + 1
    if cfg.SOLVER.RESET_ITER:
        start_iter = 0
    max_iter = cfg.SOLVER.MAX_ITER if cfg.SOLVER.TRAIN_ITER < 0 else cfg.SOLVER.TRAIN_ITER
    periodic = PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=max_iter)
    mapper = DatasetMapper(cfg, True) if cfg.INPUT.CUSTOM_AUG == "" else DatasetMapper(
        cfg, True, augmentations=build_custom_augmentation(cfg, True))
    if cfg.DATALOADER.SAMPLER_TRAIN in ("TrainingSampler", "RepeatFactorTrainingSampler"):
        loader = build_detection_train_loader(cfg, mapper=mapper)
    else:
        loader = build_custom_train_loader(cfg, mapper=mapper)
    with EventStorage(start_iter) as storage:
        for data, iteration in zip(loader, range(start_iter, max_iter)):
            storage.step()
            losses = sum(model(data).values())
            assert torch.isfinite(losses).all()
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()
            periodic.step(iteration + 1)
    return checkpointer


@pytest.mark.slow
def test_centernet2_training_loop_with_the_integration_lines(files, tmp_path):
    # setup(args) with the integration lines: add_reclass_config (in centernet2_cfg), then
    # prepare_reclass_config before cfg.freeze(); NUM_CLASSES stays LVIS's 1203 for
    # AUTO_NUM_CLASSES to set from DATASETS.TRAIN.
    cfg = centernet2_cfg(len(LVIS_CLASSES), files["target_counts"], opts=[
        "MODEL.WEIGHTS", files["two_stage"], "MODEL.RECLASS.SOURCE_DATASET", LVIS,
        "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CAT", 3, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3,
        "SOLVER.BASE_LR", 0.0, "INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 96,
        "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.CENTERNET.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32])
    cfg, changes = prepare_reclass_config(cfg)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR)  # what setup()'s default_setup(cfg, args) does first
    assert [(c.key, c.old, c.new) for c in changes] == [("MODEL.ROI_HEADS.NUM_CLASSES", 1203, 3)]
    torch.manual_seed(4)
    checkpointer = centernet2_do_train(cfg, build_model(cfg))
    assert checkpointer.report.spaces["thing"].resolution == "map"

    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)
    assert saved[CLASSES_KEY] == {"thing_classes": TARGET}
    torch.manual_seed(4)
    expected = build_model(cfg).eval()
    ReclassCheckpointer.from_config(cfg, expected).load(files["two_stage"])
    want = expected.state_dict()
    assert saved["model"].keys() == want.keys()
    assert all(torch.equal(saved["model"][k], want[k]) for k in want)
    # NEW_CLASS_INIT auto imprints the new class from DATASETS.TRAIN's examples (CenterNet2 has
    # learned class rows to score them with, unlike Detic).
    assert checkpointer.report.new_classes.classes[0].method == "imprint"


# ---------------------------------------------------------------------------------------------
# --eval-only through CenterNet2's own main with the integration lines
# ---------------------------------------------------------------------------------------------


def centernet2_setup(args):
    """CenterNet2's train_net.py ``setup`` (not part of the wheel) with the integration lines:
    ``add_reclass_config`` before ``merge_from_file``, ``prepare_reclass_config`` before
    ``cfg.freeze()``. (``default_setup``'s logging and seeding are left out.)"""
    cfg = get_cfg()
    add_centernet_config(cfg)
    add_reclass_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg, _ = prepare_reclass_config(cfg, eval_only=args.eval_only)
    cfg.freeze()
    return cfg


def centernet2_do_test(cfg, model):
    """CenterNet2's train_net.py ``do_test``, written as upstream writes it."""
    from collections import OrderedDict

    from centernet.data.custom_build_augmentation import build_custom_augmentation
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, LVISEvaluator, inference_on_dataset

    results = OrderedDict()
    for dataset_name in cfg.DATASETS.TEST:
        mapper = None if cfg.INPUT.TEST_INPUT_TYPE == "default" else DatasetMapper(
            cfg, False, augmentations=build_custom_augmentation(cfg, False))
        loader = build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        output_folder = os.path.join(cfg.OUTPUT_DIR, f"inference_{dataset_name}")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type == "lvis":
            evaluator = LVISEvaluator(dataset_name, cfg, True, output_folder)
        elif evaluator_type == "coco":
            evaluator = COCOEvaluator(dataset_name, cfg, True, output_folder)
        else:
            raise AssertionError(evaluator_type)
        results[dataset_name] = inference_on_dataset(model, loader, evaluator)
    return list(results.values())[0] if len(results) == 1 else results


def centernet2_main(args):
    """CenterNet2's train_net.py ``main`` as upstream writes it (no TTA, no DDP), unchanged:
    ``build_model``, then a stock ``DetectionCheckpointer`` for ``--eval-only``."""
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = centernet2_setup(args)
    model = build_model(cfg)
    if args.eval_only:
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return centernet2_do_test(cfg, model)
    centernet2_do_train(cfg, model, resume=args.resume)
    return centernet2_do_test(cfg, model)


def test_eval_only_through_main_evaluates_the_fine_tuned_classes(files, tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    # The fine-tuned checkpoint: the training lines (setup's prepare_reclass_config, do_train's
    # ReclassCheckpointer.from_config) load the LVIS source into 3 classes and save it, as the
    # loop's checkpointer does at BASE_LR 0.
    out = str(tmp_path / "fine_tune")
    train = centernet2_cfg(len(LVIS_CLASSES), files["target_counts"], opts=[
        "MODEL.WEIGHTS", files["two_stage"], "MODEL.RECLASS.SOURCE_DATASET", LVIS,
        "MODEL.RECLASS.NEW_CLASS_INIT", "head", "OUTPUT_DIR", out])
    train, _ = prepare_reclass_config(train)
    saved = save_mapped_checkpoint(train)
    assert saved[CLASSES_KEY] == {"thing_classes": TARGET}

    # The eval config is the LVIS config (DATASETS.TRAIN lvis_v1_train, NUM_CLASSES 1203, its
    # fed-loss counts); only MODEL.WEIGHTS and DATASETS.TEST are given.
    val = "centernet2_three_val"
    register_shapes_val(str(tmp_path), val, TARGET)
    config_file = tmp_path / "lvis.yaml"
    config_file.write_text(centernet2_cfg(len(LVIS_CLASSES), files["lvis_counts"],
                                          train=LVIS).dump())
    evaluated, do_test = [], centernet2_do_test

    def spy(cfg, model):  # upstream's do_test, recording the model it evaluates
        evaluated.append(model)
        return do_test(cfg, model)

    monkeypatch.setattr(sys.modules[__name__], "centernet2_do_test", spy)
    opts = ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "DATASETS.TEST", (val,),
            "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 96, "DATALOADER.NUM_WORKERS", 0,
            "OUTPUT_DIR", str(tmp_path / "eval")]
    # detectron2's fed loss reads DATASETS.TRAIN's counts (LVIS's 1203) and would assert at
    # build: one clear error in setup instead, naming the fix.
    with pytest.raises(ClassListError, match=r"USE_FED_LOSS reads the class_image_count of "
                       r"DATASETS.TRAIN\[0\] 'lvis_v1_train', which counts 1203 classes, but "
                       r"MODEL.ROI_HEADS.NUM_CLASSES is 3.*USE_FED_LOSS False"):
        centernet2_main(SimpleNamespace(config_file=str(config_file), eval_only=True,
                                        resume=False, opts=opts))
    assert not evaluated
    results = centernet2_main(SimpleNamespace(
        config_file=str(config_file), eval_only=True, resume=False,
        opts=opts + ["MODEL.ROI_BOX_HEAD.USE_FED_LOSS", False]))

    model = evaluated[0]
    state = model.state_dict()
    for s in STAGES:
        p = f"roi_heads.box_predictor.{s}."
        assert model.roi_heads.box_predictor[s].num_classes == 3
        for key in ("cls_score.weight", "cls_score.bias", "bbox_pred.weight"):
            assert torch.equal(state[p + key], saved["model"][p + key])
    assert state.keys() == saved["model"].keys() - {
        f"roi_heads.box_predictor.{s}.{k}" for s in STAGES
        for k in ("freq_weight", "fed_loss_cls_weights")}
    assert all(torch.equal(v, saved["model"][k]) for k, v in state.items())
    assert sorted(k for k in results["bbox"] if k.startswith("AP-")) == [
        "AP-dog", "AP-gadget", "AP-person"]
