"""The event store: events, their media files and the delivery outbox, on SQLite or
PostgreSQL through one SQLAlchemy Core code path.

Sync engine, called from worker threads (the recorder's writer thread, the pruner, the API via
asyncio.to_thread): SQLite has no truly asynchronous driver (aiosqlite is a thread too), and
one sync path serves both databases without the greenlet bridge of the async engine. Every
method is thread-safe (a connection per call from the engine's pool); there is one writer of
events and outbox rows (EventRecorder), so outbox numbers are committed in order."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from segstream.stream.events.model import Change, Event
from segstream.stream.events.schema import cursors, events, outbox

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MEDIA_KINDS = {"snapshot": ".jpg", "mask": ".png", "clip": ".mp4"}
MAX_PAGE = 1000


class EventStoreError(RuntimeError):
    """The store cannot be opened or written; the message is meant for /healthz (it never
    contains the database password)."""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    stream: str
    type: str
    payload: str  # the change's JSON


def default_url(home: Path) -> str:
    return f"sqlite:///{home / 'events.db'}"


def default_media_dir(url: str, home: Path) -> Path:
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return Path(u.database).resolve().parent / "events-media"
    return home / "events-media"


class EventStore:
    def __init__(self, url: str, media_dir: Path, outbox_max: int = 10_000) -> None:
        self.url = sa.engine.make_url(url)
        self.media_dir = media_dir
        self.outbox_max = outbox_max
        self._engine: Engine | None = None
        self._targets: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, now: float | None = None) -> list[Change]:
        """Connect, migrate to the newest schema, and close the events a previous run left
        open (end_reason `restart`). Returns those `end` changes (already in the outbox).
        Raises EventStoreError when the store is unusable (corrupt, unwritable, unreachable)."""
        try:
            self.media_dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.media_dir, prefix=".probe")  # noqa: SIM115
            probe.close()
            self._engine = self._create_engine()
            with self._engine.begin() as conn:
                self._check(conn)
                self.migrate(conn)
            return self._close_left_open(time.time() if now is None else now)
        except (OSError, sa.exc.SQLAlchemyError, sqlite3.Error, CommandError) as e:
            self.close()
            raise EventStoreError(f"event store {self._where()}: {reason(e)}") from None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _where(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def _create_engine(self) -> Engine:
        if self.url.get_backend_name() == "sqlite":
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(self.url, connect_args={"timeout": 30})
            sa_event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        url = self.url
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return sa.create_engine(url, pool_pre_ping=True)

    def _check(self, conn: Connection) -> None:
        if conn.dialect.name == "sqlite":
            bad = conn.exec_driver_sql("PRAGMA quick_check").scalar()
            if bad != "ok":
                raise EventStoreError(f"event store {self._where()}: corrupt ({bad})")

    @staticmethod
    def migrate(conn: Connection) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise EventStoreError("event store is not open")
        return self._engine

    # -- events ------------------------------------------------------------------------------

    def apply(self, changes: Sequence[Change], now: float | None = None) -> tuple[int, int]:
        """Write changes and their outbox rows in one transaction. Returns (outbox size,
        rows dropped to keep it within outbox_max)."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            for ch in changes:
                self._write_event(conn, ch)
            if changes:
                conn.execute(sa.insert(outbox), [_outbox_row(ch, now) for ch in changes])
            return self._bound_outbox(conn)

    @staticmethod
    def _write_event(conn: Connection, ch: Change) -> None:
        row = _event_row(ch.after)
        if ch.type == "new":
            conn.execute(sa.insert(events).values(**row, media_bytes=0))
        else:
            conn.execute(sa.update(events).where(events.c.id == ch.after.id).values(**row))

    def _bound_outbox(self, conn: Connection) -> tuple[int, int]:
        size = self._outbox_size(conn)
        if size <= self.outbox_max:
            return size, 0
        size = self._trim(conn)  # rows every target has handled go first, uncounted
        excess = size - self.outbox_max
        if excess <= 0:
            return size, 0
        last = conn.execute(
            sa.select(outbox.c.seq).order_by(outbox.c.seq).offset(excess - 1).limit(1)
        ).scalar_one()
        conn.execute(sa.delete(outbox).where(outbox.c.seq <= last))
        return self.outbox_max, excess

    def _close_left_open(self, now: float) -> list[Change]:
        """Events still open were open when the previous run died: they end at the last
        moment known active (their peak), reason `restart`."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events).where(events.c.end.is_(None))).all()
        changes = []
        for r in rows:
            ev = _event(r._mapping)
            changes.append(Change("end", ev, ev.replace(end=ev.peak_at, end_reason="restart")))
        if changes:
            self.apply(changes, now)
        for ch in changes:  # a clip cut short by the crash still plays (fragmented MP4)
            clip = self.media_path(ch.after.id, "clip")
            if clip.exists():
                self.save_clip(ch.after.id, clip.stat().st_size, truncated=True)
        return changes

    def get(self, event_id: str) -> Event | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(events).where(events.c.id == event_id)).first()
        return None if row is None else _event(row._mapping)

    def list_events(
        self,
        *,
        stream: str | None = None,
        zone: str | None = None,
        class_name: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Event], str | None]:
        """Events that started in [since, until), newest first, and the cursor of the next
        page (None on the last). Raises ValueError for a cursor it did not make or a limit
        outside 1..MAX_PAGE."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}")
        q = sa.select(events)
        for col, val in ((events.c.stream, stream), (events.c.zone, zone)):
            if val is not None:
                q = q.where(col == val)
        if class_name is not None:
            q = q.where(events.c.class_name == class_name)
        if since is not None:
            q = q.where(events.c.start >= since)
        if until is not None:
            q = q.where(events.c.start < until)
        if cursor is not None:
            start, eid = decode_cursor(cursor)
            q = q.where(
                sa.or_(events.c.start < start, sa.and_(events.c.start == start, events.c.id < eid))
            )
        q = q.order_by(events.c.start.desc(), events.c.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            found = [_event(r._mapping) for r in conn.execute(q)]
        page = found[:limit]
        more = len(found) > limit
        return page, (encode_cursor(page[-1]) if more and page else None)

    def delete(self, event_id: str) -> bool:
        with self.engine.begin() as conn:
            gone = conn.execute(sa.delete(events).where(events.c.id == event_id)).rowcount
        self._remove_media([event_id])
        return bool(gone)

    # -- media -------------------------------------------------------------------------------

    def media_path(self, event_id: str, kind: str) -> Path:
        """Where an event's `snapshot` (JPEG), `mask` (PNG) or `clip` (MP4) is kept."""
        if kind not in MEDIA_KINDS or not event_id.isalnum():
            raise ValueError(f"no media {kind!r} for event {event_id!r}")
        return self.media_dir / f"{event_id}{MEDIA_KINDS[kind]}"

    def save_media(self, event_id: str, jpeg: bytes, png: bytes) -> bool:
        """Replace the event's peak-frame JPEG and class-mask PNG (each written atomically).
        False (nothing kept) when the event is not in the store."""
        if self.get(event_id) is None:
            return False
        for kind, data in (("snapshot", jpeg), ("mask", png)):
            _write_atomic(self.media_path(event_id, kind), data)
        with self.engine.begin() as conn:
            n = conn.execute(
                sa.update(events)
                .where(events.c.id == event_id)
                .values(media_bytes=len(jpeg) + len(png))
            ).rowcount
        if not n:  # deleted meanwhile
            self._remove_media([event_id])
        return bool(n)

    def save_clip(self, event_id: str, nbytes: int, truncated: bool) -> bool:
        """The event's clip (already at media_path(id, "clip")) is finished: it counts in
        the retention's bytes and the event's JSON names it. False (and the file removed)
        when the event is gone meanwhile."""
        with self.engine.begin() as conn:
            n = conn.execute(
                sa.update(events)
                .where(events.c.id == event_id)
                .values(clip_bytes=nbytes, clip_truncated=truncated)
            ).rowcount
        if not n:
            self.media_path(event_id, "clip").unlink(missing_ok=True)
        return bool(n)

    def _remove_media(self, ids: Iterable[str]) -> None:
        for eid in ids:
            for kind in MEDIA_KINDS:
                self.media_path(eid, kind).unlink(missing_ok=True)

    # -- retention ---------------------------------------------------------------------------

    def prune(self, now: float, retain_days: float, max_bytes: int) -> int:
        """Delete closed events that ended more than retain_days ago, then the oldest closed
        events until their media fit in max_bytes. Returns how many went."""
        gone: list[str] = []
        with self.engine.begin() as conn:
            old = events.c.end < now - retain_days * 86400
            gone += conn.execute(sa.select(events.c.id).where(old)).scalars().all()
            conn.execute(sa.delete(events).where(old))
            size = events.c.media_bytes + sa.func.coalesce(events.c.clip_bytes, 0)
            total = conn.execute(sa.select(sa.func.sum(size))).scalar() or 0
            if total > max_bytes:
                rows = conn.execute(
                    sa.select(events.c.id, size)
                    .where(events.c.end.is_not(None), size > 0)
                    .order_by(events.c.start, events.c.id)
                ).all()
                drop = []
                for eid, nbytes in rows:
                    if total <= max_bytes:
                        break
                    drop.append(eid)
                    total -= nbytes
                if drop:
                    conn.execute(sa.delete(events).where(events.c.id.in_(drop)))
                gone += drop
        self._remove_media(gone)
        return len(gone)

    # -- outbox ------------------------------------------------------------------------------

    def register_target(self, target: str) -> int:
        """A delivery target's cursor: where it stopped last run, or, for a new target, the
        end of the outbox (it does not replay history)."""
        self._targets.add(target)
        with self.engine.begin() as conn:
            seq = conn.execute(
                sa.select(cursors.c.last_seq).where(cursors.c.target == target)
            ).scalar()
            if seq is None:
                seq = conn.execute(sa.select(sa.func.max(outbox.c.seq))).scalar() or 0
                conn.execute(sa.insert(cursors).values(target=target, last_seq=seq))
        return int(seq)

    def outbox_after(self, seq: int, limit: int = 100) -> list[OutboxRow]:
        q = sa.select(outbox).where(outbox.c.seq > seq).order_by(outbox.c.seq).limit(limit)
        with self.engine.connect() as conn:
            return [OutboxRow(r.seq, r.stream, r.type, r.payload) for r in conn.execute(q)]

    def ack(self, target: str, seq: int) -> None:
        """The target has handled every row up to seq."""
        with self.engine.begin() as conn:
            conn.execute(sa.update(cursors).where(cursors.c.target == target).values(last_seq=seq))

    def trim_delivered(self) -> int:
        """Delete outbox rows that every target registered in this run has handled (all of
        them when there is none). Returns the outbox size."""
        with self.engine.begin() as conn:
            return self._trim(conn)

    def _trim(self, conn: Connection) -> int:
        if self._targets:
            done = conn.execute(
                sa.select(sa.func.min(cursors.c.last_seq)).where(
                    cursors.c.target.in_(sorted(self._targets))
                )
            ).scalar_one()
            conn.execute(sa.delete(outbox).where(outbox.c.seq <= done))
        else:
            conn.execute(sa.delete(outbox))
        return self._outbox_size(conn)

    @staticmethod
    def _outbox_size(conn: Connection) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one())


