"""Progress while jobs run, poll after poll: the API's counts over a run's jobs (batchStats: succeeded, failed,
pending), how long each job has been in its state, and an ETA from the rate observed between polls.
output.render.progress_line says it in a terminal's width; `run` and `status --watch` show it."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from ..backends.base import normalize_state
from ..ledger import J_CREATING, J_PLANNED, J_SUBMITTED, J_UPLOADED, J_UPLOADING
from .status import api_counts

NOT_CREATED = (J_PLANNED, J_UPLOADING, J_UPLOADED, J_CREATING)
WAITING = "waiting"  # the state said of a job not created yet (planned, uploading, waiting for capacity)


@dataclass(frozen=True)
class JobCounts:
    """One job as progress counts it: its state while it lives (None once it has ended) and the API's counts."""

    name: str
    state: str | None
    succeeded: int
    failed: int
    pending: int


@dataclass
class RunProgress:
    succeeded: int = 0
    failed: int = 0
    pending: int = 0  # in live jobs, in jobs not created yet, and requests not in a job yet
    jobs: int = 0
    # (state, how many jobs are in it, the longest time one of them has been in it, seconds), live states only
    states: list[tuple[str, int, float]] = field(default_factory=list)
    eta_seconds: float | None = None

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def total(self) -> int:
        return self.done + self.pending


def job_state(state: str, api_state: str | None) -> str | None:
    """The state progress says of a job: the API's while it runs (pending, running), `waiting` before it is
    created, None once it has ended."""
    if state == J_SUBMITTED:
        return normalize_state(api_state).lower() if api_state else "submitted"
    return WAITING if state in NOT_CREATED else None


def from_ledger(rows: Iterable[Mapping]) -> list[JobCounts]:
    """Jobs as the ledger holds them (ledger.jobs(); stats_json as the poller stored it)."""
    out = []
    for j in rows:
        succeeded, failed, pending = api_counts(j["stats_json"], j["request_count"])
        state = job_state(j["state"], j["api_state"])
        pending = j["request_count"] if state == WAITING else pending if state else 0
        out.append(JobCounts(j["display_name"], state, succeeded, failed, pending))
    return out


def from_document(jobs: Iterable[Mapping]) -> list[JobCounts]:
    """Jobs as the status document shows them (output.status)."""
    out = []
    for j in jobs:
        state = job_state(j["state"], j["api_state"])
        pending = j["request_count"] if state == WAITING else j["pending"] if state else 0
        out.append(JobCounts(j["display_name"], state, j["succeeded"], j["failed"], pending))
    return out


class RateEta:
    """The time left at the rate observed over the last `window` observations of how many are done. None before
    two observations, while nothing moves, and after the count went back (requests sent again start a new
    history)."""

    def __init__(self, window: int = 20):
        self._seen: deque[tuple[float, int]] = deque(maxlen=window)

    def observe(self, t: float, done: int) -> None:
        if self._seen and done < self._seen[-1][1]:
            self._seen.clear()
        self._seen.append((t, done))

    def eta(self, remaining: int) -> float | None:
        if remaining <= 0:
            return 0.0 if self._seen else None
        if len(self._seen) < 2:
            return None
        (t0, d0), (t1, d1) = self._seen[0], self._seen[-1]
        if t1 <= t0 or d1 <= d0:
            return None
        return remaining / ((d1 - d0) / (t1 - t0))


class JobsWatch:
    """Follows a run's jobs across polls: how long each has been in its state (since this watch first saw it
    there) and the ETA."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: int = 20):
        self._clock = clock
        self._since: dict[str, tuple[str, float]] = {}  # job -> (state, when this watch saw it enter it)
        self._rate = RateEta(window)

    def observe(self, jobs: Iterable[JobCounts], unsent: int = 0) -> RunProgress:
        """`unsent`: the run's requests not in any job yet (planned): pending too."""
        now = self._clock()
        p = RunProgress(pending=unsent)
        longest: dict[str, tuple[int, float]] = {}
        for j in jobs:
            p.jobs += 1
            p.succeeded += j.succeeded
            p.failed += j.failed
            p.pending += j.pending
            if j.state is None:
                self._since.pop(j.name, None)
                continue
            state, since = self._since.get(j.name, (None, now))
            if state != j.state:
                since = now
                self._since[j.name] = (j.state, now)
            n, age = longest.get(j.state, (0, 0.0))
            longest[j.state] = (n + 1, max(age, now - since))
        p.states = [(s, n, age) for s, (n, age) in sorted(longest.items(), key=_state_order)]
        self._rate.observe(now, p.done)
        p.eta_seconds = self._rate.eta(p.pending)
        return p


def _state_order(item) -> tuple[int, str]:
    order = {"running": 0, "pending": 1, WAITING: 2}
    return order.get(item[0], 3), item[0]
