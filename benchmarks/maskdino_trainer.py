"""MaskDINO's own ``train_net.py`` with d2_reclass's two integration lines, on the CPU.

Run (from the repository root, with a MaskDINO checkout: ``git clone
https://github.com/IDEA-Research/MaskDINO``; nothing of it is installed or changed)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/maskdino_trainer.py --maskdino PATH/TO/MaskDINO
    MASKDINO_DIR=PATH/TO/MaskDINO .venv/bin/python benchmarks/maskdino_trainer.py [--iters 3]
        [--dn-seg] [--eval] [--work DIR]

Without a checkout it prints ``skipped: ...`` and exits 0.

What it does, in a work directory (``--work``, else a new temporary one):

1. writes a copy of the checkout's ``train_net.py`` with the two integration lines applied (the
   diff is printed): ``add_reclass_config(cfg)`` in ``setup`` and ``class
   Trainer(ReclassTrainerMixin, DefaultTrainer)``, plus their import. MaskDINO's ``Trainer``
   builds itself (``super(DefaultTrainer, self).__init__()``) and assigns a stock
   DetectionCheckpointer before and after ``build_hooks``: the pattern this exercises;
2. two tiny COCO-format instance datasets (64 px synthetic shapes): the source's four classes
   and the fine-tune's three (two of them, reordered, and a new one);
3. a tiny config over the checkout's
   ``configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s.yaml`` (ResNet-18, 32-channel
   pixel decoder with one encoder layer, 10 queries, 2 decoder layers; ``HIDDEN_DIM`` stays 256,
   which MaskDINO's positional embedding assumes) and a source checkpoint of that model for the
   source classes, saved as upstream releases are (``{"model": ...}``, no class names);
4. runs the patched ``train_net.py`` as ``__main__`` (its own argument parser, ``launch``,
   ``setup``, ``main``) for ``--iters`` iterations with ``MODEL.WEIGHTS`` the source file, then
   again with ``--resume`` for two more, and checks what the runs wrote.

Stand-ins for this CPU-only detectron2 (created at run time in the work directory / process,
none in this repository): an empty ``MultiScaleDeformableAttention`` module (MaskDINO's
deformable attention then runs its PyTorch path), and ``detectron2.evaluation.fast_eval_api``
as detectron2's own fallback (pycocotools' COCOeval; MaskDINO's evaluator imports it). AMP is
off (detectron2's AMPTrainer asserts CUDA). MaskDINO's denoising queries call ``.cuda()``
unconditionally, so the config uses ``MODEL.MaskDINO.DN no``; ``--dn-seg`` keeps upstream's
``seg`` and makes ``Tensor.cuda()`` / ``.to("cuda")`` stay on the CPU in this process instead.
"""
import argparse
import difflib
import json
import os
import runpy
import sys
import tempfile
import time
import types

SOURCE = ["square", "circle", "triangle", "diamond"]
TARGET = ["triangle", "square", "star"]  # two kept, reordered, and a new class
BASE = os.path.join("configs", "coco", "instance-segmentation", "maskdino_R50_bs16_50ep_3s.yaml")

#: (what the line does, the checkout's text, what it becomes): the two integration lines.
EDITS = [
    ("import", "\nclass Trainer(DefaultTrainer):",
     "\nfrom d2_reclass import ReclassTrainerMixin, add_reclass_config\n\n\n"
     "class Trainer(ReclassTrainerMixin, DefaultTrainer):"),
    ("config keys", "    add_maskdino_config(cfg)\n",
     "    add_maskdino_config(cfg)\n    add_reclass_config(cfg)\n"),
]

