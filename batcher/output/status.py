"""The status document: a workdir's jobs (with their 24-hour window and 48-hour expiry), its current run's
request counts and spend, and the capacity in flight, as JSON-ready data (`batcher status --json` prints it;
output.render.status_table shows it; the morning report reads it). It reads the ledger only."""

from __future__ import annotations

import datetime as dt
import json

from ..backends.base import parse_time
from ..catalog import JOB_EXPIRY_HOURS, JOB_TARGET_HOURS
from ..jobs.quota import Quota, capacity
from ..ledger import J_SUBMITTED, J_UPLOADED, Ledger
from ..outcome import EXIT_OK, every_state, exit_code_for

EXPIRY_WARNING_HOURS = 6


def status_document(ledger: Ledger, quota: Quota, now: float) -> dict:
    """`now`: the API's clock (server time), against which windows and expiries are counted."""
    run = ledger.current_run()
    counts, hits, cost = {}, 0, 0.0
    if run:  # the cost as the budget counts it (ledger.reading.run_spend_usd): not an earlier run's in this workdir
        by_state, hits, cost = ledger.run_summary(run["id"], paid_since=run["created_at"])
        counts = every_state(by_state)
    return {
        "workdir": str(ledger.workdir), "manifest": run["manifest"] if run else None,
        "jobs": [_job(j, now) for j in ledger.jobs()], "requests": counts, "capacity": capacity(ledger, quota),
        "cache_hits": hits, "cost_usd": round(cost, 6), "exit_code": exit_code_for(counts) if run else EXIT_OK,
    }


def _job(j, now: float) -> dict:
    stats = json.loads(j["stats_json"]) if j["stats_json"] else {}
    created = parse_time(j["api_created_at"])
    n = j["request_count"]
    succeeded = stats.get("successfulRequestCount", 0)
    failed = stats.get("failedRequestCount", 0)
    window_left = _hours_left(created, JOB_TARGET_HOURS, now)
    expiry_left = _hours_left(created, JOB_EXPIRY_HOURS, now)
    active = j["state"] == J_SUBMITTED
    warnings = []
    if active and window_left is not None and window_left < 0:
        warnings.append("past its 24 h target window")
    if active and expiry_left is not None and expiry_left < EXPIRY_WARNING_HOURS:
        warnings.append(f"expires in under {EXPIRY_WARNING_HOURS} h: results will be lost")
    return {
        "name": j["batch_name"], "display_name": j["display_name"], "model": j["model"], "state": j["state"],
        "api_state": j["api_state"], "created_at": j["api_created_at"],
        "window_ends_at": _iso(created + JOB_TARGET_HOURS * 3600) if created else None,
        "expires_at": _iso(created + JOB_EXPIRY_HOURS * 3600) if created else None,
        "age_hours": round((now - created) / 3600, 2) if created else None,
        "window_hours_left": round(window_left, 2) if window_left is not None else None,
        "expiry_hours_left": round(expiry_left, 2) if expiry_left is not None else None,
        "request_count": n, "succeeded": succeeded, "failed": failed,
        "pending": stats.get("pendingRequestCount", max(n - succeeded - failed, 0)) if active or j["state"] == J_UPLOADED else 0,
        "error": j["error"], "warnings": warnings,
    }


def _hours_left(created: float | None, hours: float, now: float) -> float | None:
    return None if created is None else (created + hours * 3600 - now) / 3600


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
