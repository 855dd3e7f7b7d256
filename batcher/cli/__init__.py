"""The `batcher` command: parse options, make one library call, render. Errors become exit codes here only."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import click

from .. import pipeline
from ..catalog import DEFAULT_MODEL
from ..errors import BatcherError, ManifestError
from ..ledger import DatabaseError
from ..output import render
from ..settings import Settings, is_spec
from ..storage import gcs
from ..storage.store import open_store

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
        except (OSError, DatabaseError) as exc:  # the environment: disk full, read-only, I/O errors (exit 1)
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.echo(f"error: {getattr(exc, 'strerror', None) or exc}{where}; nothing is lost: fix it and run the "
                       f"same command again", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing is lost; run the same command again to continue", err=True)
            sys.exit(130)

    return wrapper


def _options(*options):
    """A decorator adding `options` in the order given (as --help lists them)."""

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


# Each command takes the options it uses, and only those (its --help lists nothing it ignores).
WORKDIR = click.option("--workdir", type=click.Path(path_type=Path), default=Path(".batcher"), show_default=True,
                       help="Ledger and staging directory of the run.")
OUT = click.option("--out", type=PATH_OR_GS, default=None,
                   help="Output dataset directory (default: WORKDIR/dataset).")
CACHE_DIR = click.option("--cache-dir", type=PATH_OR_GS, default=None,
                         help="Image cache shared between runs (default: the user cache dir, or $BATCHER_CACHE_DIR).")
BACKEND = click.option("--backend", type=click.Choice(["gemini", "emulator", "vertex"]), default="gemini", show_default=True,
                       help="gemini: the API (GEMINI_API_KEY, GOOGLE_GEMINI_BASE_URL); emulator: an in-process emulator "
                            "for demos (run only); vertex: Vertex AI batch prediction (--project, --location; ADC credentials).")
PROJECT = click.option("--project", default=None, help="Vertex AI project (default: $GOOGLE_CLOUD_PROJECT).")
LOCATION = click.option("--location", default=None, help="Vertex AI location (default: $GOOGLE_CLOUD_LOCATION, else us-central1).")
STAGING = click.option("--staging", default=None,
                       help="Vertex AI staging area for job files, gs://BUCKET/PREFIX (default: $BATCHER_VERTEX_STAGING).")
SWITCH_MANIFEST = click.option("--switch-manifest", is_flag=True,
                               help="Let this workdir and its dataset move on to another manifest than the one they hold "
                                    "(the dataset is rewritten for it; without this flag that is refused).")
MAX_ATTEMPTS = click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True,
                            help="Attempts per request before it is marked failed.")
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bars; errors only.")
VERBOSE = click.option("--verbose", "-v", count=True, help="More logging (-v, -vv).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON document.")
BUDGET_USD = click.option("--budget-usd", type=click.FloatRange(0), default=None,
                          help="Send nothing that would take the estimated spend of the run over this many dollars (the "
                               "rest is held back; exit 4).")
WEBHOOK_URIS = click.option("--webhook-uri", "webhook_uris", multiple=True, metavar="URL",
                            help="Have the API POST each job's end (batch.succeeded, batch.failed, ...) to this listener "
                                 "too (Gemini API only; repeatable).")
# The shape of the dataset written (README: Dataset formats).
dataset_format_options = _options(
    click.option("--dataset-format", type=click.Choice(["files", "webdataset", "parquet"]), default="files", show_default=True,
                 help="files: images/ + metadata.parquet; webdataset: tar shards (OUT/shards/); parquet: Parquet shards "
                      "with the image bytes (OUT/data/). The last two: a local --out only."),
    click.option("--shard-size", default=None, metavar="SIZE",
                 help="webdataset, parquet: images per shard up to this size, e.g. 500MB (default 1GB)."),
)

# Who downloads and decodes finished jobs (run and collect).
ENGINE = click.option("--engine", type=click.Choice(["local", "ray"]), default=None,
                      help="local (default): this process; ray: a Ray task per job on any node, into the shared "
                           "cache (pip install 'batcher[ray]').")
RAY_ADDRESS = click.option("--ray-address", default=None, metavar="ADDRESS",
                           help="The Ray cluster for --engine ray, e.g. ray://head:10001 (default: $RAY_ADDRESS, else "
                                "a local Ray started for the command).")

# The API, as commands that only talk to existing jobs reach it (no files to stage).
api_options = _options(BACKEND, PROJECT, LOCATION)
# What submit and run take besides the manifest's: the whole run.
common_options = _options(WORKDIR, OUT, CACHE_DIR, BACKEND, PROJECT, LOCATION, STAGING, SWITCH_MANIFEST,
                          MAX_ATTEMPTS, QUIET, VERBOSE)

# How a manifest's rows become requests (every command that reads a manifest).
request_options = _options(
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
)
TIER = click.option("--tier", type=click.Choice(["1", "2", "3"]), default="1", show_default=True,
                            help="Your project's quota tier: sets the enqueued-token cap per model, so jobs go out in waves.")
# How requests go out (submit and run).
sending_options = _options(
    click.option("--retry-blocked", is_flag=True, help="Send blocked requests (safety, no image) again; they are final otherwise."),
    click.option("--fallback-model", default=None, metavar="MODEL",
                 help="Model for requests that fail --max-attempts times on theirs (the row records which model made it)."),
    click.option("--skip-invalid", is_flag=True, help="Submit the valid rows; write the rejects to WORKDIR/rejects.csv (exit 3)."),
    click.option("--max-requests-per-job", type=click.IntRange(1, 1_000_000), default=1000, show_default=True),
    TIER,
    click.option("--token-cap", type=click.IntRange(1), default=None,
                 help="Enqueued tokens per model in flight at once (overrides --tier)."),
)


def manifest_options(fn):
    return request_options(sending_options(fn))


def _settings(ctx: click.Context, manifest: str | None, kw: dict) -> tuple[str | Path | None, Settings]:
    """The command's options as Settings (settings.from_options, the one mapping). For a MANIFEST ending in .toml:
    the job spec's values, under the options given on the command line."""
    kw = {k: v for k, v in kw.items() if k != "verbose"}
    if manifest is not None and is_spec(manifest):
        given = {k: v for k, v in kw.items() if ctx.get_parameter_source(k) not in (None, click.core.ParameterSource.DEFAULT)}
        return Settings.from_spec(manifest, **given)
    if manifest is not None:
        manifest = manifest if gcs.is_gcs(manifest) else Path(manifest)
    return manifest, Settings.from_options(**kw)


