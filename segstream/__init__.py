"""segstream: real-time video segmentation as a service.

The installed distribution claims this one top-level name; the service is `segstream.stream`
and the model library `segstream.models` (the repository's `stream/` and `models/` folders).
"""

__version__ = "0.2.0"
