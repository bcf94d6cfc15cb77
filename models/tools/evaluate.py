"""``segstream evaluate``: accuracy of a model on a folder of images + label masks.

Method (as the reference numbers in ../shared/data/camvid_segnet_test/README.md): bilinear-resize
each whole image to the model input, argmax, nearest-resize the class map back to the mask size,
map model ids to dataset ids, and accumulate ONE confusion matrix over all images, skipping
void ground truth. The matrix is [K, K+1]: rows = ground truth, columns = prediction, the last
column = "unmapped" (model classes with no dataset class; always wrong). Images and masks
are read and paired as models/tools/data.py documents; the scores are models/tools/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segstream.models.class_maps import (
    BUILTIN,
    ClassMap,
    ClassMapError,
    identity_map,
    load_class_map,
)
from segstream.models.fetch import NotFetchedError
from segstream.models.registry import DEFAULT_MODEL, MODELS
from segstream.models.runtime import BACKENDS, Segmenter, load_segmenter, prepare
from segstream.models.tools.data import (
    MASK_EXTS,
    DataError,
    Pair,
    Pairing,
    pair_files,
    read_pair,
    resize_labels,
)
from segstream.models.tools.metrics import (
    LabelError,
    class_accuracy,
    class_iou,
    confusion_matrix,
    fw_iou,
    nanmean,
    pixel_accuracy,
)

DEFAULT_IGNORE = 255


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


def evaluate_pairs(
    pairs: Sequence[Pair],
    segmenter: Segmenter,
    class_map: ClassMap,
    ignore: int | None,
    *,
    progress: bool = False,
) -> Evaluation:
    """Run ``segmenter`` over ``pairs`` in batches and accumulate the confusion matrix.

    A bad pair (DataError: unreadable, wrong kind, sizes differ) is recorded in ``errors`` and
    skipped; LabelError (mask values outside the map)
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
                    loaded.append((pair, *read_pair(pair.image, pair.mask)))
                except DataError as e:
                    ev.errors.append(str(e))
            if loaded:
                batch = np.empty((len(loaded), *segmenter.input_size, 3), np.uint8)
                for row, (_, img, _) in zip(batch, loaded, strict=True):
                    prepare(img, segmenter.input_size, out=row)  # read_image gives RGB
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
        segmenter = load_segmenter(
            args.model, args.backend, threads=args.threads, keras_mode=args.keras_mode
        )
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
        f"{segmenter.name} ({segmenter.backend}, {segmenter.mode}) on {ev.images} images, "
        f"class map "
        f"{class_map.name}, ignore {ignore}, {ev.seconds:.1f} s "
        f"({ev.images / max(ev.seconds, 1e-9):.2f} img/s)"
    )
    print(format_table(s, mapped))
    if args.json is not None:
        doc = {
            "model": segmenter.name,
            "backend": segmenter.backend,
            "mode": segmenter.mode,
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
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument(
        "--keras-mode",
        default=None,
        choices=["faithful", "float"],
        help="keras backend: int8-faithful (default for uint8 models) or float",
    )
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
