"""Collecting finished jobs on Ray (`batcher collect --engine ray`): each job's results are downloaded and decoded
by a Ray task on any node, straight into the shared cache (results.detached.collect_detached); the task returns
the job's outcome records, and the owner (this process, which alone holds the ledger) imports them as each task
ends (results.detached.import_records: exactly once).

Faults: a worker or node that dies mid-task is Ray's to handle: it runs the task again (TASK_RETRIES), and
cache writes are create-if-absent, so images written by the first attempt are simply found. A transient error
(the API's 5xx after batcher's own retries, a dropped connection) is retried the same way; any other error is
reported for its job, whose outcomes are not recorded (the next collect tries it again). An owner killed
mid-collect loses nothing: the jobs it had not recorded are collected again by the next collect.

Secrets never travel in task arguments (Ray keeps those in its object store, visible in its dashboard): a task
makes its backend from its node's environment (GEMINI_API_KEY or GOOGLE_API_KEY, GOOGLE_GEMINI_BASE_URL; for
Vertex AI and gs:// caches, the node's Google credentials). Workers of a local Ray inherit this process's
environment; on a cluster, set them on the nodes or in the job's runtime_env (README "Collecting on Ray").
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BatcherError, CollectError, NoApiKey, TransientApiError, UsageError
from ..faults import maybe_crash
from ..ledger import J_SUCCEEDED, Ledger
from .collect import CollectStats
from .detached import FinishedJob, collect_detached, import_records

log = logging.getLogger("batcher.results.on_ray")

INSTALL_HINT = "pip install 'batcher[ray]'"
TASK_RETRIES = 3  # attempts after the first, for a task whose worker or node died or that met a transient error
TRANSIENT = (TransientApiError, ConnectionError, TimeoutError)  # retried by Ray; other errors are the job's answer
# Decoding in the task's own process (writer threads): one CPU per task, and Ray runs one task per CPU of the
# cluster, so many jobs at once keep every core busy without decoder processes on top (results.decoder).
TASK_PROCESSES = 0


def require_ray() -> None:
    """UsageError (exit 2) if Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError(f"--engine ray needs Ray, which is not installed here: {INSTALL_HINT}")


@dataclass(frozen=True)
class TaskSettings:
    """What a task needs to reach the API and the cache: nothing secret (it is stored by Ray with the task)."""

    backend: str
    project: str | None
    location: str | None
    staging: str | None
    cache_dir: str


def _collect_task(job: FinishedJob, settings: TaskSettings) -> list[dict]:
    """A Ray task: collect one finished job into the shared cache; its outcome records."""
    from ..backends.factory import backend_factory
    from ..storage.store import open_store

    with backend_factory(settings.backend, project=settings.project, location=settings.location,
                         staging=settings.staging) as make_backend:
        return collect_detached(job, make_backend(), open_store(settings.cache_dir), processes=TASK_PROCESSES)


class RayEngine:
    """A connection to Ray for one command: the cluster at `address` (or $RAY_ADDRESS), else a local Ray started
    here and shut down by `close`. When this process is already connected to Ray, that connection is used."""

    def __init__(self, address: str | None, task_settings: TaskSettings):
        require_ray()
        import ray

        self.ray = ray
        self.task_settings = task_settings
        self.started = False
        if not ray.is_initialized():
            verbose = logging.getLogger("batcher").isEnabledFor(logging.INFO)
            where = address or os.environ.get("RAY_ADDRESS")
            try:
                ray.init(address=address, num_cpus=None if where else _cpus(), include_dashboard=False,
                         log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                what = f"reach Ray at {where}" if where else "start a local Ray"
                raise BatcherError(f"--engine ray: could not {what} ({exc}); check --ray-address / $RAY_ADDRESS") from None
            self.started = True
        self._task = ray.remote(_collect_task).options(num_cpus=1, max_retries=TASK_RETRIES,
                                                       retry_exceptions=list(TRANSIENT))

    def collect(self, jobs: list[FinishedJob]) -> Iterator[tuple[FinishedJob, list[dict] | BatcherError]]:
        """Each job's records (or the error that ended its task), in the order the tasks end."""
        ray = self.ray
        pending = {self._task.remote(job, self.task_settings): job for job in jobs}
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done)
            try:
                yield job, ray.get(done)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                what = str(cause) if isinstance(cause, BatcherError) else f"{type(cause).__name__}: {cause}"
                hint = ("; Ray workers read the API key from their own environment (README \"Collecting on Ray\")"
                        if isinstance(cause, NoApiKey) else "")
                yield job, CollectError(f"{job.display_name}: its Ray task failed: {what}{hint}")
            except ray.exceptions.RayError as exc:  # its worker or node died more often than it was retried
                yield job, CollectError(f"{job.display_name}: its Ray task's worker died on each of its {TASK_RETRIES + 1} "
                                        f"attempts ({type(exc).__name__}); run collect again")

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def task_settings(settings, store) -> TaskSettings:
    """The non-secret part of a command's settings a task needs (a local cache by its absolute path)."""
    root = store.root if isinstance(store.root, str) else str(Path(store.root).resolve())
    return TaskSettings(settings.backend, settings.project, settings.location, settings.staging, root)


def collect_on_ray(engine: RayEngine, ledger: Ledger, backend, store, max_attempts: int, stats: CollectStats,
                   on_job: Callable[[int], None] | None = None) -> None:
    """Collect the ledger's succeeded jobs on Ray, importing each job's outcomes as its task ends. Jobs whose task
    failed are left for the next collect; the first such error is raised once every other job is in."""
    jobs = {job["display_name"]: job["id"] for job in ledger.jobs((J_SUCCEEDED,)) if job["output_file"]}
    if not jobs:
        return
    errors: list[BatcherError] = []
    for job, result in engine.collect([FinishedJob.of(ledger, ledger.job(i)) for i in jobs.values()]):
        if isinstance(result, BatcherError):
            log.warning("%s", result)
            errors.append(result)
            continue
        missing = sum(r["kind"] == "image" and not store.has(r["hash"]) for r in result)
        if missing:
            errors.append(CollectError(
                f"{job.display_name}: {missing} image(s) its Ray task wrote are not in the cache {store.root} as this "
                f"machine sees it; use a cache every node writes and this machine reads (--cache-dir gs://..., or a "
                f"shared filesystem). Nothing was recorded for the job: collect it again"))
            continue
        import_records(ledger, backend, store, jobs[job.display_name], result, max_attempts, stats)
        maybe_crash("imported")  # test hook: a job recorded, others still in flight
        if on_job:
            on_job(1)
    if errors:
        raise errors[0] if len(errors) == 1 else CollectError(
            f"{len(errors)} job(s) could not be collected on Ray (first: {errors[0]}); the others are recorded; "
            f"run collect again")
