"""The HTTP API: endpoint declarations (spec.py) and their views, grouped by concern."""
