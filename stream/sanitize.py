"""The one credential sanitiser: no URL with credentials leaves the process.

Used for everything an operator or a client sees: API responses, the page (through the API),
log lines, reasons and error messages. `user:pass@` and `user@` are replaced whole (a user name
is half a credential), and so are the values of secret-looking query parameters."""

from __future__ import annotations

import logging
import re

MASK = "***"
# Query keys whose values are secrets (compared case-insensitively, '-' and '_' ignored).
SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "pwd",
        "token",
        "accesstoken",
        "auth",
        "authorization",
        "key",
        "apikey",
        "secret",
        "clientsecret",
        "sig",
        "signature",
        "credentials",
        "session",
    }
)
# scheme://[userinfo@]host[/path][?query]; a password may hold an unescaped '@' or ':'.
# Trailing punctuation belongs to the sentence around a URL, not to the URL.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s\"'<>]*[^\s\"'<>.,;:)])")
_QUERY_PAIR = re.compile(r"(?P<key>[^&=;#]+)=(?P<value>[^&;#]*)")


def _secret_key(key: str) -> bool:
    return re.sub(r"[-_.\s]", "", key.lower()) in SECRET_KEYS


def _sanitize_query(query: str) -> str:
    def repl(m: re.Match[str]) -> str:
        return f"{m['key']}={MASK}" if _secret_key(m["key"]) else m.group(0)

    return _QUERY_PAIR.sub(repl, query)


def _index_of_any(text: str, chars: str) -> int:
    return min((i for i in map(text.find, chars) if i >= 0), default=len(text))


def _sanitize_rest(rest: str) -> str:
    """`rest` is everything after scheme://."""
    host_end = _index_of_any(rest, "/?#")
    at = rest.rfind("@", 0, host_end)
    if at < 0:
        # An unescaped '/' in a password ends the authority early for a strict parser, but
        # FFmpeg still sends it: treat user:pass@ before the query as credentials too.
        before_query = rest[: _index_of_any(rest, "?#")]
        last = before_query.rfind("@")
        at = last if last >= 0 and ":" in before_query[:last] else -1
    if at >= 0:
        rest = MASK + rest[at:]
    q = rest.find("?")
    if q >= 0:
        rest = rest[: q + 1] + _sanitize_query(rest[q + 1 :])
    return rest


def sanitize_url(url: str) -> str:
    """The URL without its credentials; other strings (paths, device ids) unchanged."""
    return sanitize_text(url)


def sanitize_text(text: str) -> str:
    """Every URL inside `text` (an error message, a log line) sanitised."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: m["scheme"] + _sanitize_rest(m["rest"]), text)


class SanitizingFilter(logging.Filter):
    """Log records leave with their URLs sanitised (message and arguments merged first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = sanitize_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = sanitize_text(record.exc_text)
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Sanitise everything the handlers of `logger` (default: root) write."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, SanitizingFilter) for f in handler.filters):
            handler.addFilter(SanitizingFilter())
