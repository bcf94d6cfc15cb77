"""A node's event queries on its own store (blocking: LocalBackend runs them in a thread)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from segstream.stream.api.spec import ApiError, error
from segstream.stream.events.feature import EventsFeature
from segstream.stream.events.model import Event
from segstream.stream.events.store import EventStore, EventStoreError, reason
from segstream.stream.schemas import EventOut, EventPage, EventQuery

T = TypeVar("T")


def guarded(events: EventsFeature, work: Callable[..., T], *args: Any) -> T:
    """`work(store, *args)`; an unusable store is 503 with the reason, never a 500. A store
    not opened (no zone yet, no store of earlier runs) holds no events."""
    if events.error:
        raise error(503, f"events are off: {events.error}")
    if events.recorder is None:
        if work is list_events:
            return EventPage(events=[], next=None)  # type: ignore[return-value]
        raise error(404, "no events: no stream has zones yet")
    try:
        return work(events.store, *args)
    except (EventStoreError, sa.exc.SQLAlchemyError, OSError) as e:
        raise error(503, f"event store: {reason(e)}") from None


def out(ev: Event) -> EventOut:
    return EventOut.model_validate(ev.to_dict())


def _epoch(t: datetime | None) -> float | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def list_events(store: EventStore, q: EventQuery) -> EventPage:
    try:
        found, nxt = store.list_events(
            stream=q.stream,
            zone=q.zone,
            class_name=q.class_name,
            since=_epoch(q.since),
            until=_epoch(q.until),
            limit=q.limit,
            cursor=q.cursor,
        )
    except ValueError as e:  # a cursor it did not make
        raise error(400, str(e)) from None
    return EventPage(events=[out(ev) for ev in found], next=nxt)


def _unknown(event_id: str) -> ApiError:
    return error(404, f"unknown event {event_id!r}")


def _valid(event_id: str) -> str:
    """Event ids are hex (they name media files): anything else is no event."""
    if not (event_id.isascii() and event_id.isalnum()):
        raise _unknown(event_id)
    return event_id


def _found(store: EventStore, event_id: str) -> Event:
    ev = store.get(_valid(event_id))
    if ev is None:
        raise _unknown(event_id)
    return ev


def get_event(store: EventStore, event_id: str) -> EventOut:
    return out(_found(store, event_id))


def event_media(store: EventStore, event_id: str, kind: str) -> bytes:
    ev = _found(store, event_id)
    if kind == "clip" and ev.clip_bytes is None:  # none, or still being recorded
        raise error(404, f"event {event_id!r} has no clip (yet)")
    try:
        return store.media_path(event_id, kind).read_bytes()
    except FileNotFoundError:
        raise error(404, f"event {event_id!r} has no {kind} (yet)") from None


def delete_event(store: EventStore, event_id: str) -> None:
    if not store.delete(_valid(event_id)):
        raise _unknown(event_id)
