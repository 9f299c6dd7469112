"""Mask2Former with d2_reclass, on the CPU, with the registry's real ``maskformer2==0.1`` package.

The user's entry point is upstream Mask2Former's ``train_net.py``, which is not part of the
package: :class:`Mask2FormerTrainer`, :func:`setup` and :func:`main` below are written as it
writes them (its ``Trainer(DefaultTrainer)`` choosing the package's dataset mapper by
``INPUT.DATASET_MAPPER_NAME``, its AdamW optimizer with the backbone multiplier, per-type weight
decay and full-model gradient clipping, DeepLab's LR scheduler, its evaluators by
``evaluator_type``; ``setup`` calling ``add_deeplab_config`` and ``add_maskformer2_config``; the
``--eval-only`` path building with ``Trainer.build_model`` and loading with a stock
``DetectionCheckpointer``). The README's integration lines are added: ``add_reclass_config(cfg)``
in ``setup`` and ``class Trainer(ReclassTrainerMixin, Mask2FormerTrainer)``.

One line differs from upstream, for the package: its ``MaskFormer.from_config`` passes
``weight_dict=`` to its own ``SetCriterion``, which does not take it, so
``Mask2FormerTrainer.build_model`` builds the meta-architecture from the package's classes with
explicit arguments (``benchmarks/mask2former_configs.build_mask2former``, upstream's weight dict).

Configs are upstream's R50 configs rebuilt in code (the package ships none; see
``benchmarks/mask2former_configs.py``), shrunk (10 queries, 3 decoder layers, 1 encoder layer,
FFN 256, 64-pixel images), written to a YAML file that ``setup`` merges as upstream's does. Per
task (panoptic, semantic, instance), one module-scoped run builds the trainer from a source
checkpoint of other classes, loads (``resume_or_load(resume=False)``), and trains 2 iterations at
BASE_LR 0, so the saved weights must be exactly the loaded ones.
"""
import json
import math
import os
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from conftest import assert_rows, entries
from d2_fixtures import SIX, THREE, THREE_FROM_SIX
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data.datasets import load_sem_seg, register_coco_instances, register_coco_panoptic
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.projects.deeplab import add_deeplab_config, build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from load_invariant import check_load_invariant
from PIL import Image, ImageDraw
from shims import install_project_shims

from d2_reclass import (
    NewClassExamples,
    ReclassCheckpointer,
    ReclassOptions,
    ReclassTrainerMixin,
    add_reclass_config,
)
from d2_reclass.data.synthetic import make_shapes_dataset
from d2_reclass.errors import ClassListError
from d2_reclass.layouts import STUFF, THING
from d2_reclass.layouts.mask2former import task_space
from d2_reclass.new_classes import init_new_classes

install_project_shims()
mask2former = pytest.importorskip(
    "mask2former", reason="maskformer2 is not installed (make setup installs "
    "requirements/projects.txt)")
from mask2former import (  # noqa: E402
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    add_maskformer2_config,
)
from mask2former_configs import TINY, build_mask2former, mask2former_cfg  # noqa: E402

PANOPTIC = "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"
SEMANTIC = "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
INSTANCE = "coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml"
CLASS_EMBED = "sem_seg_head.predictor.class_embed."
EMPTY_WEIGHT = "criterion.empty_weight"
HIDDEN_DIM = 256  # MASK_FORMER.HIDDEN_DIM: class_embed's input width
IGNORE = 255

# ---------------------------------------------------------------------------------------------
# Mask2Former's train_net.py, as upstream writes it, with the README's lines
# ---------------------------------------------------------------------------------------------

_MAPPERS = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
}
_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
          torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
          torch.nn.InstanceNorm3d, torch.nn.LayerNorm, torch.nn.LocalResponseNorm)


