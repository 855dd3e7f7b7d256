"""Collecting a finished job: download its results (streamed, resumable), parse a line at a time, map each
line to its request by key, decode and verify the image, write it into the cache, then mark the request.

The image is durable in the cache before the ledger says `succeeded`; a crash between the two means the
line is parsed again on the next collect (the cache write is idempotent), never "done but missing".
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
import queue
import threading

from ..backends.base import Backend
from ..ledger import (
    BLOCKED, J_CANCELLED, J_COLLECTED, J_EXPIRED, J_FAILED, J_SUCCEEDED, PLANNED, QUEUED, SUCCEEDED, Ledger, outcomes, sending,
)
from ..faults import maybe_crash
from ..cost.pricing import cost_usd
from .decoder import DecoderPool, default_processes
from ..errors import CollectError
from .lines import Outcome, image_meta, read_line
from ..storage.store import ImageStore, InvalidImage

log = logging.getLogger("batcher.results.collect")

COMMIT_EVERY = 64  # lines per ledger transaction
IMAGE_WRITERS = 2  # threads verifying and writing images (fsync, crc32 and file writes release the GIL)
DOWNLOAD_AHEAD = 8  # 1 MB blocks received ahead of the parser at most
IMAGES_IN_FLIGHT = 8  # decoded images waiting for a writer at most: bounds memory


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
    ended: list[tuple[str, str, int]] = field(default_factory=list)  # jobs that did not succeed: (name, state, requeued)


def _spans(blocks: Iterable[bytes]) -> Iterator[tuple[int, int]]:
    """Offsets [start, end) of the lines in a stream of byte blocks (each ends with b"\\n", except perhaps the last)."""
    pos = start = 0
    for blk in blocks:
        i = blk.find(b"\n")
        while i >= 0:
            yield start, pos + i + 1
            start = pos + i + 1
            i = blk.find(b"\n", i + 1)
        pos += len(blk)
    if start < pos:
        yield start, pos


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


def _read_blocks(path: Path, block: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while blk := f.read(block):
            yield blk


def _result_source(ledger: Ledger, backend: Backend, job, on_bytes=None) -> tuple[Path, Iterator[bytes]]:
    """The file the job's results are read from, and its bytes in order. A finished download is read back;
    otherwise the results are parsed while they download: the bytes are appended to the resumable `.part`
    file as they arrive (as `download_results` does). Once they are all in, `_downloaded` names it final."""
    final = ledger.workdir / "results" / f"{job['display_name']}.jsonl"
    if final.exists() or not backend.streams_results:
        path = download_results(ledger, backend, job, on_bytes=on_bytes)
        return path, _read_blocks(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_suffix(".jsonl.part")
    open(part, "ab").close()  # there from the start: decoder processes open it as their first line arrives
    return part, backend.download_chunks(job["output_file"], part, on_bytes=on_bytes)


def _downloaded(path: Path) -> None:
    """Every byte of the results file is in `path`: a `.part` becomes the final file (read back, not downloaded
    again, if this collect does not get to finish)."""
    if path.name.endswith(".jsonl.part"):
        path.replace(path.with_suffix(""))


def _result_lines(ledger: Ledger, backend: Backend, job, on_bytes=None) -> Iterator[bytes]:
    """The job's results file a line at a time, received in a thread of its own while the lines are parsed."""
    path, blocks = _result_source(ledger, backend, job, on_bytes=on_bytes)
    yield from _lines(_prefetch(blocks, DOWNLOAD_AHEAD))
    _downloaded(path)


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


def download_results(ledger: Ledger, backend: Backend, job, on_bytes=None) -> Path:
    """Stream the job's results file to the workdir; a partial `.part` from a crash is resumed."""
    final = ledger.workdir / "results" / f"{job['display_name']}.jsonl"
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_suffix(".jsonl.part")
    backend.download(job["output_file"], part, on_bytes=on_bytes)
    part.replace(final)
    return final


