"""Source stage: one reader thread per stream puts decoded BGR frames into a latest-wins slot.

A per-stream watchdog thread (the supervisor) owns the state machine:

    starting -> live <-> reconnecting -> error (max_failures)      any -> stopped

It starts a reader thread per connection attempt and gives up on an attempt when the reader
reports a failure, when opening takes longer than open_timeout (+ grace) or when no frame
arrives for stall_timeout. It never waits on a library timeout alone: a reader stuck in a
blocking call is abandoned (daemon thread) and a fresh one is started. Every reader carries
a generation number and may only publish while it is the current one, so an abandoned
reader can never publish a frame after it has been replaced or the source has stopped.

Readers: OpenCV's FFmpeg backend (default), PyAV, or GStreamer (`gst`, through PyGObject, the
low-delay RTSP path), behind one open/grab/retrieve/close interface. Every frame of the source
is decoded (`grab`), but only a frame somebody will use is converted to BGR (`retrieve`): the
source asks its `wanted` callable (the service passes the scheduler's `due_soon`), so a camera
whose frames are mostly skipped costs its decode and little else. A frame decoded and not
converted is counted as `unconverted`; it never reaches the slot. Readers that can convert on
another thread later (PyAV, GStreamer: `deferred`) store the decoded picture instead, and the
conversion runs when the frame is first used: a stored frame that a newer one overwrites
before the scheduler takes it (an uncapped camera faster than the model) is never converted.
"""

from __future__ import annotations

import os

# OpenCV serialises every FFmpeg open behind one process-wide mutex unless told that FFmpeg
# is thread-safe (it is, since FFmpeg 4). Without this, one stream stuck opening an
# unreachable camera (up to open_timeout) would hold up every other stream's reconnect.
# Set here, before any module of the package imports cv2.
os.environ.setdefault("OPENCV_FFMPEG_IS_THREAD_SAFE", "1")

import cv2

if "OPENCV_LOG_LEVEL" not in os.environ:
    # The thread-safe mode logs a warning on every open; our own reasons say more.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

from segstream.stream.sources.gstreamer import GST_HOWTO, gst_unavailable
from segstream.stream.sources.i420 import i420_to_bgr
from segstream.stream.sources.readers import (
    READERS,
    Deferred,
    GstReader,
    OpenCVReader,
    PyAVReader,
    Reader,
    reader_class,
)
from segstream.stream.sources.slot import FrameSlot
from segstream.stream.sources.supervisor import SourceStats, VideoSource
from segstream.stream.sources.target import SourceError, Target, parse_target

__all__ = [
    "GST_HOWTO",
    "READERS",
    "Deferred",
    "FrameSlot",
    "GstReader",
    "OpenCVReader",
    "PyAVReader",
    "Reader",
    "SourceError",
    "SourceStats",
    "Target",
    "VideoSource",
    "gst_unavailable",
    "i420_to_bgr",
    "parse_target",
    "reader_class",
]
