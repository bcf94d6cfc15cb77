"""Small edits of a .tflite flatbuffer (read and written through ``models.tflite_schema``).

Running a 513-input DeepLab file at another size needs more than resize_tensor_input: the
graph bakes the feature-map size into the global average pool's filter, and the bilinear
resize / tile sizes are constant tensors. ``resize_input`` rewrites those consistently.
"""

from __future__ import annotations

import math

import numpy as np

from segstream.models.tflite_schema import op_name, pack, schema, unpack


def resize_input(content: bytes, size: int) -> bytes:
    """The model with a square ``size`` input instead of its own (DeepLab-style graphs).

    The output stride comes from the global pool: its filter equals the feature map. Sizes
    in the constant shape tensors of RESIZE_BILINEAR and TILE are remapped: input size ->
    ``size``, feature size -> ceil(size / output_stride) (SAME convolutions).
    """
    model = unpack(content)
    g = model.subgraphs[0]
    inp = g.tensors[g.inputs[0]]
    old = int(inp.shape[1])
    if int(inp.shape[2]) != old:
        raise ValueError("resize_input handles square inputs only")
    ops = [(op_name(model, op), op) for op in g.operators]
    pools = [
        op
        for name, op in ops
        if name == "AVERAGE_POOL_2D"
        and op.builtinOptions.filterHeight == int(g.tensors[op.inputs[0]].shape[1])
    ]
    if len(pools) != 1:
        raise ValueError(f"expected one global average pool, found {len(pools)}")
    feat_old = int(g.tensors[pools[0].inputs[0]].shape[1])
    stride = round((old - 1) / (feat_old - 1)) if feat_old > 1 else old
    feat_new = math.ceil(size / stride)
    opts = pools[0].builtinOptions
    if opts.strideH == opts.filterHeight:
        opts.strideH = opts.strideW = feat_new
    opts.filterHeight = opts.filterWidth = feat_new
    remap = {old: size, feat_old: feat_new}
    done: set[int] = set()
    for name, op in ops:
        if name not in ("RESIZE_BILINEAR", "TILE") or op.inputs[1] in done:
            continue
        t = g.tensors[op.inputs[1]]
        buf = model.buffers[t.buffer]
        if buf.data is None or t.type != schema().TensorType.INT32:
            continue  # computed at run time: follows the input by itself
        vals = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), np.int32)
        new = np.array([remap.get(int(v), int(v)) for v in vals], np.int32)
        buf.data = np.frombuffer(new.tobytes(), np.uint8)
        done.add(op.inputs[1])
    inp.shape = [int(inp.shape[0]), size, size, int(inp.shape[3])]
    return pack(model, len(content))