def _check_engine(settings: Settings, kw: dict) -> None:
    """--ray-address without Ray as the engine would be ignored: say so instead."""
    if kw.get("ray_address") and settings.engine != "ray":
        raise click.UsageError("--ray-address is for --engine ray (or collect.engine = \"ray\" in the job spec)")


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
@dataset_format_options
@click.option("--dry-run", is_flag=True, help="Validate, plan and write the JSONL jobs; upload nothing.")
@BUDGET_USD
@WEBHOOK_URIS
@handle_errors
@click.pass_context
def submit(ctx, manifest, dry_run, **kw):
    """Validate MANIFEST (or a JOB.toml spec), plan requests, upload and create batch jobs; returns at once."""
    _setup_logging(kw["verbose"], kw["quiet"])
    _finish(pipeline.submit(*_settings(ctx, manifest, kw), dry_run=dry_run))


@main.command()
@click.argument("manifest")
@common_options
@manifest_options
@dataset_format_options
@click.option("--poll-interval", type=click.FloatRange(0.05), default=None, help="Seconds between polls (default 30; 1 on the emulator).")
@click.option("--timeout", type=click.FloatRange(0), default=None, help="Stop waiting after this many seconds (exit 4; run again to continue).")
@click.option("--deadline", default=None, help="When unfinished requests get the --deadline-policy: 06:00 (local), 7h, or an ISO date-time.")
@click.option("--deadline-policy", type=click.Choice(["wait", "report", "resubmit", "interactive"]), default="wait", show_default=True,
              help="At the deadline: keep waiting; stop and exit 4; cancel and resubmit stragglers; or generate them interactively (full price).")
@BUDGET_USD
@WEBHOOK_URIS
@ENGINE
@RAY_ADDRESS
@handle_errors
@click.pass_context
def run(ctx, manifest, **kw):
    """Submit MANIFEST (or a JOB.toml spec), wait, collect, resubmit failures, until done. Resumable."""
    _setup_logging(kw["verbose"], kw["quiet"])
    manifest, settings = _settings(ctx, manifest, kw)
    _check_engine(settings, kw)
    _finish(pipeline.run(manifest, settings))


