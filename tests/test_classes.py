"""Class lists and name-based class mapping."""
import logging
import re

import pytest
from conftest import COCO_CLASSES, TARGET, TARGET_SOURCE
from d2_fixtures import SIX

from d2_reclass.classes import (
    ClassMapping,
    build_class_mapping,
    check_class_list,
    normalize_class_name,
)
from d2_reclass.errors import ClassListError, ReclassError

IDX = {name: i for i, name in enumerate(COCO_CLASSES)}


def mapping(target, class_map=None, source=COCO_CLASSES, **kw):
    return build_class_mapping(source, target, class_map, **kw)


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["traffic light", "Traffic Light", "traffic_light",
                                  "TRAFFIC-LIGHT", "  traffic   light ", "traffic_-light"])
def test_normalize(name):
    assert normalize_class_name(name) == "traffic light"


def test_names_match_after_normalisation():
    m = mapping(["Traffic_Light", "TEDDY-bear", "hair  drier", "Dog"])
    assert m.source_index == (IDX["traffic light"], IDX["teddy bear"], IDX["hair drier"],
                              IDX["dog"])
    assert m.target == ("Traffic_Light", "TEDDY-bear", "hair  drier", "Dog")  # kept as given


def test_standard_target():
    m = mapping(TARGET)
    assert list(m.source_index) == TARGET_SOURCE
    assert m.kept == [("dog", "dog", IDX["dog"]), ("person", "person", 0)]
    assert m.new == ["gadget"]
    assert len(m.dropped) == 78 and "dog" not in m.dropped and m.dropped[0] == "bicycle"
    assert not m.is_identity and mapping(COCO_CLASSES).is_identity


# ---------------------------------------------------------------------------------------------
# CLASS_MAP
# ---------------------------------------------------------------------------------------------
def test_rename():
    m = mapping(["automobile", "person"], ["automobile=car"])
    assert m.source_index == (IDX["car"], 0)
    assert m.kept[0] == ("automobile", "car", IDX["car"])


def test_rename_takes_precedence_over_name_match():
    m = mapping(["car", "truck"], ["car=truck", "truck = car"])
    assert m.source_index == (IDX["truck"], IDX["car"])
    assert mapping(["car"], {"car": "bus"}).source_index == (IDX["bus"],)  # dict form


def test_rename_is_normalised():
    m = mapping(["Traffic Light"], ["traffic_light=Stop-Sign"])
    assert m.source_index == (IDX["stop sign"],)


def test_declared_new_is_fresh_even_if_the_source_has_it():
    assert mapping(["dog", "person"], ["dog="]).source_index == (None, 0)
    assert mapping(["dog"], {"dog": None}).source_index == (None,)


@pytest.mark.parametrize("entry", ["automobile", "=car", " = car"])
def test_malformed_class_map_entry(entry):
    with pytest.raises(ClassListError, match=r"is not of the form 'target=source'.*'gadget='"):
        mapping(["automobile"], [entry])


def test_class_map_unknown_target_suggests():
    with pytest.raises(ClassListError, match=r"CLASS_MAP names the target class 'dgo', which is "
                                             r"not in MODEL.RECLASS.TARGET_CLASSES\. Did you "
                                             r"mean 'dog'\?"):
        mapping(["dog", "person"], ["dgo=dog"], target_what="MODEL.RECLASS.TARGET_CLASSES")


def test_class_map_unknown_source_suggests():
    with pytest.raises(ClassListError, match=r"CLASS_MAP maps 'automobile' to the source class "
                                             r"'motorcylce', which is not in the COCO classes\. "
                                             r"Did you mean 'motorcycle'\?"):
        mapping(["automobile"], ["automobile=motorcylce"], source_what="the COCO classes")
    with pytest.raises(ClassListError) as info:
        mapping(["automobile"], ["automobile=flux capacitor"])
    assert "Did you mean" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The typo check for new classes
# ---------------------------------------------------------------------------------------------
def test_new_class_one_typo_from_an_unused_source_class():
    with pytest.raises(ClassListError, match=r"names 'persn', which is not in the source "
                                             r"classes\. Did you mean 'person'\? Fix the name, "
                                             r"or declare it new on purpose with CLASS_MAP "
                                             r"'persn='"):
        mapping(["dog", "persn"], target_what="MODEL.RECLASS.TARGET_CLASSES",
                source_what="the source classes")


