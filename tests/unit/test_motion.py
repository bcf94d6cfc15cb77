"""stream/motion.py on synthetic scenes: carried masks follow motion, the change detector
ignores noise and slow light but not a small moving object, the age margin grows masks."""

from __future__ import annotations

import numpy as np
import pytest

from segstream.stream.motion import (
    ChangeDetector,
    MaskCarrier,
    age_margin,
    flow_method,
    grow_mask,
    motion_vector_flow,
    new_carrier,
)

H, W = 360, 640  # frame
M = 513  # mask side (the model's size, stretched over the whole frame)
SQ = 128  # the square's side in frame pixels (a person near the camera)
PERSON = 15


def textures(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random background and a differently textured square (flow needs texture at
    the scale of the flow's thumbnail); no value near saturation."""
    import cv2

    rng = np.random.default_rng(seed)
    bg = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), np.uint8), (0, 0), 3)
    bg = cv2.normalize(bg, None, 40, 200, cv2.NORM_MINMAX)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (SQ, SQ, 3), np.uint8), (0, 0), 4)
    return bg, cv2.normalize(tex, None, 20, 220, cv2.NORM_MINMAX)


def scene(bg: np.ndarray, tex: np.ndarray, x: int, y: int) -> np.ndarray:
    f = bg.copy()
    f[y : y + SQ, x : x + SQ] = tex
    return f


def square_mask(x: int, y: int) -> np.ndarray:
    """The square at frame position (x, y) in mask coordinates."""
    m = np.zeros((M, M), np.uint8)
    sx, sy = M / W, M / H
    m[round(y * sy) : round((y + SQ) * sy), round(x * sx) : round((x + SQ) * sx)] = PERSON
    return m


def covered(shown: np.ndarray, truth: np.ndarray) -> float:
    """Share of the object's true position the shown mask covers."""
    a, b = shown != 0, truth != 0
    return float((a & b).sum() / b.sum())


def carry_square(carrier: MaskCarrier, step: int, frames: int, seed: int = 0) -> np.ndarray:
    """The square moving `step` px right and step/2 down a frame; the mask of the first frame
    carried over `frames` more; returns the true mask of the last frame."""
    bg, tex = textures(seed)
    for i in range(frames + 1):
        x, y = 150 + step * i, 100 + step * i // 2
        carrier.push(i + 1, scene(bg, tex, x, y))
        if i == 0:
            carrier.anchor()
            carrier.set_mask(1, square_mask(x, y))
    return square_mask(x, y)


@pytest.mark.parametrize(("step", "frames"), [(2, 5), (1, 10)])
def test_carried_mask_follows_a_moving_square(step: int, frames: int) -> None:
    """The service's carrier, N = 5 and N = 10 frames after the inference."""
    c, stale = new_carrier((M, M)), new_carrier((M, M), "none")
    truth = carry_square(c, step, frames)
    carry_square(stale, step, frames)
    shown, st = c.carried(), stale.carried()
    assert shown is not None and st is not None
    assert (shown.seq, shown.source_seq, shown.age_frames) == (frames + 1, 1, frames)
    assert covered(shown.mask, truth) > 0.9
    assert 0.8 < (shown.mask != 0).sum() / (truth != 0).sum() < 1.25  # moved, not smeared
    assert covered(st.mask, truth) < 0.9  # the motion is large enough to matter
    assert set(np.unique(shown.mask)) == {0, PERSON}


@pytest.mark.parametrize("step", [4, 6])
def test_refined_carry_follows_fast_motion(step: int) -> None:
    """Chaining loses part of each sub-pixel step; refining the chained map against the
    mask's own frame keeps up with a square moving 4..6 px a frame for 5 frames."""
    dis = flow_method("dis-ultrafast")
    c = MaskCarrier((M, M), flow=dis, chain=True, splat=False, refine=flow_method("dis-ultrafast"))
    plain = MaskCarrier((M, M), flow=flow_method("dis-ultrafast"), chain=True, splat=False)
    truth = carry_square(c, step, 5)
    carry_square(plain, step, 5)
    shown, base = c.carried(), plain.carried()
    assert shown is not None and base is not None
    assert covered(shown.mask, truth) > 0.9
    assert covered(shown.mask, truth) > covered(base.mask, truth)


@pytest.mark.parametrize(
    ("chain", "splat"), [(True, False), (True, True), (False, False), (False, True)]
)
def test_every_carry_mode_moves_the_mask_the_right_way(chain: bool, splat: bool) -> None:
    c = MaskCarrier((M, M), flow=flow_method("dis-ultrafast"), chain=chain, splat=splat)
    truth = carry_square(c, 2, 5)
    shown = c.carried()
    assert shown is not None
    start = square_mask(150, 100)
    assert covered(shown.mask, truth) > covered(start, truth) + 0.04


