"""Model runner stage: one worker thread turns scheduler batches into masks.

Each mask stays attached to the frame it was computed from (a `Result`), and results go to the
render stage through a callback, so the worker never waits on rendering or clients."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.runtime import Segmenter, prepare
from stream import metrics
from stream.scheduler import Job, Scheduler
from stream.sources import Frame

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Result:
    stream_id: str
    frame: Frame
    mask: np.ndarray  # uint8 [h, w] class ids at the model's input size
    inferred_ts: float
    batch_size: int


class ModelWorker:
    def __init__(
        self,
        segmenter: Segmenter,
        scheduler: Scheduler,
        sink: Callable[[Result], None],
        max_batch: int,
    ) -> None:
        self.segmenter = segmenter
        self.scheduler = scheduler
        self.sink = sink
        h, w = segmenter.input_size
        self._inputs = np.empty((max_batch, h, w, 3), np.uint8)  # reused for every batch
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()  # the segmenter is not thread-safe; REST calls share it
        self.error: str | None = None
        self.batches = 0
        self.frames = 0
        self.busy_s = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            jobs = self.scheduler.next_batch()
            if not jobs:
                return
            try:
                self._process(jobs)
            except Exception as e:  # a bad batch must not kill the service
                self.error = f"{type(e).__name__}: {e}"
                log.exception("inference failed for %d frames", len(jobs))

    def _process(self, jobs: list[Job]) -> None:
        n = len(jobs)
        size = self.segmenter.input_size
        for i, job in enumerate(jobs):
            metrics.STAGE_SECONDS.labels(stage="queue_wait").observe(
                job.taken_ts - job.frame.capture_ts
            )
            t0 = time.perf_counter()
            prepare(job.frame.image, size, out=self._inputs[i], bgr=True)
            metrics.STAGE_SECONDS.labels(stage="preprocess").observe(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with self.lock:
            masks = self.segmenter.segment(self._inputs[:n])
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.batches += 1
        self.frames += n
        metrics.STAGE_SECONDS.labels(stage="inference").observe(dt)
        metrics.BATCH_SIZE.observe(n)
        now = time.monotonic()
        for job, mask in zip(jobs, masks, strict=True):
            metrics.FRAMES.labels(stream=job.stream_id, outcome="inferred").inc()
            self.sink(Result(job.stream_id, job.frame, mask, now, n))
