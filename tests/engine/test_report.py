"""The reclass report: per tensor and per class space, as a log table and as JSON."""
import dataclasses
import json

import pytest
import torch
from conftest import COCO_CLASSES, TARGET, thing
from d2_fixtures import SIX, captured_logs
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from torch import nn

from d2_reclass.classes import normalize_class_name
from d2_reclass.engine.surgery import ClassSpec, reclass_state_dict
from d2_reclass.layouts import find_layouts

DOG = COCO_CLASSES.index("dog")


class TwoHeads(nn.Module):
    """A two-stage box predictor and a RetinaNet head, small enough to build in milliseconds."""

    def __init__(self, num_classes, num_anchors=9):
        super().__init__()
        torch.manual_seed(num_classes + num_anchors)
        self.box_predictor = FastRCNNOutputLayers(
            ShapeSpec(channels=16), box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
            num_classes=num_classes)
        self.retina = RetinaNetHead(input_shape=[ShapeSpec(channels=8)], num_classes=num_classes,
                                    num_anchors=num_anchors, conv_dims=[8])


@pytest.fixture(scope="module")
def report():
    """COCO -> TARGET on the box predictor; RetinaNet's anchor count changes (not a class)."""
    model = TwoHeads(3, num_anchors=3)
    _, rep = reclass_state_dict(TwoHeads(80).state_dict(), model.state_dict(),
                                find_layouts(model), classes=thing(), mode="map", seed=7,
                                source="model_final.pth")
    return rep


def test_json_round_trip(report, tmp_path):
    text = report.to_json()
    d = json.loads(text)
    assert (d["source"], d["mode"], d["seed"]) == ("model_final.pth", "map", 7)
    space = d["spaces"]["thing"]
    assert (space["space"], space["resolution"], space["num_source"], space["num_target"]) == \
        ("thing", "map", 80, 3)
    assert space["source_from"] == "MODEL.RECLASS.SOURCE_CLASSES"  # no name given: the key
    m = space["mapping"]
    assert m["source"] == COCO_CLASSES and m["target"] == TARGET
    assert m["kept"] == [{"target": "dog", "source": "dog", "source_index": DOG},
                         {"target": "person", "source": "person", "source_index": 0}]
    assert m["new"] == ["gadget"] and len(m["dropped"]) == 78 and m["close"] == []
    tensors = {t["key"]: t for t in d["tensors"]}
    assert set(tensors) == {"box_predictor.cls_score.weight", "box_predictor.cls_score.bias",
                            "box_predictor.bbox_pred.weight", "box_predictor.bbox_pred.bias"}
    assert tensors["box_predictor.cls_score.weight"] == {
        "key": "box_predictor.cls_score.weight", "space": "thing",
        "checkpoint_shape": [81, 16], "model_shape": [4, 16], "action": "mapped",
        "copied": 3, "fresh": 1, "layout": "softmax + background"}
    assert tensors["box_predictor.bbox_pred.bias"]["copied"] == 8
    assert tensors["box_predictor.bbox_pred.bias"]["fresh"] == 4
    mismatches = {t["key"]: t for t in d["mismatches"]}
    assert set(mismatches) == {"retina.cls_score.weight", "retina.cls_score.bias",
                               "retina.bbox_pred.weight", "retina.bbox_pred.bias"}
    # The box regressor's rows follow the anchors, and no class layout claims it.
    assert mismatches["retina.bbox_pred.bias"] == {
        "key": "retina.bbox_pred.bias", "space": "", "checkpoint_shape": [36],
        "model_shape": [12], "action": "skipped", "copied": 0, "fresh": 0,
        "layout": "not recognised"}
    assert mismatches["retina.cls_score.bias"]["action"] == "skipped"
    assert mismatches["retina.cls_score.bias"]["checkpoint_shape"] == [720]
    assert mismatches["retina.cls_score.bias"]["model_shape"] == [9]
    # to_dict is the same data; to_json(path) writes the same text.
    assert json.loads(json.dumps(report.to_dict())) == d
    path = tmp_path / "reclass.json"
    assert report.to_json(str(path)) == text
    assert path.read_text() == text + "\n"


