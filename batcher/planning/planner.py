"""Planning: manifest rows -> request hashes in the ledger (validated, deduped, cache-checked), then
uncached requests -> shards (jobs) bounded by requests, input bytes and expected output bytes.

Validation happens here, before anything is uploaded: the whole manifest is streamed into the ledger in
one transaction, and on any problem the transaction is rolled back, so an invalid manifest leaves nothing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pyarrow as pa

from .. import catalog
from ..storage import atomic, gcs
from ..errors import ManifestError
from ..faults import maybe_crash
from ..ledger import SUCCEEDED, Ledger, plans, reading, sending
from ..ledger.plans import PlanTuning, PlanWriter
from .packing import JobFiller, ShardLimits, measure, measure_body
from ..manifest import ManifestOptions, RowProblem, carried_schema, locate, manifest_fingerprint
from .requests import canonical_json, identity_hash
from ..storage.store import ImageStore, StoreLookup

if TYPE_CHECKING:
    from .prepare import PreparedBatch, PrepareTuning, References

MAX_PROBLEMS_SHOWN = 20
LOST_IMAGES_PAGE = 20_000  # the run's rows checked against the cache at a time
log = logging.getLogger(__name__)


@dataclass
class PlanResult:
    run_id: int
    rows: int = 0
    requests: int = 0  # distinct requests of the run
    cache_hits: int = 0
    duplicates: int = 0  # images (rows x variants) sharing another's request
    rejected: int = 0  # manifest rows left out as invalid (--skip-invalid)
    rejects_path: str | None = None  # where they were written
    images_before: int = 0  # requests whose image was there before the run: cache hits, or an earlier run's
    new_run: bool = True
    jobs: list[int] = field(default_factory=list)  # jobs the plan sharded as it loaded (see _InlineJobs)
    states: dict[str, int] | None = None  # how many of its requests are in each state, when the plan knows
    # How this command's plan looked up the requests the ledger held: "fresh" (it held none), "memory" (read whole
    # once: the fast path), "sql" (a batch at a time: more than PlanTuning.known_max_requests; slower); None: no plan.
    ledger_lookup: str | None = None

    @property
    def images(self) -> int:
        """The run's images: its rows x their variants, one dataset row each."""
        return self.requests + self.duplicates


def manifest_identity(manifest: Path | str) -> str:
    """Where a manifest is, as a run records it: a gs:// URI, or the local file's real path (the same file however
    it is named). A workdir and its dataset hold the runs of one manifest identity (see pipeline.plan)."""
    return str(manifest) if gcs.is_gcs(manifest) else os.path.realpath(manifest)


def run_fingerprint(manifest: Path | str, options: ManifestOptions) -> str:
    return hashlib.sha256(canonical_json(manifest_fingerprint(str(manifest), options)).encode()).hexdigest()


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Loading makes millions of short-lived tuples and no reference cycles: the cyclic GC would only rescan them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _merge_problems(b: PreparedBatch, problems: list[RowProblem]) -> list[int]:
    """Append the batch's problems to `problems` in manifest order. Returns, per valid row of the batch, how many
    problems come before it: where a problem found later about that row (a duplicate id) belongs."""
    if not b.problems:
        return [len(problems)] * len(b.rows)
    positions = []
    k = 0
    for j in range(len(b.rows)):
        while k < len(b.problems) and b.problems[k][0] <= j:
            problems.append(b.problems[k][1])
            k += 1
        positions.append(len(problems))
    problems.extend(problem for _, problem in b.problems[k:])
    return positions


def duplicate_id(manifest, row: int, id_column: str, value: str, first_row: int | None) -> RowProblem:
    """The problem of a row whose id an earlier valid row of the manifest has (planning and estimate say it alike)."""
    first = first_row if first_row is not None else "?"
    return RowProblem(str(manifest), row, id_column, value, f"duplicate id (first used at row {first}); ids must be unique")


