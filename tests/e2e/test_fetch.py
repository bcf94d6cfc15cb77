"""fetch: copy from a folder or download over HTTP, always sha256-verified; clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from segstream.models import fetch, registry
from segstream.models.runtime import load_segmenter

FAST = "mnv2-voc-fast"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("SEGSTREAM_HOME", str(h))
    monkeypatch.delenv(fetch.FETCH_FROM_ENV, raising=False)
    return h


def _leftovers(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.name.endswith(".part")]


def test_missing_model_names_the_fix(home: Path) -> None:
    with pytest.raises(fetch.NotFetchedError) as ei:
        fetch.model_path(FAST)
    assert isinstance(ei.value, FileNotFoundError)
    msg = str(ei.value)
    assert f"segstream fetch {FAST}" in msg and "segstream fetch --from DIR" in msg
    assert str(home) in msg
    with pytest.raises(fetch.NotFetchedError, match="segstream fetch vtest"):
        fetch.sample_path()
    with pytest.raises(fetch.NotFetchedError, match="segstream fetch"):
        load_segmenter(FAST, "tflite")


def test_fetch_from_copies_verifies_and_is_idempotent(home: Path, shared_dir: Path) -> None:
    paths = fetch.fetch([FAST], from_dir=shared_dir, progress=False)
    spec = registry.get_spec(FAST)
    assert paths == [fetch.model_path(FAST), fetch.sample_path("vtest")]
    assert fetch.sha256_file(paths[0]) == spec.sha256
    assert fetch.sha256_file(paths[1]) == registry.SAMPLES["vtest"].sha256
    stat = paths[0].stat()
    again = fetch.fetch([FAST], from_dir=shared_dir, progress=False)
    assert again == paths
    assert paths[0].stat().st_ino == stat.st_ino and paths[0].stat().st_mtime_ns == stat.st_mtime_ns
    assert not _leftovers(home)
    with load_segmenter(FAST, "tflite", batch_sizes=(1,)) as seg:
        assert seg.path == paths[0]


def test_fetch_all_without_samples(home: Path, shared_dir: Path) -> None:
    paths = fetch.fetch(from_dir=shared_dir, progress=False, samples=False)
    assert sorted(p.name for p in paths) == sorted(s.filename for s in registry.MODELS.values())


def test_corrupted_copy_is_refused(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "nested"
    src.mkdir(parents=True)
    (src / registry.get_spec(FAST).filename).write_bytes(b"TFL3 but not the real model")
    with pytest.raises(fetch.FetchError, match="does not match") as ei:
        fetch.fetch([FAST], from_dir=tmp_path / "src", progress=False, samples=False)
    assert "refused" in str(ei.value)
    assert not (home / "models" / registry.get_spec(FAST).filename).exists()
    assert not _leftovers(home)


def test_good_copy_wins_over_bad_one(home: Path, tmp_path: Path, shared_dir: Path) -> None:
    name = registry.get_spec(FAST).filename
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / name).write_bytes(b"garbage")
    real = next((shared_dir / "models").rglob(name))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / name).write_bytes(real.read_bytes())
    [path] = fetch.fetch([FAST], from_dir=tmp_path, progress=False, samples=False)
    assert fetch.sha256_file(path) == registry.get_spec(FAST).sha256


def test_corrupt_cached_file_is_replaced(home: Path, shared_dir: Path) -> None:
    dest = home / "models" / registry.get_spec(FAST).filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")
    fetch.fetch([FAST], from_dir=shared_dir, progress=False, samples=False)
    assert fetch.sha256_file(dest) == registry.get_spec(FAST).sha256


def test_missing_file_and_bad_names(home: Path, tmp_path: Path) -> None:
    with pytest.raises(fetch.FetchError, match="not found anywhere under"):
        fetch.fetch([FAST], from_dir=tmp_path, progress=False, samples=False)
    with pytest.raises(fetch.FetchError, match="not a directory"):
        fetch.fetch([FAST], from_dir=tmp_path / "nope", progress=False)
    with pytest.raises(ValueError, match="valid"):
        fetch.fetch(["no-such-model"], from_dir=tmp_path, progress=False)


def test_env_fetch_from(home: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fetch.FETCH_FROM_ENV, str(shared_dir))
    [path] = fetch.fetch(["vtest"], progress=False, samples=False)
    assert path == fetch.sample_path()


# --- download over HTTP (a real local server) ------------------------------------------


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_checksum(
    home: Path,
    shared_dir: Path,
    http_dir: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    root, url = http_dir
    spec = registry.get_spec(FAST)
    real = next((shared_dir / "models").rglob(spec.filename))
    (root / "good.tflite").write_bytes(real.read_bytes())
    (root / "bad.tflite").write_bytes(real.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setitem(registry.MODELS, FAST, dataclasses.replace(spec, url=f"{url}/bad.tflite"))
    with pytest.raises(fetch.FetchError, match="does not match"):
        fetch.fetch([FAST], progress=False, samples=False)
    assert not (home / "models" / spec.filename).exists() and not _leftovers(home)
    monkeypatch.setitem(registry.MODELS, FAST, dataclasses.replace(spec, url=f"{url}/good.tflite"))
    [path] = fetch.fetch([FAST], progress=True, samples=False)
    assert fetch.sha256_file(path) == spec.sha256
    assert spec.filename in capsys.readouterr().err  # the tqdm bar
    monkeypatch.setitem(registry.MODELS, FAST, dataclasses.replace(spec, url=f"{url}/gone"))
    (home / "models" / spec.filename).unlink()
    with pytest.raises(fetch.FetchError, match=r"download from .* failed"):
        fetch.fetch([FAST], progress=False, samples=False)


# --- the CLI subcommand -----------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="segstream")
    fetch.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(home: Path, shared_dir: Path, tmp_path: Path, capsys) -> None:
    assert _cli(["fetch", FAST, "--from", str(shared_dir), "--no-samples", "-q"]) == 0
    out = capsys.readouterr().out
    assert registry.get_spec(FAST).filename in out
    assert _cli(["fetch", "bogus", "--from", str(shared_dir)]) == 1
    assert "unknown model" in capsys.readouterr().err
    assert _cli(["fetch", "mnv2-voc", "--from", str(tmp_path), "--no-samples"]) == 1
    assert "not found anywhere" in capsys.readouterr().err
    assert _cli(["fetch", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in registry.MODELS)
    assert f"{FAST}" in listing and "not fetched" in listing  # mnv2-voc is not in this home
