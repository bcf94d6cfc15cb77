"""Typed configuration: YAML file, then SEGSTREAM_<SECTION>__<KEY> env vars, then CLI flags.

Every model forbids unknown keys, so a typo stops start-up with a message naming the key.
The env overrides are parsed here (values as YAML scalars, nested with `__`) rather than by
pydantic-settings: the YAML < env < CLI merge needs one dict before validation anyway, and
one validation names the key path whichever layer set it."""

from __future__ import annotations

import logging
import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from segstream.stream.events.config import (
    EventsConfig,
    MqttConfig,
    WebhookConfig,
    ZoneConfig,
    Zones,
)
from segstream.stream.sourceref import parse_source

# configs/default.yaml, shipped inside the package (stream/default.yaml links to it), so an
# installed wheel finds it too.
DEFAULT_CONFIG = Path(str(resources.files("segstream.stream").joinpath("default.yaml")))
ENV_PREFIX = "SEGSTREAM_"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
log = logging.getLogger(__name__)
_SCHEMES = {"rtsp", "rtsps", "rtmp", "http", "https", "file", "udp", "tcp", "srt", "sample"}


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerConfig(_Strict):
    host: str = Field(
        "127.0.0.1",
        description="Listen address; anything but loopback needs authentication (a token).",
    )
    port: int = Field(8080, ge=0, le=65535)
    # Upper bound on a client's ?fps= and the default for clients that give none (0 = no cap).
    max_client_fps: float = Field(0.0, ge=0)
    shutdown_timeout: float = Field(2.0, gt=0)
    state_file: str | None = Field(
        None,
        description="Where the stream set is kept across restarts; null = "
        '$SEGSTREAM_HOME/state/<config name>-<path hash>.json; "" = not kept.',
    )
    header_timeout_s: float = Field(
        10.0,
        ge=0,
        description="A connection whose first request headers are not complete within this "
        "time gets 408 and is closed (0 = no limit).",
    )
    keepalive_timeout_s: float = Field(
        30.0,
        gt=0,
        description="An idle kept-alive connection, or one whose next request is not complete, "
        "is closed after this time.",
    )
    max_connections_per_client: int = Field(
        256,
        ge=0,
        description="Open connections one client address may hold; more get 503 and are closed "
        "at once (0 = no limit). A browser holds one per MJPEG <img> plus a few.",
    )


class AuthConfig(_Strict):
    tokens_dir: str | None = Field(
        None, description="Folder of tokens.json and secret.key; null = $SEGSTREAM_HOME/auth."
    )
    session_ttl_s: int = Field(12 * 3600, ge=60, description="Browser session lifetime.")
    cookie_secure: bool = Field(
        False,
        description="Mark the session cookie Secure (set it when a TLS proxy fronts the service).",
    )


class MetricsConfig(_Strict):
    listen: str | None = Field(
        None,
        description="host:port of a separate, unauthenticated /metrics listener for "
        "Prometheus (e.g. 127.0.0.1:9464); null = /metrics on the main port, with auth.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("listen must be host:port, e.g. 127.0.0.1:9464")
        return v


class SourcesConfig(_Strict):
    """What streams added over the API may open (the YAML config is the operator's own)."""

    allow_local: list[str] = Field(
        default_factory=list,
        description="Folders whose files (and device paths, e.g. /dev) "
        "the API may open; empty = no local files or devices.",
    )
    allow_networks: list[str] | None = Field(
        None,
        description="CIDRs that network sources may reach; null = any address except "
        "link-local (169.254.0.0/16, fe80::/10, cloud metadata).",
    )
    resolve_names: bool = Field(
        True,
        description="false: only IP-literal hosts; host names are refused without a DNS lookup.",
    )
    max_streams: int = Field(256, ge=1, description="Most streams the API lets exist.")


class PredictConfig(_Strict):
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest image (width x height) a "
        "prediction accepts, checked from the header before decoding.",
    )
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest upload.")
    max_concurrent: int = Field(2, ge=1, description="Predictions at once; more get 503.")


