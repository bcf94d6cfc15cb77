"""Class names and colour maps of the datasets the shipped models were trained on."""

from __future__ import annotations

import numpy as np

VOC_LABELS: list[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

# Cityscapes trainIds 0..18 (the edgetpu model's output ids; no "background" entry).
CITYSCAPES_LABELS: list[str] = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]  # fmt: skip

# SegNet CamVid 11 classes + void (id 11); evaluation data only.
CAMVID_LABELS: list[str] = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist", "Unlabelled",
]  # fmt: skip

_CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map: uint8 [256, 3] RGB (bit-interleaved class id)."""
    ids = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for ch in range(3):
            pal[:, ch] |= ((ids >> ch) & 1) << (7 - shift)
        ids = ids >> 3
    return pal.astype(np.uint8)


def cityscapes_palette() -> np.ndarray:
    """The standard Cityscapes trainId colours: uint8 [256, 3] RGB, ids >= 19 black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(_CITYSCAPES_COLOURS)] = np.asarray(_CITYSCAPES_COLOURS, dtype=np.uint8)
    return pal