def encode_cursor(ev: Event) -> str:
    raw = json.dumps([ev.start, ev.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        start, eid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(start, bool) or not isinstance(start, int | float):
            raise TypeError
        if not isinstance(eid, str):
            raise TypeError
        return float(start), eid
    except (ValueError, TypeError) as e:
        raise ValueError("invalid cursor") from e


def _event_row(ev: Event) -> dict[str, Any]:
    return {
        "id": ev.id,
        "stream": ev.stream,
        "zone": ev.zone,
        "class_name": ev.class_name,
        "start": ev.start,
        "end": ev.end,
        "peak_coverage": ev.peak_coverage,
        "peak_at": ev.peak_at,
        "end_reason": ev.end_reason,
    }


def _event(r: Any) -> Event:
    return Event(
        id=r["id"],
        stream=r["stream"],
        zone=r["zone"],
        class_name=r["class_name"],
        start=r["start"],
        peak_coverage=r["peak_coverage"],
        peak_at=r["peak_at"],
        end=r["end"],
        end_reason=r["end_reason"],
        clip_bytes=r["clip_bytes"],
        clip_truncated=bool(r["clip_truncated"]),
    )


def _outbox_row(ch: Change, now: float) -> dict[str, Any]:
    payload = json.dumps(ch.to_dict(), separators=(",", ":"))
    return {"stream": ch.after.stream, "type": ch.type, "payload": payload, "created": now}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (the API) never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives kill -9
    cur.close()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def reason(e: BaseException) -> str:
    """A one-line reason without SQL or parameters (SQLAlchemy appends both)."""
    if isinstance(e, sa.exc.DBAPIError) and e.orig is not None:
        e = e.orig
    if isinstance(e, EventStoreError):
        return str(e).split(": ", 1)[-1]
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
