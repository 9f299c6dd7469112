"""Layouts: which tensors of which heads are class-dependent, and how their axes are laid out."""
import logging
import math

import pytest
import torch
from conftest import (
    CASCADE,
    FASTER_RCNN,
    FCOS,
    KEYPOINT_RCNN,
    MASK_RCNN,
    PANOPTIC_FPN,
    PRIOR_BIAS,
    RETINANET,
    SEMANTIC_FPN,
    build_model,
    build_point_rend,
)
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformRotated
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from torch import nn

from d2_reclass.fresh import MSRA, NORMAL_0001, NORMAL_001, ZERO, InitSpec, retinanet_prior_bias
from d2_reclass.layouts import (
    KEYPOINT,
    MEAN,
    MEAN_LOG_COUNT,
    STUFF,
    SUM,
    THING,
    ClassLayout,
    ClassSegment,
    SourceAxis,
    class_rows,
    find_layouts,
    layouts_for_module,
    register_layout,
)


def by_key(layouts):
    out = {lay.key: lay for lay in layouts}
    assert len(out) == len(layouts), "one layout per key, unless a tensor has two class axes"
    return out


def fast_rcnn_head(num_classes=80, **kw):
    return FastRCNNOutputLayers(ShapeSpec(channels=32), box2box_transform=Box2BoxTransform(
        (10.0, 10.0, 5.0, 5.0)), num_classes=num_classes, **kw)


# ---------------------------------------------------------------------------------------------
# ClassLayout arithmetic
# ---------------------------------------------------------------------------------------------
def test_length_and_count_classes():
    cls = ClassLayout("w", THING, 80, NORMAL_001, background=True)
    assert cls.length(80) == 81 and cls.count_classes(81) == 80
    box = ClassLayout("w", THING, 80, NORMAL_0001, block=4, can_be_agnostic=True)
    assert box.length(80) == 320 and box.count_classes(320) == 80
    assert box.count_classes(322) is None  # not a whole number of blocks
    assert box.length(80, agnostic=True) == 4 and box.is_agnostic_length(4)
    assert not cls.is_agnostic_length(1)  # a softmax head has no agnostic form
    retina = ClassLayout("w", THING, 80, NORMAL_001, repeat=9)
    assert retina.length(3) == 27 and retina.count_classes(720) == 80
    assert retina.count_classes(721) is None
    cols = ClassLayout("w", THING, 80, MSRA, axis=1, offset=256)
    assert cols.length(3) == 259 and cols.count_classes(336) == 80
    assert cols.count_classes(256) is None and cols.count_classes(100) is None
    assert ClassLayout("w", THING, 1, ZERO, background=True).count_classes(1) is None


def positions(layout, source_index, num_source, *, source_agnostic=False,
              target_agnostic=False):
    """For each target entry, the source entry it copies, or -1 for fresh (no class merged)."""
    plan = layout.entry_sources(source_index, [SourceAxis(num_source, source_agnostic)],
                                target_agnostic=target_agnostic)
    assert not plan.merged.any()
    return torch.where(plan.fresh, -1, plan.index[0])


def test_source_positions():
    # Softmax + background, K 4 -> [2, 0, new]: the background block is carried.
    cls = ClassLayout("w", THING, 3, NORMAL_001, background=True)
    assert positions(cls, [2, 0, None], 4).tolist() == [2, 0, -1, 4]
    # Class-major blocks of B=2, A=2 anchor-major repeats, 3 leading non-class entries.
    lay = ClassLayout("w", THING, 2, NORMAL_001, block=2, repeat=2, offset=3)
    got = positions(lay, [1, None], 3).tolist()
    assert got == [0, 1, 2] + [5, 6, -1, -1] + [11, 12, -1, -1]
    # Agnostic source feeds every target class; agnostic target from specific source is fresh.
    box = ClassLayout("w", THING, 3, NORMAL_0001, block=4, can_be_agnostic=True)
    assert positions(box, [5, None, 0], 80, source_agnostic=True).tolist() == \
        [0, 1, 2, 3] * 3
    assert positions(box, [5, None, 0], 80, target_agnostic=True).tolist() == [-1] * 4
    assert positions(box, [5], 80, source_agnostic=True, target_agnostic=True).tolist() \
        == [0, 1, 2, 3]


