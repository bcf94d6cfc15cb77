"""Event clips: a short H.264 MP4 per event of a stream with `record_clips: true`, from a few
seconds before the event's start to its end, of the pictures the viewers see.

    render thread --put()--> one-slot box (newest wins) --> clip thread:
        encode (the re-stream's encoder) -> packet ring (pre-roll) -> each open clip's MP4

The recorder is one of the stream's sinks: it gets the rendered frame every other sink gets,
so a stream with privacy on records redacted pictures only (never the camera's frame). `put`
copies the frame and returns; one thread per stream encodes each frame once, keeps the last
seconds of encoded frames in a ring bounded in frames, bytes and age (the pre-roll: an event
starts `for_s` before the rules report it, so the ring also holds the longest `for_s`), and
muxes them into the MP4 of every open clip. Clips share the encoded frames: no encoding per
event. A clip starts at the ring's last keyframe at or before `start - pre_roll_s` and lags
the newest frame by the rule's `clear_s`, so that when the event ends (its end is the first
frame of the quiet period, `clear_s` in the past) it stops at the event's end; a frame the
ring is about to drop is written first, so a lag longer than the ring loses nothing. A clip
reaching `max_s` stops there (truncated). Clips are recorded as fragmented MP4 (one cut short
by a crash still plays up to its last fragment), then rewritten as a plain MP4 when finished
(browsers show a fragmented file's duration wrong)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import av
import cv2
import numpy as np
from av.container import OutputContainer
from av.video.codeccontext import VideoCodecContext
from av.video.stream import VideoStream

from segstream.stream.datatypes import Rendered
from segstream.stream.events.config import ClipsConfig, ZoneConfig
from segstream.stream.events.model import Change
from segstream.stream.restream.encoder import KEYFRAME_S, TIME_BASE, open_encoder

log = logging.getLogger(__name__)

REPORT_DELAY_S = 1.0  # margin for the inference's delay between a frame and its event
END_WAIT_S = 2.0  # an ended clip finishes without a later frame after this long
CLOSE_TIMEOUT_S = 5.0
KEY_SLACK_S = 0.002  # capture times jitter: a frame a hair short of the interval is due too
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
# (event id, file, bytes, truncated): a clip is finished and closed.
ClipDone = Callable[[str, Path, int, bool], None]


def flatten(path: Path) -> None:
    """The finished (fragmented) recording as a plain MP4 with its index in front: browsers
    know its duration and seek in it (they guess both badly for a fragmented file). Packets
    are copied, nothing is encoded; the file is replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with (
            av.open(str(path)) as src,
            av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as dst,
        ):
            s_in = src.streams.video[0]
            s_out = dst.add_stream_from_template(s_in)
            for pkt in src.demux(s_in):
                if pkt.dts is None:
                    continue  # the demuxer's flush packet
                pkt.stream = s_out
                dst.mux(pkt)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Packet:
    """One encoded frame."""

    seq: int
    wall: float  # the frame's capture time, epoch seconds
    pts: int  # TIME_BASE units since its session began
    key: bool
    data: bytes
    session: int  # encoder session: a new frame size starts one
    size: tuple[int, int]  # width, height


