"""Images and label masks on disk, for the offline tools and the HTTP API.

Label masks are written as 8-bit palette PNGs (``encode_palette_png``): pixel = class id,
PLTE = the model's colours, so any viewer shows colours and any PNG reader gets the ids.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


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
