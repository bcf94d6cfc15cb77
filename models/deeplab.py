"""DeepLabv3 on MobileNetV2 or MobileNet-EdgeTPU in Keras 3, layer for layer as the TF-slim graphs.

Backend-neutral (keras.layers / keras.ops only), so it runs on TensorFlow and on JAX. The
model takes uint8 RGB [N, H, W, 3] and returns uint8 class ids [N, H, W] (or float logits).
Batch norm is folded into the convolutions (conv + bias), as in the TFLite files.

Two modes:

- float (``quant=None``): the dequantized weights in float32. What `train` fine-tunes and
  `export` writes by default; it reproduces the float files exactly.
- int8-faithful (``quant=`` the grids of a uint8 file, see ``quant_sites``): the integer model
  computed in float32, in the integer domain. Tensors carry q - zero_point (exact small
  integers), the convs run on the integer weights (q_w - zp_w) plus the int32 bias (exact in
  float32 while sums stay below 2**24; the import checks the biases), and every tensor the
  TFLite graph holds as uint8 is requantized where the file does it, with the arithmetic of
  the reference runtime (TFLite + XNNPACK on x86-64): conv outputs by the float32 multiplier
  s_in * s_w / s_out, round half to even, clamp to the fused activation's uint8 range; the
  residual adds with XNNPACK's 20-bit fixed-point multipliers; the global average pool with
  integer rounding; the pooling branch's QUANTIZE with XNNPACK's 8-bit multiplier; the logits
  resize in uint8 (floor(v + 0.5)); the argmax on the uint8 logits, ties to the lowest id.
  Checked op by op against the file's own intermediate tensors: bit-exact. Where the model
  is unsure, float activations flip whole regions; on the integer grid they follow the file.

Layers are named after their TF scopes ("MobilenetV2/expanded_conv_3/depthwise" ->
"MobilenetV2__expanded_conv_3__depthwise") so the weight import can map tensors by name;
``conv_layers(model)`` lists them with the options the file must agree with, and
``quant_sites(model)`` the uint8 tensors whose scales it needs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np
from keras import layers, ops

from segstream.models.norm import QUANT_NORM, Norm
from segstream.models.registry import Backbone

# TF-slim MobileNetV2 (t expansion, c channels, n repeats, s stride) after the first conv.
_MNV2_BLOCKS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
HEAD_DEPTH = 256  # DeepLab's ASPP depth, not scaled by the depth multiplier


@dataclass(frozen=True)
class _EdgeTPUBlock:
    fused: bool  # fused inverted bottleneck: a full k x k expand conv, no depthwise
    expansion: int  # expansion factor of the input channels
    channels: int  # output channels before the depth multiplier
    stride: int
    kernel: int
    residual: bool = True


_E = _EdgeTPUBlock
# TF-slim mobilenet_v3.V3_EDGETPU after its first 3x3/2 conv (32 channels), then Conv_1 1x1.
_EDGETPU_BLOCKS = [
    _E(True, 1, 16, 1, 3, residual=False),
    _E(True, 8, 32, 2, 3),
    _E(True, 4, 32, 1, 3),
    _E(True, 4, 32, 1, 3),
    _E(True, 4, 32, 1, 3),
    _E(True, 8, 48, 2, 3),
    _E(True, 4, 48, 1, 3),
    _E(True, 4, 48, 1, 3),
    _E(True, 4, 48, 1, 3),
    _E(False, 8, 96, 2, 3),
    _E(False, 4, 96, 1, 3),
    _E(False, 4, 96, 1, 3),
    _E(False, 4, 96, 1, 3),
    _E(False, 8, 96, 1, 3, residual=False),
    _E(False, 4, 96, 1, 3),
    _E(False, 4, 96, 1, 3),
    _E(False, 4, 96, 1, 3),
    _E(False, 8, 160, 2, 5),
    _E(False, 4, 160, 1, 5),
    _E(False, 4, 160, 1, 5),
    _E(False, 4, 160, 1, 5),
    _E(False, 8, 192, 1, 3),
]
EDGETPU_LAST_CONV = 1280  # Conv_1, not scaled by the depth multiplier

BACKBONES: tuple[Backbone, ...] = ("mobilenet_v2", "mobilenet_edgetpu")
_SCOPE_ROOT = {"mobilenet_v2": "MobilenetV2", "mobilenet_edgetpu": "MobilenetEdgeTPU"}
Activation = Literal["relu6", "relu", "none"]
Output = Literal["classes", "logits"]
Mode = Literal["float", "faithful"]
MODES: tuple[Mode, ...] = ("float", "faithful")

# The uint8 tensors outside the convs and adds, named as quant_sites() names them.
SITE_INPUT = "input"  # the uint8 image
SITE_POOL = "image_pooling/pool"  # AVERAGE_POOL_2D output
SITE_BROADCAST = "image_pooling/broadcast"  # RESIZE_BILINEAR / TILE 1x1 -> feature size
SITE_REQUANT = "image_pooling/requantize"  # QUANTIZE to the concat's scale
SITE_CONCAT = "concat"
SITE_LOGITS_RESIZE = "logits/resize"  # RESIZE_BILINEAR to the input size


@dataclass(frozen=True)
class QuantParams:
    """One uint8 tensor's grid: real = scale * (q - zero_point), q in [0, 255]."""

    scale: float
    zero_point: int

    def as_list(self) -> list[float]:
        return [float(self.scale), int(self.zero_point)]


