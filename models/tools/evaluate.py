"""``segstream evaluate``: accuracy of a model on a folder of images + label masks.

Method (as the reference numbers in ../shared/data/camvid_segnet_test/README.md): bilinear-resize
each whole image to the model input, argmax, nearest-resize the class map back to the mask size,
map model ids to dataset ids, and accumulate ONE confusion matrix over all images, skipping
void ground truth. The matrix is [K, K+1]: rows = ground truth, columns = prediction, the last
column = "unmapped" (model classes with no dataset class; always wrong).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.class_maps import BUILTIN, ClassMap, ClassMapError, identity_map, load_class_map
from models.fetch import NotFetchedError
from models.registry import DEFAULT_MODEL, MODELS
from models.runtime import Segmenter, load_segmenter, prepare
from models.tools.predict import IMAGE_EXTS, ImageReadError, read_image, resize_labels

MASK_EXTS = {".png", ".bmp", ".tif", ".tiff"}  # lossless only: JPEG noise would change labels
DEFAULT_IGNORE = 255


class PairError(ValueError):
    """One image/mask pair cannot be evaluated (unreadable, wrong format, size mismatch)."""


class LabelError(ValueError):
    """Mask values that are neither a dataset class nor the ignore id: a setup error."""


# --- metrics: pure functions of the confusion matrix ---


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int | None
) -> np.ndarray:
    """int64 [K, K+1] counts of (gt, pred) over pixels whose gt is not ``ignore``.

    ``pred`` holds dataset ids 0..K-1 or K (unmapped). LabelError if gt has other values.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in shape")
    k = num_classes
    g = gt.ravel()
    p = pred.ravel()
    if ignore is not None:
        keep = g != ignore
        g, p = g[keep], p[keep]
    if g.size and int(g.max()) >= k:
        bad = sorted(int(v) for v in np.unique(g[g >= k]))
        raise LabelError(f"label values {bad} are not dataset classes 0..{k - 1}")
    if p.size and int(p.max()) > k:
        raise ValueError(f"prediction values must be 0..{k}, got {int(p.max())}")
    idx = g.astype(np.int64) * (k + 1) + p
    return np.bincount(idx, minlength=k * (k + 1)).reshape(k, k + 1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with NaN where b == 0 (a class absent from both gt and prediction)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm[:, : cm.shape[0]]) / total) if total else math.nan


def class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall per gt class; NaN for classes with no gt pixels."""
    return _div(np.diag(cm).astype(np.float64), cm.sum(axis=1))


def class_iou(cm: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class; unmapped predictions are FNs of their gt class."""
    k = cm.shape[0]
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=1) + cm[:, :k].sum(axis=0) - tp
    return _div(tp, union)


def nanmean(values: np.ndarray) -> float:
    v = values[~np.isnan(values)]
    return float(v.mean()) if v.size else math.nan


def fw_iou(cm: np.ndarray) -> float:
    """IoU weighted by each class's share of gt pixels."""
    total = cm.sum()
    if not total:
        return math.nan
    freq = cm.sum(axis=1) / total
    iou = class_iou(cm)
    present = freq > 0  # a class with gt pixels always has a defined IoU
    return float((freq[present] * iou[present]).sum())


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def summarize(
    cm: np.ndarray, classes: Sequence[str], mapped: Sequence[int] | None = None
) -> dict[str, Any]:
    """The JSON-ready metrics of a [K, K+1] confusion matrix (NaN -> None)."""
    k = cm.shape[0]
    iou, acc = class_iou(cm), class_accuracy(cm)
    total = int(cm.sum())
    out: dict[str, Any] = {
        "pixel_accuracy": _none_if_nan(pixel_accuracy(cm)),
        "mean_accuracy": _none_if_nan(nanmean(acc)),
        "miou": _none_if_nan(nanmean(iou)),
        "fw_iou": _none_if_nan(fw_iou(cm)),
        "per_class": {c: _none_if_nan(iou[i]) for i, c in enumerate(classes)},
        "per_class_accuracy": {c: _none_if_nan(acc[i]) for i, c in enumerate(classes)},
        "gt_pixels": {c: int(n) for c, n in zip(classes, cm.sum(axis=1), strict=True)},
        "pixels": total,
        "unmapped_fraction": _none_if_nan(cm[:, k].sum() / total if total else math.nan),
    }
    if mapped is not None:
        out["mapped_classes"] = [classes[i] for i in mapped]
        out["miou_mapped"] = _none_if_nan(nanmean(iou[list(mapped)]))
    return out


