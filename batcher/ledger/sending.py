"""What sending jobs reads and writes: the planned requests in the order they are sent (sharding and the budget take
this one path), the jobs they go into, their input files and reference images, and what is in flight (quota)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import LedgerError
from .core import Ledger
from .schema import J_CREATING, J_PLANNED, J_SUBMITTED, J_UPLOADED, J_UPLOADING, PLANNED, QUEUED

SHARD_PAGE = 20_000  # planned requests read at a time (bounded memory)
IN_FLIGHT = (J_CREATING, J_SUBMITTED)


def _unsent(alias: str = "") -> str:
    """SQL for requests still to be sent: planned, or queued in a job not yet created (parameters: _UNSENT_PARAMS)."""
    return f"({alias}state=? OR ({alias}state=? AND {alias}job_id IN (SELECT id FROM jobs WHERE state IN (?,?,?))))"


_UNSENT_PARAMS = (PLANNED, QUEUED, J_PLANNED, J_UPLOADING, J_UPLOADED)
HOLDING_FILES = (J_UPLOADED, J_CREATING, J_SUBMITTED)


# ---- the planned requests, in the order they are sent ----------------------------------------------------------

def planned_models(ledger: Ledger) -> list[str]:
    """The models of the planned requests, in the order sharding (and the budget, which must agree) takes them."""
    return [r[0] for r in ledger.conn.execute("SELECT DISTINCT model FROM requests WHERE state=?", (PLANNED,))]


# What the shard limits need of a stored request, measured in SQLite: (body bytes, body characters, image size or
# None, reference images).
_MEASURES = ("length(CAST(body_json AS BLOB)), length(body_json), "
             "CASE WHEN instr(body_json, '\"imageSize\"') THEN json_extract(body_json, '$.generationConfig.imageConfig.imageSize') END, "
             "CASE WHEN instr(body_json, '\"fileData\"') THEN (length(body_json) - length(replace(body_json, '\"fileData\"', ''))) / 10 ELSE 0 END")


def planned_pages(ledger: Ledger, model: str, *, bodies: bool = False) -> Iterator[list[tuple]]:
    """The planned requests of `model` a page at a time (bounded memory), in rowid order: (rowid, body bytes, body
    characters, image size or None, reference images[, body JSON]). What the shard limits need is measured in
    SQLite: without `bodies` they never come to Python. Requests the caller moves out of `planned` as it goes are
    not seen again (paging by rowid sees each request once)."""
    last_rowid = -1
    body = ", body_json" if bodies else ""
    while True:
        page = ledger.conn.execute(
            f"SELECT rowid, {_MEASURES}{body} FROM requests WHERE state=? AND model=? AND rowid>? ORDER BY rowid LIMIT ?",
            (PLANNED, model, last_rowid, SHARD_PAGE)).fetchall()
        if not page:
            return
        last_rowid = page[-1][0]
        yield page


def queued_bodies(ledger: Ledger) -> list[tuple[str, str]]:
    """(model, body JSON) of every request in a job (the budget's estimate of what is in flight)."""
    return ledger.conn.execute("SELECT model, body_json FROM requests WHERE state=?", (QUEUED,)).fetchall()


def models_to_send(ledger: Ledger) -> set[str]:
    """The models of the requests not yet in a job and of the jobs not yet created (the state index answers)."""
    models = {m for (m,) in ledger.conn.execute("SELECT DISTINCT model FROM requests WHERE state=?", (PLANNED,))}
    models.update(m for (m,) in ledger.conn.execute("SELECT DISTINCT model FROM jobs WHERE state IN (?,?,?)",
                                                     (J_PLANNED, J_UPLOADING, J_UPLOADED)))
    return models


def earlier_runs_using(ledger: Ledger, run_id: int | None, model: str) -> list[str]:
    """The manifests of other runs whose requests of `model` are still to be sent (planned, or in a job not yet
    created), when the run `run_id` has none of its own (else [])."""
    unsent = (f"q.model=? AND {_unsent('q.')}", (model, *_UNSENT_PARAMS))
    c = ledger.conn
    if run_id is not None and c.execute(f"SELECT 1 FROM rows w JOIN requests q ON q.hash=w.request_hash WHERE w.run_id=? "
                                        f"AND {unsent[0]} LIMIT 1", (run_id, *unsent[1])).fetchone():
        return []
    return [m for (m,) in c.execute(f"SELECT DISTINCT r.manifest FROM runs r JOIN rows w ON w.run_id=r.id "
                                    f"JOIN requests q ON q.hash=w.request_hash WHERE r.id IS NOT ? AND {unsent[0]} LIMIT 5",
                                    (run_id, *unsent[1]))]


def unsent_by_model(ledger: Ledger) -> dict[str, int]:
    """How many requests of each model are still to be sent: planned, or in a job not yet created."""
    return dict(ledger.conn.execute(
        f"SELECT model, COUNT(*) FROM requests WHERE {_unsent()} GROUP BY model", _UNSENT_PARAMS).fetchall())


def unsent_by_size(ledger: Ledger, model: str, sizes: Iterable[str]) -> dict[str | None, int]:
    """How many requests of `model` still to be sent ask for each image size (None: no size, the model's default)."""
    sizes = list(sizes)
    cases = ", ".join(f"SUM(body_json LIKE '%\"imageSize\":\"{s}\"%')" for s in sizes)
    row = ledger.conn.execute(f"SELECT COUNT(*){', ' + cases if sizes else ''} FROM requests WHERE model=? AND {_unsent()}",
                              (model, *_UNSENT_PARAMS)).fetchone()
    counts = dict(zip(sizes, (n or 0 for n in row[1:])))
    counts[None] = row[0] - sum(counts.values())
    return counts


# ---- jobs ------------------------------------------------------------------------------------------------------

def insert_job(ledger: Ledger, model: str, count: int, in_bytes: int, tokens: int, now: float) -> int:
    c = ledger.conn
    cur = c.execute(
        "INSERT INTO jobs(display_name, model, state, request_count, input_bytes, est_tokens, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
        (f"pending-{uuid.uuid4().hex}", model, J_PLANNED, count, in_bytes, tokens, now, now),
    )
    job_id = cur.lastrowid
    # Deterministic, unique per workdir and job: how a crashed create is found again in the API's job list.
    c.execute("UPDATE jobs SET display_name=? WHERE id=?", (f"batcher-{ledger.ledger_id}-job{job_id:05d}", job_id))
    return job_id


def new_job(ledger: Ledger, model: str, count: int, in_bytes: int, tokens: int, first_rowid: int, last_rowid: int,
            now: float) -> int:
    """A job of `count` planned requests of `model` with rowids from first_rowid to last_rowid (sharding takes them
    in rowid order, so they are exactly the planned requests of that model in that range): they are queued in it."""
    c = ledger.conn
    job_id = insert_job(ledger, model, count, in_bytes, tokens, now)
    members = "WHERE state=? AND model=? AND rowid BETWEEN ? AND ?"  # a range of the (state, model) index
    added = c.execute(f"INSERT INTO job_requests(job_id, hash) SELECT ?, hash FROM requests {members} ORDER BY rowid",
                      (job_id, PLANNED, model, first_rowid, last_rowid)).rowcount
    queued = c.execute(f"UPDATE requests SET state=?, job_id=?, updated_at=? {members}",
                       (QUEUED, job_id, now, PLANNED, model, first_rowid, last_rowid)).rowcount
    if added != count or queued != count:  # the range must hold exactly the requests the shard counted
        raise LedgerError(f"job {job_id}: expected {count} planned requests of {model} in rowids {first_rowid}..{last_rowid}, "
                          f"found {added} and {queued}")
    return job_id


def short_jobs(ledger: Ledger, job_ids: list[int]) -> list[int]:
    """Of these jobs, those with fewer members than their request_count (a bulk load removed copies of requests
    they were counted with: planning.planner's inline sharding past the preparer's marking bound)."""
    return [job_id for (job_id,) in ledger.conn.execute(
        "SELECT j.id FROM jobs j WHERE j.id IN (SELECT value FROM json_each(?)) "
        "AND j.request_count > (SELECT COUNT(*) FROM job_requests m WHERE m.job_id = j.id)", (json.dumps(job_ids),))]


def member_measures(ledger: Ledger, job_id: int) -> list[tuple]:
    """What the shard limits need of each member of a job (as `planned_pages` gives it, without the rowid)."""
    return ledger.conn.execute(f"SELECT {_MEASURES} FROM requests WHERE job_id=?", (job_id,)).fetchall()


def drop_empty_job(ledger: Ledger, job_id: int) -> None:
    """A job, planned and not yet written anywhere, that was left without members."""
    ledger.conn.execute("DELETE FROM jobs WHERE id=? AND state=? AND NOT EXISTS (SELECT 1 FROM job_requests WHERE job_id=?)",
                        (job_id, J_PLANNED, job_id))


def close_job(ledger: Ledger, job_id: int, count: int, in_bytes: int, tokens: int) -> None:
    """A job filled as its requests were loaded (planning.planner's inline sharding) gets its totals."""
    ledger.conn.execute("UPDATE jobs SET request_count=?, input_bytes=?, est_tokens=? WHERE id=?",
                        (count, in_bytes, tokens, job_id))


def record_members(ledger: Ledger, job_ids: list[int]) -> None:
    """Record the members of jobs whose requests went in with their job id (one statement in C, instead of a row at
    a time as they load)."""
    ledger.conn.execute("INSERT INTO job_requests(job_id, hash) SELECT job_id, hash FROM requests "
                        "WHERE job_id IN (SELECT value FROM json_each(?))", (json.dumps(job_ids),))


def job_hashes(ledger: Ledger, job_id: int) -> list[str]:
    """Every request a job was made with."""
    return [h for (h,) in ledger.conn.execute("SELECT hash FROM job_requests WHERE job_id=?", (job_id,))]


def queued_of_job(ledger: Ledger, job_id: int) -> Iterator[tuple[str, str]]:
    """(hash, body JSON) of the requests queued in a job, in the order the shard took them. A job's requests stay
    queued in it until it has run, so they are the requests whose job_id is this job (one index range)."""
    return ledger.conn.execute("SELECT hash, body_json FROM requests WHERE job_id=? AND state=? ORDER BY rowid", (job_id, QUEUED))


def set_job_input(ledger: Ledger, job_id: int, jsonl_path: Path, input_bytes: int) -> None:
    with ledger.transaction() as c:
        c.execute("UPDATE jobs SET jsonl_path=?, input_bytes=? WHERE id=?", (str(jsonl_path), input_bytes, job_id))


def record_api_state(c: sqlite3.Connection, job_id: int, api_state: str, stats_json: str, api_created_at: str | None,
                     now: float) -> None:
    """What the API said of a job when it was last read (within a transaction)."""
    c.execute("UPDATE jobs SET api_state=?, stats_json=?, api_created_at=COALESCE(?, api_created_at), updated_at=? WHERE id=?",
              (api_state, stats_json, api_created_at, now, job_id))


def live_input_files(ledger: Ledger) -> set[str]:
    """The uploaded input files that live jobs still use (uploaded, creating, submitted)."""
    return {r[0] for r in ledger.conn.execute(
        "SELECT input_file FROM jobs WHERE input_file IS NOT NULL AND state IN (?,?,?)",
        (J_UPLOADED, J_CREATING, J_SUBMITTED),
    )}


def release_job(ledger: Ledger, job_id: int, states: tuple[str, ...], new_state: str, why: str, now: float) -> None:
    """A job never created: its requests go back to planned (without an attempt), and the job to `new_state`."""
    with ledger.transaction() as c:
        c.execute("UPDATE requests SET state=?, job_id=NULL, updated_at=? WHERE job_id=? AND state=?",
                  (PLANNED, now, job_id, QUEUED))
        ledger.job_transition(c, job_id, states, new_state, error=why)


# ---- reference images ------------------------------------------------------------------------------------------

def reference_paths(ledger: Ledger) -> dict[str, str]:
    """Every reference image a plan saw: content hash -> the path it was read from."""
    return {sha: path for sha, path in ledger.conn.execute("SELECT sha256, path FROM reference_files")}


def has_references(ledger: Ledger) -> bool:
    return ledger.conn.execute("SELECT 1 FROM reference_files LIMIT 1").fetchone() is not None


def bodies_with_references(ledger: Ledger, job_id: int, marker: str) -> Iterator[str]:
    """The bodies of a job's queued requests that hold `marker` (a reference placeholder)."""
    for (body_json,) in ledger.conn.execute("SELECT body_json FROM requests WHERE job_id=? AND state=? AND body_json LIKE ?",
                                            (job_id, QUEUED, f"%{marker}%")):
        yield body_json


def upload_of(ledger: Ledger, sha: str) -> sqlite3.Row | None:
    """Where a reference image was last uploaded (file name, URI, MIME type, expiry), if it was."""
    return ledger.conn.execute("SELECT * FROM uploads WHERE sha256=?", (sha,)).fetchone()


def record_upload(ledger: Ledger, sha: str, file_name: str, uri: str, mime_type: str, expires_at: float) -> None:
    with ledger.transaction() as c:
        c.execute("INSERT OR REPLACE INTO uploads(sha256, file_name, uri, mime_type, expires_at) VALUES (?,?,?,?,?)",
                  (sha, file_name, uri, mime_type, expires_at))


# ---- what is in flight (quota) ---------------------------------------------------------------------------------

def jobs_in_flight(ledger: Ledger) -> int:
    marks = ",".join("?" * len(IN_FLIGHT))
    return ledger.conn.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", IN_FLIGHT).fetchone()[0]


def in_flight_tokens(ledger: Ledger, model: str) -> int:
    marks = ",".join("?" * len(IN_FLIGHT))
    return ledger.conn.execute(
        f"SELECT COALESCE(SUM(est_tokens), 0) FROM jobs WHERE model=? AND state IN ({marks})", (model, *IN_FLIGHT)
    ).fetchone()[0]


def files_bytes(ledger: Ledger) -> int:
    """Bytes of the input files our jobs hold in the API's Files storage."""
    marks = ",".join("?" * len(HOLDING_FILES))
    return ledger.conn.execute(
        f"SELECT COALESCE(SUM(input_bytes), 0) FROM jobs WHERE state IN ({marks})", HOLDING_FILES
    ).fetchone()[0]


def ledger_models(ledger: Ledger) -> list[str]:
    """Every model of the ledger's jobs and requests."""
    return sorted(r[0] for r in ledger.conn.execute("SELECT DISTINCT model FROM jobs UNION SELECT DISTINCT model FROM requests"))


def waiting(ledger: Ledger, model: str) -> tuple[int, int, int]:
    """(jobs not yet created, their enqueued tokens, requests not yet in a job) of `model`."""
    jobs, tokens = ledger.conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(est_tokens), 0) FROM jobs WHERE model=? AND state IN (?,?,?)",
        (model, J_PLANNED, J_UPLOADING, J_UPLOADED)).fetchone()
    planned = ledger.conn.execute("SELECT COUNT(*) FROM requests WHERE model=? AND state=?", (model, PLANNED)).fetchone()[0]
    return jobs, tokens, planned
