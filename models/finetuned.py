"""Fine-tuned weights as `segstream train` writes them: ``x.weights.h5`` + the ``x.json`` sidecar.

The sidecar holds what a runtime needs to rebuild the model: base model, class count and
labels, input size and normalisation. The serving runtime, export and train all read these
files through here, so none of them depends on the training CLI. Keras is imported lazily.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

SIDECAR_FORMAT = "segstream-finetuned"
SIDECAR_VERSION = 1
_NEEDED = {
    "format",
    "num_classes",
    "labels",
    "input_size",
    "depth_multiplier",
    "output_stride",
    "input_norm",
}

PathLike = str | os.PathLike[str]


def sidecar_path(weights: PathLike) -> Path:
    """``x.weights.h5`` -> ``x.json`` (same convention as the weights cache)."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".weights.h5") + ".json")


def save_finetuned(model: Any, path: Path, meta: dict[str, Any]) -> None:
    """Weights + sidecar, each via a temp file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.weights.h5")
    try:
        with warnings.catch_warnings():  # TF variables' __array__ lacks numpy 2's copy=
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save_weights(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    side = sidecar_path(path)
    tmp_side = side.with_name(f".{side.name}.tmp{os.getpid()}")
    tmp_side.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_side, side)


def read_sidecar(weights: PathLike) -> dict[str, Any]:
    """The sidecar of a fine-tuned weights file, checked for the fields a runtime needs."""
    weights = Path(weights)
    side = sidecar_path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"fine-tuned weights {weights} not found")
    if not side.is_file():
        raise FileNotFoundError(
            f"{side} not found: fine-tuned weights need the JSON sidecar "
            f"`segstream train` writes beside them"
        )
    meta: dict[str, Any] = json.loads(side.read_text())
    if meta.get("format") != SIDECAR_FORMAT or not _NEEDED.issubset(meta):
        raise ValueError(
            f"{side} is not a segstream fine-tune sidecar (missing {sorted(_NEEDED - set(meta))})"
        )
    return meta


def load_finetuned(
    weights: PathLike,
    input_size: int | None = None,
    output: Literal["classes", "logits"] = "classes",
) -> tuple[Any, dict[str, Any]]:
    """Rebuild a fine-tuned model from ``x.weights.h5`` + ``x.json`` at any input size."""
    from segstream.models.deeplab import build_deeplab

    meta = read_sidecar(weights)
    mean, std = meta["input_norm"]
    model = build_deeplab(
        int(meta["num_classes"]),
        float(meta["depth_multiplier"]),
        int(meta["output_stride"]),
        int(input_size or meta["input_size"]),
        input_norm=(float(mean), float(std)),
        output=output,
        backbone=meta.get("backbone", "mobilenet_v2"),  # older sidecars
        head_depth=int(meta.get("head_depth", 256)),
    )
    model.load_weights(str(weights))
    return model, meta
