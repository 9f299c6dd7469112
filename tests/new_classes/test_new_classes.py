"""NEW_CLASS_INIT: new classes initialised from labelled examples, on real small models and files.

The source models have random weights: what is checked is that the rows are exactly what the
documented computation gives on the model's own features, that the relative is the source
class the checkpoint's classifier scores highest (made known by the checkpoint's biases), that
every other entry is untouched, and every fallback.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from d2_fixtures import REPO, SIX, THREE, assert_same_state, params, small_cfg, small_model
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes

from d2_reclass import (
    ConfigError,
    NewClassExamples,
    ReclassCheckpointer,
    ReclassOptions,
    apply_new_class_entries,
    find_layouts,
    init_new_classes,
)
from d2_reclass.data.synthetic import make_shapes_dataset
from d2_reclass.engine.surgery import ClassSpec, reclass_state_dict
from d2_reclass.new_classes import choose_images
from d2_reclass.new_classes.examples import image_boxes, plan_images, portable_names
from d2_reclass.new_classes.scoring import Box, detected_boxes

STAR = THREE.index("star")
KEPT = [THREE.index("triangle"), THREE.index("square")]
PRED = "roi_heads.box_predictor."
CASCADE = ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
           "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True]
RETINANET = ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.BACKBONE.NAME",
             "build_retinanet_resnet_fpn_backbone"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 train images of THREE's shapes (star: the new class), as files and dataset dicts."""
    root = tmp_path_factory.mktemp("shapes")
    json_file = make_shapes_dataset(str(root), "train", THREE, 12, seed=5)
    # With a dataset name, category ids become contiguous indices, as DatasetCatalog gives them.
    return root, json_file, load_coco_json(json_file, str(root / "train"), "nc_fixture")


def _mapped(num_classes=3, opts=(), mask=False, source_seed=1):
    """(source state, target model holding the SIX -> THREE mapped weights, mapping)."""
    source = small_model(6, seed=source_seed, mask=mask, opts=opts).state_dict()
    model = small_model(num_classes, seed=2, mask=mask, opts=opts)
    state, report = reclass_state_dict(source, model.state_dict(), find_layouts(model),
                                       classes={"thing": ClassSpec(SIX, THREE)}, mode="map")
    model.load_state_dict(state)
    return source, model, report.spaces["thing"].mapping


def _init(model, dicts, mapping, source, **kw):
    kw.setdefault("dataset_classes", THREE)
    return init_new_classes(model, dicts, mapping, source, **kw)


def _favouring(source, class_index, prefix=PRED):
    """``source`` with the checkpoint's classifier made to score ``class_index`` highest on
    every box: a relative whose answer is known whatever the features. Box predictors have
    one bias per class (then background); RetinaNet one per anchor and class, anchor-major."""
    out = dict(source)
    key = prefix + "cls_score.bias"
    bias = out[key].clone()
    per_anchor = len(SIX) + 1 if prefix == PRED else len(SIX)
    bias[class_index::per_anchor] += 50.0
    out[key] = bias
    return out


def _box_features(model, dicts, classes, head=None, predictor_prefix=PRED):
    """Directly: box-head features of the GT boxes of ``classes`` in every image that has any,
    pooled and headed as StandardROIHeads does, in dataset order."""
    roi = model.roi_heads
    head = head or roi.box_head
    feats, labels = [], []
    with torch.no_grad():
        for d in dicts:
            anns = [a for a in d["annotations"] if a["category_id"] in classes]
            if not anns:
                continue
            image = read_image(d["file_name"], format="BGR")
            image = T.ResizeShortestEdge(128, 128).get_transform(image).apply_image(image)
            boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                   a["bbox"][1] + a["bbox"][3]] for a in anns])
            feats.append(_headed(model, torch.as_tensor(np.ascontiguousarray(
                image.transpose(2, 0, 1))), boxes, head))
            labels += [a["category_id"] for a in anns]
    return torch.cat(feats).double(), torch.tensor(labels)


def _headed(model, image, boxes, head):
    """Box-head features of ``boxes`` (xyxy) in ``image`` (CHW), pooled and headed as
    StandardROIHeads does."""
    roi = model.roi_heads
    features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
    return head(roi.box_pooler([features[f] for f in roi.box_in_features], [Boxes(boxes)]))