class Mask2FormerTrainer(DefaultTrainer):
    """Upstream train_net.py's ``Trainer`` (the evaluators of the dataset types used here)."""

    @classmethod
    def build_model(cls, cfg):
        # Not in upstream's train_net.py: maskformer2's MaskFormer.from_config cannot build
        # (see the module docstring), so the model is built from its classes explicitly.
        return build_mask2former(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        evaluators = []
        if evaluator_type == "sem_seg":
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True,
                                              output_dir=output_folder))
        if evaluator_type == "coco":
            evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder))
        if not evaluators:
            raise NotImplementedError(f"no Evaluator for {dataset_name} of type {evaluator_type}")
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = _MAPPERS.get(cfg.INPUT.DATASET_MAPPER_NAME)
        return build_detection_train_loader(cfg, mapper=mapper(cfg, True) if mapper else None)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_optimizer(cls, cfg, model):
        params: List[Dict[str, Any]] = []
        seen = set()
        for module_name, module in model.named_modules():
            for name, value in module.named_parameters(recurse=False):
                if not value.requires_grad or value in seen:
                    continue
                seen.add(value)
                group = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
                if "backbone" in module_name:
                    group["lr"] *= cfg.SOLVER.BACKBONE_MULTIPLIER
                if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                    group["weight_decay"] = 0.0
                if isinstance(module, _NORMS):
                    group["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_NORM
                if isinstance(module, torch.nn.Embedding):
                    group["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
                params.append({"params": [value], **group})
        clip = cfg.SOLVER.CLIP_GRADIENTS
        full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0.0
        optim = {"SGD": torch.optim.SGD, "ADAMW": torch.optim.AdamW}[cfg.SOLVER.OPTIMIZER]
        if full_model:
            optim = _clip_full_model(optim, clip.CLIP_VALUE)
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM} if cfg.SOLVER.OPTIMIZER == "SGD" else {}
        optimizer = optim(params, cfg.SOLVER.BASE_LR, **kwargs)
        if clip.CLIP_TYPE != "full_model":
            optimizer = maybe_add_gradient_clipping(cfg, optimizer)
        return optimizer


def _clip_full_model(optim: type, max_norm: float) -> type:
    class FullModelGradientClippingOptimizer(optim):
        def step(self, closure=None):
            torch.nn.utils.clip_grad_norm_(
                [p for group in self.param_groups for p in group["params"]], max_norm)
            super().step(closure=closure)

    return FullModelGradientClippingOptimizer


class Trainer(ReclassTrainerMixin, Mask2FormerTrainer):
    """The README's one line."""


def setup(args) -> CfgNode:
    """Upstream's ``setup(args)`` with ``add_reclass_config`` (the README's line); frozen."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_reclass_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def main(args):
    """Upstream's ``main(args)`` (no test-time augmentation)."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def args_for(config_file: str, opts: Sequence, *, eval_only: bool = False):
    """What upstream's ``default_argument_parser().parse_args()`` gives ``main``."""
    return SimpleNamespace(config_file=str(config_file), opts=list(opts), eval_only=eval_only,
                           resume=False)


#: Training on the CPU: 2 iterations of 2 images at BASE_LR 0 (the saved weights are the loaded
#: ones), with upstream's solver (AdamW, weight decay, full-model gradient clipping).
TRAIN_OPTS = [
    "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.MAX_ITER", 2, "SOLVER.BASE_LR", 0.0, "SOLVER.CHECKPOINT_PERIOD", 1000,
    "SOLVER.WEIGHT_DECAY", 0.05, "SOLVER.WARMUP_ITERS", 0,
    "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.01,
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 128,
]


def write_config(name: str, path) -> str:
    """The user's config file: upstream's config ``name``, shrunk (TINY), as YAML."""
    path.write_text(mask2former_cfg(name, TINY).dump())
    return str(path)


def save_source(name: str, path, num_classes: int, opts: Sequence = ()) -> Dict[str, torch.Tensor]:
    """A source checkpoint: config ``name`` (shrunk) with ``num_classes``, built seeded, saved
    as a plain ``{"model": state_dict}`` that stores no class names; returns the state dict."""
    cfg = mask2former_cfg(name, TINY + ["MODEL.DEVICE", "cpu",
                                        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes, *opts])
    torch.manual_seed(1)
    state = build_mask2former(cfg).state_dict()
    torch.save({"model": state}, path)
    return state


def run_trainer(config_file: str, opts: Sequence, source, out) -> SimpleNamespace:
    """Upstream's training path (``Trainer(cfg)``, ``resume_or_load(resume=False)``, ``train``)
    with a snapshot of the weights right after the load."""
    cfg = setup(args_for(config_file, list(opts) + ["OUTPUT_DIR", str(out)]))
    before = cfg.dump()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    loaded = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    return SimpleNamespace(cfg=cfg, user_cfg_before=before, trainer=trainer, loaded=loaded,
                           source=source, out=out, config_file=config_file)


def final_checkpoint(run) -> Dict:
    return torch.load(run.out / "model_final.pth", weights_only=True)


def report_of(run) -> Dict:
    return json.loads((run.out / "reclass_report.json").read_text())


def assert_saved_exactly_the_loaded_weights(run) -> None:
    """At BASE_LR 0 the trainer's model_final.pth holds the loaded tensors, bit for bit."""
    final = final_checkpoint(run)["model"]
    assert final.keys() == run.loaded.keys()
    for key, value in run.loaded.items():
        assert torch.equal(final[key], value), key


def assert_trained(run, losses: Sequence[str]) -> None:
    """Two iterations ran and every Mask2Former loss (the last layer's and each auxiliary
    layer's) is finite."""
    trainer = run.trainer
    assert trainer.iter == 2
    latest = trainer.storage.latest()
    for loss in losses:
        assert len(trainer.storage.history(loss).values()) == 2, loss
        assert np.isfinite(latest[loss][0]), loss


#: The losses of the shrunk model: the last layer's and 3 auxiliary sets (DEC_LAYERS 4).
LOSSES = [f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")]


def assert_new_row(new: torch.Tensor, src: torch.Tensor, row: int) -> None:
    """Row ``row`` is fresh from nn.Linear's default init (class_embed's own: U(-b, b) with
    b = 1/sqrt(fan_in) for weight and bias), not any source row."""
    bound = 1.0 / math.sqrt(HIDDEN_DIM)
    values = new[row]
    assert bool((values.abs() <= bound).all())
    assert not any(torch.equal(values, r) for r in src)
    if values.numel() > 1:  # the weight row: spread as U(-b, b), std b / sqrt(3)
        assert abs(float(values.std()) - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3)


def assert_class_embed(run, source_index: List[Optional[int]], num_source: int) -> None:
    """class_embed's rows: kept classes bit for bit from their source rows, the "no object"
    row (last) carried over, new classes fresh from the head's init."""
    new, src = run.loaded, run.source
    dst, idx, fresh = entries(source_index, num_source, background=True)
    for part in ("weight", "bias"):
        key = CLASS_EMBED + part
        assert new[key].shape[0] == len(source_index) + 1
        assert_rows(new[key], src[key], dst, idx)
        assert dst[-1] == len(source_index) and idx[-1] == num_source  # the no-object row
        for row in fresh:
            assert_new_row(new[key], src[key], row)


# ---------------------------------------------------------------------------------------------
# Datasets: tiny scenes, real files, registered with detectron2's stock functions
# ---------------------------------------------------------------------------------------------

#: Panoptic: the checkpoint's classes (stuff list, things first), the dataset's, and for each
#: dataset class its checkpoint index (None: new).
PAN_SOURCE = ["person", "car", "dog", "sky", "grass", "road"]
PAN_THINGS = ["dog", "person", "robot"]
PAN_STUFF_ONLY = ["road", "sky"]
PAN_TARGET = PAN_THINGS + PAN_STUFF_ONLY
PAN_FROM_SOURCE = [2, 0, None, 5, 3]
#: Semantic: the checkpoint's stuff classes and the dataset's.
SEM_SOURCE = ["sky", "grass", "road", "water", "sand"]
SEM_TARGET = ["road", "sky", "lava"]
SEM_FROM_SOURCE = [2, 0, None]
COLOURS = {"road": (90, 90, 90), "sky": (120, 170, 230), "lava": (230, 80, 20),
           "dog": (200, 150, 60), "person": (220, 40, 40), "robot": (40, 200, 60)}


def _scene(rng: np.random.Generator, size: int = 64):
    """An image of sky above road with up to two things, and its segments as (name, mask)."""
    horizon = int(rng.integers(20, 40))
    segments = [("sky", np.arange(size)[:, None] < horizon), ("road", None)]
    things = []
    for name in rng.choice(PAN_THINGS, size=int(rng.integers(1, 3)), replace=False):
        x, y = (int(v) for v in rng.integers(4, size - 24, size=2))
        mask = Image.new("L", (size, size))
        ImageDraw.Draw(mask).rectangle([x, y, x + 16, y + 16], fill=1)
        things.append((str(name), np.asarray(mask, dtype=bool)))
    covered = np.zeros((size, size), dtype=bool)
    for _, mask in things:
        covered |= mask
    sky = segments[0][1] & ~covered
    road = ~segments[0][1] & ~covered
    segments = [("sky", sky), ("road", road)] + things
    image = np.zeros((size, size, 3))
    for name, mask in segments:
        image[mask] = COLOURS[name]
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    return image, segments


def write_panoptic_split(root, split: str, num_images: int, seed: int) -> Dict[str, str]:
    """COCO-panoptic files: JPEG images, panoptic PNGs and their JSON (category ids 1..5 in
    PAN_TARGET's order)."""
    rng = np.random.default_rng(seed)
    image_dir, pan_dir = root / f"{split}_images", root / f"{split}_panoptic"
    image_dir.mkdir()
    pan_dir.mkdir()
    images, annotations = [], []
    for i in range(num_images):
        image, segments = _scene(rng)
        Image.fromarray(image).save(image_dir / f"{i}.jpg", quality=95)
        pan = np.zeros(image.shape, dtype=np.uint8)
        info = []
        for sid, (name, mask) in enumerate(segments, start=1):
            if not mask.any():
                continue
            pan[mask] = (sid % 256, sid // 256, 0)
            ys, xs = np.nonzero(mask)
            info.append({"id": sid, "category_id": PAN_TARGET.index(name) + 1, "iscrowd": 0,
                         "area": int(mask.sum()), "bbox": [int(xs.min()), int(ys.min()),
                                                           int(np.ptp(xs)) + 1,
                                                           int(np.ptp(ys)) + 1]})
        Image.fromarray(pan).save(pan_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64})
        annotations.append({"image_id": i, "file_name": f"{i}.png", "segments_info": info})
    categories = [{"id": c + 1, "name": n, "isthing": int(n in PAN_THINGS)}
                  for c, n in enumerate(PAN_TARGET)]
    json_file = root / f"{split}_panoptic.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": categories}))
    return {"image_root": str(image_dir), "panoptic_root": str(pan_dir),
            "panoptic_json": str(json_file)}