class ModelConfig(_Strict):
    name: str = "mnv2-voc"
    backend: Literal["auto", "keras", "tflite"] = "auto"
    weights: str | None = None  # fine-tuned weights from `segstream train` (keras backend)
    # Keras backend only: int8-faithful emulation of the uint8 file (same answers as tflite)
    # or the float rebuild; None = faithful for uint8 models, float for float files/fine-tunes.
    keras_mode: Literal["faithful", "float"] | None = None
    # Inference workers, each with its own copy of the model, pulling batches in parallel;
    # None = auto (runner.plan_workers: on CPU several single-threaded ones, 1 on a GPU).
    workers: int | None = Field(None, ge=1, le=64)
    threads: int | None = Field(None, ge=1)  # per worker; None = the cores split over workers
    # Fixed batch sizes the model is compiled/allocated for; batches are padded up to one.
    # None = auto: every size up to max_batch on CPU, powers of two on a GPU.
    batch_sizes: list[int] | None = None
    # Most frames (from different streams) in one inference call; None = auto: 1 on CPU (a batch
    # buys no throughput there, and a frame waits for its whole batch), 8 on a GPU.
    max_batch: int | None = Field(None, ge=1, le=256)
    max_wait_ms: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _batch_fits(self) -> ModelConfig:
        if self.batch_sizes is None:
            return self
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise ValueError("batch_sizes must be positive integers")
        if self.max_batch is not None and self.max_batch > max(self.batch_sizes):
            raise ValueError(f"max_batch {self.max_batch} exceeds largest batch size")
        return self


class SchedulerConfig(_Strict):
    # Keep each stream's p95 end-to-end latency under this by adapting frame skipping; 0 = off.
    latency_target_ms: float = Field(0.0, ge=0)
    min_infer_fps: float = Field(1.0, gt=0)


class RenderConfig(_Strict):
    mode: Literal["overlay", "mask"] = "overlay"
    alpha: float = Field(0.5, ge=0, le=1)
    classes: list[str] | None = None  # only colour these classes (names); None = all
    legend: bool = True
    jpeg_quality: int = Field(80, ge=1, le=100)
    workers: int = Field(1, ge=1, le=32)  # render/encode threads (streams are spread over them)


class PageConfig(_Strict):
    """The live page's WebSocket (/ws): one connection per page carries every tile."""

    max_tile_fps: float = Field(
        10.0,
        gt=0,
        le=60,
        description="Most frames a second one viewer gets of one tile (a page may ask fewer).",
    )
    max_focus_fps: float = Field(
        25.0, gt=0, le=60, description="Most frames a second of the large view."
    )
    max_watch: int = Field(64, ge=1, le=1024, description="Most tiles one page may watch.")
    max_overlays: int = Field(
        4,
        ge=0,
        le=64,
        description="Distinct per-viewer overlay "
        "settings one stream renders at once (each is rendered once per "
        "frame for all its viewers).",
    )
    max_clients: int = Field(200, ge=1, description="WebSocket connections at once.")


class MosaicConfig(_Strict):
    """GET /mosaic/mjpeg: several streams tiled into one MJPEG."""

    max_fps: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Most compositions a second of one "
        "layout (each composed and encoded once for all its viewers).",
    )
    max_layouts: int = Field(
        8, ge=1, le=256, description="Distinct layouts at once; more are answered 503."
    )
    max_width: int = Field(3840, ge=160, le=7680, description="Widest mosaic, pixels.")
    width: int = Field(1280, ge=160, le=7680, description="Width when a viewer gives none.")
    max_streams: int = Field(64, ge=1, le=1024, description="Most tiles in one mosaic.")
    jpeg_quality: int = Field(75, ge=1, le=100)


