"""Capacity: what the API lets us have in flight at once, so a large run is fed to it in waves.

The Batch API caps, per project: enqueued tokens per model across active jobs (by tier), 100 concurrent
jobs, and 20 GB of Files storage. batcher creates a job only when it fits, and treats a 429 on create as
"wait for capacity" (the caps are documentation snapshots; the API is the final word).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import catalog
from ..ledger import J_PLANNED, J_UPLOADING, Ledger, sending


@dataclass(frozen=True)
class Quota:
    """The project's quota as batcher plans against it: the tier (enqueued-token caps per model, from the catalog),
    or a `token_cap` that overrides it, and the API's other limits (concurrent jobs, Files storage)."""

    tier: str = "1"
    token_cap: int | None = None  # overrides the tier table for every model
    max_concurrent_jobs: int = catalog.MAX_CONCURRENT_JOBS
    files_storage_bytes: int = catalog.FILES_STORAGE_BYTES

    def cap_for(self, model: str) -> int | None:
        if self.token_cap is not None:
            return self.token_cap
        spec = catalog.model_spec(model)
        return spec.enqueued_token_caps.get(self.tier) if spec else None


def why_not_now(ledger: Ledger, quota: Quota, job) -> str | None:
    """None if the job may be created now, else the reason it waits."""
    jobs = sending.jobs_in_flight(ledger)
    if jobs >= quota.max_concurrent_jobs:
        return f"{jobs} jobs in flight (the cap is {quota.max_concurrent_jobs})"
    cap = quota.cap_for(job["model"])
    used = sending.in_flight_tokens(ledger, job["model"])
    if cap is not None and used and used + job["est_tokens"] > cap:
        return f"{job['model']}: {used:,} + {job['est_tokens']:,} enqueued tokens would pass the cap of {cap:,}"
    if job["state"] in (J_PLANNED, J_UPLOADING):
        stored = sending.files_bytes(ledger)
        if stored and stored + job["input_bytes"] > quota.files_storage_bytes:
            return f"{stored:,} bytes in Files storage; {job['input_bytes']:,} more would pass {quota.files_storage_bytes:,}"
    return None


def capacity(ledger: Ledger, quota: Quota) -> dict:
    """Planned vs in flight vs capacity, per model (for `status`)."""
    out = {}
    for model in sending.ledger_models(ledger):
        jobs_waiting, waiting_tokens, planned_requests = sending.waiting(ledger, model)
        out[model] = {
            "token_cap": quota.cap_for(model),
            "in_flight_tokens": sending.in_flight_tokens(ledger, model),
            "jobs_waiting": jobs_waiting,
            "waiting_tokens": waiting_tokens,
            "requests_not_in_jobs": planned_requests,
        }
    return out
