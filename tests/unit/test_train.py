"""`segstream train`: fine-tuning on real CamVid pairs (TF and JAX), the output files, bad input:
the parts that need no model and no peers (the rest: tests/e2e/test_train.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models.labels import voc_palette
from segstream.models.tools import train
from segstream.models.tools.data import encode_palette_png
from segstream.models.tools.train import DatasetError

CAMVID_CLASSES, CAMVID_VOID, CAMVID_ROAD = 11, 11, 3


def _camvid_subset(shared_dir: Path, dest: Path, n: int) -> tuple[Path, Path]:
    """images/ + masks/ folders of symlinks to n CamVid pairs spread over the test split."""
    src = shared_dir / "data" / "camvid_segnet_test"
    stems = (src / "test.txt").read_text().split()
    images, masks = dest / "images", dest / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for stem in stems[:: len(stems) // n][:n]:
        (images / f"{stem}.png").symlink_to(src / "images" / f"{stem}.png")
        (masks / f"{stem}.png").symlink_to(src / "masks" / f"{stem}.png")
    return images, masks


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="segstream")
    train.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args.func(args)


def test_confusion_and_miou() -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 9, 9]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = train.confusion_matrix(gt, pred, 3, ignore=9)
    assert conf.sum() == 6  # the two void pixels are out
    np.testing.assert_array_equal(conf[:, :3], [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert not conf[:, 3].any()  # the "unmapped" column: a trained model never predicts it
    iou = train.class_iou(conf)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2])
    assert train.mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    only0 = train.confusion_matrix(np.zeros(4), np.zeros(4), 3, ignore=255)
    assert train.mean_iou(only0) == 1.0  # absent classes do not count


def test_augment_keeps_pairs_aligned() -> None:
    """Random scale/crop/flip move image and mask together; padding is ignore-labelled."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 200  # right half bright
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 1
    rng = np.random.default_rng(1)
    flips = 0
    for _ in range(20):
        a, m = train.augment_pair(img, mask, 33, rng, (0.5, 1.5), ignore_id=255)
        assert a.shape == (33, 33, 3) and m.shape == (33, 33)
        assert set(np.unique(m)) <= {0, 1, 255}
        real = m != 255  # bilinear blurs the image edge by a pixel; the mask stays sharp
        assert ((a[..., 0] > 100) == (m == 1))[real].mean() > 0.9
        assert (a[..., 0][~real] == train.PAD_PIXEL).all()
        flips += int((m[:, 0] == 1).any())
    assert 0 < flips < 20


def test_palette_masks_train_like_their_grey_originals(shared_dir: Path, tmp_path: Path) -> None:
    """Palette PNG masks (index = class id, VOC-style colours for viewers) made from real
    CamVid masks give the same class counts and label batches as the grey originals."""
    images, grey_masks = _camvid_subset(shared_dir, tmp_path / "grey", 3)
    pal_masks = tmp_path / "palette"
    pal_masks.mkdir()
    for m in sorted(grey_masks.iterdir()):
        ids = cv2.imread(str(m), cv2.IMREAD_UNCHANGED)
        (pal_masks / m.name).write_bytes(encode_palette_png(ids, voc_palette()))
    grey = train.pair_files(images, grey_masks)
    pal = train.pair_files(images, pal_masks)
    np.testing.assert_array_equal(
        train.check_pairs(pal, CAMVID_CLASSES, CAMVID_VOID),
        train.check_pairs(grey, CAMVID_CLASSES, CAMVID_VOID),
    )
    _, y_pal = train.make_dataset(pal, 3, 65, augment=False, ignore_id=CAMVID_VOID)[0]
    _, y_grey = train.make_dataset(grey, 3, 65, augment=False, ignore_id=CAMVID_VOID)[0]
    assert len(np.unique(y_grey)) > 5
    np.testing.assert_array_equal(y_pal, y_grey)


def _pairs(
    root: Path,
    masks: dict[str, np.ndarray],
    images: list[str] | None = None,
    size: tuple[int, int] = (24, 32),
) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in images if images is not None else list(masks):
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), np.full((*size, 3), 90, np.uint8))
    for stem, m in masks.items():
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), m)
    return root / "images", root / "masks"


def _ok_mask(v: int = 1) -> np.ndarray:
    m = np.zeros((24, 32), np.uint8)
    m[:, 16:] = v
    return m


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, masks = _pairs(tmp_path / "d", {"a": _ok_mask(), "b": _ok_mask(2)})
    existing = tmp_path / "old.weights.h5"
    existing.write_bytes(b"keep me")
    cases = [
        (["--num-classes", "3", "--ignore", "2"], r"--ignore 2 is a real class id"),
        (["--class-names", "x,y", "--num-classes", "3"], r"--num-classes 3 but 2"),
        (["--model", "nope"], r"unknown model 'nope'"),
        (["--num-classes", "3", "--val-split", "1.5"], r"--val-split must be in \[0, 1\)"),
        (["--num-classes", "3", "--out", str(existing)], r"already exists; pass --overwrite"),
        (["--num-classes", "3", "--out", str(tmp_path / "x.h5")], r"\*\.weights\.h5"),
        (["--num-classes", "3", "--out", str(existing / "sub")], r"cannot write to"),
        (["--epochs", "0"], r"--epochs must be >= 1"),
    ]
    for extra, pattern in cases:
        rc = _cli(["--images", str(images), "--masks", str(masks), *extra])
        err = capsys.readouterr().err
        assert rc == 1, (extra, err)
        assert re.search(pattern, err), (extra, err)
    assert existing.read_bytes() == b"keep me"


def test_class_names_from_file_or_list(tmp_path: Path) -> None:
    f = tmp_path / "labels.txt"
    f.write_text("road\n\nsky\ncar\n")
    assert train.parse_class_names(str(f)) == ["road", "sky", "car"]
    assert train.parse_class_names("a, b ,c") == ["a", "b", "c"]
    with pytest.raises(DatasetError, match="unique"):
        train.parse_class_names("a,a")
    with pytest.raises(DatasetError, match="no such file"):
        train.parse_class_names(str(tmp_path / "missing.txt"))
