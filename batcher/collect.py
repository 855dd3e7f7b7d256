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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
import queue
import threading

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
IMAGE_WRITERS = 2  # threads verifying and writing images (fsync, crc32 and file writes release the GIL)
DOWNLOAD_AHEAD = 8  # 1 MB blocks received ahead of the parser at most
IMAGES_IN_FLIGHT = 8  # decoded images waiting for a writer at most: bounds memory


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
    jobs: int = 0
    errors: list[str] = field(default_factory=list)


def _get(d: dict, camel: str, snake: str):
    v = d.get(camel)
    return d.get(snake) if v is None else v


def classify(response: dict, blobs: "_Blobs | None" = None) -> Outcome:
    """Turn one GenerateContentResponse into an image, a block (final) or an error (retried).
    `blobs`: the base64 strings that `_loads_line` cut out of the results line (the response holds placeholders)."""
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
        data = inline.get("data") or ""
        data = blobs.decode(data) if blobs is not None and blobs.holds(data) else binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        return Outcome("error", reason=f"corrupt base64 image data ({exc})", finish_reason=finish)
    return Outcome("image", data=data, finish_reason=finish, prompt_tokens=prompt_tokens, output_tokens=output_tokens)


_PLACEHOLDER = "\x00batcher-b64:"
_B64_PIECE = 128 * 1024  # base64 characters decoded per call (a multiple of 4)
_BLOB_MIN = 1024  # base64 strings shorter than this are left to json.loads


class _Blobs:
    """The long "data" strings of one results line, kept as slices of the line's bytes."""

    def __init__(self, line: bytes, spans: list[tuple[int, int]]):
        self.line = line
        self.view = memoryview(line)
        self.spans = spans

    def holds(self, value) -> bool:
        return isinstance(value, str) and value.startswith(_PLACEHOLDER)

    def decode(self, placeholder: str) -> bytes:
        """Strict base64 decoding, in pieces: one call on megabytes holds the GIL for milliseconds, which would
        stall the download and image-writer threads; between pieces they get to run."""
        start, end = self.spans[int(placeholder[len(_PLACEHOLDER):])]
        if end - start <= _B64_PIECE:
            return binascii.a2b_base64(self.view[start:end], strict_mode=True)
        last = start + (end - start - 1) // _B64_PIECE * _B64_PIECE  # the last piece holds any padding
        if (end - start) % 4 or self.line.find(b"=", start, last) >= 0:
            raise binascii.Error("malformed base64 (padding inside the data, or a length not a multiple of 4)")
        a2b, view = binascii.a2b_base64, self.view
        return b"".join([a2b(view[i:min(i + _B64_PIECE, end)], strict_mode=True) for i in range(start, end, _B64_PIECE)])


def _loads_line(line: bytes) -> tuple[dict, _Blobs | None]:
    """json.loads of one results line without turning its megabytes of base64 into a str first: each long
    `"data": "..."` string value (base64 has no escapes and no quotes) is cut out and replaced by a placeholder
    that `classify` decodes straight from the line's bytes. Anything unusual is left to json.loads."""
    if len(line) < _BLOB_MIN:
        return json.loads(line), None
    pieces: list[bytes] = []
    spans: list[tuple[int, int]] = []
    n, pos, i = len(line), 0, 0
    while (k := line.find(b'"data"', i)) >= 0:
        i = q = k + 6
        while q < n and line[q] in b" \t\r\n":
            q += 1
        if q >= n or line[q] != 0x3A:  # ':' -- not a key
            continue
        q += 1
        while q < n and line[q] in b" \t\r\n":
            q += 1
        if q >= n or line[q] != 0x22:  # '"' -- not a string value
            continue
        start = q + 1
        end = line.find(b'"', start)
        if end < 0:
            break  # unterminated: json.loads reports it
        i = end + 1
        if end - start < _BLOB_MIN or line.find(b"\\", start, end) >= 0:
            continue
        pieces += (line[pos:start], b"\\u0000batcher-b64:%d" % len(spans))
        spans.append((start, end))
        pos = end
    if not spans:
        return json.loads(line), None
    pieces.append(line[pos:])
    return json.loads(b"".join(pieces)), _Blobs(line, spans)


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a stream of byte blocks into lines (each ends with b"\\n", except perhaps the last)."""
    held: list[bytes] = []
    for chunk in chunks:
        start = 0
        while (i := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:i + 1]
            if held:
                held.append(piece)
                piece = b"".join(held)
                held = []
            yield piece
            start = i + 1
        if start < len(chunk):
            held.append(chunk[start:])
    if held:
        yield b"".join(held)


def _result_lines(ledger: Ledger, backend: GeminiBackend, job, on_bytes=None) -> Iterator[bytes]:
    """The job's results file a line at a time, parsed while it downloads: the bytes are appended to the
    resumable `.part` file as they arrive (as `download_results` does), and a finished download is read back."""
    final = ledger.workdir / "results" / f"{job['display_name']}.jsonl"
    if final.exists() or not hasattr(backend, "download_chunks"):
        with open(download_results(ledger, backend, job, on_bytes=on_bytes), "rb") as f:
            yield from f
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_suffix(".jsonl.part")
    yield from _lines(_prefetch(backend.download_chunks(job["output_file"], part, on_bytes=on_bytes), DOWNLOAD_AHEAD))
    part.replace(final)


def _prefetch(blocks: Iterator[bytes], depth: int) -> Iterator[bytes]:
    """Run a block iterator (the download: socket reads and `.part` writes, which release the GIL) in its own
    thread, at most `depth` blocks ahead of the consumer, so receiving and parsing overlap."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def pump() -> None:
        try:
            for blk in blocks:
                if not offer(blk):
                    return
            offer(done)
        except BaseException as exc:  # handed to the consumer, raised there
            offer(exc)
        finally:
            blocks.close() if hasattr(blocks, "close") else None

    t = threading.Thread(target=pump, name="batcher-download", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


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
                stats: CollectStats, on_bytes=None, on_image=None, delete_remote: bool = True) -> None:
    job = ledger.job(job_id)
    if job["state"] == J_SUCCEEDED:
        if not job["output_file"]:
            stats.errors.append(f"{job['display_name']}: succeeded without a results file")
        else:
            _parse_results(ledger, store, job, _result_lines(ledger, backend, job, on_bytes=on_bytes), max_attempts, stats, on_image)
    finish_job(ledger, backend, job_id, max_attempts, stats, delete_remote=delete_remote)


