"""The `batcher` command: parse options, make one library call, render. Errors become exit codes here only."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
import sys
from pathlib import Path

import click

from ..storage import gcs
from .. import pipeline
from ..catalog import DEFAULT_MODEL
from ..errors import BatcherError, ManifestError, UsageError
from ..manifest import ManifestOptions
from ..planning.planner import ShardLimits
from ..jobs.deadline import parse_deadline
from ..jobs.quota import Quota

log = logging.getLogger("batcher")


class _PathOrGcs(click.ParamType):
    """A local path (as a Path) or a gs://bucket/prefix URI (kept as text: a Path would mangle it)."""

    name = "PATH|gs://URI"

    def convert(self, value, param, ctx):
        if isinstance(value, Path) or value is None:
            return value
        return str(value) if gcs.is_gcs(value) else Path(value)


PATH_OR_GS = _PathOrGcs()


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    if quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if verbose < 3:  # the HTTP libraries are chatty at INFO; -vvv shows them
        for name in ("httpx", "httpx2", "httpcore", "httpcore2", "google_genai", "urllib3"):
            logging.getLogger(name).setLevel(max(level, logging.WARNING))


def handle_errors(fn):
    """Turn batcher's errors into a message and the documented exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ManifestError as exc:
            click.echo(f"error: {exc}", err=True)
            for problem in exc.problems:
                click.echo(f"  {problem}", err=True)
            sys.exit(exc.exit_code)
        except BatcherError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (OSError, sqlite3.Error) as exc:  # the environment: disk full, read-only, I/O errors (exit 1)
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.echo(f"error: {getattr(exc, 'strerror', None) or exc}{where}; nothing is lost: fix it and run the "
                       f"same command again", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing is lost; run the same command again to continue", err=True)
            sys.exit(130)

    return wrapper


def common_options(fn):
    options = [
        click.option("--workdir", type=click.Path(path_type=Path), default=Path(".batcher"), show_default=True,
                     help="Ledger and staging directory of the run."),
        click.option("--out", type=PATH_OR_GS, default=None,
                     help="Output dataset directory (default: WORKDIR/dataset)."),
        click.option("--cache-dir", type=PATH_OR_GS, default=None,
                     help="Image cache shared between runs (default: the user cache dir, or $BATCHER_CACHE_DIR)."),
        click.option("--backend", type=click.Choice(["gemini", "emulator", "vertex"]), default="gemini", show_default=True,
                     help="gemini: the API (GEMINI_API_KEY, GOOGLE_GEMINI_BASE_URL); emulator: an in-process emulator for demos; "
                          "vertex: Vertex AI batch prediction (--project, --location, --staging; ADC credentials)."),
        click.option("--project", default=None, help="Vertex AI project (default: $GOOGLE_CLOUD_PROJECT)."),
        click.option("--location", default=None, help="Vertex AI location (default: $GOOGLE_CLOUD_LOCATION, else us-central1)."),
        click.option("--staging", default=None,
                     help="Vertex AI staging area for job files, gs://BUCKET/PREFIX (default: $BATCHER_VERTEX_STAGING)."),
        click.option("--share", default=None, metavar="gs://URI",
                     help="Share this run's jobs with other collectors through GCS (see `collect --worker`)."),
        click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True,
                     help="Attempts per request before it is marked failed."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars; errors only."),
        click.option("--verbose", "-v", count=True, help="More logging (-v, -vv)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def manifest_options(fn):
    options = [
        click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "tsv"]), default=None,
                     help="Manifest format (default: by extension)."),
        click.option("--prompt-column", default="prompt", show_default=True),
        click.option("--id-column", default="id", show_default=True),
        click.option("--model", default=DEFAULT_MODEL, show_default=True, metavar="MODEL",
                     help="Default model (a `model` column overrides it per row); `batcher models` lists them. A model "
                          "batcher does not know is asked about (models.get) before anything is sent."),
        click.option("--aspect-ratio", default=None, help="Default aspect ratio, e.g. 16:9."),
        click.option("--image-size", default=None, help="Default image size: 1K, 2K, 4K (512 on gemini-3.1-flash-image)."),
        click.option("--refresh", is_flag=True, help="Ignore the cache: generate every request again."),
        click.option("--retry-blocked", is_flag=True, help="Send blocked requests (safety, no image) again; they are final otherwise."),
        click.option("--fallback-model", default=None, metavar="MODEL",
                     help="Model for requests that fail --max-attempts times on theirs (the row records which model made it)."),
        click.option("--skip-invalid", is_flag=True, help="Submit the valid rows; write the rejects to WORKDIR/rejects.csv."),
        click.option("--max-requests-per-job", type=click.IntRange(1, 1_000_000), default=1000, show_default=True),
        click.option("--tier", type=click.Choice(["1", "2", "3"]), default="1", show_default=True,
                     help="Your project's quota tier: sets the enqueued-token cap per model, so jobs go out in waves."),
        click.option("--token-cap", type=click.IntRange(1), default=None,
                     help="Enqueued tokens per model in flight at once (overrides --tier)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _apply_spec(ctx: click.Context, manifest: Path, kw: dict) -> Path:
    """For MANIFEST ending in .toml: the job spec's values, under options given on the command line."""
    if not str(manifest).lower().endswith(".toml"):
        return manifest if gcs.is_gcs(manifest) else Path(manifest)
    from ..spec import load_spec

    spec = load_spec(manifest)
    mapping = {
        "workdir": "workdir", "out": "out", "cache_dir": "cache_dir", "backend": "backend", "refresh": "refresh",
        "skip_invalid": "skip_invalid", "defaults.model": "model", "defaults.aspect_ratio": "aspect_ratio",
        "defaults.image_size": "image_size", "defaults.temperature": "temperature", "defaults.top_p": "top_p",
        "defaults.seed": "seed", "defaults.variants": "variants", "defaults.system_instruction": "system_instruction",
        "manifest_columns.prompt": "prompt_column", "manifest_columns.id": "id_column", "manifest_columns.format": "fmt",
        "limits.max_requests_per_job": "max_requests_per_job", "limits.max_attempts": "max_attempts",
        "limits.tier": "tier", "limits.token_cap": "token_cap", "limits.budget_usd": "budget_usd", "prices": "prices",
        "poll.interval_seconds": "poll_interval", "poll.timeout_seconds": "timeout",
        "window.deadline": "deadline", "window.policy": "deadline_policy", "share": "share",
        "retry.max_attempts": "max_attempts", "retry.retry_blocked": "retry_blocked", "retry.fallback_model": "fallback_model",
        "vertex.project": "project", "vertex.location": "location", "vertex.staging": "staging",
        "notify.webhook_uris": "webhook_uris",
    }
    for spec_key, option in mapping.items():
        if spec_key not in spec.values:
            continue
        source = ctx.get_parameter_source(option)
        if source is None or source == click.core.ParameterSource.DEFAULT:
            value = spec.values[spec_key]
            kw[option] = PATH_OR_GS.convert(value, None, None) if option in ("workdir", "out", "cache_dir") else value
    value = spec.values["manifest"]
    return value if gcs.is_gcs(value) else Path(value)


