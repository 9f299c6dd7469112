"""Third-party detectron2 projects with the integration lines only: DETR's d2 wrapper,
SparseR-CNN, DiffusionDet and detrex DINO, built from their own code at a tiny size on the CPU.

Run (from the repository root), pointed at fetched upstream checkouts::

    D2_RECLASS_CHECKOUTS=/path/to/checkouts D2_RECLASS_PYPATH=/path/to/stubs:/path/to/pydeps \\
        OMP_NUM_THREADS=1 .venv/bin/python benchmarks/third_party.py [--probe-only] [--probe-cost]

``D2_RECLASS_CHECKOUTS`` holds ``detr/`` (facebookresearch/detr), ``SparseR-CNN/``
(PeizeSun/SparseR-CNN), ``DiffusionDet/`` (ShoufaChen/DiffusionDet) and ``detrex/``
(IDEA-Research/detrex); a project whose checkout is missing prints "skipped". None of them is on
a package registry. ``D2_RECLASS_PYPATH`` is put on ``sys.path`` after them: detrex imports
``einops`` (``pip install --target DIR einops``), ``wandb`` and ``fairscale.nn.checkpoint``
(empty stand-ins do: only ``checkpoint_wrapper`` is named, and called only with
use_checkpoint=True). The other import fixes are made here, none in the checkouts: SparseR-CNN's
``util/misc.py`` reads torchvision 0.29 as 0.2 (its version is shown as 0.9.0 while it imports);
detrex's compiled ``detrex._C`` is absent (an empty module: its attention then takes the PyTorch
path) and its ``get_config`` reads configs from the checkout.

Per project, a source model for 5 classes (seed 1) is saved with its class names, then loaded
into models built through the integration lines (``add_reclass_config`` +
``prepare_reclass_config`` + ``ReclassCheckpointer.from_config``; detrex: the LazyConfig
tool's ``apply_lazy_num_classes`` + ``lazy_reclass_options``):

* (a) 5 classes -> a subset in another order plus a new class: every class tensor mapped by
  name, the no-object row kept, the new row at the head's init;
* (b) the same 5 classes in another order: rows follow the names; MODE strict raises;
* the project's NUM_CLASSES key after preparing; every other tensor bit for bit as stock
  DetectionCheckpointer loads it.

``--probe-only`` removes d2_reclass's built-in layouts and keys of these projects first (the
yacs projects are then read by the probe alone, as any project d2_reclass never saw).
``--probe-cost`` times the probe (median of 5, cache cleared) per model family, these projects'
full-size configs and detectron2's.
"""
import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import types

import torch

CHECKOUTS = os.environ.get("D2_RECLASS_CHECKOUTS", "")
FIVE = ["cat", "dog", "bird", "fish", "cow"]
TARGET = ["fish", "cat", "zebra"]  # a subset in another order, and a new class
SAME = ["dog", "cat", "bird", "fish", "cow"]


def _checkout(name):
    path = os.path.join(CHECKOUTS, name)
    return path if CHECKOUTS and os.path.isdir(path) else None


# ------------------------------------------------------------------ the projects, tiny
def _detr():
    root = _checkout("detr")
    if root is None:
        return None
    sys.path.insert(0, root)
    from d2.detr import add_detr_config

    def cfg_of(k, full=False):
        from detectron2.config import get_cfg

        cfg = get_cfg()
        add_detr_config(cfg)
        cfg.merge_from_file(os.path.join(root, "d2", "configs", "detr_256_6_6_torchvision.yaml"))
        cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", "cpu"
        cfg.MODEL.DETR.NUM_CLASSES = k
        if not full:
            cfg.merge_from_list([
                "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                "MODEL.RESNETS.OUT_FEATURES", ["res5"], "MODEL.DETR.HIDDEN_DIM", 64,
                "MODEL.DETR.NHEADS", 4, "MODEL.DETR.DIM_FEEDFORWARD", 128,
                "MODEL.DETR.ENC_LAYERS", 1, "MODEL.DETR.DEC_LAYERS", 2,
                "MODEL.DETR.NUM_OBJECT_QUERIES", 10])
        return cfg
    return cfg_of, "MODEL.DETR.NUM_CLASSES", ["detr.class_embed.weight"]


