"""COCO files as annotation tools write them, in a project written as its users write one.

Each file is a real COCO json over real images, registered with stock
``register_coco_instances``, and trained by the project's own ``Trainer(DefaultTrainer)`` with
the mixin (stock ``merge_from_file`` and ``default_setup``). The shapes follow each tool's
documented COCO export:

- Roboflow: a root category (id 0, supercategory "none", named after the project) that every
  class names as its supercategory and no annotation uses; ids by class name;
- CVAT: every label of the task is a category (ids from 1, supercategory ""), one never drawn;
- Label Studio: ids from 0 in name order, every label of the labelling config, no
  supercategory, annotations with ``ignore: 0``;
- labelme's ``labelme2coco.py`` example: ``_background_`` as category 0 (supercategory null)
  from labels.txt, never used; the ``labelme2coco`` package: each class its own supercategory;
- pylabel: only the categories used, in the order they were met (not by id), supercategory
  null, images with ``folder`` / ``path`` / ``depth``;
- a full taxonomy: 1,000 categories, 3 of them used.

Every run ends in the labels the model's loss receives, compared by name with the file's, or
in one error of the package's own type naming the dataset, the file and the entry.
"""
import copy
import json
import re

import pytest
import torch
from d2_fixtures import captured_logs, labels_reaching_the_loss, project_setup, small_model
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from d2_reclass import (
    ClassListError,
    DatasetError,
    ReclassCheckpointer,
    ReclassError,
    ReclassOptions,
    ReclassTrainerMixin,
    map_datasets_to_classes,
)
from d2_reclass.data.datasets import read_coco_categories
from d2_reclass.data.synthetic import make_shapes_dataset

TARGET = ["square", "triangle", "star"]
IMAGES = "shapes"  # the image folder every file annotates


