"""d2_reclass: change the class set of detectron2 models without losing what the checkpoint knew."""
__version__ = "0.1.0"
