"""`segstream evaluate`: metric arithmetic on known matrices, class maps, bad input, and a real:
the parts that need no model and no peers (the rest: tests/e2e/test_evaluate.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from segstream.models.class_maps import BUILTIN, ClassMapError, identity_map, load_class_map
from segstream.models.labels import CAMVID_LABELS, CITYSCAPES_LABELS, VOC_LABELS
from segstream.models.tools.evaluate import summarize
from segstream.models.tools.metrics import (
    LabelError,
    class_accuracy,
    class_iou,
    confusion_matrix,
    fw_iou,
    pixel_accuracy,
)

CM = np.array([
    [5, 1, 0, 0, 2],
    [0, 3, 1, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
])  # fmt: skip


CAMVID11 = CAMVID_LABELS[:11]


def test_metrics_on_a_known_confusion_matrix() -> None:
    assert pixel_accuracy(CM) == pytest.approx(8 / 12)
    np.testing.assert_allclose(class_accuracy(CM), [5 / 8, 3 / 4, np.nan, np.nan])
    # IoU = tp / (gt row incl. unmapped + pred column - tp)
    np.testing.assert_allclose(class_iou(CM), [5 / (8 + 5 - 5), 3 / (4 + 4 - 3), 0.0, np.nan])
    assert fw_iou(CM) == pytest.approx(8 / 12 * 5 / 8 + 4 / 12 * 3 / 5)
    s = summarize(CM, ["a", "b", "c", "d"], mapped=[0, 1])
    assert s["mean_accuracy"] == pytest.approx((5 / 8 + 3 / 4) / 2)
    assert s["miou"] == pytest.approx((5 / 8 + 3 / 5 + 0) / 3)  # d left out, c counts as 0
    assert s["miou_mapped"] == pytest.approx((5 / 8 + 3 / 5) / 2)
    assert s["per_class"]["d"] is None and s["per_class"]["c"] == 0.0
    assert s["unmapped_fraction"] == pytest.approx(2 / 12)
    assert s["pixels"] == 12 and s["gt_pixels"] == {"a": 8, "b": 4, "c": 0, "d": 0}
    json.dumps(s, allow_nan=False)  # NaN never reaches the JSON


def test_perfect_and_empty_matrices() -> None:
    cm = np.zeros((3, 4), np.int64)
    assert math.isnan(pixel_accuracy(cm)) and math.isnan(fw_iou(cm))
    assert summarize(cm, ["a", "b", "c"])["miou"] is None
    cm[[0, 1], [0, 1]] = [7, 2]
    s = summarize(cm, ["a", "b", "c"])
    assert s["miou"] == s["pixel_accuracy"] == s["fw_iou"] == s["mean_accuracy"] == 1.0


def test_confusion_skips_void_counts_unmapped_and_rejects_stray_labels() -> None:
    gt = np.array([[0, 1, 11], [1, 1, 0]], np.uint8)
    pred = np.array([[0, 2, 0], [1, 2, 0]], np.uint8)  # 2 = the unmapped column for K=2
    assert confusion_matrix(gt, pred, 2, ignore=11).tolist() == [[2, 0, 0], [0, 1, 2]]
    with pytest.raises(LabelError, match=r"\[11\]"):
        confusion_matrix(gt, pred, 2, ignore=255)


def test_builtin_maps_follow_the_camvid_readme() -> None:
    city = BUILTIN["cityscapes-to-camvid"]
    lut = city.lut()
    expect = {
        "road": "Road",
        "wall": "Building",
        "traffic sign": "SignSymbol",
        "terrain": "Tree",
        "rider": "Bicyclist",
        "train": "Car",
        "bicycle": "Bicyclist",
    }
    for src, dst in expect.items():
        assert CAMVID11[lut[CITYSCAPES_LABELS.index(src)]] == dst
    assert len(city.mapping) == 19 and city.mapped_classes() == list(range(11))
    voc = BUILTIN["voc-to-camvid"]
    lut = voc.lut()
    assert lut[VOC_LABELS.index("person")] == 9 and lut[VOC_LABELS.index("motorbike")] == 10
    assert lut[0] == lut[VOC_LABELS.index("bird")] == voc.unmapped_id == 11
    assert [voc.classes[i] for i in voc.mapped_classes()] == ["Car", "Pedestrian", "Bicyclist"]
    assert city.ignore == voc.ignore == 11
    with pytest.raises(ClassMapError, match="is for models with the classes background"):
        voc.check_model("edgetpu-cityscapes", CITYSCAPES_LABELS)


def test_yaml_class_map(tmp_path: Path) -> None:
    f = tmp_path / "roads.yaml"
    f.write_text("classes: [Sky, Road]\nignore: 255\nmap:\n  10: 0\n  0: 1\n  1: 1\n")
    m = load_class_map(f)
    assert (m.name, m.classes, m.ignore) == ("roads", ("Sky", "Road"), 255)
    assert m.lut()[[10, 0, 1, 2]].tolist() == [0, 1, 1, 2]
    m.check_model("edgetpu-cityscapes", CITYSCAPES_LABELS)
    with pytest.raises(ClassMapError, match=r"only has ids 0\.\.2"):
        m.check_model("tiny", ["x", "y", "z"])
    with pytest.raises(ClassMapError, match="neither a built-in map"):
        load_class_map(tmp_path / "nope.yaml")


def test_identity_map_for_masks_in_model_ids() -> None:
    m = identity_map(VOC_LABELS, "voc")
    assert m.lut()[:21].tolist() == list(range(21)) and m.lut()[21] == 21
    assert m.model_labels is None and m.ignore is None
