"""`segstream export`: each artifact reloads in its own runtime and matches the Keras port."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models.runtime import prepare
from segstream.models.tools.export import ExportError, export_model
from segstream.stream.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
SIZE = 513  # the size the service runs at


@pytest.fixture(scope="module")
def frames(shared_dir: Path) -> np.ndarray:
    """uint8 RGB [2, 513, 513, 3]: the Coral bird sample and vtest frame 300 (pedestrians)."""
    data = shared_dir / "data"
    bird = cv2.imread(str(data / "coral_segmentation_samples" / "bird_segmentation.bmp"))
    cap = cv2.VideoCapture(str(data / "video" / "vtest.avi"))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 300)
    ok, street = cap.read()
    cap.release()
    assert bird is not None and ok
    return np.stack([prepare(f, SIZE, bgr=True) for f in (bird, street)])


@pytest.fixture(scope="module")
def reference(segstream_home: Path, frames: np.ndarray) -> np.ndarray:
    """Class ids of the in-memory float Keras port (TF backend): what export writes."""
    from segstream.models.tflite_import import load_keras_model

    ref = np.asarray(load_keras_model("mnv2-voc", SIZE, mode="float")(frames))
    assert ref.dtype == np.uint8 and ref.shape == (2, SIZE, SIZE)
    assert {3, 15} <= set(np.unique(ref).tolist())  # bird and person: a real, non-trivial check
    return ref


def _agree(out: np.ndarray, ref: np.ndarray) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float((np.asarray(out).astype(np.int64) == ref).mean())


_KERAS_JAX = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    from segstream.models.tools.export import load_keras_file

    assert keras.backend.backend() == "jax", keras.backend.backend()
    model = load_keras_file(sys.argv[1])
    np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]))))
""")


def test_keras_file_reloads_on_jax(
    segstream_home: Path, frames: np.ndarray, reference: np.ndarray, tmp_path: Path
) -> None:
    """The .keras file is backend-neutral: written on TF, reloaded in a fresh JAX process."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install '.[jax]')")
    res = export_model("keras", tmp_path, name="mnv2-voc", input_size=SIZE)
    assert res.path == tmp_path / "mnv2-voc.keras" and res.path.is_file()
    np.save(tmp_path / "frames.npy", frames)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _KERAS_JAX,
            str(res.path),
            str(tmp_path / "frames.npy"),
            str(tmp_path / "out.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.uint8
    agree = _agree(out, reference)
    print(f".keras on JAX vs Keras port: {agree:.6f}")
    assert agree >= 0.999


def test_faithful_keras_file_answers_like_tflite(
    segstream_home: Path, frames: np.ndarray, tmp_path: Path
) -> None:
    """--faithful writes the int8-faithful port; reloaded, it gives the tflite runtime's ids."""
    from segstream.models.runtime import load_segmenter
    from segstream.models.tools.export import load_keras_file

    res = export_model("keras", tmp_path, name="mnv2-voc", input_size=SIZE, faithful=True)
    assert res.path.name == "mnv2-voc-faithful.keras" and res.mode == "int8-faithful"
    out = np.asarray(load_keras_file(res.path)(frames))
    with load_segmenter("mnv2-voc", "tflite", input_size=SIZE, batch_sizes=(2,)) as ref:
        agree = _agree(out, ref.segment(frames))
    print(f"faithful .keras vs tflite: {agree:.6f}")
    assert agree >= 0.999


