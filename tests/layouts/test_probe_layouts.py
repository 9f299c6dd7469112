"""The probe's pure part: class axes from shapes at two counts, and their layouts."""
import pytest
import torch
from torch import nn

from d2_reclass.layouts import MEAN, MEAN_LOG_COUNT, THING
from d2_reclass.layouts.probe import ClassAxis, fit_class_axes, probe_counts, probed_layouts


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
    builds = [(_shapes(k), {"KEY": k}) for k in (5, 8)]
    axes = {(ax.key, ax.axis): ax for ax in fit_class_axes(builds, {"weights"})}
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
    builds = [({"x": (10,), "y": (7,)}, {"K": 5}), ({"x": (4,), "y": (8,)}, {"K": 8})]
    assert fit_class_axes(builds, set()) == []
    # Two builds at one count tell nothing.
    assert fit_class_axes([({"x": (5,)}, {"K": 5}), ({"x": (6,)}, {"K": 5})], set()) == []


def test_three_builds_tell_which_key_sizes_each_axis():
    counts = {"A": 4, "B": 4, "C": 2}
    moved = probe_counts(counts)
    assert moved == [{"A": 7, "B": 9, "C": 9}, {"A": 8, "B": 10, "C": 10}]

    def shapes(c):  # x: 5*A; y: 3*B + 1; z: C; w: fixed
        return {"x": (5 * c["A"],), "y": (3 * c["B"] + 1, 2), "z": (c["C"],), "w": (7,)}

    axes = fit_class_axes([(shapes(c), c) for c in [counts, *moved]], set(),
                          {"C": "stuff"})
    assert [(ax.key, ax.config_key, ax.a, ax.b, ax.space) for ax in axes] == [
        ("x", "A", 5, 0, "thing"), ("y", "B", 3, 1, "thing"), ("z", "C", 1, 0, "stuff")]


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
    axes = fit_class_axes([({k: tuple(v.shape) for k, v in m.state_dict().items()}, {"KEY": k})
                           for m, k in ((model, 3), (_Model(6), 6))], {"weights"})
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
