"""The probe: a model of a project d2_reclass has never seen, read by building it again.

A yacs config whose ``*NUM_CLASSES`` keys are not all known (neither detectron2's, nor a key a
registered project adds, nor one a registered function names for this config) belongs to a
project with no registered layouts. Its model is built again as configured and twice with
every such count moved (each key by its own amount: :func:`~d2_reclass.layouts.probe.
probe_counts`), on the ``meta`` device where the model allows it (no memory, no init; else on
the CPU, the global RNG left as it was), and the state dicts compared
(:func:`d2_reclass.layouts.probe.fit_class_axes`). That tells

* which keys size heads: what AUTO_NUM_CLASSES sets (:func:`probed_num_classes_keys`);
* which tensors follow each count, and how: the layouts left on the built model
  (:func:`attach_probe`), for tensors no registered layout claims.

Results are cached per config (the class counts aside), so a trainer that prepares its config
and builds its model probes once.

A LazyConfig model is read the same way (:func:`attach_lazy_probe`, :func:`probed_lazy_fields`),
its ``num_classes`` fields in place of the keys, when no registered layout knows it.
"""
import copy
import logging
import time
from typing import Dict, List, Optional, Set, Tuple

import torch
from detectron2.config import CfgNode, get_cfg, instantiate
from detectron2.modeling import build_model
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..layouts import PROBED_ATTR, STUFF, THING, find_layouts
from ..layouts.num_classes import (
    add_registered_defaults,
    num_classes_keys,
    registered_num_classes_keys,
)
from ..layouts.probe import ClassAxis, fit_class_axes, probe_counts, probed_layouts

__all__ = [
    "LAZY_KNOWN_FIELDS",
    "attach_lazy_probe",
    "attach_probe",
    "lazy_num_classes_fields",
    "probe_lazy_config",
    "probed_lazy_fields",
    "config_num_classes_keys",
    "default_config",
    "probe_config",
    "probed_num_classes_keys",
    "unknown_num_classes_keys",
]

logger = logging.getLogger(__name__)

#: How much the probe moves one count where it builds one key at a time.
_DELTA = 3
_CACHE: Dict[str, List[ClassAxis]] = {}


def default_config() -> CfgNode:
    """detectron2's default config, with PointRend's keys (when it imports) and those of every
    registered project (:func:`~d2_reclass.layouts.num_classes.register_default_config`)."""
    cfg = get_cfg()
    try:
        from detectron2.projects.point_rend import add_pointrend_config

        add_pointrend_config(cfg)
    except ImportError:  # PointRend needs OpenCV; without it there is no POINT_HEAD key
        pass
    add_registered_defaults(cfg)  # the projects' own keys (MODEL.CENTERNET.NUM_CLASSES, ...)
    return cfg


def config_num_classes_keys(cfg: CfgNode) -> Dict[str, int]:
    """Every integer key of ``cfg`` whose name ends in NUM_CLASSES, with its value."""
    found: Dict[str, int] = {}

    def walk(node: CfgNode, prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, CfgNode):
                walk(value, f"{prefix}{name}.")
            elif name.endswith("NUM_CLASSES") and isinstance(value, int) \
                    and not isinstance(value, bool):
                found[prefix + name] = value

    walk(cfg, "")
    return found


def unknown_num_classes_keys(cfg: CfgNode) -> List[str]:
    """The NUM_CLASSES keys of ``cfg`` that nothing registered knows, where no registered
    function knows the config (a registered project's config is known whatever keys it adds)
    and the key is not a default one (:func:`default_config`). Not empty: the model is a
    project's that d2_reclass has no layouts for, and is probed."""
    if registered_num_classes_keys(cfg) is not None:
        return []
    known = set(config_num_classes_keys(default_config()))
    return [key for key in config_num_classes_keys(cfg) if key not in known]


