"""Authentication: bearer tokens (stored hashed), browser sessions, signed per-stream URLs.

Roles: `viewer` watches streams, reads the API and predicts; `admin` also changes streams and
mints signed URLs. Tokens are random 256-bit strings shown once by `segstream token add`; only
their SHA-256 is stored (a fast hash is enough for random secrets of that size). Sessions and
signed URLs are HMAC-signed with a server secret kept next to the tokens file, so they survive
restarts; a session names its token, so revoking the token ends the session too. Every
comparison is constant-time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Role = Literal["viewer", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "admin")
RANK = {"public": 0, "viewer": 1, "admin": 2}
TOKEN_PREFIX = "sst_"
ENV_ADMIN_TOKEN = "SEGSTREAM_ADMIN_TOKEN"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class AuthError(ValueError):
    """A token-store problem worded for the operator (bad name, duplicate, unknown)."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role | Literal["open"]  # "open": no token configured, loopback only
    via: str  # token | session | signed-url | open
    stream: str | None = None  # a signed URL's one stream

    def allows(self, need: str) -> bool:
        if self.role == "open":
            return True
        return RANK[self.role] >= RANK[need]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TokenStore:
    """`tokens.json`: name, role, SHA-256 and creation time of each token. Re-read when it
    changes on disk, so `segstream token add/revoke` takes effect on a running service."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None  # inode, size, mtime of what we read
        self._entries: list[dict[str, Any]] = []

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._entries = None, []
                return []
            # Every save is a new file (rename), so its inode tells changes apart even
            # within one mtime tick.
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                data = json.loads(self.path.read_text())
                self._entries = list(data.get("tokens", []))
                self._stamp = stamp
            return list(self._entries)

    def _save(self, entries: list[dict[str, Any]]) -> None:
        _write_private(self.path, (json.dumps({"tokens": entries}, indent=2) + "\n").encode())

    def add(self, name: str, role: str) -> str:
        """A new token for `name` (shown once; only its hash is kept)."""
        if not _NAME_RE.match(name):
            raise AuthError("token name must be 1-64 letters, digits or _ . @ -")
        if role not in ROLES:
            raise AuthError(f"role must be one of {list(ROLES)}")
        entries = self.entries()
        if any(e["name"] == name for e in entries):
            raise AuthError(f"a token named {name!r} exists (revoke it first)")
        token = new_token()
        entries.append(
            {"name": name, "role": role, "sha256": hash_token(token), "created": int(time.time())}
        )
        self._save(entries)
        return token

    def revoke(self, name: str) -> None:
        entries = self.entries()
        kept = [e for e in entries if e["name"] != name]
        if len(kept) == len(entries):
            raise AuthError(f"no token named {name!r}")
        self._save(kept)

    def listing(self) -> list[dict[str, Any]]:
        return [
            {"name": e["name"], "role": e["role"], "created": e["created"]} for e in self.entries()
        ]


class Authenticator:
    def __init__(self, tokens: TokenStore, secret: bytes, env_token: str | None = None) -> None:
        self.tokens = tokens
        self._secret = secret
        self._env = (
            {"name": "env-admin", "role": "admin", "sha256": hash_token(env_token)}
            if env_token
            else None
        )
        self._required = False

    @classmethod
    def from_home(cls, folder: Path, env: dict[str, str] | None = None) -> Authenticator:
        """tokens.json and secret.key in `folder`; the env admin token if set."""
        env = dict(os.environ) if env is None else env
        return cls(
            TokenStore(folder / "tokens.json"),
            load_secret(folder / "secret.key"),
            env.get(ENV_ADMIN_TOKEN) or None,
        )

    def _all(self) -> list[dict[str, Any]]:
        entries = self.tokens.entries()
        return [*entries, self._env] if self._env else entries

    @property
    def enabled(self) -> bool:
        """Whether credentials are required. Once a token has existed this stays true:
        revoking the last token locks everyone out rather than opening the service."""
        if not self._required and self._all():
            self._required = True
        return self._required

    def check_token(self, token: str) -> Principal | None:
        """The token's owner, comparing against every entry (no early exit)."""
        digest = hash_token(token)
        found = None
        for e in self._all():
            if hmac.compare_digest(digest, e["sha256"]):
                found = e
        return Principal(found["name"], found["role"], "token") if found else None

    # -- sessions --------------------------------------------------------------------------
    def _sign(self, payload: bytes) -> str:
        return (
            base64.urlsafe_b64encode(hmac.new(self._secret, payload, hashlib.sha256).digest())
            .decode()
            .rstrip("=")
        )

    def make_session(self, p: Principal, ttl_s: float) -> str:
        token_hash = next((e["sha256"] for e in self._all() if e["name"] == p.name), "")
        body = json.dumps(
            {"n": p.name, "r": p.role, "h": token_hash[:16], "e": int(time.time() + ttl_s)},
            separators=(",", ":"),
        ).encode()
        return base64.urlsafe_b64encode(body).decode().rstrip("=") + "." + self._sign(body)

    def check_session(self, cookie: str) -> Principal | None:
        try:
            b64, sig = cookie.split(".", 1)
            body = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        except ValueError:
            return None
        if not hmac.compare_digest(sig, self._sign(body)):
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if data.get("e", 0) < time.time():
            return None
        live = [
            e
            for e in self._all()
            if e["name"] == data.get("n")
            and hmac.compare_digest(e["sha256"][:16], str(data.get("h")))
        ]
        return Principal(live[0]["name"], live[0]["role"], "session") if live else None

    # -- signed per-stream URLs ------------------------------------------------------------
    def sign_path(self, path: str, stream_id: str, expires: int) -> str:
        return self._sign(f"{stream_id}\n{path}\n{expires}".encode())

    def check_signed(self, path: str, stream_id: str, expires: str, sig: str) -> Principal | None:
        try:
            exp = int(expires)
        except ValueError:
            return None
        if exp < time.time() or not hmac.compare_digest(sig, self.sign_path(path, stream_id, exp)):
            return None
        return Principal("signed-url", "viewer", "signed-url", stream=stream_id)


def load_secret(path: Path) -> bytes:
    """The server's signing key, created on first use (owner-only permissions)."""
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    _write_private(path, key)
    return key


class LoginThrottle:
    """Slows failed authentication per client address: each failure doubles the wait (from
    0.25 s, capped at 8 s); a success clears it. Bounded: the oldest addresses are forgotten."""

    def __init__(self, max_clients: int = 10_000) -> None:
        self._fails: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._max = max_clients

    def delay(self, client: str) -> float:
        n, last = self._fails.get(client, (0, 0.0))
        if n and time.monotonic() - last > 600:
            n = 0  # forgiven after ten quiet minutes
        return 0.0 if n == 0 else min(0.25 * 2 ** (n - 1), 8.0)

    def failed(self, client: str) -> None:
        n, _ = self._fails.pop(client, (0, 0.0))
        self._fails[client] = (n + 1, time.monotonic())
        while len(self._fails) > self._max:
            self._fails.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._fails.pop(client, None)