def test_entry_sources_merge_split_and_two_checkpoints():
    # A softmax bias, K 3 -> ["a+c" merged, "b", "b" again (split)]; background carried.
    bias = ClassLayout("b", THING, 3, ZERO, background=True, merge=MEAN_LOG_COUNT)
    plan = bias.entry_sources([(0, 2), 1, 1], [SourceAxis(3)])
    assert plan.index.tolist() == [[0, 1, 1, 3], [2, -1, -1, -1]]
    assert plan.weight.tolist() == [[0.5, 1.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0]]
    assert plan.shift.tolist() == [math.log(2), 0.0, 0.0, 0.0]
    assert plan.copies.tolist() == [False, True, True, True]
    # Input columns sum their parts; regression blocks average them.
    cols = ClassLayout("w", THING, 1, MSRA, axis=1, offset=2, merge=SUM)
    assert cols.entry_sources([(0, 1)], [SourceAxis(2)]).weight[:, 2].tolist() == [1.0, 1.0]
    box = ClassLayout("w", THING, 1, NORMAL_0001, block=2)
    plan = box.entry_sources([(0, 1)], [SourceAxis(2)])
    assert plan.index.tolist() == [[0, 1], [2, 3]] and plan.weight.tolist() == [[0.5] * 2] * 2
    # Two checkpoints, 2 and 4 classes, 2 anchors: each class from its own checkpoint's rows;
    # the background from the first's.
    retina = ClassLayout("w", THING, 2, NORMAL_001, repeat=2, background=True)
    plan = retina.entry_sources([1, 3], [SourceAxis(2), SourceAxis(4)], checkpoint=[0, 1])
    assert plan.index[0].tolist() == [1, 3, 2] + [3 + 1, 5 + 3, 3 + 2]
    assert plan.checkpoint.tolist() == [0, 1, 0] * 2
    # A checkpoint without a usable tensor gives no entries: its classes are fresh here.
    plan = retina.entry_sources([1, 3], [SourceAxis(2), None], checkpoint=[0, 1])
    assert plan.fresh.tolist() == [False, True, False] * 2


def test_segments():
    # [3 non-class] + K blocks of 2, then [1 non-class] + K blocks of 1 (Implicit PointRend).
    lay = ClassLayout("w", THING, 2, NORMAL_0001, offset=3, block=2,
                      segments=(ClassSegment(offset=1),))
    assert lay.length(2) == 3 + 4 + 1 + 2 and lay.count_classes(10) == 2
    assert lay.count_classes(13) == 3 and lay.count_classes(12) is None
    got = positions(lay, [2, None], 3).tolist()
    assert got == [0, 1, 2] + [7, 8, -1, -1] + [9] + [12, -1]


def test_describe():
    lay = ClassLayout("w", THING, 3, NORMAL_001, kind="class-major x 4", agnostic=True)
    assert lay.describe() == "class-major x 4, class-agnostic"
    assert ClassLayout("w", THING, 3, NORMAL_001).describe() == ""


# ---------------------------------------------------------------------------------------------
# Discovery in model-zoo models
# ---------------------------------------------------------------------------------------------
def test_faster_rcnn():
    lays = by_key(find_layouts(build_model(FASTER_RCNN)))
    p = "roi_heads.box_predictor."
    assert set(lays) == {p + "cls_score.weight", p + "cls_score.bias", p + "bbox_pred.weight",
                         p + "bbox_pred.bias"}
    cls, box = lays[p + "cls_score.weight"], lays[p + "bbox_pred.weight"]
    assert (cls.space, cls.num_classes, cls.background, cls.block, cls.init) == \
        (THING, 80, True, 1, NORMAL_001)
    assert (box.num_classes, box.background, box.block, box.agnostic, box.can_be_agnostic,
            box.init) == (80, False, 4, False, True, NORMAL_0001)
    assert lays[p + "cls_score.bias"].init == ZERO and lays[p + "bbox_pred.bias"].init == ZERO


def test_cascade_stages_and_agnostic_boxes():
    lays = by_key(find_layouts(build_model(CASCADE)))
    assert len(lays) == 3 * 4 + 2
    for stage in range(3):
        p = f"roi_heads.box_predictor.{stage}."
        assert lays[p + "cls_score.weight"].num_classes == 80
        assert lays[p + "bbox_pred.weight"].agnostic  # CLS_AGNOSTIC_BBOX_REG
    mask = lays["roi_heads.mask_head.predictor.weight"]
    assert (mask.num_classes, mask.init, mask.agnostic) == (80, NORMAL_0001, False)


