"""``segstream train``: fine-tune the Keras DeepLab port on an images/ + masks/ folder pair.

Starts from the imported official weights; with another class count only the logits layer
is new (the backbone and ASPP keep theirs). Loss: sparse categorical cross-entropy on the
logits, ignoring one label id. Data: a keras.utils.PyDataset reading images and masks through
models/tools/data.py (works on the TF and JAX backends); validation scores come from
models/tools/metrics.py, as `segstream evaluate`'s do. Each epoch reports train loss and val
mIoU and saves the weights (atomic replace) plus a JSON sidecar, so an interrupted run keeps
its last finished epoch.

The sidecar (``<name>.json`` beside ``<name>.weights.h5``) holds what a runtime needs to
rebuild the model; ``models.finetuned`` writes and reads both files.
Keras is imported lazily: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segstream.models.finetuned import SIDECAR_FORMAT, SIDECAR_VERSION, save_finetuned, sidecar_path
from segstream.models.registry import DEFAULT_MODEL, MODELS, ModelSpec, get_spec
from segstream.models.tools.data import (
    IMAGE_EXTS,
    MASK_EXTS,
    DataError,
    read_image,
    read_mask,
    read_pair,
)
from segstream.models.tools.data import pair_files as pair_by_stem
from segstream.models.tools.metrics import class_iou, confusion_matrix, mean_iou, pixel_accuracy

log = logging.getLogger(__name__)

DEFAULT_IGNORE = 255
LOGITS_LAYER = "logits__semantic"
PAD_PIXEL = 128  # image padding after a down-scale: normalizes to ~0 (the mean)


class DatasetError(ValueError):
    """The images/masks folders cannot be trained on; the message names the files."""


class OutputError(ValueError):
    """The output path cannot be written (checked before training starts)."""


# ---------------------------------------------------------------- data checks


def _list_some(names: Sequence[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def pair_files(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by stem as models.tools.data does. Training wants every
    file paired: DatasetError on a missing or empty folder, a stem used twice, a lone file."""
    try:
        pairing = pair_by_stem(Path(images_dir), Path(masks_dir))
    except DataError as e:
        raise DatasetError(str(e)) from None
    no_mask, no_image = pairing.images_without_mask, pairing.masks_without_image
    for what, folder, exts, n in (
        ("images", images_dir, IMAGE_EXTS, len(pairing.pairs) + len(no_mask)),
        ("masks", masks_dir, MASK_EXTS, len(pairing.pairs) + len(no_image)),
    ):
        if not n:
            raise DatasetError(f"no {what} in {folder} (looked for {' '.join(exts)})")
    if pairing.problems:
        raise DatasetError("two files with one stem: " + "; ".join(pairing.problems))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(
                f"{len(no_mask)} image(s) without a mask in {masks_dir}: {_list_some(no_mask)}"
            )
        if no_image:
            parts.append(
                f"{len(no_image)} mask(s) without an image in {images_dir}: {_list_some(no_image)}"
            )
        raise DatasetError(
            "unpaired files (pairs match by file name without extension); " + "; ".join(parts)
        )
    return [(p.image, p.mask) for p in pairing.pairs]


def check_pairs(pairs: Sequence[tuple[Path, Path]], num_classes: int, ignore_id: int) -> np.ndarray:
    """Check every pair before training; return per-class pixel counts (ignored excluded).

    Both files must be readable (models.tools.data), of one size, and the mask must hold
    ids < num_classes or the ignore id.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    bad: list[str] = []
    for img_path, mask_path in pairs:
        try:
            _, mask = read_pair(img_path, mask_path)
        except DataError as e:
            raise DatasetError(str(e)) from None
        ids, n = np.unique(mask, return_counts=True)
        wrong = [int(i) for i in ids if i >= num_classes and i != ignore_id]
        if wrong:
            bad.append(f"{mask_path.name} ({', '.join(map(str, wrong[:5]))})")
        keep = ids < num_classes
        counts[ids[keep].astype(np.int64)] += n[keep]
    if bad:
        raise DatasetError(
            f"{len(bad)} mask(s) hold class ids >= --num-classes {num_classes} that are not "
            f"the --ignore id {ignore_id}: {_list_some(bad)}. Raise --num-classes, or pass "
            f"--ignore ID for the void label"
        )
    if counts.sum() == 0:
        raise DatasetError(f"every mask pixel is the ignore id {ignore_id}: nothing to learn")
    return counts


def split_pairs(
    pairs: Sequence[tuple[Path, Path]], val_split: float, seed: int = 0
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Shuffled (train, val); val gets round(n * val_split) pairs, at least 1 if > 0."""
    if not 0.0 <= val_split < 1.0:
        raise DatasetError(f"--val-split must be in [0, 1), got {val_split}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = 0 if val_split == 0 else max(1, round(len(pairs) * val_split))
    if len(pairs) - n_val < 1:
        raise DatasetError(
            f"{len(pairs)} pair(s) leave nothing to train on with --val-split {val_split}"
        )
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in order[n_val:]]
    return train, val