def _settings(kw: dict, **extra) -> pipeline.Settings:
    if kw.get("webhook_uris") and kw.get("backend") == "vertex":
        raise UsageError("webhooks (--webhook-uri, notify.webhook_uris) are a Gemini API feature; Vertex AI batch jobs don't take them")
    m = ManifestOptions(
        prompt_column=kw.get("prompt_column", "prompt"), id_column=kw.get("id_column", "id"), format=kw.get("fmt"),
        model=kw.get("model", DEFAULT_MODEL), aspect_ratio=kw.get("aspect_ratio"), image_size=kw.get("image_size"),
        temperature=kw.get("temperature"), top_p=kw.get("top_p"), seed=kw.get("seed"), variants=kw.get("variants") or 1,
        system_instruction=kw.get("system_instruction"),
    )
    workdir = kw["workdir"]
    return pipeline.Settings(
        workdir=workdir, out=kw.get("out"), cache_dir=kw.get("cache_dir"), manifest=m,
        limits=ShardLimits(max_requests=kw.get("max_requests_per_job", 1000)), max_attempts=kw.get("max_attempts", 3),
        quota=Quota(tier=kw.get("tier") or "1", token_cap=kw.get("token_cap")),
        refresh=kw.get("refresh", False), retry_blocked=kw.get("retry_blocked", False),
        fallback_model=kw.get("fallback_model"), share=kw.get("share"), skip_invalid=kw.get("skip_invalid", False),
        rejects_path=Path(workdir) / "rejects.csv" if kw.get("skip_invalid") else None, quiet=kw.get("quiet", False),
        budget_usd=kw.get("budget_usd"), prices=kw.get("prices"), webhook_uris=kw.get("webhook_uris") or (), **extra,
    )


