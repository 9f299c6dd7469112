#!/usr/bin/env python
"""Merged classes at iteration 0: AP of a merged head against the source's own union.

    .venv/bin/python benchmarks/merge_ap.py

Reuses the demo's cached datasets and six-class source model (``tools/demo.py`` trains them
first when they are missing). On the source val set (100 images), square, diamond and hexagon
are relabelled as one class, "polygon"; circle, triangle and cross stay. Every row is evaluated
on that relabelled set with COCO box AP, with no training:

* **source, union of its parts' detections**: the source model's own six-class detections,
  those of square, diamond and hexagon relabelled "polygon", duplicates among them suppressed
  (IoU > 0.5, as ROI_HEADS.NMS_THRESH_TEST) as within one class: the union as one class;
* **merged**: the source weights loaded into a four-class model with ``CLASS_MAP
  ["polygon=square+diamond+hexagon"]``: classifier weights averaged, its bias averaged plus
  log 3, box regression rows averaged (d2_reclass's rule);
* **merged, no log 3**: the same with the classifier's bias only averaged (the rule without its
  shift), to show what the shift does;
* **copy of square** (``"polygon=square"``) and **fresh** (``"polygon="``): what one would do
  without merging.

Besides AP (which ranks detections, so a constant added to one class's logit barely moves
it), the table gives the score the polygons get: for each ground-truth polygon, the best score
of a polygon detection with IoU >= 0.5, as a mean and as the share found at score >= 0.5.

Machine: a 2-core x86 CPU, no GPU; torch 2.14.1 CPU, detectron2 0.7.2, one torch thread.
"""
import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import demo  # noqa: E402  (tools/demo.py)

PARTS = ["square", "diamond", "hexagon"]
TARGET = ["polygon", "circle", "triangle", "cross"]
OUT = os.path.join(ROOT, "data", "demo", "merge_ap")


def relabelled_val(data_dir: str) -> str:
    """The source val set with PARTS as one "polygon" class (TARGET order); its json path."""
    with open(os.path.join(data_dir, "source", "val.json")) as f:
        data = json.load(f)
    names = {c["id"]: c["name"] for c in data["categories"]}
    target_id = {name: i + 1 for i, name in enumerate(TARGET)}
    for a in data["annotations"]:
        name = names[a["category_id"]]
        a["category_id"] = target_id["polygon" if name in PARTS else name]
    data["categories"] = [{"id": i, "name": n} for n, i in target_id.items()]
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "val_polygon.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def build(num_classes: int):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from d2_reclass import add_reclass_config, merge_config_file

    cfg = get_cfg()
    add_reclass_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, demo.BASE_CONFIG))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    return build_model(cfg).eval(), cfg


