"""batcher's library API: submit, status, collect, run, cancel. The CLI is a thin layer over these.

    import batcher
    result = batcher.run("prompts.parquet", batcher.Settings(workdir=".batcher", out="dataset"))

Every function is safe to interrupt at any point and to call again: the ledger remembers what was done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .backends.base import Backend
from .backends.factory import backend_factory as make_backend_factory
from .catalog import TIERS
from .cost.budget import BudgetCheck, check_budget, unsent_batch_usd
from .cost.estimate import tier_cap_note
from .cost.money import usd
from .cost.pricing import use_workdir_prices
from .errors import ApiError, BatcherError, LedgerError, NoApiKey, SpendLimitError, UsageError, WorkdirBusyError
from .faults import maybe_crash
from .jobs import lifecycle as jobs_mod
from .jobs.quota import why_not_now
from .ledger import (
    J_CANCELLED, J_COLLECTED, J_CREATING, J_EXPIRED, J_FAILED, J_PLANNED, J_SUBMITTED, J_SUCCEEDED, J_UPLOADED,
    J_UPLOADING, PLANNED, QUEUED, DatabaseError, Ledger, WorkdirLock, sending,
)
from .ledger import housekeeping, reading
from .ledger.reading import image_counts, run_spend_usd
from .models import ModelRefused, check_models, warn
from .outcome import EXIT_OK, EXIT_PARTIAL, EXIT_PENDING, Outcome, every_state, exit_code_for
from .output.dataset import DatasetSummary, check_owner, write_dataset
from .output.render import (
    image_statuses, lost_images_note, plan_images, plural, progress_line, prune_line, rows_read, run_line, shards_note,
    spend_limit_note,
)
from .output.status import status_document
from .manifest import locate
from .planning.planner import PlanResult, manifest_identity, plan_fallbacks, plan_manifest, run_result, shard
from .output import live
from .progress import Progress, label
from .results.collect import CollectStats, Decoders, collect_job
from .settings import Settings, is_spec
from .storage import gcs
from .storage.store import open_store

if TYPE_CHECKING:
    from .results.on_ray import RayEngine
    from .cost.estimate import Estimate
    from .output.report import ReportSummary

log = logging.getLogger("batcher")

def check_dir(path: Path | str, what: str) -> None:
    """Before any API call: a directory batcher will write must be creatable. A path under a regular file, or
    an unwritable parent, would otherwise fail only after the jobs were paid for. (gs:// is checked by GCS.)"""
    if gcs.is_gcs(path):
        gcs.split(str(path))
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise BatcherError(f"{what} {path}: cannot be created, {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BatcherError(f"{what} {path}: cannot be created or written, {probe} is not writable")


class Workspace:
    """An open workdir: the lock, the ledger, the cache and (lazily) the API backend."""

    def __init__(self, settings: Settings, backend_factory: Callable[[], Backend] | None, existing: bool = False):
        self.settings = settings
        if existing and not (settings.workdir / "ledger.sqlite").is_file():
            raise no_run(settings.workdir)  # a command that reads a run never makes a workdir
        check_dir(settings.workdir, "workdir (--workdir)")
        try:
            settings.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BatcherError(f"workdir (--workdir) {settings.workdir}: cannot be created ({exc.strerror or exc})") from None
        self.lock = WorkdirLock(settings.workdir)
        try:
            self.lock.acquire(wait=settings.lock_wait)
            self.ledger = Ledger(settings.workdir)
        except (OSError, DatabaseError) as exc:  # disk full, read-only, I/O error: name the workdir
            self.lock.release()
            raise BatcherError(f"workdir (--workdir) {settings.workdir}: cannot open its lock and ledger "
                               f"({getattr(exc, 'strerror', None) or exc})") from None
        except BaseException:
            self.lock.release()
            raise
        self.store = open_store(settings.cache_dir)
        try:
            check_dir(self.store.root, "image cache (--cache-dir)")
        except BaseException:
            self.ledger.close()
            self.lock.release()
            raise
        self._backend_factory = backend_factory
        self._backend: Backend | None = None
        self._ray: RayEngine | None = None
        self._resources = contextlib.ExitStack()  # what the backend needs while the workspace is open (an emulator)
        self.progress = Progress(quiet=settings.quiet)
        self.models_checked = False  # the models of the run were checked (batcher.models) by this process
        self.notes: list[str] = []  # what the command's summary says besides its counts (a tier's spend cap, ...)
        self.create_not_before = 0.0  # monotonic time: a 429 on create said to wait this long (its RetryInfo)
        self.jobs_created = 0  # by this command
        self.run_id: int | None = None  # the run the command plans (for what it says of models, notes)
        self.budget: BudgetCheck | None = None  # the last budget check of this command (--budget-usd)
        self.started_at = time.time()  # what this command paid: the run's payments since

    @property
    def ray(self) -> "RayEngine":
        """Ray, connected (or a local Ray started) on first use and left at close (settings.engine "ray")."""
        if self._ray is None:
            from .results.on_ray import RayEngine, task_settings

            self._ray = RayEngine(self.settings.ray_address, task_settings(self.settings, self.store))
            self._resources.callback(self._ray.close)
        return self._ray

    @property
    def backend(self) -> Backend:
        """The API, connected on first use (a command that needs none needs no key)."""
        if self._backend is None:
            s = self.settings
            factory = self._backend_factory or self._resources.enter_context(
                make_backend_factory(s.backend, project=s.project, location=s.location, staging=s.staging))
            backend = factory()
            if s.webhook_uris and not backend.takes_webhooks:
                raise UsageError("webhooks (webhook_uris) are a Gemini API feature; Vertex AI batch jobs don't take them")
            self._backend = backend
        return self._backend

    def server_now(self) -> float:
        """Now, by the API's clock if this command has talked to it, else by ours."""
        return self._backend.server_now() if self._backend is not None else time.time()

    def close(self) -> None:
        self._resources.close()
        self.ledger.close()
        self.lock.release()


@contextlib.contextmanager
def open_workspace(settings: Settings, backend_factory=None, *, existing: bool = False) -> Iterator[Workspace]:
    """The workdir of `settings`, locked; `existing`: one that holds a run (else UsageError, nothing created)."""
    ws = Workspace(settings, backend_factory, existing)
    if existing and ws.ledger.current_run() is None:
        ws.close()
        raise no_run(settings.workdir)
    try:
        with use_workdir_prices(settings.workdir, settings.prices):
            yield ws
    finally:
        ws.close()


# ---- steps ------------------------------------------------------------------------------------------

def budget_allowance(ws: Workspace, check: BudgetCheck | None = None) -> int | None:
    """How many planned requests may be sharded (None: no budget). Remembers the check (`check`: one just made on
    the same ledger)."""
    if ws.settings.budget_usd is None:
        return None
    ws.budget = check or check_budget(ws.ledger, ws.settings.budget_usd)
    return ws.budget.allowed


def budget_exhausted(ws: Workspace, counts: dict) -> bool:
    """Nothing in jobs, requests planned, and none of them fits the budget: stop waiting."""
    if ws.settings.budget_usd is None or counts.get(QUEUED) or not counts.get(PLANNED):
        return False
    ws.budget = check_budget(ws.ledger, ws.settings.budget_usd)
    return ws.budget.allowed == 0 and ws.budget.held > 0


def budget_note(ws: Workspace) -> str:
    return f"; {ws.budget.note()}" if ws.budget is not None and ws.budget.held else ""


def shard_planned(ws: Workspace, budget_check=None) -> list[int]:
    """Planned requests into new jobs: within the shard limits, each model's enqueued-token cap and the budget
    (`budget_check`: one just made). A dry run shards the same way, so the jobs it leaves are the ones a later
    submit sends."""
    return shard(ws.ledger, ws.settings.limits, token_cap_for=ws.settings.quota.cap_for,
                 limit_requests=budget_allowance(ws, budget_check))


def send_pending(ws: Workspace) -> int:
    """Shard planned requests into jobs, upload them and create them, within the concurrency cap.
    Returns how many jobs were created. Stops creating (not failing) when the API says it has no capacity."""
    ledger, backend, quota = ws.ledger, ws.backend, ws.settings.quota
    with ledger.big_page_cache():  # bulk ledger work: sharding, then every job's requests
        return _send_pending(ws, ledger, backend, quota)


def check_run_models(ws: Workspace, offline: bool = False) -> None:
    """Before anything is uploaded: the models about to be sent exist and take batch jobs (batcher.models)."""
    if ws.models_checked:
        return
    models = sending.models_to_send(ws.ledger) | ({ws.settings.fallback_model} if ws.settings.fallback_model else set())
    try:
        warnings = check_models(models, None if offline else ws.backend)
    except ModelRefused as exc:
        earlier = sending.earlier_runs_using(ws.ledger, ws.run_id, exc.model)
        if earlier:  # work an earlier run of this workdir left unsent would be sent with this run's
            raise UsageError(f"{exc}. Requests of an earlier run in {ws.settings.workdir} ({', '.join(earlier)}) use it and are "
                             "still to be sent: run that manifest again with another model (--model, or its model column), "
                             "or use a new --workdir for this one") from None
        raise
    cap = TIERS.get(ws.settings.quota.tier)
    if cap is not None:
        unsent_usd, at_least = unsent_batch_usd(ws.ledger, over=cap.monthly_spend_cap_usd)
        note = tier_cap_note(unsent_usd, ws.settings.quota.tier, at_least)
        if note:
            warnings.append(note)
            ws.notes.append(note)
    warn(warnings)
    ws.models_checked = not offline


def _send_pending(ws: Workspace, ledger: Ledger, backend, quota) -> int:
    check_run_models(ws)
    jobs_mod.reconcile(ledger, backend)
    budget, check = ws.settings.budget_usd, None
    if budget is not None and ledger.jobs((J_PLANNED,)):
        check = check_budget(ledger, budget)
        if check.spent_usd + check.queued_usd > budget:
            # Jobs sharded earlier without this budget (a dry run, a run with a higher one) would take the run
            # over it: those not yet uploaded go back to planned, and the budget decides again below.
            n = release_unsent_jobs(ws, (J_PLANNED,), "released: over --budget-usd, re-sharded under it")
            log.warning("%d job(s) planned earlier would exceed the budget: sharded again under it", n)
            check = None  # the ledger changed: check again
    shard_planned(ws, check)
    refs = sending.reference_paths(ledger)
    created = 0
    for job in ledger.jobs((J_PLANNED, J_UPLOADING, J_UPLOADED)):
        if time.monotonic() < ws.create_not_before:
            break  # the API asked to wait (RetryInfo): nothing more is uploaded or created before then
        wait_reason = why_not_now(ledger, quota, ledger.job(job["id"]))
        if wait_reason:
            log.info("%s waits: %s", job["display_name"], wait_reason)
            continue  # a later wave, as earlier jobs finish (another model's job may still fit)
        if job["state"] in (J_PLANNED, J_UPLOADING):
            with ws.progress.bytes(label("upload", job["display_name"]), job["input_bytes"]) as bar:
                jobs_mod.upload_job(ledger, backend, job["id"], refs, on_bytes=bar.update)
        if not jobs_mod.create_job(ledger, backend, job["id"], webhook_uris=ws.settings.webhook_uris,
                                   on_wait=lambda exc: wait_for_capacity(ws, exc)):
            if ledger.job(job["id"])["state"] == J_UPLOADED:
                break  # no capacity now (429): later, as earlier jobs finish
            continue
        created += 1
        ws.jobs_created += 1  # counted as it happens: a spend limit may end this call with an exception
    return created


def wait_for_capacity(ws: Workspace, exc) -> None:
    """A 429 on create that clears by waiting: after a rate or spend-rate limit no create is tried again before its
    RetryInfo hint; a full queue (enqueued tokens, concurrent jobs) frees as earlier jobs finish: the next round."""
    if exc.retry_after and exc.cause in ("rate", "spend_rate"):
        ws.create_not_before = time.monotonic() + exc.retry_after
        log.info("the API asks to wait %.0f s before creating more jobs (%s)", exc.retry_after, exc.cause)


def refresh_jobs(ws: Workspace) -> None:
    for job in ws.ledger.jobs((J_SUBMITTED,)):
        maybe_crash("poll")  # test hook: see batcher/faults.py
        jobs_mod.refresh_job(ws.ledger, ws.backend, job["id"])


def collect_finished(ws: Workspace) -> CollectStats:
    """Collect every finished job: here, or (engine "ray") the results of each by a Ray task (results.on_ray)."""
    stats = CollectStats()
    on_ray = ws.settings.engine == "ray"
    with Decoders() as decoders:  # one set of decoder processes for every job of this collect
        for job in ws.ledger.jobs((J_SUCCEEDED, J_FAILED, J_EXPIRED, J_CANCELLED)):
            if on_ray and job["state"] == J_SUCCEEDED and job["output_file"]:
                continue  # below
            with ws.progress.bytes(label("download", job["display_name"]), None) as dbar, \
                    ws.progress.count(label("decode", job["display_name"]), job["request_count"]) as ibar:
                collect_job(ws.ledger, ws.backend, ws.store, job["id"], ws.settings.max_attempts, stats,
                            on_bytes=dbar.update, on_image=ibar.update, decoders=decoders)
    if on_ray and (finished := ws.ledger.jobs((J_SUCCEEDED,))):
        from .results.on_ray import collect_on_ray

        with ws.progress.count(label("collect", "on Ray"), len(finished)) as bar:
            collect_on_ray(ws.ray, ws.ledger, ws.backend, ws.store, ws.settings.max_attempts, stats, on_job=bar.update)
    for e in stats.errors:
        log.warning(e)
    for name, state, requeued in stats.ended:
        ws.notes.append(f"job {name} {state}" + (" (48 h)" if state == J_EXPIRED else "")
                        + (f"; its {plural(requeued, 'request')} planned again" if requeued else ""))
    return stats


def run_counts(ledger: Ledger, run_id: int) -> dict[str, int]:
    return every_state(ledger.request_counts(run_id))


def counts_after_plan(ledger: Ledger, p: PlanResult) -> dict[str, int]:
    """The run's counts right after its plan `p`: the plan's own when it counted them (p.states), else from SQL
    (a join of the run's rows with `requests`: ~3 s at 1M rows)."""
    if p.states is None:
        return run_counts(ledger, p.run_id)
    return every_state(p.states)


def counts_after_shard(ledger: Ledger, p: PlanResult, planned_before: int, new_jobs: list[int]) -> dict[str, int]:
    """The run's counts after `shard` made `new_jobs` right after the plan `p`. When the plan counted its requests'
    states (p.states) and the ledger's `planned_before` planned requests were all the run's, shard moved only the
    run's requests, from planned to queued: no need to count the run again in SQL."""
    if p.states is None or planned_before != p.states[PLANNED]:
        return run_counts(ledger, p.run_id)
    moved = sum(ledger.job(j)["request_count"] for j in new_jobs)
    counts = counts_after_plan(ledger, p)
    counts[PLANNED] -= moved
    counts[QUEUED] += moved
    return counts


def notes(ws: Workspace) -> str:
    return "".join(f"; {n}" for n in ws.notes)


def no_run(workdir: Path) -> UsageError:
    return UsageError(f"no run in {workdir}: start one with `batcher submit MANIFEST` or `batcher run MANIFEST`, or "
                      "name the workdir of one with --workdir")


def _current_run_id(ledger: Ledger) -> int:
    run = ledger.current_run()
    if run is None:
        raise no_run(ledger.workdir)
    return run["id"]


def write_run_dataset(ws: Workspace, run_id: int) -> DatasetSummary:
    """The run's dataset at --out, in --dataset-format."""
    s = ws.settings
    return write_dataset(ws.ledger, ws.store, run_id, s.out, fmt=s.dataset_format, shard_size=s.shard_size)


def summary_line(ws: Workspace, state: str, p: PlanResult, images: dict[str, int], dataset: DatasetSummary | None = None) -> str:
    """The command's summary of the run `p` (output.render.run_line), with what this command paid."""
    run = ws.ledger.run(p.run_id)
    where = f"{str(dataset.path).rstrip('/')}/metadata.parquet" if dataset is not None else None
    return run_line(state, p, images, jobs_created=ws.jobs_created, paid_now=run_spend_usd(ws.ledger, run, since=ws.started_at),
                    run_paid=run_spend_usd(ws.ledger, run), dataset=where) + shards_note(dataset)


def dataset_images(ds: DatasetSummary) -> dict[str, int]:
    return {"ok": ds.ok, "blocked": ds.blocked, "failed": ds.failed, "pending": ds.pending}


def finished_code(counts: dict[str, int], p: PlanResult, ds: DatasetSummary | None = None) -> int:
    """The exit code of a run: pending while requests are out or images were lost; partial when any failed, were
    blocked, or manifest rows were left out as invalid."""
    if ds is not None and ds.lost:
        return EXIT_PENDING
    code = exit_code_for(counts)
    return EXIT_PARTIAL if code == EXIT_OK and p.rejected else code


# ---- commands ---------------------------------------------------------------------------------------

def plan(ws: Workspace, manifest: str | Path) -> PlanResult:
    check_belongs(ws, manifest_identity(locate(manifest)))
    p = _plan(ws, manifest)
    ws.run_id = p.run_id
    return p


def check_belongs(ws: Workspace, manifest: str) -> None:
    """A workdir and its dataset hold the runs of one manifest (new versions of it, night after night): another
    manifest is refused before anything is done (UsageError, exit 2), unless --switch-manifest."""
    s = ws.settings
    if s.switch_manifest:
        return
    current = ws.ledger.current_run()
    if current is not None and current["manifest"] != manifest and manifest_identity(current["manifest"]) != manifest:
        raise UsageError(f"workdir {s.workdir} holds the run of another manifest ({current['manifest']}): give {manifest} "
                         "its own --workdir (and --out), or pass --switch-manifest to move this workdir and its dataset to it")
    check_owner(s.out, ws.ledger.ledger_id, manifest, switch=False)


def _plan(ws: Workspace, manifest: str | Path) -> PlanResult:
    s = ws.settings
    # Without a budget, what shard_planned would do next can be done as the plan loads (an empty ledger only).
    inline = {} if s.budget_usd is not None else {"shard_limits": s.limits, "token_cap_for": s.quota.cap_for}
    return plan_manifest(ws.ledger, ws.store, manifest, s.manifest, refresh=s.refresh,
                         skip_invalid=s.skip_invalid, rejects_path=s.rejects_path, retry_blocked=s.retry_blocked, **inline)


def resolve(manifest: str | Path, settings: Settings | None) -> tuple[str | Path, Settings]:
    """The manifest and Settings of a command: a job spec (`*.toml`) gives both (Settings.from_spec, to change some
    of its values); a manifest takes `settings` (default: Settings())."""
    if is_spec(manifest):
        if settings is not None:
            raise UsageError(f"{manifest}: a job spec holds its own settings; to change some, use "
                             "Settings.from_spec(path, **options) and pass its manifest and settings")
        return Settings.from_spec(manifest)
    return manifest, settings if settings is not None else Settings()


def submit(manifest: str | Path, settings: Settings | None = None, *, dry_run: bool = False, backend_factory=None) -> Outcome:
    """Validate and plan the manifest (or a job spec's), then upload and create its jobs. Returns at once (no
    waiting)."""
    manifest, settings = resolve(manifest, settings)
    check_dir(settings.workdir, "workdir (--workdir)")
    check_dir(settings.out, "output dataset (--out)")
    if not dry_run and backend_factory is None:
        settings.check_lasting_backend("submit")
        settings.check_backend()
    with open_workspace(settings, backend_factory) as ws:
        p = plan(ws, manifest)
        if dry_run:
            check_run_models(ws, offline=True)
            with ws.ledger.big_page_cache():  # bulk ledger work: sharding, then every job's requests
                planned_before = ws.ledger.count_in_state(PLANNED)
                new = shard_planned(ws)
                for job in ws.ledger.jobs((J_PLANNED,)):
                    dummy = {sha: f"dry-run://reference/{sha}" for sha in jobs_mod.job_reference_hashes(ws.ledger, job["id"])}
                    jobs_mod.write_jsonl(ws.ledger, job["id"], dummy)
            counts = counts_after_shard(ws.ledger, p, planned_before, new)
            return Outcome(EXIT_OK, f"dry run: {rows_read(p)}, {plan_images(p)}; "
                           f"{plural(counts[QUEUED], 'request')} to send in {len(p.jobs) + len(new)} new job(s); JSONL in {ws.ledger.workdir / 'jobs'}; nothing uploaded"
                           + budget_note(ws) + notes(ws),
                           plan=p, counts=counts)
        limit: SpendLimitError | None = None
        try:
            if counts_after_plan(ws.ledger, p)[PLANNED] or ws.ledger.jobs((J_PLANNED, J_UPLOADING, J_UPLOADED, J_CREATING)):
                send_pending(ws)
        except SpendLimitError as exc:
            limit = exc
        counts = run_counts(ws.ledger, p.run_id)
        ds = None
        if not counts[PLANNED] and not counts[QUEUED]:
            ds = write_run_dataset(ws, p.run_id)
        images = dataset_images(ds) if ds is not None else image_statuses(image_counts(ws.ledger, p.run_id))
        code = EXIT_PENDING if limit is not None else finished_code(counts, p, ds)
        return Outcome(code, summary_line(ws, "stopped at a spend limit" if limit else "submitted", p, images, ds)
                       + budget_note(ws) + spend_limit_note(limit) + notes(ws),
                       plan=p, counts=counts, jobs_created=ws.jobs_created, images=images, dataset=ds)


def estimate(manifest: str | Path, settings: Settings | None = None) -> "Estimate":
    """Requests, cache hits, tokens and $ batch vs interactive of a manifest (or a job spec's), at its prices and
    against its tier's monthly spend cap. Writes nothing, needs no API key."""
    from .cost.estimate import estimate as estimate_manifest
    from .cost.pricing import default_table

    manifest, settings = resolve(manifest, settings)
    return estimate_manifest(manifest, settings.manifest, cache_dir=settings.cache_dir, refresh=settings.refresh,
                             skip_invalid=settings.skip_invalid, table=default_table().with_overrides(settings.prices or {}),
                             tier=settings.quota.tier)


def collect(settings: Settings, *, backend_factory=None) -> Outcome:
    """Refresh jobs, download and decode finished ones, requeue failures, write the dataset."""
    check_dir(settings.out, "output dataset (--out)")
    settings.check_engine()
    if backend_factory is None:
        settings.check_lasting_backend("collect")
    with open_workspace(settings, backend_factory, existing=True) as ws:
        run_id = _current_run_id(ws.ledger)
        check_owner(settings.out, ws.ledger.ledger_id, ws.ledger.run(run_id)["manifest"], settings.switch_manifest)
        refresh_jobs(ws)
        stats = collect_finished(ws)
        if settings.fallback_model:
            plan_fallbacks(ws.ledger, ws.store, run_id, settings.fallback_model)
        ds = write_run_dataset(ws, run_id)
        counts = run_counts(ws.ledger, run_id)
        p = run_result(ws.ledger, run_id)
        again = f"; {counts[PLANNED]:,} requests to send again: run `batcher submit` or `batcher run`" if counts[PLANNED] else ""
        code = finished_code(counts, p, ds)  # a row without its image is not finished
        outcome = Outcome(code, summary_line(ws, "collected", p, dataset_images(ds), ds) + again + lost_images_note(ds) + notes(ws),
                          plan=p, dataset=ds, counts=counts, collect=stats, images=dataset_images(ds))
    outcome.summary += written_report(settings)
    return outcome


def export(settings: Settings | str | Path) -> Outcome:
    """Write the run's dataset again at `settings.out` in `settings.dataset_format` (e.g. a finished run's files as
    WebDataset shards), from the ledger and the image cache: nothing is generated, no API is called, no key needed.
    `settings`: Settings, or a job spec (its run, dataset and format)."""
    if not isinstance(settings, Settings):
        settings = Settings.from_spec(settings)[1]
    check_dir(settings.out, "output dataset (--out)")
    with open_workspace(settings, existing=True) as ws:
        run_id = _current_run_id(ws.ledger)
        check_owner(settings.out, ws.ledger.ledger_id, ws.ledger.run(run_id)["manifest"], settings.switch_manifest)
        ds = write_run_dataset(ws, run_id)
        counts = run_counts(ws.ledger, run_id)
        p = run_result(ws.ledger, run_id)
        return Outcome(finished_code(counts, p, ds), summary_line(ws, "exported", p, dataset_images(ds), ds)
                       + lost_images_note(ds), plan=p, dataset=ds, counts=counts, images=dataset_images(ds))


def written_report(settings: Settings) -> str:
    """The morning report (OUT/report.html, contact_sheet.png), made after the workdir's lock is released: where it
    is, for a command's summary. It never fails the command that made the dataset."""
    try:
        r = report(settings)
    except Exception as exc:  # noqa: BLE001
        log.warning("report not written: %s", exc)
        return ""
    return f"; report {r.uploaded_to + '/report.html' if r.uploaded_to else r.html_path}"


def run(manifest: str | Path, settings: Settings | None = None, *, backend_factory=None,
        sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Submit, poll, collect and resubmit until every request has an outcome, or until `timeout`. `manifest`: a
    manifest, or a job spec (then its settings)."""
    manifest, settings = resolve(manifest, settings)
    started = time.monotonic()
    check_dir(settings.workdir, "workdir (--workdir)")
    check_dir(settings.out, "output dataset (--out)")
    settings.check_engine()
    if backend_factory is None:
        settings.check_backend()
    with open_workspace(settings, backend_factory) as ws:
        p = plan(ws, manifest)
        ended_before = {j["id"] for j in ws.ledger.jobs((J_COLLECTED,))}  # the run's progress counts the others
        watch = live.JobsWatch()
        deadline_passed = stopped_at_deadline = False
        counts = counts_after_plan(ws.ledger, p)  # then kept current at the end of each round (nothing else writes)
        limit: SpendLimitError | None = None
        with ws.progress.line() as line, ws.ledger.change_counter() as changes:
            counted_at = changes()
            while True:
                if not deadline_passed and settings.deadline is not None and time.time() >= settings.deadline \
                        and (counts[PLANNED] or counts[QUEUED]):
                    deadline_passed = True
                    if on_deadline(ws, counts) == "stop":
                        stopped_at_deadline = True
                        break
                try:
                    if deadline_passed and settings.deadline_policy == "interactive":
                        generate_interactively(ws, p.run_id)  # past the deadline, no new batch jobs
                    elif counts[PLANNED] or ws.ledger.jobs((J_PLANNED, J_UPLOADING, J_UPLOADED, J_CREATING)):
                        send_pending(ws)
                    refresh_jobs(ws)
                    collect_finished(ws)
                except SpendLimitError as exc:  # nothing more can be sent this month: stop now, keep what is done
                    limit = exc
                if settings.fallback_model:
                    plan_fallbacks(ws.ledger, ws.store, p.run_id, settings.fallback_model)
                if changes() != counted_at:  # a round that changed no request (a job still running) keeps them
                    counts = run_counts(ws.ledger, p.run_id)
                    counted_at = changes()
                if ws.progress.enabled:
                    jobs = [j for j in ws.ledger.jobs() if j["id"] not in ended_before]
                    progress = watch.observe(live.from_ledger(jobs), unsent=counts[PLANNED])
                    line.show(lambda width: progress_line(progress, width))
                if not counts[PLANNED] and not counts[QUEUED]:
                    break
                if limit is not None:
                    break
                if budget_exhausted(ws, counts):
                    break  # nothing in jobs and nothing more fits the budget
                if settings.timeout is not None and time.monotonic() - started > settings.timeout:
                    break
                sleep(settings.poll_interval * random.uniform(0.8, 1.2))  # jitter: many runs don't poll in step
        ds = write_run_dataset(ws, p.run_id)  # reads the ledger only: counts still hold
        code = finished_code(counts, p, ds)  # an image lost while the run ran: run again
        state = "timed out, still running" if code == EXIT_PENDING else "done"
        state = "deadline passed: reported, jobs left running" if stopped_at_deadline else state
        state = "stopped at the budget" if code == EXIT_PENDING and budget_note(ws) else state
        if limit is not None:
            code, state = (EXIT_PENDING if counts[PLANNED] or counts[QUEUED] else code), "stopped at a spend limit"
        outcome = Outcome(code, summary_line(ws, state, p, dataset_images(ds), ds)
                          + lost_images_note(ds) + budget_note(ws) + spend_limit_note(limit) + notes(ws),
                          plan=p, dataset=ds, counts=counts, jobs_created=ws.jobs_created, images=dataset_images(ds))
    written_report(settings)  # the demo and the README show run's summary; the report is in OUT/
    return outcome


def on_deadline(ws: Workspace, counts: dict) -> str:
    """Apply the deadline policy once, when the deadline passes with requests unfinished. Returns "stop"
    when the run should end now (policy `report`)."""
    policy = ws.settings.deadline_policy
    log.warning("deadline passed with %d requests unfinished: policy %s", counts[PLANNED] + counts[QUEUED], policy)
    if policy == "report":
        return "stop"
    # A create killed half-way (`creating`) may have made its job: find it before anything is released or
    # cancelled (past the deadline, send_pending, which reconciles, may never run again).
    jobs_mod.reconcile(ws.ledger, ws.backend)
    if policy in ("resubmit", "interactive"):
        for job in ws.ledger.jobs((J_SUBMITTED,)):  # stragglers: their unfinished requests come back as planned
            try:
                ws.backend.cancel_batch(job["batch_name"])
            except ApiError as exc:
                log.warning("could not cancel %s: %s", job["display_name"], exc)  # it may have just ended
    if policy == "interactive":
        release_unsent_jobs(ws)
    return "continue"


def release_unsent_jobs(ws: Workspace, states: tuple[str, ...] = (J_PLANNED, J_UPLOADING, J_UPLOADED),
                        why: str = "released at the deadline, never created") -> int:
    """Jobs never created (waiting for capacity): their requests go back to planned, without an attempt."""
    released = 0
    for job in ws.ledger.jobs(states):
        sending.release_job(ws.ledger, job["id"], states, J_COLLECTED, why, time.time())
        if job["input_file"]:
            ws.backend.delete_file(job["input_file"])
        released += 1
    return released


def generate_interactively(ws: Workspace, run_id: int) -> None:
    from .jobs import interactive

    s = ws.settings
    budget_left = None
    if s.budget_usd is not None:
        budget_left = max(0.0, s.budget_usd - run_spend_usd(ws.ledger, ws.ledger.run(run_id)))
    stats = interactive.generate(ws.ledger, ws.backend, ws.store, run_id, concurrency=s.interactive_concurrency,
                                 budget_left_usd=budget_left, max_attempts=s.max_attempts)
    if stats.succeeded or stats.failed or stats.blocked:
        log.warning("interactive fallback: %d ok, %d blocked, %d failed, %s at full price", stats.succeeded,
                    stats.blocked, stats.failed, usd(stats.spent_usd))
    if stats.held_back:
        log.warning("interactive fallback: %d requests held back by the budget", stats.held_back)


def cancel(settings: Settings, names: list[str] | None = None, *, backend_factory=None) -> Outcome:
    """Cancel this workdir's running jobs (all of them, or those named by display name or batch name)."""
    if backend_factory is None:
        settings.check_lasting_backend("cancel")
    with open_workspace(settings, backend_factory, existing=True) as ws:
        targets = [j for j in ws.ledger.jobs((J_SUBMITTED,))
                   if not names or j["display_name"] in names or j["batch_name"] in names]
        if names:
            known = {j["display_name"] for j in targets} | {j["batch_name"] for j in targets}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise UsageError(f"no running job named {', '.join(unknown)} in {settings.workdir}; see `batcher status`")
        for j in targets:
            ws.backend.cancel_batch(j["batch_name"])
        return Outcome(EXIT_OK, f"cancel requested for {len(targets)} job(s); `batcher collect` requeues their requests")


def status(settings: Settings, *, refresh: bool = True, backend_factory=None, now: float | None = None) -> dict:
    """Jobs, counts and windows as a JSON-ready document (output.status; refreshed from the API unless
    refresh=False)."""
    if refresh and backend_factory is None:
        settings.check_lasting_backend("status")
    try:
        with open_workspace(settings, backend_factory, existing=True) as ws:
            running = ws.ledger.jobs((J_SUBMITTED,)) if refresh else []
            if running:
                try:
                    refresh_jobs(ws)
                except NoApiKey:
                    raise NoApiKey(f"no API key to ask about {plural(len(running), 'running job')}: set GEMINI_API_KEY "
                                   f"(or GOOGLE_API_KEY), or pass --no-refresh to show the ledger as it is") from None
            return status_document(ws.ledger, settings.quota, ws.server_now() if now is None else now)
    except WorkdirBusyError as exc:  # a run (or collect) holds it: its ledger as that command's last poll left it
        return _status_beside(settings, exc.holder, now)


def _status_beside(settings: Settings, holder: str, now: float | None) -> dict:
    """The status of a workdir another command holds, read from its ledger without the lock (nothing written):
    that command polls the API itself, so the jobs are as its last poll saw them."""
    ledger = Ledger.read_only(settings.workdir)
    try:
        if ledger.current_run() is None:
            raise no_run(settings.workdir)
        doc = status_document(ledger, settings.quota, time.time() if now is None else now)
    finally:
        ledger.close()
    doc["busy"] = {"pid": holder, "note": f"the workdir is in use by batcher pid {holder}: the jobs are as its last "
                                          "poll of the API saw them"}
    return doc


def watch_status(settings: Settings, every: float, *, refresh: bool = True, backend_factory=None,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[tuple[dict, live.RunProgress]]:
    """`status` every `every` seconds (`batcher status --watch`): yields each status document with the progress
    over the jobs not collected when the watch began (output.live: the API's counts, time in state, ETA), until no
    job is running at the API any more (that document is the last). The workdir is locked only while it is read."""
    watch = live.JobsWatch()
    ended_before: set[str] | None = None
    while True:
        doc = status(settings, refresh=refresh, backend_factory=backend_factory)
        if ended_before is None:
            ended_before = {j["display_name"] for j in doc["jobs"] if j["collected"]}
        jobs = [j for j in doc["jobs"] if j["display_name"] not in ended_before]
        yield doc, watch.observe(live.from_document(jobs), unsent=doc["requests"].get(PLANNED, 0))
        if not any(j["state"] == J_SUBMITTED for j in doc["jobs"]):
            return
        sleep(every)


def report(settings: Settings, *, now=None) -> "ReportSummary":
    """Write the morning report of the dataset of `settings` (output.report), with the workdir's status (read,
    not refreshed: no API call); a workdir busy or without a ledger is said on the page."""
    from .output.report import write_report

    status_doc, status_error = None, None
    if not (Path(settings.workdir) / "ledger.sqlite").exists():
        status_error = f"no ledger in {settings.workdir} (pass --workdir)"
    else:
        try:
            with open_workspace(settings, existing=True) as ws:
                written = reading.dataset_written(ws.ledger, ws.ledger.current_run()["id"])
                status_doc = status_document(ws.ledger, settings.quota, time.time())
            if written and not settings.out_given:  # the dataset the run wrote, wherever its --out put it
                settings = dataclasses.replace(settings, out=written)
        except BatcherError as exc:
            status_error = str(exc)
    return write_report(settings, status=status_doc, status_error=status_error, now=now)


@dataclass
class PruneSummary:
    """What `prune` did (or, dry, would do): the ledger's counts it dropped, the runs it kept, and the ledger file's
    size before and after (after: None in a dry run, which compacts nothing)."""

    workdir: str
    keep_runs: int
    dry_run: bool
    kept_runs: list[int]
    unfinished_runs: list[int]  # kept beyond the newest keep_runs: work to finish
    dropped: dict[str, int]  # runs, rows, requests, jobs, job_files
    bytes_before: int
    bytes_after: int | None
    remaining: dict[str, int]  # what the ledger holds now: runs, rows, requests, jobs
    notes: list[str] = field(default_factory=list)
    summary: str = ""
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "summary"}


def prune(settings: Settings, keep_runs: int, dry_run: bool = False) -> PruneSummary:
    """Keep the workdir's ledger bounded: keep its newest `keep_runs` runs and every run with work to finish, drop the
    rest with the requests and finished jobs no kept run uses (ledger.housekeeping, one transaction), then compact the
    file. The image cache is not touched: a dropped request that comes back is a cache hit. Refused (LedgerError)
    while another batcher process holds the workdir. `dry_run`: say what it would drop, change nothing."""
    if keep_runs < 1:
        raise UsageError(f"--keep-runs {keep_runs}: keep at least 1 run (the current run is always kept)")
    try:
        with open_workspace(settings, existing=True) as ws:
            return _prune(ws, keep_runs, dry_run)
    except WorkdirBusyError as exc:
        raise LedgerError(f"workdir {settings.workdir} is in use by another batcher process (pid {exc.holder}): nothing "
                          "was pruned. Prune when it has finished (in cron: after the nightly run)") from None


def _prune(ws: Workspace, keep_runs: int, dry_run: bool) -> PruneSummary:
    ledger = ws.ledger
    before = housekeeping.file_bytes(ledger)
    counts = housekeeping.prune_runs(ledger, keep_runs, dry_run=dry_run)
    files = 0
    after = None
    notes: list[str] = []
    if not dry_run:
        maybe_crash("pruned")  # test hook: see batcher/faults.py
        # Idempotent: a file left by a prune killed after its commit goes with the next one.
        files = jobs_mod.remove_leftover_jsonl(ledger, housekeeping.job_names(ledger))
        try:
            if counts.runs or counts.requests or counts.jobs:  # else nothing was freed: VACUUM would rewrite it all
                housekeeping.compact(ledger)
        except DatabaseError as exc:  # an outside reader, no room for the copy: the pages freed are reused later
            notes.append(f"not compacted ({exc}): the space freed is reused by later runs; run prune again to compact")
        after = housekeeping.file_bytes(ledger)
    dropped = {"runs": counts.runs, "rows": counts.rows, "requests": counts.requests, "jobs": counts.jobs,
               "job_files": files}
    result = PruneSummary(workdir=str(ledger.workdir), keep_runs=keep_runs, dry_run=dry_run, kept_runs=counts.kept_runs,
                          unfinished_runs=counts.unfinished_runs, dropped=dropped, bytes_before=before,
                          bytes_after=after, remaining=housekeeping.table_counts(ledger), notes=notes)
    result.summary = prune_line(result)
    return result