def _detected_features(model, dicts, head=None):
    """Directly: box-head features and classes of the kept-class objects ``model`` detects
    (score >= 0.5) where no box of the image is labelled (IoU < 0.5), in dataset order."""
    roi = model.roi_heads
    head = head or roi.box_head
    feats, labels = [], []
    with torch.no_grad():
        for d in dicts:
            image = torch.as_tensor(np.ascontiguousarray(
                read_image(d["file_name"], format="BGR").transpose(2, 0, 1)))
            labelled = [Box(a["category_id"], (a["bbox"][0], a["bbox"][1],
                                               a["bbox"][0] + a["bbox"][2],
                                               a["bbox"][1] + a["bbox"][3]))
                        for a in d["annotations"]]
            found = detected_boxes(model, image, labelled, KEPT)
            if not found:
                continue
            feats.append(_headed(model, image, torch.tensor([f.xyxy for f in found]), head))
            labels += [f.target for f in found]
    if not feats:
        return torch.zeros(0, roi.box_head.output_shape.channels, dtype=torch.float64), \
            torch.zeros(0, dtype=torch.long)
    return torch.cat(feats).double(), torch.tensor(labels)


def _discriminant(new, kept):
    """Restated from the docs with the D x D covariance: Fisher's direction of ``new`` against
    ``kept`` (rows: box features), the pooled covariance shrunk as Ledoit and Wolf estimate
    it; unit length."""
    x = torch.cat([new - new.mean(dim=0), kept - kept.mean(dim=0)])
    n, d = x.shape
    s = x.T @ x / n
    m = s.trace() / d
    eye = torch.eye(d, dtype=x.dtype)
    d2 = ((s - m * eye) ** 2).sum()
    b2 = sum(((xk[:, None] * xk[None, :] - s) ** 2).sum() for xk in x) / n ** 2
    a = min(b2, d2) / d2
    w = torch.linalg.solve((1 - a) * s + a * m * eye, new.mean(dim=0) - kept.mean(dim=0))
    return w / w.norm()


def test_the_discriminant_is_the_same_through_the_gram_matrix_and_the_shared_scatter():
    from d2_reclass.new_classes.rules import Contrast, _direction

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    kept = torch.randn(40, 6, generator=g, dtype=torch.float64) @ mix + 1.0
    new = torch.randn(3, 6, generator=g, dtype=torch.float64) @ mix + 2.0
    # More rows (3 + 40) than feature dimensions (6): the scatter shared by every class.
    many = Contrast(kept)
    assert torch.allclose(_direction(new, many), _discriminant(new, kept), atol=1e-10)
    assert many._scatter is not None
    # Fewer (3 + 2): the Gram matrix, nothing shared.
    few = Contrast(kept[:2])
    assert torch.allclose(_direction(new, few), _discriminant(new, kept[:2]), atol=1e-10)
    assert few._scatter is None
    # A second class reuses the first one's decomposition.
    scatter = many._scatter
    assert torch.allclose(_direction(new[:2], many), _discriminant(new[:2], kept), atol=1e-10)
    assert many._scatter is scatter


def _runner_up(logits, labels, competitors):
    """Per row, the highest logit among ``competitors`` other than the row's own class."""
    return torch.stack([max(row[c] for c in competitors if c != k)
                        for row, k in zip(logits, labels.tolist())])


def _log_odds(logits, labels, competitors):
    """Restated from the docs: z_k - logsumexp over the other competitors."""
    out = []
    for row, k in zip(logits, labels.tolist()):
        others = [c for c in competitors if c != k]
        out.append(row[k] - torch.logsumexp(row[others], dim=0))
    return torch.stack(out)


