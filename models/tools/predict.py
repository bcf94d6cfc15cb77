"""``segstream predict``: segment still images; write a palette mask PNG and an overlay JPEG each.
Videos: the mask the service would show on every frame (``--every N``: inferred on frames 0, N,
2N, ..., carried to the others by the service's own motion code, segstream.stream.motion).

The mask PNG is 8-bit indexed (pixel = class id, PLTE = the model's colours) at the input
image's (the video frame's) size, so any viewer shows colours and any PNG reader gets the class
ids back.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from segstream.models.fetch import NotFetchedError
from segstream.models.registry import DEFAULT_MODEL, MODELS
from segstream.models.runtime import BACKENDS, Segmenter, load_segmenter, prepare
from segstream.models.tools.data import (
    IMAGE_EXTS,
    DataError,
    encode_palette_png,
    read_image,
    resize_labels,
)
from segstream.stream.motion import CARRY_MODES, new_carrier
from segstream.stream.render import Renderer, class_fractions

VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".ts", ".h264", ".264")

# --- core ---


@dataclass
class PredictResult:
    """One input's outcome: the written files and class fractions, or ``error``."""

    path: Path
    mask_path: Path | None = None
    overlay_path: Path | None = None
    size: tuple[int, int] | None = None  # (h, w) of the input
    fractions: dict[str, float] = field(default_factory=dict)  # present classes, largest first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        """E.g. ``bird.png: background 78.1%, bird 21.9%``."""
        parts = ", ".join(f"{name} {100 * f:.1f}%" for name, f in self.fractions.items())
        return f"{self.path}: {parts}"


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Directories are replaced by the image and video files directly inside them (sorted)."""
    out: list[Path] = []
    exts = IMAGE_EXTS + VIDEO_EXTS
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in exts))
        else:
            out.append(p)
    return out


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """``<stem>``, made unique (``<stem>_2`` ...) so two inputs never overwrite each other."""
    seen: set[str] = set()
    stems = []
    for p in paths:
        stem, k = p.stem, 1
        while stem in seen:
            k += 1
            stem = f"{p.stem}_{k}"
        seen.add(stem)
        stems.append(stem)
    return stems


def _write_outputs(
    res: PredictResult,
    image: np.ndarray,
    small: np.ndarray,
    stem: str,
    out_dir: Path,
    segmenter: Segmenter,
    renderer: Renderer,
) -> None:
    h, w = image.shape[:2]
    mask = resize_labels(small, (h, w))
    res.size = (h, w)
    fr = class_fractions(mask, segmenter.num_classes)
    res.fractions = {
        segmenter.labels[i]: float(fr[i]) for i in np.argsort(-fr, kind="stable") if fr[i] > 0
    }
    mask_path = out_dir / f"{stem}_mask.png"
    overlay_path = out_dir / f"{stem}_overlay.jpg"
    overlay = renderer.render(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), small)  # BGR in and out
    try:
        mask_path.write_bytes(encode_palette_png(mask, segmenter.palette))
        if not cv2.imwrite(str(overlay_path), overlay, [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError("cv2.imwrite failed")
    except OSError as e:
        res.error = f"{res.path}: cannot write output in {out_dir}: {e}"
        return
    res.mask_path, res.overlay_path = mask_path, overlay_path


def predict_images(
    paths: Sequence[Path | str],
    segmenter: Segmenter,
    out_dir: Path | str,
    *,
    alpha: float = 0.5,
    legend: bool = True,
) -> list[PredictResult]:
    """Segment ``paths`` in batches of the segmenter's largest batch size; one result per path,
    in order. A bad file yields a result with ``error`` set and the rest are still processed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(p) for p in paths]
    stems = _output_stems(files)
    results = [PredictResult(p) for p in files]
    renderer = Renderer(segmenter.labels, segmenter.palette, alpha=alpha, legend=legend)
    step = segmenter.batch_sizes[-1]
    for start in range(0, len(files), step):
        loaded: list[tuple[int, np.ndarray]] = []
        for i in range(start, min(start + step, len(files))):
            try:
                loaded.append((i, read_image(files[i])))
            except DataError as e:
                results[i].error = str(e)
        if not loaded:
            continue
        batch = np.empty((len(loaded), *segmenter.input_size, 3), dtype=np.uint8)
        for row, (_, img) in zip(batch, loaded, strict=True):
            prepare(img, segmenter.input_size, out=row)  # read_image gives RGB
        for (i, img), small in zip(loaded, segmenter.segment(batch), strict=True):
            _write_outputs(results[i], img, small, stems[i], out, segmenter, renderer)
    return results


