"""GStreamer bootstrap: PyGObject and the elements the gst reader needs, initialised once."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Any

GST_HOWTO = (
    "install GStreamer and PyGObject: scripts/install_system_deps.sh gst, then "
    "pip install 'segstream[gst]'"
)
_GST_ELEMENTS = ("rtspsrc", "decodebin", "uridecodebin", "videoconvert", "appsink", "avdec_h264")
_gst_lock = threading.Lock()
_gst: dict[str, Any] = {}  # "Gst": the initialised module, or "why": why it is unavailable


def load_gst() -> Any:
    """The Gst module, initialised once; None when GStreamer or PyGObject is missing."""
    with _gst_lock:
        if not _gst:
            _unwinder_first()
            try:
                import gi

                gi.require_version("Gst", "1.0")
                gi.require_version("GstApp", "1.0")  # appsink's pull API
                gi.require_version("GstVideo", "1.0")  # frame layouts
                from gi.repository import Gst, GstApp, GstVideo  # noqa: F401

                Gst.init(None)
            except (ImportError, ValueError) as e:
                _gst["why"] = f"{type(e).__name__}: {e}; {GST_HOWTO}"
                return None
            missing = [e for e in _GST_ELEMENTS if Gst.ElementFactory.find(e) is None]
            if missing:
                _gst["why"] = f"GStreamer elements missing: {', '.join(missing)}; {GST_HOWTO}"
            else:
                _gst["Gst"] = Gst
        return _gst.get("Gst")


def _unwinder_first() -> None:
    """libgcc_s into the global symbol scope before GStreamer: GObject's module loader opens
    libgstreamer globally, and with it Debian's libunwind, whose `_Unwind_Resume` would then
    unwind every later C++ exception in the process (TensorFlow's and matplotlib's throw
    routinely) and abort it (measured: a gst reader, then a Keras model: SIGABRT in
    __gxx_personality_v0 via libunwind.so.8)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libgcc_s.so.1", mode=ctypes.RTLD_GLOBAL)


def gst_unavailable() -> str | None:
    """None when the gst reader can run here, else why not."""
    load_gst()
    return _gst.get("why")
