"""Import the weights and activation scales of an official DeepLab .tflite file into the Keras port.

The flatbuffer is read through ``models.tflite_schema`` (the generated schema module of
ai-edge-litert); no interpreter and no TensorFlow are needed, so this also works on a
JAX-only machine. uint8 weights are dequantized ((q - zero_point) * scale), int32 biases too.
Every conv is matched by its TF scope and checked for kernel shape, stride, dilation, padding
and fused activation; any disagreement raises ImportMismatchError naming the layer.

For uint8 files the grid (scale, zero point) of every uint8 activation tensor is read too and
mapped to the Keras model's quant sites (``models.deeplab.quant_sites``): conv outputs by
their scope, residual adds, the pooling branch, the concat, the logits resize. A uint8 tensor
without quantization parameters, an op the port does not emulate, or a site missing on either
side raises ImportMismatchError naming the tensor. The int8-faithful mode is built from them.

The result is cached as home()/keras/<name>.weights.h5 (plus a .json stamp tying it to the
.tflite's sha256 and holding the activation grids), so later start-ups only load those.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from segstream.models import fetch
from segstream.models.deeplab import (
    MODES,
    SITE_BROADCAST,
    SITE_CONCAT,
    SITE_INPUT,
    SITE_LOGITS_RESIZE,
    SITE_POOL,
    SITE_REQUANT,
    Mode,
    Output,
    QuantParams,
    build_deeplab,
    conv_layers,
    integer_weights,
    layer_name,
    quant_sites,
)
from segstream.models.norm import FLOAT_NORM, QUANT_NORM, Norm
from segstream.models.registry import ModelSpec, get_spec
from segstream.models.tflite_schema import op_name, schema, unpack

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the Keras model's layer layout or the stamp changes


class ImportMismatchError(ValueError):
    """The .tflite graph does not agree with the Keras model it is imported into."""


_NP_TYPES = {0: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_ACT = {0: "none", 1: "relu", 3: "relu6"}
# A weight tensor's name is several ';'-joined op names; the layer scope is their common part.
_SCOPE = re.compile(
    r"^((?:(?:MobilenetV2|MobilenetEdgeTPU)/"
    r"(?:Conv(?:_1)?|expanded_conv(?:_\d+)?/(?:expand|depthwise|project)))"
    r"|image_pooling|aspp0|concat_projection|logits/semantic)(?:/|$)"
)


@dataclass
class FileConv:
    """One CONV_2D / DEPTHWISE_CONV_2D op of the file, weights dequantized to float32."""

    scope: str
    depthwise: bool
    weights: np.ndarray  # TFLite layout: conv [O, H, W, I], depthwise [1, H, W, C*mult]
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
    input_quant: tuple[float, int] | None  # (scale, zero_point) of a uint8 input
    op_names: list[str]
    # uint8 activation grids by quant site (empty for float files), and what did not map
    quant: dict[str, QuantParams] = field(default_factory=dict)
    quant_problems: list[str] = field(default_factory=list)
    quant_tensors: dict[str, str] = field(default_factory=dict)  # site -> file tensor name


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
        raise ImportMismatchError(
            f"tensor {tensor.name.decode()} is {arr.dtype} but has no quantization parameters"
        )
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
    """Parse the convs (weights + options), the input and the uint8 activation grids."""
    model = unpack(Path(path).read_bytes())
    if len(model.subgraphs) != 1:
        raise ImportMismatchError(f"{path}: expected one subgraph, found {len(model.subgraphs)}")
    g = model.subgraphs[0]
    convs: dict[str, FileConv] = {}
    conv_outputs: dict[int, str] = {}  # output tensor index -> conv scope
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
        conv_outputs[op.outputs[0]] = scope
    it = g.tensors[g.inputs[0]]
    q = it.quantization
    quant = None
    uint8 = it.type == schema().TensorType.UINT8
    if uint8 and q is not None and q.scale is not None and len(q.scale):
        quant = (float(q.scale[0]), int(q.zeroPoint[0]))
    graph = FileGraph(
        convs, _NP_TYPES.get(it.type, object), tuple(int(d) for d in it.shape), quant, names
    )
    if uint8:
        graph.quant, graph.quant_problems, graph.quant_tensors = _read_quant(model, conv_outputs)
    return graph


def _grid(tensor: Any) -> QuantParams | None:
    """A uint8 tensor's (scale, zero point); None when the file gives none."""
    q = tensor.quantization
    if (
        q is None
        or q.scale is None
        or len(q.scale) != 1
        or q.zeroPoint is None
        or len(q.zeroPoint) != 1
    ):
        return None
    return QuantParams(float(q.scale[0]), int(q.zeroPoint[0]))


