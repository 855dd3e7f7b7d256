"""Settings: everything a command needs, from Python, from a job spec (`jobs/*.toml`), or from the command line,
through one mapping (`from_options`): the command line and a spec give the same flat options, and a spec's values
are taken unless the command line gives its own.

    settings = Settings(workdir=".batcher", out="dataset")
    manifest, settings = Settings.from_spec("jobs/products.toml", budget_usd=50)   # the spec's values, then these

A job spec holds everything a recurring run needs in one reviewed file; unknown keys are errors naming the key and
the file (a typo must not silently change a nightly run):

    manifest = "../samples/prompts.csv"    # relative paths are relative to the spec file
    workdir = "/var/lib/batcher/products"
    out = "/data/datasets/products"
    dataset_format = "webdataset"          # files (default) | webdataset | parquet; shard_size = "1GB"
    [defaults]   model, aspect_ratio, image_size, temperature, top_p, seed, variants, system_instruction
    [manifest_columns]   prompt, id, format
    [limits]     max_requests_per_job, max_attempts, tier, token_cap, budget_usd
    [prices."MODEL"]   input_usd_per_mtok, output_usd_per_mtok, text_output_usd_per_mtok, batch_discount, ...
    [poll]       interval_seconds, timeout_seconds
    [retry]      max_attempts, retry_blocked, fallback_model
    [window]     deadline ("06:00", "7h"), policy (wait | report | resubmit | interactive)
    [vertex]     project, location, staging ("gs://bucket/prefix"), with backend = "vertex"
    [notify]     webhook_uris
    [collect]    engine (local | ray), ray_address ("ray://head:10001"; default $RAY_ADDRESS, else a local Ray)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import catalog
from .backends.factory import BACKENDS
from .errors import UsageError
from .jobs.deadline import check_policy, parse_deadline
from .jobs.quota import Quota
from .jobs.webhooks import check_uris
from .manifest import ManifestOptions
from .output.formats import DEFAULT_SHARD_SIZE, FORMATS, gcs_refused, parse_size
from .planning.packing import ShardLimits
from .storage import gcs

ENGINES = ("local", "ray")  # who downloads and decodes finished jobs


@dataclass
class Settings:
    """Everything a command needs besides its manifest: where the run lives (`workdir`, `out`, `cache_dir`), how rows
    become requests (`manifest`), how jobs are sized and sent (`limits`, `quota`, `budget_usd`, `max_attempts`,
    `fallback_model`), how long to wait (`poll_interval`, `timeout`, `deadline`, `deadline_policy`) and which API
    (`backend`, `project`, `location`, `staging`). `Settings.from_options` takes the command line's option names;
    `Settings.from_spec` reads a job spec. Defaults are the command line's."""

    workdir: Path = Path(".batcher")
    out: Path | str | None = None  # default: <workdir>/dataset; or gs://bucket/prefix
    cache_dir: Path | str | None = None  # default: the user cache dir (shared between workdirs); or gs://bucket/prefix
    manifest: ManifestOptions = field(default_factory=ManifestOptions)
    limits: ShardLimits = field(default_factory=ShardLimits)
    max_attempts: int = 3
    refresh: bool = False
    retry_blocked: bool = False  # blocked (safety, no image) is final unless asked
    skip_invalid: bool = False
    switch_manifest: bool = False  # let a workdir and its dataset move on to another manifest (its dataset rewritten)
    rejects_path: Path | None = None
    poll_interval: float | None = None  # seconds between polls; None: 30 (1 on the in-process emulator)
    timeout: float | None = None
    quota: Quota = field(default_factory=Quota)
    engine: str = "local"  # who downloads and decodes finished jobs: this process, or Ray tasks (results.on_ray)
    ray_address: str | None = None  # the Ray cluster (engine "ray"); None: $RAY_ADDRESS, else a local Ray
    fallback_model: str | None = None  # for requests that keep failing on their model
    deadline: float | str | None = None  # epoch seconds, or as --deadline takes it: "06:00", "7h", an ISO time
    deadline_policy: str = "wait"  # wait | report | resubmit | interactive
    interactive_concurrency: int = 4
    quiet: bool = False
    lock_wait: float = 0.0
    budget_usd: float | None = None  # hold back requests beyond this estimated spend of the run (cost.estimate)
    prices: dict | None = None  # price overrides (job spec [prices]); None: WORKDIR/prices.json or the defaults
    webhook_uris: tuple[str, ...] = ()  # the API POSTs each job's end (batch.succeeded, ...) here: webhook_config
    backend: str = "gemini"  # gemini | vertex | emulator (backends.factory)
    project: str | None = None  # Vertex AI: project (default $GOOGLE_CLOUD_PROJECT)
    location: str | None = None  # Vertex AI: location (default $GOOGLE_CLOUD_LOCATION, else us-central1)
    staging: str | None = None  # Vertex AI: gs://bucket/prefix for job files (default $BATCHER_VERTEX_STAGING)
    dataset_format: str = "files"  # files (images/ + metadata.parquet) | webdataset | parquet: output.shards
    shard_size: int | str = DEFAULT_SHARD_SIZE  # webdataset, parquet: bytes of images per shard (or "500MB", "1GB")
    out_given: bool = field(default=False, init=False, repr=False, compare=False)  # `out` was chosen, not the default

    def __post_init__(self):
        self.webhook_uris = check_uris(self.webhook_uris)
        if self.backend not in BACKENDS:
            raise UsageError(f"backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.backend == "vertex" and self.webhook_uris:
            raise UsageError("webhooks (--webhook-uri, notify.webhook_uris) are a Gemini API feature; Vertex AI batch "
                             "jobs don't take them")
        if self.poll_interval is None:
            self.poll_interval = 1.0 if self.backend == "emulator" else 30.0
        if isinstance(self.deadline, str):
            self.deadline = parse_deadline(self.deadline)
        self.workdir = Path(self.workdir)
        self.out_given = bool(self.out)
        self.out = _path_or_uri(self.out) if self.out else self.workdir / "dataset"
        self.cache_dir = _path_or_uri(self.cache_dir) if self.cache_dir else None
        if self.skip_invalid and self.rejects_path is None:
            self.rejects_path = self.workdir / "rejects.csv"
        if self.max_attempts < 1:
            raise UsageError("--max-attempts must be at least 1")
        if self.fallback_model:
            self.fallback_model = self.fallback_model.strip().removeprefix("models/")  # as --model and manifest cells
            problem = catalog.model_name_problem(self.fallback_model) or catalog.refusal(self.fallback_model)
            if problem:
                raise UsageError(f"--fallback-model {self.fallback_model!r}: {problem}")
        check_policy(self.deadline_policy)
        self._check_dataset_format()
        if self.engine not in ENGINES:
            raise UsageError(f"engine {self.engine!r}: use one of {', '.join(ENGINES)}")

    def _check_dataset_format(self) -> None:
        if self.dataset_format not in FORMATS:
            raise UsageError(f"--dataset-format {self.dataset_format!r}: use one of {', '.join(FORMATS)}")
        try:
            self.shard_size = parse_size(self.shard_size)
        except ValueError as exc:
            raise UsageError(f"--shard-size: {exc}") from None
        if self.dataset_format != "files" and gcs.is_gcs(self.out):
            raise UsageError(gcs_refused(self.dataset_format, self.out))

    def check_engine(self) -> None:
        """Before a command that collects does any work: the engine it asks for can run here."""
        if self.engine != "ray":
            return
        from .results.on_ray import require_ray

        if self.backend == "emulator":
            raise UsageError("--engine ray --backend emulator: that emulator lives inside this command, out of the Ray "
                             "workers' reach. Start `batcher emulator` and point GOOGLE_GEMINI_BASE_URL at it instead")
        require_ray()

    def check_lasting_backend(self, command: str) -> None:
        """`command` (submit, collect, status, cancel) leaves jobs for a later command, or reaches jobs an earlier one
        left: the in-process emulator (backend "emulator") dies with each command, so it cannot serve them."""
        if self.backend == "emulator":
            raise UsageError(f"{command} --backend emulator: that emulator lives inside one command and takes its jobs with "
                             "it, so no later command could reach them. Use `batcher run --backend emulator` (one command, "
                             "start to finish), or start `batcher emulator` and point GOOGLE_GEMINI_BASE_URL at it")

    def check_backend(self) -> None:
        """Before a command that will reach the API does any work: the backend's configuration is complete (Vertex
        AI: project, location, staging), or UsageError says what is missing. `estimate` and dry runs need none."""
        if self.backend == "vertex":
            from .backends.vertex import VertexConnection

            VertexConnection.from_env(project=self.project, location=self.location, staging=self.staging).require_staging()

    @classmethod
    def from_options(cls, **options: Any) -> "Settings":
        """Settings from flat options, as the command line names them (`model`, `tier`, `max_requests_per_job`,
        `poll_interval`, ...: OPTIONS)."""
        return from_options(options)

    @classmethod
    def from_spec(cls, path: str | Path, **overrides: Any) -> tuple[str | Path, "Settings"]:
        """(the manifest, Settings) of a job spec; `overrides` (flat options) win over the spec's values."""
        spec = load_spec(path)
        options = {**spec.options(), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            settings = from_options(options)
        except UsageError as exc:
            if str(exc).startswith("--deadline ") and overrides.get("deadline") is None and "deadline" in options:
                raise UsageError(f"{spec.path}: 'window.deadline': {exc}") from None
            raise
        return spec.manifest, settings


def _path_or_uri(value) -> Path | str:
    return str(value) if gcs.is_gcs(value) else Path(value)


# The flat options (the command line's names) and where each goes.
MANIFEST_OPTIONS = {"prompt_column": "prompt_column", "id_column": "id_column", "fmt": "format", "model": "model",
                    "aspect_ratio": "aspect_ratio", "image_size": "image_size", "temperature": "temperature",
                    "top_p": "top_p", "seed": "seed", "variants": "variants", "system_instruction": "system_instruction"}
SETTINGS_OPTIONS = ("workdir", "out", "cache_dir", "max_attempts", "refresh", "retry_blocked", "skip_invalid", "switch_manifest",
                    "poll_interval", "timeout", "engine", "ray_address", "fallback_model", "deadline", "deadline_policy", "quiet",
                    "budget_usd", "prices", "webhook_uris", "backend", "project", "location", "staging",
                    "dataset_format", "shard_size")
OPTIONS = (*MANIFEST_OPTIONS, *SETTINGS_OPTIONS, "max_requests_per_job", "tier", "token_cap")


def from_options(options: dict[str, Any]) -> Settings:
    """The one mapping from flat options (command line, job spec) to Settings. Options left out (or None) take
    Settings' defaults."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None}
    manifest = ManifestOptions(**{MANIFEST_OPTIONS[k]: v for k, v in given.items() if k in MANIFEST_OPTIONS})
    kw: dict[str, Any] = {k: v for k, v in given.items() if k in SETTINGS_OPTIONS}
    if "webhook_uris" in kw:
        kw["webhook_uris"] = tuple(kw["webhook_uris"])
    if "max_requests_per_job" in given:
        kw["limits"] = ShardLimits(max_requests=given["max_requests_per_job"])
    kw["quota"] = Quota(tier=str(given.get("tier") or "1"), token_cap=given.get("token_cap"))
    return Settings(manifest=manifest, **kw)


# ---- job specs -----------------------------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "manifest": str, "workdir": str, "out": str, "cache_dir": str, "backend": str, "refresh": bool, "skip_invalid": bool,
    "dataset_format": str, "shard_size": str,
    "defaults": {"model": str, "aspect_ratio": str, "image_size": str, "temperature": float, "top_p": float,
                 "seed": int, "variants": int, "system_instruction": str},
    "manifest_columns": {"prompt": str, "id": str, "format": str},
    "limits": {"max_requests_per_job": int, "max_attempts": int, "tier": str, "token_cap": int, "budget_usd": float},
    "poll": {"interval_seconds": float, "timeout_seconds": float},
    "window": {"deadline": str, "policy": str},
    "retry": {"max_attempts": int, "retry_blocked": bool, "fallback_model": str},
    "vertex": {"project": str, "location": str, "staging": str},  # backend = "vertex"
    "notify": {"webhook_uris": list},  # listeners the API POSTs each job's end to (jobs.webhooks)
    "collect": {"engine": str, "ray_address": str},  # who downloads and decodes finished jobs (results.on_ray)
}
PATH_KEYS = ("manifest", "workdir", "out", "cache_dir")
# Values the command line would refuse (click choices and ranges): a spec must not slip them past it.
CHOICES: dict[str, tuple] = {
    "backend": ("gemini", "emulator", "vertex"), "dataset_format": ("files", "webdataset", "parquet"),
    "manifest_columns.format": ("parquet", "csv", "tsv"),
    "limits.tier": ("1", "2", "3"), "window.policy": ("wait", "report", "resubmit", "interactive"),
    "collect.engine": ("local", "ray"),
}
MINIMUM: dict[str, float] = {
    "defaults.variants": 1, "limits.max_requests_per_job": 1, "limits.max_attempts": 1, "limits.token_cap": 1,
    "limits.budget_usd": 0, "poll.interval_seconds": 0.05, "poll.timeout_seconds": 0, "retry.max_attempts": 1,
}
MAXIMUM: dict[str, float] = {"limits.max_attempts": 100, "retry.max_attempts": 100, "limits.max_requests_per_job": 1_000_000}



# A spec key -> the flat option it sets.
SPEC_OPTIONS = {
    "workdir": "workdir", "out": "out", "cache_dir": "cache_dir", "backend": "backend", "refresh": "refresh",
    "skip_invalid": "skip_invalid", "defaults.model": "model", "defaults.aspect_ratio": "aspect_ratio",
    "defaults.image_size": "image_size", "defaults.temperature": "temperature", "defaults.top_p": "top_p",
    "defaults.seed": "seed", "defaults.variants": "variants", "defaults.system_instruction": "system_instruction",
    "manifest_columns.prompt": "prompt_column", "manifest_columns.id": "id_column", "manifest_columns.format": "fmt",
    "limits.max_requests_per_job": "max_requests_per_job", "limits.max_attempts": "max_attempts",
    "limits.tier": "tier", "limits.token_cap": "token_cap", "limits.budget_usd": "budget_usd", "prices": "prices",
    "poll.interval_seconds": "poll_interval", "poll.timeout_seconds": "timeout",
    "window.deadline": "deadline", "window.policy": "deadline_policy",
    "collect.engine": "engine", "collect.ray_address": "ray_address",
    "retry.max_attempts": "max_attempts", "retry.retry_blocked": "retry_blocked", "retry.fallback_model": "fallback_model",
    "vertex.project": "project", "vertex.location": "location", "vertex.staging": "staging",
    "notify.webhook_uris": "webhook_uris", "dataset_format": "dataset_format", "shard_size": "shard_size",
}


@dataclass
class JobSpec:
    path: Path
    values: dict = field(default_factory=dict)  # flat: "manifest", "defaults.model", ...

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    @property
    def manifest(self) -> str | Path:
        return _path_or_uri(self.values["manifest"])

    def options(self) -> dict[str, Any]:
        """The spec's values as flat options (what the command line would give)."""
        out: dict[str, Any] = {}
        for key, option in SPEC_OPTIONS.items():
            if key in self.values:
                value = self.values[key]
                out[option] = _path_or_uri(value) if option in ("workdir", "out", "cache_dir") else value
        return out


def is_spec(path: str | Path) -> bool:
    """A job spec is a .toml file; anything else is a manifest."""
    return str(path).lower().endswith(".toml")


def _check(table: dict, schema: dict, where: str, path: Path, out: dict) -> None:
    for key, value in table.items():
        name = f"{where}{key}"
        if key not in schema:
            known = ", ".join(sorted(f"{where}{k}" for k in schema))
            raise UsageError(f"{path}: unknown key '{name}'; known keys here: {known}")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise UsageError(f"{path}: '{name}' must be a table ([{name}])")
            _check(value, expected, f"{name}.", path, out)
            continue
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise UsageError(f"{path}: '{name}' must be a {expected.__name__}, not {value!r}")
        if name in CHOICES and value not in CHOICES[name]:
            raise UsageError(f"{path}: '{name}' is {value!r}; use one of {', '.join(CHOICES[name])}")
        if name in MINIMUM and value < MINIMUM[name]:
            raise UsageError(f"{path}: '{name}' is {value!r}; it must be at least {MINIMUM[name]:g}")
        if name in MAXIMUM and value > MAXIMUM[name]:
            raise UsageError(f"{path}: '{name}' is {value!r}; it must be at most {MAXIMUM[name]:g}")
        out[name] = value


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such job spec") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a job spec") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    values: dict = {}
    prices = data.pop("prices", None)  # [prices."MODEL"]: model names are keys, checked by cost.pricing
    _check(data, SCHEMA, "", path, values)
    if prices is not None:
        from .cost.pricing import parse_overrides

        values["prices"] = parse_overrides(prices, path)
    uris = values.get("notify.webhook_uris", [])
    if not all(isinstance(u, str) for u in uris):
        raise UsageError(f"{path}: 'notify.webhook_uris' must be a list of URL strings")
    if "manifest" not in values:
        raise UsageError(f"{path}: 'manifest' is required (the manifest file, relative to the spec)")
    for key in PATH_KEYS:
        if key in values and not gcs.is_gcs(values[key]):
            p = Path(values[key]).expanduser()
            values[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    return JobSpec(path=path, values=values)
