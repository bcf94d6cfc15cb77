"""Import the weights of an official DeepLab .tflite file into the Keras port.

The flatbuffer is read through ``models.tflite_schema`` (the generated schema module of
ai-edge-litert); no interpreter and no TensorFlow are needed, so this also works on a
JAX-only machine. uint8 weights are dequantized ((q - zero_point) * scale), int32 biases too.
Every conv is matched by its TF scope and checked for kernel shape, stride, dilation, padding
and fused activation; any disagreement raises ImportMismatchError naming the layer.

The result is cached as home()/keras/<name>.weights.h5 (plus a .json stamp tying it to the
.tflite's sha256), so later start-ups only load that.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from models import fetch
from models.deeplab import Output, build_deeplab, conv_layers
from models.norm import FLOAT_NORM, QUANT_NORM, Norm
from models.registry import ModelSpec, get_spec
from models.tflite_schema import op_name, schema, unpack

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the Keras model's layer layout changes


class ImportMismatchError(ValueError):
    """The .tflite graph does not agree with the Keras model it is imported into."""


_NP_TYPES = {0: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_ACT = {0: "none", 1: "relu", 3: "relu6"}
# A weight tensor's name is several ';'-joined op names; the layer scope is their common part.
_SCOPE = re.compile(
    r"^((?:MobilenetV2/(?:Conv|expanded_conv(?:_\d+)?/(?:expand|depthwise|project)))"
    r"|image_pooling|aspp0|concat_projection|logits/semantic)(?:/|$)"
)


@dataclass
class FileConv:
    """One CONV_2D / DEPTHWISE_CONV_2D op of the file, weights dequantized to float32."""

    scope: str
    depthwise: bool
    weights: np.ndarray   # TFLite layout: conv [O, H, W, I], depthwise [1, H, W, C*mult]
    bias: np.ndarray
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: str
    activation: str
    depth_multiplier: int
    out_shape: tuple[int, ...]


@dataclass
class FileGraph:
    convs: dict[str, FileConv]
    input_dtype: type
    input_shape: tuple[int, ...]
    input_quant: tuple[float, int] | None   # (scale, zero_point) of a uint8 input
    op_names: list[str]


def _tensor_array(model: Any, tensor: Any) -> np.ndarray:
    buf = model.buffers[tensor.buffer]
    if buf.data is None:
        raise ImportMismatchError(f"tensor {tensor.name.decode()} has no constant data")
    dtype = _NP_TYPES.get(tensor.type)
    if dtype is None:
        raise ImportMismatchError(f"tensor {tensor.name.decode()}: unsupported type {tensor.type}")
    data = np.asarray(buf.data, dtype=np.uint8).tobytes()
    return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.shape)).copy()


def _dequantize(tensor: Any, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.float32:
        return arr
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        raise ImportMismatchError(f"tensor {tensor.name.decode()} is {arr.dtype} but has no "
                                  f"quantization parameters")
    scale = np.asarray(q.scale, dtype=np.float64)
    zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0], dtype=np.float64)
    if scale.size > 1:  # per-channel: broadcast along the quantized dimension
        shape = [1] * arr.ndim
        shape[q.quantizedDimension] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((arr.astype(np.float64) - zero) * scale).astype(np.float32)


def _scope_of(name: str, depthwise: bool) -> str:
    """The layer scope named most often among the parts of a weight tensor's name.

    Converters join the names of fused ops, which may mention a neighbouring layer
    ("X/depthwise/BatchNorm;X/depthwise/depthwise;Y/project/Conv2D"); only scopes of the
    op's own kind count, and uniqueness across ops is checked by the caller.
    """
    found = [m.group(1) for part in name.split(";") if (m := _SCOPE.match(part))]
    found = [s for s in found if s.endswith("/depthwise") == depthwise]
    if not found:  # not a DeepLab-MobileNetV2 layer: keep its name so the diff shows it
        return name.split(";")[0]
    return Counter(found).most_common(1)[0][0]  # ties: first mentioned


def read_tflite(path: Path) -> FileGraph:
    """Parse the convs (weights + options) and the input of a .tflite file."""
    model = unpack(Path(path).read_bytes())
    if len(model.subgraphs) != 1:
        raise ImportMismatchError(f"{path}: expected one subgraph, found {len(model.subgraphs)}")
    g = model.subgraphs[0]
    convs: dict[str, FileConv] = {}
    names: list[str] = []
    for op in g.operators:
        opname = op_name(model, op)
        names.append(opname)
        if opname not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        wt, bt = g.tensors[op.inputs[1]], g.tensors[op.inputs[2]]
        scope = _scope_of(wt.name.decode(), opname == "DEPTHWISE_CONV_2D")
        if scope in convs:
            raise ImportMismatchError(f"{path}: two conv ops map to layer {scope!r}")
        o = op.builtinOptions
        convs[scope] = FileConv(
            scope=scope,
            depthwise=opname == "DEPTHWISE_CONV_2D",
            weights=_dequantize(wt, _tensor_array(model, wt)),
            bias=_dequantize(bt, _tensor_array(model, bt)),
            stride=(o.strideH, o.strideW),
            dilation=(o.dilationHFactor, o.dilationWFactor),
            padding={0: "SAME", 1: "VALID"}.get(o.padding, str(o.padding)),
            activation=_ACT.get(o.fusedActivationFunction, f"act{o.fusedActivationFunction}"),
            depth_multiplier=getattr(o, "depthMultiplier", 1) or 1,
            out_shape=tuple(int(d) for d in g.tensors[op.outputs[0]].shape),
        )
    it = g.tensors[g.inputs[0]]
    q = it.quantization
    quant = None
    uint8 = it.type == schema().TensorType.UINT8
    if uint8 and q is not None and q.scale is not None and len(q.scale):
        quant = (float(q.scale[0]), int(q.zeroPoint[0]))
    return FileGraph(convs, _NP_TYPES.get(it.type, object), tuple(int(d) for d in it.shape),
                     quant, names)


def input_norm_of(graph: FileGraph) -> Norm:
    """(mean, std) the Keras model must apply to raw uint8 RGB to match the file's input."""
    if graph.input_quant is not None:
        scale, zero = graph.input_quant
        return float(zero), 1.0 / scale
    return FLOAT_NORM


