"""ReclassTrainerMixin in the trainers projects really write, each test named after the project
whose pattern it mirrors (the projects' own files are not copied: each trainer below is written
the way theirs is built, with a real detectron2 model on the CPU):

- MaskDINO: ``__init__`` skips DefaultTrainer's and assigns a stock DetectionCheckpointer before
  and again after ``build_hooks``; AMPTrainer when SOLVER.AMP.ENABLED;
- DiffusionDet: the same kind of ``__init__`` with a d2go-style model EMA (``ema_state``) among
  the checkpointables, and a ``build_hooks`` that does not call ``super()``;
- detectron2's ``tools/plain_train_net.py``: no trainer class, the documented replacement line.

Each load must go through ReclassCheckpointer (rows follow names, reclass_report.json written)
and each later save must store the class names.
"""
import json
import os
import weakref

import pytest
import torch
from d2_fixtures import REPO, SIX, THREE, THREE_FROM_SIX, small_model
from detectron2.checkpoint import DetectionCheckpointer, PeriodicCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from fvcore.common.checkpoint import Checkpointer

from d2_reclass import (
    ConfigError,
    ReclassCheckpointer,
    ReclassTrainerMixin,
    add_reclass_config,
    prepare_reclass_config,
)

CLS = "roi_heads.box_predictor.cls_score.weight"
DATASET = "trainer_patterns_train"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """THREE-class COCO-format data, registered with stock register_coco_instances, and a
    SIX-class checkpoint that stores no names, with the ``ema_state`` a d2go EMA saves beside
    the model (the EMA weights made distinct from the model's)."""
    from d2_reclass.data.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("patterns")
    make_shapes_dataset(str(root), "train", THREE, 4, seed=1)
    if DATASET not in DatasetCatalog.list():
        register_coco_instances(DATASET, {}, str(root / "train.json"), str(root / "train"))
    source = small_model(6, seed=1).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in source.items()}
    torch.save({"model": source, "ema_state": ema, "iteration": 999}, root / "six.pth")
    return root, source, ema


def _cfg(root, out, *opts):
    """The user's config: the repo's small Faster R-CNN, MODEL.WEIGHTS the SIX-class file, LR 0
    (the loaded rows stay as they are through training, so a saved file shows the mapping)."""
    cfg = get_cfg()
    add_reclass_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-Shapes-RCNN.yaml"))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", str(root / "six.pth"), "MODEL.RECLASS.MODE", "map",
        "MODEL.RECLASS.SOURCE_CLASSES", SIX, "MODEL.RECLASS.NEW_CLASS_INIT", "head",
        "DATASETS.TRAIN", (DATASET,), "DATASETS.TEST", (), "SOLVER.BASE_LR", 0.0,
        "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "OUTPUT_DIR", str(out), *opts])
    cfg.freeze()
    return cfg


def _assert_rows_follow_names(rows, source_rows):
    for target, src in enumerate(THREE_FROM_SIX):
        if src is not None:
            assert torch.equal(rows[target], source_rows[src]), THREE[target]
    assert torch.equal(rows[3], source_rows[6])  # background, carried


def _assert_loaded_through_ours(trainer, out, source):
    """The trainer's checkpointer and every checkpointing hook's are one ReclassCheckpointer,
    the load mapped the rows by name and reclass_report.json says so."""
    assert type(trainer.checkpointer) is ReclassCheckpointer
    savers = [h.checkpointer for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert savers and all(c is trainer.checkpointer for c in savers)
    _assert_rows_follow_names(trainer.model.state_dict()[CLS], source[CLS])
    report = json.loads((out / "reclass_report.json").read_text())
    assert [k["target"] for k in report["spaces"]["thing"]["mapping"]["kept"]] == [
        "triangle", "square"]
    assert report["spaces"]["thing"]["mapping"]["new"] == ["star"]


def _assert_final_stores_names(out, source):
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": THREE}
    _assert_rows_follow_names(final["model"][CLS], source[CLS])
    return final


# ------------------------------------------------------------------------------------------
# MaskDINO: __init__ without DefaultTrainer.__init__, a stock checkpointer after build_hooks
# ------------------------------------------------------------------------------------------
def _maskdino_init(self, cfg):
    """Built as MaskDINO's Trainer.__init__ builds itself: TrainerBase.__init__ only, then the
    model, optimizer, loader, loop and scheduler by hand, a stock DetectionCheckpointer, the
    hooks, and the same DetectionCheckpointer again after them."""
    super(DefaultTrainer, self).__init__()
    cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
    model = self.build_model(cfg)
    optimizer = self.build_optimizer(cfg, model)
    data_loader = self.build_train_loader(cfg)
    model = create_ddp_model(model, broadcast_buffers=False)
    self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
        model, data_loader, optimizer)
    self.scheduler = self.build_lr_scheduler(cfg, optimizer)
    kwargs = {"trainer": weakref.proxy(self)}
    self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, **kwargs)
    self.start_iter = 0
    self.max_iter = cfg.SOLVER.MAX_ITER
    self.cfg = cfg
    self.register_hooks(self.build_hooks())
    self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, **kwargs)


