"""The one image/mask contract of the offline tools (models/tools/data.py) and the one set of
metrics (models/tools/metrics.py): every tool reads, pairs and scores the same way."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models.class_maps import identity_map
from segstream.models.labels import voc_palette
from segstream.models.registry import get_spec
from segstream.models.runtime import Segmenter
from segstream.models.tools import data, evaluate, metrics, predict, train

RED_RGB = [255, 0, 0]


class RecordingSegmenter(Segmenter):
    """Answers class 0 everywhere and keeps every batch it was given."""

    backend = "stub"

    def __init__(self, size: int = 16) -> None:
        super().__init__(get_spec("mnv2-voc"), (size, size), (1, 2))
        self.seen: list[np.ndarray] = []

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.seen.append(batch.copy())
        return np.zeros(batch.shape[:3], np.uint8)


@pytest.fixture
def red_pair(tmp_path: Path) -> tuple[Path, Path]:
    """images/red.png (pure red) + masks/red.png (all class 1), written through OpenCV."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = tmp_path / "images" / "red.png"
    cv2.imwrite(str(img), np.full((24, 32, 3), (0, 0, 255), np.uint8))  # cv2 writes BGR
    mask = tmp_path / "masks" / "red.png"
    cv2.imwrite(str(mask), np.ones((24, 32), np.uint8))
    return img, mask


# --- images: one colour order ---


def test_read_image_is_rgb_in_every_tool(red_pair: tuple[Path, Path]) -> None:
    """Each tool's reader returns RGB (pure red reads as [255, 0, 0], never BGR's blue)."""
    img, mask = red_pair
    read = {
        "data.read_image": data.read_image(img),
        "data.read_pair": data.read_pair(img, mask)[0],
        "predict": predict.read_image(img),
        "evaluate": evaluate.read_pair(img, mask)[0],
        "train": train.read_image(img),
        "train (checks)": train.read_pair(img, mask)[0],
    }
    for who, got in read.items():
        assert got.shape == (24, 32, 3) and got.dtype == np.uint8, who
        assert got[0, 0].tolist() == RED_RGB, who


def test_read_image_gives_three_channels_from_grey_and_rgba(tmp_path: Path) -> None:
    grey, rgba = tmp_path / "grey.png", tmp_path / "rgba.png"
    cv2.imwrite(str(grey), np.full((6, 8), 77, np.uint8))
    cv2.imwrite(str(rgba), np.full((6, 8, 4), (0, 0, 255, 128), np.uint8))  # BGRA on disk
    assert data.read_image(grey).shape == (6, 8, 3)
    assert data.read_image(grey)[0, 0].tolist() == [77, 77, 77]
    assert data.read_image(rgba).shape == (6, 8, 3)
    assert data.read_image(rgba)[0, 0].tolist() == RED_RGB


def test_every_tool_feeds_the_model_rgb(red_pair: tuple[Path, Path], tmp_path: Path) -> None:
    img, mask = red_pair
    seg = RecordingSegmenter()
    [res] = predict.predict_images([img], seg, tmp_path / "out", legend=False)
    assert res.ok, res.error
    pairs = data.pair_files(img.parent, mask.parent).pairs
    ev = evaluate.evaluate_pairs(pairs, seg, identity_map(seg.labels, "voc"), ignore=255)
    assert ev.images == 1 and not ev.errors
    assert len(seg.seen) == 2
    for batch in seg.seen:  # predict's, then evaluate's
        assert batch[0, 0, 0].tolist() == RED_RGB
    # the overlay keeps the image's colours where nothing is coloured (class 0 = background)
    overlay = cv2.imread(str(res.overlay_path))
    assert overlay[12, 16].tolist() == pytest.approx([0, 0, 255], abs=8)  # BGR on disk
    x, y = train.make_dataset([(img, mask)], 1, 16, augment=False, ignore_id=255)[0]
    assert x[0, 0, 0].tolist() == RED_RGB and (y == 1).all()


def test_read_image_names_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(data.DataError, match=r"bad\.png: not a readable image"):
        data.read_image(tmp_path / "bad.png")
    with pytest.raises(data.DataError, match=r"missing\.jpg: cannot read"):
        data.read_image(tmp_path / "missing.jpg")


# --- masks: palette, grey 8/16-bit ---


