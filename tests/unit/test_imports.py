"""The shape of the code: no import cycles, and the pipeline's imports point one way.

    sources -> scheduler -> model runner -> render -> sinks

A stage imports the shared base modules and the stages before it, never one after it, never
the metrics implementation (stages report to an injected observer) and never the service,
HTTP or CLI layers around the pipeline. models/ is a library the service uses: apart from the
offline tools it imports nothing from stream/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("stream", "models")
BASE = {
    "segstream.stream.datatypes",
    "segstream.stream.observer",
    "segstream.stream.encoders",
    "segstream.stream.sanitize",
    "segstream.stream.config",
    "segstream.stream.lifecycle",
    "segstream.stream.sourceref",
    "segstream.stream.motion",  # change detection and carried masks: cv2 and numpy only
}
STAGES = [
    "segstream.stream.sources",
    "segstream.stream.scheduler",
    "segstream.stream.runner",
    "segstream.stream.render",
    "segstream.stream.sinks",
]
# A stage or output that is a package (stream/sources/, stream/render/, stream/restream/)
# counts as one: its modules are that stage, and import each other freely.
# Outputs beside stream.sinks: they see only the shared modules (a frame arrives through put()).
OUTPUTS = {"segstream.stream.restream", "segstream.stream.mosaic"}
AROUND = {
    "segstream.stream.metrics",
    "segstream.stream.service",
    "segstream.stream.outputs",  # the sink registry: wiring, like the service
    "segstream.stream.server",
    "segstream.stream.cli",
}
# Cluster mode (stream/cluster/) is around the pipeline too; Ray is imported in one module of it,
# lazily, so the base install (no `cluster` extra) imports everything else without Ray.
CLUSTER = "segstream.stream.cluster"
RAY_MODULE = "segstream.stream.cluster.runtime"


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(("segstream", *(parts[:-1] if parts[-1] == "__init__" else parts)))
            out[name] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in it (lazy imports are dependencies too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (c := visit(d)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def unit(module: str) -> str:
    """The stage, output or shared module `module` belongs to (a package's modules: the
    package), else the module itself."""
    for name in (*BASE, *STAGES, *OUTPUTS, *AROUND):
        if module == name or module.startswith(name + "."):
            return name
    return module


def members(g: dict[str, set[str]], name: str) -> list[str]:
    found = [m for m in g if unit(m) == name]
    assert found, f"no module {name}"
    return found


def test_pipeline_imports_point_one_way() -> None:
    g = graph()
    bad = []
    for i, stage in enumerate(STAGES):
        allowed = BASE | set(STAGES[: i + 1])
        for mod in members(g, stage):
            for dep in g[mod]:
                if dep.startswith("segstream.stream.") and unit(dep) not in allowed:
                    bad.append(f"{mod} imports {dep}")
    for out in OUTPUTS:
        for mod in members(g, out):
            bad += [
                f"{mod} imports {dep}"
                for dep in g[mod]
                if dep.startswith("segstream.stream.") and unit(dep) not in BASE | {out}
            ]
    for base in BASE:
        for dep in g[base]:
            u = unit(dep)
            if u in STAGES or u in AROUND or u in OUTPUTS or dep.startswith(CLUSTER):
                bad.append(f"{base} (shared) imports {dep}")
    assert not bad, bad


def test_only_the_cluster_imports_the_cluster_and_only_its_runtime_imports_ray() -> None:
    g = graph()
    bad = [
        f"{m} imports {d}"
        for m, deps in g.items()
        for d in deps
        if d.startswith(CLUSTER) and not m.startswith(CLUSTER) and m != "segstream.stream.cli"
    ]
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "ray" or n.startswith("ray.") for n in names) and name != RAY_MODULE:
                bad.append(f"{name} imports Ray")
    assert not bad, bad


def test_models_library_does_not_import_the_service() -> None:
    g = graph()
    bad = [
        f"{m} imports {d}"
        for m, deps in g.items()
        if m.startswith("segstream.models") and not m.startswith("segstream.models.tools")
        for d in deps
        if d.startswith("segstream.stream")
    ]
    assert not bad, bad


def test_http_layer_imports_no_cli_module() -> None:
    g = graph()
    cli_modules = {m for m in g if m.startswith("segstream.models.tools.")} - {
        "segstream.models.tools.data"
    }
    assert not (g["segstream.stream.server"] & cli_modules), (
        g["segstream.stream.server"] & cli_modules
    )


def test_the_checks_can_fail() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert "segstream.stream.render" in imports_of(REPO / "stream/service.py", set(modules()))
    assert unit("segstream.stream.sources.readers.gst") == "segstream.stream.sources"