class Trainer(ReclassTrainerMixin, DefaultTrainer):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The images (6 of squares, triangles and stars) and their plain COCO json, and
    ``two.pth``: a checkpoint of the classes triangle, square that stores their names."""
    root = tmp_path_factory.mktemp("annotation_tools")
    path = make_shapes_dataset(str(root), IMAGES, ["square", "triangle", "star"], 6, seed=4)
    ReclassCheckpointer(small_model(2, seed=3), str(root),
                        reclass=ReclassOptions(target_classes=["triangle", "square"])
                        ).save("two")
    return root, json.loads(open(path).read())


def relabel(data, categories, ids, **extra):
    """A copy of COCO ``data`` whose categories are ``categories``; ``ids`` maps each class name
    to its new id. ``extra`` updates every annotation, image or the top level."""
    out = copy.deepcopy(data)
    names = {c["id"]: c["name"] for c in out["categories"]}
    out["categories"] = categories
    for a in out["annotations"]:
        a["category_id"] = ids[names[a["category_id"]]]
        a.update(extra.get("annotation", {}))
    for im in out["images"]:
        im.update(extra.get("image", {}))
    out.update(extra.get("top", {}))
    return out


def roboflow(data):
    root = "shapes-x9k2"
    ids = {"square": 1, "star": 2, "triangle": 3}
    return relabel(data, [{"id": 0, "name": root, "supercategory": "none"}] + [
        {"id": i, "name": n, "supercategory": root} for n, i in ids.items()], ids,
        annotation={"segmentation": [], "iscrowd": 0},
        image={"license": 1, "date_captured": "2026-12-01T10:00:00+00:00"},
        top={"info": {"year": "2026", "version": "3", "description": "Exported from roboflow.com",
                      "contributor": "", "url": "https://public.roboflow.com/",
                      "date_created": "2026-12-01T10:00:00+00:00"},
             "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/",
                           "name": "CC BY 4.0"}]})


def cvat(data):
    ids = {"square": 1, "triangle": 2, "hexagon": 3, "star": 4}  # hexagon: never drawn
    return relabel(data, [{"id": i, "name": n, "supercategory": ""} for n, i in ids.items()], ids,
                   annotation={"attributes": {"occluded": False, "rotation": 0.0}},
                   top={"licenses": [{"name": "", "id": 0, "url": ""}],
                        "info": {"contributor": "", "date_created": "", "description": "",
                                 "url": "", "version": "", "year": ""}})


def label_studio(data):
    ids = {"circle": 0, "square": 1, "star": 2, "triangle": 3}  # circle: in the config only
    return relabel(data, [{"id": i, "name": n} for n, i in ids.items()], ids,
                   annotation={"ignore": 0, "iscrowd": 0},
                   top={"info": {"year": 2026, "version": "1.0", "description": "",
                                 "contributor": "Label Studio", "url": "",
                                 "date_created": "2026-12-01 10:00:00"}})


def labelme_example(data):
    ids = {"_background_": 0, "square": 1, "triangle": 2, "star": 3}  # from labels.txt
    return relabel(data, [{"supercategory": None, "id": i, "name": n} for n, i in ids.items()],
                   ids, top={"info": {"description": None, "url": None, "version": None,
                                      "year": 2026, "contributor": None, "date_created": ""},
                             "licenses": [{"url": None, "id": 0, "name": None}]})


def labelme2coco(data):
    ids = {"square": 0, "triangle": 1, "star": 2}
    return relabel(data, [{"id": i, "name": n, "supercategory": n} for n, i in ids.items()], ids)


def pylabel(data):
    ids = {"star": 2, "square": 0, "triangle": 1}  # in the order first met
    return relabel(data, [{"id": i, "name": n, "supercategory": None} for n, i in ids.items()],
                   ids, annotation={"segmented": None, "pose": None, "truncated": None,
                                    "difficult": None},
                   image={"folder": IMAGES, "path": None, "depth": 3})


def taxonomy(data):
    names = [f"species {k:04d}" for k in range(997)] + ["square", "triangle", "star"]
    ids = {n: 1000 - k for k, n in enumerate(names)}  # the used ones first by id
    return relabel(data, [{"id": i, "name": n, "supercategory": "thing"} for n, i in ids.items()],
                   ids)


def register(base, name, data):
    """Write ``data`` as ``<name>.json`` and register it as a user does."""
    root, _ = base
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(path), str(root / IMAGES))
    return path


def file_labels(path, target):
    """Per image ``shapes/<file>``, its boxes' classes as indices of ``target`` (sorted), read
    from the json at ``path`` by name."""
    return {f: sorted(target.index(n) for n in names) for f, names in file_names(path).items()}


def train(base, name, reclass, iters=3):
    """Build the project's trainer for DATASETS.TRAIN ``name`` and train; (trainer, logs of
    d2_reclass, the labels its loss received). KEEP_SOURCE_CLASSES keeps ``two.pth``'s."""
    root, _ = base
    weights = str(root / "two.pth") if reclass.get("KEEP_SOURCE_CLASSES") else ""
    cfg = project_setup(root, train=[name], reclass=reclass, iters=iters, weights=weights)
    with captured_logs("d2_reclass") as logs:
        trainer = Trainer(cfg)
    return trainer, logs, labels_reaching_the_loss(trainer)


TOOLS = {"roboflow": roboflow, "cvat": cvat, "label_studio": label_studio,
         "labelme_example": labelme_example, "labelme2coco": labelme2coco, "pylabel": pylabel,
         "taxonomy": taxonomy}
#: the categories each tool's file defines that no annotation uses
UNUSED = {"roboflow": ["shapes-x9k2"], "cvat": ["hexagon"], "label_studio": ["circle"],
          "labelme_example": ["_background_"], "labelme2coco": [], "pylabel": [],
          "taxonomy": [f"species {k:04d}" for k in range(997)][::-1]}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_with_target_classes_every_tools_file_trains_its_labels_by_name(base, tool):
    name = f"at_{tool}"
    path = register(base, name, TOOLS[tool](base[1]))
    trainer, logs, seen = train(base, name, {"TARGET_CLASSES": TARGET})
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert seen == file_labels(path, TARGET)
    assert sorted({j for labels in seen.values() for j in labels}) == [0, 1, 2]
    left_out = [line for line in logs if "left out" in line]
    if not UNUSED[tool]:
        assert left_out == []
        return
    assert len(left_out) == 1
    unused = UNUSED[tool]
    shown = str(unused) if len(unused) <= 8 else \
        f"[{', '.join(map(repr, unused[:8]))}, ... ({len(unused)} categories)]"
    assert left_out[0].startswith(
        f"DATASETS.TRAIN {name!r}: {len(unused)} "
        f"{'category' if len(unused) == 1 else 'categories'} that no annotation uses, not among "
        f"MODEL.RECLASS.TARGET_CLASSES, {'is' if len(unused) == 1 else 'are'} left out (no label "
        f"maps to {'it' if len(unused) == 1 else 'them'}): {shown}")
    assert len(left_out[0]) < 400


