"""reclass_state_dict on real detectron2 models: every layout, exactness, modes, strictness.

Sources are freshly built COCO-sized models (random weights are enough: the engine moves rows,
and the tests check which rows land where). The standard target is ``["dog", "person",
"gadget"]``: two COCO classes in a new order, and one that COCO never had.
"""
import hashlib
import math
import random

import pytest
import torch
from conftest import (
    CASCADE,
    COCO_CLASSES,
    COCO_STUFF,
    FASTER_RCNN,
    FCOS,
    KEYPOINT_RCNN,
    MASK_RCNN,
    PANOPTIC_FPN,
    PRIOR_BIAS,
    RETINANET,
    SEMANTIC_FPN,
    STUFF_SOURCE,
    STUFF_TARGET,
    TARGET,
    TARGET_SOURCE,
    assert_rows,
    assert_std,
    build_model,
    build_point_rend,
    entries,
    msra_std,
    pick,
    point_rend_cfg,
    point_rend_state,
    reclass,
    source_state,
    thing,
)
from d2_fixtures import captured_logs
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model as d2_build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes, Instances
from torch import nn

from d2_reclass.classes import normalize_class_name
from d2_reclass.engine.combine import combine_state_dicts
from d2_reclass.engine.report import NOT_RECOGNISED
from d2_reclass.engine.surgery import (
    ClassSpec,
    SourceCheckpoint,
    class_map_by_space,
    reclass_state_dict,
)
from d2_reclass.errors import CheckpointError, ClassListError, ClassMismatchError
from d2_reclass.fresh import NORMAL_001, ZERO, seeded_generator, torch_default_init
from d2_reclass.layouts import (
    STUFF,
    THING,
    ClassLayout,
    class_rows,
    find_layouts,
    register_layout,
)

DOG, PERSON, CAT = (COCO_CLASSES.index(c) for c in ("dog", "person", "cat"))
BOX = "roi_heads.box_predictor."


def load_strict(model, state):
    """Loading the result into the target model must fit every key (strict)."""
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def check_rows_layout(new, src, key, *, source_index=TARGET_SOURCE, num_source=80, block=1,
                      repeat=1, offset=0, background=False, axis=0, bias_value=0.0,
                      weight_std=None):
    """Copied entries bit-identical, fresh biases exact, fresh weights with the head's std."""
    dst, srci, fresh = entries(source_index, num_source, block=block, repeat=repeat,
                               offset=offset, background=background)
    assert new[key].shape[axis] == len(dst) + len(fresh)
    assert_rows(new[key], src[key], dst, srci, axis)
    if fresh and key.endswith("bias"):
        values = pick(new[key], fresh, axis)
        assert torch.equal(values, torch.full_like(values, bias_value))
    if fresh and weight_std is not None and key.endswith("weight"):
        assert_std(pick(new[key], fresh, axis), weight_std)
    return fresh


def check_box_predictor(new, src, prefix=BOX, source_index=TARGET_SOURCE, num_source=80,
                        agnostic_bbox=False):
    for p in ("weight", "bias"):
        check_rows_layout(new, src, f"{prefix}cls_score.{p}", source_index=source_index,
                          num_source=num_source, background=True, weight_std=0.01)
        key = f"{prefix}bbox_pred.{p}"
        if agnostic_bbox:  # one class-agnostic block on both sides: nothing to change
            assert new[key] is src[key]
        else:
            check_rows_layout(new, src, key, source_index=source_index, num_source=num_source,
                              block=4, weight_std=0.001)


# ---------------------------------------------------------------------------------------------
# Every layout: COCO (80) -> ["dog", "person", "gadget"]
# ---------------------------------------------------------------------------------------------
def test_faster_rcnn_box_predictor():
    src = source_state(FASTER_RCNN)
    model = build_model(FASTER_RCNN, 3)
    new, report = reclass(src, model, thing(), mode="map")

    w, b = new[BOX + "cls_score.weight"], new[BOX + "cls_score.bias"]
    assert w.shape == (4, 1024) and b.shape == (4,)
    assert torch.equal(w[0], src[BOX + "cls_score.weight"][DOG])
    assert torch.equal(w[1], src[BOX + "cls_score.weight"][PERSON])
    assert torch.equal(w[3], src[BOX + "cls_score.weight"][80])  # background, last
    assert torch.equal(b[[0, 1, 3]], src[BOX + "cls_score.bias"][[DOG, PERSON, 80]])
    assert float(b[2]) == 0.0
    d = new[BOX + "bbox_pred.weight"]
    assert torch.equal(d[0:4], src[BOX + "bbox_pred.weight"][4 * DOG:4 * DOG + 4])
    assert torch.equal(d[4:8], src[BOX + "bbox_pred.weight"][4 * PERSON:4 * PERSON + 4])
    check_box_predictor(new, src)

    assert report.spaces["thing"].resolution == "map"
    assert {t.key: (t.action, t.copied, t.fresh) for t in report.tensors} == {
        BOX + "cls_score.weight": ("mapped", 3, 1),
        BOX + "cls_score.bias": ("mapped", 3, 1),
        BOX + "bbox_pred.weight": ("mapped", 8, 4),
        BOX + "bbox_pred.bias": ("mapped", 8, 4),
    }
    # Every other tensor is the checkpoint's own object, untouched.
    assert all(new[k] is src[k] for k in src if not k.startswith(BOX))
    load_strict(model, new)


def test_cascade_every_stage():
    src = source_state(CASCADE)
    model = build_model(CASCADE, 3)
    new, report = reclass(src, model, thing(), mode="map")
    for stage in range(3):
        # Cascade R-CNN regresses class-agnostic boxes: only the classifier changes.
        check_box_predictor(new, src, f"roi_heads.box_predictor.{stage}.", agnostic_bbox=True)
    for p, std in (("weight", 0.001), ("bias", None)):
        check_rows_layout(new, src, f"roi_heads.mask_head.predictor.{p}", weight_std=std)
    assert len(report.tensors) == 3 * 2 + 2
    load_strict(model, new)


def test_mask_head():
    src = source_state(MASK_RCNN)
    model = build_model(MASK_RCNN, 3)
    new, _ = reclass(src, model, thing(), mode="map")
    w = new["roi_heads.mask_head.predictor.weight"]
    assert w.shape == (3, 256, 1, 1)
    assert torch.equal(w[0], src["roi_heads.mask_head.predictor.weight"][DOG])
    check_box_predictor(new, src)
    for p, std in (("weight", 0.001), ("bias", None)):
        check_rows_layout(new, src, f"roi_heads.mask_head.predictor.{p}", weight_std=std)
    load_strict(model, new)


def test_retinanet_anchor_major_channels():
    src = source_state(RETINANET)
    model = build_model(RETINANET, 3)
    own_prior = model.head.cls_score.bias[0].item()  # the head's own float32 prior bias
    new, report = reclass(src, model, thing(), mode="map")
    w = new["head.cls_score.weight"]
    assert w.shape == (9 * 3, 256, 3, 3)
    # Channel a*K + k: anchor 4's "person" (target k=1) is source channel 4*80 + PERSON.
    assert torch.equal(w[4 * 3 + 1], src["head.cls_score.weight"][4 * 80 + PERSON])
    fresh = check_rows_layout(new, src, "head.cls_score.weight", repeat=9, weight_std=0.01)
    assert fresh == [a * 3 + 2 for a in range(9)]
    check_rows_layout(new, src, "head.cls_score.bias", repeat=9, bias_value=own_prior)
    assert new["head.cls_score.bias"][2].item() == pytest.approx(PRIOR_BIAS, abs=1e-6)
    assert report.tensor("head.cls_score.weight").fresh == 9
    load_strict(model, new)


