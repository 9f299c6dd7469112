"""The d2-reclass console script end to end, on real .pth and model-zoo .pkl checkpoints."""
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from d2_fixtures import SIX, THREE, assert_same_state, captured_logs, params, small_model
from detectron2.checkpoint import DetectionCheckpointer

from d2_reclass.cli import main

CLI = os.path.join(os.path.dirname(sys.executable), "d2-reclass")
RETINANET = ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.BACKBONE.NAME",
             "build_retinanet_resnet_fpn_backbone"]
CASCADE = ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
           True]
ARCHS = {
    "faster": ({}, "Faster R-CNN", ["roi_heads.box_predictor.cls_score.weight"]),
    "mask": ({"mask": True}, "Mask R-CNN", ["roi_heads.mask_head.predictor.weight"]),
    "retinanet": ({"opts": RETINANET}, "RetinaNet", ["head.cls_score.weight"]),
    "cascade": ({"opts": CASCADE}, "Cascade R-CNN", ["roi_heads.box_predictor.2.cls_score.weight"]),
}


def run(*args, ok=True):
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _save(model, path):
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()},
                         "__author__": "test"}, f, protocol=2)
    else:
        torch.save({"model": model.state_dict(), "iteration": 99,
                    "optimizer": {"state": {}, "param_groups": []}}, path)


