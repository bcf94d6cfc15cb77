"""``segstream export``: write the Keras port as .keras, TF SavedModel, float TFLite or ONNX.

Every artifact takes uint8 RGB [B, S, S, 3] (the model normalizes inside) and returns uint8
class ids [B, S, S] (the fused argmax) or, with ``logits=True``, float32 [B, S, S, C].
The float port is written unless ``faithful=True`` asks for the int8-faithful one (uint8
models only; .keras and SavedModel).
Files are written beside the target and renamed into place, so a failed export leaves no
half-written artifact and an existing one is only replaced with ``overwrite=True``.

Keras/TensorFlow are imported lazily: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from segstream.models.registry import DEFAULT_MODEL, MODELS, get_spec

if TYPE_CHECKING:
    from segstream.models.deeplab import Output

Format = Literal["keras", "savedmodel", "tflite", "onnx"]
FORMATS: tuple[str, ...] = ("keras", "savedmodel", "tflite", "onnx")
SUFFIX = {"keras": ".keras", "tflite": ".tflite", "onnx": ".onnx", "savedmodel": ""}
INPUT_NAME = "image"


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why and what to change."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    input_shape: tuple[int | None, int, int, int]
    logits: bool
    seconds: float
    mode: str = "float"


def load_keras_file(path: str | Path) -> Any:
    """Reload a .keras file written by :func:`export_model` (safe mode, no code loaded).

    The file names the port's custom layers "segstream>..."; importing models.deeplab
    registers them under those names.
    """
    import keras

    import segstream.models.deeplab  # noqa: F401 - registers the custom layers

    return keras.saving.load_model(str(path), compile=False)


def _backend() -> str:
    from segstream.models.runtime import keras_backend_name

    return keras_backend_name()


def _require_tf(fmt: str) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        raise ExportError(f"--format {fmt} needs TensorFlow, which is not installed here")
    if _backend() != "tensorflow":
        raise ExportError(
            f"--format {fmt} is written through the TensorFlow backend; run with "
            f"KERAS_BACKEND=tensorflow (now {_backend()!r})"
        )


def check_format(fmt: str) -> str:
    """The format, or ExportError naming the valid ones and what is missing for it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if fmt in ("savedmodel", "tflite", "onnx"):
        _require_tf(fmt)
    if fmt == "onnx" and importlib.util.find_spec("tf2onnx") is None:
        raise ExportError(
            "--format onnx needs tf2onnx: pip install 'segstream[onnx]' "
            "(tf2onnx, onnx; onnxruntime to run the file)"
        )
    return fmt


def target_path(out: str | Path, fmt: str, stem: str) -> Path:
    """Where the artifact goes: ``out`` itself, or ``out/<stem><suffix>`` if out is a folder."""
    out = Path(out).expanduser()
    suffix = SUFFIX[fmt]
    if fmt == "savedmodel":
        if out.is_dir() and any(out.iterdir()) and not (out / "saved_model.pb").is_file():
            return out / stem  # an existing non-SavedModel folder: write inside it
        return out
    if out.is_dir() or (not out.suffix and not out.exists()):
        return out / f"{stem}{suffix}"
    if out.suffix != suffix:
        raise ExportError(
            f"--format {fmt} writes a {suffix} file; got --out {out} "
            f"(name it *{suffix} or give a folder)"
        )
    return out


def check_writable(path: Path, overwrite: bool) -> None:
    """Fail before any work if ``path`` exists (without overwrite) or its folder is unwritable."""
    empty_dir = path.is_dir() and not any(path.iterdir())  # e.g. a SavedModel folder made ready
    if path.exists() and not empty_dir and not overwrite:
        raise ExportError(f"{path} already exists; pass --overwrite to replace it")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".segstream-write-test-"):
            pass
    except OSError as e:
        raise ExportError(f"cannot write to {parent}: {e.strerror or e}") from None


