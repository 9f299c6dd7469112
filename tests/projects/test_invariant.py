"""The load invariant (tests/load_invariant.py) over the model zoo and every load path.

For a config of the coverage matrix (benchmarks/coverage_matrix.py, whose list of configs and
whose recipes are reused here) a source model is built with the config's own classes and saved;
a target model is built with the same classes ("unchanged") or with 3 ("changed": two source
classes swapped and a new one). The saved file is then loaded into fresh copies of the target
by stock ``DetectionCheckpointer`` and by ``ReclassCheckpointer``: every tensor that is not a
class entry must load bit for bit the same, and every module must see the same state-dict
version. With classes unchanged, class entries too.

The paths: ``.pth`` with stored names and without; zoo ``.pkl`` (numpy arrays, with
``_metadata``) and a ``.pkl`` read by name-matching heuristics; a DDP ``module.`` prefix;
MODEL.RECLASS.ONLY and RENAME; resume; COMBINE; the output files of ``d2-reclass convert`` and
``combine``; a PathManager URL with a ``?matching_heuristics=True`` query. Default suite: a few
archs, each path at least once. ``-m slow``: every buildable config of the matrix, with the
paths that apply to any model.
"""
import copy
import functools
import importlib.util
import pickle
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from d2_fixtures import StorageHandler  # noqa: E402
from detectron2.utils.file_io import PathManager
from load_invariant import check_load_invariant, recorded_versions  # noqa: E402
from zoo_cases import (  # noqa: E402
    COMPILED_OPS,
    MISSING_PACKAGE,
    NEW_STUFF,
    NEW_THING,
    OUT_OF_SCOPE,
    OUT_OF_SCOPE_CONFIGS,
    SOURCE_SEED,
    TARGET_SEED,
    Recipe,
    Skip,
    _compiled_op,
    _target_names,
    list_cases,
)

from d2_reclass import ReclassOptions  # noqa: E402
from d2_reclass.cli import main as cli_main  # noqa: E402
from d2_reclass.engine.keys import copy_state_dict  # noqa: E402

CASES = {case.name: case for case in list_cases()}

FASTER = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
MASK = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
CASCADE = "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
PANOPTIC = "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml"
POINT_REND = "projects/PointRend/pointrend_rcnn_R_50_FPN_3x_coco"
#: PointRend's versioned module (ConvFCHead, ``_version = 2``) in its instance models.
COARSE_HEAD = "roi_heads.mask_head.coarse_head"
#: The novel classes of the combined checkpoint (few-shot style: base + novel).
NOVEL = ["gadget", "widget", "sprocket"]


# ---------------------------------------------------------------------------------------------
# Models and files
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Arch:
    """One config: its recipe, the source model and class names, the files saved from it,
    and the target models (each load goes into deep copies of one)."""

    name: str
    recipe: Recipe
    model: torch.nn.Module  # the source
    names: Dict[str, List[str]]  # "thing_classes" / "stuff_classes" of the source
    dir: Path  # files saved from the source, shared by the checks
    targets: Dict[bool, torch.nn.Module] = field(default_factory=dict)

    @functools.cached_property
    def source(self) -> "OrderedDict[str, torch.Tensor]":
        return self.model.state_dict()

    @functools.cached_property
    def pth(self) -> str:
        """The source as DetectionCheckpointer saves it, with its class names stored."""
        return save_pth(self.dir / "source.pth", self.source, self.names)

    def target(self, changed: bool) -> torch.nn.Module:
        """The model built for the target classes (3 per space where ``changed``). Classes
        unchanged, it is the source model with 1 added to every float tensor: another init,
        without building the config once more."""
        if changed not in self.targets:
            if changed:
                self.targets[changed] = self.recipe.build(*self.counts(changed), TARGET_SEED)
            else:
                model = copy.deepcopy(self.model)
                with torch.no_grad():
                    for value in model.state_dict().values():
                        if value.is_floating_point():
                            value.add_(1.0)
                self.targets[changed] = model
        return self.targets[changed]

    def counts(self, changed: bool):
        r = self.recipe
        return [None if names is None else 3 if changed else len(names)
                for names in (r.thing, r.stuff)]

    def target_names(self, changed: bool) -> Dict[str, List[str]]:
        out = {}
        for key, new in (("thing_classes", NEW_THING), ("stuff_classes", NEW_STUFF)):
            if key in self.names:
                out[key] = _target_names(self.names[key], new) if changed else self.names[key]
        return out

    def options(self, changed: bool, **more) -> ReclassOptions:
        """Target class names (as MODEL.RECLASS's from DATASETS.TRAIN), plus ``more``."""
        names = self.target_names(changed)
        return ReclassOptions(target_classes=names.get("thing_classes"),
                              target_stuff_classes=names.get("stuff_classes"), **more)

    def fresh(self, changed: bool):
        template = self.target(changed)
        return lambda: copy.deepcopy(template)


