#!/usr/bin/env python3
"""Prove the Dockerfile from an empty system: no Docker, no base image.

1. `debootstrap --variant=minbase bookworm` makes a clean Debian root (no Python in it).
2. The Dockerfile is parsed and its own steps run in that root, in order: ARG, ENV, WORKDIR,
   COPY (from this checkout, minus .dockerignore) and RUN (`/bin/sh -c` in a chroot with /proc,
   /sys and /dev mounted and the host's resolv.conf). FROM is replaced by the root itself: a
   minbase root has no python3, so the Dockerfile's own "no Python in the base" branch installs
   Debian's python3.11 (the version of the default base image, python:3.11-slim-bookworm).
3. The weights come from a local folder (SEGSTREAM_FETCH_FROM, default $SEGSTREAM_SHARED or
   ../shared) instead of the entrypoint's `segstream fetch` downloading them.
4. The ENTRYPOINT runs unchanged in the chroot inside its own network namespace (so port 8080
   and the HEALTHCHECK command are the Dockerfile's own, and nothing can be downloaded at
   serve time), with `--host 127.0.0.1` as the command (no token: the service only listens on
   loopback). The HEALTHCHECK command must pass, /healthz must answer 200 and every stream of
   the default config must come live with its frame counter rising.
5. The service is stopped and everything unmounted, whatever happened (try/finally plus
   SIGINT/SIGTERM handlers).

Run as root (debootstrap, chroot, mounts, unshare). Slow (about 15-25 minutes: Debian packages,
tensorflow-cpu and the rest from PyPI): a script to run by hand or in a nightly job, not a CI
test. Usage:

    sudo nice -n 19 ionice -c3 python3 scripts/prove_dockerfile.py [--root DIR] [--keep-root]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What Docker gives every RUN before the image's own ENV (its default PATH).
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_PORT_IN_NS = 8080


@dataclass
class Instruction:
    op: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf.append(stripped[:-1])
            continue
        buf.append(stripped)
        line = " ".join(p.strip() for p in buf if p.strip())
        buf = []
        op, _, args = line.partition(" ")
        out.append(Instruction(op.upper(), args.strip(), start))
    return out


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(value: str, env: dict[str, str]) -> str:
    """Docker's $VAR / ${VAR} substitution in ENV, WORKDIR, COPY and ARG values."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def key_values(args: str, env: dict[str, str]) -> dict[str, str]:
    """`K=V K2="V 2"` (ENV and ARG), values substituted from env."""
    out = {}
    for word in shlex.split(args):
        key, eq, value = word.partition("=")
        out[key] = substitute(value, env) if eq else env.get(key, "")
    return out


@dataclass
class Image:
    """What the Dockerfile leaves behind: env, workdir and the runtime instructions."""

    env: dict[str, str] = field(default_factory=lambda: {"PATH": DOCKER_PATH})
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"[prove {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], **kw: object) -> None:
    log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


