"""Sharing one run's jobs between several collectors (machines), through GCS, without a shared database.

    <share>/jobs/<job>.json          published by the run's owner when the job is created
    <share>/claims/<job>/<n>         "I am collecting this job": created if absent, so one collector wins
    <share>/done/<job>.jsonl         the job's outcomes, one line per request (written once, by the winner)

The owner (the workdir whose ledger holds the run) publishes its jobs and imports `done` outcomes into its
ledger; any number of `batcher collect --share URI --worker` processes claim finished jobs, download and
decode them into the shared gs:// cache (entries created if absent), and write the outcomes. A claim older
than its lease with no outcome yet (a collector that died) is taken over with the next claim number.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..storage import gcs
from ..errors import UsageError

log = logging.getLogger("batcher.results.share")

DEFAULT_LEASE_S = 3600.0


@dataclass(frozen=True)
class Share:
    root: str
    lease_s: float = DEFAULT_LEASE_S

    def __post_init__(self):
        if not gcs.is_gcs(self.root):
            raise UsageError(f"--share {self.root}: use a gs://bucket/prefix every collector can reach")

    def _uri(self, *parts: str) -> str:
        return gcs.join(self.root, *parts)

    # ---- the owner -------------------------------------------------------------------------------
    def publish(self, job, hashes: list[str], backend: str) -> bool:
        """Announce a created job (idempotent: the first description stays)."""
        doc = {"display_name": job["display_name"], "batch_name": job["batch_name"], "model": job["model"],
               "backend": backend, "requests": hashes}
        return gcs.write_if_absent(self._uri("jobs", f"{job['display_name']}.json"), json.dumps(doc).encode(),
                                   "application/json")

    def published(self) -> list[dict]:
        out = []
        for uri in gcs.list_names(self._uri("jobs") + "/"):
            raw = gcs.read_bytes(uri)
            if raw:
                out.append(json.loads(raw))
        return out

    # ---- claims ----------------------------------------------------------------------------------
    def claim(self, name: str, now: float | None = None) -> bool:
        """Try to become the collector of job `name`. False if another live collector has it."""
        now = time.time() if now is None else now
        claims = sorted(gcs.list_names(self._uri("claims", name) + "/"), key=lambda u: int(u.rsplit("/", 1)[-1]))
        attempt = 1
        if claims:
            latest = json.loads(gcs.read_bytes(claims[-1]) or b"{}")
            if now - float(latest.get("at", 0)) < self.lease_s:
                return False
            attempt = int(claims[-1].rsplit("/", 1)[-1]) + 1
            log.warning("claim on %s by %s expired; taking over", name, latest.get("who"))
        who = {"who": f"{socket.gethostname()}:{os.getpid()}", "at": now}
        return gcs.write_if_absent(self._uri("claims", name, str(attempt)), json.dumps(who).encode(), "application/json")

    # ---- outcomes --------------------------------------------------------------------------------
    def done(self, name: str) -> list[dict] | None:
        raw = gcs.read_bytes(self._uri("done", f"{name}.jsonl"))
        if raw is None:
            return None
        return [json.loads(line) for line in raw.splitlines() if line.strip()]

    def write_done(self, name: str, records: list[dict]) -> bool:
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        return gcs.write_if_absent(self._uri("done", f"{name}.jsonl"), body, "application/x-ndjson")


def scratch_dir(workdir: Path, name: str) -> Path:
    return Path(workdir) / "shared-collect" / name


# ---- outcomes as records: what a collector hands the owner ------------------------------------------

def export_records(ledger, job_id: int) -> list[dict]:
    """The outcome of each request of a collected job, from a ledger (a collector's scratch one, or the owner's)."""
    from ..ledger import outcomes

    rows = outcomes.job_outcomes(ledger, job_id)
    kinds = outcomes.KINDS
    return [{"hash": h, "kind": kinds.get(state, "error"), "reason": error or ("missing from the job's results" if state not in kinds else None),
             "finish_reason": finish, "prompt_tokens": pt or 0, "output_tokens": ot or 0, "thoughts_tokens": tt or 0}
            for h, state, error, finish, pt, ot, tt in rows]


def import_records(ledger, backend, store, job, records: list[dict], max_attempts: int, stats) -> None:
    """Record a collector's outcomes in the owner's ledger, then finish the job like a local collect."""
    from .collect import Outcome, finish_job, record_outcomes
    from ..ledger import outcomes

    attempts = dict(outcomes.queued_in_job(ledger, job["id"]))
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
    record_outcomes(ledger, job["model"], items, max_attempts, stats)
    finish_job(ledger, backend, job["id"], max_attempts, stats)


# ---- a collector with no ledger of its own --------------------------------------------------------------

@dataclass
class WorkerStats:
    jobs: int = 0
    images: int = 0
    skipped_claimed: int = 0
    rounds: int = 0


def collect_one(share: Share, doc: dict, output_file: str, backend, store, workdir: Path) -> list[dict]:
    """Collect one published job into the shared cache through a scratch ledger; returns its outcome records."""
    import shutil

    from .collect import CollectStats, collect_job
    from ..ledger import Ledger, outcomes

    scratch = scratch_dir(workdir, f"{doc['display_name']}-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    ledger = Ledger(scratch)
    try:
        job_id = outcomes.add_collected_job(ledger, doc["display_name"], doc["model"], doc["requests"], doc["batch_name"],
                                            output_file, time.time())
        # Retries are the owner's decision: here an error is only recorded (attempts never run out).
        collect_job(ledger, backend, store, job_id, 2**31, CollectStats(), delete_remote=False)
        return export_records(ledger, job_id)
    finally:
        ledger.close()
        shutil.rmtree(scratch, ignore_errors=True)


def work(share: Share, backend, store, workdir: Path, *, poll_interval: float = 30.0, timeout: float | None = None,
         sleep=time.sleep) -> WorkerStats:
    """Claim and collect finished published jobs until every published job is done or has ended without
    results (or until `timeout`)."""
    stats = WorkerStats()
    started = time.monotonic()
    while True:
        stats.rounds += 1
        open_jobs = 0
        for doc in share.published():
            name = doc["display_name"]
            if share.done(name) is not None:
                continue
            info = backend.get_batch(doc["batch_name"])
            if info.state in ("FAILED", "EXPIRED", "CANCELLED"):
                continue  # no results: the owner requeues its requests
            open_jobs += 1
            if info.state != "SUCCEEDED" or not info.output_file:
                continue
            if not share.claim(name):
                stats.skipped_claimed += 1
                continue
            records = collect_one(share, doc, info.output_file, backend, store, workdir)
            share.write_done(name, records)
            backend.delete_file(info.output_file)  # only now: the outcomes are safe in the share
            stats.jobs += 1
            stats.images += sum(r["kind"] == "image" for r in records)
            open_jobs -= 1
        if open_jobs == 0 or (timeout is not None and time.monotonic() - started > timeout):
            return stats
        sleep(poll_interval)
