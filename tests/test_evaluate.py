"""`segstream evaluate`: metric arithmetic on known matrices, and a real CamVid subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.class_maps import ClassMapError, load_class_map
from stream.cli import main
from stream.evaluate import confusion, metrics_from_confusion


def test_metrics_on_a_known_confusion_matrix() -> None:
    # rows: gt a, b, c; columns: pred a, b, c, unmapped
    cm = np.array([[8, 2, 0, 0], [1, 3, 0, 2], [0, 0, 0, 0]])
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m.pixel_accuracy == pytest.approx(11 / 16)
    assert m.mean_accuracy == pytest.approx((8 / 10 + 3 / 6) / 2)
    iou_a, iou_b = 8 / (10 + 9 - 8), 3 / (6 + 5 - 3)
    assert m.per_class == {"a": pytest.approx(iou_a), "b": pytest.approx(iou_b), "c": None}
    assert m.miou == pytest.approx((iou_a + iou_b) / 2)  # c absent everywhere: left out
    assert m.fw_iou == pytest.approx(10 / 16 * iou_a + 6 / 16 * iou_b)


def test_confusion_skips_void_and_counts_unmapped() -> None:
    gt = np.array([[0, 1, 11], [1, 1, 0]], np.uint8)
    pred = np.array([[0, 2, 0], [1, 2, 0]], np.uint8)  # 2 = unmapped column for K=2
    cm = confusion(gt, pred, num_classes=2, ignore=11)
    assert cm.tolist() == [[2, 0, 0], [0, 1, 2]]


def test_camvid_subset(tmp_path: Path, segstream_home: Path, shared_dir: Path) -> None:
    camvid = shared_dir / "data/camvid_segnet_test"
    out = tmp_path / "m.json"
    code = main(["evaluate", "--images", str(camvid / "images"), "--masks", str(camvid / "masks"),
                 "--model", "edgetpu-cityscapes", "--class-map", "cityscapes-to-camvid",
                 "--limit", "8", "--json", str(out), "-q"])
    assert code == 0
    m = json.loads(out.read_text())
    for key in ("pixel_accuracy", "mean_accuracy", "miou", "fw_iou", "per_class"):
        assert key in m
    assert len(m["per_class"]) == 11 and m["images"] == 8
    assert 0.4 < m["miou"] < 0.8 and m["per_class"]["Road"] > 0.7


def test_bad_class_map_file(tmp_path: Path, segstream_home: Path, shared_dir: Path,
                            capsys) -> None:
    bad = tmp_path / "map.yaml"
    bad.write_text("classes: [a, b]\nmap: {0: 5}\n")
    with pytest.raises(ClassMapError, match="not a dataset class id"):
        load_class_map(bad)
    camvid = shared_dir / "data/camvid_segnet_test"
    code = main(["evaluate", "--images", str(camvid / "images"), "--masks", str(camvid / "masks"),
                 "--class-map", str(bad), "--limit", "1", "-q"])
    assert code == 2 and "not a dataset class id" in capsys.readouterr().err


def test_unpaired_folders_give_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "i" / "a.png").write_bytes(b"x")
    code = main(["evaluate", "--images", str(tmp_path / "i"), "--masks", str(tmp_path / "m")])
    assert code == 2 and "no image/mask pairs" in capsys.readouterr().err