class Root:
    """A chroot with its mounts; unmount() is safe to call any number of times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted: list[Path] = []

    def mount(self) -> None:
        for kind, target in (("proc", "proc"), ("sysfs", "sys")):
            self._mount(["-t", kind, kind], target)
        self._mount(["--rbind", "/dev"], "dev")
        subprocess.run(["mount", "--make-rslave", str(self.path / "dev")], check=True)
        shutil.copy2("/etc/resolv.conf", self.path / "etc/resolv.conf", follow_symlinks=True)
        # Packages must not start services in the chroot.
        rc = self.path / "usr/sbin/policy-rc.d"
        rc.write_text("#!/bin/sh\nexit 101\n")
        rc.chmod(0o755)

    def _mount(self, how: list[str], target: str) -> None:
        dest = self.path / target
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *how, str(dest)], check=True)
        self.mounted.append(dest)

    def unmount(self) -> list[str]:
        while self.mounted:
            dest = self.mounted.pop()
            r = subprocess.run(["umount", "-R", str(dest)], check=False)
            if r.returncode:
                subprocess.run(["umount", "-R", "-l", str(dest)], check=False)
        left = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.path) + "/")
        ]
        if left:
            log(f"still mounted under the root: {left}")
        return left

    def host(self, inner: str) -> Path:
        return self.path / inner.lstrip("/")


def dockerignore(repo: Path) -> list[str]:
    f = repo / ".dockerignore"
    if not f.exists():
        return []
    lines = (ln.strip() for ln in f.read_text().splitlines())
    return [ln.rstrip("/") for ln in lines if ln and not ln.startswith("#")]


def copy_in(root: Root, img: Image, args: str, ignore: list[str]) -> None:
    """COPY SRC... DEST from the build context (this checkout); symlinks kept as links."""
    words = [substitute(w, img.args | img.env) for w in shlex.split(args)]
    if any(w.startswith("--") for w in words):
        raise SystemExit(f"COPY flags are not supported here: {args}")
    *srcs, dest = words
    base = root.host(dest if dest.startswith("/") else f"{img.workdir}/{dest}")

    def ignored(rel: str) -> bool:
        return any(fnmatch(rel, pat) or fnmatch(rel, f"{pat}/*") for pat in ignore)

    for src in srcs:
        path = REPO / src
        target = base / path.name if dest.endswith("/") or len(srcs) > 1 else base
        if path.is_dir():
            shutil.copytree(
                path,
                target,
                symlinks=True,
                dirs_exist_ok=True,
                ignore=lambda d, names: [
                    n for n in names if ignored(str((Path(d) / n).relative_to(REPO)))
                ],
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def chroot_cmd(root: Root, img: Image, argv: list[str], extra_env: dict[str, str]) -> list[str]:
    env = {"HOME": "/root", "LANG": "C.UTF-8", **img.args, **img.env, **extra_env}
    return [
        "chroot",
        str(root.path),
        "/usr/bin/env",
        "-i",
        *(f"{k}={v}" for k, v in env.items()),
        "/bin/sh",
        "-c",
        f'cd {shlex.quote(img.workdir)} && exec "$@"',
        "--",
        *argv,
    ]


def build(
    root: Root,
    dockerfile: Path,
    build_args: dict[str, str],
    build_env: dict[str, str],
    timings: dict,
) -> Image:
    img = Image()
    ignore = dockerignore(REPO)
    run_no = 0
    for ins in parse_dockerfile(dockerfile.read_text()):
        if ins.op == "ARG":
            for k, v in key_values(ins.args, img.args).items():
                img.args[k] = build_args.get(k, v)
        elif ins.op == "FROM":
            base = substitute(ins.args, img.args)
            log(f"FROM {base}: replaced by the debootstrap root (Debian bookworm, minbase)")
            if "bookworm" not in base:
                log(f"note: the base {base} is not bookworm; the proof covers bookworm only")
            # ARGs declared before FROM only serve FROM (Docker's scoping).
            img.args = {}
        elif ins.op == "ENV":
            img.env.update(key_values(ins.args, img.args | img.env))
        elif ins.op == "WORKDIR":
            img.workdir = substitute(ins.args, img.args | img.env)
            root.host(img.workdir).mkdir(parents=True, exist_ok=True)
        elif ins.op == "COPY":
            copy_in(root, img, ins.args, ignore)
        elif ins.op == "RUN":
            run_no += 1
            t0 = time.monotonic()
            log(f"RUN (Dockerfile line {ins.line}): {ins.args[:120]}...")
            # No terminal and no input, as in `docker build`.
            cmd = chroot_cmd(root, img, ["/bin/sh", "-c", ins.args], build_env)
            sh(cmd, stdin=subprocess.DEVNULL)
            timings[f"RUN #{run_no} (line {ins.line})"] = round(time.monotonic() - t0, 1)
        elif ins.op == "ENTRYPOINT":
            img.entrypoint = json.loads(ins.args)
        elif ins.op == "HEALTHCHECK":
            # Options before CMD are Docker's own; CMD in exec (JSON) or shell form.
            hc = ins.args.split("CMD ", 1)[1].strip()
            img.healthcheck = json.loads(hc) if hc.startswith("[") else ["/bin/sh", "-c", hc]
        elif ins.op == "VOLUME":
            img.volumes += shlex.split(ins.args)
            for v in img.volumes:
                root.host(v).mkdir(parents=True, exist_ok=True)
        elif ins.op == "EXPOSE":
            img.expose += ins.args.split()
        else:
            raise SystemExit(f"Dockerfile line {ins.line}: {ins.op} is not handled by this proof")
    return img


def get_json(ns_pid: int, root: Root, img: Image, path: str) -> tuple[int, object]:
    """GET inside the service's network namespace, with the root's own python3."""
    code = (
        "import json,sys,urllib.request,urllib.error\n"
        "try:\n"
        f"  r=urllib.request.urlopen('http://127.0.0.1:{HOST_PORT_IN_NS}{path}',timeout=3)\n"
        "  print(json.dumps([r.status, r.read().decode()]))\n"
        "except urllib.error.HTTPError as e: print(json.dumps([e.code, e.read().decode()]))\n"
        "except OSError as e: print(json.dumps([0, str(e)]))\n"
    )
    out = subprocess.run(
        ["nsenter", "-t", str(ns_pid), "-n", *chroot_cmd(root, img, ["python3", "-c", code], {})],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    status, body = json.loads(out.strip().splitlines()[-1]) if out.strip() else (0, "")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def until(what: str, cond: Callable[[], object], timeout: float) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(1)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for: {what}")


def check_gst(root: Root, img: Image) -> str:
    """The gst extra's point: GStreamer's RTSP/H.264 elements usable from segstream's reader."""
    code = (
        "import sys\n"
        "from segstream.stream.sources.gstreamer import gst_unavailable, load_gst\n"
        "why = gst_unavailable()\n"
        "print(why or 'available: ' + load_gst().version_string())\n"
        "sys.exit(1 if why else 0)\n"
    )
    r = subprocess.run(
        chroot_cmd(root, img, ["python3", "-c", code], {}), capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"gst reader unavailable in the root: {r.stdout}{r.stderr}")
    return r.stdout.strip()


