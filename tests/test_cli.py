"""The d2-reclass console script end to end, on real .pth and model-zoo .pkl checkpoints."""
import argparse
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


#: Two of the eight run by default (each runs the command in new interpreters); all with -m slow.
DEFAULT_CASES = {("faster", "pth"), ("cascade", "pkl")}


@pytest.mark.parametrize("arch, fmt", [
    pytest.param(arch, fmt, id=f"{arch}-{fmt}",
                 marks=() if (arch, fmt) in DEFAULT_CASES else pytest.mark.slow)
    for arch in ARCHS for fmt in ("pth", "pkl")])
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
    error = one_error_line(capsys.readouterr().err)
    assert re.search(message, error), error
    assert not out.exists() and os.listdir(tmp_path) == []


def one_error_line(err):
    """The error of a failed run: its last stderr line; any line before it is a warning."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("d2-reclass: error:"), err
    assert all(line.startswith("d2-reclass: warning:") for line in lines[:-1]), err
    return lines[-1]


#: Never downloads: a closed local port here, and an error page with a network.
UNREACHABLE = "http://127.0.0.1:9/model_final.pth"
DOWNLOAD_FIX = ". Check the URL and the network, or download the file yourself and pass its " \
    "local path."


@pytest.fixture
def download_cache(tmp_path, monkeypatch):
    """iopath's download cache, empty and private to the test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FVCORE_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("path", [UNREACHABLE, "detectron2://d2_reclass_tests/no_such_model.pkl"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_url_that_cannot_be_downloaded_is_one_error_line(tmp_path, capsys, download_cache, path,
                                                         command):
    out = tmp_path / "out.pth"
    args = ["--out", str(out), "--classes", "a"] if command == "convert" else []
    assert main([command, path, *args]) == 1
    # Only iopath's download progress bar may come before the one error line.
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(re.fullmatch(r"(\r?.+: 0\.00B \[00:00, \?B/s\])+", line) for line in lines[:-1])
    assert re.fullmatch(rf"d2-reclass: error: Cannot download {re.escape(path)}: .+"
                        + re.escape(DOWNLOAD_FIX), lines[-1])
    assert not out.exists()
    # iopath removes its partial download: nothing under the cache pretends to be the file.
    assert [f for _, _, files in os.walk(download_cache) for f in files
            if not f.endswith(".lock")] == []


@pytest.mark.parametrize("args, message", [
    (["--out", "{exists}"], "Output checkpoint {exists} already exists; pass --force to "
                            "overwrite it, or choose another path."),
    (["--out", "{tmp}/result.pkl"], "--out {tmp}/result.pkl: write a .pth file (torch format, "
                                    "loads with weights_only=True)."),
    (["--out", "{tmp}/nowhere/result.pth"], "Cannot write checkpoint {tmp}/nowhere/result.pth: "
                                            "directory {tmp}/nowhere does not exist; create it "
                                            "first."),
    (["--out", "{tmp}/dir.pth"], "Cannot write checkpoint {tmp}/dir.pth: it is a directory; "
                                 "give a file path in it."),
    (["--config-file", "{tmp}/nope.yaml"], "--config-file {tmp}/nope.yaml does not exist; check "
                                           "the path."),
    (["--classes", "a,A"], "--classes names the class 'A' twice (as 'a' and 'A'); each class "
                           "must appear once."),
    (["--source-classes", "x,,y"], "--source-classes[1] is ''; class names must be non-empty "
                                   "strings."),
    (["--source-dataset", "coco_2017_trian"], "--source-dataset 'coco_2017_trian' is not a "
                                              "registered dataset. Did you mean "
                                              "'coco_2017_train' or 'coco_2014_train' or "
                                              "'coco_2017_val'? Register it first (e.g. "
                                              "tools/train_net.py --coco-dataset NAME JSON "
                                              "IMAGES)."),
    (["--source-dataset", "ade20k_sem_seg_train"], "--source-dataset ade20k_sem_seg_train has no "
                                                   "thing_classes in its metadata; pass the "
                                                   "checkpoint's classes with --source-classes "
                                                   "instead."),
])
def test_argument_errors_come_before_any_download(tmp_path, capsys, download_cache, args,
                                                  message):
    """Each cheap check fails first: the input is a URL that is never fetched."""
    (tmp_path / "exists.pth").write_bytes(b"keep me")
    (tmp_path / "dir.pth").mkdir()
    names = {"tmp": str(tmp_path), "exists": str(tmp_path / "exists.pth")}
    argv = ["convert", UNREACHABLE, "--out", str(tmp_path / "out.pth"), "--classes", "a,b"]
    argv += [a.format(**names) for a in args]
    assert main(argv) == 1
    assert one_error_line(capsys.readouterr().err) == "d2-reclass: error: " + message.format(
        **names)
    assert not download_cache.exists()  # no download was even tried
    assert (tmp_path / "exists.pth").read_bytes() == b"keep me"
    assert not (tmp_path / "out.pth").exists()


