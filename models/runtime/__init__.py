"""Run a segmentation model on batches of frames: TFLite (CPU) or the Keras port (GPU/CPU).

- ``base``: the Segmenter interface, ``prepare`` (frame -> model input), batch sizes.
- ``backends``: the Keras backend in use and GPU probing.
- ``tflite``: TFLiteSegmenter, the official files on LiteRT/XNNPACK.
- ``keras``: KerasSegmenter, the Keras 3 port (imported only when that backend is chosen).
- ``loader``: ``resolve_backend`` and ``load_segmenter``.

Each module imports only those listed before it, so none imports one that imports it back.
"""

from segstream.models.runtime.backends import gpu_visible, keras_backend_name
from segstream.models.runtime.base import BACKENDS, DEFAULT_BATCH_SIZES, Backend, Segmenter, prepare
from segstream.models.runtime.loader import load_segmenter, resolve_backend

__all__ = [
    "BACKENDS",
    "DEFAULT_BATCH_SIZES",
    "Backend",
    "Segmenter",
    "gpu_visible",
    "keras_backend_name",
    "load_segmenter",
    "prepare",
    "resolve_backend",
]
