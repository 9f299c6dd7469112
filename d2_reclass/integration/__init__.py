"""detectron2 glue: thin, at the edge, each module reading detectron2's objects into the pure
floors below.

:mod:`.config` (``MODEL.RECLASS`` keys, ``prepare_reclass_config``, NUM_CLASSES from the target
classes), :mod:`.checkpoint` (``ReclassCheckpointer``), :mod:`.fast_rcnn` (the box predictor),
:mod:`.stock_loads` (the warning when stock loads skip class heads), :mod:`.preservation` (the
teacher of a yacs config), :mod:`.trainer` (the trainer mixin), :mod:`.predictor`, and
:mod:`.lazy` (the same for LazyConfigs).

Nothing is re-exported here: ``d2_reclass`` does that, lazily, so that reading a config (the
CLI) does not import the trainer and the evaluators.
"""