def test_without_target_classes_a_roboflow_root_is_no_class(base):
    name = "at_roboflow_auto"
    path = register(base, name, roboflow(base[1]))
    trainer, logs, seen = train(base, name, {})
    classes = ["square", "star", "triangle"]  # the file's order, less the root
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert list(MetadataCatalog.get(name).thing_classes) == classes
    assert seen == file_labels(path, classes)
    assert [line for line in logs if "left out" in line] == [
        f"DATASETS.TRAIN {name!r}: 1 category that no annotation uses, not among the classes of "
        f"DATASETS.TRAIN ({name!r},), is left out (no label maps to it): ['shapes-x9k2'] "
        "('shapes-x9k2': the supercategory of the others, a root category as Roboflow exports "
        "write, not a class)."]


def test_without_target_classes_an_unused_category_stays_a_class_as_stock_counts_it(base):
    name = "at_cvat_auto"
    path = register(base, name, cvat(base[1]))
    trainer, logs, seen = train(base, name, {})
    classes = ["square", "triangle", "hexagon", "star"]
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 4
    assert list(MetadataCatalog.get(name).thing_classes) == classes
    assert seen == file_labels(path, classes)
    assert not [line for line in logs if "left out" in line]


def test_keep_source_classes_never_adds_a_class_without_annotations(base):
    name = "at_cvat_keep"
    path = register(base, name, cvat(base[1]))
    # PRESERVE none: the loss sees the file's labels only, no pseudo-labels of the old classes.
    trainer, logs, seen = train(base, name, {"KEEP_SOURCE_CLASSES": True, "PRESERVE": "none"})
    kept = ["triangle", "square", "star"]  # the checkpoint's, then the labelled new one
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert list(MetadataCatalog.get(name).thing_classes) == kept
    assert seen == file_labels(path, kept)
    assert any("['hexagon']" in line and "left out" in line for line in logs)


def test_a_used_class_the_model_lacks_is_still_refused_with_a_short_message(base):
    name = "at_taxonomy_short"
    register(base, name, taxonomy(base[1]))
    root, _ = base
    cfg = project_setup(root, train=[name], reclass={"TARGET_CLASSES": ["square", "triangle"]})
    with pytest.raises(ClassListError) as info:
        Trainer(cfg)
    message = str(info.value)
    assert message.startswith(
        f"DATASETS.TRAIN {name!r} has the thing class 'star', not among "
        "MODEL.RECLASS.TARGET_CLASSES: its labels cannot be mapped to the model's classes by "
        f"name. DATASETS.TRAIN {name!r}: ['star', 'triangle', 'square', 'species 0996', ")
    assert "... (1000 classes)]; MODEL.RECLASS.TARGET_CLASSES: ['square', 'triangle']." in message
    assert len(message) < 800


def test_a_roboflow_file_is_evaluated_under_the_models_class_names(base, tmp_path):
    name = "at_roboflow_valid"
    register(base, name, roboflow(base[1]))
    map_datasets_to_classes([name], TARGET)
    gt = json.loads(open(MetadataCatalog.get(name).json_file).read())
    assert gt["categories"] == [{"id": 1, "name": "square"}, {"id": 2, "name": "triangle"},
                                {"id": 3, "name": "star"}]
    file_names = {1: "square", 2: "star", 3: "triangle"}  # the file's ids, the root left out
    assert [a["category_id"] for a in gt["annotations"]] == [
        TARGET.index(file_names[a["category_id"]]) + 1 for a in roboflow(base[1])["annotations"]]
    # Predictions equal to the labels as the dataset loads them: every class at AP 100.
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path))
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in d["annotations"]]
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": Instances(
            (d["height"], d["width"]), pred_boxes=Boxes(torch.tensor(boxes)),
            scores=torch.ones(len(boxes)),
            pred_classes=torch.tensor([a["category_id"] for a in d["annotations"]]))}])
    results = evaluator.evaluate()["bbox"]
    assert {k: results[k] for k in ("AP", "AP-square", "AP-triangle", "AP-star")} == {
        "AP": 100.0, "AP-square": 100.0, "AP-triangle": 100.0, "AP-star": 100.0}


