"""The probe's pure part: class axes from shapes at two counts, and their layouts."""
import pytest
import torch
from torch import nn

from d2_reclass.layouts import MEAN, MEAN_LOG_COUNT, THING
from d2_reclass.layouts.probe import ClassAxis, class_axes, probed_layouts


def _shapes(k):
    return {
        "cls.weight": (k + 1, 8),  # a = 1, b = 1: a background / no-object row last
        "cls.bias": (k + 1,),
        "focal.weight": (k, 8),  # a = 1, b = 0
        "boxes.weight": (4 * k, 8),  # a = 4: order unknown
        "extra.weight": (k + 2, 8),  # b = 2: where the extra rows sit is unknown
        "weights": (k + 1,),  # a buffer
        "pairs.weight": (k, k),  # two class axes
        "fixed.weight": (4, 8),  # not class-dependent
    }


def test_class_axes_read_a_and_b():
    axes = {(ax.key, ax.axis): ax for ax in class_axes(_shapes(5), _shapes(8), 5, 8,
                                                        {"weights"}, config_key="KEY")}
    assert sorted(axes) == sorted([("cls.weight", 0), ("cls.bias", 0), ("focal.weight", 0),
                                   ("boxes.weight", 0), ("extra.weight", 0), ("weights", 0),
                                   ("pairs.weight", 0), ("pairs.weight", 1)])
    assert (axes["cls.weight", 0].a, axes["cls.weight", 0].b) == (1, 1)
    assert (axes["boxes.weight", 0].a, axes["boxes.weight", 0].b) == (4, 0)
    assert axes["weights", 0].buffer and not axes["cls.weight", 0].buffer
    assert [ax.by_name for ax in (axes["cls.weight", 0], axes["boxes.weight", 0],
                                  axes["extra.weight", 0])] == [True, False, False]
    assert axes["focal.weight", 0].config_key == "KEY"


def test_class_axes_ignore_shapes_that_do_not_follow_a_count():
    # A length that shrinks as K grows, or grows by less than one entry per class.
    assert class_axes({"x": (10,), "y": (7,)}, {"x": (4,), "y": (8,)}, 5, 8, set()) == []
    with pytest.raises(ValueError, match="two different class counts"):
        class_axes({}, {}, 5, 5, set())


class _Model(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.cls = nn.Linear(8, k + 1)
        self.focal = nn.Linear(8, k)
        nn.init.constant_(self.focal.bias, -4.5)
        self.boxes = nn.Linear(8, 4 * k)
        self.embed = nn.Embedding(k, 8)
        self.register_buffer("weights", torch.ones(k + 1))
        self.alias = self.focal


def test_probed_layouts_inits_rules_and_shared_names():
    model = _Model(3)
    axes = class_axes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                      {k: tuple(v.shape) for k, v in _Model(6).state_dict().items()},
                      3, 6, {"weights"}, config_key="KEY")
    layouts = {lay.key: lay for lay in probed_layouts(axes, model, {"KEY": 3})}
    cls = layouts["cls.weight"]
    assert (cls.num_classes, cls.background, cls.opaque, cls.space) == (3, True, False, THING)
    assert cls.init.kind == "uniform" and cls.init.value == pytest.approx(8 ** -0.5)
    assert layouts["cls.bias"].merge == MEAN_LOG_COUNT and cls.merge == MEAN
    assert layouts["focal.bias"].init.kind == "constant"
    assert layouts["focal.bias"].init.value == -4.5
    assert layouts["boxes.weight"].opaque and layouts["boxes.weight"].block == 4
    assert layouts["embed.weight"].init.kind == "normal" and layouts["embed.weight"].init.value == 1
    assert layouts["weights"].keep_model and not layouts["weights"].opaque
    assert layouts["alias.weight"].seed_key == "focal.weight"
    assert layouts["focal.weight"].seed_key == ""
    assert probed_layouts([ClassAxis("cls.weight", 0, 1, 1, False, "OTHER")], model,
                          {"KEY": 3}) == []