def test_imprinted_row_is_the_discriminant_against_the_kept_objects_and_the_bias_calibrated(
        data):
    _, _, dicts = data
    source, model, mapping = _mapped()
    before = params(model)
    entries, report = _init(model, dicts, mapping, source, method="imprint", max_images=16)
    assert_same_state(params(model), before)  # computing never writes into the model

    stars = [d for d in dicts if any(a["category_id"] == STAR for a in d["annotations"])]
    x, _ = _box_features(model, stars, {STAR})
    # The kept-class objects of the same images: the labelled ones, then those the model
    # detects where nothing is labelled.
    ref_x, ref_labels = _box_features(model, stars, set(KEPT))
    det_x, det_labels = _detected_features(model, stars)
    kept_x, kept_labels = torch.cat([ref_x, det_x]), torch.cat([ref_labels, det_labels])
    weight = before[PRED + "cls_score.weight"].double()
    bias = before[PRED + "cls_score.bias"].double()
    scale = weight[KEPT].norm(dim=1).mean()
    row = entries[PRED + "cls_score.weight"][STAR].double()
    assert torch.allclose(row, scale * _discriminant(x, kept_x), atol=1e-6)
    assert abs(float(row.norm()) - float(scale)) < 1e-5
    # Not the mean feature's direction: the kept objects' shared component is taken out.
    mean = x.mean(dim=0)
    assert float(row @ mean / (row.norm() * mean.norm())) < 0.99

    # Bias: the median log-odds of star on its boxes equals that of the kept classes on theirs
    # (the labelled kept boxes of the same images), against the kept classes and background;
    # then lowered, where needed, to the runner-up's logit on every kept-class object.
    competitors = KEPT + [3]
    target = _log_odds(ref_x @ weight.T + bias, ref_labels, competitors).median()
    init = report.classes[0]
    info = init.imprint["roi_heads.box_predictor"]
    b = entries[PRED + "cls_score.bias"][STAR].double()
    assert abs(info["bias"] - float(b)) < 1e-5
    calibrated = torch.tensor(info.get("calibrated_bias", info["bias"]), dtype=torch.float64)
    logits = x @ weight.T + bias
    star_log_odds = x @ row + calibrated - torch.logsumexp(logits[:, competitors], dim=1)
    assert abs(float(star_log_odds.median() - target)) < 1e-4
    cap = (_runner_up(kept_x @ weight.T + bias, kept_labels, competitors) - kept_x @ row).min()
    assert abs(float(b - torch.minimum(calibrated, cap))) < 1e-4
    assert (init.name, init.method, init.images, init.instances) == (
        "star", "imprint", len(stars), len(x))
    assert init.reason.split("; ")[:2] == [
        "calibrated on the kept classes",
        f"its direction contrasted with {len(kept_x)} kept-class objects"]


