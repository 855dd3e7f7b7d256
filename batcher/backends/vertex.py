"""The Vertex AI batch prediction backend (backends.base.Backend): the same interface as the Gemini API's.

    backend = VertexBackend(VertexConnection(project="my-proj", location="us-central1",
                                             staging="gs://my-bucket/batcher"))

Jobs go through the official google-genai SDK with `vertexai=True` (create, get, list, cancel and
interactive generateContent); credentials come from the environment as the SDK finds them (ADC) unless given.
Files live in a Cloud Storage staging area, through google-cloud-storage:

    <staging>/inputs/<display name>.jsonl        the job's JSONL, as the pipeline wrote it
    <staging>/refs/<display name><ext>            reference images (parts use fileData.fileUri = gs://...)
    <staging>/outputs/<display name>/prediction-model-<ts>/predictions.jsonl   written by Vertex

Vertex output lines echo the `request` and add a `response` or a `status` (the exact layout is unverified,
protocol doc §6/§11), in no promised order. `download` streams them and writes the lines
`batcher.results.collect` parses, `{"key", "response"}` or `{"key", "error"}`: the key is the echoed `key` when there
is one, else found from the canonical JSON of the echoed request, matched against the job's input file.
A JOB_STATE_PARTIALLY_SUCCEEDED job is SUCCEEDED for the pipeline (its failed lines come back as errors and
are retried); the raw state stays in `BatchInfo.stats["vertexState"]`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ApiError, NotFoundError, UsageError
from ..faults import maybe_crash
from ..storage import gcs
from . import client as sdk
from .base import BatchInfo, FileInfo, UploadedFile, normalize_state
from .errors import gcs_error
from .retry import RetryPolicy

log = logging.getLogger("batcher.backends.vertex")

API_VERSION = "v1"  # batchPredictionJobs are GA under v1 (the SDK defaults to v1beta1; both are emulated)
OUTPUT_FILE_RE = re.compile(r"(^|/)predictions[^/]*\.jsonl$")
# Vertex states the pipeline does not know, mapped to the ones it does (anything not terminal is waited on).
STATE_MAP = {"PARTIALLY_SUCCEEDED": "SUCCEEDED", "QUEUED": "PENDING"}
REFERENCE_TTL_S = 7 * 24 * 3600.0  # how long we trust a staged reference image (bucket lifecycle rules vary)


@dataclass(frozen=True)
class VertexConnection:
    project: str
    location: str
    staging: str  # gs://bucket/prefix
    base_url: str | None = None  # None: the SDK's endpoint for the location (GOOGLE_VERTEX_BASE_URL overrides)
    api_version: str = API_VERSION
    timeout_s: float = 300.0
    credentials: Any = field(default=None, repr=False, compare=False)  # None: the SDK's ADC lookup

    def __post_init__(self):
        if not self.project:
            raise UsageError("Vertex AI needs a project: --project or GOOGLE_CLOUD_PROJECT")
        if not self.location:
            raise UsageError("Vertex AI needs a location: --location or GOOGLE_CLOUD_LOCATION")
        if self.staging:  # only commands that upload or read job files need it (status and cancel do not)
            try:
                gcs.split(self.staging)
            except UsageError:
                raise UsageError(f"the Vertex staging area must be gs://BUCKET[/PREFIX], not {self.staging!r} (--staging)") from None

    def require_staging(self) -> None:
        if not self.staging:
            raise UsageError("Vertex AI needs a staging area for job files: --staging gs://BUCKET/PREFIX or "
                             "BATCHER_VERTEX_STAGING")

    @classmethod
    def from_env(cls, project: str | None = None, location: str | None = None, staging: str | None = None,
                 environ: dict | None = None, timeout_s: float = 300.0, credentials: Any = None) -> "VertexConnection":
        env = os.environ if environ is None else environ
        if credentials is None and env.get("BATCHER_VERTEX_ACCESS_TOKEN"):
            # An OAuth access token as given (e.g. `gcloud auth print-access-token`; it lasts about an hour),
            # or any token for the emulator. Without it the SDK finds Application Default Credentials.
            from google.oauth2.credentials import Credentials

            credentials = Credentials(token=env["BATCHER_VERTEX_ACCESS_TOKEN"])
        return cls(
            project=project or env.get("GOOGLE_CLOUD_PROJECT") or "",
            location=location or env.get("GOOGLE_CLOUD_LOCATION") or "us-central1",
            staging=staging or env.get("BATCHER_VERTEX_STAGING") or "",
            base_url=(env.get("GOOGLE_VERTEX_BASE_URL") or "").rstrip("/") or None,
            timeout_s=timeout_s, credentials=credentials,
        )

    @property
    def bucket(self) -> str:
        self.require_staging()
        return gcs.split(self.staging)[0]

    @property
    def prefix(self) -> str:
        rest = gcs.split(self.staging)[1].strip("/")
        return f"{rest}/" if rest else ""


def _canonical(obj: Any) -> Any:
    """camelCase keys, null fields dropped: Google's own sample echoes a request with `"file_data": null` beside
    the text of a part (and snake_case keys beside camelCase ones)."""
    if isinstance(obj, dict):
        return {re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), k): _canonical(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def request_fingerprint(request: Any) -> str:
    """The identity of a request as sent and as echoed: canonical JSON (sorted keys, camelCase, no nulls) hashed."""
    text = json.dumps(_canonical(request), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def line_error(rec: dict) -> dict | None:
    """The google.rpc.Status-like error of an output line, or None when it has a usable response."""
    if rec.get("error"):
        err = rec["error"]
        return err if isinstance(err, dict) else {"message": str(err)}
    status = rec.get("status")
    if isinstance(status, dict) and (status.get("code") or status.get("message")):
        return status
    if isinstance(status, str) and status.strip():
        text = status.strip()
        start = text.find("{")
        if start >= 0:  # e.g. 'Bad Request: {"error": {"code": 400, "message": ..., "status": ...}}'
            try:
                obj = json.loads(text[start:])
                err = obj.get("error", obj) if isinstance(obj, dict) else None
                if isinstance(err, dict) and err.get("message"):
                    return {k: err[k] for k in ("code", "message", "status") if k in err}
            except ValueError:
                pass
        return {"message": text}
    if rec.get("response") is None:
        return {"message": "no response in the output line"}
    return None


class VertexBackend:
    takes_webhooks = False  # Vertex AI batch jobs take no webhook_config
    streams_results = False  # several predictions files, normalised once they are all copied

    def __init__(self, connection: VertexConnection, retry: RetryPolicy | None = None, storage_client: Any = None):
        self.connection = connection
        self.retry = retry or RetryPolicy()
        self.clock_offset_s: float | None = None
        c = connection
        vertex = dict(vertexai=True, project=c.project, location=c.location, credentials=c.credentials)
        self.client = sdk.genai_client(sdk.http_options(api_version=c.api_version, timeout_s=c.timeout_s, base_url=c.base_url),
                                       **vertex)
        # Create is not idempotent: never retried (the pipeline reconciles by display name instead).
        self._create_client = sdk.genai_client(sdk.http_options(api_version=c.api_version, timeout_s=c.timeout_s,
                                                                base_url=c.base_url, retries=False), **vertex)
        self._storage = storage_client
        self._local_inputs: dict[str, Path] = {}  # display name -> the JSONL we uploaded (a cheaper key map source)

    # ---- plumbing ---------------------------------------------------------------------------------
    @property
    def storage(self):
        if self._storage is None:
            from google.cloud import storage

            creds = self.connection.credentials if not os.environ.get("STORAGE_EMULATOR_HOST") else None
            self._storage = storage.Client(project=self.connection.project, credentials=creds)
        return self._storage

    def _blob(self, uri: str):
        bucket, path = gcs.split(uri)
        return self.storage.bucket(bucket).blob(path)

    def _uri(self, *parts: str) -> str:
        return f"gs://{self.connection.bucket}/{self.connection.prefix}{'/'.join(parts)}"

    def _call(self, what: str, fn: Callable):
        return sdk.call(self.retry, what, fn, also=gcs_error)

    def warm_up(self) -> None:
        pass  # its clients are made with it

    def server_now(self) -> float:
        return time.time() + (self.clock_offset_s or 0.0)

    # ---- models -----------------------------------------------------------------------------------
    def get_model(self, name: str) -> None:
        """Vertex AI's publisher models are not listed with their batch support per project: a model batcher does
        not know is not checked before sending here (None); a wrong name fails at job creation."""
        return None

    def list_models(self) -> Iterator:
        return iter(())

    # ---- files ------------------------------------------------------------------------------------
    def upload_jsonl(self, path: Path, display_name: str) -> UploadedFile:
        uri = self._uri("inputs", f"{display_name}.jsonl")
        self._call(f"upload {path.name}", lambda: self._blob(uri).upload_from_filename(
            str(path), content_type="application/jsonl"))
        self._local_inputs[display_name] = Path(path)
        return UploadedFile(name=uri, uri=uri, size_bytes=Path(path).stat().st_size, expires_at=None)

    def upload_image(self, path: Path, mime_type: str, display_name: str) -> UploadedFile:
        uri = self._uri("refs", f"{display_name}{Path(path).suffix.lower()}")
        self._call(f"upload {Path(path).name}", lambda: self._blob(uri).upload_from_filename(str(path), content_type=mime_type))
        return UploadedFile(name=uri, uri=uri, size_bytes=Path(path).stat().st_size,
                            expires_at=time.time() + REFERENCE_TTL_S)

    def delete_file(self, name: str) -> None:
        """A gs:// object, or every object under a gs://.../ directory (a job's output)."""
        bucket, path = gcs.split(name)

        def delete():
            if name.endswith("/"):
                for blob in self.storage.list_blobs(bucket, prefix=path):
                    try:
                        blob.delete()
                    except Exception as exc:
                        if type(exc).__name__ != "NotFound":
                            raise
                return
            self.storage.bucket(bucket).blob(path).delete()

        try:
            self._call(f"delete {name}", delete)
        except NotFoundError:
            pass  # already gone: the goal is reached

    def list_files(self) -> Iterator[FileInfo]:
        """Our staged job inputs, named by their job's display name (for the orphan sweep after a crash)."""
        prefix = f"{self.connection.prefix}inputs/"
        blobs = self._call("list staged files", lambda: list(self.storage.list_blobs(self.connection.bucket, prefix=prefix)))
        for b in blobs:
            stem = b.name[len(prefix):].removesuffix(".jsonl")
            yield FileInfo(name=f"gs://{self.connection.bucket}/{b.name}", display_name=stem, size_bytes=int(b.size or 0))

    # ---- batches ----------------------------------------------------------------------------------
    def output_prefix(self, display_name: str) -> str:
        return self._uri("outputs", display_name)

    takes_webhooks = False  # Vertex AI batch jobs have no webhook_config (the workspace refuses them up front)

    def create_batch(self, model: str, file_name: str, display_name: str, webhook: dict | None = None) -> BatchInfo:
        """Not retried here: create is not idempotent. The caller reconciles by display name instead.
        No webhooks: Vertex AI batch jobs don't take webhook_config (the pipeline refuses them before any work)."""
        if webhook:
            raise UsageError("webhooks (--webhook-uri) are a Gemini API feature; Vertex AI batch jobs don't take them")
        job = sdk.call(RetryPolicy(attempts=1), f"create job {display_name}", lambda: self._create_client.batches.create(
            model=model.removeprefix("models/"), src=file_name,
            config={"display_name": display_name, "dest": self.output_prefix(display_name)}))
        return batch_info(job)

    def get_batch(self, name: str) -> BatchInfo:
        return batch_info(self._call(f"get {name}", lambda: self.client.batches.get(name=name)))

    def list_batches(self) -> Iterator[BatchInfo]:
        pager = self._call("list jobs", lambda: self.client.batches.list(config={"page_size": 100}))
        for job in pager:
            yield batch_info(job)

    def cancel_batch(self, name: str) -> None:
        self._call(f"cancel {name}", lambda: self.client.batches.cancel(name=name))

    # ---- results ----------------------------------------------------------------------------------
    def _output_blobs(self, output_dir: str) -> list:
        try:
            bucket, path = gcs.split(output_dir)
        except UsageError:
            raise ApiError(f"download {output_dir!r}: the job's output directory is not a gs:// URI") from None
        path = path if path.endswith("/") or not path else path + "/"
        blobs = [b for b in self.storage.list_blobs(bucket, prefix=path) if OUTPUT_FILE_RE.search(b.name)]
        if not blobs:
            raise NotFoundError(f"download {output_dir}: no predictions*.jsonl in the job's output directory", 404, "NOT_FOUND")
        return sorted(blobs, key=lambda b: b.name)

    def _input_uri(self, output_dir: str) -> tuple[str, str]:
        """Our layout: <staging>/outputs/<display>/prediction-model-<ts>/ -> (<display>, its input URI)."""
        parts = output_dir.rstrip("/").split("/")
        display = parts[-2] if len(parts) >= 2 and parts[-1].startswith("prediction-model-") else parts[-1]
        return display, self._uri("inputs", f"{display}.jsonl")

    def _key_map(self, output_dir: str) -> dict[str, list]:
        """request fingerprint -> the keys sent with that request, from the job's input (local copy or GCS)."""
        display, uri = self._input_uri(output_dir)
        keys: dict[str, list] = {}

        def add(lines):
            for raw in lines:
                if raw.strip():
                    obj = json.loads(raw)
                    keys.setdefault(request_fingerprint(obj.get("request")), []).append(obj.get("key"))

        local = self._local_inputs.get(display)
        if local is not None and local.exists():
            with open(local, "rb") as f:
                add(f)
            return keys

        def read():
            keys.clear()
            with io.BufferedReader(self._blob(uri).open("rb")) as f:
                add(f)

        self._call(f"read {uri}", read)
        return keys

    def download(self, file_name: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> int:
        """The job's predictions as `{"key", "response"|"error"}` lines in `dest`. Returns its size.
        `file_name` is the job's gcsOutputDirectory. Each predictions file is first copied as it is into
        `dest`.raw/, resuming a partial copy from where it stopped (a ranged read); then `dest` is written from
        those local copies, which are removed once it is."""
        raw_dir = dest.with_name(dest.name + ".raw")
        raw_dir.mkdir(parents=True, exist_ok=True)
        copies = self.retry.call(f"download {file_name}", lambda: self._copy_outputs(file_name, raw_dir, on_bytes))
        size = self.retry.call(f"read {file_name}", lambda: self._normalise(file_name, copies, dest))
        shutil.rmtree(raw_dir, ignore_errors=True)
        return size

    def _copy_outputs(self, file_name: str, raw_dir: Path, on_bytes: Callable[[int], None] | None) -> list[Path]:
        """Each predictions file into raw_dir, appending to what an earlier (killed or dropped) attempt left."""
        try:
            copies = []
            for i, blob in enumerate(self._output_blobs(file_name)):
                copy = raw_dir / f"{i:05d}-{blob.name.rsplit('/', 1)[-1]}"
                have = copy.stat().st_size if copy.exists() else 0
                if blob.size is None or have < blob.size:
                    with blob.open("rb", chunk_size=1 << 20) as f, open(copy, "ab") as out:
                        f.seek(have)
                        while chunk := f.read(1 << 20):
                            out.write(chunk)
                            out.flush()
                            if on_bytes:
                                on_bytes(len(chunk))
                            maybe_crash("download")  # test hook: see batcher/faults.py
                copies.append(copy)
            return copies
        except ApiError:
            raise
        except Exception as exc:
            mapped = gcs_error(exc, f"download {file_name}")
            if mapped is exc:
                raise
            raise mapped from None

    def _normalise(self, file_name: str, copies: list[Path], dest: Path) -> int:
        """The local copies of the predictions -> `dest` in collect's line format (keys matched back to the
        input's when the output lines carry none)."""
        key_map: dict[str, list] | None = None

        def attempt() -> int:
            nonlocal key_map
            with open(dest, "wb") as out:
                for copy in copies:
                    with open(copy, "rb", buffering=1 << 20) as f:
                        for raw in f:
                            if not raw.strip():
                                continue
                            try:
                                rec = json.loads(raw)
                            except ValueError:
                                out.write(b"{not valid JSON}\n")  # collect reports it and skips it
                                continue
                            key = rec.get("key")
                            if key is None:
                                if key_map is None:
                                    key_map = self._key_map(file_name)
                                candidates = key_map.get(request_fingerprint(rec.get("request")))
                                key = candidates.pop(0) if candidates else None
                            err = line_error(rec)
                            line = {"key": key, "error": err} if err is not None else {"key": key, "response": rec["response"]}
                            out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            return dest.stat().st_size

        try:
            return attempt()
        except ApiError:
            raise
        except Exception as exc:  # reading the job's input for the key map
            mapped = gcs_error(exc, f"read the input of {file_name}")
            if mapped is exc:
                raise
            raise mapped from None

    # ---- interactive ------------------------------------------------------------------------------
    def generate_content(self, model: str, body: dict) -> dict:
        return sdk.generate_content(self.client, self.retry, model, body)

    def download_chunks(self, file_name: str, dest: Path, on_bytes: Callable[[int], None] | None = None,
                        block: int = 1 << 20) -> Iterator[bytes]:
        raise NotImplementedError("Vertex AI results are normalised once downloaded (streams_results is False)")


def vertex_state(job) -> str:
    return normalize_state(job.state.value if hasattr(job.state, "value") else job.state)


def batch_info(job) -> BatchInfo:
    """An SDK BatchJob (Vertex) -> BatchInfo with the pipeline's state names."""
    raw = vertex_state(job)
    stats: dict[str, Any] = {}
    cs = job.completion_stats
    if cs is not None:
        ok, failed, incomplete = int(cs.successful_count or 0), int(cs.failed_count or 0), int(cs.incomplete_count or 0)
        stats = {"requestCount": ok + failed + incomplete, "successfulRequestCount": ok, "failedRequestCount": failed,
                 "pendingRequestCount": incomplete}
    stats["vertexState"] = raw
    out = job.output_info.gcs_output_directory if job.output_info else None
    err = job.error
    error = None
    if err is not None and (err.code or err.message):
        error = f"{err.code or ''} {err.message or ''}".strip()
    return BatchInfo(
        name=job.name,
        display_name=job.display_name,
        state=STATE_MAP.get(raw, raw),
        created_at=job.create_time.isoformat() if job.create_time else None,
        updated_at=job.update_time.isoformat() if job.update_time else None,
        ended_at=job.end_time.isoformat() if job.end_time else None,
        stats=stats,
        output_file=out,
        error=error,
    )
