"""Fresh entries: the head's own init, drawn from a private generator seeded by (seed, key).

Determinism is what lets every DDP rank (each with its own global seed, as detectron2's trainer
sets it) and every rerun load bit-identical weights without a broadcast.
"""
import hashlib
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FASTER_RCNN, build_model, reclass, source_state, thing
from fvcore.nn.weight_init import c2_msra_fill, c2_xavier_fill
from torch import nn

from d2_reclass.engine.surgery import reclass_state_dict
from d2_reclass.fresh import (
    MSRA,
    NORMAL_0001,
    NORMAL_001,
    XAVIER,
    ZERO,
    InitSpec,
    retinanet_prior_bias,
    seeded_generator,
    torch_default_init,
)
from d2_reclass.layouts import find_layouts

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
BOX = "roi_heads.box_predictor."
HEAD_KEYS = [BOX + k for k in ("cls_score.weight", "cls_score.bias", "bbox_pred.weight",
                               "bbox_pred.bias")]


# ---------------------------------------------------------------------------------------------
# Generators and init specs
# ---------------------------------------------------------------------------------------------
def test_seeded_generator_depends_only_on_seed_and_name():
    def draw(seed, name):
        return torch.randn(64, generator=seeded_generator(seed, name))

    torch.manual_seed(1)
    a = draw(0, "cls_score.weight")
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(a, draw(0, "cls_score.weight"))
    assert not torch.equal(a, draw(1, "cls_score.weight"))
    assert not torch.equal(a, draw(0, "cls_score.bias"))
    assert seeded_generator(0, "x").device == torch.device("cpu")


