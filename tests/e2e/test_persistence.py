"""The state file as an operator relies on it: `segstream serve` as a real process killed with
SIGKILL in the middle of PATCHes, and `--state none` keeping nothing anywhere."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from support.rtsp import RtspServer
from support.service_proc import ServiceProcess
from support.waiting import wait_for

pytestmark = pytest.mark.e2e
MODEL = {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 1, "max_batch": 1}
STREAMS = [f"p{k}" for k in range(4)]


def test_kill_9_during_patches_keeps_every_acknowledged_one(
    tmp_path: Path, segstream_home: Path, camera: RtspServer
) -> None:
    """Workers PATCH their own stream's infer_fps as fast as the API answers; SIGKILL lands
    mid-burst. The file must be valid and hold, per stream, the last acknowledged value, or
    the one in flight when the process died; a restart must run what the file holds."""
    streams = [{"id": sid, "source": camera.url("/cam"), "infer_fps": 1.0} for sid in STREAMS]
    svc = ServiceProcess(tmp_path, {"model": MODEL, "streams": streams}).start()
    acked = dict.fromkeys(STREAMS, 1.0)  # stream -> infer_fps, as last acknowledged
    sending: dict[str, float] = {}  # stream -> the value of the PATCH in flight, if any
    wrong: list[tuple[str, int, bytes]] = []
    stop = threading.Event()

    def worker(sid: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            value = round(1.0 + n / 100, 2)
            sending[sid] = value
            try:
                status, body, _ = svc.request(
                    "PATCH", f"/api/streams/{sid}", {"infer_fps": value}, timeout=5
                )
            except OSError:  # killed while this one was in flight: either value may stand
                return
            if status != 200 or json.loads(body)["infer_fps_cap"] != value:
                wrong.append((sid, status, body[:300]))
                return  # stays in flight: the file may hold either value
            acked[sid] = value
            del sending[sid]

    threads = [threading.Thread(target=worker, args=(sid,), daemon=True) for sid in STREAMS]
    for t in threads:
        t.start()
    assert wait_for(lambda: min(acked.values()) >= 1.05, 30), acked  # each one is patching
    time.sleep(random.uniform(0.0, 1.0))  # a random moment in the burst
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait()
    stop.set()
    for t in threads:
        t.join(10)
    assert not wrong, wrong
    doc = json.loads(svc.state.read_text())  # a valid file, whatever the moment
    stored = {s["id"]: s["infer_fps"] for s in doc["streams"]}
    print(f"acknowledged {acked}, in flight {sending}, stored {stored}")
    assert set(stored) == set(STREAMS)
    for sid in STREAMS:
        allowed = {acked[sid]} | ({sending[sid]} if sid in sending else set())
        assert stored[sid] in allowed, (sid, stored[sid], allowed)
    svc.start()  # the same state file
    try:
        running = {s["id"]: s["infer_fps_cap"] for s in svc.json("/api/streams")["streams"]}
    finally:
        svc.stop()
    assert running == stored


def test_state_none_writes_nothing(
    tmp_path: Path, segstream_home: Path, camera: RtspServer
) -> None:
    """`--state none`: adds, patches and removes over the API leave no file under
    SEGSTREAM_HOME (where the default state file would go) nor in the working directory."""
    home = tmp_path / "home"
    home.mkdir()
    for entry in segstream_home.iterdir():  # the model cache, read only
        if entry.name != "state":
            (home / entry.name).symlink_to(entry)
    workdir = tmp_path / "work"
    workdir.mkdir()
    svc = ServiceProcess(
        workdir,
        {"model": MODEL, "streams": [{"id": "cam", "source": camera.url("/cam")}]},
        state=Path("none"),
        env={"SEGSTREAM_HOME": str(home)},
    )
    cwd_before = set(Path.cwd().iterdir())
    svc.start()
    try:
        svc.wait_state("cam", {"live"}, 20)
        body = {"id": "door", "source": camera.url("/cam"), "infer_fps": 1}
        assert svc.request("POST", "/api/streams", body)[0] == 201
        assert svc.request("PATCH", "/api/streams/door", {"infer_fps": 2})[0] == 200
        assert svc.request("PATCH", "/api/streams/cam", {"alpha": 1.0})[0] == 200
        assert svc.request("DELETE", "/api/streams/door")[0] == 204
        assert [s["id"] for s in svc.json("/api/streams")["streams"]] == ["cam"]
    finally:
        assert svc.stop() == 0, svc.log()
    written = [Path(d, f) for d, _, files in os.walk(home) for f in files]  # not into links
    assert written == [], written
    assert sorted(p.name for p in home.iterdir()) == sorted(
        e.name for e in segstream_home.iterdir() if e.name != "state"
    )
    assert sorted(p.name for p in workdir.iterdir()) == sorted(
        [svc.config_path.name, svc.log_path.name]
    )
    assert set(Path.cwd().iterdir()) == cwd_before
