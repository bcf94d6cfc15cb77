#!/usr/bin/env python
"""Masks between inferences (stale vs carried by motion) and motion gating, against a fresh
inference on every frame, with the project's TFLite model.

  SEGSTREAM_SHARED=../shared python scripts/bench_motion.py --out docs/bench_motion.json
  ... --parts gating cost --merge   # redo some parts, keeping the others in --out

Per clip, N (infer frames 0, N, 2N, ...; the mask shown on the others is stale or carried by
each method) and method, over the frames in between (the inferred ones agree by definition):
  agree     mask pixels equal to the fresh mask's
  fg_iou    foreground pixels agreeing: same class, over the union of both masks' foreground
  fg_recall fresh foreground pixels with the same class in the shown mask
  covered   fresh foreground pixels inside the shown foreground grown by 8 mask pixels: the
            mean over frames and the 5th percentile (what a redaction needs)
  redact    the same with the shown mask grown by motion.age_margin(its age) instead
and ms per frame of each carry (thumbnail + flow + composing + warping the 513x513 mask) on
720p frames and on 513x513 ones. Masks are at the model's 513x513; "px" are mask pixels.

Gating: a still frame with sensor noise and a slow brightness ramp, then the clip's motion
(same noise and final brightness): gated (infer when the detector says changed, or every
refresh) vs inferring every frame, and the first motion frame the detector flags.

Fresh masks are cached per clip under --cache (the model is the slow part).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segstream.models.runtime import Segmenter, load_segmenter, prepare
from segstream.stream.motion import (
    ChangeDetector,
    MaskCarrier,
    age_margin,
    flow_method,
    grey_thumbnail,
    motion_vector_flow,
)

MODEL = "mnv2-voc"
SIZE = 513
GROW_PX = 8
# name -> (flow method, "mv" (the decoder's motion vectors) or None (stale); thumbnail scale of
# the 513 mask size; chained frame to frame (else: between the mask's frame and the shown one);
# splat (push the foreground forward) or pull (each pixel takes its class from where it came);
# pixels the shown mask is grown by)
METHODS: dict[str, tuple[str | None, float, bool, bool, int]] = {
    "stale": (None, 1.0, False, False, 0),
    "chain pull dis-ultrafast@256": ("dis-ultrafast", 0.5, True, False, 0),
    "chain pull dis-ultrafast@256 +1px": ("dis-ultrafast", 0.5, True, False, 1),
    "chain pull dis-ultrafast@256 refine": ("dis-ultrafast", 0.5, True, False, 0),
    "chain pull dis-ultrafast@256 refine s1": ("dis-ultrafast", 0.5, True, False, 0),
    "chain pull dis-ultrafast@513": ("dis-ultrafast", 1.0, True, False, 0),
    "chain splat dis-ultrafast@256": ("dis-ultrafast", 0.5, True, True, 0),
    "direct pull dis-ultrafast@256": ("dis-ultrafast", 0.5, False, False, 0),
    "chain pull mv@256": ("mv", 0.5, True, False, 0),
}


# --- clips ---


def h264_copy(src: Path, cache: Path, gop: int) -> Path:
    """`src` re-encoded as a camera would send it: H.264, no B-frames, keyframe every gop."""
    out = cache / f"{src.stem}-h264-g{gop}.mp4"
    if not out.is_file():
        cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src)]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-bf", "0", "-g", str(gop)]
        cmd += ["-pix_fmt", "yuv420p", str(out)]
        subprocess.run(cmd, check=True)
    return out


def decode(path: Path, limit: int | None) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """BGR frames and each frame's motion vectors (None on keyframes)."""
    frames, mvs = [], []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.options = {"flags2": "+export_mvs"}
        for f in c.decode(s):
            sd = f.side_data.get("MOTION_VECTORS")
            mvs.append(None if sd is None else sd.to_ndarray())
            frames.append(f.to_ndarray(format="bgr24"))
            if limit and len(frames) >= limit:
                break
    return frames, mvs


