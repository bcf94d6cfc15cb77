"""Render stage: overlay drawing (`overlay`), each stream's fan-out to its sinks (`fanout`)
and the threads that run it (`stage`)."""

from __future__ import annotations

from segstream.stream.lifecycle import RateMeter
from segstream.stream.render.fanout import StreamView, Variant, VariantLimit
from segstream.stream.render.overlay import (
    BACKGROUND_NAMES,
    Renderer,
    class_fractions,
    keep_lut,
    none_id,
)
from segstream.stream.render.stage import RenderStage

__all__ = [
    "BACKGROUND_NAMES",
    "RateMeter",
    "RenderStage",
    "Renderer",
    "StreamView",
    "Variant",
    "VariantLimit",
    "class_fractions",
    "keep_lut",
    "none_id",
]
