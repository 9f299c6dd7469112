# LazyConfig twin of COCO-subset-map.yaml: the model-zoo Mask R-CNN fine-tuned to the classes of
# dataloader.train.dataset.names, with rows of the COCO classes it keeps mapped by name.
# Run with tools/lazyconfig_train_net.py.
from detectron2 import model_zoo

_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader, model, optimizer, lr_multiplier, train = (
    _base.dataloader, _base.model, _base.optimizer, _base.lr_multiplier, _base.train)

train.init_checkpoint = (
    "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl"
)
train.max_iter = 2000
optimizer.lr = 0.0025
reclass = dict(mode="map", source_dataset="coco_2017_train", target_classes=[], class_map=[],
               seed=0)