def default_streams(root: Root, img: Image) -> list[str]:
    code = (
        "import yaml,json;c=yaml.safe_load(open('/app/configs/default.yaml'));"
        "print(json.dumps([s['id'] for s in c.get('streams') or []]))"
    )
    out = subprocess.run(
        chroot_cmd(root, img, ["python3", "-c", code], {}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out))


def inferred(metrics: object, stream_id: str) -> float:
    """segstream_frames_total{outcome="inferred"} of one stream, from /metrics (-1: absent)."""
    labels = ('outcome="inferred"', f'stream="{stream_id}"')
    for line in str(metrics).splitlines():
        if line.startswith("segstream_frames_total{") and all(x in line for x in labels):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def progress(ns_pid: int, root: Root, img: Image, sid: str) -> tuple[int, float]:
    """(frames captured, frames inferred) of a stream: both must rise while it plays."""
    body = get_json(ns_pid, root, img, f"/api/streams/{sid}")[1]
    captured = body.get("captured", -1) if isinstance(body, dict) else -1
    return int(captured), inferred(get_json(ns_pid, root, img, "/metrics")[1], sid)


def serve_and_check(root: Root, img: Image, shared: Path, timings: dict) -> dict[str, object]:
    inner_shared = "/opt/shared"
    root.host(inner_shared).mkdir(parents=True, exist_ok=True)
    sh(["mount", "--bind", "-o", "ro", str(shared), str(root.host(inner_shared))])
    root.mounted.append(root.host(inner_shared))
    argv = [*img.entrypoint, "--host", "127.0.0.1"]
    cmd = chroot_cmd(root, img, argv, {"SEGSTREAM_FETCH_FROM": inner_shared})
    # A network namespace of its own: lo only; the entrypoint's port and HEALTHCHECK unchanged.
    wrapped = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "--", *cmd]
    log_path = root.path.parent / "serve.log"
    t0 = time.monotonic()
    with log_path.open("w") as logf:
        proc = subprocess.Popen(
            wrapped, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
    result: dict[str, object] = {"serve_log": str(log_path)}
    try:
        until("the network namespace", lambda: _netns_ready(proc.pid), 30)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}; see {log_path}")
            return get_json(proc.pid, root, img, "/healthz")[0] == 200

        until("/healthz 200", healthy, 600)
        timings["entrypoint to /healthz 200 (fetch from folder + start)"] = round(
            time.monotonic() - t0, 1
        )
        hc = subprocess.run(
            ["nsenter", "-t", str(proc.pid), "-n", *chroot_cmd(root, img, img.healthcheck, {})],
            check=False,
        )
        if hc.returncode != 0:
            raise SystemExit(f"the Dockerfile's HEALTHCHECK command failed ({hc.returncode})")
        result["healthcheck_rc"] = hc.returncode
        ids = default_streams(root, img)
        result["streams"] = ids
        for sid in ids:
            t1 = time.monotonic()

            def live(sid: str = sid) -> object:
                status, body = get_json(proc.pid, root, img, f"/api/streams/{sid}")
                return (
                    body
                    if status == 200 and isinstance(body, dict) and body.get("state") == "live"
                    else None
                )

            until(f"stream {sid} live", live, 300)
            c0, i0 = progress(proc.pid, root, img, sid)
            if c0 < 0 or i0 < 0:
                raise SystemExit(f"stream {sid}: no captured/inferred counters ({c0}, {i0})")

            def rising(sid: str = sid, c0: int = c0, i0: float = i0) -> bool:
                c1, i1 = progress(proc.pid, root, img, sid)
                return c1 > c0 and i1 > i0

            until(f"stream {sid} frames captured and inferred rising", rising, 120)
            timings[f"stream {sid}: live and frames rising"] = round(time.monotonic() - t1, 1)
            result[f"stream {sid}"] = get_json(proc.pid, root, img, f"/api/streams/{sid}")[1]
        status, body = get_json(proc.pid, root, img, "/api/model")
        result["api_model"] = body if status == 200 else status
    finally:
        stop(proc)
    return result