def test_mask_head_agnostic():
    model = build_model(MASK_RCNN, MODEL__ROI_MASK_HEAD__CLS_AGNOSTIC_MASK=True)
    mask = by_key(find_layouts(model))["roi_heads.mask_head.predictor.weight"]
    assert mask.agnostic and mask.num_classes is None and mask.can_be_agnostic


def test_retinanet_and_its_prior():
    model = build_model(RETINANET)
    lays = by_key(find_layouts(model))
    assert set(lays) == {"head.cls_score.weight", "head.cls_score.bias"}
    w, b = lays["head.cls_score.weight"], lays["head.cls_score.bias"]
    assert (w.num_classes, w.repeat, w.requires, w.init) == \
        (80, 9, ("head.bbox_pred.weight",), NORMAL_001)
    assert b.init.kind == "constant" and b.init.value == pytest.approx(PRIOR_BIAS, abs=1e-6)
    assert b.init.value == model.head.cls_score.bias[0].item()  # read from the head itself
    # A configured prior is read back from a freshly built head...
    other = build_model(RETINANET, MODEL__RETINANET__PRIOR_PROB=0.05)
    assert find_layouts(other)[1].init.value == pytest.approx(retinanet_prior_bias(0.05), 1e-6)
    # ...but a trained head's biases differ per channel: fall back to detectron2's default.
    with torch.no_grad():
        model.head.cls_score.bias.copy_(torch.linspace(-5, -4, 720))
    assert by_key(find_layouts(model))["head.cls_score.bias"].init == \
        InitSpec("constant", retinanet_prior_bias(0.01))


def test_retinanet_anchor_count():
    lays = find_layouts(build_model(RETINANET, 3, MODEL__ANCHOR_GENERATOR__ASPECT_RATIOS=[[1.0]]))
    assert {(lay.num_classes, lay.repeat) for lay in lays} == {(3, 3)}


def test_fcos_is_a_retinanet_head_with_one_anchor():
    lays = by_key(find_layouts(build_model(FCOS, 3)))
    assert set(lays) == {"head.cls_score.weight", "head.cls_score.bias"}
    assert lays["head.cls_score.weight"].repeat == 1
    assert lays["head.cls_score.weight"].num_classes == 3


def test_panoptic_fpn_spaces():
    lays = by_key(find_layouts(build_model(PANOPTIC_FPN)))
    stuff = lays["sem_seg_head.predictor.weight"]
    assert (stuff.space, stuff.num_classes, stuff.init) == (STUFF, 54, MSRA)
    assert lays["roi_heads.box_predictor.cls_score.weight"].space == THING
    assert lays["roi_heads.mask_head.predictor.weight"].space == THING


def test_semantic_fpn():
    lays = by_key(find_layouts(build_model(SEMANTIC_FPN, stuff_classes=7)))
    assert set(lays) == {"sem_seg_head.predictor.weight", "sem_seg_head.predictor.bias"}
    assert lays["sem_seg_head.predictor.weight"].num_classes == 7


def test_keypoint_head():
    lays = by_key(find_layouts(build_model(KEYPOINT_RCNN)))
    w = lays["roi_heads.keypoint_head.score_lowres.weight"]
    assert (w.space, w.num_classes, w.axis, w.init) == (KEYPOINT, 17, 1, MSRA)
    assert lays["roi_heads.keypoint_head.score_lowres.bias"].axis == 0
    assert lays["roi_heads.box_predictor.cls_score.weight"].num_classes == 1


def test_point_rend_instance():
    lays = find_layouts(build_point_rend(3))
    h = "roi_heads.mask_head.point_head."
    cols = {lay.key: lay for lay in lays if lay.axis == 1}
    assert set(cols) == {h + "fc1.weight", h + "fc2.weight", h + "fc3.weight",
                         h + "predictor.weight"}
    assert {(lay.offset, lay.num_classes) for lay in cols.values()} == {(256, 3)}
    assert cols[h + "fc1.weight"].init == MSRA
    # The predictor's weight has two class axes: its rows and its last K columns.
    assert sorted(lay.axis for lay in lays if lay.key == h + "predictor.weight") == [0, 1]
    coarse = [lay for lay in lays if lay.key.endswith("coarse_head.prediction.weight")]
    assert [(lay.block, lay.num_classes) for lay in coarse] == [(49, 3)]
    assert all(lay.space == THING for lay in lays)


