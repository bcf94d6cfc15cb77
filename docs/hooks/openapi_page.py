"""MkDocs hook: the HTTP API reference page and the pipeline picture, generated at build time.

The reference is rendered from the OpenAPI document the service itself serves at
/openapi.json (`stream.api.spec.openapi` over the server's endpoint list), so it cannot drift
from the code; the document is also published beside the page (`api/openapi.json`). The
architecture picture is an SVG drawn here from the list of stages below. Both work offline:
no CDN, no JavaScript.
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def _document() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))  # `segstream` links to stream/ and models/ in the checkout
    from segstream.stream.api.spec import openapi
    from segstream.stream.server import ENDPOINTS, VERSION

    return openapi(ENDPOINTS, title="segstream", version=VERSION)


def on_files(files: Files, config: Any) -> Files:
    doc = _document()
    files.append(File.generated(config, "api/reference.md", content=render(doc)))
    files.append(File.generated(config, "api/openapi.json", content=json.dumps(doc, indent=1)))
    files.append(File.generated(config, "img/architecture.svg", content=architecture_svg()))
    return files


# --- the reference page -------------------------------------------------------------------


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_type(s) for s in schema[key])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    t = schema.get("type", "any")
    if t == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if t == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return str(t)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _media(content: dict[str, Any]) -> str:
    parts = []
    for media, body in content.items():
        schema = body.get("schema")
        parts.append(f"`{media}`" + (f" {_type(schema)}" if schema else ""))
    return ", ".join(parts)


def _operation(path: str, method: str, op: dict[str, Any]) -> list[str]:
    roles = "public" if "security" not in op else "token or session"
    if any("signedUrl" in s for s in op.get("security", [])):
        roles += " or signed URL"
    out = [f"### `{method.upper()} {path}`", "", _cell(op.get("summary", "")), ""]
    out += [f"Auth: {roles}. Operation id: `{op['operationId']}`.", ""]
    params = op.get("parameters", [])
    if params:
        out += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in params:
            desc = _cell(p.get("description", p.get("schema", {}).get("description", "")))
            req = "yes" if p.get("required") else ""
            out.append(f"| `{p['name']}` | {p['in']} | {_type(p['schema'])} | {req} | {desc} |")
        out.append("")
    if "requestBody" in op:
        out += [f"Body: {_media(op['requestBody']['content'])}", ""]
    out += ["| status | meaning | body |", "| --- | --- | --- |"]
    for code, resp in op["responses"].items():
        body = _media(resp.get("content", {}))
        out.append(f"| {code} | {_cell(resp.get('description', ''))} | {body} |")
    return [*out, ""]


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name} {{#schema-{name.lower()}}}", ""]
    if schema.get("description"):
        out += [_cell(schema["description"]), ""]
    props = schema.get("properties")
    if not props:
        return [*out, f"Type: {_type(schema)}", ""]
    required = set(schema.get("required", []))
    out += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for field, sub in props.items():
        req = "yes" if field in required else ""
        desc = _cell(sub.get("description", ""))
        out.append(f"| `{field}` | {_type(sub)} | {req} | {desc} |")
    return [*out, ""]


def render(doc: dict[str, Any]) -> str:
    info = doc["info"]
    out = [
        "# HTTP API reference",
        "",
        f"Generated at build time from the service's own OpenAPI {doc['openapi']} document "
        f"({info['title']} {info['version']}), the one a running service serves at "
        "`/openapi.json` and shows in Swagger UI at `/docs`. Download it: "
        "[openapi.json](openapi.json). What each role may do, and the conventions: "
        "[HTTP API](../api.md).",
        "",
    ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            by_tag.setdefault(op["tags"][0], []).append((path, method, op))
    for tag, ops in by_tag.items():
        out += [f"## {tag}", ""]
        for path, method, op in ops:
            out += _operation(path, method, op)
    out += ["## Schemas", ""]
    for name, schema in sorted(doc["components"]["schemas"].items()):
        out += _schema(name, schema)
    return "\n".join(out)


# --- the pipeline picture -----------------------------------------------------------------

STAGES = [
    ("sources", "stream/sources/", "readers: opencv, pyav, gst;\nlatest-frame slot, watchdog"),
    ("scheduler", "stream/scheduler.py", "infer_fps caps, motion gate,\nbatches, latency target"),
    ("model runner", "stream/runner.py", "models.runtime:\ntflite or keras workers"),
    ("render", "stream/render/", "privacy redaction, overlay,\nzones, JPEG once per frame"),
    ("sinks", "stream/sinks.py", "MJPEG, page WebSocket,\nmosaic, H.264 re-stream"),
]
AROUND = [
    ("HTTP API + page", "stream/server.py, stream/api/"),
    ("config", "stream/config.py"),
    ("metrics", "stream/metrics.py, observer.py"),
    ("events", "zones, store, MQTT, webhooks"),
    ("cluster", "stream/cluster/ (Ray)"),
]


def _box(x: int, y: int, w: int, h: int, lines: list[tuple[str, str]], fill: str) -> str:
    rect = f'x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" stroke="#37474f"'
    out = [f"<rect {rect}/>"]
    for k, (text, style) in enumerate(lines):
        out.append(
            f'<text x="{x + w // 2}" y="{y + 22 + 17 * k}" text-anchor="middle" {style}>'
            f"{escape(text)}</text>"
        )
    return "\n".join(out)


def architecture_svg() -> str:
    w, h, gap, top = 190, 110, 40, 40
    width = len(STAGES) * (w + gap) - gap + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} 330" '
        'font-family="sans-serif" font-size="13">',
        '<defs><marker id="a" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#37474f"/>'
        "</marker></defs>",
        '<text x="20" y="24" font-weight="bold">one pipeline per service: a frame travels left'
        " to right; each stage imports only the ones before it</text>",
    ]
    for i, (name, module, what) in enumerate(STAGES):
        x = 20 + i * (w + gap)
        lines = [(name, 'font-weight="bold"'), (module, 'font-family="monospace" font-size="11"')]
        lines += [(s, "") for s in what.split("\n")]
        parts.append(_box(x, top, w, h, lines, "#e3f2fd"))
        if i:
            parts.append(
                f'<line x1="{x - gap + 2}" y1="{top + h // 2}" x2="{x - 3}" y2="{top + h // 2}" '
                'stroke="#37474f" stroke-width="2" marker-end="url(#a)"/>'
            )
    parts.append(
        f'<text x="20" y="{top + h + 45}" font-weight="bold">around it (stream/service.py wires'
        " them; stream/datatypes.py holds Frame, Job, Result, the Sink protocol)</text>"
    )
    aw = (width - 40 - 4 * 20) // len(AROUND)
    for i, (name, module) in enumerate(AROUND):
        x = 20 + i * (aw + 20)
        lines = [(name, 'font-weight="bold"'), (module, 'font-size="11"')]
        parts.append(_box(x, top + h + 65, aw, 60, lines, "#f1f8e9"))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
