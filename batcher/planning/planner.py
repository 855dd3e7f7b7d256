"""Planning: manifest rows -> request hashes in the ledger (validated, deduped, cache-checked), then
uncached requests -> shards (jobs) bounded by requests, input bytes and expected output bytes.

Validation happens here, before anything is uploaded: the whole manifest is streamed into the ledger in
one transaction, and on any problem the transaction is rolled back, so an invalid manifest leaves nothing.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import itertools
import json
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from .. import catalog
from ..storage import gcs
from ..errors import LedgerError, ManifestError
from ..faults import maybe_crash
from ..ledger import BLOCKED, FAILED, J_PLANNED, PLANNED, QUEUED, SUCCEEDED, Ledger
from .packing import JobFiller, ShardLimits, measure, measure_body
from .prepare import PreparedBatch, References, batches
from ..manifest import ManifestOptions, RowProblem, carried_schema, manifest_fingerprint, read_manifest
from .requests import canonical_json, identity_hash
from ..storage.store import ImageStore, StoreLookup

MAX_PROBLEMS_SHOWN = 20
log = logging.getLogger(__name__)


@dataclass
class PlanResult:
    run_id: int
    rows: int = 0
    requests: int = 0  # distinct requests of the run
    cache_hits: int = 0
    duplicates: int = 0  # rows sharing another row's request
    rejected: int = 0
    new_run: bool = True
    jobs: list[int] = field(default_factory=list)  # jobs the plan sharded as it loaded (see _InlineJobs)
    states: dict[str, int] | None = None  # how many of its requests are in each state, when the plan knows


def run_fingerprint(manifest: Path | str, options: ManifestOptions) -> str:
    return hashlib.sha256(canonical_json(manifest_fingerprint(str(manifest), options)).encode()).hexdigest()


SHARD_PAGE = 20_000  # requests read at a time while sharding
PLAN_BATCH_ROWS = 5_000  # manifest rows per bulk insert into the ledger
# Past this many requests a plan stops sharding as it loads (`shard` does the rest), and a plan into a ledger too
# big to read whole (KNOWN_MAX_REQUESTS) stops keeping its run's requests (~140 bytes each) and counts them in SQL.
INLINE_MAX_REQUESTS = 2_000_000
# A plan into a ledger of at most this many requests reads their states into a dict once (~170 MB per million)
# and looks each request up there; past it, in SQL a batch at a time (~5 us per request: a probe of the 64-hex
# hash index, then of the table).
KNOWN_MAX_REQUESTS = 2_000_000
# A plan into a ledger that holds requests takes the big page cache (Ledger.big_page_cache) for random-order
# inserts into its hash index once it has made this many new requests, or from the start if it probes that index
# per request. Before that it would hold only the rows it appends (~250 MB at 1M rows) and gain nothing.
NEW_REQUESTS_FOR_BIG_CACHE = 50_000

# A request's state and `cached` flag as one small int, state index * 2 + cached, plus _IN_RUN once the plan has
# seen it: small ints are shared objects, so a million of them cost nothing of their own, where a million state
# strings read from SQLite would.
_STATES = (PLANNED, QUEUED, SUCCEEDED, BLOCKED, FAILED)
_CODE_SQL = "(CASE state " + " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(_STATES)) + " END) * 2 + cached"
_IN_RUN = 16


def _code(state: str, cached: bool | int) -> int:
    return _STATES.index(state) * 2 + bool(cached)


def _state_of(code: int) -> str:
    return _STATES[(code & ~_IN_RUN) >> 1]


_INSERT_ROW = "INSERT INTO rows(run_id, seq, row, id, variant, request_hash, prompt, extra_json) VALUES (?,?,?,?,?,?,?,?)"
# New requests, in manifest order: (hash, model, body JSON, variant, now, is a cache hit). The state and `cached`
# come from one bound flag (~0.2 s less per million requests than binding both). OR IGNORE: a request of an
# earlier batch of this run is left as it is; in a bulk load there is no index to ignore by, and
# Ledger.bulk_load keeps the first copy.
_INSERT_NEW = ("INSERT OR IGNORE INTO requests(hash, model, body_json, variant, updated_at, cached, state) "
               f"VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?6 THEN '{SUCCEEDED}' ELSE '{PLANNED}' END)")
# The same, sharded as it loads: (..., now, its job or None for a cache hit).
_INSERT_SHARDED = ("INSERT INTO requests(hash, model, body_json, variant, updated_at, job_id, cached, state) "
                   f"VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6 IS NULL, CASE WHEN ?6 IS NULL THEN '{SUCCEEDED}' ELSE '{QUEUED}' END)")

# A request planned again starts over: no attempts, and no payment yet (an earlier one belongs to an earlier run;
# kept, it would be counted as this run's spend, or stay on a request that then fails).
REPLANNED = f"state='{PLANNED}', attempts=0, cost_usd=NULL, prompt_tokens=NULL, output_tokens=NULL, thoughts_tokens=NULL, updated_at=?"
# A request of a run planned again within that run (an image lost from the cache, --retry-blocked): what this run
# paid for it stays (money spent, counted by the budget; collect adds the next payment to it), what an earlier
# run paid does not. Parameters: (the run's start, now). SQLite reads cached and updated_at before the update.
REPLANNED_IN_RUN = (f"state='{PLANNED}', attempts=0, cost_usd=CASE WHEN cached=0 AND updated_at >= ? THEN cost_usd END, "
                    "updated_at=?")


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


class _BulkPlanner:
    """Writes batches of planned rows and their requests into the ledger (inside plan_manifest's transaction)
    with the same outcome as inserting each row and recording each request one at a time."""

    def __init__(self, c: sqlite3.Connection, store, refresh: bool, now: float, retry_blocked: bool, fresh: bool,
                 big_page_cache: Callable[[], object] = lambda: None):
        self.c, self.refresh, self.now, self.retry_blocked, self.fresh = c, refresh, now, retry_blocked, fresh
        self.big_page_cache: Callable[[], object] | None = big_page_cache  # takes it until the plan ends; once
        self.new_requests = 0  # made by _record
        self.store = store
        self.lookup = StoreLookup(store) if store is not None else None
        self.inline: _InlineJobs | None = None  # set: new requests are sharded into jobs as they load
        self.inline_jobs: list[int] = []
        self.bulk = False  # loading into an empty ledger without its indexes (Ledger.bulk_load)
        # In a ledger that held requests: requests by hash -> state code (_CODE_SQL), with what the plan did to them.
        # Every request of the ledger, read once (`knows_ledger`; see KNOWN_MAX_REQUESTS), or else the run's, as
        # SQL told them a batch at a time, while there are at most INLINE_MAX_REQUESTS (then None: bounded memory).
        # The run's counts come from it (run_tally); past the bound, from SQL at the end.
        self.known: dict[str, int] | None = None
        self.knows_ledger = False

    def stop_sharding(self) -> None:
        """No more sharding as the plan loads: the jobs made so far are closed, later requests stay planned (for
        `shard`)."""
        if self.inline is not None:
            self.inline_jobs = self.inline.close_all()
            self.inline = None

    def in_cache(self, h: str, known: bool | None) -> bool:
        """Whether the image of `h` is in the cache: as its batch found (`known`), or asked now."""
        return known if known is not None else self.lookup is not None and self.lookup.has(h)

    def load(self, run_id: int, manifest: Path | str, options: ManifestOptions, refs: References,
             problems: list[RowProblem]) -> tuple[int, int]:
        """Record the manifest's valid rows and their requests; append its problems. Returns (rows written, one
        per variant; manifest rows)."""
        seq = rows = 0
        # A large manifest is read, validated and hashed by a child process on another core, while this one writes.
        # A plain local cache is looked up where the rows are prepared (with them, in the child process).
        cache_root = self.lookup.root if self.lookup is not None and not self.refresh else None
        source = batches(manifest, options, refs, PLAN_BATCH_ROWS, cache_root, measure=self.inline is not None)
        with contextlib.closing(source), _cyclic_gc_paused():
            if not self.fresh:  # while a child (if any) starts and reads its first rows
                self.known = _known_requests(self.c)
                self.knows_ledger = self.known is not None
                if not self.knows_ledger:
                    self.known = {}
                    self._take_big_page_cache()
            for b in source:
                positions = _merge_problems(b, problems)
                for references, variants in zip(b.references, b.variants):
                    for ref in references if variants else ():
                        self.c.execute("INSERT OR REPLACE INTO reference_files(sha256, path) VALUES (?,?)", (ref.sha256, ref.path))
                seq, duplicates = self.flush(run_id, seq, b, positions, problems, manifest, options)
                rows += len(b.rows) - duplicates
        return seq, rows

    def flush(self, run_id: int, seq: int, b: PreparedBatch, positions: list[int], problems: list[RowProblem],
              manifest: Path | str, options: ManifestOptions) -> tuple[int, int]:
        """Write a batch of rows and their requests. Returns (the next seq, how many rows were rejected as
        duplicate ids). `positions`: where in `problems` each row's problem would go."""
        if not b.rows:
            return seq, 0
        c = self.c
        rows, ids, prompts, extras = b.rows, b.ids, b.prompts, b.extras
        n = len(b.hashes)
        if n == len(rows):  # a request per row (no variants): the columns line up, zipped in C
            params = list(zip(itertools.repeat(run_id, n), range(seq, seq + n), rows, ids, b.request_variants,
                              b.hashes, prompts, extras))
        else:
            params = [(run_id, seq + i, rows[o], ids[o], v, h, prompts[o], extras[o])
                      for i, (o, v, h) in enumerate(zip(b.owners, b.request_variants, b.hashes))]
        c.execute("SAVEPOINT plan_batch")
        try:
            c.executemany(_INSERT_ROW, params)
        except sqlite3.IntegrityError:  # a duplicate id in this batch: redo it a row at a time to report it
            c.execute("ROLLBACK TO plan_batch")
            c.execute("RELEASE plan_batch")
            return self._flush_one_at_a_time(run_id, seq, b, positions, problems, manifest, options)
        c.execute("RELEASE plan_batch")
        if self.fresh:
            if self.inline is not None and not b.repeats_marked:
                self.stop_sharding()  # a later copy of a request could not be told from a new one
            self._record_new(*self._without_repeats(b))
        else:
            self._record(b.requests())
        return seq + len(params), 0

    def _without_repeats(self, b: PreparedBatch) -> tuple[list, ...]:
        """The batch's request columns for _record_new: in a bulk load, without the requests that repeat an
        earlier one of the plan (PreparedBatch.repeated), whose first copy is in already. Only there: a bulk load
        keeps every row it is given (a duplicate id ends it), elsewhere the row of a first copy can be rejected."""
        columns = (b.models, b.request_variants, b.hashes, b.bodies, b.sizes, b.cached, b.measures)
        if not (self.bulk and b.repeated):
            return columns
        skip = set(b.repeated)
        return tuple([v for i, v in enumerate(column) if i not in skip] if column else column for column in columns)

    def _flush_one_at_a_time(self, run_id: int, seq: int, b: PreparedBatch, positions: list[int],
                             problems: list[RowProblem], manifest: Path | str, options: ManifestOptions) -> tuple[int, int]:
        c = self.c
        s = seq
        recorded: list[tuple] = []
        dups: list[tuple[int, RowProblem]] = []
        start = 0
        for j, n in enumerate(b.variants):
            for req in b.requests(start, start + n):
                try:
                    c.execute(_INSERT_ROW, (run_id, s, b.rows[j], b.ids[j], req[1], req[2], b.prompts[j], b.extras[j]))
                except sqlite3.IntegrityError:
                    first = c.execute("SELECT row FROM rows WHERE run_id=? AND id=? LIMIT 1", (run_id, b.ids[j])).fetchone()
                    dups.append((positions[j], RowProblem(str(manifest), b.rows[j], options.id_column, b.ids[j],
                                                          f"duplicate id (first used at row {first[0] if first else '?'}); ids must be unique")))
                    break
                s += 1
                recorded.append(req)
            start += n
        for pos, problem in reversed(dups):  # where the one-at-a-time loop would have reported them
            problems.insert(pos, problem)
        if self.fresh:
            self._record_new(*(list(column) for column in zip(*recorded)) if recorded else [[]] * 6, measures=[])
        else:
            self._record(recorded)
        return s, len(dups)

    def _record_new(self, models: list[str], variants: list[int], hashes: list[str], bodies: list[str],
                    sizes: list[str | None], cached: list[bool | None], measures: list[tuple | None]) -> None:
        """Record a batch's requests (its columns) in a ledger that held no requests before this plan (every fresh
        workdir): each is new, or an earlier batch's. With `inline` (a bulk load, whose batches come without the
        requests that repeat an earlier one: _without_repeats), the ones to generate go into jobs as they load,
        measured where the rows were prepared (`measures`) or here."""
        if self.refresh:  # --refresh: no cache hits
            cached = [False] * len(hashes)
        elif not cached or cached[0] is None:  # not looked up where the rows were prepared
            cached = self.lookup.has_all(hashes) if self.lookup is not None else [False] * len(hashes)
        now, inline = self.now, self.inline
        if inline is None:
            self.c.executemany(_INSERT_NEW, [(h, model, body, variant, now, hit) for h, model, body, variant, hit
                                             in zip(hashes, models, bodies, variants, cached)])
            return
        assign = inline.assign
        self.c.executemany(_INSERT_SHARDED, [
            (h, model, body, variant, now, None if hit else assign(model, m or measure_body(model, body, size)))
            for h, model, body, variant, hit, size, m
            in zip(hashes, models, bodies, variants, cached, sizes, measures or itertools.repeat(None))])
        if inline.assigned >= INLINE_MAX_REQUESTS:
            self.stop_sharding()

    def _record(self, reqs: list[tuple]) -> None:
        """Record a batch's requests in a ledger that held requests before this plan: each is looked up, and one
        that exists gets the transition its state calls for. (Never sharded as it loads: that needs an empty ledger.)"""
        c, now, refresh = self.c, self.now, self.refresh
        batch: dict[str, tuple] = {}
        for req in reqs:
            batch.setdefault(req[2], req)
        known = self.known if self.known is not None else {}
        if not self.knows_ledger:  # the ones the plan has not seen yet, from SQL
            asked = [h for h in batch if h not in known]
            if asked:
                known.update(c.execute(f"SELECT hash, {_CODE_SQL} FROM requests WHERE hash IN (SELECT value FROM json_each(?))",
                                       (json.dumps(asked),)))
        done = _code(SUCCEEDED, False), _code(SUCCEEDED, True)
        new = []
        for h, (model, variant, _h, body_json, size, in_cache) in batch.items():
            code = known.get(h)
            if code is None:
                hit = not refresh and self.in_cache(h, in_cache)  # --refresh: no cache hits
                new.append((h, model, body_json, variant, now, hit))
                known[h] = _code(SUCCEEDED if hit else PLANNED, hit) | _IN_RUN
                continue
            if code & _IN_RUN:  # an earlier batch of this plan had it: what it called for is done...
                state = _state_of(code)
                if state != SUCCEEDED or refresh or self.lookup is None or self.in_cache(h, in_cache):
                    continue
                # ...but its image has gone from the cache since (SQL mode, which reads its state again, sees that too)
            else:
                known[h] = code | _IN_RUN
                if code in done and not refresh and (in_cache or self.lookup is None):
                    continue  # done, and its image is where it belongs: the usual nightly request (checked first)
                state = _STATES[code >> 1]
            if state == QUEUED:
                continue  # in a job already: it will be collected
            if refresh and state in (SUCCEEDED, FAILED, BLOCKED):
                c.execute(f"UPDATE requests SET {REPLANNED}, error=NULL, finish_reason=NULL, cached=0 WHERE hash=?", (now, h))
                known[h] = _code(PLANNED, False) | _IN_RUN
            elif state == SUCCEEDED and self.lookup is not None and not self.in_cache(h, in_cache):
                # The ledger says done but the image is gone from the cache (cleaned, moved): generate it again.
                c.execute(f"UPDATE requests SET {REPLANNED}, cached=0 WHERE hash=?", (now, h))
                known[h] = _code(PLANNED, False) | _IN_RUN
            elif state == FAILED or (state == BLOCKED and self.retry_blocked):
                # A new run gives requests that ran out of attempts before a fresh set.
                c.execute(f"UPDATE requests SET {REPLANNED} WHERE hash=?", (now, h))
                known[h] = _code(PLANNED, code & 1) | _IN_RUN
        if not self.knows_ledger and self.known is not None and len(self.known) > INLINE_MAX_REQUESTS:
            self.known = None  # bounded memory: each batch's requests are asked afresh, and the run counted in SQL
        self.new_requests += len(new)
        if self.new_requests >= NEW_REQUESTS_FOR_BIG_CACHE:
            self._take_big_page_cache()
        c.executemany(_INSERT_NEW, new)

    def _take_big_page_cache(self) -> None:
        if self.big_page_cache is not None:
            self.big_page_cache()
            self.big_page_cache = None

    def run_tally(self) -> tuple[int, int, dict[str, int]] | None:
        """The run's distinct requests, how many are cache hits, and how many are in each state, if this plan
        still holds every request it saw (`known`); else None. One pass over the codes, in C."""
        if self.known is None:
            return None
        requests = hits = 0
        states = dict.fromkeys(_STATES, 0)
        for code, n in collections.Counter(self.known.values()).items():
            if code & _IN_RUN:
                requests += n
                hits += n if code & 1 else 0
                states[_state_of(code)] += n
        return requests, hits, states


