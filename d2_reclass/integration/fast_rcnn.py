"""ReclassFastRCNNOutputLayers: a box predictor that knows its class names.

It adapts incoming ``cls_score`` / ``bbox_pred`` tensors in ``_load_from_state_dict``, so a
direct ``model.load_state_dict(state_dict)`` of rows for other classes maps them the same way
ReclassCheckpointer does (same keys, same seed, same fresh values), and it offers
:meth:`reclass` on a live model. Loaders built on fvcore's ``Checkpointer`` (a stock
``DetectionCheckpointer``, ``DefaultPredictor``) drop every tensor whose shape differs from the
model's before ``load_state_dict`` runs, so these rows never reach it: load through
:class:`~d2_reclass.ReclassCheckpointer` or :class:`~d2_reclass.ReclassPredictor` (models built
by the trainer mixin say so in the log, see :mod:`d2_reclass.integration.stock_loads`).
"""
import logging
from typing import Dict, Optional, Sequence, Type

from detectron2.config import configurable
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from torch import nn

from ..classes import check_class_list
from ..engine.live import reclass_model
from ..engine.report import ReclassReport
from ..engine.surgery import ClassSpec, reclass_state_dict
from ..errors import ClassListError
from ..layouts import THING, layouts_for_module, prefixed_layouts
from .config import options_from_config

__all__ = ["ReclassFastRCNNOutputLayers", "adopt_box_predictors", "use_reclass_box_predictors"]

logger = logging.getLogger(__name__)


class ReclassFastRCNNOutputLayers(FastRCNNOutputLayers):
    """:class:`FastRCNNOutputLayers` with class names and class-aware loading.

    Attributes:
        class_names (tuple[str] or None): the K classes, in the order of ``cls_score`` rows.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        class_names: Optional[Sequence[str]] = None,
        source_class_names: Optional[Sequence[str]] = None,
        class_map: Sequence[str] = (),
        reclass_mode: str = "auto",
        reclass_seed: int = 0,
        **kwargs,
    ):
        """
        Args:
            class_names: names of the K classes this predictor scores.
            source_class_names: names of the classes of checkpoints loaded into it, when they
                differ and the checkpoint carries none.
            class_map, reclass_mode, reclass_seed: as MODEL.RECLASS.CLASS_MAP / MODE / SEED.
            kwargs: as :class:`FastRCNNOutputLayers`.
        """
        super().__init__(input_shape, **kwargs)
        self._init_reclass(class_names, source_class_names, class_map, reclass_mode, reclass_seed)

    def _init_reclass(self, class_names, source_class_names, class_map, mode, seed) -> None:
        self.class_names = tuple(check_class_list(class_names, "class_names")) if class_names \
            else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ClassListError(
                f"{len(self.class_names)} class names for a box predictor with "
                f"{self.num_classes} classes; set MODEL.ROI_HEADS.NUM_CLASSES = "
                f"{len(self.class_names)} (MODEL.RECLASS.AUTO_NUM_CLASSES does this)."
            )
        self.source_class_names = tuple(source_class_names) if source_class_names else None
        self.class_map = tuple(class_map)
        self.reclass_mode = mode
        self.reclass_seed = seed

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(_reclass_options(cfg))
        return ret

    @classmethod
    def adopt(cls, predictor: FastRCNNOutputLayers, **options) -> "ReclassFastRCNNOutputLayers":
        """Turn an existing predictor into a ReclassFastRCNNOutputLayers, in place.

        The subclass adds no parameters, so re-typing keeps the predictor's parameters,
        device and hooks; a project's own predictor subclass keeps its methods (a combined
        subclass is made for it). ``options`` are the keyword arguments of ``__init__`` above.
        """
        if not isinstance(predictor, cls):
            predictor.__class__ = _combined_type(cls, type(predictor))
        predictor._init_reclass(
            options.get("class_names"), options.get("source_class_names"),
            options.get("class_map", ()), options.get("reclass_mode", "auto"),
            options.get("reclass_seed", 0))
        return predictor

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        own = {prefix + k: v for k, v in self.state_dict().items()}
        incoming = {k: v for k, v in state_dict.items() if k in own}
        if any(incoming[k].shape != own[k].shape for k in incoming):
            spec = ClassSpec(self.source_class_names, self.class_names, self.class_map,
                             "source_class_names", "class_names")
            new, report = reclass_state_dict(
                incoming, own, prefixed_layouts(layouts_for_module(self), prefix),
                classes={THING: spec}, mode=self.reclass_mode, seed=self.reclass_seed,
                source="the loaded state dict")
            state_dict.update(new)
            logger.info("[ReclassFastRCNNOutputLayers] %s:\n%s", prefix[:-1], report)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def reclass(
        self, new_classes: Sequence[str], *, class_map: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
    ) -> ReclassReport:
        """Change this predictor's classes in place by name; see :func:`reclass_model`.

        For a whole model (mask heads too), call :func:`reclass_model` on the model.
        """
        return reclass_model(
            self, new_classes, source_classes=self.class_names, class_map=class_map,
            mode="map" if self.class_names else "reinit",
            seed=self.reclass_seed if seed is None else seed)

    def __reduce_ex__(self, protocol):
        # A combined type made by adopt() exists only in the process that made it, so pickle
        # (torch.save(model) too) cannot find it by name: pickle the project's own predictor
        # class instead, and make the combined type again when unpickling.
        base = _COMBINED_BASES.get(type(self))
        if base is None:
            return super().__reduce_ex__(protocol)
        return _new_adopted, (base,), self.__getstate__()


_COMBINED: Dict[type, type] = {}
_COMBINED_BASES: Dict[type, type] = {}


def _combined_type(cls: Type[ReclassFastRCNNOutputLayers], base: type) -> type:
    if base is FastRCNNOutputLayers:
        return cls
    if base not in _COMBINED:
        combined = type(f"Reclass{base.__name__}", (cls, base), {})
        _COMBINED[base], _COMBINED_BASES[combined] = combined, base
    return _COMBINED[base]


def _new_adopted(base: type) -> ReclassFastRCNNOutputLayers:
    """An empty instance of the adopted form of ``base``, for unpickling to fill in."""
    combined = _combined_type(ReclassFastRCNNOutputLayers, base)
    return combined.__new__(combined)


def _reclass_options(cfg) -> dict:
    r = options_from_config(cfg)
    return dict(class_names=r.target_classes, source_class_names=r.source_classes,
                class_map=r.class_map, reclass_mode=r.mode, reclass_seed=r.seed)


def use_reclass_box_predictors(model: nn.Module, cfg) -> int:
    """Make every box predictor of ``model`` (standard, each cascade stage, project heads) a
    ReclassFastRCNNOutputLayers configured from ``cfg.MODEL.RECLASS``; returns how many.

    Call it right after building the model, before the optimizer and DDP are built: both
    capture the parameters, which re-typing keeps but a later reclass() would replace.
    """
    return adopt_box_predictors(model, **_reclass_options(cfg))


def adopt_box_predictors(model: nn.Module, **options) -> int:
    """:meth:`ReclassFastRCNNOutputLayers.adopt` every box predictor of ``model`` with
    ``options`` (``class_names``, ``source_class_names``, ...); returns how many."""
    predictors = [m for m in model.modules() if isinstance(m, FastRCNNOutputLayers)]
    for m in predictors:
        ReclassFastRCNNOutputLayers.adopt(m, **options)
    return len(predictors)
