"""Rules: hysteresis, for_s / clear_s, peak updates, live zone edits (time is injected)."""

from __future__ import annotations

from segstream.stream.events.config import RuleConfig, ZoneConfig
from segstream.stream.events.model import Change
from segstream.stream.events.rules import StreamRules

BOX = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]


def zone(name: str = "floor", **rules: tuple[float, float, float]) -> ZoneConfig:
    return ZoneConfig(
        name=name,
        polygon=BOX,
        rules=[
            RuleConfig.model_validate({"class": c, "above": a, "for_s": f, "clear_s": cl})
            for c, (a, f, cl) in rules.items()
        ],
    )


def feed(rules: StreamRules, values: list[float], t0: float = 0.0, dt: float = 0.1,
         zone_name: str = "floor", cls: str = "person") -> list[tuple[float, Change]]:  # fmt: skip
    """One frame every dt seconds with the class at each coverage value."""
    out = []
    for k, v in enumerate(values):
        t = round(t0 + k * dt, 6)
        out += [(t, ch) for ch in rules.update({zone_name: {cls: v}}, t)]
    return out


def kinds(changes: list[tuple[float, Change]]) -> list[tuple[float, str]]:
    return [(t, ch.type) for t, ch in changes]


def test_opens_after_for_s_and_closes_after_clear_s():
    r = StreamRules("cam")
    r.set_zones([zone(person=(0.1, 1.0, 3.0))], 0.0)
    # 0.5 s below, then above from t=0.5 on
    got = feed(r, [0.0] * 5 + [0.3] * 20)
    assert kinds(got) == [(1.5, "new")]  # above since 0.5, for 1.0 s
    ev = got[0][1].after
    assert (ev.stream, ev.zone, ev.class_name, ev.start, ev.end) == (
        "cam",
        "floor",
        "person",
        0.5,
        None,
    )
    assert ev.peak_coverage == 0.3
    # below from t=2.5: ends at 5.5 (clear_s 3), dated at the start of the quiet period
    got = feed(r, [0.05] * 40, t0=2.5)
    assert kinds(got) == [(5.5, "end")]
    end = got[0][1]
    assert end.before is not None and end.before.end is None
    assert (end.after.id, end.after.end, end.after.end_reason) == (ev.id, 2.5, "cleared")


def test_no_flicker_across_the_threshold():
    r = StreamRules("cam")
    r.set_zones([zone(person=(0.1, 1.0, 2.0))], 0.0)
    # 10 s wobbling 0.11 / 0.09 every frame (10 fps)
    wobble = [0.11 if k % 2 == 0 else 0.09 for k in range(100)]
    got = feed(r, wobble)
    # above runs last one frame: never for_s in a row, so it never opens
    assert got == []
    # two frames above, one below, repeatedly: still never for 1 s without a break
    assert feed(r, [0.2, 0.2, 0.0] * 30, t0=10.0) == []
    # a steady rise opens; then a wobble with dips shorter than clear_s keeps it open
    got = feed(r, [0.2] * 11 + wobble, t0=20.0)
    assert [k for _, k in kinds(got)] == ["new"]
    # and a steady quiet closes it once, dated from the wobble's last dip (t=31.0)
    got = feed(r, [0.0] * 30, t0=31.1)
    assert kinds(got) == [(33.0, "end")]
    assert got[0][1].after.end == 31.0


def test_a_spike_shorter_than_for_s_opens_nothing():
    r = StreamRules("cam")
    r.set_zones([zone(person=(0.1, 1.0, 1.0))], 0.0)
    assert feed(r, [0.0, 0.9, 0.9, 0.9, 0.0, 0.0]) == []
    # for_s 0: the first frame above opens
    r.set_zones([zone(person=(0.1, 0.0, 1.0))], 1.0)
    assert kinds(feed(r, [0.0, 0.5], t0=2.0)) == [(2.1, "new")]


def test_peak_updates_at_most_once_per_interval():
    r = StreamRules("cam", update_interval_s=1.0)
    r.set_zones([zone(person=(0.1, 0.0, 1.0))], 0.0)
    # growing every frame for 3 s, 10 fps
    got = feed(r, [0.2 + 0.01 * k for k in range(31)])
    assert kinds(got) == [(0.0, "new"), (1.0, "update"), (2.0, "update"), (3.0, "update")]
    last = got[-1][1]
    assert last.before is not None and last.before.peak_coverage < last.after.peak_coverage
    assert last.after.peak_coverage == 0.2 + 0.01 * 30
    assert last.after.peak_at == 3.0
    # a steady value (no new peak): no update
    assert feed(r, [0.3] * 30, t0=3.1) == []
    # the end carries the peak
    got = feed(r, [0.0] * 15, t0=6.1)
    assert got[-1][1].type == "end" and got[-1][1].after.peak_coverage == 0.5


def test_zone_edits_apply_live():
    r = StreamRules("cam")
    r.set_zones([zone("floor", person=(0.1, 0.0, 5.0)), zone("door", person=(0.1, 0.0, 5.0))], 0)
    got = [ch for ch in r.update({"floor": {"person": 0.5}, "door": {"person": 0.5}}, 1.0)]
    assert sorted(ch.after.zone for ch in got) == ["door", "floor"]
    ids = {ch.after.zone: ch.after.id for ch in got}
    # threshold raised on floor: the open event stays (state kept), nothing emitted
    assert (
        r.set_zones(
            [zone("floor", person=(0.6, 0.0, 5.0)), zone("door", person=(0.1, 0.0, 5.0))], 2.0
        )
        == []
    )
    # door removed: its event ends with zone_removed at once
    ends = r.set_zones([zone("floor", person=(0.6, 0.0, 5.0))], 3.0)
    assert [(c.type, c.after.id, c.after.end, c.after.end_reason) for c in ends] == [
        ("end", ids["door"], 3.0, "zone_removed")
    ]
    # a rule's class removed from a zone counts as removed too
    ends = r.set_zones([zone("floor", dog=(0.1, 0.0, 1.0))], 4.0)
    assert [(c.after.id, c.after.end_reason) for c in ends] == [(ids["floor"], "zone_removed")]
    # the new rule works
    assert kinds(feed(r, [0.5], t0=5.0, cls="dog")) == [(5.0, "new")]
    assert [ch.after.end_reason for ch in r.close_all(6.0, "shutdown")] == ["shutdown"]
    assert r.open_events() == []


def test_classes_are_independent_and_absent_means_zero():
    r = StreamRules("cam")
    r.set_zones([zone(person=(0.1, 0.0, 0.5), dog=(0.1, 0.0, 0.5))], 0.0)
    got = r.update({"floor": {"person": 0.4}}, 1.0)
    assert [(c.type, c.after.class_name) for c in got] == [("new", "person")]
    assert r.update({}, 1.2) == []
    got = r.update({}, 1.7)
    assert [(c.type, c.after.class_name, c.after.end) for c in got] == [("end", "person", 1.2)]
