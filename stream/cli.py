"""`segstream` command line: serve, token, fetch, predict, evaluate, train, export."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_MODEL_TYPES = {"mobile": "mnv2-voc"}  # IBM MAX's MODEL_TYPE; "full" (Xception) is not here


def _serve(args: argparse.Namespace) -> int:
    from segstream.stream.config import ConfigError, load_config
    from segstream.stream.sanitize import install_log_filter, sanitize_text
    from segstream.stream.server import serve

    overrides: dict[str, Any] = {}
    model_type = os.environ.get("MODEL_TYPE")
    if model_type is not None and args.model is None:
        if model_type not in MAX_MODEL_TYPES:
            print(
                f"segstream: MODEL_TYPE={model_type!r} is not available: segstream serves "
                f"MODEL_TYPE=mobile (DeepLabv3 MobileNetV2, {MAX_MODEL_TYPES['mobile']}); "
                "the Xception 'full' model is not shipped",
                file=sys.stderr,
            )
            return 2
        args.model = MAX_MODEL_TYPES[model_type]
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
        print(f"segstream: {sanitize_text(str(e))}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_log_filter()  # no camera credential in any log line
    if not cfg.streams:
        logging.warning("no streams configured: add --source URL or a streams: list")
    state = state_path(args, cfg.server.state_file)
    logging.info(
        "stream set kept in %s", state if state else "no state file (--state none): not kept"
    )
    if args.cluster:
        from segstream.stream.cluster.gateway import serve_cluster

        return asyncio.run(serve_cluster(cfg, args.cluster, state))
    return asyncio.run(serve(cfg, state))


def state_path(args: argparse.Namespace, configured: str | None) -> Path | None:
    """--state, else the config's server.state_file, else one file per config under
    $SEGSTREAM_HOME/state ("" or "none": no state kept). The default is keyed by the config's
    resolved path, not its name: two folders' `config.yaml` must not share one stream set."""
    from segstream.models.fetch import home

    chosen = args.state if args.state is not None else configured
    if chosen is not None:
        return None if chosen in ("", "none") else Path(chosen)
    folder = home() / "state"
    if args.config:
        resolved = Path(args.config).resolve()
        key = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
        path = folder / f"{resolved.stem}-{key}.json"
        _adopt_legacy(folder / f"{resolved.stem}.json", path, resolved)
        return path
    if args.source:
        return folder / (
            "sources-" + hashlib.sha256("\n".join(args.source).encode()).hexdigest()[:10] + ".json"
        )
    return folder / "default.json"


def _adopt_legacy(legacy: Path, path: Path, config: Path) -> None:
    """Versions before 0.2 named the file after the config's name alone. The first config of
    that name to start takes the old file over (moved, so a second one with the same name
    seeds from its own config instead of sharing it); the log says so."""
    if path.exists() or not legacy.is_file():
        return
    try:
        legacy.rename(path)
    except OSError as e:
        logging.warning("could not take over the old state file %s: %s", legacy, e)
        return
    logging.warning(
        "state file %s (named after the config's name only) moved to %s, now kept for %s alone",
        legacy,
        path,
        config,
    )


def _register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the streaming service")
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="[ID=]URL",
        help="add a stream: rtsp://..., http://..., a file, or a device (0, /dev/video0)",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model", help="model name (see `segstream fetch --list`)")
    p.add_argument("--backend", choices=["auto", "keras", "tflite"])
    p.add_argument("--latency-target-ms", type=float, dest="latency_target_ms")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--state",
        metavar="PATH",
        help="state file keeping the stream set across "
        "restarts (default: $SEGSTREAM_HOME/state/<config name>-<path hash>.json, one per "
        "config file; 'none': not kept)",
    )
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="serve a Ray cluster's streams from "
        "this gateway: a Ray address, or 'auto' for the cluster `ray start` began "
        "here (pip install 'segstream[cluster]')",
    )
    p.set_defaults(func=_serve)


def _token(args: argparse.Namespace) -> int:
    from segstream.stream.auth import AuthError, TokenStore
    from segstream.stream.config import ConfigError, load_config
    from segstream.stream.server import tokens_dir

    try:
        folder = Path(args.dir) if args.dir else tokens_dir(load_config(args.config))
    except ConfigError as e:
        print(f"segstream: {e}", file=sys.stderr)
        return 2
    store = TokenStore(folder / "tokens.json")
    try:
        if args.action == "add":
            token = store.add(args.name, args.role)
            print(token)
            print(
                f"token {args.name!r} ({args.role}) added to {store.path}; it is shown only "
                "this once",
                file=sys.stderr,
            )
        elif args.action == "revoke":
            store.revoke(args.name)
            print(f"token {args.name!r} revoked", file=sys.stderr)
        else:
            for entry in store.listing():
                print(f"{entry['name']}\t{entry['role']}\t{entry['created']}")
    except AuthError as e:
        print(f"segstream: {e}", file=sys.stderr)
        return 2
    return 0


def _register_token(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="manage API tokens (stored hashed)")
    p.add_argument("--config", help="YAML config whose auth.tokens_dir to use")
    p.add_argument("--dir", help="folder of tokens.json (default: $SEGSTREAM_HOME/auth)")
    tsub = p.add_subparsers(dest="action", required=True)
    add = tsub.add_parser("add", help="create a token; prints it once")
    add.add_argument("name")
    add.add_argument("--role", choices=["viewer", "admin"], required=True)
    tsub.add_parser("list", help="names, roles, creation times (never the tokens)")
    rev = tsub.add_parser("revoke", help="delete a token; its sessions end")
    rev.add_argument("name")
    p.set_defaults(func=_token)


def build_parser() -> argparse.ArgumentParser:
    from segstream.models import fetch
    from segstream.models.tools import evaluate, export, predict, train

    parser = argparse.ArgumentParser(
        prog="segstream", description="Real-time video segmentation with mobile DeepLab."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _register_serve(sub)
    _register_token(sub)
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
