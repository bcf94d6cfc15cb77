#!/usr/bin/env python3
"""Mutation check of the security rules: each rule is deleted or inverted in a scratch copy of
the repository and the tests named for it must then fail.

    python scripts/mutation_check.py            # every mutation; exit 1 if one survives
    python scripts/mutation_check.py --only session-expiry --only bearer-throttle
    python scripts/mutation_check.py --list

A mutation is an exact string replacement in one or more source files; an anchor that is not
found exactly once stops the script (so it cannot pass because the code moved). The tests run
with PYTHONPATH at the scratch copy, without bytecode caches (a restored file never meets a
mutant's .pyc). Results: "killed" (a selected test failed), "SURVIVED" (they all passed) or
"ERROR" (pytest could not run them: collection error, nothing selected, timeout)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    rule: str  # what the mutant breaks, in the README's words
    patches: tuple[tuple[str, str, str], ...]  # (file, anchor, replacement)
    tests: tuple[str, ...]  # test files
    select: str  # pytest -k expression


API = ("tests/e2e/test_api.py", "tests/unit/test_api.py")
AUTH, SERVER = "stream/auth.py", "stream/server.py"
PREDICT, SANITIZE = "stream/api/predict.py", "stream/sanitize.py"
ROLE_CHECK = (
    'if not who.allows(ep.role) or (who.stream and who.stream != request.match_info.get("id")):'
)
SIGNED_BODY = 'return self._sign(f"{stream_id}\\n{path}\\n{expires}".encode())'

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "role-check",
        "a viewer may not change streams or mint share URLs (403)",
        ((SERVER, ROLE_CHECK, 'if who.stream and who.stream != request.match_info.get("id"):'),),
        API,
        "auth_matrix",
    ),
    Mutation(
        "role-rank",
        "roles are ranked viewer < admin",
        ((AUTH, "return RANK[self.role] >= RANK[need]", "return True"),),
        API,
        "auth_matrix",
    ),
    Mutation(
        "auth-required",
        "once a token exists every endpoint but health and login needs credentials",
        ((SERVER, "    if not auth.enabled:\n", "    if True:\n"),),
        API,
        "auth_matrix",
    ),
    Mutation(
        "locked-after-last-revoke",
        "revoking the last token locks the service rather than opening it",
        (
            (
                AUTH,
                "        if not self._required and self._all():\n"
                "            self._required = True\n"
                "        return self._required\n",
                "        return bool(self._all())\n",
            ),
        ),
        API,
        "login_session",
    ),
    Mutation(
        "bearer-token-check",
        "only a stored token's hash opens the API",
        (
            (
                AUTH,
                'if hmac.compare_digest(digest, e["sha256"]):',
                'if hmac.compare_digest(digest, e["sha256"]) or True:',
            ),
        ),
        API,
        "auth_matrix",
    ),
    Mutation(
        "signed-url-signature",
        "a signed URL needs the server key's signature",
        (
            (
                AUTH,
                "if exp < time.time() or not hmac.compare_digest(sig, self.sign_path(path, "
                "stream_id, exp)):",
                "if exp < time.time():",
            ),
        ),
        API,
        "signed_urls_open",
    ),
    Mutation(
        "signed-url-kind",
        "a signed URL opens its own kind only (an MJPEG URL is no snapshot URL)",
        ((AUTH, SIGNED_BODY, 'return self._sign(f"{stream_id}\\n{expires}".encode())'),),
        API,
        "signed_urls_open",
    ),
    Mutation(
        # Both layers: the signature covers the stream, and the middleware compares the
        # signed URL's stream with the path's (either alone keeps the rule).
        "signed-url-scope",
        "a signed URL opens its own stream only",
        (
            (AUTH, SIGNED_BODY, 'return self._sign(f"{expires}".encode())'),
            (SERVER, ROLE_CHECK, "if not who.allows(ep.role):"),
        ),
        API,
        "signed_urls_open",
    ),
    Mutation(
        "signed-url-expiry",
        "a signed URL stops working when it expires",
        ((AUTH, "if exp < time.time() or not hmac", "if not hmac"),),
        API,
        "signed_urls_and_sessions_expire",
    ),
    Mutation(
        "session-expiry",
        "a browser session ends after auth.session_ttl_s",
        ((AUTH, 'if data.get("e", 0) < time.time():', "if False:"),),
        API,
        "signed_urls_and_sessions_expire",
    ),
    Mutation(
        "session-signature",
        "a session cookie counts only if the server key signed it",
        ((AUTH, "if not hmac.compare_digest(sig, self._sign(body)):", "if False:"),),
        API,
        "forged_sessions",
    ),
    Mutation(
        "session-token-binding",
        "a session ends with its token (a new token under the same name is someone else)",
        (
            (
                AUTH,
                '            and hmac.compare_digest(e["sha256"][:16], str(data.get("h")))\n',
                "",
            ),
        ),
        API,
        "forged_sessions",
    ),
    Mutation(
        "login-throttle",
        "failed logins are slowed down per client",
        (
            (
                "stream/api/session.py",
                "await asyncio.sleep(throttle.delay(client))",
                "await asyncio.sleep(0)",
            ),
        ),
        API,
        "login_session",
    ),
    Mutation(
        "bearer-throttle",
        "bad bearer tokens are slowed down per client",
        (
            (
                SERVER,
                "            await asyncio.sleep(throttle.delay(client))\n",
                "            await asyncio.sleep(0)\n",
            ),
        ),
        API,
        "bad_bearer",
    ),
    Mutation(
        "bearer-throttle-per-client",
        "the bearer throttle counts per client address",
        (
            (
                SERVER,
                'throttle, client = request.app[THROTTLE], request.remote or "unknown"',
                'throttle, client = request.app[THROTTLE], "everyone"',
            ),
        ),
        API,
        "bad_bearer",
    ),
    Mutation(
        "throttle-doubling",
        "each failure doubles the wait (0.25 s, 0.5 s, 1 s ...)",
        ((AUTH, "min(0.25 * 2 ** (n - 1), 8.0)", "0.25"),),
        API,
        "bad_bearer or throttle_doubles",
    ),
    Mutation(
        "throttle-cap",
        "the wait is capped at 8 s",
        ((AUTH, "min(0.25 * 2 ** (n - 1), 8.0)", "0.25 * 2 ** (n - 1)"),),
        API,
        "throttle_doubles",
    ),
    Mutation(
        "throttle-reset",
        "a success clears a client's failures",
        (
            (
                AUTH,
                "    def succeeded(self, client: str) -> None:\n"
                "        self._fails.pop(client, None)\n",
                "    def succeeded(self, client: str) -> None:\n        pass\n",
            ),
        ),
        API,
        "bad_bearer or throttle_doubles",
    ),
    Mutation(
        "upload-concurrency",
        "at most predict.max_concurrent predictions at once (503 + Retry-After)",
        ((PREDICT, "    if slots.locked():\n", "    if False:\n"),),
        API,
        "beyond_the_limit",
    ),
    Mutation(
        "upload-bytes-read",
        "an upload is cut off at predict.max_bytes while reading",
        ((PREDICT, "if len(buf) > limit:", "if False:"),),
        API,
        "limits_are_exact",
    ),
    Mutation(
        "upload-bytes-boundary",
        "an upload of exactly predict.max_bytes is accepted",
        ((PREDICT, "if len(buf) > limit:", "if len(buf) >= limit:"),),
        API,
        "limits_are_exact",
    ),
    Mutation(
        "upload-bytes-declared",
        "a body declared larger than predict.max_bytes is refused before it is read",
        (
            (
                PREDICT,
                "if request.content_length is not None and request.content_length > limit + 64 "
                "* 1024:",
                "if False:",
            ),
        ),
        API,
        "limits_are_exact",
    ),
    Mutation(
        "upload-pixels",
        "at most predict.max_pixels, read from the header (413)",
        ((PREDICT, "if w * h > max_pixels:", "if False:"),),
        API,
        "limits_are_exact",
    ),
    Mutation(
        "upload-pixels-boundary",
        "an image of exactly predict.max_pixels is accepted",
        ((PREDICT, "if w * h > max_pixels:", "if w * h >= max_pixels:"),),
        API,
        "limits_are_exact",
    ),
    Mutation(
        "scrub-userinfo",
        "camera URLs lose user:pass@",
        ((SANITIZE, "        rest = MASK + rest[at:]\n", "        pass\n"),),
        ("tests/unit/test_sanitize.py",),
        "sanitize_url",
    ),
    Mutation(
        "scrub-query",
        "camera URLs lose secret query values (?password=, ?token=, ...)",
        (
            (
                SANITIZE,
                'return re.sub(r"[-_.\\s]", "", key.lower()) in SECRET_KEYS',
                "return False",
            ),
        ),
        ("tests/unit/test_sanitize.py",),
        "sanitize_url or inside_messages",
    ),
    Mutation(
        "scrub-logs",
        "log lines leave with their URLs scrubbed",
        ((SANITIZE, "            record.msg, record.args = clean, None\n", "            pass\n"),),
        ("tests/unit/test_sanitize.py",),
        "log_records",
    ),
)


def source_files(repo: Path) -> list[str]:
    """Tracked and new (not ignored) files: the working tree as it is, edits included."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [f for f in out.split("\0") if f]


