"""The models the emulated service serves.

The emulator plays Google, so its facts are Google's: it reads the one data table of them, `batcher/catalog.toml`
(through batcher.catalog, a data module that imports nothing else of batcher), never batcher's logic. What the real
service does differently from that table is configuration: `shutdown_models` (which models answer 404; by default
those the table says were shut down by the emulated date) and `extra_models` (models the table does not know, made
like one it does: `{"gemini-nano-banana-2.1": {"like": "gemini-3.1-flash-image"}}`, optionally with `methods`,
`image_sizes`, `thinking`, `display_name`).

Both services serve these models (the project's `models()`), so the table lives beside them (batcher/emulator/), not
in either, nor in the service-agnostic core.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

from batcher import catalog as facts

BATCH_METHODS = ("generateContent", "countTokens", "batchGenerateContent")


@dataclass(frozen=True)
class ImageModel:
    name: str
    display_name: str
    image_sizes: tuple[str, ...]
    default_image_size: str
    pixels: dict[str, dict[str, tuple[int, int]]]  # image size -> aspect ratio -> (width, height)
    tokens_per_image: dict[str, int]
    input_image_tokens: int
    enqueued_token_caps: dict[str, int]  # by tier "1"/"2"/"3"
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    text_output_usd_per_mtok: float
    thinking: bool
    methods: tuple[str, ...] = BATCH_METHODS
    api: Any = None  # the models.get fields: version, description, token limits, ...

    @property
    def aspect_ratios(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for size in self.image_sizes for r in self.pixels.get(size, {})))

    def dimensions(self, aspect_ratio: str, image_size: str) -> tuple[int, int]:
        return self.pixels[image_size][aspect_ratio]

    def usd(self, prompt: int, image: int, text: int, batch: bool) -> float:
        """What one response bills (the service's own accounting for spend caps)."""
        usd = (prompt * self.input_usd_per_mtok + image * self.output_usd_per_mtok + text * self.text_output_usd_per_mtok) / 1e6
        return usd * (facts.BATCH_DISCOUNT if batch else 1.0)

    def resource(self) -> dict[str, Any]:
        """The Model resource of models.get / models.list, camelCase as the API writes it."""
        api = self.api or {}
        out: dict[str, Any] = {"name": f"models/{self.name}", "version": api.get("version", "1.0"),
                               "displayName": self.display_name}
        if api.get("description"):
            out["description"] = api["description"]
        out.update({"inputTokenLimit": api.get("input_token_limit", 32768), "outputTokenLimit": api.get("output_token_limit", 32768),
                    "supportedGenerationMethods": list(self.methods), "temperature": 1, "topP": 0.95,
                    "topK": api.get("top_k", 64), "maxTemperature": api.get("max_temperature", 1)})
        if self.thinking:
            out["thinking"] = True
        return out


def from_spec(spec: facts.ModelSpec) -> ImageModel:
    return ImageModel(
        name=spec.name, display_name=spec.display_name, image_sizes=spec.image_sizes, default_image_size=spec.default_image_size,
        pixels=spec.pixels, tokens_per_image=dict(spec.tokens_per_image), input_image_tokens=spec.input_image_tokens,
        enqueued_token_caps=dict(spec.enqueued_token_caps), input_usd_per_mtok=spec.input_usd_per_mtok,
        output_usd_per_mtok=spec.output_usd_per_mtok, text_output_usd_per_mtok=spec.text_output_usd_per_mtok,
        thinking=spec.thinking, api=dict(spec.api))


KNOWN: dict[str, ImageModel] = {name: from_spec(spec) for name, spec in facts.MODELS.items()}
# Enqueued-token caps of a model the table gives none for (a shut-down preview, an extra model): the largest.
DEFAULT_CAPS = {tier: max(m.enqueued_token_caps.get(tier, 0) for m in KNOWN.values()) for tier in ("1", "2", "3")}


def extra_model(name: str, fields: dict[str, Any]) -> ImageModel:
    """A model made like one of the table (`like`), with fields changed."""
    like = fields.get("like", facts.DEFAULT_MODEL)
    if like not in KNOWN:
        raise ValueError(f"extra_models[{name!r}].like: {like!r} is not a model of batcher/catalog.toml")
    unknown = set(fields) - {"like", "methods", "image_sizes", "thinking", "display_name"}
    if unknown:
        raise ValueError(f"extra_models[{name!r}]: unknown fields {sorted(unknown)}")
    base = KNOWN[like]
    changes: dict[str, Any] = {"name": name, "display_name": fields.get("display_name", name)}
    if "methods" in fields:
        changes["methods"] = tuple(fields["methods"])
    if "image_sizes" in fields:
        sizes = tuple(fields["image_sizes"])
        if not set(sizes) <= set(base.pixels):
            raise ValueError(f"extra_models[{name!r}].image_sizes: {like} has pixel sizes for {sorted(base.pixels)} only")
        changes["image_sizes"] = sizes
    if "thinking" in fields:
        changes["thinking"] = bool(fields["thinking"])
    return replace(base, **changes)


def served(shutdown_models: list[str] | None, extra_models: dict[str, dict[str, Any]], today: dt.date) -> dict[str, ImageModel]:
    """The models the service answers for on `today`. `shutdown_models` None: the table's shut-down dates decide
    (a date marked as only the earliest possible one does not shut a model down)."""
    if shutdown_models is None:
        gone = {name for name, spec in facts.MODELS.items() if spec.status(today) == "shut_down"}
    else:
        gone = {m.removeprefix("models/") for m in shutdown_models}
    models = {name: m for name, m in KNOWN.items() if name not in gone}
    for name, fields in (extra_models or {}).items():
        if name not in gone:
            models[name] = extra_model(name, fields)
    return models


def not_found(model: str, method: str) -> tuple[int, str, str]:
    """The API's 404 for a model it does not serve (for `method`)."""
    return (404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not supported for {method}. "
            "Call ListModels to see the list of available models and their supported methods.")
