"""`segstream predict` on the real Coral bird sample with the real mnv2-voc weights: the parts that
need no model and no peers (the rest: tests/e2e/test_predict.py)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from segstream.models.labels import voc_palette
from segstream.models.tools.data import encode_palette_png


def decode_palette_png(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """An independent minimal reader: (class ids [H, W], palette [n, 3]) of an 8-bit indexed,
    filter-0 PNG, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    assert [*chunks][:1] == [b"IHDR"] and [*chunks][-1:] == [b"IEND"]
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, ctype, interlace) == (8, 3, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].copy(), np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)


def test_palette_png_pads_a_short_palette_and_rejects_bad_input() -> None:
    mask = np.array([[0, 5]], np.uint8)
    ids, pal = decode_palette_png(encode_palette_png(mask, np.array([[1, 2, 3]], np.uint8)))
    assert pal.shape == (6, 3) and ids.tolist() == [[0, 5]]
    with pytest.raises(ValueError, match="uint8"):
        encode_palette_png(mask.astype(np.int32), voc_palette())
    with pytest.raises(ValueError, match="palette"):
        encode_palette_png(mask, np.zeros((256, 4), np.uint8))
