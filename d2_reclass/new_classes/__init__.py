"""New classes that detect from the first iteration: initialise them from labelled examples.

After mapping, a target class that no source class maps to holds the head's own init (tiny
random rows, zero bias): it is never predicted until training teaches it. With
``MODEL.RECLASS.NEW_CLASS_INIT`` it starts from what the source model already knows about it,
measured on a few of the user's own labelled images:

* ``head``: the head's own init (nothing here runs).
* ``auto`` (the default): ``imprint`` where labelled examples are given, else ``head``:
  imprint measured best in ``benchmarks/new_class_init.py`` (docs/benchmarks.md).
* ``relative``: the source model's classifiers score the new class's ground-truth boxes; the
  source class with the highest mean probability is its *relative*, and every class entry of
  every thing head (box classifier and regressor of every cascade stage, mask predictor,
  RetinaNet/FCOS anchors, PointRend) is copied from the relative ("van" starts as "car"). The
  relative may be a class the target dropped: its entries come from the checkpoint.
* ``imprint``: for each box classifier that reads a feature vector (every
  ``FastRCNNOutputLayers``; each cascade stage through its own box head), the new class's
  ``cls_score`` row is ``scale * w / |w|``, where ``w`` is Fisher's discriminant of the
  box-head features of its ground-truth boxes (pooled by the model's own box pooler) against
  those of the kept-class objects in the images read (below), and its bias is calibrated
  (below). Every other entry comes from the relative: a box regressor row maps features to
  box *deltas*, which the features' means say nothing about; mask rows, RetinaNet/FCOS
  channels and PointRend rows read per-pixel or per-location features, not the box feature
  whose discriminant is imprinted.

The kept-class objects are those in the images read: the labelled ones, and those the model
itself detects (score >= 0.5) where no box is labelled (IoU < 0.5 with each labelled box); in
new-only data, the old objects that a look-alike row would take (a star row on diamonds).
The discriminant is ``S^-1 (mean of the new class - mean of the kept objects)``, ``S`` the two
groups' pooled covariance shrunk towards a multiple of the identity by the Ledoit-Wolf
estimate: box-head features share a large "some object here" component, and a row along the
new class's mean alone scores a look-alike kept object almost as high as the new class's own.
With no kept-class object read, the row is along the new class's mean feature.

Calibration of an imprinted row, per classifier (no constant is chosen by hand):

* ``scale`` is the mean L2 norm of the kept classes' rows (of the source's class rows when no
  class is kept): the new row is as long as the rows it competes with.
* The bias makes the new class's examples score like the kept classes score on theirs: with
  the log-odds of class k on a box x, ``z_k(x) - logsumexp_{j != k} z_j(x)`` over the kept
  classes and background (``z_k(x)`` for sigmoid classifiers), the bias is chosen so that the
  median log-odds of the new class on its examples equals the median log-odds of the kept
  classes on theirs. Medians, so that one occluded or mislabelled box does not move the row.
  The kept-class boxes are those in the images already read; when there are none, up to
  ``max_images`` images with kept classes are read for them, and when no class is kept the
  reference is the source classifier's confidence in its top class on the new examples.
* Then the bias is lowered, where needed, so that on every kept-class object read the new
  row's logit is at most the runner-up's there (the highest logit among the kept classes and
  background but the object's own class): the kept classes' scores, and their order, hardly
  move from iteration 0.

Examples are the non-crowd, non-empty boxes of ``DATASETS.TRAIN`` (dataset dicts), at most
``max_images`` images per new class, chosen by ranking the images holding that class by
``sha256(seed, class name, image name)``, the image name being its path relative to its
dataset's image root (``portable_names``): the choice depends neither on the order of the
dataset dicts, nor on the global RNG, nor on where the dataset lies (detectron2's loaders
give absolute paths, which would), and an image keeps its rank when the dataset grows. The
images are read with the test-time transform and the model runs in eval mode without
gradients; nothing else of the dataset is read. Every step is deterministic, so every rank of
a distributed run computes the same entries (the trainer also broadcasts them from rank 0, in
case GPUs of different kinds round differently).

A class falls back to ``head``, with the reason in the report, when the data has no labelled
instance of it, when all its boxes are crowd or empty, when none of its chosen images can be
read, or when the model has no classifier that can score boxes. Entries are computed in full
before any is returned: an error leaves the model as it was.

Only thing classes are initialised; a new *stuff* class of a semantic head keeps the head's
init (its labels are per-pixel masks, which this module does not read).

Shape shorthand: K = target classes, S = source classes, D = box-head feature width,
R = boxes, A = anchors per location.
"""
from ..options import NEW_CLASS_INITS
from .examples import NewClassExamples, choose_images
from .initialise import apply_new_class_entries, broadcast_thing_heads, init_new_classes
from .report import NewClassInit, NewClassReport
from .scoring import unsupported_reason

__all__ = [
    "NEW_CLASS_INITS",
    "NewClassExamples",
    "NewClassInit",
    "NewClassReport",
    "apply_new_class_entries",
    "broadcast_thing_heads",
    "choose_images",
    "init_new_classes",
    "unsupported_reason",
]