def _sparse_like(name, package, key, node):
    def setup():
        root = _checkout(name)
        if root is None:
            return None
        sys.path.insert(0, os.path.join(root, "projects", "SparseRCNN")
                        if package == "sparsercnn" else root)
        import torchvision

        real = torchvision.__version__
        torchvision.__version__ = "0.9.0"  # util/misc.py: float(__version__[:3]) < 0.7
        try:
            module = __import__(package)
        finally:
            torchvision.__version__ = real
        add_config = getattr(module, f"add_{package}_config")
        config = os.path.join(root, "projects", "SparseRCNN", "configs",
                              "sparsercnn.res50.100pro.3x.yaml") if package == "sparsercnn" \
            else os.path.join(root, "configs", "diffdet.coco.res50.yaml")

        def cfg_of(k, full=False):
            from detectron2.config import get_cfg

            cfg = get_cfg()
            add_config(cfg)
            cfg.merge_from_file(config)
            cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", "cpu"
            cfg.MODEL[node].NUM_CLASSES = k
            if not full:
                cfg.merge_from_list([
                    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                    "MODEL.FPN.OUT_CHANNELS", 64])
                cfg.MODEL[node].update(HIDDEN_DIM=64, NHEADS=4, DIM_FEEDFORWARD=128,
                                       DIM_DYNAMIC=16, NUM_PROPOSALS=10, NUM_HEADS=2)
            return cfg
        return cfg_of, key, ["head.head_series.0.class_logits.weight",
                             "head.head_series.1.class_logits.bias"]
    return setup


def _dino():
    root = _checkout("detrex")
    if root is None:
        return None
    sys.path.insert(0, root)
    sys.modules.setdefault("detrex._C", types.ModuleType("detrex._C"))
    import detrex.config
    from detectron2.config import LazyConfig
    from detectron2.layers import ShapeSpec

    detrex.config.get_config = lambda p: LazyConfig.load(os.path.join(root, "configs", p))
    path = os.path.join(root, "projects", "dino", "configs", "dino-resnet",
                        "dino_r50_4scale_12ep.py")

    def cfg_of(k, full=False):
        cfg = LazyConfig.load(path)
        m = cfg.model
        m.num_classes, m.device = k, "cpu"
        if not full:
            m.backbone.stages.depth = 18
            del m.backbone.stages.stride_in_1x1
            m.neck.input_shapes = {"res3": ShapeSpec(channels=128),
                                   "res4": ShapeSpec(channels=256),
                                   "res5": ShapeSpec(channels=512)}
            m.neck.out_channels = m.neck.norm_layer.num_channels = m.embed_dim = 64
            m.position_embedding.num_pos_feats = 32
            for part in (m.transformer.encoder, m.transformer.decoder):
                part.embed_dim, part.feedforward_dim = 64, 128
            m.transformer.encoder.num_layers, m.transformer.decoder.num_layers = 1, 2
            m.num_queries = m.select_box_nums_for_evaluation = 10
            m.dn_number = 3
        return cfg
    return cfg_of, "model.num_classes", ["class_embed.0.weight",
                                         "transformer.decoder.class_embed.2.bias",
                                         "label_enc.weight"]


def _vitdet():
    # detectron2's own ViTDet model (the model zoo's LazyConfig), its ViT-B made tiny.
    from detectron2 import model_zoo
    from detectron2.config import LazyConfig

    path = model_zoo.get_config_file("common/models/mask_rcnn_vitdet.py")

    def cfg_of(k, full=False):
        cfg = LazyConfig.load(path)
        cfg.model.roi_heads.num_classes = k
        if not full:
            net = cfg.model.backbone.net
            net.embed_dim, net.depth, net.num_heads = 64, 2, 2
            net.img_size, net.window_block_indexes = 256, [0]
            cfg.model.backbone.square_pad = 256
        return cfg
    return cfg_of, "model.roi_heads.num_classes", ["roi_heads.box_predictor.cls_score.weight",
                                                   "roi_heads.box_predictor.bbox_pred.weight"]


PROJECTS = {
    "DETR (d2 wrapper)": _detr,
    "SparseR-CNN": _sparse_like("SparseR-CNN", "sparsercnn", "MODEL.SparseRCNN.NUM_CLASSES",
                                "SparseRCNN"),
    "DiffusionDet": _sparse_like("DiffusionDet", "diffusiondet",
                                 "MODEL.DiffusionDet.NUM_CLASSES", "DiffusionDet"),
    "detrex DINO": _dino,
    "ViTDet (detectron2)": _vitdet,
}


# ------------------------------------------------------------------ building and loading
def _is_lazy(cfg):
    return not hasattr(cfg, "MODEL")


def _build(cfg, seed):
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return (instantiate(cfg.model) if _is_lazy(cfg) else build_model(cfg)).eval()