def _read_quant(
    model: Any,
    conv_outputs: dict[int, str],
) -> tuple[dict[str, QuantParams], list[str], dict[str, str]]:
    """The grid of every uint8 activation by quant site, following the graph's data flow.

    Sites: SITE_INPUT; conv scopes, with "<scope>/weights" and "<scope>/bias" for their
    constant operands; "<block>/add" (the block of the project conv feeding the ADD);
    SITE_POOL, SITE_BROADCAST (RESIZE_BILINEAR / TILE of the image_pooling conv), SITE_REQUANT
    (QUANTIZE after it), SITE_CONCAT, SITE_LOGITS_RESIZE (the resizes after the logits).
    Problems (returned, raised by ``check_quant``) name the tensor concerned.
    """
    g = model.subgraphs[0]
    uint8 = schema().TensorType.UINT8
    site_of: dict[int, str] = {}  # tensor index -> the site that holds it
    quant: dict[str, QuantParams] = {}
    tensors: dict[str, str] = {}
    problems: list[str] = []
    resized: list[str] = []  # the logits resizes that change the size

    def tname(i: int) -> str:
        return g.tensors[i].name.decode()

    def grid(i: int) -> QuantParams | None:
        p = _grid(g.tensors[i])
        if p is None:
            problems.append(f"uint8 tensor {tname(i)!r} has no (single) scale and zero point")
        return p

    def record(site: str, i: int) -> None:
        p = grid(i)
        if site in quant:
            problems.append(f"two uint8 tensors map to {site!r}: {tname(i)!r} and another")
        if p is not None:
            quant[site] = p
        site_of[i] = site
        tensors[site] = tname(i)

    def same_grid(site: str, i_in: int, i_out: int) -> None:
        a, b = _grid(g.tensors[i_in]), _grid(g.tensors[i_out])
        if a is not None and b is not None and a != b:
            problems.append(
                f"{site}: output {tname(i_out)!r} {b} is on another grid than its "
                f"input {tname(i_in)!r} {a}; the port expects the same"
            )

    record(SITE_INPUT, g.inputs[0])
    for op in g.operators:
        name = op_name(model, op)
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D") and op.outputs[0] in conv_outputs:
            scope = conv_outputs[op.outputs[0]]
            record(f"{scope}/weights", op.inputs[1])
            _check_bias(model, g.tensors[op.inputs[2]], problems)
            bq = _grid(g.tensors[op.inputs[2]])
            if bq is None:
                problems.append(f"bias {tname(op.inputs[2])!r} has no (single) scale")
            else:
                quant[f"{scope}/bias"] = bq
                tensors[f"{scope}/bias"] = tname(op.inputs[2])
        outs = [i for i in op.outputs if g.tensors[i].type == uint8]
        if not outs:
            continue  # ARG_MAX (int64 ids); constant-shape ops
        out = outs[0]
        ins = [i for i in op.inputs if i >= 0 and g.tensors[i].type == uint8]
        src = [site_of.get(i, "") for i in ins]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            record(conv_outputs[out], out)
        elif name == "ADD" and len(ins) == 2:
            if op.builtinOptions is not None and op.builtinOptions.fusedActivationFunction:
                problems.append(f"ADD {tname(out)!r} has a fused activation; the port has none")
            block = next((s.removesuffix("/project") for s in src if s.endswith("/project")), None)
            if block is None:
                problems.append(f"ADD {tname(out)!r} is not fed by a block's project conv")
                continue
            record(f"{block}/add", out)
        elif name == "AVERAGE_POOL_2D":
            record(SITE_POOL, out)
            same_grid(SITE_POOL, ins[0], out)
        elif name in ("RESIZE_BILINEAR", "TILE") and src[:1] == ["image_pooling"]:
            record(SITE_BROADCAST, out)
            same_grid(SITE_BROADCAST, ins[0], out)
            if name == "RESIZE_BILINEAR":
                _check_resize(op, tname(out), problems)
        elif name == "RESIZE_BILINEAR" and src[:1] in (["logits/semantic"], [SITE_LOGITS_RESIZE]):
            same_grid(SITE_LOGITS_RESIZE, ins[0], out)
            _check_resize(op, tname(out), problems)
            if list(g.tensors[ins[0]].shape[1:3]) != list(g.tensors[out].shape[1:3]):
                resized.append(tname(out))  # same-size resizes (align_corners) are copies
            if len(resized) > 1:
                problems.append(
                    f"RESIZE_BILINEAR {tname(out)!r} resizes the logits a second "
                    f"time (after {resized[0]!r}); the port resizes them once"
                )
            quant.pop(SITE_LOGITS_RESIZE, None)  # a chain of resizes: the last one counts
            record(SITE_LOGITS_RESIZE, out)
        elif name == "QUANTIZE" and src[:1] == [SITE_BROADCAST]:
            record(SITE_REQUANT, out)
        elif name == "CONCATENATION":
            record(SITE_CONCAT, out)
            for i in ins:
                same_grid(SITE_CONCAT, i, out)
        else:
            problems.append(
                f"{name} op writing uint8 tensor {tname(out)!r} (from "
                f"{', '.join(map(repr, src)) or 'no known site'}) is not one the "
                f"Keras port emulates"
            )
    if SITE_BROADCAST in quant and SITE_REQUANT not in quant:
        quant[SITE_REQUANT] = quant[SITE_BROADCAST]  # no QUANTIZE: the grid stays
        tensors[SITE_REQUANT] = tensors[SITE_BROADCAST]
    return quant, problems, tensors


