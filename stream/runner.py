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

from segstream.models.runtime import Segmenter, prepare
from segstream.stream.datatypes import Job, Result
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.scheduler import Scheduler

log = logging.getLogger(__name__)

# A worker whose batches fail this many times in a row is reported unhealthy (one bad frame
# is not an outage; a model that fails every batch is).
FAILING_AFTER = 3


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
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self._observer = observer
        self.segmenter = segmenter
        self.index = index
        self.scheduler = scheduler
        self.sink = sink
        h, w = segmenter.input_size
        self._inputs = np.empty((max_batch, h, w, 3), np.uint8)  # reused for every batch
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()  # the segmenter is not thread-safe; REST calls share it
        self.error: str | None = None  # the newest failure, cleared by a successful batch
        self.failures = 0  # consecutive failed batches
        self.batches = 0
        self.frames = 0
        self.busy_s = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"model-worker-{self.index}", daemon=True
        )
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
                self.failures += 1
                self._observer.worker_error(self.index, self.error)
                if self.failures <= FAILING_AFTER or self.failures % 100 == 0:
                    log.exception(
                        "worker %d: inference failed for %d frames (%d in a row)",
                        self.index,
                        len(jobs),
                        self.failures,
                    )
            else:
                if self.failures:
                    log.info("worker %d: inference works again", self.index)
                    self._observer.worker_error(self.index, None)
                self.error, self.failures = None, 0

    @property
    def failing(self) -> bool:
        return self.failures >= FAILING_AFTER

    def _process(self, jobs: list[Job]) -> None:
        n = len(jobs)
        size = self.segmenter.input_size
        for i, job in enumerate(jobs):
            self._observer.stage("queue_wait", job.taken_ts - job.frame.capture_ts)
            spent = job.frame.materialize()  # a deferred conversion (pyav, gst) runs here
            if spent:
                self._observer.stage("convert", spent)
            t0 = time.perf_counter()
            prepare(job.frame.image, size, out=self._inputs[i], bgr=True)
            self._observer.stage("preprocess", time.perf_counter() - t0)
        t0 = time.perf_counter()
        with self.lock:
            masks = self.segmenter.segment(self._inputs[:n])
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.batches += 1
        self.frames += n
        self._observer.batch(n, dt)
        now = time.monotonic()
        for job, mask in zip(jobs, masks, strict=True):
            self._observer.frame(job.stream_id, "inferred")
            self.sink(Result(job.stream_id, job.frame, mask, now, n))