class PacketRing:
    """The encoded frames of the last `max_age_s` at most, `max_frames` and `max_bytes` at
    most, kept as whole groups of pictures: it always starts at a keyframe (a clip can start
    nowhere else), so a group larger than the bounds is not kept at all."""

    def __init__(self, max_frames: int, max_bytes: int, max_age_s: float) -> None:
        self.max_frames, self.max_bytes, self.max_age_s = max_frames, max_bytes, max_age_s
        self._gops: deque[list[Packet]] = deque()
        self.frames = self.bytes = 0

    def push(self, p: Packet) -> list[Packet]:
        """Adds a packet; returns those dropped to stay within the bounds, oldest first."""
        if p.key:
            self._gops.append([])
        elif not self._gops or self._gops[-1][-1].session != p.session:
            return [p]  # no keyframe to decode it from
        self._gops[-1].append(p)
        self.frames += 1
        self.bytes += len(p.data)
        dropped: list[Packet] = []
        # Age: drop the oldest group while the next one alone still reaches back max_age_s.
        while len(self._gops) > 1 and self._gops[1][0].wall <= p.wall - self.max_age_s:
            dropped += self._pop()
        while self._gops and (self.frames > self.max_frames or self.bytes > self.max_bytes):
            dropped += self._pop()
        return dropped

    def _pop(self) -> list[Packet]:
        gop = self._gops.popleft()
        self.frames -= len(gop)
        self.bytes -= sum(len(p.data) for p in gop)
        return gop

    def start_seq(self, wall: float) -> int | None:
        """The seq of the last keyframe at or before `wall` (else the oldest one kept)."""
        best = None
        for gop in self._gops:
            if best is None or gop[0].wall <= wall:
                best = gop[0].seq
        return best

    def after(self, seq: int) -> Iterable[Packet]:
        """Packets kept from seq on, oldest first."""
        for gop in self._gops:
            if gop[-1].seq >= seq:
                yield from (p for p in gop if p.seq >= seq)

    def clear(self) -> None:
        self._gops.clear()
        self.frames = self.bytes = 0


@dataclass
class Clip:
    """One event's MP4, written as its packets come."""

    event_id: str
    path: Path
    start: float  # wall time the clip should start at (event start - pre-roll)
    hold_s: float  # lag behind the newest frame: the rule's clear_s
    max_s: float
    next_seq: int | None = None  # the next packet to write (None: the next keyframe)
    end: float | None = None  # the event's end, once it ended
    ended_at: float = 0.0  # monotonic time end was set
    truncated: bool = False
    done: bool = False
    _out: OutputContainer | None = field(default=None, repr=False)
    _stream: VideoStream | None = field(default=None, repr=False)
    _pts0: int = 0
    _wall0: float = 0.0
    _session: int = -1

    def write(self, p: Packet) -> None:
        """Mux p (packets come in order; one before the clip's next is ignored)."""
        if self.done or (self.next_seq is not None and p.seq < self.next_seq):
            return
        self.next_seq = p.seq + 1
        if self._out is None:
            if not p.key:
                return  # a clip starts at a keyframe
            self._open(p)
        elif p.session != self._session or p.wall - self._wall0 >= self.max_s:
            self.truncated = True  # the cap (or a new frame size, which one file cannot hold)
            self.finish()
            return
        pkt = av.Packet(p.data)
        pkt.pts = pkt.dts = p.pts - self._pts0
        pkt.time_base = TIME_BASE
        pkt.is_keyframe = p.key
        assert self._out is not None and self._stream is not None
        pkt.stream = self._stream
        self._out.mux(pkt)

    def _open(self, p: Packet) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        out = av.open(str(self.path), "w", format="mp4", options=MP4_OPTIONS)
        stream = out.add_mux_stream("h264", width=p.size[0], height=p.size[1])
        stream.time_base = TIME_BASE
        self._out, self._stream = out, stream  # type: ignore[assignment]
        self._pts0, self._wall0, self._session = p.pts, p.wall, p.session

    def finish(self) -> None:
        self.done = True
        if self._out is not None:
            self._out.close()
            if self.path.exists():  # else: the event was deleted meanwhile
                flatten(self.path)

    @property
    def written(self) -> bool:
        return self._out is not None


@dataclass
class _Cmd:
    kind: str  # open | end
    event_id: str
    wall: float
    hold_s: float = 0.0