def test_table(report):
    table = report.table()
    for t in report.tensors + report.mismatches:
        assert t.key in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    assert rows["box_predictor.cls_score.weight"] == ["(81, 16)", "(4, 16)", "mapped", "3", "1",
                                                      "softmax + background"]
    assert rows["retina.cls_score.weight"][2:4] == ["skipped", "0"]
    assert rows["retina.cls_score.bias"][-1] == "not a class change"
    header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert header == ["tensor", "checkpoint", "model", "action", "copied", "fresh", "layout"]


def test_mapping_table(report):
    text = report.mapping_table()
    assert "| thing   | dog            | dog [16]" in text
    assert "| thing   | person         | person [0]" in text
    assert "| thing   | gadget         | fresh" in text
    assert "(78 dropped)" in text and "bicycle, car, motorcycle" in text and ", ..." in text


@pytest.mark.parametrize("inits, origin, count", [
    ([("imprint", "dog")], "new: imprint (relative dog)", "1 new class,"),
    ([("relative", "person")], "new: relative (relative person)", "1 new class,"),
    ([("head", None)], "fresh", "1 new class,"),  # a fallback to the head's init
])
def test_mapping_table_agrees_with_the_new_class_table(report, inits, origin, count):
    from d2_reclass.new_classes import NewClassInit, NewClassReport

    rep = dataclasses.replace(report, new_classes=NewClassReport("auto", 16, 7, classes=[
        NewClassInit("gadget", 2, method, relative=relative) for method, relative in inits]))
    text = str(rep)
    assert f"| thing   | gadget         | {origin}" in rep.mapping_table()
    assert f"NEW_CLASS_INIT auto: {count} 0 images read" in text
    new_rows = text.split("| new class")[1]
    assert f"| gadget      | {inits[0][0]}" in new_rows
    assert "| thing   | gadget         | fresh" in report.mapping_table()  # no NEW_CLASS_INIT


def test_two_new_classes_are_counted_in_the_plural():
    from d2_reclass.new_classes import NewClassInit, NewClassReport

    two = NewClassReport("imprint", 16, 0, classes=[NewClassInit("a", 0, "imprint"),
                                                    NewClassInit("b", 1, "imprint")])
    assert str(two).startswith("NEW_CLASS_INIT imprint: 2 new classes, 0 images read")


def test_summary_and_str(report):
    assert report.summary() == ("mode=map seed=7; thing: map (80 -> 3 classes); 2 tensors of "
                                "another shape than the model's not recognised (skipped)")
    assert [t.key for t in report.unrecognised] == ["retina.bbox_pred.weight",
                                                    "retina.bbox_pred.bias"]
    text = str(report)
    assert text.startswith(report.summary() + "\nthing source class names: "
                           "MODEL.RECLASS.SOURCE_CLASSES\n")
    assert report.mapping_table() in text and report.table() in text
    assert report.changed


def test_tensor_lookup(report):
    assert report.tensor("box_predictor.bbox_pred.weight").fresh == 4
    assert report.tensor("retina.cls_score.weight").action == "skipped"
    with pytest.raises(KeyError, match="backbone.stem.conv1.weight is not in this report"):
        report.tensor("backbone.stem.conv1.weight")


def test_unchanged_report():
    model = TwoHeads(80)
    _, rep = reclass_state_dict(model.state_dict(), model.state_dict(), find_layouts(model),
                                classes=thing(COCO_CLASSES, COCO_CLASSES))
    assert not rep.changed and rep.tensors == [] and rep.mismatches == []
    assert str(rep) == "mode=auto seed=0; thing: unchanged (80 -> 80 classes)"
    d = json.loads(rep.to_json())
    assert d["spaces"]["thing"]["resolution"] == "unchanged"
    assert d["tensors"] == [] and d["mismatches"] == []