def register_panoptic(name: str, files: Dict[str, str]) -> None:
    """detectron2's ``register_coco_panoptic`` with the metadata Mask2Former's COCO panoptic
    datasets carry: every class in ``stuff_classes`` (things too), things in ``thing_classes``,
    contiguous ids in that one order."""
    things = {c + 1: c for c, n in enumerate(PAN_TARGET) if n in PAN_THINGS}
    stuff = {c + 1: c for c, n in enumerate(PAN_TARGET) if n not in PAN_THINGS}
    metadata = {"thing_classes": PAN_THINGS, "stuff_classes": PAN_TARGET,
                "thing_dataset_id_to_contiguous_id": things,
                "stuff_dataset_id_to_contiguous_id": stuff}
    register_coco_panoptic(name, metadata, files["image_root"], files["panoptic_root"],
                           files["panoptic_json"])


def write_sem_seg_split(root, split: str, num_images: int, seed: int):
    """Images of road, sky and a lava rectangle, with PNG label maps (an IGNORE border row)."""
    rng = np.random.default_rng(seed)
    image_dir, label_dir = root / f"{split}_images", root / f"{split}_labels"
    image_dir.mkdir()
    label_dir.mkdir()
    for i in range(num_images):
        label = np.zeros((64, 64), dtype=np.uint8)
        label[: int(rng.integers(16, 40))] = SEM_TARGET.index("sky")
        y, x = (int(v) for v in rng.integers(8, 40, size=2))
        label[y:y + 16, x:x + 20] = SEM_TARGET.index("lava")
        label[0, :] = IGNORE
        image = np.zeros((64, 64, 3))
        for c, name in enumerate(SEM_TARGET):
            image[label == c] = COLOURS[name]
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(image_dir / f"{i}.png")
        Image.fromarray(label).save(label_dir / f"{i}.png")
    return image_dir, label_dir


