"""Mask2Former's R50 configs, rebuilt in code, and its meta-architecture built from its package.

``maskformer2==0.1`` (requirements/projects.txt) ships no config files: its sdist holds only the
``mask2former`` and ``mask2former_video`` packages, and upstream Mask2Former keeps its YAML files
in the repository's ``configs/``. As the coverage matrix does for detectron2's bundled projects,
each config is rebuilt here from what upstream's ``train_net.py`` ``setup`` calls
(``get_cfg``, ``add_deeplab_config``, ``add_maskformer2_config``) and the values that the YAML
file and its ``Base-*.yaml`` set (read from upstream's repository at commit 9b0651c), named by its
path under upstream's ``configs/``. Only model, input-format, mapper and dataset keys are set;
solver and test-time schedules play no part in a load.

The package's ``MaskFormer.from_config`` cannot build a model: it passes ``weight_dict=`` to the
package's own ``SetCriterion``, whose ``__init__`` takes ``class_weight``, ``mask_weight``,
``dice_weight`` and ``num_layers`` instead and builds the weight dict itself (upstream's takes
``weight_dict``). :func:`build_mask2former` builds the meta-architecture from the package's
classes with explicit arguments, as upstream's ``from_config`` does, giving the criterion
upstream's weight dict (one set of auxiliary weights per decoder layer but the last).
"""
from typing import Dict, List, Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from torch import nn

__all__ = ["R50_CONFIGS", "TINY", "build_mask2former", "mask2former_cfg"]

#: Values every R50 config sets (its Base-*.yaml and the maskformer2_R50_* file).
_R50 = [
    "MODEL.META_ARCHITECTURE", "MaskFormer", "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.PIXEL_MEAN", [123.675, 116.280, 103.530], "MODEL.PIXEL_STD", [58.395, 57.120, 57.375],
    "MODEL.RESNETS.STEM_TYPE", "basic", "MODEL.RESNETS.STRIDE_IN_1X1", False,
    "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
    "MODEL.RESNETS.RES5_MULTI_GRID", [1, 1, 1],
    "MODEL.SEM_SEG_HEAD.NAME", "MaskFormerHead",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res2", "res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 256, "MODEL.SEM_SEG_HEAD.MASK_DIM", 256,
    "MODEL.SEM_SEG_HEAD.NORM", "GN",
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 6,
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MultiScaleMaskedTransformerDecoder",
    "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "multi_scale_pixel_decoder",
    "MODEL.MASK_FORMER.CLASS_WEIGHT", 2.0, "MODEL.MASK_FORMER.MASK_WEIGHT", 5.0,
    "MODEL.MASK_FORMER.DICE_WEIGHT", 5.0, "MODEL.MASK_FORMER.DROPOUT", 0.0,
    "MODEL.MASK_FORMER.DEC_LAYERS", 10, "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", 0.8,
    "INPUT.FORMAT", "RGB",
]


def _task(num_classes: int, semantic: bool, instance: bool, panoptic: bool) -> List:
    return ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes,
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", semantic,
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", instance,
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", panoptic]


def _data(train: str, test: str, mapper: str) -> List:
    return ["DATASETS.TRAIN", (train,), "DATASETS.TEST", (test,),
            "INPUT.DATASET_MAPPER_NAME", mapper]


_MASK_THRESHOLD = ["MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", 0.8]
_SYNC_BN = ["MODEL.RESNETS.NORM", "SyncBN"]
_MAPILLARY = ["MODEL.SEM_SEG_HEAD.IGNORE_VALUE", 65]

