"""Webhook delivery for jobs created with a `webhookConfig` (dynamic webhooks).

What is known of the real service (ai.google.dev/gemini-api/docs/webhooks): a job's end is POSTed as JSON to each
listener, with the Standard Webhooks headers `webhook-id`, `webhook-timestamp` and `webhook-signature`; any 2xx
acknowledges; anything else is retried with exponential backoff for up to 24 h (at least once, unordered); the
`user_metadata` given at create is echoed back. Events: batch.succeeded, batch.failed, batch.cancelled,
batch.expired. What is assumed here (see docs/EMULATOR.md): the body's exact shape (the Standard Webhooks
envelope `{type, timestamp, data}`), and the signature: real dynamic webhooks are signed with RS256 JWTs from
Google's JWKS; the emulator signs `v1,<base64 HMAC-SHA256>` over `id.timestamp.body` with `webhook_secret`.
Retries here are few and fast (`webhook_max_attempts`, `webhook_retry_seconds`, doubling) so tests finish.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Callable

EVENTS = {"SUCCEEDED": "batch.succeeded", "FAILED": "batch.failed", "CANCELLED": "batch.cancelled", "EXPIRED": "batch.expired"}


def parse_webhook_config(raw: Any) -> dict | None:
    """The create body's webhookConfig (camelCase or the SDK's snake_case), or ValueError."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("webhook_config must be an object")
    uris = raw.get("uris")
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in uris):
        raise ValueError("webhook_config.uris must be a non-empty list of http(s) URLs")
    metadata = raw.get("userMetadata", raw.get("user_metadata")) or {}
    if not isinstance(metadata, dict):
        raise ValueError("webhook_config.user_metadata must be an object")
    return {"uris": list(uris), "user_metadata": metadata}


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class WebhookSender:
    """Delivers events from a background thread, so a job's end never waits on a listener."""

    def __init__(self, config: Callable[[], Any], now: Callable[[], float], count: Callable[[str], None]):
        self._config, self._now, self._count = config, now, count
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log: list[dict[str, Any]] = []  # one entry per attempt: uri, type, status, attempt
        self._log_lock = threading.Lock()
        self._generation = 0  # bumped by clear(): events queued or waiting for a retry before it are dropped

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="emulator-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def deliveries(self) -> list[dict[str, Any]]:
        with self._log_lock:
            return [dict(d) for d in self.log]

    def clear(self) -> None:
        with self._log_lock:
            self._generation += 1
            self.log.clear()

    def job_ended(self, name: str, display_name: str | None, state: str, webhook: dict, rfc3339: Callable[[float], str]) -> None:
        event = EVENTS.get(state)
        if event is None:
            return
        body = json.dumps({"type": event, "timestamp": rfc3339(self._now()), "data": {
            "name": name, "display_name": display_name, "state": state, "user_metadata": webhook["user_metadata"]}}).encode()
        msg_id = f"msg_{uuid.uuid4().hex}"
        for uri in webhook["uris"]:
            self._queue.put((uri, event, msg_id, body, 1, self._generation))

    def _run(self) -> None:
        waiting: list[tuple] = []  # retries: (due, item)
        while not self._stop.is_set():
            now = time.monotonic()
            due = [w for w in waiting if w[0] <= now]
            waiting = [w for w in waiting if w[0] > now]
            items = [w[1] for w in due]
            try:
                items.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                pass
            for item in items:
                if item[-1] != self._generation:
                    continue  # queued before a reset of the emulator
                retry = self._deliver(*item)
                if retry is not None:
                    waiting.append(retry)

    def _deliver(self, uri: str, event: str, msg_id: str, body: bytes, attempt: int, generation: int):
        cfg = self._config()
        timestamp = int(self._now())
        req = urllib.request.Request(uri, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "batcher-emulator-webhooks",
            "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(cfg.webhook_secret, msg_id, timestamp, body)})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (OSError, ValueError):
            status = None  # refused, unreachable, timed out
        with self._log_lock:
            self.log.append({"uri": uri, "type": event, "id": msg_id, "status": status, "attempt": attempt})
        if status is not None and 200 <= status < 300:
            self._count("webhooks_delivered")
            return None
        self._count("webhook_attempts_failed")
        if attempt >= cfg.webhook_max_attempts:
            self._count("webhooks_dropped")
            return None
        delay = cfg.webhook_retry_seconds * 2 ** (attempt - 1)
        return (time.monotonic() + delay, (uri, event, msg_id, body, attempt + 1, generation))
