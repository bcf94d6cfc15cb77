"""Pick a runtime for a model and load it: ``load_segmenter``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

from segstream.models.finetuned import read_sidecar
from segstream.models.registry import get_spec
from segstream.models.runtime.backends import gpu_visible, keras_backend_name
from segstream.models.runtime.base import BACKENDS, DEFAULT_BATCH_SIZES, Backend, Segmenter
from segstream.models.runtime.tflite import TFLiteSegmenter


def resolve_backend(name: str, backend: Backend = "auto") -> Literal["keras", "tflite"]:
    """The runtime ``backend`` stands for: "auto" is keras when a GPU is visible, else tflite."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
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
    keras_mode: Literal["faithful", "float"] | None = None,
) -> Segmenter:
    """Load model ``name`` on ``backend`` ("auto": keras when a GPU is visible, else tflite).

    ``input_size`` overrides the model's square input (e.g. 257 for a 513 file) for speed.
    ``weights``: a `segstream train` output (``x.weights.h5`` + sidecar); needs the keras
    backend, and ``name`` is taken from the sidecar's base model.
    ``keras_mode`` (keras backend): "faithful" (int8-faithful, the default for the uint8 files:
    the same answers as the tflite runtime) or "float" (the default for float files and
    fine-tuned weights). Ignored on tflite. The segmenter's ``mode`` says what runs.
    Raises NotFetchedError when the model file is not in the cache.
    """
    if weights is not None:
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
        from segstream.models.runtime.keras import KerasSegmenter  # lazily: imports keras

        return KerasSegmenter(
            spec, batch_sizes=batch_sizes, input_size=input_size, weights=weights, mode=keras_mode
        )
    return TFLiteSegmenter(spec, batch_sizes=batch_sizes, threads=threads, input_size=input_size)