def _prepared(cfg_of, classes, mode):
    """(config, model, checkpointer) through the integration lines."""
    from d2_reclass import ReclassCheckpointer, add_reclass_config, prepare_reclass_config
    from d2_reclass.integration.lazy import apply_lazy_num_classes, lazy_reclass_options
    from d2_reclass.integration.probe import attach_lazy_probe

    cfg = cfg_of(len(FIVE))
    if _is_lazy(cfg):
        cfg.reclass = dict(mode=mode, target_classes=list(classes))
        apply_lazy_num_classes(cfg)
        model = attach_lazy_probe(_build(cfg, 7), cfg)
        return cfg, model, ReclassCheckpointer(model, reclass=lazy_reclass_options(cfg))
    add_reclass_config(cfg)
    cfg.MODEL.RECLASS.TARGET_CLASSES, cfg.MODEL.RECLASS.MODE = list(classes), mode
    cfg, _ = prepare_reclass_config(cfg)
    model = _build(cfg, 7)
    return cfg, model, ReclassCheckpointer.from_config(cfg, model)


def _stock_state(cfg, path):
    from detectron2.checkpoint import DetectionCheckpointer

    model = _build(cfg, 7)
    DetectionCheckpointer(model).load(path)
    return model.state_dict()


def _run(name, setup, tmp):
    from d2_reclass import CLASSES_KEY, ClassMismatchError, find_layouts

    found = setup()
    if found is None:
        print(f"{name}: skipped (no checkout under D2_RECLASS_CHECKOUTS={CHECKOUTS!r})")
        return
    cfg_of, key, shown = found
    source = _build(cfg_of(len(FIVE)), 1).state_dict()
    path = os.path.join(tmp, f"{name.split()[0]}.pth")
    torch.save({"model": source, CLASSES_KEY: {"thing_classes": FIVE}}, path)
    row = {}
    # (a) a subset in another order, and a new class.
    cfg, model, ckpt = _prepared(cfg_of, TARGET, "auto")
    ckpt.load(path)
    state, layouts = model.state_dict(), find_layouts(model)
    class_keys = {lay.key for lay in layouts}
    actions = {t.key: t.action for t in ckpt.report.tensors}
    by_key = {lay.key: lay for lay in layouts}
    learnt = sorted(k for k, lay in by_key.items() if not lay.keep_model)
    row["(a) class tensors mapped"] = f"{sum(actions.get(k) == 'mapped' for k in learnt)}" \
        f"/{len(learnt)}"
    kept = [lay.key for lay in layouts if lay.background and not lay.keep_model]
    row["(a) no-object rows kept"] = "yes" if all(
        torch.equal(state[k][-1], source[k][-1]) for k in kept) else "NO"
    if not kept:
        row["(a) no-object rows kept"] = "none (focal)"
    rows_ok = all(torch.equal(_rows(state[k], by_key[k], [0, 1]),
                              _rows(source[k], by_key[k], [3, 0])) for k in learnt)
    row["(a) kept rows follow names"] = "yes" if rows_ok else "NO"
    row["(a) new row at the head's init"] = _fresh_rows(state, layouts, learnt)
    shared = model.state_dict(keep_vars=True)
    aliases = [k for k in learnt if any(shared[k] is shared[o] for o in learnt if o != k)]
    if aliases:
        row["(a) shared module's names identical"] = "yes ({} names)".format(len(aliases)) \
            if all(torch.equal(state[k], state[o]) for k in aliases for o in aliases
                   if shared[k] is shared[o]) else "NO"
    stock = _stock_state(cfg, path)
    others = [k for k in state if k not in class_keys]
    row["non-class tensors as stock"] = "yes ({} tensors)".format(len(others)) if all(
        torch.equal(state[k], stock[k]) for k in others) else "NO"
    row["NUM_CLASSES key"] = f"{key} = {_get(cfg, key)}"
    # (b) the same classes in another order.
    _, model, ckpt = _prepared(cfg_of, SAME, "auto")
    ckpt.load(path)
    state = model.state_dict()
    order = [1, 0, 2, 3, 4]
    row["(b) rows follow names"] = "yes" if all(
        torch.equal(_rows(state[k], by_key[k], range(5)), _rows(source[k], by_key[k], order))
        for k in learnt) else "NO"
    _, model, ckpt = _prepared(cfg_of, SAME, "strict")
    try:
        ckpt.load(path)
        row["(b) strict"] = "NO ERROR"
    except ClassMismatchError:
        row["(b) strict"] = "raises ClassMismatchError"
    print(f"\n{name}: class tensors {len(class_keys)} (e.g. {', '.join(shown)})")
    for what, value in row.items():
        print(f"  {what}: {value}")