def test_answer_arriving_late_is_carried_from_its_own_frame() -> None:
    """The model answers for frame 1 after frames 2..6 arrived: the mask is moved from frame
    1 to 6, the same whether frame 1 was anchored when it went to the model or not, and an
    older answer arriving after a newer one is ignored."""
    bg, tex = textures(1)
    anchored, plain = new_carrier((M, M)), new_carrier((M, M))
    pos = [(150 + 3 * i, 100) for i in range(7)]
    for i, (x, y) in enumerate(pos):
        for c in (anchored, plain):
            c.push(i, scene(bg, tex, x, y), ts=i / 10)
        if i in (0, 1):
            anchored.anchor()
    assert anchored.carried() is None and plain.carried() is None
    for c in (anchored, plain):
        c.set_mask(1, square_mask(*pos[1]))
        c.set_mask(0, np.zeros((M, M), np.uint8))  # older than the shown one: dropped
    shown, other = anchored.carried(), plain.carried()
    assert shown is not None and other is not None
    assert (shown.source_seq, shown.age_frames, other.source_seq) == (1, 5, 1)
    assert shown.age_s == pytest.approx(0.5)
    np.testing.assert_array_equal(shown.mask, other.mask)
    assert covered(shown.mask, square_mask(*pos[6])) > 0.9
    assert covered(square_mask(*pos[1]), square_mask(*pos[6])) < 0.9
    plain.anchor(4)  # an older pushed frame may be anchored too
    with pytest.raises(ValueError, match="not among"):
        plain.anchor(-3)
    with pytest.raises(ValueError, match="shape"):
        plain.set_mask(6, np.zeros((M, M + 1), np.uint8))


def test_motion_vectors_become_backward_flow() -> None:
    """One 16x16 block at (32..48, 16..32) predicted from 8 px to its left in the previous
    frame, one from a future frame (ignored), a keyframe (no vectors)."""
    dt = np.dtype(
        [("source", "i4"), ("w", "u1"), ("h", "u1"), ("src_x", "i2"), ("src_y", "i2"),
         ("dst_x", "i2"), ("dst_y", "i2"), ("flags", "u8"), ("motion_x", "i4"),
         ("motion_y", "i4"), ("motion_scale", "u2")]
    )  # fmt: skip
    v = np.array(
        [(-1, 16, 16, 32, 24, 40, 24, 0, -32, 0, 4), (1, 16, 16, 8, 8, 8, 8, 0, 40, 40, 4)], dt
    )
    flow = motion_vector_flow(v, (64, 96), (32, 48))  # half size: -8 px -> -4
    assert flow.shape == (32, 48, 2)
    assert flow[12, 20, 0] == pytest.approx(-4.0) and flow[12, 20, 1] == 0
    assert not flow[:6, :6].any() and not flow[25:].any()
    assert not motion_vector_flow(None, (64, 96), (32, 48)).any()


def lit(frame: np.ndarray, i: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Frame i of n under light rising 20 % (plus 10 levels) and sensor noise (sigma 3)."""
    gain = 1.0 + 0.2 * i / (n - 1)
    f = frame * gain + 10 * i / (n - 1) + rng.normal(0, 3.0, frame.shape)
    return np.clip(f, 0, 255).astype(np.uint8)


def test_detector_ignores_noise_and_slow_light() -> None:
    bg, _ = textures(0)
    rng = np.random.default_rng(0)
    frames = [lit(bg, i, 60, rng) for i in range(60)]
    d = ChangeDetector()
    assert d.changed(frames[0])  # no reference yet
    d.reference = d.thumbnail(frames[0])
    verdicts = [d.check(d.thumbnail(f)) for f in frames[1:]]
    assert not any(v.changed for v in verdicts), max(v.pixels for v in verdicts)


@pytest.mark.parametrize("side", [20, 32])
def test_detector_flags_a_small_moving_object_on_its_first_move(side: int) -> None:
    """A side x side px object (0.2 % .. 0.4 % of the frame) still for 5 frames under noise
    and rising light, then moving 4 px a frame: changed on the first moved frame."""
    bg, _ = textures(2)
    rng = np.random.default_rng(3)
    obj = rng.integers(30, 200, (side, side, 3), np.uint8)
    d = ChangeDetector()
    for i in range(10):
        x = 300 + (4 * (i - 4) if i >= 5 else 0)
        f = bg.copy()
        f[150 : 150 + side, x : x + side] = obj
        f = lit(f, i, 10, rng)
        if i == 0:
            d.reference = d.thumbnail(f)
            continue
        assert d.changed(f) == (i >= 5), (i, d.check(d.thumbnail(f)))


def test_age_margin_grows_the_mask() -> None:
    m = np.zeros((64, 64), np.uint8)
    m[20:30, 20:30] = PERSON
    m[40:44, 50:54] = 7
    margins = [age_margin(a) for a in range(0, 40, 5)]
    assert margins == sorted(margins) and margins[0] >= 1 and margins[-1] == age_margin(10**6)
    areas = [int((grow_mask(m, px) != 0).sum()) for px in (0, 2, 6)]
    assert areas[0] == 116 and areas[0] < areas[1] < areas[2]
    g = grow_mask(m, 3)
    assert (g[m != 0] == m[m != 0]).all()  # classes kept
    assert g[18, 25] == PERSON and g[38, 52] == 7 and g[5, 5] == 0
    assert g[25, 32] == PERSON and g[25, 33] == 0  # exactly 3 px
    # Another background id (e.g. a Cityscapes model's unlabelled): grown into it.
    bg = np.full((16, 16), 19, np.uint8)
    bg[8, 8] = 0
    assert (grow_mask(bg, 1, background=19) == 0).sum() == 5
