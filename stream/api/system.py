"""The page, health, metrics, model facts, the OpenAPI document and Swagger UI."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from segstream.stream.api.context import backend
from segstream.stream.api.spec import Body, Endpoint, error, reply
from segstream.stream.schemas import Error, Health, ModelInfo, Ready
from segstream.stream.service import Service

OPENAPI = web.AppKey("openapi", dict)


def _static(name: str) -> str:
    return resources.files("segstream.stream").joinpath(f"static/{name}").read_text()


async def index(request: web.Request) -> web.Response:
    return web.Response(text=_static("index.html"), content_type="text/html")


async def login_page(request: web.Request) -> web.Response:
    return web.Response(text=_static("login.html"), content_type="text/html")


async def healthz(request: web.Request) -> web.Response:
    return reply(await backend(request).health())


async def readyz(request: web.Request) -> web.Response:
    await backend(request).ready()
    return reply(Ready(status="ready"))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=await backend(request).metrics(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def model_info(request: web.Request) -> web.StreamResponse:
    return await backend(request).model(request, _model_info)


async def _model_info(service: Service) -> web.Response:
    seg = service.segmenter
    if seg is None:
        raise error(503, "model is loading")
    colours = ["#" + bytes(seg.palette[i].astype("uint8")).hex() for i in range(len(seg.labels))]
    return reply(
        ModelInfo(
            name=seg.name,
            backend=seg.backend,
            mode=getattr(seg, "mode", None),
            input_size=list(seg.input_size),
            batch_sizes=list(seg.batch_sizes),
            workers=len(service.workers),
            max_batch=service.scheduler.max_batch,
            threads_per_worker=getattr(seg, "threads", None),
            labels=list(seg.labels),
            colors=colours,
        )
    )


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def openapi30_json(request: web.Request) -> web.Response:
    """The same document in OpenAPI 3.0 terms, for the Swagger UI release that is packaged."""
    return web.json_response(to_openapi30(request.app[OPENAPI]))


def swagger_dir() -> Path:
    import swagger_ui_bundle  # the UI's files from an installed package: no CDN

    return Path(swagger_ui_bundle.swagger_ui_path)


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>segstream API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/docs.js"></script></body></html>
"""
DOCS_JS = """window.ui = SwaggerUIBundle({url: '/docs/openapi-3.0.json', dom_id: '#swagger-ui',
  withCredentials: true, deepLinking: true});
"""


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_HTML, content_type="text/html")


async def docs_js(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_JS, content_type="application/javascript")


async def swagger_css(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(swagger_dir() / "swagger-ui.css")


async def swagger_js(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(swagger_dir() / "swagger-ui-bundle.js")


def to_openapi30(doc: Any) -> Any:
    """OpenAPI 3.1 (JSON Schema 2020-12, as pydantic writes it) -> 3.0's dialect."""
    if isinstance(doc, list):
        return [to_openapi30(x) for x in doc]
    if not isinstance(doc, dict):
        return doc
    out = {k: to_openapi30(v) for k, v in doc.items()}
    if out.get("openapi", "").startswith("3.1"):
        out["openapi"] = "3.0.3"
    for key in ("anyOf", "oneOf"):
        alts = out.get(key)
        if isinstance(alts, list) and {"type": "null"} in alts:
            rest = [a for a in alts if a != {"type": "null"}]
            del out[key]
            out.update(rest[0] if len(rest) == 1 and "$ref" not in rest[0] else {key: rest})
            out["nullable"] = True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if isinstance(out.get("examples"), list) and out["examples"]:
        out["example"] = out.pop("examples")[0]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(out.get(bound), int | float) and not isinstance(out[bound], bool):
            out[bound.replace("exclusiveM", "m")] = out[bound]
            out[bound] = True
    return out


_PAGE = {200: Body(None, media="text/html")}

ENDPOINTS = [
    Endpoint("GET", "/", index, "The live page", tag="page", responses=_PAGE),
    Endpoint(
        "GET",
        "/login",
        login_page,
        "Log in with a token (sets a session cookie)",
        role="public",
        tag="page",
        responses=_PAGE,
    ),
    Endpoint(
        "GET",
        "/healthz",
        healthz,
        "Liveness: 503 with the reason when start-up failed or inference keeps failing",
        role="public",
        tag="system",
        responses={200: Body(Health), 503: Body(Error)},
    ),
    Endpoint(
        "GET",
        "/readyz",
        readyz,
        "Readiness: the model is warm",
        role="public",
        tag="system",
        responses={200: Body(Ready), 503: Body(Error)},
    ),
    Endpoint(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        tag="system",
        responses={200: Body(None, media="text/plain"), 404: Body(Error)},
    ),
    Endpoint(
        "GET",
        "/api/model",
        model_info,
        "The model: name, backend, labels, colours",
        tag="system",
        responses={200: Body(ModelInfo), 503: Body(Error)},
    ),
    Endpoint(
        "GET",
        "/openapi.json",
        openapi_json,
        "This document (OpenAPI 3.1)",
        tag="system",
        responses={200: Body(dict[str, Any])},
    ),
    Endpoint("GET", "/docs", docs, "Swagger UI", tag="page", responses=_PAGE),
    Endpoint(
        "GET",
        "/docs/openapi-3.0.json",
        openapi30_json,
        "This document in OpenAPI 3.0 terms (for Swagger UI)",
        tag="system",
        responses={200: Body(dict[str, Any])},
    ),
    Endpoint(
        "GET",
        "/docs/static/docs.js",
        docs_js,
        "Swagger UI's set-up",
        tag="page",
        responses={200: Body(None, media="application/javascript")},
    ),
    Endpoint(
        "GET",
        "/docs/static/swagger-ui.css",
        swagger_css,
        "Swagger UI's style",
        tag="page",
        responses={200: Body(None, media="text/css")},
    ),
    Endpoint(
        "GET",
        "/docs/static/swagger-ui-bundle.js",
        swagger_js,
        "Swagger UI",
        tag="page",
        responses={200: Body(None, media="application/javascript")},
    ),
]
