"""DeepLabv3 + MobileNetV2 in Keras 3, layer for layer as the official TF-slim graph.

Backend-neutral (keras.layers / keras.ops only), so it runs on TensorFlow and on JAX. The
model takes uint8 RGB [N, H, W, 3] and returns uint8 class ids [N, H, W] (or float logits).
Batch norm is folded into the convolutions (conv + bias), as in the TFLite files.

Layers are named after their TF scopes ("MobilenetV2/expanded_conv_3/depthwise" ->
"MobilenetV2__expanded_conv_3__depthwise") so the weight import can map tensors by name;
``conv_layers(model)`` lists them with the options the file must agree with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import keras
import numpy as np
from keras import layers, ops

from models.norm import QUANT_NORM, Norm

# TF-slim MobileNetV2 (t expansion, c channels, n repeats, s stride) after the first conv.
_MNV2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]
HEAD_DEPTH = 256  # DeepLab's ASPP depth, not scaled by the depth multiplier

Activation = Literal["relu6", "relu", "none"]
Output = Literal["classes", "logits"]


@dataclass(frozen=True)
class ConvInfo:
    """What the imported file must agree with for one conv layer."""

    scope: str            # TF scope, e.g. "MobilenetV2/expanded_conv_3/depthwise"
    layer: str            # Keras layer name
    depthwise: bool
    stride: int
    dilation: int
    activation: Activation


def layer_name(scope: str) -> str:
    return scope.replace("/", "__")


@keras.saving.register_keras_serializable(package="segstream")
class Normalize(layers.Layer):
    """uint8 RGB -> float32 (x - mean) / std, as the file's input quantization defines."""

    def __init__(self, mean: float, std: float, **kw: object) -> None:
        super().__init__(**kw)
        self.mean, self.std = float(mean), float(std)

    def call(self, x):
        return (ops.cast(x, "float32") - self.mean) * (1.0 / self.std)


@keras.saving.register_keras_serializable(package="segstream")
class GlobalPoolBroadcast(layers.Layer):
    """Image pooling branch's ends: global average, and 1x1 -> (h, w) upsampling.

    An align_corners bilinear resize from 1x1 copies the single value everywhere.
    """

    def __init__(self, mode: Literal["pool", "broadcast"], size: tuple[int, int] = (1, 1),
                 **kw: object) -> None:
        super().__init__(**kw)
        self.mode, self.size = mode, size

    def call(self, x):
        if self.mode == "pool":
            return ops.mean(x, axis=(1, 2), keepdims=True)
        shape = ops.shape(x)
        return ops.broadcast_to(x, (shape[0], self.size[0], self.size[1], shape[3]))


def align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of TF's legacy ResizeBilinear(align_corners=True) on one axis.

    out[i] = in[lo[i]] * (1 - w[i]) + in[hi[i]] * w[i] with src = i * (n_in-1)/(n_out-1),
    computed in float32 like TF does.
    """
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, n_in - 1).astype(np.int32)
    return lo, hi, (src - lo).astype(np.float32)


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] interpolation matrix of the align_corners resize on one axis."""
    lo, hi, w = align_corners_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - w)
    np.add.at(m, (rows, hi), w)
    return m


