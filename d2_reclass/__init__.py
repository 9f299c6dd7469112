"""d2_reclass: change the class set of detectron2 models without losing what a checkpoint knew.

Public surface: the engine (layouts, class mapping, :func:`reclass_state_dict`) and its
detectron2 glue (config keys, checkpointer, box predictor, trainer).
"""
from . import logger as _logger
from .checkpoint import (
    CLASSES_KEY,
    ReclassCheckpointer,
    check_resume,
    read_stored_classes,
    stored_classes,
)
from .classes import ClassMapping, build_class_mapping, normalize_class_name
from .combine import combine_state_dicts
from .config import (
    add_reclass_config,
    apply_num_classes,
    merge_config_file,
    prepare_reclass_config,
)
from .dataset_classes import map_datasets_to_classes
from .datasets import register_coco_dataset
from .errors import (
    CheckpointError,
    ClassListError,
    ClassMismatchError,
    CombineError,
    ConfigError,
    DatasetError,
    ReclassError,
    ResumeClassMismatchError,
    UnsafeCheckpointError,
)
from .fast_rcnn import (
    ReclassFastRCNNOutputLayers,
    adopt_box_predictors,
    use_reclass_box_predictors,
)
from .fresh import InitSpec
from .keep_old import kept_target_classes
from .layouts import KEYPOINT, STUFF, THING, ClassLayout, find_layouts, register_layout
from .live import reclass_model
from .new_classes import (
    NEW_CLASS_INITS,
    NewClassExamples,
    NewClassReport,
    apply_new_class_entries,
    init_new_classes,
)
from .options import PRESERVE_METHODS, ReclassOptions
from .predictor import ReclassPredictor, use_checkpoint_classes
from .preserve import Preservation, Teacher, attach_preservation, preservation_from_config
from .report import ReclassReport
from .surgery import ClassSpec, SourceCheckpoint, reclass_state_dict
from .trainer import ReclassTrainer, ReclassTrainerMixin, check_num_classes

_logger.install_detectron2_forwarding()

__version__ = "0.1.0"

__all__ = [
    "CLASSES_KEY",
    "CheckpointError",
    "ClassLayout",
    "ClassListError",
    "ClassMapping",
    "ClassMismatchError",
    "ClassSpec",
    "CombineError",
    "ConfigError",
    "DatasetError",
    "InitSpec",
    "KEYPOINT",
    "NEW_CLASS_INITS",
    "NewClassExamples",
    "NewClassReport",
    "PRESERVE_METHODS",
    "Preservation",
    "ReclassCheckpointer",
    "ReclassError",
    "ReclassFastRCNNOutputLayers",
    "ReclassOptions",
    "ReclassPredictor",
    "ReclassReport",
    "ReclassTrainer",
    "ReclassTrainerMixin",
    "ResumeClassMismatchError",
    "STUFF",
    "SourceCheckpoint",
    "THING",
    "Teacher",
    "UnsafeCheckpointError",
    "add_reclass_config",
    "adopt_box_predictors",
    "apply_new_class_entries",
    "apply_num_classes",
    "attach_preservation",
    "build_class_mapping",
    "check_resume",
    "check_num_classes",
    "combine_state_dicts",
    "find_layouts",
    "init_new_classes",
    "kept_target_classes",
    "map_datasets_to_classes",
    "merge_config_file",
    "normalize_class_name",
    "prepare_reclass_config",
    "preservation_from_config",
    "read_stored_classes",
    "reclass_model",
    "reclass_state_dict",
    "register_coco_dataset",
    "register_layout",
    "stored_classes",
    "use_checkpoint_classes",
    "use_reclass_box_predictors",
]