def register_sem_seg(name: str, image_dir, label_dir) -> None:
    """detectron2's ``load_sem_seg``, with the metadata Mask2Former's mapper and SemSegEvaluator
    read."""
    DatasetCatalog.register(name, lambda: load_sem_seg(str(label_dir), str(image_dir), "png",
                                                       "png"))
    MetadataCatalog.get(name).set(stuff_classes=SEM_TARGET, ignore_label=IGNORE,
                                  evaluator_type="sem_seg", image_root=str(image_dir),
                                  sem_seg_root=str(label_dir))


# ---------------------------------------------------------------------------------------------
# Panoptic: the stuff list (things included), COCO-panoptic LSJ mapper
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def panoptic(tmp_path_factory):
    """A 5-class panoptic dataset (3 things, 2 stuff), a 6-class panoptic checkpoint, and the
    trainer mapping it with SOURCE_STUFF_CLASSES."""
    root = tmp_path_factory.mktemp("m2f_panoptic")
    register_panoptic("m2f_pan_train", write_panoptic_split(root, "train", 4, seed=1))
    source = save_source(PANOPTIC, root / "six.pth", len(PAN_SOURCE))
    config_file = write_config(PANOPTIC, root / "panoptic.yaml")
    opts = TRAIN_OPTS + [
        "MODEL.WEIGHTS", str(root / "six.pth"), "MODEL.RECLASS.SOURCE_STUFF_CLASSES", PAN_SOURCE,
        "DATASETS.TRAIN", ("m2f_pan_train",), "DATASETS.TEST", (),
    ]
    return run_trainer(config_file, opts, source, root / "out")