@keras.saving.register_keras_serializable(package="segstream")
class ResizeAlignCorners(layers.Layer):
    """Bilinear resize with align_corners=True, half_pixel_centers=False (Keras has none).

    Separable: rows, then columns, each as a matmul with an interpolation matrix built in
    numpy for the fixed sizes (einsum maps to one batched GEMM on every backend).
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int],
                 **kw: object) -> None:
        super().__init__(**kw)
        self.in_size, self.out_size = in_size, out_size
        self._my = align_corners_matrix(in_size[0], out_size[0])
        self._mx = align_corners_matrix(in_size[1], out_size[1])

    def call(self, x):
        my = ops.convert_to_tensor(self._my)
        mx = ops.convert_to_tensor(self._mx)
        x = ops.einsum("ip,npqc->niqc", my, x)
        return ops.einsum("jq,niqc->nijc", mx, x)


@keras.saving.register_keras_serializable(package="segstream")
class ArgmaxUint8(layers.Layer):
    """Class ids over the last axis, as uint8 (first maximum wins, like TFLite ARG_MAX)."""

    def call(self, x):
        return ops.cast(ops.argmax(x, axis=-1), "uint8")


def _depth(channels: int, multiplier: float) -> int:
    return max(8, int(channels * multiplier))


def _out_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)  # SAME padding


def _conv(x, scope: str, filters: int, kernel: int, stride: int, act: Activation,
          infos: list[ConvInfo]):
    name = layer_name(scope)
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", name=name)(x)
    infos.append(ConvInfo(scope, name, False, stride, 1, act))
    return _act(x, act, name)


def _dwconv(x, scope: str, stride: int, dilation: int, infos: list[ConvInfo]):
    name = layer_name(scope)
    x = layers.DepthwiseConv2D(3, strides=stride, dilation_rate=dilation, padding="same",
                               name=name)(x)
    infos.append(ConvInfo(scope, name, True, stride, dilation, "relu6"))
    return _act(x, "relu6", name)


def _act(x, act: Activation, name: str):
    if act == "relu6":
        return layers.ReLU(6.0, name=f"{name}__relu6")(x)
    if act == "relu":
        return layers.ReLU(name=f"{name}__relu")(x)
    return x


def build_deeplab(
    num_classes: int = 21,
    depth_multiplier: float = 1.0,
    output_stride: int = 16,
    input_size: int | tuple[int, int] = 513,
    batch_size: int | None = None,
    *,
    input_norm: Norm = QUANT_NORM,
    output: Output = "classes",
) -> keras.Model:
    """DeepLabv3 (image pooling + 1x1 ASPP, no atrous branches) on TF-slim MobileNetV2.

    ``input_norm`` = (mean, std), see models.norm (``ModelSpec.input_norm`` gives a file's).
    ``output`` "classes": uint8 [N, H, W]; "logits": float32 [N, H, W, num_classes].
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    infos: list[ConvInfo] = []
    inp = keras.Input((h, w, 3), batch_size=batch_size, dtype="uint8", name="image")
    x = Normalize(*input_norm, name="normalize")(inp)

    current_stride, rate = 2, 1
    fh, fw = _out_size(h, 2), _out_size(w, 2)
    x = _conv(x, "MobilenetV2/Conv", _depth(32, depth_multiplier), 3, 2, "relu6", infos)
    in_ch = _depth(32, depth_multiplier)
    block = 0
    for t, c, n, s in _MNV2_BLOCKS:
        for i in range(n):
            stride = s if i == 0 else 1
            if stride > 1 and current_stride == output_stride:
                layer_stride, layer_rate, rate = 1, rate, rate * stride  # atrous from here on
            else:
                layer_stride, layer_rate = stride, rate
                current_stride *= stride
                fh, fw = _out_size(fh, stride), _out_size(fw, stride)
            scope = "MobilenetV2/expanded_conv" + (f"_{block}" if block else "")
            out_ch = _depth(c, depth_multiplier)
            y = x
            if t != 1:
                y = _conv(y, f"{scope}/expand", in_ch * t, 1, 1, "relu6", infos)
            y = _dwconv(y, f"{scope}/depthwise", layer_stride, layer_rate, infos)
            y = _conv(y, f"{scope}/project", out_ch, 1, 1, "none", infos)
            if layer_stride == 1 and in_ch == out_ch:
                y = layers.Add(name=layer_name(f"{scope}/add"))([y, x])
            x, in_ch = y, out_ch
            block += 1

    pool = GlobalPoolBroadcast("pool", name="image_pooling__avgpool")(x)
    pool = _conv(pool, "image_pooling", HEAD_DEPTH, 1, 1, "relu", infos)
    pool = GlobalPoolBroadcast("broadcast", (fh, fw), name="image_pooling__resize")(pool)
    aspp0 = _conv(x, "aspp0", HEAD_DEPTH, 1, 1, "relu", infos)
    y = layers.Concatenate(axis=-1, name="concat")([pool, aspp0])
    y = _conv(y, "concat_projection", HEAD_DEPTH, 1, 1, "relu", infos)
    y = _conv(y, "logits/semantic", num_classes, 1, 1, "none", infos)
    y = ResizeAlignCorners((fh, fw), (h, w), name="resize_logits")(y)
    if output == "classes":
        y = ArgmaxUint8(name="argmax")(y)
    model = keras.Model(inp, y, name=f"deeplabv3_mnv2_dm{depth_multiplier:g}_os{output_stride}")
    model.conv_infos = infos  # read by the weight import
    model.feature_size = (fh, fw)
    return model


def conv_layers(model: keras.Model) -> list[ConvInfo]:
    """The conv layers of a build_deeplab model, in graph order."""
    infos = getattr(model, "conv_infos", None)
    if infos is None:
        raise ValueError(f"{model.name} was not built by build_deeplab (no conv_infos)")
    return list(infos)