@main.command()
@click.argument("manifest")
@click.option("--cache-dir", type=PATH_OR_GS, default=None, help="The image cache to count hits in.")
@request_options
@click.option("--skip-invalid", is_flag=True, help="Estimate the valid rows only (as submit --skip-invalid would send).")
@TIER
@JSON
@handle_errors
@click.pass_context
def estimate(ctx, manifest, as_json, **kw):
    """Requests, cache hits, tokens and $ batch vs interactive of MANIFEST (or a JOB.toml); submits nothing."""
    e = pipeline.estimate(*_settings(ctx, manifest, kw))
    click.echo(json.dumps(e.to_dict(), indent=2) if as_json else render.estimate(e))


# The commands that act on a run already made take its job spec, or the options that find it.
SPEC = click.argument("spec", required=False, metavar="[JOB.toml]")


def _run_settings(ctx: click.Context, spec: str | None, kw: dict) -> Settings:
    """The settings of a command on an existing run: from its job spec (options given win), or from the options."""
    if spec is not None and not is_spec(spec):
        raise click.UsageError(f"{spec!r}: {ctx.info_name} takes a job spec (a .toml file) or none: the run is found "
                               f"by --workdir")
    return _settings(ctx, spec, kw)[1]


@main.command()
@SPEC
@WORKDIR
@OUT
@CACHE_DIR
@api_options
@STAGING
@SWITCH_MANIFEST
@MAX_ATTEMPTS
@dataset_format_options
@ENGINE
@RAY_ADDRESS
@QUIET
@VERBOSE
@handle_errors
@click.pass_context
def collect(ctx, spec, **kw):
    """Download finished jobs, decode and cache images, requeue failures, write the dataset and its report.

    The run is the one in --workdir, or the one of JOB.toml (its workdir, dataset, cache and backend)."""
    _setup_logging(kw["verbose"], kw["quiet"])
    settings = _run_settings(ctx, spec, kw)
    _check_engine(settings, kw)
    _finish(pipeline.collect(settings))


@main.command()
@SPEC
@WORKDIR
@api_options
@JSON
@click.option("--no-refresh", is_flag=True, help="Show the ledger as it is, without asking the API.")
@click.option("--watch", type=click.FloatRange(0.05), is_flag=False, flag_value=30.0, default=None, metavar="[SECONDS]",
              help="Redraw every SECONDS (default 30) with the progress over the jobs, until every job has ended.")
@click.option("--wide", is_flag=True, help="Every column, however long the lines (default: fit $COLUMNS, the terminal, or 80).")
@QUIET
@VERBOSE
@handle_errors
@click.pass_context
def status(ctx, spec, as_json, no_refresh, watch, wide, **kw):
    """Jobs, their 24 h windows and 48 h expiry, request counts and cost (of --workdir, or of JOB.toml's run)."""
    _setup_logging(kw["verbose"], kw["quiet"])
    settings = _run_settings(ctx, spec, kw)
    if watch is None:
        doc = pipeline.status(settings, refresh=not no_refresh)
        click.echo(json.dumps(doc, indent=2) if as_json else render.status_table(doc, wide=wide))
        sys.exit(doc["exit_code"])
    for doc, progress in pipeline.watch_status(settings, watch, refresh=not no_refresh):
        if as_json:
            click.echo(json.dumps(doc))  # one document a line
            continue
        if sys.stdout.isatty():
            click.clear()
        click.echo(render.watched_status(doc, progress, watch, at=time.strftime("%H:%M:%S"), wide=wide) + "\n")
    sys.exit(doc["exit_code"])


@main.command()
@click.argument("jobs", nargs=-1)
@click.option("--all", "all_jobs", is_flag=True, help="Cancel every running job of the workdir.")
@WORKDIR
@api_options
@QUIET
@VERBOSE
@handle_errors
@click.pass_context
def cancel(ctx, jobs, all_jobs, **kw):
    """Cancel running jobs (by display name or batches/ID), or --all. A JOB.toml first names the run by its spec:
    `batcher cancel jobs/products.toml --all`."""
    _setup_logging(kw["verbose"], kw["quiet"])
    spec = jobs[0] if jobs and is_spec(jobs[0]) else None
    jobs = jobs[1:] if spec else jobs
    if not jobs and not all_jobs:
        raise click.UsageError("name the jobs to cancel, or pass --all")
    _finish(pipeline.cancel(_run_settings(ctx, spec, kw), list(jobs) or None))


