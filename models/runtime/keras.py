"""Keras-port segmenter: one compiled function per fixed batch size.

``mode``: "int8-faithful" (the uint8 files' default: the integer model emulated, the same
answers as the tflite runtime) or "float" (the float files, fine-tuned weights, or asked for).

TensorFlow backend: ``tf.function(jit_compile=False)`` (eager calls cost ~100+ ms of Python
overhead, and XLA on CPU is much slower than TF's own kernels). JAX backend: ``jax.jit``
over ``model.stateless_call``. TensorFlow is only imported when it is the Keras backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from segstream.models.finetuned import PathLike, load_finetuned, read_sidecar
from segstream.models.labels import voc_palette
from segstream.models.registry import ModelSpec
from segstream.models.runtime.backends import keras_backend_name
from segstream.models.runtime.base import DEFAULT_BATCH_SIZES, Segmenter
from segstream.models.tflite_import import default_mode, load_keras_model

# Segmenter.mode as /api/model shows it, by the Keras port's build mode
MODE_NAMES = {"faithful": "int8-faithful", "float": "float"}
KerasMode = Literal["faithful", "float"]


class KerasSegmenter(Segmenter):
    backend = "keras"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        input_size: int | None = None,
        weights: PathLike | None = None,
        mode: KerasMode | None = None,
    ) -> None:
        keras_backend_name()  # picks JAX when TensorFlow is not installed
        import keras

        if weights is not None and input_size is None:
            input_size = int(read_sidecar(weights)["input_size"])  # the size it was tuned at
        size = int(input_size or spec.input_size)
        super().__init__(spec, (size, size), batch_sizes)
        self.keras_backend = keras.backend.backend()
        if self.keras_backend not in ("tensorflow", "jax"):
            raise ValueError(
                f"Keras backend {self.keras_backend!r} is not supported "
                f"(use KERAS_BACKEND=tensorflow or jax)"
            )
        if weights is None:
            self.model = load_keras_model(spec.name, size, mode=mode or default_mode(spec))
        else:
            if mode == "faithful":
                raise ValueError(
                    "fine-tuned weights are float: they have no uint8 grids to "
                    "be faithful to (use keras_mode float)"
                )
            self._use_finetuned(weights, size)
        self.mode = MODE_NAMES[self.model.mode]
        self._fns: dict[int, Callable[[np.ndarray], np.ndarray]] = {}

    def _use_finetuned(self, weights: PathLike, size: int) -> None:
        """Weights from `segstream train`: its sidecar gives the classes and their names."""
        self.model, meta = load_finetuned(weights, input_size=size)
        self.model.mode = "float"
        self.name = f"{self.spec.name}+{Path(weights).name.removesuffix('.weights.h5')}"
        self.labels = list(meta["labels"])
        self.num_classes = int(meta["num_classes"])
        self.palette = voc_palette()  # the VOC colour map extends to any class count

    def _compile(self, b: int) -> Callable[[np.ndarray], np.ndarray]:
        h, w = self.input_size
        model = self.model
        if self.keras_backend == "tensorflow":
            import tensorflow as tf

            fn = tf.function(
                lambda x: model(x, training=False),
                jit_compile=False,
                input_signature=[tf.TensorSpec((b, h, w, 3), tf.uint8)],
            )
            return lambda x: fn(x).numpy()
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        jfn = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        return lambda x: np.asarray(jfn(tv, ntv, x))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        b = batch.shape[0]
        fn = self._fns.get(b)
        if fn is None:
            fn = self._fns[b] = self._compile(b)
        return fn(batch)

    def close(self) -> None:
        self._fns.clear()
