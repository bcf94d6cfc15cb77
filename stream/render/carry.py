"""Masks carried by motion for smooth output: the frames drawn between inferences get the
newest mask moved to them by optical flow (stream.motion), not the stale one.

Self-contained hook for StreamView: one ``MaskCarry`` per smooth stream, fed the frames the
renderer draws, in order, and each new result. ``Carried.age_frames`` / ``age_s`` say how old
the answer under a drawn frame is; a redaction that must fail closed grows the carried mask
with that age (``fail_closed_mask``)."""

from __future__ import annotations

import numpy as np

from segstream.stream.datatypes import Frame, Result
from segstream.stream.motion import Carried, MaskCarrier, age_margin, grow_mask, new_carrier


class MaskCarry:
    """The newest result's mask carried to each drawn frame (about 3.5 ms a 720p frame)."""

    def __init__(self, carry: str = "flow") -> None:
        self.mode = carry
        self._carrier: MaskCarrier | None = None  # made at the first result (its mask size)
        self._mask_seq = 0
        self.last: Carried | None = None  # for the frame drawn last

    def mask_for(self, frame: Frame, result: Result) -> Carried:
        """The mask to draw on ``frame`` (the newest frame, never older than the result's)."""
        c = self._carrier
        if c is None or c.mask_size != result.mask.shape:
            c = self._carrier = new_carrier(result.mask.shape[:2], self.mode)
            self._mask_seq = 0
        # The result's own frame first when the renderer never drew it: the motion since it
        # is then measured from the very frame the mask belongs to.
        if result.frame.seq > c.seq:
            c.push(result.frame.seq, result.frame.image, result.frame.capture_ts)
        if frame.seq > c.seq:
            c.push(frame.seq, frame.image, frame.capture_ts)
        if result.frame.seq != self._mask_seq:
            c.set_mask(result.frame.seq, result.mask)
            self._mask_seq = result.frame.seq
        carried = c.carried()
        assert carried is not None  # a mask was set above
        self.last = carried
        return carried


def fail_closed_mask(carried: Carried, background: int = 0) -> np.ndarray:
    """A carried mask grown by a margin that widens with its age (for a redaction that must
    cover the object even where the flow lost it)."""
    return grow_mask(carried.mask, age_margin(carried.age_frames), background)