@main.command()
@SPEC
@WORKDIR
@click.option("--keep-runs", type=click.IntRange(1), required=True, metavar="N",
              help="Keep the newest N runs (at least 1); runs with work to finish are always kept.")
@click.option("--dry-run", is_flag=True, help="Say what would be dropped; change nothing.")
@JSON
@QUIET
@VERBOSE
@handle_errors
@click.pass_context
def prune(ctx, spec, keep_runs, dry_run, as_json, **kw):
    """Keep the ledger bounded: drop old runs' rows, and the requests and finished jobs no kept run uses, then
    compact it. The image cache is not touched. Refused while another batcher command uses the workdir."""
    _setup_logging(kw["verbose"], kw["quiet"])
    p = pipeline.prune(_run_settings(ctx, spec, kw), keep_runs=keep_runs, dry_run=dry_run)
    click.echo(json.dumps(p.to_dict(), indent=2) if as_json else p.summary)
    sys.exit(p.exit_code)


@main.command()
@SPEC
@WORKDIR
@click.option("--out", type=PATH_OR_GS, default=None,
              help="The dataset (default: the one the run wrote last, else WORKDIR/dataset).")
@QUIET
@VERBOSE
@handle_errors
@click.pass_context
def report(ctx, spec, **kw):
    """Write OUT/report.html and OUT/contact_sheet.png: counts, cost, jobs, failures and the images (no API call)."""
    _setup_logging(kw["verbose"], kw["quiet"])
    r = pipeline.report(_run_settings(ctx, spec, kw))
    where = f"{r.uploaded_to}/report.html (a copy in {r.html_path.parent})" if r.uploaded_to else str(r.html_path)
    click.echo(f"report: {where} ({r.rows} rows; contact sheet {r.sheet_path.name})")


@main.command()
@SPEC
@WORKDIR
@click.option("--out", type=PATH_OR_GS, default=None, help="Where to write the dataset (default: WORKDIR/dataset).")
@CACHE_DIR
@dataset_format_options
@SWITCH_MANIFEST
@QUIET
@VERBOSE
@handle_errors
@click.pass_context
def export(ctx, spec, **kw):
    """Write the run's dataset in another format (or place) from the image cache and the ledger: nothing is
    generated, no API is called, no key needed. `batcher export --workdir W --out O --dataset-format webdataset`."""
    _setup_logging(kw["verbose"], kw["quiet"])
    _finish(pipeline.export(_run_settings(ctx, spec, kw)))


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
    from ..models import describe_models

    _setup_logging(verbose, False)
    doc = describe_models(backend=None if offline else backend, include_shut_down=include_shut_down)
    click.echo(json.dumps(doc, indent=2) if as_json else render.models(doc))


@main.group()
def cache():
    """Look after the image cache (local or gs://): what it holds, whether its images are whole, making room.

    \b
    batcher cache stats                     entries and bytes, by model and by age
    batcher cache verify                    every image decodes and matches its digest; bad ones moved aside
    batcher cache gc --older-than 30d       remove old entries (--dry-run first to see what would go)
    """


def _cache_options(fn):
    # Explicit on each `cache` command (not the run commands' shared options): these are all they take.
    for option in reversed([
        click.option("--cache-dir", type=PATH_OR_GS, default=None,
                     help="The image cache: a directory or gs://BUCKET/PREFIX (default: the user cache dir, or "
                          "$BATCHER_CACHE_DIR, as for the other commands)."),
        click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON document."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        click.option("--verbose", "-v", count=True, help="More logging (-v, -vv)."),
    ]):
        fn = option(fn)
    return fn


_MIN_AGE_HELP = ("Leave alone anything changed more recently than this: a collect writes an entry's "
                 ".json a moment before its image and `--refresh` replaces entries in place, so a young entry may "
                 "be half-way through a write. Temp files of writes are never touched.")