def _known_requests(c: sqlite3.Connection) -> dict[str, int] | None:
    """Every request of the ledger, hash -> state code (_CODE_SQL), if there are at most KNOWN_MAX_REQUESTS:
    one scan of the table instead of a probe of its index per request (1.3 s against ~5 s at 1M requests)."""
    if c.execute("SELECT COALESCE(MAX(rowid), 0) FROM requests").fetchone()[0] > KNOWN_MAX_REQUESTS:
        return None  # requests are never deleted: the largest rowid bounds their number
    known: dict[str, int] = {}
    cursor = c.execute(f"SELECT hash, {_CODE_SQL} FROM requests")  # before the big page cache, if the plan takes it
    while rows := cursor.fetchmany(50_000):
        known.update(rows)
    return known


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
) -> PlanResult:
    """Validate the manifest and record its rows and requests. Idempotent for an unchanged manifest.
    With `shard_limits`, a plan into an empty ledger also shards its new requests into jobs as it loads them,
    exactly as `shard` would (same limits and token caps; no budget); they are in PlanResult.jobs."""
    manifest = str(manifest) if gcs.is_gcs(manifest) else Path(manifest)
    if isinstance(manifest, Path) and not manifest.exists():
        raise ManifestError(f"{manifest}: no such file; check the path")
    if isinstance(manifest, Path) and manifest.is_dir():
        raise ManifestError(f"{manifest}: is a directory, not a manifest file; pass a .parquet, .csv or .tsv file")
    fingerprint = run_fingerprint(manifest, options)
    existing = ledger.run_by_fingerprint(fingerprint)
    if existing is not None and retry_blocked:
        where, params = ledger.in_run(existing["id"])
        with ledger.transaction() as c:
            c.execute(f"UPDATE requests SET {REPLANNED_IN_RUN} WHERE state=? AND {where}",
                      (existing["created_at"], time.time(), BLOCKED, *params))
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
    # (_BulkPlanner.big_page_cache), until after its commit.
    with contextlib.ExitStack() as page_cache, \
            (ledger.journal_for_new_pages() if bulk else contextlib.nullcontext()), ledger.transaction() as c:
        if existing is not None:  # --refresh of the same manifest: plan it again from scratch
            c.execute("DELETE FROM rows WHERE run_id=?", (existing["id"],))
            c.execute("DELETE FROM runs WHERE id=?", (existing["id"],))
        cur = c.execute(
            "INSERT INTO runs(fingerprint, manifest, options_json, extra_schema, created_at) VALUES (?,?,?,?,?)",
            (fingerprint, str(manifest), json.dumps(asdict(options)), schema.serialize().to_pybytes(), now),
        )
        run_id = result.run_id = cur.lastrowid
        # Rows and requests go in batches (executemany), each request body is serialised once per
        # row from a per-shape template, cache hits come from one listing per prefix dir, and the requests
        # that already exist are looked up per batch (skipped entirely when the ledger had none). An empty
        # ledger is loaded without its indexes, which are then built once (Ledger.bulk_load).
        fresh = bulk or c.execute("SELECT 1 FROM requests LIMIT 1").fetchone() is None
        planner = _BulkPlanner(c, store, refresh, now, retry_blocked, fresh,
                               big_page_cache=lambda: page_cache.enter_context(ledger.big_page_cache()))
        c.execute("SAVEPOINT plan_rows")
        if bulk:
            if shard_limits is not None:
                planner.inline = _InlineJobs(ledger, shard_limits, token_cap_for, now)
            try:
                with ledger.bulk_load(c):
                    planner.bulk = True
                    seq, result.rows = planner.load(run_id, manifest, options, refs, problems)
                    planner.stop_sharding()
                    result.jobs = planner.inline_jobs
            except sqlite3.IntegrityError:
                # Two rows share an id: plan again with the indexes in place, which find each duplicate where
                # it is and report it with the row it repeats (its requests are left for `shard`).
                c.execute("ROLLBACK TO plan_rows")
                problems.clear()
                planner.inline, planner.inline_jobs, result.jobs = None, [], []
                planner.bulk = False
                seq, result.rows = planner.load(run_id, manifest, options, refs, problems)
        else:
            seq, result.rows = planner.load(run_id, manifest, options, refs, problems)
        c.execute("RELEASE plan_rows")
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
        c.execute("UPDATE runs SET row_count=? WHERE id=?", (result.rows, run_id))
        tally = planner.run_tally()
        if fresh:  # the ledger held no requests before this run: every request in it is this run's
            c.execute("UPDATE runs SET request_count=(SELECT COUNT(*) FROM requests) WHERE id=?", (run_id,))
        elif tally is not None:  # what the plan knows of every request it saw
            c.execute("UPDATE runs SET request_count=? WHERE id=?", (tally[0], run_id))
        else:
            ledger.set_run_request_count(c, run_id)
    maybe_crash("plan")  # test hook: see batcher/faults.py
    if problems and rejects_path is not None:
        write_rejects(rejects_path, problems)
    summary = _summary(ledger, run_id, new_run=True, planned_rows=seq, tally=tally)
    summary.rejected = len(problems)
    summary.jobs = result.jobs
    return summary


