"""Registry, palettes, the Segmenter contract on real models, and import mismatch detection."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models import registry
from segstream.models.labels import (
    VOC_LABELS,
)
from segstream.models.runtime import Segmenter, load_segmenter, prepare

# --- registry and labels ----------------------------------------------------------------


# --- prepare ---------------------------------------------------------------------------


# --- the Segmenter contract --------------------------------------------------------------


class RecordingSegmenter(Segmenter):
    """A real (tiny) segmenter: class = brightest channel; records the batch sizes it ran."""

    backend = "test"

    def __init__(self, batch_sizes: tuple[int, ...]) -> None:
        super().__init__(registry.get_spec("mnv2-voc"), (4, 5), batch_sizes)
        self.calls: list[int] = []

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape[0])
        return np.argmax(batch, axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    ("n", "calls"), [(1, [1]), (3, [4]), (8, [8]), (11, [8, 4]), (17, [8, 8, 1])]
)
def test_segment_pads_to_fixed_batch_sizes(n: int, calls: list[int]) -> None:
    seg = RecordingSegmenter((1, 2, 4, 8))
    frames = np.random.default_rng(n).integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)
    out = seg.segment(frames)
    assert seg.calls == calls
    assert out.shape == (n, 4, 5) and out.dtype == np.uint8
    assert np.array_equal(out, np.argmax(frames, axis=-1))
    seg.calls.clear()
    seg.warmup()
    assert seg.calls == [1, 2, 4, 8]


def _frames(shared_dir: Path, size: int) -> np.ndarray:
    d = shared_dir / "data"
    cap = cv2.VideoCapture(str(d / "video" / "vtest.avi"))
    ok, f0 = cap.read()
    cap.release()
    assert ok
    bird = cv2.imread(str(d / "coral_segmentation_samples" / "bird_segmentation.bmp"))
    city = cv2.imread(str(d / "coral_segmentation_samples" / "cityscapes_segmentation.bmp"))
    return np.stack([prepare(f, size, bgr=True) for f in (f0, bird, city)])


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("mnv2-voc", "tflite"),
        ("mnv2-voc", "keras"),
        ("mnv2-voc-fast", "tflite"),
        ("mnv2-voc-257", "tflite"),
    ],
)
def test_runtime_contract(segstream_home: Path, shared_dir: Path, name: str, backend: str) -> None:
    with load_segmenter(name, backend, batch_sizes=(1, 2, 4)) as seg:
        size = registry.get_spec(name).input_size
        assert seg.name == name and seg.backend == backend
        assert seg.mode == {
            ("mnv2-voc", "keras"): "int8-faithful",
            ("mnv2-voc-257", "tflite"): "float",
        }.get((name, backend), "int8")
        assert seg.input_size == (size, size)
        assert seg.num_classes == 21 and seg.labels == VOC_LABELS
        assert seg.palette.shape == (256, 3) and seg.palette.dtype == np.uint8
        assert seg.batch_sizes == (1, 2, 4)
        seg.warmup()
        frames = _frames(shared_dir, size)
        batch = seg.segment(frames)  # 3 frames -> padded to the fixed batch of 4
        singles = np.stack([seg.segment(f[None])[0] for f in frames])
    assert batch.shape == (3, size, size) and batch.dtype == np.uint8
    assert np.array_equal(batch, singles)
    assert batch.max() < 21
    assert (batch[1] == 3).any()  # the bird is found


def test_tflite_input_size_override(segstream_home: Path, shared_dir: Path) -> None:
    with load_segmenter("mnv2-voc", "tflite", batch_sizes=(2,), input_size=257) as seg:
        assert seg.input_size == (257, 257)
        out = seg.segment(_frames(shared_dir, 257)[:2])
    assert out.shape == (2, 257, 257) and (out[1] == 3).mean() > 0.1


def test_load_segmenter_errors(segstream_home: Path) -> None:
    with pytest.raises(ValueError, match="'mnv2-voc-257' is a float file"):
        load_segmenter("mnv2-voc-257", "keras", keras_mode="faithful")
    with pytest.raises(ValueError, match="backend"):
        load_segmenter("mnv2-voc", "onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid names"):
        load_segmenter("nope")


def test_auto_backend_is_tflite_without_gpu(segstream_home: Path) -> None:
    from segstream.models.runtime import gpu_visible

    with load_segmenter("mnv2-voc-fast", "auto", batch_sizes=(1,)) as seg:
        assert seg.backend == ("keras" if gpu_visible() else "tflite")


@pytest.mark.parametrize("backend", ["tflite", "keras"])
def test_edgetpu_cityscapes_matches_sample_mask(
    segstream_home: Path, shared_dir: Path, backend: str
) -> None:
    d = shared_dir / "data" / "coral_segmentation_samples"
    img = prepare(cv2.imread(str(d / "cityscapes_segmentation.bmp")), 513, bgr=True)
    mask = cv2.imread(str(d / "cityscapes_segmentation_mask.bmp"), cv2.IMREAD_GRAYSCALE)
    with load_segmenter("edgetpu-cityscapes", backend, batch_sizes=(1,)) as seg:
        assert seg.num_classes == 19 and seg.mode in ("int8", "int8-faithful")
        assert seg.palette[0].tolist() == [128, 64, 128]
        pred = seg.segment(img[None])[0]
    agree = float((pred == mask).mean())
    print(f"edgetpu-cityscapes ({backend}) vs Coral mask: {agree:.4f}")
    assert agree >= 0.90  # README: 92.1 %
    assert pred.max() <= 18


# --- module structure ----------------------------------------------------------------------


# --- weight import: mismatches fail loudly -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"output_stride": 8}, r"MobilenetV2/expanded_conv_6/depthwise: stride"),
        ({"depth_multiplier": 0.5}, r"MobilenetV2/Conv: kernel shape"),
        ({"num_classes": 19}, r"logits/semantic: kernel shape"),
    ],
)
def test_import_mismatch_is_loud(segstream_home: Path, kwargs: dict, pattern: str) -> None:
    from segstream.models.deeplab import build_deeplab
    from segstream.models.fetch import model_path
    from segstream.models.tflite_import import ImportMismatchError, import_weights

    args = {"num_classes": 21, "depth_multiplier": 1.0, "output_stride": 16, **kwargs}
    model = build_deeplab(**args, input_size=129)
    with pytest.raises(ImportMismatchError, match=pattern):
        import_weights(model, model_path("mnv2-voc"))


def test_import_checks_dilation(segstream_home: Path) -> None:
    """x0.5 float file is output stride 8; a stride-16 model differs first in dilation."""
    from segstream.models.deeplab import build_deeplab
    from segstream.models.fetch import model_path
    from segstream.models.tflite_import import ImportMismatchError, import_weights

    model = build_deeplab(21, 0.5, 16, 129)
    with pytest.raises(ImportMismatchError, match=r"expanded_conv_6/depthwise: stride"):
        import_weights(model, model_path("mnv2-voc-dm05-float"))
    model = build_deeplab(21, 0.5, 32, 129)
    with pytest.raises(ImportMismatchError, match=r"mnv2_dm05.*quant.*expanded_conv_13/depthwise"):
        import_weights(model, model_path("mnv2-voc-fast"))


def test_import_rejects_other_architecture(segstream_home: Path) -> None:
    from segstream.models.deeplab import build_deeplab
    from segstream.models.fetch import model_path
    from segstream.models.tflite_import import ImportMismatchError, import_weights

    with pytest.raises(ImportMismatchError, match="layers differ"):
        import_weights(build_deeplab(19, 1.0, 16, 129), model_path("edgetpu-cityscapes"))


def test_import_rejects_other_backbone(segstream_home: Path) -> None:
    from segstream.models.deeplab import build_deeplab
    from segstream.models.fetch import model_path
    from segstream.models.tflite_import import ImportMismatchError, import_weights

    model = build_deeplab(21, 0.75, 16, 129, backbone="mobilenet_edgetpu", head_depth=128)
    with pytest.raises(ImportMismatchError, match="layers differ"):
        import_weights(model, model_path("mnv2-voc"))


def _edited_file(src: Path, dst: Path, edit) -> Path:
    """A copy of the .tflite ``src`` with ``edit(model, subgraph)`` applied."""
    from segstream.models.tflite_schema import pack, unpack

    model = unpack(src.read_bytes())
    edit(model, model.subgraphs[0])
    dst.write_bytes(pack(model))
    return dst


def _tensor(g, name: str):
    return next(t for t in g.tensors if t.name.decode() == name)


def _drop_quant(model, g) -> None:
    _tensor(g, "MobilenetV2/expanded_conv_2/add").quantization = None


def _shift_pool(model, g) -> None:
    q = _tensor(g, "AvgPool2D/AvgPool").quantization
    q.zeroPoint = [int(q.zeroPoint[0]) + 3]


def _unbound_concat(model, g) -> None:
    q = _tensor(g, "ResizeBilinear1").quantization
    q.scale = [float(q.scale[0]) * 1.5]


def _huge_bias(model, g) -> None:
    import numpy as np

    t = next(t for t in g.tensors if t.name.decode().startswith("aspp0/") and t.type == 2)
    buf = model.buffers[t.buffer]
    vals = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), np.int32).copy()
    vals[0] = 1 << 25
    buf.data = np.frombuffer(vals.tobytes(), np.uint8)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (_drop_quant, r"uint8 tensor 'MobilenetV2/expanded_conv_2/add' has no \(single\) scale"),
        (_shift_pool, r"image_pooling/pool: output 'AvgPool2D/AvgPool' .* on another grid"),
        (
            _unbound_concat,
            r"concat: output 'concat' .* another grid than its input 'ResizeBilinear1'",
        ),
        (_huge_bias, r"bias 'aspp0/.*' reaches 33554432, past the 2\*\*24"),
    ],
)
def test_quant_import_is_loud(segstream_home: Path, tmp_path: Path, edit, pattern: str) -> None:
    """A missing or unexpected quantization parameter fails, naming the tensor."""
    from segstream.models.deeplab import build_deeplab, quant_sites
    from segstream.models.fetch import model_path
    from segstream.models.tflite_import import ImportMismatchError, check_quant, read_tflite

    path = _edited_file(model_path("mnv2-voc-fast"), tmp_path / "edited.tflite", edit)
    graph = read_tflite(path)
    sites = quant_sites(build_deeplab(21, 0.5, 16, 65))
    with pytest.raises(ImportMismatchError, match=pattern):
        check_quant(graph, sites, path.name)


def test_quant_sites_match_the_files(segstream_home: Path) -> None:
    """Every uint8 tensor of each file maps to a site of its port and back."""
    from segstream.models.deeplab import SITE_INPUT, SITE_REQUANT, build_deeplab, quant_sites
    from segstream.models.fetch import model_path
    from segstream.models.tflite_import import build_for_spec, check_quant, read_tflite

    for name in ("mnv2-voc", "mnv2-voc-fast", "edgetpu-cityscapes"):
        graph = read_tflite(model_path(name))
        sites = quant_sites(build_for_spec(registry.get_spec(name), 65))
        grids = check_quant(graph, sites, name)
        assert grids[SITE_INPUT].as_list() == [0.0078125, 128]
        assert grids[SITE_REQUANT] != grids["image_pooling"]  # the file requantizes there
        assert len(grids) == len(sites) > 100
    with pytest.raises(ValueError, match="not a uint8 file"):
        check_quant(
            read_tflite(model_path("mnv2-voc-257")),
            quant_sites(build_deeplab(21, 0.5, 8, 65)),
            "257",
        )


def test_faithful_mode_needs_a_uint8_file(segstream_home: Path) -> None:
    from segstream.models.tflite_import import load_keras_model

    with pytest.raises(ValueError, match="'mnv2-voc-dm05-float' is a float file"):
        load_keras_model("mnv2-voc-dm05-float", 65, mode="faithful")
    assert load_keras_model("mnv2-voc-dm05-float", 65).mode == "float"
    assert load_keras_model("mnv2-voc-fast", 65).mode == "faithful"


def test_weights_cache_roundtrip(segstream_home: Path) -> None:
    from segstream.models.tflite_import import load_keras_model, weights_path

    fresh = load_keras_model("mnv2-voc-fast", input_size=129, reimport=True)
    assert weights_path("mnv2-voc-fast").is_file()
    cached = load_keras_model("mnv2-voc-fast", input_size=129)
    for a, b in zip(fresh.weights, cached.weights, strict=True):
        assert np.array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
    # a damaged cache is rebuilt from the .tflite rather than failing
    weights_path("mnv2-voc-fast").write_bytes(b"not an h5 file")
    again = load_keras_model("mnv2-voc-fast", input_size=129)
    assert np.array_equal(again.weights[0].numpy(), fresh.weights[0].numpy())
    # the faithful model holds the file's integers, from the cache as from the file
    assert fresh.mode == again.mode == "faithful"
    kernel = again.get_layer("MobilenetV2__Conv").kernel.numpy()
    assert np.array_equal(kernel, np.round(kernel)) and np.abs(kernel).max() <= 255
