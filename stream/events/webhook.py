"""Webhook delivery: POST of each change's JSON, signed with HMAC-SHA256.

Receivers verify `X-Segstream-Signature: sha256=<hex>` over the raw body with the shared
secret. 2xx: delivered. 4xx other than 408/425/429: the receiver refuses this body, so it is
dropped (counted `rejected`) rather than blocking every later change. Anything else (5xx,
timeout, refused connection): retried with capped exponential backoff, for ever, and the
later changes wait behind it (order kept)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import aiohttp

from segstream.stream.events.config import WebhookConfig
from segstream.stream.events.delivery import OutboxTarget
from segstream.stream.events.observer import EventsObserver
from segstream.stream.events.store import EventStore, OutboxRow

log = logging.getLogger(__name__)
RETRYABLE_4XX = {408, 425, 429}


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def target_name(cfg: WebhookConfig) -> str:
    """Stable across restarts and reordering of the config (the cursor is kept under it)."""
    return "webhook:" + hashlib.sha256(cfg.url.encode()).hexdigest()[:12]


class WebhookTarget(OutboxTarget):
    def __init__(self, cfg: WebhookConfig, store: EventStore, observer: EventsObserver) -> None:
        super().__init__(target_name(cfg), store, observer)
        self.cfg = cfg

    async def serve(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self.pump(lambda row: self._send(session, row))

    async def _send(self, session: aiohttp.ClientSession, row: OutboxRow) -> None:
        if row.type not in self.cfg.events:
            return
        body = row.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "X-Segstream-Signature": signature(self.cfg.secret, body),
            "X-Segstream-Delivery": str(row.seq),  # the same on a retry: for de-duplication
        }
        delay = self.cfg.backoff_initial_s
        while True:
            status = await self._post(session, body, headers)
            if status is not None and 200 <= status < 300:
                self.observer.delivery(self.name, "delivered")
                return
            if status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX:
                log.warning("webhook %s refused change %d (HTTP %d)", self.name, row.seq, status)
                self.observer.delivery(self.name, "rejected")
                return
            self.observer.delivery(self.name, "failed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.backoff_max_s)

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]
    ) -> int | None:
        try:
            async with session.post(self.cfg.url, data=body, headers=headers) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError) as e:
            log.info("webhook %s: %s", self.name, type(e).__name__)
            return None