def test_only_new_class_entries_change_and_the_rest_come_from_the_relative(data):
    _, _, dicts = data
    diamond = SIX.index("diamond")  # dropped by the target: its rows exist only in the checkpoint
    source, model, mapping = _mapped(mask=True)
    source = _favouring(source, diamond)
    before = params(model)
    entries, report = _init(model, dicts, mapping, source, method="imprint")
    apply_new_class_entries(model, entries)
    after = model.state_dict()
    init = report.classes[0]
    assert (init.relative, init.relative_index) == ("diamond", diamond)
    assert init.score > 0.99
    # Box regression and mask rows from the relative; kept classes and background bit for bit.
    box, mask = PRED + "bbox_pred.weight", "roi_heads.mask_head.predictor.weight"
    assert torch.equal(after[box][4 * STAR:4 * STAR + 4], source[box][4 * diamond:4 * diamond + 4])
    assert torch.equal(after[mask][STAR], source[mask][diamond])
    for key, value in before.items():
        if key in (box, PRED + "bbox_pred.bias"):
            keep = [i for i in range(value.shape[0]) if i // 4 != STAR]
        elif key.startswith((PRED + "cls_score", "roi_heads.mask_head.predictor")):
            keep = [i for i in range(value.shape[0]) if i != STAR]
        else:
            assert torch.equal(after[key], value), key
            continue
        assert torch.equal(after[key][keep], value[keep]), key
    assert sorted(entries) == sorted(report.changed)


def test_relative_copies_every_entry_of_the_class_scoring_highest(data):
    _, _, dicts = data
    hexagon = SIX.index("hexagon")
    source, model, mapping = _mapped(mask=True)
    source = _favouring(source, hexagon)
    entries, report = _init(model, dicts, mapping, source, method="relative")
    assert report.classes[0].method == "relative" and report.classes[0].relative == "hexagon"
    cls = PRED + "cls_score.weight"
    assert torch.equal(entries[cls][STAR], source[cls][hexagon])
    assert float(entries[PRED + "cls_score.bias"][STAR]) == float(
        source[PRED + "cls_score.bias"][hexagon])


def test_cascade_stages_imprint_each_through_its_own_box_head(data):
    _, _, dicts = data
    source, model, mapping = _mapped(opts=CASCADE)
    entries, report = _init(model, dicts, mapping, source, method="imprint")
    stars = [d for d in dicts if any(a["category_id"] == STAR for a in d["annotations"])]
    rows = []
    for stage in range(3):
        prefix = f"roi_heads.box_predictor.{stage}."
        head = model.roi_heads.box_head[stage]
        x, _ = _box_features(model, stars, {STAR}, head=head)
        kept_x = torch.cat([_box_features(model, stars, set(KEPT), head=head)[0],
                            _detected_features(model, stars, head=head)[0]])
        row = entries[prefix + "cls_score.weight"][STAR].double()
        assert torch.allclose(row / row.norm(), _discriminant(x, kept_x), atol=1e-6), stage
        rows.append(row)
    assert not torch.allclose(rows[0], rows[1])  # three heads, three rows
    assert set(report.classes[0].imprint) == {f"roi_heads.box_predictor.{s}" for s in range(3)}


def test_retinanet_takes_every_anchor_entry_from_the_relative(data):
    _, _, dicts = data
    cross = SIX.index("cross")
    source, model, mapping = _mapped(opts=RETINANET)
    source = _favouring(source, cross, prefix="head.")
    entries, report = _init(model, dicts, mapping, source, method="imprint")
    init = report.classes[0]
    assert (init.method, init.relative) == ("relative", "cross")
    assert "no box classifier to imprint" in init.reason
    w = entries["head.cls_score.weight"]
    anchors = w.shape[0] // 3
    for a in range(anchors):
        assert torch.equal(w[3 * a + STAR], source["head.cls_score.weight"][6 * a + cross])


@pytest.mark.parametrize("case", ["absent", "crowd_or_empty", "unreadable", "no_rows"])
def test_fallbacks_keep_the_head_init_and_say_why(data, tmp_path, case):
    _, _, dicts = data
    source, model, mapping = _mapped()
    dicts = json.loads(json.dumps(dicts, default=int))
    stars = [a for d in dicts for a in d["annotations"] if a["category_id"] == STAR]
    if case == "absent":
        for d in dicts:
            d["annotations"] = [a for a in d["annotations"] if a["category_id"] != STAR]
        message = "no labelled instance of 'star' in the training data; head init"
    elif case == "crowd_or_empty":
        for i, a in enumerate(stars):
            if i % 2:
                a["iscrowd"] = 1
            else:
                a["bbox"][2] = 0.0
        message = re.escape(f"all {len(stars)} labelled instances of 'star' are crowd "
                            f"({len(stars) // 2}) or empty ({len(stars) - len(stars) // 2}) boxes")
    elif case == "unreadable":
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        for d in dicts:
            if any(a["category_id"] == STAR for a in d["annotations"]):
                d["file_name"] = str(broken)
        message = "none of its .* chosen images could be read \\(first: .*broken.png"
    else:
        source = {k: v for k, v in source.items() if "cls_score" not in k}
        message = "no box or dense classifier with the checkpoint's class rows"
    before = params(model)
    entries, report = _init(model, dicts, mapping, source, method="imprint")
    assert entries == {} and report.changed == []
    init = report.classes[0]
    assert init.method == "head"
    assert re.search(message, init.reason), init.reason
    assert_same_state(params(model), before)


def test_some_unreadable_images_are_skipped_and_listed(data, tmp_path):
    _, _, dicts = data
    source, model, mapping = _mapped()
    dicts = [dict(d) for d in dicts]
    with_star = [d for d in dicts if any(a["category_id"] == STAR for a in d["annotations"])]
    with_star[0]["file_name"] = str(tmp_path / "missing.png")
    _, report = _init(model, dicts, mapping, source, method="imprint")
    init = report.classes[0]
    assert init.method == "imprint" and init.images == len(with_star) - 1
    assert len(init.unreadable) == 1 and "missing.png: FileNotFoundError" in init.unreadable[0]


def test_at_most_init_images_are_read_and_the_choice_is_seeded(data):
    _, _, dicts = data
    source, model, mapping = _mapped()
    _, a = _init(model, dicts, mapping, source, method="relative", max_images=2, seed=0)
    _, b = _init(model, dicts, mapping, source, method="relative", max_images=2, seed=7)
    assert a.classes[0].images == b.classes[0].images == 2 and a.images_read == 2
    names = [f"img{i}.png" for i in range(20)]
    picks = choose_images(names, "star", 3, 5)
    assert [names[i] for i in picks] == [
        sorted(names)[::-1][j] for j in choose_images(sorted(names)[::-1], "star", 3, 5)]
    grown = names + [f"new{i}.png" for i in range(20)]
    assert set(names[i] for i in picks) >= {grown[i] for i in choose_images(grown, "star", 3, 5)
                                            if i < 20}
    assert choose_images(names, "star", 4, 5) != picks


def test_head_and_no_new_class_read_nothing(data):
    _, _, dicts = data
    source, model, mapping = _mapped()
    entries, report = _init(model, dicts, mapping, source, method="head")
    assert entries == {} and report.images_read == 0 and report.classes[0].method == "head"


def test_bad_values_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"MODEL.RECLASS.NEW_CLASS_INIT is 'imprnt'; use one of "
                       r"auto, head, relative, imprint. Did you mean 'imprint'"):
        init_new_classes(small_model(3), [], None, {}, method="imprnt")
    with pytest.raises(ConfigError, match="MODEL.RECLASS.INIT_IMAGES is 0; it must be an integer"):
        init_new_classes(small_model(3), [], None, {}, max_images=0)
    with pytest.raises(ConfigError, match="reclass option 'new_class_init' is 'ranodm'"):
        ReclassOptions(new_class_init="ranodm")
    from d2_reclass import prepare_reclass_config

    with pytest.raises(ConfigError, match="MODEL.RECLASS.INIT_IMAGES is -1"):
        prepare_reclass_config(small_cfg(3, opts=["MODEL.RECLASS.INIT_IMAGES", -1]))