class PrivacyConfig(_Strict):
    """A stream's redaction (its `privacy:` entry): what the model labels as `classes`, and
    static zones, hidden in every picture output before anything is encoded."""

    classes: list[str] = Field(
        default_factory=lambda: ["person"],
        min_length=1,
        max_length=256,
        description="Hide what the model labels as these class names.",
    )
    style: Literal["blur", "pixelate", "fill", "silhouette"] = Field(
        "blur",
        description="blur | pixelate | fill (the colour) | silhouette (the colour, outlined).",
    )
    color: tuple[int, int, int] = Field(
        (0, 0, 0), description="RGB of fill and silhouette, each 0-255."
    )
    dilate: int = Field(
        8, ge=0, le=64, description="Grow the hidden area by this many output pixels."
    )
    zones: list[list[tuple[float, float]]] = Field(
        default_factory=list,
        max_length=64,
        description="Static polygons always hidden: [[x, y], ...] as fractions 0-1 of the frame.",
    )
    max_mask_age_ms: float = Field(
        400,
        ge=0,
        le=60_000,
        description="Never show a frame with a mask older than this (smooth output between "
        "inferences, a model behind): such a frame is blanked.",
    )
    admin_raw: bool = Field(
        False,
        description="Let an admin see the unredacted picture with ?raw=1 (MJPEG, snapshot); "
        "each view is audited. false: no way to get raw pictures.",
    )

    @field_validator("color")
    @classmethod
    def _valid_color(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError("color must be three numbers 0-255 (RGB)")
        return v

    @field_validator("zones")
    @classmethod
    def _valid_zones(cls, v: list[list[tuple[float, float]]]) -> list[list[tuple[float, float]]]:
        for zone in v:
            if not 3 <= len(zone) <= 256:
                raise ValueError("a zone is a polygon of 3 to 256 [x, y] points")
            if any(not (0 <= x <= 1 and 0 <= y <= 1) for x, y in zone):
                raise ValueError("zone points are fractions of the frame, 0-1")
        return v


class RestreamConfig(_Strict):
    """A stream's RTSP re-stream (its `restream:` entry): the annotated video as H.264,
    published with ANNOUNCE/RECORD (MediaMTX, go2rtc)."""

    url: str = Field(
        max_length=2048,
        description="rtsp:// or rtsps:// URL to publish to; may carry user:password "
        "(Basic or Digest), which is never shown.",
    )
    encoder: Literal["auto", "libx264", "h264_nvenc"] = Field(
        "auto", description="auto: NVENC where it opens, else libx264."
    )
    bitrate: int = Field(2000, ge=100, le=100_000, description="kbit/s")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast"] = Field(
        "ultrafast", description="libx264's speed preset."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        # The message never quotes the URL: it may carry credentials.
        v = v.strip()
        scheme, sep, _ = v.partition("://")
        if not sep or scheme.lower() not in ("rtsp", "rtsps"):
            raise ValueError("restream must be an rtsp:// or rtsps:// URL (null turns it off)")
        try:
            u = urlsplit(v)
            u.port  # noqa: B018 (raises for a port that is not a number in range)
        except ValueError:
            raise ValueError("restream URL has an invalid port") from None
        if not u.hostname:
            raise ValueError("restream URL has no host")
        return v

    def __eq__(self, other: object) -> bool:
        # The short form: a re-stream equals the URL string it was given as.
        if isinstance(other, str):
            return self.url == other
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]


# The flat keys of earlier versions and their place in `restream:`.
_FLAT_RESTREAM = {
    "restream_encoder": "encoder",
    "restream_bitrate": "bitrate",
    "restream_preset": "preset",
}


class GateConfig(_Strict):
    """Motion gating of one stream's inferences (stream.scheduler, stream.motion)."""

    mode: Literal["motion", "off"] = Field(
        "motion",
        description="motion: a frame due for inference goes to the model only if the scene "
        "changed since the last inferred frame (the last mask stands otherwise); off: always.",
    )
    refresh_s: float = Field(
        5.0, gt=0, le=3600, description="Motion: infer at least this often, changed or not."
    )
    still_keyframes: bool = Field(
        False,
        description="Motion: while the scene is still (the gate has judged it unchanged for "
        "at least one keyframe interval, or has seen no change since the stream started), "
        "decode only the camera's keyframes (PyAV and gst readers); each keyframe is "
        "checked, refresh_s still holds (within one keyframe interval more). Motion is then "
        "seen within one keyframe interval, not one frame, and every frame is decoded again "
        "from the keyframe after it. Never while something needs every frame: smooth "
        "output, a re-stream, privacy.",
    )


