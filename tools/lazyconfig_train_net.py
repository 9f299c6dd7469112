#!/usr/bin/env python
"""Train or evaluate with a LazyConfig (Python) config, with d2_reclass's class surgery.

The config's ``train.init_checkpoint`` is loaded through ReclassCheckpointer, configured by a
``reclass`` dict (see d2_reclass/integration/lazy.py); num_classes follows the target classes.
Flags are detectron2's (--config-file, --eval-only, --resume, --num-gpus, ...) plus --coco-dataset.

    tools/lazyconfig_train_net.py --config-file configs/lazy_mask_rcnn_subset_map.py \
        --coco-dataset mine_train data/train.json data/images \
        dataloader.train.dataset.names=mine_train
"""
import logging
import os

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from d2_reclass import ReclassCheckpointer, register_coco_dataset
from d2_reclass.integration.fast_rcnn import adopt_box_predictors
from d2_reclass.integration.lazy import (
    apply_lazy_num_classes,
    check_lazy_num_classes,
    lazy_new_class_examples,
    lazy_preservation,
    lazy_reclass_options,
    lazy_target_classes,
    map_lazy_datasets,
)
from d2_reclass.integration.probe import attach_lazy_probe
from d2_reclass.integration.trainer import REPORT_FILE
from d2_reclass.new_classes import broadcast_thing_heads
from d2_reclass.preserve import attach_preservation
from d2_reclass.threads import configure_torch_threads
from d2_reclass.train_net import argument_parser

logger = logging.getLogger("d2_reclass.lazyconfig_train_net")


def build_model(cfg):
    # A model no registered layout knows: its class tensors as the probe finds them.
    model = attach_lazy_probe(instantiate(cfg.model), cfg)
    adopt_box_predictors(model, class_names=lazy_target_classes(cfg),
                         reclass_mode=lazy_reclass_options(cfg).mode)
    check_lazy_num_classes(cfg, model)
    return model.to(cfg.train.device)


def _ddp(cfg, model):
    kwargs = dict(cfg.train.ddp)
    if cfg.train.device == "cpu":  # torch rejects device_ids for CPU modules
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    return ret


def do_train(args, cfg):
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = _ddp(cfg, model)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = ReclassCheckpointer(model, cfg.train.output_dir, trainer=trainer,
                                       reclass=lazy_reclass_options(cfg),
                                       examples=lazy_new_class_examples(cfg))
    checkpointer.report_file = os.path.join(cfg.train.output_dir, REPORT_FILE)  # written below
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if checkpointer.report is not None and checkpointer.report.new_classes is not None:
        broadcast_thing_heads(model)
    if checkpointer.report is not None and comm.is_main_process():
        checkpointer.report.to_json(os.path.join(cfg.train.output_dir, REPORT_FILE))
    # After the load (frozen_rows keeps what was loaded); every rank builds its own teacher.
    attach_preservation(trainer, lazy_preservation(cfg))
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    for name, json_file, image_root in args.coco_dataset or []:
        register_coco_dataset(name, json_file, image_root)
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    changes = apply_lazy_num_classes(cfg)
    default_setup(cfg, args)
    for key, old, new in changes:
        logger.info(f"num_classes: {key} {old} -> {new}")
    map_lazy_datasets(cfg)
    if args.eval_only:
        model = _ddp(cfg, build_model(cfg))
        checkpointer = ReclassCheckpointer(model, reclass=lazy_reclass_options(cfg),
                                           examples=lazy_new_class_examples(cfg))
        checkpointer.load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)


if __name__ == "__main__":
    configure_torch_threads()  # before launch(), whose worker processes inherit it
    args = argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