def copy_tree(repo: Path, dest: Path) -> None:
    for rel in source_files(repo):
        src, dst = repo / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))  # segstream/stream -> ../stream stays in the copy
        elif src.is_file():
            shutil.copy2(src, dst)


def apply(root: Path, m: Mutation) -> dict[Path, str]:
    """Patches the copy; returns the original texts. An anchor not found once is an error."""
    originals: dict[Path, str] = {}
    for rel, anchor, replacement in m.patches:
        path = root / rel
        current = path.read_text()
        originals.setdefault(path, current)
        count = current.count(anchor)
        if count != 1:
            restore(originals)
            raise SystemExit(f"{m.name}: anchor found {count} times in {rel}: {anchor!r}")
        path.write_text(current.replace(anchor, replacement))
    return originals


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text)


def pytest(root: Path, env: dict[str, str], files: tuple[str, ...], select: str, limit: float):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider"]
    cmd += [*files, "-k", select]
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    return p.returncode, p.stdout + p.stderr


def first_failure(output: str) -> str:
    m = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return m.group(1).split("::")[-1].split("[")[0] if m else ""


def environment(root: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("SEGSTREAM_SHARED", str(REPO.parent / "shared"))
    env["SEGSTREAM_TEST_HOME"] = str(home)  # one model cache for every run
    return env


def check_import_path(root: Path, env: dict[str, str]) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import segstream.stream as s; print(s.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(root)):
        raise SystemExit(f"segstream.stream is imported from {where}, not the scratch copy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="run this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        known = sorted(m.name for m in MUTATIONS)
        raise SystemExit(f"unknown mutation in {args.only}; known: {known}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.rule}")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root, home = Path(tmp) / "repo", Path(tmp) / "home"
        copy_tree(REPO, root)
        env = environment(root, home)
        check_import_path(root, env)
        for m in chosen:  # every anchor is checked before anything runs
            restore(apply(root, m))
        files = tuple(sorted({f for m in chosen for f in m.tests}))
        union = " or ".join(f"({m.select})" for m in chosen)
        t0 = time.monotonic()
        rc, out = pytest(root, env, files, union, args.timeout)
        if rc != 0:
            print(out[-4000:])
            raise SystemExit(f"the unmutated copy fails its tests (pytest exit {rc})")
        print(f"baseline: the selected tests pass unmutated ({time.monotonic() - t0:.0f} s)\n")

        rows, bad = [], 0
        for m in chosen:
            originals = apply(root, m)
            t0 = time.monotonic()
            try:
                rc, out = pytest(root, env, m.tests, m.select, args.timeout)
            finally:
                restore(originals)
            result = "killed" if rc == 1 else "SURVIVED" if rc == 0 else "ERROR"
            by = first_failure(out) if rc == 1 else ("" if rc == 0 else f"pytest exit {rc}")
            bad += result != "killed"
            rows.append((m.name, result, f"{time.monotonic() - t0:.0f}", by, m.rule))
            print(f"{m.name}: {result} {by}", file=sys.stderr, flush=True)
            if result == "ERROR":
                print(out[-3000:], file=sys.stderr)

    head = ("mutation", "result", "s", "failed test", "rule")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    rule = ("-" * 4,)
    for r in [head, tuple("-" * w for w in widths) + rule, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    print(f"\n{len(rows) - bad} of {len(rows)} mutations killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
