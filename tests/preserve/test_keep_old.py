"""MODEL.RECLASS.KEEP_SOURCE_CLASSES and PRESERVE: the checkpoint's classes, then the new ones,
kept through training on a dataset that labels (and lists) only the new class."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from d2_fixtures import REPO, SIX, small_cfg, small_model
from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from d2_reclass import (
    ClassListError,
    ConfigError,
    ReclassCheckpointer,
    ReclassOptions,
    ReclassTrainer,
    options_from_config,
    prepare_reclass_config,
    register_coco_dataset,
)
from d2_reclass.data.class_lists import kept_target_classes
from d2_reclass.data.synthetic import make_shapes_dataset
from d2_reclass.preserve import (
    IGNORE,
    Teacher,
    add_pseudo_labels,
    ignores_unsure,
    preservation_summary,
)
from d2_reclass.preserve.distill import sigmoid_distill_loss, softmax_distill_loss

SEVEN = SIX + ["star"]
CLS = "roi_heads.box_predictor.cls_score.weight"
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SQUARE, STAR, BACKGROUND = 0, 6, 7


def _new_only(root, split: str, n: int, seed: int) -> str:
    """Images holding a star (first) and old shapes; the json labels and lists only star."""
    path = make_shapes_dataset(str(root), split, SEVEN, n, seed=seed, image_size=64,
                               first_class="star")
    with open(path) as f:
        data = json.load(f)
    data["annotations"] = [dict(a, category_id=1) for a in data["annotations"]
                           if a["category_id"] == 7]
    data["categories"] = [{"id": 1, "name": "star"}]
    with open(path, "w") as f:
        json.dump(data, f)
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 6-class checkpoint storing its names, the same without names, a "biased" one whose
    box classifier calls every box a square with score ~1 (so its detections are known), and
    a registered new-only dataset (``ko_new``)."""
    root = tmp_path_factory.mktemp("keep_old")
    source = small_model(6, seed=1)
    named = ReclassCheckpointer(source, str(root), reclass=ReclassOptions(target_classes=SIX))
    named.save("named")
    torch.save({"model": source.state_dict()}, root / "unnamed.pth")
    with torch.no_grad():
        source.roi_heads.box_predictor.cls_score.bias[SQUARE] = 12.0
        source.roi_heads.box_predictor.bbox_pred.weight.zero_()
        source.roi_heads.box_predictor.bbox_pred.bias.zero_()
    named.save("biased")
    json_file = _new_only(root, "train", 6, seed=3)
    if "ko_new" not in DatasetCatalog.list():
        register_coco_dataset("ko_new", json_file, str(root / "train"))
    return root


def _cfg(root, *opts, weights="named.pth"):
    return small_cfg(80, opts=[
        "MODEL.WEIGHTS", str(root / weights), "MODEL.RECLASS.KEEP_SOURCE_CLASSES", True,
        "DATASETS.TRAIN", ("ko_new",), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2,
        "DATALOADER.NUM_WORKERS", 0, "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64,
        "SOLVER.MAX_ITER", 2, "OUTPUT_DIR", str(root / "out"), *opts])


# ----------------------------------------------------------------------------- the class list
def test_kept_target_classes_are_the_source_then_the_new_ones_in_order():
    assert kept_target_classes(["a", "b_c"], [["star", "B-C"], ["a", "moon", "star"]]) == \
        ["a", "b_c", "star", "moon"]


def test_the_key_makes_the_checkpoints_classes_then_the_new_one(task):
    cfg, changes = prepare_reclass_config(_cfg(task))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 7
    assert ("MODEL.ROI_HEADS.NUM_CLASSES", 80, 7) in [c[:3] for c in changes]
    # The default PRESERVE (pseudo_labels) trains on images without a labelled star too.
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False
    assert list(options_from_config(cfg).target_classes) == SEVEN


def test_source_classes_name_a_checkpoint_that_stores_none(task):
    cfg = _cfg(task, "MODEL.RECLASS.SOURCE_CLASSES", json.dumps(SIX), weights="unnamed.pth")
    assert list(options_from_config(cfg).target_classes) == SEVEN


def test_a_checkpoint_without_names_is_one_clear_error(task):
    with pytest.raises(ClassListError, match=r"KEEP_SOURCE_CLASSES keeps the checkpoint's "
                       r"classes, but MODEL.WEIGHTS .*unnamed.pth stores no class names\. Name "
                       r"them with MODEL.RECLASS.SOURCE_CLASSES"):
        prepare_reclass_config(_cfg(task, weights="unnamed.pth"))


