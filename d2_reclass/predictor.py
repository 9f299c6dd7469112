"""ReclassPredictor: detectron2's DefaultPredictor, loading through ReclassCheckpointer."""
import logging
from typing import List, Optional

from detectron2.data import Metadata
from detectron2.engine import DefaultPredictor

from .checkpoint import ReclassCheckpointer, read_stored_classes
from .classes import union_classes
from .config import (
    add_reclass_config,
    log_num_classes_changes,
    prepare_reclass_config,
    target_classes,
)
from .dataset_classes import CLASS_INDEXED_METADATA

__all__ = ["ReclassPredictor", "use_checkpoint_classes"]

logger = logging.getLogger(__name__)


def use_checkpoint_classes(cfg) -> None:
    """Set MODEL.RECLASS.TARGET_(STUFF_)CLASSES, when TARGET_CLASSES is empty, to the classes
    MODEL.WEIGHTS (and MODEL.RECLASS.COMBINE) store: a checkpoint that names its classes is
    evaluated with them, whatever NUM_CLASSES the base config has. ``cfg`` must not be frozen
    and must have MODEL.RECLASS (:func:`~d2_reclass.add_reclass_config`).

    Raises:
        CheckpointError: a checkpoint is missing or unreadable.
    """
    r = cfg.MODEL.RECLASS
    if r.TARGET_CLASSES or not cfg.MODEL.WEIGHTS:
        return
    stored = [read_stored_classes(path, trust_pickle=r.TRUST_PICKLE)
              for path in [cfg.MODEL.WEIGHTS, *r.COMBINE]]
    r.TARGET_CLASSES = union_classes([s.get("thing_classes", []) for s in stored])
    r.TARGET_STUFF_CLASSES = union_classes([s.get("stuff_classes", []) for s in stored])
    if r.TARGET_CLASSES:
        # The checkpoint's own classes are the model's: KEEP_SOURCE_CLASSES (which adds a
        # training run's new classes to its source's) has nothing left to decide.
        r.KEEP_SOURCE_CLASSES = False


class ReclassPredictor(DefaultPredictor):
    """:class:`DefaultPredictor` whose weights load through :class:`ReclassCheckpointer`.

    The model is built for the target classes (MODEL.RECLASS.TARGET_CLASSES, else those
    MODEL.WEIGHTS stores, else the classes of DATASETS.TRAIN) and the checkpoint's class rows are
    mapped to them by name, where DefaultPredictor's DetectionCheckpointer would skip them.
    ``self.class_names`` are the model's classes; ``self.metadata`` (DATASETS.TEST[0]'s, when
    it is set) names them too. DefaultPredictor's own load is given no file (it logs "No
    checkpoint found"); the weights are loaded right after, class-aware.

    Attributes:
        report (ReclassReport or None): what the load did.
    """

    def __init__(self, cfg):
        cfg = cfg.clone()
        cfg.defrost()
        add_reclass_config(cfg)
        use_checkpoint_classes(cfg)
        cfg, changes = prepare_reclass_config(cfg)
        log_num_classes_changes(changes)
        weights = cfg.MODEL.WEIGHTS
        # DefaultPredictor loads with a DetectionCheckpointer: give it nothing to load, then
        # load here, class-aware.
        cfg.MODEL.WEIGHTS = ""
        super().__init__(cfg)
        cfg.MODEL.WEIGHTS = weights
        self.cfg = cfg
        checkpointer = ReclassCheckpointer.from_config(cfg, self.model)
        checkpointer.load(weights)
        self.report = checkpointer.report
        self.class_names: Optional[List[str]] = target_classes(cfg)
        if self.class_names and hasattr(self, "metadata"):
            # DATASETS.TEST[0]'s metadata, for Visualizer, naming the model's classes.
            self.metadata = Metadata(**{k: v for k, v in self.metadata.as_dict().items()
                                        if k not in CLASS_INDEXED_METADATA},
                                     thing_classes=list(self.class_names))