CONFIG = """\
_BASE_: {base}
MODEL:
  DEVICE: cpu
  WEIGHTS: ""
  RESNETS: {{DEPTH: 18, RES2_OUT_CHANNELS: 64, NORM: FrozenBN}}
  SEM_SEG_HEAD: {{NUM_CLASSES: {num_classes}, CONVS_DIM: 32, MASK_DIM: 32, DIM_FEEDFORWARD: 64,
                 TRANSFORMER_ENC_LAYERS: 1}}
  MaskDINO: {{HIDDEN_DIM: 256, NUM_OBJECT_QUERIES: 10, DIM_FEEDFORWARD: 64, DEC_LAYERS: 2,
             DN_NUM: 5, TRAIN_NUM_POINTS: 256, DN: {dn}}}
{reclass}DATASETS: {{TRAIN: ["{train}"], TEST: {test}}}
SOLVER: {{IMS_PER_BATCH: 2, MAX_ITER: {iters}, STEPS: [], WARMUP_ITERS: 0,
         CHECKPOINT_PERIOD: 1000, AMP: {{ENABLED: False}}}}
INPUT: {{IMAGE_SIZE: 64, MIN_SCALE: 0.5, MAX_SCALE: 1.5}}
TEST: {{EVAL_PERIOD: 0, DETECTIONS_PER_IMAGE: 10}}
DATALOADER: {{NUM_WORKERS: 0}}
OUTPUT_DIR: {out}
SEED: 1
"""

#: The user's MODEL.RECLASS keys: the source file stores no names, so they are given.
RECLASS = """\
  RECLASS: {{MODE: map, SOURCE_CLASSES: {source}, NEW_CLASS_INIT: head}}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maskdino", default=os.environ.get("MASKDINO_DIR", ""),
                    help="a MaskDINO checkout (default: $MASKDINO_DIR)")
    ap.add_argument("--work", default="", help="work directory (default: a new temporary one)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dn-seg", action="store_true",
                    help="upstream's denoising (DN seg), with .cuda() kept on the CPU")
    ap.add_argument("--eval", action="store_true", help="also run MaskDINO's final evaluation")
    a = ap.parse_args()
    train_net = os.path.join(a.maskdino, "train_net.py")
    if not a.maskdino or not os.path.isfile(train_net) or not os.path.isfile(
            os.path.join(a.maskdino, BASE)):
        print(f"skipped: no MaskDINO checkout (--maskdino or MASKDINO_DIR: {a.maskdino!r}); "
              "git clone https://github.com/IDEA-Research/MaskDINO")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="maskdino_trainer_"))
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    patched = write_patched_train_net(train_net, work)
    install_stand_ins(a.maskdino, work, dn_seg=a.dn_seg)

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    source_pth, target_yaml = prepare_task(a, work)
    out = os.path.join(work, "out")
    t1 = time.perf_counter()
    run_train_net(patched, [target_yaml, "MODEL.WEIGHTS", source_pth])
    t2 = time.perf_counter()
    run_train_net(patched, [target_yaml, "--resume", "SOLVER.MAX_ITER", str(a.iters + 2)])
    t3 = time.perf_counter()
    ok = check_outputs(out, a.iters)
    print(f"[maskdino_trainer] work dir {work}; setup {t1 - t0:.1f} s, fine-tune "
          f"({a.iters} iterations) {t2 - t1:.1f} s, resume (2 iterations) {t3 - t2:.1f} s")
    return 0 if ok else 1


def write_patched_train_net(train_net: str, work: str) -> str:
    """The checkout's train_net.py with the integration lines, written into ``work``."""
    with open(train_net) as f:
        original = f.read()
    text = original
    for what, old, new in EDITS:
        if text.count(old) != 1:
            raise SystemExit(f"{train_net} has changed: the {what} line expects {old.strip()!r} "
                             "exactly once; apply the two integration lines by hand.")
        text = text.replace(old, new)
    path = os.path.join(work, "train_net_reclass.py")
    with open(path, "w") as f:
        f.write(text)
    diff = difflib.unified_diff(original.splitlines(), text.splitlines(), train_net, path,
                                lineterm="", n=1)
    print("\n".join(diff), flush=True)
    return path