def test_keep_source_classes_with_mode_reinit_is_one_clear_error(task):
    with pytest.raises(ConfigError, match=r"MODEL.RECLASS.KEEP_SOURCE_CLASSES keeps what the "
                       r"checkpoint knows .* MODEL.RECLASS.MODE reinit starts every class row "
                       r"fresh: use MODEL.RECLASS.MODE auto \(or map\)"):
        prepare_reclass_config(_cfg(task, "MODEL.RECLASS.MODE", "reinit"))
    with pytest.raises(ConfigError, match="reclass option 'keep_source_classes'"):
        ReclassOptions(keep_source_classes=True, mode="reinit")


def test_explicit_target_classes_and_the_key_are_one_clear_error(task):
    with pytest.raises(ConfigError, match="TARGET_CLASSES is also set .*: set one of the two"):
        prepare_reclass_config(_cfg(task, "MODEL.RECLASS.TARGET_CLASSES", '["star"]'))


def test_a_misspelt_method_names_the_key():
    with pytest.raises(ConfigError, match=r"MODEL.RECLASS.PRESERVE is 'pseudo_label'; use one "
                       r"of .* Did you mean 'pseudo_labels'"):
        cfg = small_cfg(3, opts=["MODEL.RECLASS.PRESERVE", "pseudo_label"])
        prepare_reclass_config(cfg)


@pytest.mark.parametrize("key, value, bound", [
    ("PSEUDO_LABEL_SCORE", 1.5, "between 0.0 and 1.0"),
    ("SOURCE_AVERAGE", -0.1, "between 0.0 and 1.0"),
    ("DISTILL_WEIGHT", -1.0, ">= 0.0")])
def test_a_weight_out_of_range_names_the_key_and_the_range(key, value, bound):
    with pytest.raises(ConfigError, match=re.escape(
            f"MODEL.RECLASS.{key} is {value!r}; it must be a number {bound}.")):
        prepare_reclass_config(small_cfg(3, opts=[f"MODEL.RECLASS.{key}", value]))


@pytest.mark.parametrize("opts, method", [
    ([], "'none'"), (["MODEL.RECLASS.KEEP_SOURCE_CLASSES", True, "MODEL.RECLASS.PRESERVE",
                      "frozen_rows"], "'frozen_rows' (every entry but the new classes'")])
def test_a_source_average_without_a_teacher_is_one_clear_error(task, opts, method):
    cfg = _cfg(task, "MODEL.RECLASS.SOURCE_AVERAGE", 0.3, *opts) if opts else small_cfg(
        3, opts=["MODEL.RECLASS.SOURCE_AVERAGE", 0.3])
    with pytest.raises(ConfigError, match=re.escape(
            "MODEL.RECLASS.SOURCE_AVERAGE is 0.3, but it averages with the source model "
            "that PRESERVE pseudo_labels or distill load as their teacher, and the method is "
            f"{method}")):
        prepare_reclass_config(cfg)


def test_the_python_api_takes_the_key(task):
    """ReclassOptions(keep_source_classes=True) without target classes: the checkpoint's,
    then those of the examples' datasets."""
    from d2_reclass import NewClassExamples

    model = small_model(7, seed=4)
    checkpointer = ReclassCheckpointer(
        model, reclass=ReclassOptions(keep_source_classes=True, new_class_init="head"),
        examples=NewClassExamples(datasets=("ko_new",)))
    checkpointer.load(str(task / "named.pth"))
    source = torch.load(task / "named.pth", weights_only=True)["model"]
    mapping = checkpointer.report.spaces["thing"].mapping
    assert list(mapping.target) == SEVEN and mapping.new == ["star"]
    assert torch.equal(model.state_dict()[CLS][:6], source[CLS][:6])
    assert torch.equal(model.state_dict()[CLS][7], source[CLS][6])  # background


