"""Classes and data: which classes a checkpoint, a config and a dataset name
(:mod:`.class_lists`), datasets loaded with the model's class indices by name
(:mod:`.mapping`), COCO files registered with their classes known up front (:mod:`.datasets`),
and the synthetic shapes datasets of the demo and tests (:mod:`.synthetic`).
"""
from .class_lists import CLASSES_KEY, dataset_classes, read_stored_classes, stored_classes
from .datasets import register_coco_dataset
from .mapping import CLASS_INDEXED_METADATA, map_datasets_to_classes

__all__ = [
    "CLASSES_KEY",
    "CLASS_INDEXED_METADATA",
    "dataset_classes",
    "map_datasets_to_classes",
    "read_stored_classes",
    "register_coco_dataset",
    "stored_classes",
]
