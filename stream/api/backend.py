"""The seam between the HTTP handlers and what serves them.

The handlers in stream/api/ parse and check a request, then ask a `StreamBackend`: a single
node (stream.api.local.LocalBackend: its Service and StreamSet) or a cluster gateway
(stream.cluster.gateway.ClusterBackend: the controller's StreamSet and the node services).
Work that needs the pipeline or the model (pictures, the mosaic, predictions) is handed over
as a function of the local Service: a node runs it, a gateway relays the request to the node
that can, where the same handler runs it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from segstream.stream.api.spec import ApiError, error
from segstream.stream.config import AppConfig, StreamConfig
from segstream.stream.control import Refused
from segstream.stream.schemas import (
    EventOut,
    EventPage,
    EventQuery,
    Health,
    StreamList,
    StreamStatus,
)

if TYPE_CHECKING:
    from segstream.stream.service import Service, Stream

ServiceWork = Callable[["Service"], Awaitable[web.StreamResponse]]
StreamWork = Callable[["Service", "Stream"], Awaitable[web.StreamResponse]]


class StreamBackend(Protocol):
    cfg: AppConfig

    # -- the stream set ---------------------------------------------------------------------
    async def ids(self) -> list[str]:
        """The streams in the set, in order."""

    async def list_streams(self) -> StreamList: ...

    async def status(self, stream_id: str) -> StreamStatus:
        """Raises ApiError 404 for an unknown stream."""

    async def add(self, cfg: StreamConfig) -> StreamStatus:
        """Through the StreamSet: ApiError 409/422 (see refused) when it is not taken."""

    async def change(self, stream_id: str, changes: dict[str, Any]) -> StreamStatus: ...

    async def remove(self, stream_id: str) -> None: ...

    # -- pictures and the model ------------------------------------------------------------------
    async def media(
        self, request: web.Request, stream_id: str, work: StreamWork
    ) -> web.StreamResponse:
        """One stream's MJPEG, snapshot or mask: `work` where the stream runs."""

    async def mosaic(
        self, request: web.Request, ids: list[str] | None, work: ServiceWork
    ) -> web.StreamResponse: ...

    async def model(self, request: web.Request, work: ServiceWork) -> web.StreamResponse:
        """Model facts and predictions: `work` where a model is loaded."""

    # -- events (zones' coverage events) ---------------------------------------------------------
    async def list_events(self, q: EventQuery) -> EventPage:
        """Newest first; ApiError 400 for a cursor it did not make, 503 when events are off."""

    async def get_event(self, event_id: str) -> EventOut:
        """ApiError 404 for an unknown event."""

    async def event_media(self, event_id: str, kind: str) -> bytes:
        """The `snapshot` JPEG or `mask` PNG of the event's peak frame; ApiError 404."""

    async def delete_event(self, event_id: str) -> None: ...

    # -- the live page ---------------------------------------------------------------------------
    def page_clients(self) -> int: ...

    async def run_page(self, request: web.Request, ws: web.WebSocketResponse) -> None: ...

    # -- system ------------------------------------------------------------------------------
    async def health(self) -> Health:
        """Raises ApiError 503 when unhealthy."""

    async def ready(self) -> None:
        """Raises ApiError 503 until a model is warm."""

    async def metrics(self) -> bytes: ...

    async def close(self) -> None:
        """On shutdown: pages and endless responses end."""


def refused(e: Refused) -> ApiError:
    """A StreamSet's refusal as the API answers it, the same on a node and a gateway."""
    if e.status == 422:
        return error(
            422,
            f"{e.loc}: {e}" if e.loc else str(e),
            details=[{"loc": e.loc or "body", "msg": str(e)}],
        )
    return error(e.status, str(e))


def unknown(stream_id: str) -> ApiError:
    return error(404, f"unknown stream {stream_id!r}")
