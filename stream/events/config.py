"""Configuration of zones, rules, the event store and the alert targets.

These models are meant to be embedded in the service config (`StreamConfig.zones`,
`AppConfig.events/mqtt/webhooks`); they forbid unknown keys like the rest of it, so a
validation error names the key path (`streams.0.zones.1.polygon`)."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# Zone names and class names become MQTT topic levels and Home Assistant ids: no / + # or spaces.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ChangeType = Literal["new", "update", "end"]
CHANGE_TYPES: tuple[ChangeType, ...] = ("new", "update", "end")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RuleConfig(_Strict):
    """Open an event when `class` covers more than `above` of the zone for `for_s` seconds;
    close it when it stays at or below `above` for `clear_s` seconds."""

    class_name: str = Field(alias="class", min_length=1, max_length=64)
    above: float = Field(gt=0, lt=1, description="Coverage fraction of the zone (0..1).")
    for_s: float = Field(1.0, ge=0, le=3600)
    clear_s: float = Field(3.0, ge=0, le=3600)


def _unique_classes(rules: list[RuleConfig]) -> list[RuleConfig]:
    seen = [r.class_name for r in rules]
    dup = sorted({c for c in seen if seen.count(c) > 1})
    if dup:
        raise ValueError(f"one rule per class in a zone; repeated: {', '.join(dup)}")
    return rules


Point = tuple[float, float]


class ZoneConfig(_Strict):
    """A named polygon in normalised image coordinates (x right, y down, both 0..1), so it
    survives a change of resolution."""

    name: str = Field(max_length=64, json_schema_extra={"pattern": NAME_RE.pattern})
    polygon: list[Point] = Field(min_length=3, max_length=64)
    rules: Annotated[list[RuleConfig], AfterValidator(_unique_classes)] = Field(
        default_factory=list, max_length=32
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("zone name must be 1-64 characters of letters, digits, _ . -")
        return v

    @field_validator("polygon")
    @classmethod
    def _valid_polygon(cls, v: list[Point]) -> list[Point]:
        for i, (x, y) in enumerate(v):
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise ValueError(f"point {i} ({x}, {y}) is outside 0..1")
        if (pair := _self_intersection(v)) is not None:
            raise ValueError(f"polygon is self-intersecting (edges {pair[0]} and {pair[1]})")
        if _area2(v) == 0.0:  # a simple polygon has area; kept as a guard
            raise ValueError("polygon has no area")
        return v


def _unique_zone_names(zones: list[ZoneConfig]) -> list[ZoneConfig]:
    names = [z.name for z in zones]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"zone names must be unique; repeated: {', '.join(dup)}")
    return zones


# The type of a stream's `zones:` list (unique names checked on the list, so the error's
# path is `...zones`).
Zones = Annotated[list[ZoneConfig], AfterValidator(_unique_zone_names), Field(max_length=32)]


def _area2(p: list[Point]) -> float:
    return sum(p[i][0] * p[i - 1][1] - p[i - 1][0] * p[i][1] for i in range(len(p)))


def _orient(a: Point, b: Point, c: Point) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _on_segment(a: Point, b: Point, c: Point) -> bool:
    return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])


def _segments_touch(a: Point, b: Point, c: Point, d: Point) -> bool:
    o1, o2, o3, o4 = _orient(a, b, c), _orient(a, b, d), _orient(c, d, a), _orient(c, d, b)
    if ((o1 > 0) != (o2 > 0)) and ((o3 > 0) != (o4 > 0)) and 0 not in (o1, o2, o3, o4):
        return True
    return (
        (o1 == 0 and _on_segment(a, b, c))
        or (o2 == 0 and _on_segment(a, b, d))
        or (o3 == 0 and _on_segment(c, d, a))
        or (o4 == 0 and _on_segment(c, d, b))
    )


def _self_intersection(p: list[Point]) -> tuple[int, int] | None:
    """The first pair of non-adjacent edges that touch (edge i runs from point i to i+1);
    adjacent edges share a point by construction, so they only count when they overlap."""
    n = len(p)
    edges = [(p[i], p[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            adjacent = j == i + 1 or (i == 0 and j == n - 1)
            a, b = edges[i]
            c, d = edges[j]
            if adjacent:
                # Sharing one end is fine; folding back along the other edge is not.
                shared = b if j == i + 1 else a
                other = d if j == i + 1 else c
                far = a if j == i + 1 else b
                if _orient(far, shared, other) == 0 and (
                    _on_segment(far, shared, other) or _on_segment(shared, other, far)
                ):
                    return (i, j)
                continue
            if _segments_touch(a, b, c, d):
                return (i, j)
    return None


class ClipsConfig(_Strict):
    """Event clips of the streams with `record_clips: true`: H.264 MP4 of the pictures the
    viewers see (redacted where privacy is on), from pre_roll_s before an event's start to
    its end, at most max_s long."""

    pre_roll_s: float = Field(3.0, ge=0, le=30, description="Seconds before the start.")
    max_s: float = Field(
        60.0, gt=0, le=3600, description="Longest clip; a longer event's clip stops there."
    )
    bitrate: int = Field(1500, ge=100, le=100_000, description="kbit/s")
    encoder: Literal["auto", "libx264", "h264_nvenc"] = Field(
        "auto", description="As the re-stream's: NVENC where it opens, else libx264."
    )
    buffer_frames: int = Field(
        900, ge=10, le=100_000, description="Encoded frames a stream's pre-roll buffer holds."
    )
    buffer_bytes: int = Field(
        32 << 20, ge=1 << 20, le=1 << 32, description="Bytes a stream's pre-roll buffer holds."
    )
    max_open: int = Field(
        8, ge=1, le=64, description="Clips one stream records at once; more events get none."
    )


class EventsConfig(_Strict):
    database: str | None = Field(
        None,
        description="SQLAlchemy URL of the event store (sqlite:///path or "
        "postgresql://user:pass@host/db); null = SQLite at $SEGSTREAM_HOME/events.db.",
    )
    media_dir: str | None = Field(
        None,
        description="Folder of the peak-frame JPEG and mask PNG files; null = beside the "
        "SQLite file (events-media/), or $SEGSTREAM_HOME/events-media for PostgreSQL.",
    )
    retain_days: float = Field(30.0, gt=0, description="Closed events older than this go.")
    max_bytes: int = Field(
        1 << 30, ge=0, description="Media bytes kept at most; oldest closed events go first."
    )
    prune_interval_s: float = Field(60.0, gt=0, le=86400)
    outbox_max: int = Field(
        10_000, ge=10, description="Undelivered changes kept; beyond it the oldest are dropped."
    )
    update_interval_s: float = Field(
        1.0, gt=0, description="Least time between `update` changes of one event."
    )
    clips: ClipsConfig = Field(
        ClipsConfig(),
        description="Event clips ({pre_roll_s, max_s, bitrate, encoder, buffer_frames, "
        "buffer_bytes, max_open}) of the streams with record_clips: true.",
    )

    @field_validator("database")
    @classmethod
    def _valid_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme.split("+")[0] not in ("sqlite", "postgresql"):
            # The URL is not quoted: it may hold a password.
            raise ValueError("database must be a sqlite:/// or postgresql:// URL")
        return v


class MqttConfig(_Strict):
    url: str = Field(description="mqtt://host:1883 or mqtts://host:8883 (user:pass@ optional).")
    topic_prefix: str = Field("segstream", pattern=r"^[A-Za-z0-9_./-]{1,64}$")
    client_id: str | None = Field(None, max_length=64)
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    homeassistant: bool = False
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_./-]{1,64}$")
    coverage_interval_s: float = Field(
        1.0, gt=0, description="Least time between two coverage messages of one topic."
    )
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_max_s: float = Field(10.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError("url must be mqtt://host[:port] or mqtts://host[:port]")
        try:
            u.port  # noqa: B018 (raises for a port out of range)
        except ValueError:
            raise ValueError("url has an invalid port") from None
        return v


class WebhookConfig(_Strict):
    url: str = Field(max_length=2048)
    secret: str = Field(min_length=1, description="HMAC-SHA256 key of X-Segstream-Signature.")
    events: list[ChangeType] = Field(default_factory=lambda: list(CHANGE_TYPES))
    timeout_s: float = Field(10.0, gt=0, le=300)
    backoff_initial_s: float = Field(1.0, gt=0, le=60)
    backoff_max_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("url must be an http:// or https:// URL")
        return v