def test_new_class_declared_on_purpose():
    assert mapping(["dog", "persn"], ["persn="]).source_index == (IDX["dog"], None)


def test_new_class_near_a_used_source_class_is_new():
    # "person" is already taken by a target class: "persons" cannot be its typo.
    assert mapping(["person", "persons"]).source_index == (0, None)


def test_new_class_not_near_anything():
    assert mapping(["gadget", "robot"]).new == ["gadget", "robot"]


def warnings_of(caplog):
    return [(r.name, r.levelname, r.getMessage()) for r in caplog.records]


def test_new_class_of_the_data_two_edits_from_an_unused_source_class_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="d2_reclass.classes"):
        m = mapping(["triangle", "square", "xagon"], source=SIX, source_what="--source-classes",
                    target_what="--classes", known=["xagon", "square"])
    assert m.source_index == (2, 0, None) and m.new == ["xagon"]
    assert m.dropped == ["circle", "diamond", "hexagon", "cross"]
    assert m.close == (("xagon", "hexagon"),)
    assert m.to_dict()["close"] == [{"target": "xagon", "source": "hexagon"}]
    assert warnings_of(caplog) == [(
        "d2_reclass.classes", "WARNING",
        "--classes names 'xagon', which is not in --source-classes, so it gets fresh rows; the "
        "close source class 'hexagon' maps to nothing and what the checkpoint knew about it is "
        "dropped. If they are one class, map it with CLASS_MAP 'xagon=hexagon'; if 'xagon' is "
        "new on purpose, declare it with CLASS_MAP 'xagon='.")]


@pytest.mark.parametrize("new, source", [("circel", "circle"), ("Triangular", "triangle"),
                                         ("dimand", "diamond"), ("crs", "cross")])
def test_close_pairs_down_to_the_warning_cutoff(caplog, new, source):
    # Ratios 0.83, 0.78, 0.77 and exactly the cutoff, 0.75: a class the data names is real.
    with caplog.at_level(logging.WARNING, logger="d2_reclass.classes"):
        m = mapping(["square", new], source=SIX, known=[new.upper()])
    assert m.close == ((new, source),)
    assert len(caplog.records) == 1
    assert f"names {new!r}, which is not in source classes" in caplog.text
    assert f"close source class {source!r}" in caplog.text
    # Named by no data and no checkpoint: a misspelling until declared new.
    with pytest.raises(ClassListError, match=re.escape(
            f"target classes names {new!r}, which is in neither source classes nor the training "
            f"data, while the close name {source!r} is in source classes. Fix the name "
            f"(CLASS_MAP '{new}={source}' maps it), or declare it new on purpose with CLASS_MAP "
            f"'{new}='.")):
        mapping(["square", new], source=SIX)
    assert mapping(["square", new], [f"{new}="], source=SIX).new == [new]


def test_two_edit_typo_is_an_error_unless_declared_new():
    # The row: "sqaure" (two edits from "square", ratio 0.83), named by no dataset.
    with pytest.raises(ClassListError, match="names 'sqaure', which is in neither"):
        mapping(["triangle", "sqaure", "star"], source=SIX, known=["star"])
    m = mapping(["triangle", "sqaure", "star"], ["sqaure="], source=SIX, known=["star"])
    assert m.new == ["sqaure", "star"] and m.close == ()


@pytest.mark.parametrize("target, class_map", [
    (["triangle", "square", "xagon"], ["xagon="]),  # declared new: the fix the warning names
    (["hexagon", "xagon"], None),  # hexagon is kept, so nothing is dropped
    (["triangle", "square", "star"], None),  # not close to anything
    (["hexa", "octagon"], None),  # 0.73 and 0.57 from "hexagon": below the cutoff
    (["cat", "car"], None),  # "car" is kept; "cat" is far from every other class
])
def test_no_close_pair_warning(caplog, target, class_map):
    source = SIX if "car" not in target else COCO_CLASSES
    with caplog.at_level(logging.WARNING, logger="d2_reclass.classes"):
        m = mapping(target, class_map, source=source)
    assert m.close == () and m.to_dict()["close"] == []
    assert caplog.records == []


