"""Shared helpers for the engine tests: real detectron2 models, built small-and-seeded on the CPU.

Models come from detectron2's own model-zoo configs with random weights (no download): the
engine only cares about shapes and about which rows end up where, and a freshly built model also
carries each head's own init, against which fresh rows are compared.

Import the plain helpers with ``from conftest import ...`` (pytest puts ``tests/`` on sys.path).
"""
import functools
import logging
import math
from typing import Dict, List, Optional, Sequence

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model as d2_build_model

from d2_reclass.engine.surgery import ClassSpec, reclass_state_dict
from d2_reclass.layouts import find_layouts

FASTER_RCNN = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
CASCADE = "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
FCOS = "COCO-Detection/fcos_R_50_FPN_1x.py"
PANOPTIC_FPN = "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml"
SEMANTIC_FPN = "Misc/semantic_R_50_FPN_1x.yaml"
KEYPOINT_RCNN = "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"

#: The 80 COCO thing classes, in detectron2's contiguous-id order.
COCO_CLASSES: List[str] = list(MetadataCatalog.get("coco_2017_train").thing_classes)
#: The 54 COCO panoptic stuff classes (index 0 is the merged "things").
COCO_STUFF: List[str] = list(
    MetadataCatalog.get("coco_2017_train_panoptic_separated").stuff_classes)
#: The target used throughout: two COCO classes in a new order, then a class COCO never had.
TARGET = ["dog", "person", "gadget"]
#: For each TARGET class, the COCO index whose rows it must receive (None: fresh).
TARGET_SOURCE = [COCO_CLASSES.index("dog"), COCO_CLASSES.index("person"), None]
#: The stuff target: two COCO stuff classes in a new order, then a new one.
STUFF_TARGET = ["sky", "things", "lava"]
STUFF_SOURCE = [COCO_STUFF.index("sky"), 0, None]
#: RetinaNet/FCOS's prior-probability bias, -log((1 - 0.01) / 0.01).
PRIOR_BIAS = -math.log(99.0)


def build_model(config_name: str, num_classes: Optional[int] = None, *, seed: int = 0,
                stuff_classes: Optional[int] = None, **overrides) -> torch.nn.Module:
    """A detectron2 model from a model-zoo config, on the CPU, in eval mode, seeded.

    Args:
        config_name: a model-zoo config (``.yaml``, or a ``.py`` LazyConfig such as FCOS).
        num_classes: thing classes (ROI_HEADS and RETINANET; ``model.num_classes`` for a
            LazyConfig); None keeps the config's.
        seed: the global seed the weights are drawn with.
        stuff_classes: MODEL.SEM_SEG_HEAD.NUM_CLASSES, for semantic / panoptic configs.
        overrides: further config keys with ``__`` for dots, e.g.
            ``MODEL__FPN__OUT_CHANNELS=128``.
    """
    torch.manual_seed(seed)
    if config_name.endswith(".py"):
        cfg = LazyConfig.load(model_zoo.get_config_file(config_name))
        if num_classes is not None:
            cfg.model.num_classes = num_classes
        model = instantiate(cfg.model)
        return model.eval()
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_name))
    cfg.MODEL.DEVICE = "cpu"
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    if stuff_classes is not None:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = stuff_classes
    opts = []
    for key, value in overrides.items():
        opts += [key.replace("__", "."), value]
    cfg.merge_from_list(opts)
    return d2_build_model(cfg).eval()


def point_rend_cfg(num_classes: int, semantic: bool = False, implicit: bool = False):
    """A PointRend config built in code (the project's YAMLs are not installed with detectron2).

    Instance: Mask R-CNN R50-FPN with PointRendROIHeads / PointRendMaskHead, as
    projects/PointRend/configs/InstanceSegmentation/Base-PointRend-RCNN-FPN.yaml sets it.
    Implicit: the same with ImplicitPointRendMaskHead / ImplicitPointHead, as
    Base-Implicit-PointRend.yaml sets it. Semantic: the semantic FPN with PointRendSemSegHead
    around a SemSegFPNHead.
    """
    point_rend = pytest.importorskip(
        "detectron2.projects.point_rend",
        reason="detectron2.projects.point_rend imports cv2 (OpenCV), which this environment lacks",
    )
    cfg = get_cfg()
    point_rend.add_pointrend_config(cfg)
    if semantic:
        cfg.merge_from_file(model_zoo.get_config_file(SEMANTIC_FPN))
        cfg.MODEL.SEM_SEG_HEAD.NAME = "PointRendSemSegHead"
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    else:
        cfg.merge_from_file(model_zoo.get_config_file(MASK_RCNN))
        cfg.MODEL.ROI_HEADS.NAME = "PointRendROIHeads"
        cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
        cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""
        cfg.MODEL.ROI_MASK_HEAD.IN_FEATURES = ["p2"]
        cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
        cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES = True
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        cfg.INPUT.MASK_FORMAT = "bitmask"
    if implicit:  # standard ROI heads: the implicit mask head needs no point-sampled boxes
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_MASK_HEAD.NAME = "ImplicitPointRendMaskHead"
        cfg.MODEL.ROI_MASK_HEAD.FC_DIM = 1024
        cfg.MODEL.ROI_MASK_HEAD.NUM_FC = 2
        cfg.MODEL.POINT_HEAD.NAME = "ImplicitPointHead"
        cfg.MODEL.POINT_HEAD.FC_DIM = 256
        cfg.MODEL.POINT_HEAD.NUM_FC = 3
        cfg.MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS = 784
    cfg.MODEL.POINT_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.POINT_HEAD.IN_FEATURES = ["p2"]
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def build_point_rend(num_classes: int, *, semantic: bool = False, implicit: bool = False,
                     seed: int = 0, **point_head) -> torch.nn.Module:
    """A PointRend model (see :func:`point_rend_cfg`); ``point_head`` sets MODEL.POINT_HEAD keys."""
    cfg = point_rend_cfg(num_classes, semantic, implicit)
    for key, value in point_head.items():
        setattr(cfg.MODEL.POINT_HEAD, key, value)
    torch.manual_seed(seed)
    return d2_build_model(cfg).eval()


