"""What batcher knows of the image models and of the Batch API: the data table `catalog.toml`, as objects.

Every number comes from `catalog.toml`, which names its source and the date it was read; this module only reads
it and answers questions about it: which models exist, their sizes and prices, and where a model is in its life
(current, past an announced shutdown, shut down) on a given day.

A model the catalog does not know is not refused here: the API is asked about it before anything is sent
(batcher.models), and its price must come from a job spec's [prices] table.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).with_name("catalog.toml")
# A model name as the API writes it (after an optional "models/" prefix): letters, digits, '.', '-', '_'.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Source:
    key: str
    title: str
    url: str
    read: dt.date


@dataclass(frozen=True)
class ModelSpec:
    name: str
    display_name: str
    released: dt.date | None
    shutdown: dt.date | None  # the day it stops (or, with shutdown_is_earliest, may stop) answering
    shutdown_is_earliest: bool
    replacement: str | None
    replacement_is_ours: bool  # Google names none; batcher suggests it
    image_sizes: tuple[str, ...]
    default_image_size: str
    aspect_ratios: tuple[str, ...]
    pixels: dict[str, dict[str, tuple[int, int]]]  # image size -> aspect ratio -> (width, height)
    tokens_per_image: dict[str, int]  # by image size
    max_reference_images: int
    input_image_tokens: int  # prompt tokens of one input (reference) image
    input_usd_per_mtok: float  # interactive
    output_usd_per_mtok: float  # interactive, image output tokens
    text_output_usd_per_mtok: float  # interactive, text and thinking output tokens
    published_usd_per_image: dict[str, float]  # Google's rounded "equivalent to $X per image", for reference
    thinking: bool
    expected_thoughts_tokens: int  # per image, for estimates (an assumption: see catalog.toml)
    enqueued_token_caps: dict[str, int]  # by tier
    typical_png_bytes: dict[str, int]  # by image size, for job sizing
    api: dict[str, Any]  # the models.get fields the emulator serves
    sources: dict[str, Source]  # field group -> source
    assumptions: tuple[str, ...]
    default: bool = False

    def status(self, today: dt.date | None = None) -> str:
        """"current", "retiring" (a shutdown is announced), "past_earliest_shutdown" (it may be gone) or "shut_down"."""
        today = today or dt.date.today()
        if self.shutdown is None:
            return "current"
        if today < self.shutdown:
            return "retiring"
        return "past_earliest_shutdown" if self.shutdown_is_earliest else "shut_down"

    def use_instead(self) -> str:
        if not self.replacement:
            return "see `batcher models` for the current models"
        return f"use {self.replacement}" + (" (Google names no replacement; this is the current model of its kind)"
                                            if self.replacement_is_ours else "")

    def dimensions(self, image_size: str, aspect_ratio: str) -> tuple[int, int] | None:
        return self.pixels.get(image_size, {}).get(aspect_ratio)


@dataclass(frozen=True)
class Tier:
    name: str
    monthly_spend_cap_usd: float
    spend_rate_usd_per_10min: float
    source: Source


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelSpec]
    tiers: dict[str, Tier]
    batch: dict[str, Any]
    sources: dict[str, Source] = field(default_factory=dict)


def _date(value: Any) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value))


def load(path: Path = DATA_FILE) -> Catalog:
    """Read and check the data table (a wrong reference in it is a bug: it raises at import)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    sources = {k: Source(k, v["title"], v["url"], _date(v["read"])) for k, v in data["sources"].items()}

    def src(key: str) -> Source:
        if key not in sources:
            raise ValueError(f"{path}: unknown source {key!r}")
        return sources[key]

    pixel_tables = {name: {size: {ratio: (int(w), int(h)) for ratio, (w, h) in table.items()} for size, table in sizes.items()}
                    for name, sizes in data["pixels"].items()}
    models: dict[str, ModelSpec] = {}
    for name, m in data["models"].items():
        pixels = {size: table for size, table in pixel_tables[m["pixels"]].items() if size in m["image_sizes"]}
        ratios = tuple(dict.fromkeys(r for size in m["image_sizes"] for r in pixels[size]))
        models[name] = ModelSpec(
            name=name, display_name=m["display_name"], released=_date(m.get("released")), shutdown=_date(m.get("shutdown")),
            shutdown_is_earliest=bool(m.get("shutdown_is_earliest", False)), replacement=m.get("replacement"),
            replacement_is_ours=bool(m.get("replacement_is_ours", False)), image_sizes=tuple(m["image_sizes"]),
            default_image_size=m["default_image_size"], aspect_ratios=ratios, pixels=pixels,
            tokens_per_image=dict(m["tokens_per_image"]), max_reference_images=int(m["max_reference_images"]),
            input_image_tokens=int(m["input_image_tokens"]),
            input_usd_per_mtok=float(m["input_usd_per_mtok"]), output_usd_per_mtok=float(m["output_usd_per_mtok"]),
            text_output_usd_per_mtok=float(m["text_output_usd_per_mtok"]),
            published_usd_per_image={k: float(v) for k, v in m.get("published_usd_per_image", {}).items()},
            thinking=bool(m.get("thinking", False)), expected_thoughts_tokens=int(m.get("expected_thoughts_tokens", 0)),
            enqueued_token_caps={str(k): int(v) for k, v in m.get("enqueued_token_caps", {}).items()},
            typical_png_bytes=dict(m.get("typical_png_bytes", {})), api=dict(m.get("api", {})),
            sources={group: src(key) for group, key in m["source"].items()}, assumptions=tuple(m.get("assumptions", ())),
            default=bool(m.get("default", False)),
        )
    for spec in models.values():
        if spec.replacement and spec.replacement not in models:
            raise ValueError(f"{path}: {spec.name} names an unknown replacement {spec.replacement!r}")
    tiers = {str(k): Tier(str(k), float(t["monthly_spend_cap_usd"]), float(t["spend_rate_usd_per_10min"]), src(t["source"]))
             for k, t in data["tiers"].items()}
    batch = dict(data["batch"])
    batch["source"] = {k: src(v) for k, v in batch["source"].items()}
    return Catalog(models=models, tiers=tiers, batch=batch, sources=sources)


