"""The Gemini API backend (backends.base.Backend). Everything else in batcher talks to a backend, never to the SDK.

We use the official google-genai SDK for uploads, job creation, listing, cancellation, deletion, models and
interactive calls, with `api_version` pinned, a timeout and retries set (backends.client). Two calls go over plain
HTTP, for reasons the SDK leaves us no choice about (gemini-batch-protocol.md §3, §4):
- reading a job: the SDK's BatchJob drops `batchStats` and the job `error` in Gemini mode;
- downloading results: the SDK's download is never retried and cannot resume, so a dropped connection at
  GB 9 of 10 would start over; we stream with HTTP Range and resume where the bytes stopped.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import ApiError, BatcherError, NoApiKey, NotFoundError, QuotaError, TransientApiError, UsageError
from ..faults import maybe_crash
from . import client as sdk
from .base import BatchInfo, FileInfo, ModelInfo, UploadedFile, normalize_state
from .errors import http_error
from .retry import RetryPolicy

if TYPE_CHECKING:
    from google import genai

log = logging.getLogger("batcher.backends.gemini")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
REACH_TIMEOUT_S = 10.0  # the first connection of a command: no answer by then is a setting to fix (see _check_reachable)
# The docs and the discovery document show batch and file methods under v1beta only (protocol doc §11).
API_VERSION = "v1beta"
# `mime_type='jsonl'` is what the docs use; the service has at times refused it inside an HTTP-200
# finalize (python-genai #1547), so we fall back through the others users report working.
JSONL_MIME_TYPES = ("jsonl", "application/jsonl", "application/json", "text/plain")


@dataclass(frozen=True)
class Connection:
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    api_version: str = API_VERSION
    timeout_s: float = 300.0
    base_url_from: str | None = None  # the environment variable the base URL came from (what to check when unreachable)

    @classmethod
    def from_env(cls, environ: dict | None = None, timeout_s: float = 300.0) -> "Connection":
        env = os.environ if environ is None else environ
        key = env.get("GOOGLE_API_KEY") or env.get("GEMINI_API_KEY")  # the SDK's precedence
        if not key:
            raise NoApiKey(
                "no API key: set GEMINI_API_KEY (or GOOGLE_API_KEY), or use --backend emulator for an offline run"
            )
        base = env.get("GOOGLE_GEMINI_BASE_URL") or DEFAULT_BASE_URL
        where = "GOOGLE_GEMINI_BASE_URL" if env.get("GOOGLE_GEMINI_BASE_URL") else None
        url = urllib.parse.urlsplit(base.strip())
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UsageError(f"GOOGLE_GEMINI_BASE_URL={base!r} is not an http:// or https:// URL with a host: set it like "
                             f"http://127.0.0.1:8765 (an emulator) or unset it for {DEFAULT_BASE_URL}")
        return cls(api_key=key, base_url=base.strip().rstrip("/"), timeout_s=timeout_s, base_url_from=where)

    def unreachable(self, exc: Exception) -> BatcherError:
        """The error for a first connection that could not be made at all (refused, no such host, timed out)."""
        reason = f"{type(exc).__name__}: {exc}"
        check = (f"check {self.base_url_from} (is the emulator or proxy running there?)" if self.base_url_from
                 else "check the network, or the proxy settings (HTTPS_PROXY)")
        return BatcherError(f"cannot reach the Gemini API at {self.base_url} ({reason}): {check}; nothing was sent")


def model_info(m) -> ModelInfo:
    """An SDK Model -> ModelInfo."""
    return ModelInfo(name=(m.name or "").removeprefix("models/"), display_name=m.display_name,
                     methods=tuple(m.supported_actions or ()), thinking=m.thinking, input_token_limit=m.input_token_limit,
                     output_token_limit=m.output_token_limit)


class GeminiBackend:
    takes_webhooks = True
    streams_results = True

    def __init__(self, connection: Connection, retry: RetryPolicy | None = None):
        self.connection = connection
        self.retry = retry or RetryPolicy()
        # Server clock minus ours, from HTTP Date headers: job windows are measured in the API's time
        # (a skewed local clock, or the emulator's scaled time, must not move a 48 h expiry).
        self.clock_offset_s: float | None = None
        self._clients: dict[bool, Any] = {}
        self._reached = False  # the API has answered this backend (see _call)
        self._clients_lock = threading.Lock()

    @property
    def client(self) -> "genai.Client":
        """The SDK client, made on first use (the SDK is imported then; collect makes it in the background)."""
        return self._sdk_client(retries=True)

    @property
    def _create_client(self) -> "genai.Client":
        """batches.create is not idempotent: it goes through a client that never retries (backends.client)."""
        return self._sdk_client(retries=False)

    def _sdk_client(self, retries: bool) -> "genai.Client":
        with self._clients_lock:
            if retries not in self._clients:
                c = self.connection
                options = sdk.http_options(api_version=c.api_version, timeout_s=c.timeout_s, base_url=c.base_url, retries=retries)
                self._clients[retries] = sdk.genai_client(options, api_key=c.api_key)
            return self._clients[retries]

    def warm_up(self) -> None:
        pass  # what collect needs of the API (get a job, download, delete its files) is plain HTTP: no SDK client

    def _call(self, what: str, fn: Callable):
        if not self._reached:
            self._check_reachable()
        return sdk.call(self.retry, what, fn)

    def _check_reachable(self) -> None:
        """Before the first call of a command: a connection that cannot be made at all (refused, no such host) is a
        setting to fix, said at once, not a blip to wait out through the SDK's and our retries (a minute). Behind a
        proxy the API's host is not ours to reach directly: the calls say what happens."""
        url = urllib.parse.urlsplit(self.connection.base_url)
        proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"))
        if not proxied:
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=REACH_TIMEOUT_S).close()
            except OSError as exc:
                raise self.connection.unreachable(exc) from None
        self._reached = True

    def _http(self, method: str, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
        if not self._reached:
            self._check_reachable()
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
        if resp.status not in ok:
            raise http_error(resp.status, resp.reason, resp.read(), what)

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
                file=str(path), config=sdk.types.UploadFileConfig(mime_type=mime_type, display_name=display_name)
            ),
        )
        expires = f.expiration_time.timestamp() if f.expiration_time else None
        return UploadedFile(name=f.name, uri=f.uri or "", size_bytes=int(f.size_bytes or 0), expires_at=expires)

    def delete_file(self, name: str) -> None:
        """Plain HTTP, as get_batch and download: a collect then never imports the SDK (~0.5 s of CPU and ~60 MB
        of a collect's peak RSS: docs/benchmarks.md, issue 19)."""
        def attempt() -> None:
            try:
                resp = self._http("DELETE", name)
                self._raise_for(resp, f"delete {name}")
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise TransientApiError(f"delete {name}: {exc.__class__.__name__}: {exc}") from None

        try:
            self.retry.call(f"delete {name}", attempt)
        except NotFoundError:
            pass  # already gone (expired or deleted): the goal is reached

    def list_files(self) -> Iterator[FileInfo]:
        pager = self._call("list files", lambda: self.client.files.list(config={"page_size": 100}))
        for f in pager:
            yield FileInfo(name=f.name, display_name=f.display_name, size_bytes=int(f.size_bytes or 0))

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
        `webhook`: a webhook_config (jobs.webhooks) for listeners the API notifies when the job ends."""
        config: dict = {"display_name": display_name}
        if webhook:
            config["webhook_config"] = webhook
        job = sdk.call(RetryPolicy(attempts=1), f"create job {display_name}",
                       lambda: self._create_client.batches.create(model=model, src=file_name, config=config))
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
        return sdk.generate_content(self.client, self.retry, model, body)


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
