"""The Keras port reproduces the official TFLite files on real frames (TF and JAX backends)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.runtime import load_segmenter, prepare

REPO = Path(__file__).resolve().parents[1]


def _video_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    try:
        for i in indices:
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, frame = cap.read()
            assert ok, f"cannot read frame {i} of {path}"
            out.append(frame)
    finally:
        cap.release()
    return out


@pytest.fixture(scope="module")
def raw_frames(shared_dir: Path) -> list[np.ndarray]:
    """18 BGR frames: 4 per video, 8 CamVid images, the 2 Coral samples."""
    data = shared_dir / "data"
    frames = _video_frames(data / "video" / "vtest.avi", [0, 200, 400, 600])
    frames += _video_frames(data / "video" / "solidWhiteRight.mp4", [0, 70, 140, 210])
    stems = (data / "camvid_segnet_test" / "test.txt").read_text().split()
    for stem in stems[:: len(stems) // 8][:8]:
        frames.append(cv2.imread(str(data / "camvid_segnet_test" / "images" / f"{stem}.png")))
    for name in ("bird_segmentation.bmp", "cityscapes_segmentation.bmp"):
        frames.append(cv2.imread(str(data / "coral_segmentation_samples" / name)))
    assert all(f is not None for f in frames)
    return frames


def _batch(raw: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack([prepare(f, size, bgr=True) for f in raw])


@pytest.fixture(scope="module")
def frames513(raw_frames: list[np.ndarray]) -> np.ndarray:
    return _batch(raw_frames, 513)


def _agreement(name: str, frames: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    with load_segmenter(name, "tflite") as ref_seg:
        ref = ref_seg.segment(frames)
    with load_segmenter(name, "keras", batch_sizes=(1, 2)) as seg:
        out = seg.segment(frames)
    return float((out == ref).mean()), out, ref


def test_keras_matches_quant_x1(segstream_home: Path, frames513: np.ndarray) -> None:
    agree, out, ref = _agreement("mnv2-voc", frames513)
    per_frame = (out == ref).mean(axis=(1, 2))
    print(f"mnv2-voc keras vs tflite: {agree:.5f} (worst frame {per_frame.min():.5f})")
    assert agree >= 0.995
    assert per_frame.min() >= 0.98
    assert len(np.unique(ref)) > 3  # the frames exercise several classes, not just background


def test_keras_matches_float_dm05_513(segstream_home: Path, frames513: np.ndarray) -> None:
    agree, _, _ = _agreement("mnv2-voc-dm05-float", frames513)
    print(f"mnv2-voc-dm05-float keras vs tflite: {agree:.6f}")
    assert agree >= 0.999


def test_keras_matches_float_257(segstream_home: Path, raw_frames: list[np.ndarray]) -> None:
    agree, _, _ = _agreement("mnv2-voc-257", _batch(raw_frames, 257))
    print(f"mnv2-voc-257 keras vs tflite: {agree:.6f}")
    assert agree >= 0.999


def _bird(shared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    d = shared_dir / "data" / "coral_segmentation_samples"
    img = prepare(cv2.imread(str(d / "bird_segmentation.bmp")), 513, bgr=True)
    mask = cv2.imread(str(d / "bird_segmentation_mask.bmp"), cv2.IMREAD_GRAYSCALE)
    return img[None], mask


@pytest.mark.parametrize("backend", ["tflite", "keras"])
def test_bird_iou(segstream_home: Path, shared_dir: Path, backend: str) -> None:
    img, mask = _bird(shared_dir)
    with load_segmenter("mnv2-voc", backend, batch_sizes=(1,)) as seg:
        pred = seg.segment(img)[0]
    bird = pred == 3
    iou = (bird & (mask > 0)).sum() / (bird | (mask > 0)).sum()
    print(f"bird IoU ({backend}): {iou:.4f}")
    assert iou >= 0.9


_JAX_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np

    # A GPU image has JAX but no TensorFlow: make both TF and the TFLite runtime absent, so
    # the model must come from the cached weights and Keras must pick JAX by itself.
    sys.modules["tensorflow"] = None
    sys.modules["ai_edge_litert"] = None
    from models.runtime import load_segmenter

    frames = np.load(sys.argv[1])
    with load_segmenter("mnv2-voc", "keras", batch_sizes=(4,)) as seg:
        assert seg.keras_backend == "jax", seg.keras_backend
        np.save(sys.argv[2], seg.segment(frames))
""")



def test_jax_backend_from_cached_weights(segstream_home: Path, frames513: np.ndarray,
                                         tmp_path: Path) -> None:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install '.[jax]') - JAX backend not checked")
    frames = frames513[::2]  # JAX on CPU is slow (~0.5 s/frame); 9 frames are enough
    with load_segmenter("mnv2-voc", "tflite") as ref_seg:
        ref = ref_seg.segment(frames)
    # make sure the cache exists (the other tests normally created it already)
    from models.tflite_import import load_keras_model, weights_path

    load_keras_model("mnv2-voc")
    assert weights_path("mnv2-voc").is_file()
    np.save(tmp_path / "frames.npy", frames)
    env = {**os.environ, "SEGSTREAM_HOME": str(segstream_home), "PYTHONPATH": str(REPO),
           "JAX_PLATFORMS": "cpu"}
    env.pop("KERAS_BACKEND", None)
    res = subprocess.run(
        [sys.executable, "-c", _JAX_SCRIPT, str(tmp_path / "frames.npy"),
         str(tmp_path / "out.npy")], env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = np.load(tmp_path / "out.npy")
    agree = float((out == ref).mean())
    print(f"mnv2-voc keras[jax] vs tflite: {agree:.5f}")
    assert out.shape == ref.shape and out.dtype == np.uint8
    assert agree >= 0.995


def test_keras_matches_quant_x1_at_257(segstream_home: Path,
                                       raw_frames: list[np.ndarray]) -> None:
    """The 513 file run at 257 (graph sizes rewritten) and the port built at 257 agree."""
    frames = _batch(raw_frames, 257)
    with load_segmenter("mnv2-voc", "tflite", input_size=257) as ref_seg:
        ref = ref_seg.segment(frames)
    with load_segmenter("mnv2-voc", "keras", batch_sizes=(2,), input_size=257) as seg:
        out = seg.segment(frames)
    agree = float((out == ref).mean())
    print(f"mnv2-voc@257 keras vs tflite: {agree:.5f}")
    assert agree >= 0.995
