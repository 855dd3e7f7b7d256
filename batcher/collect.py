"""Collecting a finished job: download its results (streamed, resumable), parse a line at a time, map each
line to its request by key, decode and verify the image, write it into the cache, then mark the request.

The image is durable in the cache before the ledger says `succeeded`; a crash between the two means the
line is parsed again on the next collect (the cache write is idempotent), never "done but missing".
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backend import GeminiBackend
from .ledger import BLOCKED, FAILED, J_CANCELLED, J_COLLECTED, J_EXPIRED, J_FAILED, J_SUCCEEDED, PLANNED, QUEUED, SUCCEEDED, Ledger
from .faults import maybe_crash
from .pricing import cost_usd
from .store import ImageStore, InvalidImage

log = logging.getLogger("batcher.collect")

BLOCK_FINISH_REASONS = {
    "SAFETY", "PROHIBITED_CONTENT", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST", "SPII",
    "RECITATION", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE", "OTHER",
}
COMMIT_EVERY = 64  # lines per ledger transaction


@dataclass
class Outcome:
    kind: str  # "image" | "blocked" | "error"
    data: bytes | None = None
    reason: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0


@dataclass
class CollectStats:
    succeeded: int = 0
    blocked: int = 0
    failed: int = 0  # failed for good (attempts exhausted)
    requeued: int = 0
    unexpected_keys: int = 0
    already_done: int = 0
    bytes_downloaded: int = 0
    jobs: int = 0
    errors: list[str] = field(default_factory=list)


def _get(d: dict, camel: str, snake: str):
    v = d.get(camel)
    return d.get(snake) if v is None else v


def classify(response: dict) -> Outcome:
    """Turn one GenerateContentResponse into an image, a block (final) or an error (retried)."""
    usage = _get(response, "usageMetadata", "usage_metadata") or {}
    prompt_tokens = int(_get(usage, "promptTokenCount", "prompt_token_count") or 0)
    output_tokens = int(_get(usage, "candidatesTokenCount", "candidates_token_count") or 0)
    feedback = _get(response, "promptFeedback", "prompt_feedback") or {}
    block = _get(feedback, "blockReason", "block_reason")
    candidates = response.get("candidates") or []
    if block or not candidates:
        return Outcome("blocked", reason=f"prompt blocked: {block or 'no candidates'}", finish_reason=block or "NO_CANDIDATES",
                       prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    cand = candidates[0]
    finish = _get(cand, "finishReason", "finish_reason")
    parts = ((cand.get("content") or {}).get("parts")) or []
    images = [p for p in parts if (_get(p, "inlineData", "inline_data") or {}) and not p.get("thought")]
    images = [p for p in images if str(_get(_get(p, "inlineData", "inline_data"), "mimeType", "mime_type") or "").startswith("image/")]
    if not images:
        if finish in BLOCK_FINISH_REASONS:
            reason = f"no image: finish reason {finish}"
        else:
            reason = "no image: the model replied with text only"
            finish = finish if finish and finish != "STOP" else "NO_IMAGE"
        return Outcome("blocked", reason=reason, finish_reason=finish, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    inline = _get(images[-1], "inlineData", "inline_data")  # the last image is the final one (earlier ones may be drafts)
    if isinstance(inline.get("data"), bytes):  # an interactive response, decoded by the SDK already
        return Outcome("image", data=inline["data"], finish_reason=finish, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    try:
        data = binascii.a2b_base64(inline.get("data") or "", strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        return Outcome("error", reason=f"corrupt base64 image data ({exc})", finish_reason=finish)
    return Outcome("image", data=data, finish_reason=finish, prompt_tokens=prompt_tokens, output_tokens=output_tokens)


def download_results(ledger: Ledger, backend: GeminiBackend, job, on_bytes=None) -> Path:
    """Stream the job's results file to the workdir; a partial `.part` from a crash is resumed."""
    final = ledger.workdir / "results" / f"{job['display_name']}.jsonl"
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_suffix(".jsonl.part")
    backend.download(job["output_file"], part, on_bytes=on_bytes)
    part.replace(final)
    return final


def collect_job(ledger: Ledger, backend: GeminiBackend, store: ImageStore, job_id: int, max_attempts: int,
                stats: CollectStats, on_bytes=None, on_image=None) -> None:
    job = ledger.job(job_id)
    if job["state"] == J_SUCCEEDED:
        if not job["output_file"]:
            stats.errors.append(f"{job['display_name']}: succeeded without a results file")
        else:
            path = download_results(ledger, backend, job, on_bytes=on_bytes)
            _parse_results(ledger, store, job, path, max_attempts, stats, on_image)
    # Whatever did not come back (expired, failed, cancelled jobs; keys missing from results) is retried.
    reason = {J_SUCCEEDED: "missing from the job's results", J_FAILED: "job failed", J_EXPIRED: "job expired (48 h)",
              J_CANCELLED: "job cancelled"}.get(job["state"], "job ended")
    if job["error"]:
        reason += f": {job['error']}"
    now = time.time()
    with ledger.transaction() as c:
        leftover = c.execute("SELECT hash, attempts FROM requests WHERE job_id=? AND state=?", (job_id, QUEUED)).fetchall()
        for h, attempts in leftover:
            _fail(c, ledger, h, attempts, max_attempts, reason, None, now, stats)
        ledger.job_transition(c, job_id, (J_SUCCEEDED, J_FAILED, J_EXPIRED, J_CANCELLED), J_COLLECTED)
    stats.jobs += 1
    # The job's files cost storage quota (20 GB per project): delete them once collected.
    for name in (job["input_file"], job["output_file"]):
        if name:
            try:
                backend.delete_file(name)
            except Exception as exc:  # best effort: they expire after 48 h anyway
                log.warning("could not delete %s: %s", name, exc)
    results = ledger.workdir / "results" / f"{job['display_name']}.jsonl"
    results.unlink(missing_ok=True)


