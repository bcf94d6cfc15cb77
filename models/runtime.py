"""Run a segmentation model on batches of frames: TFLite (CPU) or the Keras port (GPU/CPU).

``segment()`` only ever runs the fixed batch sizes given at load time (padding the last chunk)
so that neither runtime re-plans or recompiles while serving.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np

from models import fetch
from models.norm import FLOAT_NORM, normalize
from models.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

Backend = Literal["auto", "keras", "tflite"]
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
        raise ValueError(f"prepare() wants a uint8 [H, W, 3] frame, got {image.dtype} "
                         f"{image.shape}")
    if out is None:
        out = np.empty((h, w, 3), dtype=np.uint8)
    elif out.shape != (h, w, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous uint8 {(h, w, 3)} array, got {out.dtype} "
                         f"{out.shape}")
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

    def __init__(self, spec: ModelSpec, input_size: tuple[int, int],
                 batch_sizes: Sequence[int]) -> None:
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
            raise ValueError(f"{self.name}: frames must be a uint8 numpy array, got "
                             f"{getattr(frames, 'dtype', type(frames))}")
        if frames.ndim != 4 or frames.shape[1:] != (h, w, 3) or frames.shape[0] < 1:
            raise ValueError(f"{self.name}: frames must be [N>=1, {h}, {w}, 3] RGB (use "
                             f"models.runtime.prepare), got {frames.shape}")

    def segment(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, h, w, 3] at input_size -> uint8 [N, h, w] class ids (any N >= 1)."""
        self._check(frames)
        n = frames.shape[0]
        h, w = self.input_size
        out = np.empty((n, h, w), dtype=np.uint8)
        step = self.batch_sizes[-1]
        with self._lock:
            for start in range(0, n, step):
                chunk = frames[start:start + step]
                k = chunk.shape[0]
                b = self._batch_for(k)
                if b != k:  # pad to a fixed size so nothing is re-planned/recompiled
                    padded = np.zeros((b, h, w, 3), dtype=np.uint8)
                    padded[:k] = chunk
                    chunk = padded
                out[start:start + k] = self._run(np.ascontiguousarray(chunk))[:k]
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
        return (f"<{type(self).__name__} {self.name} backend={self.backend} input={h}x{w} "
                f"batches={self.batch_sizes}>")


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # tensorflow's bundled copy of the same runtime
        from tensorflow.lite.python.interpreter import Interpreter
    return Interpreter


class TFLiteSegmenter(Segmenter):
    """The official .tflite file on the CPU (XNNPACK), one interpreter per fixed batch size.

    One interpreter per batch size: resize_tensor_input + allocate_tensors on every change of
    batch size re-plans XNNPACK (measured far slower than keeping them); the memory cost is
    the activation arena of each size.
    """

    backend = "tflite"

    def __init__(self, spec: ModelSpec, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 threads: int | None = None, input_size: int | None = None) -> None:
        size = int(input_size or spec.input_size)
        super().__init__(spec, (size, size), batch_sizes)
        self.path = fetch.model_path(spec.name)
        self.threads = int(threads or os.cpu_count() or 1)
        self._cls = _interpreter_class()
        self._content: bytes | None = None
        if size != spec.input_size:  # sizes baked into the graph need rewriting too
            from models.tflite_graph import resize_input

            self._content = resize_input(self.path.read_bytes(), size)
        self._interps: dict[int, Any] = {}
        probe = self._make(1)  # fail early (bad file, wrong kind) rather than on first frame
        self._float_input = probe.get_input_details()[0]["dtype"] == np.float32
        self._interps[1] = probe

    def _make(self, b: int) -> Any:
        if self._content is not None:
            it = self._cls(model_content=self._content, num_threads=self.threads)
        else:
            it = self._cls(model_path=str(self.path), num_threads=self.threads)
        inp = it.get_input_details()[0]
        h, w = self.input_size
        if tuple(inp["shape"]) != (b, h, w, 3):
            it.resize_tensor_input(inp["index"], [b, h, w, 3], strict=False)
        it.allocate_tensors()
        return it

    def _interp(self, b: int) -> Any:
        it = self._interps.get(b)
        if it is None:
            it = self._interps[b] = self._make(b)
        return it

    def _run(self, batch: np.ndarray) -> np.ndarray:
        it = self._interp(batch.shape[0])
        inp = it.get_input_details()[0]
        # float files were exported after the graph's own normalisation, so it is done here
        x = normalize(batch, FLOAT_NORM) if self._float_input else batch
        it.set_tensor(inp["index"], x)
        it.invoke()
        res = it.get_tensor(it.get_output_details()[0]["index"])
        if res.ndim == 4:  # float logits [b, h, w, C]
            res = np.argmax(res, axis=-1)
        return res.astype(np.uint8)

    def close(self) -> None:
        self._interps.clear()