@cache.command("stats")
@_cache_options
@handle_errors
def cache_stats(cache_dir, as_json, quiet, verbose):
    """Entries and bytes of the cache, by model and by age (when each image was written)."""
    from ..progress import Progress
    from ..storage import housekeeping

    _setup_logging(verbose, quiet)
    result = housekeeping.stats(open_store(cache_dir), progress=Progress(quiet))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render.cache_stats(result))


@cache.command("verify")
@_cache_options
@click.option("--min-age", default="1h", show_default=True, metavar="AGE",
              help="Bad entries changed more recently than this are reported but left in place (a collect may be "
                   "replacing them).")
@click.option("--no-quarantine", is_flag=True, help="Only report bad entries; move nothing.")
@handle_errors
def cache_verify(cache_dir, as_json, quiet, verbose, min_age, no_quarantine):
    """Read every image: it must decode and match the SHA-256 its .json records (entries written before digests
    were recorded: decoding only, counted as "no digest"). Bad entries are moved to CACHE/quarantine/WHEN/ (kept,
    never deleted), so the next run generates them again.

    \b
    Exit codes: 0 every image is whole; 3 bad entries were found (listed); 2 usage; 1 any other error.
    """
    from ..progress import Progress
    from ..storage import housekeeping

    _setup_logging(verbose, quiet)
    result = housekeeping.verify(open_store(cache_dir), quarantine=not no_quarantine,
                                 min_age=housekeeping.parse_age(min_age, "--min-age"),
                                 progress=Progress(quiet))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render.cache_verify(result))
    sys.exit(3 if result.bad else 0)


@cache.command("gc")
@_cache_options
@click.option("--older-than", default=None, metavar="AGE", help="Remove entries whose image was written longer ago "
              "than this: 30d, 12h, 2w.")
@click.option("--max-bytes", default=None, metavar="SIZE", help="Then remove the oldest entries until the cache "
              "holds at most this much: 50G, 500M (G = 2**30 bytes).")
@click.option("--keep-referenced", "keep_workdirs", multiple=True, type=click.Path(path_type=Path), metavar="WORKDIR",
              help="Never remove what this workdir's ledger names (repeatable); given alone, remove everything else.")
@click.option("--min-age", default="1h", show_default=True, metavar="AGE", help=_MIN_AGE_HELP)
@click.option("--dry-run", is_flag=True, help="Show what would go (count, bytes, examples); remove nothing.")
@handle_errors
def cache_gc(cache_dir, as_json, quiet, verbose, older_than, max_bytes, keep_workdirs, min_age, dry_run):
    """Make room: remove entries by age, to a size budget, or all but those some workdirs use. An entry's image
    goes before its .json; local datasets hard-link their images, so those keep their space until the dataset
    goes too."""
    from ..ledger.reading import referenced_hashes
    from ..progress import Progress
    from ..storage import housekeeping

    _setup_logging(verbose, quiet)
    older_than = housekeeping.parse_age(older_than, "--older-than") if older_than is not None else None
    max_bytes = housekeeping.parse_size(max_bytes, "--max-bytes") if max_bytes is not None else None
    min_age = housekeeping.parse_age(min_age, "--min-age")
    keep = set().union(*(referenced_hashes(w) for w in keep_workdirs)) if keep_workdirs else None
    result = housekeeping.gc(open_store(cache_dir), older_than=older_than, max_bytes=max_bytes, keep=keep,
                             min_age=min_age, dry_run=dry_run, progress=Progress(quiet))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render.cache_gc(result))


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


def entry_point() -> None:
    """The `batcher` program (its console script, and `python -m batcher.cli`): `main`, in a process of its own."""
    _without_pandas()
    main()


class _WithoutPandas:
    """An import hook that says pandas is not installed. pyarrow imports pandas, when it is, the first time it
    converts a Python value (only to ask whether the value is a pandas object): ~0.35 s and ~50 MB in every command
    that writes a dataset, more than a collect decoder process in all (docs/benchmarks.md, issue 19). batcher never
    hands pyarrow a pandas object, so its own process goes without. Installed by `entry_point`, not by `main`: a
    Python program that calls `main` (tests, notebooks) keeps its pandas."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("not imported by the batcher program", name=name)
        return None


def _without_pandas() -> None:
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _WithoutPandas())