def test_implicit_point_rend_parameter_head():
    model = build_point_rend(3, implicit=True)
    lays = by_key(find_layouts(model))
    head = model.roi_heads.mask_head.point_head
    n = model.roi_heads.mask_head.parameter_head.prediction.out_features
    for p in ("weight", "bias"):
        lay = lays[f"roi_heads.mask_head.parameter_head.prediction.{p}"]
        assert (lay.num_classes, lay.offset, lay.block, lay.segments, lay.merge) == (
            3, sum(head.num_weight_params[:-1]), 256,
            (ClassSegment(offset=sum(head.num_bias_params[:-1])),), MEAN)
        assert lay.length(3) == n and lay.count_classes(n) == 3
        assert lay.length(80) == n + 77 * (256 + 1)  # C weights and 1 bias per class


def test_point_rend_point_head_variants():
    # Coarse logits only into the first layer: later fcs are not class-dependent.
    lays = find_layouts(build_point_rend(3, COARSE_PRED_EACH_LAYER=False))
    cols = sorted(lay.key for lay in lays if lay.axis == 1)
    assert cols == ["roi_heads.mask_head.point_head.fc1.weight"]
    # Class-agnostic point logits with coarse logits in every layer: K read from the inputs.
    lays = find_layouts(build_point_rend(3, CLS_AGNOSTIC_MASK=True))
    pred = [lay for lay in lays if lay.key == "roi_heads.mask_head.point_head.predictor.weight"]
    assert sorted((lay.axis, lay.agnostic, lay.num_classes) for lay in pred) == \
        [(0, True, None), (1, False, 3)]


def test_point_rend_semantic_is_stuff():
    lays = find_layouts(build_point_rend(5, semantic=True))
    assert {lay.space for lay in lays} == {STUFF}
    keys = {lay.key for lay in lays}
    assert "sem_seg_head.coarse_sem_seg_head.predictor.weight" in keys
    assert "sem_seg_head.point_head.fc1.weight" in keys


def test_deeplab_heads():
    from detectron2.projects.deeplab.semantic_seg import DeepLabV3PlusHead

    kw = dict(input_shape={"res2": ShapeSpec(channels=16, stride=4),
                           "res5": ShapeSpec(channels=32, stride=16)},
              project_channels=[8], aspp_dilations=[6, 12, 18], aspp_dropout=0.1,
              decoder_channels=[16, 16], common_stride=4, norm="", train_size=None)
    lays = by_key(layouts_for_module(DeepLabV3PlusHead(num_classes=5, **kw)))
    assert set(lays) == {"predictor.weight", "predictor.bias"}
    assert (lays["predictor.weight"].space, lays["predictor.weight"].num_classes) == (STUFF, 5)
    # Panoptic-DeepLab's instance head has no predictor, hence no class tensor.
    assert layouts_for_module(DeepLabV3PlusHead(**kw)) == []


# ---------------------------------------------------------------------------------------------
# Discovery by module type
# ---------------------------------------------------------------------------------------------
def test_wrappers_are_looked_through():
    model = build_model(FASTER_RCNN)
    assert find_layouts(nn.DataParallel(model)) == find_layouts(model)


def test_subclasses_and_renamed_attributes_are_found():
    class MyPredictor(FastRCNNOutputLayers):
        pass

    class MyHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.my_predictor = MyPredictor(ShapeSpec(channels=32), box2box_transform=(
                Box2BoxTransform((10.0, 10.0, 5.0, 5.0))), num_classes=7)

    keys = {lay.key: lay.num_classes for lay in find_layouts(MyHeads())}
    assert keys == {"my_predictor.cls_score.weight": 7, "my_predictor.cls_score.bias": 7,
                    "my_predictor.bbox_pred.weight": 7, "my_predictor.bbox_pred.bias": 7}


