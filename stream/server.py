"""HTTP layer (aiohttp): the live page, MJPEG streams, snapshots, masks, JSON API, health,
Prometheus metrics, and a MAX-style single-image REST API."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from importlib import resources
from typing import Any

import cv2
import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.tools.data import encode_palette_png
from stream import metrics
from stream.config import AppConfig
from stream.publish import BOUNDARY, mjpeg_part
from stream.service import Service, Stream

log = logging.getLogger(__name__)
SERVICE = web.AppKey("service", Service)
STOP = web.AppKey("stop", asyncio.Event)  # set to shut the server down
MAX_UPLOAD = 32 * 1024 * 1024


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _stream(request: web.Request) -> Stream:
    service = request.app[SERVICE]
    sid = request.match_info["id"]
    s = service.streams.get(sid)
    if s is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"unknown stream {sid!r}", "streams": list(service.streams)}),
            content_type="application/json",
        )
    return s


async def index(request: web.Request) -> web.Response:
    html = resources.files("stream").joinpath("static/index.html").read_text()
    return web.Response(text=html, content_type="text/html")


async def api_streams(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(
        {"ready": service.ready, "streams": [service.stream_status(s) for s in service.streams]}
    )


async def api_stream(request: web.Request) -> web.Response:
    s = _stream(request)
    return web.json_response(request.app[SERVICE].stream_status(s.cfg.id))


async def api_model(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    seg = service.segmenter
    if seg is None:
        return json_error(503, "model is loading")
    colours = ["#" + bytes(seg.palette[i].astype("uint8")).hex() for i in range(len(seg.labels))]
    return web.json_response({
        "name": seg.name,
        "backend": seg.backend,
        "input_size": list(seg.input_size),
        "batch_sizes": list(seg.batch_sizes),
        "workers": len(service.workers),
        "max_batch": service.scheduler.max_batch,
        "threads_per_worker": getattr(seg, "threads", None),
        "labels": seg.labels,
        "colors": colours,
    })


async def mjpeg(request: web.Request) -> web.StreamResponse:
    """multipart/x-mixed-replace: each write sends the newest frame; a slow client skips."""
    service = request.app[SERVICE]
    s = _stream(request)
    fps = _client_fps(request, service.cfg.server.max_client_fps)
    resp = web.StreamResponse(headers={
        "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        "Cache-Control": "no-cache, no-store, must-revalidate",
        "Pragma": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await resp.prepare(request)
    pub = s.publisher
    pub.clients += 1
    metrics.MJPEG_CLIENTS.labels(stream=s.cfg.id).inc()
    seq = 0
    next_at = 0.0
    try:
        while not pub.closed:
            item = await pub.next(seq, timeout=1.0)
            if item is None:
                continue
            await resp.write(mjpeg_part(item.jpeg))
            service.record_latency(s.cfg.id, time.monotonic() - item.capture_ts)
            seq = item.seq
            if fps > 0:
                next_at = max(next_at + 1.0 / fps, time.monotonic())
                await asyncio.sleep(next_at - time.monotonic())
    except (ConnectionResetError, ConnectionError):
        pass  # the viewer went away
    finally:
        pub.clients -= 1
        metrics.MJPEG_CLIENTS.labels(stream=s.cfg.id).dec()
    return resp


def _client_fps(request: web.Request, server_cap: float) -> float:
    raw = request.query.get("fps")
    try:
        fps = float(raw) if raw is not None else 0.0
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"bad fps {raw!r}"}),
                                 content_type="application/json") from None
    if fps < 0:
        raise web.HTTPBadRequest(text=json.dumps({"error": "fps must be >= 0"}),
                                 content_type="application/json")
    if server_cap > 0:
        fps = min(fps, server_cap) if fps > 0 else server_cap
    return fps


async def snapshot(request: web.Request) -> web.Response:
    s = _stream(request)
    latest = s.publisher.latest
    if latest is not None and time.monotonic() - latest.published_ts < 1.0:
        jpeg = latest.jpeg  # someone is watching: reuse the frame already encoded
    else:
        snap = await asyncio.to_thread(s.view.snapshot)
        if snap is None:
            return json_error(503, f"stream {s.cfg.id!r} has no segmented frame yet",
                              state=s.source.state.value, reason=s.source.reason)
        jpeg = snap[0]
    return web.Response(body=jpeg, content_type="image/jpeg",
                        headers={"Cache-Control": "no-store"})


async def mask_png(request: web.Request) -> web.Response:
    s = _stream(request)
    result = s.view.result
    seg = request.app[SERVICE].segmenter
    if result is None or seg is None:
        return json_error(503, f"stream {s.cfg.id!r} has no mask yet",
                          state=s.source.state.value, reason=s.source.reason)
    png = await asyncio.to_thread(encode_palette_png, result.mask, seg.palette)
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.error:
        return json_error(500, service.error)
    return web.json_response({"status": "ok", "uptime_s": round(time.monotonic() -
                                                                  service.started_ts, 1)})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if not service.ready:
        return json_error(503, service.error or "model warming up")
    return web.json_response({"status": "ready"})


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- MAX-style model API ----------------------------------------------------------------------
async def max_metadata(request: web.Request) -> web.Response:
    seg = request.app[SERVICE].segmenter
    if seg is None:
        return json_error(503, "model is loading")
    return web.json_response({
        "id": seg.name,
        "name": f"DeepLabv3 MobileNetV2 ({seg.name})",
        "description": seg.spec.description,
        "type": "Semantic Image Segmentation",
        "license": "Apache-2.0",
        "source": seg.spec.url,
    })


async def max_labels(request: web.Request) -> web.Response:
    seg = request.app[SERVICE].segmenter
    if seg is None:
        return json_error(503, "model is loading")
    return web.json_response({
        "count": len(seg.labels),
        "labels": [{"id": str(i), "name": n} for i, n in enumerate(seg.labels)],
    })


async def max_predict(request: web.Request) -> web.Response:
    """POST multipart `image`: {"status":"ok","image_size":[w,h],"seg_map":[[class ids]]}."""
    service = request.app[SERVICE]
    if not service.ready:
        return json_error(503, "model warming up")
    data = await _upload(request)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return json_error(400, "could not decode the uploaded image (JPEG, PNG, BMP, ...)")
    mask = await asyncio.to_thread(service.segment_image, img)
    return web.json_response({
        "status": "ok",
        "image_size": [int(img.shape[1]), int(img.shape[0])],
        "seg_map": mask.tolist(),
    })


async def _upload(request: web.Request) -> bytes:
    if not request.content_type.startswith("multipart/"):
        raise web.HTTPBadRequest(text=json.dumps({"error": "send multipart/form-data with an "
                                                  "'image' field"}),
                                 content_type="application/json")
    reader = await request.multipart()
    async for part in reader:
        if part.name == "image":
            return bytes(await part.read(decode=False))
    raise web.HTTPBadRequest(text=json.dumps({"error": "missing form field 'image'"}),
                             content_type="application/json")


def make_app(service: Service) -> web.Application:
    app = web.Application(client_max_size=MAX_UPLOAD)
    app[SERVICE] = service
    app[STOP] = asyncio.Event()
    app.router.add_get("/", index)
    app.router.add_get("/api/streams", api_streams)
    app.router.add_get("/api/streams/{id}", api_stream)
    app.router.add_get("/api/model", api_model)
    app.router.add_get("/streams/{id}/mjpeg", mjpeg)
    app.router.add_get("/streams/{id}/snapshot.jpg", snapshot)
    app.router.add_get("/streams/{id}/mask.png", mask_png)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/model/metadata", max_metadata)
    app.router.add_get("/model/labels", max_labels)
    app.router.add_post("/model/predict", max_predict)
    app.cleanup_ctx.append(_service_ctx)
    return app


async def _service_ctx(app: web.Application):
    """Start the pipeline in the background (so /healthz answers during warm-up); stop it on
    shutdown, closing the MJPEG responses first."""
    service = app[SERVICE]

    async def start() -> None:
        try:
            await service.start()
        except Exception as e:
            service.error = f"start-up failed: {e}"
            log.error("%s", service.error)
            app[STOP].set()  # a service that cannot start must not pretend to run

    task = asyncio.create_task(start())
    yield
    task.cancel()
    await service.stop()


async def serve(cfg: AppConfig) -> int:
    """Runs until SIGINT/SIGTERM; returns the exit code (1 when start-up failed)."""
    service = Service(cfg)
    app = make_app(service)
    stop = app[STOP]
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=cfg.server.shutdown_timeout,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.server.host, cfg.server.port,
                       shutdown_timeout=cfg.server.shutdown_timeout)
    await site.start()
    log.info("listening on http://%s:%d/", cfg.server.host, cfg.server.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    for s in service.streams.values():
        s.publisher.close()  # ends every MJPEG response so the server can close at once
    await runner.cleanup()
    return 1 if service.error else 0
