"""Request and response models of the HTTP API. The handlers validate requests and build
responses with these same models, and /openapi.json is generated from them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import NodeState, SourceState, StreamState


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(_Out):
    loc: str = Field(description="Key path of the offending value, e.g. `infer_fps`.")
    msg: str


class Error(_Out):
    error: str = Field(description="What went wrong, for a person.")
    details: list[FieldError] | None = None
    state: StreamState | None = None
    reason: str | None = None


class Latency(_Out):
    p50: float | None = Field(description="Median end-to-end latency, ms.")
    p95: float | None


class RestreamStatus(_Out):
    url: str = Field(description="Where the annotated H.264 goes, without credentials.")
    state: SourceState
    reason: str | None
    encoder: str | None
    frames: int
    bytes: int
    errors: int
    dropped: int
    sessions: int
    fps_in: float
    cpu_s: float


class ZoneStatus(_Out):
    name: str
    polygon: list[tuple[float, float]] = Field(description="Normalised 0..1 (x right, y down).")
    rules: list[dict[str, Any]] = Field(description="Its rules, as configured.")
    coverage: dict[str, float] = Field(
        description="Share of the zone's pixels each class covers in the newest mask (classes "
        "that occur, plus those named in its rules)."
    )
    active: list[str] = Field(description="Classes with an open event in the zone.")


class StreamStatus(_Out):
    id: str
    source: str = Field(description="The source URL without credentials.")
    reader: str
    output: str
    state: StreamState = Field(
        description="starting | live | reconnecting | error | stopped; in a "
        "cluster also moving (its node is lost or it is being moved), pending "
        "(no node has room) and unknown (its node does not answer)"
    )
    reason: str | None = Field(description="Why the stream is not live, if it is not.")
    width: int | None
    height: int | None
    fps_in: float
    fps_out: float
    inference_fps: float
    infer_fps_cap: float
    latency_ms: Latency
    captured: int
    dropped: int
    reconnects: int
    clients: int
    classes: dict[str, float] = Field(description="Largest classes in view, share of pixels.")
    restream: RestreamStatus | None = Field(None, description="The RTSP re-stream, if any.")
    zones: list[ZoneStatus] = Field(default_factory=list, description="Coverage of its zones.")
    sinks: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Status of each sink the stream's config turned on (stream.outputs), by name.",
    )
    node: str | None = Field(
        None,
        description="Cluster mode: the node that runs the stream "
        "(null while it has none); absent on a single node.",
    )

    @classmethod
    def idle(
        cls,
        *,
        id: str,
        source: str,
        reader: str,
        output: str,
        infer_fps: float,
        state: StreamState,
        reason: str | None,
        node: str | None = None,
    ) -> StreamStatus:
        """The status of a stream that runs nowhere (yet): its settings, no figures."""
        return cls(
            id=id,
            source=source,
            reader=reader,
            output=output,
            state=state,
            reason=reason,
            width=None,
            height=None,
            fps_in=0.0,
            fps_out=0.0,
            inference_fps=0.0,
            infer_fps_cap=float(infer_fps),
            latency_ms=Latency(p50=None, p95=None),
            captured=0,
            dropped=0,
            reconnects=0,
            clients=0,
            classes={},
            node=node,
        )


class StreamList(_Out):
    ready: bool
    streams: list[StreamStatus]


class NodeStatus(_Out):
    """A node service as the cluster controller knows it."""

    id: str = Field(description="Short Ray node id, the `node` of streams and metrics.")
    ray_id: str
    host: str
    port: int = Field(description="The node service's HTTP port (private network).")
    metrics_port: int = Field(description="Its unauthenticated /metrics port.")
    slots: float = Field(description="Declared capacity (the slots resource).")
    load: float = Field(description="Placed streams' cost as a share of the capacity.")
    streams: int
    state: NodeState
    ready: bool = Field(description="Model warm.")
    error: str | None


class NodeList(_Out):
    nodes: list[NodeStatus]


class SdGroup(_Out):
    targets: list[str]
    labels: dict[str, str]


def _optional(
    model: type[BaseModel], name: str, skip: set[str], extra: dict[str, Any] | None = None
) -> type[BaseModel]:
    """Every field of `model` optional and defaulting to unset (a partial update)."""
    fields: dict[str, Any] = dict(extra or {})
    for key, f in model.model_fields.items():
        if key in skip:
            continue
        fields[key] = (f.annotation | None, Field(None, description=f.description))  # type: ignore[operator]
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


def _deprecated(new: str, kind: type) -> Any:
    return (kind | None, Field(None, description=f"Deprecated: use {new}.", deprecated=True))


# A PATCH body: any subset of a stream's settings (its id cannot change). The flat restream_*
# keys of earlier versions are still taken (merged into `restream` with a warning, as in YAML).
StreamPatch = _optional(
    StreamConfig,
    "StreamPatch",
    {"id"},
    {
        "restream_encoder": _deprecated("restream.encoder", str),
        "restream_bitrate": _deprecated("restream.bitrate", int),
        "restream_preset": _deprecated("restream.preset", str),
    },
)


StreamId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class OverlayRequest(BaseModel):
    """How one viewer wants the large view drawn (others are unaffected)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["overlay", "mask", "off"] = Field(
        "overlay",
        description="overlay: colours over the camera picture; mask: the colours "
        "alone; off: the camera picture as it is.",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="Opacity of the colours (overlay).")
    classes: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=256, description="Colour only these class names; null = all."
    )


