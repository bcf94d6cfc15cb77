"""The persistent stream set: one JSON file, replaced atomically on every change.

A write goes to a temporary file in the same directory, is flushed and fsync'd, renamed over
the old file, and the directory is fsync'd: at any moment (kill -9, power loss) the file is
either the old set or the new one, never a mix. Callers write before they acknowledge a
change, so nothing acknowledged is lost."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from segstream.stream.config import ConfigError, StreamConfig

FORMAT_VERSION = 1


class StreamStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # one writer at a time within this process

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> list[StreamConfig]:
        """The stored set. Raises ConfigError when the file is unreadable or invalid (the
        operator must look: starting with an empty set would drop their cameras)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"state file {self.path}: cannot read: {e}") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"state file {self.path}: not a segstream state file (version {FORMAT_VERSION})"
            )
        out = []
        for i, item in enumerate(data.get("streams", [])):
            try:
                out.append(StreamConfig.model_validate(item))
            except ValidationError as e:
                first = e.errors()[0]
                key = ".".join(str(p) for p in first["loc"])
                raise ConfigError(
                    f"state file {self.path}: streams[{i}].{key}: {first['msg']}"
                ) from None
        return out

    def save(self, streams: list[StreamConfig]) -> None:
        doc: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "streams": [
                s.model_dump(mode="json", exclude_defaults=True) | {"id": s.id, "source": s.source}
                for s in streams
            ],
        }
        data = (json.dumps(doc, indent=2) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)  # camera URLs may carry credentials
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
