"""Two ranks of tools/train_net.py's setup and ReclassTrainer with MODEL.RECLASS.PRESERVE, under
detectron2's launch: each rank saves its parameters after training, what its teacher saw, and
its teacher's detections on one fixed image, and the source averages it took (for
test_keep_old.py).

    python tests/keep_old_ddp_worker.py OUT_DIR IMAGE --num-gpus 2 --config-file ... [opts]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from train_net import argument_parser, setup  # noqa: E402

from d2_reclass import ReclassTrainer  # noqa: E402
from d2_reclass.preserve import SourceAverage  # noqa: E402


def main(out_dir, image_path, args):
    cfg = setup(args)
    trainer = ReclassTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    preservation = trainer.preservation
    teacher = preservation.teacher
    image = torch.as_tensor(read_image(image_path, format="BGR").transpose(2, 0, 1).copy())
    seen = teacher.images
    det = teacher.detect([image])[0]
    torch.save({
        "params": {k: v.detach().cpu() for k, v in
                   trainer.checkpointer.model.named_parameters()},
        "boxes": det.pred_boxes.tensor, "scores": det.scores, "classes": det.pred_classes,
        "teacher_images": seen, "added": preservation.attached[0].added,
        "averaged": [a.weight for a in preservation.attached
                     if isinstance(a, SourceAverage) and a.applied],
    }, os.path.join(out_dir, f"rank{comm.get_rank()}.pt"))


if __name__ == "__main__":
    out_dir, image_path, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    args = argument_parser().parse_args(rest)
    launch(main, args.num_gpus, dist_url="auto", args=(out_dir, image_path, args))
