"""Prices as data: one table per model (token prices, tokens per image, thinking allowance, batch discount),
built from the catalog (batcher/catalog.toml, where each rate names its source) and overridable from a job spec:

    [prices."gemini-3.1-flash-image"]
    input_usd_per_mtok = 0.50         # interactive $ per 1M input tokens
    output_usd_per_mtok = 60.0        # interactive $ per 1M image output tokens
    text_output_usd_per_mtok = 3.0    # interactive $ per 1M text and thinking output tokens (default: the image rate)
    batch_discount = 0.5              # batch bills this fraction of interactive
    tokens_per_image = { "1K" = 1120 }
    expected_thoughts_tokens = 250    # thinking tokens per image, for estimates (default 0)
    usd_per_image = { "1K" = 0.067 }  # optional: a price per image that estimates use instead of tokens x rate

Realized cost (collect) is the response's usageMetadata: prompt tokens at the input rate, image tokens at the image
rate, text and thinking tokens (thoughtsTokenCount; text by candidatesTokensDetails) at the text rate. Estimates
price an image as its tokens x the image rate (Google's "equivalent to $0.067 per image" figures are those, rounded)
and, on their own lines, the prompt and an expected thinking allowance.

The table in force is a context variable (`use_prices`), so the collector and the status total use the
overrides of the run; a workdir remembers the overrides of its last submit/run in WORKDIR/prices.json.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from ..catalog import BATCH_DISCOUNT, MODELS
from ..errors import UsageError
from ..storage import atomic

PRICES_FILE = "prices.json"
REQUIRED_KEYS = ("input_usd_per_mtok", "output_usd_per_mtok", "batch_discount", "tokens_per_image")
OVERRIDE_KEYS = REQUIRED_KEYS + ("text_output_usd_per_mtok", "expected_thoughts_tokens", "usd_per_image")
RATE_KEYS = ("input_usd_per_mtok", "output_usd_per_mtok", "text_output_usd_per_mtok")


@dataclass(frozen=True)
class ModelPrice:
    model: str
    input_usd_per_mtok: float  # interactive
    output_usd_per_mtok: float  # interactive, image output tokens
    tokens_per_image: dict[str, int]  # by image size
    batch_discount: float = BATCH_DISCOUNT
    text_output_usd_per_mtok: float | None = None  # interactive, text and thinking tokens; None: the image rate
    expected_thoughts_tokens: int = 0  # per image, for estimates
    input_image_tokens: int = 258  # prompt tokens of one reference image, for estimates
    usd_per_image: dict[str, float] = field(default_factory=dict)  # an interactive price per image that overrides tokens x rate
    default_image_size: str = "1K"

    @property
    def text_rate(self) -> float:
        return self.output_usd_per_mtok if self.text_output_usd_per_mtok is None else self.text_output_usd_per_mtok

    def size(self, image_size: str | None) -> str:
        return image_size or self.default_image_size

    def image_tokens(self, image_size: str | None) -> int:
        size = self.size(image_size)
        return self.tokens_per_image.get(size, max(self.tokens_per_image.values()))

    def factor(self, batch: bool) -> float:
        return self.batch_discount if batch else 1.0

    def image_usd(self, image_size: str | None, batch: bool = True) -> float:
        """The estimated price of one image's output: its tokens x the image rate (or a given price per image)."""
        size = self.size(image_size)
        interactive = self.usd_per_image.get(size)
        if interactive is None:
            interactive = self.image_tokens(size) * self.output_usd_per_mtok / 1e6
        return interactive * self.factor(batch)

    def input_usd(self, prompt_tokens: float, batch: bool = True) -> float:
        return prompt_tokens * self.input_usd_per_mtok / 1e6 * self.factor(batch)

    def thinking_usd(self, batch: bool = True) -> float:
        """The expected thinking allowance of one image (an estimate: see catalog.toml, expected_thoughts_tokens)."""
        return self.expected_thoughts_tokens * self.text_rate / 1e6 * self.factor(batch)

    def request_usd(self, image_size: str | None, prompt_tokens: float, batch: bool = True) -> float:
        """The estimated price of one request: its image, its prompt and the thinking allowance."""
        return self.image_usd(image_size, batch) + self.input_usd(prompt_tokens, batch) + self.thinking_usd(batch)

    def tokens_usd(self, prompt_tokens: int, output_tokens: int, thoughts_tokens: int = 0, text_tokens: int = 0,
                   batch: bool = True) -> float:
        """Realized cost from a response's token counts (results.Outcome.usage): `text_tokens` of the output and
        the thoughts at the text rate, the rest of the output at the image rate."""
        text_tokens = min(text_tokens, output_tokens)
        usd = (prompt_tokens * self.input_usd_per_mtok + (output_tokens - text_tokens) * self.output_usd_per_mtok
               + (text_tokens + thoughts_tokens) * self.text_rate)
        return usd / 1e6 * self.factor(batch)


