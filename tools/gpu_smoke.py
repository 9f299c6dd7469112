#!/usr/bin/env python
"""GPU smoke test: a few training iterations through d2_reclass with MODEL.DEVICE cuda.

Builds a 6-class source checkpoint (random weights, class names stored), maps it to 3 target
classes (2 kept, 1 new) on the CPU and, through ReclassTrainer, on the GPU; checks that the
kept rows are the source's and that the fresh rows are bit-identical on both devices (seeded
by parameter name, not by device or rank); trains a few iterations and prints timings.

    python tools/gpu_smoke.py [--iters 20] [--work-dir /tmp/d2_reclass_smoke]

Exit codes: 0 passed, 1 a check failed, 2 no CUDA device.
"""
import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = ["square", "circle", "triangle", "diamond", "hexagon", "cross"]
TARGET = ["triangle", "square", "star"]
CLASS_KEYS = ("roi_heads.box_predictor.cls_score.weight",
              "roi_heads.box_predictor.bbox_pred.weight")


def _cfg(device: str, num_classes: int, work: str, iters: int):
    from detectron2.config import get_cfg

    from d2_reclass import add_reclass_config, merge_config_file

    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, os.path.join(REPO, "configs", "shapes_target_map.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", device, "MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
        "MODEL.WEIGHTS", os.path.join(work, "source.pth"), "OUTPUT_DIR", os.path.join(work, device),
        "DATASETS.TRAIN", ("smoke_train",), "DATASETS.TEST", (), "SOLVER.MAX_ITER", iters,
        "DATALOADER.NUM_WORKERS", 2, "MODEL.RECLASS.TARGET_CLASSES", TARGET,
    ])
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--work-dir", default="/tmp/d2_reclass_smoke")
    parser.add_argument("--device", default="cuda",
                        help="cpu runs the same steps and checks on the CPU (a dry run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device is visible (torch.cuda.is_available() is False). Run it "
              "on a GPU machine, e.g. in the Docker image with `docker run --gpus all`.",
              file=sys.stderr)
        return 2

    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger

    from d2_reclass import (
        ReclassCheckpointer,
        ReclassOptions,
        ReclassTrainer,
        register_coco_dataset,
    )
    from d2_reclass.data.synthetic import make_shapes_dataset

    setup_logger(name="d2_reclass")
    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    json_file = make_shapes_dataset(work, "train", TARGET, 32, seed=1)
    register_coco_dataset("smoke_train", json_file, os.path.join(work, "train"))

    torch.manual_seed(0)
    source = build_model(_cfg("cpu", len(SOURCE), work, args.iters))
    ReclassCheckpointer(source, work, reclass=ReclassOptions(target_classes=SOURCE)).save("source")
    source_state = source.state_dict()

    cpu_cfg = _cfg("cpu", len(TARGET), work, args.iters)
    cpu_model = build_model(cpu_cfg)
    # The reference load takes the trainer's own options (mode, seed, new-class init).
    ReclassCheckpointer.from_config(cpu_cfg, cpu_model).load(os.path.join(work, "source.pth"))
    cpu_state = cpu_model.state_dict()

    cfg = _cfg(args.device, len(TARGET), work, args.iters)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    trainer = ReclassTrainer(cfg)
    start = time.perf_counter()
    trainer.resume_or_load(resume=False)
    sync()
    load_s = time.perf_counter() - start
    gpu_state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}

    failures = []
    for key in CLASS_KEYS:
        block = 4 if "bbox" in key else 1
        for t, s in ((0, 2), (1, 0)):  # triangle <- source 2, square <- source 0
            if not torch.equal(gpu_state[key][t * block:(t + 1) * block],
                               source_state[key][s * block:(s + 1) * block]):
                failures.append(f"{key}: kept class {TARGET[t]} differs from the source row")
        fresh = slice(2 * block, 3 * block)
        if not torch.equal(gpu_state[key][fresh], cpu_state[key][fresh]):
            failures.append(f"{key}: fresh rows of 'star' differ between CPU and GPU")

    start = time.perf_counter()
    trainer.train()
    sync()
    train_s = time.perf_counter() - start
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"load + map: {load_s:.3f} s; {args.iters} iterations: {train_s:.2f} s "
          f"({train_s / args.iters:.3f} s/iter, incl. start-up)")
    for f in failures:
        print(f"FAILED: {f}")
    verdict = "FAILED" if failures else (
        f"passed: kept rows copied, fresh rows identical on the CPU and {args.device}")
    print(f"gpu_smoke: {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