@pytest.fixture
def six_dataset():
    """A registered dataset whose thing classes are SIX."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "d2_reclass_test_six"
    DatasetCatalog.register(name, list)
    MetadataCatalog.get(name).set(thing_classes=SIX)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_source_dataset_loses_to_different_stored_names_with_a_warning(six_ckpt, tmp_path,
                                                                        capsys):
    out = str(tmp_path / "three.pth")
    assert main(["convert", six_ckpt, "--out", out, "--classes", ",".join(THREE),
                 "--source-dataset", "coco_2017_train"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"d2-reclass: warning: Not using --source-dataset coco_2017_train: the class list stored "
        f"in {six_ckpt} comes first and differs from it (6 names against 80)."]
    assert f"thing source class names: the class list stored in {six_ckpt}\n" in captured.out
    assert "| thing   | triangle       | triangle [2]" in captured.out


def test_source_dataset_that_agrees_with_stored_names_is_quiet(six_ckpt, six_dataset, tmp_path,
                                                               capsys):
    out = str(tmp_path / "three.pth")
    assert main(["convert", six_ckpt, "--out", out, "--classes", ",".join(THREE),
                 "--source-dataset", six_dataset]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"thing source class names: the class list stored in {six_ckpt}\n" in captured.out


def test_source_dataset_gives_the_names_a_checkpoint_lacks(tmp_path, six_dataset, capsys):
    ckpt = str(tmp_path / "six.pth")
    torch.save({"model": small_model(6, seed=1).state_dict()}, ckpt)
    assert main(["convert", ckpt, "--out", str(tmp_path / "three.pth"), "--classes",
                 ",".join(THREE), "--source-dataset", six_dataset]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"thing source class names: --source-dataset {six_dataset}\n" in captured.out
    assert "| thing   | square         | square [0]" in captured.out


def test_source_classes_override_different_stored_names_with_a_warning(six_ckpt, tmp_path,
                                                                       capsys):
    swapped = ["circle", "square"] + SIX[2:]
    out = str(tmp_path / "three.pth")
    assert main(["convert", six_ckpt, "--out", out, "--classes", ",".join(THREE),
                 "--source-classes", ",".join(swapped)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"d2-reclass: warning: Not using the class list stored in {six_ckpt}: --source-classes "
        "comes first and differs from it (#0 is 'circle' against 'square')."]
    assert "thing source class names: --source-classes\n" in captured.out
    assert "| thing   | square         | square [1]" in captured.out


def test_close_name_is_an_error_on_the_command_line_until_declared_new(six_ckpt, tmp_path,
                                                                       capsys):
    # No data names 'xagon' here: two edits from the checkpoint's 'hexagon', it is a typo
    # until --class-map declares it new.
    out = tmp_path / "three.pth"
    assert main(["convert", six_ckpt, "--out", str(out), "--classes",
                 "triangle,square,xagon"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"d2-reclass: error: --classes names 'xagon', which is in neither the class list stored "
        f"in {six_ckpt} nor the training data, while the close name 'hexagon' is in the class "
        f"list stored in {six_ckpt}. Fix the name (CLASS_MAP 'xagon=hexagon' maps it), or "
        "declare it new on purpose with CLASS_MAP 'xagon='.")
    assert not out.exists()
    assert main(["convert", six_ckpt, "--out", str(out), "--classes", "triangle,square,xagon",
                 "--class-map", "xagon="]) == 0
    assert "| thing   | xagon          | fresh" in capsys.readouterr().out


def test_map_mode_without_source_names_names_the_options(tmp_path, capsys):
    ckpt = str(tmp_path / "six.pth")
    torch.save({"model": small_model(6, seed=1).state_dict()}, ckpt)
    assert main(["convert", ckpt, "--out", str(tmp_path / "three.pth"), "--classes",
                 ",".join(THREE), "--mode", "map"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"d2-reclass: error: --mode map needs the class names of {ckpt}, which stores none: "
        "pass --source-classes or --source-dataset, map classes by index with --class-map "
        "TARGET=INDEX, or use --mode reinit.")
    assert os.listdir(tmp_path) == ["six.pth"]


def test_convert_without_names_warns_that_every_row_is_reinitialised(tmp_path, capsys):
    ckpt = str(tmp_path / "six.pth")
    torch.save({"model": small_model(6, seed=1).state_dict()}, ckpt)
    out = str(tmp_path / "three.pth")
    assert main(["convert", ckpt, "--out", out, "--classes", ",".join(THREE)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"d2-reclass: warning: {ckpt} stores no class names and none were given, so every "
        "class row of its heads is re-initialised (6 -> 3 classes, nothing kept). To keep rows "
        "by name, pass --source-classes A,B,... (the checkpoint's classes, in its order) or "
        "--source-dataset NAME; pass --mode reinit if a fresh head is what you want."]
    for quiet in (["--mode", "reinit"], ["--source-classes", ",".join(SIX)]):
        assert main(["convert", ckpt, "--out", out, "--force", "--classes", ",".join(THREE),
                     *quiet]) == 0
        assert capsys.readouterr().err == ""


def test_convert_says_that_it_reads_the_model_weights_of_a_checkpoint_with_ema(tmp_path, capsys):
    model = small_model(6, seed=1)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    ckpt = str(tmp_path / "six.pth")
    torch.save({"model": model.state_dict(), "ema_state": ema}, ckpt)
    out = str(tmp_path / "three.pth")
    assert main(["convert", ckpt, "--out", out, "--classes", ",".join(THREE[:2]),
                 "--source-classes", ",".join(SIX)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"d2-reclass: warning: {ckpt} also holds EMA weights ('ema_state'): its 'model' weights "
        "are the ones read, and no EMA state is written. To reclass the EMA weights instead, "
        "save them as the model of a checkpoint of their own (torch.save({'model': "
        "ckpt['ema_state']}, PATH)) and pass that."]
    written = torch.load(out, weights_only=True)
    assert "ema_state" not in written
    backbone = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(written["model"][backbone], model.state_dict()[backbone])


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


def test_version_prints_the_package_version_without_importing_torch():
    import d2_reclass

    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom d2_reclass.cli import main\n"
         "try:\n    main(['--version'])\nexcept SystemExit as e:\n"
         "    print(e.code, 'torch' in sys.modules, 'detectron2' in sys.modules)"],
        capture_output=True, text=True, timeout=120)
    assert proc.stdout == f"d2-reclass {d2_reclass.__version__}\n0 False False\n", proc.stderr
    assert run("--version").stdout == f"d2-reclass {d2_reclass.__version__}\n"


@pytest.mark.parametrize("command", [None, "inspect", "convert", "combine"])
def test_help_documents_every_option_and_imports_nothing_heavy(command):
    from d2_reclass.cli import build_parser

    parser = build_parser()
    if command:
        parser = parser._subparsers._group_actions[0].choices[command]
        assert parser.description, f"{command} has no description"
    for action in parser._actions:
        if action.option_strings or command:
            assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
    argv = [command, "--help"] if command else ["--help"]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom d2_reclass.cli import main\n"
         f"try:\n    main({argv!r})\nexcept SystemExit:\n"
         "    print('torch' in sys.modules, 'detectron2' in sys.modules)"],
        capture_output=True, text=True, timeout=120)
    assert proc.stdout.endswith("\nFalse False\n") and proc.stderr == "", proc.stderr


def test_convert_help_shows_the_class_map_syntax_and_every_option():
    proc = run("convert", "--help")
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for expected in [
        "'vehicle=car+truck+bus' (merge: one target from several source classes)",
        "'gadget=' (a class new on purpose, not a misspelt source class)",
        "two targets of one source split it",
        "--mode {auto,map,reinit} map: copy rows class by class by name",
        "--seed SEED seeds the fresh rows",
        "--trust-pickle fully unpickle a .pkl or legacy file",
    ]:
        assert expected in text, expected
    assert proc.stderr == ""


def test_cli_choices_are_the_options_values():
    from d2_reclass import cli
    from d2_reclass.options import MODES, NEW_CLASS_INITS

    assert cli._MODES == tuple(m for m in MODES if m != "strict")
    assert cli._NEW_CLASS_INITS == NEW_CLASS_INITS


def test_inspect_without_names_says_how_to_name_them_and_no_warning_noise(tmp_path):
    ckpt = str(tmp_path / "unnamed.pth")
    torch.save({"model": small_model(6, seed=1).state_dict()}, ckpt)
    proc = run("inspect", ckpt)
    assert (f"stored class names: none. Name its classes (in its order) with --source-classes "
            "or --source-dataset when converting, --names when combining, or "
            "MODEL.RECLASS.SOURCE_CLASSES when training; or store them once: d2-reclass "
            f"convert {ckpt} --out NAMED.pth --classes A,B,... --source-classes A,B,...\n"
            ) in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr  # no torch.jit / pkg_resources lines
    assert "47.0 MiB of weights; no iteration stored; optimizer state: False" in proc.stdout

    # The command it suggests works: the names are stored, the weights unchanged.
    named = str(tmp_path / "named.pth")
    proc = run("convert", ckpt, "--out", named, "--classes", ",".join(SIX), "--source-classes",
               ",".join(SIX), "--config-file", "configs/Base-Shapes-RCNN.yaml")
    assert "Warning" not in proc.stderr, proc.stderr
    assert f"stored thing_classes: {', '.join(SIX)}\n" in run("inspect", named).stdout
    assert_same_state(torch.load(named, weights_only=True)["model"],
                      torch.load(ckpt, weights_only=True)["model"])


def test_inspect_counts_the_iterations_trained(tmp_path):
    # detectron2 stores the index of the last iteration run: 399 after SOLVER.MAX_ITER 400.
    ckpt = str(tmp_path / "model_final.pth")
    torch.save({"model": small_model(3, seed=1).state_dict(), "iteration": 399}, ckpt)
    assert "; 400 iterations trained (stored iteration 399); " in run("inspect", ckpt).stdout