def test_no_class_tensors():
    model = nn.Linear(2, 2)
    _, rep = reclass_state_dict(model.state_dict(), model.state_dict(), find_layouts(model))
    assert rep.summary() == "mode=auto seed=0; no class-dependent tensors"
    assert json.loads(rep.to_json())["spaces"] == {}


def test_reinit_report_names_index_classes():
    model = TwoHeads(3)
    _, rep = reclass_state_dict(TwoHeads(80).state_dict(), model.state_dict(),
                                find_layouts(model), classes={"thing": ClassSpec()})
    d = json.loads(rep.to_json())["spaces"]["thing"]
    assert d["resolution"] == "reinit"
    assert d["mapping"]["source"] is None and d["source_from"] is None
    assert d["mapping"]["target"] == d["mapping"]["new"] == ["#0", "#1", "#2"]
    assert "| thing   | #0             | fresh" in rep.mapping_table()
    actions = {t.key: t.action for t in rep.tensors}
    assert actions["box_predictor.bbox_pred.weight"] == "fresh"
    assert actions["retina.cls_score.weight"] == "fresh"
    assert actions["box_predictor.cls_score.weight"] == "fresh"  # background still carried


def test_close_names_and_dropped_classes_are_reported():
    """A new class close to a dropped one is flagged in the JSON and the table, and warned."""
    model = TwoHeads(3)
    spec = ClassSpec(SIX, ["triangle", "square", "xagon"], source_what="--source-classes",
                     target_what="--classes", known=["xagon"])
    # Captured at the package's logger: once an earlier test has set up detectron2's logging
    # (default_setup), d2_reclass's lines go to detectron2's handlers, not to pytest's caplog.
    with captured_logs("d2_reclass") as logs:
        _, rep = reclass_state_dict(TwoHeads(6).state_dict(), model.state_dict(),
                                    find_layouts(model), classes={"thing": spec})
    space = json.loads(rep.to_json())["spaces"]["thing"]
    assert (space["resolution"], space["source_from"]) == ("map", "--source-classes")
    assert space["mapping"]["dropped"] == ["circle", "diamond", "hexagon", "cross"]
    assert space["mapping"]["close"] == [{"target": "xagon", "source": "hexagon"}]
    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in rep.mapping_table().splitlines()[2:]]
    assert rows == [["thing", "triangle", "triangle [2]"], ["thing", "square", "square [0]"],
                    ["thing", "xagon", "fresh (close to dropped 'hexagon')"],
                    ["thing", "(4 dropped)", "circle, diamond, hexagon, cross"]]
    assert str(rep).splitlines()[1] == "thing source class names: --source-classes"
    assert any("the close source class 'hexagon' maps to nothing" in m for m in logs)


# ---------------------------------------------------------------------------------------------
# The log at LVIS scale: one screen, whatever the number of classes
# ---------------------------------------------------------------------------------------------
LVIS = list(MetadataCatalog.get("lvis_v1_train").thing_classes)


def _box_report(source, target, class_map=None):
    def predictor(k):
        torch.manual_seed(k)
        return FastRCNNOutputLayers(ShapeSpec(channels=4), num_classes=k,
                                    box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)))

    model = predictor(len(target))
    _, rep = reclass_state_dict(predictor(len(source)).state_dict(), model.state_dict(),
                                find_layouts(model), classes=thing(source, target, class_map),
                                mode="map", source="lvis.pth")
    return rep


def _rows(table: str):
    return [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]


