"""Jobs against the API: write the JSONL, upload it, create the batch exactly once, refresh its state.

Exactly once: a job's deterministic display name is committed (state `creating`) before `batches.create`.
If the process dies inside create, the next start finds the job by that name in the API's job list
(`reconcile`) before it creates anything, so a job is never created twice.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from .. import catalog
from ..backends.base import Backend, BatchInfo
from ..errors import ApiError, LedgerError, NotFoundError, QuotaError, TransientApiError
from ..faults import maybe_crash
from ..ledger import (
    J_CANCELLED, J_CREATING, J_EXPIRED, J_FAILED, J_PLANNED, J_SUBMITTED, J_SUCCEEDED, J_UPLOADED, J_UPLOADING, Ledger, sending,
)
from ..planning.requests import REF_SCHEME, referenced_hashes
from ..storage import atomic
from .webhooks import webhook_config

log = logging.getLogger("batcher.jobs.lifecycle")

# Re-upload a reference image when less than this is left of its 48 h: the job may run for 24 h or more.
REFERENCE_MIN_REMAINING_S = 36 * 3600
API_TERMINAL = {"SUCCEEDED": J_SUCCEEDED, "FAILED": J_FAILED, "EXPIRED": J_EXPIRED, "CANCELLED": J_CANCELLED}


def jsonl_path(ledger: Ledger, display_name: str) -> Path:
    return ledger.workdir / "jobs" / f"{display_name}.jsonl"


def remove_leftover_jsonl(ledger: Ledger, known: set[str]) -> int:
    """Delete the JSONL files of jobs the ledger no longer holds (`known`: the display names it does; a prune
    dropped the others). Returns how many. Files of any other name (a temp file) are left alone."""
    removed = 0
    for path in (ledger.workdir / "jobs").glob("*.jsonl"):
        if path.stem not in known:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_jsonl(ledger: Ledger, job_id: int, uri_by_sha: dict[str, str]) -> Path:
    """Write the job's JSONL (atomically): one `{"key": request hash, "request": ...}` per line."""
    job = ledger.job(job_id)
    path = jsonl_path(ledger, job["display_name"])
    rows = sending.queued_of_job(ledger, job_id)
    size = lines = 0
    with atomic.into_place(path) as tmp, open(tmp, "wb") as f:
        for h, body_json in rows:
            if REF_SCHEME in body_json:
                body_json = splice_references(body_json, uri_by_sha)
            # The stored body is already JSON: splice it in rather than parse and serialise it again.
            line = f'{{"key":"{h}","request":{body_json}}}\n'.encode()
            size += len(line)
            lines += 1
            f.write(line)
        if lines != job["request_count"]:
            raise LedgerError(f"job {job_id}: {lines} queued requests in the ledger, but the job was made with {job['request_count']}")
    sending.set_job_input(ledger, job_id, path, size)
    return path


def splice_references(body_json: str, uri_by_sha: dict[str, str]) -> str:
    """Put uploaded file URIs where a body's reference placeholders are. Only whole JSON string values are
    replaced (`"batcher-ref:sha256:..."` with its quotes): inside a prompt the quotes would be escaped."""
    for sha in set(referenced_hashes(body_json)):
        placeholder = f'"{REF_SCHEME}{sha}"'
        if placeholder in body_json:
            if sha not in uri_by_sha:
                raise KeyError(f"reference image {sha[:12]} has no uploaded file")
            body_json = body_json.replace(placeholder, json.dumps(uri_by_sha[sha]))
    return body_json


def job_reference_hashes(ledger: Ledger, job_id: int) -> set[str]:
    if not sending.has_references(ledger):
        return set()  # no run in this workdir has reference images: skip the scan
    out: set[str] = set()
    for body_json in sending.bodies_with_references(ledger, job_id, REF_SCHEME):
        out.update(referenced_hashes(body_json))
    return out


def ensure_references(ledger: Ledger, backend: Backend, hashes: set[str], paths: dict[str, str]) -> dict[str, str]:
    """Upload each distinct reference image once (by content hash); re-upload when its 48 h runs short."""
    uris: dict[str, str] = {}
    now = time.time()
    for sha in sorted(hashes):
        row = sending.upload_of(ledger, sha)
        if row is not None and row["expires_at"] - now > REFERENCE_MIN_REMAINING_S:
            uris[sha] = row["uri"]
            continue
        path = paths.get(sha)
        if path is None:
            raise ApiError(f"reference image {sha[:12]} is needed but its file is unknown; run submit with the manifest again")
        from ..planning.requests import image_mime_type

        mime = image_mime_type(path)
        uploaded = backend.upload_image(Path(path), mime, display_name=f"batcher-ref-{sha[:16]}")
        expires = uploaded.expires_at or now + 48 * 3600
        sending.record_upload(ledger, sha, uploaded.name, uploaded.uri, mime, expires)
        uris[sha] = uploaded.uri
    return uris


def upload_job(ledger: Ledger, backend: Backend, job_id: int, ref_paths: dict[str, str], on_bytes=None) -> None:
    """planned|uploading -> uploaded: write the JSONL, upload it, record the file."""
    job = ledger.job(job_id)
    with ledger.transaction() as c:
        ledger.job_transition(c, job_id, (J_PLANNED, J_UPLOADING), J_UPLOADING)
    uris = ensure_references(ledger, backend, job_reference_hashes(ledger, job_id), ref_paths)
    path = write_jsonl(ledger, job_id, uris)
    maybe_crash("upload")  # test hook: see batcher/faults.py
    uploaded = backend.upload_jsonl(path, display_name=job["display_name"])
    maybe_crash("uploaded")
    if on_bytes:
        on_bytes(uploaded.size_bytes)
    with ledger.transaction() as c:
        ledger.job_transition(c, job_id, (J_UPLOADING,), J_UPLOADED, input_file=uploaded.name)


