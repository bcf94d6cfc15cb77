"""Segmentation scores from one confusion matrix: `segstream evaluate` and train's validation.

``confusion_matrix(gt, pred, num_classes, ignore=...)`` is int64 [K, K+1]: rows = ground truth,
columns = prediction, the last column = "unmapped" (model classes with no dataset class,
always wrong; a model trained on the dataset's own classes never predicts it). Every score
below is a pure function of that matrix. A class absent from both gt and prediction has a NaN
score and is left out of every mean.
"""

from __future__ import annotations

import math

import numpy as np


class LabelError(ValueError):
    """Mask values that are neither a dataset class nor the ignore id: a setup error."""


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int | None = None
) -> np.ndarray:
    """int64 [K, K+1] counts of (gt, pred) over pixels whose gt is not ``ignore``.

    ``pred`` holds dataset ids 0..K-1 or K (unmapped). LabelError if gt has other values.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in shape")
    k = num_classes
    g = np.asarray(gt).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    if ignore is not None:
        keep = g != ignore
        g, p = g[keep], p[keep]
    stray = (g < 0) | (g >= k)
    if stray.any():
        bad = sorted(int(v) for v in np.unique(g[stray]))
        raise LabelError(f"label values {bad} are not dataset classes 0..{k - 1}")
    if p.size and (int(p.min()) < 0 or int(p.max()) > k):
        raise ValueError(f"prediction values must be 0..{k}, got {int(p.min())}..{int(p.max())}")
    return np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with NaN where b == 0 (a class absent from both gt and prediction)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def nanmean(values: np.ndarray) -> float:
    v = values[~np.isnan(values)]
    return float(v.mean()) if v.size else math.nan


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm[:, : cm.shape[0]]) / total) if total else math.nan


def class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall per gt class; NaN for classes with no gt pixels."""
    return _div(np.diag(cm).astype(np.float64), cm.sum(axis=1))


def mean_accuracy(cm: np.ndarray) -> float:
    return nanmean(class_accuracy(cm))


def class_iou(cm: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class; unmapped predictions are FNs of their gt class."""
    k = cm.shape[0]
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=1) + cm[:, :k].sum(axis=0) - tp
    return _div(tp, union)


def mean_iou(cm: np.ndarray) -> float:
    return nanmean(class_iou(cm))


def fw_iou(cm: np.ndarray) -> float:
    """IoU weighted by each class's share of gt pixels."""
    total = cm.sum()
    if not total:
        return math.nan
    freq = cm.sum(axis=1) / total
    iou = class_iou(cm)
    present = freq > 0  # a class with gt pixels always has a defined IoU
    return float((freq[present] * iou[present]).sum())
