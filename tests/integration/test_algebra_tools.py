"""Split, merge and combine through every entry point: ReclassCheckpointer (the mixin's),
tools/train_net.py, a LazyConfig ``reclass`` dict and ``d2-reclass``, on real files.

The checkpoints model TFA's: ``base.pth`` knows six shapes; ``novel.pth`` is its copy whose box
predictor was fine-tuned on two classes ("star", and "square" which the base knows too).
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from d2_fixtures import REPO, SIX, assert_same_state, params, small_model
from detectron2.config import LazyConfig

from d2_reclass import (
    CheckpointError,
    CombineError,
    ConfigError,
    ReclassCheckpointer,
    ReclassOptions,
    add_reclass_config,
    options_from_config,
)
from d2_reclass.cli import main
from d2_reclass.data.synthetic import make_shapes_dataset
from d2_reclass.integration.lazy import lazy_reclass_options

BOX = "roi_heads.box_predictor."
CLS, BIAS, DELTAS = BOX + "cls_score.weight", BOX + "cls_score.bias", BOX + "bbox_pred.weight"
NOVEL = ["star", "square"]
POLYGON = [SIX.index(c) for c in ("square", "diamond", "hexagon")]
#: Merge three base shapes, keep one, split the novel checkpoint's star in two.
TARGET = ["polygon", "circle", "small star", "big star"]
CLASS_MAP = ["polygon=square+diamond+hexagon", "small star=star", "big star=star"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("algebra")
    base = small_model(6, seed=1).state_dict()
    novel = dict(base)
    novel.update({k: v for k, v in small_model(2, seed=2).state_dict().items()
                  if k.startswith(BOX)})
    paths = {"base": root / "base.pth", "novel": root / "novel.pth",
             "unnamed": root / "unnamed.pth", "other": root / "other.pth"}
    torch.save({"model": base, "d2_reclass": {"thing_classes": SIX}}, paths["base"])
    torch.save({"model": novel, "d2_reclass": {"thing_classes": NOVEL}}, paths["novel"])
    torch.save({"model": novel}, paths["unnamed"])
    torch.save({"model": small_model(2, seed=4).state_dict(),
                "d2_reclass": {"thing_classes": NOVEL}}, paths["other"])
    return {k: str(v) for k, v in paths.items()}, base, novel


def check_target_rows(state, base, novel):
    """The rows of TARGET: polygon merged from base (mean; bias + log 3), circle copied from
    base, both stars copied from novel's star, background from base."""
    w, b, d = state[CLS], state[BIAS], state[DELTAS]
    torch.testing.assert_close(w[0].double(), base[CLS].double()[POLYGON].mean(0), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(b[0].double(), base[BIAS].double()[POLYGON].mean() + math.log(3),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(d[:4].double(), base[DELTAS].double().view(6, 4, -1)[POLYGON]
                               .mean(0), rtol=0, atol=1e-6)
    assert torch.equal(w[1], base[CLS][1]) and torch.equal(d[4:8], base[DELTAS][4:8])
    for j in (2, 3):
        assert torch.equal(w[j], novel[CLS][0]) and torch.equal(b[j], novel[BIAS][0])
        assert torch.equal(d[4 * j:4 * j + 4], novel[DELTAS][:4])
    assert torch.equal(w[4], base[CLS][6])


def load(path, options):
    model = small_model(len(options.target_classes), seed=3)
    checkpointer = ReclassCheckpointer(model, reclass=options)
    checkpointer.load(path)
    return model, checkpointer.report


# ---------------------------------------------------------------------------------------------
# ReclassCheckpointer (what the mixin, ReclassTrainer and LazyConfig training load through)
# ---------------------------------------------------------------------------------------------
def test_checkpointer_combines_merges_and_splits(files):
    paths, base, novel = files
    model, report = load(paths["base"], ReclassOptions(
        target_classes=TARGET, class_map=CLASS_MAP, combine=(paths["novel"],)))
    check_target_rows(model.state_dict(), base, novel)
    mapping = report.spaces["thing"].mapping
    assert mapping.checkpoint == (0, 0, 1, 1)
    assert report.more_sources == [paths["novel"]]


@pytest.mark.parametrize("combine, exc, message", [
    ("unnamed", CombineError, r"MODEL\.RECLASS\.COMBINE names .*unnamed\.pth, which stores no "
                              r"class names"),
    ("other", CombineError, r"Cannot combine .*base\.pth with .*other\.pth: \d+ tensors that "
                            r"are not class entries differ .* set MODEL\.RECLASS\."
                            r"COMBINE_ALLOW_DIFFERENT_WEIGHTS True\.$"),
    ("base", CombineError, r"base\.pth gives no class to the model"),
    ("missing", CheckpointError, r"Checkpoint .*missing\.pth' not found\. Check "
                                 r"MODEL\.RECLASS\.COMBINE"),
])
def test_checkpointer_errors_leave_the_model_untouched(files, combine, exc, message):
    paths, _, _ = files
    path = paths.get(combine, os.path.join(os.path.dirname(paths["base"]), "missing.pth"))
    model = small_model(2, seed=3)
    before = params(model)
    options = ReclassOptions(target_classes=["circle", "square"], combine=(path,))
    with pytest.raises(exc, match=message):
        ReclassCheckpointer(model, reclass=options).load(paths["base"])
    assert_same_state(before, params(model))


def test_allowed_different_weights_take_the_first_checkpoints(files):
    paths, base, _ = files
    model, _ = load(paths["base"], ReclassOptions(
        target_classes=["circle", "star"], combine=(paths["other"],),
        combine_allow_different_weights=True))
    other = torch.load(paths["other"], weights_only=True)["model"]
    state = model.state_dict()
    assert torch.equal(state[CLS][1], other[CLS][0])
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(state[key], base[key]) and not torch.equal(base[key], other[key])


def test_config_keys():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_reclass_config(cfg)
    assert cfg.MODEL.RECLASS.COMBINE == [] and cfg.MODEL.RECLASS.COMBINE_ALLOW_DIFFERENT_WEIGHTS \
        is False
    cfg.MODEL.RECLASS.COMBINE = "novel.pth"
    with pytest.raises(ConfigError, match=r"MODEL\.RECLASS\.COMBINE is 'novel\.pth'; it must be "
                                          r"a list of strings"):
        options_from_config(cfg)
    cfg.MODEL.RECLASS.COMBINE = ["novel.pth"]
    cfg.MODEL.RECLASS.COMBINE_ALLOW_DIFFERENT_WEIGHTS = "yes"
    with pytest.raises(ConfigError, match=r"COMBINE_ALLOW_DIFFERENT_WEIGHTS is 'yes'; use True"):
        options_from_config(cfg)


# ---------------------------------------------------------------------------------------------
# LazyConfig: a ``reclass`` dict beside ``train``
# ---------------------------------------------------------------------------------------------
def test_lazyconfig_reclass_dict(files, tmp_path):
    paths, base, novel = files
    config = tmp_path / "lazy.py"
    config.write_text(f"reclass = dict(mode='map', target_classes={TARGET!r}, "
                      f"class_map={CLASS_MAP!r}, combine=[{paths['novel']!r}])\n")
    options = lazy_reclass_options(LazyConfig.load(str(config)))
    assert options.combine == (paths["novel"],) and options.class_map == tuple(CLASS_MAP)
    model, _ = load(paths["base"], options)
    check_target_rows(model.state_dict(), base, novel)


# ---------------------------------------------------------------------------------------------
# d2-reclass
# ---------------------------------------------------------------------------------------------
def test_cli_combine(files, tmp_path, capsys):
    paths, base, novel = files
    out = tmp_path / "all.pth"
    assert main(["combine", paths["base"], paths["novel"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| thing   | star           | {paths['novel']}: star [0]" in printed
    saved = torch.load(out, weights_only=True)
    assert saved["d2_reclass"] == {"thing_classes": SIX + ["star"]}  # the union, in order
    state = saved["model"]
    assert torch.equal(state[CLS][:6], base[CLS][:6]) and torch.equal(state[CLS][6], novel[CLS][0])
    assert torch.equal(state[CLS][7], base[CLS][6])  # background
    assert torch.equal(state[DELTAS][24:28], novel[DELTAS][:4])

    out = tmp_path / "four.pth"
    assert main(["combine", paths["base"], paths["unnamed"], "--out", str(out), "--classes",
                 ",".join(TARGET), "--class-map", *CLASS_MAP,
                 "--names", f"{paths['unnamed']}=star,square"]) == 0
    check_target_rows(torch.load(out, weights_only=True)["model"], base, novel)


def test_cli_combine_in_swapped_order_warns_what_to_pass(files, tmp_path, capsys):
    """``combine novel base``: the novel checkpoint would give the background row (and every
    non-class tensor); it gives fewer classes than the base, so the order is named."""
    paths, base, novel = files
    out = tmp_path / "swapped.pth"
    assert main(["combine", paths["novel"], paths["base"], "--out", str(out)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"d2-reclass: warning: Combining: {paths['novel']} is listed first, so the model takes "
        f"its background entries and every tensor that is not a class entry, but "
        f"{paths['base']} gives more of the target classes (5 against 2). If {paths['base']} "
        f"is the base model, list it first: `d2-reclass combine {paths['base']} "
        f"{paths['novel']} ...`, or MODEL.WEIGHTS {paths['base']} with MODEL.RECLASS.COMBINE "
        f"['{paths['novel']}']."]
    assert torch.equal(torch.load(out, weights_only=True)["model"][CLS][-1], novel[CLS][-1])
    main(["combine", paths["base"], paths["novel"], "--out", str(tmp_path / "right.pth")])
    assert "warning" not in capsys.readouterr().err


def test_cli_convert_merges(files, tmp_path):
    paths, base, _ = files
    out = tmp_path / "merged.pth"
    assert main(["convert", paths["base"], "--out", str(out), "--classes", "polygon,circle",
                 "--class-map", "polygon=square+diamond+hexagon"]) == 0
    state = torch.load(out, weights_only=True)["model"]
    torch.testing.assert_close(state[BIAS][0].double(),
                               base[BIAS].double()[POLYGON].mean() + math.log(3), rtol=0,
                               atol=1e-6)
    assert torch.equal(state[CLS][1], base[CLS][1])


@pytest.mark.parametrize("args, message", [
    (["base", "base"], r"base\.pth gives no class to the model: every target class it knows "
                       r"\(.*\) is taken from a checkpoint listed before it"),
    (["base", "other"], r"Cannot combine .*base\.pth with .*other\.pth: .* If this is "
                        r"intended, set --allow-different-weights\.$"),
    (["base", "unnamed"], r"unnamed\.pth stores no class names, and combining goes by names: "
                          r"pass --names .*unnamed\.pth=CLASS,CLASS,\.\.\."),
    (["base", "novel", "--class-map", "polygon=square+diamnd"],
     r"CLASS_MAP merges 'diamnd' into 'polygon', but 'diamnd' is not in the class list stored "
     r"in .*base\.pth or the thing classes of .*novel\.pth\. Did you mean 'diamond'\?"),
    (["base"], r"combine needs at least two checkpoints"),
])
def test_cli_combine_errors_are_one_line_and_write_nothing(files, tmp_path, capsys, args,
                                                           message):
    paths, _, _ = files
    out = tmp_path / "out.pth"
    argv = [paths.get(a, a) for a in args]
    if "--class-map" in argv:
        argv += ["--classes", "polygon,star"]
    argv = ["combine", *argv, "--out", str(out)]
    if args == ["base", "base"]:  # one case as the installed command runs it
        proc = subprocess.run([sys.executable, "-m", "d2_reclass", *argv], capture_output=True,
                              text=True, timeout=120)
        code, err = proc.returncode, proc.stderr
    else:  # the same main(), in this process (a new interpreter costs 10-15 s here)
        code, err = main(argv), capsys.readouterr().err
    assert code == 1, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("d2-reclass: error: "), err
    assert re.search(message, lines[-1]), lines[-1]
    assert not out.exists() and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# tools/train_net.py (ReclassTrainer: the mixin on DefaultTrainer)
# ---------------------------------------------------------------------------------------------
def test_train_net_combines_merges_and_splits(files, tmp_path):
    paths, base, novel = files
    path = make_shapes_dataset(str(tmp_path), "train", ["square", "circle", "star", "triangle"],
                               4, seed=1)
    with open(path) as f:
        data = json.load(f)
    for cat, name in zip(data["categories"], TARGET):  # the shapes drawn, named as TARGET
        cat["name"] = name
    with open(path, "w") as f:
        json.dump(data, f)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"),
           "--coco-dataset", "alg_train", str(tmp_path / "train.json"), str(tmp_path / "train"),
           "--config-file", "configs/Base-Shapes-RCNN.yaml",
           "MODEL.WEIGHTS", paths["base"], "MODEL.RECLASS.COMBINE", json.dumps([paths["novel"]]),
           "MODEL.RECLASS.CLASS_MAP", json.dumps(CLASS_MAP), "MODEL.RECLASS.MODE", "map",
           "DATASETS.TRAIN", '("alg_train",)', "DATASETS.TEST", "()",
           # No step changes the class rows, so the saved model holds exactly what was loaded.
           "SOLVER.BASE_LR", "0.0", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2",
           "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Skip loading parameter" not in log
    assert "square [0] + diamond [3] + hexagon [4] (merged)" in log
    assert f"{paths['novel']}: star [0] (split into 2)" in log
    report = json.loads((out / "reclass_report.json").read_text())
    mapping = report["spaces"]["thing"]["mapping"]
    assert mapping["checkpoint"] == [0, 0, 1, 1] and report["more_sources"] == [paths["novel"]]
    assert mapping["merged"][0]["sources"] == ["square", "diamond", "hexagon"]
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": TARGET}
    check_target_rows(final["model"], base, novel)