# ----------------------------------------------------------------------------- pseudo-labels
def _instances(boxes, classes, size=(64, 64)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def _detections(boxes, scores, classes, size=(64, 64)):
    det = Instances(size)
    det.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    det.scores = torch.tensor(scores)
    det.pred_classes = torch.tensor(classes)
    return det


def test_pseudo_labels_add_confident_old_detections_except_on_labelled_boxes():
    star = [10.0, 10.0, 30.0, 30.0]
    gt = _instances([star], [STAR])
    det = _detections([[11, 10, 30, 31],   # the source's "diamond" on the star: dropped
                       [40, 40, 60, 60],   # a square: kept, as class 0
                       [0, 40, 20, 60],    # a hexagon below the score: dropped
                       [40, 0, 60, 20]],   # a class the model dropped: dropped
                      [0.9, 0.8, 0.3, 0.9], [3, 0, 4, 5])
    index = [0, 1, 2, 3, 4, None]
    out = add_pseudo_labels(gt, det, index, score=0.5)
    assert out.gt_classes.tolist() == [STAR, SQUARE]
    assert torch.equal(out.gt_boxes.tensor, torch.tensor([star, [40.0, 40, 60, 60]]))
    assert len(gt) == 1 and len(det) == 4  # inputs untouched
    # Old classes map by index: a teacher class at another model id lands there.
    out = add_pseudo_labels(_instances([], []), det, [5, 1, 2, 0, 4, None], score=0.5)
    assert out.gt_classes.tolist() == [0, 5]


def test_unsure_old_detections_are_added_as_boxes_to_ignore():
    star = [10.0, 10.0, 30.0, 30.0]
    gt = _instances([star], [STAR])
    det = _detections([[11, 10, 30, 31],   # unsure, on the star: dropped
                       [40, 40, 60, 60],   # a square: a label, class 0
                       [41, 40, 60, 61],   # unsure, on that pseudo-label: dropped
                       [0, 40, 20, 60],    # an unsure hexagon: ignored
                       [40, 0, 60, 20]],   # unsure, of a class the model dropped: dropped
                      [0.3, 0.8, 0.2, 0.3, 0.1], [3, 0, 0, 4, 5])
    index = [0, 1, 2, 3, 4, None]
    out = add_pseudo_labels(gt, det, index, score=0.5, ignore_unsure=True)
    assert out.gt_classes.tolist() == [STAR, SQUARE, IGNORE]
    assert torch.equal(out.gt_boxes.tensor, torch.tensor([star, [40.0, 40, 60, 60],
                                                          [0.0, 40, 20, 60]]))
    assert add_pseudo_labels(gt, det, index, score=0.5).gt_classes.tolist() == [STAR, SQUARE]


def test_pseudo_labels_carry_masks_next_to_polygon_labels():
    gt = _instances([[0, 0, 10, 10]], [STAR])
    gt.gt_masks = PolygonMasks([[[0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]]])
    det = _detections([[20, 20, 40, 40]], [0.9], [1])
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 25:35, 25:35] = True
    out = add_pseudo_labels(gt, det, list(range(6)), masks=masks)
    assert isinstance(out.gt_masks, BitMasks) and out.gt_masks.tensor.shape == (2, 64, 64)
    assert torch.equal(out.gt_masks.tensor[1], masks[0])
    assert int(out.gt_masks.tensor[0].sum()) == int(
        BitMasks.from_polygon_masks(gt.gt_masks, 64, 64).tensor.sum())
    with pytest.raises(ConfigError, match="pseudo_labels: the training instances have masks, "
                       "but the source model gives none"):
        add_pseudo_labels(gt, det, list(range(6)))


def test_the_teacher_runs_each_image_once_with_the_detections_of_its_first_batch(task):
    model = small_model(6, seed=1)
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain, cached = Teacher(model, cache=False), Teacher(model, cache=True)
    first = cached.detect(images[:2])
    again = cached.detect([images[1], images[2], images[1]])
    # One forward pass per call, for the images not seen before (image 1 is run once).
    assert (cached.calls, cached.runs, cached.images, cached.cached) == (2, 3, 5, 2)
    assert again[0] is first[1] and again[2] is first[1]
    expected = plain.detect(images[:2]) + plain.detect([images[2]])
    assert (plain.calls, plain.runs, plain.cached) == (2, 3, 0)
    for a, b in zip(first + again[1:2], expected):
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
    # Batched or alone, an image gets the same detections up to the last bits.
    alone = plain.detect([images[0]])[0]
    assert torch.equal(alone.pred_classes, first[0].pred_classes)
    assert torch.allclose(alone.scores, first[0].scores, atol=1e-5)
    assert torch.allclose(alone.pred_boxes.tensor, first[0].pred_boxes.tensor, atol=1e-3)


def _train_capturing(cfg):
    """Train ReclassTrainer(cfg); return it and, per iteration, the batch the model got and
    the gt classes the box predictor's loss saw (with the proposals' boxes)."""
    trainer = ReclassTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    batches, seen = [], []
    model.register_forward_pre_hook(lambda m, args: batches.append(args[0]))
    predictor = model.roi_heads.box_predictor
    original = predictor.losses

    def losses(predictions, proposals):
        seen.append([(p.proposal_boxes.tensor.clone(), p.gt_classes.clone()) for p in proposals])
        return original(predictions, proposals)

    predictor.losses = losses
    trainer.train()
    return trainer, batches, seen