def _signature_shape(batch: int | None, size: int) -> tuple[int | None, int, int, int]:
    return (batch, size, size, 3)


def _tf_serving_model(model: Any) -> Any:
    """``model`` for the TF-based formats: same weights, but a plain tf.argmax at the end.

    Keras' TF argmax adds a -0.0 fix-up (Bitcast + BitwiseAnd) that neither TFLite builtins
    nor tf2onnx support; a tie between +0 and -0 logits cannot matter for class ids.
    """
    import keras
    import tensorflow as tf

    if model.output.ndim == 4:  # logits output: nothing to replace
        return model

    class _TfArgmaxUint8(keras.layers.Layer):
        def call(self, x):
            return tf.cast(tf.argmax(x, axis=-1), tf.uint8)

    logits = model.get_layer("resize_logits").output
    return keras.Model(model.input, _TfArgmaxUint8(name="argmax")(logits), name=model.name)


def _write_keras(model: Any, tmp: Path, shape: tuple) -> None:
    model.save(str(tmp))


def _write_savedmodel(model: Any, tmp: Path, shape: tuple) -> None:
    import tensorflow as tf

    _tf_serving_model(model).export(
        str(tmp),
        format="tf_saved_model",
        verbose=False,
        input_signature=[tf.TensorSpec(shape, tf.uint8, name=INPUT_NAME)],
    )


def _write_tflite(model: Any, tmp: Path, shape: tuple) -> None:
    """Via a SavedModel: the converter then freezes the weights into constants (from a
    live tf.function it keeps them as uninitialised resource variables)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".segstream-sm-") as sm:
        _write_savedmodel(model, Path(sm) / "sm", shape)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(Path(sm) / "sm"))
        tmp.write_bytes(conv.convert())


def _write_onnx(model: Any, tmp: Path, shape: tuple) -> None:
    """Through Keras' exporter (tf2onnx on the TF backend, with its numpy-2 patches)."""
    import tensorflow as tf

    with warnings.catch_warnings():  # tf2onnx probes np.object
        warnings.simplefilter("ignore", FutureWarning)
        _tf_serving_model(model).export(
            str(tmp),
            format="onnx",
            verbose=False,
            input_signature=[tf.TensorSpec(shape, tf.uint8, name=INPUT_NAME)],
        )


_WRITERS = {
    "keras": _write_keras,
    "savedmodel": _write_savedmodel,
    "tflite": _write_tflite,
    "onnx": _write_onnx,
}


def _keras_spec(name: str | None) -> Any:
    spec = get_spec(name or DEFAULT_MODEL)
    if not spec.keras:
        raise ExportError(
            f"model {spec.name!r} has no Keras port (it runs on the tflite "
            f"runtime only); Keras models: "
            f"{', '.join(n for n, s in MODELS.items() if s.keras)}"
        )
    return spec


def build_model(
    name: str | None = None,
    *,
    weights: str | Path | None = None,
    input_size: int | None = None,
    logits: bool = False,
    faithful: bool = False,
) -> tuple[Any, int]:
    """(weighted Keras port, input size): registry model ``name`` or a fine-tuned file.

    The float port unless ``faithful`` (the int8-faithful one of a uint8 registry model).
    """
    output: Output = "logits" if logits else "classes"
    if weights is not None:
        if faithful:
            raise ExportError(
                "--faithful needs a uint8 registry model; fine-tuned weights are float"
            )
        from segstream.models.finetuned import load_finetuned

        model, meta = load_finetuned(weights, input_size=input_size, output=output)
        return model, int(input_size or meta["input_size"])
    from segstream.models.tflite_import import load_keras_model

    spec = _keras_spec(name)
    if faithful and not spec.quantized:
        raise ExportError(f"--faithful needs a uint8 model; {spec.name!r} is a float file")
    size = int(input_size or spec.input_size)
    return load_keras_model(spec.name, size, output, mode="faithful" if faithful else "float"), size