class Decoders:
    """The decoder processes of one collect, started for its first job and kept for the next ones (each start
    costs ~0.1 s: 100 small jobs paid 10 s for it). Use as a context manager: closed at its end, or after a job
    whose parsing failed (the next job gets new ones)."""

    def __init__(self):
        self.pool: DecoderPool | None = None

    def get(self, processes: int) -> DecoderPool:
        if self.pool is None:
            self.pool = DecoderPool(processes)
        return self.pool

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
            log.info("%d decoder processes, peak RSS %s MB", len(pool.procs),
                     " + ".join(f"{kb / 1024:.1f}" for kb in pool.peak_rss_kb))

    def __enter__(self) -> "Decoders":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def collect_job(ledger: Ledger, backend: Backend, store: ImageStore, job_id: int, max_attempts: int,
                stats: CollectStats, on_bytes=None, on_image=None, delete_remote: bool = True,
                processes: int | None = None, decoders: Decoders | None = None) -> None:
    """Collect a finished job into the cache and the ledger. `processes`: decoder processes (default: one per CPU,
    results.decoder.default_processes; 0: decode in this process); `decoders`: the collect's decoder processes,
    kept from job to job (made for this job alone without)."""
    job = ledger.job(job_id)
    if job["state"] == J_SUCCEEDED:
        if not job["output_file"]:
            stats.errors.append(f"{job['display_name']}: succeeded without a results file")
        else:
            processes = default_processes() if processes is None else processes
            if processes and isinstance(store, ImageStore):
                if decoders is None:
                    with Decoders() as own:
                        _parse_in_decoders(ledger, backend, store, job, own.get(processes), max_attempts, stats, on_bytes, on_image)
                else:
                    try:
                        _parse_in_decoders(ledger, backend, store, job, decoders.get(processes), max_attempts, stats,
                                           on_bytes, on_image)
                    except BaseException:
                        decoders.close()  # a decoder may be dead or in the middle of a line: the next job gets new ones
                        raise
            else:  # a gs:// cache (written through this process's GCS client), or BATCHER_COLLECT_PROCESSES=0
                _parse_results(ledger, store, job, _result_lines(ledger, backend, job, on_bytes=on_bytes), max_attempts, stats, on_image)
    finish_job(ledger, backend, job_id, max_attempts, stats, delete_remote=delete_remote)


def finish_job(ledger: Ledger, backend: Backend, job_id: int, max_attempts: int, stats: CollectStats,
               delete_remote: bool = True, outcomes_first: list[tuple] | None = None) -> None:
    """The job's outcomes are recorded: requeue what did not come back, mark it collected, free its files.
    `outcomes_first`: (kind, hash, attempts, Outcome) items recorded in the same transaction (a collector's
    outcomes, results.detached), so the job is never left half imported."""
    job = ledger.job(job_id)
    # Whatever did not come back (expired, failed, cancelled jobs; keys missing from results) is retried.
    reason = {J_SUCCEEDED: "missing from the job's results", J_FAILED: "job failed", J_EXPIRED: "job expired (48 h)",
              J_CANCELLED: "job cancelled"}.get(job["state"], "job ended")
    if job["error"]:
        reason += f": {job['error']}"
    now = time.time()
    requeued_before = stats.requeued
    with ledger.transaction() as c:
        if outcomes_first:
            _record(c, job["model"], outcomes_first, max_attempts, stats, now)
        for h, attempts in outcomes.queued_in_job(c, job_id):
            _fail(c, h, attempts, max_attempts, reason, None, now, stats)
        ledger.job_transition(c, job_id, (J_SUCCEEDED, J_FAILED, J_EXPIRED, J_CANCELLED), J_COLLECTED)
    stats.jobs += 1
    if job["state"] != J_SUCCEEDED:
        stats.ended.append((job["display_name"], job["state"], stats.requeued - requeued_before))
    # The job's files cost storage quota (20 GB per project): delete them once collected.
    for name in (job["input_file"], job["output_file"]) if delete_remote else ():
        if name:
            try:
                backend.delete_file(name)
            except Exception as exc:  # best effort: they expire after 48 h anyway
                log.warning("could not delete %s: %s", name, exc)
    results = ledger.workdir / "results" / f"{job['display_name']}.jsonl"
    results.unlink(missing_ok=True)
    results.with_suffix(".jsonl.part").unlink(missing_ok=True)  # a download left half-way (then collected elsewhere)