def test_fcos():
    src = build_model(FCOS).state_dict()
    model = build_model(FCOS, 3)
    new, _ = reclass(src, model, thing(), mode="map")
    assert new["head.cls_score.weight"].shape == (3, 256, 3, 3)
    check_rows_layout(new, src, "head.cls_score.weight", weight_std=0.01)
    check_rows_layout(new, src, "head.cls_score.bias",
                      bias_value=model.head.cls_score.bias[0].item())
    assert new["head.cls_score.bias"][2].item() == pytest.approx(PRIOR_BIAS, abs=1e-6)
    load_strict(model, new)


def test_panoptic_fpn_thing_and_stuff():
    src = source_state(PANOPTIC_FPN)
    model = build_model(PANOPTIC_FPN, 3, stuff_classes=3)
    classes = {**thing(), "stuff": ClassSpec(COCO_STUFF, STUFF_TARGET)}
    new, report = reclass(src, model, classes, mode="map")
    check_box_predictor(new, src)
    check_rows_layout(new, src, "roi_heads.mask_head.predictor.weight")
    w = new["sem_seg_head.predictor.weight"]
    assert torch.equal(w[0], src["sem_seg_head.predictor.weight"][COCO_STUFF.index("sky")])
    assert torch.equal(w[1], src["sem_seg_head.predictor.weight"][0])  # "things"
    for p in ("weight", "bias"):
        check_rows_layout(new, src, f"sem_seg_head.predictor.{p}", source_index=STUFF_SOURCE,
                          num_source=54, weight_std=msra_std(w.shape))
    assert report.spaces["stuff"].resolution == "map"
    assert report.spaces["stuff"].num_source == 54
    load_strict(model, new)


def test_map_errors_name_each_spaces_keys():
    src = source_state(PANOPTIC_FPN)
    model = build_model(PANOPTIC_FPN, 3, stuff_classes=3)
    stuff = ClassSpec(COCO_STUFF, STUFF_TARGET)
    with pytest.raises(ClassListError, match=r"^MODE map needs the model's thing class names: "
                                             r"set MODEL\.RECLASS\.TARGET_CLASSES, or train on "
                                             r"registered datasets whose metadata has "
                                             r"thing_classes\.$"):
        reclass(src, model, {**thing(COCO_CLASSES, None), "stuff": stuff}, mode="map")
    with pytest.raises(ClassListError, match=r"^MODE map needs the thing class names of "
                                             r"checkpoint, which stores none: set "
                                             r"MODEL\.RECLASS\.SOURCE_CLASSES or SOURCE_DATASET "
                                             r"\(a dataset with thing_classes, e\.g\. "
                                             r"coco_2017_train\), map classes by index with "
                                             r"CLASS_MAP 'target=INDEX', or use MODE reinit\.$"):
        reclass(src, model, {**thing(None, TARGET), "stuff": stuff}, mode="map")
    with pytest.raises(ClassListError, match=r"^MODE map needs the model's stuff class names: "
                                             r"set MODEL\.RECLASS\.TARGET_STUFF_CLASSES, or "
                                             r"train on registered datasets whose metadata has "
                                             r"stuff_classes\.$"):
        reclass(src, model, {**thing(), "stuff": ClassSpec(COCO_STUFF, None)}, mode="map")
    # CLASS_MAP applies to stuff too (class_map_by_space), so its by-index form is offered.
    with pytest.raises(ClassListError, match=r"^MODE map needs the stuff class names of x\.pth, "
                                             r"which stores none: set "
                                             r"MODEL\.RECLASS\.SOURCE_STUFF_CLASSES or "
                                             r"SOURCE_DATASET \(a dataset with stuff_classes, "
                                             r"e\.g\. coco_2017_train_panoptic_separated\), map "
                                             r"classes by index with CLASS_MAP 'target=INDEX', "
                                             r"or use MODE reinit\.$"):
        reclass(src, model, {**thing(), "stuff": ClassSpec(None, STUFF_TARGET)}, mode="map",
                source="x.pth")
    # Where the caller names its lists, messages use its names.
    with pytest.raises(ClassListError, match=r"stuff class names: set --stuff-classes, or"):
        reclass(src, model, {**thing(), "stuff": ClassSpec(COCO_STUFF, None,
                                                           target_what="--stuff-classes")},
                mode="map")
    with pytest.raises(ClassListError, match=r"^MODEL\.RECLASS\.SOURCE_STUFF_CLASSES has 53 "
                                             r"names, but checkpoint has heads for 54 stuff"):
        reclass(src, model, {**thing(), "stuff": ClassSpec(COCO_STUFF[1:], STUFF_TARGET)})


def test_semantic_fpn():
    src = source_state(SEMANTIC_FPN)
    model = build_model(SEMANTIC_FPN, stuff_classes=3)
    new, _ = reclass(src, model, {"stuff": ClassSpec(COCO_STUFF, STUFF_TARGET)}, mode="map")
    for p in ("weight", "bias"):
        check_rows_layout(new, src, f"sem_seg_head.predictor.{p}", source_index=STUFF_SOURCE,
                          num_source=54)
    load_strict(model, new)


def test_keypoint_count_change_is_reinit_and_reported():
    src = source_state(KEYPOINT_RCNN)
    model = build_model(KEYPOINT_RCNN, MODEL__ROI_KEYPOINT_HEAD__NUM_KEYPOINTS=5)
    own = model.state_dict()["roi_heads.keypoint_head.score_lowres.weight"]
    # Even in map mode: keypoints have no names to map by.
    new, report = reclass(src, model, thing(["person"], ["person"]), mode="map")
    space = report.spaces["keypoint"]
    assert (space.resolution, space.num_source, space.num_target) == ("reinit", 17, 5)
    assert report.spaces["thing"].resolution == "unchanged"
    w = new["roi_heads.keypoint_head.score_lowres.weight"]
    assert w.shape == (512, 5, 4, 4)  # ConvTranspose2d: keypoints are axis 1
    assert_std(w, float(own.std()))  # the head's own kaiming_normal_(fan_out)
    assert_std(w, msra_std(w.shape))
    assert torch.equal(new["roi_heads.keypoint_head.score_lowres.bias"], torch.zeros(5))
    actions = {t.key: (t.action, t.copied, t.fresh) for t in report.tensors}
    assert actions == {
        "roi_heads.keypoint_head.score_lowres.weight": ("fresh", 0, 5),
        "roi_heads.keypoint_head.score_lowres.bias": ("fresh", 0, 5),
    }
    assert all(new[k] is src[k] for k in src if "keypoint_head.score_lowres" not in k)
    load_strict(model, new)


def test_keypoint_same_count_is_unchanged():
    src = source_state(KEYPOINT_RCNN)
    model = build_model(KEYPOINT_RCNN)
    new, report = reclass(src, model, thing(["person"], ["person"]), mode="map")
    assert report.spaces["keypoint"].resolution == "unchanged"
    assert not report.tensors
    assert all(new[k] is src[k] for k in src)


