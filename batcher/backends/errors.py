"""One error mapping: SDK, HTTP, transport and Cloud Storage errors into batcher.errors, for every backend. A 429 or
402 is read by its description (api-2026-12.md §3): what clears by waiting is a QuotaError, a money limit that does
not is a SpendLimitError. Messages never carry request headers (the API key)."""

from __future__ import annotations

import http.client
import json
import sys

from ..errors import ApiError, NotFoundError, QuotaError, SpendLimitError, TransientApiError

TRANSIENT_CODES = {408, 500, 502, 503, 504}


def _retry_after(details) -> float | None:
    try:
        for d in (details or {}).get("error", {}).get("details", []) or []:
            if str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
                delay = d.get("retryDelay", "")
                return float(str(delay).rstrip("s"))
    except (AttributeError, ValueError, TypeError):
        return None
    return None


# What a 429's description says of its cause (api-2026-12.md §3: every 429 now says which limit it met). Checked
# against the message, the QuotaFailure violations (quotaId, quotaMetric) and ErrorInfo reasons, lower-cased.
SPEND_CAP_WORDS = ("spend cap", "spending cap", "spend_cap", "spendcap", "monthly spend", "spending limit")
SPEND_RATE_WORDS = ("spend rate", "spend-based rate", "spend_rate", "spendrate", "spend per", "spend in the last")
CAPACITY_WORDS = ("enqueued", "concurrent batch", "batch_concurrent", "storage quota", "file storage")
STOP_ADVICE = {
    "spend_cap": "a monthly spend cap stops every request until the cap is raised (AI Studio > Billing: the project "
                 "spend cap, or a higher usage tier) or the month turns; nothing is lost: run the same command again then",
    "prepay": "the prepay balance is used up: add credit in AI Studio > Billing; nothing is lost: run the same command "
              "again then",
}


def _error_words(message: str, details) -> str:
    words = [message or ""]
    try:
        for d in (details or {}).get("error", {}).get("details", []) or []:
            words += [str(d.get("reason", "")), *(str(v.get(k, "")) for v in d.get("violations", []) or []
                                                   for k in ("quotaId", "quotaMetric", "description", "subject"))]
    except (AttributeError, TypeError):
        pass
    return " ".join(words).lower()


def limit_error(text: str, code: int, status: str | None, message: str, details) -> ApiError:
    """A 429 or 402 by its cause: a limit that clears by waiting (QuotaError: rate, spend rate, capacity) or a money
    limit that stops the run (SpendLimitError: monthly spend cap, prepay balance)."""
    words = _error_words(message, details)
    if code == 402 or "prepay" in words or "prepaid" in words:
        return SpendLimitError(f"{text} ({STOP_ADVICE['prepay']})", code, status, limit="prepay")
    if any(w in words for w in SPEND_CAP_WORDS):
        return SpendLimitError(f"{text} ({STOP_ADVICE['spend_cap']})", code, status, limit="spend_cap")
    cause = ("spend_rate" if any(w in words for w in SPEND_RATE_WORDS)
             else "capacity" if any(w in words for w in CAPACITY_WORDS) else "rate")
    return QuotaError(text, code, status, retry_after=_retry_after(details), cause=cause)


def map_error(exc: Exception, what: str) -> ApiError:
    """Map an SDK or transport error into batcher's hierarchy. Never includes request headers (the key)."""
    if isinstance(exc, ApiError):
        return exc
    genai_errors = sys.modules.get("google.genai.errors")  # loaded with the SDK; not before (a slow import)
    if genai_errors is not None and isinstance(exc, genai_errors.APIError):
        code, status, message = exc.code, exc.status, exc.message
        text = f"{what}: HTTP {code} {status}: {message}"
        if code == 404:
            return NotFoundError(text, code, status)
        if code in (402, 429):
            return limit_error(text, code, status, message, exc.details)
        if code in TRANSIENT_CODES or (code and code >= 500):
            return TransientApiError(text, code, status)
        return ApiError(text, code, status)
    # Transport errors: httpx2 timeouts and connection failures, socket errors, dropped connections.
    return TransientApiError(f"{what}: {exc.__class__.__name__}: {exc}")


def is_transport_error(exc: Exception) -> bool:
    return isinstance(exc, (OSError, http.client.HTTPException)) or exc.__class__.__module__.startswith(("httpx", "httpcore"))


def http_error(status: int, reason: str, body: bytes, what: str) -> ApiError:
    """An HTTP error answered to one of our plain HTTP calls (get a job, download results), in the API's envelope."""
    try:
        err = json.loads(body)["error"]
        message, code_name = err.get("message", ""), err.get("status", "")
        details = {"error": err}
    except (ValueError, KeyError, TypeError):
        message, code_name, details = body[:200].decode(errors="replace"), reason, None
    text = f"{what}: HTTP {status} {code_name}: {message}"
    if status == 404:
        return NotFoundError(text, status, code_name)
    if status in (402, 429):
        return limit_error(text, status, code_name, message, details)
    if status >= 500 or status == 408:
        return TransientApiError(text, status, code_name)
    return ApiError(text, status, code_name)


def gcs_error(exc: Exception, what: str) -> Exception:
    """google-cloud-storage and transport errors -> batcher's hierarchy (anything else is returned as it is)."""
    code = getattr(exc, "code", None)
    name = type(exc).__name__
    text = f"{what}: {name}: {exc}"
    if name == "NotFound" or code == 404:
        return NotFoundError(text, 404, "NOT_FOUND")
    if name == "TooManyRequests" or code == 429:
        return QuotaError(text, 429, "RESOURCE_EXHAUSTED")
    if isinstance(code, int) and (code in TRANSIENT_CODES or code >= 500):
        return TransientApiError(text, code, name)
    if isinstance(exc, (OSError, ConnectionError)) or is_transport_error(exc) or \
            type(exc).__module__.startswith(("requests", "urllib3", "google.auth.exceptions", "google.resumable_media")):
        return TransientApiError(text)
    if isinstance(code, int):
        return ApiError(text, code, name)
    return exc