def fresh_masks(
    seg: Segmenter, name: str, frames: list[np.ndarray], cache: Path
) -> tuple[np.ndarray, float]:
    """The model's mask of every frame (cached) and its fps when computed here (0: cached)."""
    path = cache / f"fresh-{MODEL}-{name}-{len(frames)}.npy"
    if path.is_file():
        return np.load(path), 0.0
    out = np.empty((len(frames), SIZE, SIZE), np.uint8)
    buf = np.empty((1, SIZE, SIZE, 3), np.uint8)
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        prepare(f, SIZE, out=buf[0], bgr=True)
        out[i] = seg.segment(buf)[0]
    fps = len(frames) / (time.perf_counter() - t0)
    np.save(path, out)
    return out, fps


# --- quality ---


class Score:
    def __init__(self) -> None:
        self.agree: list[float] = []
        self.inter = self.union = self.fresh_fg = 0
        self.covered: list[float] = []
        self.redact: list[float] = []

    def add(self, shown: np.ndarray, fresh: np.ndarray, age: int) -> None:
        same = shown == fresh
        fg_f, fg_s = fresh != 0, shown != 0
        self.agree.append(float(same.mean()))
        self.inter += int(np.count_nonzero(same & fg_f))
        self.union += int(np.count_nonzero(fg_f | fg_s))
        n = int(np.count_nonzero(fg_f))
        self.fresh_fg += n
        if n:
            # distance of each pixel to the shown foreground (L2, like grow_mask's disc)
            dist = cv2.distanceTransform((~fg_s).view(np.uint8), cv2.DIST_L2, 5)[fg_f]
            self.covered.append(float(np.count_nonzero(dist <= GROW_PX)) / n)
            self.redact.append(float(np.count_nonzero(dist <= age_margin(age))) / n)

    def result(self) -> dict[str, float]:
        cov = np.array(self.covered or [1.0])
        return {
            "agree": round(100 * float(np.mean(self.agree)), 2),
            "fg_iou": round(100 * self.inter / max(self.union, 1), 2),
            "fg_recall": round(100 * self.inter / max(self.fresh_fg, 1), 2),
            "covered": round(100 * float(cov.mean()), 2),
            "covered_p5": round(100 * float(np.percentile(cov, 5)), 2),
            "redact": round(100 * float(np.mean(self.redact or [1.0])), 2),
            "redact_p5": round(100 * float(np.percentile(self.redact or [1.0], 5)), 2),
            "frames": len(self.agree),
        }


def make_carrier(method: str) -> MaskCarrier:
    flow, scale, chain, splat, _ = METHODS[method]
    fn = None if flow in (None, "mv") else flow_method(flow)
    refine = None
    if "refine" in method:
        refine = flow_method("dis-ultrafast-s1" if method.endswith("s1") else "dis-ultrafast")
    grow = METHODS[method][4]
    return MaskCarrier(
        (SIZE, SIZE), scale=scale, flow=fn, chain=chain, splat=splat, refine=refine, grow_px=grow
    )


def quality(
    frames: list[np.ndarray],
    mvs: list[np.ndarray | None],
    fresh: np.ndarray,
    everies: list[int],
    method: str,
) -> dict[int, dict[str, float]]:
    """One carrier per N; chained ones share one flow computation per frame."""
    flow_name, _, chain, splat, _ = METHODS[method]
    carriers = {n: make_carrier(method) for n in everies}
    scores = {n: Score() for n in everies}
    lead = make_carrier(method)
    prev: np.ndarray | None = None
    fh, fw = frames[0].shape[:2]
    for i, frame in enumerate(frames):
        flow = None
        if chain and flow_name == "mv":
            flow = motion_vector_flow(mvs[i], (fh, fw), lead.size) if i else None
        elif chain and lead.flow is not None and lead.refine is None:
            cur = grey_thumbnail(frame, lead.size)
            if prev is not None:
                flow = lead.flow(prev, cur) if splat else lead.flow(cur, prev)
            prev = cur
        for n, c in carriers.items():
            if chain and c.refine is None:
                c.push(i, flow=flow)
            else:
                c.push(i, frame)
            if i % n == 0:
                c.anchor(i)
                c.set_mask(i, fresh[i])
            else:
                shown = c.carried()
                assert shown is not None and shown.age_frames == i % n
                scores[n].add(shown.mask, fresh[i], shown.age_frames)
    return {n: s.result() for n, s in scores.items()}


