"""ReclassPredictor: detectron2's DefaultPredictor, loading through ReclassCheckpointer."""
import logging
from typing import List, Optional

from detectron2.data import Metadata
from detectron2.engine import DefaultPredictor

from ..data.class_lists import target_classes
from ..data.mapping import CLASS_INDEXED_METADATA
from .checkpoint import ReclassCheckpointer
from .config import add_reclass_config, log_config_changes, prepare_reclass_config

__all__ = ["ReclassPredictor"]

logger = logging.getLogger(__name__)


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
        cfg, changes = prepare_reclass_config(cfg, eval_only=True)
        log_config_changes(changes)
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
