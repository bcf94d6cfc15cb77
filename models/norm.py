"""How the models turn uint8 RGB pixels into their float input: ``(x - mean) / std``.

The official files fix these numbers, so every place that normalises (the TFLite runtime for
float files, the Keras port's first layer, the weight import's check, fine-tuning sidecars)
takes them from here.
"""

from __future__ import annotations

import numpy as np

Norm = tuple[float, float]  # (mean, std)

QUANT_NORM: Norm = (128.0, 128.0)  # uint8 files: input scale 1/128, zero point 128
FLOAT_NORM: Norm = (127.5, 127.5)  # float files were cut after the graph's (x - 127.5) / 127.5


def normalize(pixels: np.ndarray, norm: Norm = FLOAT_NORM) -> np.ndarray:
    """uint8 pixels -> float32 ``(x - mean) / std``, in one new array."""
    mean, std = norm
    x = pixels.astype(np.float32)
    x -= mean
    x *= 1.0 / std
    return x
