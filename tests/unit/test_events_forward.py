"""Cluster mode's events without Ray: node features that forward to one events hub (the hub's
plain class on this loop, a real SQLite store). One history however a stream moves: a batch
taken twice, a move with the old node's end arriving late, a dead node's open event, a node
that comes back after its stream moved; and a hub away for a while loses nothing within the
node's bound (the oldest changes dropped and counted beyond it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support.events_helpers import LABELS, person_mask, zone

from segstream.stream.cluster.events_hub import EventsHub
from segstream.stream.config import AppConfig
from segstream.stream.events.config import EventsConfig
from segstream.stream.events.forward import Batch, Claim, Clip, ForwardingEventsFeature


class Hub:
    """The hub on the test's loop; nodes' threads send to it (as through Ray)."""

    def __init__(self, tmp: Path) -> None:
        cfg = AppConfig.model_validate(
            {"events": {"database": f"sqlite:///{tmp / 'hub.db'}"}, "streams": []}
        )
        self.cfg_json = cfg.model_dump_json()
        self.hub = EventsHub(self.cfg_json)
        self.loop = asyncio.get_running_loop()
        self.down = False
        self.twice = False
        self.batches: list[Batch] = []

    def send(self, batch: Batch) -> str:
        if self.down:
            raise ConnectionError("hub away")
        run = asyncio.run_coroutine_threadsafe
        got = str(run(self.hub.ingest(batch), self.loop).result(30))
        if self.twice:  # the answer was lost: the node sends the batch again
            got = str(run(self.hub.ingest(batch), self.loop).result(30))
        self.batches.append(batch)
        return got

    def feed(self) -> list[tuple[str, str, str | None]]:
        """The outbox: (type, event id, end reason) of every change, in order."""
        rows = self.hub.feature.store.outbox_after(0, 1000)
        out = []
        for r in rows:
            after = json.loads(r.payload)["after"]
            out.append((r.type, after["id"], after["end_reason"]))
        return out


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = Hub(tmp_path)
    await h.hub.ready()
    yield h
    await h.hub.close()


async def node(hub: Hub, name: str, clock: Callable[[], float] = lambda: 0.0, **kw: Any):
    f = ForwardingEventsFeature(
        EventsConfig(**kw), labels=LABELS, send=hub.send, node=name, clock=clock
    )
    await f.start()
    return f


async def flushed(*nodes: ForwardingEventsFeature) -> None:
    for f in nodes:
        assert await asyncio.to_thread(f.forwarder.flush, 10)


async def test_a_batch_taken_twice_is_one_history_with_media(hub: Hub) -> None:
    hub.twice = True
    a = await node(hub, "A")
    a.set_stream("plain", [])  # a stream without zones: nothing for the hub
    await flushed(a)
    assert hub.batches == []
    a.set_stream("cam", [zone("floor", clear_s=0.5)])
    a.on_mask("cam", person_mask(0.5), now=10.0, snapshot=lambda: b"jpeg10")
    a.on_mask("cam", person_mask(0.7), now=11.5, snapshot=lambda: b"jpeg11")  # update: peak
    a.on_mask("cam", person_mask(0.0), now=12.0)
    a.on_mask("cam", person_mask(0.0), now=12.6)  # cleared
    await flushed(a)
    feed = hub.feed()
    assert [(t, r) for t, _, r in feed] == [("new", None), ("update", None), ("end", "cleared")]
    ev = hub.hub.feature.store.get(feed[0][1])
    assert ev is not None and (ev.start, ev.end, ev.peak_at) == (10.0, 12.0, 11.5)
    assert hub.hub.feature.store.media_path(ev.id, "snapshot").read_bytes() == b"jpeg11"
    page = hub.hub._answer("list_events", _query(stream="cam"))
    assert [e.id for e in page.events] == [ev.id]
    await a.close()


def _query(**kw: Any) -> Any:
    from segstream.stream.schemas import EventQuery

    return EventQuery.model_validate(kw)


async def test_a_moved_stream_has_one_history(hub: Hub) -> None:
    """A runs `cam` with an open event; B takes it (claims) while A still runs it (A was
    silenced, then came back for a moment before it was killed): the hub ends A's event
    (`restart`, at its peak), drops A's late end, the event A opens afterwards and A's
    release; B's event is the only one open."""
    a, b = await node(hub, "A"), await node(hub, "B")
    zones = [zone("floor")]
    a.set_stream("cam", zones)
    a.on_mask("cam", person_mask(0.5), now=10.0, snapshot=lambda: b"a")
    await flushed(a)
    b.set_stream("cam", zones)  # the move: B claims the stream
    await flushed(b)
    a.on_mask("cam", person_mask(0.0), now=11.0)
    a.on_mask("cam", person_mask(0.0), now=11.6)  # A's end (cleared): too late
    a.on_mask("cam", person_mask(0.5), now=14.0, snapshot=lambda: b"a2")  # not A's stream
    a.remove_stream("cam")  # its end and A's release
    b.on_mask("cam", person_mask(0.6), now=15.0, snapshot=lambda: b"b")
    await flushed(a, b)
    feed = hub.feed()
    first = feed[0][1]
    assert [(t, r) for t, _, r in feed] == [("new", None), ("end", "restart"), ("new", None)]
    assert feed[1][1] == first and feed[2][1] != first
    store = hub.hub.feature.store
    old, new = store.get(first), store.get(feed[2][1])
    assert old is not None and (old.end, old.end_reason) == (10.0, "restart")
    assert new is not None and new.end is None and new.start == 15.0
    assert store.media_path(new.id, "snapshot").read_bytes() == b"b"
    assert hub.hub.owner == {"cam": "B"}
    # B's stream leaves B for good (deleted): its event ends once.
    b.remove_stream("cam")
    await flushed(b)
    assert hub.feed()[-1] == ("end", new.id, "stream_removed") and len(hub.feed()) == 4
    await a.close()
    await b.close()