def _fail(c, h: str, attempts: int, max_attempts: int, reason: str, finish: str | None, now: float, stats: CollectStats) -> None:
    if outcomes.requeue_or_fail(c, h, attempts, max_attempts, reason, finish, now) == PLANNED:
        stats.requeued += 1
    else:
        stats.failed += 1


def record_outcomes(ledger: Ledger, model: str, items: list[tuple], max_attempts: int, stats: CollectStats) -> None:
    """Record (kind, hash, attempts, Outcome) items in one transaction: images and blocks are final, errors
    are retried while attempts remain. Only requests still queued change (a request done elsewhere stays)."""
    with ledger.transaction() as c:
        _record(c, model, items, max_attempts, stats, time.time())


def _record(c, model: str, items: list[tuple], max_attempts: int, stats: CollectStats, now: float) -> None:
    for kind, h, attempts, o in items:
        if kind in ("image", "blocked"):
            cost = cost_usd(model, *o.usage)
            state, error = (SUCCEEDED, None) if kind == "image" else (BLOCKED, o.reason)
            changed = outcomes.record_result(c, h, state, attempts + 1, error, o.finish_reason, o.usage, cost, now, QUEUED)
            if kind == "image":
                stats.succeeded += changed
            else:
                stats.blocked += changed
        else:
            _fail(c, h, attempts, max_attempts, o.reason, o.finish_reason, now, stats)


class _Recorder:
    """The ledger side of parsing one job's results: the keys the job still waits for, and their outcomes,
    committed COMMIT_EVERY lines at a time, each batch only once every image in it is durable in the cache."""

    def __init__(self, ledger: Ledger, job, max_attempts: int, stats: CollectStats, on_image):
        self.ledger, self.job, self.max_attempts, self.stats, self.on_image = ledger, job, max_attempts, stats, on_image
        self.expected = outcomes.waiting_in_job(ledger, job["id"])
        self.sent = set(sending.job_hashes(ledger, job["id"]))
        self.pending: list[tuple] = []

    def line(self, lineno: int, status: str, key, o: "Outcome | Future | None") -> None:
        """One line's result (see results.read_line); `o` is an Outcome, or a Future of an image being written."""
        name = self.job["display_name"]
        if status == "blank":
            return
        if status == "bad-json":
            self.stats.errors.append(f"{name} results line {lineno}: not valid JSON; skipped")
            return
        if not (isinstance(key, str) and key in self.expected):
            if isinstance(key, str) and key in self.sent:
                self.stats.already_done += 1  # finished another way meanwhile (interactive fallback): the cache wins
            else:
                self.stats.unexpected_keys += 1
                self.stats.errors.append(f"{name} results line {lineno}: key {str(key)[:80]!r} was not sent in this job; ignored")
            return
        attempts = self.expected.pop(key)
        self.pending.append(("image" if isinstance(o, Future) else o.kind, key, attempts, o))
        maybe_crash("decode")  # test hook: see batcher/faults.py
        if len(self.pending) >= COMMIT_EVERY:
            self.flush()

    def image_written(self) -> None:
        """An image of a pending line is durable in the cache (or was rejected); the ledger is not told yet."""
        maybe_crash("image")  # test hook: image durable in the cache, ledger not yet told
        if self.on_image:
            self.on_image(1)

    def flush(self) -> None:
        # First every image of the batch must be durable (or rejected), then the ledger is told.
        for i, (kind, h, attempts, o) in enumerate(self.pending):
            if isinstance(o, Future):
                o, fut = o.image, o
                try:
                    fut.result()
                except InvalidImage as exc:
                    o = Outcome("error", reason=f"returned image is invalid: {exc}")
                    kind = "error"
                self.image_written()
                self.pending[i] = (kind, h, attempts, o)
        record_outcomes(self.ledger, self.job["model"], self.pending, self.max_attempts, self.stats)
        self.pending.clear()