def probe_config(cfg: CfgNode) -> List[ClassAxis]:
    """The class axes of ``cfg``'s model, each with the NUM_CLASSES key that sizes it (the
    first key found, when two size one axis). Empty when the model cannot be built.

    Builds the model three times (once per key more where a moved count cannot be built; see
    the module docstring); the global RNG is left as it was."""
    counts = config_num_classes_keys(cfg)
    cache_key = _cache_key(cfg, counts)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        builds = _builds(counts, lambda moved: _shapes(_with_counts(cfg, moved)))
    axes = _fit(builds, dict(num_classes_keys(cfg)))
    logger.info(f"[d2_reclass probe] {cfg.MODEL.META_ARCHITECTURE}: {len(axes)} class-dependent "
                f"tensor axes found in {time.perf_counter() - t0:.2f} s ({len(builds)} builds): "
                + ", ".join(f"{ax.key} ({ax.config_key})" for ax in axes))
    _CACHE[cache_key] = axes
    return axes


def probed_num_classes_keys(cfg: CfgNode) -> Optional[List[Tuple[str, str]]]:
    """The (key, class space) pairs that size ``cfg``'s heads as the probe finds them, for a
    project nothing registered knows; None for a known one (or a model the probe cannot
    build), whose keys :func:`~d2_reclass.layouts.num_classes.num_classes_keys` gives."""
    if not unknown_num_classes_keys(cfg):
        return None
    axes = probe_config(cfg)
    keys = list(dict.fromkeys((ax.config_key, ax.space) for ax in axes))
    return keys or None