def test_point_rend_instance():
    src = point_rend_state(80)
    model = build_point_rend(3)
    new, report = reclass(src, model, thing(), mode="map")
    check_box_predictor(new, src)
    # Coarse head: fc output viewed as (K, 7, 7), class-major blocks of 49 rows.
    p = "roi_heads.mask_head.coarse_head.prediction."
    assert new[p + "weight"].shape == (3 * 49, 1024)
    assert torch.equal(new[p + "weight"][49:98], src[p + "weight"][49 * PERSON:49 * PERSON + 49])
    check_rows_layout(new, src, p + "weight", block=49, weight_std=0.001)
    check_rows_layout(new, src, p + "bias", block=49)
    # Point head: coarse logits are the last K input columns of fc1..fc3 and the predictor.
    h = "roi_heads.mask_head.point_head."
    for fc in ("fc1", "fc2", "fc3"):
        w = new[h + fc + ".weight"]
        assert w.shape == (256, 256 + 3, 1)
        assert torch.equal(w[:, 256 + 1], src[h + fc + ".weight"][:, 256 + PERSON])
        check_rows_layout(new, src, h + fc + ".weight", axis=1, offset=256,
                          weight_std=msra_std(w.shape))
        assert new[h + fc + ".bias"] is src[h + fc + ".bias"]
    # The predictor is class-dependent on both axes: rows (outputs) and last K columns.
    w, s = new[h + "predictor.weight"], src[h + "predictor.weight"]
    assert w.shape == (3, 259, 1)
    rows_dst, rows_src, rows_fresh = entries(TARGET_SOURCE, 80)
    cols_dst, cols_src, cols_fresh = entries(TARGET_SOURCE, 80, offset=256)
    assert torch.equal(w[rows_dst][:, cols_dst], s[rows_src][:, cols_src])
    assert torch.equal(w[1, 256 + 0], s[PERSON, 256 + DOG])
    assert_std(w[rows_fresh].flatten(), 0.001)
    assert_std(w[:, cols_fresh].flatten(), 0.001)
    check_rows_layout(new, src, h + "predictor.bias")
    assert report.tensor(h + "fc1.weight").layout == "coarse logits as input columns"
    load_strict(model, new)


def test_point_rend_semantic():
    src = point_rend_state(54, semantic=True)
    model = build_point_rend(3, semantic=True)
    new, report = reclass(src, model, {"stuff": ClassSpec(COCO_STUFF, STUFF_TARGET)},
                          mode="map")
    kw = dict(source_index=STUFF_SOURCE, num_source=54)
    for p in ("weight", "bias"):
        check_rows_layout(new, src, f"sem_seg_head.coarse_sem_seg_head.predictor.{p}", **kw)
    for fc in ("fc1", "fc2", "fc3"):
        check_rows_layout(new, src, f"sem_seg_head.point_head.{fc}.weight", axis=1,
                          offset=256, **kw)
    rows_dst, rows_src, _ = entries(STUFF_SOURCE, 54)
    cols_dst, cols_src, _ = entries(STUFF_SOURCE, 54, offset=256)
    w, s = (d["sem_seg_head.point_head.predictor.weight"] for d in (new, src))
    assert torch.equal(w[rows_dst][:, cols_dst], s[rows_src][:, cols_src])
    check_rows_layout(new, src, "sem_seg_head.point_head.predictor.bias", **kw)
    assert set(report.spaces) == {"stuff"}
    load_strict(model, new)


@pytest.mark.slow
def test_implicit_point_rend_parameter_head():
    """Its parameter head predicts the point head's MLP as one flat vector: the last layer's
    weights (K blocks of C) end the weights, its biases (K) end the vector."""
    src = point_rend_state(80, implicit=True)
    model = build_point_rend(3, implicit=True)
    new, report = reclass(src, model, thing(), mode="map")
    head = model.roi_heads.mask_head.point_head
    c = head.channels
    weights, biases = sum(head.num_weight_params[:-1]), sum(head.num_bias_params[:-1])
    key = "roi_heads.mask_head.parameter_head.prediction."
    for p in ("weight", "bias"):
        s, n = src[key + p], new[key + p]
        assert n.shape[0] == weights + 3 * c + biases + 3 == model.state_dict()[key + p].shape[0]
        assert torch.equal(n[:weights], s[:weights])  # earlier layers' weights, as they were
        t_bias, s_bias = weights + 3 * c, weights + 80 * c  # where the biases start
        assert torch.equal(n[t_bias:t_bias + biases], s[s_bias:s_bias + biases])
        for j, k in enumerate(TARGET_SOURCE):
            got_w, got_b = n[weights + j * c:weights + (j + 1) * c], n[t_bias + biases + j]
            if k is None:  # the parameter head's own init: N(0, 0.001) weights, zero biases
                fresh = torch.cat([got_w.flatten(), got_b.flatten()])
                if p == "bias":
                    assert not fresh.any()
                else:
                    assert_std(fresh, 0.001)
            else:
                assert torch.equal(got_w, s[weights + k * c:weights + (k + 1) * c])
                assert torch.equal(got_b, s[s_bias + biases + k])
    assert report.tensor(key + "weight").action == "mapped"
    assert report.tensor(key + "weight").fresh == c + 1
    load_strict(model, new)


def test_point_rend_loads_without_format_upgrade():
    """The result keeps torch's ``_metadata``: PointRend must not mistake it for an old format."""
    src = point_rend_state(80)
    model = build_point_rend(3)
    new, _ = reclass(src, model, thing(), mode="map")
    # Captured at PointRend's loggers: once an earlier test has run setup_logger, the
    # "detectron2" logger stops propagating to the root logger, where pytest's caplog listens.
    point_rend = ("detectron2.projects.point_rend.mask_head",
                  "detectron2.projects.point_rend.roi_heads")
    with captured_logs(*point_rend) as logs:
        load_strict(model, new)
    assert not any("Weight format of PointRend models have changed" in m for m in logs)
    # Without the metadata, PointRend takes the state dict for its old format: the check bites.
    with captured_logs(*point_rend) as logs:
        load_strict(model, dict(new))
    assert any("Weight format of PointRend models have changed" in m for m in logs)


# ---------------------------------------------------------------------------------------------
# Many fresh rows: their std is the head's own init
# ---------------------------------------------------------------------------------------------
def test_reinit_80_classes_matches_each_heads_own_init():
    src = source_state(MASK_RCNN, 3)  # a 3-class checkpoint with no class names
    model = build_model(MASK_RCNN, seed=7)  # 80 classes, each head's own init
    own = model.state_dict()
    new, report = reclass(src, model)  # auto: names unknown, counts differ
    assert report.spaces["thing"].resolution == "reinit"
    for key in (BOX + "cls_score.weight", BOX + "bbox_pred.weight",
                "roi_heads.mask_head.predictor.weight"):
        fresh = new[key][:80] if "cls_score" in key else new[key]
        assert_std(fresh, float(own[key][:fresh.shape[0]].std()))
        # Every class row is fresh; the classifier keeps its background row.
        assert report.tensor(key).action == "fresh"
        assert report.tensor(key).fresh == fresh.shape[0]
    assert_std(new[BOX + "cls_score.weight"][:80], 0.01)
    assert_std(new[BOX + "bbox_pred.weight"], 0.001)
    assert_std(new["roi_heads.mask_head.predictor.weight"], 0.001)
    # Background is not a class: reinit carries it.
    assert torch.equal(new[BOX + "cls_score.weight"][80], src[BOX + "cls_score.weight"][3])
    for key in (BOX + "cls_score.bias", BOX + "bbox_pred.bias",
                "roi_heads.mask_head.predictor.bias"):
        n = 80 if "cls_score" in key else new[key].numel()
        assert torch.equal(new[key][:n], torch.zeros(n))
    load_strict(model, new)