def test_a_1203_class_reorder_logs_counts_and_the_first_rows_of_each_kind():
    rep = _box_report(LVIS, LVIS[::-1])
    text = rep.log_text("output/reclass_report.json")
    mapping = rep.mapping_summary("output/reclass_report.json")
    assert mapping in text and rep.table() in text
    lines = mapping.splitlines()
    # LVIS's middle class (601 of 0..1202) keeps its place; every other one moves.
    assert lines[0] == "thing: 1 kept, 1202 reordered, 0 merged, 0 new, 0 dropped"
    assert lines[1] == ("The first 5 rows of each kind (1203 rows in all; every row is in "
                        "output/reclass_report.json):")
    assert _rows("\n".join(lines[2:])) == [
        ["thing", LVIS[601], f"{LVIS[601]} [601]"],
        *[["thing", LVIS[1202 - j], f"{LVIS[1202 - j]} [{1202 - j}]"] for j in range(5)],
        ["thing", "...", "1197 more reordered"]]
    assert len(text.splitlines()) < 30  # one screen, with the tensor table
    assert len(rep.mapping_table().splitlines()) == 2 + 1203  # every row, when asked for


def test_an_expansion_to_1203_classes_logs_new_and_moved_classes():
    coco = {normalize_class_name(c) for c in COCO_CLASSES}
    new = [c for c in LVIS if normalize_class_name(c) not in coco][:1123]
    target = sorted(COCO_CLASSES + new)
    rep = _box_report(COCO_CLASSES, target)
    lines = rep.mapping_summary().splitlines()
    assert lines[0] == "thing: 0 kept, 80 reordered, 0 merged, 1123 new, 0 dropped"
    assert lines[1].endswith("(1203 rows in all; every row: ReclassReport.mapping_table(), or "
                             "to_json()):")
    rows = _rows("\n".join(lines[2:]))
    assert rows[5] == ["thing", "...", "75 more reordered"]
    assert rows[6:] == [["thing", t, "fresh"] for t in sorted(new)[:5]] + [
        ["thing", "...", "1118 more new"]]


def test_dropped_and_merged_rows_are_counted_as_classes():
    rep = _box_report(LVIS, LVIS[:600] + ["both", "newthing"],
                      [f"both={LVIS[700]}+{LVIS[701]}", "newthing="])
    lines = rep.mapping_summary().splitlines()
    assert lines[0] == "thing: 600 kept, 0 reordered, 1 merged, 1 new, 601 dropped"
    rows = _rows("\n".join(lines[2:]))
    assert rows[5:] == [
        ["thing", "...", "595 more kept"],
        ["thing", "both", f"{LVIS[700]} [700] + {LVIS[701]} [701] (merged)"],
        ["thing", "newthing", "fresh"],
        ["thing", "(601 dropped)", ", ".join(LVIS[600:608]) + ", ..."]]


def test_up_to_30_rows_the_log_shows_the_whole_table(report):
    assert report.mapping_summary("x.json") == report.mapping_table()
    assert str(report) == report.log_text() == "\n".join([
        report.summary(), "thing source class names: MODEL.RECLASS.SOURCE_CLASSES",
        report.mapping_table(), report.table()])


def test_the_new_class_table_is_bounded_too():
    from d2_reclass.new_classes import NewClassInit, NewClassReport

    classes = [NewClassInit(f"c{i}", i, "imprint" if i % 4 else "head", relative="dog",
                            reason="r") for i in range(40)]
    rep = NewClassReport("imprint", 2, 0, classes=classes, images_read=80)
    text = rep.log_text("out/reclass_report.json")
    lines = text.splitlines()
    assert lines[0].endswith("loading the dataset dicts); 10 head, 30 imprint")
    assert lines[1] == ("The first 5 classes of each init (every class in "
                        "out/reclass_report.json (new_classes)):")
    assert [r[0] for r in _rows("\n".join(lines[2:]))] == \
        ["c0", "c4", "c8", "c12", "c16", "c1", "c2", "c3", "c5", "c6"]
    small = NewClassReport("imprint", 2, 0, classes=classes[:3])
    assert str(small) == small.log_text() == small.log_text("x") and \
        len(_rows(str(small).split("\n", 1)[1])) == 3