@dataclass(frozen=True)
class ConvInfo:
    """What the imported file must agree with for one conv layer."""

    scope: str  # TF scope, e.g. "MobilenetV2/expanded_conv_3/depthwise"
    layer: str  # Keras layer name
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


def _f32(*values: float) -> list[Any]:
    return [ops.convert_to_tensor(v, "float32") for v in values]


def _requant_clip(x, multiplier, lo, hi):
    return ops.clip(ops.round(x * multiplier), lo, hi)


def _requant_min(x, multiplier, lo, hi):
    return ops.minimum(ops.round(x * multiplier), hi)


def _add(a, b, a_multiplier, b_multiplier, rounding, shift, lo, hi):
    acc = ops.cast(a, "int32") * a_multiplier + ops.cast(b, "int32") * b_multiplier + rounding
    return ops.clip(ops.cast(ops.right_shift(acc, shift), "float32"), lo, hi)


# Tensors below this many elements are requantized by TensorFlow's own kernels on TF.
XLA_MIN_ELEMENTS = 4_000_000


def fused(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, its element-wise ops fused into one pass where that pays.

    JAX jit-compiles the whole model: XLA fuses each requantization's multiply, round and
    clamps into one loop. The keras runtime runs TensorFlow's own kernels (on CPU its convs
    beat XLA's), one memory pass per op, so there a large tensor's function alone is compiled
    by XLA (the numbers it uses are passed as tensors, so one compilation serves every layer
    of the same shape). A small tensor's three passes cost less than launching the compiled
    cluster: mnv2-voc at batch 1 costs +20-25 % over the float model with every tensor
    through XLA, +13-16 % with those under XLA_MIN_ELEMENTS as plain ops; with every tensor
    as plain ops batch 8 costs +24-26 % (scripts/bench_model.py --interleave, 2 cores).
    """
    if keras.backend.backend() != "tensorflow":
        return fn(*args)
    shape = tuple(args[0].shape)
    if None not in shape and int(np.prod(shape)) < XLA_MIN_ELEMENTS:
        return fn(*args)
    return _xla(fn)(*args)


@functools.cache
def _xla(fn: Callable[..., Any]) -> Callable[..., Any]:
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=False)


@keras.saving.register_keras_serializable(package="segstream")
class QuantizeInput(layers.Layer):
    """uint8 RGB -> q - zero_point of the file's input grid (faithful mode), as float32."""

    def __init__(self, zero_point: int, **kw: object) -> None:
        super().__init__(**kw)
        self.zero_point = int(zero_point)

    def call(self, x):
        return ops.cast(x, "float32") - float(self.zero_point)


@keras.saving.register_keras_serializable(package="segstream")
class Requant(layers.Layer):
    """A conv accumulator (int32 in float32) -> the output's q - zp, as XNNPACK requantizes.

    clip(round_half_even(acc * multiplier), lo, hi): the float32 multiplier is
    s_in * s_w / s_out computed in float32, [lo, hi] the fused activation's uint8 range
    less the zero point. With lo == 0 the conv before it has a ReLU (exact: the multiplier
    is positive), which TensorFlow fuses into the conv, so only the upper clamp is left.
    """

    def __init__(self, multiplier: float, lo: int, hi: int, **kw: object) -> None:
        super().__init__(**kw)
        self.multiplier, self.lo, self.hi = float(np.float32(multiplier)), int(lo), int(hi)

    def call(self, x):
        # lo == 0: a fused ReLU (in the conv) already did the lower clamp
        return fused(
            _requant_clip if self.lo else _requant_min, x, *_f32(self.multiplier, self.lo, self.hi)
        )


@keras.saving.register_keras_serializable(package="segstream")
class QuantAdd(layers.Layer):
    """uint8 ADD of two grids into a third, in XNNPACK's fixed point (int32 arithmetic).

    out - zp = (a * ma + b * mb + 2**(shift-1)) >> shift, with a, b the inputs' q - zp and
    ma, mb = round(s_a / s_out * 2**shift), round(s_b / s_out * 2**shift): 20-bit
    multipliers, which a float rounding would disagree with near one half.
    """

    def __init__(
        self, a_multiplier: int, b_multiplier: int, shift: int, lo: int, hi: int, **kw: object
    ) -> None:
        super().__init__(**kw)
        self.a_multiplier, self.b_multiplier = int(a_multiplier), int(b_multiplier)
        self.shift, self.lo, self.hi = int(shift), int(lo), int(hi)

    def call(self, inputs):
        ints = (
            ops.convert_to_tensor(v, "int32")
            for v in (self.a_multiplier, self.b_multiplier, 1 << (self.shift - 1), self.shift)
        )
        return fused(_add, *inputs, *ints, *_f32(self.lo, self.hi))


def add_multipliers(a: QuantParams, b: QuantParams, out: QuantParams) -> tuple[int, int, int]:
    """XNNPACK's (a_multiplier, b_multiplier, shift) for a uint8 ADD a + b -> out."""
    ra = np.float32(a.scale) / np.float32(out.scale)
    rb = np.float32(b.scale) / np.float32(out.scale)
    exponent = int(np.frombuffer(max(ra, rb).tobytes(), np.uint32)[0] >> 23) - 127
    shift = 20 - exponent
    if not 12 <= shift <= 30:
        raise ValueError(f"ADD scale ratio {max(ra, rb)} is outside XNNPACK's range")
    two = np.float32(2.0**shift)
    return int(np.rint(ra * two)), int(np.rint(rb * two)), shift


@keras.saving.register_keras_serializable(package="segstream")
class QuantAvgPool(layers.Layer):
    """Global average of uint8 values, rounded like TFLite: (sum + n // 2) // n, in q - zp."""

    def __init__(self, zero_point: int, **kw: object) -> None:
        super().__init__(**kw)
        self.zero_point = int(zero_point)

    def call(self, x):
        n = int(x.shape[1]) * int(x.shape[2])
        total = ops.sum(x + float(self.zero_point), axis=(1, 2), keepdims=True)
        # exact: integer sums below 2**24, and IEEE division is correctly rounded
        return ops.floor((total + float(n // 2)) / float(n)) - float(self.zero_point)


@keras.saving.register_keras_serializable(package="segstream")
class Requantize(layers.Layer):
    """uint8 -> uint8 QUANTIZE to another grid, as XNNPACK's convert kernel computes it.

    In q - zp terms: clip(floor((u * m + 128) / 256), -zp_out, 255 - zp_out) with the 8-bit
    fixed-point multiplier m = round(256 * s_in / s_out); an exact float rounding would
    disagree on values whose fraction lies near one half.
    """

    def __init__(self, multiplier: int, zero_point_out: int, **kw: object) -> None:
        super().__init__(**kw)
        self.multiplier, self.zero_point_out = int(multiplier), int(zero_point_out)

    def call(self, x):
        q = ops.floor((x * float(self.multiplier) + 128.0) * (1.0 / 256.0))
        return ops.clip(q, -float(self.zero_point_out), 255.0 - self.zero_point_out)


def requantize_multiplier(src: QuantParams, dst: QuantParams) -> int:
    return int(np.rint(np.float32(256.0) * (np.float32(src.scale) / np.float32(dst.scale))))


@keras.saving.register_keras_serializable(package="segstream")
class GlobalPoolBroadcast(layers.Layer):
    """Image pooling branch's ends: global average, and 1x1 -> (h, w) upsampling.

    An align_corners bilinear resize from 1x1 (or a TILE) copies the single value everywhere.
    """

    def __init__(
        self, mode: Literal["pool", "broadcast"], size: tuple[int, int] = (1, 1), **kw: object
    ) -> None:
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

    With ``quant`` = (scale, zero_point) the input is q - zero_point of that uint8 grid
    (faithful mode) and the resize is TFLite's uint8 one: it interpolates the integers q and
    rounds half up (floor(v + 0.5), checked against the file's own outputs). ``emit``
    "uint8" returns those as uint8 (what the argmax reads, ties intact; an integer argmax
    also skips the float one's -0.0 handling), "real" their dequantized values.
    """

    def __init__(
        self,
        in_size: tuple[int, int],
        out_size: tuple[int, int],
        quant: tuple[float, int] | list[float] | None = None,
        emit: Literal["real", "uint8"] = "real",
        **kw: object,
    ) -> None:
        super().__init__(**kw)
        self.in_size, self.out_size = tuple(in_size), tuple(out_size)
        self.quant = None if quant is None else (float(quant[0]), int(quant[1]))
        self.emit = emit
        self._my = align_corners_matrix(in_size[0], out_size[0])
        self._mx = align_corners_matrix(in_size[1], out_size[1])

    def call(self, x):
        my = ops.convert_to_tensor(self._my)
        mx = ops.convert_to_tensor(self._mx)
        if self.quant is None:
            x = ops.einsum("ip,npqc->niqc", my, x)
            return ops.einsum("jq,niqc->nijc", mx, x)
        scale, zp = self.quant
        # q + 0.5 on the small input: the taps of each output sum to one, so the rounding
        # offset passes through the interpolation and only a floor is left on the big output
        q = x + (zp + 0.5)
        q = ops.einsum("ip,npqc->niqc", my, q)
        q = ops.einsum("jq,niqc->nijc", mx, q)
        if self.emit == "uint8":  # v >= 0.5: the truncating cast is the floor
            return ops.cast(q, "uint8")
        return (ops.floor(q) - zp) * scale


@keras.saving.register_keras_serializable(package="segstream")
class ArgmaxUint8(layers.Layer):
    """Class ids over the last axis, as uint8 (first maximum wins, like TFLite ARG_MAX)."""

    def call(self, x):
        return ops.cast(ops.argmax(x, axis=-1), "uint8")


def _depth(channels: int, multiplier: float) -> int:
    return max(8, int(channels * multiplier))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """TF-slim's channel rounding (mobilenet.py): nearest multiple, never 10 % below."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _out_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)  # SAME padding


def act_range(act: Activation, q: QuantParams) -> tuple[int, int]:
    """The fused activation's uint8 range on grid ``q``, less its zero point (as TFLite)."""
    lo, hi = 0, 255
    if act in ("relu", "relu6"):
        lo = max(lo, q.zero_point)
    if act == "relu6":
        hi = min(hi, q.zero_point + int(np.rint(np.float32(6.0) / np.float32(q.scale))))
    return lo - q.zero_point, hi - q.zero_point


class _Builder:
    """Adds layers in graph order; records conv infos, quant sites and each tensor's grid."""

    def __init__(self, quant: Mapping[str, QuantParams] | None) -> None:
        self.quant = quant
        self.infos: list[ConvInfo] = []
        self.sites: list[str] = []
        self._grids: dict[int, QuantParams] = {}

    def need(self, site: str) -> QuantParams | None:
        """Record ``site``; its grid in the faithful mode, None in the float one."""
        self.sites.append(site)
        if self.quant is None:
            return None
        try:
            return self.quant[site]
        except KeyError:
            raise KeyError(f"no quantization parameters for tensor {site!r}") from None

    def grid(self, x) -> QuantParams:
        return self._grids[id(x)]

    def on_grid(self, x, q: QuantParams | None):
        if q is not None:
            self._grids[id(x)] = q
        return x

    def conv(
        self,
        x,
        scope: str,
        filters: int,
        kernel: int,
        stride: int,
        act: Activation,
        dilation: int = 1,
        depthwise: bool = False,
    ):
        name = layer_name(scope)
        q_out, q_w = self.need(scope), self.need(f"{scope}/weights")
        self.need(f"{scope}/bias")
        lo, hi = act_range(act, q_out) if q_out is not None else (0, 0)
        # faithful: a ReLU on the accumulator is the lower clamp where it is at the zero point
        relu = "relu" if q_out is not None and lo == 0 else None
        if depthwise:
            y = layers.DepthwiseConv2D(
                kernel,
                strides=stride,
                dilation_rate=dilation,
                padding="same",
                activation=relu,
                name=name,
            )(x)
        else:
            y = layers.Conv2D(
                filters,
                kernel,
                strides=stride,
                dilation_rate=dilation,
                padding="same",
                activation=relu,
                name=name,
            )(x)
        self.infos.append(ConvInfo(scope, name, depthwise, stride, dilation, act))
        if q_out is None or q_w is None:
            return _act(y, act, name)
        q_in = self.grid(x)
        m = np.float32(np.float32(q_in.scale) * np.float32(q_w.scale)) / np.float32(q_out.scale)
        return self.on_grid(Requant(float(m), lo, hi, name=f"{name}__requant")(y), q_out)

    def add(self, a, b, scope: str):
        name = layer_name(f"{scope}/add")
        q_out = self.need(f"{scope}/add")
        if q_out is None:
            return layers.Add(name=name)([a, b])
        ma, mb, shift = add_multipliers(self.grid(a), self.grid(b), q_out)
        lo, hi = act_range("none", q_out)
        return self.on_grid(QuantAdd(ma, mb, shift, lo, hi, name=name)([a, b]), q_out)


def _act(x, act: Activation, name: str):
    if act == "relu6":
        return layers.ReLU(6.0, name=f"{name}__relu6")(x)
    if act == "relu":
        return layers.ReLU(name=f"{name}__relu")(x)
    return x


class _Strides:
    """Output-stride bookkeeping: strides past ``output_stride`` become atrous rates."""

    def __init__(self, output_stride: int, h: int, w: int) -> None:
        self.output_stride, self.current, self.rate = output_stride, 2, 1
        self.fh, self.fw = _out_size(h, 2), _out_size(w, 2)

    def step(self, stride: int) -> tuple[int, int]:
        """(layer stride, layer dilation) of a layer asking for ``stride``."""
        if stride > 1 and self.current == self.output_stride:
            layer_rate = self.rate
            self.rate *= stride  # atrous from the next layer on
            return 1, layer_rate
        self.current *= stride
        self.fh, self.fw = _out_size(self.fh, stride), _out_size(self.fw, stride)
        return stride, self.rate


def _mobilenet_v2(b: _Builder, x, multiplier: float, st: _Strides):
    root = _SCOPE_ROOT["mobilenet_v2"]
    x = b.conv(x, f"{root}/Conv", _depth(32, multiplier), 3, 2, "relu6")
    in_ch = _depth(32, multiplier)
    block = 0
    for t, c, n, s in _MNV2_BLOCKS:
        for i in range(n):
            layer_stride, layer_rate = st.step(s if i == 0 else 1)
            scope = f"{root}/expanded_conv" + (f"_{block}" if block else "")
            out_ch = _depth(c, multiplier)
            y = x
            if t != 1:
                y = b.conv(y, f"{scope}/expand", in_ch * t, 1, 1, "relu6")
            y = b.conv(
                y, f"{scope}/depthwise", 0, 3, layer_stride, "relu6", layer_rate, depthwise=True
            )
            y = b.conv(y, f"{scope}/project", out_ch, 1, 1, "none")
            if layer_stride == 1 and in_ch == out_ch:
                y = b.add(y, x, scope)
            x, in_ch = y, out_ch
            block += 1
    return x


def _mobilenet_edgetpu(b: _Builder, x, multiplier: float, st: _Strides):
    root = _SCOPE_ROOT["mobilenet_edgetpu"]
    in_ch = make_divisible(32 * multiplier)
    x = b.conv(x, f"{root}/Conv", in_ch, 3, 2, "relu")
    for block, spec in enumerate(_EDGETPU_BLOCKS):
        layer_stride, layer_rate = st.step(spec.stride)
        scope = f"{root}/expanded_conv" + (f"_{block}" if block else "")
        out_ch = make_divisible(spec.channels * multiplier)
        inner = make_divisible(in_ch * spec.expansion, 8 if spec.expansion > 1 else 1)
        y = x
        if spec.fused:
            if inner > in_ch:  # expansion 1 keeps the input: no expand conv
                y = b.conv(
                    y,
                    f"{scope}/expand",
                    inner,
                    spec.kernel,
                    layer_stride,
                    "relu",
                    dilation=layer_rate,
                )
        else:
            y = b.conv(y, f"{scope}/expand", inner, 1, 1, "relu")
            y = b.conv(
                y,
                f"{scope}/depthwise",
                0,
                spec.kernel,
                layer_stride,
                "relu",
                layer_rate,
                depthwise=True,
            )
        y = b.conv(y, f"{scope}/project", out_ch, 1, 1, "none")
        if spec.residual and layer_stride == 1 and in_ch == out_ch:
            y = b.add(y, x, scope)
        x, in_ch = y, out_ch
    return b.conv(x, f"{root}/Conv_1", EDGETPU_LAST_CONV, 1, 1, "relu")


def build_deeplab(
    num_classes: int = 21,
    depth_multiplier: float = 1.0,
    output_stride: int = 16,
    input_size: int | tuple[int, int] = 513,
    batch_size: int | None = None,
    *,
    input_norm: Norm = QUANT_NORM,
    output: Output = "classes",
    backbone: Backbone = "mobilenet_v2",
    head_depth: int = HEAD_DEPTH,
    quant: Mapping[str, QuantParams] | None = None,
) -> keras.Model:
    """DeepLabv3 (image pooling + 1x1 ASPP, no atrous branches) on a TF-slim MobileNet.

    ``input_norm`` = (mean, std), see models.norm (``ModelSpec.input_norm`` gives a file's).
    ``output`` "classes": uint8 [N, H, W]; "logits": float32 [N, H, W, num_classes].
    ``quant``: the uint8 grids of a quantized file by tensor (``quant_sites``) for the
    int8-faithful mode; None builds the float model. The faithful model's convs hold the
    file's integers (``integer_weights`` of the float model's).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    b = _Builder(quant)
    inp = keras.Input((h, w, 3), batch_size=batch_size, dtype="uint8", name="image")
    q_in = b.need(SITE_INPUT)
    if q_in is None:
        x = Normalize(*input_norm, name="normalize")(inp)
    else:
        x = b.on_grid(QuantizeInput(q_in.zero_point, name="quantize_input")(inp), q_in)
    st = _Strides(output_stride, h, w)
    if backbone == "mobilenet_v2":
        x = _mobilenet_v2(b, x, depth_multiplier, st)
    else:
        x = _mobilenet_edgetpu(b, x, depth_multiplier, st)
    fh, fw = st.fh, st.fw

    q_pool = b.need(SITE_POOL)
    if q_pool is None:
        pool = GlobalPoolBroadcast("pool", name="image_pooling__avgpool")(x)
    else:
        _same_grid(SITE_POOL, b.grid(x), q_pool)
        pool = b.on_grid(QuantAvgPool(q_pool.zero_point, name="image_pooling__avgpool")(x), q_pool)
    pool = b.conv(pool, "image_pooling", head_depth, 1, 1, "relu")
    q_bc, q_rq = b.need(SITE_BROADCAST), b.need(SITE_REQUANT)
    if q_bc is not None and q_rq is not None:
        _same_grid(SITE_BROADCAST, b.grid(pool), q_bc)
        if q_rq != q_bc:  # element-wise: done on the 1x1 vector before it is copied
            pool = Requantize(
                requantize_multiplier(q_bc, q_rq), q_rq.zero_point, name="image_pooling__requantize"
            )(pool)
    pool = GlobalPoolBroadcast("broadcast", (fh, fw), name="image_pooling__resize")(pool)
    aspp0 = b.conv(x, "aspp0", head_depth, 1, 1, "relu")
    q_cat = b.need(SITE_CONCAT)
    if q_cat is not None and q_rq is not None:
        _same_grid(SITE_CONCAT, q_rq, q_cat)
        _same_grid(SITE_CONCAT, b.grid(aspp0), q_cat)
    y = b.on_grid(layers.Concatenate(axis=-1, name="concat")([pool, aspp0]), q_cat)
    y = b.conv(y, "concat_projection", head_depth, 1, 1, "relu")
    y = b.conv(y, "logits/semantic", num_classes, 1, 1, "none")
    q_resize = b.need(SITE_LOGITS_RESIZE)
    if q_resize is None:
        y = ResizeAlignCorners((fh, fw), (h, w), name="resize_logits")(y)
    else:
        _same_grid(SITE_LOGITS_RESIZE, b.grid(y), q_resize)
        y = ResizeAlignCorners(
            (fh, fw),
            (h, w),
            q_resize.as_list(),
            emit="uint8" if output == "classes" else "real",
            name="resize_logits",
        )(y)
    if output == "classes":
        y = ArgmaxUint8(name="argmax")(y)
    tag = "mnv2" if backbone == "mobilenet_v2" else "edgetpu"
    model = keras.Model(
        inp,
        y,
        name=f"deeplabv3_{tag}_dm{depth_multiplier:g}_os{output_stride}"
        + ("_faithful" if quant is not None else ""),
    )
    model.conv_infos = b.infos  # read by the weight import
    model.quant_site_names = b.sites
    model.feature_size = (fh, fw)
    model.mode = "faithful" if quant is not None else "float"
    return model


def _same_grid(site: str, got: QuantParams, want: QuantParams) -> None:
    if got != want:
        raise ValueError(
            f"{site}: input on grid {got}, the file keeps {want} (a requantization "
            f"the port does not emulate)"
        )


def integer_weights(
    kernel: np.ndarray, bias: np.ndarray, w: QuantParams, b: QuantParams
) -> tuple[np.ndarray, np.ndarray]:
    """Float (dequantized) conv weights -> the file's integers q_w - zp_w and int32 bias."""
    k = np.rint(kernel.astype(np.float64) / w.scale)
    c = np.rint(bias.astype(np.float64) / b.scale)
    return k.astype(np.float32), c.astype(np.float32)


def conv_layers(model: keras.Model) -> list[ConvInfo]:
    """The conv layers of a build_deeplab model, in graph order."""
    infos = getattr(model, "conv_infos", None)
    if infos is None:
        raise ValueError(f"{model.name} was not built by build_deeplab (no conv_infos)")
    return list(infos)


def quant_sites(model: keras.Model) -> list[str]:
    """The uint8 tensors the faithful mode needs grids for, in graph order.

    SITE_INPUT, each conv's output (its scope), weights ("<scope>/weights") and int32 bias
    ("<scope>/bias"), "<block>/add", and the SITE_* of the head.
    """
    sites = getattr(model, "quant_site_names", None)
    if sites is None:
        raise ValueError(f"{model.name} was not built by build_deeplab (no quant sites)")
    return list(sites)
