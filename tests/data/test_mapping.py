"""Datasets matched to the model's classes by name, in a project written as its users write one.

The project has its own ``Trainer(DefaultTrainer)`` with the mixin, registers its data with
stock ``register_coco_instances``, merges its config with stock ``merge_from_file`` and calls
``default_setup``. Each of the issue's setups ends in the label ids that reach the model's loss
(every image's ``gt_classes`` as the model's forward receives them), in AP, or in one error:

- a dataset whose classes are the target classes in another order;
- a dataset that lists only the new class (TARGET_CLASSES = the checkpoint's six + star);
- a two-edit typo ("sqaure");
- rehearsal: the old data and the new data in DATASETS.TRAIN.
"""
import json
import os
import re

import pytest
import torch
from d2_fixtures import (
    SIX,
    THREE,
    captured_logs,
    labels_reaching_the_loss,
    small_model,
)
from d2_fixtures import project_setup as setup
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from d2_reclass import (
    ClassListError,
    DatasetError,
    ReclassCheckpointer,
    ReclassOptions,
    ReclassTrainerMixin,
    map_datasets_to_classes,
)
from d2_reclass.data.synthetic import make_shapes_dataset

CLS = "roi_heads.box_predictor.cls_score.weight"
SEVEN = SIX + ["star"]


class MyTrainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name,
                             output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "eval"))


class Trainer(ReclassTrainerMixin, MyTrainer):
    pass


#: name -> (json classes in their order, images, seed)
DATA = {
    "dc_reordered": (THREE, 4, 1),  # triangle, square, star
    "dc_star_only": (["star"], 3, 2),
    "dc_six": (SIX, 4, 3),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project's folder: its data, registered as the project registers it, and a
    six-class checkpoint that stores its class names."""
    root = tmp_path_factory.mktemp("class_lists")
    for name, (classes, n, seed) in DATA.items():
        make_shapes_dataset(str(root), name, classes, n, seed=seed)
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(root / f"{name}.json"), str(root / name))
    six = small_model(6, seed=1)
    ReclassCheckpointer(six, str(root), reclass=ReclassOptions(target_classes=SIX)).save("six")
    return root, six.state_dict()


def json_labels(root, name, target):
    """For every image ``name/file`` of dataset ``name``, its boxes' classes as indices of
    ``target`` (sorted), read from the json by name."""
    data = json.loads((root / f"{name}.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: f"{name}/{im['file_name']}" for im in data["images"]}
    out = {f: [] for f in files.values()}
    for a in data["annotations"]:
        out[files[a["image_id"]]].append(target.index(names[a["category_id"]]))
    return {f: sorted(v) for f, v in out.items()}


def test_a_dataset_in_another_order_trains_each_class_on_its_own_row(project):
    root, _ = project
    target = ["square", "triangle", "star"]  # the json's order is triangle, square, star
    cfg = setup(root, train=["dc_reordered"], reclass={"TARGET_CLASSES": target})
    with captured_logs("d2_reclass") as logs:
        trainer = Trainer(cfg)
    assert ("| dc_reordered | triangle    |             1 |\n"
            "| dc_reordered | square      |             0 |\n"
            "| dc_reordered | star        |             2 |") in "\n".join(logs)
    seen = labels_reaching_the_loss(trainer)
    assert seen == json_labels(root, "dc_reordered", target)


def test_a_dataset_of_only_the_new_class_trains_the_new_row(project):
    root, source = project
    cfg = setup(root, train=["dc_star_only"], weights=str(root / "six.pth"),
                reclass={"TARGET_CLASSES": SEVEN})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    # The six classes keep the checkpoint's rows; star is imprinted from its own examples.
    loaded = trainer.model.state_dict()[CLS]
    assert torch.equal(loaded[:6], source[CLS][:6])
    new = trainer.checkpointer.report.new_classes.classes
    assert [(c.name, c.index, c.method) for c in new] == [("star", 6, "imprint")]
    labels = json_labels(root, "dc_star_only", SEVEN)
    assert (new[0].images, new[0].instances) == (len(labels), sum(map(len, labels.values())))
    seen = labels_reaching_the_loss(trainer)
    assert seen == labels and all(set(v) == {6} for v in seen.values())


def test_a_two_edit_typo_in_the_target_is_one_error_naming_both_lists(project):
    root, source = project
    typo = ["triangle", "sqaure", "star"]
    cfg = setup(root, train=["dc_reordered"], reclass={"TARGET_CLASSES": typo})
    with pytest.raises(ClassListError, match=re.escape(
            "DATASETS.TRAIN 'dc_reordered' has the thing class 'square', not among "
            "MODEL.RECLASS.TARGET_CLASSES: its labels cannot be mapped to the model's classes "
            "by name. Is 'sqaure' of MODEL.RECLASS.TARGET_CLASSES meant to be 'square'? "
            "DATASETS.TRAIN 'dc_reordered': ['triangle', 'square', 'star']; "
            "MODEL.RECLASS.TARGET_CLASSES: ['triangle', 'sqaure', 'star']. Add the missing "
            "classes to MODEL.RECLASS.TARGET_CLASSES, or leave MODEL.RECLASS.TARGET_CLASSES "
            "empty: the model then has the classes of every DATASETS.TRAIN dataset, each one's "
            "labels mapped by name.")):
        Trainer(cfg)
    # Where no dataset names the misspelt class, the checkpoint does: an error at the load,
    # before the first iteration, the model as it was built.
    cfg = setup(root, train=["dc_star_only"], weights=str(root / "six.pth"),
                reclass={"TARGET_CLASSES": ["triangle", "sqaure", "star"]})
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ClassListError, match=re.escape(
            "MODEL.RECLASS.TARGET_CLASSES names 'sqaure', which is in neither the thing class "
            "list stored in the checkpoint nor the training data, while the close name 'square' "
            "is in the thing class list stored in the checkpoint. Fix the name (CLASS_MAP "
            "'sqaure=square' maps it), or declare it new on purpose with CLASS_MAP 'sqaure='.")):
        trainer.resume_or_load(resume=False)
    assert trainer.iter == 0
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_rehearsal_trains_the_union_of_the_datasets_classes_by_name(project):
    root, _ = project
    cfg = setup(root, train=["dc_six", "dc_star_only"], iters=4)
    trainer = Trainer(cfg)
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 7
    assert list(MetadataCatalog.get("dc_star_only").thing_classes) == SEVEN
    seen = labels_reaching_the_loss(trainer)
    assert seen == {**json_labels(root, "dc_six", SEVEN),
                    **json_labels(root, "dc_star_only", SEVEN)}


def oracle_ap(dataset, out_dir):
    """COCOEvaluator's results for predictions equal to the dataset's boxes and labels, as
    the dataset loads them (the model's indices once mapped)."""
    evaluator = COCOEvaluator(dataset, output_dir=str(out_dir))
    evaluator.reset()
    for d in DatasetCatalog.get(dataset):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in d["annotations"]]
        instances = Instances((d["height"], d["width"]), pred_boxes=Boxes(torch.tensor(boxes)),
                              scores=torch.ones(len(boxes)),
                              pred_classes=torch.tensor([a["category_id"]
                                                         for a in d["annotations"]]))
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]