@functools.lru_cache(maxsize=None)
def _cached_state(config_name: str, num_classes: Optional[int], stuff_classes: Optional[int],
                  seed: int, overrides: tuple) -> Dict[str, torch.Tensor]:
    model = build_model(config_name, num_classes, seed=seed, stuff_classes=stuff_classes,
                        **dict(overrides))
    return model.state_dict()


def source_state(config_name: str, num_classes: Optional[int] = None, *, seed: int = 0,
                 stuff_classes: Optional[int] = None, **overrides) -> Dict[str, torch.Tensor]:
    """The state dict of ``build_model(...)``, built once per session.

    Shared between tests: the engine never modifies its input (tests assert that), and no test
    may write into it.
    """
    return _cached_state(config_name, num_classes, stuff_classes, seed,
                         tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def point_rend_state(num_classes: int, semantic: bool = False,
                     implicit: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict of ``build_point_rend(num_classes, ...)``, built once."""
    return build_point_rend(num_classes, semantic=semantic, implicit=implicit).state_dict()


def entries(source_index: Sequence[Optional[int]], num_source: int, *, block: int = 1,
            repeat: int = 1, offset: int = 0, background: bool = False):
    """Where every entry of a class axis must come from, restated from detectron2's layouts.

    The axis is ``offset`` non-class entries, then ``repeat`` x (K blocks of ``block`` entries,
    plus a background block when ``background``), class-major. Returns ``(dst, src, fresh)``:
    target entries ``dst`` copy source entries ``src``; ``fresh`` target entries have no source.
    The background block is carried from the source's background block.
    """
    classes = list(source_index) + ([num_source] if background else [])
    per_target = (len(source_index) + int(background)) * block
    per_source = (num_source + int(background)) * block
    dst, src, fresh = list(range(offset)), list(range(offset)), []
    for a in range(repeat):
        for j, s in enumerate(classes):
            for b in range(block):
                t = offset + a * per_target + j * block + b
                if s is None:
                    fresh.append(t)
                else:
                    dst.append(t)
                    src.append(offset + a * per_source + s * block + b)
    return dst, src, fresh


def assert_rows(new: torch.Tensor, src: torch.Tensor, dst_idx, src_idx, axis: int = 0) -> None:
    """Entries ``dst_idx`` of ``new`` along ``axis`` are bit-identical to ``src_idx`` of ``src``."""
    assert len(dst_idx) == len(src_idx) > 0
    got = new.index_select(axis, torch.as_tensor(dst_idx, dtype=torch.long))
    want = src.index_select(axis, torch.as_tensor(src_idx, dtype=torch.long))
    assert torch.equal(got, want)


def pick(t: torch.Tensor, idx, axis: int = 0) -> torch.Tensor:
    """Entries ``idx`` of ``t`` along ``axis``."""
    return t.index_select(axis, torch.as_tensor(idx, dtype=torch.long))


def reclass(state_dict, model, classes: Optional[Dict[str, ClassSpec]] = None, **kw):
    """Run the engine against ``model`` (its state dict and layouts)."""
    return reclass_state_dict(state_dict, model.state_dict(), find_layouts(model),
                              classes=classes, **kw)


def thing(source: Optional[Sequence[str]] = COCO_CLASSES,
          target: Optional[Sequence[str]] = TARGET, class_map=None) -> Dict[str, ClassSpec]:
    """``classes=`` for the thing space (default: COCO -> TARGET)."""
    return {"thing": ClassSpec(source, target, class_map)}


def assert_std(values: torch.Tensor, expected: float, sigmas: float = 6.0) -> None:
    """``values`` look drawn from N(0, expected): sample std and mean within ``sigmas`` errors.

    The standard error of a normal sample's std is about ``expected / sqrt(2 n)``, so the
    tolerance is tight for many values and loose for a single fresh row. (Fresh draws are
    seeded, so this never flakes; the bound only says how much a wrong init could hide.)
    """
    values = values.detach().double().flatten()
    n = values.numel()
    std, mean = float(values.std()), float(values.mean())
    assert abs(std - expected) <= expected * (sigmas / math.sqrt(2 * (n - 1)) + 0.01), (
        f"std {std:.6g} of {n} values, expected {expected:.6g}")
    assert abs(mean) <= sigmas * expected / math.sqrt(n), f"mean {mean:.6g} of {n} values"


def msra_std(weight_shape: Sequence[int]) -> float:
    """The std of kaiming_normal_(mode="fan_out", relu), as c2_msra_fill draws it."""
    fan_out = weight_shape[0] * math.prod(weight_shape[2:])
    return math.sqrt(2.0 / fan_out)


@pytest.fixture(scope="session")
def coco_classes() -> List[str]:
    return COCO_CLASSES


@pytest.fixture
def caplog(caplog):
    """pytest's caplog, also attached to the ``d2_reclass`` logger.

    That logger does not propagate (its lines go to detectron2's handlers, once): caplog's
    root handler would see them only until some test sets up detectron2's logging.
    """
    package = logging.getLogger("d2_reclass")
    package.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        package.removeHandler(caplog.handler)
