"""The probe: projects with no registered layouts, read from their own models (issue 22).

The models are ``tests/probe_models.py``'s: DETR's and SparseR-CNN / DINO's class-tensor
conventions at a tiny size, each with its own NUM_CLASSES key, which nothing in d2_reclass
knows. Only the integration lines are used (``add_reclass_config``, ``prepare_reclass_config``
/ ``ReclassCheckpointer.from_config``), as a user of such a project would.
"""
import math

import pytest
import torch
from d2_fixtures import captured_logs
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling import build_model
from omegaconf import OmegaConf
from probe_models import (
    DETR_KEY,
    PRIOR,
    SPARSE_KEY,
    LazyDetector,
    SparseLike,
    _Criterion,
    probe_cfg,
)

from d2_reclass import (
    CLASSES_KEY,
    ClassListError,
    ClassMismatchError,
    ReclassCheckpointer,
    ReclassOptions,
    check_num_classes,
    find_layouts,
    prepare_reclass_config,
)
from d2_reclass.integration.lazy import apply_lazy_num_classes
from d2_reclass.integration.probe import (
    attach_lazy_probe,
    attach_probe,
    lazy_num_classes_fields,
    probed_num_classes_keys,
    unknown_num_classes_keys,
)
from d2_reclass.layouts import THING

FIVE = ["cat", "dog", "bird", "fish", "cow"]
#: A subset of FIVE in another order, and one new class.
TARGET = ["fish", "cat", "zebra"]
SAME_COUNT = ["dog", "cat", "bird", "fish", "cow"]
LOGGERS = ("d2_reclass", "fvcore.common.checkpoint")


