"""What a stream's reader opens (a file, a device or a URL), and why an open failed."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from segstream.stream.sourceref import parse_source

_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443, "rtmp": 1935}


class SourceError(Exception):
    """A failure of one connection attempt, worded for the operator (becomes `reason`).

    `permanent`: trying again cannot help (a local file that is missing or holds no video),
    so the stream goes to `error` instead of reconnecting."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "file" | "device" | "network"
    url: str  # what the library opens: a path, a URL or a device path
    scheme: str  # "file", "v4l2", "rtsp", "http", ...
    device: int | None = None

    @property
    def live(self) -> bool:
        """A live source has no natural end: EOF there is a failure, not the end."""
        return self.kind != "file"


def parse_target(source: str, resolve: Callable[[str], str] | None = None) -> Target:
    """Map a configured source to what the readers open. Raises SourceError."""
    ref = parse_source(source)
    if ref.kind == "sample":
        if resolve is None:
            raise SourceError(f"{source}: no resolver for sample: sources")
        try:
            ref = parse_source(resolve(source))
        except Exception as e:
            raise SourceError(f"cannot resolve {source}: {e}") from None
    if ref.kind == "device":
        return Target("device", ref.location, "v4l2", ref.device)
    if ref.kind == "network":
        return Target("network", ref.location, ref.scheme or "")
    if ref.kind == "sample":  # a resolver that answers with another sample: name
        raise SourceError(f"cannot resolve {source}: resolved to another sample")
    return Target("file", ref.location, "file")


def network_reason(url: str, timeout: float) -> str:
    """OpenCV only says "not opened": find out what a plain TCP connect says about the peer."""
    u = urlsplit(url)
    try:
        port = u.port or _DEFAULT_PORTS.get(u.scheme.lower())
    except ValueError:
        return "invalid port in URL"
    if not u.hostname or not port:
        return "could not open the stream"
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except socket.gaierror:
        return f"cannot resolve host {u.hostname!r}"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return "connection timed out"
    except OSError as e:
        return e.strerror or str(e)
    return "server reachable but no video could be opened (wrong path, auth or format?)"


def file_reason(path: str) -> str:
    p = Path(path)
    if not p.exists():
        return "no such file"
    if not p.is_file():
        return "not a file"
    if not os.access(p, os.R_OK):
        return "permission denied"
    return "no decodable video stream (unsupported format or codec?)"