@pytest.mark.parametrize("fmt", ["pth", "pkl"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_inspect_and_convert(arch, fmt, tmp_path):
    kwargs, name, keys = ARCHS[arch]
    source = small_model(6, seed=1, **kwargs)
    ckpt = str(tmp_path / f"six.{fmt}")
    _save(source, ckpt)

    info = json.loads(run("inspect", ckpt, "--json").stdout)
    assert info["architecture"] == name
    assert info["num_classes"] == {"thing": 6}
    assert {t["key"] for t in info["class_dependent"]} >= set(keys)
    assert info["format"] == ("d2 pth" if fmt == "pth" else "model-zoo pkl")
    assert info["optimizer_state"] is (fmt == "pth") and info["iteration"] == (
        99 if fmt == "pth" else None)

    out = str(tmp_path / "three.pth")
    proc = run("convert", ckpt, "--out", out, "--classes", ",".join(THREE), "--source-classes",
               ",".join(SIX))
    assert "| thing   | triangle       | triangle [2]" in proc.stdout
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model", "d2_reclass"}  # no optimizer, no iteration
    assert saved["d2_reclass"] == {"thing_classes": THREE}

    # Plain detectron2 loads it into a 3-class model with no class-dependent warning.
    target = small_model(3, seed=2, **kwargs)
    with captured_logs("fvcore.common.checkpoint") as logs:
        DetectionCheckpointer(target).load(out)
    assert not [m for m in logs if "Skip loading" in m or "shape" in m.lower()], logs
    for key in keys:
        got, want = target.state_dict()[key], source.state_dict()[key]
        if arch == "retinanet":  # 9 anchors x K: anchor 0, class triangle (2)
            assert torch.equal(got[0], want[2]) and torch.equal(got[3], want[6 + 2])
        else:
            assert torch.equal(got[0], want[2]) and torch.equal(got[1], want[0])


def test_convert_with_config_file_reads_the_model_heads(tmp_path):
    source = small_model(6, seed=1)
    ckpt = str(tmp_path / "six.pth")
    _save(source, ckpt)
    out = str(tmp_path / "three.pth")
    run("convert", ckpt, "--out", out, "--classes", ",".join(THREE), "--source-classes",
        ",".join(SIX), "--config-file", "configs/Base-Shapes-RCNN.yaml")
    model = small_model(3, seed=3)
    DetectionCheckpointer(model).load(out)
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(model.state_dict()[key][1], source.state_dict()[key][0])


@pytest.fixture(scope="module")
def six_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "six.pth")
    torch.save({"model": small_model(6, seed=1).state_dict(),
                "d2_reclass": {"thing_classes": SIX}}, path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--classes", "triangle,sqare,star"], "Did you mean 'square'"),
    (["--classes", "triangle,square,triangle"], "names the class 'triangle' twice"),
    (["--classes", "triangle,,star"], r"--classes\[1\] is ''"),
    (["--classes", "triangle,square", "--class-map", "star=square"],
     "CLASS_MAP names the target class 'star', which is not in --classes"),
    (["--classes", "a,b", "--source-classes", "x,y"],
     "--source-classes has 2 names, but .* has heads for 6"),
    (["--classes", "a,b", "--source-dataset", "coco_2017_trian"], "Did you mean 'coco_2017_train'"),
])
def test_bad_input_is_one_line_exit_1_and_no_file(six_ckpt, tmp_path, capsys, args, message):
    # In-process (the console script is main()); the subprocess path is tested above.
    out = tmp_path / "out.pth"
    assert main(["convert", six_ckpt, "--out", str(out), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d2-reclass: error:")
    assert re.search(message, err[0]), err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_convert_never_writes_over_its_input_or_an_existing_file(six_ckpt, tmp_path):
    before = open(six_ckpt, "rb").read()
    proc = run("convert", six_ckpt, "--out", six_ckpt, "--classes", "a", ok=False)
    assert proc.returncode == 1 and "is the input checkpoint" in proc.stderr
    assert open(six_ckpt, "rb").read() == before
    existing = tmp_path / "exists.pth"
    existing.write_bytes(b"keep me")
    proc = run("convert", six_ckpt, "--out", str(existing), "--classes", ",".join(THREE), ok=False)
    assert proc.returncode == 1 and "pass --force" in proc.stderr
    assert existing.read_bytes() == b"keep me"
    run("convert", six_ckpt, "--out", str(existing), "--classes", ",".join(THREE), "--force")
    assert torch.load(existing, weights_only=True)["d2_reclass"] == {"thing_classes": THREE}


def test_usage_errors_exit_2():
    assert run("convert", ok=False).returncode == 2
    assert run("frobnicate", ok=False).returncode == 2


def test_python_dash_m_is_the_same_command(six_ckpt):
    proc = subprocess.run([sys.executable, "-m", "d2_reclass", "inspect", six_ckpt, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["stored_classes"] == {"thing_classes": SIX}


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "PNG"),
    (b'{"model": 1}', "JSON"),
    (b"just some text\n", "text"),
])
def test_files_that_are_not_checkpoints_leave_the_model_untouched(tmp_path, content, message):
    from d2_reclass import CheckpointError, ReclassCheckpointer

    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    model = small_model(3)
    before = params(model)
    with pytest.raises(CheckpointError, match=message):
        ReclassCheckpointer(model).load(str(path))
    assert_same_state(params(model), before)
    proc = run("inspect", str(path), ok=False)
    assert proc.returncode == 1 and message in proc.stderr


def test_checkpoint_without_weights_and_truncated_file(tmp_path, six_ckpt):
    from d2_reclass import CheckpointError, ReclassCheckpointer

    torch.save({"iteration": 5}, tmp_path / "noweights.pth")
    data = open(six_ckpt, "rb").read()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    model = small_model(3)
    before = params(model)
    with pytest.raises(CheckpointError, match="no model weights"):
        ReclassCheckpointer(model).load(str(tmp_path / "noweights.pth"))
    with pytest.raises(CheckpointError, match="truncated|damaged|corrupt"):
        ReclassCheckpointer(model).load(str(tmp_path / "truncated.pth"))
    assert_same_state(params(model), before)


@pytest.mark.parametrize("fmt", ["pth", "pkl"])
def test_non_tensor_entry_is_one_line_exit_1_and_no_file(tmp_path, capsys, fmt):
    state = {k: v.numpy() if fmt == "pkl" else v
             for k, v in small_model(6, seed=1).state_dict().items()}
    state["roi_heads.box_predictor.cls_score.bias"] = "edited"
    path = tmp_path / f"edited.{fmt}"
    if fmt == "pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": state, "__author__": "test"}, f, protocol=2)
    else:
        torch.save({"model": state}, path)
    out = tmp_path / "out.pth"
    for command in (["inspect", str(path)], ["convert", str(path), "--out", str(out),
                                              "--classes", ",".join(THREE)]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        for part in (str(path), "delete that entry",
                     "'roi_heads.box_predictor.cls_score.bias' holds a str ('edited')"):
            assert part in err[0], err
    assert sorted(os.listdir(tmp_path)) == [path.name]