def _load(writer: PlanWriter, run_id: int, manifest: Path | str, options: ManifestOptions, refs: References,
          problems: list[RowProblem], tuning: PlanTuning, prepare_tuning: PrepareTuning) -> tuple[int, int]:
    """Record the manifest's valid rows and their requests; append its problems. Returns (rows written, one per
    variant; manifest rows)."""
    from .prepare import batches  # here: see plan_manifest

    seq = rows = 0
    # A large manifest is read, validated and hashed by a child process on another core, while this one writes.
    # A plain local cache is looked up where the rows are prepared (with them, in the child process).
    cache_root = writer.lookup.root if writer.lookup is not None and not writer.refresh else None
    source = batches(manifest, options, refs, tuning.plan_batch_rows, cache_root, measure=writer.inline is not None,
                     tuning=prepare_tuning)
    with contextlib.closing(source), _cyclic_gc_paused():
        writer.start()  # while a child (if any) starts and reads its first rows
        for b in source:
            positions = _merge_problems(b, problems)
            writer.add_references(b.references, b.variants)

            def duplicate(j: int, first_row: int | None, b=b) -> RowProblem:
                return duplicate_id(manifest, b.rows[j], options.id_column, b.ids[j], first_row)

            seq, duplicates = writer.flush(run_id, seq, b, positions, problems, duplicate)
            rows += len(b.rows) - duplicates
    return seq, rows


