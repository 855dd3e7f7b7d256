"""The Gemini API's state and behaviour (moto's "backend"): files, resumable uploads, batches, their limits, and the
batch worker that runs the jobs. Shares the project's config, clock, lock, counters, fault RNG and billing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..core.clock import new_id, rfc3339
from ..core.errors import ApiError
from ..core.project import Project
from ..generate import Generator, LineError, billed_usd, camelize, estimate_tokens
from ..image_models import DEFAULT_CAPS, ImageModel, not_found
from ..schema import BadPayload, check_fields, loads
from .webhooks import WebhookSender, parse_webhook_config

FILE_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
BATCH_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
ACTIVE_STATES = ("PENDING", "RUNNING")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")


@dataclass
class FileRecord:
    id: str
    display_name: str | None
    mime_type: str
    size: int
    sha256_hex: str
    create_time: float
    expire_time: float
    source: str  # UPLOADED | GENERATED
    path: str

    @property
    def name(self) -> str:
        return f"files/{self.id}"


@dataclass
class UploadSession:
    upload_id: str
    file_id: str
    display_name: str | None
    mime_type: str
    declared: int | None  # None: the client did not say (the size is what arrives by finalize)
    path: str
    received: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Batch:
    id: str
    model: str
    display_name: str | None
    input_config: dict[str, Any]
    create_time: float
    run_at: float
    done_at: float | None  # None: never (STUCK)
    outcome: str
    request_count: int
    enqueued_tokens: int
    inline_requests: list[dict[str, Any]] | None = None
    input_path: str | None = None
    webhook: dict[str, Any] | None = None  # webhookConfig: listeners told of the job's end
    spec: Any = None  # the ImageModel it runs on (kept: a model shut down later still finishes the jobs it took)
    state: str = "PENDING"
    update_time: float = 0.0
    end_time: float | None = None
    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    error: dict[str, Any] | None = None
    output_file: str | None = None
    inline_responses: list[dict[str, Any]] | None = None
    # processing cursor (file mode)
    _in: Any = None
    _out: Any = None
    _out_path: str | None = None
    _sha: Any = None
    _out_size: int = 0

    @property
    def name(self) -> str:
        return f"batches/{self.id}"


class GeminiService:
    """The Gemini API's files, uploads and batches. Thread-safe: the project's lock for the dictionaries, image
    generation outside it."""

    COUNTERS = ("files_uploaded", "files_deleted", "files_expired", "bytes_uploaded", "bytes_downloaded",
                "upload_chunks", "downloads", "downloads_dropped", "webhooks_delivered", "webhook_attempts_failed",
                "webhooks_dropped")

    def __init__(self, project: Project) -> None:
        self.project = project
        # Shared with the other service through the project; none of them is ever replaced.
        self.config, self.clock, self.lock, self.billing = project.config, project.clock, project.lock, project.billing
        self.files_dir = os.path.join(project.data_dir, "files")
        self.uploads_dir = os.path.join(project.data_dir, "uploads")
        self.generator = Generator(lambda: self.config, project.injector, self._file_uri_ok, project.count_fault)
        self.base_url = ""
        self._kick = threading.Event()
        self._worker: threading.Thread | None = None
        self.webhooks = WebhookSender(lambda: self.config, self.clock.now, project.count)
        self._reset_state()

    # ----- lifecycle -------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        with self.lock:
            for d in (self.files_dir, self.uploads_dir):
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d, exist_ok=True)
            self.files: dict[str, FileRecord] = {}
            self.uploads: dict[str, UploadSession] = {}
            self.batches: dict[str, Batch] = {}

    def start(self) -> None:
        self._worker = threading.Thread(target=self.project.run_worker, args=(self._kick, self.tick), name="emulator-worker",
                                        daemon=True)
        self._worker.start()
        self.webhooks.start()

    def stop(self) -> None:
        """After the project's ``stopping`` is set."""
        self._kick.set()
        if self._worker:
            self._worker.join(timeout=10)
        self.webhooks.stop()
        with self.lock:
            for b in self.batches.values():
                self._close_cursor(b)

    def reset(self) -> None:
        """Drop all files, uploads and batches (the project zeroes the counters)."""
        with self.lock:
            for b in self.batches.values():
                b.state = "DELETED"  # stops any line the worker is processing right now
                self._close_cursor(b)
            self._reset_state()
            self.webhooks.clear()

    def wake(self) -> None:
        """The configuration or the clock changed: let the worker look now."""
        self._kick.set()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            states: dict[str, int] = {}
            for b in self.batches.values():
                states[b.state] = states.get(b.state, 0) + 1
            return {
                "files": len(self.files),
                "batches": len(self.batches),
                "batch_states": states,
                "storage_bytes": sum(f.size for f in self.files.values()),
                "webhook_deliveries": self.webhooks.deliveries(),  # one per attempt: uri, type, id, status, attempt
            }

    # ----- files -----------------------------------------------------------------------------------
    def _live_file(self, file_id: str) -> FileRecord | None:
        f = self.files.get(file_id)
        if f is not None and self.clock.now() >= f.expire_time:
            self._expire_file(f)
            return None
        return f

    def _expire_file(self, f: FileRecord) -> None:
        self._drop_file(f, "files_expired")

    def _drop_file(self, f: FileRecord, counter: str) -> None:
        """Forget the file and count why; its bytes go (a missing one is no error: a reset may have gone first)."""
        self.files.pop(f.id, None)
        self.project.count(counter)
        with contextlib.suppress(OSError):
            os.unlink(f.path)

    def _file_uri_ok(self, uri: str) -> bool:
        m = re.search(r"files/([a-z0-9-]+)$", uri)
        if not m:
            return False
        with self.lock:
            return self._live_file(m.group(1)) is not None

    @staticmethod
    def _found(item, what: str):
        """`item`, or the API's 404 for `what` ("Batch batches/x"). A dict read is atomic: no lock needed."""
        if item is None:
            raise ApiError(404, "NOT_FOUND", f"{what} not found.")
        return item

    def get_file(self, file_id: str) -> FileRecord:
        with self.lock:
            return self._found(self._live_file(file_id), f"File files/{file_id}")

    def list_files(self) -> list[FileRecord]:
        with self.lock:
            recs = [f for f in list(self.files.values()) if self._live_file(f.id) is not None]
            return sorted(recs, key=lambda f: f.create_time, reverse=True)

    def delete_file(self, file_id: str) -> None:
        with self.lock:
            self._drop_file(self.get_file(file_id), "files_deleted")

    def start_upload(self, meta: dict[str, Any], declared: int | None, header_mime: str | None) -> UploadSession:
        cfg = self.config
        name = meta.get("name")
        display = meta.get("displayName", meta.get("display_name"))
        mime = meta.get("mimeType", meta.get("mime_type")) or header_mime
        if declared is None:
            size = meta.get("sizeBytes", meta.get("size_bytes"))
            declared = int(size) if size is not None else None
        if declared is None and cfg.strict_upload_length:
            raise ApiError(400, "INVALID_ARGUMENT", "Missing X-Goog-Upload-Header-Content-Length.")
        if not mime:
            raise ApiError(400, "INVALID_ARGUMENT", "Missing MIME type: set file.mimeType or X-Goog-Upload-Header-Content-Type.")
        if (declared or 0) > cfg.max_file_bytes:
            raise ApiError(400, "INVALID_ARGUMENT",
                           f"File size {declared} exceeds the maximum of {cfg.max_file_bytes} bytes per file.")
        if display is not None and len(display) > 512:
            raise ApiError(400, "INVALID_ARGUMENT", "* File.display_name: must be at most 512 characters.")
        with self.lock:
            if name:
                file_id = name[len("files/"):] if name.startswith("files/") else name
                if not FILE_ID_RE.match(file_id):
                    raise ApiError(400, "INVALID_ARGUMENT",
                                   f"Invalid file name {name}: the ID must be up to 40 characters of [a-z0-9-] "
                                   "and must not start or end with '-'.")
                if self._live_file(file_id) is not None or any(
                        u.file_id == file_id for u in self.uploads.values()):
                    raise ApiError(409, "ALREADY_EXISTS", f"File files/{file_id} already exists.")
            else:
                file_id = new_id(12)
            used = sum(f.size for f in self.files.values() if f.source == "UPLOADED") + sum(
                u.declared or u.received for u in self.uploads.values())
            if used + (declared or 0) > cfg.max_storage_bytes:
                raise ApiError(429, "RESOURCE_EXHAUSTED",
                               f"Project file storage quota of {cfg.max_storage_bytes} bytes exceeded.")
            uid = new_id(24)
            path = os.path.join(self.uploads_dir, uid)
            open(path, "wb").close()
            s = UploadSession(uid, file_id, display, str(mime), declared, path)
            self.uploads[uid] = s
            return s

    def upload_session(self, upload_id: str) -> UploadSession:
        return self._found(self.uploads.get(upload_id), f"Upload session {upload_id}")

    def upload_chunk(self, s: UploadSession, offset: int, stream: Iterator[bytes], length: int) -> None:
        """Append a chunk (streamed to disk). The caller holds ``s.lock``."""
        if offset != s.received:
            raise ApiError(400, "INVALID_ARGUMENT",
                           f"Invalid X-Goog-Upload-Offset {offset}: {s.received} bytes have been received so far.")
        limit = s.declared if s.declared is not None else self.config.max_file_bytes
        if s.received + length > limit:
            raise ApiError(400, "INVALID_ARGUMENT",
                           f"Upload exceeds the declared size of {s.declared} bytes." if s.declared is not None else
                           f"File size exceeds the maximum of {limit} bytes per file.")
        with open(s.path, "ab") as fh:
            for chunk in stream:
                fh.write(chunk)
                s.sha.update(chunk)
                s.received += len(chunk)
        self.project.count("bytes_uploaded", length)
        self.project.count("upload_chunks")

    def finalize_upload(self, s: UploadSession) -> FileRecord:
        with self.lock:
            self.uploads.pop(s.upload_id, None)
        if s.declared is not None and s.received != s.declared:
            os.unlink(s.path)
            raise ApiError(400, "INVALID_ARGUMENT",
                           f"Upload finalized with {s.received} bytes, but {s.declared} were declared.")
        now = self.clock.now()
        path = os.path.join(self.files_dir, s.file_id)
        os.replace(s.path, path)
        f = FileRecord(s.file_id, s.display_name, s.mime_type, s.received, s.sha.hexdigest(), now,
                       now + self.config.file_ttl_seconds, "UPLOADED", path)
        with self.lock:
            self.files[f.id] = f
            self.project.count("files_uploaded")
        return f

    def abort_upload(self, s: UploadSession) -> None:
        with self.lock:
            self.uploads.pop(s.upload_id, None)
        try:
            os.unlink(s.path)
        except OSError:
            pass

    def refuse_finalize(self, s: UploadSession) -> bool:
        """Fault ``finalize_error_mime_types``: a finalize for such a MIME type makes no file (the upload is dropped);
        the caller answers 200 with an error body (python-genai #1547)."""
        if s.mime_type not in (self.config.finalize_error_mime_types or []):
            return False
        self.abort_upload(s)
        self.project.count_fault("finalize_error")
        return True

    def start_download(self) -> int | None:
        """Count a download. Returns after how many body bytes to cut its connection (fault
        ``drop_download_after_bytes``, for the next ``drop_download_times`` downloads), or None."""
        cfg = self.config
        drop_after: int | None = None
        with self.lock:
            if cfg.drop_download_after_bytes is not None and (
                    cfg.drop_download_times is None or cfg.drop_download_times > 0):
                drop_after = int(cfg.drop_download_after_bytes)
                if cfg.drop_download_times is not None:
                    cfg.drop_download_times -= 1
                self.project.count_fault("drop_download")
                self.project.count("downloads_dropped")
            self.project.count("downloads")
        return drop_after

    def count_downloaded(self, n: int) -> None:
        """The body bytes a download sent."""
        self.project.count("bytes_downloaded", n)

    def file_json(self, f: FileRecord) -> dict[str, Any]:
        base = self.base_url
        d: dict[str, Any] = {"name": f.name}
        if f.display_name is not None:
            d["displayName"] = f.display_name
        d.update({
            "mimeType": f.mime_type,
            "sizeBytes": str(f.size),
            "createTime": rfc3339(f.create_time),
            "updateTime": rfc3339(f.create_time),
            "expirationTime": rfc3339(f.expire_time),
            "sha256Hash": base64.b64encode(f.sha256_hex.encode()).decode(),
            "uri": f"{base}/v1beta/files/{f.id}",
        })
        if f.source == "GENERATED":
            d["downloadUri"] = f"{base}/download/v1beta/files/{f.id}:download?alt=media"
        d["state"] = "ACTIVE"
        d["source"] = f.source
        if self.config.omit_optional_fields:
            for k in ("displayName", "updateTime", "sha256Hash"):
                d.pop(k, None)
        return d

    # ----- models ----------------------------------------------------------------------------------
    def models(self) -> dict[str, ImageModel]:
        """The models served on the emulated date (the project's: both services serve the same)."""
        return self.project.models()

    def model(self, name: str, method: str) -> ImageModel:
        """A served model that supports `method`, or the API's 404."""
        m = self.models().get(name)
        if m is None or method not in m.methods:
            raise ApiError(*not_found(name, method))
        return m

    # ----- batches ---------------------------------------------------------------------------------
    def _quota_error(self, message: str, metric: str, quota_id: str, model: str, value: int) -> ApiError:
        return ApiError(429, "RESOURCE_EXHAUSTED", message, [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": metric, "quotaId": quota_id,
                "quotaDimensions": {"model": model, "location": "global"}, "quotaValue": str(value)}]},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": self.config.retry_delay},
        ])

    def create_batch(self, model: str, batch: dict[str, Any]) -> Batch:
        cfg = self.config
        m = self.model(model, "batchGenerateContent")
        if not isinstance(batch, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid JSON payload: 'batch' must be an object.")
        ic = batch.get("inputConfig", batch.get("input_config"))
        if not isinstance(ic, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "* GenerateContentBatch.input_config: input_config is required.\n")
        file_name = ic.get("fileName", ic.get("file_name"))
        reqs = ic.get("requests")
        if (file_name is None) == (reqs is None):
            raise ApiError(400, "INVALID_ARGUMENT",
                           "* GenerateContentBatch.input_config: exactly one of file_name or requests must be set.\n")
        display = batch.get("displayName", batch.get("display_name"))
        try:
            webhook = parse_webhook_config(batch.get("webhookConfig", batch.get("webhook_config")))
        except ValueError as exc:
            raise ApiError(400, "INVALID_ARGUMENT", f"* GenerateContentBatch.webhook_config: {exc}\n") from None
        inline: list[dict[str, Any]] | None = None
        input_path = None
        tokens = 0
        if reqs is not None:
            items = reqs.get("requests") if isinstance(reqs, dict) else None
            if not isinstance(items, list) or not items:
                raise ApiError(400, "INVALID_ARGUMENT", "* GenerateContentBatch.input_config.requests: requests must not be empty.\n")
            inline = items
            for it in items:
                try:
                    tokens += estimate_tokens(m, json.dumps({"request": (it or {}).get("request")}).encode())
                except Exception:
                    pass
            count = len(items)
            input_config = {"requests": {"requests": items}}
        else:
            if not isinstance(file_name, str) or not file_name.startswith("files/"):
                raise ApiError(400, "INVALID_ARGUMENT", f"Invalid file name: {file_name!r}.")
            with self.lock:
                f = self._live_file(file_name[len("files/"):])
            if f is None:
                raise ApiError(404, "NOT_FOUND", f"File {file_name} not found.")
            if f.size > cfg.max_file_bytes:
                raise ApiError(400, "INVALID_ARGUMENT", f"Input file {file_name} exceeds {cfg.max_file_bytes} bytes.")
            count = 0
            with open(f.path, "rb") as fh:
                for line in fh:
                    if line.strip():
                        count += 1
                        tokens += estimate_tokens(m, line)
            if count == 0:
                raise ApiError(400, "INVALID_ARGUMENT", f"Input file {file_name} contains no requests.")
            input_path = f.path
            input_config = {"fileName": file_name}  # (sent as fileName or file_name)
        self.billing.check()  # a spend cap or a used-up prepay balance refuses new work
        with self.lock:
            active = [b for b in self.batches.values() if b.state in ACTIVE_STATES]
            if len(active) >= cfg.max_concurrent_jobs:
                raise self._quota_error(
                    f"You have reached the maximum of {cfg.max_concurrent_jobs} concurrent batch jobs. "
                    "Please wait for some jobs to finish and try again.",
                    "generativelanguage.googleapis.com/batch_concurrent_requests",
                    "BatchConcurrentRequestsPerProject", model, cfg.max_concurrent_jobs)
            cap = cfg.enqueued_token_cap if cfg.enqueued_token_cap is not None else m.enqueued_token_caps.get(cfg.tier, DEFAULT_CAPS[cfg.tier])
            enq = sum(b.enqueued_tokens for b in active if b.model == model)
            if enq + tokens > cap:
                raise self._quota_error(
                    f"You exceeded your current quota: batch enqueued tokens for model {model} "
                    f"({enq} enqueued + {tokens} requested > {cap}). Please wait for running jobs to finish.",
                    "generativelanguage.googleapis.com/batch_enqueued_tokens",
                    f"BatchEnqueuedTokensPerModelPerTier{cfg.tier}", model, cap)
            outcome = cfg.job_outcomes.pop(0) if cfg.job_outcomes else "SUCCEEDED"
            now = self.clock.now()
            run_at = now + cfg.pending_seconds
            done_at = None if outcome == "STUCK" else run_at + cfg.running_seconds
            b = Batch(new_id(36), model, display, input_config, now, run_at, done_at, outcome, count, tokens,
                      inline_requests=inline, input_path=input_path, update_time=now, webhook=webhook, spec=m)
            # A file input is copied by reference: keep our own hard link so deleting the file later
            # does not break the job (the real service snapshots its input).
            if input_path:
                snap = os.path.join(self.uploads_dir, f"batch-input-{b.id}")
                try:
                    os.link(input_path, snap)
                except OSError:
                    shutil.copyfile(input_path, snap)
                b.input_path = snap
            self.batches[b.id] = b
            self.project.count("batches_created")
        self._kick.set()
        return b

    def lost_create_reply(self) -> bool:
        """Fault ``create_then_fail_times``: the job was made, and the reply is lost (the caller answers 503)."""
        with self.lock:
            lost = self.config.create_then_fail_times > 0
            if lost:
                self.config.create_then_fail_times -= 1
                self.project.count_fault("create_then_fail")
        return lost

    def get_batch(self, batch_id: str) -> Batch:
        return self._found(self.batches.get(batch_id), f"Batch batches/{batch_id}")

    def list_batches(self) -> list[Batch]:
        with self.lock:
            return sorted(self.batches.values(), key=lambda b: b.create_time, reverse=True)

    def cancel_batch(self, batch_id: str) -> None:
        with self.lock:
            b = self.get_batch(batch_id)
            if b.state in ("SUCCEEDED", "FAILED", "EXPIRED"):
                raise ApiError(400, "FAILED_PRECONDITION",
                               f"Batch {b.name} is already in a terminal state ({b.state}) and cannot be cancelled.")
            if b.state == "CANCELLED":
                return
            self._finish(b, "CANCELLED", {"code": 1, "message": "Batch job was cancelled."})
            self.project.count("batches_cancelled")

    def delete_batch(self, batch_id: str) -> None:
        with self.lock:
            b = self.get_batch(batch_id)
            if b.state in ACTIVE_STATES:
                self._finish(b, "CANCELLED", {"code": 1, "message": "Batch job was deleted."})
            b.state = "DELETED"
            self.batches.pop(b.id, None)
            self.project.count("batches_deleted")

    def _finish(self, b: Batch, state: str, error: dict[str, Any] | None, at: float | None = None) -> None:
        """Move to a terminal state (caller holds the lock)."""
        self._close_cursor(b, discard=state != "SUCCEEDED")
        b.state = state
        b.error = error
        t = self.clock.now() if at is None else at
        b.end_time = b.update_time = t
        key = {"SUCCEEDED": "batches_succeeded", "FAILED": "batches_failed", "EXPIRED": "batches_expired"}.get(state)
        if key:
            self.project.count(key)
        if b.webhook:
            self.webhooks.job_ended(b.name, b.display_name, state, b.webhook, rfc3339)
        if b.input_path and state != "SUCCEEDED":
            self._drop_input(b)

    def _drop_input(self, b: Batch) -> None:
        if b.input_path and os.path.basename(b.input_path).startswith("batch-input-"):
            try:
                os.unlink(b.input_path)
            except OSError:
                pass

    def _close_cursor(self, b: Batch, discard: bool = True) -> None:
        for h in (b._in, b._out):
            if h is not None:
                try:
                    h.close()
                except Exception:
                    pass
        b._in = b._out = None
        if discard and b._out_path:
            try:
                os.unlink(b._out_path)
            except OSError:
                pass
            b._out_path = None

    def batch_state_name(self, state: str) -> str:
        return f"{self.config.state_style}_{state}"

    def batch_json(self, b: Batch) -> dict[str, Any]:
        omit = self.config.omit_optional_fields
        md: dict[str, Any] = {"@type": BATCH_TYPE, "model": f"models/{b.model}"}
        if b.display_name is not None and not omit:
            md["displayName"] = b.display_name
        if "fileName" in b.input_config:
            md["inputConfig"] = {"fileName": b.input_config["fileName"]}
        else:  # the API writes camelCase whatever case it was sent; metadata is the caller's own (a Struct): as sent
            md["inputConfig"] = {"requests": {"requests": [
                {camelize(k): (v if k == "metadata" else camelize(v)) for k, v in item.items()} if isinstance(item, dict) else item
                for item in b.inline_requests or []]}}
        md["createTime"] = rfc3339(b.create_time)
        if not omit:
            md["updateTime"] = rfc3339(b.update_time)
        if b.end_time is not None:
            md["endTime"] = rfc3339(b.end_time)
        stats = {"requestCount": b.request_count, "successfulRequestCount": b.succeeded,
                 "failedRequestCount": b.failed,
                 "pendingRequestCount": 0 if b.state == "SUCCEEDED" else b.request_count - b.processed}
        if not omit:
            md["batchStats"] = {k: str(v) for k, v in stats.items() if v}
        md["state"] = self.batch_state_name(b.state)
        md["name"] = b.name
        op: dict[str, Any] = {"name": b.name, "metadata": md}
        if b.state == "SUCCEEDED":
            if b.output_file:
                out: dict[str, Any] = {"responsesFile": b.output_file}
            else:
                out = {"inlinedResponses": {"inlinedResponses": b.inline_responses or []}}
            md["output"] = out
            op["done"] = True
            op["response"] = {"@type": BATCH_OUTPUT_TYPE, **out}
        elif b.state in TERMINAL_STATES:
            op["done"] = True
            if b.error:
                op["error"] = b.error
        return op

    # ----- interactive ---------------------------------------------------------------------------
    def generate_content(self, model: str, body: Any) -> dict[str, Any]:
        """One interactive generateContent call: billed at the full price. Raises ApiError or LineError."""
        m = self.model(model, "generateContent")
        self.billing.check()
        self.project.count("generate_content_calls")
        resp, produced = self.generator.generate(m, body, os.urandom(8).hex())
        self.billing.charge(billed_usd(m, resp, batch=False))
        if produced:
            self.project.count("images_generated")
        return resp

    # ----- worker ----------------------------------------------------------------------------------
    def tick(self, budget_seconds: float = 0.25) -> None:
        with self.lock:
            active = [b for b in self.batches.values() if b.state in ACTIVE_STATES]
            # sweep expired files now and then
            now = self.clock.now()
            for f in list(self.files.values()):
                if now >= f.expire_time:
                    self._expire_file(f)
        deadline = time.monotonic() + budget_seconds
        for b in active:
            self._step(b, deadline)

    def _step(self, b: Batch, deadline: float) -> None:
        cfg = self.config
        with self.lock:
            if b.state not in ACTIVE_STATES:
                return
            now = self.clock.now()
            expire_at = b.create_time + cfg.expiry_seconds
            if (b.done_at is None or b.done_at > expire_at) and now >= expire_at:
                self._finish(b, "EXPIRED", {"code": 4, "message": "Batch job expired: it was pending or "
                                            "running for more than 48 hours."}, at=expire_at)
                return
            if b.state == "PENDING":
                if b.done_at is None or now < b.run_at:
                    return
                if b.outcome == "CANCELLED":
                    self._finish(b, "CANCELLED", {"code": 1, "message": "Batch job was cancelled."}, at=b.run_at)
                    self.project.count("batches_cancelled")
                    return
                b.state = "RUNNING"
                b.update_time = b.run_at
            if b.outcome in ("FAILED", "EXPIRED"):
                if b.done_at is not None and now >= b.done_at:
                    if b.outcome == "FAILED":
                        self._finish(b, "FAILED", {"code": 13, "message": "Batch job failed due to an internal error."}, at=b.done_at)
                    else:
                        self._finish(b, "EXPIRED", {"code": 4, "message": "Batch job expired before completing."}, at=b.done_at)
                return
            assert b.done_at is not None
            span = b.done_at - b.run_at
            frac = 1.0 if span <= 0 else min(1.0, max(0.0, (now - b.run_at) / span))
            target = b.request_count if now >= b.done_at else int(b.request_count * frac)
        while True:
            with self.lock:
                if b.state != "RUNNING":
                    return
                if b.processed >= target:
                    break
            if time.monotonic() > deadline:
                self._kick.set()
                return
            self._process_one(b)
        with self.lock:
            if b.state == "RUNNING" and b.processed >= b.request_count:
                self._complete(b)

    def _open_cursor(self, b: Batch) -> None:
        if b._out is None and b.input_path:
            b._in = open(b.input_path, "rb")
            b._out_path = os.path.join(self.uploads_dir, f"batch-output-{b.id}")
            b._out = open(b._out_path, "wb")
            b._sha = hashlib.sha256()
            b._out_size = 0
        if b.inline_responses is None and b.inline_requests is not None:
            b.inline_responses = []

    def _process_one(self, b: Batch) -> None:
        style = self.config.line_error_style
        with self.lock:
            self._open_cursor(b)
            idx = b.processed
        if b.inline_requests is not None:
            item = b.inline_requests[idx]
            out: dict[str, Any] = {}
            try:
                resp, produced = self.generator.generate(
                    b.spec, (item or {}).get("request"), f"{b.id}:{idx}",
                    key=item.get("metadata") if isinstance(item, dict) else None)
                out["response"] = resp
                self.billing.charge(billed_usd(b.spec, resp, batch=True))
                ok = True
            except LineError as e:
                out["error"] = e.status_json(style)
                ok, produced = False, False
            if isinstance(item, dict) and item.get("metadata") is not None:
                out["metadata"] = item["metadata"]
            with self.lock:
                if b.state != "RUNNING":
                    return
                b.inline_responses.append(out)  # type: ignore[union-attr]
                self._account(b, ok, produced)
            return
        with self.lock:
            fin = b._in
        line = b""
        try:
            while fin is not None:
                line = fin.readline()
                if not line or line.strip():
                    break
        except (ValueError, OSError):  # closed under us by cancel/delete/reset
            return
        key: Any = None
        rec: dict[str, Any]
        try:
            try:
                obj = loads(line)
                if not isinstance(obj, dict):
                    raise BadPayload(f"Invalid JSON payload received. Input line {idx + 1} is not an object.", [])
                key = obj.get("key")
                if "request" in obj or self.config.strict_line_keys:
                    check_fields(obj, "InputLine")
            except BadPayload as bad:
                raise LineError("INVALID_ARGUMENT", bad.message, bad.details() if bad.violations else None) from None
            if "request" in obj:
                request = obj["request"]
            elif self.config.strict_line_keys:
                raise LineError("INVALID_ARGUMENT", f"Input line {idx + 1} has no 'request'.")
            else:  # the batch guide's REST example writes bare GenerateContentRequest lines
                request, key = obj, None
            if key is None and self.config.strict_line_keys:
                raise LineError("INVALID_ARGUMENT", f"Input line {idx + 1} has no 'key'.")
            resp, produced = self.generator.generate(b.spec, request, f"{b.id}:{idx}", key=key)
            self.billing.charge(billed_usd(b.spec, resp, batch=True))
            rec = {"key": key, "response": resp} if key is not None else {"response": resp}
            ok = True
        except LineError as e:
            rec = {"key": key, "error": e.status_json(style)} if key is not None else {"error": e.status_json(style)}
            ok, produced = False, False
        data = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
        with self.lock:
            if b.state != "RUNNING" or b._out is None:
                return
            b._out.write(data)
            b._sha.update(data)
            b._out_size += len(data)
            self._account(b, ok, produced)

    def _account(self, b: Batch, ok: bool, produced: bool) -> None:
        b.processed += 1
        if ok:
            b.succeeded += 1
        else:
            b.failed += 1
            self.project.count("lines_failed")
        self.project.count("lines_processed")
        if produced:
            self.project.count("images_generated")
        b.update_time = max(b.update_time, self.clock.now())

    def _maybe_truncate_results(self, b: Batch) -> None:
        """Fault `truncate_results_lines`: drop the last N lines of the results file (caller holds the lock)."""
        cfg = self.config
        n = cfg.truncate_results_lines
        if n <= 0 or (cfg.truncate_results_times is not None and cfg.truncate_results_times <= 0):
            return
        if cfg.truncate_results_times is not None:
            cfg.truncate_results_times -= 1
        with open(b._out_path, "rb") as f:
            lines = f.readlines()
        kept = b"".join(lines[:max(0, len(lines) - n)])
        with open(b._out_path, "wb") as f:
            f.write(kept)
        b._sha = hashlib.sha256(kept)
        b._out_size = len(kept)
        self.project.count_fault("truncate_results")

    def _complete(self, b: Batch) -> None:
        """All lines processed: publish the output (caller holds the lock)."""
        self._open_cursor(b)
        if b.input_path:
            b._out.flush()
            b._out.close()
            b._in.close()
            b._out = b._in = None
            self._maybe_truncate_results(b)
            fid = f"batch-{b.id}"
            path = os.path.join(self.files_dir, fid)
            os.replace(b._out_path, path)
            b._out_path = None
            now = self.clock.now()
            self.files[fid] = FileRecord(fid, None, "application/jsonl", b._out_size, b._sha.hexdigest(), now,
                                         now + self.config.file_ttl_seconds, "GENERATED", path)
            b.output_file = f"files/{fid}"
            self._drop_input(b)
        self._finish(b, "SUCCEEDED", None, at=max(self.clock.now(), b.done_at or 0))