def _parse_in_decoders(ledger: Ledger, backend: Backend, store: ImageStore, job, pool: DecoderPool, max_attempts: int,
                       stats: CollectStats, on_bytes, on_image) -> None:
    """Parse the results in decoder processes (results.decoder) while they download: a thread here receives the
    file into the workdir and hands each line's offsets to the least busy decoder, which reads the line from
    the file, decodes and verifies the image, writes it into the cache and only then replies."""
    rec = _Recorder(ledger, job, max_attempts, stats, on_image)
    path, blocks = _result_source(ledger, backend, job, on_bytes=on_bytes)
    warm = threading.Thread(target=_warm_up, args=(backend,), name="batcher-warm-up", daemon=True)
    warm.start()
    try:
        pool.start_job(str(path), str(store.root), job["model"], rec.expected)
        for msg in pool.run(_spans(blocks)):
            lineno, status = msg[0], msg[1]
            if status == "fatal":
                _, _, errno, strerror, filename, text = msg
                if errno is not None:
                    raise OSError(errno, strerror, filename)
                raise CollectError(f"{job['display_name']} results line {lineno}: {text}")
            if status != "outcome":
                rec.line(lineno, status, msg[2] if status == "unwanted" else None, None)
                continue
            _, _, key, kind, reason, finish, usage, was_image = msg
            if was_image:
                rec.image_written()
            rec.line(lineno, status, key, Outcome(kind, None, reason, finish, *usage))
        rec.flush()
    finally:
        warm.join()
    _downloaded(path)  # after the decoders: every line's reply is in, so none reads the file by this name any more


WARM_UP_SWITCH_S = 0.0002  # the GIL switch interval while warming up (Python's default: 5 ms)


def _warm_up(backend) -> None:
    """What the end of a collect needs, made while the decoders work: the SDK client that deletes the job's
    files (Backend.warm_up), and pyarrow's first array for the dataset (pyarrow imports pandas then, when it is installed
    and the caller is not the `batcher` program, which says there is none: cli.entry_point).
    Imports hold the GIL; the download thread needs it after every socket read, so meanwhile the interpreter
    hands it over every 0.2 ms instead of every 5 ms, or the download (and the decoders behind it) would stall."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, WARM_UP_SWITCH_S))
    try:
        backend.warm_up()
        import pyarrow as pa

        pa.array([None], type=pa.string())
    except Exception as exc:  # only a head start: the real use reports any problem
        log.debug("warm-up: %s", exc)
    finally:
        sys.setswitchinterval(previous)


def _parse_results(ledger: Ledger, store: ImageStore, job, path: Path | Iterable[bytes], max_attempts: int, stats: CollectStats,
                   on_image) -> None:
    """Parse a results file (a path, or its lines as they download) in this process. Images are verified and
    written to the cache by writer threads while the next lines are parsed."""
    model = job["model"]
    rec = _Recorder(ledger, job, max_attempts, stats, on_image)
    writers = ThreadPoolExecutor(max_workers=IMAGE_WRITERS, thread_name_prefix="batcher-image")
    slots = threading.BoundedSemaphore(IMAGES_IN_FLIGHT)

    def write_image(key: str, o: Outcome) -> None:
        try:
            store.put(key, o.data, image_meta(model, o))
        finally:
            o.data = None  # written (or rejected): don't hold megabytes until the batch is committed
            slots.release()

    f = open(path, "rb") if isinstance(path, (str, Path)) else None
    try:
        for lineno, line in enumerate(f if f is not None else path, 1):
            status, key, o = read_line(line, rec.expected.__contains__)
            del line
            if o is not None and o.kind == "image":
                slots.acquire()
                fut = writers.submit(write_image, key, o)
                fut.image = o  # type: ignore[attr-defined]
                o = fut
            rec.line(lineno, status, key, o)
            del o
        rec.flush()
    finally:
        writers.shutdown(wait=True)  # never leave an image half-written behind a returning caller
        if f is not None:
            f.close()