def _six_checkpoint(tmp_path, seed=1, **kw):
    path = str(tmp_path / "six.pth")
    state = _favouring(small_model(6, seed=seed, **kw).state_dict(), SIX.index("diamond"))
    torch.save({"model": state, "d2_reclass": {"thing_classes": SIX}}, path)
    return path, state


def test_checkpointer_initialises_after_mapping_and_reports_it(data, tmp_path):
    root, _, dicts = data
    path, source = _six_checkpoint(tmp_path)
    model = small_model(3, seed=2)
    options = ReclassOptions(mode="map", target_classes=THREE, new_class_init="imprint")
    ckpt = ReclassCheckpointer(model, reclass=options,
                               examples=NewClassExamples(dataset_dicts=dicts, class_names=THREE))
    ckpt.load(path)
    new = ckpt.report.new_classes
    assert new.classes[0].relative == "diamond" and new.classes[0].method == "imprint"
    assert new.seconds > 0 and new.seconds_per_image > 0 and new.images_read > 0
    state = model.state_dict()
    triangle = SIX.index("triangle")
    assert torch.equal(state[PRED + "cls_score.weight"][0], source[PRED + "cls_score.weight"][
        triangle])
    saved = json.loads(ckpt.report.to_json(str(tmp_path / "report.json")))
    assert saved["new_classes"]["classes"][0]["relative"] == "diamond"
    assert "NEW_CLASS_INIT imprint: 1 new class" in str(ckpt.report)


def test_checkpointer_without_examples_says_so_and_loads_nothing(tmp_path):
    path, _ = _six_checkpoint(tmp_path)
    model = small_model(3, seed=2)
    before = params(model)
    options = ReclassOptions(mode="map", target_classes=THREE, new_class_init="relative")
    with pytest.raises(ConfigError, match=r"NEW_CLASS_INIT is 'relative', which reads labelled "
                       r"examples of the new classes \(star\), but there are none: set "
                       "DATASETS.TRAIN"):
        ReclassCheckpointer(model, reclass=options).load(path)
    assert_same_state(params(model), before)


