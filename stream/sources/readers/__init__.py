"""The readers, by the name a stream's `reader` setting gives. Adding a reader: a module here
with a `Reader` subclass, and its line in READERS (and in StreamConfig.reader's choices)."""

from __future__ import annotations

from segstream.stream.sources.gstreamer import gst_unavailable
from segstream.stream.sources.readers.base import Deferred, Reader
from segstream.stream.sources.readers.gst import GstReader
from segstream.stream.sources.readers.opencv import OpenCVReader
from segstream.stream.sources.readers.pyav import PyAVReader
from segstream.stream.sources.target import Target

READERS: dict[str, type[Reader]] = {"opencv": OpenCVReader, "pyav": PyAVReader, "gst": GstReader}


def reader_class(name: str, target: Target) -> type[Reader]:
    """The reader a stream's `reader` setting means for this target. `auto`: gst for RTSP
    when GStreamer and PyGObject are installed (the low-delay path), else opencv."""
    if name == "auto":
        rtsp = target.scheme in ("rtsp", "rtsps")
        return GstReader if rtsp and gst_unavailable() is None else OpenCVReader
    return READERS[name]


__all__ = [
    "READERS",
    "Deferred",
    "GstReader",
    "OpenCVReader",
    "PyAVReader",
    "Reader",
    "reader_class",
]