class MaskDINOTrainer(DefaultTrainer):
    """The project's trainer, untouched."""

    __init__ = _maskdino_init


class MaskDINOTrainerEdited(ReclassTrainerMixin, DefaultTrainer):
    """The integration line written into the project's own class line."""

    __init__ = _maskdino_init


class MaskDINOTrainerMixedIn(ReclassTrainerMixin, MaskDINOTrainer):
    """The integration line as a class over the project's."""


@pytest.mark.parametrize("trainer_class", [MaskDINOTrainerEdited, MaskDINOTrainerMixedIn])
def test_maskdino_trainer_loads_and_saves_through_one_reclass_checkpointer(
        task, tmp_path, trainer_class):
    root, source, _ = task
    cfg = _cfg(root, tmp_path)
    trainer = trainer_class(cfg)
    # The config was prepared before the project's __init__ built the model: 3 classes + bg.
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert trainer.model.state_dict()[CLS].shape == (4, 256)
    trainer.resume_or_load(resume=False)
    _assert_loaded_through_ours(trainer, tmp_path, source)
    trainer.train()
    final = _assert_final_stores_names(tmp_path, source)
    assert final["iteration"] == 1 and "trainer" in final


def test_maskdino_trainer_with_amp_loads_saves_and_resumes(task, tmp_path):
    """MaskDINO's configs enable AMP: AMPTrainer is the loop. Its step needs CUDA (detectron2
    asserts it), so here the load, a save with the grad scaler's state, and the resume."""
    root, source, _ = task
    cfg = _cfg(root, tmp_path, "SOLVER.AMP.ENABLED", True)
    trainer = MaskDINOTrainerEdited(cfg)
    assert isinstance(trainer._trainer, AMPTrainer)
    trainer.resume_or_load(resume=False)
    _assert_loaded_through_ours(trainer, tmp_path, source)
    trainer.iter = 4
    trainer.checkpointer.save("model_0000004", iteration=4)
    saved = torch.load(tmp_path / "model_0000004.pth", weights_only=True)
    assert saved["d2_reclass"] == {"thing_classes": THREE}
    assert "grad_scaler" in saved["trainer"]["_trainer"]

    resumed = MaskDINOTrainerEdited(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5 and resumed.checkpointer.report is None  # no surgery
    _assert_rows_follow_names(resumed.model.state_dict()[CLS], source[CLS])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="AMPTrainer.run_step asserts CUDA (a GPU machine runs this)")
def test_maskdino_trainer_trains_with_amp_on_the_gpu(task, tmp_path):
    root, source, _ = task
    cfg = _cfg(root, tmp_path, "SOLVER.AMP.ENABLED", True, "MODEL.DEVICE", "cuda")
    trainer = MaskDINOTrainerEdited(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = _assert_final_stores_names(tmp_path, {CLS: source[CLS].cuda()})
    assert "grad_scaler" in final["trainer"]["_trainer"]


# ------------------------------------------------------------------------------------------
# DiffusionDet: a d2go model EMA among the checkpointables, build_hooks without super()
# ------------------------------------------------------------------------------------------
class EMAState:
    """A model EMA's checkpointable as d2go's (which DiffusionDet and detrex use) saves it:
    ``{parameter or buffer name: tensor}`` of the whole model, class heads included."""

    def __init__(self):
        self.state = {}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = {k: v.clone() for k, v in state.items()}


class EMAHook(hooks.HookBase):
    """Starts the EMA from the model unless one was loaded (a resume); updates it each step."""

    def __init__(self, model, decay=0.9):
        self.model, self.decay = model, decay

    def before_train(self):
        if not self.model.ema_state.state:
            self.model.ema_state.load_state_dict(self.model.state_dict())

    def after_step(self):
        for k, v in self.model.state_dict().items():
            ema = self.model.ema_state.state[k]
            if ema.is_floating_point():
                ema.mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)