@dataclass
class VideoResult:
    """One video's outcome: frames written (``DIR/<stem>_<frame:06d>_mask.png``), inferred."""

    path: Path
    frames: int = 0
    inferred: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        return f"{self.path}: {self.frames} frame masks, {self.inferred} inferred"


def predict_video(
    path: Path | str,
    segmenter: Segmenter,
    out_dir: Path | str,
    *,
    every: int = 1,
    carry: str = "flow",
    max_frames: int | None = None,
    stem: str | None = None,
) -> VideoResult:
    """Masks of every frame at the frame's size: the model's on frames 0, every, 2*every, ...,
    on the others the newest one carried (``flow``) or left where it was (``none``)."""
    import av

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    src, out = Path(path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = VideoResult(src)
    carrier = new_carrier(segmenter.input_size, carry)
    buf = np.empty((1, *segmenter.input_size, 3), np.uint8)
    try:
        with av.open(str(src)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if max_frames is not None and i >= max_frames:
                    break
                image = frame.to_ndarray(format="bgr24")
                carrier.push(i, image)
                if i % every == 0:
                    carrier.anchor(i)
                    prepare(image, segmenter.input_size, out=buf[0], bgr=True)
                    carrier.set_mask(i, segmenter.segment(buf)[0])
                    res.inferred += 1
                shown = carrier.carried()
                assert shown is not None  # frame 0 is always inferred
                mask = resize_labels(shown.mask, image.shape[:2])
                name = f"{stem or src.stem}_{i:06d}_mask.png"
                (out / name).write_bytes(encode_palette_png(mask, segmenter.palette))
                res.frames += 1
    except (av.error.FFmpegError, OSError) as e:
        res.error = f"{src}: cannot read or write: {e}"
    if res.error is None and res.frames == 0:
        res.error = f"{src}: no video frames"
    return res


# --- CLI ---


def _run(args: argparse.Namespace) -> int:
    paths = expand_paths(args.paths)
    if not paths:
        print("segstream predict: no image files found in the given directories", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"segstream predict: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    if args.every < 1:
        print("segstream predict: --every must be >= 1", file=sys.stderr)
        return 2
    try:
        segmenter = load_segmenter(args.model, args.backend, threads=args.threads)
    except (NotFetchedError, ValueError) as e:
        print(f"segstream predict: {e}", file=sys.stderr)
        return 2
    videos = [p for p in paths if p.suffix.lower() in VIDEO_EXTS]
    images = [p for p in paths if p.suffix.lower() not in VIDEO_EXTS]
    results: list[PredictResult | VideoResult] = []
    with segmenter:
        if images:
            results += predict_images(images, segmenter, args.out, alpha=args.alpha)
        stems = _output_stems(videos)
        for v, stem in zip(videos, stems, strict=True):
            results.append(
                predict_video(
                    v,
                    segmenter,
                    args.out,
                    every=args.every,
                    carry=args.carry,
                    max_frames=args.max_frames,
                    stem=stem,
                )
            )
    for r in results:
        if r.ok:
            print(r.summary(), flush=True)
        else:
            print(f"segstream predict: {r.error}", file=sys.stderr)
    failed = sum(not r.ok for r in results)
    if failed:
        print(f"segstream predict: {failed} of {len(results)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict PATH... --out DIR [--model NAME] [--backend B] [--every N]``."""
    p = subparsers.add_parser(
        "predict",
        help="segment images: <stem>_mask.png (palette PNG) + <stem>_overlay.jpg; videos: "
        "<stem>_<frame:06d>_mask.png",
        description="Segment still images. For each writes DIR/<stem>_mask.png (8-bit palette "
        "PNG, pixel = class id, input size) and DIR/<stem>_overlay.jpg, and prints the class "
        "pixel fractions. For a video (" + " ".join(VIDEO_EXTS) + ") writes the mask the "
        "service would show on every frame, DIR/<stem>_<frame:06d>_mask.png at the frame's "
        "size: inferred on frames 0, N, 2N, ... (--every N), carried by motion to the others "
        "(--carry none: the stale mask). Exit code 1 if any input failed (the others are "
        "still written).",
    )
    p.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="image files, or directories of images"
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS))
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--threads", type=int, default=None, help="TFLite threads (default: all)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument(
        "--every", type=int, default=1, metavar="N", help="videos: infer every Nth frame"
    )
    p.add_argument(
        "--carry",
        default="flow",
        choices=CARRY_MODES,
        help="videos: the mask between inferences, carried by optical flow or stale",
    )
    p.add_argument(
        "--max-frames", type=int, default=None, metavar="K", help="videos: the first K frames"
    )
    p.set_defaults(func=_run)
