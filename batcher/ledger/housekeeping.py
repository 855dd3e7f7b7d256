"""Keeping the ledger bounded (`batcher prune`): the rows of old runs, the requests no kept run uses and the
finished jobs none of whose requests are left go, in one transaction; then the file is compacted (VACUUM).

What a resume needs always stays: the current run, every run with unfinished work (a row whose request is planned
or queued, or in a job not yet collected), those requests, and every job not yet collected. The image cache is
not touched here: a request dropped from the ledger that comes back later is a cache hit, not paid again.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field

from ..faults import maybe_crash
from .core import Ledger
from .schema import J_COLLECTED, PLANNED, QUEUED

_OPEN_STATES = (PLANNED, QUEUED)


@dataclass
class PruneCounts:
    """What a prune dropped (or, dry, would drop), and which runs it keeps."""

    kept_runs: list[int] = field(default_factory=list)  # newest first
    unfinished_runs: list[int] = field(default_factory=list)  # kept beyond the newest N: they have work to finish
    runs: int = 0
    rows: int = 0
    requests: int = 0
    jobs: int = 0
    job_names: list[str] = field(default_factory=list)  # the dropped jobs' display names (their files go too)


class _DryRun(Exception):
    """Rolls a dry run's transaction back once its counts are taken."""


def prune_runs(ledger: Ledger, keep_runs: int, dry_run: bool = False) -> PruneCounts:
    """Keep the newest `keep_runs` runs (at least 1) and every run with unfinished work; drop the rest of the runs
    with their rows, the requests no kept run's row names (unless planned, queued or in a job not yet collected),
    and the collected jobs none of whose requests are left, with their members. One transaction: a process killed
    in it leaves the ledger as it was. `dry_run`: the same work, rolled back (the counts are exact)."""
    if keep_runs < 1:
        raise ValueError("keep_runs must be at least 1: the current run is always kept")
    counts = PruneCounts()
    try:
        with ledger.big_page_cache(), ledger.transaction() as c:
            _prune(c, keep_runs, counts)
            maybe_crash("prune")  # test hook: see batcher/faults.py
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    finally:
        _drop_temp_tables(ledger.conn)
    return counts


def _prune(c: sqlite3.Connection, keep_runs: int, counts: PruneCounts) -> None:
    newest = [r for (r,) in c.execute("SELECT id FROM runs ORDER BY id DESC LIMIT ?", (keep_runs,))]
    older = [r for (r,) in c.execute("SELECT id FROM runs ORDER BY id DESC LIMIT -1 OFFSET ?", (keep_runs,))]
    # The requests a resume still needs: planned or queued (the state index), or in a job not yet collected.
    c.execute("CREATE TEMP TABLE prune_open(hash TEXT PRIMARY KEY) WITHOUT ROWID")
    c.execute("INSERT OR IGNORE INTO prune_open SELECT hash FROM requests WHERE state IN (?,?)", _OPEN_STATES)
    c.execute("INSERT OR IGNORE INTO prune_open SELECT jr.hash FROM jobs j JOIN job_requests jr ON jr.job_id = j.id "
              "WHERE j.state <> ?", (J_COLLECTED,))
    unfinished: list[int] = []
    if older and c.execute("SELECT 1 FROM prune_open LIMIT 1").fetchone():
        unfinished = [r for (r,) in c.execute(
            f"SELECT DISTINCT run_id FROM rows WHERE run_id IN ({_marks(older)}) "
            "AND request_hash IN (SELECT hash FROM temp.prune_open) ORDER BY run_id DESC", older)]
    counts.kept_runs = sorted(newest + unfinished, reverse=True)
    counts.unfinished_runs = unfinished
    dropped = [r for r in older if r not in set(unfinished)]
    counts.runs = len(dropped)
    if dropped:
        counts.rows = c.execute(f"DELETE FROM rows WHERE run_id IN ({_marks(dropped)})", dropped).rowcount
        c.execute(f"DELETE FROM runs WHERE id IN ({_marks(dropped)})", dropped)
    # What is left of `rows` is the kept runs' rows: the requests they name stay, with the open ones.
    c.execute("CREATE TEMP TABLE prune_keep(hash TEXT PRIMARY KEY) WITHOUT ROWID")
    c.execute("INSERT OR IGNORE INTO prune_keep SELECT request_hash FROM rows")
    c.execute("INSERT OR IGNORE INTO prune_keep SELECT hash FROM prune_open")
    counts.requests = c.execute(
        "DELETE FROM requests WHERE state NOT IN (?,?) AND hash NOT IN (SELECT hash FROM temp.prune_keep)",
        _OPEN_STATES).rowcount
    # A collected job goes once none of its requests is left (a kept run's image still names its job).
    jobs = c.execute("SELECT id, display_name FROM jobs j WHERE state=? AND NOT EXISTS (SELECT 1 FROM job_requests jr "
                     "JOIN requests r ON r.hash = jr.hash WHERE jr.job_id = j.id) AND NOT EXISTS "
                     "(SELECT 1 FROM requests r WHERE r.job_id = j.id)", (J_COLLECTED,)).fetchall()
    if jobs:
        ids = [j for j, _ in jobs]
        c.execute(f"DELETE FROM job_requests WHERE job_id IN ({_marks(ids)})", ids)
        c.execute(f"DELETE FROM jobs WHERE id IN ({_marks(ids)})", ids)
    counts.jobs = len(jobs)
    counts.job_names = [name for _, name in jobs]


def _marks(values: list) -> str:
    return ",".join("?" * len(values))


def _drop_temp_tables(conn: sqlite3.Connection) -> None:
    for name in ("prune_open", "prune_keep"):
        conn.execute(f"DROP TABLE IF EXISTS temp.{name}")


def job_names(ledger: Ledger) -> set[str]:
    """The display names of every job the ledger holds (a job file of any other name is left over)."""
    return {name for (name,) in ledger.conn.execute("SELECT display_name FROM jobs")}


def compact(ledger: Ledger) -> None:
    """Give the pages freed back to the file system: VACUUM (after the prune's commit: it runs in a transaction
    of its own, so a kill in it leaves the ledger as it was), then empty the WAL it was written through."""
    ledger.conn.execute("VACUUM")
    ledger.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def file_bytes(ledger: Ledger) -> int:
    """The ledger's size on disk: the database file and its write-ahead log."""
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.path.getsize(f"{ledger.path}{suffix}")
        except FileNotFoundError:
            pass
    return total


def table_counts(ledger: Ledger) -> dict[str, int]:
    """How many runs, rows, requests and jobs the ledger holds."""
    return {t: ledger.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("runs", "rows", "requests", "jobs")}
