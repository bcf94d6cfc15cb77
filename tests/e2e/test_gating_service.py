"""Motion gating end to end, on `segstream serve` as a real process with the real model: a
still scene (sensor noise, a slow light ramp) is not inferred except every refresh_s, and
the scene is inferred again as soon as it moves."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from support.service_proc import ServiceProcess
from support.waiting import wait_for

pytestmark = pytest.mark.e2e
OUTCOMES = ("captured", "unconverted", "skipped", "dropped", "unchanged", "inferred")


def still_then_moving(shared_dir: Path, out: Path) -> Path:
    """10 fps, 320x240: 40 frames of one picture of vtest.avi with noise (sigma 2) and a
    brightness ramp (+0.2 a frame), then 30 frames of people walking."""
    cap = cv2.VideoCapture(str(shared_dir / "data/video/vtest.avi"))
    moving = [cv2.resize(cap.read()[1], (320, 240)) for _ in range(30)]
    cap.release()
    w = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"mp4v"), 10, (320, 240))
    rng = np.random.default_rng(1)
    for i in range(40):
        noisy = moving[0] + 0.2 * i + rng.normal(0, 2, moving[0].shape)
        w.write(np.clip(noisy, 0, 255).astype(np.uint8))
    for f in moving:
        w.write(f)
    w.release()
    return out


def test_a_still_scene_is_inferred_only_every_refresh_s_until_it_moves(
    tmp_path: Path, segstream_home: Path, shared_dir: Path
) -> None:
    clip = still_then_moving(shared_dir, tmp_path / "still.mp4")
    cfg = {
        "model": {"name": "mnv2-voc", "backend": "tflite", "workers": 1, "threads": 2},
        "streams": [
            {"id": "still", "source": str(clip), "loop": False, "gate": {"refresh_s": 1.5}}
        ],
    }
    svc = ServiceProcess(tmp_path, cfg).start()
    c: dict[str, float] = {}
    try:
        svc.wait_state("still", {"stopped"}, 60)

        def settled() -> bool:
            nonlocal c
            before = c
            c = {
                o: svc.metric("segstream_frames_total", stream="still", outcome=o) for o in OUTCOMES
            }
            used = c["unconverted"] + c["skipped"] + c["dropped"] + c["unchanged"] + c["inferred"]
            return before == c and c["captured"] - used in (0, 1)

        assert wait_for(settled, 60, step=0.5), c
    finally:
        svc.stop()
    assert c["captured"] == 70, c
    # Still (4 s): frames 1, 16 and 31 inferred (refresh_s 1.5 s = 15 frames), the others
    # unchanged (37 on an idle machine), but for those dropped while an inference runs (the
    # first one warms the model up: seconds on a loaded machine; when it ends past frame 10,
    # only two refreshes fit in the 40 still frames: 38). Ungated: none unchanged.
    assert 15 <= c["unchanged"] <= 38, c
    # Moving: the model is busy again; every frame it was free for is inferred.
    assert c["inferred"] >= 3 + 5, c