def attach_probe(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """Leave the probe's layouts on ``model`` (built from ``cfg``) for
    :func:`~d2_reclass.layouts.find_layouts`, where ``cfg`` belongs to a project nothing
    registered knows (:func:`unknown_num_classes_keys`); a known one, or a model probed
    already, is left as it is. Returns ``model``."""
    inner = model.module if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    if getattr(inner, PROBED_ATTR, None) is not None or not unknown_num_classes_keys(cfg):
        return model
    layouts = probed_layouts(probe_config(cfg), inner, config_num_classes_keys(cfg))
    setattr(inner, PROBED_ATTR, layouts)
    return model


# ------------------------------------------------------------------ LazyConfig
#: The fields where detectron2's LazyConfig models keep their class counts (set by
#: :func:`~d2_reclass.integration.lazy.apply_lazy_num_classes` without a probe).
LAZY_KNOWN_FIELDS = ("model.roi_heads.num_classes", "model.num_classes",
                     "model.sem_seg_head.num_classes")


def lazy_num_classes_fields(cfg) -> Dict[str, int]:
    """Every integer ``num_classes`` field under a LazyConfig's ``model`` (interpolations such
    as a criterion's ``"${..num_classes}"`` follow another field and are left out)."""
    found: Dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        for name in list(node.keys()):
            if OmegaConf.is_interpolation(node, name):
                continue
            value = node[name]
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{name}.")
            elif name == "num_classes" and isinstance(value, int) \
                    and not isinstance(value, bool):
                found[prefix + name] = value

    if isinstance(cfg.get("model", None), DictConfig):
        walk(cfg.model, "model.")
    return found


def probe_lazy_config(cfg) -> List[ClassAxis]:
    """:func:`probe_config` for a LazyConfig: ``cfg.model`` instantiated (on the meta device
    where it can be) as it is and with each ``num_classes`` field changed."""
    fields = lazy_num_classes_fields(cfg)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        builds = _builds(fields, lambda moved: _lazy_shapes(_lazy_with_counts(cfg.model, moved)))
    axes = _fit(builds, {path: _lazy_space(path) for path in fields})
    logger.info(f"[d2_reclass probe] LazyConfig model: {len(axes)} class-dependent tensor axes "
                f"found in {time.perf_counter() - t0:.2f} s ({len(builds)} builds)")
    return axes


def probed_lazy_fields(cfg) -> List[Tuple[str, str]]:
    """The (field, class space) pairs that size a LazyConfig model's heads, as the probe finds
    them, for ``num_classes`` fields detectron2's LazyConfig models do not have
    (:data:`LAZY_KNOWN_FIELDS`); empty when every field is a known one."""
    if all(path in LAZY_KNOWN_FIELDS for path in lazy_num_classes_fields(cfg)):
        return []
    return list(dict.fromkeys((ax.config_key, ax.space) for ax in probe_lazy_config(cfg)))


def attach_lazy_probe(model: nn.Module, cfg) -> nn.Module:
    """:func:`attach_probe` for a model instantiated from LazyConfig ``cfg``: probed when no
    registered layout finds a class tensor in it. Returns ``model``."""
    inner = model.module if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    if getattr(inner, PROBED_ATTR, None) is not None or find_layouts(inner):
        return model
    layouts = probed_layouts(probe_lazy_config(cfg), inner, lazy_num_classes_fields(cfg))
    setattr(inner, PROBED_ATTR, layouts)
    return model


def _builds(counts: Dict[str, int], shapes_at) -> List[Tuple[dict, Dict[str, int], Set[str]]]:
    """(shapes, counts, buffers) of the model as configured and at :func:`probe_counts`'s
    counts (three builds); where those cannot be built (a count a project refuses), one build
    per key moved alone. Empty when the model as configured cannot be built."""
    base = shapes_at(counts)
    if base is None:
        return []
    builds = [(base[0], counts, base[1])]
    for moved in probe_counts(counts):
        other = shapes_at(moved)
        if other is None:
            break
        builds.append((other[0], moved, other[1]))
    else:
        return builds
    builds = builds[:1]
    for key, k in counts.items():
        moved = {**counts, key: k + _DELTA}
        other = shapes_at(moved)
        if other is not None:
            builds.append((other[0], moved, other[1]))
    return builds


def _fit(builds, spaces: Dict[str, str]) -> List[ClassAxis]:
    if not builds:
        return []
    return fit_class_axes([(shapes, counts) for shapes, counts, _ in builds], builds[0][2],
                          spaces)


def _with_counts(cfg: CfgNode, counts: Dict[str, int]) -> CfgNode:
    out = cfg.clone()
    out.defrost()
    for key, k in counts.items():
        _set(out, key, k)
    return out


def _lazy_with_counts(model_cfg, counts: Dict[str, int]):
    out = copy.deepcopy(model_cfg)
    for path, k in counts.items():
        OmegaConf.update(out, path[len("model."):], k, merge=False)
    return out


def _lazy_space(path: str) -> str:
    return STUFF if path == "model.sem_seg_head.num_classes" else THING


def _lazy_shapes(model_cfg) -> Optional[Tuple[Dict[str, Tuple[int, ...]], Set[str]]]:
    try:
        with torch.device("meta"):
            model = instantiate(model_cfg)
    except Exception as e:  # a project's __init__ may need real tensors
        logger.debug(f"[d2_reclass probe] no meta build ({type(e).__name__}: {e}); on the CPU")
        try:
            model = instantiate(model_cfg)
        except Exception as e:
            logger.info(f"[d2_reclass probe] cannot instantiate the model with these class "
                        f"counts ({type(e).__name__}: {e})")
            return None
    return ({k: tuple(v.shape) for k, v in model.state_dict().items()},
            {name for name, _ in model.named_buffers()})


def _shapes(cfg: CfgNode) -> Optional[Tuple[Dict[str, Tuple[int, ...]], Set[str]]]:
    """(shape of every state-dict entry, names of the buffers) of ``cfg``'s model; None when it
    cannot be built."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    try:
        # build_model moves the model to MODEL.DEVICE, so it too must be meta.
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            model = build_model(cfg)
    except Exception as e:  # a project's __init__ may need real tensors
        logger.debug(f"[d2_reclass probe] no meta build ({type(e).__name__}: {e}); on the CPU")
        cfg.MODEL.DEVICE = "cpu"
        try:
            model = build_model(cfg)
        except Exception as e:  # the count itself may be refused (a vocabulary's length)
            logger.info(f"[d2_reclass probe] cannot build {cfg.MODEL.META_ARCHITECTURE} with "
                        f"these class counts ({type(e).__name__}: {e})")
            return None
    return ({k: tuple(v.shape) for k, v in model.state_dict().items()},
            {name for name, _ in model.named_buffers()})


def _set(cfg: CfgNode, key: str, value: int) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def _cache_key(cfg: CfgNode, counts: Dict[str, int]) -> str:
    normal = cfg.clone()
    normal.defrost()
    for key in counts:
        _set(normal, key, 0)
    normal.MODEL.WEIGHTS = ""
    normal.OUTPUT_DIR = ""
    return normal.dump()

