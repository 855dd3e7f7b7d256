"""What a command did: its outcome, and the exit code it maps to (README, "Exit codes"):

    0  every row has its image
    1  any other error (API, disk, a locked workdir)
    2  usage error or invalid input: nothing was submitted
    3  finished, but some rows failed or were blocked
    4  still in progress, rows whose images are gone from the cache, or stopped at a spend limit
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .ledger import BLOCKED, FAILED, PLANNED, QUEUED, SUCCEEDED

if TYPE_CHECKING:
    from .output.dataset import DatasetSummary
    from .planning.planner import PlanResult
    from .results.collect import CollectStats

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_PENDING = 0, 1, 2, 3, 4
STATES_IN_ORDER = (PLANNED, QUEUED, SUCCEEDED, BLOCKED, FAILED)  # as commands print them


@dataclass
class Outcome:
    """What a command did; `exit_code` follows the documented exit codes."""

    exit_code: int
    summary: str
    plan: PlanResult | None = None
    dataset: DatasetSummary | None = None
    counts: dict = field(default_factory=dict)
    jobs_created: int = 0
    collect: CollectStats | None = None
    images: dict = field(default_factory=dict)  # the run's images (dataset rows) by status: ok, blocked, failed, pending


def every_state(counts: dict[str, int]) -> dict[str, int]:
    """Counts by request state, with every state (0 where there are none), in the order commands print them."""
    return {s: counts.get(s, 0) for s in STATES_IN_ORDER}


def exit_code_for(counts: dict[str, int]) -> int:
    if counts.get(PLANNED, 0) or counts.get(QUEUED, 0):
        return EXIT_PENDING
    if counts.get(BLOCKED, 0) or counts.get(FAILED, 0):
        return EXIT_PARTIAL
    return EXIT_OK
