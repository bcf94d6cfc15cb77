"""The Segmenter interface every runtime implements, and ``prepare`` for its input frames.

``segment()`` only ever runs the fixed batch sizes given at load time (padding the last chunk)
so that neither runtime re-plans or recompiles while serving.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from segstream.models.registry import ModelSpec

Backend = Literal["auto", "keras", "tflite"]
BACKENDS: tuple[Backend, ...] = ("auto", "keras", "tflite")
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8)


def prepare(
    image: np.ndarray,
    size: int | tuple[int, int],
    out: np.ndarray | None = None,
    bgr: bool = False,
) -> np.ndarray:
    """Resize a uint8 [H, W, 3] frame to the model input ``size`` ((h, w) or square int).

    Bilinear (cv2.INTER_LINEAR), like the reference numbers in ../shared were measured with.
    Writes into ``out`` (uint8 [h, w, 3], contiguous, e.g. a row of a batch buffer) when given;
    converts BGR (OpenCV/PyAV "bgr24") to RGB when ``bgr``. Returns the RGB frame.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"prepare() wants a uint8 [H, W, 3] frame, got {image.dtype} {image.shape}"
        )
    if out is None:
        out = np.empty((h, w, 3), dtype=np.uint8)
    elif out.shape != (h, w, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a contiguous uint8 {(h, w, 3)} array, got {out.dtype} {out.shape}"
        )
    if image.shape[:2] == (h, w):
        np.copyto(out, image)
    else:
        cv2.resize(image, (w, h), dst=out, interpolation=cv2.INTER_LINEAR)
    if bgr:
        cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=out)
    return out


class Segmenter(abc.ABC):
    """A loaded model. ``segment()`` may be called from one worker thread at a time."""

    backend: str
    mode: str | None = None  # how it computes: "int8", "int8-faithful", "float"

    def __init__(
        self, spec: ModelSpec, input_size: tuple[int, int], batch_sizes: Sequence[int]
    ) -> None:
        sizes = tuple(sorted({int(b) for b in batch_sizes}))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        self.name = spec.name
        self.spec = spec
        self.input_size = input_size
        self.num_classes = spec.num_classes
        self.labels = list(spec.labels)
        self.palette = spec.palette_array()
        self.batch_sizes = sizes
        self._lock = threading.Lock()  # guards against accidental concurrent segment() calls

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [b, h, w, 3] with b in batch_sizes -> uint8 [b, h, w] class ids."""

    def _batch_for(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def _check(self, frames: np.ndarray) -> None:
        h, w = self.input_size
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: frames must be a uint8 numpy array, got "
                f"{getattr(frames, 'dtype', type(frames))}"
            )
        if frames.ndim != 4 or frames.shape[1:] != (h, w, 3) or frames.shape[0] < 1:
            raise ValueError(
                f"{self.name}: frames must be [N>=1, {h}, {w}, 3] RGB (use "
                f"models.runtime.prepare), got {frames.shape}"
            )

    def segment(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, h, w, 3] at input_size -> uint8 [N, h, w] class ids (any N >= 1)."""
        self._check(frames)
        n = frames.shape[0]
        h, w = self.input_size
        out = np.empty((n, h, w), dtype=np.uint8)
        step = self.batch_sizes[-1]
        with self._lock:
            for start in range(0, n, step):
                chunk = frames[start : start + step]
                k = chunk.shape[0]
                b = self._batch_for(k)
                if b != k:  # pad to a fixed size so nothing is re-planned/recompiled
                    padded = np.zeros((b, h, w, 3), dtype=np.uint8)
                    padded[:k] = chunk
                    chunk = padded
                out[start : start + k] = self._run(np.ascontiguousarray(chunk))[:k]
        return out

    def warmup(self) -> None:
        """Run every fixed batch size once (allocations, kernel planning, compilation)."""
        h, w = self.input_size
        with self._lock:
            for b in self.batch_sizes:
                self._run(np.zeros((b, h, w, 3), dtype=np.uint8))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources; the segmenter must not be used afterwards."""

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        h, w = self.input_size
        return (
            f"<{type(self).__name__} {self.name} backend={self.backend} mode={self.mode} "
            f"input={h}x{w} batches={self.batch_sizes}>"
        )