class StreamConfig(_Strict):
    """One camera or video stream (a `streams:` entry, or a POST /api/streams body)."""

    id: str = Field(
        description="1-64 letters, digits, _ . - (used in URLs and metrics).",
        json_schema_extra={"pattern": _ID_RE.pattern},
        max_length=64,
    )
    source: str = Field(
        description="rtsp://, rtsps://, rtmp://, http(s)://, srt:// URL, a "
        "file path, a device (0, /dev/video0) or sample:NAME.",
        max_length=2048,
    )
    reader: Literal["opencv", "pyav", "gst", "auto"] = Field(
        "auto",
        description="Capture library: auto (gst for RTSP where installed, else "
        "opencv), opencv, pyav or gst (GStreamer: the low-delay RTSP path, a frame period "
        "sooner than FFmpeg's; needs the gst extra, which `make run` installs).",
    )
    infer_fps: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Frame skipping: most inferences per second for this stream; 0 = no cap.",
    )
    output: Literal["segmented", "smooth"] = Field(
        "segmented",
        description="segmented: publish each segmented frame; smooth: every "
        "frame with the newest mask.",
    )
    gate: GateConfig = Field(
        GateConfig(),
        description="Motion gating: {mode: motion|off, refresh_s, still_keyframes}.",
    )
    loop: bool = Field(True, description="Files: start again at the end.")
    realtime: bool = Field(True, description="Files: pace at the file's own frame rate.")
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout: float = Field(10.0, gt=0, le=600, description="Seconds to open the source.")
    read_timeout: float = Field(5.0, gt=0, le=600, description="Seconds one read may block.")
    stall_timeout: float = Field(
        5.0, gt=0, le=600, description="Watchdog: no frame for this long -> reconnect."
    )
    reconnect_initial: float = Field(
        0.5, gt=0, le=600, description="First reconnect delay; doubles with jitter."
    )
    reconnect_max: float = Field(10.0, gt=0, le=3600, description="Longest reconnect delay.")
    max_failures: int = Field(
        0,
        ge=0,
        description="Give up (state error) after this many failed opens in a row; 0 = never.",
    )
    alpha: float | None = Field(
        None, ge=0, le=1, description="Overlay opacity; null = render.alpha."
    )
    classes: list[str] | None = Field(
        None, max_length=256, description="Only colour these class names; null = render.classes."
    )
    restream: RestreamConfig | None = Field(
        None,
        description="Publish the annotated video as H.264 over RTSP "
        "({url, encoder, bitrate, preset}; a URL alone is short for {url: URL}); null = off.",
    )
    zones: Zones = Field(
        default_factory=list,
        description="Named polygons (normalised 0..1 coordinates) whose coverage by each class "
        "is measured per frame, with rules that open and close events; applied live.",
    )

    record_clips: bool = Field(
        False,
        description="Keep an H.264 MP4 of each event of the zones: from events.clips.pre_roll_s "
        "before its start to its end (at most events.clips.max_s), as the viewers see it.",
    )

    @field_serializer("zones")
    def _zones_by_alias(self, zones: list[ZoneConfig]) -> list[dict[str, Any]]:
        # `class` (the alias), not `class_name`: the state file and the API round-trip.
        return [z.model_dump(mode="json", by_alias=True) for z in zones]

    privacy: PrivacyConfig | None = Field(
        None,
        description="Redact people (or other classes) and static zones in every picture "
        "output ({classes, style, color, dilate, zones, max_mask_age_ms, admin_raw}); "
        "null = off.",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_sink_keys(cls, data: Any) -> Any:
        """The flat `restream_*` keys of earlier versions load into `restream`, with a warning
        naming the new key."""
        if not isinstance(data, dict) or not any(k in data for k in _FLAT_RESTREAM):
            return data
        data = dict(data)
        nested = data.get("restream")
        if isinstance(nested, BaseModel):
            nested = nested.model_dump()
        elif isinstance(nested, str):
            nested = {"url": nested}
        for old, new in _FLAT_RESTREAM.items():
            if old not in data:
                continue
            value = data.pop(old)
            fate = "ignored: restream is off" if nested is None else f"use restream.{new}"
            msg = f"stream {data.get('id')!r}: the key {old} is deprecated; {fate}"
            log.warning("%s", msg)
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            if isinstance(nested, dict):
                nested = {new: value, **nested}  # the nested key wins where both are given
        data["restream"] = nested
        return data

    # Deprecated reads of the flat keys (code written against earlier versions).
    @property
    def restream_encoder(self) -> str:
        return self.restream.encoder if self.restream is not None else "auto"

    @property
    def restream_bitrate(self) -> int:
        return self.restream.bitrate if self.restream is not None else 2000

    @property
    def restream_preset(self) -> str:
        return self.restream.preset if self.restream is not None else "ultrafast"

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError("stream id must be 1-64 characters of letters, digits, _ . -")
        return v

    @field_validator("source")
    @classmethod
    def _valid_source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("source must not be empty")
        scheme = parse_source(v).scheme
        if scheme is not None and scheme not in _SCHEMES:
            raise ValueError(f"unsupported URL scheme {scheme!r}; use {sorted(_SCHEMES)}")
        return v


class ClusterConfig(_Strict):
    """`segstream serve --cluster ADDRESS`: placement and the node services (stream/cluster/)."""

    namespace: str = Field(
        "segstream", description="Ray namespace of the controller and the node services."
    )
    slots_resource: str = Field(
        "segstream_slots",
        description="The Ray resource a node "
        "declares its capacity with (cores given to segstream); nodes "
        "without it run no streams.",
    )
    stream_cost: float = Field(
        0.075,
        ge=0,
        description="Cores a stream takes besides "
        "inference: decode, render, JPEG (measured at 720p15).",
    )
    inference_cost: float = Field(
        0.058, ge=0, description="Core-seconds per inference (measured: mnv2-voc, tflite, 513x513)."
    )
    uncapped_fps: float = Field(
        15.0, gt=0, description="Inference rate counted for a stream with infer_fps 0."
    )
    rebalance_threshold: float = Field(
        0.25,
        ge=0,
        description="Move running streams only when "
        "the most and least loaded node differ by more than "
        "this share of capacity.",
    )
    lost_after_s: float = Field(
        4.0,
        gt=0,
        description="A node service that does not answer for this long is lost; its streams move.",
    )
    node_port: int = Field(
        0, ge=0, le=65535, description="Node services' HTTP port; 0 = any free port."
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Node services' unauthenticated "
        "/metrics port (private network); 0 = any free port.",
    )
    direct_viewers: bool = Field(
        False,
        description="Send MJPEG and snapshot viewers to the "
        "owning node with a short-lived signed URL instead of relaying "
        "(the nodes must be reachable from the viewers).",
    )


class AppConfig(_Strict):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    metrics: MetricsConfig = MetricsConfig()
    sources: SourcesConfig = SourcesConfig()
    predict: PredictConfig = PredictConfig()
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    render: RenderConfig = RenderConfig()
    cluster: ClusterConfig = ClusterConfig()
    page: PageConfig = PageConfig()
    mosaic: MosaicConfig = MosaicConfig()
    events: EventsConfig = EventsConfig()
    mqtt: MqttConfig | None = Field(
        None, description="MQTT broker for the event change feed and coverage; null = off."
    )
    webhooks: list[WebhookConfig] = Field(
        default_factory=list, description="Signed HTTP POSTs of event changes."
    )
    streams: list[StreamConfig] = []
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _unique_ids(self) -> AppConfig:
        ids = [s.id for s in self.streams]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate stream ids: {dupes}")
        return self


def load_config(
    path: str | Path | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
    extra_sources: list[str] | None = None,
) -> AppConfig:
    """YAML file (default configs/default.yaml) < env vars < CLI overrides; sources add streams.

    With sources and no config file of the user's, the default config's demo stream is left
    out: `serve --source URL` serves exactly the given sources."""
    explicit = path or os.environ.get(ENV_PREFIX + "CONFIG")
    path = Path(explicit) if explicit else DEFAULT_CONFIG
    data = _read_yaml(path)
    if extra_sources and not explicit:
        data["streams"] = []
    _deep_merge(data, env_overrides(os.environ if env is None else env))
    _deep_merge(data, overrides or {})
    streams = data.setdefault("streams", []) or []
    data["streams"] = streams
    taken = {str(s.get("id")) for s in streams if isinstance(s, dict)}
    for spec in extra_sources or []:
        sid, source = parse_source_arg(spec, taken)
        taken.add(sid)
        streams.append({"id": sid, "source": source})
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path)) from None


def parse_source_arg(spec: str, taken: set[str]) -> tuple[str, str]:
    """`URL` or `ID=URL` (ID without ':' or '/'); unnamed sources become cam1, cam2, ..."""
    head, sep, tail = spec.partition("=")
    if sep and _ID_RE.match(head) and tail:
        return head, tail
    n = 1
    while f"cam{n}" in taken:
        n += 1
    return f"cam{n}", spec


def env_overrides(environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    """SEGSTREAM_SERVER__PORT=9000 -> {"server": {"port": 9000}}; values parse as YAML scalars."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"invalid configuration ({path}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)
