"""Re-stream sink: publish a stream's annotated frames as H.264 over RTSP (ANNOUNCE/RECORD, the
publishing MediaMTX and go2rtc accept).

    render thread --put()--> one-slot box (newest wins) --> encoder thread --> RTSP server

`put` copies the frame into the box and returns: it never waits on the encoder or the network,
and a frame the encoder has not taken yet is overwritten (counted as dropped). One thread per
sink does the rest: it encodes each new frame as it comes (the stream's output rate) with PyAV
(NVENC when asked for or when it opens, else libx264: zerolatency, an IDR frame every second,
pts from the wall clock), sends the last frame again after a second without a new one (so
receivers and media servers never time the session out), and publishes over RTSP with TCP
interleaving.

The RTSP client is a small one here, on Python sockets, not FFmpeg's rtsp muxer: the muxer
connects and negotiates inside avformat_write_header, which PyAV calls holding the GIL, so a
server that accepts and then stalls froze the whole process (render threads and the event loop)
for the full I/O timeout. Python's socket calls release the GIL, their timeouts are ours, and
close() can shut the socket down to wake a thread blocked in one.

    starting -> live <-> reconnecting         error (no encoder opens)         any -> stopped

A failed connect or write (server down, restarted, refusing) closes the session and retries
with capped exponential backoff and jitter; a new frame size starts a new session. The URL may
carry credentials: reasons and log lines never contain it unsanitised."""

from __future__ import annotations

from segstream.stream.restream.encoder import EncoderUnavailable, open_encoder
from segstream.stream.restream.rtp import h264_sdp, interleave, rtp_packets, split_annexb
from segstream.stream.restream.rtsp import RtspError, RtspPublisher
from segstream.stream.restream.sink import RestreamSink

__all__ = [
    "EncoderUnavailable",
    "RestreamSink",
    "RtspError",
    "RtspPublisher",
    "h264_sdp",
    "interleave",
    "open_encoder",
    "rtp_packets",
    "split_annexb",
]
