"""H.264 over RTP (RFC 6184): Annex-B access units as RTP packets, TCP-interleaved, and the
SDP that announces them."""

from __future__ import annotations

import base64
import re
import struct

RTP_PAYLOAD = 1400  # bytes of NAL data per RTP packet (larger NAL units are split, FU-A)

_START_CODE = re.compile(b"\x00\x00\x01")


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex-B byte stream (start codes removed)."""
    starts = [m.end() for m in _START_CODE.finditer(data)]
    nals = []
    for i, s in enumerate(starts):
        e = starts[i + 1] - 3 if i + 1 < len(starts) else len(data)
        nal = data[s:e].rstrip(b"\x00") if i + 1 < len(starts) else data[s:e]
        if nal:
            nals.append(nal)
    return nals


def rtp_packets(
    nals: list[bytes], ts: int, seq: int, ssrc: int, pt: int = 96, size: int = RTP_PAYLOAD
) -> tuple[list[bytes], int]:
    """One access unit as RTP packets (single NAL units, or FU-A fragments of large ones);
    the marker bit is on the AU's last packet. Returns the packets and the next sequence."""
    out: list[bytes] = []
    payloads: list[bytes] = []
    for nal in nals:
        if len(nal) <= size:
            payloads.append(nal)
            continue
        indicator = (nal[0] & 0xE0) | 28
        kind = nal[0] & 0x1F
        body = memoryview(nal)[1:]
        for off in range(0, len(body), size):
            head = kind | (0x80 if off == 0 else 0) | (0x40 if off + size >= len(body) else 0)
            payloads.append(bytes((indicator, head)) + body[off : off + size])
    for i, payload in enumerate(payloads):
        marker = 0x80 if i == len(payloads) - 1 else 0
        header = struct.pack("!BBHII", 0x80, marker | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
        out.append(header + payload)
        seq += 1
    return out, seq


def interleave(packets: list[bytes], channel: int = 0) -> bytes:
    """RTP packets framed for RTSP over TCP ($, channel, length)."""
    return b"".join(struct.pack("!cBH", b"$", channel, len(p)) + p for p in packets)


def h264_sdp(sps: bytes, pps: bytes, host: str) -> str:
    sets = ",".join(base64.b64encode(x).decode() for x in (sps, pps))
    return (
        "v=0\r\n"
        f"o=- 0 0 IN IP4 {host}\r\n"
        "s=segstream\r\n"
        "c=IN IP4 0.0.0.0\r\n"
        "t=0 0\r\n"
        "m=video 0 RTP/AVP 96\r\n"
        "a=rtpmap:96 H264/90000\r\n"
        f"a=fmtp:96 packetization-mode=1; sprop-parameter-sets={sets}; "
        f"profile-level-id={sps[1:4].hex().upper()}\r\n"
        "a=control:streamid=0\r\n"
    )
