"""`segstream evaluate`: metric arithmetic on known matrices, class maps, bad input, and a real
CamVid subset with the real edgetpu-cityscapes weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models.class_maps import BUILTIN, ClassMapError, load_class_map
from segstream.models.labels import CAMVID_LABELS
from segstream.models.runtime import load_segmenter
from segstream.models.tools.data import pair_files, read_mask
from segstream.models.tools.evaluate import evaluate_pairs
from segstream.stream.cli import main

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


# --- class maps ---


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