async def test_a_hub_away_loses_nothing_within_the_bound(hub: Hub) -> None:
    now = [0.0]
    a = await node(hub, "A", clock=lambda: now[0], outbox_max=100)
    a.set_stream("cam", [zone("floor", clear_s=0.0)])
    await flushed(a)
    hub.down = True
    t = 100.0
    for _ in range(10):  # ten events while the hub is away: 20 changes
        a.on_mask("cam", person_mask(0.5), now=t)
        a.on_mask("cam", person_mask(0.0), now=t + 0.5)
        t += 1
    await asyncio.sleep(0.5)  # the forwarder tries (and fails) meanwhile
    assert a.health()["status"] == "error" and "unreachable" in a.health()["reason"]
    assert hub.feed() == []
    hub.down = False
    await flushed(a)
    assert [ty for ty, _, _ in hub.feed()] == ["new", "end"] * 10
    assert a.forwarder.dropped == 0 and a.health() == {"status": "ok"}

    b = await node(hub, "B")
    b.forwarder.max_items = 6  # a small bound: the oldest changes go
    b.set_stream("cam2", [zone("floor", clear_s=0.0)])
    await flushed(b)
    hub.down = True
    for i in range(8):
        b.on_mask("cam2", person_mask(0.5), now=200.0 + i)
        b.on_mask("cam2", person_mask(0.0), now=200.5 + i)
    assert b.forwarder.dropped == 10  # 16 changes (one item each), 6 kept
    hub.down = False
    await flushed(b)
    # The three newest events arrive whole; nothing of the five before.
    assert [(ty, r) for ty, _, r in hub.feed()[20:]] == [("new", None), ("end", "cleared")] * 3
    await a.close()
    await b.close()


