"""The H.264 encoder of the re-stream: which one (NVENC where it opens, else libx264) and its
low-latency settings."""

from __future__ import annotations

import logging
import threading
from fractions import Fraction
from typing import cast

import av
from av.video.codeccontext import VideoCodecContext

from segstream.models.runtime.backends import nvidia_present

log = logging.getLogger(__name__)

KEYFRAME_S = 1.0  # an IDR frame this often (a receiver joining waits at most this long)
TIME_BASE = Fraction(1, 90000)  # RTP's video clock
HW_ENCODERS = ("h264_nvenc",)
# Hardware encoders that failed to open in this process: `auto` stops trying them.
_hw_unusable: set[str] = set()
_hw_lock = threading.Lock()


class EncoderUnavailable(RuntimeError):
    """The configured encoder cannot open here (retrying will not help)."""


def _encoder_options(name: str, preset: str, bitrate_kbps: int) -> dict[str, str]:
    rate = str(bitrate_kbps * 1000)
    # No B-frames; IDR frames are forced by time (KEYFRAME_S), g is only a ceiling. Without a
    # global header both encoders repeat SPS/PPS in-band before every IDR.
    common = {"bf": "0", "g": "600", "forced-idr": "1", "maxrate": rate, "bufsize": rate}
    if name == "h264_nvenc":
        return {**common, "preset": "p1", "tune": "ull", "zerolatency": "1", "rc": "cbr"}
    return {**common, "preset": preset, "tune": "zerolatency"}


def _candidates(choice: str) -> list[str]:
    """Encoders to try in order. `auto` tries NVENC only where an NVIDIA driver is loaded:
    PyAV opens a codec holding the GIL, and NVENC's open starts CUDA."""
    if choice != "auto":
        return [choice]
    with _hw_lock:
        hw = [e for e in HW_ENCODERS if e in av.codecs_available and e not in _hw_unusable]
    return [*hw, "libx264"] if hw and nvidia_present() else ["libx264"]


def open_encoder(
    choice: str, width: int, height: int, fps: float, bitrate_kbps: int, preset: str
) -> VideoCodecContext:
    """The first H.264 encoder that opens: under `auto` a hardware one, then libx264."""
    errors = []
    for name in _candidates(choice):
        ctx = cast(VideoCodecContext, av.CodecContext.create(name, "w"))
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base = TIME_BASE
        ctx.framerate = Fraction(round(max(fps, 1.0) * 1000), 1000)  # rate control's guess
        ctx.bit_rate = bitrate_kbps * 1000
        ctx.thread_count = 1  # one core per stream at most; all its CPU in the sink's thread
        ctx.color_range = 1  # limited ("tv"): what cv2's BGR->I420 (BT.601) produces
        ctx.colorspace = 6  # SMPTE 170M (BT.601)
        ctx.options = _encoder_options(name, preset, bitrate_kbps)
        try:
            ctx.open()
        except Exception as e:
            errors.append(f"{name}: {e}")
            if name in HW_ENCODERS and choice == "auto":
                log.info("%s does not open here (%s); using libx264", name, e)
                with _hw_lock:
                    _hw_unusable.add(name)
            continue
        return ctx
    raise EncoderUnavailable("no H.264 encoder opens: " + "; ".join(errors))