def _source(arch: str, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    model = build_model(probe_cfg(arch, len(FIVE)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _target(arch: str, classes, mode: str = "auto"):
    """A model built through the integration lines for ``classes``, and its checkpointer."""
    cfg = probe_cfg(arch, len(FIVE), ["MODEL.RECLASS.TARGET_CLASSES", classes,
                                      "MODEL.RECLASS.MODE", mode])
    cfg, _ = prepare_reclass_config(cfg)
    torch.manual_seed(7)
    model = build_model(cfg)
    return cfg, model, ReclassCheckpointer.from_config(cfg, model)


def _load(checkpointer, state, tmp_path, names=FIVE):
    path = str(tmp_path / "source.pth")
    torch.save({"model": state, CLASSES_KEY: {"thing_classes": list(names)}}, path)
    with captured_logs(*LOGGERS) as logs:
        checkpointer.load(path)
    return logs


def test_known_configs_are_not_probed():
    from d2_fixtures import small_cfg

    assert unknown_num_classes_keys(small_cfg(3)) == []
    assert probed_num_classes_keys(small_cfg(3)) is None


def test_auto_num_classes_sets_the_projects_own_key():
    cfg = probe_cfg("ProbeDetrLike", 80, ["MODEL.RECLASS.TARGET_CLASSES", TARGET])
    assert probed_num_classes_keys(cfg) == [(DETR_KEY, THING)]
    sparse = probe_cfg("ProbeSparseLike", 80)
    assert probed_num_classes_keys(sparse) == [(SPARSE_KEY, THING)]
    out, changes = prepare_reclass_config(cfg)
    assert out.MODEL.PROBE_DETR.NUM_CLASSES == 3
    assert [(c.key, c.old, c.new) for c in changes] == [(DETR_KEY, 80, 3)]
    # The unused detectron2 keys are not touched: nothing in this model reads them.
    assert out.MODEL.ROI_HEADS.NUM_CLASSES == cfg.MODEL.ROI_HEADS.NUM_CLASSES


def test_a_model_left_at_another_count_is_one_error_naming_the_key():
    cfg = probe_cfg("ProbeDetrLike", 80, ["MODEL.RECLASS.TARGET_CLASSES", TARGET,
                                          "MODEL.RECLASS.AUTO_NUM_CLASSES", False])
    cfg, _ = prepare_reclass_config(cfg)
    model = attach_probe(build_model(cfg), cfg)
    with pytest.raises(ClassListError, match=f"80 classes at detr.class_embed.*Set {DETR_KEY} 3"):
        check_num_classes(model, TARGET)


def test_detr_like_rows_follow_names_no_object_kept_new_row_at_linear_init(tmp_path):
    source = _source("ProbeDetrLike")
    _, model, checkpointer = _target("ProbeDetrLike", TARGET)
    fresh_weight = model.state_dict()["criterion.empty_weight"].clone()
    _load(checkpointer, source, tmp_path)
    state = model.state_dict()
    w, b = state["detr.class_embed.weight"], state["detr.class_embed.bias"]
    src_w, src_b = source["detr.class_embed.weight"], source["detr.class_embed.bias"]
    assert w.shape == (4, 8)
    assert torch.equal(w[[0, 1, 3]], src_w[[3, 0, 5]])  # fish, cat, then no-object (last)
    assert torch.equal(b[[0, 1, 3]], src_b[[3, 0, 5]])
    bound = 1 / math.sqrt(8)  # nn.Linear's default: U(+-1/sqrt(in_features))
    assert w[2].abs().max() <= bound and not any(torch.equal(w[2], r) for r in src_w)
    assert torch.equal(state["criterion.empty_weight"], fresh_weight)  # the model's own buffer
    for key in ("detr.input_proj.weight", "detr.bbox_embed.bias"):
        assert torch.equal(state[key], source[key])  # not a class tensor: bit for bit
    actions = {t.key: t.action for t in checkpointer.report.tensors}
    assert actions["detr.class_embed.weight"] == "mapped"
    assert actions["criterion.empty_weight"] == "model's own"


def test_same_count_reordered_rows_follow_names(tmp_path):
    source = _source("ProbeDetrLike")
    _, model, checkpointer = _target("ProbeDetrLike", SAME_COUNT)
    _load(checkpointer, source, tmp_path)
    w = model.state_dict()["detr.class_embed.weight"]
    src = source["detr.class_embed.weight"]
    assert torch.equal(w, src[[1, 0, 2, 3, 4, 5]])


def test_same_count_reordered_strict_raises(tmp_path):
    source = _source("ProbeDetrLike")
    _, model, checkpointer = _target("ProbeDetrLike", SAME_COUNT, mode="strict")
    before = model.state_dict()["detr.class_embed.weight"].clone()
    with pytest.raises(ClassMismatchError, match="detr.class_embed.weight"):
        _load(checkpointer, source, tmp_path)
    assert torch.equal(model.state_dict()["detr.class_embed.weight"], before)


def test_sparse_like_heads_prior_bias_label_enc_and_shared_prefixes(tmp_path):
    source = _source("ProbeSparseLike")
    _, model, checkpointer = _target("ProbeSparseLike", TARGET)
    _load(checkpointer, source, tmp_path)
    state = model.state_dict()
    for i in range(2):
        key = f"head.head_series.{i}.class_logits"
        assert torch.equal(state[f"{key}.weight"][:2], source[f"{key}.weight"][[3, 0]])
        assert state[f"{key}.bias"][2].item() == pytest.approx(PRIOR)  # zebra: the focal prior
    # label_enc: exactly K rows, row c = class c; the new one N(0, 1).
    assert torch.equal(state["label_enc.weight"][:2], source["label_enc.weight"][[3, 0]])
    # One module under two prefixes: both names load identical values, new rows included.
    refitted = {t.key for t in checkpointer.report.tensors}
    for i in range(2):
        own, alias = f"class_embed.{i}.weight", f"decoder.class_embed.{i}.weight"
        assert torch.equal(state[own], state[alias])
        assert {own, alias} <= refitted


def test_block_head_of_unknown_order_auto_reinitialises_and_says_so(tmp_path):
    source = _source("ProbeSparseLike")
    _, model, checkpointer = _target("ProbeSparseLike", SAME_COUNT)
    logs = _load(checkpointer, source, tmp_path)
    key = "head.head_series.0.class_boxes.weight"
    new = model.state_dict()[key]
    assert new.shape == source[key].shape and not torch.equal(new, source[key])
    assert new.abs().max() <= 1 / math.sqrt(8)  # the Linear's own init
    action = checkpointer.report.tensor(key)
    assert action.action == "fresh" and "order unknown" in action.layout
    assert any(key in m and "re-initialised" in m for m in logs)
    # The class_logits next to it follow the names.
    logits = "head.head_series.0.class_logits.weight"
    assert torch.equal(model.state_dict()[logits], source[logits][[1, 0, 2, 3, 4]])


def test_block_head_of_unknown_order_strict_raises_naming_it_and_the_recipe(tmp_path):
    source = _source("ProbeSparseLike")
    _, _, checkpointer = _target("ProbeSparseLike", SAME_COUNT, mode="strict")
    with pytest.raises(ClassMismatchError,
                       match=r"(?s)class_boxes.weight.*register its layout"):
        _load(checkpointer, source, tmp_path)


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_bare_checkpointer_same_count_other_names_never_silent(tmp_path, mode):
    # No config: nothing can rebuild the model, so no probe; the guard still speaks.
    source = _source("ProbeDetrLike")
    torch.manual_seed(3)
    model = build_model(probe_cfg("ProbeDetrLike", len(FIVE)))
    assert find_layouts(model) == []
    checkpointer = ReclassCheckpointer(model, reclass=ReclassOptions(
        mode=mode, target_classes=SAME_COUNT))
    if mode == "strict":
        with pytest.raises(ClassMismatchError, match="detr.class_embed.weight"):
            _load(checkpointer, source, tmp_path)
        return
    logs = _load(checkpointer, source, tmp_path)
    assert any("detr.class_embed.weight" in m and "register_layout" in m for m in logs)


def test_lazy_config_fields_found_set_and_probed():
    cfg = OmegaConf.create({"model": L(LazyDetector)(
        head=L(SparseLike)(num_classes=5),
        criterion=L(_Criterion)(num_classes="${..head.num_classes}")),
        "reclass": {"target_classes": TARGET}})
    # The criterion's interpolation follows the head: one field.
    assert lazy_num_classes_fields(cfg) == {"model.head.num_classes": 5}
    assert apply_lazy_num_classes(cfg) == [("model.head.num_classes", 5, 3)]
    model = attach_lazy_probe(instantiate(cfg.model), cfg)
    layouts = {lay.key: lay for lay in find_layouts(model)}
    assert layouts["head.label_enc.weight"].num_classes == 3
    assert layouts["criterion.empty_weight"].keep_model
    assert layouts["head.head.head_series.0.class_boxes.weight"].opaque
    assert layouts["head.decoder.class_embed.0.bias"].seed_key == "head.class_embed.0.bias"
