"""What a plan writes: the run, its rows and their requests, in one transaction, as fast as SQLite allows (the
planner's tuned SQL, moved here word for word), and what planning reads back (the run's figures, lost images,
fallbacks). The planner (batcher.planning.planner) decides what to plan; this module writes it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import sqlite3
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..hashtable import HashTable
from .core import Ledger
from .schema import BLOCKED, FAILED, PLANNED, QUEUED, SUCCEEDED


@dataclass(frozen=True)
class PlanTuning:
    """Where a plan changes strategy (measured on 2 cores at 1M rows; docs/benchmarks.md). Tests make them small."""

    plan_batch_rows: int = 5_000  # manifest rows per bulk insert into the ledger
    # Past this many requests a plan into a ledger that held requests stops keeping the ones it adds (or, in a ledger
    # too big to read whole: known_max_requests, the ones it sees; ~140 bytes each) and counts its run in SQL.
    inline_max_requests: int = 3_000_000
    # A plan into a ledger of at most this many requests reads their states once into a compact table (hashtable:
    # 17 bytes a request) and looks each request up there; past it, in SQL a batch at a time (~5 us per request at
    # 1M: a probe of the 64-hex hash index, then of the table; at 3M the index outgrows the page cache and tonight's
    # 3M-row plan took 105 s against 10 s at 1M: issue 19, docs/benchmarks.md).
    known_max_requests: int = 30_000_000
    # A plan into a ledger that holds requests takes the big page cache (Ledger.big_page_cache) for random-order
    # inserts into its hash index once it has made this many new requests, or from the start if it probes that
    # index per request. Before that it would hold only the rows it appends (~250 MB at 1M rows) and gain nothing.
    new_requests_for_big_cache: int = 50_000


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


class PlanWriter:
    """Writes batches of planned rows and their requests into the ledger (inside plan_manifest's transaction)
    with the same outcome as inserting each row and recording each request one at a time.

    `lookup`: the image cache's lookup (`has(h)`, `has_all(hashes)`), None without a cache; `inline`: the planner's
    sharding as it loads (`job_for(model, body, size, measure)`, `close_all()`), set by the planner."""

    def __init__(self, c: sqlite3.Connection, lookup, refresh: bool, now: float, retry_blocked: bool, fresh: bool,
                 tuning: PlanTuning, big_page_cache: Callable[[], object] = lambda: None):
        self.c, self.refresh, self.now, self.retry_blocked, self.fresh = c, refresh, now, retry_blocked, fresh
        self.tuning = tuning
        self.big_page_cache: Callable[[], object] | None = big_page_cache  # takes it until the plan ends; once
        self.new_requests = 0  # made by _record
        self.lookup = lookup
        self.inline = None  # set: new requests are sharded into jobs as they load
        self.inline_jobs: list[int] = []
        # A batch came without its repeats marked (past PrepareTuning.max_marked_requests): copies of a request may
        # have gone into jobs; the bulk load keeps the first copy, and the planner mends the jobs that lose one.
        self.copies_loaded = False
        self.bulk = False  # loading into an empty ledger without its indexes (Ledger.bulk_load)
        # In a ledger that held requests: requests by hash -> state code (_CODE_SQL), with what the plan did to them.
        # Every request of the ledger, read once (`knows_ledger`; see PlanTuning.known_max_requests), or else the run's,
        # as SQL told them a batch at a time, while there are at most PlanTuning.inline_max_requests (then None).
        # The run's counts come from it (run_tally); past the bound, from SQL at the end.
        self.known: _Known | None = None
        self.knows_ledger = False

    def stop_sharding(self) -> None:
        """The plan has loaded: the jobs it sharded into are closed (their members are recorded once the bulk load has
        kept one copy of each request: planner)."""
        if self.inline is not None:
            self.inline_jobs = self.inline.close_all()
            self.inline = None

    def start(self) -> None:
        """Before the first batch, in a ledger that held requests: read their states (or say they are too many)."""
        if not self.fresh:
            table = known_requests(self.c, self.tuning.known_max_requests)
            self.knows_ledger = table is not None
            self.known = _Known(table)
            if not self.knows_ledger:
                self._take_big_page_cache()

    def add_references(self, references: list[tuple], variants: list[int]) -> None:
        """Where each reference image of a batch's rows was read (rows without requests, variants 0, skipped)."""
        for refs, n in zip(references, variants):
            for ref in refs if n else ():
                self.c.execute("INSERT OR REPLACE INTO reference_files(sha256, path) VALUES (?,?)", (ref.sha256, ref.path))

    def flush(self, run_id: int, seq: int, b, positions: list[int], problems: list,
              duplicate: Callable[[int, int | None], object]) -> tuple[int, int]:
        """Write a batch of rows and their requests (a planning.prepare.PreparedBatch). Returns (the next seq, how
        many rows were rejected as duplicate ids). `positions`: where in `problems` each row's problem would go;
        `duplicate(j, first_row)`: the problem to report for the batch's row j, whose id row `first_row` has."""
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
            return self._flush_one_at_a_time(run_id, seq, b, positions, problems, duplicate)
        c.execute("RELEASE plan_batch")
        if self.fresh:
            self.copies_loaded |= not b.repeats_marked  # a later copy of a request cannot be told from a new one
            self._record_new(*self._without_repeats(b))
        else:
            self._record(b.requests())
        return seq + len(params), 0

    def _without_repeats(self, b) -> tuple[list, ...]:
        """The batch's request columns for _record_new: in a bulk load, without the requests that repeat an
        earlier one of the plan (PreparedBatch.repeated), whose first copy is in already. Only there: a bulk load
        keeps every row it is given (a duplicate id ends it), elsewhere the row of a first copy can be rejected."""
        columns = (b.models, b.request_variants, b.hashes, b.bodies, b.sizes, b.cached, b.measures)
        if not (self.bulk and b.repeated):
            return columns
        skip = set(b.repeated)
        return tuple([v for i, v in enumerate(column) if i not in skip] if column else column for column in columns)

    def _flush_one_at_a_time(self, run_id: int, seq: int, b, positions: list[int], problems: list,
                             duplicate: Callable[[int, int | None], object]) -> tuple[int, int]:
        c = self.c
        s = seq
        recorded: list[tuple] = []
        dups: list[tuple[int, object]] = []
        start = 0
        for j, n in enumerate(b.variants):
            for req in b.requests(start, start + n):
                try:
                    c.execute(_INSERT_ROW, (run_id, s, b.rows[j], b.ids[j], req[1], req[2], b.prompts[j], b.extras[j]))
                except sqlite3.IntegrityError:
                    first = c.execute("SELECT row FROM rows WHERE run_id=? AND id=? LIMIT 1", (run_id, b.ids[j])).fetchone()
                    dups.append((positions[j], duplicate(j, first[0] if first else None)))
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
        job_for = inline.job_for
        self.c.executemany(_INSERT_SHARDED, [
            (h, model, body, variant, now, None if hit else job_for(model, body, size, m))
            for h, model, body, variant, hit, size, m
            in zip(hashes, models, bodies, variants, cached, sizes, measures or itertools.repeat(None))])

    def _record(self, reqs: list[tuple]) -> None:
        """Record a batch's requests in a ledger that held requests before this plan: each is looked up, and one
        that exists gets the transition its state calls for. (Never sharded as it loads: that needs an empty ledger.)"""
        c, now, refresh = self.c, self.now, self.refresh
        batch: dict[str, tuple] = {}
        for req in reqs:
            batch.setdefault(req[2], req)
        if self.lookup is not None and not refresh and any(req[5] is None for req in batch.values()):
            # Not looked up where the rows were prepared (a gs:// cache): one search for the batch, not one per request
            # (so below, with a cache and without --refresh, each request's `in_cache` is a bool).
            batch = {h: (*req[:5], hit) for (h, req), hit in zip(batch.items(), self.lookup.has_all(list(batch)))}
        known = self.known if self.known is not None else _Known(None)
        known.look_up(list(batch))
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
                hit = not refresh and bool(in_cache)  # --refresh: no cache hits
                new.append((h, model, body_json, variant, now, hit))
                known[h] = _code(SUCCEEDED if hit else PLANNED, hit) | _IN_RUN
                continue
            if code & _IN_RUN:  # an earlier batch of this plan had it: what it called for is done...
                state = _state_of(code)
                if state != SUCCEEDED or refresh or self.lookup is None or in_cache:
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
            elif state == SUCCEEDED and self.lookup is not None and not in_cache:
                # The ledger says done but the image is gone from the cache (cleaned, moved): generate it again.
                c.execute(f"UPDATE requests SET {REPLANNED}, cached=0 WHERE hash=?", (now, h))
                known[h] = _code(PLANNED, False) | _IN_RUN
            elif state == FAILED or (state == BLOCKED and self.retry_blocked):
                # A new run gives requests that ran out of attempts before a fresh set.
                c.execute(f"UPDATE requests SET {REPLANNED} WHERE hash=?", (now, h))
                known[h] = _code(PLANNED, code & 1) | _IN_RUN
        if self.known is not None and self.known.added is not None and len(self.known.added) > self.tuning.inline_max_requests:
            # Bounded memory: the run is counted in SQL at the end. In the SQL path each batch's requests are asked
            # afresh; with the ledger read, a request this plan made and meets again is made again (INSERT OR IGNORE).
            if self.knows_ledger:
                self.known.added = None
            else:
                self.known = None
        self.new_requests += len(new)
        if self.new_requests >= self.tuning.new_requests_for_big_cache:
            self._take_big_page_cache()
        c.executemany(_INSERT_NEW, new)

    def _take_big_page_cache(self) -> None:
        if self.big_page_cache is not None:
            self.big_page_cache()
            self.big_page_cache = None

    def run_tally(self) -> tuple[int, int, dict[str, int]] | None:
        """The run's distinct requests, how many are cache hits, and how many are in each state, if this plan
        still holds every request it saw (`known`); else None. One pass over the codes, in C."""
        if self.known is None or self.known.added is None:
            return None
        requests = hits = 0
        states = dict.fromkeys(_STATES, 0)
        for code, n in self.known.counts().items():
            if code & _IN_RUN:
                requests += n
                hits += n if code & 1 else 0
                states[_state_of(code)] += n
        return requests, hits, states


class _Known:
    """Requests by hash -> state code: the ledger's, read once into a compact HashTable (or none: the SQL path), and
    the ones the plan added or read since, in a dict. `look_up` a batch's hashes before `get`/`set`ting them: one
    vectorised search of the table for the batch."""

    def __init__(self, table: HashTable | None):
        self.table = table
        self.added: dict[str, int] | None = {}  # None: no longer kept (PlanWriter._record's bound)
        self._at: dict[str, int] = {}  # the batch's hashes that are in the table: where

    def look_up(self, hashes: list[str]) -> None:
        if self.table is not None and len(self.table):
            self._at = {h: p for h, p in zip(hashes, self.table.positions(hashes).tolist()) if p >= 0}

    def get(self, h: str) -> int | None:
        p = self._at.get(h)
        if p is not None:
            return int(self.table.codes[p])
        return self.added.get(h) if self.added is not None else None

    def __setitem__(self, h: str, code: int) -> None:
        p = self._at.get(h)
        if p is not None:
            self.table.codes[p] = code
        elif self.added is not None:
            self.added[h] = code

    def __contains__(self, h: str) -> bool:
        return self.get(h) is not None

    def update(self, pairs) -> None:
        self.added.update(pairs)

    def counts(self) -> dict[int, int]:
        """How many requests have each code (while `added` is kept)."""
        counts = collections.Counter(self.added.values())
        if self.table is not None:
            for code, n in enumerate(np.bincount(self.table.codes).tolist()):
                if n:
                    counts[code] += n
        return counts


def known_requests(c: sqlite3.Connection, known_max_requests: int) -> HashTable | None:
    """Every request of the ledger, hash -> state code (_CODE_SQL), if there are at most `known_max_requests`:
    one scan of the table instead of a probe of its index per request (1.3 s against ~5 s at 1M requests)."""
    # The largest rowid bounds their number (one probe); past the bound, a prune (housekeeping) may have deleted
    # requests below it, so count them (~0.1 s a million) before giving up the fast path.
    if c.execute("SELECT COALESCE(MAX(rowid), 0) FROM requests").fetchone()[0] > known_max_requests \
            and c.execute("SELECT COUNT(*) FROM requests").fetchone()[0] > known_max_requests:
        return None
    cursor = c.execute(f"SELECT hash, {_CODE_SQL} FROM requests")  # before the big page cache, if the plan takes it

    def pages():
        while rows := cursor.fetchmany(50_000):
            yield [h for h, _ in rows], [code for _, code in rows]

    try:
        return HashTable.build(pages())
    except ValueError:  # a hash that is not 64 hex digits (no batcher writes one): the SQL path asks for each exactly
        return None




# ---- the run ---------------------------------------------------------------------------------------------------

class DuplicateIds(Exception):
    """Two rows of a run share an id and variant (found when a bulk load builds its indexes)."""


@contextlib.contextmanager
def bulk_load(ledger: Ledger, c: sqlite3.Connection) -> Iterator[None]:
    """Ledger.bulk_load, with a duplicate id said as DuplicateIds."""
    try:
        with ledger.bulk_load(c):
            yield
    except sqlite3.IntegrityError as exc:
        raise DuplicateIds(str(exc)) from None


@contextlib.contextmanager
def rows_savepoint(c: sqlite3.Connection) -> Iterator[Callable[[], None]]:
    """A savepoint around a plan's rows; yields `undo` (back to it: a bulk load that met a duplicate id, loaded
    again the careful way). An error that unwinds leaves it to the transaction's rollback."""
    c.execute("SAVEPOINT plan_rows")
    yield lambda: c.execute("ROLLBACK TO plan_rows")
    c.execute("RELEASE plan_rows")


def drop_run(c: sqlite3.Connection, run_id: int) -> None:
    """Forget a run's rows and the run (--refresh of the same manifest plans it again from scratch)."""
    c.execute("DELETE FROM rows WHERE run_id=?", (run_id,))
    c.execute("DELETE FROM runs WHERE id=?", (run_id,))


def new_run(c: sqlite3.Connection, fingerprint: str, manifest: str, options_json: str, extra_schema: bytes, now: float) -> int:
    cur = c.execute(
        "INSERT INTO runs(fingerprint, manifest, options_json, extra_schema, created_at) VALUES (?,?,?,?,?)",
        (fingerprint, manifest, options_json, extra_schema, now),
    )
    return cur.lastrowid


def has_requests(c: sqlite3.Connection) -> bool:
    return c.execute("SELECT 1 FROM requests LIMIT 1").fetchone() is not None


def finish_run(ledger: Ledger, c: sqlite3.Connection, run_id: int, rows: int, fresh: bool, requests: int | None,
               rejected: int = 0, rejects_path: str | None = None) -> None:
    """Record the run's row count, the rows it left out as invalid (and where they were written), and its distinct
    requests: every request of the ledger when it held none before (`fresh`), else `requests` when the plan counted
    them, else counted from its rows."""
    c.execute("UPDATE runs SET row_count=?, rejected=?, rejects_path=? WHERE id=?", (rows, rejected, rejects_path, run_id))
    if fresh:  # the ledger held no requests before this run: every request in it is this run's
        c.execute("UPDATE runs SET request_count=(SELECT COUNT(*) FROM requests) WHERE id=?", (run_id,))
    elif requests is not None:  # what the plan knows of every request it saw
        c.execute("UPDATE runs SET request_count=? WHERE id=?", (requests, run_id))
    else:
        ledger.set_run_request_count(c, run_id)


def replan_blocked(ledger: Ledger, run, now: float) -> None:
    """--retry-blocked on a run planned before: its blocked requests are planned again (what it paid stays)."""
    where, params = ledger.in_run(run["id"])
    with ledger.transaction() as c:
        c.execute(f"UPDATE requests SET {REPLANNED_IN_RUN} WHERE state=? AND {where}",
                  (run["created_at"], now, BLOCKED, *params))


def run_figures(ledger: Ledger, run_id: int, planned_rows: int | None) -> tuple[int, int, int]:
    """(manifest rows, distinct requests, rows one per variant) of a run; a run planned before the ledger recorded
    its distinct requests gets them recorded now."""
    c = ledger.conn
    run = c.execute("SELECT row_count, request_count FROM runs WHERE id=?", (run_id,)).fetchone()
    if planned_rows is None:
        planned_rows = c.execute("SELECT COUNT(*) FROM rows WHERE run_id=?", (run_id,)).fetchone()[0]
    if run["request_count"] is None:  # a run planned before the ledger recorded it
        with ledger.transaction() as tx:
            ledger.set_run_request_count(tx, run_id)
        run = c.execute("SELECT row_count, request_count FROM runs WHERE id=?", (run_id,)).fetchone()
    return run["row_count"], run["request_count"], planned_rows


# ---- images gone from the cache --------------------------------------------------------------------------------

def run_hash_pages(ledger: Ledger, run_id: int, page: int) -> Iterator[list[str]]:
    """The request hashes of the run's rows, `page` at a time (bounded memory)."""
    rows = ledger.conn.cursor()
    rows.row_factory = None
    rows.execute("SELECT request_hash FROM rows WHERE run_id=?", (run_id,))
    while hashes := [h for (h,) in rows.fetchmany(page)]:
        yield hashes


def done_among(ledger: Ledger, hashes: list[str]) -> list[str]:
    """Which of `hashes` the ledger says are done (succeeded)."""
    return [h for (h,) in ledger.conn.execute(
        "SELECT hash FROM requests WHERE state=? AND hash IN (SELECT value FROM json_each(?))",
        (SUCCEEDED, json.dumps(hashes)))]


def replan_lost(ledger: Ledger, hashes: list[str], run_started: float, now: float) -> None:
    """Done requests whose image the cache lost are planned again (what this run paid for them stays)."""
    with ledger.transaction() as c:
        c.executemany(f"UPDATE requests SET {REPLANNED_IN_RUN}, cached=0 WHERE hash=? AND state=?",
                      [(run_started, now, h, SUCCEEDED) for h in hashes])


# ---- fallbacks -------------------------------------------------------------------------------------------------

def failed_for_fallback(c: sqlite3.Connection, ledger: Ledger, run_id: int, fallback_model: str) -> list[sqlite3.Row]:
    """The run's requests that failed for good on a model other than the fallback: (hash, body_json, variant, error)."""
    where, params = ledger.in_run(run_id)
    return c.execute(f"SELECT hash, body_json, variant, error FROM requests WHERE state=? AND model<>? AND {where}",
                     (FAILED, fallback_model, *params)).fetchall()


def add_fallback(c: sqlite3.Connection, run_id: int, failed_hash: str, h: str, model: str, body_json: str, variant: int,
                 cached: bool, now: float) -> None:
    """The fallback request `h` of a failed one (planned, or done when the cache has its image already), and the
    run's rows that pointed at the failed request point at it."""
    if c.execute("SELECT 1 FROM requests WHERE hash=?", (h,)).fetchone() is None:
        c.execute(
            "INSERT INTO requests(hash, model, body_json, state, cached, variant, fallback_of, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (h, model, body_json, SUCCEEDED if cached else PLANNED, int(cached), variant, failed_hash, now))
    c.execute("UPDATE rows SET request_hash=? WHERE run_id=? AND request_hash=?", (h, run_id, failed_hash))