def export_model(
    fmt: str,
    out: str | Path,
    *,
    name: str | None = None,
    weights: str | Path | None = None,
    input_size: int | None = None,
    batch: int | None = None,
    logits: bool = False,
    overwrite: bool = False,
    faithful: bool = False,
) -> ExportResult:
    """Export model ``name`` (or fine-tuned ``weights``) as ``fmt`` to ``out`` (file or folder).

    ``batch`` None: dynamic batch where the format allows it (keras, savedmodel, onnx); TFLite
    then uses 1. All checks (format, model, path) run before the model is loaded.
    ``faithful``: the int8-faithful port instead of the float one (.keras, SavedModel).
    """
    check_format(fmt)
    if faithful and fmt not in ("keras", "savedmodel"):
        raise ExportError(f"--faithful is written as keras or savedmodel, not {fmt}")
    if batch is not None and batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    if input_size is not None and input_size < 33:
        raise ExportError(f"--input-size must be >= 33, got {input_size}")
    if weights is not None:
        stem = Path(weights).name.removesuffix(".weights.h5")
    else:
        stem = _keras_spec(name).name
    stem += ("-faithful" if faithful else "") + ("-logits" if logits else "")
    path = target_path(out, fmt, stem)
    check_writable(path, overwrite)
    if fmt == "tflite" and batch is None:
        batch = 1
    t0 = time.perf_counter()
    model, size = build_model(
        name, weights=weights, input_size=input_size, logits=logits, faithful=faithful
    )
    shape = _signature_shape(batch, size)
    tmp = path.with_name(f".{path.name}.partial{os.getpid()}{SUFFIX[fmt]}")
    try:
        with warnings.catch_warnings():  # TF variables' __array__ lacks numpy 2's copy=
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            _WRITERS[fmt](model, tmp, shape)
        if path.exists():  # overwrite was asked for (checked above)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return ExportResult(
        path, fmt, shape, logits, time.perf_counter() - t0, "int8-faithful" if faithful else "float"
    )


def _run(args: argparse.Namespace) -> int:
    try:
        res = export_model(
            args.format,
            args.out,
            name=args.model,
            weights=args.weights,
            input_size=args.input_size,
            batch=args.batch,
            logits=args.logits,
            overwrite=args.overwrite,
            faithful=args.faithful,
        )
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"segstream export: {e}", file=sys.stderr)
        return 1
    b = "dynamic" if res.input_shape[0] is None else res.input_shape[0]
    out = "float32 logits" if res.logits else "uint8 class ids"
    print(
        f"wrote {res.format} {res.path} ({res.mode}, input uint8 [{b}, {res.input_shape[1]}, "
        f"{res.input_shape[2]}, 3] -> {out}) in {res.seconds:.1f} s"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export --model NAME --format F --out PATH``."""
    p = subparsers.add_parser(
        "export",
        help="export the Keras port as .keras, TF SavedModel, float TFLite or ONNX",
        description="Input: uint8 RGB [B, S, S, 3]; output: uint8 class ids [B, S, S] "
        "(or float32 logits with --logits).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        help=f"registry model (default {DEFAULT_MODEL}; see `segstream fetch --list`)",
    )
    src.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="FILE.weights.h5",
        help="a fine-tuned model written by `segstream train` (reads its .json)",
    )
    p.add_argument(
        "--format", default="keras", choices=FORMATS, help="artifact format (default keras)"
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="S",
        help="square input size (default: the model's)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="B",
        help="fixed batch size (default: dynamic; 1 for tflite)",
    )
    p.add_argument("--logits", action="store_true", help="output float logits, not class ids")
    p.add_argument(
        "--faithful",
        action="store_true",
        help="the int8-faithful port of a uint8 model (the tflite runtime's answers) "
        "instead of the float one; keras and savedmodel formats",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PATH",
        help="file (or SavedModel folder); a folder gets <model><suffix> inside",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    p.set_defaults(func=_run)
