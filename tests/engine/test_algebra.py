"""Class algebra in the engine, on real detectron2 models: split, merge, combine.

Split targets are bit-identical to their source; merged entries equal each head's documented
rule (to 1e-6); combined entries are bit-identical to the rows of the checkpoint they come
from. Bad input is one clear error, with nothing modified.
"""
import math

import pytest
import torch
from conftest import (
    CASCADE,
    COCO_CLASSES,
    COCO_STUFF,
    FASTER_RCNN,
    MASK_RCNN,
    RETINANET,
    SEMANTIC_FPN,
    build_model,
    build_point_rend,
    point_rend_state,
    reclass,
    source_state,
    thing,
)
from d2_fixtures import SIX, captured_logs, small_model
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from d2_reclass import CombineError, SourceCheckpoint, combine_state_dicts
from d2_reclass.engine.surgery import ClassSpec
from d2_reclass.errors import ClassListError
from d2_reclass.layouts import find_layouts

BOX = "roi_heads.box_predictor."
MASK = "roi_heads.mask_head.predictor."
CAR, TRUCK, BUS, DOG, PERSON = (COCO_CLASSES.index(c) for c in
                                ("car", "truck", "bus", "dog", "person"))
VEHICLE = [CAR, TRUCK, BUS]
MERGE = thing(target=["vehicle", "dog"], class_map=["vehicle=car+truck+bus"])
LOG3 = math.log(3)


def mean_of(t: torch.Tensor, rows, axis: int = 0) -> torch.Tensor:
    """The float64 mean of ``rows`` of ``t`` along ``axis``: the MEAN rule, restated."""
    return t.double().index_select(axis, torch.tensor(rows)).mean(axis)


def blocks(rows, block: int):
    """The entries of class blocks ``rows`` (each ``block`` long)."""
    return [r * block + b for r in rows for b in range(block)]


