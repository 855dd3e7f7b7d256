"""Webhooks: the API POSTs a job's end (`batch.succeeded`, `batch.failed`, `batch.cancelled`, `batch.expired`) to
listener URLs given at create (`webhook_config`, Gemini API only), an alternative to polling for a listener
that runs `batcher collect`. Listener URLs often carry a token, so they are only ever shown redacted."""

from __future__ import annotations

import urllib.parse

from ..errors import UsageError


def redact_uri(uri: object) -> str:
    """scheme://host/… : enough to recognise a listener, never its path or query (where tokens live)."""
    if not isinstance(uri, str):
        return type(uri).__name__
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    tail = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme or '?'}://{host}{port}{tail}"


def check_uris(uris) -> tuple[str, ...]:
    uris = tuple(uris or ())
    for uri in uris:
        try:
            parts = urllib.parse.urlsplit(uri) if isinstance(uri, str) else None
            ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"webhook URI {redact_uri(uri)!r} is not an http(s) URL; give the full URL of your listener")
    return uris


def webhook_config(uris: tuple[str, ...], display_name: str, ledger_id: str) -> dict | None:
    """The create call's `webhook_config`: the listeners, and metadata the API echoes back in each event so a
    listener knows which job and which workdir it is about."""
    if not uris:
        return None
    return {"uris": list(uris), "user_metadata": {"batcher_job": display_name, "batcher_ledger": ledger_id}}
