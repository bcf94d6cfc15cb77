"""The event store on SQLite and on a real PostgreSQL server (started here): migrations from
empty, writes with their outbox rows, listing with a keyset cursor, media, retention, the
outbox bound and cursors, crash safety (kill -9) and clear errors for a bad store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.events_peers import Postgres
from support.waiting import wait_for

from segstream.stream.events.model import Change, Event
from segstream.stream.events.observer import NullEventsObserver
from segstream.stream.events.recorder import EventRecorder, Pruner
from segstream.stream.events.schema import VERSION_TABLE
from segstream.stream.events.store import EventStore, EventStoreError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Postgres]:
    pg = Postgres()
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def postgres(pg_server: Postgres) -> str:
    """One database for the module; each test starts from an empty schema."""
    return pg_server.create_database("events")


def empty_postgres(url: str) -> str:
    engine = sa.create_engine(url.replace("postgresql:", "postgresql+psycopg:"))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url


# The PostgreSQL cases start a server: end-to-end (`make test-fast` runs the SQLite ones).
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
    else:
        url = empty_postgres(request.getfixturevalue("postgres"))
    s = EventStore(url, tmp_path / "media", outbox_max=10)
    s.open(now=1000.0)
    yield s
    s.close()


def ev(n: int, start: float, stream: str = "cam", zone: str = "floor", cls: str = "person",
       end: float | None = None) -> Event:  # fmt: skip
    return Event(f"{n:032x}", stream, zone, cls, start, 0.5, start + 0.5, end,
                 "cleared" if end is not None else None)  # fmt: skip


def test_migrations_run_from_empty(store: EventStore):
    with store.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == "0002"
        tables = set(sa.inspect(conn).get_table_names())
    assert {"events", "event_outbox", "event_delivery_cursors", VERSION_TABLE} <= tables
    # opening again is a no-op migration
    again = EventStore(store.url.render_as_string(hide_password=False), store.media_dir)
    assert again.open(now=1001.0) == []
    again.close()


def test_changes_are_written_with_their_outbox_rows(store: EventStore):
    e = ev(1, 10.0)
    up = e.replace(peak_coverage=0.8, peak_at=12.0)
    done = up.replace(end=15.0, end_reason="cleared")
    assert store.apply([Change("new", None, e)], now=10.0) == (1, 0)
    assert store.get(e.id) == e
    store.apply([Change("update", e, up), Change("end", up, done)], now=15.0)
    assert store.get(e.id) == done
    rows = store.outbox_after(0)
    assert [(r.type, r.stream) for r in rows] == [("new", "cam"), ("update", "cam"), ("end", "cam")]
    assert rows[0].seq < rows[1].seq < rows[2].seq
    last = json.loads(rows[2].payload)
    assert last["type"] == "end"
    assert last["before"]["end"] is None
    assert last["after"]["end"] == "1970-01-01T00:00:15.000Z"
    assert last["after"]["class"] == "person" and last["after"]["peak_coverage"] == 0.8
    assert store.get("f" * 32) is None


def test_list_filters_and_pages_newest_first(store: EventStore):
    # 7 events; three share a start time (the cursor must not skip or repeat them)
    starts = [1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0]
    events = [ev(i, s, stream="a" if i % 2 else "b") for i, s in enumerate(starts)]
    events.append(ev(99, 2.5, zone="door", cls="dog"))
    store.apply([Change("new", None, e) for e in events])
    order = sorted(events, key=lambda e: (e.start, e.id), reverse=True)
    seen: list[Event] = []
    cursor = None
    for _ in range(10):
        page, cursor = store.list_events(limit=3, cursor=cursor)
        seen += page
        if cursor is None:
            break
    assert seen == order
    assert [e.id for e in store.list_events(stream="a")[0]] == [
        e.id for e in order if e.stream == "a"
    ]
    assert [e.id for e in store.list_events(zone="door")[0]] == [events[-1].id]
    assert [e.id for e in store.list_events(class_name="dog")[0]] == [events[-1].id]
    got = store.list_events(since=2.0, until=4.0)[0]
    assert [e.start for e in got] == [3.0, 3.0, 3.0, 2.5, 2.0]
    with pytest.raises(ValueError, match="invalid cursor"):
        store.list_events(cursor="not-a-cursor")


def test_media_is_saved_served_and_deleted_with_the_event(store: EventStore):
    e = ev(1, 10.0)
    assert not store.save_media(e.id, b"j", b"p")  # unknown event: nothing kept
    store.apply([Change("new", None, e)])
    assert store.save_media(e.id, b"\xff\xd8jpeg", b"\x89PNGpng")
    assert store.media_path(e.id, "snapshot").read_bytes() == b"\xff\xd8jpeg"
    assert store.media_path(e.id, "mask").read_bytes() == b"\x89PNGpng"
    with pytest.raises(ValueError):
        store.media_path("../etc", "snapshot")
    assert store.delete(e.id)
    assert not store.media_path(e.id, "snapshot").exists()
    assert store.get(e.id) is None
    assert not store.delete(e.id)


def test_retention_by_age_and_by_bytes(store: EventStore):
    day = 86400.0
    old = ev(1, 0.0, end=1.0)
    mid1, mid2 = ev(2, 5 * day, end=5 * day + 1), ev(3, 6 * day, end=6 * day + 1)
    open_ = ev(4, 1.0)  # open events are never pruned
    store.apply([Change("new", None, e) for e in (old, mid1, mid2, open_)])
    for e in (old, mid1, mid2, open_):
        store.save_media(e.id, b"x" * 100, b"y" * 100)
    assert store.prune(now=10 * day, retain_days=7, max_bytes=10_000) == 1
    assert store.get(old.id) is None and not store.media_path(old.id, "mask").exists()
    # 600 bytes left, 400 allowed: the oldest closed one goes
    assert store.prune(now=10 * day, retain_days=7, max_bytes=400) == 1
    assert store.get(mid1.id) is None and store.get(mid2.id) is not None
    assert store.get(open_.id) is not None


def test_clips_count_in_retention_and_go_with_their_event(store: EventStore):
    a, b = ev(1, 10.0, end=11.0), ev(2, 20.0, end=21.0)
    store.apply([Change("new", None, e) for e in (a, b)])
    assert store.get(a.id).to_dict()["clip_url"] is None  # type: ignore[union-attr]
    for e, size in ((a, 300), (b, 50)):
        store.media_path(e.id, "clip").write_bytes(b"m" * size)
        assert store.save_clip(e.id, size, truncated=e is a)
    got = store.get(a.id)
    assert got is not None and (got.clip_bytes, got.clip_truncated) == (300, True)
    assert got.to_dict()["clip_url"] == f"/api/events/{a.id}/clip.mp4"
    # A later change of the event (its end) keeps the clip.
    store.apply([Change("end", got, got.replace(end=12.0))])
    assert store.get(a.id).clip_bytes == 300  # type: ignore[union-attr]
    # 350 bytes of clips, 100 allowed: the older event goes with its clip file.
    assert store.prune(now=30.0, retain_days=7, max_bytes=100) == 1
    assert store.get(a.id) is None and not store.media_path(a.id, "clip").exists()
    assert store.delete(b.id) and not store.media_path(b.id, "clip").exists()
    # The event went while its clip was recorded: the finished file goes too.
    store.media_path(b.id, "clip").write_bytes(b"late")
    assert not store.save_clip(b.id, 4, truncated=False)
    assert not store.media_path(b.id, "clip").exists()


def test_a_clip_cut_short_by_a_crash_is_kept(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    s = EventStore(url, tmp_path / "media")
    s.open(now=1.0)
    e = ev(1, 10.0)
    s.apply([Change("new", None, e)])
    s.media_path(e.id, "clip").write_bytes(b"m" * 64)  # recording when the process died
    s.close()
    again = EventStore(url, tmp_path / "media")
    assert [c.after.end_reason for c in again.open(now=20.0)] == ["restart"]
    got = again.get(e.id)
    assert got is not None and (got.clip_bytes, got.clip_truncated) == (64, True)
    again.close()


def test_outbox_is_bounded_and_read_per_target(store: EventStore):
    first = store.register_target("mqtt")
    assert first == 0
    events = [ev(i, float(i)) for i in range(15)]
    size, dropped = store.apply([Change("new", None, e) for e in events])
    assert (size, dropped) == (10, 5)  # outbox_max=10: the 5 oldest went
    rows = store.outbox_after(0, limit=100)
    assert [json.loads(r.payload)["after"]["id"] for r in rows] == [e.id for e in events[5:]]
    store.ack("mqtt", rows[3].seq)
    assert store.trim_delivered() == 6
    # a new target starts at the end; an old one where it stopped
    assert store.register_target("webhook:x") == rows[-1].seq
    assert store.register_target("mqtt") == rows[3].seq
    # an outbox emptied does not reuse numbers (a cursor would skip new rows)
    store.ack("mqtt", rows[-1].seq)
    assert store.trim_delivered() == 0
    store.apply([Change("new", None, ev(50, 50.0))])
    assert store.outbox_after(rows[-1].seq)[0].seq > rows[-1].seq
    # full of delivered rows: they make room, nothing undelivered is dropped
    store.apply([Change("new", None, ev(60 + i, 60.0 + i)) for i in range(9)])
    last = store.outbox_after(0, limit=100)[-1].seq
    store.ack("mqtt", last)
    store.ack("webhook:x", last)
    assert store.apply([Change("new", None, ev(80 + i, 80.0 + i)) for i in range(8)]) == (8, 0)
    with pytest.raises(ValueError, match="limit"):
        store.list_events(limit=0)


def test_reopen_closes_open_events_with_restart(store: EventStore, tmp_path: Path):
    e = ev(1, 10.0)
    store.apply([Change("new", None, e)])
    store.close()
    again = EventStore(store.url.render_as_string(hide_password=False), tmp_path / "media")
    closed = again.open(now=2000.0)
    assert [(c.type, c.after.id, c.after.end_reason) for c in closed] == [("end", e.id, "restart")]
    got = again.get(e.id)
    assert got is not None and got.end_reason == "restart" and got.end == e.peak_at
    assert [r.type for r in again.outbox_after(0)] == ["new", "end"]
    again.close()


def test_recorder_writes_off_the_callers_thread_and_the_pruner_runs(store: EventStore):
    woken: list[int] = []
    rec = EventRecorder(store, NullEventsObserver(), on_written=lambda: woken.append(1))
    e = ev(1, 10.0, end=11.0)
    rec.submit([Change("new", None, e)])
    rec.submit_media(e.id, lambda: (b"jpeg", b"png"))
    assert rec.flush()
    assert store.get(e.id) == e and woken == [1]
    assert store.media_path(e.id, "snapshot").read_bytes() == b"jpeg"
    rec.close()
    pruner = Pruner(store, NullEventsObserver(), retain_days=1, max_bytes=1 << 20,
                    interval_s=3600, clock=lambda: 1e9)  # fmt: skip
    assert pruner.run_once() == 1
    pruner.close()
    assert store.get(e.id) is None


CRASHER = """
import sys, time
from pathlib import Path
from segstream.stream.events.model import Change, Event
from segstream.stream.events.store import EventStore
s = EventStore(sys.argv[1], Path(sys.argv[2]))
s.open()
s.apply([Change("new", None, Event("a" * 32, "cam", "floor", "person", 10.0, 0.4, 11.0))])
print("written", flush=True)
time.sleep(60)
"""


def test_kill_9_during_an_open_event_then_restart(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CRASHER), url, str(tmp_path / "media")],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"written\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    s = EventStore(url, tmp_path / "media")
    closed = s.open(now=100.0)
    assert [(c.after.id, c.after.end_reason) for c in closed] == [("a" * 32, "restart")]
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    s.close()


def test_a_corrupt_or_unwritable_store_raises_a_clear_error(tmp_path: Path):
    bad = tmp_path / "events.db"
    bad.write_bytes(b"this is not a database" * 500)
    s = EventStore(f"sqlite:///{bad}", tmp_path / "media")
    with pytest.raises(
        EventStoreError, match=r"event store sqlite:///.*events.db: file is not a database"
    ):
        s.open()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    s = EventStore(f"sqlite:///{blocker / 'events.db'}", tmp_path / "media2")
    with pytest.raises(EventStoreError, match=r"event store .*file/events.db: .*File exists"):
        s.open()
    s = EventStore(f"sqlite:///{tmp_path / 'ok.db'}", blocker / "media")
    with pytest.raises(EventStoreError, match=r"event store .*ok.db: .*Not a directory"):
        s.open()


def test_an_unreachable_postgres_is_a_clear_error_without_the_password(tmp_path: Path):
    from support.peers import free_port

    s = EventStore(f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db", tmp_path / "m")
    with pytest.raises(EventStoreError) as e:
        s.open()
    assert "hunter2" not in str(e.value)
    assert "event store postgresql://u:***@127.0.0.1" in str(e.value)


@pytest.mark.e2e
def test_writes_wait_for_a_postgres_server_that_is_down(pg_server: Postgres, postgres: str,
                                                       tmp_path: Path):  # fmt: skip
    s = EventStore(empty_postgres(postgres), tmp_path / "media")
    s.open(now=1.0)
    rec = EventRecorder(s, NullEventsObserver())
    try:
        pg_server.stop_server()
        e = ev(1, 10.0)
        rec.submit([Change("new", None, e)])  # returns at once: the pipeline never waits
        assert wait_for(lambda: rec.error is not None, 10)
        assert rec.error is not None and rec.error.startswith("event store unavailable: ")
        pg_server.start()
        assert rec.flush(30)
        assert s.get(e.id) == e
        assert rec.error is None
        assert [r.type for r in s.outbox_after(0)] == ["new"]
    finally:
        rec.close()
        s.close()


def test_a_store_from_a_newer_version_is_a_clear_error(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    s = EventStore(url, tmp_path / "media")
    s.open()
    with s.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    s.close()
    with pytest.raises(EventStoreError, match="Can't locate revision identified by '9999'"):
        EventStore(url, tmp_path / "media").open()
