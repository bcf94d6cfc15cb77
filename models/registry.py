"""What models and sample files segstream knows: file names, checksums, public URLs, labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from segstream.models.labels import CITYSCAPES_LABELS, VOC_LABELS, cityscapes_palette, voc_palette
from segstream.models.norm import FLOAT_NORM, QUANT_NORM, Norm

TfliteKind = Literal["argmax_uint8", "logits_float"]
Backbone = Literal["mobilenet_v2", "mobilenet_edgetpu"]

_CORAL = "https://raw.githubusercontent.com/google-coral/test_data/104342d2d3480b3e66203073dac24f4e2dbb4c41"
_FLUTTER = "https://raw.githubusercontent.com/shaqian/flutter_tflite/ce8075a391e02e0cc0bc6c2db950aa961a17d745"
_PSEUDO = "https://raw.githubusercontent.com/Pseudo-Lab/ModelCompression/71a3b528332e0018d0486471b839001818058b5b"


@dataclass(frozen=True)
class ModelSpec:
    """One TFLite file and how to run / port it.

    ``tflite_kind``: "argmax_uint8" files take uint8 RGB and output int64 class ids;
    "logits_float" files take float input normalised by FLOAT_NORM and output float logits.
    ``backbone``/``depth_multiplier``/``output_stride``/``head_depth`` describe the network
    the Keras port builds (None: not portable, tflite runtime only).
    """

    name: str
    filename: str
    sha256: str
    url: str
    labels: list[str] = field(hash=False)
    palette: Callable[[], np.ndarray] | np.ndarray = field(hash=False, compare=False)
    input_size: int
    depth_multiplier: float | None
    output_stride: int | None
    tflite_kind: TfliteKind
    keras: bool
    description: str = ""
    backbone: Backbone = "mobilenet_v2"
    head_depth: int = 256  # ASPP depth

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def quantized(self) -> bool:
        """A uint8 file: its Keras port defaults to the int8-faithful mode."""
        return self.tflite_kind == "argmax_uint8"

    @property
    def input_norm(self) -> Norm:
        """(mean, std) taking uint8 RGB to what the file's first layer expects."""
        return FLOAT_NORM if self.tflite_kind == "logits_float" else QUANT_NORM

    def palette_array(self) -> np.ndarray:
        """The palette as uint8 [256, 3] RGB whether it was given as an array or a callable."""
        pal = self.palette() if callable(self.palette) else self.palette
        return np.asarray(pal, dtype=np.uint8)


@dataclass(frozen=True)
class SampleSpec:
    """A demo/sample data file fetched next to the models."""

    name: str
    filename: str
    sha256: str
    url: str
    description: str = ""


def _voc(name: str, filename: str, sha: str, url: str, **kw: object) -> ModelSpec:
    return ModelSpec(
        name=name,
        filename=filename,
        sha256=sha,
        url=url,
        labels=VOC_LABELS,
        palette=voc_palette,
        keras=True,
        **kw,  # type: ignore[arg-type]
    )


_SPECS = [
    _voc(
        "mnv2-voc",
        "deeplabv3_mnv2_pascal_quant.tflite",
        "350af47fd346ea6d74b58833a351f583ba860e9806ec5bd292ff8d8f1f249398",
        f"{_CORAL}/deeplabv3_mnv2_pascal_quant.tflite",
        input_size=513,
        depth_multiplier=1.0,
        output_stride=16,
        tflite_kind="argmax_uint8",
        description="DeepLabv3 MobileNetV2 x1.0, Pascal VOC, uint8 QAT (default)",
    ),
    _voc(
        "mnv2-voc-fast",
        "deeplabv3_mnv2_dm05_pascal_quant.tflite",
        "0470d2a782aa54eeeb99d32e7b6b3fb7722905c7c4f5d26bd957ec861366d48b",
        f"{_CORAL}/deeplabv3_mnv2_dm05_pascal_quant.tflite",
        input_size=513,
        depth_multiplier=0.5,
        output_stride=16,
        tflite_kind="argmax_uint8",
        description="DeepLabv3 MobileNetV2 x0.5, Pascal VOC, uint8 (fast)",
    ),
    _voc(
        "mnv2-voc-dm05-float",
        "deeplabv3_mnv2_dm05_pascal_trainval_fp32.tflite",
        "504e35c9848e5f2f904cacbb7bd92e333071762f761211fa561c1855292bd0c3",
        f"{_PSEUDO}/python/fp32.tflite",
        input_size=513,
        depth_multiplier=0.5,
        output_stride=8,
        tflite_kind="logits_float",
        description="DeepLabv3 MobileNetV2 x0.5, Pascal VOC trainval, float32 513",
    ),
    _voc(
        "mnv2-voc-257",
        "deeplabv3_257_mv_gpu.tflite",
        "68a539782c2c6a72f8aac3724600124a85ed977162b44e84cbae5db717c933c6",
        f"{_FLUTTER}/example/assets/deeplabv3_257_mv_gpu.tflite",
        input_size=257,
        depth_multiplier=0.5,
        output_stride=8,
        tflite_kind="logits_float",
        description="DeepLabv3 MobileNetV2 x0.5, Pascal VOC, float32 257 (TFLite GPU demo)",
    ),
    ModelSpec(
        name="edgetpu-cityscapes",
        filename="deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite",
        sha256="322fe29945cb1693f426952f2a330ab67ea5678545ddee6f2548e0cfd0ca03e5",
        url=f"{_CORAL}/deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite",
        labels=CITYSCAPES_LABELS,
        palette=cityscapes_palette,
        input_size=513,
        depth_multiplier=0.75,
        output_stride=16,
        tflite_kind="argmax_uint8",
        keras=True,
        backbone="mobilenet_edgetpu",
        head_depth=128,
        description="DeepLab MobileNet-EdgeTPU x0.75 slim, Cityscapes 19 trainIds, uint8",
    ),
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
DEFAULT_MODEL = "mnv2-voc"

SAMPLES: dict[str, SampleSpec] = {
    "vtest": SampleSpec(
        name="vtest",
        filename="vtest.avi",
        sha256="45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
        url="https://raw.githubusercontent.com/opencv/opencv/4.6.0/samples/data/vtest.avi",
        description="OpenCV sample: campus pedestrians, 768x576, 10 fps, 795 frames",
    ),
}


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; ValueError naming the valid ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None


def get_sample(name: str) -> SampleSpec:
    """The spec of sample ``name``; ValueError naming the valid ones otherwise."""
    try:
        return SAMPLES[name]
    except KeyError:
        raise ValueError(f"unknown sample {name!r}; valid names: {', '.join(SAMPLES)}") from None