def install_stand_ins(maskdino: str, work: str, *, dn_seg: bool) -> None:
    """What this CPU-only detectron2 lacks, for this process only (see the module docstring)."""
    import torch
    from pycocotools.cocoeval import COCOeval

    stubs = os.path.join(work, "stubs")
    os.makedirs(stubs, exist_ok=True)
    open(os.path.join(stubs, "MultiScaleDeformableAttention.py"), "w").close()
    sys.path[:0] = [os.path.abspath(maskdino), stubs]
    fast = types.ModuleType("detectron2.evaluation.fast_eval_api")
    fast.COCOeval_opt = COCOeval  # detectron2's own fallback without its compiled ops
    sys.modules[fast.__name__] = fast
    if dn_seg and not torch.cuda.is_available():
        to = torch.Tensor.to

        def to_cpu(self, *args, **kwargs):
            args = tuple("cpu" if str(x).startswith("cuda") else x for x in args[:1]) + args[1:]
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return to(self, *args, **kwargs)

        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.Tensor.to = to_cpu


def prepare_task(a, work: str):
    """Register the two datasets, write the configs, save the source checkpoint."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.data.datasets import register_coco_instances
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config
    from maskdino import add_maskdino_config  # the checkout's package, on sys.path

    from d2_reclass.data.synthetic import make_shapes_dataset

    data = os.path.join(work, "data")
    for name, classes, seed in (("source", SOURCE, 1), ("target", TARGET, 2)):
        make_shapes_dataset(data, name, classes, 8, image_size=64, seed=seed)
        dataset = f"maskdino_trainer_{name}"
        register_coco_instances(dataset, {}, os.path.join(data, f"{name}.json"),
                                os.path.join(data, name))

    def write(name, classes, dataset, reclass):
        path = os.path.join(work, f"{name}.yaml")
        test = f'["{dataset}"]' if a.eval else "[]"
        with open(path, "w") as f:
            f.write(CONFIG.format(
                base=os.path.join(os.path.abspath(a.maskdino), BASE), num_classes=len(classes),
                dn="seg" if a.dn_seg else '"no"', reclass=reclass, train=dataset, test=test,
                iters=a.iters, out=os.path.join(work, "out" if reclass else "source_out")))
        return path

    source_yaml = write("source", SOURCE, "maskdino_trainer_source", "")
    target_yaml = write("target", TARGET, "maskdino_trainer_target",
                        RECLASS.format(source=json.dumps(SOURCE)))
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskdino_config(cfg)
    cfg.merge_from_file(source_yaml)
    torch.manual_seed(0)
    model = build_model(cfg)
    source_pth = os.path.join(work, "source.pth")
    torch.save({"model": model.state_dict()}, source_pth)
    n = sum(p.numel() for p in model.parameters())
    print(f"[maskdino_trainer] source checkpoint {source_pth}: {n / 1e6:.1f} M parameters, "
          f"classes {SOURCE}", flush=True)
    return source_pth, target_yaml


def run_train_net(path: str, args) -> None:
    """``python train_net_reclass.py --config-file ... --num-gpus 1 ...`` in this process."""
    config, *opts = args
    flags = [o for o in opts if o.startswith("--")]
    opts = [o for o in opts if not o.startswith("--")]
    sys.argv = [path, "--config-file", config, "--num-gpus", "1", *flags, *opts]
    print(f"[maskdino_trainer] python {' '.join(sys.argv)}", flush=True)
    runpy.run_path(path, run_name="__main__")


def check_outputs(out: str, iters: int) -> bool:
    """What the runs wrote: every checkpoint stores the target classes, the report exists."""
    import torch

    # Saved by the PeriodicCheckpointer of the resumed run, at its last iteration.
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    stored = ckpt.get("d2_reclass")
    print(f"[maskdino_trainer] model_final.pth: iteration {ckpt.get('iteration')}, class names "
          f"{stored}")
    ok = stored == {"thing_classes": TARGET} and ckpt.get("iteration") == iters + 1
    with open(os.path.join(out, "reclass_report.json")) as f:
        report = json.load(f)
    mapped = [t["key"] for t in report["tensors"] if t["action"] == "mapped"]
    skipped = [t["key"] for t in report["mismatches"] if t["action"] == "skipped"]
    print(f"[maskdino_trainer] reclass_report.json: mapped by name {mapped}; skipped, no class "
          f"layout recognises them {skipped}")
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    resumed = f"Starting training from iteration {iters}" in log
    print(f"[maskdino_trainer] resumed at iteration {iters}: {resumed}")
    return bool(ok and resumed)


if __name__ == "__main__":
    sys.exit(main())