class PriceTable:
    def __init__(self, models: dict[str, ModelPrice], overrides: dict | None = None):
        self.models = dict(models)
        self.overrides = dict(overrides or {})  # as given (validated), for WORKDIR/prices.json
        self.memo: dict = {}  # answers derived from this table (it is never changed), e.g. cost.tokens per model and size

    def get(self, model: str) -> ModelPrice | None:
        return self.models.get(model.removeprefix("models/"))

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> "PriceTable":
        models = dict(self.models)
        for name, o in overrides.items():
            base = models.get(name)
            if base is None:
                models[name] = ModelPrice(
                    model=name, input_usd_per_mtok=o["input_usd_per_mtok"], output_usd_per_mtok=o["output_usd_per_mtok"],
                    tokens_per_image=dict(o["tokens_per_image"]), batch_discount=o["batch_discount"],
                    text_output_usd_per_mtok=o.get("text_output_usd_per_mtok"),
                    expected_thoughts_tokens=int(o.get("expected_thoughts_tokens", 0)),
                    usd_per_image=dict(o.get("usd_per_image", {})),
                    default_image_size="1K" if "1K" in o["tokens_per_image"] else next(iter(o["tokens_per_image"])),
                )
                continue
            models[name] = replace(
                base, input_usd_per_mtok=o.get("input_usd_per_mtok", base.input_usd_per_mtok),
                output_usd_per_mtok=o.get("output_usd_per_mtok", base.output_usd_per_mtok),
                text_output_usd_per_mtok=o.get("text_output_usd_per_mtok", base.text_output_usd_per_mtok),
                tokens_per_image={**base.tokens_per_image, **o.get("tokens_per_image", {})},
                expected_thoughts_tokens=int(o.get("expected_thoughts_tokens", base.expected_thoughts_tokens)),
                batch_discount=o.get("batch_discount", base.batch_discount),
                usd_per_image={**base.usd_per_image, **o.get("usd_per_image", {})})
        return PriceTable(models, {**self.overrides, **overrides})


@functools.cache
def default_table() -> PriceTable:
    """The catalog's prices (one table, shared: tables are not changed, only derived with `with_overrides`)."""
    return PriceTable({
        name: ModelPrice(model=name, input_usd_per_mtok=spec.input_usd_per_mtok, output_usd_per_mtok=spec.output_usd_per_mtok,
                         tokens_per_image=dict(spec.tokens_per_image), batch_discount=BATCH_DISCOUNT,
                         text_output_usd_per_mtok=spec.text_output_usd_per_mtok,
                         expected_thoughts_tokens=spec.expected_thoughts_tokens, input_image_tokens=spec.input_image_tokens,
                         default_image_size=spec.default_image_size)
        for name, spec in MODELS.items()
    })