def create_job(ledger: Ledger, backend: Backend, job_id: int, webhook_uris: tuple[str, ...] = (),
               on_wait: Callable[[QuotaError], None] | None = None) -> bool:
    """uploaded -> creating -> submitted. Returns False when the API has no capacity now (a 429 that clears by
    waiting: `on_wait` gets it, with its retry hint): the job stays `uploaded` and is created later. Raises on other
    errors (a spend limit among them), leaving the job reconcilable. With webhook_uris the API also POSTs the job's
    end to those listeners (jobs.webhooks)."""
    job = ledger.job(job_id)
    with ledger.transaction() as c:
        ledger.job_transition(c, job_id, (J_UPLOADED,), J_CREATING)
    maybe_crash("create")  # test hook: see batcher/faults.py
    try:
        webhook = webhook_config(webhook_uris, job["display_name"], ledger.ledger_id)
        info = backend.create_batch(job["model"], job["input_file"], job["display_name"], webhook=webhook)
    except QuotaError as exc:
        log.info("no capacity for %s now (%s); will retry", job["display_name"], exc)
        with ledger.transaction() as c:
            ledger.job_transition(c, job_id, (J_CREATING,), J_UPLOADED)
        if on_wait:
            on_wait(exc)
        return False
    except TransientApiError:
        # The job may or may not exist now: find out from the API's list before anything else.
        reconcile(ledger, backend)
        return ledger.job(job_id)["state"] == J_SUBMITTED
    except NotFoundError as exc:
        if _names_model(exc, job["model"]):
            # The model is gone (shut down, or not served to this project): no upload will fix that.
            with ledger.transaction() as c:
                ledger.job_transition(c, job_id, (J_CREATING,), J_UPLOADED)
            raise ApiError(f"{exc}; {catalog.gone_hint(job['model'])}", exc.code, exc.status) from None
        # The input file is gone (expired or deleted): upload it again.
        log.warning("%s: %s; uploading its input again", job["display_name"], exc)
        with ledger.transaction() as c:
            ledger.job_transition(c, job_id, (J_CREATING,), J_PLANNED, input_file=None)
        return False
    except ApiError:
        with ledger.transaction() as c:
            ledger.job_transition(c, job_id, (J_CREATING,), J_UPLOADED)
        raise
    maybe_crash("created")
    _mark_submitted(ledger, job_id, info)
    return True


def _names_model(exc: NotFoundError, model: str) -> bool:
    """Is a 404 on create about the model (rather than the input file)? The API says "models/X is not found ..."
    or "This model models/X is no longer available ..."."""
    text = str(exc)
    return f"models/{model.removeprefix('models/')}" in text or ("model" in text.lower() and "file" not in text.lower())


def _mark_submitted(ledger: Ledger, job_id: int, info: BatchInfo) -> None:
    with ledger.transaction() as c:
        ledger.job_transition(
            c, job_id, (J_CREATING,), J_SUBMITTED, batch_name=info.name, api_state=info.state, api_created_at=info.created_at
        )


def reconcile(ledger: Ledger, backend: Backend) -> int:
    """Resolve jobs left in `creating` by a crash: found in the API's list -> submitted; absent -> uploaded.
    After a crash, also deletes our uploaded JSONL files that no job uses. Returns how many jobs were found."""
    creating = ledger.jobs((J_CREATING,))
    interrupted_uploads = ledger.jobs((J_UPLOADING,))
    found = 0
    if creating:
        by_name = {j["display_name"]: j["id"] for j in creating}
        for info in backend.list_batches():
            job_id = by_name.pop(info.display_name, None) if info.display_name else None
            if job_id is not None:
                _mark_submitted(ledger, job_id, info)
                found += 1
                log.info("found job %s (%s) created before a crash", info.display_name, info.name)
        for display_name, job_id in by_name.items():
            with ledger.transaction() as c:
                ledger.job_transition(c, job_id, (J_CREATING,), J_UPLOADED)
    if creating or interrupted_uploads:  # only a crash leaves orphans: don't list every file on every poll
        delete_orphan_files(ledger, backend)
    return found


def delete_orphan_files(ledger: Ledger, backend: Backend) -> int:
    """Files uploaded under our display names that no live job records (an upload interrupted after the
    server finished it, or a re-upload) cost storage quota: delete them."""
    prefix = f"batcher-{ledger.ledger_id}-job"
    live = sending.live_input_files(ledger)
    deleted = 0
    for f in backend.list_files():
        # Runs before any upload of this call, under the workdir lock: no upload of ours is under way.
        if (f.display_name or "").startswith(prefix) and f.name not in live:
            backend.delete_file(f.name)
            deleted += 1
    return deleted


def refresh_job(ledger: Ledger, backend: Backend, job_id: int) -> BatchInfo:
    """Read the job from the API; submitted -> succeeded|failed|expired|cancelled when it has ended."""
    job = ledger.job(job_id)
    info = backend.get_batch(job["batch_name"])
    new_state = API_TERMINAL.get(info.state)
    with ledger.transaction() as c:
        sending.record_api_state(c, job_id, info.state, json.dumps(info.stats), info.created_at, time.time())
        if new_state and job["state"] == J_SUBMITTED:
            ledger.job_transition(c, job_id, (J_SUBMITTED,), new_state, output_file=info.output_file, error=info.error)
    return info