def test_panoptic_class_embed_maps_the_stuff_list_by_name(panoptic):
    """class_embed follows the stuff list (things included): "dog", "person", "road", "sky"
    bit for bit from their checkpoint rows, "robot" fresh, the no-object row carried over; the
    report names the layout and the mapping."""
    assert_class_embed(panoptic, PAN_FROM_SOURCE, len(PAN_SOURCE))
    report = report_of(panoptic)
    kept = report["spaces"]["stuff"]["mapping"]["kept"]
    assert [(k["target"], k["source_index"]) for k in kept] == [
        ("dog", 2), ("person", 0), ("road", 5), ("sky", 3)]
    assert report["spaces"]["stuff"]["mapping"]["new"] == ["robot"]
    assert "thing" not in report["spaces"] or not report["spaces"]["thing"]["mapping"]
    actions = {t["key"]: t for t in report["tensors"]}
    for part in ("weight", "bias"):
        action = actions[CLASS_EMBED + part]
        assert action["space"] == "stuff" and action["action"] == "mapped"
        assert (action["copied"], action["fresh"]) == (5, 1)
        assert "no object" in action["layout"]


def test_panoptic_empty_weight_is_the_models_own(panoptic):
    """The criterion's empty_weight (1 per class, NO_OBJECT_WEIGHT for "no object") is the
    model's own, for the target's 5 classes."""
    assert torch.equal(panoptic.loaded[EMPTY_WEIGHT], torch.tensor([1.0] * 5 + [0.1]))
    action = {t["key"]: t for t in report_of(panoptic)["tensors"]}[EMPTY_WEIGHT]
    assert action["action"] == "model's own"


def test_panoptic_trains_with_auto_num_classes_and_saves_the_loaded_weights(panoptic):
    """AUTO_NUM_CLASSES set SEM_SEG_HEAD.NUM_CLASSES to the stuff list's 5 (the user's frozen
    133-class config unchanged); two iterations of every loss; model_final.pth holds exactly
    the loaded weights and both class lists."""
    assert panoptic.trainer.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 5
    assert panoptic.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 133
    assert panoptic.cfg.is_frozen() and panoptic.cfg.dump() == panoptic.user_cfg_before
    assert panoptic.trainer.model.sem_seg_head.num_classes == 5
    assert_trained(panoptic, LOSSES)
    assert_saved_exactly_the_loaded_weights(panoptic)
    assert final_checkpoint(panoptic)["d2_reclass"] == {"thing_classes": PAN_THINGS,
                                                         "stuff_classes": PAN_TARGET}