def replan_lost_images(ledger: Ledger, store: ImageStore, run_id: int) -> int:
    """The run's done requests whose image has gone from the cache since (cleaned, moved) are planned again, as
    a new plan of them would: its dataset shows them pending, and the next submit generates them. Returns how
    many. The run's rows a page at a time against the cache's listings (bounded memory); only the hashes the
    cache lacks are looked up in `requests` (~2 s at 1M rows with every image there)."""
    started = ledger.run(run_id)["created_at"]
    lookup = StoreLookup(store)
    lookup.list_ahead()
    rows = ledger.conn.cursor()
    rows.row_factory = None
    rows.execute("SELECT request_hash FROM rows WHERE run_id=?", (run_id,))
    lost: set[str] = set()
    while page := [h for (h,) in rows.fetchmany(SHARD_PAGE)]:
        missing = list({h for h, found in zip(page, lookup.has_all(page)) if not found} - lost)
        if missing:
            lost.update(h for (h,) in ledger.conn.execute(
                "SELECT hash FROM requests WHERE state=? AND hash IN (SELECT value FROM json_each(?))",
                (SUCCEEDED, json.dumps(missing))))
    if lost:
        now = time.time()
        with ledger.transaction() as c:
            c.executemany(f"UPDATE requests SET {REPLANNED_IN_RUN}, cached=0 WHERE hash=? AND state=?",
                          [(started, now, h, SUCCEEDED) for h in sorted(lost)])
        log.warning("%d image(s) of this run are gone from the cache %s: planned again, to be generated by the next "
                    "submit or run", len(lost), getattr(store, "root", ""))
    return len(lost)