def _rows(tensor, layout, classes):
    """The entries of ``classes`` on ``layout``'s axis (class-major blocks, as every head
    here has them)."""
    b = layout.block
    index = torch.tensor([c * b + i for c in classes for i in range(b)])
    return tensor.index_select(layout.axis, index)


def _fresh_rows(state, layouts, learnt):
    """Whether the new class's row (index 2) holds what the head's init gives."""
    checks = []
    for lay in layouts:
        if lay.key not in learnt:
            continue
        row = _rows(state[lay.key], lay, [2])
        if lay.init.kind == "constant":
            checks.append(bool((row == lay.init.value).all()))
        elif lay.init.kind == "uniform":
            checks.append(bool(row.abs().max() <= lay.init.value))
        elif lay.init.kind == "xavier_uniform":
            shape = state[lay.key].shape
            checks.append(bool(row.abs().max() <= (6 / (shape[0] + shape[1])) ** 0.5))
        elif lay.init.kind == "normal":
            checks.append(bool(row.abs().max() <= 8 * lay.init.value))
        else:
            checks.append(bool(row.abs().max() > 0))
    kinds = sorted({str(lay.init) for lay in layouts if lay.key in learnt})
    return ("yes" if all(checks) else "NO") + f" ({', '.join(kinds)})"


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _counts(cfg):
    from d2_reclass.integration import probe

    return probe.lazy_num_classes_fields(cfg) if _is_lazy(cfg) \
        else probe.config_num_classes_keys(cfg)


def _forget_builtin_layouts():
    """--probe-only: d2_reclass as if it had never heard of these projects."""
    from d2_reclass.layouts import core, num_classes

    prefixes = ("models.", "detr.models.", "sparsercnn.", "diffusiondet.", "projects.",
                "detrex.")
    for key in [k for k in core._LAYOUTS if isinstance(k, str) and k.startswith(prefixes)]:
        del core._LAYOUTS[key]
    num_classes._KEY_FNS[:] = [fn for fn in num_classes._KEY_FNS
                               if fn.__module__.rpartition(".")[2] not in ("detr", "sparse_rcnn")]


def _probe_cost(setups):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from d2_reclass.integration import probe

    configs = {}
    for name, setup in setups.items():
        found = setup()
        if found is not None:
            configs[name + " (full size)"] = found[0](80, full=True)
    for zoo in ("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
                "COCO-Detection/retinanet_R_50_FPN_3x.yaml",
                "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
                "COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml"):
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(zoo))
        cfg.MODEL.DEVICE = "cpu"
        configs[zoo.split("/")[1][:-5]] = cfg
    print("\nprobe cost (probe_config, cache cleared; median of 5 after one warm-up):")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(probe.__name__)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for name, cfg in configs.items():
        times = []
        for _ in range(6):
            probe._CACHE.clear()
            t0 = time.perf_counter()
            axes = probe.probe_lazy_config(cfg) if _is_lazy(cfg) else probe.probe_config(cfg)
            times.append(time.perf_counter() - t0)
        builds = re.search(r"\((\d+) builds\)", lines[-1]).group(1)
        print(f"  {name}: {statistics.median(times[1:]) * 1000:.0f} ms ({builds} builds, "
              f"{len(_counts(cfg))} NUM_CLASSES keys, "
              f"{len(axes)} class axes)")
    logger.removeHandler(handler)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe-only", action="store_true",
                        help="remove the built-in layouts of these projects first")
    parser.add_argument("--probe-cost", action="store_true", help="time the probe per family")
    parser.add_argument("--only", action="append", choices=sorted(PROJECTS),
                        help="only this project (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path += [p for p in os.environ.get("D2_RECLASS_PYPATH", "").split(":") if p]
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    logging.getLogger("d2_reclass").setLevel(logging.ERROR)
    if args.probe_only:
        _forget_builtin_layouts()
    setups = {name: _once(setup) for name, setup in PROJECTS.items()
              if not args.only or name in args.only}
    print(f"torch {torch.__version__}, {'probe only' if args.probe_only else 'built-in layouts'}"
          f", checkouts {CHECKOUTS or '(none)'}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, setup in setups.items():
            _run(name, setup, tmp)
    if args.probe_cost:
        _probe_cost(setups)


def _once(setup):
    done = []

    def run():
        if not done:
            done.append(setup())
        return done[0]
    return run


if __name__ == "__main__":
    main()
