"""Wires the pipeline together: sources -> scheduler -> model workers -> render -> sinks.

The service owns the threads and every stream's life: `add_stream`, `replace_stream` and
`remove_stream` are symmetric, and removing a stream leaves nothing behind (reader, scheduler
lane, render view, sinks and their clients, metric series). The HTTP layer only reads its
state and the sinks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np

from segstream.models.fetch import home, sample_path
from segstream.models.runtime import Segmenter, load_segmenter, prepare, resolve_backend
from segstream.stream.config import AppConfig, ConfigError, StreamConfig
from segstream.stream.datatypes import Result, Sink, SourceState, StreamState
from segstream.stream.events.feature import EventsFeature
from segstream.stream.events.observer import EventsObserver, NullEventsObserver
from segstream.stream.events.store import default_url
from segstream.stream.metrics import PrometheusObserver
from segstream.stream.mosaic import Mosaic
from segstream.stream.observer import Observer
from segstream.stream.outputs import SINKS, ManagedSink, make_sinks
from segstream.stream.render import Renderer, RenderStage, StreamView
from segstream.stream.render.privacy import Redactor
from segstream.stream.runner import ModelWorker, WorkerPlan, plan_workers
from segstream.stream.sanitize import sanitize_url
from segstream.stream.scheduler import Scheduler
from segstream.stream.sinks import MjpegSink
from segstream.stream.sourceref import parse_source
from segstream.stream.sources import VideoSource

log = logging.getLogger(__name__)

# A viewer's own overlay settings for a stream: mode (overlay | mask | off), alpha, classes.
OverlayKey = tuple[str, float, tuple[str, ...] | None]
# The model's labels and the events' metrics -> the events feature (see Service's `events`).
EventsFactory = Callable[[list[str], EventsObserver], EventsFeature]
# Settings a running stream takes without touching its reader; any other change restarts it.
# A registered sink's own settings are live too: a change replaces that sink alone.
LIVE_FIELDS = frozenset(
    {"id", "infer_fps", "gate", "output", "alpha", "classes", "privacy", "zones", "record_clips"}
    | set(SINKS)
)


def default_store(home: Path) -> Path:
    """The SQLite file of the default event store."""
    return Path(default_url(home).removeprefix("sqlite:///"))


def gate_s(scfg: StreamConfig) -> float | None:
    """The scheduler's motion gating setting for a stream: its refresh period, or None (off)."""
    return scfg.gate.refresh_s if scfg.gate.mode == "motion" else None


KEYFRAME_SLACK = 1.02


def draws_every_frame(cfg: StreamConfig) -> bool:
    """Whether the render stage draws the stream's frames at the camera's rate, not only its
    inferred ones: smooth output, or privacy (failing closed, blank frames keep coming)."""
    return cfg.output == "smooth" or cfg.privacy is not None


def needs_every_frame(cfg: StreamConfig) -> bool:
    """Whether the frames between inferences must be decoded: they are drawn
    (draws_every_frame) or re-streamed."""
    return draws_every_frame(cfg) or cfg.restream is not None


def keyframes_suffice(
    every_frame: bool,
    infer_cap: float,
    keyframe_fps: float,
    *,
    still_keyframes: bool = False,
    still_s: float | None = None,
) -> bool:
    """Whether a stream may decode keyframes only: nothing needs every frame
    (needs_every_frame) and either
    - the scheduler takes no more frames a second than the source has keyframes (a cap of 0
      is no cap: every frame may be taken), within KEYFRAME_SLACK: a camera's keyframe
      intervals jitter by a few milliseconds (GOP 30 at 15 fps over RTSP: 0.4996 keyframes
      a second for a 0.5 fps cap); or
    - the stream opted in (gate.still_keyframes) and its motion gate has seen no change for
      `still_s` seconds, at least one keyframe interval (as measured), or none at all yet
      (inf: a stream starts as still, see Scheduler.still_since). The gate still checks
      each decoded keyframe; once one shows a change it is inferred, and every frame is
      decoded again from the next keyframe (a P frame needs the ones before it)."""
    if every_frame or keyframe_fps <= 0:
        return False
    if 0 < infer_cap <= keyframe_fps * KEYFRAME_SLACK:
        return True
    return still_keyframes and still_s is not None and still_s * keyframe_fps >= 1.0