def test_global_rng_is_not_consumed():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    NORMAL_001.draw((100, 10), seeded_generator(0, "k"))
    MSRA.draw((8, 4, 3, 3), seeded_generator(0, "k"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("spec, std", [(NORMAL_001, 0.01), (NORMAL_0001, 0.001)])
def test_normal(spec, std):
    out = spec.draw((400, 256), seeded_generator(0, "w"))
    assert out.dtype == torch.float32 and out.shape == (400, 256)
    assert float(out.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(out.mean())) < 5 * std / math.sqrt(out.numel())


def test_constant():
    assert torch.equal(ZERO.draw((3, 2), seeded_generator(0, "b")), torch.zeros(3, 2))
    prior = InitSpec("constant", retinanet_prior_bias(0.01))
    assert torch.equal(prior.draw((5,), seeded_generator(0, "b")),
                       torch.full((5,), -math.log(99.0)))


def test_msra_matches_c2_msra_fill():
    """Same distribution as fvcore's c2_msra_fill (kaiming_normal_, fan_out, relu)."""
    conv = nn.Conv2d(256, 54, 3)
    torch.manual_seed(0)
    c2_msra_fill(conv)
    ours = MSRA.draw(conv.weight.shape, seeded_generator(0, "w"))
    want = math.sqrt(2.0 / (54 * 9))
    assert float(ours.std()) == pytest.approx(want, rel=0.02)
    assert float(conv.weight.detach().std()) == pytest.approx(want, rel=0.02)
    # ConvTranspose2d weights are (in, out, k, k): torch (and detectron2's keypoint head) take
    # dim 0 as "fan_out" all the same, and so does the draw.
    deconv = MSRA.draw((512, 17, 4, 4), seeded_generator(0, "w"))
    assert float(deconv.std()) == pytest.approx(math.sqrt(2.0 / (512 * 16)), rel=0.02)


def test_xavier_matches_c2_xavier_fill():
    fc = nn.Linear(300, 200)
    torch.manual_seed(0)
    c2_xavier_fill(fc)
    ours = XAVIER.draw(fc.weight.shape, seeded_generator(0, "w"))
    bound = math.sqrt(3.0 / 300)  # kaiming_uniform_(a=1): U(-sqrt(3 / fan_in), +)
    for w in (ours, fc.weight.detach()):
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.99 * bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)


@pytest.mark.parametrize("layer", [nn.Linear(256, 134), nn.Conv2d(64, 54, 3)])
def test_torch_default_init_matches_the_layers_own(layer):
    """nn.Linear / nn.Conv2d's reset_parameters: weight and bias both U(+-1/sqrt(fan_in))."""
    spec = torch_default_init(layer)
    fan_in = layer.weight[0].numel()
    assert spec == InitSpec("uniform", 1 / math.sqrt(fan_in))
    assert str(spec) == f"uniform(+-{1 / math.sqrt(fan_in):.4g})"
    bound = 1 / math.sqrt(fan_in)
    for shape, own in ((layer.weight.shape, layer.weight), (layer.bias.shape, layer.bias)):
        ours = spec.draw(shape, seeded_generator(0, "w"))
        assert torch.equal(ours, spec.draw(shape, seeded_generator(0, "w")))
        for values in (ours, own.detach()):
            assert float(values.abs().max()) <= bound
        assert float(ours.abs().max()) > 0.95 * bound
    ours = spec.draw(layer.weight.shape, seeded_generator(0, "w"))
    assert float(ours.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert float(layer.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_torch_default_init_needs_a_weight():
    with pytest.raises(ValueError, match="needs a layer with a 2-d or larger weight, not ReLU"):
        torch_default_init(nn.ReLU())


def test_unknown_kind():
    with pytest.raises(ValueError, match="Unknown init kind 'orthogonal'"):
        InitSpec("orthogonal").draw((2, 2), seeded_generator(0, "w"))


def test_prior_bias_is_detectron2s():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    assert retinanet_prior_bias(0.01) == pytest.approx(-4.59512, abs=1e-5)
    torch.manual_seed(0)
    head = RetinaNetHead(input_shape=[ShapeSpec(channels=8)], num_classes=3, num_anchors=1,
                         conv_dims=[8], prior_prob=0.2)
    assert torch.equal(head.cls_score.bias.detach(), torch.full((3,), retinanet_prior_bias(0.2)))


def test_str():
    assert [str(s) for s in (NORMAL_001, ZERO, MSRA, XAVIER)] == \
        ["normal(0.01)", "constant(0)", "msra", "xavier"]


# ---------------------------------------------------------------------------------------------
# Fresh rows from the engine are deterministic
# ---------------------------------------------------------------------------------------------
def test_fresh_rows_are_the_keyed_draw():
    """A fresh row is the seeded draw of the whole tensor, at that row: reproducible by anyone."""
    model = build_model(FASTER_RCNN, 3)
    new, _ = reclass(source_state(FASTER_RCNN), model, thing(), mode="map", seed=11)
    for key, spec, rows in ((BOX + "cls_score.weight", NORMAL_001, [2]),
                            (BOX + "bbox_pred.weight", NORMAL_0001, [8, 9, 10, 11])):
        full = spec.draw(new[key].shape, seeded_generator(11, key))
        assert torch.equal(new[key][rows], full[rows])


_CHILD = textwrap.dedent("""
    import sys
    import torch

    sys.path.insert(0, sys.argv[1])
    from conftest import FASTER_RCNN, build_model, reclass, thing

    src = torch.load(sys.argv[2])
    model = build_model(FASTER_RCNN, 3, seed=int(sys.argv[4]))  # its own weights play no part
    torch.manual_seed(int(sys.argv[4]))  # nor does the global RNG
    torch.rand(int(sys.argv[4]))
    new, _ = reclass(src, model, thing(), mode="map", seed=3)
    torch.save({k: new[k] for k in src}, sys.argv[3])
""")


def test_two_processes_draw_bit_identical_rows(tmp_path):
    src = {k: v for k, v in source_state(FASTER_RCNN).items() if k in HEAD_KEYS}
    torch.save(src, tmp_path / "src.pth")
    procs = []
    for i, (global_seed, hash_seed) in enumerate(((1, "0"), (987, "12345"))):
        out = tmp_path / f"out{i}.pth"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-c", _CHILD, TESTS_DIR, str(tmp_path / "src.pth"), str(out),
               str(global_seed)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), out))
    outs = []
    for proc, out in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(torch.load(out))
    here, _ = reclass(src, build_model(FASTER_RCNN, 3), thing(), mode="map", seed=3)
    for key in HEAD_KEYS:
        assert torch.equal(outs[0][key], outs[1][key])
        assert torch.equal(outs[0][key], here[key])
    # The comparison covers fresh rows: "gadget" (row 2) is not any source row.
    assert not any(torch.equal(outs[0][HEAD_KEYS[0]][2], row) for row in src[HEAD_KEYS[0]])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _ddp_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    """One rank of a detectron2-style job: per-rank seed, DDP wrap, then load through the engine."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        source = source_state(FASTER_RCNN)  # the checkpoint: the same on every rank
        # detectron2's trainer seeds each rank differently (seed_all_rng(seed + rank)), builds
        # the model under that seed, wraps it in DDP (which broadcasts rank 0's weights), and
        # only then loads the checkpoint.
        model = build_model(FASTER_RCNN, 3, seed=1000 + rank)
        ddp = nn.parallel.DistributedDataParallel(model)
        global_rng = _digest(torch.random.get_rng_state())  # differs per rank, at load time
        new, report = reclass_state_dict(source, ddp.module.state_dict(), find_layouts(ddp),
                                         classes=thing(), mode="map", seed=0)
        ddp.module.load_state_dict(new)
        state = ddp.module.state_dict()
        result = {
            "digests": {k: _digest(v) for k, v in state.items()},
            "heads": {k: state[k].clone() for k in HEAD_KEYS},
            "global_rng": global_rng,
            "fresh": report.tensor(BOX + "cls_score.weight").fresh,
        }
        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_end_identical(tmp_path):
    out = str(tmp_path / "gathered.pth")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(out, weights_only=False)
    assert r0["global_rng"] != r1["global_rng"]  # the ranks' global RNGs did differ
    assert r0["fresh"] == r1["fresh"] == 1
    assert r0["digests"].keys() == r1["digests"].keys()
    differ = [k for k in r0["digests"] if r0["digests"][k] != r1["digests"][k]]
    assert differ == []
    for key in HEAD_KEYS:
        assert torch.equal(r0["heads"][key], r1["heads"][key])
    # And both equal what this process computes for the same checkpoint and seed.
    here, _ = reclass(source_state(FASTER_RCNN), build_model(FASTER_RCNN, 3), thing(),
                      mode="map", seed=0)
    for key in HEAD_KEYS:
        assert torch.equal(r0["heads"][key], here[key])


def test_recipe_helpers():
    from d2_reclass import linear_default_init, prior_bias_init, xavier_uniform_init
    from d2_reclass.fresh import seeded_generator as gen

    assert prior_bias_init(0.01).value == -math.log(99)
    assert linear_default_init(torch.nn.Linear(16, 3)).value == 0.25
    drawn = xavier_uniform_init().draw((3, 13), gen(0, "w"))
    assert drawn.abs().max() <= math.sqrt(6 / 16) and drawn.std() > 0.2
    assert torch.equal(drawn, xavier_uniform_init().draw((3, 13), gen(0, "w")))
