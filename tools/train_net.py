#!/usr/bin/env python
"""detectron2's tools/train_net.py with d2_reclass: the code is d2_reclass/train_net.py, which
``pip install`` also provides as ``d2-reclass-train`` and ``python -m d2_reclass.train_net``.

    tools/train_net.py --config-file configs/shapes_target_map.yaml \
        --coco-dataset shapes_target_train data/demo/datasets/target/train.json \
        data/demo/datasets/target/train SOLVER.MAX_ITER 20
"""
# setup, main and argument_parser are imported from here by tools/lazyconfig_train_net.py and
# tests/ddp_train_worker.py, as from any detectron2 train_net.py.
from d2_reclass.train_net import argument_parser, command_line, main, setup

__all__ = ["argument_parser", "main", "setup"]

if __name__ == "__main__":
    command_line()