def _fail(c, ledger: Ledger, h: str, attempts: int, max_attempts: int, reason: str, finish: str | None, now: float, stats: CollectStats) -> None:
    attempts += 1
    if attempts < max_attempts:
        c.execute("UPDATE requests SET state=?, attempts=?, error=?, finish_reason=?, job_id=NULL, updated_at=? WHERE hash=? AND state=?",
                  (PLANNED, attempts, reason, finish, now, h, QUEUED))
        stats.requeued += 1
    else:
        c.execute("UPDATE requests SET state=?, attempts=?, error=?, finish_reason=?, updated_at=? WHERE hash=? AND state=?",
                  (FAILED, attempts, f"{reason} (after {attempts} attempts)", finish, now, h, QUEUED))
        stats.failed += 1


def _parse_results(ledger: Ledger, store: ImageStore, job, path: Path, max_attempts: int, stats: CollectStats, on_image) -> None:
    job_id, model = job["id"], job["model"]
    pending: list[tuple] = []

    def flush():
        now = time.time()
        with ledger.transaction() as c:
            for kind, h, attempts, o in pending:
                if kind == "image":
                    cost = cost_usd(model, o.prompt_tokens, o.output_tokens)
                    cur = c.execute(
                        "UPDATE requests SET state=?, attempts=?, error=NULL, finish_reason=?, prompt_tokens=?, output_tokens=?, cost_usd=?, updated_at=? WHERE hash=? AND state=?",
                        (SUCCEEDED, attempts + 1, o.finish_reason, o.prompt_tokens, o.output_tokens, cost, now, h, QUEUED))
                    stats.succeeded += cur.rowcount
                elif kind == "blocked":
                    cost = cost_usd(model, o.prompt_tokens, o.output_tokens)
                    cur = c.execute(
                        "UPDATE requests SET state=?, attempts=?, error=?, finish_reason=?, prompt_tokens=?, output_tokens=?, cost_usd=?, updated_at=? WHERE hash=? AND state=?",
                        (BLOCKED, attempts + 1, o.reason, o.finish_reason, o.prompt_tokens, o.output_tokens, cost, now, h, QUEUED))
                    stats.blocked += cur.rowcount
                else:
                    _fail(c, ledger, h, attempts, max_attempts, o.reason, o.finish_reason, now, stats)
        pending.clear()

    expected = {h: a for h, a in ledger.conn.execute(
        "SELECT r.hash, r.attempts FROM job_requests jr JOIN requests r ON r.hash=jr.hash WHERE jr.job_id=? AND r.state=? AND r.job_id=?",
        (job_id, QUEUED, job_id))}
    sent = {h for (h,) in ledger.conn.execute("SELECT hash FROM job_requests WHERE job_id=?", (job_id,))}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                key = obj.get("key")
            except (ValueError, AttributeError):
                stats.errors.append(f"{job['display_name']} results line {lineno}: not valid JSON; skipped")
                continue
            if key not in expected and key in sent:
                stats.already_done += 1  # finished another way meanwhile (interactive fallback): the cache wins
                continue
            if key not in expected:
                stats.unexpected_keys += 1
                stats.errors.append(f"{job['display_name']} results line {lineno}: key {str(key)[:80]!r} was not sent in this job; ignored")
                continue
            attempts = expected.pop(key)
            if obj.get("error") is not None or obj.get("response") is None:
                err = obj.get("error") or {}
                o = Outcome("error", reason=f"API error {err.get('code', '')} {err.get('status', '')}: {err.get('message', 'no response')}".strip())
            else:
                o = classify(obj["response"])
                if o.kind == "image":
                    try:
                        store.put(key, o.data, {"model": model, "prompt_tokens": o.prompt_tokens,
                                                "output_tokens": o.output_tokens, "finish_reason": o.finish_reason})
                        maybe_crash("image")  # image durable in the cache, ledger not yet told
                    except InvalidImage as exc:
                        o = Outcome("error", reason=f"returned image is invalid: {exc}")
                    if on_image:
                        on_image(1)
            pending.append((o.kind, key, attempts, o))
            maybe_crash("decode")  # test hook: see batcher/faults.py
            if len(pending) >= COMMIT_EVERY:
                flush()
    flush()