def parse_overrides(data: Any, path: str | Path) -> dict[str, dict[str, Any]]:
    """Validate a job spec's [prices] table. Errors name the key and the file, as the rest of the spec does."""
    if not isinstance(data, dict):
        raise UsageError(f"{path}: 'prices' must be a table ([prices.\"MODEL\"])")
    out: dict[str, dict[str, Any]] = {}
    for model, table in data.items():
        name = str(model).removeprefix("models/")
        where = f'prices."{model}"'
        if not isinstance(table, dict):
            raise UsageError(f"{path}: '{where}' must be a table ([{where}])")
        o: dict[str, Any] = {}
        for key, value in table.items():
            if key not in OVERRIDE_KEYS:
                known = ", ".join(f"{where}.{k}" for k in OVERRIDE_KEYS)
                raise UsageError(f"{path}: unknown key '{where}.{key}'; known keys here: {known}")
            if key in ("tokens_per_image", "usd_per_image"):
                if not isinstance(value, dict) or not value:
                    raise UsageError(f"{path}: '{where}.{key}' must be a table of image size to value, e.g. {{ \"1K\" = 1290 }}")
                sizes = {}
                for size, v in value.items():
                    integral = key == "tokens_per_image"
                    ok = isinstance(v, int) if integral else isinstance(v, (int, float))
                    if isinstance(v, bool) or not ok or v < 0 or (integral and v == 0):
                        kind = "a positive integer" if integral else "a number >= 0"
                        raise UsageError(f"{path}: '{where}.{key}.{size}' must be {kind}, not {v!r}")
                    sizes[str(size)] = int(v) if integral else float(v)
                o[key] = sizes
                continue
            if key == "expected_thoughts_tokens":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise UsageError(f"{path}: '{where}.{key}' must be a whole number >= 0, not {value!r}")
                o[key] = value
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UsageError(f"{path}: '{where}.{key}' must be a number >= 0, not {value!r}")
            if key == "batch_discount" and not 0 < value <= 1:
                raise UsageError(f"{path}: '{where}.batch_discount' must be in (0, 1] (0.5: batch bills half), not {value!r}")
            o[key] = float(value)
        if name not in MODELS:
            missing = [k for k in REQUIRED_KEYS if k not in o]
            if missing:
                raise UsageError(f"{path}: '{where}' is not a model batcher knows (see `batcher models`); "
                                 f"a new model needs every price key: missing {', '.join(f'{where}.{k}' for k in missing)}")
        out[name] = o
    return out


# ---- the table in force ---------------------------------------------------------------------------

_active: contextvars.ContextVar[PriceTable | None] = contextvars.ContextVar("batcher_prices", default=None)


def current_table() -> PriceTable:
    table = _active.get()
    return table if table is not None else default_table()


@contextlib.contextmanager
def use_prices(table: PriceTable) -> Iterator[PriceTable]:
    token = _active.set(table)
    try:
        yield table
    finally:
        _active.reset(token)


def workdir_table(workdir: str | Path, overrides: dict | None = None) -> PriceTable:
    """The table for a workdir: given overrides are recorded in WORKDIR/prices.json (for later collect and
    status); without them, the recorded ones apply."""
    path = Path(workdir) / PRICES_FILE
    if overrides is None:
        try:
            overrides = parse_overrides(json.loads(path.read_text()), path)
        except FileNotFoundError:
            overrides = {}
        except ValueError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc}); delete it to use the default prices") from None
    else:
        atomic.write_text(path, json.dumps(overrides, indent=2, sort_keys=True))
    return default_table().with_overrides(overrides)


@contextlib.contextmanager
def use_workdir_prices(workdir: str | Path, overrides: dict | None = None) -> Iterator[PriceTable]:
    with use_prices(workdir_table(workdir, overrides)) as table:
        yield table


# ---- the functions the rest of batcher calls ----------------------------------------------------------

def cost_usd(model: str, prompt_tokens: int, output_tokens: int, thoughts_tokens: int = 0, text_tokens: int = 0, *,
             batch: bool = True, table: PriceTable | None = None) -> float | None:
    """Realized cost of one response (None: no price is known for the model)."""
    price = (table or current_table()).get(model)
    if price is None:
        return None
    return price.tokens_usd(prompt_tokens or 0, output_tokens or 0, thoughts_tokens or 0, text_tokens or 0, batch)