def test_one_typo_is_still_an_error_not_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="d2_reclass.classes"):
        with pytest.raises(ClassListError, match=r"names 'hexagn', which is not in source "
                                                 r"classes\. Did you mean 'hexagon'\?"):
            mapping(["hexagn"], source=SIX)
    assert caplog.records == []


# ---------------------------------------------------------------------------------------------
# Source without names: map by index
# ---------------------------------------------------------------------------------------------
def test_index_mapping():
    m = build_class_mapping(None, TARGET, ["dog=16", "person=0"], num_source=80)
    assert m.source_index == (16, 0, None)
    assert m.source is None and m.num_source == 80
    assert m.kept == [("dog", "#16", 16), ("person", "#0", 0)]
    assert m.dropped[:2] == ["#1", "#2"] and len(m.dropped) == 78


def test_index_out_of_range():
    with pytest.raises(ClassListError, match=r"'dog' to the source class '80'.*The source has no "
                                             r"class names; name source classes by index 0\.\.79"):
        build_class_mapping(None, TARGET, ["dog=80"], num_source=80)


def test_index_needs_a_nameless_source():
    with pytest.raises(ClassListError, match="source class '16', which is not in"):
        mapping(TARGET, ["dog=16"])


def test_unknown_source_needs_a_count():
    with pytest.raises(ClassListError, match="are unknown; give their names or their count"):
        build_class_mapping(None, TARGET)


# ---------------------------------------------------------------------------------------------
# Malformed lists
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names, dup", [(["cat", "Cat"], "'Cat'"),
                                        (["traffic light", "traffic_light"], "'traffic_light'"),
                                        (["a b", "A-B", "c"], "'A-B'")])
def test_duplicates(names, dup):
    with pytest.raises(ClassListError, match=rf"MODEL.RECLASS.TARGET_CLASSES names the class "
                                             rf"{dup} twice .*each class must appear once"):
        check_class_list(names, "MODEL.RECLASS.TARGET_CLASSES")


def test_empty_list():
    with pytest.raises(ClassListError, match=r"classes.txt is empty; give at least one"):
        check_class_list([], "classes.txt")


@pytest.mark.parametrize("names, index", [(["dog", ""], 1), (["  ", "dog"], 0),
                                          (["dog", None], 1), ([3], 0), (["dog", "_"], 1),
                                          ([" - "], 0)])
def test_empty_or_non_string_names(names, index):
    with pytest.raises(ClassListError, match=rf"SOURCE_CLASSES\[{index}\] is .*; class names must "
                                             rf"be non-empty strings"):
        check_class_list(names, "SOURCE_CLASSES")


def test_errors_name_the_list_at_fault():
    with pytest.raises(ClassListError, match="TARGET_CLASSES names the class"):
        build_class_mapping(COCO_CLASSES, ["dog", "dog"], target_what="TARGET_CLASSES")
    with pytest.raises(ClassListError, match="SOURCE_DATASET is empty"):
        build_class_mapping([], ["dog"], source_what="SOURCE_DATASET")


def test_class_list_error_is_a_reclass_error_and_a_value_error():
    with pytest.raises(ReclassError):
        check_class_list([], "x")
    with pytest.raises(ValueError):
        check_class_list([], "x")


def test_check_class_list_returns_a_tuple():
    assert check_class_list(iter(["a", "b"]), "x") == ("a", "b")


# ---------------------------------------------------------------------------------------------
# ClassMapping
# ---------------------------------------------------------------------------------------------
def test_to_dict():
    d = mapping(TARGET).to_dict()
    assert d["source"] == COCO_CLASSES and d["target"] == TARGET
    assert d["kept"] == [{"target": "dog", "source": "dog", "source_index": IDX["dog"]},
                         {"target": "person", "source": "person", "source_index": 0}]
    assert d["new"] == ["gadget"] and len(d["dropped"]) == 78 and d["close"] == []


def test_same_source_for_two_targets():
    m = ClassMapping(("a", "b"), ("x", "y", "z"), (1, 1, None), 2)
    assert m.kept == [("x", "b", 1), ("y", "b", 1)] and m.dropped == ["a"]
    assert mapping(["car", "automobile"], ["automobile=car"]).source_index == (2, 2)
