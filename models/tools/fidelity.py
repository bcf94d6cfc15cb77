"""How often the Keras port answers like the official .tflite file, image by image.

Image sets (each image a name and a BGR frame, read lazily):

- ``project_images(data_dir)``: every real image the project has: the frames of both clips
  (``video/vtest.avi``, ``video/solidWhiteRight.mp4``), the 233 CamVid test images and the
  Coral samples; ``stride`` takes every n-th clip frame / CamVid image (CI subsets).
- ``photo_images()``: photos unlike those (people, a cat, still lifes, close-ups, indoor
  scenes, scans, textures, the night sky) from the sample data that scikit-image and
  matplotlib ship, plus low-light ("night") renderings of four of them.

``measure`` runs both runtimes on a set and returns the per-image pixel agreement;
scripts/fidelity.py prints the table the README quotes, tests/test_fidelity.py checks the
targets on subsets in CI.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segstream.models.runtime import Segmenter, prepare

# scikit-image's bundled photographs (skimage/data); synthetic images are left out
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "camera.png",
    "moon.png",
    "coins.png",
    "clock_motion.png",
    "page.png",
    "text.png",
    "cell.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
NIGHT = ("astronaut.png", "coffee.png", "motorcycle_left.png", "grace_hopper.jpg")
CLIPS = ("vtest.avi", "solidWhiteRight.mp4")
CORAL = ("bird_segmentation.bmp", "cityscapes_segmentation.bmp")

Image = tuple[str, np.ndarray]  # (name, BGR uint8 frame)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{package} is not installed (pip install '.[test]'): its "
            f"sample photos are part of the fidelity set"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # grey photos come back as 3 channels
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return img


def night(img: np.ndarray, gain: float = 0.35, gamma: float = 2.2) -> np.ndarray:
    """A low-light rendering: darker, crushed shadows, a little sensor noise (seeded)."""
    x = (img.astype(np.float32) / 255.0) ** gamma * gain
    noise = np.random.default_rng(0).normal(0.0, 0.01, x.shape).astype(np.float32)
    return np.clip((x + noise) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def photo_images() -> list[Image]:
    """The photos unlike the project's frames (needs scikit-image and matplotlib)."""
    sk = _package_dir("skimage") / "data"
    mpl = _package_dir("matplotlib") / "mpl-data" / "sample_data"
    out = [(f"skimage/{n}", _read(sk / n)) for n in SKIMAGE_PHOTOS]
    out += [(f"matplotlib/{n}", _read(mpl / n)) for n in MATPLOTLIB_PHOTOS]
    by_file = {name.split("/", 1)[1]: img for name, img in out}
    out += [(f"night/{n}", night(by_file[n])) for n in NIGHT]
    return out


def clip_frames(path: Path, stride: int = 1) -> Iterator[Image]:
    """Every ``stride``-th frame of a clip, named "<clip>#<index>"."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open clip {path}")
    try:
        i = 0
        while True:
            ok = cap.grab()
            if not ok:
                break
            if i % stride == 0:
                ok, frame = cap.retrieve()
                if not ok:
                    raise OSError(f"cannot decode frame {i} of {path}")
                yield f"{path.name}#{i}", frame
            i += 1
    finally:
        cap.release()


def project_images(data_dir: Path, stride: int = 1) -> Iterator[Image]:
    """The project's real images (shared/data): clips, CamVid test set, Coral samples."""
    data_dir = Path(data_dir)
    for clip in CLIPS:
        yield from clip_frames(data_dir / "video" / clip, stride)
    camvid = data_dir / "camvid_segnet_test"
    stems = (camvid / "test.txt").read_text().split()
    for stem in stems[::stride]:
        yield f"camvid/{stem}", _read(camvid / "images" / f"{stem}.png")
    for name in CORAL:
        yield f"coral/{name}", _read(data_dir / "coral_segmentation_samples" / name)


@dataclass
class Agreement:
    """Per-image pixel agreement of one runtime with a reference runtime."""

    names: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, names: Iterable[str], out: np.ndarray, ref: np.ndarray) -> None:
        if out.shape != ref.shape:
            raise ValueError(f"outputs differ in shape: {out.shape} vs {ref.shape}")
        self.names += list(names)
        self.values += (out == ref).mean(axis=(1, 2)).astype(float).tolist()

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def worst(self) -> tuple[float, str]:
        i = int(np.argmin(self.values))
        return float(self.values[i]), self.names[i]

    def summary(self) -> dict[str, Any]:
        worst, name = self.worst
        return {
            "images": len(self.values),
            "mean": round(self.mean, 6),
            "worst": round(worst, 6),
            "worst_image": name,
        }


def _chunks(images: Iterable[Image], n: int) -> Iterator[list[Image]]:
    chunk: list[Image] = []
    for item in images:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def measure(seg: Segmenter, ref: Segmenter, images: Iterable[Image], chunk: int = 8) -> Agreement:
    """Agreement of ``seg`` with ``ref`` (same input size) over ``images``, in chunks."""
    if seg.input_size != ref.input_size:
        raise ValueError(f"input sizes differ: {seg.input_size} vs {ref.input_size}")
    agreement = Agreement()
    for part in _chunks(images, chunk):
        batch = np.stack([prepare(img, seg.input_size, bgr=True) for _, img in part])
        agreement.add([name for name, _ in part], seg.segment(batch), ref.segment(batch))
    return agreement
