"""What a configured `source` string names: one parser for the config check, the API's source
policy, the reader's target and the `sample:` resolver."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

SourceKind = Literal["sample", "file", "device", "network"]


@dataclass(frozen=True, slots=True)
class SourceRef:
    kind: SourceKind
    location: str  # the sample's name, a file or device path, or the URL
    scheme: str | None  # as written, lower case ("sample", "rtsp", "file"); None: a bare path
    device: int | None = None  # /dev/videoN's N

    @property
    def path(self) -> str:
        """A file's or a device's path (the API's allow_local check)."""
        return self.location


def parse_source(source: str) -> SourceRef:
    """`sample:NAME`, a device (`0`, `/dev/video0`), `file://` or a URL, else a file path."""
    if source.startswith("sample:"):
        return SourceRef("sample", source.split(":", 1)[1], "sample")
    if source.isdigit():
        return SourceRef("device", f"/dev/video{source}", None, int(source))
    m = re.fullmatch(r"/dev/video(\d+)", source)
    if m:
        return SourceRef("device", source, None, int(m.group(1)))
    if source.startswith("/dev/"):
        return SourceRef("device", source, None)
    if "://" in source:
        scheme = source.split("://", 1)[0].lower()
        if scheme == "file":
            return SourceRef("file", urlsplit(source).path, "file")
        return SourceRef("network", source, scheme)
    return SourceRef("file", str(Path(source).expanduser()), None)
