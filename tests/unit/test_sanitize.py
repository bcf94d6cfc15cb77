"""The one credential sanitiser: URLs in the API, reasons and logs never carry credentials."""

from __future__ import annotations

import io
import logging

import pytest

from segstream.stream.sanitize import install_log_filter, sanitize_text, sanitize_url


@pytest.mark.parametrize(
    ("url", "clean"),
    [
        ("rtsp://admin:password@cam.local/stream1", "rtsp://***@cam.local/stream1"),
        ("rtsp://admin@cam.local:554/live", "rtsp://***@cam.local:554/live"),  # user, no password
        ("rtsp://admin:p@ss:w@rd@10.0.0.7/live", "rtsp://***@10.0.0.7/live"),  # '@' and ':' in it
        ("rtsp://ad%40min:p%3As%2Fs@cam/x", "rtsp://***@cam/x"),  # percent-encoded
        ("rtsp://admin:pa/ss@cam/x", "rtsp://***@cam/x"),  # an unescaped '/' in the password
        ("rtsps://u:p@cam", "rtsps://***@cam"),
        (
            "http://cam/video.mjpg?user=admin&password=hunter2&fps=5",
            "http://cam/video.mjpg?user=admin&password=***&fps=5",
        ),
        (
            "http://cam/v?pwd=1&token=abc&auth=xyz&key=k&api_key=q&x=1",
            "http://cam/v?pwd=***&token=***&auth=***&key=***&api_key=***&x=1",
        ),
        ("https://u:p@cam/v?PassWord=X", "https://***@cam/v?PassWord=***"),
        ("rtsp://cam.local/stream1", "rtsp://cam.local/stream1"),  # nothing to hide
        ("http://cam/path/a@b", "http://cam/path/a@b"),  # '@' in a path is no credential
        ("/videos/door.mp4", "/videos/door.mp4"),
        ("0", "0"),
        ("sample:vtest", "sample:vtest"),
    ],
)
def test_sanitize_url(url: str, clean: str) -> None:
    assert sanitize_url(url) == clean


def test_urls_inside_messages() -> None:
    msg = (
        "cannot open rtsp://admin:s3cret@10.0.0.7:554/live?token=t0k: connection refused; "
        "also http://u:v@h/x"
    )
    out = sanitize_text(msg)
    assert "s3cret" not in out and "t0k" not in out and "u:v" not in out and "admin" not in out
    assert out.startswith("cannot open rtsp://***@10.0.0.7:554/live?token=***: connection")


def test_log_records_are_sanitised() -> None:
    log = logging.getLogger("segstream.test.sanitize")
    log.propagate = False
    out = io.StringIO()
    log.addHandler(logging.StreamHandler(out))
    install_log_filter(log)
    try:
        log.warning("opening %s", "rtsp://admin:s3cret@cam/live")
        try:
            raise ValueError("bad rtsp://admin:s3cret@cam/live")
        except ValueError:
            log.exception("failed")
    finally:
        log.handlers.clear()
    text = out.getvalue()
    assert "opening rtsp://***@cam/live" in text and "ValueError: bad rtsp://***@cam" in text
    assert "s3cret" not in text and "admin" not in text