class LiveRequest(BaseModel):
    """A page's message on /ws; every key is optional and only the keys sent change."""

    model_config = ConfigDict(extra="forbid")
    watch: list[StreamId] | None = Field(
        None,
        description="Ids of the tiles in view: their "
        "frames come as binary messages, nothing else does.",
    )
    fps: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Most frames a second per tile (capped by page.max_tile_fps).",
    )
    focus: StreamId | None = Field(
        None, description="The stream of the large view; null closes it."
    )
    focus_fps: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Most frames a second of the large view (capped by page.max_focus_fps).",
    )
    overlay: OverlayRequest | None = Field(
        None, description="The large view's own overlay settings; null = the stream's own picture."
    )


class MosaicQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    streams: str | None = Field(
        None,
        max_length=70_000,
        description="Comma-separated stream "
        "ids, in order; absent: every stream (following additions and "
        "removals).",
    )
    cols: int | None = Field(None, ge=1, le=64, description="Columns; absent: a square-ish grid.")
    width: int | None = Field(
        None,
        ge=160,
        description="Width in pixels (at most mosaic.max_width); absent: mosaic.width.",
    )
    fps: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Most frames a second this "
        "client wants (the layout is composed at most mosaic.max_fps).",
    )


class ModelInfo(_Out):
    name: str
    backend: str
    mode: str | None = Field(None, description="How the model computes (e.g. int8-faithful).")
    input_size: list[int]
    batch_sizes: list[int]
    workers: int
    max_batch: int
    threads_per_worker: int | None
    labels: list[str]
    colors: list[str]


class EventsHealth(_Out):
    status: Literal["ok", "error"]
    reason: str | None = Field(None, description="Why events are off (the streams still play).")
    mqtt: Literal["connected", "disconnected"] | None = None


class Health(_Out):
    status: Literal["ok"]
    uptime_s: float
    events: EventsHealth | None = Field(None, description="The events feature (zones, store).")


class Ready(_Out):
    status: Literal["ready"]


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=512)


class Whoami(_Out):
    name: str
    role: str
    via: str


class ShareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600, description="Seconds the URL works.")
    kind: Literal["mjpeg", "snapshot"] = "mjpeg"


class ShareResponse(_Out):
    url: str = Field(description="Path with an expiry and signature; no token in it.")
    expires: int = Field(description="Unix time the URL stops working.")


class MaxStatus(_Out):
    status: str


class MaxLabel(_Out):
    id: int
    name: str


class MaxMetadata(_Out):
    id: str
    name: str
    description: str
    type: str
    license: str
    source: str


class MaxPrediction(_Out):
    status: Literal["ok"]
    image_size: list[int] = Field(description="[width, height] of the resized image.")
    seg_map: list[list[int]] = Field(description="Class id per pixel, one row per image row.")


class ImageUpload(BaseModel):
    """multipart/form-data with the image file in the field `image`."""

    image: bytes = Field(description="A JPEG, PNG, BMP, GIF, TIFF or WebP file.")


class Prediction(_Out):
    width: int
    height: int
    labels: list[str]
    mask: list[list[int]]
    classes: dict[str, float]


# -- events (zones, rules: stream.events) ----------------------------------------------------
class EventOut(_Out):
    """A coverage event: `class` covered more than a rule's share of `zone`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str
    stream: str
    zone: str
    class_name: str = Field(alias="class")
    start: str = Field(description="ISO 8601 UTC: the first frame above the threshold.")
    end: str | None = Field(description="ISO 8601 UTC; null while the event is open.")
    peak_coverage: float = Field(description="Largest share of the zone the class covered.")
    peak_at: str
    end_reason: Literal["cleared", "stream_removed", "zone_removed", "shutdown", "restart"] | None
    snapshot_url: str = Field(description="The annotated JPEG of the peak frame.")
    mask_url: str = Field(description="The class-mask PNG of the peak frame (value = class id).")
    clip_url: str | None = Field(
        None,
        description="The event's H.264 MP4 (record_clips), once finished; null: none (yet).",
    )
    clip_truncated: bool = Field(
        False, description="The clip stopped at events.clips.max_s before the event's end."
    )


class EventPage(_Out):
    events: list[EventOut] = Field(description="Newest first.")
    next: str | None = Field(description="Cursor of the next page; null on the last one.")


class EventQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    stream: StreamId | None = None
    zone: Annotated[str, Field(max_length=64)] | None = None
    class_name: Annotated[str, Field(max_length=64)] | None = Field(None, alias="class")
    since: datetime | None = Field(
        None, description="Events that started at or after (ISO 8601 or Unix seconds)."
    )
    until: datetime | None = Field(None, description="Events that started before.")
    limit: int = Field(50, ge=1, le=1000)
    cursor: Annotated[str, Field(max_length=512)] | None = Field(
        None, description="`next` of the previous page."
    )
