"""Generating requests with interactive `generateContent` calls (full price): the `interactive` deadline policy.

Calls run with bounded concurrency; ledger writes stay on the calling thread (one SQLite connection).
A request another path already finished (a batch job that came back) is not generated: the cache wins.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from . import lifecycle as jobs_mod
from ..backends.base import Backend
from ..results.lines import classify, image_meta
from ..errors import ApiError, SpendLimitError
from ..ledger import BLOCKED, FAILED, PLANNED, SUCCEEDED, Ledger, outcomes, sending
from ..cost.pricing import cost_usd
from ..planning.requests import REF_SCHEME, referenced_hashes, resolve_references
from ..storage.store import ImageStore, InvalidImage

log = logging.getLogger("batcher.jobs.interactive")


@dataclass
class InteractiveStats:
    succeeded: int = 0
    blocked: int = 0
    failed: int = 0
    held_back: int = 0  # over the budget
    spent_usd: float = 0.0


def estimated_cost(model: str, body_json: str) -> float:
    """The full-price estimate of one request (image at its size, prompt, thinking): the budget's estimator."""
    from ..cost.estimate import request_estimate_usd

    return request_estimate_usd(model, body_json, batch=False)


def generate(ledger: Ledger, backend: Backend, store: ImageStore, run_id: int, *, concurrency: int = 4,
             budget_left_usd: float | None = None, max_attempts: int = 3) -> InteractiveStats:
    """Generate the run's planned requests interactively, within `budget_left_usd` (estimated, full price)."""
    stats = InteractiveStats()
    todo = outcomes.planned_in_run(ledger, run_id)
    chosen = []
    budget = budget_left_usd
    for r in todo:
        if budget is not None:  # estimated only against a budget: a model without a price is sent, as by batch
            est = estimated_cost(r["model"], r["body_json"])
            if est > budget:
                stats.held_back += 1
                continue
            budget -= est
        chosen.append(r)
    if not chosen:
        return stats
    needed = {sha for r in chosen if REF_SCHEME in r["body_json"] for sha in referenced_hashes(r["body_json"])}
    paths = sending.reference_paths(ledger)
    uris = jobs_mod.ensure_references(ledger, backend, needed, paths) if needed else {}

    def call(r):
        body = json.loads(r["body_json"])
        if REF_SCHEME in r["body_json"]:
            body = resolve_references(body, uris)
        return backend.generate_content(r["model"], body)

    stopped: SpendLimitError | None = None
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(call, r): r for r in chosen}
        for fut in as_completed(futures):
            r = futures[fut]
            if fut.cancelled():
                continue
            if isinstance(fut.exception(), SpendLimitError):  # a money limit: no attempt is spent, nothing more sent
                stopped = stopped or fut.exception()
                for other in futures:
                    other.cancel()
                continue
            _record(ledger, store, r, fut, stats, max_attempts)
    if stopped is not None:
        raise stopped
    return stats


def _record(ledger: Ledger, store: ImageStore, r, fut, stats: InteractiveStats, max_attempts: int) -> None:
    now = time.time()
    h, model, attempts = r["hash"], r["model"], r["attempts"] + 1
    try:
        outcome = classify(fut.result())
    except ApiError as exc:
        state = FAILED if attempts >= max_attempts else PLANNED
        outcomes.record_attempt(ledger, h, state, attempts, f"interactive call failed: {exc}", now, PLANNED)
        stats.failed += 1
        return
    cost = cost_usd(model, *outcome.usage, batch=False)
    state, error = SUCCEEDED, None
    if outcome.kind == "image":
        try:
            store.put(h, outcome.data, image_meta(model, outcome, interactive=True))
        except InvalidImage as exc:
            state, error = (FAILED if attempts >= max_attempts else PLANNED), f"returned image is invalid: {exc}"
    elif outcome.kind == "blocked":
        state, error = BLOCKED, outcome.reason
    else:
        state, error = (FAILED if attempts >= max_attempts else PLANNED), outcome.reason
    with ledger.transaction() as c:
        changed = outcomes.record_result(c, h, state, attempts, error, outcome.finish_reason, outcome.usage, cost, now, PLANNED)
    if changed:
        stats.spent_usd += cost or 0.0
        stats.succeeded += state == SUCCEEDED
        stats.blocked += state == BLOCKED
        stats.failed += state in (FAILED, PLANNED)