def _check_bias(model: Any, tensor: Any, problems: list[str]) -> None:
    """The faithful mode adds the int32 bias in float32: exact below 2**24."""
    if tensor.type != schema().TensorType.INT32:
        problems.append(f"bias {tensor.name.decode()!r} is not int32")
        return
    b = _tensor_array(model, tensor)
    if b.size and int(np.abs(b.astype(np.int64)).max()) >= 1 << 24:
        problems.append(
            f"bias {tensor.name.decode()!r} reaches {int(np.abs(b).max())}, past "
            f"the 2**24 that float32 holds exactly"
        )


def _check_resize(op: Any, tensor: str, problems: list[str]) -> None:
    o = op.builtinOptions
    if not o.alignCorners or o.halfPixelCenters:
        problems.append(
            f"RESIZE_BILINEAR {tensor!r}: align_corners={o.alignCorners} "
            f"half_pixel_centers={o.halfPixelCenters}; the port has "
            f"align_corners=True only"
        )


def check_quant(graph: FileGraph, sites: list[str], source: str) -> dict[str, QuantParams]:
    """The grids for ``sites`` (a faithful model's), or ImportMismatchError naming tensors."""
    if graph.input_quant is None:
        raise ImportMismatchError(
            f"{source}: not a uint8 file, it has no activation grids for the int8-faithful mode"
        )
    if graph.quant_problems:
        raise ImportMismatchError(f"{source}: " + "; ".join(graph.quant_problems))
    return check_sites(graph.quant, sites, source)


def check_sites(
    quant: dict[str, QuantParams], sites: list[str], source: str
) -> dict[str, QuantParams]:
    missing = [s for s in sites if s not in quant]
    extra = sorted(set(quant) - set(sites))
    if missing or extra:
        raise ImportMismatchError(
            f"{source}: uint8 tensors differ; no quantization parameters in the file for: "
            f"{missing or '-'}; in the file but not in the Keras model: {extra or '-'}"
        )
    return {s: quant[s] for s in sites}


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
            raise ImportMismatchError(
                f"{tflite_path.name}: layer {info.scope}: " + "; ".join(problems)
            )
        layer.kernel.assign(kernel)
        layer.bias.assign(fc.bias)
    return graph


def weights_path(name: str) -> Path:
    return fetch.home() / "keras" / f"{name}.weights.h5"


def _stamp(spec: ModelSpec) -> dict[str, Any]:
    return {
        "source_sha256": spec.sha256,
        "cache_version": CACHE_VERSION,
        "backbone": spec.backbone,
        "depth_multiplier": spec.depth_multiplier,
        "output_stride": spec.output_stride,
        "num_classes": spec.num_classes,
    }


def default_mode(spec: ModelSpec) -> Mode:
    """int8-faithful for the uint8 files, float for the float ones."""
    return "faithful" if spec.quantized else "float"


