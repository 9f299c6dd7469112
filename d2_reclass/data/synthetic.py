"""Small synthetic COCO-format datasets (real PNG files + json) for the demo and tests.

Each class is a filled shape in its own colour on a noisy background, with polygon masks, so
a small detector learns it in minutes on a CPU. Generation is deterministic in ``seed``.

Harder scenes (for benchmarks whose curves must not saturate in a few dozen iterations) add
unlabelled clutter, overlapping objects and colours that say nothing about the class; with
those options at their defaults the files are byte-identical to the plain scenes.
"""
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "make_shapes_dataset"]

# name -> (number of polygon vertices or a special kind, RGB colour)
SHAPES: Dict[str, Tuple[str, Tuple[int, int, int]]] = {
    "square": ("square", (220, 40, 40)),
    "circle": ("circle", (40, 200, 60)),
    "triangle": ("triangle", (50, 80, 230)),
    "diamond": ("diamond", (230, 200, 40)),
    "hexagon": ("hexagon", (200, 60, 200)),
    "cross": ("cross", (40, 200, 210)),
    "star": ("star", (240, 140, 30)),
    "pentagon": ("pentagon", (150, 90, 40)),
    "octagon": ("octagon", (120, 220, 120)),
    "ellipse": ("ellipse", (250, 250, 250)),
}


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    def ring(n: int, radius: Sequence[float], phase: float) -> List[Tuple[float, float]]:
        return [
            (cx + radius[i % len(radius)] * math.cos(phase + 2 * math.pi * i / n),
             cy + radius[i % len(radius)] * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)
        ]

    if kind == "square":
        return ring(4, [r], math.pi / 4 + rot * 0.2)
    if kind == "diamond":
        return ring(4, [r], rot * 0.2)
    if kind == "circle":
        return ring(24, [r], 0.0)
    if kind == "triangle":
        return ring(3, [r], -math.pi / 2 + rot * 0.2)
    if kind == "hexagon":
        return ring(6, [r], rot)
    if kind == "star":
        return ring(10, [r, r * 0.45], -math.pi / 2 + rot * 0.2)
    if kind == "pentagon":
        return ring(5, [r], -math.pi / 2 + rot * 0.2)
    if kind == "octagon":
        return ring(8, [r], math.pi / 8 + rot * 0.2)
    if kind == "ellipse":
        c, s = math.cos(rot), math.sin(rot)
        pts = [(r * math.cos(2 * math.pi * i / 24), 0.55 * r * math.sin(2 * math.pi * i / 24))
               for i in range(24)]
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    if kind == "cross":
        w = r * 0.35
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {kind!r}")


def make_shapes_dataset(
    out_dir: str,
    split: str,
    classes: Sequence[str],
    num_images: int,
    *,
    image_size: int = 128,
    max_objects: int = 3,
    seed: int = 0,
    clutter: int = 0,
    overlap: float = 0.0,
    random_colours: bool = False,
    first_class: Optional[str] = None,
) -> str:
    """Write ``out_dir/split/*.png`` and ``out_dir/split.json``; return the json path.

    Categories get ids 1..K in the order of ``classes`` (names from :data:`SHAPES`).

    Args:
        clutter: up to this many unlabelled distractors per image (lines and blobs), drawn
            first, so objects may cover them.
        overlap: how far objects may overlap: centres at least ``(1 - overlap)`` times the sum
            of their radii apart (0: never touching). Later objects cover earlier ones; boxes
            and masks stay those of the whole shape.
        random_colours: every object in a random colour instead of its class's.
        first_class: the first object of every image is of this class (for few-shot sets).
    """
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape classes {unknown}; choose from {sorted(SHAPES)}")
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        base = rng.integers(60, 120, size=3)
        pixels = np.clip(base + rng.normal(0, 12, (image_size, image_size, 3)), 0, 255)
        img = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        if clutter:
            _draw_clutter(draw, rng, image_size, int(rng.integers(0, clutter + 1)))
        placed: List[Tuple[float, float, float]] = []
        for n_object in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(20):
                r = float(rng.uniform(image_size * 0.1, image_size * 0.22))
                cx, cy = (float(v) for v in rng.uniform(r + 2, image_size - r - 2, size=2))
                if all(math.hypot(cx - x, cy - y) > (r + pr) * (1 - overlap) + 4
                       for x, y, pr in placed):
                    break
            else:
                continue
            placed.append((cx, cy, r))
            cat = int(rng.integers(len(classes)))
            if first_class is not None and n_object == 0:
                cat = list(classes).index(first_class)
            kind, colour = SHAPES[classes[cat]]
            if random_colours:
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            jitter = np.array(colour) + rng.integers(-20, 21, 3)
            colour = tuple(int(c) for c in np.clip(jitter, 0, 255))
            poly = _polygon(kind, cx, cy, r, float(rng.uniform(0, math.pi)))
            draw.polygon(poly, fill=colour)
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
            x1, y1 = min(max(xs), image_size), min(max(ys), image_size)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0, "segmentation": [[c for p in poly for c in p]],
            })
        file_name = f"{image_id:05d}.png"
        img.save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": image_size,
                       "height": image_size})
    data = {
        # pycocotools >= 2.0.9 copies "info" when loading results.
        "info": {"description": f"d2_reclass synthetic shapes, seed {seed}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
    }
    json_path = os.path.join(out_dir, f"{split}.json")
    with open(json_path, "w") as f:
        json.dump(data, f)
    return json_path


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int,
                  count: int) -> None:
    """``count`` unlabelled distractors: thick random lines and small blobs in random colours."""
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(2, 5)))
        else:
            r = float(rng.uniform(size * 0.03, size * 0.08))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
