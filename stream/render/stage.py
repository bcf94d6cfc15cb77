"""The render stage: threads that turn results (or, in smooth mode, every captured frame) into
annotated frames for each stream's sinks. Work per stream is serialised on one thread, so
buffers need no locks."""

from __future__ import annotations

import logging
import threading

from segstream.stream.datatypes import Result
from segstream.stream.render.fanout import StreamView

log = logging.getLogger(__name__)


class RenderStage:
    """`workers` threads; each new stream goes to the thread with the fewest streams (ties:
    the lowest index), so with no removals the i-th stream added is on thread i % workers."""

    def __init__(self, workers: int = 1) -> None:
        self._views: dict[str, StreamView] = {}
        self._thread_of: dict[str, int] = {}
        self._conds = [threading.Condition() for _ in range(max(1, workers))]
        self._dirty = [False] * len(self._conds)
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._lock = threading.Lock()

    def add(self, view: StreamView) -> None:
        with self._lock:
            load = [0] * len(self._conds)
            for i in self._thread_of.values():
                load[i] += 1
            self._thread_of[view.stream_id] = load.index(min(load))
            self._views[view.stream_id] = view

    def remove(self, stream_id: str) -> StreamView | None:
        """Stops rendering the stream; a frame being rendered right now still finishes."""
        with self._lock:
            self._thread_of.pop(stream_id, None)
            return self._views.pop(stream_id, None)

    def view(self, stream_id: str) -> StreamView | None:
        return self._views.get(stream_id)

    def thread_of(self, stream_id: str) -> int | None:
        return self._thread_of.get(stream_id)

    def submit(self, result: Result) -> None:
        """From a model worker: newest result wins (workers in parallel may finish out of order)."""
        view = self._views.get(result.stream_id)
        i = self._thread_of.get(result.stream_id)
        if view is None or i is None:
            return  # removed meanwhile
        with self._conds[i]:
            if view.result is not None and view.result.frame.seq >= result.frame.seq:
                return
            view.result = result
            self._dirty[i] = True
            self._conds[i].notify()
        view.infer_rate.tick()

    def wake(self, stream_id: str) -> None:
        i = self._thread_of.get(stream_id)
        if i is None:
            return
        with self._conds[i]:
            self._dirty[i] = True
            self._conds[i].notify()

    def start(self) -> None:
        for i in range(len(self._conds)):
            t = threading.Thread(target=self._run, args=(i,), name=f"render-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 1.0) -> None:
        self._stopped = True
        for cond in self._conds:
            with cond:
                cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _run(self, i: int) -> None:
        cond = self._conds[i]
        while not self._stopped:
            with cond:
                while not self._dirty[i] and not self._stopped:
                    cond.wait(0.5)
                self._dirty[i] = False
            with self._lock:
                mine = [v for sid, v in self._views.items() if self._thread_of.get(sid) == i]
            for view in mine:
                if not view.pending():
                    continue
                try:
                    view.work()
                except Exception:
                    log.exception("render failed for stream %s", view.stream_id)
