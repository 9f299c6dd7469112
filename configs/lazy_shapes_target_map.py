# LazyConfig twin of shapes_target_map.yaml, for tools/lazyconfig_train_net.py: the demo's small
# Faster R-CNN (ResNet-18 FPN, 64 channels, 128 px) built from detectron2's LazyConfig model
# fragments, fine-tuned from the demo's 6-class source model to the classes of
# dataloader.train.dataset.names, rows of the classes it keeps mapped by name. It runs on a CPU;
# register the datasets with --coco-dataset (see the README, "Try it").
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
train = model_zoo.get_config("common/train.py").train

# The architecture of configs/Base-Shapes-RCNN.yaml, so that the demo's checkpoint fits.
bottom_up = model.backbone.bottom_up
bottom_up.stem.norm = "BN"
bottom_up.stages.update(depth=18, norm="BN")
del bottom_up.stages.stride_in_1x1  # BasicBlock (ResNet-18) has no bottleneck 1x1
bottom_up.freeze_at = 0
model.backbone.out_channels = 64
rpn = model.proposal_generator
rpn.head.in_channels = 64
rpn.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
rpn.update(batch_size_per_image=128, pre_nms_topk=(2000, 512), post_nms_topk=(256, 128))
roi = model.roi_heads
roi.batch_size_per_image = 64
roi.box_head.update(input_shape=ShapeSpec(channels=64, height=7, width=7), fc_dims=[256, 256])
roi.box_predictor.input_shape = ShapeSpec(channels=256)
roi.box_predictor.test_topk_per_image = 20
roi.update(mask_in_features=None, mask_pooler=None, mask_head=None)
model.pixel_mean = [103.53, 116.28, 123.675]
model.pixel_std = [1.0, 1.0, 1.0]

for split, size in (("train", 128), ("test", 128)):
    dataloader[split].mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=size, max_size=size)]
dataloader.train.dataset.names = "shapes_target_train"
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 0
dataloader.train.mapper.use_instance_mask = False
dataloader.test.dataset.names = "shapes_target_val"
dataloader.test.num_workers = 0
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")

train.init_checkpoint = "output/shapes_source/model_final.pth"
train.output_dir = "output/lazy_shapes_target_map"
train.device = "cpu"
train.max_iter = 100
train.eval_period = 100
train.checkpointer.period = 100
optimizer.lr = 0.005
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[75], num_updates=100),  # as shapes_target_map.yaml
    warmup_length=20 / 100,
    warmup_factor=0.001,
)

# The YAML twin's seeds (SEED 1, MODEL.RECLASS.SEED 1): without train.seed, default_setup
# draws a random seed, and data order, flips and proposal sampling differ on every run.
train.seed = 1
reclass = dict(mode="map", seed=1, new_class_init="head")