def test_auto_imprints_with_examples_and_keeps_the_head_init_without(data, tmp_path):
    _, _, dicts = data
    path, _ = _six_checkpoint(tmp_path)
    options = ReclassOptions(mode="map", target_classes=THREE)
    assert options.new_class_init == "auto"
    without = ReclassCheckpointer(small_model(3, seed=2), reclass=options)
    without.load(path)
    star = without.report.new_classes.classes[0]
    assert star.method == "head" and "no labelled examples were given" in star.reason
    with_examples = ReclassCheckpointer(small_model(3, seed=2), reclass=options, examples=(
        NewClassExamples(dataset_dicts=dicts, class_names=THREE)))
    with_examples.load(path)
    assert with_examples.report.new_classes.classes[0].method == "imprint"
    # MODE reinit asks for the head's init for every class: nothing is read.
    reinit = ReclassCheckpointer(small_model(3, seed=2), reclass=ReclassOptions(
        mode="reinit", target_classes=THREE), examples=NewClassExamples(dataset_dicts=dicts))
    reinit.load(path)
    assert reinit.report.new_classes is None


_DETERMINISM = """
import hashlib, sys, torch
sys.path[:0] = ["tests", "tests/new_classes"]
from detectron2.data.datasets import load_coco_json
from test_new_classes import _init, _mapped
torch.set_num_threads(1)
source, model, mapping = _mapped()
entries, _ = _init(model, load_coco_json(sys.argv[1], sys.argv[2], "nc"), mapping, source,
                   method="imprint")
h = hashlib.sha256()
for k in sorted(entries):
    h.update(k.encode()); h.update(entries[k].numpy().tobytes())
print(h.hexdigest())
"""


def test_two_processes_compute_bit_identical_entries(data):
    root, json_file, _ = data
    cmd = [sys.executable, "-c", _DETERMINISM, json_file, str(root / "train")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:]
    digests = [o[0].strip().splitlines()[-1] for o in outs]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


@pytest.fixture(scope="module")
def registered(data):
    """The data registered as ``nc_train`` (as tools/train_net.py --coco-dataset does)."""
    from d2_reclass import register_coco_dataset

    root, json_file, _ = data
    register_coco_dataset("nc_train", json_file, str(root / "train"))
    return "nc_train"


def test_trainer_initialises_new_classes_in_resume_or_load(registered, tmp_path):
    from d2_reclass import ReclassTrainer

    path, source = _six_checkpoint(tmp_path)
    out = tmp_path / "out"
    cfg = small_cfg(3, opts=[
        "DATASETS.TRAIN", (registered,), "DATASETS.TEST", (), "MODEL.WEIGHTS", path,
        "MODEL.RECLASS.NEW_CLASS_INIT", "imprint", "MODEL.RECLASS.INIT_IMAGES", 4,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 1, "DATALOADER.NUM_WORKERS", 0,
        "OUTPUT_DIR", str(out)])
    trainer = ReclassTrainer(cfg)
    trainer.resume_or_load(resume=False)
    report = json.loads((out / "reclass_report.json").read_text())["new_classes"]
    star = report["classes"][0]
    assert (star["name"], star["method"], star["relative"]) == ("star", "imprint", "diamond")
    assert 0 < star["images"] <= 4 and report["images_read"] <= 4
    model = trainer.model
    weight = model.roi_heads.box_predictor.cls_score.weight
    scale = star["imprint"]["roi_heads.box_predictor"]["scale"]
    assert abs(float(weight[STAR].norm()) - scale) < 1e-5
    # Written in place: the optimizer built before the load holds the very parameter.
    assert any(p is weight for g in trainer.optimizer.param_groups for p in g["params"])
    box = PRED + "bbox_pred.weight"
    diamond = SIX.index("diamond")
    assert torch.equal(model.state_dict()[box][8:12], source[box][4 * diamond:4 * diamond + 4])
    trainer.train()