def assert_rule(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Split: one source class into several targets
# ---------------------------------------------------------------------------------------------
def test_split_gives_each_target_the_source_entries():
    src = source_state(MASK_RCNN)
    model = build_model(MASK_RCNN, 3)
    classes = thing(target=["dog", "small person", "big person"],
                    class_map=["small person=person", "big person=person"])
    new, report = reclass(src, model, classes, mode="map")
    for key, block in ((BOX + "cls_score.weight", 1), (BOX + "bbox_pred.weight", 4),
                       (BOX + "bbox_pred.bias", 4), (MASK + "weight", 1), (MASK + "bias", 1)):
        rows = new[key].view(-1, block, *new[key].shape[1:])
        person = src[key].view(-1, block, *src[key].shape[1:])[PERSON]
        assert torch.equal(rows[1], person) and torch.equal(rows[2], person), key
        assert torch.equal(rows[0], src[key].view(-1, block, *src[key].shape[1:])[DOG])
    assert torch.equal(new[BOX + "cls_score.weight"][3], src[BOX + "cls_score.weight"][80])
    mapping = report.spaces["thing"].mapping
    assert mapping.split == [("person", ("small person", "big person"))]
    assert mapping.to_dict()["split"] == [{"source": "person",
                                           "targets": ["small person", "big person"]}]
    assert {t.action for t in report.tensors} == {"copied"}
    table = report.mapping_table()
    assert "| thing   | small person   | person [0] (split into 2)" in table
    assert "| thing   | big person     | person [0] (split into 2)" in table
    assert "| thing   | dog            | dog [16]      " in table


# ---------------------------------------------------------------------------------------------
# Merge: several source classes into one target, by each head's rule
# ---------------------------------------------------------------------------------------------
def test_merge_box_predictor_and_mask_head():
    src = source_state(MASK_RCNN)
    model = build_model(MASK_RCNN, 2)
    new, report = reclass(src, model, MERGE, mode="map")
    w, b = new[BOX + "cls_score.weight"], new[BOX + "cls_score.bias"]
    # Softmax classifier: weights averaged, bias averaged and raised by log(count).
    assert_rule(w[0], mean_of(src[BOX + "cls_score.weight"], VEHICLE))
    assert_rule(b[0], mean_of(src[BOX + "cls_score.bias"], VEHICLE) + LOG3)
    assert torch.equal(w[1], src[BOX + "cls_score.weight"][DOG])
    assert torch.equal(w[2], src[BOX + "cls_score.weight"][80])  # background, carried
    assert torch.equal(b[1:], src[BOX + "cls_score.bias"][[DOG, 80]])
    # Box regression (4 rows per class) and mask channels: the mean, no shift.
    for p in ("weight", "bias"):
        d, s = new[BOX + f"bbox_pred.{p}"], src[BOX + f"bbox_pred.{p}"]
        assert_rule(d[:4], mean_of(s.view(80, 4, *s.shape[1:]), VEHICLE))
        assert torch.equal(d[4:8], s[4 * DOG:4 * DOG + 4])
        assert_rule(new[MASK + p][0], mean_of(src[MASK + p], VEHICLE))
        assert torch.equal(new[MASK + p][1], src[MASK + p][DOG])
    actions = {t.key: (t.action, t.copied, t.fresh, t.merged) for t in report.tensors}
    assert actions[BOX + "cls_score.weight"] == ("merged", 2, 0, 1)
    assert actions[BOX + "bbox_pred.weight"] == ("merged", 4, 0, 4)
    assert actions[MASK + "weight"] == ("merged", 1, 0, 1)
    mapping = report.spaces["thing"].mapping
    assert mapping.merged == [("vehicle", ("car", "truck", "bus"), (CAR, TRUCK, BUS))]
    assert mapping.to_dict()["merged"] == [{"target": "vehicle", "sources": ["car", "truck", "bus"],
                                            "source_indices": [CAR, TRUCK, BUS]}]
    assert "| thing   | vehicle        | car [2] + truck [7] + bus [5] (merged)" in \
        report.mapping_table()
    tensors = {t["key"]: t for t in report.to_dict()["tensors"]}
    assert tensors[BOX + "cls_score.weight"]["merged"] == 1
    assert "2 (+1 merged)" in report.table()
    model.load_state_dict(new)


def test_merged_softmax_logit_is_the_documented_lower_bound():
    """mean(z) + log n <= logsumexp(z) over the parts' logits, equal when the parts agree."""
    def head(k):
        torch.manual_seed(k)
        return FastRCNNOutputLayers(ShapeSpec(channels=64), box2box_transform=Box2BoxTransform(
            (10.0, 10.0, 5.0, 5.0)), num_classes=k)

    src = head(80).state_dict()
    target = head(2)
    new, _ = reclass(src, target, MERGE, mode="map")
    target.load_state_dict(new)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    source = head(80)
    source.load_state_dict(src)
    with torch.no_grad():
        parts = source(x)[0][:, VEHICLE].double()
        merged = target(x)[0][:, 0].double()
    torch.testing.assert_close(merged, parts.mean(1) + LOG3, rtol=0, atol=1e-5)
    assert bool((merged <= torch.logsumexp(parts, 1) + 1e-5).all())
    assert bool((torch.logsumexp(parts, 1) - merged > 1e-3).any())  # parts differ: strict
    # Parts that agree: the merged logit is the union's log-sum-exp.
    same = dict(src)
    for k in ("cls_score.weight", "cls_score.bias"):
        same[k] = src[k].clone()
        same[k][VEHICLE] = src[k][CAR]
    new, _ = reclass(same, target, MERGE, mode="map")
    target.load_state_dict(new)
    source.load_state_dict(same)
    with torch.no_grad():
        parts, merged = source(x)[0][:, VEHICLE].double(), target(x)[0][:, 0].double()
    torch.testing.assert_close(merged, torch.logsumexp(parts, 1), rtol=0, atol=1e-5)


def test_merge_retinanet_per_anchor():
    src = source_state(RETINANET)
    model = build_model(RETINANET, 2)
    new, _ = reclass(src, model, MERGE, mode="map")
    for p, shift in (("weight", 0.0), ("bias", LOG3)):
        d, s = new[f"head.cls_score.{p}"], src[f"head.cls_score.{p}"]
        for a in range(9):  # channel a*K + k
            assert_rule(d[a * 2], mean_of(s, [a * 80 + c for c in VEHICLE]) + shift)
            assert torch.equal(d[a * 2 + 1], s[a * 80 + DOG])


def test_merge_every_cascade_stage():
    src = source_state(CASCADE)
    model = build_model(CASCADE, 2)
    new, _ = reclass(src, model, MERGE, mode="map")
    for stage in range(3):
        key = f"{BOX[:-1]}.{stage}.cls_score."
        assert_rule(new[key + "weight"][0], mean_of(src[key + "weight"], VEHICLE))
        assert_rule(new[key + "bias"][0], mean_of(src[key + "bias"], VEHICLE) + LOG3)
        assert new[f"{BOX[:-1]}.{stage}.bbox_pred.weight"] is \
            src[f"{BOX[:-1]}.{stage}.bbox_pred.weight"]  # class-agnostic: untouched


def test_merge_semantic_classes():
    src = source_state(SEMANTIC_FPN)
    model = build_model(SEMANTIC_FPN, stuff_classes=2)
    water = [COCO_STUFF.index(c) for c in ("river", "sea", "water")]
    spec = ClassSpec(COCO_STUFF, ["water", "sky"], class_map=["water=river+sea+water"])
    new, _ = reclass(src, model, {"stuff": spec}, mode="map")
    key = "sem_seg_head.predictor."
    assert_rule(new[key + "weight"][0], mean_of(src[key + "weight"], water))
    assert_rule(new[key + "bias"][0], mean_of(src[key + "bias"], water) + LOG3)
    assert torch.equal(new[key + "weight"][1], src[key + "weight"][COCO_STUFF.index("sky")])


def test_merge_point_rend_rows_and_coarse_logit_columns():
    src = point_rend_state(80)
    model = build_point_rend(2)
    new, _ = reclass(src, model, MERGE, mode="map")
    h = "roi_heads.mask_head.point_head."
    # Coarse logits as input columns: the parts' columns summed.
    fc1, s_fc1 = new[h + "fc1.weight"], src[h + "fc1.weight"]
    assert torch.equal(fc1[:, :256], s_fc1[:, :256])
    assert_rule(fc1[:, 256], s_fc1.double()[:, [256 + c for c in VEHICLE]].sum(1))
    assert torch.equal(fc1[:, 257], s_fc1[:, 256 + DOG])
    # The predictor: mask-logit rows averaged, columns summed, both where both are merged.
    w, s = new[h + "predictor.weight"], src[h + "predictor.weight"].double()
    cols = [256 + c for c in VEHICLE]
    assert_rule(w[0, :256], s[VEHICLE, :256].mean(0))
    assert_rule(w[0, 256], s[VEHICLE][:, cols].sum(1).mean(0))
    assert_rule(w[1, 256], s[DOG, cols].sum(0))
    assert torch.equal(w[1, 257], src[h + "predictor.weight"][DOG, 256 + DOG])
    assert_rule(new[h + "predictor.bias"][0], mean_of(src[h + "predictor.bias"], VEHICLE))
    # The coarse head: blocks of 7x7 mask logits averaged.
    p = "roi_heads.mask_head.coarse_head.prediction.weight"
    assert_rule(new[p][:49], mean_of(src[p].view(80, 49, -1), VEHICLE))
    model.load_state_dict(new)


@pytest.mark.parametrize("class_map, message", [
    (["vehicle=car+truk+bus"], r"^CLASS_MAP merges 'truk' into 'vehicle', but 'truk' is not in "
                               r"MODEL\.RECLASS\.SOURCE_CLASSES\. Did you mean 'truck'\? Every "
                               r"class after '=' must be a source class\.$"),
    (["vehicle=car+car"], r"^CLASS_MAP entry 'vehicle=car\+car' merges an empty or repeated "
                          r"class \('car'\); write each source class once"),
    (["vehicle=car+"], r"merges an empty or repeated class \(''\)"),
])
def test_bad_merge_is_one_error_and_changes_nothing(class_map, message):
    src = source_state(FASTER_RCNN)
    before = src[BOX + "cls_score.weight"].clone()
    with pytest.raises(ClassListError, match=message):
        reclass(src, build_model(FASTER_RCNN, 2),
                thing(target=["vehicle", "dog"], class_map=class_map), mode="map")
    assert torch.equal(src[BOX + "cls_score.weight"], before)


def test_a_class_named_with_a_plus_is_one_class():
    m = reclass(source_state(FASTER_RCNN), build_model(FASTER_RCNN, 1),
                thing(COCO_CLASSES[:79] + ["c++"], ["lang"], ["lang=c++"]), mode="map")[1]
    assert m.spaces["thing"].mapping.source_index == (79,)


# ---------------------------------------------------------------------------------------------
# Combine: several checkpoints (a base model and its copy fine-tuned in the box predictor)
# ---------------------------------------------------------------------------------------------
NOVEL = ["star", "square"]


@pytest.fixture(scope="module")
def base_and_novel():
    """A six-class base model, and a copy of it whose box predictor knows two classes (one of
    them also a base class), as TFA's novel fine-tuning leaves it."""
    base = small_model(6, seed=1).state_dict()
    predictor = small_model(2, seed=2).state_dict()
    novel = dict(base)
    novel.update({k: v for k, v in predictor.items() if k.startswith(BOX)})
    return base, novel


def _combine(base, more, target, **kw):
    model = small_model(len(target), seed=3)
    new, report = combine_state_dicts(
        base, more, model.state_dict(), find_layouts(model),
        classes=thing(SIX, target, kw.pop("class_map", None)), source="base.pth", **kw)
    model.load_state_dict(new)
    return new, report


def test_combine_takes_each_class_from_the_first_checkpoint_that_knows_it(base_and_novel):
    base, novel = base_and_novel
    target = ["circle", "star", "square"]
    new, report = _combine(base, [SourceCheckpoint(novel, {"thing": NOVEL}, "novel.pth")],
                           target)
    for p, block in (("cls_score.weight", 1), ("cls_score.bias", 1), ("bbox_pred.weight", 4),
                     ("bbox_pred.bias", 4)):
        d, b, n = (t[BOX + p].split(block) for t in (new, base, novel))
        assert torch.equal(d[0], b[SIX.index("circle")])
        assert torch.equal(d[1], n[0])  # star: only novel.pth knows it
        assert torch.equal(d[2], b[0])  # square: base.pth is listed first
        if p.startswith("cls_score"):
            assert torch.equal(d[3], b[6])  # background: the first checkpoint's
    # Every tensor that is not a class entry is the first checkpoint's own object.
    assert all(new[k] is base[k] for k in base if not k.startswith(BOX))
    mapping = report.spaces["thing"].mapping
    assert mapping.checkpoint == (0, 1, 0) and mapping.more == (tuple(NOVEL),)
    assert mapping.unused(1) == ["square"]
    table = report.mapping_table()
    assert "| thing   | star           | novel.pth: star [0]" in table
    assert "| thing   | square         | base.pth: square [0]" in table
    assert "novel.pth: square" in table  # not used: base.pth gives it
    assert report.to_dict()["more_sources"] == ["novel.pth"]


def test_combine_with_merge_and_split(base_and_novel):
    base, novel = base_and_novel
    new, report = _combine(
        base, [SourceCheckpoint(novel, {"thing": NOVEL}, "novel.pth")],
        ["polygon", "small star", "big star"],
        class_map=["polygon=square+diamond+hexagon", "small star=star", "big star=star"])
    polygon = [SIX.index(c) for c in ("square", "diamond", "hexagon")]
    w = new[BOX + "cls_score.weight"]
    assert_rule(w[0], mean_of(base[BOX + "cls_score.weight"], polygon))
    assert torch.equal(w[1], novel[BOX + "cls_score.weight"][0])
    assert torch.equal(w[2], novel[BOX + "cls_score.weight"][0])
    assert report.spaces["thing"].mapping.checkpoint == (0, 1, 1)


def test_combine_refuses_checkpoints_whose_other_tensors_differ(base_and_novel):
    base, _ = base_and_novel
    other = small_model(2, seed=4).state_dict()  # trained apart: another backbone
    more = [SourceCheckpoint(other, {"thing": NOVEL}, "other.pth")]
    before = {k: v.clone() for k, v in other.items()}
    with pytest.raises(CombineError, match=r"^Cannot combine base\.pth with other\.pth: \d+ "
                       r"tensors that are not class entries differ \(backbone\.") as info:
        _combine(base, more, ["circle", "star"])
    assert "COMBINE_ALLOW_DIFFERENT_WEIGHTS True" in str(info.value)
    assert "TFA" in str(info.value)
    assert all(torch.equal(other[k], v) for k, v in before.items())
    with captured_logs("d2_reclass") as logs:
        new, _ = _combine(base, more, ["circle", "star"], allow_different_weights=True)
    assert torch.equal(new[BOX + "cls_score.weight"][1], other[BOX + "cls_score.weight"][0])
    assert new["backbone.bottom_up.stem.conv1.weight"] is \
        base["backbone.bottom_up.stem.conv1.weight"]
    assert any("non-class tensors differ" in m and "those of base.pth are used" in m
               for m in logs)


def test_combine_refuses_a_checkpoint_that_gives_nothing(base_and_novel):
    base, novel = base_and_novel
    with pytest.raises(CombineError, match=r"^novel\.pth gives no class to the model: every "
                       r"target class it knows \(square, star\) is taken from a checkpoint "
                       r"listed before it \(base\.pth\)"):
        _combine(base, [SourceCheckpoint(novel, {"thing": NOVEL}, "novel.pth")],
                 ["circle", "square"])


def test_a_merge_across_checkpoints_is_refused(base_and_novel):
    base, novel = base_and_novel
    with pytest.raises(ClassListError, match=r"CLASS_MAP merges 'circle', 'star' into 'thing', "
                       r"but no one checkpoint knows them all \(circle: MODEL\.RECLASS\."
                       r"SOURCE_CLASSES; star: the thing classes of novel\.pth\)"):
        _combine(base, [SourceCheckpoint(novel, {"thing": NOVEL}, "novel.pth")],
                 ["thing", "star"], class_map=["thing=circle+star"])