def test_reinit_many_stuff_rows_match_msra():
    src = source_state(SEMANTIC_FPN, stuff_classes=3)
    model = build_model(SEMANTIC_FPN, seed=7)  # 54 stuff classes
    own = model.state_dict()["sem_seg_head.predictor.weight"]
    new, report = reclass(src, model, mode="reinit")
    w = new["sem_seg_head.predictor.weight"]
    assert report.spaces["stuff"].resolution == "reinit"
    assert_std(w, float(own.std()))
    assert_std(w, msra_std(w.shape))
    assert torch.equal(new["sem_seg_head.predictor.bias"], torch.zeros(54))


def test_reinit_many_retinanet_rows():
    src = source_state(RETINANET, 3)
    model = build_model(RETINANET, seed=7)
    new, _ = reclass(src, model, mode="reinit")
    assert_std(new["head.cls_score.weight"], float(model.head.cls_score.weight.detach().std()))
    assert torch.equal(new["head.cls_score.bias"], model.head.cls_score.bias.detach())


def test_reinit_many_point_rend_columns():
    src = point_rend_state(3)
    model = build_point_rend(80, seed=7)
    new, _ = reclass(src, model, mode="reinit")
    h = "roi_heads.mask_head.point_head."
    for fc in ("fc1", "fc2", "fc3"):
        w = new[h + fc + ".weight"]
        assert_std(w[:, 256:], msra_std(w.shape))
        assert torch.equal(w[:, :256], src[h + fc + ".weight"][:, :256])
    assert_std(new["roi_heads.mask_head.coarse_head.prediction.weight"], 0.001)


# ---------------------------------------------------------------------------------------------
# Exactness: a subset model computes what the source computed, for the classes it kept
# ---------------------------------------------------------------------------------------------
SUBSET = ["dog", "person", "cat"]
SUBSET_SOURCE = [DOG, PERSON, CAT]


def _image_features(source, target):
    """Backbone features of one image, for both models (whose backbones must be identical).

    The backbone is run once: after loading, every non-class tensor of the target is the
    source's, so its features are the source's bit for bit.
    """
    src_state, tgt_state = source.state_dict(), target.state_dict()
    backbone = [k for k in src_state if k.startswith("backbone.")]
    assert backbone and all(torch.equal(src_state[k], tgt_state[k]) for k in backbone)
    image = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(0)) * 50
    with torch.no_grad():
        return source.backbone(image)


def test_faster_rcnn_subset_is_exact():
    source = build_model(FASTER_RCNN)
    target = build_model(FASTER_RCNN, 3, seed=1)
    new, report = reclass(source.state_dict(), target, thing(target=SUBSET))
    assert report.spaces["thing"].resolution == "map"
    assert all(t.action == "copied" for t in report.tensors)
    target.load_state_dict(new)
    feats = _image_features(source, target)
    proposals = [Boxes(torch.tensor([[10.0, 20.0, 60.0, 100.0], [0.0, 0.0, 159.0, 127.0],
                                     [75.0, 20.0, 150.0, 45.0], [30.0, 30.0, 35.0, 38.0]]))]
    props = [Instances((128, 160), proposal_boxes=proposals[0])]
    out = {}
    with torch.no_grad():
        for name, m in (("source", source), ("target", target)):
            pooled = m.roi_heads.box_pooler([feats[f] for f in m.roi_heads.box_in_features],
                                            proposals)
            hidden = m.roi_heads.box_head(pooled)
            logits, deltas = m.roi_heads.box_predictor(hidden)
            boxes = m.roi_heads.box_predictor.predict_boxes((logits, deltas), props)[0]
            out[name] = (hidden, logits, deltas, boxes.view(len(props[0]), -1, 4))
    (h_s, logits_s, deltas_s, boxes_s), (h_t, logits_t, deltas_t, boxes_t) = out.values()
    assert torch.equal(h_s, h_t)  # same box head: same features
    scale = float(logits_s.abs().max())
    assert scale > 0
    keep = SUBSET_SOURCE + [80]  # and background, last on both sides
    torch.testing.assert_close(logits_t, logits_s[:, keep], rtol=1e-5, atol=1e-6 * scale)
    want = deltas_s.view(-1, 80, 4)[:, SUBSET_SOURCE]
    torch.testing.assert_close(deltas_t.view(-1, 3, 4), want, rtol=1e-5,
                               atol=1e-6 * float(deltas_s.abs().max()))
    # Decoded per-class boxes (what inference keeps for each class) agree too.
    torch.testing.assert_close(boxes_t, boxes_s[:, SUBSET_SOURCE], rtol=1e-5, atol=1e-4)


