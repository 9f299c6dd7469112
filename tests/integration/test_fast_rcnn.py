"""ReclassFastRCNNOutputLayers: class names, class-aware load_state_dict, in-memory reclass."""
import pytest
import torch
from d2_fixtures import SIX, THREE, small_cfg, small_model
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from d2_reclass import (
    ClassListError,
    ReclassCheckpointer,
    ReclassFastRCNNOutputLayers,
    ReclassOptions,
    reclass_model,
    use_reclass_box_predictors,
)

PRED = "roi_heads.box_predictor."


def _reclass_model(num_classes, names, *, seed=0, mask=False, opts=()):
    cfg = small_cfg(num_classes, mask=mask, opts=list(opts) + [
        "MODEL.RECLASS.TARGET_CLASSES", names])
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    use_reclass_box_predictors(model, cfg)
    return model


def test_from_config_reads_class_names_and_reclass_keys():
    cfg = small_cfg(3, opts=["MODEL.RECLASS.TARGET_CLASSES", THREE, "MODEL.RECLASS.SEED", 7,
                             "MODEL.RECLASS.SOURCE_CLASSES", SIX])
    pred = ReclassFastRCNNOutputLayers(cfg, ShapeSpec(channels=256))
    assert pred.class_names == tuple(THREE)
    assert pred.source_class_names == tuple(SIX)
    assert pred.reclass_seed == 7 and pred.num_classes == 3


def test_adopt_keeps_parameters_and_project_subclass_methods():
    class ProjectPredictor(FastRCNNOutputLayers):
        def project_method(self):
            return "kept"

    cfg = small_cfg(3)
    pred = ProjectPredictor(cfg, ShapeSpec(channels=256))
    weight = pred.cls_score.weight
    ReclassFastRCNNOutputLayers.adopt(pred, class_names=THREE)
    assert isinstance(pred, ReclassFastRCNNOutputLayers) and isinstance(pred, ProjectPredictor)
    assert pred.project_method() == "kept" and pred.cls_score.weight is weight
    assert pred.class_names == tuple(THREE)


def test_cascade_stages_are_all_swapped():
    model = _reclass_model(3, THREE, opts=["MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
                                           "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True])
    preds = [m for m in model.modules() if isinstance(m, FastRCNNOutputLayers)]
    assert len(preds) == 3
    assert all(isinstance(p, ReclassFastRCNNOutputLayers) for p in preds)


def test_wrong_num_classes_for_the_names_is_a_clear_error():
    with pytest.raises(ClassListError, match="set MODEL.ROI_HEADS.NUM_CLASSES = 3"):
        _reclass_model(4, THREE)


def test_load_state_dict_maps_like_the_checkpointer(tmp_path):
    six = small_model(6, seed=1)
    source = six.state_dict()
    via_load = _reclass_model(3, THREE, seed=2, opts=["MODEL.RECLASS.SOURCE_CLASSES", SIX])
    incompatible = via_load.load_state_dict(source, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    torch.save({"model": source}, tmp_path / "six.pth")
    via_ckpt = small_model(3, seed=3)
    ReclassCheckpointer(via_ckpt,
        reclass=ReclassOptions(source_classes=SIX, target_classes=THREE)).load(
        str(tmp_path / "six.pth"))
    for key in ("cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias"):
        # Same keys and seed: identical copied *and* fresh rows through either path.
        assert torch.equal(via_load.state_dict()[PRED + key], via_ckpt.state_dict()[PRED + key])
    cls = via_load.state_dict()[PRED + "cls_score.weight"]
    assert torch.equal(cls[0], source[PRED + "cls_score.weight"][2])


def test_reclass_prunes_a_live_predictor_keeping_kept_class_scores():
    model = _reclass_model(6, SIX, seed=4)
    pred = model.roi_heads.box_predictor
    x = torch.randn(5, pred.cls_score.in_features)
    scores_before, deltas_before = pred(x)
    report = pred.reclass(["triangle", "square"])
    scores_after, deltas_after = pred(x)
    assert pred.num_classes == 2 and pred.class_names == ("triangle", "square")
    assert pred.cls_score.out_features == 3 and pred.bbox_pred.out_features == 8
    torch.testing.assert_close(scores_after, scores_before[:, [2, 0, 6]], rtol=1e-5, atol=0)
    torch.testing.assert_close(deltas_after, deltas_before[:, [8, 9, 10, 11, 0, 1, 2, 3]],
                               rtol=1e-5, atol=0)
    assert report.spaces["thing"].mapping.dropped == ["circle", "diamond", "hexagon", "cross"]


def test_reclass_model_prunes_mask_rcnn_for_deployment():
    model = _reclass_model(6, SIX, seed=5, mask=True)
    mask_before = model.roi_heads.mask_head.predictor.weight.detach().clone()
    reclass_model(model, THREE, seed=0)
    assert model.roi_heads.num_classes == 3
    assert model.roi_heads.box_predictor.num_classes == 3
    predictor = model.roi_heads.mask_head.predictor
    assert predictor.out_channels == 3 and predictor.weight.shape[0] == 3
    assert torch.equal(predictor.weight[0], mask_before[2])
    assert torch.equal(predictor.weight[1], mask_before[0])
    # The fresh mask channel follows the head's init: bias 0.
    assert float(predictor.bias.detach()[2]) == 0.0
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 96, 96) * 255}])[0]["instances"]
    assert out.pred_masks.shape[1:] == (96, 96)
    assert all(0 <= c < 3 for c in out.pred_classes.tolist())


def test_reclass_without_names_needs_source_classes():
    model = small_model(6, seed=1)
    with pytest.raises(ClassListError, match="pass source_classes"):
        reclass_model(model, THREE)
    reclass_model(model, THREE, source_classes=SIX)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4