def test_read_mask_formats(tmp_path: Path, shared_dir: Path) -> None:
    ids = np.arange(24, dtype=np.uint8).reshape(4, 6)
    (tmp_path / "pal.png").write_bytes(data.encode_palette_png(ids, voc_palette()))
    cv2.imwrite(str(tmp_path / "grey.png"), ids)
    cv2.imwrite(str(tmp_path / "grey.bmp"), ids)
    cv2.imwrite(str(tmp_path / "grey_rgb.png"), np.dstack([ids, ids, ids]))
    for name in ("pal.png", "grey.png", "grey.bmp", "grey_rgb.png"):
        got = data.read_mask(tmp_path / name)
        assert got.dtype == np.uint8, name
        np.testing.assert_array_equal(got, ids, err_msg=name)
    wide = ids.astype(np.uint16) * 1000  # 16-bit label PNG: ids kept as stored
    cv2.imwrite(str(tmp_path / "grey16.png"), wide)
    got = data.read_mask(tmp_path / "grey16.png")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, wide)
    cv2.imwrite(str(tmp_path / "colour.png"), np.dstack([ids, ids, ids + 1]))
    with pytest.raises(data.DataError, match=r"colour\.png: a colour image .*single-channel"):
        data.read_mask(tmp_path / "colour.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n...")
    with pytest.raises(data.DataError, match=r"broken\.png: not a readable image"):
        data.read_mask(tmp_path / "broken.png")
    camvid = data.read_mask(shared_dir / "data/camvid_segnet_test/masks/0001TP_008550.png")
    assert camvid.shape == (360, 480) and camvid.dtype == np.uint8 and camvid.max() == 11
    coral = shared_dir / "data" / "coral_segmentation_samples" / "bird_segmentation_mask.bmp"
    bird = data.read_mask(coral)  # 8-bit BMP with a grey colour table
    assert bird.shape == (513, 513) and set(np.unique(bird).tolist()) == {0, 1, 2, 3}


def test_palette_index_is_the_class_even_where_colours_repeat(tmp_path: Path) -> None:
    """Ids come from the palette indices, not from colours mapped back: a palette that gives
    two classes one colour still yields both ids."""
    ids = np.array([[0, 1, 2, 3]], np.uint8)
    pal = np.zeros((4, 3), np.uint8)
    pal[3] = (200, 0, 0)  # 0, 1 and 2 are all black
    (tmp_path / "m.png").write_bytes(data.encode_palette_png(ids, pal))
    np.testing.assert_array_equal(data.read_mask(tmp_path / "m.png"), ids)


# --- pairing by stem ---


def test_pairing_by_stem(tmp_path: Path) -> None:
    for sub, names in (
        ("i", ["a.png", "b.JPG", "c.png", "notes.txt", ".hidden.png", "e.png", "e.jpg"]),
        ("m", ["a.png", "b.png", "d.png", "c.jpg", ".hidden.png", "e.png"]),
    ):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).write_bytes(b"x")
    p = data.pair_files(tmp_path / "i", tmp_path / "m")
    assert [(x.stem, x.image.name, x.mask.name) for x in p.pairs] == [
        ("a", "a.png", "a.png"),
        ("b", "b.JPG", "b.png"),
        ("e", "e.jpg", "e.png"),
    ]
    assert p.images_without_mask == ["c"]  # c.jpg is no mask: lossy formats are not accepted
    assert p.masks_without_image == ["d"]
    assert len(p.problems) == 1 and "e.png" in p.problems[0]  # two images with stem "e"
    with pytest.raises(data.DataError, match=r"masks folder .*nope"):
        data.pair_files(tmp_path / "i", tmp_path / "nope")


def test_read_pair_checks_sizes(red_pair: tuple[Path, Path], tmp_path: Path) -> None:
    img, mask = red_pair
    image, ids = data.read_pair(img, mask)
    assert image.shape == (24, 32, 3) and ids.shape == (24, 32)
    cv2.imwrite(str(mask), np.ones((8, 16), np.uint8))
    with pytest.raises(
        data.DataError,
        match=r"red: image red\.png is 32x24 but mask red\.png "
        r"is 16x8",
    ):
        data.read_pair(img, mask)


# --- metrics: one confusion matrix, rows = ground truth ---

GT = np.array([[0, 0, 1, 1], [2, 2, 9, 9]])
PRED = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])


def test_train_and_evaluate_count_the_same_confusion_matrix() -> None:
    """Same arguments, same matrix: (gt, pred) in both tools, rows = ground truth."""
    for tool in (train, evaluate, metrics):
        cm = tool.confusion_matrix(GT, PRED, 3, 9)
        assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0]], tool.__name__
    cm = metrics.confusion_matrix(gt=GT, pred=PRED, num_classes=3, ignore=9)
    np.testing.assert_array_equal(cm.sum(axis=1), [2, 2, 2])  # gt pixels per class
    np.testing.assert_allclose(metrics.class_accuracy(cm), [1 / 2, 1, 1 / 2])  # recall


class _FixedLogits:
    """A 'model' whose predict_on_batch gives logits whose argmax is ``pred``."""

    def __init__(self, pred: np.ndarray, num_classes: int) -> None:
        self.logits = np.eye(num_classes, dtype=np.float32)[pred][None]

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return self.logits


def test_train_validation_scores_equal_evaluate_scores() -> None:
    """train's val mIoU / pixel acc / per-class IoU are evaluate's on the same pred and gt."""
    gt = np.array([[0, 0, 1, 1, 2], [2, 2, 9, 9, 1]])
    pred = np.array([[0, 1, 1, 1, 2], [2, 0, 2, 0, 0]])
    val = train.evaluate(_FixedLogits(pred, 3), [(np.zeros((1, 2, 5, 3)), gt[None])], 3, 9)
    s = evaluate.summarize(evaluate.confusion_matrix(gt, pred, 3, 9), ["a", "b", "c"])
    assert val["miou"] == pytest.approx(s["miou"])
    assert val["pixel_acc"] == pytest.approx(s["pixel_accuracy"])
    assert val["iou"] == [round(v, 4) for v in s["per_class"].values()]
