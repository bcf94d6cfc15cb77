"""Prometheus metrics behind the observer seam. Base units (seconds), `_total` counters, bounded
labels (stream ids come from the config or the API, stages and outcomes are fixed sets).

Each `PrometheusObserver` owns its own `CollectorRegistry`, so two services in one process
(tests, a cluster node) never share or collide on series. A stream's series exist from
`stream_added` to `stream_removed`; late events for a removed stream are dropped rather than
re-creating its series."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from segstream.stream.datatypes import SourceState
from segstream.stream.events.observer import DeliveryOutcome
from segstream.stream.observer import OUTCOMES, Outcome, PrivacyOutcome, Stage

# Most stages take milliseconds; inference batches and end-to-end latency reach seconds.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
)


@dataclass
class _StreamSeries:
    """The labelled children of one stream, created once (no label lookups per frame)."""

    frames: dict[str, Any]
    reconnects: Any
    up: Any
    clients: Any
    latency: Any
    fps_limit: Any
    classes: dict[str, Any] = field(default_factory=dict)
    sinks: set[str] = field(default_factory=set)  # sinks with an error series
    coverage: dict[tuple[str, str], Any] = field(default_factory=dict)  # (zone, class)
    opened: set[tuple[str, str]] = field(default_factory=set)  # (zone, class) with events_total


@dataclass
class _RestreamSeries:
    frames: Any
    bytes: Any
    errors: Any
    up: Any


class PrometheusObserver:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._streams: dict[str, _StreamSeries] = {}
        self._restreams: dict[str, _RestreamSeries] = {}
        self.stage_seconds = Histogram(
            "segstream_stage_seconds",
            "Time spent in each pipeline stage (per frame; inference per batch).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "segstream_end_to_end_latency_seconds",
            "Age of a published frame when it is written to an MJPEG client, from capture.",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "segstream_inference_batch_size",
            "Frames per inference batch (before padding to a fixed size).",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
            registry=r,
        )
        self.frames = Counter(
            "segstream_frames_total",
            "Frames by stream and outcome: captured (decoded), undecoded (read, not decoded: "
            "keyframe-only decoding), unconverted (decoded only: "
            "not due for inference), dropped (overwritten unseen), skipped (frame skipping), "
            "unchanged (due, but the scene had not changed: motion gating), inferred, published.",
            ["stream", "outcome"],
            registry=r,
        )
        self.reconnects = Counter(
            "segstream_source_reconnects_total",
            "Reconnect attempts of a stream's source.",
            ["stream"],
            registry=r,
        )
        self.stream_up = Gauge(
            "segstream_stream_up",
            "1 while the stream's source delivers frames.",
            ["stream"],
            registry=r,
        )
        self.mjpeg_clients = Gauge(
            "segstream_mjpeg_clients", "Connected MJPEG clients.", ["stream"], registry=r
        )
        self.class_fraction = Gauge(
            "segstream_class_pixel_fraction",
            "Fraction of the newest mask's pixels in each class (e.g. how much of the view is "
            "person).",
            ["stream", "class_name"],
            registry=r,
        )
        self.infer_fps_limit_gauge = Gauge(
            "segstream_stream_infer_fps_limit",
            "Current per-stream inference rate cap (frame skipping); 0 = unlimited.",
            ["stream"],
            registry=r,
        )
        self.batch_limit_gauge = Gauge(
            "segstream_inference_batch_limit",
            "Current largest batch the scheduler forms (lowered to meet a latency target).",
            registry=r,
        )
        self.model_ready_gauge = Gauge(
            "segstream_model_ready", "1 once the model has warmed up.", registry=r
        )
        self.inference_failures = Counter(
            "segstream_inference_failures_total",
            "Inference batches that raised an error.",
            registry=r,
        )
        self.worker_up = Gauge(
            "segstream_model_worker_up",
            "1 while a model worker's batches succeed, 0 while they fail.",
            ["worker"],
            registry=r,
        )
        self.sink_errors_total = Counter(
            "segstream_sink_errors_total",
            "Frames a stream's sink raised on taking (the stream's other sinks still got them); "
            "a series appears at a sink's first failure.",
            ["stream", "sink"],
            registry=r,
        )
        self.restream_frames_total = Counter(
            "segstream_restream_frames_total",
            "Annotated frames encoded and sent to the stream's RTSP re-stream.",
            ["stream"],
            registry=r,
        )
        self.restream_bytes_total = Counter(
            "segstream_restream_bytes_total",
            "H.264 bytes sent to the RTSP re-stream.",
            ["stream"],
            registry=r,
        )
        self.restream_errors_total = Counter(
            "segstream_restream_errors_total",
            "Failed connects or writes to the RTSP re-stream's server (each one reconnects).",
            ["stream"],
            registry=r,
        )
        self.restream_up = Gauge(
            "segstream_restream_up",
            "1 while the RTSP re-stream is publishing.",
            ["stream"],
            registry=r,
        )

        self.page_connections = Gauge(
            "segstream_page_connections", "Live-page WebSocket connections.", registry=r
        )
        self.page_buffered = Gauge(
            "segstream_page_buffered_bytes",
            "Bytes the live-page connections hold unsent: one pending frame per tile in view "
            "and the socket buffers (bounded: a slow page skips frames).",
            registry=r,
        )
        self.page_frames_total = Counter(
            "segstream_page_frames_total",
            "Frames for live pages: sent, or skipped (replaced by a newer one before sending).",
            ["outcome"],
            registry=r,
        )
        self.page_bytes_total = Counter(
            "segstream_page_bytes_total", "Frame bytes sent to live pages.", registry=r
        )
        for outcome in ("sent", "skipped"):
            self.page_frames_total.labels(outcome=outcome)
        self._privacy_metrics(r)
        self._events_metrics(r)

    def _events_metrics(self, r: CollectorRegistry) -> None:
        self.zone_coverage_ratio = Gauge(
            "segstream_zone_coverage_ratio",
            "Fraction of a zone's pixels each class covers in the newest mask (classes that "
            "occur, plus those named in the zone's rules).",
            ["stream", "zone", "class_name"],
            registry=r,
        )
        self.events_total = Counter(
            "segstream_events_total",
            "Coverage events opened.",
            ["stream", "zone", "class_name"],
            registry=r,
        )
        self.event_deliveries_total = Counter(
            "segstream_event_deliveries_total",
            "Event changes sent to an alert target: delivered, failed (retried), rejected.",
            ["target", "outcome"],
            registry=r,
        )
        self.event_outbox_size = Gauge(
            "segstream_event_outbox_size", "Event changes not yet delivered.", registry=r
        )
        self.event_outbox_dropped_total = Counter(
            "segstream_event_outbox_dropped_total",
            "Undelivered event changes dropped to keep the outbox bounded.",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- a stream's series -----------------------------------------------------------------
    def stream_added(self, stream_id: str) -> None:
        """Every labelled series of a stream, at zero, so dashboards see them from the start."""
        s = _StreamSeries(
            frames={o: self.frames.labels(stream=stream_id, outcome=o) for o in OUTCOMES},
            reconnects=self.reconnects.labels(stream=stream_id),
            up=self.stream_up.labels(stream=stream_id),
            clients=self.mjpeg_clients.labels(stream=stream_id),
            latency=self.e2e_seconds.labels(stream=stream_id),
            fps_limit=self.infer_fps_limit_gauge.labels(stream=stream_id),
        )
        with self._lock:
            self._streams[stream_id] = s

    def stream_removed(self, stream_id: str) -> None:
        with self._lock:
            s = self._streams.pop(stream_id, None)
        self.restream_removed(stream_id)
        self._privacy_removed(stream_id)
        if s is None:
            return
        for o in s.frames:
            self.frames.remove(stream_id, o)
        for name in s.classes:
            self.class_fraction.remove(stream_id, name)
        for sink in s.sinks:
            self.sink_errors_total.remove(stream_id, sink)
        for zone, name in s.coverage:
            self.zone_coverage_ratio.remove(stream_id, zone, name)
        for zone, name in s.opened:
            self.events_total.remove(stream_id, zone, name)
        for metric in (
            self.reconnects,
            self.stream_up,
            self.mjpeg_clients,
            self.e2e_seconds,
            self.infer_fps_limit_gauge,
        ):
            metric.remove(stream_id)

    # -- events ----------------------------------------------------------------------------
    def frame(self, stream_id: str, outcome: Outcome) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.frames[outcome].inc()

    def stage(self, stage: Stage, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self.stage_seconds.labels(stage="inference").observe(seconds)
        self.batch_size.observe(size)

    def state_changed(self, stream_id: str, state: SourceState, reason: str | None) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.up.set(1 if state is SourceState.LIVE else 0)

    def reconnect(self, stream_id: str) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.reconnects.inc()

    def latency(self, stream_id: str, seconds: float) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.latency.observe(seconds)

    def clients(self, stream_id: str, count: int) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.clients.set(count)

    def class_fractions(self, stream_id: str, labels: Sequence[str], fractions: np.ndarray) -> None:
        s = self._streams.get(stream_id)
        if s is None:
            return
        for name, f in zip(labels, fractions, strict=True):
            child = s.classes.get(name)
            if child is None:
                with self._lock:
                    if stream_id not in self._streams:
                        return  # removed meanwhile: do not re-create its series
                    child = s.classes[name] = self.class_fraction.labels(
                        stream=stream_id, class_name=name
                    )
            child.set(float(f))

    def infer_fps_limit(self, stream_id: str, fps: float) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.fps_limit.set(fps)

    def batch_limit(self, size: int) -> None:
        self.batch_limit_gauge.set(size)

    def model_ready(self, ready: bool) -> None:
        self.model_ready_gauge.set(1 if ready else 0)

    def worker_error(self, worker: int, error: str | None) -> None:
        if error is not None:
            self.inference_failures.inc()
        self.worker_up.labels(worker=str(worker)).set(0 if error else 1)

    def sink_error(self, stream_id: str, sink: str) -> None:
        with self._lock:
            s = self._streams.get(stream_id)
            if s is None:
                return  # removed: no series comes back
            s.sinks.add(sink)
            self.sink_errors_total.labels(stream=stream_id, sink=sink).inc()

    # -- a stream's re-stream (its series live while it is on) -----------------------------
    def restream_added(self, stream_id: str) -> None:
        r = _RestreamSeries(
            frames=self.restream_frames_total.labels(stream=stream_id),
            bytes=self.restream_bytes_total.labels(stream=stream_id),
            errors=self.restream_errors_total.labels(stream=stream_id),
            up=self.restream_up.labels(stream=stream_id),
        )
        with self._lock:
            self._restreams[stream_id] = r

    def restream_removed(self, stream_id: str) -> None:
        with self._lock:
            r = self._restreams.pop(stream_id, None)
        if r is None:
            return
        for metric in (
            self.restream_frames_total,
            self.restream_bytes_total,
            self.restream_errors_total,
            self.restream_up,
        ):
            metric.remove(stream_id)

    def restream_state(self, stream_id: str, state: SourceState, reason: str | None) -> None:
        r = self._restreams.get(stream_id)
        if r is not None:
            r.up.set(1 if state is SourceState.LIVE else 0)

    def restream_frames(self, stream_id: str, frames: int, nbytes: int) -> None:
        r = self._restreams.get(stream_id)
        if r is not None:
            r.frames.inc(frames)
            r.bytes.inc(nbytes)

    def restream_error(self, stream_id: str) -> None:
        r = self._restreams.get(stream_id)
        if r is not None:
            r.errors.inc()

    def page_viewers(self, connections: int, buffered_bytes: int) -> None:
        self.page_connections.set(connections)
        self.page_buffered.set(buffered_bytes)

    def page_frames(self, sent: int, skipped: int, nbytes: int) -> None:
        self.page_frames_total.labels(outcome="sent").inc(sent)
        self.page_frames_total.labels(outcome="skipped").inc(skipped)
        self.page_bytes_total.inc(nbytes)

    # -- privacy (series of a stream appear at its first privacy event) ---------------------
    def _privacy_metrics(self, r: CollectorRegistry) -> None:
        self.privacy_frames_total = Counter(
            "segstream_privacy_frames_total",
            "Frames of streams with privacy on: redacted (the hidden area covered) or blanked "
            "(no mask fresh enough: failing closed).",
            ["stream", "outcome"],
            registry=r,
        )
        self.privacy_raw_views_total = Counter(
            "segstream_privacy_raw_views_total",
            "Raw (unredacted) views an admin opened (privacy.admin_raw), each one audited.",
            ["stream"],
            registry=r,
        )
        self._privacy_streams: set[str] = set()

    def privacy_frame(self, stream_id: str, outcome: PrivacyOutcome) -> None:
        with self._lock:
            if stream_id not in self._streams:
                return  # removed: no series comes back
            self._privacy_streams.add(stream_id)
            self.privacy_frames_total.labels(stream=stream_id, outcome=outcome).inc()

    def privacy_raw_view(self, stream_id: str) -> None:
        with self._lock:
            if stream_id not in self._streams:
                return
            self._privacy_streams.add(stream_id)
            self.privacy_raw_views_total.labels(stream=stream_id).inc()

    def _privacy_removed(self, stream_id: str) -> None:
        with self._lock:
            if stream_id not in self._privacy_streams:
                return
            self._privacy_streams.discard(stream_id)
        for outcome in ("redacted", "blanked"):
            with contextlib.suppress(KeyError):
                self.privacy_frames_total.remove(stream_id, outcome)
        with contextlib.suppress(KeyError):
            self.privacy_raw_views_total.remove(stream_id)

    # -- events (stream.events.observer.EventsObserver) --------------------------------------
    def zone_coverage(self, stream: str, zone: str, coverage: Mapping[str, float]) -> None:
        s = self._streams.get(stream)
        if s is None:
            return
        for name, ratio in coverage.items():
            child = s.coverage.get((zone, name))
            if child is None:
                with self._lock:
                    if stream not in self._streams:
                        return  # removed meanwhile: do not re-create its series
                    child = s.coverage[(zone, name)] = self.zone_coverage_ratio.labels(
                        stream=stream, zone=zone, class_name=name
                    )
            child.set(ratio)

    def zones_set(self, stream: str, zones: Sequence[str]) -> None:
        """The stream's zones now: the coverage series of the others go."""
        s = self._streams.get(stream)
        if s is None:
            return
        with self._lock:
            gone = [k for k in s.coverage if k[0] not in zones]
            for key in gone:
                del s.coverage[key]
                self.zone_coverage_ratio.remove(stream, *key)

    def event_opened(self, stream: str, zone: str, class_name: str) -> None:
        with self._lock:
            s = self._streams.get(stream)
            if s is None:
                return  # removed meanwhile (the writer thread reports after the fact)
            s.opened.add((zone, class_name))
            child = self.events_total.labels(stream=stream, zone=zone, class_name=class_name)
        child.inc()

    def delivery(self, target: str, outcome: DeliveryOutcome) -> None:
        self.event_deliveries_total.labels(target=target, outcome=outcome).inc()

    def outbox_size(self, size: int) -> None:
        self.event_outbox_size.set(size)

    def outbox_dropped(self, count: int) -> None:
        self.event_outbox_dropped_total.inc(count)

    def series_count(self) -> int:
        """Samples in the registry (for leak checks)."""
        return sum(len(m.samples) for m in self.registry.collect())
