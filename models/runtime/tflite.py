"""The official .tflite files on the CPU (LiteRT/XNNPACK)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from segstream.models import fetch
from segstream.models.norm import FLOAT_NORM, normalize
from segstream.models.registry import ModelSpec
from segstream.models.runtime.base import DEFAULT_BATCH_SIZES, Segmenter


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

    def __init__(
        self,
        spec: ModelSpec,
        *,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        threads: int | None = None,
        input_size: int | None = None,
    ) -> None:
        size = int(input_size or spec.input_size)
        super().__init__(spec, (size, size), batch_sizes)
        self.path = fetch.model_path(spec.name)
        self.threads = int(threads or os.cpu_count() or 1)
        self._cls = _interpreter_class()
        self._content: bytes | None = None
        if size != spec.input_size:  # sizes baked into the graph need rewriting too
            from segstream.models.tflite_graph import resize_input

            self._content = resize_input(self.path.read_bytes(), size)
        self._interps: dict[int, Any] = {}
        probe = self._make(1)  # fail early (bad file, wrong kind) rather than on first frame
        self._float_input = probe.get_input_details()[0]["dtype"] == np.float32
        self.mode = "float" if self._float_input else "int8"
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
