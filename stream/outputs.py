"""The sink registry: the outputs a stream's config can turn on, by name.

Each entry names a sink and says how to make it from a stream's config (None: the config
leaves it off) and which of the stream's settings it is made from. The service makes every
registered sink a stream's config turns on, starts it, hands it each annotated frame (a sink
that raises is counted and skipped; the others still get the frame), replaces it alone when
its settings change (PATCH applies live, the reader is not touched), and closes it with the
stream.

Adding a sink: one module with the sink (a `datatypes.Sink` with `name`, `start()` and
`status()`) and its `from_config(scfg, observer)`, and one line in SINKS below. Its settings
are the StreamConfig field of the same name (a model of their own in stream/config.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from segstream.stream.config import StreamConfig
from segstream.stream.datatypes import Sink
from segstream.stream.observer import Observer
from segstream.stream.restream import RestreamSink


class ManagedSink(Sink, Protocol):
    """A sink the service makes from a stream's config and runs for it."""

    name: str

    def start(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """For the API's stream status (under the sink's name)."""
        ...


@dataclass(frozen=True)
class SinkKind:
    make: Callable[[StreamConfig, Observer], ManagedSink | None]
    # The stream settings it is made from: a change to one replaces the sink (its own
    # settings field, the one named like the sink, is live: it never restarts the reader).
    fields: frozenset[str]


SINKS: dict[str, SinkKind] = {
    "restream": SinkKind(RestreamSink.from_config, frozenset({"restream", *RestreamSink.USES})),
}


def make_sinks(scfg: StreamConfig, observer: Observer) -> dict[str, ManagedSink]:
    """The registered sinks the stream's config turns on, by name (not started yet)."""
    made = {name: kind.make(scfg, observer) for name, kind in SINKS.items()}
    return {name: sink for name, sink in made.items() if sink is not None}
