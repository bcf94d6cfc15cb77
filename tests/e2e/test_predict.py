"""`segstream predict` on the real Coral bird sample with the real mnv2-voc weights."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models.labels import voc_palette
from segstream.models.runtime import Segmenter, load_segmenter
from segstream.models.tools.data import encode_palette_png
from segstream.models.tools.predict import predict_images
from segstream.stream.cli import main

BIRD = 3  # Pascal VOC "bird"


def decode_palette_png(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """An independent minimal reader: (class ids [H, W], palette [n, 3]) of an 8-bit indexed,
    filter-0 PNG, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    assert [*chunks][:1] == [b"IHDR"] and [*chunks][-1:] == [b"IEND"]
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, ctype, interlace) == (8, 3, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].copy(), np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)


def run_cli(argv: list[str]) -> int:
    return main(["predict", *argv])


@pytest.fixture(scope="module")
def segmenter(segstream_home: Path) -> Segmenter:
    seg = load_segmenter("mnv2-voc", "tflite", batch_sizes=(1, 2, 4))
    yield seg
    seg.close()


@pytest.fixture(scope="module")
def bird(shared_dir: Path) -> tuple[Path, np.ndarray]:
    d = shared_dir / "data" / "coral_segmentation_samples"
    gt = cv2.imread(str(d / "bird_segmentation_mask.bmp"), cv2.IMREAD_GRAYSCALE)
    return d / "bird_segmentation.bmp", gt


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (513, 513), (360, 480)])
def test_palette_png_round_trips_through_two_decoders(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, shape, dtype=np.uint8)
    pal = voc_palette()
    data = encode_palette_png(mask, pal)
    ids, got_pal = decode_palette_png(data)
    np.testing.assert_array_equal(ids, mask)
    np.testing.assert_array_equal(got_pal, pal)
    # libpng (via cv2) expands palette PNGs to colours: they must be the palette's.
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(bgr[..., ::-1], pal[mask])


def test_bird_mask_matches_coral_reference(segmenter: Segmenter, bird, tmp_path: Path) -> None:
    path, gt = bird
    [res] = predict_images([path], segmenter, tmp_path)
    assert res.ok, res.error
    assert res.mask_path == tmp_path / "bird_segmentation_mask.png"
    ids, pal = decode_palette_png(res.mask_path.read_bytes())
    assert ids.shape == gt.shape
    np.testing.assert_array_equal(pal, segmenter.palette)
    pred, ref = ids == BIRD, gt > 0
    iou = (pred & ref).sum() / (pred | ref).sum()
    assert iou >= 0.9, iou
    assert set(np.unique(ids)) <= {0, BIRD}
    assert list(res.fractions)[:2] == ["background", "bird"]
    assert res.fractions["bird"] == pytest.approx(pred.mean())
    assert res.summary().startswith(f"{path}: background ")
    overlay = cv2.imread(str(res.overlay_path))
    assert overlay.shape == (*gt.shape, 3)


def test_mask_and_overlay_have_the_input_size(segmenter: Segmenter, bird, tmp_path: Path) -> None:
    path, gt = bird
    small = cv2.resize(cv2.imread(str(path)), (400, 300), interpolation=cv2.INTER_AREA)
    jpg = tmp_path / "in" / "bird.jpg"
    jpg.parent.mkdir()
    cv2.imwrite(str(jpg), small)
    [res] = predict_images([jpg], segmenter, tmp_path / "out")
    ids, _ = decode_palette_png(res.mask_path.read_bytes())
    assert ids.shape == (300, 400) and res.size == (300, 400)
    assert cv2.imread(str(res.overlay_path)).shape == (300, 400, 3)
    ref = cv2.resize(gt, (400, 300), interpolation=cv2.INTER_NEAREST) > 0
    pred = ids == BIRD
    assert (pred & ref).sum() / (pred | ref).sum() >= 0.85


def test_bad_files_are_named_and_the_rest_written(
    segstream_home: Path,
    bird,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = bird
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    missing = tmp_path / "missing.jpg"
    other = tmp_path / "sub" / "bird_segmentation.bmp"  # same stem: must not overwrite
    other.parent.mkdir()
    other.write_bytes(path.read_bytes())
    out = tmp_path / "out"
    rc = run_cli(
        [
            str(path),
            str(corrupt),
            str(missing),
            str(other),
            "--out",
            str(out),
            "--backend",
            "tflite",
        ]
    )
    cap = capsys.readouterr()
    assert rc != 0
    assert "corrupt.png: not a readable image" in cap.err
    assert "missing.jpg: cannot read" in cap.err
    assert "2 of 4 input(s) failed" in cap.err
    assert f"{path}: background" in cap.out
    assert sorted(p.name for p in out.iterdir()) == [
        "bird_segmentation_2_mask.png",
        "bird_segmentation_2_overlay.jpg",
        "bird_segmentation_mask.png",
        "bird_segmentation_overlay.jpg",
    ]


def test_all_good_exits_zero(
    segstream_home: Path, bird, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = bird
    assert run_cli([str(path), "--out", str(tmp_path), "--backend", "tflite"]) == 0
    assert "bird" in capsys.readouterr().out


def test_video_masks_every_nth_frame_inferred_the_others_carried(
    segmenter: Segmenter, shared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`predict vtest.avi --every 3` on its first 7 frames: one mask per frame at the frame's
    size; frames 0, 3, 6 are the model's; with --carry none frames 1, 2 repeat frame 0's,
    with flow (the default) they are frame 0's moved along with the walking people."""
    import av

    from segstream.models.runtime import prepare
    from segstream.models.tools.data import resize_labels

    video = shared_dir / "data" / "video" / "vtest.avi"
    with av.open(str(video)) as c:
        decoded = c.decode(video=0)
        frames = [next(decoded).to_ndarray(format="bgr24") for _ in range(7)]
    fresh = [
        resize_labels(segmenter.segment(prepare(f, segmenter.input_size, bgr=True)[None])[0],
                      f.shape[:2])
        for f in frames
    ]  # fmt: skip
    masks = {}
    for carry in ("none", "flow"):
        out = tmp_path / carry
        argv = [str(video), "--out", str(out), "--every", "3", "--max-frames", "7"]
        assert run_cli([*argv, "--carry", carry, "--backend", "tflite"]) == 0
        assert f"{video}: 7 frame masks, 3 inferred" in capsys.readouterr().out
        names = sorted(p.name for p in out.iterdir())
        assert names == [f"vtest_{i:06d}_mask.png" for i in range(7)]
        masks[carry] = [decode_palette_png((out / n).read_bytes())[0] for n in names]
        assert masks[carry][0].shape == (576, 768)
        for i in (0, 3, 6):
            np.testing.assert_array_equal(masks[carry][i], fresh[i])
    for i in (1, 2):
        np.testing.assert_array_equal(masks["none"][i], fresh[0])
        carried = masks["flow"][i]
        moved = np.count_nonzero(carried != fresh[0])
        assert moved > 50, moved  # the people moved, so did their mask
        assert set(np.unique(carried)) <= set(np.unique(fresh[0]))


def test_video_bad_every_and_unreadable_video(
    segstream_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    assert run_cli([str(bad), "--out", str(tmp_path / "o"), "--every", "0"]) == 2
    assert "--every must be >= 1" in capsys.readouterr().err
    assert run_cli([str(bad), "--out", str(tmp_path / "o"), "--backend", "tflite"]) == 1
    err = capsys.readouterr().err
    assert "broken.mp4: cannot read" in err and "1 of 1 input(s) failed" in err
