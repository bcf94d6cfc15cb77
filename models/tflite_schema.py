"""Read and write .tflite flatbuffers with the generated schema module (no interpreter).

The schema ships in ai-edge-litert (or TensorFlow's copy), so this works without TensorFlow.
Both the graph edits (``tflite_graph``) and the weight import (``tflite_import``) use it.
"""

from __future__ import annotations

import functools
from typing import Any

FILE_IDENTIFIER = b"TFL3"


@functools.cache
def schema() -> Any:
    """The generated ``schema_py_generated`` module."""
    try:
        from ai_edge_litert import schema_py_generated as mod
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as mod
    return mod


def unpack(content: bytes) -> Any:
    """The whole model as mutable ``ModelT`` objects."""
    return schema().ModelT.InitFromPackedBuf(content, 0)


def pack(model: Any, size_hint: int = 0) -> bytes:
    """A (possibly edited) ``ModelT`` back to .tflite bytes."""
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


@functools.cache
def _builtin_names() -> dict[int, str]:
    return {v: k for k, v in vars(schema().BuiltinOperator).items() if not k.startswith("_")}


def op_name(model: Any, op: Any) -> str:
    """The builtin name of ``op`` ("CONV_2D", ...), "?" for custom or unknown ops.

    Old files set only the deprecated int8 field (``builtinCode`` then reads 0); newer ones
    set both, with 127 in the old field for codes past it: the larger value is the real code.
    """
    code = model.operatorCodes[op.opcodeIndex]
    return _builtin_names().get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
