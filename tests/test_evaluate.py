"""`segstream evaluate`: metric arithmetic on known matrices, class maps, bad input, and a real
CamVid subset with the real edgetpu-cityscapes weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models.class_maps import BUILTIN, ClassMapError, identity_map, load_class_map
from segstream.models.labels import CAMVID_LABELS, CITYSCAPES_LABELS, VOC_LABELS
from segstream.models.runtime import load_segmenter
from segstream.models.tools.data import pair_files, read_mask
from segstream.models.tools.evaluate import evaluate_pairs, summarize
from segstream.models.tools.metrics import (
    LabelError,
    class_accuracy,
    class_iou,
    confusion_matrix,
    fw_iou,
    pixel_accuracy,
)
from segstream.stream.cli import main

# rows: gt a, b, c, d; columns: pred a, b, c, d, unmapped.
# c is never in gt but predicted once; d is absent from both (excluded from every mean).
CM = np.array([
    [5, 1, 0, 0, 2],
    [0, 3, 1, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
])  # fmt: skip
CAMVID11 = CAMVID_LABELS[:11]


@pytest.fixture(scope="module")
def camvid(shared_dir: Path) -> Path:
    return shared_dir / "data" / "camvid_segnet_test"


def copy_pairs(camvid: Path, dest: Path, n: int) -> list[str]:
    """The first ``n`` CamVid pairs copied into dest/images + dest/masks; their stems."""
    stems = sorted(p.stem for p in (camvid / "masks").glob("*.png"))[:n]
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for s in stems:
            shutil.copy(camvid / sub / f"{s}.png", dest / sub / f"{s}.png")
    return stems


# --- metrics ---


def evaluate_cli(images: Path, masks: Path, *extra: str) -> int:
    """`segstream evaluate` on two folders with the tflite backend, plus `extra` flags."""
    return main(
        ["evaluate", "--images", str(images), "--masks", str(masks), "--backend", "tflite", *extra]
    )


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


# --- class maps ---


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


@pytest.mark.parametrize(("text", "message"), [
    ("classes: [a, b]\nmap: {0: 5}\n", "not a dataset class id"),
    ("classes: [a, b]\nmap: {x: 1}\n", "not a model class id"),
    ("classes: [a, a]\nmap: {0: 1}\n", "duplicate"),
    ("map: {0: 1}\n", "'classes' must be a list"),
    ("classes: [a]\n", "'map' must be a non-empty mapping"),
    ("classes: [a]\nmap: {0: 0}\nignroe: 3\n", "unknown key"),
    ("classes: [a]\nmap: {0: 0}\nignore: 300\n", "'ignore' must be"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("classes: [a\n", "cannot read it as YAML"),
])  # fmt: skip
def test_bad_class_map_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "map.yaml"
    f.write_text(text)
    with pytest.raises(ClassMapError, match=message) as e:
        load_class_map(f)
    assert str(f) in str(e.value)


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


# --- pairing (mask formats and pairing rules: tests/test_data.py) ---


def test_unpaired_folders_give_a_clear_error(
    tmp_path: Path, segstream_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "i" / "a.png").write_bytes(b"x")
    code = evaluate_cli(tmp_path / "i", tmp_path / "m")
    err = capsys.readouterr().err
    assert code == 2 and "no image/mask pairs: 1 images" in err


# --- real model on real CamVid ---


def test_camvid_subset_cli_json(
    tmp_path: Path, segstream_home: Path, camvid: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.json"
    code = evaluate_cli(
        camvid / "images",
        camvid / "masks",
        "--model",
        "edgetpu-cityscapes",
        "--class-map",
        "cityscapes-to-camvid",
        "--limit",
        "10",
        "--json",
        str(out),
        "-q",
    )
    assert code == 0
    m = json.loads(out.read_text())
    for key in (
        "pixel_accuracy",
        "mean_accuracy",
        "miou",
        "fw_iou",
        "per_class",
        "model",
        "images",
        "ignore",
        "class_map",
        "confusion_matrix",
    ):
        assert key in m, key
    assert (m["model"], m["images"], m["ignore"]) == ("edgetpu-cityscapes", 10, 11)
    assert list(m["per_class"]) == CAMVID11
    # The first 10 pairs by stem (the README's 0.554 is over all 233 images): what the
    # real computation gives them, to within resize rounding.
    assert m["miou"] == pytest.approx(0.484, abs=0.005)
    assert m["pixel_accuracy"] == pytest.approx(0.816, abs=0.005)
    assert m["per_class"]["Road"] == pytest.approx(0.878, abs=0.005)
    assert m["per_class"]["Car"] == pytest.approx(0.748, abs=0.005)
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (11, 12) and cm.sum() == m["pixels"]
    assert cm[:, 11].sum() == 0  # every Cityscapes class maps somewhere
    table = capsys.readouterr().out
    assert "Road" in table and "mIoU" in table


def test_voc_model_unmapped_classes_count_as_errors(
    tmp_path: Path, segstream_home: Path, camvid: Path
) -> None:
    copy_pairs(camvid, tmp_path, 4)
    pairs = pair_files(tmp_path / "images", tmp_path / "masks").pairs
    with load_segmenter("mnv2-voc-fast", "tflite", batch_sizes=(1, 4)) as seg:
        ev = evaluate_pairs(pairs, seg, BUILTIN["voc-to-camvid"], ignore=11)
    assert ev.images == 4 and not ev.errors
    s = ev.summary()
    assert s["unmapped_fraction"] > 0.8  # road, sky, buildings... are VOC background
    assert s["per_class"]["Road"] == 0.0 and s["per_class"]["Car"] > 0.2
    assert s["mapped_classes"] == ["Car", "Pedestrian", "Bicyclist"]
    gt = sum(int((read_mask(p.mask) != 11).sum()) for p in pairs)
    assert s["pixels"] == gt  # void skipped, every other pixel counted once


def test_bad_pairs_are_named_and_the_rest_evaluated(
    tmp_path: Path,
    segstream_home: Path,
    camvid: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = copy_pairs(camvid, tmp_path, 3)
    masks = tmp_path / "masks"
    small = cv2.imread(str(masks / f"{good[1]}.png"), cv2.IMREAD_UNCHANGED)[:100, :100]
    cv2.imwrite(str(masks / f"{good[1]}.png"), small)  # size mismatch
    (masks / f"{good[2]}.png").write_bytes(b"garbage")  # unreadable
    out = tmp_path / "m.json"
    code = evaluate_cli(
        tmp_path / "images",
        masks,
        "--model",
        "edgetpu-cityscapes",
        "--class-map",
        "cityscapes-to-camvid",
        "--json",
        str(out),
        "-q",
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"{good[1]}: image {good[1]}.png is 480x360 but mask {good[1]}.png is 100x100" in err
    assert f"{good[2]}.png: not a readable image" in err
    assert "2 of 3 pair(s) skipped" in err
    m = json.loads(out.read_text())
    assert m["images"] == 1 and len(m["skipped"]) == 2


def test_wrong_ignore_and_map_mismatch_are_explained(
    tmp_path: Path,
    segstream_home: Path,
    camvid: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy_pairs(camvid, tmp_path, 1)
    folders = (tmp_path / "images", tmp_path / "masks")
    assert (
        evaluate_cli(
            *folders,
            "-q",
            "--model",
            "mnv2-voc-fast",
            "--class-map",
            "voc-to-camvid",
            "--ignore",
            "255",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "label values [11]" in err and "not the ignore id 255" in err
    assert (
        evaluate_cli(
            *folders, "-q", "--model", "edgetpu-cityscapes", "--class-map", "voc-to-camvid"
        )
        == 2
    )
    assert "is for models with the classes background" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [a, b]\nmap: {0: 5}\n")
    assert evaluate_cli(*folders, "-q", "--class-map", str(bad)) == 2
    assert "not a dataset class id" in capsys.readouterr().err


def test_identity_map_for_masks_in_model_ids() -> None:
    m = identity_map(VOC_LABELS, "voc")
    assert m.lut()[:21].tolist() == list(range(21)) and m.lut()[21] == 21
    assert m.model_labels is None and m.ignore is None