def test_panoptic_wrong_num_classes_names_the_sem_seg_head_key(panoptic, tmp_path):
    """With AUTO_NUM_CLASSES off, the config's 133 classes are compared with the stuff list's 5
    (not the 3 things) and the message names MODEL.SEM_SEG_HEAD.NUM_CLASSES, never RetinaNet."""
    cfg = setup(args_for(panoptic.config_file, TRAIN_OPTS + [
        "MODEL.WEIGHTS", str(panoptic.out / "model_final.pth"),
        "MODEL.RECLASS.AUTO_NUM_CLASSES", False, "DATASETS.TRAIN", ("m2f_pan_train",),
        "DATASETS.TEST", (), "OUTPUT_DIR", str(tmp_path)]))
    trainer = Trainer(cfg)
    with pytest.raises(ClassListError, match=r"built for 133 classes .* has 5\. "
                       r"Set MODEL\.SEM_SEG_HEAD\.NUM_CLASSES 5") as e:
        trainer.resume_or_load(resume=False)
    assert "RETINANET" not in str(e.value) and "ROI_HEADS" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Semantic: the stuff list, MaskFormer semantic mapper
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def semantic(tmp_path_factory):
    """A 3-class semantic dataset (road, sky, lava), a 5-class checkpoint, the trainer."""
    root = tmp_path_factory.mktemp("m2f_semantic")
    for split, n, seed in (("train", 4, 1), ("val", 2, 2)):
        register_sem_seg(f"m2f_sem_{split}", *write_sem_seg_split(root, split, n, seed))
    source = save_source(SEMANTIC, root / "five.pth", len(SEM_SOURCE))
    config_file = write_config(SEMANTIC, root / "semantic.yaml")
    opts = TRAIN_OPTS + [
        "MODEL.WEIGHTS", str(root / "five.pth"), "MODEL.RECLASS.SOURCE_STUFF_CLASSES", SEM_SOURCE,
        "DATASETS.TRAIN", ("m2f_sem_train",), "DATASETS.TEST", (),
    ]
    return run_trainer(config_file, opts, source, root / "out")


def test_semantic_class_embed_maps_by_name(semantic):
    assert_class_embed(semantic, SEM_FROM_SOURCE, len(SEM_SOURCE))
    kept = report_of(semantic)["spaces"]["stuff"]["mapping"]["kept"]
    assert [(k["target"], k["source_index"]) for k in kept] == [("road", 2), ("sky", 0)]


def test_semantic_trains_with_auto_num_classes_and_saves_the_loaded_weights(semantic):
    assert semantic.trainer.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    assert semantic.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
    assert_trained(semantic, LOSSES)
    assert_saved_exactly_the_loaded_weights(semantic)
    assert final_checkpoint(semantic)["d2_reclass"] == {"stuff_classes": SEM_TARGET}


def test_semantic_eval_only_through_main_uses_the_fine_tuned_classes(semantic):
    """Upstream's ``main`` with ``--eval-only`` and the upstream config (DATASETS.TRAIN ADE20K's
    150 classes): the model is built with the 3 classes model_final.pth stores, the stock
    DetectionCheckpointer loads every tensor, and SemSegEvaluator reports IoU per class."""
    results = main(args_for(semantic.config_file, TRAIN_OPTS + [
        "MODEL.WEIGHTS", str(semantic.out / "model_final.pth"),
        "DATASETS.TEST", ("m2f_sem_val",), "OUTPUT_DIR", str(semantic.out / "eval"),
    ], eval_only=True))
    per_class = sorted(k for k in results["sem_seg"] if k.startswith("IoU-"))
    assert per_class == ["IoU-lava", "IoU-road", "IoU-sky"]


# ---------------------------------------------------------------------------------------------
# Instance: the thing list, COCO instance LSJ mapper
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    """A 3-class COCO-format instance dataset (triangle, square, star), a 6-class checkpoint,
    the trainer with SOURCE_CLASSES and NEW_CLASS_INIT auto (the default)."""
    root = tmp_path_factory.mktemp("m2f_instance")
    for split, n, seed in (("train", 4, 1), ("val", 2, 2)):
        json_path = make_shapes_dataset(str(root), split, THREE, n, image_size=64, seed=seed)
        register_coco_instances(f"m2f_shapes_{split}", {}, json_path, str(root / split))
    source = save_source(INSTANCE, root / "six.pth", len(SIX))
    config_file = write_config(INSTANCE, root / "instance.yaml")
    opts = TRAIN_OPTS + [
        "MODEL.WEIGHTS", str(root / "six.pth"), "MODEL.RECLASS.SOURCE_CLASSES", SIX,
        "DATASETS.TRAIN", ("m2f_shapes_train",), "DATASETS.TEST", (),
    ]
    return run_trainer(config_file, opts, source, root / "out")


def test_instance_class_embed_maps_the_thing_list_by_name(instance):
    assert_class_embed(instance, THREE_FROM_SIX, len(SIX))
    report = report_of(instance)
    kept = report["spaces"]["thing"]["mapping"]["kept"]
    assert [(k["target"], k["source_index"]) for k in kept] == [("triangle", 2), ("square", 0)]
    assert {t["key"]: t["space"] for t in report["tensors"]}[CLASS_EMBED + "weight"] == "thing"