@cache
def catalog() -> Catalog:
    return load()


_CATALOG = catalog()
MODELS: dict[str, ModelSpec] = _CATALOG.models
TIERS: dict[str, Tier] = _CATALOG.tiers
DEFAULT_MODEL = next(name for name, spec in MODELS.items() if spec.default)

BATCH_DISCOUNT = float(_CATALOG.batch["discount"])
MAX_INPUT_FILE_BYTES = int(_CATALOG.batch["max_input_file_bytes"])
MAX_CONCURRENT_JOBS = int(_CATALOG.batch["max_concurrent_jobs"])
FILES_STORAGE_BYTES = int(_CATALOG.batch["files_storage_bytes"])
FILE_RETENTION_HOURS = int(_CATALOG.batch["file_retention_hours"])
JOB_TARGET_HOURS = int(_CATALOG.batch["job_target_hours"])
JOB_EXPIRY_HOURS = int(_CATALOG.batch["job_expiry_hours"])


def model_spec(name: str) -> ModelSpec | None:
    """The spec for a model name, accepting an optional `models/` prefix (None: batcher does not know it)."""
    return MODELS.get(name.removeprefix("models/"))


def current_models(today: dt.date | None = None) -> list[ModelSpec]:
    """The models one can send to today (not shut down), current ones first."""
    order = {"current": 0, "retiring": 1, "past_earliest_shutdown": 2}
    live = [m for m in MODELS.values() if m.status(today) != "shut_down"]
    return sorted(live, key=lambda m: (order[m.status(today)], not m.default, m.name))


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a model name (None: it can)."""
    if not MODEL_NAME_RE.match(name.removeprefix("models/")):
        return "not a model name (letters, digits, '.', '-' and '_', as `batcher models` lists them)"
    return None


def refusal(name: str, today: dt.date | None = None) -> str | None:
    """Why a model must be refused before anything is sent (it is shut down), naming what to use instead."""
    spec = model_spec(name)
    if spec is None or spec.status(today) != "shut_down":
        return None
    return f"{spec.name} was shut down on {spec.shutdown:%Y-%m-%d}; {spec.use_instead()}"


def warning(name: str, today: dt.date | None = None) -> str | None:
    """What to warn of before sending to a model that may be gone or soon will be (None: nothing)."""
    spec = model_spec(name)
    if spec is None:
        return None
    status = spec.status(today)
    if status == "past_earliest_shutdown":
        return (f"{spec.name} may have been shut down: Google listed {spec.shutdown:%Y-%m-%d} as its earliest shutdown "
                f"date; {spec.use_instead()}")
    if status == "retiring":
        when = "may shut down from" if spec.shutdown_is_earliest else "shuts down on"
        return f"{spec.name} {when} {spec.shutdown:%Y-%m-%d}; {spec.use_instead()}"
    return None


def gone_hint(name: str) -> str:
    """For a 404 from the API about `name`: what to do instead."""
    spec = model_spec(name)
    if spec is not None and spec.replacement:
        return f"{spec.name} is no longer served; {spec.use_instead()}"
    return "see `batcher models` for the models the API lists"