def test_old_objects_never_reach_the_loss_as_background(task):
    """The biased teacher calls boxes squares; under the default method every proposal on one
    of them is trained as a square, never as background; with PRESERVE none, as background."""
    from detectron2.structures import pairwise_iou

    trainer, batches, seen = _train_capturing(_cfg(task, weights="biased.pth"))
    assert trainer.preservation.method == "pseudo_labels"
    teacher = trainer.preservation.teacher
    images = sum(len(b) for b in batches)
    assert (teacher.images, teacher.calls) == (images, len(batches))
    assert re.fullmatch(
        rf"\[Preservation\] MODEL.RECLASS.PRESERVE pseudo_labels; "
        rf"{trainer.preservation.attached[0].added} pseudo-labels of old classes added; "
        rf"teacher: {images} images, {teacher.runs} run in {len(batches)} forward passes, "
        rf"{teacher.cached} from its cache, [0-9.]+ s\.",
        preservation_summary(trainer.preservation))
    on_old = 0
    for batch, per_image in zip(batches, seen):
        detections = teacher.detect([d["image"] for d in batch])
        for d, det, (boxes, classes) in zip(batch, detections, per_image):
            labels = d["instances"]
            stars = labels.gt_boxes[labels.gt_classes == STAR]
            squares = labels.gt_boxes[labels.gt_classes == SQUARE]
            # What reached the model: the stars, then the square detections off the stars.
            expected = det.pred_boxes[det.scores >= 0.5]
            if len(stars):
                expected = expected[pairwise_iou(expected, stars).max(dim=1).values < 0.5]
            assert torch.equal(squares.tensor, expected.tensor)
            assert set(labels.gt_classes.tolist()) <= {SQUARE, STAR}
            if len(squares):
                iou = pairwise_iou(Boxes(boxes), squares).max(dim=1).values
                hit = iou >= 0.5
                on_old += int(hit.sum())
                assert not (classes[hit] == BACKGROUND).any()
    assert on_old > 0

    trainer, batches, seen = _train_capturing(
        _cfg(task, "MODEL.RECLASS.PRESERVE", "none", "OUTPUT_DIR", str(task / "none"),
             weights="biased.pth"))
    assert trainer.preservation.teacher is None
    as_background = 0
    for batch, per_image in zip(batches, seen):
        detections = trainer_teacher_detections = teacher.detect([d["image"] for d in batch])
        for det, (boxes, classes) in zip(trainer_teacher_detections, per_image):
            confident = det.pred_boxes[det.scores >= 0.5]
            iou = pairwise_iou(Boxes(boxes), confident).max(dim=1).values
            as_background += int(((iou >= 0.5) & (classes == BACKGROUND)).sum())
        assert len(detections) == len(batch)
    assert as_background > 0


RETINANET = ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.BACKBONE.NAME",
             "build_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
             ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]]


def test_a_retinanets_unsure_old_objects_reach_the_loss_neither_as_class_nor_background(task):
    """A RetinaNet source scoring every anchor 0.2 for every class: all its detections are
    unsure. Their boxes go in as IGNORE, and every anchor whose best match is one of them
    (IoU >= 0.5) is labelled -1, which RetinaNet's losses skip."""
    from detectron2.modeling import build_model
    from detectron2.structures import pairwise_iou

    torch.manual_seed(0)
    source = build_model(small_cfg(6, opts=RETINANET))
    with torch.no_grad():
        source.head.cls_score.weight.zero_()
        source.head.cls_score.bias.fill_(-1.3863)  # sigmoid: 0.2
    ReclassCheckpointer(source, str(task), reclass=ReclassOptions(target_classes=SIX)).save(
        "retinanet_unsure")
    trainer = ReclassTrainer(_cfg(task, *RETINANET, "OUTPUT_DIR", str(task / "unsure"),
                                  weights="retinanet_unsure.pth"))
    trainer.resume_or_load(resume=False)
    model, seen = trainer.model, []
    label_anchors = model.label_anchors

    def recording(anchors, instances):
        labels, boxes = label_anchors(anchors, instances)
        seen.append((Boxes.cat(anchors), instances, labels))
        return labels, boxes

    model.label_anchors = recording
    trainer.train()
    loader = trainer.preservation.attached[0]
    assert loader.ignore_unsure and loader.added == 0 and loader.ignored > 0
    assert re.match(rf"\[Preservation\] MODEL.RECLASS.PRESERVE pseudo_labels; 0 pseudo-labels "
                    rf"of old classes added, {loader.ignored} unsure objects ignored; teacher: ",
                    preservation_summary(trainer.preservation))
    ignored = on_unsure = 0
    for anchors, instances, labels in seen:
        for inst, label in zip(instances, labels):
            unsure = inst.gt_classes == IGNORE
            ignored += int(unsure.sum())
            assert set(inst.gt_classes.tolist()) <= {STAR, IGNORE}
            best, match = pairwise_iou(inst.gt_boxes, anchors).max(dim=0)
            hit = (best >= 0.5) & unsure[match]
            on_unsure += int(hit.sum())
            assert (label[hit] == IGNORE).all()
    assert ignored == loader.ignored and on_unsure > 0


