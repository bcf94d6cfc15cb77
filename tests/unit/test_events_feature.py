"""The feature as the service will call it: coverage + rules + store + media, stream and zone
lifecycle, and /healthz's error state for a bad store (streams keep working)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from support.events_helpers import LABELS, RecordingObserver, person_mask, zone

from segstream.stream.events.config import EventsConfig
from segstream.stream.events.feature import EventsFeature


def feature(tmp: Path, **kw) -> EventsFeature:
    return EventsFeature(EventsConfig(**kw), home=tmp, labels=LABELS, observer=RecordingObserver())


async def test_events_are_stored_with_peak_media_and_closed_on_removal(tmp_path: Path):
    f = feature(tmp_path)
    await f.start()
    shots: list[float] = []

    def snap(t: float):
        def take() -> bytes:
            shots.append(t)
            return b"jpeg@%g" % t

        return take

    try:
        f.set_stream("cam", [zone("floor"), zone("door", cls="dog")])
        cov = f.on_mask("cam", person_mask(0.3), now=10.0, snapshot=snap(10.0))
        assert cov == {
            "floor": pytest.approx({"background": 0.7, "person": 0.3}),
            "door": pytest.approx({"background": 0.7, "dog": 0.0, "person": 0.3}),
        }
        assert f.observer.coverage[("cam", "door")] == cov["door"]  # type: ignore[attr-defined]
        f.on_mask("cam", person_mask(0.4), now=10.5, snapshot=snap(10.5))  # peak, too soon
        f.on_mask("cam", person_mask(0.6), now=11.2, snapshot=snap(11.2))  # peak: media again
        f.on_mask("cam", person_mask(0.5), now=12.5, snapshot=snap(12.5))  # no new peak
        assert shots == [10.0, 11.2]
        assert f.zones("cam") == [
            {"name": "floor", "coverage": pytest.approx({"background": 0.5, "person": 0.5}),
             "active": ["person"]},
            {"name": "door", "coverage": pytest.approx({"background": 0.5, "dog": 0.0,
             "person": 0.5}), "active": []},
        ]  # fmt: skip
        assert f.recorder is not None and f.recorder.flush()
        (ev,), _ = f.store.list_events()
        assert (ev.zone, ev.start, ev.end, ev.peak_coverage, ev.peak_at) == (
            "floor", 10.0, None, pytest.approx(0.6), 11.2)  # fmt: skip
        assert f.store.media_path(ev.id, "snapshot").read_bytes() == b"jpeg@11.2"
        png = cv2.imdecode(
            np.frombuffer(f.store.media_path(ev.id, "mask").read_bytes(), np.uint8),
            cv2.IMREAD_UNCHANGED,
        )
        assert np.array_equal(png, person_mask(0.6))
        f.remove_stream("cam")
        assert f.on_mask("cam", person_mask(0.6), now=13.0) == {}
        assert f.recorder.flush()
        done = f.store.get(ev.id)
        assert done is not None and done.end_reason == "stream_removed"
        assert f.health() == {"status": "ok"}
    finally:
        await f.close()


async def test_no_zones_no_work_and_unknown_classes_are_refused(tmp_path: Path):
    f = feature(tmp_path)
    await f.start()
    try:
        f.set_stream("cam", [])

        def never() -> bytes:
            raise AssertionError("no snapshot without zones")

        assert f.on_mask("cam", person_mask(1.0), now=1.0, snapshot=never) == {}
        with pytest.raises(ValueError, match="unknown class in rules: horse"):
            f.set_stream("cam", [zone(cls="horse")])
    finally:
        await f.close()


async def test_shutdown_closes_open_events(tmp_path: Path):
    f = feature(tmp_path)
    await f.start()
    f.set_stream("cam", [zone()])
    f.on_mask("cam", person_mask(0.5), now=1.0)
    await f.close()
    again = feature(tmp_path)
    await again.start()
    try:
        (ev,), _ = again.store.list_events()
        assert ev.end_reason == "shutdown"
    finally:
        await again.close()


async def test_a_corrupt_store_is_an_error_in_health_and_coverage_goes_on(tmp_path: Path):
    (tmp_path / "events.db").write_bytes(b"garbage" * 1000)
    f = feature(tmp_path)
    await f.start()  # does not raise: streams keep playing
    try:
        h = f.health()
        assert h["status"] == "error"
        assert "events.db: file is not a database" in h["reason"]
        f.set_stream("cam", [zone()])
        assert f.on_mask("cam", person_mask(0.5), now=1.0)["floor"]["person"] == 0.5
    finally:
        await f.close()