def _netns_ready(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log(f"serve stopped (exit {proc.returncode})")


def mirror_from_apt() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line format)."""
    for f in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(
        Path("/etc/apt/sources.list.d").glob("*")
    ):
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"\s*(?:URIs:|deb)\s+(\S+)", line)
            if m and m.group(1).rstrip("/").endswith("/debian"):
                return m.group(1)
    return "http://deb.debian.org/debian"


def du(path: Path) -> str:
    return subprocess.run(
        ["du", "-sh", "-x", str(path)], capture_output=True, text=True
    ).stdout.split()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/var/tmp/segstream-proof/root"))
    p.add_argument("--mirror", default=None, help="Debian mirror (default: apt's own)")
    p.add_argument("--suite", default="bookworm")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    p.add_argument("--shared", type=Path, default=None, help="folder holding the weights")
    p.add_argument("--keep-root", action="store_true", help="leave the root on disk")
    p.add_argument(
        "--pip-cert",
        type=Path,
        default=os.environ.get("PIP_CERT") or None,
        help="CA bundle pip must trust during the build, as `docker build` behind a TLS-"
        "inspecting proxy would be given (default: $PIP_CERT); build steps only",
    )
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (debootstrap, chroot, mount, unshare)")
    shared = a.shared or Path(os.environ.get("SEGSTREAM_SHARED", REPO.parent / "shared"))
    build_args = dict(kv.split("=", 1) for kv in a.build_arg)
    root = Root(a.root.resolve())
    if root.path.exists():
        raise SystemExit(f"{root.path} exists: the proof starts from an empty folder")
    root.path.parent.mkdir(parents=True, exist_ok=True)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    report: dict[str, object] = {"timings_s": timings}
    try:
        t0 = time.monotonic()
        mirror = a.mirror or mirror_from_apt()
        sh(["debootstrap", "--variant=minbase", a.suite, str(root.path), mirror])
        timings["debootstrap"] = round(time.monotonic() - t0, 1)
        report["root_after_debootstrap"] = du(root.path)
        root.mount()
        build_env = {}
        if a.pip_cert:
            # The build machine's CA bundle (e.g. a proxy's CA), for pip only, during the build.
            root.host("/etc/ssl").mkdir(parents=True, exist_ok=True)
            shutil.copy2(a.pip_cert, root.host("/etc/ssl/build-ca.crt"))
            build_env["PIP_CERT"] = "/etc/ssl/build-ca.crt"
        img = build(root, REPO / "Dockerfile", build_args, build_env, timings)
        root.host("/etc/ssl/build-ca.crt").unlink(missing_ok=True)  # the build's only
        report["root_after_build"] = du(root.path)
        report["python"] = subprocess.run(
            chroot_cmd(root, img, ["python3", "--version"], {}), capture_output=True, text=True
        ).stdout.strip()
        if "gst" in img.args.get("EXTRAS", ""):
            report["gst_reader"] = check_gst(root, img)
        report |= serve_and_check(root, img, shared, timings)
        report["result"] = "PASS"
    except BaseException as e:
        report["result"] = f"FAIL: {e!r}"
        raise
    finally:
        left = root.unmount()
        timings["total"] = round(time.monotonic() - t_all, 1)
        print(json.dumps(report, indent=2, default=str), flush=True)
        if not a.keep_root and root.path.exists() and not left:
            shutil.rmtree(root.path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