class ClipRecorder:
    """One stream's clip recorder (a `stream.datatypes.Sink`)."""

    name = "clips"

    def __init__(
        self,
        stream_id: str,
        cfg: ClipsConfig,
        path_for: Callable[[str], Path],
        on_done: ClipDone,
        window_s: float = 0.0,
    ) -> None:
        self.stream_id = stream_id
        self.cfg = cfg
        self.path_for = path_for
        self.on_done = on_done
        self.ring = PacketRing(cfg.buffer_frames, cfg.buffer_bytes, self._age(window_s))
        self.clips: dict[str, Clip] = {}
        self.dropped = 0  # frames put before the thread took the previous one
        self._cond = threading.Condition()
        self._box: tuple[np.ndarray, float] | None = None
        self._spare: np.ndarray | None = None
        self._cmds: list[_Cmd] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"clips-{stream_id}", daemon=True)
        self._enc: VideoCodecContext | None = None
        self._session = 0
        self._size = (0, 0)
        self._t0 = 0.0
        self._last_pts = -1
        self._last_key = -KEYFRAME_S
        self._seq = 0
        self._newest = 0.0  # wall time of the newest encoded frame
        self._yuv = np.empty(0, np.uint8)

    def _age(self, window_s: float) -> float:
        # The pre-roll before a start the rules report up to window_s (the longest for_s)
        # late, plus the inference's delay, and a keyframe interval: a clip starts at a
        # keyframe at or before.
        return self.cfg.pre_roll_s + window_s + REPORT_DELAY_S + KEYFRAME_S

    # -- control (any thread; never blocks on encoding) --------------------------------------
    def start(self) -> None:
        self._thread.start()

    def set_window(self, window_s: float) -> None:
        """The longest for_s of the stream's rules (how late an event's start is known)."""
        with self._cond:
            self.ring.max_age_s = self._age(window_s)

    def open(self, event_id: str, start: float, hold_s: float) -> None:
        self._command(_Cmd("open", event_id, start - self.cfg.pre_roll_s, hold_s))

    def end(self, event_id: str, end: float) -> None:
        self._command(_Cmd("end", event_id, end))

    def _command(self, cmd: _Cmd) -> None:
        with self._cond:
            if not self._closed:
                self._cmds.append(cmd)
                self._cond.notify()

    # -- Sink (render thread) ----------------------------------------------------------------
    def wants_frames(self) -> bool:
        return not self._closed

    def put(self, frame: Rendered) -> None:
        """Copies the frame (the render buffer is reused) for the clip thread."""
        img = frame.image
        wall = time.time() - (time.monotonic() - frame.capture_ts)
        with self._cond:
            if self._closed:
                return
            if self._box is not None:
                buf = self._box[0]  # not taken yet: newest wins
                self.dropped += 1
            else:
                buf, self._spare = self._spare if self._spare is not None else np.empty(0), None
            if buf.shape != img.shape:
                buf = np.empty(img.shape, np.uint8)
            np.copyto(buf, img)
            self._box = (buf, wall)
            self._cond.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stops the thread; it finishes every open clip with what it has."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- clip thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not (self._box or self._cmds or self._closed):
                        self._cond.wait(END_WAIT_S / 2)
                    cmds, self._cmds = self._cmds, []
                    box, self._box = self._box, None
                    closed = self._closed
                for cmd in cmds:
                    self._apply(cmd)
                if box is not None:
                    self._encode(*box)
                    with self._cond:
                        if self._spare is None:
                            self._spare = box[0]
                self._finish_stale()
                if closed:
                    return
        except Exception:
            # The encoder does not open (or failed): no clips from this stream; the render
            # thread stops drawing frames for it.
            log.exception("%s: clip recording failed; no more clips", self.stream_id)
            with self._cond:
                self._closed = True
        finally:
            self._finish_all()

    def _apply(self, cmd: _Cmd) -> None:
        if cmd.kind == "open":
            if len([c for c in self.clips.values() if not c.done]) >= self.cfg.max_open:
                log.warning("%s: %d clips open; no clip of event %s",
                            self.stream_id, self.cfg.max_open, cmd.event_id)  # fmt: skip
                return
            path = self.path_for(cmd.event_id)
            clip = Clip(cmd.event_id, path, cmd.wall, cmd.hold_s, self.cfg.max_s)
            clip.next_seq = self.ring.start_seq(cmd.wall)
            self.clips[cmd.event_id] = clip
            self._catch_up(clip, self._newest)
        elif (ended := self.clips.get(cmd.event_id)) is not None:
            ended.end, ended.ended_at = cmd.wall, time.monotonic()
            self._catch_up(ended, self._newest)

    def _encode(self, img: np.ndarray, wall: float) -> None:
        h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2  # 4:2:0 needs even sizes
        if h == 0 or w == 0:
            return
        if self._enc is None or self._size != (w, h):
            self._new_session(w, h, wall)
        assert self._enc is not None
        cv2.cvtColor(img[:h, :w], cv2.COLOR_BGR2YUV_I420, dst=self._yuv)
        frame = av.VideoFrame.from_ndarray(self._yuv, format="yuv420p")
        frame.pts = self._last_pts = max(round((wall - self._t0) / TIME_BASE), self._last_pts + 1)
        frame.time_base = TIME_BASE
        if wall - self._last_key >= KEYFRAME_S - KEY_SLACK_S:
            frame.pict_type = av.video.frame.PictureType.I
            self._last_key = wall
        for p in self._enc.encode(frame):
            pts = int(p.pts or 0)
            self._seq += 1
            self._on_packet(
                Packet(
                    self._seq,
                    self._t0 + pts * float(TIME_BASE),
                    pts,
                    bool(p.is_keyframe),
                    bytes(p),
                    self._session,
                    self._size,
                )
            )

    def _new_session(self, w: int, h: int, wall: float) -> None:
        """A new encoder for a new frame size (the first frame, or the size changed)."""
        c = self.cfg
        self._enc = open_encoder(c.encoder, w, h, 15.0, c.bitrate, "ultrafast")
        self._session += 1
        self._size, self._t0 = (w, h), wall
        self._yuv = np.empty((h * 3 // 2, w), np.uint8)
        self._last_pts, self._last_key = -1, wall - KEYFRAME_S

    def _on_packet(self, p: Packet) -> None:
        self._newest = p.wall
        with self._cond:
            dropped = self.ring.push(p)
        for clip in self._open_clips():
            for old in dropped:  # about to be lost: written now, whatever the lag
                self._write(clip, old)
            self._catch_up(clip, p.wall)

    def _catch_up(self, clip: Clip, newest: float) -> None:
        """Write the ring's packets the clip may have: up to its end once it ended, else up
        to its lag behind the newest frame. Finish it past its end."""
        limit = clip.end if clip.end is not None else newest - clip.hold_s
        start = clip.next_seq if clip.next_seq is not None else 0
        for p in list(self.ring.after(start)):
            if p.wall > limit or clip.done:
                break
            self._write(clip, p)
        if clip.end is not None and newest > clip.end and not clip.done:
            self._finish(clip)

    def _write(self, clip: Clip, p: Packet) -> None:
        if clip.next_seq is None and not p.key:
            return  # waiting for a keyframe to start on
        if p.wall < clip.start and not p.key and not clip.written:
            return
        was_done = clip.done
        try:
            clip.write(p)
        except Exception as e:  # disk full, unwritable media dir: this clip is lost
            log.error("%s: clip of event %s failed: %s", self.stream_id, clip.event_id, e)
            self._abandon(clip)
            return
        if clip.done and not was_done:  # the cap: this clip stops, the event goes on
            self._report(clip)

    def _abandon(self, clip: Clip) -> None:
        clip.done = True
        with contextlib.suppress(Exception):
            if clip._out is not None:
                clip._out.close()
        clip.path.unlink(missing_ok=True)

    def _finish(self, clip: Clip) -> None:
        try:
            clip.finish()
        except Exception as e:
            log.error("%s: clip of event %s failed: %s", self.stream_id, clip.event_id, e)
            self._abandon(clip)
            return
        self._report(clip)

    def _report(self, clip: Clip) -> None:
        if not clip.written:
            return
        try:
            nbytes = clip.path.stat().st_size
        except OSError:
            return  # the event and its files were deleted meanwhile
        self.on_done(clip.event_id, clip.path, nbytes, clip.truncated)

    def _open_clips(self) -> list[Clip]:
        self.clips = {k: c for k, c in self.clips.items() if not c.done}
        return list(self.clips.values())

    def _finish_stale(self) -> None:
        """An ended clip whose end no later frame confirms (the stream stalled) finishes."""
        now = time.monotonic()
        for clip in self._open_clips():
            if clip.end is not None and now - clip.ended_at >= END_WAIT_S:
                self._catch_up(clip, clip.end)
                if not clip.done:
                    self._finish(clip)

    def _finish_all(self) -> None:
        """Closing (the stream goes, the service stops): every clip with what the ring has."""
        for clip in self._open_clips():
            try:
                clip.hold_s = 0.0
                if clip.end is None:
                    clip.end = self._newest
                self._catch_up(clip, clip.end)
                if not clip.done:
                    self._finish(clip)
            except Exception:
                log.exception("%s: finishing the clip of %s failed", self.stream_id,
                              clip.event_id)  # fmt: skip
        self.clips = {}
        self._enc = None
        with self._cond:
            self.ring.clear()


class SinkHost(Protocol):
    """Where a stream's sinks are registered (render.StreamView)."""

    def add_sink(self, sink: Any) -> None: ...

    def remove_sink(self, sink: Any) -> None: ...


class ClipSet:
    """The clip recorders of the streams with `record_clips: true`, fed the events' changes."""

    def __init__(self, cfg: ClipsConfig, path_for: Callable[[str], Path], on_done: ClipDone):
        self.cfg, self.path_for, self.on_done = cfg, path_for, on_done
        self._recs: dict[str, tuple[ClipRecorder, SinkHost]] = {}
        self._clear: dict[str, dict[tuple[str, str], float]] = {}  # stream -> rule -> clear_s
        self._lock = threading.Lock()

    def record(self, stream: str, host: SinkHost | None, zones: Sequence[ZoneConfig]) -> None:
        """Record the stream's events (host: its sinks) or, with host None, stop: open clips
        are finished with what they have."""
        with self._lock:
            entry = self._recs.get(stream)
            replace = entry is not None and (host is None or entry[1] is not host)
            if replace or host is None:
                self._recs.pop(stream, None)  # off, or a new stream of the same id
            if host is None:
                self._clear.pop(stream, None)
            else:
                self._clear[stream] = {
                    (z.name, r.class_name): r.clear_s for z in zones for r in z.rules
                }
        window = max((r.for_s for z in zones for r in z.rules), default=0.0)
        if entry is not None and replace:
            entry[1].remove_sink(entry[0])
            entry[0].close()
            entry = None
        if host is None:
            return
        if entry is not None:
            entry[0].set_window(window)
            return
        rec = ClipRecorder(stream, self.cfg, self.path_for, self.on_done, window)
        rec.start()
        with self._lock:
            self._recs[stream] = (rec, host)
        host.add_sink(rec)

    def changes(self, changes: Sequence[Change]) -> None:
        """New events open a clip, ended ones finish theirs (never blocks)."""
        for ch in changes:
            ev = ch.after
            with self._lock:
                entry = self._recs.get(ev.stream)
                clear = self._clear.get(ev.stream, {}).get((ev.zone, ev.class_name), 0.0)
            if entry is None:
                continue
            if ch.type == "new":
                entry[0].open(ev.id, ev.start, clear)
            elif ch.type == "end":
                entry[0].end(ev.id, ev.end if ev.end is not None else ev.peak_at)

    def close(self) -> None:
        """Stop every recorder (blocking: each finishes its open clips)."""
        with self._lock:
            recs, self._recs = list(self._recs.values()), {}
        for rec, host in recs:
            host.remove_sink(rec)
            rec.close()
