"""Train or evaluate a detectron2 model whose class set differs from its checkpoint's.

detectron2's tools/train_net.py with d2_reclass added: MODEL.RECLASS.* keys, class names
stored in every checkpoint, AUTO_NUM_CLASSES, and --coco-dataset to register COCO-format
datasets without writing Python. Multi-GPU and multi-machine flags are detectron2's own.
It lives in the package so that ``pip install`` provides it: as the ``d2-reclass-train``
command, as ``python -m d2_reclass.train_net``, and (in a checkout) as tools/train_net.py.

    d2-reclass-train --config-file configs/COCO-subset-map.yaml \
        --coco-dataset mine_train data/train.json data/images DATASETS.TRAIN '("mine_train",)'
"""
import logging
from typing import Optional, Sequence

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.projects.point_rend import add_pointrend_config
from detectron2.utils import comm

from d2_reclass import (
    ReclassCheckpointer,
    ReclassTrainer,
    add_reclass_config,
    check_resume,
    merge_config_file,
    prepare_reclass_config,
    register_coco_dataset,
)
from d2_reclass.data.class_lists import target_classes
from d2_reclass.integration.config import log_config_changes
from d2_reclass.threads import configure_torch_threads

logger = logging.getLogger("d2_reclass.train_net")


def setup(args):
    """Config from file and opts, prepared (checked, NUM_CLASSES from the target classes) and
    checked against a run to resume, all before default_setup writes anything."""
    # launch() runs main() in every worker process: each registers the datasets itself.
    for name, json_file, image_root in args.coco_dataset or []:
        register_coco_dataset(name, json_file, image_root)
    cfg = get_cfg()
    add_pointrend_config(cfg)
    add_reclass_config(cfg)
    if args.config_file:
        merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    # A checkpoint that stores its classes is evaluated with them, whatever the base config's
    # NUM_CLASSES says: stock detectron2 would skip its heads and predict garbage. Combined
    # with further checkpoints, with every class of them all.
    cfg, changes = prepare_reclass_config(cfg, eval_only=args.eval_only)
    if args.resume:
        check_resume(cfg.OUTPUT_DIR, target_classes(cfg, "thing"), target_classes(cfg, "stuff"),
                     trust_pickle=cfg.MODEL.RECLASS.TRUST_PICKLE)
    cfg.freeze()
    default_setup(cfg, args)
    log_config_changes(changes)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = ReclassTrainer.build_model(cfg)
        ReclassCheckpointer.from_config(cfg, model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = ReclassTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = ReclassTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (repeatable); then name it in DATASETS.TRAIN/TEST",
    )
    return parser


def command_line(argv: Optional[Sequence[str]] = None) -> None:
    """Run from the command line (``argv``: the flags, default ``sys.argv[1:]``), one process
    per GPU through detectron2's ``launch``, torch pinned to ``OMP_NUM_THREADS`` threads (1
    when unset) first."""
    configure_torch_threads()  # before launch(), whose worker processes inherit it
    args = argument_parser().parse_args(argv)
    logger.info("Command Line Args: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    command_line()
