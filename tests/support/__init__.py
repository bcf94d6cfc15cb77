"""Helpers the tests share: real peers (RTSP server, Chromium, Prometheus), the service
as a subprocess, bounded waits, and the API suite run against a node and a gateway."""