class DiffusionDetTrainer(ReclassTrainerMixin, DefaultTrainer):
    """The integration line in the project's class line; its own __init__ (TrainerBase's
    only, EMA among the checkpointables) and its own hook list, without super()."""

    def __init__(self, cfg):
        super(DefaultTrainer, self).__init__()
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        kwargs = {"trainer": weakref.proxy(self), "ema_state": model.ema_state}
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, **kwargs)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        model.ema_state = EMAState()  # an attribute, not a module: not in model.state_dict()
        return model

    def build_hooks(self):
        return [hooks.IterationTimer(), EMAHook(self.model), hooks.LRScheduler(),
                hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD)]


def test_diffusiondet_trainer_with_ema_loads_saves_and_resumes(task, tmp_path):
    root, source, _ = task
    cfg = _cfg(root, tmp_path)
    trainer = DiffusionDetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    _assert_loaded_through_ours(trainer, tmp_path, source)
    assert trainer.checkpointer.checkpointables["ema_state"] is trainer.model.ema_state
    # A fine-tune loads the model alone: the EMA starts from the mapped model, not from the
    # source's EMA (which has six classes).
    assert trainer.model.ema_state.state == {}
    trainer.train()
    final = _assert_final_stores_names(tmp_path, source)
    ema_rows = final["ema_state"][CLS]
    assert ema_rows.shape == (4, 256)
    assert torch.allclose(ema_rows, final["model"][CLS], atol=1e-6)  # LR 0: EMA of a constant

    resumed = DiffusionDetTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert torch.equal(resumed.model.ema_state.state[CLS], ema_rows)


def test_an_ema_loaded_with_the_model_is_mapped_as_the_model(task, tmp_path):
    """Evaluating EMA weights (DiffusionDet's and detrex's eval-only load every checkpointable):
    the source's ``ema_state`` rows follow the names as the model's do."""
    root, source, ema = task
    cfg, _ = prepare_reclass_config(_cfg(root, tmp_path))
    model = build_model(cfg)
    model.ema_state = EMAState()
    checkpointer = ReclassCheckpointer.from_config(cfg, model, ema_state=model.ema_state)
    extra = checkpointer.load(cfg.MODEL.WEIGHTS)
    assert extra == {"iteration": 999}
    _assert_rows_follow_names(model.state_dict()[CLS], source[CLS])
    _assert_rows_follow_names(model.ema_state.state[CLS], ema[CLS])
    assert torch.equal(model.ema_state.state[CLS][2], model.state_dict()[CLS][2])  # star: init
    # Loading the model alone leaves the EMA as it was.
    model.ema_state = EMAState()
    ReclassCheckpointer.from_config(cfg, model, ema_state=model.ema_state).load(
        cfg.MODEL.WEIGHTS, checkpointables=[])
    assert model.ema_state.state == {}


class HooksWithTheirOwnCheckpointer(ReclassTrainerMixin, DefaultTrainer):
    """A build_hooks without super() that saves through a DetectionCheckpointer of its own."""

    def build_hooks(self):
        own = DetectionCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        return [hooks.IterationTimer(), hooks.PeriodicCheckpointer(own, 100000)]


def test_a_hook_given_a_stock_checkpointer_saves_through_ours(task, tmp_path):
    root, source, _ = task
    trainer = HooksWithTheirOwnCheckpointer(_cfg(root, tmp_path))
    trainer.resume_or_load(resume=False)
    _assert_loaded_through_ours(trainer, tmp_path, source)
    trainer.train()
    _assert_final_stores_names(tmp_path, source)


# ------------------------------------------------------------------------------------------
# Checkpointers the mixin cannot take over: one ConfigError, naming the line to change
# ------------------------------------------------------------------------------------------
class EMADetectionCheckpointer(DetectionCheckpointer):
    """A project's checkpointer subclass (DiffusionDet has one of this name)."""

    def resume_or_load(self, path, *, resume=True):
        return self.load(path, checkpointables=None)


