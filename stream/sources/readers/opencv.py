"""OpenCV's FFmpeg backend (V4L2 for devices): the default reader."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from segstream.stream.config import StreamConfig
from segstream.stream.sources.readers.base import Reader, ffmpeg_options, sane_fps
from segstream.stream.sources.target import SourceError, Target, file_reason, network_reason


class _CaptureOptionsGate:
    """OpenCV takes its FFmpeg options from one process-wide environment variable, read while
    a capture opens. Opens wanting the same options may overlap; one wanting different
    options waits until the others have finished opening."""

    VAR = "OPENCV_FFMPEG_CAPTURE_OPTIONS"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._current: str | None = None
        self._users = 0

    @contextmanager
    def use(self, options: str) -> Iterator[None]:
        with self._cond:
            while self._users and self._current != options:
                self._cond.wait()
            if self._current != options:
                os.environ[self.VAR] = options
                self._current = options
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()


_CV_OPTIONS = _CaptureOptionsGate()


class OpenCVReader(Reader):
    """cv2.VideoCapture with the FFmpeg backend (V4L2 for devices). grab() decodes, retrieve()
    converts (swscale to BGR) and copies."""

    name = "opencv"

    def __init__(self, target: Target, cfg: StreamConfig) -> None:
        super().__init__(target, cfg)
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        t = self.target
        if t.kind == "file" and not Path(t.url).is_file():
            raise self._cannot_open(file_reason(t.url))
        t0 = time.monotonic()
        if t.kind == "device":
            cap = cv2.VideoCapture(t.device if t.device is not None else t.url, cv2.CAP_V4L2)
        else:
            opts = ffmpeg_options(t, self.cfg)
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(self.cfg.open_timeout * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(self.cfg.read_timeout * 1000),
            ]
            if t.live:
                # FFmpeg's frame threading holds back (threads - 1) frames: latency a live
                # stream should not pay; and with many cameras, parallelism comes from the
                # streams themselves. One thread decodes 720p H.264 in ~2 ms.
                params += [cv2.CAP_PROP_N_THREADS, 1]
            with _CV_OPTIONS.use("|".join(f"{k};{v}" for k, v in opts.items())):
                cap = cv2.VideoCapture(t.url, cv2.CAP_FFMPEG, params)
        self._cap = cap
        if not cap.isOpened():
            raise self._cannot_open(self._why_not(time.monotonic() - t0))
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # honoured by V4L2; FFmpeg has no such buffer
        self.fps = sane_fps(cap.get(cv2.CAP_PROP_FPS))

    def _why_not(self, elapsed: float) -> str:
        t = self.target
        if t.kind == "file":
            return file_reason(t.url)
        if t.kind == "device":
            return "cannot open the video device (missing, busy or no permission?)"
        if elapsed >= self.cfg.open_timeout * 0.9:
            return f"timed out after {self.cfg.open_timeout:g} s"
        return network_reason(t.url, min(2.0, self.cfg.open_timeout))

    def grab(self) -> float | None:
        assert self._cap is not None
        t0, cpu0 = time.monotonic(), time.thread_time()
        ok = self._cap.grab()
        dt = time.monotonic() - t0
        if ok:
            # Live sources decode on this one thread (N_THREADS=1), so its CPU time is the
            # decode work without the network wait; files never wait, so wall time is right.
            return (time.thread_time() - cpu0) if self.target.live else dt
        if not self.target.live:
            return None  # end of file (OpenCV does not tell EOF from a broken file)
        if dt >= self.cfg.read_timeout * 0.9:
            raise SourceError(f"read timed out after {self.cfg.read_timeout:g} s")
        raise SourceError("stream ended or connection lost")

    def retrieve(self) -> np.ndarray:
        assert self._cap is not None
        ok, img = self._cap.retrieve()
        if not ok or img is None:
            raise SourceError("could not convert the decoded frame")
        return img

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
