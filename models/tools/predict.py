"""``segstream predict``: segment still images; write a palette mask PNG and an overlay JPEG each.

The mask PNG is 8-bit indexed (pixel = class id, PLTE = the model's colours) at the input
image's size, so any viewer shows colours and any PNG reader gets the class ids back.
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
from segstream.stream.render import Renderer, class_fractions

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
    """Directories are replaced by the image files directly inside them (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS))
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


# --- CLI ---


def _run(args: argparse.Namespace) -> int:
    paths = expand_paths(args.paths)
    if not paths:
        print("segstream predict: no image files found in the given directories", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"segstream predict: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        segmenter = load_segmenter(args.model, args.backend, threads=args.threads)
    except (NotFetchedError, ValueError) as e:
        print(f"segstream predict: {e}", file=sys.stderr)
        return 2
    with segmenter:
        results = predict_images(paths, segmenter, args.out, alpha=args.alpha)
    for r in results:
        if r.ok:
            print(r.summary(), flush=True)
        else:
            print(f"segstream predict: {r.error}", file=sys.stderr)
    failed = sum(not r.ok for r in results)
    if failed:
        print(f"segstream predict: {failed} of {len(results)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict PATH... --out DIR [--model NAME] [--backend B]``."""
    p = subparsers.add_parser(
        "predict",
        help="segment images: <stem>_mask.png (palette PNG) + <stem>_overlay.jpg",
        description="Segment still images. For each writes DIR/<stem>_mask.png (8-bit palette "
        "PNG, pixel = class id, input size) and DIR/<stem>_overlay.jpg, and prints the class "
        "pixel fractions. Exit code 1 if any image failed (the others are still written).",
    )
    p.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="image files, or directories of images"
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS))
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--threads", type=int, default=None, help="TFLite threads (default: all)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.set_defaults(func=_run)