# ---------------------------------------------------------------- samples


def resize_pair(img: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole frame to size x size (aspect not kept), as the runtime's ``prepare`` does."""
    return (
        cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR),
        cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST),
    )


def augment_pair(
    img: np.ndarray,
    mask: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ignore_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Random scale around the inference framing, random size x size crop, random h-flip.

    Scale 1 is exactly what inference sees (the whole frame squashed to size x size); other
    scales zoom in (crop) or out (pad: image with the mean grey, mask with the ignore id).
    """
    s = max(8, round(size * rng.uniform(*scale)))
    img = cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, (s, s), interpolation=cv2.INTER_NEAREST)
    if s < size:
        pad = size - s
        top, left = int(rng.integers(0, pad + 1)), int(rng.integers(0, pad + 1))
        border = (top, pad - top, left, pad - left)
        img = cv2.copyMakeBorder(img, *border, cv2.BORDER_CONSTANT, value=(PAD_PIXEL,) * 3)
        mask = cv2.copyMakeBorder(mask, *border, cv2.BORDER_CONSTANT, value=ignore_id)
    elif s > size:
        y, x = int(rng.integers(0, s - size + 1)), int(rng.integers(0, s - size + 1))
        img, mask = img[y : y + size, x : x + size], mask[y : y + size, x : x + size]
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


_DATASET_CLS: type | None = None


def _dataset_class() -> type:
    """keras.utils.PyDataset subclass, defined on first use (keras is imported lazily)."""
    global _DATASET_CLS
    if _DATASET_CLS is not None:
        return _DATASET_CLS
    import keras

    class SegmentationData(keras.utils.PyDataset):
        """Batches of (uint8 RGB [B, S, S, 3], int32 labels [B, S, S]) read by models.tools.data.

        ``augment`` (training): reshuffled every epoch, randomly scaled/cropped/flipped, the
        last partial batch dropped. Otherwise (evaluation): fixed order, inference framing,
        the last batch padded with ignore-only samples. Every batch thus has one shape, so
        neither backend retraces (a JAX retrace costs ~10 s). ``max_batches`` caps an epoch.
        """

        def __init__(
            self,
            pairs: Sequence[tuple[Path, Path]],
            batch_size: int,
            size: int,
            *,
            augment: bool,
            ignore_id: int,
            seed: int = 0,
            scale: tuple[float, float] = (0.75, 1.5),
            max_batches: int | None = None,
            **kw: Any,
        ) -> None:
            super().__init__(**kw)
            batch_size = min(batch_size, len(pairs)) if augment else batch_size
            self.pairs, self.batch_size, self.size = list(pairs), batch_size, size
            self.augment, self.ignore_id, self.seed, self.scale = augment, ignore_id, seed, scale
            self.max_batches = max_batches
            self.epoch = 0
            self._order = self._shuffle()

        def _shuffle(self) -> np.ndarray:
            if not self.augment:
                return np.arange(len(self.pairs))
            return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.pairs))

        def __len__(self) -> int:
            n = len(self.pairs) / self.batch_size
            n = math.floor(n) if self.augment else math.ceil(n)
            return min(n, self.max_batches) if self.max_batches else n

        def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
            sel = self._order[idx * self.batch_size : (idx + 1) * self.batch_size]
            x = np.full((self.batch_size, self.size, self.size, 3), PAD_PIXEL, np.uint8)
            y = np.full((self.batch_size, self.size, self.size), self.ignore_id, np.int32)
            for k, i in enumerate(sel):
                img_path, mask_path = self.pairs[i]
                img, mask = read_image(img_path), read_mask(mask_path)
                if self.ignore_id > 255 and mask.dtype == np.uint8:  # room for the pad id
                    mask = mask.astype(np.uint16)
                if self.augment:  # per-sample stream: same result with any worker count
                    rng = np.random.default_rng((self.seed, self.epoch, int(i)))
                    img, mask = augment_pair(img, mask, self.size, rng, self.scale, self.ignore_id)
                else:
                    img, mask = resize_pair(img, mask, self.size)
                x[k], y[k] = img, mask
            return x, y

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._order = self._shuffle()

    _DATASET_CLS = SegmentationData
    return SegmentationData


def make_dataset(
    pairs: Sequence[tuple[Path, Path]],
    batch_size: int,
    size: int,
    *,
    augment: bool,
    ignore_id: int,
    **kw: Any,
) -> Any:
    """A SegmentationData (keras.utils.PyDataset); see :func:`_dataset_class`."""
    return _dataset_class()(pairs, batch_size, size, augment=augment, ignore_id=ignore_id, **kw)


# ---------------------------------------------------------------- loss and metric


def masked_sparse_ce(ignore_id: int) -> Callable[[Any, Any], Any]:
    """Mean cross-entropy over the pixels whose label is not ``ignore_id`` (logits input)."""
    import keras
    from keras import ops

    def loss(y_true: Any, y_pred: Any) -> Any:
        y = ops.cast(y_true, "int32")
        valid = ops.not_equal(y, ignore_id)
        ce = keras.losses.sparse_categorical_crossentropy(
            ops.where(valid, y, 0), y_pred, from_logits=True
        )
        w = ops.cast(valid, ce.dtype)
        return ops.sum(ce * w) / ops.maximum(ops.sum(w), 1.0)

    loss.__name__ = "masked_sparse_ce"
    return loss


def evaluate(model: Any, data: Any, num_classes: int, ignore_id: int) -> dict[str, Any]:
    """Validation scores of a logits model over a (non-augmented) dataset: one confusion
    matrix, as `segstream evaluate` builds it."""
    cm = np.zeros((num_classes, num_classes + 1), np.int64)
    for i in range(len(data)):
        x, y = data[i]
        pred = np.argmax(np.asarray(model.predict_on_batch(x)), axis=-1)
        cm += confusion_matrix(y, pred, num_classes, ignore=ignore_id)
    return {
        "miou": mean_iou(cm),
        "pixel_acc": pixel_accuracy(cm),
        "iou": [None if np.isnan(v) else round(float(v), 4) for v in class_iou(cm)],
    }


# ---------------------------------------------------------------- model


def build_finetune_model(spec: ModelSpec, num_classes: int, input_size: int, seed: int = 0) -> Any:
    """Logits model of ``spec`` with its official weights; a fresh logits layer if the class
    count differs (small random kernel, zero bias: starts near uniform, loss ~ ln C)."""
    from segstream.models.tflite_import import build_for_spec, load_keras_model

    base = load_keras_model(spec.name, input_size, output="logits", mode="float")
    if num_classes == spec.num_classes:
        return base
    model = build_for_spec(spec, input_size, "logits", num_classes=num_classes)
    for layer in model.layers:
        if layer.weights and layer.name != LOGITS_LAYER:
            layer.set_weights(base.get_layer(layer.name).get_weights())
    head = model.get_layer(LOGITS_LAYER)
    rng = np.random.default_rng(seed)
    head.kernel.assign(rng.normal(0.0, 0.01, tuple(head.kernel.shape)).astype(np.float32))
    head.bias.assign(np.zeros(tuple(head.bias.shape), np.float32))
    return model


def freeze_backbone(model: Any) -> int:
    """Make the backbone's layers untrainable (train ASPP + logits only); returns the count."""
    n = 0
    for layer in model.layers:
        if layer.name.startswith(("MobilenetV2__", "MobilenetEdgeTPU__")) and layer.weights:
            layer.trainable = False
            n += 1
    return n


# ---------------------------------------------------------------- output files


def resolve_out(out: str | Path | None, base: str, overwrite: bool) -> Path:
    """The .weights.h5 path to write, checked writable and not clobbering anything."""
    if out is None:
        from segstream.models import fetch

        out = fetch.home() / "finetuned"
    out = Path(out).expanduser()
    if out.name.endswith(".weights.h5"):
        path = out
    elif out.suffix and not out.is_dir():
        raise OutputError(
            f"--out {out}: name the weights file *.weights.h5 (Keras requires it), or give a folder"
        )
    else:
        path = out / f"{base}-ft-{time.strftime('%Y%m%d-%H%M%S')}.weights.h5"
    for p in (path, sidecar_path(path)):
        if p.exists() and not overwrite:
            raise OutputError(f"{p} already exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".segstream-write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    return path


# ---------------------------------------------------------------- training


def parse_class_names(value: str | None) -> list[str] | None:
    """``a,b,c`` or a file with one name per line (blank lines skipped)."""
    if value is None:
        return None
    p = Path(value).expanduser()
    if p.is_file():
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    elif "," in value or not (p.suffix or os.sep in value):
        names = [n.strip() for n in value.split(",") if n.strip()]
    else:
        raise DatasetError(f"--class-names {value}: no such file (give a file or a,b,c)")
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"--class-names must be non-empty and unique, got {names}")
    return names


@dataclass
class TrainConfig:
    images: Path
    masks: Path
    model: str = DEFAULT_MODEL
    num_classes: int | None = None  # None: from class_names, else the base model's
    class_names: list[str] | None = None
    epochs: int = 10
    batch_size: int = 4
    lr: float = 3e-4
    input_size: int = 257
    val_split: float = 0.1
    ignore_id: int = DEFAULT_IGNORE
    out: Path | None = None  # .weights.h5 file or folder; None: home()/finetuned
    overwrite: bool = False
    max_steps: int | None = None  # cap on steps per epoch (tiny runs)
    freeze_backbone: bool = False
    seed: int = 0
    workers: int = 1
    verbose: int = 0  # keras.fit progress output


@dataclass
class TrainResult:
    weights: Path
    sidecar: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, Any] = field(default_factory=dict)  # val metrics before training


