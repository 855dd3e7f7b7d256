"""The ledger: SQLite (WAL) in the workdir, the single source of truth for resuming, and the one boundary to the
database: every SQL statement of batcher is in this package (`batcher.ledger`): here the connection, transactions,
runs, jobs and counts; in `plans` what a plan writes, in `sending` what sending jobs reads and writes, in
`outcomes` how results are recorded, in `reading` what the dataset and the report read.

Job and request states change only through named transitions, which update `WHERE state IN (...)` and raise
LedgerError when nothing matched, so an impossible transition is loud, never silent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from ..errors import LedgerError, WorkdirBusyError
from .schema import BULK_INDEXES, BUSY_TIMEOUT_MS, connect, connect_read_only, migrate, use_wal

log = logging.getLogger(__name__)

# Ledger.change_counter's temporary triggers: (name, table, event).
_CHANGE_TRIGGERS = [(f"batcher_{table}_{event.lower()}", table, event)
                    for table in ("requests", "rows") for event in ("INSERT", "UPDATE", "DELETE")]
BULK_CACHE_KIB = 256 * 1024  # see Ledger.big_page_cache: 1M requests' hash index stays in memory


class WorkdirLock:
    """An exclusive lock on the workdir. The OS releases flock when its holder dies, so a lock left by a
    killed process is taken over at once; the pid written in the file names the current holder."""

    def __init__(self, workdir: Path):
        self.path = workdir / "lock"
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(self.fd)
                    self.fd = None
                    raise WorkdirBusyError(
                        f"workdir {self.path.parent} is in use by another batcher process (pid {holder}); "
                        "wait for it to finish, or use another --workdir", holder
                    ) from None
                time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Ledger:
    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "ledger.sqlite"
        self.conn = connect(self.path)
        migrate(self.conn)
        self.ledger_id = self._ensure_ledger_id()
        self._counting = 0  # change_counter uses open

    @classmethod
    def read_only(cls, workdir: str | os.PathLike) -> "Ledger":
        """The ledger of a workdir another command holds, to read (status): nothing is migrated, created or locked."""
        ledger = cls.__new__(cls)
        ledger.workdir = Path(workdir)
        ledger.path = ledger.workdir / "ledger.sqlite"
        ledger.conn = connect_read_only(ledger.path)
        row = ledger.conn.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()
        ledger.ledger_id = row[0] if row else ""
        ledger._counting = 0
        return ledger

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def change_counter(self) -> Iterator[Callable[[], int]]:
        """Yields a function that tells how many changes to `requests` and `rows` this connection has committed
        (a number that only grows): temporary triggers count them (nothing is written to the ledger file; a
        rolled-back change is not counted). Figures about a run still hold while it returns the same number
        (the workdir lock keeps other writers out), so they need not be computed again (~3 s at 1M rows).
        Nested uses share the triggers; the outermost removes them."""
        c = self.conn
        outermost = self._counting == 0
        if outermost:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS batcher_changes(n INTEGER NOT NULL)")
            c.execute("INSERT INTO batcher_changes SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM batcher_changes)")
            for name, table, event in _CHANGE_TRIGGERS:
                c.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS {name} AFTER {event} ON main.{table} "
                          "BEGIN UPDATE batcher_changes SET n = n + 1; END")
        self._counting += 1
        try:
            yield lambda: c.execute("SELECT n FROM temp.batcher_changes").fetchone()[0]
        finally:
            self._counting -= 1
            if outermost:
                # The table stays (a few bytes, gone with the connection): SQLite refuses to drop a table while a
                # statement is still open, and an error here would hide the one that is unwinding (Ctrl-C, ...).
                try:
                    for name, _, _ in _CHANGE_TRIGGERS:
                        c.execute(f"DROP TRIGGER IF EXISTS temp.{name}")
                except sqlite3.OperationalError as exc:  # left in place: they only count, into the table kept
                    log.debug("change counter triggers left until the connection closes: %s", exc)

    @contextlib.contextmanager
    def big_page_cache(self) -> Iterator[None]:
        """A larger SQLite page cache for bulk work (planning into a ledger that holds requests, sharding, writing
        JSONL): the random 64-hex keys of the requests' hash index thrash the default 2 MB cache once the ledger
        holds ~100k requests.
        Restored afterwards; the memory is only taken as pages are read. Nested uses keep the outer one."""
        old = self.conn.execute("PRAGMA cache_size").fetchone()[0]
        if old == -BULK_CACHE_KIB:
            yield
            return
        self.conn.execute(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
        try:
            yield
        finally:
            self.conn.execute(f"PRAGMA cache_size={int(old)}")

    def is_empty(self) -> bool:
        """No requests and no rows yet: a fresh workdir."""
        c = self.conn
        return c.execute("SELECT 1 FROM requests LIMIT 1").fetchone() is None and \
            c.execute("SELECT 1 FROM rows LIMIT 1").fetchone() is None

    @contextlib.contextmanager
    def journal_for_new_pages(self) -> Iterator[bool]:
        """Around a transaction that fills an empty ledger: a rollback journal instead of the WAL. A rollback
        journal keeps only pages that existed before, and nearly every page of such a load is new, so each is
        written once; through the WAL each is written twice (WAL, then checkpoint): ~3 s of a 1M-row plan.
        Needs the database to itself (the workdir lock keeps writers out; a reader makes it keep the WAL).
        Yields whether it switched. WAL comes back afterwards, and every connection asks for it when it opens.
        Meanwhile an outside reader (the sqlite3 shell, a dashboard) waits for the commit, and a read it holds
        open holds up the load; batcher's own commands never read a workdir another one has locked."""
        try:
            switched = self.conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0].lower() == "delete"
        except sqlite3.OperationalError:  # "database is locked": another connection is reading it
            switched = False
        if switched:  # a rollback journal is only as safe on power loss as WAL with NORMAL when fully synced
            self.conn.execute("PRAGMA synchronous=FULL")
        try:
            yield switched
        finally:
            if switched:
                self.conn.execute("PRAGMA synchronous=NORMAL")
                # A reader's lock lasts milliseconds: try for ~5 s, each try without the 30 s busy wait.
                self.conn.execute("PRAGMA busy_timeout=0")
                try:
                    back = use_wal(self.conn, attempts=100)
                finally:
                    self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                if not back:
                    log.warning("%s: still in rollback-journal mode (a reader held it); the next batcher command "
                                "switches it back to WAL", self.path)

    @contextlib.contextmanager
    def bulk_load(self, c: sqlite3.Connection) -> Iterator[None]:
        """Load an empty ledger's `requests` and `rows` without their secondary indexes, then build each index
        once: SQLite sorts to build an index, several times cheaper than a random-order B-tree insert per row.

        Use it inside a transaction (or savepoint) that is rolled back on any error: the indexes are dropped in
        it, so a rollback brings them back. Requests loaded twice (rows sharing a request) keep their first copy.
        Raises sqlite3.IntegrityError if two rows of a run share an id and variant."""
        for name in BULK_INDEXES:
            c.execute(f"DROP INDEX {name}")
        yield
        try:
            c.execute(BULK_INDEXES["requests_by_hash"])
        except sqlite3.IntegrityError:
            c.execute("DELETE FROM requests WHERE rowid NOT IN (SELECT MIN(rowid) FROM requests GROUP BY hash)")
            c.execute(BULK_INDEXES["requests_by_hash"])
        for name, ddl in BULK_INDEXES.items():
            if name != "requests_by_hash":
                c.execute(ddl)

    def _ensure_ledger_id(self) -> str:
        with self.transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()
            if row:
                return row[0]
            value = uuid.uuid4().hex[:12]
            c.execute("INSERT INTO meta(key, value) VALUES ('ledger_id', ?)", (value,))
            return value

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # ---- runs -------------------------------------------------------------------------------------
    def current_run(self) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()

    def run(self, run_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()

    def run_by_fingerprint(self, fingerprint: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM runs WHERE fingerprint=?", (fingerprint,)).fetchone()

    # ---- transitions ------------------------------------------------------------------------------
    def _transition(self, c: sqlite3.Connection, table: str, key: str, key_value, allowed: tuple[str, ...], new: str, **fields) -> None:
        sets = ", ".join(["state=?", "updated_at=?"] + [f"{k}=?" for k in fields])
        marks = ",".join("?" * len(allowed))
        cur = c.execute(
            f"UPDATE {table} SET {sets} WHERE {key}=? AND state IN ({marks})",
            (new, time.time(), *fields.values(), key_value, *allowed),
        )
        if cur.rowcount != 1:
            row = c.execute(f"SELECT state FROM {table} WHERE {key}=?", (key_value,)).fetchone()
            raise LedgerError(f"{table[:-1]} {key_value}: cannot go from {row[0] if row else 'missing'} to {new}")

    def job_transition(self, c: sqlite3.Connection, job_id: int, allowed: tuple[str, ...], new: str, **fields) -> None:
        self._transition(c, "jobs", "id", job_id, allowed, new, **fields)

    def request_transition(self, c: sqlite3.Connection, h: str, allowed: tuple[str, ...], new: str, **fields) -> None:
        self._transition(c, "requests", "hash", h, allowed, new, **fields)

    # ---- queries ----------------------------------------------------------------------------------
    def jobs(self, states: tuple[str, ...] | None = None) -> list[sqlite3.Row]:
        if states is None:
            return self.conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        marks = ",".join("?" * len(states))
        return self.conn.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states).fetchall()

    def job(self, job_id: int) -> sqlite3.Row:
        return self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()

    def count_in_state(self, state: str) -> int:
        """How many requests of the ledger are in `state` (a range of the state index)."""
        return self.conn.execute("SELECT COUNT(*) FROM requests WHERE state=?", (state,)).fetchone()[0]

    def request_counts(self, run_id: int | None = None) -> dict[str, int]:
        return self.counts_by("state", run_id)

    def counts_by(self, column: str, run_id: int | None = None) -> dict:
        """How many of the run's requests (every request: run_id None) have each value of `column` of `requests`."""
        source, params = self._run_requests(run_id) if run_id is not None else ("requests r", ())
        return dict(self.conn.execute(f"SELECT r.{column}, COUNT(*) FROM {source} GROUP BY r.{column}", params))

    def run_summary(self, run_id: int, paid_since: float) -> tuple[dict[str, int], int, float]:
        """The run's requests in one pass: how many are in each state, how many are cache hits (`cached`), and
        what was paid for them since `paid_since`, not from the cache (ledger.reading.run_spend_usd)."""
        source, params = self._run_requests(run_id)
        rows = self.conn.execute("SELECT r.state, SUM(r.cached), SUM(CASE WHEN r.cached=0 AND r.updated_at >= ? "
                                 f"THEN r.cost_usd ELSE 0 END), COUNT(*) FROM {source} GROUP BY r.state",
                                 (paid_since, *params))
        counts, hits, spent = {}, 0, 0.0
        for state, cached, cost, n in rows:
            counts[state] = n
            hits += cached or 0
            spent += cost or 0.0
        return counts, hits, spent

    def _run_requests(self, run_id: int) -> tuple[str, tuple]:
        """A FROM clause (and its parameters) giving the run's requests once each, as `r`, the cheapest way."""
        where, params = self.in_run(run_id)
        if where != "1" and self._run_rows_have_distinct_requests(run_id):
            # Each of the run's rows has a request of its own: the join of its rows is exact, and ~2.5x cheaper
            # than building the set of its hashes first (3 s instead of 8 s at 1M rows).
            return "rows w JOIN requests r ON r.hash = w.request_hash WHERE w.run_id=?", (run_id,)
        return f"requests r WHERE {where}", params

    def _run_rows_have_distinct_requests(self, run_id: int) -> bool:
        run = self.conn.execute("SELECT request_count FROM runs WHERE id=?", (run_id,)).fetchone()
        if run is None or run[0] is None:
            return False
        return run[0] == self.conn.execute("SELECT COUNT(*) FROM rows WHERE run_id=?", (run_id,)).fetchone()[0]

    def in_run(self, run_id: int) -> tuple[str, tuple]:
        """A condition on `requests` (and its parameters) that holds for the run's requests. When the run's
        requests are every request in the ledger it is `1`: no join over the run's (maybe millions of) rows."""
        if self._run_has_every_request(run_id):
            return "1", ()
        return "hash IN (SELECT request_hash FROM rows WHERE run_id=?)", (run_id,)

    def _run_has_every_request(self, run_id: int) -> bool:
        """True when the run's requests are every request in the ledger (a workdir used for one manifest).
        Every hash a row points to has a requests row (a prune deletes only requests no row names), so equal
        counts mean equal sets (anything that deletes a request a row names, or repoints rows, must refresh
        runs.request_count)."""
        run = self.conn.execute("SELECT request_count FROM runs WHERE id=?", (run_id,)).fetchone()
        if run is None or run[0] is None:
            return False
        return run[0] == self.conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

    def set_run_request_count(self, c: sqlite3.Connection, run_id: int) -> None:
        """Record how many distinct requests the run's rows point to (after its rows change)."""
        c.execute("UPDATE runs SET request_count=(SELECT COUNT(DISTINCT request_hash) FROM rows WHERE run_id=?) WHERE id=?",
                  (run_id, run_id))
