"""Shared pieces of the events tests: a recording observer and synthetic masks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from segstream.stream.events.config import ZoneConfig

LABELS = ["background", "cat", "dog", "person"]
PERSON = 3
WHOLE = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]


class RecordingObserver:
    def __init__(self) -> None:
        self.opened: Counter[tuple[str, str, str]] = Counter()
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.sizes: list[int] = []
        self.dropped = 0
        self.coverage: dict[tuple[str, str], dict[str, float]] = {}

    def zone_coverage(self, stream: str, zone: str, coverage: Mapping[str, float]) -> None:
        self.coverage[(stream, zone)] = dict(coverage)

    def event_opened(self, stream: str, zone: str, class_name: str) -> None:
        self.opened[(stream, zone, class_name)] += 1

    def delivery(self, target: str, outcome: str) -> None:
        self.deliveries[(target, outcome)] += 1

    def outbox_size(self, size: int) -> None:
        self.sizes.append(size)

    def outbox_dropped(self, count: int) -> None:
        self.dropped += count


def person_mask(fraction: float, size: int = 100) -> np.ndarray:
    """A size x size mask whose top rows (fraction of the frame) are `person`."""
    m = np.zeros((size, size), np.uint8)
    m[: round(fraction * size)] = PERSON
    return m


def zone(name: str = "floor", above: float = 0.1, for_s: float = 0.0, clear_s: float = 0.5,
         cls: str = "person") -> ZoneConfig:  # fmt: skip
    return ZoneConfig.model_validate(
        {
            "name": name,
            "polygon": WHOLE,
            "rules": [{"class": cls, "above": above, "for_s": for_s, "clear_s": clear_s}],
        }
    )