def resolve_source(source: str) -> str:
    """`sample:NAME` -> the fetched sample clip; anything else is used as given."""
    ref = parse_source(source)
    return str(sample_path(ref.location)) if ref.kind == "sample" else source


@dataclass
class Stream:
    cfg: StreamConfig
    source: VideoSource
    view: StreamView
    mjpeg: MjpegSink
    sinks: dict[str, ManagedSink] = field(default_factory=dict)  # the registered ones that are on

    @property
    def restream(self) -> ManagedSink | None:
        return self.sinks.get("restream")


@dataclass
class Picture:
    """Frames of one stream as one viewer wants them drawn; call release() when done."""

    sink: MjpegSink
    release: Callable[[], None]


class Service:
    def __init__(
        self,
        cfg: AppConfig,
        segmenter: Segmenter | None = None,
        observer: Observer | None = None,
        events: EventsFactory | None = None,
    ) -> None:
        """`segmenter`: a loaded model to use (the caller closes it); None: load the
        configured one. `observer`: where metrics go; None: Prometheus, in `self.metrics`.
        `events`: makes the events feature from the model's labels (opened at once); None:
        this service's own store and alert targets (a cluster node forwards to the hub)."""
        self.cfg = cfg
        self._events_factory = events
        self.segmenter = segmenter
        # Metrics of this service alone: two services in one process never share series.
        self.metrics: PrometheusObserver | None = None
        if observer is None:
            observer = self.metrics = PrometheusObserver()
        self.observer: Observer = observer
        self.streams: dict[str, Stream] = {}
        m = cfg.model
        self.scheduler = Scheduler(
            max_batch=m.max_batch or 1,  # set from the worker plan once the model is loaded
            max_wait_s=m.max_wait_ms / 1000.0,
            latency_target_s=cfg.scheduler.latency_target_ms / 1000.0,
            min_fps=cfg.scheduler.min_infer_fps,
            observer=self.observer,
        )
        self.render = RenderStage(workers=cfg.render.workers)
        self.mosaic = Mosaic(
            cfg.mosaic,
            stream_ids=self.stream_ids,
            state_of=self.state_of,
            attach=self._attach_sink,
            detach=self._detach_sink,
            publisher=self._publisher,
        )
        self.workers: list[ModelWorker] = []
        self.events: EventsFeature | None = None  # once the model (its labels) is known
        self._events_open = False  # its store opened (see _start_events)
        self.plan: WorkerPlan | None = None
        self.ready = False
        self.error: str | None = None
        self.started_ts = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()  # tells a model load in progress to give up
        self._owned: list[Segmenter] = []  # loaded here, closed here (a given one is not)
        self._streams_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads and warms the model (off the event loop), then starts every stage."""
        self._loop = asyncio.get_running_loop()
        # Every stage has threads of its own; OpenCV's pool on top only spins against the model
        # (render: 1.84 ms CPU per 720p frame with it on 2 cores, 1.03 ms without).
        cv2.setNumThreads(1)
        segmenters = await self._load()
        if self.segmenter is None:
            self._owned = segmenters
        self.segmenter = segmenters[0]
        max_batch = self.plan.max_batch if self.plan else (self.cfg.model.max_batch or 1)
        self.scheduler.set_max_batch(max_batch)
        await self._start_events()
        self.workers = [
            ModelWorker(seg, self.scheduler, self._on_result, max_batch, i, self.observer)
            for i, seg in enumerate(segmenters)
        ]
        for scfg in self.cfg.streams:
            self.add_stream(scfg)
        self.render.start()
        self.mosaic.start()
        for w in self.workers:
            w.start()
        self.ready = True
        self.observer.model_ready(True)
        log.info(
            "serving %d stream(s) with %s/%s",
            len(self.streams),
            self.segmenter.name,
            self.segmenter.backend,
        )

    async def _start_events(self) -> None:
        """The events feature (never raises: a bad store shows in health() instead). Its store
        opens now when anything may use it (zones, alert targets, a store of earlier runs whose
        open events a crash left), else with the first zone: a service without zones writes
        no file."""
        assert self.segmenter is not None
        # The Prometheus observer implements the events' metrics; another observer may not.
        ev: EventsObserver = (
            cast(EventsObserver, self.observer)
            if hasattr(self.observer, "zone_coverage")
            else NullEventsObserver()
        )
        if self._events_factory is not None:
            self.events = self._events_factory(self.segmenter.labels, ev)
            await self._open_events()
            return
        cfg = self.cfg
        self.events = EventsFeature(
            cfg.events,
            home=home(),
            labels=self.segmenter.labels,
            mqtt=cfg.mqtt,
            webhooks=cfg.webhooks,
            observer=ev,
        )
        used = cfg.mqtt or cfg.webhooks or cfg.events.database or cfg.events.media_dir
        if used or any(s.zones for s in cfg.streams) or default_store(home()).exists():
            await self._open_events()

    def _open_events_now(self) -> None:
        """The first zone: open the store, waiting for it from a thread (the API's StreamSet
        and a cluster node apply changes in threads); on the event loop it opens meanwhile."""
        assert self._loop is not None
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._loop.create_task(self._open_events())
        else:
            asyncio.run_coroutine_threadsafe(self._open_events(), self._loop).result(60)

    async def _open_events(self) -> None:
        if self.events is not None and not self._events_open:
            self._events_open = True
            await self.events.start()

    def _set_zones(self, stream: Stream) -> None:
        """The stream's zones to the events feature (live), and the render hook on or off."""
        events = self.events
        if events is None:
            return
        zones = stream.cfg.zones
        if zones and not self._events_open:
            self._open_events_now()
        events.set_stream(stream.cfg.id, zones)
        zones_set = getattr(self.observer, "zones_set", None)
        if zones_set is not None:
            zones_set(stream.cfg.id, [z.name for z in zones])
        stream.view.mask_hook = self._on_mask if zones else None
        record = stream.cfg.record_clips and bool(zones)
        events.clips.record(stream.cfg.id, stream.view if record else None, zones)

    def _on_mask(
        self, stream_id: str, mask: np.ndarray, now: float, snapshot: Callable[[], bytes]
    ) -> None:
        if self.events is not None:
            self.events.on_mask(stream_id, mask, now=now, snapshot=snapshot)

    async def _load(self) -> list[Segmenter]:
        """The model copies, loaded in a thread. Cancelled (shutdown during load), it waits for
        that thread to notice, then closes whatever it loaded: nothing keeps running."""
        given = self.segmenter

        def load_or_warm() -> list[Segmenter]:
            if given is None:
                return self._load_models()
            given.warmup()
            return [given]

        load = asyncio.ensure_future(asyncio.to_thread(load_or_warm))
        try:
            return await asyncio.shield(load)
        except asyncio.CancelledError:
            self._stopping.set()
            with contextlib.suppress(Exception):
                for seg in await load:
                    seg.close()
            raise

    def _load_models(self) -> list[Segmenter]:
        """One warmed copy of the model per worker (see runner.plan_workers)."""
        m = self.cfg.model
        t0 = time.perf_counter()
        backend = "keras" if m.weights else resolve_backend(m.name, m.backend)
        plan = self.plan = plan_workers(
            backend, m.max_batch, workers=m.workers, threads=m.threads, batch_sizes=m.batch_sizes
        )
        segs: list[Segmenter] = []
        try:
            for _ in range(plan.workers):
                if self._stopping.is_set():
                    break  # shutting down: the caller closes what is loaded
                seg = load_segmenter(
                    m.name,
                    backend,
                    batch_sizes=plan.batch_sizes,
                    threads=plan.threads,
                    weights=m.weights,
                    keras_mode=m.keras_mode,
                )
                segs.append(seg)
                seg.warmup()
        except BaseException:
            for seg in segs:
                seg.close()
            raise
        log.info(
            "model %s (%s) ready in %.1f s: %d worker(s) x %s thread(s), batch sizes %s",
            m.name,
            backend,
            time.perf_counter() - t0,
            len(segs),
            plan.threads or "-",
            list(plan.batch_sizes),
        )
        return segs

    async def stop(self) -> None:
        self.ready = False
        self._stopping.set()
        await asyncio.to_thread(self.mosaic.stop)  # ends the mosaic responses
        for s in self.streams.values():
            s.view.close()  # ends every MJPEG response
        await asyncio.to_thread(self._stop_threads)
        if self.events is not None:
            await self.events.close()  # open events end with `shutdown`

    def _stop_threads(self) -> None:
        timeout = self.cfg.server.shutdown_timeout
        self.scheduler.stop()
        for w in self.workers:
            w.stop(timeout / 2)
        self.render.stop(timeout / 4)
        # Readers are daemon threads that stop together; a stuck read is abandoned.
        with ThreadPoolExecutor(max(1, len(self.streams))) as pool:
            list(pool.map(lambda s: s.source.stop(timeout / 4), self.streams.values()))
        for seg in self._owned:
            seg.close()
        self._owned = []

    # -- streams ---------------------------------------------------------------------------
    def add_stream(self, scfg: StreamConfig) -> Stream:
        """Starts a stream. Raises ValueError for a duplicate id, ConfigError for settings the
        model cannot honour (unknown class names)."""
        assert self._loop is not None and self.segmenter is not None, "service not started"
        renderer, redactor = self._renderer(scfg), self._redactor(scfg)
        self._check_rules(scfg)
        if scfg.zones and not self._events_open:
            self._open_events_now()  # not under the lock: it may wait for the event loop
        with self._streams_lock:
            if scfg.id in self.streams:
                raise ValueError(f"stream {scfg.id!r} exists")
            self.observer.stream_added(scfg.id)
            source = self._source(scfg)
            mjpeg = MjpegSink(scfg.id, self._loop)
            sinks = make_sinks(scfg, self.observer)
            view = StreamView(
                scfg.id,
                renderer,
                [mjpeg, *sinks.values()],
                output=scfg.output,
                jpeg_quality=self.cfg.render.jpeg_quality,
                peek_frame=source.slot.peek,
                observer=self.observer,
            )
            view.set_privacy(redactor)
            view.model_error = self._model_failing
            stream = self.streams[scfg.id] = Stream(scfg, source, view, mjpeg, sinks)
            self._set_zones(stream)
            self.render.add(view)
            self.scheduler.add(source, scfg.infer_fps, gate_s(scfg))
        for sink in sinks.values():
            sink.start()
        source.start()
        return stream

    def remove_stream(self, stream_id: str) -> None:
        """Stops the stream and removes every trace of it. Raises KeyError if unknown.
        Blocks for at most the reader's stop time (a stuck reader is abandoned)."""
        with self._streams_lock:
            stream = self.streams.pop(stream_id)
        self.scheduler.remove(stream_id)
        self.render.remove(stream_id)
        stream.source.stop(self.cfg.server.shutdown_timeout / 4)
        stream.view.close()  # its viewers' responses end cleanly, its re-stream stops
        if self.events is not None:
            self.events.remove_stream(stream_id)  # its open events end with stream_removed
        self.observer.stream_removed(stream_id)  # last: late events cannot re-create series

    def replace_stream(self, scfg: StreamConfig) -> Stream:
        """Applies a stream's new settings: overlay, rate and output live; anything that
        concerns the reader restarts only the reader (viewers stay connected)."""
        stream = self.streams[scfg.id]
        renderer = self._renderer(scfg)  # validate before touching anything
        redactor = self._redactor(scfg)
        self._check_rules(scfg)
        old, stream.cfg = stream.cfg, scfg
        changed = {k for k in StreamConfig.model_fields if getattr(old, k) != getattr(scfg, k)}
        if changed - LIVE_FIELDS:
            self._restart_reader(stream)
        elif scfg.infer_fps != old.infer_fps:
            self.scheduler.set_rate(scfg.id, scfg.infer_fps)
        if gate_s(scfg) != gate_s(old):  # still_keyframes alone keeps the gate's history
            self.scheduler.set_gate(scfg.id, gate_s(scfg))
        for name, kind in SINKS.items():
            if changed & kind.fields:
                self._replace_sink(stream, name)
        stream.view.output = scfg.output
        stream.view.set_renderer(renderer)
        stream.view.set_privacy(redactor)
        if changed & {"zones", "record_clips"}:
            self._set_zones(stream)  # events of a removed zone end with zone_removed
        return stream

    # -- pictures for viewers: per-viewer overlays and the mosaic ----------------------------
    def acquire_picture(self, stream_id: str, overlay: OverlayKey | None) -> Picture:
        """The stream's frames drawn with `overlay`: None is the stream's own picture (the
        shared sink, encoded once for everyone); other settings are a variant rendered once per
        frame for every viewer with the same ones. Raises KeyError (unknown stream),
        ValueError (unknown class name) or render.VariantLimit."""
        s = self.streams[stream_id]
        if overlay is None:
            return Picture(s.mjpeg, lambda: None)
        assert self.segmenter is not None and self._loop is not None
        mode, alpha, classes = overlay
        seg, rc, loop = self.segmenter, self.cfg.render, self._loop

        def make() -> tuple[Renderer | None, Sink]:
            renderer = (
                None
                if mode == "off"
                else Renderer(
                    seg.labels,
                    seg.palette,
                    mode=mode,
                    alpha=alpha,
                    classes=classes,
                    legend=rc.legend,
                )
            )
            return renderer, MjpegSink(stream_id, loop)

        view = s.view
        sink = view.acquire_variant(overlay, make, self.cfg.page.max_overlays)
        assert isinstance(sink, MjpegSink)
        self.render.wake(stream_id)  # a still picture shows the new settings at once
        return Picture(sink, lambda: view.release_variant(overlay))

    def acquire_raw(self, stream_id: str) -> Picture:
        """The stream's camera frames unredacted (privacy's admin_raw; the caller checked who
        asks): rendered and encoded only while such a viewer is connected."""
        s = self.streams[stream_id]
        loop = self._loop
        assert loop is not None
        key = ("raw",)
        view = s.view
        sink = view.acquire_variant(
            key, lambda: (None, MjpegSink(stream_id, loop)), self.cfg.page.max_overlays + 1, True
        )
        assert isinstance(sink, MjpegSink)
        self.render.wake(stream_id)
        return Picture(sink, lambda: view.release_variant(key))

    def stream_ids(self) -> list[str]:
        """The stream ids now, in order (from any thread)."""
        with self._streams_lock:
            return list(self.streams)

    def state_of(self, stream_id: str) -> StreamState | None:
        """The stream's state as the API reports it; None for an unknown stream."""
        s = self.streams.get(stream_id)
        if s is None:
            return None
        state = StreamState(s.source.state.value)
        if state == StreamState.LIVE and self.workers and any(w.failing for w in self.workers):
            return StreamState.ERROR
        return state

    def _attach_sink(self, stream_id: str, sink: Sink) -> bool:
        s = self.streams.get(stream_id)
        if s is None:
            return False
        s.view.add_sink(sink)
        self.render.wake(stream_id)
        return True

    def _detach_sink(self, stream_id: str, sink: Sink) -> None:
        s = self.streams.get(stream_id)
        if s is not None:
            s.view.remove_sink(sink)

    def _publisher(self) -> Sink:
        assert self._loop is not None, "service not started"
        return MjpegSink("mosaic", self._loop)

    def _replace_sink(self, stream: Stream, name: str) -> None:
        """Stops the old sink before the new one starts (a media server takes one publisher
        per path)."""
        old = stream.sinks.pop(name, None)
        if old is not None:
            stream.view.remove_sink(old)
            old.close()
        new = SINKS[name].make(stream.cfg, self.observer)
        if new is not None:
            stream.sinks[name] = new
            stream.view.add_sink(new)
            new.start()

    def _restart_reader(self, stream: Stream) -> None:
        stream.source.stop(self.cfg.server.shutdown_timeout / 4)
        self.scheduler.remove(stream.cfg.id)
        stream.source = self._source(stream.cfg)
        stream.view.peek_frame = stream.source.slot.peek
        self.scheduler.add(stream.source, stream.cfg.infer_fps, gate_s(stream.cfg))
        stream.source.start()

    def _source(self, scfg: StreamConfig) -> VideoSource:
        sid = scfg.id

        def current() -> StreamConfig:  # settings change live
            s = self.streams.get(sid)
            return scfg if s is None else s.cfg

        def smooth() -> bool:
            return current().output == "smooth"

        def on_frame(stream_id: str) -> None:
            self.scheduler.notify()
            if draws_every_frame(current()):
                self.render.wake(stream_id)

        def wanted() -> bool:
            # Convert a decoded frame only if it will be used: smooth output renders every
            # frame; otherwise only the frames the scheduler takes (frame skipping at the
            # reader: a camera inferred at 1 fps of 15 converts 1 frame a second, not 15).
            return smooth() or self.scheduler.due_soon(sid)

        def keyframes_only(keyframe_fps: float) -> bool:
            cfg = current()
            # No motion gate (mode off): no verdicts, never still.
            since = self.scheduler.still_since(sid) if cfg.gate.still_keyframes else None
            return keyframes_suffice(
                needs_every_frame(cfg),
                self.scheduler.cap(sid),
                keyframe_fps,
                still_keyframes=cfg.gate.still_keyframes,
                still_s=None if since is None else time.monotonic() - since,
            )

        return VideoSource(
            scfg,
            on_frame=on_frame,
            wanted=wanted,
            keyframes_only=keyframes_only,
            resolve=resolve_source,
            observer=self.observer,
        )

    def check_stream(self, scfg: StreamConfig) -> None:
        """Raises ConfigError for settings the model cannot honour (unknown class names)."""
        self._renderer(scfg)
        self._redactor(scfg)
        self._check_rules(scfg)

    def _redactor(self, scfg: StreamConfig) -> Redactor | None:
        p = scfg.privacy
        if p is None:
            return None
        assert self.segmenter is not None
        try:
            return Redactor(
                self.segmenter.labels,
                p.classes,
                style=p.style,
                color=p.color,
                dilate=p.dilate,
                zones=p.zones,
                max_age_s=p.max_mask_age_ms / 1000.0,
            )
        except ValueError as e:
            raise ConfigError(f"streams[{scfg.id}].privacy.classes: {e}") from None

    def _model_failing(self) -> str | None:
        """Why inference fails on a model worker now, or None."""
        failing = [w for w in self.workers if w.failing]
        return failing[0].error if failing else None

    def _check_rules(self, scfg: StreamConfig) -> None:
        """A zone rule's class must be one the model knows; the message starts with its key."""
        assert self.segmenter is not None
        labels = set(self.segmenter.labels)
        for i, zone in enumerate(scfg.zones):
            for j, rule in enumerate(zone.rules):
                if rule.class_name not in labels:
                    raise ConfigError(
                        f"zones.{i}.rules.{j}.class: unknown class {rule.class_name!r} "
                        f"(the model knows {', '.join(self.segmenter.labels)})"
                    )

    def _renderer(self, scfg: StreamConfig) -> Renderer:
        assert self.segmenter is not None
        rc = self.cfg.render
        key = f"streams[{scfg.id}].classes" if scfg.classes is not None else "render.classes"
        try:
            return Renderer(
                self.segmenter.labels,
                self.segmenter.palette,
                mode=rc.mode,
                alpha=rc.alpha if scfg.alpha is None else scfg.alpha,
                classes=scfg.classes if scfg.classes is not None else rc.classes,
                legend=rc.legend,
            )
        except ValueError as e:  # class names can only be checked once the model is known
            raise ConfigError(f"{key}: {e}") from None

    def segment_image(self, image: np.ndarray, bgr: bool = True) -> np.ndarray:
        """One image, resized whole to the model's input; the mask at that size."""
        assert self.segmenter is not None, "model not loaded"
        return self.segment_batch(prepare(image, self.segmenter.input_size, bgr=bgr)[None])[0]

    def segment_batch(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, h, w, 3] at the model's input size -> class ids, on the least busy
        model worker (the stream workers and single-image requests share the model copies)."""
        assert self.workers, "model not loaded"
        worker = min(self.workers, key=lambda w: w.lock.locked())
        with worker.lock:
            return worker.segmenter.segment(rgb)

    def _on_result(self, result: Result) -> None:
        self.render.submit(result)

    def record_latency(self, stream_id: str, seconds: float) -> None:
        """Called by the MJPEG writer after each frame write: capture -> client write."""
        self.observer.latency(stream_id, seconds)
        self.scheduler.observe_latency(stream_id, seconds)
        s = self.streams.get(stream_id)
        if s is not None:
            s.view.latencies.append(seconds)

    # -- state for the API -----------------------------------------------------------------
    def health(self) -> str | None:
        """Why the service is unhealthy, or None: a failed start, or model workers whose
        batches keep failing (frames are read but never segmented)."""
        if self.error:
            return self.error
        failing = [w for w in self.workers if w.failing]
        if failing:
            w = failing[0]
            return (
                f"inference failing on {len(failing)} of {len(self.workers)} model "
                f"worker(s), {w.failures} batches in a row: {w.error}"
            )
        return None

    def stream_status(self, stream_id: str) -> dict[str, Any]:
        s = self.streams[stream_id]
        st = s.source.stats()
        lat = np.asarray(s.view.latencies, dtype=np.float64)
        state, reason = s.source.status()
        model_error = self.health() if self.workers else None
        if model_error and state == SourceState.LIVE:
            state_value, reason = StreamState.ERROR, model_error
        else:
            state_value = StreamState(state.value)
        return {
            "id": stream_id,
            "source": sanitize_url(s.cfg.source),
            "reader": s.cfg.reader,
            "output": s.cfg.output,
            "state": state_value,
            "reason": reason,
            "width": st.width,
            "height": st.height,
            "fps_in": st.fps_in,
            "fps_out": round(s.view.out_rate.rate(), 2),
            "inference_fps": round(s.view.infer_rate.rate(), 2),
            "infer_fps_cap": round(self.scheduler.cap(stream_id), 2),
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)) * 1000, 1) if lat.size else None,
                "p95": round(float(np.percentile(lat, 95)) * 1000, 1) if lat.size else None,
            },
            "captured": st.captured,
            "dropped": st.dropped,
            "reconnects": st.reconnects,
            "clients": s.mjpeg.clients,
            "restream": s.restream.status() if s.restream is not None else None,
            "sinks": {name: sink.status() for name, sink in s.sinks.items()},
            "classes": self._top_classes(s.view.fractions),
            "zones": self._zones_status(s),
        }

    def _zones_status(self, s: Stream) -> list[dict[str, Any]]:
        """Each zone as configured (polygon, rules) with its coverage and open events."""
        live = {z["name"]: z for z in (self.events.zones(s.cfg.id) if self.events else [])}
        return [
            {
                **z.model_dump(mode="json", by_alias=True),
                "coverage": live.get(z.name, {}).get("coverage", {}),
                "active": live.get(z.name, {}).get("active", []),
            }
            for z in s.cfg.zones
        ]

    def _top_classes(self, fractions: np.ndarray | None, n: int = 5) -> dict[str, float]:
        if fractions is None or self.segmenter is None:
            return {}
        order = np.argsort(fractions)[::-1][:n]
        return {
            self.segmenter.labels[i]: round(float(fractions[i]), 4)
            for i in order
            if fractions[i] > 0
        }
