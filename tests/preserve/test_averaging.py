"""MODEL.RECLASS.SOURCE_AVERAGE: the pure average and the source weights it averages with.
(Through a real ReclassTrainer run: tests/preserve/test_keep_old.py.)"""
import torch
from d2_fixtures import SIX, small_model

from d2_reclass.preserve import average_with_source, source_weights

CLS = "roi_heads.box_predictor.cls_score.weight"
BOX = "roi_heads.box_predictor.bbox_pred.weight"


def test_the_average_leans_every_float_tensor_toward_the_source_except_the_kept_entries():
    state = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor(5),
             "own": torch.tensor([1.0]), "other_shape": torch.tensor([1.0, 1.0])}
    source = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "n": torch.tensor(9),
              "other_shape": torch.tensor([3.0])}
    keep = {"w": torch.tensor([[False, False], [True, True]])}
    out = average_with_source(state, source, keep, 0.25)
    assert torch.equal(out["w"], torch.tensor([[2.0, 3.0], [3.0, 4.0]]))
    # Integers (counters), tensors the source lacks or shapes it disagrees on: the model's.
    assert out["n"] is state["n"] and out["own"] is state["own"]
    assert out["other_shape"] is state["other_shape"]
    assert torch.equal(state["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # not modified
    assert torch.equal(average_with_source(state, source, {}, 1.0)["w"], source["w"])


def test_the_source_weights_are_laid_out_for_the_models_classes_by_name():
    source = small_model(6, seed=1)
    model = small_model(7, seed=2)
    target = [SIX[2], SIX[0], "star", *SIX[3:], SIX[1]]  # reordered, one new class
    out = source_weights(model, source, SIX, target)
    src = source.state_dict()
    assert out.keys() == model.state_dict().keys()
    order = [SIX.index(c) for c in target if c != "star"]
    kept = [i for i, c in enumerate(target) if c != "star"]
    assert torch.equal(out[CLS][kept], src[CLS][order])
    assert torch.equal(out[CLS][7], src[CLS][6])  # background, last in both
    box_rows = [4 * i + j for i in kept for j in range(4)]
    assert torch.equal(out[BOX][box_rows], src[BOX][[4 * i + j for i in order for j in range(4)]])
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(out[stem], src[stem])
    assert not torch.equal(out[stem], model.state_dict()[stem])


def test_the_source_weights_of_a_mask_head_keep_its_rows_by_name():
    source = small_model(6, seed=1, mask=True)
    model = small_model(7, seed=2, mask=True)
    out = source_weights(model, source, SIX, SIX + ["star"])
    src = source.state_dict()
    for key in ("roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"):
        assert out[key].shape[0] == 7
        assert torch.equal(out[key][:6], src[key])