def plan_manifest(
    ledger: Ledger,
    store: ImageStore | None,
    manifest: Path,
    options: ManifestOptions,
    *,
    refresh: bool = False,
    skip_invalid: bool = False,
    rejects_path: Path | None = None,
    retry_blocked: bool = False,
    shard_limits: ShardLimits | None = None,
    token_cap_for: Callable[[str], int | None] = lambda model: None,
    tuning: PlanTuning = PlanTuning(),
    prepare_tuning: PrepareTuning | None = None,
) -> PlanResult:
    """Validate the manifest and record its rows and requests. Idempotent for an unchanged manifest.
    With `shard_limits`, a plan into an empty ledger also shards its new requests into jobs as it loads them,
    exactly as `shard` would (same limits and token caps; no budget); they are in PlanResult.jobs."""
    # Here, not at the top: collect loads this module (run_result, plan_fallbacks) and reads no manifest; the row
    # preparer and the readers load pyarrow.compute.
    from ..manifest import read_manifest
    from .prepare import PrepareTuning, References

    prepare_tuning = prepare_tuning or PrepareTuning()
    manifest = locate(manifest)
    fingerprint = run_fingerprint(manifest, options)
    existing = ledger.run_by_fingerprint(fingerprint)
    if existing is not None and retry_blocked:
        plans.replan_blocked(ledger, existing, time.time())
    if existing is not None and not refresh:
        if store is not None:
            replan_lost_images(ledger, store, existing["id"])
        return _summary(ledger, existing["id"], new_run=False)

    problems: list[RowProblem] = []
    refs = References()
    now = time.time()
    result = PlanResult(run_id=0)
    try:
        schema = carried_schema(str(manifest), options)
    except (OSError, pa.ArrowException, ValueError):
        read_manifest(manifest, options)  # a file the reader rejects: raise its ManifestError (file, problem)
        raise
    bulk = existing is None and ledger.is_empty()  # nothing else writes: the workdir is locked
    # A bulk load appends; a plan into a ledger that holds requests takes the big page cache when it needs it
    # (PlanWriter.big_page_cache), until after its commit.
    with contextlib.ExitStack() as page_cache, \
            (ledger.journal_for_new_pages() if bulk else contextlib.nullcontext()), ledger.transaction() as c:
        if existing is not None:  # --refresh of the same manifest: plan it again from scratch
            plans.drop_run(c, existing["id"])
        run_id = result.run_id = plans.new_run(c, fingerprint, manifest_identity(manifest), json.dumps(asdict(options)),
                                               schema.serialize().to_pybytes(), now)
        # Rows and requests go in batches (executemany), each request body is serialised once per
        # row from a per-shape template, cache hits come from one listing per prefix dir, and the requests
        # that already exist are looked up per batch (skipped entirely when the ledger had none). An empty
        # ledger is loaded without its indexes, which are then built once (Ledger.bulk_load).
        fresh = bulk or not plans.has_requests(c)
        writer = plans.PlanWriter(c, StoreLookup(store) if store is not None else None, refresh, now, retry_blocked, fresh,
                                  tuning, big_page_cache=lambda: page_cache.enter_context(ledger.big_page_cache()))
        with plans.rows_savepoint(c) as undo:
            if bulk:
                if shard_limits is not None:
                    writer.inline = _InlineJobs(ledger, shard_limits, token_cap_for, now)
                try:
                    with plans.bulk_load(ledger, c):
                        writer.bulk = True
                        seq, result.rows = _load(writer, run_id, manifest, options, refs, problems, tuning, prepare_tuning)
                        writer.stop_sharding()
                    result.jobs = _record_members(ledger, writer.inline_jobs, writer.copies_loaded)
                except plans.DuplicateIds:
                    # Two rows share an id: plan again with the indexes in place, which find each duplicate where
                    # it is and report it with the row it repeats (its requests are left for `shard`).
                    undo()
                    problems.clear()
                    writer.inline, writer.inline_jobs, result.jobs = None, [], []
                    writer.bulk = False
                    seq, result.rows = _load(writer, run_id, manifest, options, refs, problems, tuning, prepare_tuning)
            else:
                seq, result.rows = _load(writer, run_id, manifest, options, refs, problems, tuning, prepare_tuning)
        if problems and not skip_invalid:
            shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
            more = len(problems) - len(shown)
            raise ManifestError(
                f"{manifest}: {len(problems)} invalid row(s); nothing was submitted. Fix them, or pass --skip-invalid "
                "to submit the valid rows and write the rejects to a file." + (f" ({more} more not shown)" if more > 0 else ""),
                problems=shown,
            )  # the transaction rolls back: the ledger is as it was
        if result.rows == 0:
            raise ManifestError(f"{manifest}: no valid rows to submit")
        tally = writer.run_tally()
        if problems and rejects_path is not None:  # before the run is committed: a run that names it has it
            write_rejects(rejects_path, problems)
        plans.finish_run(ledger, c, run_id, result.rows, fresh, tally[0] if tally is not None else None,
                         len(problems), str(rejects_path) if problems and rejects_path is not None else None)
    maybe_crash("plan")  # test hook: see batcher/faults.py
    summary = _summary(ledger, run_id, new_run=True, planned_rows=seq, tally=tally)
    summary.jobs = result.jobs
    summary.ledger_lookup = "fresh" if fresh else "memory" if writer.knows_ledger else "sql"
    if summary.ledger_lookup == "sql":
        log.info("plan: the ledger holds more than %s requests: looked up in SQL a batch at a time (the slow path); "
                 "`batcher prune --keep-runs N` keeps it smaller", f"{tuning.known_max_requests:,}")
    else:
        log.info("plan: the ledger's requests looked up in memory (%s)", summary.ledger_lookup)
    return summary


def replan_lost_images(ledger: Ledger, store: ImageStore, run_id: int) -> int:
    """The run's done requests whose image has gone from the cache since (cleaned, moved) are planned again, as
    a new plan of them would: its dataset shows them pending, and the next submit generates them. Returns how
    many. The run's rows a page at a time against the cache's listings (bounded memory); only the hashes the
    cache lacks are looked up in `requests` (~2 s at 1M rows with every image there)."""
    started = ledger.run(run_id)["created_at"]
    lookup = StoreLookup(store)
    lookup.list_ahead()
    lost: set[str] = set()
    for page in plans.run_hash_pages(ledger, run_id, LOST_IMAGES_PAGE):
        missing = list({h for h, found in zip(page, lookup.has_all(page)) if not found} - lost)
        if missing:
            lost.update(plans.done_among(ledger, missing))
    if lost:
        plans.replan_lost(ledger, sorted(lost), started, time.time())
        log.warning("%d image(s) of this run are gone from the cache %s: planned again, to be generated by the next "
                    "submit or run", len(lost), store.root)
    return len(lost)


