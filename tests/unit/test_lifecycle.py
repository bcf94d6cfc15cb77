"""A stream's whole life in one service process, with the real model, real sources and a real: the
parts that need no model and no peers (the rest: tests/e2e/test_lifecycle.py)."""

from __future__ import annotations

import numpy as np

from segstream.stream.config import AppConfig
from segstream.stream.metrics import PrometheusObserver
from segstream.stream.service import Service


def config(**model: object) -> AppConfig:
    return AppConfig.model_validate(
        {
            "model": {
                "name": "mnv2-voc",
                "backend": "tflite",
                "workers": 1,
                "threads": 1,
                "max_batch": 1,
                **model,
            },
            "server": {"shutdown_timeout": 2.0},
        }
    )


def test_two_services_in_one_process_keep_their_own_series() -> None:
    a, b = Service(config()), Service(config())
    assert a.metrics is not None and b.metrics is not None
    assert a.metrics.registry is not b.metrics.registry
    a.observer.stream_added("cam")
    a.observer.frame("cam", "captured")
    b.observer.stream_added("cam")
    get = "segstream_frames_total"
    labels = {"stream": "cam", "outcome": "captured"}
    assert a.metrics.registry.get_sample_value(get, labels) == 1.0
    assert b.metrics.registry.get_sample_value(get, labels) == 0.0
    a.observer.stream_removed("cam")
    a.observer.frame("cam", "captured")  # a late event must not re-create the series
    assert a.metrics.registry.get_sample_value(get, labels) is None


def test_metrics_observer_implements_the_protocol() -> None:
    """Both observers have every method of the protocol, with its parameters; the Prometheus
    one turns class fractions into gauges for as long as the stream exists."""
    import inspect

    from segstream.stream.observer import NullObserver, Observer

    methods = [n for n, f in vars(Observer).items() if callable(f) and not n.startswith("_")]
    assert "class_fractions" in methods and len(methods) >= 20, methods
    for cls in (NullObserver, PrometheusObserver):
        for name in methods:
            want = list(inspect.signature(getattr(Observer, name)).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            assert got == want, (cls.__name__, name, got, want)

    obs = PrometheusObserver()
    get = obs.registry.get_sample_value
    person = {"stream": "x", "class_name": "person"}
    obs.stream_added("x")
    obs.class_fractions("x", ["background", "person"], np.array([0.25, 0.75]))
    assert get("segstream_class_pixel_fraction", person) == 0.75
    assert get("segstream_class_pixel_fraction", {**person, "class_name": "background"}) == 0.25
    obs.class_fractions("x", ["background", "person"], np.array([0.5, 0.5]))
    assert get("segstream_class_pixel_fraction", person) == 0.5
    obs.stream_removed("x")
    assert get("segstream_class_pixel_fraction", person) is None
    obs.class_fractions("x", ["background", "person"], np.array([0.0, 1.0]))  # late
    assert get("segstream_class_pixel_fraction", person) is None
