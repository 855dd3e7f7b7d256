"""What the outputs read: the dataset's rows of a run (every row with its request's outcome, in manifest order),
what a run has paid, and which cached images a workdir still names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ..errors import UsageError
from .core import Ledger
from .schema import BLOCKED, SUCCEEDED, connect_read_only

# The columns of dataset_rows, in order.
DATASET_COLUMNS = ("row", "id", "variant", "prompt", "request_hash", "extra_json", "state", "error", "finish_reason",
                   "model", "aspect_ratio", "image_size", "seed", "temperature", "top_p", "variants", "attempts",
                   "cached", "prompt_tokens", "output_tokens", "thoughts_tokens", "cost_usd", "updated_at", "job")


def run_start(ledger: Ledger, run_id: int) -> tuple[float, bytes | None]:
    """(when the run began, the Arrow schema of its carried-through columns, serialised) (0.0, None: no such run)."""
    run = ledger.conn.execute("SELECT extra_schema, created_at FROM runs WHERE id=?", (run_id,)).fetchone()
    return (run["created_at"], run["extra_schema"]) if run else (0.0, None)


def dataset_rows(ledger: Ledger, run_id: int, batch: int) -> Iterator[list[tuple]]:
    """The run's rows, one per manifest row and variant, with their request's settings as sent, its outcome and job
    (DATASET_COLUMNS), `batch` at a time as plain tuples (a million rows)."""
    query = ledger.conn.cursor()
    query.row_factory = None
    query.execute(
        """SELECT w.row, w.id, w.variant, w.prompt, w.request_hash, w.extra_json,
                  r.state, r.error, r.finish_reason, r.model,
                  json_extract(r.body_json, '$.generationConfig.imageConfig.aspectRatio'),
                  json_extract(r.body_json, '$.generationConfig.imageConfig.imageSize'),
                  json_extract(r.body_json, '$.generationConfig.seed'),
                  json_extract(r.body_json, '$.generationConfig.temperature'),
                  json_extract(r.body_json, '$.generationConfig.topP'),
                  (SELECT COUNT(*) FROM rows v WHERE v.run_id = w.run_id AND v.id = w.id),
                  r.attempts, r.cached, r.prompt_tokens, r.output_tokens,
                  r.thoughts_tokens, r.cost_usd, r.updated_at, j.display_name AS job
           FROM rows w JOIN requests r ON r.hash = w.request_hash LEFT JOIN jobs j ON j.id = r.job_id
           WHERE w.run_id=? ORDER BY w.seq""",
        (run_id,),
    )
    while rows := query.fetchmany(batch):
        yield rows


def run_spend_usd(ledger: Ledger, run, since: float | None = None) -> float:
    """What the run has paid: the payments for its requests since it began (or since `since`: what one command
    paid), not served from the cache, whatever state they are in now (one planned again within the run keeps what
    it cost: plans.REPLANNED_IN_RUN). An earlier run's requests in the same workdir were paid by that run; they are
    not counted again."""
    if run is None:
        return 0.0
    where, params = ledger.in_run(run["id"])
    start = max(run["created_at"], since) if since is not None else run["created_at"]
    return ledger.conn.execute(
        "SELECT COALESCE(SUM(cost_usd),0) FROM requests WHERE cached=0 "
        f"AND updated_at >= ? AND {where}", (start, *params)).fetchone()[0]


def images_before(ledger: Ledger, run) -> int:
    """How many of the run's requests had their image before the run began: a cache hit, or made by an earlier run
    of this workdir (neither is paid by this run)."""
    where, params = ledger.in_run(run["id"])
    return ledger.conn.execute(
        f"SELECT COUNT(*) FROM requests WHERE state=? AND (cached=1 OR updated_at < ?) AND {where}",
        (SUCCEEDED, run["created_at"], *params)).fetchone()[0]


def image_counts(ledger: Ledger, run_id: int) -> dict[str, int]:
    """How many of the run's images (its rows, one per manifest row and variant) have their request in each state:
    what its dataset will show, before it is written (a join over the run's rows: ~1 s a million)."""
    return dict(ledger.conn.execute(
        "SELECT r.state, COUNT(*) FROM rows w JOIN requests r ON r.hash = w.request_hash WHERE w.run_id=? GROUP BY r.state",
        (run_id,)).fetchall())


def job_results(ledger: Ledger) -> dict[int, dict[str, int]]:
    """For each job that has results recorded: how many of its requests came back with an image (`succeeded`) and
    how many blocked, as the ledger recorded them from its results."""
    out: dict[int, dict[str, int]] = {}
    for job_id, state, n in ledger.conn.execute(
            "SELECT job_id, state, COUNT(*) FROM requests WHERE job_id IS NOT NULL AND state IN (?, ?) GROUP BY job_id, state",
            (SUCCEEDED, BLOCKED)):
        out.setdefault(job_id, {})[state] = n
    return out


# ---- what the ledger remembers of the datasets it wrote (meta keys) -------------------------------------------

def _meta(ledger: Ledger, key: str) -> str | None:
    row = ledger.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else None


def _set_meta(ledger: Ledger, key: str, value: str | None) -> None:
    """Remember `value` under `key` (None: forget it), committed at once."""
    with ledger.transaction() as c:
        if value is None:
            c.execute("DELETE FROM meta WHERE key=?", (key,))
        else:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


# A dataset rewritten for a new run must lose the images no row of it names. The ledger remembers that duty from
# before the new metadata is in place until the images are gone, so a crash in between leaves it to the next write.

def prune_pending(ledger: Ledger, out: str) -> bool:
    return _meta(ledger, f"dataset_prune:{out}") is not None


def set_prune_pending(ledger: Ledger, out: str, pending: bool) -> None:
    _set_meta(ledger, f"dataset_prune:{out}", "1" if pending else None)


# `report` (and anyone reading a run later) finds the dataset a run last wrote without being told its --out.

def dataset_written(ledger: Ledger, run_id: int) -> str | None:
    return _meta(ledger, f"dataset_out:{run_id}")


def set_dataset_written(ledger: Ledger, run_id: int, out: str) -> None:
    _set_meta(ledger, f"dataset_out:{run_id}", out)


# ---- what a workdir names in the cache -------------------------------------------------------------------------

def referenced_hashes(workdir: str | os.PathLike) -> set[str]:
    """Every request hash the workdir's ledger names (its requests, and every run's rows): the cache entries its
    datasets and runs use (`batcher cache gc --keep-referenced`). The ledger is opened read-only and not locked: a
    command running in that workdir goes on undisturbed, and nothing is migrated or created."""
    path = Path(workdir) / "ledger.sqlite"
    if not path.is_file():
        raise UsageError(f"--keep-referenced {workdir}: no ledger there ({path} is missing); name a workdir "
                         "a run was made in")
    conn = connect_read_only(path)
    try:
        query = conn.cursor()
        query.execute("SELECT hash FROM requests UNION SELECT request_hash FROM rows")
        hashes: set[str] = set()
        while page := query.fetchmany(10_000):
            hashes.update(h for (h,) in page)
        return hashes
    finally:
        conn.close()


# ---- the shards of a sharded dataset (output.shards) ----------------------------------------------------------
# Each shard's digest (of the samples it holds) and size, recorded once it is in place and forgotten before it is
# replaced: a shard whose recorded digest matches what it would hold now is not written again.

def _shard_prefix(out: str) -> str:
    return f"dataset_shard:{out}:"


def shard_digest(ledger: Ledger, out: str, name: str) -> str | None:
    return _meta(ledger, _shard_prefix(out) + name)


def set_shard_digest(ledger: Ledger, out: str, name: str, digest: str | None) -> None:
    _set_meta(ledger, _shard_prefix(out) + name, digest)


def forget_shard_digests(ledger: Ledger, out: str, keep: set[str]) -> None:
    """Forget the digests of the dataset's shards other than `keep` (removed, or never to be trusted again)."""
    prefix = _shard_prefix(out)
    names = [k[len(prefix):] for (k,) in ledger.conn.execute(
        "SELECT key FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))]
    gone = [prefix + n for n in names if n not in keep]
    if gone:
        with ledger.transaction() as c:
            c.executemany("DELETE FROM meta WHERE key=?", [(k,) for k in gone])