def test_retinanet_subset_scores_are_exact():
    source = build_model(RETINANET)
    target = build_model(RETINANET, 3, seed=1)
    new, _ = reclass(source.state_dict(), target, thing(target=SUBSET))
    target.load_state_dict(new)
    feats = _image_features(source, target)
    with torch.no_grad():
        outs = [m.head([feats[f] for f in m.head_in_features]) for m in (source, target)]
    (logits_s, deltas_s), (logits_t, deltas_t) = outs
    assert len(logits_s) == 5
    for ls, lt, ds, dt in zip(logits_s, logits_t, deltas_s, deltas_t):
        n, _, hh, ww = ls.shape
        kept = ls.view(n, 9, 80, hh, ww)[:, :, SUBSET_SOURCE]  # channel a*K + k
        scale = float(ls.abs().max())
        torch.testing.assert_close(lt.view(n, 9, 3, hh, ww), kept, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(lt.sigmoid().view(n, 9, 3, hh, ww), kept.sigmoid(),
                                   rtol=1e-5, atol=1e-7)
        assert torch.equal(dt, ds)  # the box branch is untouched


# ---------------------------------------------------------------------------------------------
# Engine guarantees
# ---------------------------------------------------------------------------------------------
def test_input_state_dict_is_not_modified():
    src = source_state(FASTER_RCNN)
    before = {k: v.clone() for k, v in src.items() if k.startswith(BOX)}
    keys = list(src)
    model = build_model(FASTER_RCNN, 3)
    new, _ = reclass(src, model, thing(), mode="map")
    assert list(src) == keys
    assert all(torch.equal(src[k], v) for k, v in before.items())
    assert new is not src


def test_state_dict_metadata_is_kept():
    src = source_state(FASTER_RCNN)
    model = build_model(FASTER_RCNN, 3)
    new, _ = reclass(src, model, thing(), mode="map")
    assert new._metadata == src._metadata
    assert new._metadata is not src._metadata  # a copy: callers may rewrite it (fvcore does)
    plain, _ = reclass(dict(src), model, thing(), mode="map")
    assert not hasattr(plain, "_metadata")


def test_seed_changes_only_fresh_rows():
    src = source_state(FASTER_RCNN)
    model = build_model(FASTER_RCNN, 3)
    a, _ = reclass(src, model, thing(), mode="map", seed=0)
    b, _ = reclass(src, model, thing(), mode="map", seed=0)
    c, _ = reclass(src, model, thing(), mode="map", seed=1)
    key = BOX + "cls_score.weight"
    assert torch.equal(a[key], b[key])
    assert torch.equal(a[key][[0, 1, 3]], c[key][[0, 1, 3]])
    assert not torch.equal(a[key][2], c[key][2])
    assert not torch.equal(a[BOX + "bbox_pred.weight"][8:], c[BOX + "bbox_pred.weight"][8:])


def test_same_classes_change_nothing():
    src = source_state(FASTER_RCNN)
    model = build_model(FASTER_RCNN)
    for mode in ("auto", "map", "reinit", "strict"):
        new, report = reclass(src, model, thing(COCO_CLASSES, COCO_CLASSES), mode=mode)
        assert report.spaces["thing"].resolution == "unchanged"
        assert not report.tensors and not report.changed
        assert all(new[k] is src[k] for k in src)


# ---------------------------------------------------------------------------------------------
# auto mode, class lists, agnostic heads
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head80():
    torch.manual_seed(0)
    return FastRCNNOutputLayers(ShapeSpec(channels=64), box2box_transform=Box2BoxTransform(
        (10.0, 10.0, 5.0, 5.0)), num_classes=80).state_dict()


def head(num_classes, seed=1, **kw):
    torch.manual_seed(seed)
    return FastRCNNOutputLayers(ShapeSpec(channels=64), box2box_transform=Box2BoxTransform(
        (10.0, 10.0, 5.0, 5.0)), num_classes=num_classes, **kw)


def test_auto_maps_when_both_names_known(head80):
    new, report = reclass(head80, head(3), thing())
    assert report.spaces["thing"].resolution == "map"
    assert torch.equal(new["cls_score.weight"][1], head80["cls_score.weight"][PERSON])


def test_auto_reinits_when_counts_differ_and_names_unknown(head80):
    for classes in (None, thing(None, TARGET), thing(COCO_CLASSES, None)):
        new, report = reclass(head80, head(3), classes)
        assert report.spaces["thing"].resolution == "reinit"
        assert report.spaces["thing"].mapping.new == list(report.spaces["thing"].mapping.target)
        assert torch.equal(new["cls_score.weight"][3], head80["cls_score.weight"][80])
        assert not torch.equal(new["cls_score.weight"][0], head80["cls_score.weight"][0])


def test_auto_unchanged_when_same_count_and_names_unknown(head80):
    new, report = reclass(head80, head(80))
    assert report.spaces["thing"].resolution == "unchanged"
    assert all(new[k] is head80[k] for k in head80)


def test_auto_maps_same_count_in_new_order(head80):
    order = list(reversed(COCO_CLASSES))
    new, report = reclass(head80, head(80), thing(COCO_CLASSES, order))
    assert report.spaces["thing"].resolution == "map"
    assert torch.equal(new["cls_score.weight"][:80], head80["cls_score.weight"][:80].flip(0))
    assert torch.equal(new["cls_score.weight"][80], head80["cls_score.weight"][80])
    assert {t.action for t in report.tensors} == {"copied"}


def test_map_by_index_when_source_has_no_names(head80):
    new, report = reclass(head80, head(3), thing(None, TARGET, ["dog=16", "person=0"]),
                          mode="map")
    assert report.spaces["thing"].mapping.source_index == (16, 0, None)
    check_rows_layout(new, head80, "cls_score.weight", source_index=[16, 0, None],
                      background=True)
    check_rows_layout(new, head80, "bbox_pred.weight", source_index=[16, 0, None], block=4)


def test_map_needs_names(head80):
    with pytest.raises(ClassListError, match="MODE map needs the model's thing class names"):
        reclass(head80, head(3), thing(COCO_CLASSES, None), mode="map")
    with pytest.raises(ClassListError, match="SOURCE_CLASSES or SOURCE_DATASET"):
        reclass(head80, head(3), thing(None, TARGET), mode="map")


def test_reinit_mode_ignores_names(head80):
    new, report = reclass(head80, head(3), thing(), mode="reinit")
    assert report.spaces["thing"].resolution == "reinit"
    assert report.tensor("cls_score.weight").action == "fresh"  # background carried
    assert report.tensor("bbox_pred.weight").action == "fresh"
    assert not torch.equal(new["cls_score.weight"][1], head80["cls_score.weight"][PERSON])


def test_unknown_mode():
    with pytest.raises(ClassListError, match=r"MODEL.RECLASS.MODE is 'mapp'; it must be one of"):
        reclass({}, head(3), mode="mapp")


def test_source_names_must_match_checkpoint_rows(head80):
    with pytest.raises(ClassListError, match=r"has 79 names, but checkpoint has heads for 80 "
                                             r"thing classes \(cls_score.weight"):
        reclass(head80, head(3), thing(COCO_CLASSES[:79], TARGET))


def test_target_names_must_match_model(head80):
    with pytest.raises(ClassListError, match=r"has 4 names, but the model was built for 3 thing "
                                             r"classes. Build it with NUM_CLASSES = 4"):
        reclass(head80, head(3), thing(COCO_CLASSES, TARGET + ["robot"]))


def test_checkpoint_heads_must_agree(head80):
    broken = dict(head80)
    broken["bbox_pred.weight"] = head80["bbox_pred.weight"][:12]  # 3 classes, cls_score has 80
    broken["bbox_pred.bias"] = head80["bbox_pred.bias"][:12]
    with pytest.raises(CheckpointError, match=r"disagree on the number of classes "
                                              r"\(cls_score.weight: 80; .*bbox_pred.weight: 3"):
        reclass(broken, head(5), thing(None, None))


def test_agnostic_bbox_source_is_replicated():
    src = head(80, cls_agnostic_bbox_reg=True).state_dict()
    assert src["bbox_pred.weight"].shape == (4, 64)
    new, report = reclass(src, head(3), thing(), mode="map")
    w, b = new["bbox_pred.weight"], new["bbox_pred.bias"]
    assert w.shape == (12, 64)
    for j in range(3):  # every class, the new one too, starts from the agnostic regressor
        assert torch.equal(w[4 * j:4 * j + 4], src["bbox_pred.weight"])
        assert torch.equal(b[4 * j:4 * j + 4], src["bbox_pred.bias"])
    assert report.tensor("bbox_pred.weight").action == "copied"
    check_rows_layout(new, src, "cls_score.weight", background=True)


def test_one_class_source_is_not_taken_for_agnostic():
    """A 1-class checkpoint's 4 regression rows are person's, not a class-agnostic regressor."""
    src = head(1).state_dict()  # e.g. Keypoint R-CNN's person-only box predictor
    new, _ = reclass(src, head(3), thing(["person"], TARGET), mode="map")
    w = new["bbox_pred.weight"]
    assert torch.equal(w[4:8], src["bbox_pred.weight"])  # person
    assert not torch.equal(w[0:4], src["bbox_pred.weight"])  # dog: fresh, not replicated
    assert_std(w[[0, 1, 2, 3, 8, 9, 10, 11]], 0.001)
    check_rows_layout(new, src, "cls_score.weight", source_index=[None, 0, None], num_source=1,
                      background=True)


def test_specific_bbox_source_into_agnostic_target_is_fresh(head80):
    new, report = reclass(head80, head(3, cls_agnostic_bbox_reg=True), thing(), mode="map")
    w = new["bbox_pred.weight"]
    assert w.shape == (4, 64)
    assert not any(torch.equal(w[0], head80["bbox_pred.weight"][i]) for i in range(320))
    assert_std(w, 0.001)
    assert torch.equal(new["bbox_pred.bias"], torch.zeros(4))
    assert report.tensor("bbox_pred.weight").action == "fresh"


def test_agnostic_mask_source_is_replicated():
    src = source_state(MASK_RCNN, MODEL__ROI_MASK_HEAD__CLS_AGNOSTIC_MASK=True)
    model = build_model(MASK_RCNN, 3)
    new, _ = reclass(src, model, thing(), mode="map")
    w = new["roi_heads.mask_head.predictor.weight"]
    assert w.shape == (3, 256, 1, 1)
    assert all(torch.equal(w[j], src["roi_heads.mask_head.predictor.weight"][0]) for j in range(3))
    load_strict(model, new)


def test_fed_loss_weights_are_the_models_own():
    def weights(n, value):
        return lambda: torch.full((n,), value)

    src = head(80, use_sigmoid_ce=True, use_fed_loss=True,
               get_fed_loss_cls_weights=weights(80, 2.0)).state_dict()
    model = head(3, use_sigmoid_ce=True, use_fed_loss=True,
                 get_fed_loss_cls_weights=weights(3, 5.0))
    new, report = reclass(src, model, thing(), mode="map")
    assert torch.equal(new["fed_loss_cls_weights"], torch.full((3,), 5.0))
    assert report.tensor("fed_loss_cls_weights").action == "model's own"
    same, report = reclass(src, head(80, use_sigmoid_ce=True, use_fed_loss=True,
                                     get_fed_loss_cls_weights=weights(80, 3.0)))
    assert same["fed_loss_cls_weights"] is src["fed_loss_cls_weights"]  # unchanged classes


def test_a_vocabulary_is_always_the_models_own_and_counts_the_checkpoints_classes():
    # Detic's zero-shot classifier: D x (K+1) embedding columns, background last.
    lay = ClassLayout("zs_weight", THING, 3, ZERO, axis=1, background=True, vocabulary=True,
                      kind="zero-shot vocabulary")
    ckpt = {"zs_weight": torch.randn(8, 81)}
    model = {"zs_weight": torch.randn(8, 4)}
    new, report = reclass_state_dict(ckpt, model, [lay], classes=thing(), mode="map")
    assert torch.equal(new["zs_weight"], model["zs_weight"])
    assert report.tensor("zs_weight").action == "model's own"
    assert report.spaces[THING].num_source == 80
    # Same classes and shape, other embeddings: still the model's; the same bits: left alone.
    same = {"zs_weight": torch.randn(8, 4)}
    new, report = reclass_state_dict({"zs_weight": same["zs_weight"] + 1}, same, [lay])
    assert torch.equal(new["zs_weight"], same["zs_weight"])
    new, report = reclass_state_dict(dict(same), same, [lay])
    assert new["zs_weight"] is same["zs_weight"] and not report.tensors
    # Its columns count the checkpoint's classes: MODE strict raises with no names given.
    with pytest.raises(ClassMismatchError, match="checkpoint 80, model 3"):
        reclass_state_dict(ckpt, model, [lay], mode="strict")


# ---------------------------------------------------------------------------------------------
# strict mode, and mismatches that are not about classes
# ---------------------------------------------------------------------------------------------
def test_strict_names_every_tensor_both_counts_and_the_fix():
    src = source_state(FASTER_RCNN)
    before = src[BOX + "cls_score.weight"].clone()
    with pytest.raises(ClassMismatchError) as info:
        reclass(src, build_model(FASTER_RCNN, 3), thing(), mode="strict")
    msg = str(info.value)
    assert "MODEL.RECLASS.MODE is 'strict' and checkpoint does not fit the model" in msg
    assert "thing classes: checkpoint 80, model 3" in msg
    for line in (f"{BOX}cls_score.weight: checkpoint (81, 1024), model (4, 1024)",
                 f"{BOX}cls_score.bias: checkpoint (81,), model (4,)",
                 f"{BOX}bbox_pred.weight: checkpoint (320, 1024), model (12, 1024)",
                 f"{BOX}bbox_pred.bias: checkpoint (320,), model (12,)"):
        assert line in msg
    assert "To fix: set MODEL.RECLASS.MODE to 'map' (with class names) or 'reinit'" in msg
    assert "NUM_CLASSES" in msg
    assert torch.equal(src[BOX + "cls_score.weight"], before)


def test_strict_reorder_is_named_a_reorder(head80):
    order = list(reversed(COCO_CLASSES))
    with pytest.raises(ClassMismatchError, match=r"thing classes: the same 80 classes in another "
                       r"order \(checkpoint: person, bicycle, .*; model: toothbrush, hair drier,"
                       ) as info:
        reclass(head80, head(80), thing(COCO_CLASSES, order), mode="strict", source="x.pth")
    assert "x.pth does not fit" in str(info.value)
    assert "cls_score.weight: checkpoint (81, 64), model (81, 64)" in str(info.value)
    assert "bbox_pred.bias" in str(info.value)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("thing classes: the same 80 classes in another order")


def test_strict_same_count_other_names(head80):
    other = COCO_CLASSES[:79] + ["gadget"]
    with pytest.raises(ClassMismatchError, match=r"thing classes: checkpoint 80, model 80 "
                       r"\(checkpoint: person, .*; model: person, .*, \.\.\. \(80 in all\)\)"):
        reclass(head80, head(80), thing(COCO_CLASSES, other), mode="strict", source="x.pth")


def test_strict_keypoints():
    src = source_state(KEYPOINT_RCNN)
    model = build_model(KEYPOINT_RCNN, MODEL__ROI_KEYPOINT_HEAD__NUM_KEYPOINTS=5)
    with pytest.raises(ClassMismatchError, match="keypoint classes: checkpoint 17, model 5"):
        reclass(src, model, thing(["person"], ["person"]), mode="strict")


@pytest.fixture(scope="module")
def retina_a3():
    """RetinaNet with 3 anchors per location (one aspect ratio) instead of 9, 80 classes."""
    return build_model(RETINANET, MODEL__ANCHOR_GENERATOR__ASPECT_RATIOS=[[1.0]])


@pytest.fixture(scope="module")
def retina_narrow():
    """RetinaNet on a 128-channel FPN instead of 256, 80 classes."""
    return build_model(RETINANET, MODEL__FPN__OUT_CHANNELS=128)


@pytest.mark.parametrize("variant", ["retina_a3", "retina_narrow"])
def test_non_class_mismatch_is_skipped(variant, request):
    model = request.getfixturevalue(variant)
    src = source_state(RETINANET)
    key = "head.cls_score.weight"
    assert src[key].shape != model.state_dict()[key].shape
    for classes in (thing(COCO_CLASSES, COCO_CLASSES), None):
        new, report = reclass(src, model, classes)
        assert report.spaces["thing"].resolution == "unchanged"  # not taken for a class change
        assert not report.tensors
        skipped = {t.key: (t.action, t.checkpoint_shape, t.layout) for t in report.mismatches
                   if t.layout != NOT_RECOGNISED}
        # The tensors no class layout claims are listed too: the box regressor's anchors, the
        # narrower FPN's convs.
        assert {t.key for t in report.unrecognised} >= ({
            "head.bbox_pred.weight", "head.bbox_pred.bias"} if variant == "retina_a3" else {
            "backbone.fpn_output3.weight", "head.cls_subnet.0.weight"})
        assert skipped == {
            key: ("skipped", tuple(src[key].shape), "not a class change"),
            "head.cls_score.bias": ("skipped", (720,), "not a class change"),
        } if variant == "retina_a3" else {
            key: ("skipped", (720, 256, 3, 3), "not a class change"),
        }
        assert all(new[k] is src[k] for k in src)  # left for fvcore to skip
    with pytest.raises(ClassMismatchError, match="tensors differ for reasons other than classes"
                       ) as info:
        reclass(src, model, thing(COCO_CLASSES, COCO_CLASSES), mode="strict")
    assert f"{key}: checkpoint {tuple(src[key].shape)}" in str(info.value)


@pytest.mark.parametrize("target", [COCO_CLASSES, TARGET])
def test_point_rend_feature_width_is_not_a_class_change(target):
    """A 128-channel FPN makes the point head's fc1 read 336 - 128 = 208 "classes": skipped."""
    cfg = point_rend_cfg(len(target))
    cfg.MODEL.FPN.OUT_CHANNELS = 128
    torch.manual_seed(0)
    model = d2_build_model(cfg)
    src = point_rend_state(80)
    key = "roi_heads.mask_head.point_head.fc1.weight"
    new, report = reclass(src, model, thing(COCO_CLASSES, target))
    assert [(t.key, t.action, t.model_shape) for t in report.mismatches
            if t.layout != NOT_RECOGNISED] == [(key, "skipped", (256, 128 + len(target), 1))]
    assert new[key] is src[key]
    assert key not in {t.key for t in report.tensors}
    if target is TARGET:  # the class change itself still happens everywhere else
        assert report.spaces["thing"].resolution == "map"
        check_rows_layout(new, src, "roi_heads.mask_head.point_head.fc2.weight", axis=1,
                          offset=256)
        check_box_predictor(new, src)
    else:
        assert report.spaces["thing"].resolution == "unchanged" and not report.tensors
    with pytest.raises(ClassMismatchError, match=key):
        reclass(src, model, thing(COCO_CLASSES, target), mode="strict")


def test_anchor_change_with_class_change_is_still_skipped():
    src = source_state(RETINANET)
    target = build_model(RETINANET, 3, MODEL__ANCHOR_GENERATOR__ASPECT_RATIOS=[[1.0]])
    new, report = reclass(src, target, thing(), mode="map")
    assert not report.tensors
    assert {t.key: t.layout for t in report.mismatches} == {
        "head.cls_score.weight": "not a class change", "head.cls_score.bias": "not a class change",
        "head.bbox_pred.weight": NOT_RECOGNISED, "head.bbox_pred.bias": NOT_RECOGNISED}
    assert new["head.cls_score.weight"] is src["head.cls_score.weight"]
    # Read without the anchor check, 720 rows would pass for 240 classes of 3 anchors.
    assert find_layouts(target)[0].count_classes(720) == 240


def _with_extra(state, shape):
    """``state`` plus a tensor no class layout claims (a user's layer, an unknown head)."""
    return {**state, "extra.weight": torch.arange(math.prod(shape), dtype=torch.float32)
            .view(shape)}


@pytest.mark.parametrize("mode", ["auto", "map", "reinit"])
def test_unrecognised_mismatch_is_listed_in_every_mode(head80, mode):
    model = head(3)
    ckpt = _with_extra(head80, (5, 4))
    new, report = reclass_state_dict(ckpt, _with_extra(model.state_dict(), (6, 4)),
                                     find_layouts(model), classes=thing(), mode=mode)
    assert [(t.key, t.space, t.checkpoint_shape, t.model_shape, t.action, t.layout)
            for t in report.mismatches] == [
        ("extra.weight", "", (5, 4), (6, 4), "skipped", "not recognised")]
    assert new["extra.weight"] is ckpt["extra.weight"]  # left for fvcore to skip, as stock
    assert report.summary().endswith(
        "; 1 tensors of another shape than the model's not recognised (skipped)")
    assert "| extra.weight " in report.table() and "not recognised" in str(report)


def test_strict_raises_for_an_unrecognised_mismatch_with_classes_unchanged(head80):
    model = head(80)
    with pytest.raises(ClassMismatchError) as info:
        reclass_state_dict(_with_extra(head80, (5, 4)), _with_extra(model.state_dict(), (6, 4)),
                           find_layouts(model), classes=thing(COCO_CLASSES, COCO_CLASSES),
                           mode="strict", source="x.pth")
    assert str(info.value).startswith(
        "MODEL.RECLASS.MODE is 'strict' and x.pth does not fit the model: tensors differ for "
        "reasons other than classes or are not recognised.\n"
        "  extra.weight: checkpoint (5, 4), model (6, 4) (not recognised)\n")
    assert "register one (d2_reclass.register_layout)" in str(info.value)
    assert info.value.tensors == ["  extra.weight: checkpoint (5, 4), model (6, 4) "
                                  "(not recognised)"]
    assert info.value.problems == []  # no class space differs


def test_class_map_applies_in_every_space_its_target_is_in():
    targets = {THING: ["vehicle", "person"], STUFF: ["things", "water", "person"]}
    assert class_map_by_space(["water=river+sea", "vehicle=car+truck", "Person=human"],
                              targets) == {
        THING: {"vehicle": "car+truck", "Person": "human"},
        STUFF: {"water": "river+sea", "Person": "human"}}
    with pytest.raises(ClassListError, match=r"^CLASS_MAP names the target class 'watr', which "
                       r"is not in MODEL\.RECLASS\.TARGET_CLASSES or MODEL\.RECLASS\."
                       r"TARGET_STUFF_CLASSES\. Did you mean 'water'\?$"):
        class_map_by_space(["watr=sea"], targets)
    # Target names unknown: the things' mapping says what is missing, as before.
    assert class_map_by_space(["a=b"], {THING: None, STUFF: None}) == {THING: {"a": "b"},
                                                                        STUFF: {}}


class _DetrLike(nn.Module):
    """A user's head: K+1 "no object"-last logits from an nn.Linear with torch's own init."""

    def __init__(self, num_classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.class_embed = nn.Linear(32, num_classes + 1)


@register_layout(_DetrLike)
def _detr_like(m):
    # The recipe of register_layout's docstring, with the head's own (torch default) init.
    init = torch_default_init(m.class_embed)
    return class_rows(m.class_embed, "class_embed", init, init, space=THING,
                      num_classes=m.class_embed.out_features - 1, background=True,
                      classifier=True)


def test_user_registered_classifier_merges_by_the_classifier_rule():
    """A merge raises the bias by log(count), a new class is drawn from nn.Linear's own init,
    the "no object" row is carried."""
    src, model = _DetrLike(4, seed=1), _DetrLike(3, seed=2)
    new, report = reclass_state_dict(
        src.state_dict(), model.state_dict(), find_layouts(model), mode="map",
        classes={THING: ClassSpec(["a", "b", "c", "d"], ["ab", "d", "new"], ["ab=a+b"])})
    w, b = new["class_embed.weight"], new["class_embed.bias"]
    sw, sb = src.state_dict()["class_embed.weight"], src.state_dict()["class_embed.bias"]
    torch.testing.assert_close(b[0].double(), sb[:2].double().mean() + math.log(2), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(w[0].double(), sw[:2].double().mean(0), rtol=0, atol=1e-6)
    assert torch.equal(w[1], sw[3]) and torch.equal(b[1], sb[3])
    assert torch.equal(w[3], sw[4]) and torch.equal(b[3], sb[4])  # "no object"
    bound = 1 / math.sqrt(32)
    assert 0 < float(w[2].abs().max()) <= bound and 0 < float(b[2].abs()) <= bound
    assert not torch.equal(w[2], model.class_embed.weight[2])  # drawn, seeded by name
    assert report.tensor("class_embed.bias").merged == 1


def test_layouts_with_no_tensor_in_the_checkpoint_are_ignored(head80):
    partial = {k: v for k, v in head80.items() if k.startswith("cls_score")}
    model = head(3)
    new, report = reclass_state_dict(partial, model.state_dict(), find_layouts(model),
                                     classes=thing(), mode="map")
    assert set(new) == set(partial)
    assert [t.key for t in report.tensors] == ["cls_score.weight", "cls_score.bias"]


# ---------------------------------------------------------------------------------------------
# LVIS scale: the per-tensor engine gives what the per-class one gave, bit for bit
# ---------------------------------------------------------------------------------------------
LVIS_CLASSES = list(MetadataCatalog.get("lvis_v1_train").thing_classes)


class _LvisHeads(nn.Module):
    """Every kind of class tensor an LVIS model has, tiny: a box predictor (1,204 logits,
    class-specific boxes), a class-agnostic one (as a cascade stage's), a mask predictor and a
    RetinaNet head (anchor-major channels)."""

    def __init__(self, num_classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        box = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
        self.box_predictor = FastRCNNOutputLayers(ShapeSpec(channels=4), box2box_transform=box,
                                                  num_classes=num_classes)
        self.agnostic = FastRCNNOutputLayers(ShapeSpec(channels=4), box2box_transform=box,
                                             num_classes=num_classes,
                                             cls_agnostic_bbox_reg=True)
        self.mask_head = MaskRCNNConvUpsampleHead(ShapeSpec(channels=2, height=4, width=4),
                                                  num_classes=num_classes, conv_dims=[2])
        self.retina = RetinaNetHead(input_shape=[ShapeSpec(channels=2)], num_classes=num_classes,
                                    num_anchors=2, conv_dims=[2])


def _lvis_expansion() -> list:
    """The 80 COCO classes and the first 1,123 LVIS classes COCO lacks, sorted by name."""
    have = {normalize_class_name(c) for c in COCO_CLASSES}
    extra = [c for c in LVIS_CLASSES if normalize_class_name(c) not in have][:1123]
    return sorted(COCO_CLASSES + extra)


def _lvis_case(name: str):
    shuffled = LVIS_CLASSES[:]
    random.Random(0).shuffle(shuffled)
    lvis = LVIS_CLASSES
    merged = [c for c in shuffled if c not in (lvis[1], lvis[2])] + ["copy", "brand new"]
    return {  # name: (source classes, target classes, options)
        "reorder": (lvis, lvis[::-1], {}),
        "shuffle": (lvis, shuffled, {}),
        "subset": (lvis, [lvis[1], lvis[0], "gadget"], {}),
        "expansion": (COCO_CLASSES, _lvis_expansion(), {}),
        "merge_split": (lvis, merged, {"class_map": [f"{lvis[0]}={lvis[0]}+{lvis[1]}+{lvis[2]}",
                                                     f"copy={lvis[20]}"]}),
        "reinit": (lvis, shuffled, {"mode": "reinit"}),
        "combine": (COCO_CLASSES, _lvis_expansion()[:500] + lvis[-40:], {"more": lvis}),
    }[name]


def _lvis_reclass(name: str):
    source, target, options = _lvis_case(name)
    model = _LvisHeads(len(target), seed=1)
    classes = {THING: ClassSpec(source, target, options.get("class_map"))}
    state = _LvisHeads(len(source)).state_dict()
    mode = options.get("mode", "map")
    if "more" in options:
        more = [SourceCheckpoint(_LvisHeads(len(options["more"]), seed=2).state_dict(),
                                 {THING: options["more"]}, "lvis.pth")]
        return combine_state_dicts(state, more, model.state_dict(), find_layouts(model),
                                   classes=classes, mode=mode, seed=3, source="coco.pth",
                                   allow_different_weights=True)
    return reclass_state_dict(state, model.state_dict(), find_layouts(model), classes=classes,
                              mode=mode, seed=3, source="x.pth")


#: sha256 (first 16 hex digits) of every output tensor (name, dtype, shape, bytes, in key order)
#: and of the report's JSON, as the per-class engine of commit 6c286a1 computed them; torch
#: 2.14.1 on x86-64 (the weights and fresh rows come from torch's CPU generator).
_LVIS_DIGESTS = {
    "reorder": ("c8d2cdded0536c33", "750d18ef9bc1a379"),
    "shuffle": ("19a123faae5d3f0a", "fd7d6ef546d64e13"),
    "subset": ("a3afffc8cafdcafa", "d3339146c62e14d3"),
    "expansion": ("a31664208d285b84", "ef057c0b3e1dda8f"),
    "merge_split": ("732a5ae8dd6b8863", "ccb168dfef5f22a8"),
    "reinit": ("8e19bb2990476e95", "86001c0099c61a2c"),
    "combine": ("ffdcb9f4aada4832", "38efa80b8f9afb18"),
}


@pytest.mark.parametrize("name", sorted(_LVIS_DIGESTS))
def test_lvis_scale_outputs_are_bit_identical_to_the_per_class_engine(name):
    new, report = _lvis_reclass(name)
    h = hashlib.sha256()
    for key in sorted(new):
        value = new[key]
        h.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
        h.update(value.contiguous().numpy().tobytes())
    digests = (h.hexdigest()[:16], hashlib.sha256(report.to_json().encode()).hexdigest()[:16])
    assert digests == _LVIS_DIGESTS[name]


def test_lvis_scale_rows_are_the_sources_and_the_keyed_draw():
    """What the digests stand for, checked row by row: a reorder gathers every row of the
    source; an expansion's fresh rows are the keyed draw of the whole tensor, at their rows."""
    new, _ = _lvis_reclass("reorder")
    source = _LvisHeads(len(LVIS_CLASSES)).state_dict()
    weight = "box_predictor.cls_score.weight"
    order = list(range(len(LVIS_CLASSES)))[::-1] + [len(LVIS_CLASSES)]  # background stays last
    assert torch.equal(new[weight], source[weight][order])
    boxes = "box_predictor.bbox_pred.weight"
    assert torch.equal(new[boxes].view(-1, 4, 4), source[boxes].view(-1, 4, 4)[order[:-1]])
    new, report = _lvis_reclass("expansion")
    target = _lvis_expansion()
    fresh = [j for j, c in enumerate(target) if c not in COCO_CLASSES]
    assert len(fresh) == 1123 and report.tensor(weight).fresh == 1123
    drawn = NORMAL_001.draw(new[weight].shape, seeded_generator(3, weight))
    assert torch.equal(new[weight][fresh], drawn[fresh])
    kept = [j for j, c in enumerate(target) if c in COCO_CLASSES]
    source = _LvisHeads(len(COCO_CLASSES)).state_dict()
    assert torch.equal(new[weight][kept],
                       source[weight][[COCO_CLASSES.index(target[j]) for j in kept]])