def test_evaluation_reports_each_class_under_its_own_name(project, tmp_path):
    root, _ = project
    target = ["star", "square", "triangle"]
    map_datasets_to_classes(["dc_reordered", "dc_star_only"], target)
    results = oracle_ap("dc_reordered", tmp_path)
    assert {k: results[k] for k in ("AP", "AP-star", "AP-square", "AP-triangle")} == {
        "AP": 100.0, "AP-star": 100.0, "AP-square": 100.0, "AP-triangle": 100.0}
    # A dataset of only some of the model's classes is evaluated on its own classes: the
    # others have no ground truth (NaN, left out of the mean), and COCOEvaluator does not fail.
    results = oracle_ap("dc_star_only", tmp_path)
    assert results["AP"] == results["AP-star"] == 100.0
    assert all(results[f"AP-{c}"] != results[f"AP-{c}"] for c in ("square", "triangle"))
    # The results file uses the ids of the mapped json COCOEvaluator reads: class j has j + 1.
    written = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert {r["category_id"] for r in written} == {1}
    gt = json.loads(open(MetadataCatalog.get("dc_star_only").json_file).read())
    assert gt["categories"] == [{"id": 1, "name": "star"}, {"id": 2, "name": "square"},
                                {"id": 3, "name": "triangle"}]