_WORKDIR = tempfile.TemporaryDirectory(prefix="d2_reclass_invariant_")


@functools.lru_cache(maxsize=None)
def arch(name: str) -> Arch:
    """The config's source model (seeded), or a pytest skip where the config cannot be built
    here for the environment's reason (as tests/projects/test_coverage_matrix.py)."""
    try:
        try:
            recipe = CASES[name].recipe()
            model = recipe.build(recipe.thing and len(recipe.thing),
                                 recipe.stuff and len(recipe.stuff), SOURCE_SEED)
        except Skip:
            raise
        except Exception as e:
            if _compiled_op(e):
                raise Skip(COMPILED_OPS, _compiled_op(e)) from None
            raise
    except Skip as e:
        if e.kind == COMPILED_OPS or (e.kind == MISSING_PACKAGE and e.package
                                      and importlib.util.find_spec(e.package) is None) or (
                e.kind == OUT_OF_SCOPE and name in OUT_OF_SCOPE_CONFIGS):
            pytest.skip(str(e))
        raise
    names = {k: list(v) for k, v in (("thing_classes", recipe.thing),
                                     ("stuff_classes", recipe.stuff)) if v is not None}
    directory = Path(tempfile.mkdtemp(dir=_WORKDIR.name))
    return Arch(name, recipe, model, names, directory)


def save_pth(path: Path, state, names: Optional[Dict[str, List[str]]] = None, **extra) -> str:
    """A d2 ``.pth`` as DetectionCheckpointer / ReclassCheckpointer save it."""
    data = {"model": state, **extra}
    if names:
        data["d2_reclass"] = names
    torch.save(data, path)
    return str(path)


def numpy_state(state):
    """``state`` as numpy arrays, as the model zoo's ``.pkl`` files hold weights."""
    return copy_state_dict(state, [(k, v.numpy()) for k, v in state.items()])


def prefixed(state, prefix: str, root_version: Optional[int] = None):
    """``state`` under a wrapper module named ``prefix[:-1]`` (DDP's ``module.``, a user's
    ``detector.``), ``_metadata`` included, as the wrapper's ``state_dict()`` writes it."""
    out = OrderedDict((prefix + k, v) for k, v in state.items())
    out._metadata = OrderedDict(
        [("", {"version": root_version})] if root_version is not None else [])
    for name, entry in state._metadata.items():
        out._metadata[prefix + name if name else prefix[:-1]] = dict(entry)
    return out


def layout_keys(model) -> set:
    from d2_reclass import find_layouts

    return {lay.key for lay in find_layouts(model)}


# ---------------------------------------------------------------------------------------------
# The paths: each loads one file both ways and returns the InvariantResult
# ---------------------------------------------------------------------------------------------
def check_pth(a: Arch, tmp: Path, changed: bool, *, stored_names: bool = True):
    """A d2 ``.pth``; without stored names, the model's classes are unknown too (MODE auto
    then reinitialises changed heads)."""
    path = a.pth if stored_names else save_pth(tmp / "plain.pth", a.source)
    return check_load_invariant(a.fresh(changed), path,
                                reclass=a.options(changed) if stored_names else None,
                                class_keys=None if changed else set())


