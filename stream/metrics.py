"""Prometheus metrics. Base units (seconds), `_total` counters, bounded labels (stream ids come
from the config, stages and outcomes are fixed sets)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# Most stages take milliseconds; inference batches and end-to-end latency reach seconds.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0,
)
STAGES = ("decode", "queue_wait", "preprocess", "inference", "render", "encode")
OUTCOMES = ("captured", "dropped", "skipped", "inferred", "published")

STAGE_SECONDS = Histogram(
    "segstream_stage_seconds",
    "Time spent in each pipeline stage (per frame; inference per batch).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
E2E_SECONDS = Histogram(
    "segstream_end_to_end_latency_seconds",
    "Age of a published frame when it is written to an MJPEG client, from capture.",
    ["stream"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "segstream_inference_batch_size",
    "Frames per inference batch (before padding to a fixed size).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    registry=REGISTRY,
)
FRAMES = Counter(
    "segstream_frames_total",
    "Frames by stream and outcome: captured, dropped (overwritten unseen), skipped (frame "
    "skipping), inferred, published.",
    ["stream", "outcome"],
    registry=REGISTRY,
)
RECONNECTS = Counter(
    "segstream_source_reconnects_total",
    "Reconnect attempts of a stream's source.",
    ["stream"],
    registry=REGISTRY,
)
STREAM_UP = Gauge(
    "segstream_stream_up", "1 while the stream's source delivers frames.", ["stream"],
    registry=REGISTRY,
)
MJPEG_CLIENTS = Gauge(
    "segstream_mjpeg_clients", "Connected MJPEG clients.", ["stream"], registry=REGISTRY
)
CLASS_FRACTION = Gauge(
    "segstream_class_pixel_fraction",
    "Fraction of the newest mask's pixels in each class (e.g. how much of the view is person).",
    ["stream", "class_name"],
    registry=REGISTRY,
)
INFER_FPS_LIMIT = Gauge(
    "segstream_stream_infer_fps_limit",
    "Current per-stream inference rate cap (frame skipping); 0 = unlimited.",
    ["stream"],
    registry=REGISTRY,
)
BATCH_LIMIT = Gauge(
    "segstream_inference_batch_limit",
    "Current largest batch the scheduler forms (lowered to meet a latency target).",
    registry=REGISTRY,
)
MODEL_READY = Gauge(
    "segstream_model_ready", "1 once the model has warmed up.", registry=REGISTRY
)


def init_stream(stream_id: str) -> None:
    """Create every labelled series of a stream at zero so dashboards see them from the start."""
    for outcome in OUTCOMES:
        FRAMES.labels(stream=stream_id, outcome=outcome)
    RECONNECTS.labels(stream=stream_id)
    STREAM_UP.labels(stream=stream_id).set(0)
    MJPEG_CLIENTS.labels(stream=stream_id).set(0)


def remove_stream(stream_id: str) -> None:
    for outcome in OUTCOMES:
        _remove(FRAMES, stream_id, outcome)
    for metric in (RECONNECTS, STREAM_UP, MJPEG_CLIENTS, E2E_SECONDS, INFER_FPS_LIMIT):
        _remove(metric, stream_id)


def _remove(metric, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class RateMeter:
    """Events per second over a sliding window; cheap enough to call per frame."""

    def __init__(self, window_s: float = 2.0) -> None:
        import collections
        import time

        self._clock = time.monotonic
        self._window = window_s
        self._events: collections.deque[float] = collections.deque()

    def tick(self) -> None:
        now = self._clock()
        self._events.append(now)
        self._trim(now)

    def rate(self) -> float:
        now = self._clock()
        self._trim(now)
        if len(self._events) < 2:
            return 0.0
        return (len(self._events) - 1) / max(now - self._events[0], 1e-6)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0] > self._window:
            self._events.popleft()