def test_rotated_box_dim():
    head = FastRCNNOutputLayers(ShapeSpec(channels=32), box2box_transform=(
        Box2BoxTransformRotated((10.0, 10.0, 5.0, 5.0, 1.0))), num_classes=4)
    lay = by_key(layouts_for_module(head))["bbox_pred.weight"]
    assert (lay.block, lay.kind) == (5, "class-major x 5")


def test_fed_loss_buffer_keeps_the_models_value():
    head = fast_rcnn_head(3, use_sigmoid_ce=True, use_fed_loss=True,
                          get_fed_loss_cls_weights=lambda: torch.ones(3))
    lay = by_key(layouts_for_module(head))["fed_loss_cls_weights"]
    assert lay.keep_model and lay.num_classes == 3


def test_register_layout_for_a_new_head():
    class DetrLikeHead(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.class_embed = nn.Linear(16, k + 1)
            self.bbox_embed = nn.Linear(16, 4)

    @register_layout(DetrLikeHead)
    def _detr(m):
        k = m.class_embed.out_features - 1
        return [ClassLayout("class_embed.weight", THING, k, NORMAL_001, background=True),
                ClassLayout("class_embed.bias", THING, k, ZERO, background=True)]

    class Model(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.head = DetrLikeHead(k)

    lays = find_layouts(Model(91))
    assert [(lay.key, lay.num_classes) for lay in lays] == [("head.class_embed.weight", 91),
                                                            ("head.class_embed.bias", 91)]


def test_a_registered_module_claims_its_subtree():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = fast_rcnn_head(5)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Wrapper()
            self.ab = fast_rcnn_head(6)  # a sibling whose name extends "a": not claimed

    assert len(find_layouts(Outer())) == 8

    @register_layout(Wrapper)
    def _wrapper(m):
        return [ClassLayout("inner.cls_score.weight", STUFF, 5, NORMAL_001, background=True)]

    found = {lay.key: lay.space for lay in find_layouts(Outer())}
    assert found["a.inner.cls_score.weight"] == STUFF  # the parent assigned the space
    assert "a.inner.bbox_pred.weight" not in found
    assert found["ab.cls_score.weight"] == THING and len(found) == 5


def test_model_without_class_tensors():
    assert find_layouts(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())) == []


class NamedHead(nn.Module):
    """A head registered by its qualified class name, as a project's layouts are."""

    def __init__(self, k):
        super().__init__()
        self.logits = nn.Conv2d(8, k, 1)


class NamedHeadSubclass(NamedHead):
    pass


def test_register_layout_by_qualified_class_name():
    @register_layout(f"{NamedHead.__module__}.NamedHead")
    def _named(m):
        return class_rows(m.logits, "logits", NORMAL_001, space=STUFF, classifier=True,
                          num_classes=m.logits.out_channels, config_key="MODEL.X.NUM_CLASSES")

    found = by_key(find_layouts(nn.Sequential(NamedHead(5), NamedHeadSubclass(7))))
    assert {k: lay.num_classes for k, lay in found.items()} == {
        "0.logits.weight": 5, "0.logits.bias": 5, "1.logits.weight": 7, "1.logits.bias": 7}
    assert found["0.logits.bias"].merge == MEAN_LOG_COUNT and found["0.logits.weight"].merge == MEAN
    assert found["1.logits.bias"].config_key == "MODEL.X.NUM_CLASSES"


def test_a_head_its_layout_cannot_read_is_reported_not_a_crash(caplog):
    head = fast_rcnn_head(5)
    # Detic's class-agnostic box regressor is an nn.Sequential, which has no out_features.
    head.bbox_pred = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    model = nn.Sequential(head, fast_rcnn_head(3))
    unreadable = []
    with caplog.at_level(logging.WARNING, logger="d2_reclass.layouts.core"):
        found = find_layouts(model, unreadable)
    assert sorted({lay.key.split(".")[0] for lay in found}) == ["1"]
    assert unreadable == [("0", "AttributeError: 'Sequential' object has no attribute "
                                "'out_features'")]
    assert "Cannot read the class layout of 0 (FastRCNNOutputLayers)" in caplog.text


def test_detectron2_heads_name_their_config_key():
    keys = {lay.key: lay.config_key for lay in layouts_for_module(fast_rcnn_head(4))}
    assert set(keys.values()) == {"MODEL.ROI_HEADS.NUM_CLASSES"}
