"""Collecting a job away from the ledger that owns it, in two halves (as `batcher collect --engine ray` does):

- a collector (any process, any machine) downloads and decodes a finished job into the shared cache through a
  scratch ledger of its own, and hands back one record per request: its outcome (`collect_detached`);
- the owner records those outcomes in its ledger, exactly once (`import_records`).

A record: {"hash", "kind" (image | blocked | error), "reason", "finish_reason", "prompt_tokens", "output_tokens",
"thoughts_tokens"}. The collector never decides retries (its errors are only recorded); the owner does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..ledger import J_SUCCEEDED, Ledger, outcomes
from .collect import CollectStats, Outcome, collect_job, finish_job

SCRATCH = "batcher-collect"  # under the collector's temp dir: one scratch workdir per job being collected


@dataclass(frozen=True)
class FinishedJob:
    """What a collector needs to know of a finished job (nothing secret: it travels as a task argument)."""

    display_name: str
    model: str
    batch_name: str
    output_file: str
    hashes: tuple[str, ...]  # the requests the job still waits for

    @classmethod
    def of(cls, ledger: Ledger, job) -> "FinishedJob":
        return cls(job["display_name"], job["model"], job["batch_name"], job["output_file"],
                   tuple(outcomes.waiting_in_job(ledger, job["id"])))


def collect_detached(job: FinishedJob, backend, store, *, processes: int | None = None,
                     scratch_root: str | os.PathLike | None = None) -> list[dict]:
    """Download and decode `job` into `store` (the cache the owner reads), through a scratch ledger in this
    machine's temp dir; returns its outcome records. The job's files at the API are left for the owner to delete
    once the outcomes are recorded. `processes`: decoder processes (results.decoder; 0: decode in this process)."""
    root = Path(scratch_root or tempfile.gettempdir()) / SCRATCH
    _remove_abandoned(root, job.display_name)
    scratch = root / f"{job.display_name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    ledger = Ledger(scratch)
    try:
        job_id = outcomes.add_collected_job(ledger, job.display_name, job.model, list(job.hashes), job.batch_name,
                                            job.output_file, time.time())
        # Retries are the owner's decision: here an error is only recorded (attempts never run out).
        collect_job(ledger, backend, store, job_id, 2**31, CollectStats(), delete_remote=False, processes=processes)
        return export_records(ledger, job_id)
    finally:
        ledger.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_abandoned(root: Path, name: str) -> None:
    """Scratch workdirs of `name` left by collectors that were killed (their process is gone)."""
    for old in root.glob(f"{name}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def export_records(ledger: Ledger, job_id: int) -> list[dict]:
    """The outcome of each request of a collected job, from a (scratch) ledger."""
    kinds = outcomes.KINDS
    return [{"hash": h, "kind": kinds.get(state, "error"),
             "reason": error or ("missing from the job's results" if state not in kinds else None),
             "finish_reason": finish, "prompt_tokens": pt or 0, "output_tokens": ot or 0, "thoughts_tokens": tt or 0}
            for h, state, error, finish, pt, ot, tt in outcomes.job_outcomes(ledger, job_id)]


def import_records(ledger: Ledger, backend, store, job_id: int, records: list[dict], max_attempts: int,
                   stats: CollectStats) -> bool:
    """Record a collector's outcomes of job `job_id` in the owner's ledger, then finish the job as a local collect
    does (requeue what did not come back, mark it collected, delete its files at the API). Exactly once: a job
    already collected is left as it is (returns False), and only requests still queued in the job change, so
    importing the same records again changes nothing. An image the cache does not hold is not taken as done."""
    if ledger.job(job_id)["state"] != J_SUCCEEDED:
        return False
    attempts = dict(outcomes.queued_in_job(ledger, job_id))
    items = []
    for r in records:
        h = r["hash"]
        if h not in attempts:
            continue
        o = Outcome(r["kind"], reason=r.get("reason"), finish_reason=r.get("finish_reason"),
                    prompt_tokens=int(r.get("prompt_tokens") or 0), output_tokens=int(r.get("output_tokens") or 0),
                    thoughts_tokens=int(r.get("thoughts_tokens") or 0))
        if o.kind == "image" and not store.has(h):
            o = Outcome("error", reason="the collector's image is missing from the shared cache")
        items.append((o.kind, h, attempts[h], o))
    finish_job(ledger, backend, job_id, max_attempts, stats, outcomes_first=items)  # one transaction
    return True