def predict(model, cfg, data_dir: str, images: Sequence[dict]) -> List[dict]:
    """COCO-format detections of ``model`` on the source val ``images`` (original classes)."""
    import cv2
    from detectron2.data import transforms as T

    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    out = []
    for image in images:
        bgr = cv2.imread(os.path.join(data_dir, "source", "val", image["file_name"]))
        inp = resize.get_transform(bgr).apply_image(bgr)
        with torch.no_grad():
            inst = model([{"image": torch.as_tensor(inp.transpose(2, 0, 1).copy()),
                           "height": bgr.shape[0], "width": bgr.shape[1]}])[0]["instances"]
        for box, score, cls in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(),
                                   inst.pred_classes.tolist()):
            out.append({"image_id": image["id"], "category_id": cls, "score": score,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    return out


def as_union(dets: List[dict], nms: bool) -> List[dict]:
    """The source's detections with PARTS relabelled "polygon" (TARGET ids, 1-based); with
    ``nms``, overlapping ones (IoU > 0.5) suppressed as within one class."""
    from torchvision.ops import nms as box_nms

    out = []
    for d in dets:
        name = demo.SOURCE_CLASSES[d["category_id"]]
        out.append({**d, "category_id": TARGET.index("polygon" if name in PARTS else name) + 1})
    if not nms:
        return out
    kept = [d for d in out if d["category_id"] != 1]
    for image_id in sorted({d["image_id"] for d in out}):
        union = [d for d in out if d["image_id"] == image_id and d["category_id"] == 1]
        if union:
            xywh = torch.tensor([d["bbox"] for d in union])
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
            keep = box_nms(boxes, torch.tensor([d["score"] for d in union]), 0.5)
            kept += [union[i] for i in keep.tolist()]
    return kept


def evaluate(gt_json: str, dets: List[dict], name: str) -> Dict[str, float]:
    """COCO box AP (demo.coco_metrics), and how confident the polygon detections are: for
    each ground-truth polygon, the best score of a polygon detection with IoU >= 0.5 (0 when
    none), as its mean and the share of polygons found at score >= 0.5."""
    path = os.path.join(OUT, f"{name}.json")
    with open(path, "w") as f:
        json.dump(dets, f)
    metrics = demo.coco_metrics(gt_json, path, TARGET)
    best = best_polygon_scores(gt_json, dets)
    metrics["polygon score"] = float(best.mean())
    metrics["polygon found"] = 100 * float((best >= 0.5).double().mean())
    return metrics


def best_polygon_scores(gt_json: str, dets: List[dict]) -> torch.Tensor:
    from torchvision.ops import box_iou

    def xyxy(boxes):
        t = torch.tensor(boxes, dtype=torch.float64).view(-1, 4)
        return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)

    with open(gt_json) as f:
        gt = [a for a in json.load(f)["annotations"] if a["category_id"] == 1]
    best = []
    for a in gt:
        found = [d for d in dets if d["image_id"] == a["image_id"] and d["category_id"] == 1]
        if not found:
            best.append(0.0)
            continue
        iou = box_iou(xyxy([a["bbox"]]), xyxy([d["bbox"] for d in found]))[0]
        best.append(max([d["score"] for d, i in zip(found, iou.tolist()) if i >= 0.5],
                        default=0.0))
    return torch.tensor(best)


def reclassed(source_state: dict, class_map: List[str], bias_shift: bool = True) -> dict:
    """The source weights fitted to TARGET with ``class_map`` (by the engine); without
    ``bias_shift``, the classifier's bias merges by its plain mean."""
    from d2_reclass import ClassSpec, find_layouts, reclass_state_dict
    from d2_reclass.layouts import MEAN

    model, _ = build(len(TARGET))
    layouts = find_layouts(model)
    if not bias_shift:
        layouts = [dataclasses.replace(lay, merge=MEAN) for lay in layouts]
    new, _ = reclass_state_dict(
        source_state, model.state_dict(), layouts, mode="map",
        classes={"thing": ClassSpec(demo.SOURCE_CLASSES, TARGET, class_map)})
    return new


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    data_dir, source = demo.prepare()
    gt_json = relabelled_val(data_dir)
    with open(gt_json) as f:
        images = json.load(f)["images"]
    state = torch.load(os.path.join(ROOT, source["weights"]), weights_only=True)["model"]

    demo.step("Source model: its six-class detections, parts relabelled as the union")
    model, cfg = build(len(demo.SOURCE_CLASSES))
    model.load_state_dict(state)
    dets = predict(model, cfg, data_dir, images)
    rows = [("source, union of its parts' detections",
             evaluate(gt_json, as_union(dets, nms=True), "source"))]
    variants = [
        ("merged: mean, bias + log 3", ["polygon=square+diamond+hexagon"], True),
        ("merged, no log 3: mean only", ["polygon=square+diamond+hexagon"], False),
        ("copy of square", ["polygon=square"], True),
        ("fresh (new class)", ["polygon="], True),
    ]
    for label, class_map, shift in variants:
        demo.step(f"{label}: CLASS_MAP {class_map}")
        model, cfg = build(len(TARGET))
        model.load_state_dict(reclassed(copy.copy(state), class_map, shift))
        dets = [{**d, "category_id": d["category_id"] + 1}
                for d in predict(model, cfg, data_dir, images)]
        rows.append((label, evaluate(gt_json, dets, label.split(":")[0].replace(" ", "_"))))

    from tabulate import tabulate

    table = [[label, m["AP-polygon"], m["AP50-polygon"], m["polygon score"], m["polygon found"],
              m["AP"], sum(m[f"AP-{c}"] for c in TARGET[1:]) / 3] for label, m in rows]
    print()
    print(tabulate(table, headers=["iteration 0", "AP polygon", "AP50 polygon",
                                   "polygon best score", "polygons at score >= 0.5 (%)",
                                   "AP (4 classes)", "AP circle/triangle/cross"],
                   tablefmt="pipe", floatfmt=(None, ".1f", ".1f", ".2f", ".0f", ".1f", ".1f")))
    print(f"\nsource model trained in {source['seconds']:.0f} s (cached by tools/demo.py); "
          f"this benchmark: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