@pytest.mark.slow
def test_two_ranks_compute_and_hold_identical_heads(data, registered, tmp_path):
    """tools/train_net.py's setup and ReclassTrainer on 2 gloo processes, NEW_CLASS_INIT
    imprint: each rank's report (computed before the broadcast) and parameters agree."""
    root, json_file, _ = data
    path, _ = _six_checkpoint(tmp_path)
    worker = os.path.join(REPO, "tests", "ddp_train_worker.py")
    cmd = [sys.executable, worker, str(tmp_path), "--num-gpus", "2",
           "--config-file", "configs/Base-Shapes-RCNN.yaml",
           "--coco-dataset", "nc_ddp", json_file, str(root / "train"),
           "DATASETS.TRAIN", '("nc_ddp",)', "DATASETS.TEST", "()", "MODEL.WEIGHTS", path,
           "MODEL.RECLASS.NEW_CLASS_INIT", "imprint", "SOLVER.MAX_ITER", "1",
           "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
           "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}_report.json").read_text())["new_classes"]
               for r in range(2)]
    for report in reports:
        for key in ("seconds", "seconds_dataset", "seconds_per_image"):
            report.pop(key)
    assert reports[0] == reports[1] and reports[0]["classes"][0]["method"] == "imprint"
    for stage in ("loaded", "final"):
        r0 = torch.load(tmp_path / f"rank0_{stage}.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"rank1_{stage}.pt", weights_only=True)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), stage


def test_lazyconfig_reclass_dict_takes_the_option(registered, tmp_path):
    from detectron2.config import LazyCall as L
    from omegaconf import OmegaConf

    from d2_reclass.integration.lazy import lazy_new_class_examples, lazy_reclass_options

    cfg = OmegaConf.create({
        "reclass": {"mode": "map", "new_class_init": "relative", "init_images": 3},
        "dataloader": {"train": {"dataset": {"names": registered}},
                       "test": {"mapper": {"image_format": "BGR", "augmentations": [
                           L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)]}}}})
    options = lazy_reclass_options(cfg)
    assert (options.new_class_init, options.init_images) == ("relative", 3)
    examples = lazy_new_class_examples(cfg)
    assert examples.datasets == (registered,) and examples.image_format == "BGR"
    assert isinstance(examples.augmentations[0], T.ResizeShortestEdge)
    path, source = _six_checkpoint(tmp_path)
    model = small_model(3, seed=2)
    ckpt = ReclassCheckpointer(model, reclass=options, examples=examples)
    ckpt.load(path)
    assert ckpt.report.new_classes.classes[0].relative == "diamond"
    cls = PRED + "cls_score.weight"
    assert torch.equal(model.state_dict()[cls][STAR], source[cls][SIX.index("diamond")])
    cfg.reclass.new_class_init = "imprnt"
    with pytest.raises(ConfigError, match="reclass option 'new_class_init' is 'imprnt'.*Did "
                       "you mean 'imprint'"):
        lazy_reclass_options(cfg)


def test_cli_convert_initialises_new_classes_like_the_checkpointer(data, tmp_path, capsys):
    from d2_reclass.cli import main

    root, json_file, dicts = data
    path, _ = _six_checkpoint(tmp_path)
    out = tmp_path / "three.pth"
    args = ["convert", path, "--out", str(out), "--classes", ",".join(THREE)]
    examples = ["--coco-dataset", "nc_cli", json_file, str(root / "train")]
    assert main([*args, "--new-class-init", "imprint", *examples]) == 1
    assert "--new-class-init imprint runs the model on labelled examples: pass --config-file" \
        in capsys.readouterr().err
    config = ["--config-file", "configs/Base-Shapes-RCNN.yaml"]
    assert main([*args, "--new-class-init", "imprint", *config]) == 1
    assert "pass --coco-dataset NAME JSON IMAGE_ROOT" in capsys.readouterr().err
    assert not out.exists()

    assert main([*args, "--new-class-init", "imprint", *config, *examples]) == 0
    printed = capsys.readouterr().out
    assert "NEW_CLASS_INIT imprint: 1 new class" in printed and "| star " in printed
    saved = torch.load(out, weights_only=True)["model"]
    model = small_model(3, seed=2)
    ReclassCheckpointer(model, reclass=ReclassOptions(
        mode="map", target_classes=THREE, new_class_init="imprint"), examples=NewClassExamples(
            dataset_dicts=dicts, class_names=THREE)).load(path)
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_the_choice_and_the_entries_travel_with_the_data(tmp_path):
    """The same COCO dataset written under two directories (of different depth) and registered
    under two names: the same images are chosen and the entries are bit-identical."""
    from d2_reclass import register_coco_dataset

    path, _ = _six_checkpoint(tmp_path)
    plans, states, files = [], [], []
    for name, where in (("moved_a", tmp_path / "a"), ("moved_b", tmp_path / "b" / "deeper")):
        json_file = make_shapes_dataset(str(where), "train", THREE, 12, seed=5)
        register_coco_dataset(name, json_file, str(where / "train"))
        examples = NewClassExamples(datasets=(name,), class_names=THREE)
        dicts, _ = examples.load()
        assert portable_names(dicts, examples.roots()) == [
            f"{i:05d}.png" for i in range(1, 13)]
        files.append([d["file_name"] for d in dicts])
        _, _, mapping = _mapped()
        per_image, counts = image_boxes(dicts, lambda c: c, [STAR] + KEPT)
        plans.append(plan_images(dicts, per_image, counts, mapping, [STAR], KEPT, True, 3, 3,
                                 THREE, examples.roots()))
        model = small_model(3, seed=2)
        ReclassCheckpointer(model, reclass=ReclassOptions(
            mode="map", target_classes=THREE, new_class_init="imprint", init_images=3, seed=3),
            examples=examples).load(path)
        states.append(params(model))
    assert files[0] != files[1]  # absolute paths, which the choice must not depend on
    assert plans[0].chosen == plans[1].chosen and len(plans[0].chosen[STAR]) == 3
    assert_same_state(states[0], states[1])


