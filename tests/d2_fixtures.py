"""Small real detectron2 models and checkpoints for the integration tests.

The models come from ``configs/Base-Shapes-RCNN.yaml`` (a model-zoo Faster R-CNN config made
small: ResNet-18 FPN, 64 channels), so building one takes well under a second.
"""
import contextlib
import json
import logging
import os
from typing import Iterator, List, Sequence

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.modeling import build_model
from iopath.common.file_io import PathHandler

from d2_reclass import add_reclass_config, merge_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, "configs", "Base-Shapes-RCNN.yaml")
SIX = ["square", "circle", "triangle", "diamond", "hexagon", "cross"]
THREE = ["triangle", "square", "star"]
#: For each THREE class, the SIX index it maps from (None: new).
THREE_FROM_SIX = [2, 0, None]


def small_cfg(num_classes: int, *, mask: bool = False, opts: Sequence = ()):
    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, BASE_CONFIG)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.MASK_ON = mask
    cfg.merge_from_list(list(opts))
    return cfg


def small_model(num_classes: int, *, seed: int = 0, mask: bool = False, opts: Sequence = ()):
    torch.manual_seed(seed)
    return build_model(small_cfg(num_classes, mask=mask, opts=opts)).eval()


def params(model: torch.nn.Module):
    """A detached copy of every parameter and buffer, to compare before/after."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@contextlib.contextmanager
def captured_logs(*names: str) -> Iterator[List[str]]:
    """Messages logged to these loggers (whatever their propagate setting)."""
    messages: List[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Handler(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def save_mapped_checkpoint(cfg, seed: int = 5) -> dict:
    """Build ``cfg``'s model, load MODEL.WEIGHTS into it through ReclassCheckpointer (the
    classes mapped as ``cfg`` says) and save it as OUTPUT_DIR/model_final.pth: what a fine-tune
    at BASE_LR 0 saves. Returns the saved checkpoint."""
    from d2_reclass import ReclassCheckpointer

    os.makedirs(cfg.OUTPUT_DIR)  # what a train_net's default_setup(cfg, args) does first
    torch.manual_seed(seed)
    checkpointer = ReclassCheckpointer.from_config(cfg, build_model(cfg), cfg.OUTPUT_DIR)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    checkpointer.save("model_final")
    return torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)


def register_shapes_val(root: str, name: str, class_names: Sequence[str]) -> None:
    """Register ``name``: two synthetic val images of squares, circles and triangles, whose
    categories are called ``class_names`` (in that order), with stock register_coco_instances."""
    import json

    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from d2_reclass.data.synthetic import make_shapes_dataset

    val_json = make_shapes_dataset(root, "val", ["square", "circle", "triangle"], 2,
                                   image_size=96, seed=1)
    with open(val_json) as f:
        data = json.load(f)
    for category, class_name in zip(data["categories"], class_names):
        category["name"] = class_name
    with open(val_json, "w") as f:
        json.dump(data, f)
    if name not in MetadataCatalog.list():
        register_coco_instances(name, {}, val_json, os.path.join(root, "val"))


class StorageHandler(PathHandler):
    """A custom PathManager prefix, as users register for their storage."""

    PREFIX = "reclass-test://"

    def __init__(self, root):
        super().__init__()
        self.root = root

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return str(self.root / path[len(self.PREFIX):])

    def _open(self, path, mode="r", **kwargs):
        return open(self._get_local_path(path), mode)

    def _exists(self, path, **kwargs):
        return (self.root / path[len(self.PREFIX):]).exists()


def project_setup(root, **yaml_keys):
    """A user project's setup(): its YAML (``_BASE_`` Base-Shapes-RCNN; ``train``, ``test``,
    ``reclass``, ``weights``, ``iters`` as given) written to ``root/config.yaml``, then stock
    get_cfg / add_reclass_config / merge_from_file / default_setup. Returns the frozen cfg."""
    config = root / "config.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "_BASE_": BASE_CONFIG,
        "DATASETS": {"TRAIN": yaml_keys.pop("train"), "TEST": yaml_keys.pop("test", [])},
        "MODEL": {"RECLASS": yaml_keys.pop("reclass", {}),
                  "WEIGHTS": yaml_keys.pop("weights", "")},
        # Two images per iteration: every image is drawn once the iterations (SOLVER.MAX_ITER,
        # default 2) cover the data, since detectron2's sampler draws whole permutations.
        "SOLVER": {"IMS_PER_BATCH": 2, "MAX_ITER": yaml_keys.pop("iters", 2), "BASE_LR": 0.0},
        "DATALOADER": {"NUM_WORKERS": 0}, "OUTPUT_DIR": str(root / "out")}))
    args = default_argument_parser().parse_args(["--config-file", str(config)])
    cfg = get_cfg()
    add_reclass_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def labels_reaching_the_loss(trainer):
    """Train and return, per image ``dataset/file`` (the image's folder and file name), the
    gt_classes the model's forward received, sorted."""
    seen = {}

    def record(module, args):
        for d in args[0]:
            image = os.path.join(*d["file_name"].split(os.sep)[-2:])
            seen[image] = sorted(d["instances"].gt_classes.tolist())

    handle = trainer.model.register_forward_pre_hook(record)
    try:
        trainer.train()
    finally:
        handle.remove()
    return seen
