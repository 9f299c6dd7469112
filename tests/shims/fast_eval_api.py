"""Stands in for ``detectron2.evaluation.fast_eval_api`` when detectron2 has no compiled ``_C``.

The real module defines ``COCOeval_opt``, pycocotools' ``COCOeval`` with its evaluate and
accumulate steps in detectron2's C++ (``_C``). Without ``_C`` detectron2's own
``coco_evaluation.py`` sets ``COCOeval_opt = COCOeval`` and logs "Fast COCO eval is not built.
Falling back to official COCO eval."; this module is that same fallback, so that packages which
import the name directly (Mask2Former's ``instance_evaluation.py``) import, and every evaluator
computes AP with pycocotools' official code.
"""
from pycocotools.cocoeval import COCOeval

COCOeval_opt = COCOeval
