"""The boundary with the Gemini API. Everything else in batcher talks to this module, never to the SDK.

We use the official google-genai SDK for uploads, job creation, listing, cancellation, deletion and
interactive calls, with `api_version` pinned, a timeout and retries set (the SDK's defaults are neither).
Two calls go over plain HTTP, for reasons the SDK leaves us no choice about (gemini-batch-protocol.md §3, §4):
- reading a job: the SDK's BatchJob drops `batchStats` and the job `error` in Gemini mode;
- downloading results: the SDK's download is never retried and cannot resume, so a dropped connection at
  GB 9 of 10 would start over; we stream with HTTP Range and resume where the bytes stopped.
SDK and HTTP errors are mapped into batcher.errors here, and nowhere else.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import importlib
import sys
import threading
import time
import http.client
import json
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import ApiError, NotFoundError, QuotaError, SpendLimitError, TransientApiError, UsageError
from ..faults import maybe_crash
from .retry import RetryPolicy


class _LazyModule:
    """A module imported on first attribute access. The SDK takes ~0.4 s and ~40 MB to import: commands that
    only read jobs and download results (plain HTTP, below) start without waiting for it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


if TYPE_CHECKING:
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types
else:
    genai = _LazyModule("google.genai")
    genai_errors = _LazyModule("google.genai.errors")
    types = _LazyModule("google.genai.types")

log = logging.getLogger("batcher.backends.gemini")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
# The docs and the discovery document show batch and file methods under v1beta only (protocol doc §11).
API_VERSION = "v1beta"
# `mime_type='jsonl'` is what the docs use; the service has at times refused it inside an HTTP-200
# finalize (python-genai #1547), so we fall back through the others users report working.
JSONL_MIME_TYPES = ("jsonl", "application/jsonl", "application/json", "text/plain")
TRANSIENT_CODES = {408, 500, 502, 503, 504}


@dataclass(frozen=True)
class Connection:
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    api_version: str = API_VERSION
    timeout_s: float = 300.0

    @classmethod
    def from_env(cls, environ: dict | None = None, timeout_s: float = 300.0) -> "Connection":
        env = os.environ if environ is None else environ
        key = env.get("GOOGLE_API_KEY") or env.get("GEMINI_API_KEY")  # the SDK's precedence
        if not key:
            raise UsageError(
                "no API key: set GEMINI_API_KEY (or GOOGLE_API_KEY), or use --backend emulator for an offline run"
            )
        base = env.get("GOOGLE_GEMINI_BASE_URL") or DEFAULT_BASE_URL
        return cls(api_key=key, base_url=base.rstrip("/"), timeout_s=timeout_s)


@dataclass(frozen=True)
class UploadedFile:
    name: str
    uri: str
    size_bytes: int
    expires_at: float | None  # epoch seconds