def check_pkl(a: Arch, tmp: Path, changed: bool, *, heuristics: bool):
    """A zoo-style ``.pkl``: numpy weights (with the model's ``_metadata``), read as detectron2
    model-zoo files are, or (``heuristics``) matched to the model's keys by name."""
    data = {"model": numpy_state(a.source), "__author__": "Detectron2 Model Zoo"}
    if heuristics:
        data["matching_heuristics"] = True
    path = tmp / "source.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    options = a.options(changed, source_classes=a.names.get("thing_classes"),
                        source_stuff_classes=a.names.get("stuff_classes"))
    return check_load_invariant(a.fresh(changed), str(path), reclass=options,
                                class_keys=None if changed else set())


def check_module_prefix(a: Arch, tmp: Path, changed: bool, *, stored_names: bool = True):
    """A checkpoint saved from a DDP-wrapped model: every key and module under ``module.``."""
    path = save_pth(tmp / "ddp.pth", prefixed(a.source, "module.", root_version=1),
                    a.names if stored_names else None)
    return check_load_invariant(a.fresh(changed), path,
                                reclass=a.options(changed) if stored_names else None,
                                class_keys=None if changed else set())


def check_url(a: Arch, changed: bool):
    """A PathManager URL (a user's storage prefix) with detectron2's ``?matching_heuristics=True``
    query: both loaders resolve it, and both match the keys by name."""
    if StorageHandler.PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(StorageHandler(a.dir))
    PathManager._path_handlers[StorageHandler.PREFIX].root = Path(a.pth).parent
    url = f"{StorageHandler.PREFIX}{Path(a.pth).name}?matching_heuristics=True"
    return check_load_invariant(a.fresh(changed), url, reclass=a.options(changed),
                                class_keys=None if changed else set())


def check_only(a: Arch, tmp: Path, changed: bool, prefix: str = "backbone."):
    """MODEL.RECLASS.ONLY: ReclassCheckpointer loads the prefix from the whole file as stock
    loads a file that holds only the prefix (with the whole file's ``_metadata``)."""
    part = copy_state_dict(a.source, [(k, v) for k, v in a.source.items()
                                      if k.startswith(prefix)])
    stock = save_pth(tmp / "part.pth", part, a.names)
    return check_load_invariant(a.fresh(changed), a.pth,
                                reclass=a.options(changed, only=(prefix,)), stock_path=stock,
                                class_keys=None if changed else set())


def check_rename(a: Arch, tmp: Path, changed: bool):
    """MODEL.RECLASS.RENAME: a file saved from a wrapper (``detector.``) loads, renamed, as
    stock loads the unwrapped model's file."""
    wrapped = save_pth(tmp / "wrapped.pth", prefixed(a.source, "detector.", root_version=3),
                       a.names)
    return check_load_invariant(a.fresh(changed), wrapped,
                                reclass=a.options(changed, rename=("detector.=",)),
                                stock_path=a.pth, class_keys=None if changed else set())


def check_resume(a: Arch, tmp: Path):
    """``--resume``: the run's own last checkpoint (classes unchanged, names stored)."""
    save_pth(tmp / "model_0000004.pth", a.source, a.names, iteration=4)
    (tmp / "last_checkpoint").write_text("model_0000004.pth")
    return check_load_invariant(a.fresh(False), str(tmp / "model_0000004.pth"),
                                reclass=a.options(False), class_keys=set(), resume=True)


def novel_checkpoint(a: Arch, tmp: Path) -> str:
    """A copy of the source fine-tuned on NOVEL in its class layers only: the class tensors of
    a model built for 3 thing classes (the changed target's, plus 1), the rest the source's."""
    model = a.target(True)
    keys = layout_keys(model)
    novel = {k: v + 1.0 for k, v in model.state_dict().items() if k in keys}
    state = copy_state_dict(a.source, [(k, novel.get(k, v)) for k, v in a.source.items()])
    return save_pth(tmp / "novel.pth", state, {"thing_classes": NOVEL})


def combined_target(a: Arch) -> List[str]:
    thing = a.names["thing_classes"]
    return [thing[1], NOVEL[0], thing[0]]


def check_combine(a: Arch, tmp: Path):
    """MODEL.RECLASS.COMBINE: the first checkpoint's non-class tensors, as stock loads it."""
    return check_load_invariant(
        a.fresh(True), a.pth,
        reclass=ReclassOptions(target_classes=combined_target(a),
                               combine=(novel_checkpoint(a, tmp),)))