def _classes(cfg: TrainConfig, spec: ModelSpec) -> tuple[int, list[str]]:
    names = cfg.class_names
    n = cfg.num_classes
    if names is not None and n is not None and len(names) != n:
        raise DatasetError(f"--num-classes {n} but {len(names)} --class-names given")
    n = n or (len(names) if names else spec.num_classes)
    if n < 2 or n > 256:
        raise DatasetError(f"--num-classes must be 2..256, got {n}")
    if names is None:
        names = list(spec.labels) if n == spec.num_classes else [f"class_{i}" for i in range(n)]
    if 0 <= cfg.ignore_id < n:
        raise DatasetError(
            f"--ignore {cfg.ignore_id} is a real class id (< {n}); pick an id "
            f">= --num-classes (e.g. 255)"
        )
    return n, names


def _check_config(cfg: TrainConfig) -> None:
    for name, v, lo in (
        ("epochs", cfg.epochs, 1),
        ("batch-size", cfg.batch_size, 1),
        ("input-size", cfg.input_size, 33),
    ):
        if v < lo:
            raise DatasetError(f"--{name} must be >= {lo}, got {v}")
    if not cfg.lr > 0:
        raise DatasetError(f"--lr must be > 0, got {cfg.lr}")


def fine_tune(cfg: TrainConfig, report: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune ``cfg.model`` on cfg.images/cfg.masks; write weights + sidecar every epoch.

    All inputs (folders, masks, class ids, output path) are checked before any training.
    """
    _check_config(cfg)
    spec = get_spec(cfg.model)
    if not spec.keras:
        raise DatasetError(
            f"model {spec.name!r} has no Keras port; trainable models: "
            f"{', '.join(n for n, s in MODELS.items() if s.keras)}"
        )
    num_classes, labels = _classes(cfg, spec)
    pairs = pair_files(cfg.images, cfg.masks)
    counts = check_pairs(pairs, num_classes, cfg.ignore_id)
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_split, cfg.seed)
    out = resolve_out(cfg.out, spec.name, cfg.overwrite)
    report(
        f"{len(train_pairs)} train / {len(val_pairs)} val pairs, {num_classes} classes "
        f"({int((counts > 0).sum())} present), input {cfg.input_size}, base {spec.name}"
    )

    import keras

    keras.utils.set_random_seed(cfg.seed)
    model = build_finetune_model(spec, num_classes, cfg.input_size, cfg.seed)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    # jit_compile=False: XLA on CPU measured ~3x slower per step than TF's own kernels
    # (0.65 vs 2.1 s, batch 4 at 257); JAX always jits.
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.lr),
        loss=masked_sparse_ce(cfg.ignore_id),
        jit_compile=False,
    )
    kw = {"ignore_id": cfg.ignore_id, "workers": cfg.workers, "use_multiprocessing": False}
    train_ds = make_dataset(
        train_pairs,
        cfg.batch_size,
        cfg.input_size,
        augment=True,
        seed=cfg.seed,
        max_batches=cfg.max_steps,
        **kw,
    )
    val_ds = (
        make_dataset(val_pairs, cfg.batch_size, cfg.input_size, augment=False, **kw)
        if val_pairs
        else None
    )
    meta: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "base_model": spec.name,
        "num_classes": num_classes,
        "labels": labels,
        "input_size": cfg.input_size,
        "backbone": spec.backbone,
        "head_depth": spec.head_depth,
        "depth_multiplier": spec.depth_multiplier,
        "output_stride": spec.output_stride,
        "input_norm": list(spec.input_norm),
        "ignore_id": cfg.ignore_id,
        "logits_reinitialised": num_classes != spec.num_classes,
        "keras_backend": keras.backend.backend(),
        "train": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("class_names", "verbose", "overwrite")
        },
        "history": [],
    }
    result = TrainResult(out, sidecar_path(out))
    if val_ds is not None:
        result.initial = evaluate(model, val_ds, num_classes, cfg.ignore_id)
        report(f"before training: val mIoU {result.initial['miou']:.4f}")
    t_epoch = [time.perf_counter()]

    def on_epoch_end(epoch: int, logs: dict[str, Any] | None = None) -> None:
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float((logs or {}).get("loss", math.nan)),
        }
        if val_ds is not None:
            m = evaluate(model, val_ds, num_classes, cfg.ignore_id)
            row.update(val_miou=m["miou"], val_pixel_acc=m["pixel_acc"], val_iou=m["iou"])
        row["seconds"] = round(time.perf_counter() - t_epoch[0], 2)
        result.history.append(row)
        meta["history"] = result.history
        save_finetuned(model, out, meta)
        val = (
            f", val mIoU {row['val_miou']:.4f} (pixel acc {row['val_pixel_acc']:.3f})"
            if val_ds is not None
            else ""
        )
        report(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['loss']:.4f}{val}, "
            f"{row['seconds']:.1f} s -> {out}"
        )
        t_epoch[0] = time.perf_counter()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        model.fit(
            train_ds,
            epochs=cfg.epochs,
            verbose=cfg.verbose,
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)],
        )
    return result


# ---------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = TrainConfig(
            images=args.images,
            masks=args.masks,
            model=args.model,
            num_classes=args.num_classes,
            class_names=parse_class_names(args.class_names),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            input_size=args.input_size,
            val_split=args.val_split,
            ignore_id=args.ignore,
            out=args.out,
            overwrite=args.overwrite,
            max_steps=args.steps,
            freeze_backbone=args.freeze_backbone,
            seed=args.seed,
            workers=args.workers,
            verbose=1 if args.progress else 0,
        )
        res = fine_tune(cfg, report=lambda s: print(s, flush=True))
    except (DatasetError, OutputError, ValueError, FileNotFoundError) as e:
        print(f"segstream train: {e}", file=sys.stderr)
        return 1
    print(f"wrote {res.weights} and {res.sidecar}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train --images DIR --masks DIR ...``."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune the Keras DeepLab port on an images/ + masks/ folder pair",
        description="Pairs image and mask files by name (without extension). Masks are "
        "grey label images (pixel value = class id) or palette images (index = class id); "
        "--ignore ID = void.",
    )
    p.add_argument("--images", required=True, type=Path, metavar="DIR")
    p.add_argument("--masks", required=True, type=Path, metavar="DIR")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model (default {DEFAULT_MODEL}; Keras ports: "
        f"{', '.join(n for n, s in MODELS.items() if s.keras)})",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="N",
        help="classes of the new model (default: from --class-names, else the "
        "base model's; another count re-initialises the logits layer)",
    )
    p.add_argument(
        "--class-names",
        default=None,
        metavar="FILE|a,b,c",
        help="label names, one per line in FILE or comma-separated",
    )
    p.add_argument("--epochs", type=int, default=10, metavar="E")
    p.add_argument("--batch-size", type=int, default=4, metavar="B")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument(
        "--input-size",
        type=int,
        default=257,
        metavar="S",
        help="square training size (default 257; 513 is slow on a CPU)",
    )
    p.add_argument(
        "--val-split",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of pairs held out for val mIoU (default 0.1; 0: none)",
    )
    p.add_argument(
        "--ignore",
        type=int,
        default=DEFAULT_IGNORE,
        metavar="ID",
        help=f"mask id left out of loss and mIoU (default {DEFAULT_IGNORE})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="at most N steps per epoch (quick runs)",
    )
    p.add_argument(
        "--freeze-backbone", action="store_true", help="train only ASPP + logits (faster on a CPU)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH.weights.h5|DIR",
        help="weights file (a .json sidecar goes beside it) or folder "
        "(default: $SEGSTREAM_HOME/finetuned)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--workers", type=int, default=1, help="data loading threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--progress",
        action="store_true",
        help="keras' per-step progress bar (default: one line per epoch)",
    )
    p.set_defaults(func=_run)
