"""Endpoints declared once: route, role, request and response models. The same declaration
registers the aiohttp route, drives the auth middleware and generates /openapi.json."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.json_schema import models_json_schema

from segstream.stream.schemas import Error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ENDPOINTS = web.AppKey("endpoints", dict)  # aiohttp route -> Endpoint
SESSION_COOKIE = "segstream_session"


@dataclass(frozen=True)
class Body:
    """One documented response (or request) body."""

    model: Any = None  # a pydantic model or type (JSON); None: binary, see media
    media: str = "application/json"  # "": no body
    description: str = ""
    alt_media: tuple[str, ...] = ()  # other (binary) media types the same status may carry


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    role: str = "viewer"  # public | viewer | admin
    tag: str = "streams"
    body: Body | None = None
    query: type[BaseModel] | None = None
    responses: dict[int, Body] = field(default_factory=dict)
    signed: bool = False  # a signed per-stream URL may stand in for a login

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


def add_endpoints(app: web.Application, endpoints: list[Endpoint]) -> None:
    table = app.setdefault(ENDPOINTS, {})
    for ep in endpoints:
        route = app.router.add_route(ep.method, ep.path, ep.handler)
        table[route] = ep


def endpoint_of(request: web.Request) -> Endpoint | None:
    route = request.match_info.route
    return request.app[ENDPOINTS].get(route)


# -- request and response helpers -------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error answered as JSON ({"error": ...}) by the server's error middleware."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(body.get("error"))
        self.status, self.body, self.headers = status, body, headers or {}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def error(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> ApiError:
    """An error to raise from a handler."""
    return ApiError(status, {"error": message, **extra}, headers)


def field_errors(e: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append({"loc": f"{prefix}{loc}" if loc else prefix.rstrip(".") or "body", "msg": msg})
    return out


def invalid(e: ValidationError, what: str = "body") -> ApiError:
    details = field_errors(e)
    first = details[0]
    return error(422, f"invalid {what}: {first['loc']}: {first['msg']}", details=details)


async def read_json(request: web.Request, model: type[BaseModel], limit: int = 64 * 1024) -> Any:
    """The request body validated against `model` (422 naming the key path otherwise)."""
    if request.content_type != "application/json":
        raise error(415, "send the body as application/json")
    if request.content_length is not None and request.content_length > limit:
        raise error(413, f"body larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise error(413, f"body larger than {limit} bytes")
    try:
        data = json.loads(raw or b"null")
    except ValueError as e:
        raise error(400, f"body is not valid JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid(e) from None


def read_query(request: web.Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as e:
        raise invalid(e, "query") from None


def reply(model: BaseModel | list[Any], status: int = 200, adapter: Any = None) -> web.Response:
    """A JSON response built from the model that documents it."""
    if isinstance(model, BaseModel):
        body = model.model_dump_json()
    else:
        body = (adapter or TypeAdapter(list[Any])).dump_json(model).decode()
    return web.Response(text=body, status=status, content_type="application/json")


# -- OpenAPI 3.1 ------------------------------------------------------------------------------

_COMMON_ERRORS = {401: "No or bad credentials.", 403: "The credentials' role may not do this."}


def _models(endpoints: list[Endpoint]) -> list[tuple[type[BaseModel], str]]:
    seen: dict[tuple[type[BaseModel], str], None] = {}  # ordered, no duplicates
    for ep in endpoints:
        if ep.body and isinstance(ep.body.model, type) and issubclass(ep.body.model, BaseModel):
            seen[(ep.body.model, "validation")] = None
        for b in ep.responses.values():
            if isinstance(b.model, type) and issubclass(b.model, BaseModel):
                seen[(b.model, "serialization")] = None
    return list(seen)


@dataclass
class _Schemas:
    """Component schemas: pydantic's for the models, plus those that other types (e.g.
    list[Model]) bring along."""

    refs: dict[Any, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def of(self, model: Any, mode: str) -> dict[str, Any]:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return dict(self.refs[(model, mode)])
        if model is None:
            return {"type": "string", "format": "binary"}
        schema = TypeAdapter(model).json_schema(
            ref_template="#/components/schemas/{model}",
            mode=mode,  # type: ignore[arg-type]
        )
        self.extra.update(schema.pop("$defs", {}))
        return schema


def _content(body: Body, schemas: _Schemas, mode: str) -> dict[str, Any]:
    content = {body.media: {"schema": schemas.of(body.model, mode)}}
    for media in body.alt_media:
        content[media] = {"schema": {"type": "string", "format": "binary"}}
    return content


def _parameters(ep: Endpoint) -> list[dict[str, Any]]:
    params = [
        {
            "name": n,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        }
        for n in re.findall(r"{(\w+)}", ep.path)
    ]
    if ep.query is not None:
        schema = ep.query.model_json_schema()
        for name, prop in schema.get("properties", {}).items():
            params.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in schema.get("required", []),
                    "schema": prop,
                    "description": prop.get("description", ""),
                }
            )
    return params


def _operation(ep: Endpoint, schemas: _Schemas) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": ep.operation_id,
        "summary": ep.summary,
        "tags": [ep.tag],
        "responses": {},
    }
    params = _parameters(ep)
    if params:
        op["parameters"] = params
    if ep.body is not None:
        op["requestBody"] = {"required": True, "content": _content(ep.body, schemas, "validation")}
    errors = dict(ep.responses)
    if ep.role != "public":
        for code, text in _COMMON_ERRORS.items():
            errors.setdefault(code, Body(Error, description=text))
        sec: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]
        if ep.signed:
            sec.append({"signedUrl": [], "signedUrlExpiry": []})
        op["security"] = sec
    if ep.body is not None or ep.query is not None:
        errors.setdefault(422, Body(Error, description="Invalid request."))
    if ep.body is not None:
        for code in (400, 413, 415):  # unparsable, too large, wrong media type
            errors.setdefault(code, Body(Error))
    for code, b in sorted(errors.items()):
        resp: dict[str, Any] = {"description": b.description or _REASONS.get(code, "")}
        if b.media and (b.model is not None or b.media != "application/json"):
            resp["content"] = _content(b, schemas, "serialization")
        op["responses"][str(code)] = resp
    return op


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No content",
    400: "Bad request",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    503: "Not ready or busy",
}


def openapi(endpoints: list[Endpoint], *, title: str, version: str) -> dict[str, Any]:
    models = list(dict.fromkeys([*_models(endpoints), (Error, "serialization")]))
    refs, defs = models_json_schema(
        models,  # type: ignore[arg-type]
        ref_template="#/components/schemas/{model}",
    )
    schemas = _Schemas(refs)
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": {**defs.get("$defs", {}), **schemas.extra},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `segstream token add`.",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "Set by POST /api/login.",
                },
                "signedUrl": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "sig",
                    "description": "Signature of a URL minted by an admin.",
                },
                "signedUrlExpiry": {"type": "apiKey", "in": "query", "name": "exp"},
            },
        },
    }