class SubclassCheckpointerTrainer(ReclassTrainerMixin, DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.checkpointer = EMADetectionCheckpointer(self.model, cfg.OUTPUT_DIR)


def test_a_checkpointer_subclass_is_refused_naming_the_class_to_derive(task, tmp_path):
    root, _, _ = task
    with pytest.raises(ConfigError, match=(
            r"^self\.checkpointer of SubclassCheckpointerTrainer is an instance of "
            r"EMADetectionCheckpointer, a subclass of DetectionCheckpointer: .*"
            r"`class EMADetectionCheckpointer\(ReclassCheckpointer\)`.*"
            r"`EMADetectionCheckpointer\.from_config\(cfg, model, save_dir, "
            r"\*\*checkpointables\)`")):
        SubclassCheckpointerTrainer(_cfg(root, tmp_path))


class EMAReclassCheckpointer(ReclassCheckpointer):
    """The project's subclass derived as the message says."""

    def resume_or_load(self, path, *, resume=True):
        return self.load(path, checkpointables=None)


def test_a_reclass_checkpointer_subclass_is_kept_as_it_is(task, tmp_path):
    root, source, _ = task
    trainer = MaskDINOTrainerEdited(_cfg(root, tmp_path))
    ours = EMAReclassCheckpointer.from_config(trainer.cfg, trainer.model, str(tmp_path),
                                              trainer=weakref.proxy(trainer))
    trainer.checkpointer = ours
    assert trainer.checkpointer is ours
    trainer.resume_or_load(resume=False)
    _assert_rows_follow_names(trainer.model.state_dict()[CLS], source[CLS])


class NoCheckpointerTrainer(ReclassTrainerMixin, DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.checkpointer = None


def test_a_trainer_without_a_checkpointer_is_a_config_error_not_an_attribute_error(
        task, tmp_path):
    root, source, _ = task
    trainer = NoCheckpointerTrainer(_cfg(root, tmp_path))
    with pytest.raises(ConfigError, match=r"^NoCheckpointerTrainer\.resume_or_load needs "
                       r"self\.checkpointer to load through, but it is not set\. Assign a "
                       r"DetectionCheckpointer in __init__"):
        trainer.resume_or_load(resume=False)
    assert not (tmp_path / "metrics.json").exists()
    # Training needs none: the hooks hold the one DefaultTrainer.__init__ assigned (ours).
    trainer.train()
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["d2_reclass"] == {"thing_classes": THREE}


def test_an_fvcore_checkpointer_becomes_ours_with_its_checkpointables(task, tmp_path):
    root, _, _ = task
    trainer = MaskDINOTrainerEdited(_cfg(root, tmp_path))
    trainer.checkpointer = Checkpointer(trainer.model, str(tmp_path), save_to_disk=False,
                                        scheduler=trainer.scheduler)
    assert type(trainer.checkpointer) is ReclassCheckpointer
    assert trainer.checkpointer.save_to_disk is False
    assert trainer.checkpointer.checkpointables == {"scheduler": trainer.scheduler}


# ------------------------------------------------------------------------------------------
# detectron2's tools/plain_train_net.py: no trainer; the documented lines
# ------------------------------------------------------------------------------------------
def do_train(cfg, model, resume=False):
    """plain_train_net.py's do_train, with its checkpointer line replaced (docs/trainer.md)."""
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = ReclassCheckpointer.from_config(  # was: DetectionCheckpointer(
        cfg, model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler)
    start_iter = (
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume).get("iteration", -1) + 1
    )
    if checkpointer.report is not None:  # + what the load did to every class tensor
        checkpointer.report.to_json(os.path.join(cfg.OUTPUT_DIR, "reclass_report.json"))
    max_iter = cfg.SOLVER.MAX_ITER
    periodic_checkpointer = PeriodicCheckpointer(
        checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=max_iter)
    data_loader = build_detection_train_loader(cfg)
    with EventStorage(start_iter) as storage:
        for data, iteration in zip(data_loader, range(start_iter, max_iter)):
            storage.iter = iteration
            losses = sum(model(data).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()
            periodic_checkpointer.step(iteration)
    return start_iter


def test_plain_train_net_loop_with_the_documented_lines(task, tmp_path):
    root, source, _ = task
    # setup(args): the config prepared (NUM_CLASSES from the datasets) before the model.
    cfg = _cfg(root, tmp_path).clone()
    cfg.defrost()
    cfg, _ = prepare_reclass_config(cfg)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    model = build_model(cfg)
    # The source file stores iteration 999, which a non-resume load returns as stock does:
    # with MAX_ITER 2 the loop would run no iteration. A fine-tune's config starts at 0.
    assert do_train(cfg, model) == 1000
    _assert_rows_follow_names(model.state_dict()[CLS], source[CLS])
    report = json.loads((tmp_path / "reclass_report.json").read_text())
    assert report["spaces"]["thing"]["mapping"]["new"] == ["star"]

    torch.save({"model": source}, root / "six_no_iteration.pth")
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(root / "six_no_iteration.pth")
    cfg.freeze()
    assert do_train(cfg, build_model(cfg)) == 0
    _assert_final_stores_names(tmp_path, source)
    # --resume: the run's own checkpoint, its optimizer and scheduler, from iteration 2.
    assert do_train(cfg, build_model(cfg), resume=True) == 2
