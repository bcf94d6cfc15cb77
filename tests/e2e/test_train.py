"""`segstream train`: fine-tuning on real CamVid pairs (TF and JAX), the output files, bad input.

CamVid (CC BY-NC) is only read from ../shared; the tests link a handful of its files into a
temporary folder and never copy them into the repo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from segstream.models import finetuned
from segstream.models.tools import train
from segstream.models.tools.train import DatasetError, TrainConfig, fine_tune

REPO = Path(__file__).resolve().parents[2]
CAMVID_CLASSES, CAMVID_VOID, CAMVID_ROAD = 11, 11, 3


def _camvid_subset(shared_dir: Path, dest: Path, n: int) -> tuple[Path, Path]:
    """images/ + masks/ folders of symlinks to n CamVid pairs spread over the test split."""
    src = shared_dir / "data" / "camvid_segnet_test"
    stems = (src / "test.txt").read_text().split()
    images, masks = dest / "images", dest / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for stem in stems[:: len(stems) // n][:n]:
        (images / f"{stem}.png").symlink_to(src / "images" / f"{stem}.png")
        (masks / f"{stem}.png").symlink_to(src / "masks" / f"{stem}.png")
    return images, masks


def test_fine_tune_camvid_new_class_count(
    segstream_home: Path, shared_dir: Path, tmp_path: Path
) -> None:
    """21 VOC classes -> 11 CamVid classes (void ignored): the loss falls, val mIoU rises,
    and the saved file rebuilds a model (at another size) that gives CamVid class ids.
    20 steps of batch 2 at 129 px: ~0.1 s a step on 2 cores."""
    images, masks = _camvid_subset(shared_dir, tmp_path / "data", 14)
    out = tmp_path / "out" / "camvid.weights.h5"
    lines: list[str] = []
    res = fine_tune(
        TrainConfig(
            images=images,
            masks=masks,
            model="mnv2-voc",
            num_classes=CAMVID_CLASSES,
            class_names=(shared_dir / "data/camvid_segnet_test/labels.txt")
            .read_text()
            .split("\n")[:CAMVID_CLASSES],
            ignore_id=CAMVID_VOID,
            input_size=129,
            epochs=4,
            batch_size=2,
            lr=3e-4,
            val_split=0.2,
            out=out,
        ),
        report=lines.append,
    )
    losses = [h["loss"] for h in res.history]
    mious = [h["val_miou"] for h in res.history]
    print("\n".join(lines))
    assert len(res.history) == 4 and all(np.isfinite(losses))
    assert losses[0] < np.log(CAMVID_CLASSES) + 0.1  # fresh logits layer: ~uniform at start
    assert losses[-1] < 0.8 * losses[0]
    assert mious[-1] > res.initial["miou"] + 0.05
    assert res.weights == out and out.is_file() and res.sidecar == out.with_name("camvid.json")

    meta = json.loads(res.sidecar.read_text())
    assert meta["base_model"] == "mnv2-voc" and meta["num_classes"] == CAMVID_CLASSES
    assert meta["input_size"] == 129 and meta["labels"][0] == "Sky" and len(meta["labels"]) == 11
    assert meta["logits_reinitialised"] and len(meta["history"]) == 4

    model, _ = finetuned.load_finetuned(out, input_size=161)
    frame = cv2.imread(str(images / sorted(os.listdir(images))[0]))
    x = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (161, 161))[None]
    pred = np.asarray(model(x))
    assert pred.shape == (1, 161, 161) and pred.dtype == np.uint8
    assert pred.max() < CAMVID_CLASSES
    assert (pred == CAMVID_ROAD).mean() > 0.05  # after 20 tiny steps it already finds the road

    # The service's runtime serves the fine-tuned model with the sidecar's class names.
    from segstream.models.runtime import load_segmenter

    seg = load_segmenter(weights=out, batch_sizes=(1,))
    assert seg.backend == "keras" and seg.labels[0] == "Sky" and seg.num_classes == 11
    assert seg.input_size == (129, 129)
    served = seg.segment(cv2.resize(x[0], (129, 129))[None])
    assert served.shape == (1, 129, 129) and served.max() < CAMVID_CLASSES
    with pytest.raises(ValueError, match="keras backend"):
        load_segmenter(weights=out, backend="tflite")

    from segstream.models.tools.export import export_model, load_keras_file

    exp = export_model("keras", tmp_path / "exp", weights=out)
    assert exp.path.name == "camvid.keras"
    again = np.asarray(load_keras_file(exp.path)(cv2.resize(x[0], (129, 129))[None]))
    assert again.shape == (1, 129, 129) and again.max() < CAMVID_CLASSES


def test_new_head_keeps_backbone_and_aspp(segstream_home: Path) -> None:
    from segstream.models.registry import get_spec
    from segstream.models.tflite_import import load_keras_model

    base = load_keras_model("mnv2-voc-fast", 65, output="logits", mode="float")
    model = train.build_finetune_model(get_spec("mnv2-voc-fast"), 5, 65)
    head = model.get_layer(train.LOGITS_LAYER)
    assert tuple(head.kernel.shape) == (1, 1, 256, 5)
    assert float(np.abs(np.asarray(head.bias)).max()) == 0.0
    kept = 0
    for layer in model.layers:
        if layer.weights and layer.name != train.LOGITS_LAYER:
            for a, b in zip(
                layer.get_weights(), base.get_layer(layer.name).get_weights(), strict=True
            ):
                np.testing.assert_array_equal(a, b)
            kept += 1
    assert kept == 54  # 51 MobileNetV2 convs + image pooling, aspp0, concat projection
    same = train.build_finetune_model(get_spec("mnv2-voc-fast"), 21, 65)
    np.testing.assert_array_equal(
        same.get_layer(train.LOGITS_LAYER).get_weights()[0],
        base.get_layer(train.LOGITS_LAYER).get_weights()[0],
    )


_JAX_TRAIN = textwrap.dedent("""
    import sys
    from pathlib import Path
    import keras
    from segstream.models.tools.train import TrainConfig, fine_tune

    assert keras.backend.backend() == "jax", keras.backend.backend()
    res = fine_tune(TrainConfig(images=Path(sys.argv[1]), masks=Path(sys.argv[2]),
                                model="mnv2-voc-fast", num_classes=11, ignore_id=11,
                                input_size=65, epochs=1, max_steps=2, batch_size=2,
                                val_split=0, out=Path(sys.argv[3])), report=print)
    print("LOSS", res.history[0]["loss"])