_KERAS_RELOAD = textwrap.dedent("""
    import sys
    import numpy as np
    from segstream.models.tools.export import load_keras_file

    np.save(sys.argv[3], np.asarray(load_keras_file(sys.argv[1])(np.load(sys.argv[2]))))
""")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # TF + numpy 2
def test_keras_file_names_the_layers_deeplab_registers(tmp_path: Path) -> None:
    """models.deeplab registers the custom layers ("segstream>..."), so a saved file names
    them and reloads in a fresh process through load_keras_file alone."""
    from segstream.models.deeplab import build_deeplab

    model = build_deeplab(3, 0.5, 16, 33)
    path = tmp_path / "tiny.keras"
    model.save(str(path))
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    names = {layer.get("registered_name") for layer in config["config"]["layers"]}
    assert {
        "segstream>Normalize",
        "segstream>GlobalPoolBroadcast",
        "segstream>ResizeAlignCorners",
        "segstream>ArgmaxUint8",
    } <= names
    x = np.random.default_rng(0).integers(0, 256, (1, 33, 33, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _KERAS_RELOAD,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "out.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.asarray(model(x)))


def test_savedmodel_serving_signature(
    segstream_home: Path, frames: np.ndarray, reference: np.ndarray, tmp_path: Path
) -> None:
    import tensorflow as tf

    out_dir = tmp_path / "sm"
    res = export_model("savedmodel", out_dir, name="mnv2-voc")
    assert res.path == out_dir and (out_dir / "saved_model.pb").is_file()
    assert res.input_shape == (None, SIZE, SIZE, 3)
    sig = tf.saved_model.load(str(out_dir)).signatures["serving_default"]
    spec = sig.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, SIZE, SIZE, 3]
    (out,) = sig(image=tf.constant(frames)).values()  # dynamic batch: both frames at once
    assert out.dtype == tf.uint8
    agree = _agree(out.numpy(), reference)
    print(f"SavedModel vs Keras port: {agree:.6f}")
    assert agree >= 0.999


def test_tflite_float(
    segstream_home: Path, frames: np.ndarray, reference: np.ndarray, tmp_path: Path
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    out_file = tmp_path / "voc.tflite"
    export_model("tflite", out_file, name="mnv2-voc", batch=2)
    it = Interpreter(model_path=str(out_file), num_threads=2)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and tuple(inp["shape"]) == (2, SIZE, SIZE, 3)
    it.set_tensor(inp["index"], frames)
    it.invoke()
    out = it.get_tensor(outp["index"])
    assert out.dtype == np.uint8
    agree = _agree(out, reference)
    print(f"TFLite float vs Keras port: {agree:.6f}")
    assert agree >= 0.999


def test_onnx(
    segstream_home: Path, frames: np.ndarray, reference: np.ndarray, tmp_path: Path
) -> None:
    if (
        importlib.util.find_spec("tf2onnx") is None
        or importlib.util.find_spec("onnxruntime") is None
    ):
        pytest.skip("tf2onnx/onnxruntime not installed (pip install '.[onnx]')")
    import onnxruntime as ort

    res = export_model("onnx", tmp_path, name="mnv2-voc")
    assert res.path == tmp_path / "mnv2-voc.onnx"
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.type == "tensor(uint8)"
    (out,) = sess.run(None, {inp.name: frames})
    agree = _agree(out, reference)
    print(f"ONNX vs Keras port: {agree:.6f}")
    assert agree >= 0.999


def test_logits_output(
    segstream_home: Path, frames: np.ndarray, reference: np.ndarray, tmp_path: Path
) -> None:
    """--logits: float [B, S, S, 21] whose argmax is the class output (TFLite, small size)."""
    from ai_edge_litert.interpreter import Interpreter

    res = export_model("tflite", tmp_path, name="mnv2-voc-fast", input_size=257, logits=True)
    assert res.path.name == "mnv2-voc-fast-logits.tflite"
    it = Interpreter(model_path=str(res.path))
    it.allocate_tensors()
    outp = it.get_output_details()[0]
    assert outp["dtype"] == np.float32 and tuple(outp["shape"]) == (1, 257, 257, 21)
    it.set_tensor(it.get_input_details()[0]["index"], prepare(frames[0], 257)[None])
    it.invoke()
    bird = np.argmax(it.get_tensor(outp["index"])[0], axis=-1)
    assert (bird == 3).mean() > 0.05  # the x0.5 model still finds the bird


def test_overwrite_needs_flag_and_keeps_old_file(segstream_home: Path, tmp_path: Path) -> None:
    target = tmp_path / "m.keras"
    target.write_bytes(b"precious")
    with pytest.raises(ExportError, match=r"already exists.*--overwrite"):
        export_model("keras", target, name="mnv2-voc-fast")
    assert target.read_bytes() == b"precious"
    export_model("keras", target, name="mnv2-voc-fast", input_size=129, overwrite=True)
    assert target.stat().st_size > 1_000_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--format", "pb"], "invalid choice: 'pb'"),
        (["--format", "tflite", "--batch", "-1"], "--batch must be >= 1"),
        (["--model", "mnv2-voc-257", "--faithful"], "'mnv2-voc-257' is a float file"),
        (["--faithful", "--format", "onnx"], "--faithful is written as keras or savedmodel"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--format", "tflite", "--out", "{tmp}/x.onnx"], r"writes a \.tflite file"),
        (["--out", "{tmp}/afile/m.keras"], "cannot write to"),
    ],
)
def test_cli_errors(
    segstream_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    pattern: str,
) -> None:
    (tmp_path / "afile").write_text("a file, not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.keras")]
    try:
        rc = cli_main(["export", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc != 0
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out.keras").exists()


def test_cli_writes_and_reports(
    segstream_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(
        [
            "export",
            "--model",
            "mnv2-voc-fast",
            "--format",
            "keras",
            "--input-size",
            "129",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert (tmp_path / "mnv2-voc-fast.keras").is_file()
    assert "uint8 class ids" in capsys.readouterr().out