def _summary(ledger: Ledger, run_id: int, new_run: bool, planned_rows: int | None = None,
             tally: tuple[int, int, dict[str, int]] | None = None) -> PlanResult:
    """The run's figures. `planned_rows`: how many rows (one per variant) the plan just wrote, and `tally`: what
    the plan counted of its requests (_BulkPlanner.run_tally), if it did (else counting its cache hits joins the
    run's rows with `requests`)."""
    c = ledger.conn
    run = c.execute("SELECT row_count, request_count FROM runs WHERE id=?", (run_id,)).fetchone()
    if planned_rows is None:
        planned_rows = c.execute("SELECT COUNT(*) FROM rows WHERE run_id=?", (run_id,)).fetchone()[0]
    if run["request_count"] is None:  # a run planned before the ledger recorded it
        with ledger.transaction() as tx:
            ledger.set_run_request_count(tx, run_id)
        run = c.execute("SELECT row_count, request_count FROM runs WHERE id=?", (run_id,)).fetchone()
    distinct = run["request_count"]
    hits = tally[1] if tally is not None else ledger.counts_by("cached", run_id).get(1, 0)
    return PlanResult(run_id=run_id, rows=run["row_count"], requests=distinct, cache_hits=hits,
                      duplicates=planned_rows - distinct, new_run=new_run, states=tally[2] if tally is not None else None)