def check_cli_output(a: Arch, tmp: Path, command: str):
    """A file written by ``d2-reclass convert`` / ``combine`` loads (classes unchanged now)
    with every non-class tensor and module version of the file it came from."""
    out = str(tmp / "out.pth")
    if command == "convert":
        target = a.target_names(True)["thing_classes"]
        argv = ["convert", a.pth, "--out", out, "--classes", ",".join(target)]
    else:
        target = combined_target(a)
        argv = ["combine", a.pth, novel_checkpoint(a, tmp), "--out", out,
                "--classes", ",".join(target)]
    assert cli_main(argv) == 0
    return check_load_invariant(a.fresh(True), out, stock_path=a.pth,
                                reclass=ReclassOptions(target_classes=target))


# ---------------------------------------------------------------------------------------------
# Default suite: each path at least once, on a few archs
# ---------------------------------------------------------------------------------------------
def test_faster_rcnn_pth_classes_unchanged(tmp_path):
    result = check_pth(arch(FASTER), tmp_path, changed=False)
    assert result.report.summary().endswith("thing: unchanged (80 -> 80 classes)")
    assert not result.class_keys and len(result.compared) == len(result.stock_state)
    # FrozenBatchNorm2d's version reached it: the file's _metadata was read, under both.
    assert result.versions["backbone.bottom_up.stem.conv1.norm"] == [3]


def test_faster_rcnn_combine(tmp_path):
    a = arch(FASTER)
    result = check_combine(a, tmp_path)
    assert result.class_keys == {"roi_heads.box_predictor.cls_score.weight",
                                 "roi_heads.box_predictor.cls_score.bias",
                                 "roi_heads.box_predictor.bbox_pred.weight",
                                 "roi_heads.box_predictor.bbox_pred.bias"}
    mapping = result.report.spaces["thing"].mapping
    assert [mapping.checkpoint_of(j) for j in range(3)] == [0, 1, 0]
    # The class rows were mapped (not the stock skip): "person" (index 0) is target row 2.
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(result.reclass_state[key][2], a.source[key][0])


@pytest.mark.parametrize("command", ["convert", "combine"])
def test_faster_rcnn_cli_output(tmp_path, command):
    result = check_cli_output(arch(FASTER), tmp_path, command)
    saved = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert saved._metadata == arch(FASTER).source._metadata
    assert result.report.spaces["thing"].resolution == "unchanged"


def test_mask_rcnn_module_prefix_without_names(tmp_path):
    result = check_module_prefix(arch(MASK), tmp_path, changed=True, stored_names=False)
    assert result.report.spaces["thing"].resolution == "reinit"
    assert result.versions["backbone.bottom_up.res2.0.conv1.norm"] == [3]


def test_mask_rcnn_url_with_matching_heuristics_query():
    result = check_url(arch(MASK), changed=True)
    assert set(map(tuple, result.versions.values())) == {(None,)}  # name matching, as stock
    assert result.report.spaces["thing"].resolution == "map"


def test_cascade_pkl_matching_heuristics_classes_changed(tmp_path):
    result = check_pkl(arch(CASCADE), tmp_path, changed=True, heuristics=True)
    # Name matching makes a plain dict under stock too: no module sees a version.
    assert set(map(tuple, result.versions.values())) == {(None,)}
    assert result.report.spaces["thing"].resolution == "map"


def test_point_rend_zoo_pkl_keeps_metadata(tmp_path):
    """Read by the restricted unpickler, the pickled ``_metadata`` reaches PointRend's
    versioned head as it does under stock ``pickle.load``."""
    result = check_pkl(arch(POINT_REND), tmp_path, changed=True, heuristics=False)
    assert result.versions[COARSE_HEAD] == [2]
    assert result.report.spaces["thing"].resolution == "map"


def test_point_rend_rename_keeps_versions(tmp_path):
    """The reported cause of Mask2Former's pixel decoder staying at init: RENAME copied the
    weights into a plain dict, and versioned modules took the file for an old format."""
    result = check_rename(arch(POINT_REND), tmp_path, changed=False)
    assert result.versions[COARSE_HEAD] == [2]