@contextlib.contextmanager
def _backend_factory(kind: str, kw: dict | None = None):
    """For --backend emulator, an in-process emulator lives as long as the command."""
    if kind == "vertex":
        from ..backends.vertex import VertexBackend, VertexConnection

        kw = kw or {}
        conn = VertexConnection.from_env(project=kw.get("project"), location=kw.get("location"), staging=kw.get("staging"))
        yield lambda: VertexBackend(conn)
        return
    if kind != "emulator":
        yield None
        return
    from ..backends.gemini import Connection, GeminiBackend
    from ..emulator import Emulator, EmulatorConfig

    with Emulator(EmulatorConfig()) as emu:
        yield lambda: GeminiBackend(Connection(api_key="emulator-key", base_url=emu.url, timeout_s=60))


def _finish(outcome: pipeline.Outcome) -> None:
    click.echo(outcome.summary)
    sys.exit(outcome.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batcher")
def main():
    """Bulk image generation on the Gemini Batch API: manifests in, image datasets out.

    \b
    Exit codes: 0 every row has its image; 2 invalid input or usage (nothing submitted);
    3 finished, but some rows failed or were blocked; 4 still in progress; 1 any other error.
    """


@main.command()
@click.argument("manifest")
@common_options
@manifest_options
@click.option("--dry-run", is_flag=True, help="Validate, plan and write the JSONL jobs; upload nothing.")
@click.option("--budget-usd", type=click.FloatRange(0), default=None, help="Send nothing that would take the estimated spend of the run over this many dollars (the rest is held back; exit 4).")
@click.option("--webhook-uri", "webhook_uris", multiple=True, metavar="URL",
              help="Have the API POST each job's end (batch.succeeded, batch.failed, ...) to this listener too (Gemini API only; repeatable).")
@handle_errors
@click.pass_context
def submit(ctx, manifest, dry_run, **kw):
    """Validate MANIFEST (or a JOB.toml spec), plan requests, upload and create batch jobs; returns at once."""
    _setup_logging(kw["verbose"], kw["quiet"])
    manifest = _apply_spec(ctx, manifest, kw)
    with _backend_factory(kw["backend"], kw) as factory:
        _finish(pipeline.submit(manifest, _settings(kw), dry_run=dry_run, backend_factory=factory))


@main.command()
@click.argument("manifest")
@common_options
@manifest_options
@click.option("--poll-interval", type=click.FloatRange(0.05), default=None, help="Seconds between polls (default 30; 1 on the emulator).")
@click.option("--timeout", type=click.FloatRange(0), default=None, help="Stop waiting after this many seconds (exit 4; run again to continue).")
@click.option("--deadline", default=None, help="When unfinished requests get the --deadline-policy: 06:00 (local), 7h, or an ISO date-time.")
@click.option("--deadline-policy", type=click.Choice(["wait", "report", "resubmit", "interactive"]), default="wait", show_default=True,
              help="At the deadline: keep waiting; stop and exit 4; cancel and resubmit stragglers; or generate them interactively (full price).")
@click.option("--budget-usd", type=click.FloatRange(0), default=None, help="Send nothing that would take the estimated spend of the run over this many dollars (the rest is held back; exit 4).")
@click.option("--webhook-uri", "webhook_uris", multiple=True, metavar="URL",
              help="Have the API POST each job's end (batch.succeeded, batch.failed, ...) to this listener too (Gemini API only; repeatable).")
@handle_errors
@click.pass_context
def run(ctx, manifest, poll_interval, timeout, **kw):
    """Submit MANIFEST (or a JOB.toml spec), wait, collect, resubmit failures, until done. Resumable."""
    _setup_logging(kw["verbose"], kw["quiet"])
    kw["poll_interval"], kw["timeout"] = poll_interval, timeout
    spec_path, manifest = manifest, _apply_spec(ctx, manifest, kw)
    poll_interval, timeout = kw["poll_interval"], kw["timeout"]
    try:
        deadline = parse_deadline(kw.pop("deadline")) if kw.get("deadline") else None
    except UsageError as exc:
        if not str(spec_path).lower().endswith(".toml") or ctx.get_parameter_source("deadline") != click.core.ParameterSource.DEFAULT:
            raise
        raise UsageError(f"{spec_path}: 'window.deadline': {exc}") from None
    policy = kw.pop("deadline_policy")
    if poll_interval is None:
        poll_interval = 1.0 if kw["backend"] == "emulator" else 30.0
    with _backend_factory(kw["backend"], kw) as factory:
        _finish(pipeline.run(manifest, _settings(kw, poll_interval=poll_interval, timeout=timeout, deadline=deadline,
                                                  deadline_policy=policy), backend_factory=factory))


@main.command()
@click.argument("manifest")
@click.option("--cache-dir", type=PATH_OR_GS, default=None, help="The image cache to count hits in.")
@manifest_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON document.")
@handle_errors
@click.pass_context
def estimate(ctx, manifest, as_json, **kw):
    """Requests, cache hits, tokens and $ batch vs interactive of MANIFEST (or a JOB.toml); submits nothing."""
    from ..cost import estimate as estimate_mod
    from ..cost.pricing import default_table

    manifest = _apply_spec(ctx, manifest, kw)
    kw.setdefault("workdir", Path(".batcher"))
    table = default_table().with_overrides(kw.get("prices") or {})
    e = estimate_mod.estimate(manifest, _settings(kw).manifest, cache_dir=kw.get("cache_dir"), refresh=kw.get("refresh", False),
                              skip_invalid=kw.get("skip_invalid", False), table=table, tier=kw.get("tier"))
    click.echo(json.dumps(e.to_dict(), indent=2) if as_json else estimate_mod.render(e))


@main.command()
@common_options
@click.option("--worker", is_flag=True,
              help="Be one of many collectors of a shared run (--share, --cache-dir gs://...): no run of your own.")
@click.option("--poll-interval", type=click.FloatRange(0.05), default=30.0, show_default=True, help="Seconds between rounds (--worker).")
@click.option("--timeout", type=click.FloatRange(0), default=None, help="Stop after this many seconds (--worker).")
@handle_errors
def collect(worker, poll_interval, timeout, **kw):
    """Download finished jobs, decode and cache images, requeue failures, write the dataset."""
    _setup_logging(kw["verbose"], kw["quiet"])
    with _backend_factory(kw["backend"], kw) as factory:
        if worker:
            _finish(pipeline.collect_as_worker(_settings(kw, poll_interval=poll_interval, timeout=timeout), backend_factory=factory))
        _finish(pipeline.collect(_settings(kw), backend_factory=factory))


@main.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON document.")
@click.option("--no-refresh", is_flag=True, help="Show the ledger as it is, without asking the API.")
@handle_errors
def status(as_json, no_refresh, **kw):
    """Jobs, their 24 h windows and 48 h expiry, request counts and cost."""
    _setup_logging(kw["verbose"], kw["quiet"])
    with _backend_factory(kw["backend"], kw) as factory:
        doc = pipeline.status(_settings(kw), refresh=not no_refresh, backend_factory=factory)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render_status(doc))
    sys.exit(doc["exit_code"])


