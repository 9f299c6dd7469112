"""The last guard of a same-count load: tensors no layout claims that may be class heads."""
import torch

from d2_reclass import ClassSpec
from d2_reclass.engine.unclaimed import unclaimed_class_tensors, unclaimed_message
from d2_reclass.fresh import ZERO
from d2_reclass.layouts import STUFF, THING, ClassLayout

NAMES = ["a", "b", "c"]
STATE = {"head.weight": torch.zeros(4, 8), "head.bias": torch.zeros(3), "proj.weight":
         torch.zeros(8, 8), "steps": torch.zeros(3, dtype=torch.long)}


def _spec(source, target=NAMES):
    return {THING: ClassSpec(source, target)}


def test_candidates_need_other_names_at_the_same_count():
    assert unclaimed_class_tensors(STATE, STATE, [], _spec(["b", "a", "c"])) == [
        "head.weight", "head.bias"]  # K + 1 and K rows; not 8 rows, not integer tensors
    assert unclaimed_class_tensors(STATE, STATE, [], _spec(NAMES)) == []
    assert unclaimed_class_tensors(STATE, STATE, [], _spec(["a", "b"])) == []
    assert unclaimed_class_tensors(STATE, STATE, [], _spec(None)) == []


def test_a_model_whose_thing_heads_are_known_is_left_to_the_engine():
    thing = [ClassLayout("other.weight", THING, 3, ZERO)]
    assert unclaimed_class_tensors(STATE, STATE, thing, _spec(["b", "a", "c"])) == []
    stuff = [ClassLayout("head.weight", STUFF, 3, ZERO)]
    assert unclaimed_class_tensors(STATE, STATE, stuff, _spec(["b", "a", "c"])) == ["head.bias"]


def test_message_names_tensors_and_the_fix():
    text = unclaimed_message(["head.weight"], _spec(["b", "a", "c"])[THING], "x.pth", True)
    assert text.startswith("MODEL.RECLASS.MODE is 'strict', and x.pth")
    assert "head.weight" in text and "register_layout" in text
    assert unclaimed_message(["head.weight"], _spec(["b", "a", "c"])[THING], "x.pth",
                             False).endswith("They are loaded as they are.")