async def test_a_restarted_hub_ends_what_was_open_and_gets_the_claims_again(hub: Hub) -> None:
    a = await node(hub, "A")
    a.set_stream("cam", [zone("floor")])
    a.on_mask("cam", person_mask(0.5), now=10.0)
    await flushed(a)
    await hub.hub.close()
    hub.hub = EventsHub(hub.cfg_json)  # Ray restarts the actor: same store, new instance
    await hub.hub.ready()
    a.on_mask("cam", person_mask(0.8), now=12.0)  # a peak of the event the hub ended: dropped
    await flushed(a)
    assert [(t, r) for t, _, r in hub.feed()] == [("new", None), ("end", "restart")]
    assert hub.hub.owner == {"cam": "A"} and isinstance(hub.batches[-1].items[0], Claim)
    await a.close()


async def test_a_stale_claim_does_not_take_a_stream_back(hub: Hub) -> None:
    """A claimed `cam` but could not reach the hub; `cam` moved to B meanwhile. A's claim,
    arriving last, is older than B's: B keeps the stream and its open event."""
    cut = True

    def a_send(batch: Batch) -> str:
        if cut:
            raise ConnectionError("A cut off")
        return hub.send(batch)

    a = ForwardingEventsFeature(EventsConfig(), labels=LABELS, send=a_send, node="A")
    await a.start()
    b = await node(hub, "B")
    a.set_stream("cam", [zone("floor")])
    await asyncio.sleep(0.05)
    b.set_stream("cam", [zone("floor")])
    b.on_mask("cam", person_mask(0.5), now=10.0)
    await flushed(b)
    cut = False
    await flushed(a)
    assert hub.hub.owner == {"cam": "B"}
    assert [(t, r) for t, _, r in hub.feed()] == [("new", None)]
    await a.close()
    await b.close()


async def test_a_finished_clip_moves_to_the_hub_and_leaves_the_node(hub: Hub) -> None:
    """A clip the node recorded (the ClipSet calls _clip_done) is sent once, stored in the
    hub's media folder and named in the event; the node's file goes. With the hub away past
    the node's bound, the oldest clip is dropped and its file removed too."""
    a = await node(hub, "A")
    a.set_stream("cam", [zone("floor", clear_s=0.5)])
    a.on_mask("cam", person_mask(0.5), now=10.0, snapshot=lambda: b"jpeg")
    a.on_mask("cam", person_mask(0.0), now=11.0)
    a.on_mask("cam", person_mask(0.0), now=11.6)  # cleared
    await flushed(a)
    eid = hub.feed()[0][1]
    local = a.store.media_path(eid, "clip")
    local.write_bytes(b"mp4" * 1000)
    a._clip_done(eid, local, 3000, True)
    await flushed(a)
    store = hub.hub.feature.store
    assert store.media_path(eid, "clip").read_bytes() == b"mp4" * 1000
    ev = store.get(eid)
    assert ev is not None and (ev.clip_bytes, ev.clip_truncated) == (3000, True)
    assert not local.exists()
    # The hub away, room for one picture or clip: the older clip is dropped, file and all.
    hub.down, a.forwarder.max_media = True, 1
    first, second = a.clip_dir / "first.mp4", a.clip_dir / "second.mp4"
    for p in (first, second):
        p.write_bytes(b"x")
        a._clip_done(eid, p, 1, False)
    assert not first.exists() and second.exists() and a.forwarder.dropped == 1
    hub.down = False
    await flushed(a)
    assert not second.exists()
    # Two clips at once travel in two batches: one clip's bytes in memory at a time.
    hub.batches.clear()
    a.forwarder.max_media = 200  # room for both (at 1 the older would be dropped)
    hub.down = True  # both queued before anything is sent
    for name in ("third", "fourth"):
        (a.clip_dir / name).write_bytes(b"y")
        a._clip_done(eid, a.clip_dir / name, 1, False)
    hub.down = False
    await flushed(a)
    per_batch = [n for b in hub.batches if (n := sum(isinstance(it, Clip) for it in b.items))]
    assert sorted(per_batch) == [1, 1], per_batch
    clip_dir = a.clip_dir
    await a.close()
    assert not clip_dir.exists()  # the node's private clip folder goes with the feature