def test_mapping_is_idempotent_and_follows_a_new_target(project):
    root, _ = project
    assert map_datasets_to_classes(["dc_reordered"], ["star", "triangle", "square"]) == [
        ("dc_reordered", "triangle", 1), ("dc_reordered", "square", 2),
        ("dc_reordered", "star", 0)]
    assert map_datasets_to_classes(["dc_reordered"], ["star", "triangle", "square"]) == []
    ids = [a["category_id"] for d in DatasetCatalog.get("dc_reordered") for a in d["annotations"]]
    want = [j for labels in json_labels(root, "dc_reordered", ["star", "triangle", "square"])
            .values() for j in labels]
    assert sorted(ids) == sorted(want)
    # Back to the dataset's own order: its own loader and metadata again.
    assert map_datasets_to_classes(["dc_reordered"], THREE) == []
    assert list(MetadataCatalog.get("dc_reordered").thing_classes) == THREE
    assert MetadataCatalog.get("dc_reordered").json_file == str(root / "dc_reordered.json")
    ids = [a["category_id"] for d in DatasetCatalog.get("dc_reordered") for a in d["annotations"]]
    assert sorted(ids) == sorted(j for labels in json_labels(root, "dc_reordered", THREE)
                                 .values() for j in labels)


def test_a_class_the_model_lacks_and_other_stuff_classes_are_errors():
    for name, meta in (("dc_stuff", {"stuff_classes": ["sky", "road"]}),
                       ("dc_bad_ids", {"thing_classes": ["a", "b"]})):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda: [{"file_name": "x.png", "annotations": [
                {"category_id": 5}]}])
            MetadataCatalog.get(name).set(**meta)
    with pytest.raises(ClassListError, match=re.escape(
            "Dataset 'dc_stuff' has the stuff classes ['sky', 'road'], but the model's are "
            "['road', 'sky']. Semantic-segmentation labels are pixel values")):
        map_datasets_to_classes(["dc_stuff"], None, ["road", "sky"])
    # Whether 'a' has labels is counted from the dicts (no COCO json): id 5 is named first.
    with pytest.raises(DatasetError, match=re.escape(
            "Dataset 'dc_bad_ids': an annotation of x.png has category_id 5, but the dataset "
            "names 2 classes; fix the annotation file.")):
        map_datasets_to_classes(["dc_bad_ids"], ["b", "c"])
    map_datasets_to_classes(["dc_bad_ids"], ["b", "a"])
    with pytest.raises(DatasetError, match="x.png has category_id 5, but its dataset names 2 "
                       "classes"):
        DatasetCatalog.get("dc_bad_ids")


def test_a_custom_loaders_class_without_labels_is_left_out_and_one_with_labels_refused():
    name = "dc_custom_counted"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": "y.png", "annotations": [
            {"category_id": 0}, {"category_id": 0}]}])
        MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    with pytest.raises(ClassListError, match=r"^Dataset 'dc_custom_counted' has the thing class "
                       r"'a', not among the model's classes: its labels cannot be mapped"):
        map_datasets_to_classes([name], ["b", "c"])
    with captured_logs("d2_reclass") as logs:
        assert map_datasets_to_classes([name], ["c", "a"]) == [(name, "a", 1)]
    assert "Dataset 'dc_custom_counted': 1 category that no annotation uses, not among the " \
        "model's classes, is left out (no label maps to it): ['b']." in logs
    assert [a["category_id"] for d in DatasetCatalog.get(name) for a in d["annotations"]] == [1, 1]


def test_a_lazyconfig_maps_its_train_and_test_datasets(project):
    from omegaconf import OmegaConf

    from d2_reclass.integration.lazy import map_lazy_datasets

    cfg = OmegaConf.create({
        "dataloader": {"train": {"dataset": {"names": ["dc_six", "dc_star_only"]}},
                       "test": {"dataset": {"names": "dc_reordered"}}}, "reclass": {}})
    map_lazy_datasets(cfg)
    assert [list(MetadataCatalog.get(n).thing_classes)
            for n in ("dc_six", "dc_star_only", "dc_reordered")] == [SEVEN] * 3
    cfg.reclass = {"target_classes": THREE}
    with pytest.raises(ClassListError, match=re.escape(
            "dataloader.train.dataset.names 'dc_six' has the thing classes 'diamond', "
            "'hexagon', 'cross', not among the model's classes (reclass.target_classes, else "
            "those of dataloader.train)")):  # its circle has no annotation: left out
        map_lazy_datasets(cfg)