def test_instance_new_class_init_auto_falls_back_to_head(instance):
    """NEW_CLASS_INIT auto cannot score examples with a MaskFormer (no box classifier): the
    new class keeps the head's init, and the report says why; nothing crashed."""
    new_classes = report_of(instance)["new_classes"]
    assert [c["name"] for c in new_classes["classes"]] == ["star"]
    assert new_classes["classes"][0]["method"] == "head"
    assert "MaskFormer" in new_classes["classes"][0]["reason"]


def test_instance_new_class_init_imprint_falls_back_before_loading(instance, caplog):
    """NEW_CLASS_INIT imprint asked for explicitly, with labelled examples at hand: a WARNING
    names the reason, the dataset is never read, the load maps the rows, and the new class keeps
    the head's init. init_new_classes called directly on a MaskFormer says the same."""
    model = build_mask2former(instance.trainer.cfg)
    examples = NewClassExamples(datasets=("m2f_unreadable_if_read",))
    checkpointer = ReclassCheckpointer(model, reclass=ReclassOptions(
        mode="map", source_classes=SIX, target_classes=THREE, new_class_init="imprint"),
        examples=examples)
    checkpointer.load(str(instance.out.parent / "six.pth"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                and "NEW_CLASS_INIT imprint" in r.getMessage()]
    assert len(warnings) == 1 and "MaskFormer" in warnings[0] and "star" in warnings[0]
    new_classes = checkpointer.report.new_classes
    assert [(c.name, c.method) for c in new_classes.classes] == [("star", "head")]
    assert torch.equal(model.state_dict()[CLASS_EMBED + "weight"],
                       instance.loaded[CLASS_EMBED + "weight"])
    entries_, report = init_new_classes(model, [], checkpointer.report.spaces["thing"].mapping,
                                        instance.source, method="relative")
    assert entries_ == {} and report.classes[0].method == "head"
    assert "no box classifier" in report.classes[0].reason


def test_task_space_follows_the_models_task():
    """Semantic and panoptic models count the stuff list; instance models the things, also with
    upstream's ADE20K instance config, whose switches are all on for a things-only dataset."""
    assert task_space(True, False, False, thing_names=False, stuff_names=True) == STUFF
    assert task_space(True, True, True, thing_names=True, stuff_names=True) == STUFF
    assert task_space(False, False, True, thing_names=True, stuff_names=False) == THING
    assert task_space(True, True, True, thing_names=True, stuff_names=False) == THING
    assert task_space(True, False, False, thing_names=False, stuff_names=False) == STUFF


def test_maskformer_v1_decoder_has_the_same_layout():
    """MaskFormer (v1)'s StandardTransformerDecoder, in a semantic MaskFormer: class_embed is
    K+1 rows with no object last, in the stuff space, sized by SEM_SEG_HEAD.NUM_CLASSES."""
    from d2_reclass import find_layouts

    cfg = mask2former_cfg(SEMANTIC, TINY + [
        "MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 7,
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "BasePixelDecoder",
        "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "StandardTransformerDecoder",
        "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res5", "MODEL.MASK_FORMER.ENC_LAYERS", 0,
        "MODEL.MASK_FORMER.DEC_LAYERS", 2])
    model = build_mask2former(cfg)
    assert type(model.sem_seg_head.predictor).__name__ == "StandardTransformerDecoder"
    layouts = {lay.key: lay for lay in find_layouts(model)}
    assert sorted(layouts) == [EMPTY_WEIGHT, CLASS_EMBED + "bias", CLASS_EMBED + "weight"]
    weight = layouts[CLASS_EMBED + "weight"]
    assert (weight.space, weight.num_classes, weight.background) == (STUFF, 7, True)
    assert weight.length(7) == model.state_dict()[CLASS_EMBED + "weight"].shape[0] == 8
    assert weight.config_key == "MODEL.SEM_SEG_HEAD.NUM_CLASSES"
    assert layouts[CLASS_EMBED + "bias"].merge == "mean + log(count)"


def test_instance_trains_with_auto_num_classes_and_saves_the_loaded_weights(instance):
    assert instance.trainer.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    assert instance.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 80
    assert_trained(instance, LOSSES)
    assert_saved_exactly_the_loaded_weights(instance)
    assert final_checkpoint(instance)["d2_reclass"] == {"thing_classes": THREE}


def test_instance_eval_only_through_main_uses_the_fine_tuned_classes(instance):
    """``--eval-only`` with the upstream config (DATASETS.TRAIN COCO's 80 classes) builds the 3
    stored classes, and COCOEvaluator reports mask AP per target class."""
    results = main(args_for(instance.config_file, TRAIN_OPTS + [
        "MODEL.WEIGHTS", str(instance.out / "model_final.pth"),
        "DATASETS.TEST", ("m2f_shapes_val",), "OUTPUT_DIR", str(instance.out / "eval"),
    ], eval_only=True))
    per_class = sorted(k for k in results["segm"] if k.startswith("AP-"))
    assert per_class == ["AP-square", "AP-star", "AP-triangle"]


def test_instance_wrong_num_classes_names_the_sem_seg_head_key(instance, tmp_path):
    """With AUTO_NUM_CLASSES off and the config's 80 classes, the class-count check names
    MODEL.SEM_SEG_HEAD.NUM_CLASSES (the key that sets every Mask2Former head), never RetinaNet."""
    cfg = setup(args_for(instance.config_file, TRAIN_OPTS + [
        "MODEL.WEIGHTS", str(instance.out / "model_final.pth"),
        "MODEL.RECLASS.AUTO_NUM_CLASSES", False, "DATASETS.TRAIN", ("m2f_shapes_train",),
        "DATASETS.TEST", (), "OUTPUT_DIR", str(tmp_path)]))
    trainer = Trainer(cfg)
    with pytest.raises(ClassListError, match=r"Set MODEL\.SEM_SEG_HEAD\.NUM_CLASSES 3") as e:
        trainer.resume_or_load(resume=False)
    assert "RETINANET" not in str(e.value) and "ROI_HEADS" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The load invariant: every tensor that is not a class entry, and every module version, as stock
# ---------------------------------------------------------------------------------------------


def _built(name: str, num_classes: int, dataset: str):
    """A seeded builder of the shrunk model ``name`` for ``num_classes``, built for
    ``dataset``'s metadata (the same model on every call)."""
    cfg = mask2former_cfg(name, TINY + ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
                                        num_classes, "DATASETS.TRAIN", (dataset,)])

    def build():
        torch.manual_seed(2)
        return build_mask2former(cfg)

    return build