# --- cost ---


def carry_ms(
    method: str,
    frames: list[np.ndarray],
    mvs: list[np.ndarray | None],
    mv_size: tuple[int, int],
    mask: np.ndarray,
) -> dict[str, float]:
    """Per frame: push (thumbnail, chained flow and composing) + carried() (direct flow, the
    mask warped to the frame); CPU ms (OpenCV on one thread, so the figure holds on a loaded
    host) and wall ms, medians. The mask's frame is 10 frames back, re-anchored every 10."""
    flow_name = METHODS[method][0]
    c = make_carrier(method)
    cpu, wall = [], []
    for i, f in enumerate(frames):
        t0, c0 = time.perf_counter(), time.process_time()
        if flow_name == "mv":
            c.push(i, flow=motion_vector_flow(mvs[i], mv_size, c.size) if i else None)
        else:
            c.push(i, f)
        if i % 10 == 0:
            c.anchor(i)
            c.set_mask(i, mask)
        shown = c.carried()
        if i % 10:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
        assert shown is not None
    return {
        "cpu": round(1e3 * float(np.median(cpu)), 2),
        "wall": round(1e3 * float(np.median(wall)), 2),
    }


def decode_ms(path: Path, mvs: bool, limit: int) -> float:
    """ms per frame to decode (no colour conversion), with or without exporting vectors."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if mvs:
            s.codec_context.options = {"flags2": "+export_mvs"}
        t0, n = time.perf_counter(), 0
        for f in c.decode(s):
            if mvs:
                sd = f.side_data.get("MOTION_VECTORS")
                _ = None if sd is None else sd.to_ndarray()
            n += 1
            if n >= limit:
                break
    return round(1e3 * (time.perf_counter() - t0) / n, 3)


def detector_ms(frames: list[np.ndarray]) -> float:
    """CPU ms per frame of the change detector (thumbnail + check), OpenCV on one thread."""
    d = ChangeDetector()
    d.reference = d.thumbnail(frames[0])
    times = []
    for f in frames[1:]:
        c0 = time.process_time()
        d.check(d.thumbnail(f))
        times.append(time.process_time() - c0)
    return round(1e3 * float(np.median(times)), 3)


# --- gating ---


def static_stretch(frames: list[np.ndarray], still: int, moving: int) -> list[np.ndarray]:
    """Frame 0 repeated `still` times with noise (sigma 3) and brightness 1.0 -> 1.25, then
    `moving` real frames at the final brightness with the same noise."""
    rng = np.random.default_rng(0)
    out = []
    base = frames[0].astype(np.float32)
    for i in range(still + moving):
        src = base if i < still else frames[i - still + 1].astype(np.float32)
        gain = 1.0 + 0.25 * min(i, still - 1) / (still - 1)
        noisy = src * gain + 4.0 * (gain - 1) * 40 + rng.normal(0, 3.0, src.shape)
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def gating(seg: Segmenter, frames: list[np.ndarray], refresh: int) -> dict[str, object]:
    still, moving = 120, min(30, len(frames) - 1)
    clip = static_stretch(frames, still, moving)
    always, _ = fresh_masks(seg, f"static{still}+{moving}", clip, CACHE)
    det = ChangeDetector()
    shown = always[0]
    last = 0
    inferred, flagged, agree = [], [], []
    for i, f in enumerate(clip):
        t = det.thumbnail(f)
        ch = det.check(t)
        if ch.changed or i - last >= refresh:
            shown, last = always[i], i
            det.reference = t
            inferred.append(i)
        if ch.changed:
            flagged.append(i)
        agree.append(float((shown == always[i]).mean()))
    a = np.array(agree)
    first = next((i for i in flagged if i >= still), None)
    return {
        "still_frames": still,
        "moving_frames": moving,
        "refresh_frames": refresh,
        "agree_static": round(100 * float(a[:still].mean()), 3),
        "agree_static_min": round(100 * float(a[:still].min()), 3),
        "inferred_static": sum(i < still for i in inferred),
        "flagged_static": [i for i in flagged if i < still],
        "flagged_moving": sum(i >= still for i in flagged),
        "first_motion_flag_delay": None if first is None else first - still,
        "agree_moving": round(100 * float(a[still:].mean()), 3),
    }


# --- main ---

CACHE = Path("/tmp/segstream-bench-motion")


def _model(shared: Path | None, threads: int | None) -> Segmenter:
    if shared is not None:
        from segstream.models import fetch

        os.environ.setdefault("SEGSTREAM_HOME", str(CACHE / "home"))
        fetch.fetch(from_dir=shared, progress=False)
    seg = load_segmenter(MODEL, "tflite", batch_sizes=(1,), threads=threads)
    seg.warmup()
    return seg


def raw_fps(seg: Segmenter, frame: np.ndarray, seconds: float = 5.0) -> float:
    buf = prepare(frame, SIZE, bgr=True)[None]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        seg.segment(buf)
        n += 1
    return round(n / (time.perf_counter() - t0), 2)


def table(results: dict) -> str:
    rows = [
        "| clip | N | method | agree % | fg IoU % | fg recall % | covered % | covered p5 % "
        "| age-margin covered % | p5 % |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|---|---|")
    for clip, per_n in results.get("quality", {}).items():
        for n, per_m in per_n.items():
            for m, r in per_m.items():
                rows.append(
                    f"| {clip} | {n} | {m} | {r['agree']} | {r['fg_iou']} | {r['fg_recall']} "
                    f"| {r['covered']} | {r['covered_p5']} | {r['redact']} | {r['redact_p5']} |"
                )
    g = results.get("gating")
    if g:
        rows += [
            "",
            "| gating: agree static % (min) | inferred / static frames | flagged static "
            "| first motion flagged after | agree moving % |",
            "|---|---|---|---|---|",
            f"| {g['agree_static']} ({g['agree_static_min']}) | {g['inferred_static']} / "
            f"{g['still_frames']} | {g['flagged_static']} | {g['first_motion_flag_delay']} "
            f"frames | {g['agree_moving']} |",
        ]
    rows += [
        "",
        "| method | CPU ms/frame 720p | 513 | wall ms 720p | 513 |",
        "|---|---|---|---|---|",
    ]
    for m, r in results.get("cost_ms", {}).items():
        a, b = r["720p"], r["513"]
        rows.append(f"| {m} | {a['cpu']} | {b['cpu']} | {a['wall']} | {b['wall']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    global CACHE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clips", nargs="+", default=["vtest", "solidWhiteRight"])
    p.add_argument("--every", nargs="+", type=int, default=[2, 5, 10])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--frames", type=int, default=None, help="at most this many per clip")
    p.add_argument("--threads", type=int, default=None, help="TFLite threads (default: all)")
    p.add_argument("--refresh", type=int, default=50, help="gating refresh, in frames")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=Path("bench_motion.json"))
    p.add_argument(
        "--parts", nargs="+", default=["quality", "gating", "cost"],
        choices=["quality", "gating", "cost"],
    )  # fmt: skip
    p.add_argument("--merge", action="store_true", help="update --out's other parts in place")
    args = p.parse_args(argv)
    CACHE = args.cache
    CACHE.mkdir(parents=True, exist_ok=True)
    shared = os.environ.get("SEGSTREAM_SHARED")
    video = Path(shared or "../shared") / "data" / "video"
    seg = _model(Path(shared) if shared else None, args.threads)
    sources = {"vtest": video / "vtest.avi", "solidWhiteRight": video / "solidWhiteRight.mp4"}
    if "vtest-h264" in args.clips:  # vtest as a camera would send it (for the mv method)
        sources["vtest-h264"] = h264_copy(video / "vtest.avi", CACHE, gop=20)
    res: dict = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    res.update(model=MODEL, cpus=os.cpu_count(), cv2_threads=cv2.getNumThreads())
    res["load_avg_start"] = os.getloadavg()[0]
    first, _ = decode(sources["vtest"], 40)
    if "quality" in args.parts:
        quality, fresh_fps = res.setdefault("quality", {}), res.setdefault("fresh_fps", {})
        for clip in args.clips:
            per_n, fresh_fps[clip] = clip_quality(seg, clip, sources[clip], args)
            for n, per_m in per_n.items():  # JSON keys are strings
                quality.setdefault(clip, {}).setdefault(str(n), {}).update(per_m)
    res["raw_model_fps"] = raw_fps(seg, first[0])
    if "gating" in args.parts:
        res["gating"] = gating(seg, first, args.refresh)
        print("gating", res["gating"], flush=True)
    if "cost" in args.parts:
        cost = costs(args.methods, sources)
        res["decode_ms_720p_h264"] = cost.pop("_decode")
        res["detector_ms_720p"] = cost.pop("_detector")
        res.setdefault("cost_ms", {}).update(cost)
    res["load_avg_end"] = os.getloadavg()[0]
    seg.close()
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(
        "raw model fps (513, batch 1):",
        res["raw_model_fps"],
        "decode ms/frame 720p H.264:",
        res.get("decode_ms_720p_h264"),
        "change detector ms/frame 720p:",
        res.get("detector_ms_720p"),
    )
    return 0


def clip_quality(
    seg: Segmenter, clip: str, path: Path, args: argparse.Namespace
) -> tuple[dict, float]:
    frames, mvs = decode(path, args.frames)
    fresh, fps = fresh_masks(seg, clip, frames, CACHE)
    per_n: dict[int, dict] = {n: {} for n in args.every}
    for m in args.methods:
        for n, r in quality(frames, mvs, fresh, args.every, m).items():
            per_n[n][m] = r
        print(clip, m, {n: per_n[n][m] for n in args.every}, flush=True)
    return per_n, round(fps, 2)


def costs(methods: list[str], sources: dict[str, Path]) -> dict:
    """The carry's ms per frame on 720p frames (an H.264 720p copy of vtest, whose vectors
    the mv method uses) and on 513x513 ones."""
    hd = CACHE / "vtest-720p.mp4"
    if not hd.is_file():
        cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(sources["vtest"])]
        cmd += ["-frames:v", "120", "-vf", "scale=1280:720", "-c:v", "libx264", "-bf", "0"]
        cmd += ["-g", "30", "-preset", "veryfast", str(hd)]
        subprocess.run(cmd, check=True)
    frames, mvs = decode(hd, 120)
    small = [cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for f in frames]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[200:320, 240:280] = 15
    out: dict = {}
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    # Three rounds over all methods, each method's best round: on a shared host the other
    # processes only ever add time, and interleaving spreads their load over the methods.
    for _ in range(3):
        for m in methods:
            for size, fr in (("720p", frames), ("513", small)):
                r = carry_ms(m, fr, mvs, (720, 1280), mask)
                best = out.setdefault(m, {}).setdefault(size, r)
                out[m][size] = {k: min(v, best[k]) for k, v in r.items()}
    out["_detector"] = detector_ms(frames)
    cv2.setNumThreads(threads)
    out["_decode"] = {"plain": decode_ms(hd, False, 120), "export_mvs": decode_ms(hd, True, 120)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
