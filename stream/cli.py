"""`segstream` command line: serve, fetch, predict, evaluate, train, export."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    from stream.config import ConfigError, load_config
    from stream.server import serve

    overrides: dict[str, Any] = {}
    for key, section, field in (
        ("host", "server", "host"),
        ("port", "server", "port"),
        ("model", "model", "name"),
        ("backend", "model", "backend"),
        ("latency_target_ms", "scheduler", "latency_target_ms"),
        ("log_level", None, "log_level"),
    ):
        value = getattr(args, key)
        if value is not None:
            (overrides.setdefault(section, {}) if section else overrides)[field] = value
    try:
        cfg = load_config(args.config, overrides=overrides, extra_sources=args.source)
    except ConfigError as e:
        print(f"segstream: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not cfg.streams:
        logging.warning("no streams configured: add --source URL or a streams: list")
    return asyncio.run(serve(cfg))


def _register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the streaming service")
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument(
        "--source", action="append", default=[], metavar="[ID=]URL",
        help="add a stream: rtsp://..., http://..., a file, or a device (0, /dev/video0)",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model", help="model name (see `segstream fetch --list`)")
    p.add_argument("--backend", choices=["auto", "keras", "tflite"])
    p.add_argument("--latency-target-ms", type=float, dest="latency_target_ms")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    from models import fetch
    from models.tools import evaluate, export, predict, train

    parser = argparse.ArgumentParser(
        prog="segstream", description="Real-time video segmentation with mobile DeepLab."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _register_serve(sub)
    fetch.register(sub)
    predict.register(sub)
    evaluate.register(sub)
    train.register(sub)
    export.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