def test_portable_names_are_relative_to_the_deepest_root_else_the_common_directory(tmp_path):
    root, inner = tmp_path / "data", tmp_path / "data" / "inner"
    dicts = [{"file_name": str(root / "seq1" / "000001.png")},
             {"file_name": str(inner / "x.png")},
             {"file_name": str(tmp_path / "loose" / "s" / "y.png")},
             {"file_name": str(tmp_path / "loose" / "z.png")}]
    assert portable_names(dicts, [str(root), str(inner)]) == [
        "seq1/000001.png", "x.png", "s/y.png", "z.png"]
    # Without roots, everything is named from the directory common to all the files.
    assert portable_names(dicts) == ["data/seq1/000001.png", "data/inner/x.png",
                                     "loose/s/y.png", "loose/z.png"]


def test_imprinted_bias_stays_below_the_runner_up_on_the_objects_the_model_detects(data):
    """New-only labels: the kept classes' objects are in the images, unlabelled. The model
    (its triangle row made to win every box) detects them; on each, the star row's logit may
    not pass the runner-up's (the highest competitor but triangle), and reaches it exactly on
    one."""
    _, _, dicts = data
    source, model, mapping = _mapped()
    triangle = THREE.index("triangle")
    with torch.no_grad():
        model.state_dict()[PRED + "cls_score.bias"][triangle] += 50.0
    new_only = [dict(d, annotations=[a for a in d["annotations"] if a["category_id"] == STAR])
                for d in dicts]
    entries, report = _init(model, new_only, mapping, source, method="imprint", max_images=16)
    init = report.classes[0]
    info = init.imprint["roi_heads.box_predictor"]
    assert info["kept_objects"] > 0 and info["bias"] < info["calibrated_bias"]
    assert init.reason.endswith(
        f"its direction contrasted with {info['kept_objects']} kept-class objects; bias "
        "lowered to rank below the runner-up on each of them")

    row = entries[PRED + "cls_score.weight"][STAR].double()
    b = entries[PRED + "cls_score.bias"][STAR].double()
    weight = model.state_dict()[PRED + "cls_score.weight"].double()
    bias = model.state_dict()[PRED + "cls_score.bias"].double()
    x, labels = _detected_features(model, [d for d in new_only if d["annotations"]])
    assert set(labels.tolist()) == {triangle} and len(x) == info["kept_objects"]
    logits = x @ weight.T + bias
    runner_up = logits[:, [KEPT[1], 3]].max(dim=1).values  # square or background
    assert torch.equal(runner_up, _runner_up(logits, labels, KEPT + [3]))
    gaps = x @ row + b - runner_up
    assert abs(float(gaps.max())) < 1e-4
    # The kept class itself stays far ahead: its probability on its objects hardly moves.
    assert bool((logits[:, triangle] - (x @ row + b) > 10).all())