def render_status(doc: dict) -> str:
    head = ("JOB", "STATE", "OK", "FAILED", "PENDING", "AGE", "WINDOW LEFT", "EXPIRES IN", "WARNINGS")
    rows = [head]
    for j in doc["jobs"]:
        fmt = lambda h: "-" if h is None else f"{h:.1f}h"  # noqa: E731
        rows.append((j["display_name"], j["state"] + (f" ({j['api_state']})" if j["api_state"] and j["state"] == "submitted" else ""),
                     str(j["succeeded"]), str(j["failed"]), str(j["pending"]), fmt(j["age_hours"]),
                     fmt(j["window_hours_left"]), fmt(j["expiry_hours_left"]), "; ".join(j["warnings"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    c = doc["requests"]
    lines.append("")
    lines.append(f"requests: {c.get('succeeded', 0)} ok, {c.get('blocked', 0)} blocked, {c.get('failed', 0)} failed, "
                 f"{c.get('queued', 0)} in jobs, {c.get('planned', 0)} planned; {doc['cache_hits']} cache hits; "
                 f"${doc['cost_usd']:.4f} spent")
    for model, cap in (doc.get("capacity") or {}).items():
        limit = f"{cap['token_cap']:,}" if cap.get("token_cap") else "no cap"
        lines.append(f"capacity {model}: {cap['in_flight_tokens']:,} of {limit} enqueued tokens in flight; "
                     f"{cap['jobs_waiting']} job(s) ({cap['waiting_tokens']:,} tokens) waiting; "
                     f"{cap['requests_not_in_jobs']} request(s) not in a job yet")
    return "\n".join(lines)


@main.command()
@click.argument("jobs", nargs=-1)
@click.option("--all", "all_jobs", is_flag=True, help="Cancel every running job of the workdir.")
@common_options
@handle_errors
def cancel(jobs, all_jobs, **kw):
    """Cancel running jobs (by display name or batches/ID), or --all."""
    _setup_logging(kw["verbose"], kw["quiet"])
    if not jobs and not all_jobs:
        raise click.UsageError("name the jobs to cancel, or pass --all")
    with _backend_factory(kw["backend"], kw) as factory:
        _finish(pipeline.cancel(_settings(kw), list(jobs) or None, backend_factory=factory))


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".batcher"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="The dataset (default: WORKDIR/dataset).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
@handle_errors
def report(workdir, out, quiet, verbose):
    """Write OUT/report.html and OUT/contact_sheet.png: counts, cost, jobs, failures and thumbnails (no API call)."""
    from ..output.report import write_report

    _setup_logging(verbose, quiet)
    r = write_report(pipeline.Settings(workdir=workdir, out=out, quiet=quiet))
    where = f"{r.uploaded_to}/report.html (a copy in {r.html_path.parent})" if r.uploaded_to else str(r.html_path)
    click.echo(f"report: {where} ({r.rows} rows; contact sheet {r.sheet_path.name})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON document.")
@click.option("--all", "include_shut_down", is_flag=True, help="Include the models that were shut down.")
@click.option("--offline", is_flag=True, help="Do not ask the API for its list (even with an API key).")
@click.option("--backend", type=click.Choice(["gemini", "emulator"]), default="gemini", show_default=True,
              help="Whose list to show beside batcher's: the API's (with GEMINI_API_KEY) or an in-process emulator's.")
@click.option("--verbose", "-v", count=True, help="More logging (-v, -vv).")
@handle_errors
def models(as_json, include_shut_down, offline, backend, verbose):
    """The image models batcher knows: sizes, ratios, tokens and $ per image, shutdown dates and sources; with an
    API key, also the image models the API lists for batch jobs (marking those batcher has no price for)."""
    from .. import models as models_mod
    from ..backends.gemini import Connection, GeminiBackend

    _setup_logging(verbose, False)
    with _backend_factory(backend) as factory:
        api = None
        if not offline:
            if factory is not None:
                api = factory()
            else:
                try:
                    api = GeminiBackend(Connection.from_env())
                except UsageError:
                    api = None  # no key: batcher's own list only
        doc = models_mod.describe(backend=api, include_shut_down=include_shut_down)
    click.echo(json.dumps(doc, indent=2) if as_json else models_mod.render(doc))


class _LazyEmulatorCommand(click.Command):
    """`batcher emulator`: imported only when used, so the library never loads the emulator otherwise."""

    def _real(self) -> click.Command:
        from ..emulator.cli import command

        return command

    def get_params(self, ctx):
        return self._real().get_params(ctx)

    def invoke(self, ctx):
        return self._real().invoke(ctx)

    def get_help(self, ctx):
        return self._real().get_help(ctx)

    def parse_args(self, ctx, args):
        return self._real().parse_args(ctx, args)


main.add_command(_LazyEmulatorCommand("emulator", help="Run the local Gemini Batch API emulator (prints its URL first)."))