@pytest.mark.parametrize("changed", [False, True], ids=["same classes", "classes changed"])
def test_panoptic_load_is_stock_but_for_class_entries(panoptic, changed):
    """ReclassCheckpointer loads the panoptic checkpoint as stock DetectionCheckpointer does:
    every tensor bit for bit (the pixel decoder included) but class_embed and empty_weight when
    the classes change, the whole model when they do not; MaskFormerHead and the decoder see
    their version 2 under both, so nothing is renamed as an old format."""
    source = str(panoptic.out.parent / "six.pth")
    if changed:
        result = check_load_invariant(
            _built(PANOPTIC, len(PAN_TARGET), "m2f_pan_train"), source,
            reclass=ReclassOptions(source_stuff_classes=PAN_SOURCE,
                                   target_stuff_classes=PAN_TARGET))
        assert result.class_keys == {CLASS_EMBED + "weight", CLASS_EMBED + "bias", EMPTY_WEIGHT}
        assert result.report.spaces["stuff"].resolution == "map"
    else:
        result = check_load_invariant(_built(PANOPTIC, len(PAN_SOURCE), "m2f_pan_train"), source,
                                      reclass=ReclassOptions(), class_keys=set())
    assert result.versions["sem_seg_head"] == [2]
    assert result.versions["sem_seg_head.predictor"] == [2]
    decoder = [k for k in result.compared if k.startswith("sem_seg_head.pixel_decoder.")]
    assert len(decoder) > 30


def test_instance_load_is_stock_but_for_class_entries(instance):
    result = check_load_invariant(
        _built(INSTANCE, len(THREE), "m2f_shapes_train"), str(instance.out.parent / "six.pth"),
        reclass=ReclassOptions(source_classes=SIX, target_classes=THREE, new_class_init="head"))
    assert result.class_keys == {CLASS_EMBED + "weight", CLASS_EMBED + "bias", EMPTY_WEIGHT}
    assert result.versions["sem_seg_head"] == [2]