def run_result(ledger: Ledger, run_id: int) -> PlanResult:
    """The figures of a run planned earlier (for a command that does not plan: collect)."""
    return _summary(ledger, run_id, new_run=False)


def _summary(ledger: Ledger, run_id: int, new_run: bool, planned_rows: int | None = None,
             tally: tuple[int, int, dict[str, int]] | None = None) -> PlanResult:
    """The run's figures. `planned_rows`: how many rows (one per variant) the plan just wrote, and `tally`: what
    the plan counted of its requests (PlanWriter.run_tally), if it did (else counting its cache hits joins the
    run's rows with `requests`)."""
    rows, distinct, planned_rows = plans.run_figures(ledger, run_id, planned_rows)
    hits = tally[1] if tally is not None else ledger.counts_by("cached", run_id).get(1, 0)
    run = ledger.run(run_id)
    # A new plan knows its requests' states: every one done then was done before it (cache hit, or an earlier run's).
    before = tally[2].get(SUCCEEDED, 0) if tally is not None and new_run else reading.images_before(ledger, run)
    return PlanResult(run_id=run_id, rows=rows, requests=distinct, cache_hits=hits, images_before=before,
                      duplicates=planned_rows - distinct, rejected=run["rejected"], rejects_path=run["rejects_path"],
                      new_run=new_run, states=tally[2] if tally is not None else None)


def write_rejects(path: Path, problems: list[RowProblem]) -> None:
    import csv

    with atomic.into_place(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "row", "column", "value", "reason"])
        for p in problems:
            w.writerow([p.file, p.row, p.column or "", p.value or "", p.message])


def shard(ledger: Ledger, limits: ShardLimits, *, limit_requests: int | None = None,
          token_cap_for: Callable[[str], int | None] = lambda model: None) -> list[int]:
    """Group planned requests into new jobs (one model per job). Returns the new job ids.
    A job never holds more enqueued tokens than its model's cap: it could never be created."""
    new_jobs: list[int] = []
    now = time.time()
    with ledger.big_page_cache(), ledger.transaction():
        budget = limit_requests
        for model in sending.planned_models(ledger):
            first_rowid = prev_rowid = None  # the job being filled: planned requests of `model` in this rowid range
            filler = JobFiller(model, limits, token_cap_for(model))
            done = False
            # The rows already grouped leave the `planned` state only when their job is written.
            for page in sending.planned_pages(ledger, model):
                for rowid, body_bytes, body_chars, size, refs in page:
                    if budget is not None and budget <= 0:
                        done = True
                        break
                    m = measure(model, body_bytes, body_chars, size, refs)
                    if filler.full_for(m):
                        new_jobs.append(_new_job(ledger, filler, first_rowid, prev_rowid, now))
                        first_rowid = None
                        filler.reset()
                    if first_rowid is None:
                        first_rowid = rowid
                    prev_rowid = rowid
                    filler.add(m)
                    if budget is not None:
                        budget -= 1
                if done:
                    break
            if filler.count:
                new_jobs.append(_new_job(ledger, filler, first_rowid, prev_rowid, now))
    return new_jobs


def _record_members(ledger: Ledger, jobs: list[int], copies_loaded: bool) -> list[int]:
    """After a bulk load that sharded as it loaded: every job's members are the requests that went in with its id
    (one statement in C, not a row at a time as they load). `copies_loaded`: repeats went in unmarked (a manifest
    past the preparer's marking bound), so a job may have been counted with a copy the bulk load removed: such a
    job is measured again from its members, and one left with none is dropped. Returns the jobs that remain."""
    if not jobs:
        return jobs
    sending.record_members(ledger, jobs)
    if not copies_loaded:
        return jobs
    dropped = set()
    for job_id in sending.short_jobs(ledger, jobs):
        job = ledger.job(job_id)
        filler = JobFiller(job["model"], ShardLimits(), None)
        for body_bytes, body_chars, size, refs in sending.member_measures(ledger, job_id):
            filler.add(measure(job["model"], body_bytes, body_chars, size, refs))
        if filler.count:
            sending.close_job(ledger, job_id, filler.count, filler.in_bytes, filler.tokens)
        else:
            sending.drop_empty_job(ledger, job_id)
            dropped.add(job_id)
    return [j for j in jobs if j not in dropped]


