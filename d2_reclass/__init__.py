"""d2_reclass: change the class set of detectron2 models without losing what a checkpoint knew.

Public surface: the engine (layouts, class mapping, :func:`reclass_state_dict`) and its
detectron2 glue (config keys, checkpointer, box predictor, trainer).

The names below are imported on first use (PEP 562): importing torch and detectron2 takes
seconds, and ``d2-reclass --help`` / ``--version`` need neither. ``from d2_reclass import X``
and ``d2_reclass.X`` work as with eager imports.
"""
import importlib
import sys
from typing import Any, List

from . import logger as _logger

__version__ = "0.1.0"

# Each public name, grouped by the module that defines it.
_EXPORTS = {
    # The vocabulary (ground floor).
    "classes": ("ClassMapping", "build_class_mapping", "normalize_class_name"),
    "errors": ("CheckpointError", "ClassListError", "ClassMismatchError", "CombineError",
               "ConfigError", "DatasetError", "ReclassError", "ResumeClassMismatchError",
               "UnsafeCheckpointError"),
    "fresh": ("NORMAL_001", "ZERO", "InitSpec", "linear_default_init", "prior_bias_init",
              "torch_default_init", "xavier_uniform_init"),
    "options": ("PRESERVE_METHODS", "ReclassOptions"),
    # Which classes, and datasets by name.
    "data.class_lists": ("CLASSES_KEY", "kept_target_classes", "read_stored_classes",
                         "stored_classes", "stored_eval_classes", "use_checkpoint_classes"),
    "data.datasets": ("register_coco_dataset",),
    "data.mapping": ("map_datasets_to_classes",),
    # Which entries of which tensor belong to which class; which config keys size them.
    "layouts": ("KEYPOINT", "STUFF", "THING", "ClassLayout", "class_rows", "find_layouts",
                "register_layout"),
    "layouts.num_classes": ("register_default_config", "register_num_classes_check",
                            "register_num_classes_keys"),
    # The engine: tensors and names in, tensors and a report out.
    "engine.combine": ("combine_state_dicts",),
    "engine.live": ("reclass_model",),
    "engine.report": ("ReclassReport",),
    "engine.surgery": ("ClassSpec", "SourceCheckpoint", "reclass_state_dict"),
    # New classes from examples; old classes kept through training.
    "new_classes": ("NEW_CLASS_INITS", "NewClassExamples", "NewClassReport",
                    "apply_new_class_entries", "init_new_classes"),
    "preserve": ("Preservation", "Teacher", "attach_preservation"),
    # detectron2 glue.
    "integration.checkpoint": ("ReclassCheckpointer", "check_resume"),
    "integration.config": ("add_reclass_config", "apply_num_classes", "merge_config_file",
                           "options_from_config", "prepare_reclass_config"),
    "integration.fast_rcnn": ("ReclassFastRCNNOutputLayers", "adopt_box_predictors",
                              "use_reclass_box_predictors"),
    "integration.predictor": ("ReclassPredictor",),
    "integration.preservation": ("preservation_from_config",),
    "integration.trainer": ("ReclassTrainer", "ReclassTrainerMixin", "check_num_classes"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


_logger.install_detectron2_forwarding()
if "detectron2" in sys.modules:
    # The model-zoo config URL handler registers itself with detectron2's PathManager when
    # integration/config.py is imported; with detectron2 already loaded that costs nothing, so
    # a project that imports detectron2 first gets it at ``import d2_reclass``, as before.
    importlib.import_module(".integration.config", __name__)