@dataclass(frozen=True)
class BatchInfo:
    name: str
    display_name: str | None
    state: str  # without prefix: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED, ...
    created_at: str | None = None
    updated_at: str | None = None
    ended_at: str | None = None
    stats: dict = field(default_factory=dict)  # requestCount, successfulRequestCount, ... as ints
    output_file: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the API says of a model (models.get / models.list)."""

    name: str  # without "models/"
    display_name: str | None = None
    methods: tuple[str, ...] = ()  # supportedGenerationMethods (the SDK's supported_actions)
    thinking: bool | None = None
    input_token_limit: int | None = None
    output_token_limit: int | None = None

    @property
    def batch_capable(self) -> bool:
        return "batchGenerateContent" in self.methods


def model_info(m) -> ModelInfo:
    return ModelInfo(name=(m.name or "").removeprefix("models/"), display_name=m.display_name,
                     methods=tuple(m.supported_actions or ()), thinking=m.thinking, input_token_limit=m.input_token_limit,
                     output_token_limit=m.output_token_limit)


def normalize_state(state: str | None) -> str:
    """BATCH_STATE_X and JOB_STATE_X (both seen in the wild) -> X."""
    if not state:
        return "UNSPECIFIED"
    state = str(state).rsplit(".", 1)[-1]
    for prefix in ("BATCH_STATE_", "JOB_STATE_"):
        if state.startswith(prefix):
            return state[len(prefix) :]
    return state


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    value = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


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
    if "google.genai.errors" in sys.modules and isinstance(exc, genai_errors.APIError):
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


def _is_transport_error(exc: Exception) -> bool:
    return isinstance(exc, (OSError, http.client.HTTPException)) or exc.__class__.__module__.startswith(("httpx", "httpcore"))


class GeminiBackend:
    def __init__(self, connection: Connection, retry: RetryPolicy | None = None):
        self.connection = connection
        self.retry = retry or RetryPolicy()
        # Server clock minus ours, from HTTP Date headers: job windows are measured in the API's time
        # (a skewed local clock, or the emulator's scaled time, must not move a 48 h expiry).
        self.clock_offset_s: float | None = None
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()

    @property
    def client(self) -> "genai.Client":
        """The SDK client, made on first use (see _LazyModule; collect makes it in the background)."""
        return self._sdk_client("client")

    @property
    def _create_client(self) -> "genai.Client":
        # batches.create is not idempotent: a 5xx or a timeout can come after the job was made, and a retry
        # would make a second one. So create goes through a client that never retries; the caller reconciles
        # by display name instead.
        return self._sdk_client("create")

    def _sdk_client(self, which: str) -> "genai.Client":
        with self._clients_lock:
            if which not in self._clients:
                connection = self.connection
                if which == "client":
                    options = types.HttpOptions(
                        base_url=connection.base_url + "/",
                        api_version=connection.api_version,
                        timeout=int(connection.timeout_s * 1000),
                        # 429 is ours to handle (RetryInfo delays, "wait for capacity"); the SDK retries the rest.
                        retry_options=types.HttpRetryOptions(
                            attempts=4, initial_delay=1.0, max_delay=30.0, http_status_codes=sorted(TRANSIENT_CODES)
                        ),
                    )
                else:
                    options = types.HttpOptions(
                        base_url=connection.base_url + "/", api_version=connection.api_version,
                        timeout=int(connection.timeout_s * 1000), retry_options=types.HttpRetryOptions(attempts=1),
                    )
                self._clients[which] = genai.Client(api_key=connection.api_key, http_options=options)
            return self._clients[which]

    # ---- plumbing ---------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable):
        def once():
            try:
                return fn()
            except genai_errors.APIError as exc:
                raise map_error(exc, what) from None
            except Exception as exc:
                if _is_transport_error(exc):
                    raise map_error(exc, what) from None
                raise

        return self.retry.call(what, once)

    def _http(self, method: str, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
        url = urllib.parse.urlsplit(self.connection.base_url)
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname, url.port, timeout=self.connection.timeout_s)
        all_headers = {"x-goog-api-key": self.connection.api_key, "Content-Type": "application/json"}
        all_headers.update(headers or {})
        prefix = url.path.rstrip("/")
        conn.request(method, f"{prefix}/{self.connection.api_version}/{path}", headers=all_headers)
        resp = conn.getresponse()
        self._note_server_clock(resp.getheader("Date"))
        return resp

    def _note_server_clock(self, date_header: str | None) -> None:
        if not date_header:
            return
        try:
            server = email.utils.parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            return
        self.clock_offset_s = server - time.time()

    def server_now(self) -> float:
        """Now, by the API's clock when we have seen it (1 s resolution), else ours."""
        return time.time() + (self.clock_offset_s or 0.0)

    @staticmethod
    def _raise_for(resp: http.client.HTTPResponse, what: str, ok: tuple[int, ...] = (200,)) -> None:
        if resp.status in ok:
            return
        body = resp.read()
        try:
            err = json.loads(body)["error"]
            message, status = err.get("message", ""), err.get("status", "")
            details = {"error": err}
        except (ValueError, KeyError, TypeError):
            message, status, details = body[:200].decode(errors="replace"), resp.reason, None
        text = f"{what}: HTTP {resp.status} {status}: {message}"
        if resp.status == 404:
            raise NotFoundError(text, resp.status, status)
        if resp.status in (402, 429):
            raise limit_error(text, resp.status, status, message, details)
        if resp.status >= 500 or resp.status == 408:
            raise TransientApiError(text, resp.status, status)
        raise ApiError(text, resp.status, status)

    # ---- files ------------------------------------------------------------------------------------
    def upload_jsonl(self, path: Path, display_name: str) -> UploadedFile:
        last: Exception | None = None
        for mime in JSONL_MIME_TYPES:
            try:
                return self._upload(path, mime, display_name)
            except KeyError as exc:  # an HTTP-200 finalize whose body is an error, not a file
                log.warning("upload of %s refused with MIME type %r (%s); trying the next one", path.name, mime, exc)
                last = exc
        raise ApiError(f"upload of {path.name} failed with every JSONL MIME type ({', '.join(JSONL_MIME_TYPES)}): {last}")

    def upload_image(self, path: Path, mime_type: str, display_name: str) -> UploadedFile:
        try:
            return self._upload(path, mime_type, display_name)
        except KeyError as exc:
            raise ApiError(f"upload of reference image {path.name} was refused: {exc}") from None

    def _upload(self, path: Path, mime_type: str, display_name: str) -> UploadedFile:
        f = self._call(
            f"upload {path.name}",
            lambda: self.client.files.upload(
                file=str(path), config=types.UploadFileConfig(mime_type=mime_type, display_name=display_name)
            ),
        )
        expires = f.expiration_time.timestamp() if f.expiration_time else None
        return UploadedFile(name=f.name, uri=f.uri or "", size_bytes=int(f.size_bytes or 0), expires_at=expires)

    def delete_file(self, name: str) -> None:
        try:
            self._call(f"delete {name}", lambda: self.client.files.delete(name=name))
        except NotFoundError:
            pass  # already gone (expired or deleted): the goal is reached

    def list_files(self) -> Iterator[types.File]:
        pager = self._call("list files", lambda: self.client.files.list(config={"page_size": 100}))
        yield from pager

    def file_size(self, name: str) -> int:
        f = self._call(f"get {name}", lambda: self.client.files.get(name=name))
        return int(f.size_bytes or 0)

    # ---- models -----------------------------------------------------------------------------------
    def get_model(self, name: str) -> ModelInfo:
        """models.get: raises NotFoundError when the API does not serve `name`."""
        name = name.removeprefix("models/")
        return model_info(self._call(f"get model {name}", lambda: self.client.models.get(model=name)))

    def list_models(self) -> Iterator[ModelInfo]:
        pager = self._call("list models", lambda: self.client.models.list(config={"page_size": 100}))
        for m in pager:
            yield model_info(m)

    # ---- batches ----------------------------------------------------------------------------------
    def create_batch(self, model: str, file_name: str, display_name: str, webhook: dict | None = None) -> BatchInfo:
        """Not retried here: create is not idempotent. The caller reconciles by display name instead.
        `webhook`: a webhook_config (batcher.webhooks) for listeners the API notifies when the job ends."""
        config: dict = {"display_name": display_name}
        if webhook:
            config["webhook_config"] = webhook
        try:
            job = self._create_client.batches.create(model=model, src=file_name, config=config)
        except genai_errors.APIError as exc:
            raise map_error(exc, f"create job {display_name}") from None
        except Exception as exc:
            if _is_transport_error(exc):
                raise map_error(exc, f"create job {display_name}") from None
            raise
        return BatchInfo(
            name=job.name,
            display_name=job.display_name,
            state=normalize_state(job.state),
            created_at=job.create_time.isoformat() if job.create_time else None,
        )

    def get_batch(self, name: str) -> BatchInfo:
        def fetch():
            try:
                resp = self._http("GET", name)
                self._raise_for(resp, f"get {name}")
                return json.loads(resp.read())
            except (OSError, http.client.HTTPException) as exc:
                raise TransientApiError(f"get {name}: {exc.__class__.__name__}: {exc}") from None

        return batch_from_operation(self.retry.call(f"get {name}", fetch))

    def list_batches(self) -> Iterator[BatchInfo]:
        pager = self._call("list jobs", lambda: self.client.batches.list(config={"page_size": 100}))
        for job in pager:
            yield BatchInfo(
                name=job.name,
                display_name=job.display_name,
                state=normalize_state(job.state),
                created_at=job.create_time.isoformat() if job.create_time else None,
                output_file=job.dest.file_name if job.dest else None,
            )

    def cancel_batch(self, name: str) -> None:
        self._call(f"cancel {name}", lambda: self.client.batches.cancel(name=name))

    # ---- results ----------------------------------------------------------------------------------
    def download(self, file_name: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> int:
        """Stream a results file to `dest`, resuming a partial `dest` with HTTP Range. Returns its size."""
        path = f"{file_name}:download?alt=media"

        def attempt() -> int:
            have = dest.stat().st_size if dest.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                resp = self._http("GET", path, headers)
                if resp.status == 416 and have:
                    return have  # nothing left to fetch
                self._raise_for(resp, f"download {file_name}", ok=(200, 206))
                mode = "ab" if resp.status == 206 else "wb"  # a 200 means the server ignored Range: start over
                expected = resp.getheader("Content-Length")
                got = 0
                with open(dest, mode) as out:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        maybe_crash("download")  # test hook: see batcher/faults.py
                        got += len(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                if expected is not None and got != int(expected):
                    raise TransientApiError(f"download {file_name}: connection closed after {got} of {expected} bytes")
                return dest.stat().st_size
            except (OSError, http.client.HTTPException) as exc:
                raise TransientApiError(f"download {file_name}: {exc.__class__.__name__}: {exc}") from None

        return self.retry.call(f"download {file_name}", attempt)

    def download_chunks(self, file_name: str, dest: Path, on_bytes: Callable[[int], None] | None = None,
                        block: int = 1 << 20) -> Iterator[bytes]:
        """Stream a results file to `dest` like `download` (resuming a partial `dest` with HTTP Range, retrying
        dropped connections from where they stopped) and yield the whole file's bytes in order while doing it:
        first what `dest` already holds, then each new block once it has been appended to `dest`. So a caller
        parses while downloading, and after a crash the next call resumes the download and replays the start."""
        path = f"{file_name}:download?alt=media"
        have = 0
        if dest.exists():
            with open(dest, "rb") as f:
                while blk := f.read(block):
                    have += len(blk)
                    yield blk
        failures = 0
        while True:
            try:
                headers = {"Range": f"bytes={have}-"} if have else {}
                resp = self._http("GET", path, headers)
                if resp.status == 416 and have:
                    return  # nothing left to fetch
                self._raise_for(resp, f"download {file_name}", ok=(200, 206))
                skip = have if resp.status == 200 else 0  # a 200 ignored Range: drop what we have already
                expected = resp.getheader("Content-Length")
                got = 0
                with open(dest, "ab") as out:
                    while chunk := resp.read(block):
                        got += len(chunk)
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        out.write(chunk)
                        out.flush()
                        maybe_crash("download")  # test hook: see batcher/faults.py
                        have += len(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                        yield chunk
                if expected is not None and got != int(expected):
                    raise TransientApiError(f"download {file_name}: connection closed after {got} of {expected} bytes")
                return
            except (OSError, http.client.HTTPException) as exc:
                error: Exception = TransientApiError(f"download {file_name}: {exc.__class__.__name__}: {exc}")
            except (TransientApiError, QuotaError) as exc:
                error = exc
            failures += 1
            if failures >= self.retry.attempts:
                raise error
            wait = self.retry.delay(failures - 1, getattr(error, "retry_after", None))
            log.warning("download %s: %s; resuming in %.1fs (attempt %d of %d)", file_name, error, wait, failures + 1,
                        self.retry.attempts)
            self.retry.sleep(wait)

    # ---- interactive ------------------------------------------------------------------------------
    def generate_content(self, model: str, body: dict) -> dict:
        return generate_content(self, model, body)


def generate_content(backend, model: str, body: dict) -> dict:
    """One interactive call with a stored request body, through `backend.client` (Gemini or Vertex mode);
    the response as a dict in the API's camelCase shape, image bytes kept as bytes."""
    config = dict(body.get("generationConfig", {}))
    if "systemInstruction" in body:
        config["systemInstruction"] = body["systemInstruction"]
    model = model.removeprefix("models/")
    resp = backend._call(f"generateContent {model}",
                         lambda: backend.client.models.generate_content(model=model, contents=body["contents"], config=config))
    # Python mode keeps image bytes as bytes (the JSON mode would re-encode them as URL-safe base64).
    out = resp.model_dump(mode="python", by_alias=True, exclude_none=True)
    out.pop("sdkHttpResponse", None)
    return out


def batch_from_operation(op: dict) -> BatchInfo:
    meta = op.get("metadata") or {}
    output = meta.get("output") or op.get("response") or {}
    stats = {k: int(v) for k, v in (meta.get("batchStats") or {}).items() if str(v).lstrip("-").isdigit()}
    err = op.get("error")
    return BatchInfo(
        name=op.get("name") or meta.get("name", ""),
        display_name=meta.get("displayName"),
        state=normalize_state(meta.get("state")),
        created_at=meta.get("createTime"),
        updated_at=meta.get("updateTime"),
        ended_at=meta.get("endTime"),
        stats=stats,
        output_file=output.get("responsesFile"),
        error=f"{err.get('code', '')} {err.get('message', '')}".strip() if isinstance(err, dict) else None,
    )
