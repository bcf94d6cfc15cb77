"""Rules with hysteresis: coverage per zone and class in, event changes out.

Pure logic, no I/O and no clock of its own: every call takes `now` (epoch seconds), so tests
drive time. A rule opens an event once its class has covered more than `above` of the zone
for `for_s` seconds without a break, and closes it once coverage has stayed at or below
`above` for `clear_s` seconds; a dip shorter than `clear_s` (or a rise shorter than `for_s`)
changes nothing, so a value wobbling around the threshold does not flicker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from segstream.stream.events.config import RuleConfig, ZoneConfig
from segstream.stream.events.model import Change, EndReason, Event, new_id


@dataclass
class _RuleState:
    rule: RuleConfig
    above_since: float | None = None  # start of the current run above the threshold
    below_since: float | None = None  # start of the current run at or below it (while open)
    run_peak: float = 0.0  # the peak of the current run above, before the event opens
    run_peak_at: float = 0.0
    event: Event | None = None  # the open event
    sent: Event | None = None  # the event as last emitted (update rate limit)
    sent_at: float = 0.0


class StreamRules:
    """The rules of one stream's zones."""

    def __init__(self, stream: str, update_interval_s: float = 1.0) -> None:
        self.stream = stream
        self.update_interval_s = update_interval_s
        self._states: dict[tuple[str, str], _RuleState] = {}

    def open_events(self) -> list[Event]:
        return [s.event for s in self._states.values() if s.event is not None]

    def set_zones(self, zones: Sequence[ZoneConfig], now: float) -> list[Change]:
        """Apply a zone edit live: new rules start idle, changed thresholds keep their state,
        events of removed zones (or of a class no longer in the zone's rules) end with
        `zone_removed`."""
        wanted = {(z.name, r.class_name): r for z in zones for r in z.rules}
        changes: list[Change] = []
        for key in list(self._states):
            if key not in wanted:
                changes += self._close(self._states.pop(key), now, "zone_removed")
        for key, rule in wanted.items():
            if key in self._states:
                self._states[key].rule = rule
            else:
                self._states[key] = _RuleState(rule)
        return changes

    def close_all(self, now: float, reason: EndReason) -> list[Change]:
        """End every open event (stream removed, shutdown); rules go back to idle."""
        changes: list[Change] = []
        for key, st in self._states.items():
            changes += self._close(st, now, reason)
            self._states[key] = _RuleState(st.rule)
        return changes

    def update(self, coverage: Mapping[str, Mapping[str, float]], now: float) -> list[Change]:
        """Feed one frame's coverage ({zone: {class: fraction}}; a class not named covers 0)."""
        changes: list[Change] = []
        for (zone, cls), st in self._states.items():
            c = coverage.get(zone, {}).get(cls, 0.0)
            if st.event is None:
                changes += self._idle(st, zone, cls, c, now)
            else:
                changes += self._active(st, c, now)
        return changes

    def _idle(self, st: _RuleState, zone: str, cls: str, c: float, now: float) -> list[Change]:
        if c <= st.rule.above:
            st.above_since = None
            return []
        if st.above_since is None:
            st.above_since, st.run_peak, st.run_peak_at = now, c, now
        elif c > st.run_peak:
            st.run_peak, st.run_peak_at = c, now
        if now - st.above_since < st.rule.for_s:
            return []
        ev = Event(new_id(), self.stream, zone, cls, st.above_since, st.run_peak, st.run_peak_at)
        st.event, st.sent, st.sent_at, st.below_since = ev, ev, now, None
        return [Change("new", None, ev)]

    def _active(self, st: _RuleState, c: float, now: float) -> list[Change]:
        assert st.event is not None
        if c > st.rule.above:
            st.below_since = None
            if c > st.event.peak_coverage:
                st.event = st.event.replace(peak_coverage=c, peak_at=now)
            return self._maybe_update(st, now)
        if st.below_since is None:
            st.below_since = now
        if now - st.below_since < st.rule.clear_s:
            return self._maybe_update(st, now)
        return self._close(st, st.below_since, "cleared")

    def _maybe_update(self, st: _RuleState, now: float) -> list[Change]:
        assert st.event is not None and st.sent is not None
        if st.event == st.sent or now - st.sent_at < self.update_interval_s:
            return []
        before, st.sent, st.sent_at = st.sent, st.event, now
        return [Change("update", before, st.event)]

    def _close(self, st: _RuleState, end: float, reason: EndReason) -> list[Change]:
        st.above_since = st.below_since = None
        if st.event is None:
            return []
        before = st.sent or st.event
        after = st.event.replace(end=max(end, st.event.start), end_reason=reason)
        st.event = st.sent = None
        return [Change("end", before, after)]
