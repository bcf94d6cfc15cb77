"""`segstream evaluate`: pixel accuracy, mean accuracy, mIoU, frequency-weighted IoU and per-class
IoU of a model on an images/ + masks/ folder pair, as the older DeepLab projects reported them.

Method (as the CamVid reference figures in ../shared were made): each whole image is resized
(bilinear) to the model input, segmented, the class map resized back (nearest) to the mask's
size, mapped to dataset ids, and ONE confusion matrix is accumulated over all images, skipping
void pixels. Model classes the class map leaves out land in an extra "unmapped" column: they
count as errors, never as a hit."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from models.class_maps import ClassMap, ClassMapError, identity_map, load_class_map
from models.runtime import Segmenter, load_segmenter, prepare

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class EvaluationError(ValueError):
    """Bad evaluation input, worded for the user."""


# -- metrics ----------------------------------------------------------------------------------
def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int | None) -> np.ndarray:
    """[K, K+1] counts: rows = ground truth, columns = prediction (column K = unmapped)."""
    valid = gt < num_classes
    if ignore is not None:
        valid &= gt != ignore
    idx = gt[valid].astype(np.int64) * (num_classes + 1) + pred[valid]
    counts = np.bincount(idx, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


@dataclass
class Metrics:
    pixel_accuracy: float
    mean_accuracy: float
    miou: float
    fw_iou: float
    per_class: dict[str, float | None]  # None: class absent from ground truth and predictions
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "pixel_accuracy": self.pixel_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "miou": self.miou,
            "fw_iou": self.fw_iou,
            "per_class": self.per_class,
            **self.extra,
        }


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str]) -> Metrics:
    """Classes absent from both ground truth and prediction are left out of the means."""
    k = cm.shape[0]
    cm = cm.astype(np.float64)
    tp = np.diag(cm[:, :k])
    gt_count = cm.sum(axis=1)  # includes pixels predicted as unmapped classes
    pred_count = cm[:, :k].sum(axis=0)
    union = gt_count + pred_count - tp
    total = cm.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    freq = gt_count / total if total else np.zeros(k)
    present = ~np.isnan(iou)
    return Metrics(
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        mean_accuracy=float(np.nanmean(acc)) if (gt_count > 0).any() else float("nan"),
        miou=float(np.nanmean(iou)) if present.any() else float("nan"),
        fw_iou=float(np.nansum(freq * np.nan_to_num(iou))),
        per_class={c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou,
                                                                          strict=True)},
    )


# -- data -------------------------------------------------------------------------------------
def pair_by_stem(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    for d, what in ((images, "--images"), (masks, "--masks")):
        if not d.is_dir():
            raise EvaluationError(f"{what} {d} is not a folder")
    imgs = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    msks = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    pairs = [(imgs[s], msks[s]) for s in sorted(imgs.keys() & msks.keys())]
    if not pairs:
        raise EvaluationError(
            f"no image/mask pairs: {len(imgs)} images in {images}, {len(msks)} masks in {masks}, "
            "none with the same name stem"
        )
    return pairs


def read_pair(image: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    img = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if img is None:
        raise EvaluationError(f"{image}: not a readable image")
    m = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise EvaluationError(f"{mask}: not a readable image")
    if m.ndim != 2:
        raise EvaluationError(f"{mask}: masks must be single-channel label images "
                              f"(pixel = class id), got {m.shape[2]} channels")
    if m.dtype != np.uint8:
        if m.max() > 255:
            raise EvaluationError(f"{mask}: class ids above 255 are not supported")
        m = m.astype(np.uint8)
    return img, m


# -- evaluation -------------------------------------------------------------------------------
def _batches(pairs: list[tuple[Path, Path]], size: int) -> Iterator[list[tuple[Path, Path]]]:
    for i in range(0, len(pairs), size):
        yield pairs[i : i + size]


def evaluate(
    segmenter: Segmenter,
    pairs: list[tuple[Path, Path]],
    cmap: ClassMap,
    ignore: int | None,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> Metrics:
    cmap.check_model(segmenter.name, segmenter.labels)
    k = cmap.num_classes
    lut = cmap.lut()
    cm = np.zeros((k, k + 1), np.int64)
    h, w = segmenter.input_size
    bar = tqdm(total=len(pairs), unit="img", disable=not progress, file=sys.stderr)
    for chunk in _batches(pairs, batch_size):
        loaded = [read_pair(i, m) for i, m in chunk]
        batch = np.empty((len(loaded), h, w, 3), np.uint8)
        for row, (img, _) in zip(batch, loaded, strict=True):
            prepare(img, (h, w), out=row, bgr=True)
        for (mask_path, (_, gt)), small in zip(
            ((m, lm) for (_, m), lm in zip(chunk, loaded, strict=True)),
            segmenter.segment(batch), strict=True,
        ):
            bad = np.setdiff1d(np.unique(gt), [*range(k), *([] if ignore is None else [ignore])])
            if bad.size:
                raise EvaluationError(f"{mask_path}: ids {bad.tolist()} are neither dataset "
                                      f"classes (0..{k - 1}) nor the ignore id {ignore}")
            pred = cv2.resize(small, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_NEAREST)
            cm += confusion(gt, cv2.LUT(pred, lut), k, ignore)
            bar.update(1)
    bar.close()
    result = metrics_from_confusion(cm, cmap.classes)
    mapped = [result.per_class[cmap.classes[c]] for c in cmap.mapped_classes()]
    mapped = [v for v in mapped if v is not None]
    result.extra = {
        "model": segmenter.name,
        "backend": segmenter.backend,
        "class_map": cmap.name,
        "ignore": ignore,
        "images": len(pairs),
        "miou_mapped": float(np.mean(mapped)) if mapped else None,
        "mapped_classes": [cmap.classes[c] for c in cmap.mapped_classes()],
    }
    return result


def format_report(m: Metrics) -> str:
    lines = [
        f"images          {m.extra.get('images')}  ({m.extra.get('model')}, "
        f"{m.extra.get('class_map')})",
        f"pixel accuracy  {m.pixel_accuracy:.4f}",
        f"mean accuracy   {m.mean_accuracy:.4f}",
        f"mIoU            {m.miou:.4f}",
        f"FWIoU           {m.fw_iou:.4f}",
        "",
        f"{'class':<16} IoU",
    ]
    for name, v in m.per_class.items():
        lines.append(f"{name:<16} {'-' if v is None else f'{v:.4f}'}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    try:
        pairs = pair_by_stem(Path(args.images), Path(args.masks))
        if args.limit:
            pairs = pairs[: args.limit]
        seg = load_segmenter(args.model, args.backend)
        cmap = load_class_map(args.class_map) if args.class_map else identity_map(seg.labels)
        ignore = args.ignore if args.ignore is not None else (
            cmap.ignore if cmap.ignore is not None else 255)
        result = evaluate(seg, pairs, cmap, ignore, progress=not args.quiet)
    except (EvaluationError, ClassMapError, FileNotFoundError, ValueError) as e:
        print(f"segstream evaluate: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="pixel acc, mean acc, mIoU, FWIoU and per-class IoU on images + masks"
    )
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of label masks (same name stems)")
    p.add_argument("--model", default="mnv2-voc")
    p.add_argument("--backend", default="auto", choices=["auto", "keras", "tflite"])
    p.add_argument("--class-map", help="cityscapes-to-camvid, voc-to-camvid, or a YAML file")
    p.add_argument("--ignore", type=int, help="void id in the masks (default: the class map's, "
                   "else 255)")
    p.add_argument("--json", help="write the metrics as JSON here")
    p.add_argument("--limit", type=int, default=0, help="only the first N pairs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