#: Every non-video R50 config of upstream Mask2Former, by its path under upstream's configs/:
#: the values it sets beyond :data:`_R50`.
R50_CONFIGS: Dict[str, List] = {
    "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml":
        _task(133, True, True, True) + _MASK_THRESHOLD
        + _data("coco_2017_train_panoptic", "coco_2017_val_panoptic_with_sem_seg",
                "coco_panoptic_lsj"),
    "coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml":
        _task(80, False, True, False) + _MASK_THRESHOLD
        + _data("coco_2017_train", "coco_2017_val", "coco_instance_lsj"),
    "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml":
        _task(150, True, False, False) + _MASK_THRESHOLD
        + _data("ade20k_sem_seg_train", "ade20k_sem_seg_val", "mask_former_semantic"),
    "ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml":
        _task(150, True, True, True) + _MASK_THRESHOLD
        + _data("ade20k_panoptic_train", "ade20k_panoptic_val", "mask_former_panoptic"),
    # Upstream leaves SEMANTIC_ON and PANOPTIC_ON on for this instance-segmentation config.
    "ade20k/instance-segmentation/maskformer2_R50_bs16_160k.yaml":
        _task(100, True, True, True) + _MASK_THRESHOLD
        + _data("ade20k_instance_train", "ade20k_instance_val", "mask_former_instance"),
    "cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml":
        _task(19, True, False, False) + _MASK_THRESHOLD + _SYNC_BN
        + _data("cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val",
                "mask_former_semantic"),
    "cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml":
        _task(19, True, True, True) + _MASK_THRESHOLD + _SYNC_BN
        + _data("cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val",
                "mask_former_panoptic"),
    "cityscapes/instance-segmentation/maskformer2_R50_bs16_90k.yaml":
        _task(8, False, True, False) + _MASK_THRESHOLD + _SYNC_BN
        + _data("cityscapes_fine_instance_seg_train", "cityscapes_fine_instance_seg_val",
                "mask_former_instance"),
    "mapillary-vistas/semantic-segmentation/maskformer2_R50_bs16_300k.yaml":
        _task(65, True, False, False) + _MAPILLARY
        + _data("mapillary_vistas_sem_seg_train", "mapillary_vistas_sem_seg_val",
                "mask_former_semantic"),
    "mapillary-vistas/panoptic-segmentation/maskformer_R50_bs16_300k.yaml":
        _task(65, True, False, True) + _MAPILLARY
        + _data("mapillary_vistas_panoptic_train", "mapillary_vistas_panoptic_val",
                "mask_former_panoptic"),
}

#: The shrunk model the tests train on the CPU: 10 queries, 3 decoder layers (DEC_LAYERS counts
#: the prediction from the learnable queries too), 1 deformable encoder layer, FFN 256, and
#: 32-pixel LSJ crops. The ResNet-50 is unchanged.
TINY = [
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 10, "MODEL.MASK_FORMER.DEC_LAYERS", 4,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1, "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 256,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 256, "TEST.DETECTIONS_PER_IMAGE", 10,
    "INPUT.IMAGE_SIZE", 64,
]


def mask2former_cfg(name: str, opts: Sequence = ()) -> CfgNode:
    """The config ``name`` (a key of :data:`R50_CONFIGS`) as upstream's ``setup`` builds it,
    then ``opts``; not frozen."""
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_list(_R50 + R50_CONFIGS[name] + list(opts))
    return cfg


def build_mask2former(cfg: CfgNode) -> nn.Module:
    """``MaskFormer`` from the package's classes, with the arguments upstream's
    ``MaskFormer.from_config`` derives from ``cfg`` (see the module docstring), on
    ``cfg.MODEL.DEVICE``."""
    from detectron2.modeling import build_backbone, build_sem_seg_head
    from mask2former import MaskFormer
    from mask2former.modeling.criterion import SetCriterion
    from mask2former.modeling.matcher import HungarianMatcher

    mf = cfg.MODEL.MASK_FORMER
    backbone = build_backbone(cfg)
    sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
    matcher = HungarianMatcher(cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT,
                               cost_dice=mf.DICE_WEIGHT, num_points=mf.TRAIN_NUM_POINTS)
    criterion = SetCriterion(
        sem_seg_head.num_classes, matcher, class_weight=mf.CLASS_WEIGHT,
        mask_weight=mf.MASK_WEIGHT, dice_weight=mf.DICE_WEIGHT,
        # Upstream: auxiliary losses for DEC_LAYERS - 1 layers with deep supervision, else none.
        num_layers=mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0,
        eos_coef=mf.NO_OBJECT_WEIGHT, losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO)
    model = MaskFormer(
        backbone=backbone, sem_seg_head=sem_seg_head, criterion=criterion,
        num_queries=mf.NUM_OBJECT_QUERIES, object_mask_threshold=mf.TEST.OBJECT_MASK_THRESHOLD,
        overlap_threshold=mf.TEST.OVERLAP_THRESHOLD,
        metadata=MetadataCatalog.get(cfg.DATASETS.TRAIN[0]),
        size_divisibility=mf.SIZE_DIVISIBILITY,
        sem_seg_postprocess_before_inference=(
            mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or mf.TEST.PANOPTIC_ON
            or mf.TEST.INSTANCE_ON),
        pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
        semantic_on=mf.TEST.SEMANTIC_ON, instance_on=mf.TEST.INSTANCE_ON,
        panoptic_on=mf.TEST.PANOPTIC_ON, test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    return model.to(cfg.MODEL.DEVICE)
