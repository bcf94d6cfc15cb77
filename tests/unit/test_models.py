"""Registry, palettes, the Segmenter contract on real models, and import mismatch detection: the
parts that need no model and no peers (the rest: tests/e2e/test_models.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models import registry
from segstream.models.labels import (
    CAMVID_LABELS,
    CITYSCAPES_LABELS,
    VOC_LABELS,
    cityscapes_palette,
    voc_palette,
)
from segstream.models.runtime import Segmenter, prepare

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def test_registry_names_and_specs() -> None:
    assert set(registry.MODELS) >= {
        "mnv2-voc",
        "mnv2-voc-fast",
        "edgetpu-cityscapes",
        "mnv2-voc-dm05-float",
        "mnv2-voc-257",
    }
    for name, spec in registry.MODELS.items():
        assert spec.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), spec.sha256
        assert spec.url.startswith("https://raw.githubusercontent.com/")
        assert spec.url.endswith((spec.filename, "fp32.tflite"))
        assert spec.input_size in (257, 513)
        assert spec.tflite_kind in ("argmax_uint8", "logits_float")
        pal = spec.palette_array()
        assert pal.shape == (256, 3) and pal.dtype == np.uint8
    default = registry.get_spec("mnv2-voc")
    assert (default.depth_multiplier, default.output_stride, default.keras) == (1.0, 16, True)
    edge = registry.get_spec("edgetpu-cityscapes")
    assert edge.keras is True and edge.labels == CITYSCAPES_LABELS
    assert (edge.backbone, edge.depth_multiplier, edge.output_stride, edge.head_depth) == (
        "mobilenet_edgetpu",
        0.75,
        16,
        128,
    )
    assert [n for n, s in registry.MODELS.items() if s.quantized] == [
        "mnv2-voc",
        "mnv2-voc-fast",
        "edgetpu-cityscapes",
    ]
    vtest = registry.SAMPLES["vtest"]
    assert vtest.filename == "vtest.avi" and vtest.url.endswith("samples/data/vtest.avi")


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"mnv2-voc.*edgetpu-cityscapes"):
        registry.get_spec("deeplab-xl")


def test_labels() -> None:
    assert len(VOC_LABELS) == 21 and VOC_LABELS[15] == "person" and VOC_LABELS[3] == "bird"
    assert len(CITYSCAPES_LABELS) == 19 and CITYSCAPES_LABELS[13] == "car"
    assert len(CAMVID_LABELS) == 12 and CAMVID_LABELS[11] == "Unlabelled"


def test_labels_match_shipped_label_files(shared_dir: Path) -> None:
    for name, spec in registry.MODELS.items():
        folder = {
            "mnv2-voc": "deeplabv3_mnv2_pascal_quant",
            "mnv2-voc-fast": "deeplabv3_mnv2_dm05_pascal_quant",
            "mnv2-voc-dm05-float": "deeplabv3_mnv2_dm05_pascal_trainval_fp32_513",
            "mnv2-voc-257": "deeplabv3_mnv2_dm05_pascal_float_257",
            "edgetpu-cityscapes": "deeplab_mobilenet_edgetpu_slim_cityscapes_quant",
        }[name]
        lines = (shared_dir / "models" / folder / "labels.txt").read_text().split("\n")
        assert [x for x in lines if x] == spec.labels, name


def test_palettes() -> None:
    voc = voc_palette()
    assert voc.shape == (256, 3) and voc.dtype == np.uint8
    assert voc[0].tolist() == [0, 0, 0]
    assert voc[1].tolist() == [128, 0, 0]
    assert voc[15].tolist() == [192, 128, 128]  # person
    assert voc[255].tolist() == [224, 224, 192]  # the VOC "void" border colour
    assert len({tuple(c) for c in voc[:21]}) == 21
    cs = cityscapes_palette()
    assert cs.shape == (256, 3) and cs.dtype == np.uint8
    assert cs[0].tolist() == [128, 64, 128]  # road
    assert cs[13].tolist() == [0, 0, 142]  # car
    assert cs[18].tolist() == [119, 11, 32]  # bicycle
    assert not cs[19:].any()


def test_prepare_resizes_converts_and_fills_out() -> None:
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (576, 768, 3), dtype=np.uint8)
    rgb = prepare(bgr, 513, bgr=True)
    assert rgb.shape == (513, 513, 3) and rgb.dtype == np.uint8
    expected = cv2.resize(bgr, (513, 513), interpolation=cv2.INTER_LINEAR)[..., ::-1]
    assert np.array_equal(rgb, expected)
    buf = np.zeros((3, 257, 300, 3), dtype=np.uint8)
    got = prepare(bgr, (257, 300), out=buf[1])
    assert np.shares_memory(got, buf) and np.array_equal(buf[1], got)
    assert not buf[0].any() and not buf[2].any()
    same = prepare(expected.copy(), 513)
    assert np.array_equal(same, expected)
    with pytest.raises(ValueError, match="out must be"):
        prepare(bgr, 513, out=np.zeros((257, 257, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        prepare(bgr.astype(np.float32), 513)


class RecordingSegmenter(Segmenter):
    """A real (tiny) segmenter: class = brightest channel; records the batch sizes it ran."""

    backend = "test"

    def __init__(self, batch_sizes: tuple[int, ...]) -> None:
        super().__init__(registry.get_spec("mnv2-voc"), (4, 5), batch_sizes)
        self.calls: list[int] = []

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape[0])
        return np.argmax(batch, axis=-1).astype(np.uint8)


def test_segment_rejects_bad_frames() -> None:
    seg = RecordingSegmenter((1, 2))
    for bad in (
        np.zeros((4, 5, 3), np.uint8),
        np.zeros((1, 5, 4, 3), np.uint8),
        np.zeros((1, 4, 5, 3), np.float32),
        np.zeros((0, 4, 5, 3), np.uint8),
    ):
        with pytest.raises(ValueError, match="frames"):
            seg.segment(bad)
    with pytest.raises(ValueError, match="batch_sizes"):
        RecordingSegmenter(())


def _module_name(path: Path) -> str:
    parts = path.relative_to(MODELS_DIR.parent).with_suffix("").parts
    return ".".join(("segstream", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _imports_of(path: Path, modules: set[str]) -> set[str]:
    """The models.* modules ``path`` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)  # `from models import fetch` names a module too:
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & modules


def test_models_have_no_import_cycles() -> None:
    """No module of models/ imports one that (directly or not) imports it back, not even
    lazily inside a function."""
    paths = {_module_name(p): p for p in MODELS_DIR.rglob("*.py")}
    graph = {m: _imports_of(p, set(paths)) - {m} for m, p in paths.items()}
    assert graph.get("segstream.models.runtime.loader")

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_argmax_ties_go_to_the_lowest_class() -> None:
    """uint8 logits tie often; TFLite's ARG_MAX takes the first maximum."""
    from segstream.models.deeplab import ArgmaxUint8

    x = np.array([[[[3, 7, 7, 1], [9, 9, 9, 9], [0, 0, 0, 5], [2, 5, 4, 5]]]], np.float32)
    assert np.asarray(ArgmaxUint8()(x)).tolist() == [[[1, 0, 3, 1]]]
