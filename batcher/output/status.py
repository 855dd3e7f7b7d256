"""The status document: a workdir's jobs (with their 24-hour window and 48-hour expiry), its current run's
request counts and spend, and the capacity in flight, as JSON-ready data (`batcher status --json` prints it;
output.render.status_table shows it; the morning report reads it). It reads the ledger only."""

from __future__ import annotations

import datetime as dt
import json

from ..backends.base import normalize_state, parse_time
from ..catalog import JOB_EXPIRY_HOURS, JOB_TARGET_HOURS
from ..jobs.quota import Quota, capacity
from ..ledger import BLOCKED, J_COLLECTED, J_SUBMITTED, J_UPLOADED, JOB_TERMINAL_API, SUCCEEDED, Ledger, reading
from ..outcome import EXIT_OK, every_state, exit_code_for
from .render import image_statuses

EXPIRY_WARNING_HOURS = 6


def status_document(ledger: Ledger, quota: Quota, now: float) -> dict:
    """`now`: the API's clock (server time), against which windows and expiries are counted."""
    run = ledger.current_run()
    results = reading.job_results(ledger)
    counts, hits, cost, images = {}, 0, 0.0, {}
    if run:
        images = image_statuses(reading.image_counts(ledger, run["id"]))  # the cost as the budget counts it (ledger.reading.run_spend_usd): not an earlier run's in this workdir
        by_state, hits, cost = ledger.run_summary(run["id"], paid_since=run["created_at"])
        counts = every_state(by_state)
    return {
        "workdir": str(ledger.workdir), "manifest": run["manifest"] if run else None,
        "jobs": [_job(j, now, results.get(j["id"], {})) for j in ledger.jobs()], "images": images, "requests": counts, "capacity": capacity(ledger, quota),
        "cache_hits": hits, "cost_usd": round(cost, 6), "exit_code": exit_code_for(counts) if run else EXIT_OK,
    }


def _job(j, now: float, results: dict[str, int]) -> dict:
    """A job as status shows it. `succeeded` and `failed` are the API's counts of its lines (a blocked prompt is a
    line that succeeded); once it is collected, `ok` and `blocked` are what its lines gave: images, and no image.
    `outcome` is how it ended (succeeded, failed, expired, cancelled), kept after it is collected; a job that has
    ended has no window or expiry left to count down."""
    created = parse_time(j["api_created_at"])
    n = j["request_count"]
    succeeded, failed, pending = api_counts(j["stats_json"], n)
    active = j["state"] == J_SUBMITTED
    collected = j["state"] == J_COLLECTED
    outcome = j["state"] if j["state"] in JOB_TERMINAL_API else normalize_state(j["api_state"]).lower() if collected else None
    window_left = _hours_left(created, JOB_TARGET_HOURS, now) if active else None
    expiry_left = _hours_left(created, JOB_EXPIRY_HOURS, now) if active else None
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
        "outcome": outcome, "collected": collected,
        "ok": results.get(SUCCEEDED, 0) if collected else None, "blocked": results.get(BLOCKED, 0) if collected else None,
        "request_count": n, "succeeded": succeeded, "failed": failed,
        "pending": pending if active or j["state"] == J_UPLOADED else 0,
        "error": j["error"], "warnings": warnings,
    }


def api_counts(stats_json: str | None, request_count: int) -> tuple[int, int, int]:
    """A job's succeeded, failed and pending lines as the API last counted them (its batchStats, stored by the
    poller in the ledger's jobs.stats_json); pending: all not counted yet when the API gives no figure."""
    stats = json.loads(stats_json) if stats_json else {}
    succeeded = stats.get("successfulRequestCount", 0)
    failed = stats.get("failedRequestCount", 0)
    return succeeded, failed, stats.get("pendingRequestCount", max(request_count - succeeded - failed, 0))


def _hours_left(created: float | None, hours: float, now: float) -> float | None:
    return None if created is None else (created + hours * 3600 - now) / 3600


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
