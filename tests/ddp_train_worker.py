"""Run tools/train_net.py's setup and ReclassTrainer under detectron2's launch, saving each
rank's parameters right after loading and after training, and each rank's reclass report
(for test_trainer.py and test_new_classes.py).

    python tests/ddp_train_worker.py OUT_DIR --num-gpus 2 --config-file ... [opts]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
from detectron2.engine import launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from train_net import argument_parser, setup  # noqa: E402

from d2_reclass import ReclassTrainer  # noqa: E402


def _dump(trainer, out_dir, stage):
    # After training only parameters must agree: BatchNorm statistics are per rank
    # (DefaultTrainer's DDP does not broadcast buffers), as in any detectron2 DDP run.
    model = trainer.checkpointer.model
    tensors = model.state_dict() if stage == "loaded" else dict(model.named_parameters())
    state = {k: v.detach().cpu() for k, v in tensors.items()}
    torch.save(state, os.path.join(out_dir, f"rank{comm.get_rank()}_{stage}.pt"))
    report = trainer.checkpointer.report
    if stage == "loaded" and report is not None:
        report.to_json(os.path.join(out_dir, f"rank{comm.get_rank()}_report.json"))


def main(out_dir, args):
    cfg = setup(args)
    trainer = ReclassTrainer(cfg)
    trainer.resume_or_load(resume=False)
    _dump(trainer, out_dir, "loaded")
    trainer.train()
    _dump(trainer, out_dir, "final")


if __name__ == "__main__":
    out_dir, rest = sys.argv[1], sys.argv[2:]
    args = argument_parser().parse_args(rest)
    launch(main, args.num_gpus, dist_url="auto", args=(out_dir, args))