def keras_backend_name() -> str:
    """The Keras backend that will be used, defaulting to JAX where TensorFlow is absent.

    Keras itself defaults to TensorFlow and fails to import without it (the GPU image ships
    JAX only), so with no explicit choice and no TensorFlow, pick JAX before keras loads.
    """
    import sys

    if "keras" in sys.modules:
        import keras

        return keras.backend.backend()
    if "KERAS_BACKEND" not in os.environ and importlib.util.find_spec("tensorflow") is None \
            and importlib.util.find_spec("jax") is not None:
        os.environ["KERAS_BACKEND"] = "jax"
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def _gpu_device_nodes() -> bool:
    """Cheap pre-check: NVIDIA or ROCm device nodes, or an explicit override."""
    if os.environ.get("SEGSTREAM_ASSUME_GPU") == "1":
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def gpu_visible() -> bool:
    """Whether the configured Keras backend sees a GPU (imports that backend)."""
    if not _gpu_device_nodes():
        return False  # skip a multi-second framework import on plain CPU machines
    backend = keras_backend_name()
    try:
        if backend == "jax":
            if importlib.util.find_spec("jax") is None:
                return False
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "tensorflow":
            if importlib.util.find_spec("tensorflow") is None:
                return False
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    except Exception as e:  # a broken CUDA install must not stop a CPU start-up
        log.warning("GPU probe on Keras backend %s failed: %s", backend, e)
    return False


def resolve_backend(name: str, backend: Backend = "auto") -> Literal["keras", "tflite"]:
    """The runtime ``backend`` stands for: "auto" is keras when a GPU is visible, else tflite."""
    if backend not in ("auto", "keras", "tflite"):
        raise ValueError(f"backend must be 'auto', 'keras' or 'tflite', got {backend!r}")
    if backend == "auto":
        return "keras" if get_spec(name).keras and gpu_visible() else "tflite"
    return backend


def load_segmenter(
    name: str = "mnv2-voc",
    backend: Backend = "auto",
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    threads: int | None = None,
    input_size: int | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> Segmenter:
    """Load model ``name`` on ``backend`` ("auto": keras when a GPU is visible, else tflite).

    ``input_size`` overrides the model's square input (e.g. 257 for a 513 file) for speed.
    ``weights``: a `segstream train` output (``x.weights.h5`` + sidecar); needs the keras
    backend, and ``name`` is taken from the sidecar's base model.
    Raises NotFetchedError when the model file is not in the cache.
    """
    if weights is not None:
        from models.train import read_sidecar

        name = read_sidecar(weights)["base_model"]
        if backend == "tflite":
            raise ValueError("fine-tuned weights run on the keras backend, not tflite")
        backend = "keras"
    spec = get_spec(name)
    backend = resolve_backend(name, backend)
    if backend == "keras":
        if not spec.keras:
            raise ValueError(f"model {name!r} has no Keras port (tflite runtime only)")
        keras_backend_name()  # before keras is first imported: JAX where TF is absent
        from models.keras_runtime import KerasSegmenter

        return KerasSegmenter(spec, batch_sizes=batch_sizes, input_size=input_size,
                              weights=weights)
    return TFLiteSegmenter(spec, batch_sizes=batch_sizes, threads=threads, input_size=input_size)