# --- data ---


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


@dataclass
class Pairing:
    pairs: list[Pair]
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _by_stem(folder: Path, exts: set[str], problems: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in exts or not p.is_file():
            continue
        if p.stem in found:
            problems.append(f"{p}: same stem as {found[p.stem].name}; using {found[p.stem].name}")
            continue
        found[p.stem] = p
    return found


def pair_files(images_dir: Path, masks_dir: Path) -> Pairing:
    """Match ``images_dir/<stem>.<img ext>`` with ``masks_dir/<stem>.<png|bmp|tif>``."""
    for d, what in ((images_dir, "--images"), (masks_dir, "--masks")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} {d}: not a directory")
    problems: list[str] = []
    images = _by_stem(images_dir, IMAGE_EXTS, problems)
    masks = _by_stem(masks_dir, MASK_EXTS, problems)
    pairs = [Pair(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    return Pairing(
        pairs, sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys()), problems
    )


def _png_colour_type(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 25:
        return data[25]
    return None


def _png_palette(data: bytes) -> np.ndarray | None:
    """The PLTE chunk of PNG bytes as uint8 [n, 3] RGB (None if absent)."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"PLTE":
            return np.frombuffer(data[pos + 8 : pos + 8 + length], np.uint8).reshape(-1, 3)
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _palette_indices(colour_bgr: np.ndarray, palette: np.ndarray, path: Path) -> np.ndarray:
    """Undo cv2's palette expansion: BGR colours -> palette indices (first index wins on
    duplicated colours, e.g. black padding after the used entries)."""
    keys = (
        (palette[:, 0].astype(np.int32) << 16)
        | (palette[:, 1].astype(np.int32) << 8)
        | palette[:, 2]
    )
    uniq, first = np.unique(keys, return_index=True)
    px = (
        (colour_bgr[..., 2].astype(np.int32) << 16)
        | (colour_bgr[..., 1].astype(np.int32) << 8)
        | colour_bgr[..., 0]
    )
    pos = np.clip(np.searchsorted(uniq, px), 0, len(uniq) - 1)
    if not np.array_equal(uniq[pos], px):
        raise PairError(f"{path}: palette PNG with colours outside its palette")
    return first[pos].astype(np.uint8)


def read_label_mask(path: Path) -> np.ndarray:
    """uint8 [H, W] class ids from a single-channel (grey) or palette label image."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PairError(f"{path}: cannot read: {e.strerror or e}") from None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if arr is None:
        raise PairError(f"{path}: not a readable image (empty, corrupt or unsupported)")
    if _png_colour_type(data) == 3:  # indexed (e.g. VOC SegmentationClass): index = class id
        pal = _png_palette(data)
        if pal is None or arr.ndim != 3:
            raise PairError(f"{path}: palette PNG without a readable palette")
        return _palette_indices(arr[..., :3], pal, path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise PairError(
            f"{path}: a mask must be a single-channel label image (pixel = class "
            f"id), this one has {arr.shape[2]} channels (a colour-coded mask?)"
        )
    if arr.dtype != np.uint8:
        if arr.dtype != np.uint16 or int(arr.max()) > 255:
            raise PairError(
                f"{path}: mask values must be class ids 0..255, got {arr.dtype} up to {arr.max()}"
            )
        arr = arr.astype(np.uint8)  # 16-bit label PNG with small ids
    return arr


# --- evaluation ---


@dataclass
class Evaluation:
    cm: np.ndarray
    class_map: ClassMap
    images: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return summarize(self.cm, self.class_map.classes, self.class_map.mapped_classes())


def _load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = read_image(pair.image)
    except ImageReadError as e:
        raise PairError(str(e)) from None
    mask = read_label_mask(pair.mask)
    if image.shape[:2] != mask.shape:
        raise PairError(
            f"{pair.stem}: image {pair.image.name} is {image.shape[1]}x"
            f"{image.shape[0]} but mask {pair.mask.name} is {mask.shape[1]}x"
            f"{mask.shape[0]}; they must have the same size"
        )
    return image, mask


def evaluate_pairs(
    pairs: Sequence[Pair],
    segmenter: Segmenter,
    class_map: ClassMap,
    ignore: int | None,
    *,
    progress: bool = False,
) -> Evaluation:
    """Run ``segmenter`` over ``pairs`` in batches and accumulate the confusion matrix.

    A bad pair is recorded in ``errors`` and skipped; LabelError (mask values outside the map)
    stops the run, since every other mask would fail the same way.
    """
    from tqdm import tqdm

    class_map.check_model(segmenter.name, segmenter.labels)
    k = class_map.num_classes
    ev = Evaluation(np.zeros((k, k + 1), np.int64), class_map)
    lut = class_map.lut()
    step = segmenter.batch_sizes[-1]
    t0 = time.perf_counter()
    with tqdm(
        total=len(pairs), unit="img", file=sys.stderr, disable=not progress, desc=segmenter.name
    ) as bar:
        for start in range(0, len(pairs), step):
            loaded: list[tuple[Pair, np.ndarray, np.ndarray]] = []
            for pair in pairs[start : start + step]:
                try:
                    loaded.append((pair, *_load_pair(pair)))
                except PairError as e:
                    ev.errors.append(str(e))
            if loaded:
                batch = np.empty((len(loaded), *segmenter.input_size, 3), np.uint8)
                for row, (_, img, _) in zip(batch, loaded, strict=True):
                    prepare(img, segmenter.input_size, out=row, bgr=True)
                for (pair, _, gt), small in zip(loaded, segmenter.segment(batch), strict=True):
                    pred = resize_labels(small, gt.shape)
                    try:
                        ev.cm += confusion_matrix(gt, lut[pred], k, ignore)
                    except LabelError as e:
                        raise LabelError(
                            f"{pair.mask}: {e} (class map {class_map.name!r}) "
                            f"and not the ignore id {ignore}; pass --ignore or "
                            f"--class-map to match the masks"
                        ) from None
                    ev.images += 1
            bar.update(min(step, len(pairs) - start))
    ev.seconds = time.perf_counter() - t0
    return ev


def format_table(summary: dict[str, Any], mapped: Sequence[str] | None = None) -> str:
    """Per-class IoU / accuracy table plus the four headline figures."""

    def f(x: float | None) -> str:
        return "   -  " if x is None else f"{x:6.3f}"

    total = max(summary["pixels"], 1)
    width = max(10, *(len(c) for c in summary["per_class"]))
    lines = [f"{'class':<{width}}    IoU    acc  gt px"]
    for c, iou in summary["per_class"].items():
        note = "" if mapped is None or c in mapped else "  (no model class maps here)"
        share = 100 * summary["gt_pixels"][c] / total
        lines.append(
            f"{c:<{width}} {f(iou)} {f(summary['per_class_accuracy'][c])} {share:5.1f}%{note}"
        )
    lines.append(
        f"pixel accuracy {f(summary['pixel_accuracy'])}   mean accuracy "
        f"{f(summary['mean_accuracy'])}   mIoU {f(summary['miou'])}   fwIoU "
        f"{f(summary['fw_iou'])}"
    )
    if mapped is not None and len(mapped) < len(summary["per_class"]):
        lines.append(
            f"mIoU over the {len(mapped)} mapped classes {f(summary['miou_mapped'])}"
            f"   unmapped predictions {100 * summary['unmapped_fraction']:.1f}% of px"
        )
    return "\n".join(lines)


# --- CLI ---


def _err(msg: str) -> None:
    print(f"segstream evaluate: {msg}", file=sys.stderr)


def _warn_unpaired(pairing: Pairing) -> None:
    for what, stems in (
        ("images without a mask", pairing.images_without_mask),
        ("masks without an image", pairing.masks_without_image),
    ):
        if stems:
            more = f", ... ({len(stems)} in all)" if len(stems) > 5 else ""
            _err(f"warning: {len(stems)} {what}, skipped: {', '.join(stems[:5])}{more}")
    for p in pairing.problems:
        _err(f"warning: {p}")


def _run(args: argparse.Namespace) -> int:
    if args.json is not None and not args.json.parent.is_dir():  # fail before the long run
        _err(f"--json {args.json}: directory {args.json.parent} does not exist")
        return 2
    try:
        pairing = pair_files(args.images, args.masks)
        class_map = load_class_map(args.class_map) if args.class_map else None
        segmenter = load_segmenter(args.model, args.backend, threads=args.threads)
    except (FileNotFoundError, ClassMapError, NotFetchedError, ValueError) as e:
        _err(str(e))
        return 2
    _warn_unpaired(pairing)
    pairs = pairing.pairs[: args.limit] if args.limit else pairing.pairs
    if not pairs:
        n_img = len(pairing.pairs) + len(pairing.images_without_mask)
        n_mask = len(pairing.pairs) + len(pairing.masks_without_image)
        _err(
            f"no image/mask pairs: {n_img} images in {args.images}, {n_mask} masks in "
            f"{args.masks} ({'/'.join(sorted(MASK_EXTS))}); a mask must have its image's "
            f"file stem"
        )
        return 2
    class_map = class_map or identity_map(segmenter.labels, f"{segmenter.name} classes")
    ignore = (
        args.ignore
        if args.ignore is not None
        else (class_map.ignore if class_map.ignore is not None else DEFAULT_IGNORE)
    )
    try:
        with segmenter:
            ev = evaluate_pairs(pairs, segmenter, class_map, ignore, progress=not args.quiet)
    except (LabelError, ClassMapError) as e:
        _err(str(e))
        return 2
    for problem in ev.errors:
        _err(problem)
    if not ev.images:
        _err("no pair could be evaluated")
        return 1
    s = ev.summary()
    mapped = s["mapped_classes"]
    print(
        f"{segmenter.name} ({segmenter.backend}) on {ev.images} images, class map "
        f"{class_map.name}, ignore {ignore}, {ev.seconds:.1f} s "
        f"({ev.images / max(ev.seconds, 1e-9):.2f} img/s)"
    )
    print(format_table(s, mapped))
    if args.json is not None:
        doc = {
            "model": segmenter.name,
            "backend": segmenter.backend,
            "class_map": class_map.name,
            "ignore": ignore,
            "images": ev.images,
            "skipped": ev.errors,
            **s,
            "confusion_matrix": ev.cm.tolist(),
            "confusion_columns": [*class_map.classes, "unmapped"],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if ev.errors:
        _err(f"{len(ev.errors)} of {len(pairs)} pair(s) skipped; figures cover the rest")
        return 1
    return 0


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate --images DIR --masks DIR [--model] [--class-map] [--ignore] [--json]``."""
    p = subparsers.add_parser(
        "evaluate",
        help="pixel accuracy / mIoU of a model on images + label masks",
        description="Pair DIR images with masks by file stem, segment (whole image bilinear-"
        "resized to the model input), nearest-resize back, map model ids to dataset ids and "
        "report pixel accuracy, mean accuracy, mIoU, fwIoU and per-class IoU from one "
        "confusion matrix. Masks: single-channel (or palette) PNGs, pixel = class id.",
    )
    p.add_argument("--images", type=Path, required=True, metavar="DIR")
    p.add_argument("--masks", type=Path, required=True, metavar="DIR")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS))
    p.add_argument("--backend", default="auto", choices=["auto", "keras", "tflite"])
    p.add_argument("--threads", type=int, default=None, help="TFLite threads (default: all)")
    p.add_argument(
        "--class-map",
        default=None,
        metavar="NAME|FILE",
        help=f"model->dataset class ids: {', '.join(BUILTIN)} or a YAML file "
        "(default: masks use the model's own class ids)",
    )
    p.add_argument(
        "--ignore",
        type=int,
        default=None,
        metavar="ID",
        help=f"mask value to skip (default: the class map's void id, else "
        f"{DEFAULT_IGNORE}; CamVid: 11)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write figures here")
    p.add_argument(
        "--limit", type=_positive_int, default=None, metavar="N", help="first N pairs only"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
