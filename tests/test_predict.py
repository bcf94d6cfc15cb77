"""`segstream predict` on real images with the official weights."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

from models.labels import voc_palette
from stream.cli import main
from stream.predict import encode_palette_png


def decode_palette_png(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Independent reader for 8-bit indexed PNGs with filter-0 rows: (indices, palette)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    idat = b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IDAT":
            idat += body
        chunks[kind] = body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, ctype) == (8, 3)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:], np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)


def test_palette_png_round_trips_and_opens_in_opencv() -> None:
    mask = np.random.default_rng(0).integers(0, 21, (37, 53), dtype=np.uint8)
    png = encode_palette_png(mask, voc_palette())
    idx, pal = decode_palette_png(png)
    assert (idx == mask).all() and (pal[:21] == voc_palette()[:21]).all()
    colour = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert (colour[..., ::-1] == voc_palette()[mask]).all()


def test_predict_bird(tmp_path: Path, segstream_home: Path, shared_dir: Path, capsys) -> None:
    samples = shared_dir / "data/coral_segmentation_samples"
    code = main(["predict", str(samples / "bird_segmentation.bmp"), "--out", str(tmp_path),
                 "--backend", "tflite"])
    assert code == 0
    idx, _ = decode_palette_png((tmp_path / "bird_segmentation_mask.png").read_bytes())
    gt = cv2.imread(str(samples / "bird_segmentation_mask.bmp"), cv2.IMREAD_GRAYSCALE)
    assert idx.shape == gt.shape
    pred, truth = idx == 3, gt > 0
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou >= 0.9, iou
    overlay = cv2.imread(str(tmp_path / "bird_segmentation_overlay.jpg"))
    assert overlay.shape[:2] == gt.shape
    assert "bird" in capsys.readouterr().out


def test_bad_files_are_reported_and_the_rest_processed(
    tmp_path: Path, segstream_home: Path, shared_dir: Path, capsys
) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    good = shared_dir / "data/coral_segmentation_samples/cityscapes_segmentation.bmp"
    out = tmp_path / "out"
    code = main(["predict", str(tmp_path / "missing.png"), str(corrupt), str(good),
                 "--out", str(out), "--backend", "tflite"])
    assert code != 0
    err = capsys.readouterr().err
    assert "missing.png" in err and "corrupt.jpg" in err
    assert (out / "cityscapes_segmentation_mask.png").is_file()
    assert (out / "cityscapes_segmentation_overlay.jpg").is_file()
    assert not (out / "corrupt_mask.png").exists()