def test_only_a_retinanet_gets_unsure_boxes():
    """A softmax R-CNN's unsure detections are mostly what it should keep suppressing; FCOS
    and Cascade R-CNN losses would see a -1."""
    from detectron2.modeling import META_ARCH_REGISTRY
    from detectron2.modeling.meta_arch.fcos import FCOS

    assert ignores_unsure(META_ARCH_REGISTRY.get("RetinaNet"))
    assert not ignores_unsure(FCOS)
    assert not ignores_unsure(small_model(6))
    assert not ignores_unsure(small_model(6, opts=[
        "MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True]))


def test_a_project_that_trains_without_resume_or_load_still_gets_pseudo_labels(task):
    trainer = ReclassTrainer(_cfg(task, "OUTPUT_DIR", str(task / "no_load"),
                                  weights="biased.pth"))
    trainer.train()
    p = trainer.preservation
    assert p.method == "pseudo_labels" and p.teacher.images == 4
    assert p.attached[0] is trainer._trainer.data_loader and p.attached[0].added > 0


# ----------------------------------------------------------------------------- source average
def test_the_final_weights_are_averaged_with_the_sources_but_the_new_classes_entries(task):
    from detectron2.utils.env import seed_all_rng

    runs = {}
    for average in (0.0, 0.25):
        out = task / f"average{average}"
        seed_all_rng(1)  # the data order, as default_setup seeds it: the two runs alike
        trainer = ReclassTrainer(_cfg(task, "MODEL.RECLASS.SOURCE_AVERAGE", average,
                                      "SOLVER.MAX_ITER", 3, "SOLVER.BASE_LR", 0.05,
                                      "OUTPUT_DIR", str(out)))
        trainer.resume_or_load(resume=False)
        trainer.train()
        runs[average] = (trainer.preservation,
                         torch.load(out / "model_final.pth", weights_only=True)["model"])
    (plain_p, plain), (averaged_p, averaged) = runs[0.0], runs[0.25]
    source = torch.load(task / "named.pth", weights_only=True)["model"]
    stem, box = "backbone.bottom_up.stem.conv1.weight", "roi_heads.box_predictor.bbox_pred.weight"
    assert not torch.equal(plain[stem], source[stem])  # the runs trained it
    # The same run up to the last step (same seed), then the average, in the saved weights.
    assert torch.equal(averaged[stem], torch.lerp(plain[stem], source[stem], 0.25))
    assert torch.equal(averaged[CLS][:6], torch.lerp(plain[CLS][:6], source[CLS][:6], 0.25))
    assert torch.equal(averaged[CLS][BACKGROUND], torch.lerp(plain[CLS][BACKGROUND],
                                                             source[CLS][6], 0.25))
    assert torch.equal(averaged[box][:24], torch.lerp(plain[box][:24], source[box], 0.25))
    # Star's entries, which the source has none of, stay as trained.
    assert torch.equal(averaged[CLS][STAR], plain[CLS][STAR])
    assert torch.equal(averaged[box][24:], plain[box][24:])
    assert preservation_summary(averaged_p).endswith(
        "; final weights averaged with the source model's (0.25 of it, SOURCE_AVERAGE).")
    assert "averaged" not in preservation_summary(plain_p)


# ----------------------------------------------------------------------------- frozen rows
def test_frozen_rows_leave_every_old_entry_bit_for_bit(task):
    cfg = _cfg(task, "MODEL.RECLASS.PRESERVE", "frozen_rows", "SOLVER.MAX_ITER", 3,
               "SOLVER.BASE_LR", 0.05, "OUTPUT_DIR", str(task / "frozen"))
    trainer = ReclassTrainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Everything else (backbone, RPN, box head, BatchNorm statistics) is as loaded.
    box = "roi_heads.box_predictor.bbox_pred"
    assert {CLS, CLS[:-6] + "bias"} <= changed <= {CLS, CLS[:-6] + "bias", box + ".weight",
                                                    box + ".bias"}
    for key, old in ((CLS, [*range(6), 7]), (CLS[:-6] + "bias", [*range(6), 7]),
                     (box + ".weight", range(24)), (box + ".bias", range(24))):
        assert torch.equal(after[key][list(old)], before[key][list(old)]), key
    assert not torch.equal(after[CLS][STAR], before[CLS][STAR])


# ----------------------------------------------------------------------------- distillation
def test_distillation_losses_are_zero_when_the_outputs_agree():
    torch.manual_seed(0)
    teacher = torch.randn(5, 7) * 10
    student = torch.cat([teacher[:, :6], torch.randn(5, 1), teacher[:, 6:]], dim=1)
    assert float(softmax_distill_loss(student, teacher, range(6), range(6))) == 0.0
    student[:, 2] += 3.0
    assert float(softmax_distill_loss(student, teacher, range(6), range(6))) > 0.01
    t = [torch.randn(2, 3 * 6, 4, 4)]
    s = [torch.cat([t[0].view(2, 3, 6, 4, 4), torch.randn(2, 3, 1, 4, 4)], 2).view(2, 21, 4, 4)]
    assert abs(float(sigmoid_distill_loss(s, t, range(6), range(6), 7, 6))) < 1e-5
    s[0] = s[0] + 1.0
    assert float(sigmoid_distill_loss(s, t, range(6), range(6), 7, 6)) > 0.01


def _one_star_batch():
    """A training batch: one seeded random image with one labelled star."""
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    return [{"image": image, "instances": _instances([[10, 10, 30, 30]], [STAR])}]


def test_distillation_is_zero_for_a_student_equal_to_its_teacher_then_pulls_it_back(task):
    """FrozenBN: the student in training mode computes what the teacher does in eval mode."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from d2_reclass.preserve import OutputDistiller

    opts = ["MODEL.RESNETS.NORM", "FrozenBN"]
    teacher = build_model(small_cfg(6, opts=opts)).eval()
    student = build_model(small_cfg(7, opts=opts))
    ReclassCheckpointer(teacher).load(str(task / "named.pth"))
    ReclassCheckpointer(student, reclass=ReclassOptions(target_classes=SEVEN)).load(
        str(task / "named.pth"))
    OutputDistiller(student, Teacher(teacher), list(range(6)))
    batch = _one_star_batch()
    student.train()
    with EventStorage(0):
        torch.manual_seed(0)
        assert float(student(batch)["loss_distill"]) < 1e-6
        with torch.no_grad():
            student.roi_heads.box_predictor.cls_score.bias[:6] += 2 * torch.arange(6.0)
        torch.manual_seed(0)
        loss = student(batch)["loss_distill"]
    assert float(loss) > 0.05
    loss.backward()
    grad = student.roi_heads.box_predictor.cls_score.bias.grad
    assert grad[:6].abs().sum() > 0 and grad[STAR] == 0  # the new class is not distilled


def test_retinanet_distillation_and_pseudo_labels_run(task):
    """A sigmoid head: loss_distill from its old classes' logits."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from d2_reclass.preserve import OutputDistiller

    opts = ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.BACKBONE.NAME",
            "build_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
            ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
            "MODEL.RESNETS.NORM", "FrozenBN"]
    torch.manual_seed(0)
    teacher = build_model(small_cfg(6, opts=opts)).eval()
    student = build_model(small_cfg(7, opts=opts))
    state = teacher.state_dict()
    # The student's old classes are the teacher's (anchor-major: channel a * K + k).
    own = student.state_dict()
    anchors = state["head.cls_score.bias"].shape[0] // 6
    for key in ("head.cls_score.weight", "head.cls_score.bias"):
        own[key].view(anchors, 7, *own[key].shape[1:])[:, :6] = state[key].view(
            anchors, 6, *state[key].shape[1:])
    for key in state:
        if not key.startswith("head.cls_score"):
            own[key].copy_(state[key])
    OutputDistiller(student, Teacher(teacher), list(range(6)))
    batch = _one_star_batch()
    student.train()
    with EventStorage(0):
        assert abs(float(student(batch)["loss_distill"])) < 1e-4
        with torch.no_grad():
            student.head.cls_score.bias += 1.0
        assert float(student(batch)["loss_distill"]) > 0.01


# ----------------------------------------------------------------------------- every entry point
def _run(cmd, timeout=600):
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_two_gloo_ranks_run_the_same_teacher_each_on_its_own_batch(task, tmp_path):
    worker = os.path.join(REPO, "tests", "keep_old_ddp_worker.py")
    image = str(task / "train" / "00001.png")
    _run([worker, str(tmp_path), image, "--num-gpus", "2", "--config-file",
          "configs/Base-Shapes-RCNN.yaml", "--coco-dataset", "d_new",
          str(task / "train.json"), str(task / "train"),
          "MODEL.WEIGHTS", str(task / "biased.pth"), "MODEL.RECLASS.KEEP_SOURCE_CLASSES", "True",
          "DATASETS.TRAIN", '("d_new",)', "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2",
          "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
          "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
          "MODEL.RECLASS.SOURCE_AVERAGE", "0.5", "OUTPUT_DIR", str(tmp_path / "out")])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Each rank took the source average itself (nothing broadcast) ...
    assert r0["averaged"] == r1["averaged"] == [0.5]
    # Each rank labelled its own batch of 1 image per iteration, with pseudo-labels.
    assert r0["teacher_images"] == r1["teacher_images"] == 2
    assert r0["added"] > 0 and r1["added"] > 0
    # The same teacher on every rank: the same detections of the same image, bit for bit.
    assert len(r0["boxes"]) > 0
    for key in ("boxes", "scores", "classes"):
        assert torch.equal(r0[key], r1[key]), key
    # ... and DDP kept the student identical on both ranks, the average included.
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k


def test_train_net_takes_the_key_with_a_dataset_listing_only_the_new_class(task, tmp_path):
    out = tmp_path / "out"
    log = _run([TRAIN_NET, "--config-file", "configs/Base-Shapes-RCNN.yaml", "--coco-dataset",
                "n_new", str(task / "train.json"), str(task / "train"),
                "MODEL.WEIGHTS", str(task / "named.pth"),
                "MODEL.RECLASS.KEEP_SOURCE_CLASSES", "True", "DATASETS.TRAIN", '("n_new",)',
                "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
                "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                "INPUT.MAX_SIZE_TRAIN", "64", "OUTPUT_DIR", str(out)])
    assert "AUTO_NUM_CLASSES: MODEL.ROI_HEADS.NUM_CLASSES 80 -> 7 (the classes of " \
        "MODEL.RECLASS.KEEP_SOURCE_CLASSES: the checkpoint's, then the new ones" in log
    assert "DATALOADER.FILTER_EMPTY_ANNOTATIONS True -> False" in log
    assert "[Preservation] MODEL.RECLASS.PRESERVE pseudo_labels: keeping 6 source classes " \
        "while 1 new class trains." in log
    # What it did, logged once at the end of training.
    assert len(re.findall(r"\[Preservation\] MODEL.RECLASS.PRESERVE pseudo_labels; [0-9]+ "
                          r"pseudo-labels of old classes added; teacher: 4 images, 4 run in 2 "
                          r"forward passes, 0 from its cache", log)) == 1
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": SEVEN}
    source = torch.load(task / "named.pth", weights_only=True)["model"]
    assert final["model"][CLS].shape == (8, 256)
    assert not torch.equal(final["model"][CLS][:6], source[CLS][:6])  # trained, not frozen
    # Evaluating it with the same config: the classes it stores, the key left aside.
    log = _run([TRAIN_NET, "--eval-only", "--config-file", "configs/Base-Shapes-RCNN.yaml",
                "--coco-dataset", "n_new", str(task / "train.json"), str(task / "train"),
                "MODEL.WEIGHTS", str(out / "model_final.pth"),
                "MODEL.RECLASS.KEEP_SOURCE_CLASSES", "True", "DATASETS.TEST", '("n_new",)',
                "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                "OUTPUT_DIR", str(tmp_path / "eval")])
    assert "AUTO_NUM_CLASSES: MODEL.ROI_HEADS.NUM_CLASSES 80 -> 7" in log
    assert "Evaluation results for n_new" in log


def test_the_mixin_in_a_user_project_with_stock_registration(task, tmp_path):
    """A project's own DefaultTrainer subclass (own loader and mapper), stock
    register_coco_instances, merge_from_file: the model trains over the old classes and star,
    star's labels reach the loss as star, the source model's as old classes."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper, build_detection_train_loader
    from detectron2.data import transforms as T
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import DefaultTrainer

    from d2_reclass import ReclassTrainerMixin, add_reclass_config

    class ProjectTrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            mapper = DatasetMapper(cfg, is_train=True, augmentations=[
                T.ResizeShortestEdge(64, 64), T.RandomFlip()])
            return build_detection_train_loader(cfg, mapper=mapper)

    class Trainer(ReclassTrainerMixin, ProjectTrainer):
        pass

    if "user_new" not in DatasetCatalog.list():
        register_coco_instances("user_new", {}, str(task / "train.json"), str(task / "train"))
    cfg = get_cfg()
    add_reclass_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-Shapes-RCNN.yaml"))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", str(task / "biased.pth"), "MODEL.RECLASS.KEEP_SOURCE_CLASSES", True,
        "DATASETS.TRAIN", ("user_new",), "DATASETS.TEST", (), "SOLVER.MAX_ITER", 2,
        "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    classes = []
    trainer.model.register_forward_pre_hook(
        lambda m, args: classes.extend(int(c) for d in args[0]
                                       for c in d["instances"].gt_classes))
    trainer.train()
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 7
    assert trainer.preservation.method == "pseudo_labels"
    assert STAR in classes and SQUARE in classes and set(classes) <= {SQUARE, STAR}
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": SEVEN}


def test_lazyconfig_takes_the_key(task, tmp_path):
    out = tmp_path / "out"
    script = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
    log = _run([script, "--config-file", "configs/lazy_shapes_target_map.py",
                "--coco-dataset", "l_new", str(task / "train.json"), str(task / "train"),
                f"train.init_checkpoint={task / 'named.pth'}", f"train.output_dir={out}",
                "train.max_iter=2", "reclass.keep_source_classes=True",
                "reclass.preserve=frozen_rows", "dataloader.train.dataset.names=l_new",
                "dataloader.test.dataset.names=l_new", "dataloader.train.total_batch_size=2"])
    assert "num_classes: model.roi_heads.num_classes 80 -> 7" in log
    assert "[Preservation] MODEL.RECLASS.PRESERVE frozen_rows: keeping 6 source classes" in log
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": SEVEN}
    source = torch.load(task / "named.pth", weights_only=True)["model"]
    assert torch.equal(final["model"][CLS][:6], source[CLS][:6])
    assert torch.equal(final["model"][CLS][7], source[CLS][6])


def test_lazyconfig_takes_the_source_average(task, tmp_path):
    """With the whole weight on the source, everything but star's entries ends as loaded;
    star's are those of the same run without the average (the config's seed fixes the run)."""
    script = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
    logs, finals = {}, {}
    for average in (0.0, 1.0):
        out = tmp_path / f"out{average}"
        logs[average] = _run([
            script, "--config-file", "configs/lazy_shapes_target_map.py", "--coco-dataset",
            "l_avg", str(task / "train.json"), str(task / "train"),
            f"train.init_checkpoint={task / 'named.pth'}", f"train.output_dir={out}",
            "train.max_iter=2", "reclass.keep_source_classes=True",
            f"reclass.source_average={average}", "dataloader.train.dataset.names=l_avg",
            "dataloader.test.dataset.names=l_avg", "dataloader.train.total_batch_size=2"])
        finals[average] = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert "[Preservation] MODEL.RECLASS.PRESERVE pseudo_labels: keeping 6 source classes " \
        "while 1 new class trains. At iteration 2, the weights are averaged with the source " \
        "model's (SOURCE_AVERAGE 1)." in logs[1.0]
    assert "averaged" not in logs[0.0]
    plain, final = finals[0.0], finals[1.0]
    source = torch.load(task / "named.pth", weights_only=True)["model"]
    stem, box = "backbone.bottom_up.stem.conv1.weight", "roi_heads.box_predictor.bbox_pred.weight"
    assert not torch.equal(plain[stem], source[stem])
    assert torch.equal(final[stem], source[stem])
    assert torch.equal(final[CLS][:6], source[CLS][:6])
    assert torch.equal(final[CLS][BACKGROUND], source[CLS][6])
    assert torch.equal(final[CLS][STAR], plain[CLS][STAR])
    assert torch.equal(final[box][24:], plain[box][24:])


def test_frozen_rows_keep_a_sigmoid_heads_old_logits_exactly(task):
    """RetinaNet: sigmoid classes do not compete, so with only the new class's entries trained
    the old classes' logits stay the source model's."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from d2_reclass.preserve import FrozenEntries

    opts = ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.BACKBONE.NAME",
            "build_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
            ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]]
    torch.manual_seed(0)
    source = build_model(small_cfg(6, opts=opts)).eval()
    path = task / "retinanet6.pth"
    ReclassCheckpointer(source, str(task), reclass=ReclassOptions(target_classes=SIX)).save(
        "retinanet6")
    student = build_model(small_cfg(7, opts=opts))
    ReclassCheckpointer(student, reclass=ReclassOptions(target_classes=SEVEN)).load(str(path))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    frozen = FrozenEntries(student, optimizer, [STAR])
    batch = _one_star_batch()
    anchors = source.head.cls_score.bias.shape[0] // 6
    new_bias = student.head.cls_score.bias.detach().view(anchors, 7)[:, STAR].clone()
    student.train()
    with EventStorage(0):
        for _ in range(2):
            loss = sum(student(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    frozen.remove()
    assert not torch.equal(student.head.cls_score.bias.detach().view(anchors, 7)[:, STAR],
                           new_bias)
    student.eval()
    with torch.no_grad():
        features = [student.backbone(student.preprocess_image(batch).tensor)[f]
                    for f in student.head_in_features]
        theirs = [source.backbone(source.preprocess_image(batch).tensor)[f]
                  for f in source.head_in_features]
        for own, src in zip(student.head(features)[0], source.head(theirs)[0]):
            n, _, h, w = own.shape
            old = own.view(n, anchors, 7, h, w)[:, :, :6]
            assert torch.allclose(old, src.view(n, anchors, 6, h, w), atol=1e-5, rtol=0)
