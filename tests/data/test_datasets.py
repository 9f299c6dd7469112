"""COCO-format dataset registration: class names read up front, bad files refused by name."""
import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2_reclass import DatasetError, ReclassError, register_coco_dataset
from d2_reclass.data.datasets import coco_json_classes

CATEGORIES = [{"id": 7, "name": "star"}, {"id": 1, "name": "square"}, {"id": 3, "name": "circle"}]


def test_classes_in_category_id_order(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    assert coco_json_classes(str(path)) == ["square", "circle", "star"]


@pytest.mark.parametrize("content, message", [
    (None, r"Dataset json .*missing\.json does not exist; check the JSON path \(--coco-dataset "
           r"NAME JSON IMAGE_ROOT\)\."),
    ('{"categories": [', r"Dataset json .*bad\.json is not valid JSON \(Expecting value: line 1 "
                         r"column 17 \(char 16\)\); pass a COCO-format annotation file"),
    ("[1, 2]", r"bad\.json has no JSON object at the top \(a COCO file is one object\); pass a "
               r"COCO-format annotation file"),
    ('{"images": []}', r"bad\.json has no 'categories'; pass a COCO-format annotation file, whose "
                       r"'categories' list every class as \{\"id\": \.\.\., \"name\": \.\.\.\}"),
    ('{"categories": {"1": "cat"}}', r"bad\.json has 'categories' that is not a list"),
    ('{"categories": []}', r"bad\.json has an empty 'categories' list"),
    ('{"categories": [{"id": 1}]}', r"bad\.json has categories\[0\] = \{\"id\": 1\}, without an "
                                    r"'id' or 'name'; fix that entry in the file"),
    ('{"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
     r"bad\.json has categories\[0\] = \{\"id\": 1, \"name\": \"a\"\} and categories\[1\] = "
     r"\{\"id\": 1, \"name\": \"b\"\} with the same id 1; each category needs its own id"),
])
def test_bad_json_is_a_dataset_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        coco_json_classes(str(path))
    assert isinstance(info.value, ReclassError) and not isinstance(info.value, OSError)


def test_unreadable_json_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match=rf"Dataset json {tmp_path} cannot be read: Is a "
                                           r"directory; check the path and its permissions\."):
        coco_json_classes(str(tmp_path))


def test_register_reads_classes_first_and_leaves_nothing_on_error(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"^Dataset 'd2_reclass_test_bad': its json .*bad\.json "
                       r"has no 'categories'"):
        register_coco_dataset("d2_reclass_test_bad", str(bad), str(tmp_path))
    assert "d2_reclass_test_bad" not in DatasetCatalog.list()
    register_coco_dataset("d2_reclass_test_good", str(good), str(tmp_path))
    try:
        assert MetadataCatalog.get("d2_reclass_test_good").thing_classes == [
            "square", "circle", "star"]
    finally:
        DatasetCatalog.remove("d2_reclass_test_good")
        MetadataCatalog.remove("d2_reclass_test_good")
