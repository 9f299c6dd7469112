"""The coverage matrix (benchmarks/coverage_matrix.py) as tests.

Default suite: one representative config per family (Faster R-CNN, Mask R-CNN, RetinaNet, Cascade,
Panoptic FPN, keypoint R-CNN). ``-m slow``: every config of the matrix, one test each.

A config must be ``ok``: every class-dependent tensor mapped with the right rows, nothing skipped
by fvcore, an eval forward pass with 3 classes. ``skipped`` is accepted only where the reason is
the environment's, not d2_reclass's: detectron2 built without its compiled ops (deformable conv),
or an optional package that is really not importable (mmdet, cv2); and for the one zoo config
that is not a detection model, named below.
"""
import importlib.util

import pytest
import torch  # noqa: E402
from zoo_cases import (  # noqa: E402
    COMPILED_OPS,
    FAST,
    MISSING_PACKAGE,
    OUT_OF_SCOPE,
    OUT_OF_SCOPE_CONFIGS,
    CheckFailed,
    _check_tensor,
    list_cases,
    run_case,
)

from d2_reclass import ClassLayout, InitSpec  # noqa: E402

CASES = {case.name: case for case in list_cases()}


def _check(name: str) -> None:
    result = run_case(CASES[name])
    if result.status == "skipped":
        if result.skip_kind == COMPILED_OPS:
            pytest.skip(result.reason)
        # mmdet for the mmdet wrapper config, cv2 for PointRend: only if really not installed.
        if result.skip_kind == MISSING_PACKAGE and result.package and \
                importlib.util.find_spec(result.package) is None:
            pytest.skip(result.reason)
        if result.skip_kind == OUT_OF_SCOPE and name in OUT_OF_SCOPE_CONFIGS:
            pytest.skip(result.reason)
    assert result.status == "ok", f"{name}: {result.status} [{result.skip_kind}] {result.reason}"


def test_fast_subset_is_in_the_matrix():
    assert set(FAST) <= set(CASES)
    assert len(CASES) > 100  # every zoo config, the LazyConfigs and the projects were found


def test_row_check_catches_wrong_rows():
    """The matrix's own oracle: RetinaNet-like layout (2 anchors x classes, 1 leading entry)."""
    lay = ClassLayout("w", "thing", 3, InitSpec("constant", 0.0), repeat=2, offset=1)
    source, target = ["a", "b", "c", "d"], ["b", "a", "new"]
    src = torch.arange(1 + 2 * 4, dtype=torch.float32).view(-1, 1).expand(-1, 5).contiguous()
    rows = [0, 1 + 1, 1 + 0, -1, 1 + 4 + 1, 1 + 4 + 0, -1]  # a*K + k, "new" fresh (-1)
    good = torch.stack([src[r] if r >= 0 else torch.full((5,), -7.0) for r in rows])
    names = {"thing": (source, target)}
    _check_tensor("w", [lay], src, good.shape, good, names)
    # anchors swapped; anchor 1 read as anchor 0; the leading entry not carried
    for wrong in ([0, 2, 1, -1, 5, 6, -1], [0, 2, 1, -1, 2, 1, -1], [1, 2, 1, -1, 6, 5, -1]):
        bad = torch.stack([src[r] if r >= 0 else torch.full((5,), -7.0) for r in wrong])
        with pytest.raises(CheckFailed):
            _check_tensor("w", [lay], src, bad.shape, bad, names)
    with pytest.raises(CheckFailed, match="implies"):  # a layout that does not fit the shapes
        _check_tensor("w", [lay], src[:-1], good.shape, good, names)


@pytest.mark.parametrize("name", FAST)
def test_representative_config(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_config(name):
    _check(name)
