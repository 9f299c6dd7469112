"""d2_reclass.engine.keys: state-dict copies keep ``_metadata``; ONLY / RENAME select and rename."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

from d2_reclass.engine.keys import copy_state_dict, select_and_rename
from d2_reclass.errors import ClassListError, ReclassError


class _Versioned(nn.Module):
    """A module that, like PointRend's ConvFCHead, renames keys of files older than version 2."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.seen = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        self.seen.append(local_metadata.get("version"))
        if (local_metadata.get("version") or 0) < 2:
            for k in [k for k in state_dict if k.startswith(prefix + "old_fc.")]:
                state_dict[k.replace("old_fc.", "fc.")] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(backbone=nn.Linear(2, 3), head=_Versioned()))


def test_copy_keeps_a_copy_of_the_metadata():
    state = _model().state_dict()
    copied = copy_state_dict(state)
    assert isinstance(copied, OrderedDict) and list(copied) == list(state)
    assert copied._metadata == state._metadata == OrderedDict(
        [("", {"version": 1}), ("backbone", {"version": 1}), ("head", {"version": 2}),
         ("head.fc", {"version": 1})])
    assert copied._metadata is not state._metadata  # fvcore's prefix strip rewrites it
    assert not hasattr(copy_state_dict({"a": torch.zeros(1)}), "_metadata")


def test_copy_with_items_and_a_module_rename():
    state = _model().state_dict()
    copied = copy_state_dict(state, [("net.head.fc.weight", state["head.fc.weight"])],
                             rename=lambda key: "net." + key)
    assert list(copied) == ["net.head.fc.weight"]
    # The root module is never renamed; every other module is, as its keys are.
    assert copied._metadata == OrderedDict(
        [("", {"version": 1}), ("net.backbone", {"version": 1}), ("net.head", {"version": 2}),
         ("net.head.fc", {"version": 1})])


def test_select_and_rename_keep_the_metadata_the_model_reads():
    """ONLY and RENAME used to make a plain dict: the versioned head then took a current file
    for an old one. With the metadata kept, it sees version 2 and loads as stock."""
    state = _model().state_dict()
    only = select_and_rename(state, only=["head."])
    assert list(only) == ["head.fc.weight", "head.fc.bias"]
    assert only._metadata == state._metadata  # entries of modules not selected are harmless
    model = _model()
    model.load_state_dict(only, strict=False)
    assert model.head.seen == [2]

    wrapped = OrderedDict(("detector." + k, v) for k, v in state.items())
    wrapped._metadata = OrderedDict([("", {"version": 7})] + [
        ("detector." + m if m else "detector", e) for m, e in state._metadata.items()])
    renamed = select_and_rename(wrapped, rename=["detector.="])
    assert list(renamed) == list(state)
    # "detector" (the wrapped model) becomes the root and wins over the wrapper's own entry.
    assert renamed._metadata == state._metadata
    model = _model()
    model.load_state_dict(renamed)
    assert model.head.seen == [2]
    assert torch.equal(model.head.fc.weight, state["head.fc.weight"])


def test_select_and_rename_errors_name_the_key():
    state = _model().state_dict()
    with pytest.raises(ReclassError, match=r"ONLY prefix 'roi_heads\.' matches no checkpoint "
                                           r"key; keys start with \['backbone\.', 'head\.'\]"):
        select_and_rename(state, only=["roi_heads."])
    with pytest.raises(ReclassError, match="RENAME prefix 'detector.' matches no"):
        select_and_rename(state, rename=["detector.="])
    with pytest.raises(ClassListError, match="not of the form 'old_prefix=new_prefix'"):
        select_and_rename(state, rename=["detector."])
