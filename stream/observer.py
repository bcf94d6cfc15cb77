"""The metrics seam: stages report what happens to an injected observer, never to a global.

`NullObserver` is the default (unit tests, tools); `stream.metrics.PrometheusObserver` keeps
Prometheus series in a registry of its own per service. Calls come from any thread and must be
cheap and non-blocking; events for a stream that was removed are ignored by implementations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, get_args

import numpy as np

from segstream.stream.datatypes import SourceState

# captured: decoded from the source (every frame); then exactly one of unconverted (decoded,
# never converted: the scheduler would not have taken it), skipped (converted, passed over by
# frame skipping), dropped (overwritten before the scheduler looked), unchanged (taken, but the
# scene had not changed since the last inference: motion gating) or taken (-> inferred).
# undecoded: read and not decoded at all (keyframe-only decoding); not part of captured.
Outcome = Literal[
    "captured",
    "undecoded",
    "unconverted",
    "dropped",
    "skipped",
    "unchanged",
    "inferred",
    "published",
]
Stage = Literal["decode", "convert", "queue_wait", "preprocess", "redact", "render", "encode"]
PrivacyOutcome = Literal["redacted", "blanked"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)


class Observer(Protocol):
    def stream_added(self, stream_id: str) -> None: ...

    def stream_removed(self, stream_id: str) -> None: ...

    def frame(self, stream_id: str, outcome: Outcome) -> None: ...

    def stage(self, stage: Stage, seconds: float) -> None: ...

    def batch(self, size: int, seconds: float) -> None:
        """One inference call of `size` frames took `seconds`."""

    def state_changed(self, stream_id: str, state: SourceState, reason: str | None) -> None: ...

    def reconnect(self, stream_id: str) -> None: ...

    def latency(self, stream_id: str, seconds: float) -> None:
        """Capture to client write of one published frame."""

    def clients(self, stream_id: str, count: int) -> None: ...

    def class_fractions(
        self, stream_id: str, labels: Sequence[str], fractions: np.ndarray
    ) -> None: ...

    def infer_fps_limit(self, stream_id: str, fps: float) -> None: ...

    def batch_limit(self, size: int) -> None: ...

    def model_ready(self, ready: bool) -> None: ...

    def worker_error(self, worker: int, error: str | None) -> None:
        """A model worker's batches fail (error) or succeed again (None)."""

    def sink_error(self, stream_id: str, sink: str) -> None:
        """A sink of the stream raised taking a frame (the stream's other sinks still got it)."""

    def restream_added(self, stream_id: str) -> None:
        """A stream's RTSP re-stream starts: its series exist from here..."""

    def restream_removed(self, stream_id: str) -> None:
        """...to here (re-stream turned off, or the stream removed)."""

    def restream_state(self, stream_id: str, state: SourceState, reason: str | None) -> None: ...

    def restream_frames(self, stream_id: str, frames: int, nbytes: int) -> None:
        """Encoded frames sent to the RTSP server, and their size."""

    def restream_error(self, stream_id: str) -> None:
        """A connect or write to the RTSP server failed."""

    def page_viewers(self, connections: int, buffered_bytes: int) -> None:
        """Live-page WebSocket connections, and the bytes they hold unsent (each tile's one
        pending frame and the socket buffers)."""

    def page_frames(self, sent: int, skipped: int, nbytes: int) -> None:
        """Since the last call: frames sent to pages (and their bytes), and frames replaced in
        a page's pending slot by a newer one before they were sent."""

    # -- privacy ---------------------------------------------------------------------------
    def privacy_frame(self, stream_id: str, outcome: PrivacyOutcome) -> None:
        """A frame of a stream with privacy on left the render stage redacted or blanked."""

    def privacy_raw_view(self, stream_id: str) -> None:
        """An admin started a raw (unredacted) view of the stream."""


class NullObserver:
    """Observes nothing."""

    def stream_added(self, stream_id: str) -> None:
        pass

    def stream_removed(self, stream_id: str) -> None:
        pass

    def frame(self, stream_id: str, outcome: Outcome) -> None:
        pass

    def stage(self, stage: Stage, seconds: float) -> None:
        pass

    def batch(self, size: int, seconds: float) -> None:
        pass

    def state_changed(self, stream_id: str, state: SourceState, reason: str | None) -> None:
        pass

    def reconnect(self, stream_id: str) -> None:
        pass

    def latency(self, stream_id: str, seconds: float) -> None:
        pass

    def clients(self, stream_id: str, count: int) -> None:
        pass

    def class_fractions(self, stream_id: str, labels: Sequence[str], fractions: np.ndarray) -> None:
        pass

    def infer_fps_limit(self, stream_id: str, fps: float) -> None:
        pass

    def batch_limit(self, size: int) -> None:
        pass

    def model_ready(self, ready: bool) -> None:
        pass

    def worker_error(self, worker: int, error: str | None) -> None:
        pass

    def sink_error(self, stream_id: str, sink: str) -> None:
        pass

    def restream_added(self, stream_id: str) -> None:
        pass

    def restream_removed(self, stream_id: str) -> None:
        pass

    def restream_state(self, stream_id: str, state: SourceState, reason: str | None) -> None:
        pass

    def restream_frames(self, stream_id: str, frames: int, nbytes: int) -> None:
        pass

    def restream_error(self, stream_id: str) -> None:
        pass

    def page_viewers(self, connections: int, buffered_bytes: int) -> None:
        pass

    def page_frames(self, sent: int, skipped: int, nbytes: int) -> None:
        pass

    def privacy_frame(self, stream_id: str, outcome: PrivacyOutcome) -> None:
        pass

    def privacy_raw_view(self, stream_id: str) -> None:
        pass


NULL_OBSERVER: Observer = NullObserver()