def build_for_spec(
    spec: ModelSpec,
    input_size: int | None = None,
    output: Output = "classes",
    num_classes: int | None = None,
    quant: dict[str, QuantParams] | None = None,
) -> keras.Model:
    """The Keras model matching ``spec`` (unweighted); ``num_classes`` overrides its own.

    ``quant`` (the file's grids, see ``load_quant``) builds the int8-faithful mode.
    """
    if not spec.keras or spec.depth_multiplier is None or spec.output_stride is None:
        raise ValueError(f"model {spec.name!r} has no Keras port (tflite runtime only)")
    return build_deeplab(
        num_classes or spec.num_classes,
        spec.depth_multiplier,
        spec.output_stride,
        input_size or spec.input_size,
        input_norm=spec.input_norm,
        output=output,
        backbone=spec.backbone,
        head_depth=spec.head_depth,
        quant=quant,
    )


def set_faithful_weights(src: keras.Model, dst: keras.Model, quant: dict[str, QuantParams]) -> None:
    """The faithful model's convs get the file's integers, from the float model's weights."""
    for info in conv_layers(dst):
        kernel, bias = src.get_layer(info.layer).get_weights()
        dst.get_layer(info.layer).set_weights(
            list(
                integer_weights(
                    kernel, bias, quant[f"{info.scope}/weights"], quant[f"{info.scope}/bias"]
                )
            )
        )
    left = [
        layer.name
        for layer in dst.layers
        if layer.weights and layer.name not in {layer_name(i.scope) for i in conv_layers(dst)}
    ]
    if left:
        raise ValueError(f"faithful model has weights outside its convs: {left}")


def load_keras_model(
    name: str,
    input_size: int | None = None,
    output: Output = "classes",
    *,
    mode: Mode | None = None,
    reimport: bool = False,
) -> keras.Model:
    """The weighted Keras port of model ``name``, from the cached weights when valid.

    ``mode``: "faithful" (int8-faithful, the default for uint8 files) or "float" (the
    default for float files, and what train and export use). The model's ``mode`` attribute
    says which was built. On a miss (no cache, another source file, older layout) the
    weights and grids are imported from the fetched .tflite and cached. NotFetchedError when
    neither is available; ImportMismatchError when the file disagrees with the port.
    """
    spec = get_spec(name)
    mode = mode or default_mode(spec)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "faithful" and not spec.quantized:
        raise ValueError(
            f"model {name!r} is a float file: it has no uint8 grids to be "
            f"faithful to (use mode 'float')"
        )
    model = build_for_spec(spec, input_size, output)
    quant = _load_or_import(spec, model, reimport)
    if mode == "float":
        return model
    grids = check_sites(quant, quant_sites(model), f"{spec.filename} (cached)")
    faithful = build_for_spec(spec, input_size, output, quant=grids)
    set_faithful_weights(model, faithful, grids)
    return faithful


def _load_or_import(spec: ModelSpec, model: keras.Model, reimport: bool) -> dict[str, QuantParams]:
    """Fill ``model`` (float) with the cached or imported weights; the file's grids."""
    wpath = weights_path(spec.name)
    stamp_path = wpath.with_suffix("").with_suffix(".json")
    if not reimport and wpath.is_file() and stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text())
            if {k: stamp.get(k) for k in _stamp(spec)} == _stamp(spec):
                model.load_weights(wpath)
                return {
                    k: QuantParams(float(v[0]), int(v[1]))
                    for k, v in stamp.get("quant", {}).items()
                }
            log.info("cached Keras weights %s are stale; re-importing", wpath)
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            log.warning("cannot load cached Keras weights %s (%s); re-importing", wpath, e)
    tflite = fetch.model_path(spec.name)
    graph = import_weights(model, tflite)
    norm = input_norm_of(graph)
    if spec.tflite_kind == "argmax_uint8" and norm != QUANT_NORM:
        raise ImportMismatchError(
            f"{tflite.name}: input quantization gives (x-{norm[0]})/"
            f"{norm[1]}, the Keras model uses (x-{QUANT_NORM[0]})/"
            f"{QUANT_NORM[1]}"
        )
    quant = check_quant(graph, quant_sites(model), tflite.name) if spec.quantized else {}
    wpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = wpath.with_name(f".{wpath.name}.tmp.weights.h5")
    with warnings.catch_warnings():  # TF variables' __array__ lacks numpy 2's copy= (harmless)
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        model.save_weights(tmp)
    tmp.replace(wpath)
    stamp_path.write_text(
        json.dumps({**_stamp(spec), "quant": {k: v.as_list() for k, v in quant.items()}})
    )
    log.info("imported %s into Keras weights %s", tflite.name, wpath)
    return quant