def _new_job(ledger: Ledger, filler: JobFiller, first_rowid: int, last_rowid: int, now: float) -> int:
    """The filler's requests (the planned requests of its model from first_rowid to last_rowid) as a new job."""
    return sending.new_job(ledger, filler.model, filler.count, filler.in_bytes, filler.tokens, first_rowid, last_rowid, now)


class _InlineJobs:
    """Shards an empty ledger's new requests into jobs as the plan loads them, with the same packing as `shard`
    (each model's requests in load order), so a million requests are not read back and moved a second time.
    Their rows go in as `queued` in their job; jobs are created open and get their totals when they close."""

    def __init__(self, ledger: Ledger, limits: ShardLimits, token_cap_for: Callable[[str], int | None], now: float):
        self.ledger, self.limits, self.token_cap_for, self.now = ledger, limits, token_cap_for, now
        self.fillers: dict[str, JobFiller] = {}
        self.open: dict[str, int] = {}  # model -> its open job
        self.created: list[int] = []

    def job_for(self, model: str, body: str, size: str | None, m: tuple[int, int, int] | None) -> int:
        """The job of a new request of `model` (its body JSON and image size; `m`, its measure if the rows' preparer
        took it)."""
        return self.assign(model, m or measure_body(model, body, size))

    def assign(self, model: str, m: tuple[int, int, int]) -> int:
        """The job of a new request of `model` with measure `m` (packing.measure_body)."""
        filler = self.fillers.get(model)
        if filler is None:
            filler = self.fillers[model] = JobFiller(model, self.limits, self.token_cap_for(model))
        job_id = self.open.get(model)
        if job_id is None or filler.full_for(m):
            if job_id is not None:
                self._close(model)
            job_id = self.open[model] = sending.insert_job(self.ledger, model, 0, 0, 0, self.now)
            self.created.append(job_id)
        filler.add(m)
        return job_id

    def close_all(self) -> list[int]:
        """Close the open jobs (their totals). Returns the jobs made."""
        for model in list(self.open):
            self._close(model)
        return self.created

    def _close(self, model: str) -> None:
        f = self.fillers[model]
        sending.close_job(self.ledger, self.open.pop(model), f.count, f.in_bytes, f.tokens)
        f.reset()


def plan_fallbacks(ledger: Ledger, store: ImageStore | None, run_id: int, fallback_model: str) -> int:
    """Requests of the run that failed for good on their model get a request to `fallback_model` (same
    prompt and settings; its own hash, so its image is cached under it), and the run's rows point to it.
    Requests the fallback model can't take (an aspect ratio or size it lacks) stay failed. Returns how many."""
    problem = catalog.model_name_problem(fallback_model) or catalog.refusal(fallback_model)
    if problem:
        raise ManifestError(f"fallback model {fallback_model!r} (--fallback-model): {problem}")
    spec = catalog.model_spec(fallback_model)  # None: a model batcher does not know takes any setting (the API judges)
    now = time.time()
    created = 0
    with ledger.transaction() as c:
        for r in plans.failed_for_fallback(c, ledger, run_id, fallback_model):
            body = json.loads(r["body_json"])
            image_config = body.get("generationConfig", {}).get("imageConfig", {})
            if spec is not None and (image_config.get("aspectRatio", "1:1") not in spec.aspect_ratios
                                     or image_config.get("imageSize", spec.default_image_size) not in spec.image_sizes):
                continue
            h = identity_hash(fallback_model, body, r["variant"])
            plans.add_fallback(c, run_id, r["hash"], h, fallback_model, r["body_json"], r["variant"],
                               store is not None and store.has(h), now)
            created += 1
        if created:
            ledger.set_run_request_count(c, run_id)
    return created
