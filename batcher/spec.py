"""Job specs: `jobs/*.toml`, everything a recurring run needs in one reviewed file.

    manifest = "../samples/prompts.csv"    # relative paths are relative to the spec file
    workdir = "/var/lib/batcher/products"
    out = "/data/datasets/products"
    [defaults]   model, aspect_ratio, image_size, temperature, top_p, seed, variants, system_instruction
    [manifest_columns]   prompt, id, format
    [limits]     max_requests_per_job, max_attempts, budget_usd
    [prices."MODEL"]   input_usd_per_mtok, output_usd_per_mtok, batch_discount, tokens_per_image, usd_per_image
    [poll]       interval_seconds, timeout_seconds
    [retry]      max_attempts, retry_blocked, fallback_model
    [window]     deadline ("06:00", "7h"), policy (wait | report | resubmit | interactive)
    [vertex]     project, location, staging ("gs://bucket/prefix"), with backend = "vertex"

Unknown keys are errors naming the key and the file: a typo must not silently change a nightly run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

SCHEMA: dict[str, Any] = {
    "manifest": str, "workdir": str, "out": str, "cache_dir": str, "backend": str, "refresh": bool, "skip_invalid": bool,
    "share": str,
    "defaults": {"model": str, "aspect_ratio": str, "image_size": str, "temperature": float, "top_p": float,
                 "seed": int, "variants": int, "system_instruction": str},
    "manifest_columns": {"prompt": str, "id": str, "format": str},
    "limits": {"max_requests_per_job": int, "max_attempts": int, "tier": str, "token_cap": int, "budget_usd": float},
    "poll": {"interval_seconds": float, "timeout_seconds": float},
    "window": {"deadline": str, "policy": str},
    "retry": {"max_attempts": int, "retry_blocked": bool, "fallback_model": str},
    "vertex": {"project": str, "location": str, "staging": str},  # backend = "vertex"
    "notify": {"webhook_uris": list},  # listeners the API POSTs each job's end to (batcher.webhooks)
}
PATH_KEYS = ("manifest", "workdir", "out", "cache_dir")
# Values the command line would refuse (click choices and ranges): a spec must not slip them past it.
CHOICES: dict[str, tuple] = {
    "backend": ("gemini", "emulator", "vertex"), "manifest_columns.format": ("parquet", "csv", "tsv"),
    "limits.tier": ("1", "2", "3"), "window.policy": ("wait", "report", "resubmit", "interactive"),
}
MINIMUM: dict[str, float] = {
    "defaults.variants": 1, "limits.max_requests_per_job": 1, "limits.max_attempts": 1, "limits.token_cap": 1,
    "limits.budget_usd": 0, "poll.interval_seconds": 0.05, "poll.timeout_seconds": 0, "retry.max_attempts": 1,
}
MAXIMUM: dict[str, float] = {"limits.max_attempts": 100, "retry.max_attempts": 100, "limits.max_requests_per_job": 1_000_000}


@dataclass
class JobSpec:
    path: Path
    values: dict = field(default_factory=dict)  # flat: "manifest", "defaults.model", ...

    def get(self, key: str, default=None):
        return self.values.get(key, default)


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
    prices = data.pop("prices", None)  # [prices."MODEL"]: model names are keys, checked by batcher.pricing
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
        if key in values and not str(values[key]).startswith("gs://"):
            p = Path(values[key]).expanduser()
            values[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    return JobSpec(path=path, values=values)
