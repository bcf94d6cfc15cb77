"""The benchmark's pixel time stamp survives the real path (overlay, JPEG, H.264), and: the parts
that need no model and no peers (the rest: tests/e2e/test_benchmark.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import stamp  # noqa: E402

CODES = [(0, 0), (1, 4_294_967_295), (65_535, 123_456_789), (4242, 17)]


def test_bits_round_trip_and_crc() -> None:
    for seq, t in CODES:
        bits = stamp.encode_bits(seq, t)
        assert len(bits) == stamp.NBITS
        assert stamp.decode_bits(bits) == (seq, t)
        bits[5] ^= 1
        assert stamp.decode_bits(bits) is None  # a flipped bit is caught, not misreported


def test_i420_and_bgr_stamps_agree() -> None:
    w, h = 1280, 720
    buf = bytearray(w * h * 3 // 2)
    stamp.stamp_i420(buf, w, h, 321, 654_321)
    y = np.frombuffer(bytes(buf), np.uint8, w * h).reshape(h, w)
    assert stamp.read_image(y) == (321, 654_321)


def test_age_wraps() -> None:
    assert stamp.age_ms(2**32 - 10, 5) == 15
    assert stamp.age_ms(100, 350) == 250


def test_cycle_age_wraps_whole_cycles_only() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark import cycle_age_ms

    assert cycle_age_ms(123, 0) == 123  # live cameras: the stamp is the send time itself
    assert cycle_age_ms(3 * 64_000 + 250, 64_000) == 250  # read three cycles later
    assert cycle_age_ms(64_000 - 1, 64_000) == 0  # rounding: at most 1 ms "in the future"
    assert cycle_age_ms(64_000 - 500, 64_000) == 63_500
