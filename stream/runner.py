"""Model runner stage: worker threads turn scheduler batches into masks.

Each worker owns a copy of the model and pulls its own batches, so on a CPU several
single-threaded workers run side by side (see `plan_workers`). Each mask stays attached to the
frame it was computed from (a `Result`), and results go to the render stage through a callback,
so a worker never waits on rendering or clients."""

from __future__ import annotations

import logging
import os
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


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    workers: int
    max_batch: int
    threads: int | None  # per worker (tflite); None for the keras runtime
    batch_sizes: tuple[int, ...]


def plan_workers(
    backend: str,
    max_batch: int | None = None,
    *,
    workers: int | None = None,
    threads: int | None = None,
    batch_sizes: list[int] | None = None,
    cores: int | None = None,
) -> WorkerPlan:
    """How many model copies to run, with how many threads each, at which batch sizes.

    CPU (tflite): XNNPACK splits each layer over its threads and waits for the slowest, so one
    thread preempted by a decoder stalls the rest (a batch of 4 took 173 ms in the service vs
    123 ms alone). Single-threaded workers side by side never wait on each other (2 cores:
    34.8 fps vs 33.5 alone, 33.1 vs 31.0 beside four 720p decoders), so the default is up to
    four workers sharing the cores. A padded row costs a whole frame on a CPU: every size up to
    max_batch gets its own interpreter. Batching buys no throughput on a CPU (raw 34.8 fps at
    batch 1, 34.2 at 4) while a frame waits for its whole batch, so max_batch defaults to 1
    there (4 cameras: 23.6 fps, p50 228 ms vs 20.8 fps, p50 344 ms for one 2-thread
    interpreter at batch 4). GPU (keras): one worker, batches up to 8, powers of two (padding
    is almost free there, and each shape is a compile).
    """
    if backend == "keras":
        max_batch = max_batch or (max(batch_sizes) if batch_sizes else 8)
        sizes = batch_sizes or [1 << i for i in range(max(max_batch - 1, 0).bit_length() + 1)]
        return WorkerPlan(workers or 1, max_batch, None, tuple(sorted(set(sizes))))
    max_batch = max_batch or 1
    cores = cores or os.cpu_count() or 1
    if workers is None:
        workers = max(1, cores // threads) if threads else min(cores, 4)
    threads = threads or max(1, cores // workers)
    sizes = batch_sizes or list(range(1, max_batch + 1))
    return WorkerPlan(workers, max_batch, threads, tuple(sorted(set(sizes))))


class ModelWorker:
    def __init__(
        self,
        segmenter: Segmenter,
        scheduler: Scheduler,
        sink: Callable[[Result], None],
        max_batch: int,
        index: int = 0,
    ) -> None:
        self.segmenter = segmenter
        self.index = index
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
        self._thread = threading.Thread(target=self._run, name=f"model-worker-{self.index}",
                                        daemon=True)
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