def test_root_categories_are_a_supercategory_without_annotations(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({
        "categories": [{"id": 0, "name": "shapes", "supercategory": "none"},
                       {"id": 1, "name": "square", "supercategory": "shapes"},
                       {"id": 2, "name": "person", "supercategory": "person"},  # its own
                       {"id": 3, "name": "vehicle", "supercategory": "none"},  # used
                       {"id": 4, "name": "car", "supercategory": "vehicle"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3}]}))
    categories = read_coco_categories(str(path))
    assert categories.annotations == (0, 0, 0, 1, 0)
    assert categories.roots == (0,)


DAMAGED = {
    # name: (how the categories are damaged, the words of the error after the file)
    "null_name": (lambda cats: cats[1].update(name=None),
                  'has categories[1] = {"id": 2, "name": null}, whose \'name\' is null (no name)'),
    "number_name": (lambda cats: cats[1].update(name=5),
                    'has categories[1] = {"id": 2, "name": 5}, whose \'name\' is the number 5, '
                    'not a string (write it quoted: "5")'),
    "empty_name": (lambda cats: cats[0].update(name=""),
                   'has categories[0] = {"id": 1, "name": ""}, whose \'name\' is \'\', which is '
                   "empty once spaces, '_' and '-' are dropped"),
    "blank_name": (lambda cats: cats[2].update(name="   "),
                   'has categories[2] = {"id": 3, "name": "   "}, whose \'name\' is \'   \', '
                   "which is empty once spaces, '_' and '-' are dropped"),
    "no_name": (lambda cats: cats[2].pop("name"),
                'has categories[2] = {"id": 3}, without an \'id\' or \'name\''),
    "string_id": (lambda cats: cats[0].update(id="1"),
                  'has categories[0] = {"id": "1", "name": "square"}, whose \'id\' "1" is not an '
                  "integer (COCO ids are numbers)"),
    "duplicate_id": (lambda cats: cats[2].update(id=2),
                     'has categories[1] = {"id": 2, "name": "triangle"} and categories[2] = '
                     '{"id": 2, "name": "star"} with the same id 2; each category needs its '
                     "own id"),
    "string_category": (lambda cats: cats.__setitem__(1, "triangle"),
                        'has categories[1] = "triangle", not an object like {"id": 1, "name": '
                        '"cat"}'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_category_list_is_one_error_naming_dataset_file_and_entry(base, damage):
    change, words = DAMAGED[damage]
    data = copy.deepcopy(base[1])
    change(data["categories"])
    name = f"at_damaged_{damage}"
    path = register(base, name, data)
    cfg = project_setup(base[0], train=[name], reclass={"TARGET_CLASSES": TARGET})
    with pytest.raises(DatasetError) as info:
        Trainer(cfg)
    assert str(info.value) == (
        f"DATASETS.TRAIN {name!r}: its json {path} {words}; fix that entry in the file (or the "
        "class in the annotation tool that wrote it, and export again).")


@pytest.mark.parametrize("top, words", [
    ({"categories": []}, "has an empty 'categories' list"),
    ({"categories": {"1": "square"}}, "has 'categories' that is not a list"),
    ({"categories": None, "drop": True}, "has no 'categories'"),
])
def test_a_file_without_a_category_list_is_one_error_naming_dataset_and_file(base, top, words):
    data = copy.deepcopy(base[1])
    if top.pop("drop", False):
        del data["categories"]
    else:
        data.update(top)
    name = f"at_no_categories_{re.sub(r'[^a-z]', '', words)[:20]}"
    path = register(base, name, data)
    cfg = project_setup(base[0], train=[name], reclass={"TARGET_CLASSES": TARGET})
    with pytest.raises(DatasetError, match=re.escape(
            f"DATASETS.TRAIN {name!r}: its json {path} {words}; pass a COCO-format annotation "
            "file, whose 'categories' list every class as")):
        Trainer(cfg)


def test_an_annotation_of_an_unknown_category_names_the_annotation(base):
    data = copy.deepcopy(base[1])
    data["annotations"][3]["category_id"] = 9
    name = "at_damaged_unknown_id"
    path = register(base, name, data)
    a = data["annotations"][3]
    cfg = project_setup(base[0], train=[name], reclass={})
    with pytest.raises(DatasetError) as info:
        Trainer(cfg)
    assert str(info.value).startswith(
        f"DATASETS.TRAIN {name!r}: its json {path} has annotations[3] = "
        f'{{"id": {a["id"]}, "image_id": {a["image_id"]}, "category_id": 9, ')
    assert str(info.value).endswith(
        "whose category_id 9 is none of the categories' ids [1, 2, 3]; fix that entry in the "
        "file (or the class in the annotation tool that wrote it, and export again).")


def test_no_type_key_or_attribute_error_escapes_a_damaged_file(base):
    """Every damage at once and one by one, with and without TARGET_CLASSES: only ours."""
    for k, (change, _) in enumerate(sorted(DAMAGED.values(), key=lambda v: v[1])):
        for reclass in ({}, {"TARGET_CLASSES": TARGET}, {"KEEP_SOURCE_CLASSES": True}):
            data = copy.deepcopy(base[1])
            change(data["categories"])
            name = f"at_any_{k}_{len(reclass)}_{'KEEP' in str(reclass)}"
            register(base, name, data)
            cfg = project_setup(base[0], train=[name], reclass=reclass,
                                weights=str(base[0] / "two.pth") if "KEEP" in str(reclass)
                                else "")
            with pytest.raises(ReclassError) as info:
                Trainer(cfg)
            assert name in str(info.value) and "categories[" in str(info.value)


def test_odd_ids_and_one_name_in_two_cases_map_by_name(base):
    """Ids 0, negative and 10^12; 'Square' and 'square' both labelled: both are the model's
    square. A valid name the model lacks ('stär') is refused when labelled, left out when not."""
    data = base[1]
    ids = {"Square": -5, "square": 0, "triangle": 10**12, "star": 7}
    odd = relabel(data, [{"id": i, "name": n} for n, i in ids.items()],
                  {"square": 0, "triangle": 10**12, "star": 7})
    odd["annotations"][0]["category_id"] = -5  # one square labelled 'Square'
    name = "at_odd_ids"
    path = register(base, name, odd)
    trainer, logs, seen = train(base, name, {"TARGET_CLASSES": TARGET})
    labels = {f: sorted(TARGET.index(n.lower()) for n in names)
              for f, names in file_names(path).items()}
    assert seen == labels
    for used, name in ((True, "at_star_umlaut_used"), (False, "at_star_umlaut_unused")):
        umlaut = copy.deepcopy(data)
        umlaut["categories"].append({"id": 4, "name": "stär"})
        if used:
            umlaut["annotations"][0]["category_id"] = 4
        register(base, name, umlaut)
        if used:
            with pytest.raises(ClassListError, match=f"^DATASETS.TRAIN '{name}' has the thing "
                               "class 'stär', not among MODEL.RECLASS.TARGET_CLASSES"):
                Trainer(project_setup(base[0], train=[name], reclass={"TARGET_CLASSES": TARGET}))
        else:
            trainer = Trainer(project_setup(base[0], train=[name],
                                            reclass={"TARGET_CLASSES": TARGET}))
            assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3


def file_names(path):
    """Per image ``shapes/<file>``, its boxes' class names as the json at ``path`` names them."""
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: f"{IMAGES}/{im['file_name']}" for im in data["images"]}
    out = {f: [] for f in files.values()}
    for a in data["annotations"]:
        out[files[a["image_id"]]].append(names[a["category_id"]])
    return out