def _keras_kernel(fc: FileConv) -> np.ndarray:
    if fc.depthwise:  # [1, H, W, C*mult] -> [H, W, C, mult]
        _, kh, kw, cm = fc.weights.shape
        return fc.weights.reshape(kh, kw, cm // fc.depth_multiplier, fc.depth_multiplier)
    return np.transpose(fc.weights, (1, 2, 3, 0))  # [O, H, W, I] -> [H, W, I, O]


def import_weights(model: keras.Model, tflite_path: Path) -> FileGraph:
    """Copy the file's conv weights into ``model`` (built by build_deeplab), checking each."""
    graph = read_tflite(tflite_path)
    infos = conv_layers(model)
    missing = [i.scope for i in infos if i.scope not in graph.convs]
    extra = sorted(set(graph.convs) - {i.scope for i in infos})
    if missing or extra:
        raise ImportMismatchError(
            f"{tflite_path.name}: layers differ; in the Keras model only: {missing or '-'}; "
            f"in the file only: {extra or '-'}"
        )
    for info in infos:
        fc = graph.convs[info.scope]
        layer = model.get_layer(info.layer)
        kernel = _keras_kernel(fc)
        problems = []
        if fc.depthwise != info.depthwise:
            problems.append(f"depthwise file={fc.depthwise} keras={info.depthwise}")
        if tuple(layer.kernel.shape) != kernel.shape:
            problems.append(f"kernel shape file={kernel.shape} keras={tuple(layer.kernel.shape)}")
        if tuple(layer.bias.shape) != fc.bias.shape:
            problems.append(f"bias shape file={fc.bias.shape} keras={tuple(layer.bias.shape)}")
        if fc.stride != (info.stride, info.stride):
            problems.append(f"stride file={fc.stride} keras={info.stride}")
        if fc.dilation != (info.dilation, info.dilation):
            problems.append(f"dilation file={fc.dilation} keras={info.dilation}")
        if fc.padding != "SAME":
            problems.append(f"padding file={fc.padding} keras=SAME")
        if fc.activation != info.activation:
            problems.append(f"activation file={fc.activation} keras={info.activation}")
        if problems:
            raise ImportMismatchError(f"{tflite_path.name}: layer {info.scope}: "
                                      + "; ".join(problems))
        layer.kernel.assign(kernel)
        layer.bias.assign(fc.bias)
    return graph


def weights_path(name: str) -> Path:
    return fetch.home() / "keras" / f"{name}.weights.h5"


def _stamp(spec: ModelSpec) -> dict[str, Any]:
    return {"source_sha256": spec.sha256, "cache_version": CACHE_VERSION,
            "depth_multiplier": spec.depth_multiplier, "output_stride": spec.output_stride,
            "num_classes": spec.num_classes}


def build_for_spec(spec: ModelSpec, input_size: int | None = None,
                   output: Output = "classes", num_classes: int | None = None) -> keras.Model:
    """The Keras model matching ``spec`` (unweighted); ``num_classes`` overrides its own."""
    if not spec.keras or spec.depth_multiplier is None or spec.output_stride is None:
        raise ValueError(f"model {spec.name!r} has no Keras port (tflite runtime only)")
    return build_deeplab(num_classes or spec.num_classes, spec.depth_multiplier,
                         spec.output_stride, input_size or spec.input_size,
                         input_norm=spec.input_norm, output=output)


def load_keras_model(name: str, input_size: int | None = None, output: Output = "classes",
                     *, reimport: bool = False) -> keras.Model:
    """The weighted Keras port of model ``name``, from the cached weights when valid.

    On a miss (no cache, another source file, older layout) the weights are imported from
    the fetched .tflite and cached. NotFetchedError when neither is available.
    """
    spec = get_spec(name)
    model = build_for_spec(spec, input_size, output)
    wpath = weights_path(name)
    stamp_path = wpath.with_suffix("").with_suffix(".json")
    if not reimport and wpath.is_file() and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == _stamp(spec):
                model.load_weights(wpath)
                return model
            log.info("cached Keras weights %s are stale; re-importing", wpath)
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            log.warning("cannot load cached Keras weights %s (%s); re-importing", wpath, e)
    tflite = fetch.model_path(name)
    graph = import_weights(model, tflite)
    norm = input_norm_of(graph)
    if spec.tflite_kind == "argmax_uint8" and norm != QUANT_NORM:
        raise ImportMismatchError(f"{tflite.name}: input quantization gives (x-{norm[0]})/"
                                  f"{norm[1]}, the Keras model uses (x-{QUANT_NORM[0]})/"
                                  f"{QUANT_NORM[1]}")
    wpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = wpath.with_name(f".{wpath.name}.tmp.weights.h5")
    with warnings.catch_warnings():  # TF variables' __array__ lacks numpy 2's copy= (harmless)
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        model.save_weights(tmp)
    tmp.replace(wpath)
    stamp_path.write_text(json.dumps(_stamp(spec)))
    log.info("imported %s into Keras weights %s", tflite.name, wpath)
    return model
