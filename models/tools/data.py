"""Images and label masks on disk: the one contract of predict, evaluate and train.

- Files: images are ``IMAGE_EXTS``; masks ``MASK_EXTS``, lossless only (JPEG noise would
  change class ids). Extensions match in any case; hidden files (".x") are skipped.
- ``read_image``: uint8 **RGB** [H, W, 3], the order the models take. OpenCV decodes (BGR)
  and the channels are swapped here, once; greyscale is expanded, alpha dropped.
- ``read_mask``: class ids [H, W], read with Pillow so palette indices survive:
  palette images (PNG/BMP/TIFF, e.g. VOC SegmentationClass or `segstream predict` output):
  the index is the class id, whatever its colour; grey 8-bit: uint8; grey 16-bit: uint16,
  values as stored; an RGB(A) file whose three colour channels are equal: its grey value.
  Any other colour image is refused: a colour-coded mask needs its colours mapped to ids.
- ``pair_files``: ``images/<stem>.<image ext>`` pairs with ``masks/<stem>.<mask ext>`` by
  file name without extension; the result also lists what did not pair, and stems used by two
  files of one folder (the first in sorted order is kept). ``read_pair`` reads one pair and
  checks the two have the same size.
- Problems with a file raise ``DataError`` (a ValueError) naming it.

``encode_palette_png`` writes masks as 8-bit palette PNGs (pixel = class id, PLTE = the model's
colours), which ``read_mask`` reads back; the HTTP API uses it too.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class DataError(ValueError):
    """An image, mask or folder cannot be used; the message names it."""


# --- reading ---


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _unreadable(path: Path) -> DataError:
    return DataError(f"{path}: not a readable image (empty, corrupt or unsupported)")


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB [H, W, 3]; DataError naming the file if it is missing or not an image."""
    raw = _read_bytes(path)
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if bgr is None:
        raise _unreadable(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_mask(raw: bytes, path: Path) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise _unreadable(path) from None
    return im


def _class_ids(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode in ("LA", "PA"):  # the alpha band carries no labels
        im = im.getchannel(0)
    if im.mode == "1":
        im = im.convert("L")  # 0/255, as OpenCV reads bilevel files
    if im.mode in ("P", "L"):
        return np.array(im, dtype=np.uint8)
    if im.mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B", ...) or 32-bit "I"
        ids = np.array(im)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > 0xFFFF):
            raise DataError(f"{path}: mask values must be class ids 0..65535")
        return ids.astype(np.uint16)
    if im.mode in ("RGB", "RGBA"):
        rgb = np.array(im)[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])  # grey saved as colour
        raise DataError(
            f"{path}: a colour image ({im.mode}); a mask must be a single-channel "
            f"label image (pixel = class id) or a palette image (index = class "
            f"id). A colour-coded mask needs its colours mapped to class ids first"
        )
    raise DataError(
        f"{path}: unsupported mask pixel format {im.mode}; a mask must be a "
        f"single-channel label image (pixel = class id) or a palette image"
    )


def read_mask(path: Path) -> np.ndarray:
    """Class ids [H, W]: uint8 (palette, 8-bit grey) or uint16 (16-bit grey); see the module
    docstring for the accepted kinds. DataError naming the file otherwise."""
    return _class_ids(_decode_mask(_read_bytes(path), path), path)


def read_pair(image: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, class ids) of one pair; DataError if either is unreadable or sizes differ."""
    rgb, ids = read_image(image), read_mask(mask)
    if rgb.shape[:2] != ids.shape:
        raise DataError(
            f"{Path(image).stem}: image {Path(image).name} is {rgb.shape[1]}x"
            f"{rgb.shape[0]} but mask {Path(mask).name} is {ids.shape[1]}x"
            f"{ids.shape[0]}; they must have the same size"
        )
    return rgb, ids


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class map to (h, w). INTER_NEAREST_EXACT samples at pixel
    centres (like PIL and TF); plain INTER_NEAREST shifts the map by up to half a source pixel."""
    h, w = size
    if labels.shape[:2] == (h, w):
        return labels
    return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


# --- pairing ---


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


@dataclass
class Pairing:
    pairs: list[Pair]
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # stems used twice in one folder


def _by_stem(folder: Path, exts: tuple[str, ...], problems: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in exts or p.name.startswith(".") or not p.is_file():
            continue
        if p.stem in found:
            problems.append(f"{p}: same stem as {found[p.stem].name}; using {found[p.stem].name}")
            continue
        found[p.stem] = p
    return found


def pair_files(images_dir: Path, masks_dir: Path) -> Pairing:
    """Match ``images_dir/<stem>.<image ext>`` with ``masks_dir/<stem>.<mask ext>``."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not d.is_dir():
            raise DataError(f"{what} folder {d} does not exist or is not a folder")
    problems: list[str] = []
    images = _by_stem(images_dir, IMAGE_EXTS, problems)
    masks = _by_stem(masks_dir, MASK_EXTS, problems)
    pairs = [Pair(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    return Pairing(
        pairs, sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys()), problems
    )


# --- writing: palette PNG (cv2 can only write RGB/grey PNGs) ---


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_palette_png(mask: np.ndarray, palette: np.ndarray, level: int = 6) -> bytes:
    """uint8 [H, W] class ids + uint8 [n<=256, 3] RGB palette -> bytes of an indexed PNG.

    Rows use filter 0 (none): label maps are long runs that zlib already packs well.
    """
    mask = np.asarray(mask)
    pal = np.asarray(palette)
    if mask.ndim != 2 or mask.dtype != np.uint8 or mask.size == 0:
        raise ValueError(
            f"mask must be a non-empty uint8 [H, W] array, got {mask.dtype} {mask.shape}"
        )
    if pal.ndim != 2 or pal.shape[1] != 3 or not 1 <= pal.shape[0] <= 256:
        raise ValueError(f"palette must be [1..256, 3] RGB, got {pal.shape}")
    need = int(mask.max()) + 1
    if pal.shape[0] < need:  # PNG requires an entry for every index used; pad with black
        pal = np.concatenate([pal, np.zeros((need - pal.shape[0], 3), pal.dtype)])
    h, w = mask.shape
    rows = np.zeros((h, w + 1), dtype=np.uint8)  # column 0: each row's filter-type byte
    rows[:, 1:] = mask
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 (indexed)
    return b"".join(
        (
            _PNG_SIG,
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"PLTE", pal.astype(np.uint8).tobytes()),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            _png_chunk(b"IEND", b""),
        )
    )