def test_retinanet_only(tmp_path):
    result = check_only(arch(RETINANET), tmp_path, changed=False)
    # The head was not selected: both models keep their own init there, and it is compared.
    assert "head.cls_subnet.0.weight" in result.compared
    assert torch.equal(result.reclass_state["head.cls_subnet.0.weight"],
                       arch(RETINANET).target(False).state_dict()["head.cls_subnet.0.weight"])


def test_panoptic_fpn_pth_both_spaces_changed(tmp_path):
    result = check_pth(arch(PANOPTIC), tmp_path, changed=True)
    assert {s: r.resolution for s, r in result.report.spaces.items()} == {
        "thing": "map", "stuff": "map"}


def test_panoptic_fpn_resume(tmp_path):
    result = check_resume(arch(PANOPTIC), tmp_path)
    assert result.report is None  # a resume does no surgery
    assert result.versions["backbone.bottom_up.stem.conv1.norm"] == [3]


# ---------------------------------------------------------------------------------------------
# The check itself bites
# ---------------------------------------------------------------------------------------------
def test_check_catches_a_dropped_metadata(tmp_path):
    """Loading a copy of the file without ``_metadata`` is caught: PointRend's coarse head sees
    no version (and renames its keys as for an old file)."""
    a = arch(POINT_REND)
    plain = save_pth(tmp_path / "plain.pth", dict(a.source), a.names)
    with pytest.raises(AssertionError, match=r"stock \[2\], ReclassCheckpointer \[None\]: "
                                             rf"{COARSE_HEAD}$"):
        check_load_invariant(a.fresh(False), plain, reclass=a.options(False), stock_path=a.pth,
                             class_keys=set())


def test_check_catches_a_different_tensor(tmp_path):
    a = arch(FASTER)
    state = copy_state_dict(a.source)
    key = "backbone.fpn_output2.weight"
    state[key] = state[key].clone()
    state[key][0, 0, 0, 0] = -state[key][0, 0, 0, 0]
    other = save_pth(tmp_path / "other.pth", state, a.names)
    with pytest.raises(AssertionError, match=rf"^1 tensors .*: {key} \(max \|diff\|"):
        check_load_invariant(a.fresh(False), other, reclass=a.options(False),
                             stock_path=a.pth, class_keys=set())


def test_recorded_versions_reach_modules_that_skip_the_hooks():
    """PointRend's ConvFCHead overrides ``_load_from_state_dict`` without calling ``super()``,
    so a load-state-dict pre-hook never runs for it; the recorder sees its version anyway."""
    a = arch(POINT_REND)
    model = a.target(False)
    hooked = []
    handle = model.roi_heads.mask_head.coarse_head.register_load_state_dict_pre_hook(
        lambda module, sd, prefix, meta, *rest: hooked.append(meta.get("version")))
    try:
        with recorded_versions(model) as seen:
            model.load_state_dict(model.state_dict())
    finally:
        handle.remove()
    assert hooked == [] and seen[COARSE_HEAD] == [2]


# ---------------------------------------------------------------------------------------------
# The whole matrix
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_config(name, tmp_path):
    """Every buildable config: .pth with names (classes unchanged and changed), without names
    (changed: reinit), a name-matched .pkl, a ``module.`` prefix and a RENAME."""
    a = arch(name)
    checks = [lambda d: check_pth(a, d, changed=False),
              lambda d: check_pth(a, d, changed=True),
              lambda d: check_pth(a, d, changed=True, stored_names=False),
              lambda d: check_pkl(a, d, changed=True, heuristics=True),
              lambda d: check_module_prefix(a, d, changed=False),
              lambda d: check_rename(a, d, changed=True)]
    try:
        for i, check in enumerate(checks):
            d = tmp_path / str(i)
            d.mkdir()
            try:
                check(d)
            finally:
                # Each check's files go as it ends: with the X101 and LVIS models a config
                # wrote about 1.2 GB, and the matrix filled the disk before its end.
                shutil.rmtree(d)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
        arch.cache_clear()  # one config's models at a time