def write_rejects(path: Path, problems: list[RowProblem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["file", "row", "column", "value", "reason"])
        for p in problems:
            w.writerow([p.file, p.row, p.column or "", p.value or "", p.message])
    os.replace(tmp, path)


def shard(ledger: Ledger, limits: ShardLimits, *, limit_requests: int | None = None,
          token_cap_for: Callable[[str], int | None] = lambda model: None) -> list[int]:
    """Group planned requests into new jobs (one model per job). Returns the new job ids.
    A job never holds more enqueued tokens than its model's cap: it could never be created."""
    c = ledger.conn
    new_jobs: list[int] = []
    now = time.time()
    with ledger.big_page_cache(), ledger.transaction():
        models = [r[0] for r in c.execute("SELECT DISTINCT model FROM requests WHERE state=?", (PLANNED,))]
        budget = limit_requests
        for model in models:
            first_rowid = prev_rowid = None  # the job being filled: planned requests of `model` in this rowid range
            filler = JobFiller(model, limits, token_cap_for(model))
            last_rowid = -1
            done = False
            while not done:
                # A page at a time (bounded memory), in rowid order; the rows already grouped leave the
                # `planned` state only when their job is written, so paging by rowid sees each one once.
                # What the limits need is measured in SQLite: the bodies never come to Python.
                page = c.execute(
                    "SELECT rowid, length(CAST(body_json AS BLOB)), length(body_json), "
                    "CASE WHEN instr(body_json, '\"imageSize\"') THEN json_extract(body_json, '$.generationConfig.imageConfig.imageSize') END, "
                    "CASE WHEN instr(body_json, '\"fileData\"') THEN (length(body_json) - length(replace(body_json, '\"fileData\"', ''))) / 10 ELSE 0 END "
                    "FROM requests WHERE state=? AND model=? AND rowid>? ORDER BY rowid LIMIT ?",
                    (PLANNED, model, last_rowid, SHARD_PAGE)).fetchall()
                if not page:
                    break
                last_rowid = page[-1][0]
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
            if filler.count:
                new_jobs.append(_new_job(ledger, filler, first_rowid, prev_rowid, now))
    return new_jobs


def _insert_job(ledger: Ledger, model: str, count: int, in_bytes: int, tokens: int, now: float) -> int:
    c = ledger.conn
    cur = c.execute(
        "INSERT INTO jobs(display_name, model, state, request_count, input_bytes, est_tokens, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
        (f"pending-{uuid.uuid4().hex}", model, J_PLANNED, count, in_bytes, tokens, now, now),
    )
    job_id = cur.lastrowid
    # Deterministic, unique per workdir and job: how a crashed create is found again in the API's job list.
    c.execute("UPDATE jobs SET display_name=? WHERE id=?", (f"batcher-{ledger.ledger_id}-job{job_id:05d}", job_id))
    return job_id


def _new_job(ledger: Ledger, filler: JobFiller, first_rowid: int, last_rowid: int, now: float) -> int:
    """A job of the filler's `count` planned requests of its model with rowids from first_rowid to last_rowid
    (shard takes them in rowid order, so they are exactly the planned requests of that model in that range)."""
    c = ledger.conn
    model, count = filler.model, filler.count
    job_id = _insert_job(ledger, model, count, filler.in_bytes, filler.tokens, now)
    members = "WHERE state=? AND model=? AND rowid BETWEEN ? AND ?"  # a range of the (state, model) index
    added = c.execute(f"INSERT INTO job_requests(job_id, hash) SELECT ?, hash FROM requests {members} ORDER BY rowid",
                      (job_id, PLANNED, model, first_rowid, last_rowid)).rowcount
    queued = c.execute(f"UPDATE requests SET state=?, job_id=?, updated_at=? {members}",
                       (QUEUED, job_id, now, PLANNED, model, first_rowid, last_rowid)).rowcount
    if added != count or queued != count:  # the range must hold exactly the requests shard counted
        raise LedgerError(f"job {job_id}: expected {count} planned requests of {model} in rowids {first_rowid}..{last_rowid}, "
                          f"found {added} and {queued}")
    return job_id


class _InlineJobs:
    """Shards an empty ledger's new requests into jobs as the plan loads them, with the same packing as `shard`
    (each model's requests in load order), so a million requests are not read back and moved a second time.
    Their rows go in as `queued` in their job; jobs are created open and get their totals when they close."""

    def __init__(self, ledger: Ledger, limits: ShardLimits, token_cap_for: Callable[[str], int | None], now: float):
        self.ledger, self.limits, self.token_cap_for, self.now = ledger, limits, token_cap_for, now
        self.fillers: dict[str, JobFiller] = {}
        self.open: dict[str, int] = {}  # model -> its open job
        self.created: list[int] = []
        self.assigned = 0  # requests put in a job

    def assign(self, model: str, m: tuple[int, int, int]) -> int:
        """The job of a new request of `model` with measure `m` (packing.measure_body)."""
        filler = self.fillers.get(model)
        if filler is None:
            filler = self.fillers[model] = JobFiller(model, self.limits, self.token_cap_for(model))
        job_id = self.open.get(model)
        if job_id is None or filler.full_for(m):
            if job_id is not None:
                self._close(model)
            job_id = self.open[model] = _insert_job(self.ledger, model, 0, 0, 0, self.now)
            self.created.append(job_id)
        filler.add(m)
        self.assigned += 1
        return job_id

    def close_all(self) -> list[int]:
        """Close the open jobs and record every job's members (the requests that went in with its id: one
        statement in C, instead of a row at a time as they load). Returns the jobs made."""
        for model in list(self.open):
            self._close(model)
        self.ledger.conn.execute("INSERT INTO job_requests(job_id, hash) SELECT job_id, hash FROM requests "
                                 "WHERE job_id IN (SELECT value FROM json_each(?))", (json.dumps(self.created),))
        return self.created

    def _close(self, model: str) -> None:
        f = self.fillers[model]
        self.ledger.conn.execute("UPDATE jobs SET request_count=?, input_bytes=?, est_tokens=? WHERE id=?",
                                 (f.count, f.in_bytes, f.tokens, self.open.pop(model)))
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
    where, params = ledger.in_run(run_id)
    with ledger.transaction() as c:
        failed = c.execute(f"SELECT hash, body_json, variant, error FROM requests WHERE state=? AND model<>? AND {where}",
                           (FAILED, fallback_model, *params)).fetchall()
        for r in failed:
            body = json.loads(r["body_json"])
            image_config = body.get("generationConfig", {}).get("imageConfig", {})
            if spec is not None and (image_config.get("aspectRatio", "1:1") not in spec.aspect_ratios
                                     or image_config.get("imageSize", spec.default_image_size) not in spec.image_sizes):
                continue
            h = identity_hash(fallback_model, body, r["variant"])
            if c.execute("SELECT 1 FROM requests WHERE hash=?", (h,)).fetchone() is None:
                cached = store is not None and store.has(h)
                c.execute(
                    "INSERT INTO requests(hash, model, body_json, state, cached, variant, fallback_of, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                    (h, fallback_model, r["body_json"], SUCCEEDED if cached else PLANNED, int(cached), r["variant"], r["hash"], now))
            c.execute("UPDATE rows SET request_hash=? WHERE run_id=? AND request_hash=?", (h, run_id, r["hash"]))
            created += 1
        if created:
            ledger.set_run_request_count(c, run_id)
    return created
