"""The README's commands that need no network, run as written against a service started on the
default config (what `make run` serves), and the docs' checkable parts: the two set-up
commands are the Makefile's, the README's links and pictures exist, the alert rules load in
promtool. (`mkdocs build --strict` itself runs in `make test`.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import yaml
from support.service_proc import SEGSTREAM, ServiceProcess

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def tour() -> list[str]:
    """The commands of the README's tour, one per line, comments dropped."""
    block = README.split("## A short tour", 1)[1]
    lines = sh_blocks(block)[0].splitlines()
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_set_up_commands_are_the_makefiles() -> None:
    blocks = [b.strip() for b in sh_blocks(README.split("## Quick start", 1)[1])[:2]]
    assert blocks == ["make run", "make test"]
    run = subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "segstream fetch" in run.stdout
    assert "segstream serve --config configs/default.yaml" in run.stdout
    test = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    for step in ("ruff check .", "mypy", "mkdocs build --strict", "pytest -ra"):
        assert step in test.stdout, step
    # --quiet filters the warnings out before strict mode counts them: nothing would fail.
    mkdocs = next(ln for ln in test.stdout.splitlines() if "mkdocs build" in ln)
    assert " -q" not in mkdocs and "--quiet" not in mkdocs, mkdocs


def test_readme_links_and_pictures_exist() -> None:
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert len(local) >= 15
    for t in local:
        assert (REPO / t).is_file(), t
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert pictures == ["docs/img/page.png", "docs/img/frame.png"]
    for png in (REPO / "docs" / "img").glob("*.png"):
        assert png.stat().st_size <= 400 * 1024, png
        assert cv2.imread(str(png)) is not None, png


def test_alert_rules_in_the_docs_load_in_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not installed (prometheus: scripts/install_system_deps.sh test)")
    text = (REPO / "docs" / "metrics.md").read_text()
    rules = re.search(r"## Alert rules.*?```yaml\n(.*?)```", text, flags=re.S)
    assert rules is not None
    path = tmp_path / "rules.yml"
    path.write_text(rules.group(1))
    assert len(yaml.safe_load(rules.group(1))["groups"][0]["rules"]) >= 6
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def default_service(tmp_path_factory, segstream_home: Path) -> Iterator[ServiceProcess]:
    """`make run`'s service: configs/default.yaml as it is (the demo stream), on a free port."""
    cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    work = tmp_path_factory.mktemp("readme")
    svc = ServiceProcess(work, cfg).start()
    try:
        svc.wait_state("demo", {"live"}, 60)
        yield svc
    finally:
        svc.stop()


def run_tour_line(line: str, svc: ServiceProcess, cwd: Path) -> subprocess.CompletedProcess[str]:
    line = line.replace("localhost:8080", f"127.0.0.1:{svc.port}")
    line = line.replace("127.0.0.1:8080", f"127.0.0.1:{svc.port}")
    line = line.replace(".venv/bin/segstream", str(SEGSTREAM))
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_readme_tour_runs(
    default_service: ServiceProcess, tmp_path: Path, shared_dir: Path
) -> None:
    svc = default_service
    cap = cv2.VideoCapture(str(shared_dir / "data" / "video" / "vtest.avi"))
    ok, frame = cap.read()
    cap.release()
    assert ok
    cv2.imwrite(str(tmp_path / "photo.jpg"), frame)
    lines = tour()
    assert [ln.split()[0] for ln in lines] == [
        "curl",
        "ffplay",
        "curl",
        ".venv/bin/segstream",
        "curl",
    ]
    add, watch, metrics, predict, max_api = lines

    r = run_tour_line(add, svc, tmp_path)
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout)
    assert added["id"] == "door" and added["source"] == "rtsp://10.0.0.7/live"
    assert svc.stream("door")["infer_fps_cap"] == 5

    # ffplay needs a display: its prober, ffprobe, opens the same URL as FFmpeg's players do.
    probe = watch.replace(
        "ffplay", "ffprobe -v error -of json -show_entries stream=codec_name,width,height"
    )
    r = run_tour_line(probe, svc, tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["streams"] == [{"codec_name": "mjpeg", "width": 768, "height": 576}]

    r = run_tour_line(metrics, svc, tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r'segstream_frames_total\{.*stream="demo".*\} [1-9]', r.stdout), r.stdout[:500]

    r = run_tour_line(predict, svc, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "person" in r.stdout
    mask = cv2.imread(str(tmp_path / "out" / "photo_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.shape[:2] == frame.shape[:2]
    assert (tmp_path / "out" / "photo_overlay.jpg").stat().st_size > 1000

    r = run_tour_line(max_api, svc, tmp_path)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["status"] == "ok"
    w, h = answer["image_size"]
    assert len(answer["seg_map"]) == h and len(answer["seg_map"][0]) == w
    assert max(w, h) == 513  # MAX's IMAGE_SIZE default: the longer side
