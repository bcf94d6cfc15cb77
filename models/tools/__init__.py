"""Offline tools behind the CLI: ``predict``, ``evaluate``, ``train``, ``export``.

They read images and label masks through ``data`` and score through ``metrics``; the
streaming service imports none of them (only ``data.encode_palette_png``).
"""
