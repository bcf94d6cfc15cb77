"""A time stamp drawn into the picture, so latency is measured from the pixels a viewer gets.

The benchmark's source writes each frame's send time (and a sequence number) into the
bottom-right corner as a grid of 16x16 black/white cells; the receiving side reads it back from
the JPEG it gets. The code is built to survive what happens on the way:

- 16x16 cells on a 16-pixel grid line up with H.264 macroblocks and JPEG MCUs, and are read
  from their 8x8 centre (or from the JPEG's 1/8-scale DC image), away from ringing at edges.
- Every bit is a Manchester pair (white|black = 1, black|white = 0) and is read by comparing
  the two cells, never against a fixed threshold. The service's overlay blends a class colour
  c with alpha a <= 0.5: a white cell stays >= 255(1-a) >= 127.5 and a black one <= 255a, so
  the comparison holds whatever colour either cell gets (the legend sits top-left, away).
- A CRC-8 rejects the rare misread instead of reporting a wrong latency.

The clock is CLOCK_MONOTONIC in milliseconds modulo 2**32, the same in every process on the
machine. Encoding needs only the standard library (the RTSP source runs under Debian's system
Python, which has no numpy); decoding uses numpy and simplejpeg.
"""

from __future__ import annotations

import time
from typing import Any

CELL = 16  # pixels per cell side
MARGIN = 16  # pixels from the right and bottom edges
SEQ_BITS = 16
TIME_BITS = 32
CRC_BITS = 8
NBITS = SEQ_BITS + TIME_BITS + CRC_BITS  # 56
PAIRS_PER_ROW = 7
ROWS = NBITS // PAIRS_PER_ROW  # 8
COLS = 2 * PAIRS_PER_ROW  # 14 cells
WIDTH = COLS * CELL  # 224 px
HEIGHT = ROWS * CELL  # 128 px
_WRAP = 1 << TIME_BITS


def now_ms() -> int:
    """The stamp clock: monotonic milliseconds, wrapped to 32 bits."""
    return int(time.monotonic() * 1000.0) % _WRAP


def age_ms(stamp_ms: int, now: int | None = None) -> int:
    """Milliseconds from a stamp to `now` (default: now), across the 32-bit wrap."""
    return ((now_ms() if now is None else now) - stamp_ms) % _WRAP


def crc8(data: bytes) -> int:
    """CRC-8 (polynomial 0x07)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode_bits(seq: int, t_ms: int) -> list[int]:
    """56 bits, most significant first: seq (16), time (32), CRC-8 of both."""
    payload = (seq % (1 << SEQ_BITS)).to_bytes(2, "big") + (t_ms % _WRAP).to_bytes(4, "big")
    word = int.from_bytes(payload + bytes([crc8(payload)]), "big")
    return [(word >> (NBITS - 1 - i)) & 1 for i in range(NBITS)]


def decode_bits(bits: list[int]) -> tuple[int, int] | None:
    """(seq, t_ms), or None when the CRC does not match."""
    word = 0
    for b in bits:
        word = (word << 1) | int(b)
    raw = word.to_bytes(NBITS // 8, "big")
    if crc8(raw[:6]) != raw[6]:
        return None
    return int.from_bytes(raw[:2], "big"), int.from_bytes(raw[2:6], "big")


def origin(width: int, height: int) -> tuple[int, int]:
    """Top-left pixel of the stamp in a width x height frame (on the 16-pixel grid)."""
    if width < WIDTH + 2 * MARGIN or height < HEIGHT + 2 * MARGIN:
        raise ValueError(f"frame {width}x{height} is too small for a {WIDTH}x{HEIGHT} stamp")
    x0 = (width - MARGIN - WIDTH) // CELL * CELL
    y0 = (height - MARGIN - HEIGHT) // CELL * CELL
    return x0, y0


def cell_values(seq: int, t_ms: int) -> list[list[int]]:
    """ROWS x COLS of 1 (white) / 0 (black)."""
    bits = encode_bits(seq, t_ms)
    grid = []
    for r in range(ROWS):
        row = []
        for b in bits[r * PAIRS_PER_ROW : (r + 1) * PAIRS_PER_ROW]:
            row += [1, 0] if b else [0, 1]
        grid.append(row)
    return grid


def stamp_i420(buf: bytearray, width: int, height: int, seq: int, t_ms: int) -> None:
    """Draws the stamp into an I420 frame in place (limited range: Y 16/235, neutral chroma)."""
    x0, y0 = origin(width, height)
    grid = cell_values(seq, t_ms)
    runs = [b"".join((b"\xeb" if v else b"\x10") * CELL for v in row) for row in grid]
    for r, run in enumerate(runs):
        for y in range(y0 + r * CELL, y0 + (r + 1) * CELL):
            start = y * width + x0
            buf[start : start + WIDTH] = run
    cw, ch = width // 2, height // 2
    grey = b"\x80" * (WIDTH // 2)
    for plane in (width * height, width * height + cw * ch):
        for y in range(y0 // 2, (y0 + HEIGHT) // 2):
            start = plane + y * cw + x0 // 2
            buf[start : start + WIDTH // 2] = grey


def stamp_bgr(image: Any, seq: int, t_ms: int) -> None:
    """Draws the stamp into a uint8 [H, W, 3] (or [H, W]) numpy image in place."""
    import numpy as np

    h, w = image.shape[:2]
    x0, y0 = origin(w, h)
    grid = np.asarray(cell_values(seq, t_ms), np.uint8) * 255
    big = np.repeat(np.repeat(grid, CELL, axis=0), CELL, axis=1)
    region = image[y0 : y0 + HEIGHT, x0 : x0 + WIDTH]
    region[...] = big[..., None] if image.ndim == 3 else big


def read_gray(gray: Any, width: int, height: int, scale: int = 1) -> tuple[int, int] | None:
    """(seq, t_ms) from a luma image of a width x height frame decoded at 1/scale; or None."""
    import numpy as np

    x0, y0 = origin(width, height)
    cell = CELL // scale
    inner = max(cell // 4, 0) if cell >= 4 else 0
    ys, xs = y0 // scale, x0 // scale
    region = np.asarray(gray[ys : ys + ROWS * cell, xs : xs + COLS * cell], np.float32)
    if region.shape != (ROWS * cell, COLS * cell):
        return None
    cells = region.reshape(ROWS, cell, COLS, cell)
    cells = cells[:, inner : cell - inner, :, inner : cell - inner].mean(axis=(1, 3))
    left, right = cells[:, 0::2], cells[:, 1::2]
    if np.min(np.abs(left - right)) < 8.0:  # no stamp here (or too damaged to trust)
        return None
    return decode_bits((left > right).astype(np.uint8).ravel().tolist())


def read_image(image: Any) -> tuple[int, int] | None:
    """(seq, t_ms) from a full-size BGR or gray numpy image; or None."""
    import numpy as np

    h, w = image.shape[:2]
    gray = image if image.ndim == 2 else image.astype(np.uint16).sum(axis=2)
    if image.ndim == 3:
        gray = gray / 3.0
    return read_gray(gray, w, h)


def read_jpeg(jpeg: bytes) -> tuple[int, int] | None:
    """(seq, t_ms) from JPEG bytes; decodes only the 1/8-scale luma (the DC terms): ~0.3 ms."""
    import simplejpeg

    h, w, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    gray = simplejpeg.decode_jpeg(jpeg, colorspace="GRAY", min_factor=8)
    scale = round(w / gray.shape[1])
    if scale not in (1, 2, 4, 8):
        return None
    return read_gray(gray[..., 0] if gray.ndim == 3 else gray, w, h, scale)
