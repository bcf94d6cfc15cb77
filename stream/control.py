"""Stream changes at runtime: checked, written to the state file, then applied.

One `StreamSet` does this for a single node (applied to its Service) and for a cluster (in
the controller, applied to the desired set it places), so every limit and check holds in
both. Changes are serialised by one lock, so the state file and the running set never
disagree; each one is validated in full (id, `sources.max_streams`, schema, source policy,
class names) before anything is written, and written (atomically) before it is applied and
acknowledged: a `kill -9` at any moment leaves the file valid and holding every acknowledged
change."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import ValidationError

from segstream.stream.config import ConfigError, SourcesConfig, StreamConfig
from segstream.stream.service import Service
from segstream.stream.sourceref import parse_source
from segstream.stream.store import StreamStore

API_SCHEMES = {"rtsp", "rtsps", "rtmp", "http", "https", "srt"}
# Never reachable through the API unless allowed by name: link-local (cloud metadata
# services live at 169.254.169.254) and "this network".
DENIED_NETWORKS = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "0.0.0.0/8")]


class Refused(ValueError):
    """A change that cannot be made: `status` is the HTTP status, `loc` the key path."""

    def __init__(self, status: int, message: str, loc: str = "") -> None:
        super().__init__(message)
        self.status, self.loc = status, loc

    def to_dict(self) -> dict[str, Any]:
        """As it crosses a process boundary (the cluster controller to the gateway)."""
        return {"status": self.status, "error": str(self), "loc": self.loc}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Refused:
        return cls(int(d["status"]), str(d["error"]), str(d.get("loc") or ""))


class SourcePolicy:
    def __init__(self, cfg: SourcesConfig) -> None:
        self.local = [Path(p).resolve() for p in cfg.allow_local]
        self.resolve_names = cfg.resolve_names
        self.max_streams = cfg.max_streams
        self.networks = (
            None
            if cfg.allow_networks is None
            else [ipaddress.ip_network(n, strict=False) for n in cfg.allow_networks]
        )

    def check(self, source: str) -> None:
        """Raises Refused(422) with the reason. Resolves host names (blocking: call it off
        the event loop), so no request goes to an address the operator did not allow."""
        ref = parse_source(source)
        if ref.kind == "sample":
            return  # a named clip from the model cache
        if ref.kind in ("file", "device"):
            return self._check_local(ref.path)
        scheme = ref.scheme or ""
        if scheme not in API_SCHEMES:
            raise Refused(
                422,
                f"scheme {scheme!r} is not allowed over the API; use one of {sorted(API_SCHEMES)}",
                "source",
            )
        self._check_host(source)

    def _check_local(self, path: str) -> None:
        p = Path(path if not path.isdigit() else f"/dev/video{path}").resolve()
        if not any(p == d or d in p.parents for d in self.local):
            raise Refused(
                422,
                "local files and devices are not allowed over the API here "
                "(the operator can allow folders in sources.allow_local)",
                "source",
            )

    def _check_host(self, source: str) -> None:
        try:
            host, port = urlsplit(source).hostname, urlsplit(source).port
        except ValueError as e:
            raise Refused(422, f"invalid URL: {e}", "source") from None
        if not host:
            raise Refused(422, "the URL has no host", "source")
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        if addr is not None:
            if not self._allowed(addr):
                raise Refused(
                    422, f"address {addr} is not allowed (see sources.allow_networks)", "source"
                )
            return
        if not self.resolve_names:
            raise Refused(
                422,
                "host names are not allowed here, only IP addresses (sources.resolve_names)",
                "source",
            )
        try:
            infos = socket.getaddrinfo(host, port or 0, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            raise Refused(422, f"cannot resolve host {host!r}", "source") from None
        for info in infos:
            addr = ipaddress.ip_address(info[4][0])
            if not self._allowed(addr):
                raise Refused(
                    422,
                    f"address {addr} of {host!r} is not allowed (see sources.allow_networks)",
                    "source",
                )

    def _allowed(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.networks is not None:
            return any(addr in n for n in self.networks)
        return not any(addr in n for n in DENIED_NETWORKS)


class StreamTarget(Protocol):
    """What a StreamSet applies its changes to: a node's Service, or the cluster's desired set.
    `apply_*` run only after the change is checked and persisted."""

    def configs(self) -> Mapping[str, StreamConfig]: ...

    def check(self, cfg: StreamConfig) -> None:
        """Raises Refused(422) for settings the model cannot honour (class names)."""

    def apply_add(self, cfg: StreamConfig) -> None: ...

    def apply_replace(self, cfg: StreamConfig) -> None: ...

    def apply_remove(self, stream_id: str) -> None: ...


class StreamSet:
    """validate -> persist -> apply, for a node and for a cluster. Blocking (it may resolve a
    host name and writes the state file): call it off the event loop."""

    def __init__(self, target: StreamTarget, store: StreamStore | None, cfg: SourcesConfig) -> None:
        self.target, self.store = target, store
        self.policy = SourcePolicy(cfg)
        self._lock = threading.Lock()

    def get(self, stream_id: str) -> StreamConfig:
        cfg = self.target.configs().get(stream_id)
        if cfg is None:
            raise Refused(404, f"unknown stream {stream_id!r}")
        return cfg

    def add(self, cfg: StreamConfig) -> StreamConfig:
        with self._lock:
            current = self.target.configs()
            if cfg.id in current:
                raise Refused(409, f"stream {cfg.id!r} exists", "id")
            if len(current) >= self.policy.max_streams:
                raise Refused(
                    409, f"at most {self.policy.max_streams} streams (sources.max_streams)"
                )
            self._check(cfg)
            self._persist([*current.values(), cfg])
            self.target.apply_add(cfg)
            return cfg

    def change(self, stream_id: str, changes: dict[str, Any]) -> StreamConfig:
        with self._lock:
            current = self.get(stream_id)
            merged = current.model_dump(exclude_unset=True) | {"id": stream_id} | changes
            try:
                cfg = StreamConfig.model_validate(merged)
            except ValidationError as e:
                first = e.errors()[0]
                raise Refused(422, first["msg"], ".".join(map(str, first["loc"]))) from None
            self._check(cfg, source_changed=cfg.source != current.source)
            configs = self.target.configs().values()
            self._persist([cfg if c.id == stream_id else c for c in configs])
            self.target.apply_replace(cfg)
            return cfg

    def remove(self, stream_id: str) -> None:
        with self._lock:
            self.get(stream_id)
            self._persist([c for c in self.target.configs().values() if c.id != stream_id])
            self.target.apply_remove(stream_id)

    def _check(self, cfg: StreamConfig, source_changed: bool = True) -> None:
        if source_changed:
            self.policy.check(cfg.source)
        self.target.check(cfg)

    def _persist(self, streams: list[StreamConfig]) -> None:
        if self.store is not None:
            self.store.save(streams)


class ServiceTarget:
    """A single node: the streams its Service runs."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def configs(self) -> dict[str, StreamConfig]:
        return {sid: s.cfg for sid, s in list(self.service.streams.items())}

    def check(self, cfg: StreamConfig) -> None:
        try:
            self.service.check_stream(cfg)
        except ConfigError as e:
            key, _, msg = str(e).partition(": ")
            if key.endswith(".privacy.classes"):
                loc = "privacy.classes"
            elif key.startswith("zones."):
                loc = key  # a zone rule's class
            else:
                loc = "classes"
            raise Refused(422, msg or key, loc) from None

    def apply_add(self, cfg: StreamConfig) -> None:
        self.service.add_stream(cfg)

    def apply_replace(self, cfg: StreamConfig) -> None:
        self.service.replace_stream(cfg)

    def apply_remove(self, stream_id: str) -> None:
        self.service.remove_stream(stream_id)