def finish_job(ledger: Ledger, backend: GeminiBackend, job_id: int, max_attempts: int, stats: CollectStats,
               delete_remote: bool = True) -> None:
    """The job's outcomes are recorded: requeue what did not come back, mark it collected, free its files."""
    job = ledger.job(job_id)
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
    for name in (job["input_file"], job["output_file"]) if delete_remote else ():
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


def record_outcomes(ledger: Ledger, model: str, items: list[tuple], max_attempts: int, stats: CollectStats) -> None:
    """Record (kind, hash, attempts, Outcome) items in one transaction: images and blocks are final, errors
    are retried while attempts remain. Only requests still queued change (a request done elsewhere stays)."""
    now = time.time()
    with ledger.transaction() as c:
        for kind, h, attempts, o in items:
            if kind in ("image", "blocked"):
                cost = cost_usd(model, o.prompt_tokens, o.output_tokens)
                state, error = (SUCCEEDED, None) if kind == "image" else (BLOCKED, o.reason)
                cur = c.execute(
                    "UPDATE requests SET state=?, attempts=?, error=?, finish_reason=?, prompt_tokens=?, output_tokens=?, cost_usd=?, updated_at=? WHERE hash=? AND state=?",
                    (state, attempts + 1, error, o.finish_reason, o.prompt_tokens, o.output_tokens, cost, now, h, QUEUED))
                if kind == "image":
                    stats.succeeded += cur.rowcount
                else:
                    stats.blocked += cur.rowcount
            else:
                _fail(c, ledger, h, attempts, max_attempts, o.reason, o.finish_reason, now, stats)


def _parse_results(ledger: Ledger, store: ImageStore, job, path: Path | Iterable[bytes], max_attempts: int, stats: CollectStats,
                   on_image) -> None:
    """Parse a results file (a path, or its lines as they download). Images are verified and written to the cache
    by writer threads while the next lines are parsed; a batch of lines is committed to the ledger only once
    every image of the batch is durable in the cache."""
    job_id, model = job["id"], job["model"]
    pending: list[tuple] = []
    writers = ThreadPoolExecutor(max_workers=IMAGE_WRITERS, thread_name_prefix="batcher-image")
    slots = threading.BoundedSemaphore(IMAGES_IN_FLIGHT)

    def write_image(key: str, o: Outcome) -> None:
        try:
            store.put(key, o.data, {"model": model, "prompt_tokens": o.prompt_tokens,
                                    "output_tokens": o.output_tokens, "finish_reason": o.finish_reason})
        finally:
            o.data = None  # written (or rejected): don't hold megabytes until the batch is committed
            slots.release()

    def flush():
        # First every image of the batch must be durable (or rejected), then the ledger is told.
        for i, (kind, h, attempts, o) in enumerate(pending):
            if isinstance(o, Future):
                o, fut = o.image, o
                try:
                    fut.result()
                    maybe_crash("image")  # image durable in the cache, ledger not yet told
                except InvalidImage as exc:
                    o = Outcome("error", reason=f"returned image is invalid: {exc}")
                    kind = "error"
                if on_image:
                    on_image(1)
                pending[i] = (kind, h, attempts, o)
        record_outcomes(ledger, model, pending, max_attempts, stats)
        pending.clear()

    expected = {h: a for h, a in ledger.conn.execute(
        "SELECT r.hash, r.attempts FROM job_requests jr JOIN requests r ON r.hash=jr.hash WHERE jr.job_id=? AND r.state=? AND r.job_id=?",
        (job_id, QUEUED, job_id))}
    sent = {h for (h,) in ledger.conn.execute("SELECT hash FROM job_requests WHERE job_id=?", (job_id,))}
    f = open(path, "rb") if isinstance(path, (str, Path)) else None
    try:
        for lineno, line in enumerate(f if f is not None else path, 1):
            if line[:1] in (b"", b" ", b"\t", b"\r", b"\n") and not line.strip():
                continue
            try:
                obj, blobs = _loads_line(line)
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
                o = classify(obj["response"], blobs)
                if o.kind == "image":
                    slots.acquire()
                    fut = writers.submit(write_image, key, o)
                    fut.image = o
                    o = fut
            del obj, blobs, line
            pending.append(("image" if isinstance(o, Future) else o.kind, key, attempts, o))
            maybe_crash("decode")  # test hook: see batcher/faults.py
            if len(pending) >= COMMIT_EVERY:
                flush()
        flush()
    finally:
        writers.shutdown(wait=True)  # never leave an image half-written behind a returning caller
        if f is not None:
            f.close()
