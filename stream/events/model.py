"""Event objects and the changes that the rules emit and the store, the outbox and the alert
targets carry."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from segstream.stream.events.config import ChangeType

EndReason = Literal["cleared", "stream_removed", "zone_removed", "shutdown", "restart"]
END_REASONS: tuple[EndReason, ...] = (
    "cleared",
    "stream_removed",
    "zone_removed",
    "shutdown",
    "restart",
)


def new_id() -> str:
    return uuid.uuid4().hex


def iso(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    id: str
    stream: str
    zone: str
    class_name: str
    start: float  # epoch seconds: the first frame above the threshold
    peak_coverage: float
    peak_at: float
    end: float | None = None  # the first frame of the quiet period that closed it
    end_reason: EndReason | None = None
    # The clip, once it is finished (the store's; the rules' events have none).
    clip_bytes: int | None = None
    clip_truncated: bool = False

    def replace(self, **changes: Any) -> Event:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The API's and the alerts' JSON form (times as ISO 8601 UTC)."""
        return {
            "id": self.id,
            "stream": self.stream,
            "zone": self.zone,
            "class": self.class_name,
            "start": iso(self.start),
            "end": iso(self.end),
            "peak_coverage": round(self.peak_coverage, 6),
            "peak_at": iso(self.peak_at),
            "end_reason": self.end_reason,
            "snapshot_url": f"/api/events/{self.id}/snapshot.jpg",
            "mask_url": f"/api/events/{self.id}/mask.png",
            "clip_url": None if self.clip_bytes is None else f"/api/events/{self.id}/clip.mp4",
            "clip_truncated": self.clip_truncated,
        }


@dataclass(frozen=True)
class Change:
    """One change of an event: new (before is None), update (peak grew) or end."""

    type: ChangeType
    before: Event | None
    after: Event

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "before": None if self.before is None else self.before.to_dict(),
            "after": self.after.to_dict(),
        }
