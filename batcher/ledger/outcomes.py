"""How a request's outcome is recorded: an image or a block is final (with its tokens and what it cost), an error is
tried again while attempts remain. Collect (batch results), the interactive fallback and the collectors on Ray all
record through these transitions, which only move a request from the state the caller expects it in."""

from __future__ import annotations

import sqlite3
from typing import Iterable

from .core import Ledger
from .schema import BLOCKED, FAILED, J_SUCCEEDED, PLANNED, QUEUED, SUCCEEDED

# A payment for a request, added to what its run paid for it before (plans.REPLANNED_IN_RUN keeps that; every other
# re-plan clears it). Parameters: (payment, payment); a payment of None leaves what was there.
ADD_PAYMENT = "cost_usd=COALESCE(cost_usd + ?, ?, cost_usd)"


def waiting_in_job(ledger: Ledger, job_id: int) -> dict[str, int]:
    """The requests a job's results may still answer: hash -> attempts so far (queued in it, and still its own)."""
    return {h: a for h, a in ledger.conn.execute(
        "SELECT r.hash, r.attempts FROM job_requests jr JOIN requests r ON r.hash=jr.hash WHERE jr.job_id=? AND r.state=? AND r.job_id=?",
        (job_id, QUEUED, job_id))}


def queued_in_job(c: sqlite3.Connection | Ledger, job_id: int) -> list[tuple[str, int]]:
    """(hash, attempts) of the requests still queued in a job (`c`: the ledger, or its connection in a transaction)."""
    c = c.conn if isinstance(c, Ledger) else c
    return c.execute("SELECT hash, attempts FROM requests WHERE job_id=? AND state=?", (job_id, QUEUED)).fetchall()


def record_result(c: sqlite3.Connection, h: str, state: str, attempts: int, error: str | None, finish_reason: str | None,
                  usage: Iterable[int], cost: float | None, now: float, from_state: str) -> int:
    """A response's outcome for request `h`, if it is still in `from_state`: its state (succeeded, blocked; or planned
    or failed when its image was refused), attempts, error, tokens (prompt, output, thoughts) and a payment.
    Returns how many requests changed (0: it was done another way meanwhile)."""
    prompt_tokens, output_tokens, thoughts_tokens = list(usage)[:3]
    return c.execute(
        f"UPDATE requests SET state=?, attempts=?, error=?, finish_reason=?, prompt_tokens=?, output_tokens=?, "
        f"thoughts_tokens=?, {ADD_PAYMENT}, updated_at=? WHERE hash=? AND state=?",
        (state, attempts, error, finish_reason, prompt_tokens, output_tokens, thoughts_tokens, cost, cost, now, h, from_state),
    ).rowcount


def requeue_or_fail(c: sqlite3.Connection, h: str, attempts: int, max_attempts: int, reason: str, finish: str | None,
                    now: float) -> str:
    """A queued request that got no usable answer: planned again (out of its job) while attempts remain, else failed
    for good. Returns its new state."""
    attempts += 1
    if attempts < max_attempts:
        c.execute("UPDATE requests SET state=?, attempts=?, error=?, finish_reason=?, job_id=NULL, updated_at=? WHERE hash=? AND state=?",
                  (PLANNED, attempts, reason, finish, now, h, QUEUED))
        return PLANNED
    c.execute("UPDATE requests SET state=?, attempts=?, error=?, finish_reason=?, updated_at=? WHERE hash=? AND state=?",
              (FAILED, attempts, f"{reason} (after {attempts} attempts)", finish, now, h, QUEUED))
    return FAILED


def record_attempt(ledger: Ledger, h: str, state: str, attempts: int, error: str, now: float, from_state: str) -> None:
    """A call that failed before any answer (the interactive fallback): the attempt counts, and its error."""
    with ledger.transaction() as c:
        c.execute("UPDATE requests SET state=?, attempts=?, error=?, updated_at=? WHERE hash=? AND state=?",
                  (state, attempts, error, now, h, from_state))


def planned_in_run(ledger: Ledger, run_id: int) -> list[sqlite3.Row]:
    """The run's planned requests (hash, model, body_json, attempts) in the order they were planned."""
    where, params = ledger.in_run(run_id)
    return ledger.conn.execute(f"SELECT hash, model, body_json, attempts FROM requests WHERE state=? AND {where} ORDER BY rowid",
                               (PLANNED, *params)).fetchall()


# ---- outcomes as records: what a detached collector (a Ray task) hands the owner ---------------------------------------------

def job_outcomes(ledger: Ledger, job_id: int) -> list[tuple]:
    """(hash, state, error, finish_reason, prompt_tokens, output_tokens, thoughts_tokens) of every request a job
    was made with."""
    return ledger.conn.execute(
        "SELECT r.hash, r.state, r.error, r.finish_reason, r.prompt_tokens, r.output_tokens, r.thoughts_tokens FROM job_requests jr "
        "JOIN requests r ON r.hash = jr.hash WHERE jr.job_id=?", (job_id,)).fetchall()


def add_collected_job(ledger: Ledger, display_name: str, model: str, hashes: list[str], batch_name: str, output_file: str,
                      now: float) -> int:
    """Another ledger's finished job, in a detached collector's scratch ledger: the job and its requests (queued in it,
    bodies unknown: the results carry everything collect needs)."""
    with ledger.transaction() as c:
        job_id = c.execute(
            "INSERT INTO jobs(display_name, model, state, request_count, batch_name, output_file, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (display_name, model, J_SUCCEEDED, len(hashes), batch_name, output_file, now, now),
        ).lastrowid
        c.executemany("INSERT OR IGNORE INTO requests(hash, model, body_json, state, job_id, updated_at) VALUES (?,?,'{}',?,?,?)",
                      [(h, model, QUEUED, job_id, now) for h in hashes])
        c.executemany("INSERT OR IGNORE INTO job_requests(job_id, hash) VALUES (?,?)", [(job_id, h) for h in hashes])
    return job_id


KINDS = {SUCCEEDED: "image", BLOCKED: "blocked"}  # a request's final state as a collector's record's kind
