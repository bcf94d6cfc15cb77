"""Wires the pipeline together: sources -> scheduler -> model worker -> render -> publish.

The service owns the threads; the HTTP layer only reads its state and the publishers."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from models.fetch import sample_path
from models.runtime import Segmenter, load_segmenter, prepare, resolve_backend
from stream import metrics
from stream.config import AppConfig, ConfigError, StreamConfig
from stream.publish import Publisher
from stream.render import Renderer, RenderStage, StreamView
from stream.runner import ModelWorker, Result, WorkerPlan, plan_workers
from stream.scheduler import Scheduler
from stream.sources import VideoSource

log = logging.getLogger(__name__)


def resolve_source(source: str) -> str:
    """`sample:NAME` -> the fetched sample clip; anything else is used as given."""
    if source.startswith("sample:"):
        return str(sample_path(source.split(":", 1)[1]))
    return source


@dataclass
class Stream:
    cfg: StreamConfig
    source: VideoSource
    view: StreamView
    publisher: Publisher


class Service:
    def __init__(self, cfg: AppConfig, segmenter: Segmenter | None = None) -> None:
        self.cfg = cfg
        self.segmenter = segmenter
        self.streams: dict[str, Stream] = {}
        m = cfg.model
        self.scheduler = Scheduler(
            max_batch=m.max_batch or 1,  # set from the worker plan once the model is loaded
            max_wait_s=m.max_wait_ms / 1000.0,
            latency_target_s=cfg.scheduler.latency_target_ms / 1000.0,
            min_fps=cfg.scheduler.min_infer_fps,
        )
        self.render = RenderStage(workers=cfg.render.workers)
        self.workers: list[ModelWorker] = []
        self.plan: WorkerPlan | None = None
        self.ready = False
        self.error: str | None = None
        self.started_ts = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads and warms the model (off the event loop), then starts every stage."""
        self._loop = asyncio.get_running_loop()
        # Every stage has threads of its own; OpenCV's pool on top only spins against the model
        # (render: 1.84 ms CPU per 720p frame with it on 2 cores, 1.03 ms without).
        cv2.setNumThreads(1)
        if self.segmenter is None:
            segmenters = await asyncio.to_thread(self._load_models)
            self.segmenter = segmenters[0]
        else:
            await asyncio.to_thread(self.segmenter.warmup)
            segmenters = [self.segmenter]
        max_batch = self.plan.max_batch if self.plan else (self.cfg.model.max_batch or 1)
        self.scheduler.set_max_batch(max_batch)
        self.workers = [
            ModelWorker(seg, self.scheduler, self._on_result, max_batch, i)
            for i, seg in enumerate(segmenters)
        ]
        for scfg in self.cfg.streams:
            self.add_stream(scfg)
        self.render.start()
        for w in self.workers:
            w.start()
        self.ready = True
        metrics.MODEL_READY.set(1)
        log.info("serving %d stream(s) with %s/%s", len(self.streams), self.segmenter.name,
                 self.segmenter.backend)

    def _load_models(self) -> list[Segmenter]:
        """One warmed copy of the model per worker (see runner.plan_workers)."""
        m = self.cfg.model
        t0 = time.perf_counter()
        backend = "keras" if m.weights else resolve_backend(m.name, m.backend)
        plan = self.plan = plan_workers(backend, m.max_batch, workers=m.workers,
                                        threads=m.threads, batch_sizes=m.batch_sizes)
        segs: list[Segmenter] = []
        try:
            for _ in range(plan.workers):
                seg = load_segmenter(m.name, backend, batch_sizes=plan.batch_sizes,
                                     threads=plan.threads, weights=m.weights)
                segs.append(seg)
                seg.warmup()
        except BaseException:
            for seg in segs:
                seg.close()
            raise
        log.info("model %s (%s) ready in %.1f s: %d worker(s) x %s thread(s), batch sizes %s",
                 segs[0].name, backend, time.perf_counter() - t0, plan.workers,
                 plan.threads or "-", list(plan.batch_sizes))
        return segs

    async def stop(self) -> None:
        self.ready = False
        for s in self.streams.values():
            s.publisher.close()
        await asyncio.to_thread(self._stop_threads)

    def _stop_threads(self) -> None:
        timeout = self.cfg.server.shutdown_timeout
        self.scheduler.stop()
        for w in self.workers:
            w.stop(timeout / 2)
        self.render.stop(timeout / 4)
        # Readers are daemon threads that stop together; a stuck read is abandoned.
        with ThreadPoolExecutor(max(1, len(self.streams))) as pool:
            list(pool.map(lambda s: s.source.stop(timeout / 4), self.streams.values()))
        loaded = {id(w.segmenter): w.segmenter for w in self.workers}
        if self.segmenter is not None:
            loaded[id(self.segmenter)] = self.segmenter
        for seg in loaded.values():
            seg.close()

    # -- streams ---------------------------------------------------------------------------
    def add_stream(self, scfg: StreamConfig) -> Stream:
        assert self._loop is not None and self.segmenter is not None
        if scfg.id in self.streams:
            raise ValueError(f"stream {scfg.id!r} exists")
        metrics.init_stream(scfg.id)
        smooth = scfg.output == "smooth"

        def on_frame(stream_id: str) -> None:
            self.scheduler.notify(stream_id)
            if smooth:
                self.render.wake(stream_id)

        source = VideoSource(scfg, on_frame=on_frame, resolve=resolve_source)
        rc = self.cfg.render
        key = f"streams[{scfg.id}].classes" if scfg.classes is not None else "render.classes"
        try:
            renderer = Renderer(
                self.segmenter.labels,
                self.segmenter.palette,
                mode=rc.mode,
                alpha=rc.alpha if scfg.alpha is None else scfg.alpha,
                classes=scfg.classes if scfg.classes is not None else rc.classes,
                legend=rc.legend,
            )
        except ValueError as e:  # class names can only be checked once the model is known
            raise ConfigError(f"{key}: {e}") from None
        publisher = Publisher(scfg.id, self._loop)
        view = StreamView(
            scfg.id, renderer, publisher, output=scfg.output, jpeg_quality=rc.jpeg_quality,
            peek_frame=source.slot.peek,
        )
        stream = self.streams[scfg.id] = Stream(scfg, source, view, publisher)
        self.render.add(view)
        self.scheduler.add(source, scfg.infer_fps)
        source.start()
        return stream

    def segment_image(self, image_bgr: np.ndarray) -> np.ndarray:
        """One image through the shared model (MAX-style REST API); mask at the model size."""
        assert self.workers, "model not loaded"
        worker = self.workers[0]
        x = prepare(image_bgr, worker.segmenter.input_size, bgr=True)[None]
        with worker.lock:
            return worker.segmenter.segment(x)[0]

    def _on_result(self, result: Result) -> None:
        self.render.submit(result)

    def record_latency(self, stream_id: str, seconds: float) -> None:
        """Called by the MJPEG writer after each frame write: capture -> client write."""
        metrics.E2E_SECONDS.labels(stream=stream_id).observe(seconds)
        self.scheduler.observe_latency(stream_id, seconds)
        s = self.streams.get(stream_id)
        if s is not None:
            s.view.latencies.append(seconds)

    # -- state for the API -----------------------------------------------------------------
    def stream_status(self, stream_id: str) -> dict[str, Any]:
        s = self.streams[stream_id]
        st = s.source.stats()
        lat = np.asarray(s.view.latencies, dtype=np.float64)
        top = self._top_classes(s.view.fractions)
        return {
            "id": stream_id,
            "source": s.cfg.source,
            "reader": s.cfg.reader,
            "output": s.cfg.output,
            "state": s.source.state.value,
            "reason": s.source.reason,
            "width": st.get("width"),
            "height": st.get("height"),
            "fps_in": round(float(st.get("fps_in", 0.0)), 2),
            "fps_out": round(s.view.out_rate.rate(), 2),
            "inference_fps": round(s.view.infer_rate.rate(), 2),
            "infer_fps_cap": round(self.scheduler.cap(stream_id), 2),
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)) * 1000, 1) if lat.size else None,
                "p95": round(float(np.percentile(lat, 95)) * 1000, 1) if lat.size else None,
            },
            "captured": st.get("captured", 0),
            "dropped": st.get("dropped", 0),
            "reconnects": st.get("reconnects", 0),
            "clients": s.publisher.clients,
            "classes": top,
        }

    def _top_classes(self, fractions: np.ndarray | None, n: int = 5) -> dict[str, float]:
        if fractions is None or self.segmenter is None:
            return {}
        order = np.argsort(fractions)[::-1][:n]
        return {self.segmenter.labels[i]: round(float(fractions[i]), 4)
                for i in order if fractions[i] > 0}
