"""The events feature's metrics seam: calls go to an injected object, never to Prometheus
directly (the service's PrometheusObserver implements these at wiring time)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

# delivered; failed (will be retried); rejected (a 4xx answer: dropped, never retried)
DeliveryOutcome = Literal["delivered", "failed", "rejected"]


class EventsObserver(Protocol):
    def zone_coverage(self, stream: str, zone: str, coverage: Mapping[str, float]) -> None:
        """zone_coverage_ratio{stream,zone,class_name}: classes that occur plus rule classes
        (called per segmented frame of a stream with zones)."""

    def event_opened(self, stream: str, zone: str, class_name: str) -> None:
        """events_total{stream,zone,class_name}"""

    def delivery(self, target: str, outcome: DeliveryOutcome) -> None:
        """event_deliveries_total{target,outcome}"""

    def outbox_size(self, size: int) -> None:
        """event_outbox_size"""

    def outbox_dropped(self, count: int) -> None:
        """Undelivered changes dropped to keep the outbox bounded (event_outbox_dropped_total)."""


class NullEventsObserver:
    def zone_coverage(self, stream: str, zone: str, coverage: Mapping[str, float]) -> None:
        pass

    def event_opened(self, stream: str, zone: str, class_name: str) -> None:
        pass

    def delivery(self, target: str, outcome: DeliveryOutcome) -> None:
        pass

    def outbox_size(self, size: int) -> None:
        pass

    def outbox_dropped(self, count: int) -> None:
        pass
