"""The wheel the Dockerfile installs (`pip install .`) works outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support.peers import free_port, stop_process, wait_http

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        timeout=600,
    )
    (whl,) = out.glob("segstream-*.whl")
    return whl


def test_wheel_ships_the_default_config_and_page(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"segstream/stream/default.yaml", "segstream/stream/static/index.html"} <= names
    assert not any(n.startswith(("configs/", "tests/", "scripts/")) for n in names)
    text = zipfile.ZipFile(wheel).read("segstream/stream/default.yaml").decode()
    assert text == (REPO / "configs/default.yaml").read_text()


def test_wheel_claims_one_top_level_name(wheel: Path) -> None:
    """Installed into site-packages, the distribution must not shadow (or be shadowed by)
    another project's `stream` or `models`: everything lives under `segstream`."""
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"segstream"}, tops
    modules = [n for n in names if n.endswith(".py")]
    # One import path per module: each file is in the wheel once.
    assert len(modules) == len(set(modules))
    assert "segstream/stream/cli.py" in modules and "segstream/models/deeplab.py" in modules


def test_installed_wheel_serves_without_config(
    wheel: Path, tmp_path: Path, segstream_home: Path
) -> None:
    """`segstream serve` with no --config, from another directory, on the installed package
    (dependencies from this environment, the package itself only from the wheel)."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "SEGSTREAM_HOME": str(segstream_home)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import segstream.stream.config as c; print(c.__file__, c.DEFAULT_CONFIG)",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(target)) and str(REPO) not in where, where
    gone = subprocess.run(
        [sys.executable, "-c", "import stream"], cwd=elsewhere, env=env, capture_output=True
    )
    assert gone.returncode != 0, "the wheel installed a top-level `stream`"
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from segstream.stream.cli import main; sys.exit(main())",
                "serve",
                "--port",
                str(port),
            ],
            cwd=elsewhere,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 90, alive=lambda: proc.poll() is None)
    except TimeoutError:
        pytest.fail(f"installed service did not start:\n{log.read_text()}")
    finally:
        stop_process(proc)
    assert "serving 1 stream(s)" in log.read_text()
