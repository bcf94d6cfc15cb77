"""Get the model and sample files into the local cache, always checksum-verified.

Files land in ``home()/models`` and ``home()/samples`` only after their sha256 matched, via a
temporary file and an atomic rename, so a present file is a verified file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from segstream.models.registry import MODELS, SAMPLES, ModelSpec, SampleSpec, get_sample, get_spec

_CHUNK = 1 << 20
FETCH_FROM_ENV = "SEGSTREAM_FETCH_FROM"


class NotFetchedError(FileNotFoundError):
    """A model or sample file is not in the cache; the message says which command fixes it."""


class FetchError(RuntimeError):
    """Some files could not be fetched or failed their checksum (the others were kept)."""


def home() -> Path:
    """The cache root: $SEGSTREAM_HOME, else ~/.cache/segstream."""
    env = os.environ.get("SEGSTREAM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "segstream"


def _dest(spec: ModelSpec | SampleSpec) -> Path:
    sub = "models" if isinstance(spec, ModelSpec) else "samples"
    return home() / sub / spec.filename


def _fix_hint(name: str) -> str:
    return (
        f"run `segstream fetch {name}` to download it, or `segstream fetch --from DIR` to copy "
        f"it from a folder that holds it (e.g. ../shared)"
    )


def model_path(name: str) -> Path:
    """Path of model ``name``'s verified .tflite file; NotFetchedError if not fetched yet."""
    spec = get_spec(name)
    path = _dest(spec)
    if not path.is_file():
        raise NotFetchedError(
            f"model {name!r} ({spec.filename}) is not in {path.parent}; {_fix_hint(name)}"
        )
    return path


def sample_path(name: str = "vtest") -> Path:
    """Path of sample ``name``'s verified file; NotFetchedError if not fetched yet."""
    spec = get_sample(name)
    path = _dest(spec)
    if not path.is_file():
        raise NotFetchedError(
            f"sample {name!r} ({spec.filename}) is not in {path.parent}; {_fix_hint(name)}"
        )
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _resolve(names: list[str] | None, samples: bool) -> list[ModelSpec | SampleSpec]:
    specs: list[ModelSpec | SampleSpec] = []
    if names is None:
        specs.extend(MODELS.values())
    for name in names or []:
        if name in MODELS:
            specs.append(MODELS[name])
        elif name in SAMPLES:
            specs.append(SAMPLES[name])
        else:
            raise ValueError(
                f"unknown model or sample {name!r}; valid: {', '.join([*MODELS, *SAMPLES])}"
            )
    if samples:
        specs.extend(s for s in SAMPLES.values() if s not in specs)
    return specs


def _stream_to(dest: Path, chunks: Iterable[bytes], expected: str, source: str) -> None:
    """Write chunks to a temp file beside dest, then rename only if the sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
        got = h.hexdigest()
        if got != expected:
            raise FetchError(
                f"{dest.name} from {source}: sha256 {got} does not match the expected "
                f"{expected}; file refused (not kept)"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_chunks(f: BinaryIO, bar: Any) -> Iterable[bytes]:
    while chunk := f.read(_CHUNK):
        if bar is not None:
            bar.update(len(chunk))
        yield chunk


def _download(spec: ModelSpec | SampleSpec, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    req = urllib.request.Request(spec.url, headers={"User-Agent": "segstream-fetch"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=spec.filename,
            disable=not progress,
            file=sys.stderr,
        ) as bar:
            _stream_to(dest, _read_chunks(resp, bar), spec.sha256, spec.url)


def _copy_from(spec: ModelSpec | SampleSpec, dest: Path, from_dir: Path) -> None:
    candidates = sorted(p for p in from_dir.rglob(spec.filename) if p.is_file())
    if not candidates:
        raise FetchError(f"{spec.filename} ({spec.name}) not found anywhere under {from_dir}")
    errors = []
    for src in candidates:  # the first copy whose checksum matches wins
        try:
            with open(src, "rb") as f:
                _stream_to(dest, _read_chunks(f, None), spec.sha256, str(src))
            return
        except FetchError as e:
            errors.append(str(e))
    raise FetchError("; ".join(errors))


def fetch(
    names: list[str] | None = None,
    from_dir: Path | None = None,
    progress: bool = True,
    samples: bool = True,
) -> list[Path]:
    """Fetch models ``names`` (None: all) and the samples; return the verified paths.

    With ``from_dir`` (or $SEGSTREAM_FETCH_FROM) files are found by name anywhere under it and
    copied; otherwise they are downloaded. Verified files already present are skipped. A file
    whose checksum does not match is refused; FetchError is raised after the others are done.
    """
    if from_dir is None and os.environ.get(FETCH_FROM_ENV):
        from_dir = Path(os.environ[FETCH_FROM_ENV])
    if from_dir is not None:
        from_dir = Path(from_dir).expanduser()
        if not from_dir.is_dir():
            raise FetchError(f"--from {from_dir}: not a directory")
    paths: list[Path] = []
    errors: list[str] = []
    for spec in _resolve(names, samples):
        dest = _dest(spec)
        if dest.is_file() and sha256_file(dest) == spec.sha256:
            paths.append(dest)
            continue
        try:
            if from_dir is not None:
                _copy_from(spec, dest, from_dir)
            else:
                _download(spec, dest, progress)
            paths.append(dest)
        except FetchError as e:
            errors.append(str(e))
        except OSError as e:  # network errors are OSErrors (URLError included)
            errors.append(f"{spec.filename}: download from {spec.url} failed: {e}")
    if errors:
        raise FetchError("\n".join(errors))
    return paths


def _list() -> int:
    for spec in MODELS.values():
        state = "fetched" if _dest(spec).is_file() else "not fetched"
        backends = "tflite, keras" if spec.keras else "tflite"
        print(
            f"{spec.name:22} {spec.input_size}px {spec.num_classes:2d} classes  "
            f"[{backends}]  {state:11}  {spec.description}"
        )
    for sample in SAMPLES.values():
        state = "fetched" if _dest(sample).is_file() else "not fetched"
        print(f"{sample.name:22} sample  {state:11}  {sample.description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    try:
        paths = fetch(
            args.names or None,
            from_dir=args.from_dir,
            progress=not args.quiet,
            samples=not args.no_samples,
        )
    except (FetchError, ValueError) as e:
        print(f"segstream fetch: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fetch [NAMES...] [--from DIR]`` subcommand."""
    p = subparsers.add_parser(
        "fetch",
        help="download (or copy with --from) the model and sample files, sha256-checked",
        description=f"Models: {', '.join(MODELS)}. Samples: {', '.join(SAMPLES)}. "
        f"Files go to {home()}.",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="models/samples to fetch (default: all)"
    )
    p.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"copy files found under DIR instead of downloading (env {FETCH_FROM_ENV})",
    )
    p.add_argument("--no-samples", action="store_true", help="skip the sample video")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the known models and samples")
    p.set_defaults(func=_run)