""")


def test_fine_tune_on_jax_backend(segstream_home: Path, shared_dir: Path, tmp_path: Path) -> None:
    """The same pipeline trains on JAX; its weights load into a TF-backend model."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install '.[jax]')")
    images, masks = _camvid_subset(shared_dir, tmp_path / "data", 4)
    out = tmp_path / "jax.weights.h5"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _JAX_TRAIN, str(images), str(masks), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = float(proc.stdout.split("LOSS")[-1])
    assert np.isfinite(loss) and loss > 0
    meta = finetuned.read_sidecar(out)
    assert meta["keras_backend"] == "jax" and meta["num_classes"] == 11
    model, _ = finetuned.load_finetuned(out)  # this process: TF backend
    assert np.asarray(model(np.zeros((1, 65, 65, 3), np.uint8))).shape == (1, 65, 65)


# ------------------------------------------------------------------ metric


# ------------------------------------------------------------------ bad input


def _pairs(
    root: Path,
    masks: dict[str, np.ndarray],
    images: list[str] | None = None,
    size: tuple[int, int] = (24, 32),
) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in images if images is not None else list(masks):
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), np.full((*size, 3), 90, np.uint8))
    for stem, m in masks.items():
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), m)
    return root / "images", root / "masks"


def _ok_mask(v: int = 1) -> np.ndarray:
    m = np.zeros((24, 32), np.uint8)
    m[:, 16:] = v
    return m


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("empty", r"no images in .*images"),
        ("no_masks", r"no masks in .*masks"),
        ("unpaired", r"1 image\(s\) without a mask .*b; 1 mask\(s\) without an image .*c"),
        ("bad_ids", r"1 mask\(s\) hold class ids >= --num-classes 3 .*b\.png \(7\)"),
        ("colour", r"colour image .*single-channel"),
        ("size", r"image a\.jpg is 32x24 but mask a\.png is 16x8"),
        ("void_only", r"every mask pixel is the ignore id 255"),
        ("missing_dir", r"images folder .*nowhere does not exist"),
    ],
)
def test_bad_datasets_fail_before_training(tmp_path: Path, case: str, pattern: str) -> None:
    root = tmp_path / "d"
    if case == "empty":
        images, masks = _pairs(root, {})
    elif case == "no_masks":
        images, masks = _pairs(root, {}, images=["a"])
    elif case == "unpaired":
        images, masks = _pairs(root, {"a": _ok_mask(), "c": _ok_mask()}, images=["a", "b"])
    elif case == "bad_ids":
        images, masks = _pairs(root, {"a": _ok_mask(2), "b": _ok_mask(7), "c": _ok_mask(255)})
    elif case == "colour":
        images, masks = _pairs(root, {"a": np.dstack([_ok_mask(), _ok_mask(), _ok_mask(5)])})
    elif case == "size":
        images, masks = _pairs(root, {"a": np.zeros((8, 16), np.uint8)})
    elif case == "void_only":
        images, masks = _pairs(root, {"a": np.full((24, 32), 255, np.uint8)})
    else:
        images, masks = tmp_path / "nowhere", tmp_path / "nowhere2"
    with pytest.raises(DatasetError, match=pattern):
        fine_tune(TrainConfig(images=images, masks=masks, num_classes=3, out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()
