"""The re-stream sink: one thread per stream encodes the newest annotated frame and publishes
it over RTSP, reconnecting with backoff (see the package's docstring)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import av
import cv2
import numpy as np

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import Rendered, SourceState
from segstream.stream.lifecycle import RateMeter, backoff_delay, note_transition
from segstream.stream.observer import NULL_OBSERVER, Observer
from segstream.stream.restream.encoder import (
    KEYFRAME_S,
    TIME_BASE,
    EncoderUnavailable,
    open_encoder,
)
from segstream.stream.restream.rtp import split_annexb
from segstream.stream.restream.rtsp import IO_TIMEOUT_S, RtspError, RtspPublisher
from segstream.stream.sanitize import sanitize_text

log = logging.getLogger(__name__)

KEEPALIVE_S = 1.0  # no new frame for this long: send the last one again

STABLE_S = 5.0  # a session that lasted this long resets the backoff
CLOSE_TIMEOUT_S = 2.0  # close() waits this long for the thread, then abandons it


class RestreamSink:
    """One stream's RTSP publisher (a `stream.datatypes.Sink`)."""

    name = "restream"
    # The stream settings besides `restream` it is made from (see stream.outputs).
    USES = frozenset({"reconnect_initial", "reconnect_max"})

    def __init__(
        self,
        stream_id: str,
        url: str,
        *,
        encoder: str = "auto",
        bitrate_kbps: int = 2000,
        preset: str = "ultrafast",
        reconnect_initial: float = 0.5,
        reconnect_max: float = 10.0,
        io_timeout: float = IO_TIMEOUT_S,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.stream_id = stream_id
        self.url = url
        self.safe_url = sanitize_text(url)
        self.encoder_choice = encoder
        self.bitrate_kbps = bitrate_kbps
        self.preset = preset
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.io_timeout = io_timeout
        self._observer = observer
        self._cond = threading.Condition()
        self._box: np.ndarray | None = None  # newest frame, not taken yet
        self._spare: np.ndarray | None = None  # a buffer nobody uses (put fills it)
        self._work: np.ndarray | None = None  # the frame the encoder thread holds
        self._fps_in = RateMeter()  # frames put, per second
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pub: RtspPublisher | None = None  # the live session (close() aborts it)
        self._closed = False
        self._lock = threading.Lock()  # state and counters (read by the API)
        self._state = SourceState.STOPPED
        self._reason: str | None = None
        self._encoder: str | None = None  # the one that opened
        self._frames = self._bytes = self._errors = self._dropped = self._sessions = 0
        self._cpu_s = 0.0

    @classmethod
    def from_config(
        cls, scfg: StreamConfig, observer: Observer = NULL_OBSERVER
    ) -> RestreamSink | None:
        """The stream's re-stream as its `restream:` settings say; None when it is off."""
        r = scfg.restream
        if r is None:
            return None
        return cls(
            scfg.id,
            r.url,
            encoder=r.encoder,
            bitrate_kbps=r.bitrate,
            preset=r.preset,
            reconnect_initial=scfg.reconnect_initial,
            reconnect_max=scfg.reconnect_max,
            observer=observer,
        )

    # -- Sink (render thread) --------------------------------------------------------------
    def wants_frames(self) -> bool:
        return not self._closed and self._state is not SourceState.ERROR

    def put(self, frame: Rendered) -> None:
        """Copies the frame into the box (the render buffer is reused) and wakes the encoder.
        Holds the lock only for the copy; the encoder thread takes it only to swap buffers."""
        img = frame.image
        with self._cond:
            if self._closed:
                return
            self._fps_in.tick()
            buf: np.ndarray | None
            if self._box is not None:
                buf = self._box  # unseen: overwrite it, newest wins
                with self._lock:
                    self._dropped += 1
            else:
                buf, self._spare = self._spare, None
            if buf is None or buf.shape != img.shape:
                buf = np.empty(img.shape, np.uint8)
            np.copyto(buf, img)
            self._box = buf
            self._cond.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stops the thread (it tears the session down) and removes the metric series. A
        thread still connecting (DNS, TCP connect) is abandoned; it ends within io_timeout."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
            pub = self._pub
        if pub is not None:
            pub.abort()  # wakes the thread from a blocked send or reply
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.warning(
                    "%s: restream thread is still connecting; abandoned it (it ends within %.0f s)",
                    self.stream_id,
                    self.io_timeout,
                )
        with self._lock:
            self._set_state(SourceState.STOPPED, None)
        self._observer.restream_removed(self.stream_id)

    # -- control and state (any thread) ----------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._observer.restream_added(self.stream_id)
        with self._lock:
            self._set_state(SourceState.STARTING, "waiting for the first frame")
        self._thread = threading.Thread(
            target=self._run, name=f"restream-{self.stream_id}", daemon=True
        )
        self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def state(self) -> SourceState:
        with self._lock:
            return self._state

    def status(self) -> dict[str, Any]:
        """For the API: the URL sanitised, state, reason and counters."""
        with self._lock:
            return {
                "url": self.safe_url,
                "state": self._state.value,
                "reason": self._reason,
                "encoder": self._encoder,
                "frames": self._frames,
                "bytes": self._bytes,
                "errors": self._errors,
                "dropped": self._dropped,
                "sessions": self._sessions,
                "fps_in": round(self._fps_in.rate(), 2),
                "cpu_s": round(self._cpu_s, 3),
            }

    def _set_state(self, state: SourceState, reason: str | None) -> None:
        """Caller holds self._lock. Once closed, only `stopped` is accepted."""
        if self._closed and state is not SourceState.STOPPED:
            return
        reason = note_transition(log, f"{self.stream_id}: restream", self._state, state, reason)
        self._state, self._reason = state, reason
        self._observer.restream_state(self.stream_id, state, reason)

    # -- encoder thread --------------------------------------------------------------------
    def _take(self, timeout: float | None) -> np.ndarray | None:
        """The newest frame (None: none within timeout, or stopping). The previous frame's
        buffer goes back to the box's spare."""
        with self._cond:
            if self._box is None and not self._stop.is_set():
                self._cond.wait(timeout)
            if self._stop.is_set() or self._box is None:
                return None
            img, self._box = self._box, None
            if self._work is not None and self._spare is None:
                self._spare = self._work
            self._work = img
            return img

    def _run(self) -> None:
        failures = 0
        img: np.ndarray | None = None
        try:
            while not self._stop.is_set():
                img = img if img is not None else self._take(None)
                if img is None:
                    continue  # woken without a frame: stopping, or spurious
                began = time.monotonic()
                try:
                    img = self._session(img)  # a frame of a new size, or None when stopping
                    failures = 0
                    continue
                except EncoderUnavailable as e:
                    with self._lock:
                        self._set_state(SourceState.ERROR, str(e))
                    log.error("%s: restream: %s", self.stream_id, sanitize_text(str(e)))
                    return
                except Exception as e:
                    if self._stop.is_set():
                        return
                    failures = 1 if time.monotonic() - began >= STABLE_S else failures + 1
                    if not self._backoff(f"{type(e).__name__}: {e}", failures):
                        return
                # Start again from the newest frame; without one, from the last one again.
                img = self._take(0)
                if img is None:
                    with self._cond:
                        img = self._work
        finally:
            with self._cond:
                self._work = None
            self._cpu_tick()

    def _backoff(self, reason: str, failures: int) -> bool:
        """Counts the failure and waits out the backoff. False: stopping."""
        delay = backoff_delay(failures, self.reconnect_initial, self.reconnect_max)
        reason = sanitize_text(reason)
        self._cpu_tick()
        with self._lock:
            self._errors += 1
            self._set_state(SourceState.RECONNECTING, f"{reason}; retrying in {delay:.1f} s")
        self._observer.restream_error(self.stream_id)
        log.warning(
            "%s: restream to %s failed (%s); retrying in %.1f s",
            self.stream_id,
            self.safe_url,
            reason,
            delay,
        )
        return not self._stop.wait(delay)

    def _cpu_tick(self) -> None:
        cpu = time.thread_time()
        with self._lock:
            self._cpu_s = cpu

    def _session(self, img: np.ndarray) -> np.ndarray | None:
        """One RTSP session: encode the first frame, connect with its SPS/PPS, then send each
        new frame. Returns the first frame of a new size (the caller starts a new session),
        or None when stopping; raises on a connect or write failure."""
        h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2  # 4:2:0 needs even sizes
        if h == 0 or w == 0:
            raise ValueError(f"frame too small to encode: {img.shape}")
        with self._lock:
            self._set_state(SourceState.STARTING, f"connecting to {self.safe_url}")
        enc = open_encoder(
            self.encoder_choice, w, h, self._fps_in.rate() or 15.0, self.bitrate_kbps, self.preset
        )
        with self._lock:
            self._encoder = enc.name
        pub = RtspPublisher(self.url, self.io_timeout)
        with self._cond:
            self._pub = pub
        try:
            yuv = np.empty((h * 3 // 2, w), np.uint8)
            t0 = time.monotonic()
            last_pts, last_key = -1, -KEYFRAME_S
            while True:
                cv2.cvtColor(img[:h, :w], cv2.COLOR_BGR2YUV_I420, dst=yuv)
                while True:  # the same picture again while no new frame comes (keep-alive)
                    now = time.monotonic()
                    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                    frame.pts = last_pts = max(round((now - t0) / TIME_BASE), last_pts + 1)
                    frame.time_base = TIME_BASE
                    if now - last_key >= KEYFRAME_S:
                        frame.pict_type = av.video.frame.PictureType.I
                        last_key = now
                    self._send(pub, enc.encode(frame))
                    nxt = self._take(KEEPALIVE_S)
                    if self._stop.is_set():
                        return None
                    if nxt is not None:
                        break
                if nxt.shape != img.shape:
                    log.info(
                        "%s: restream frame size %dx%d -> %dx%d; new session",
                        self.stream_id,
                        img.shape[1],
                        img.shape[0],
                        nxt.shape[1],
                        nxt.shape[0],
                    )
                    return nxt
                img = nxt
        finally:
            with self._cond:
                self._pub = None
            pub.close()

    def _send(self, pub: RtspPublisher, packets: list[av.Packet]) -> None:
        for p in packets:
            nals = split_annexb(bytes(p))
            if pub.sock is None:  # the first access unit: connect with its parameter sets
                sps = next((n for n in nals if n[0] & 0x1F == 7), None)
                pps = next((n for n in nals if n[0] & 0x1F == 8), None)
                if sps is None or pps is None:
                    raise RtspError("the encoder's first frame carries no SPS/PPS")
                pub.connect(sps, pps)
            pub.send(nals, int(p.pts or 0))
            with self._lock:
                if self._state is not SourceState.LIVE:
                    self._sessions += 1
                    self._set_state(SourceState.LIVE, None)
                self._frames += 1
                self._bytes += p.size
            self._observer.restream_frames(self.stream_id, 1, p.size)
        self._cpu_tick()
