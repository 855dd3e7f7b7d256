"""The image models: which ones a run may send to (checked before anything is uploaded), and the list
`batcher models` shows.

The catalog knows when models were shut down (refused while reading the manifest, naming their successor) and when
they may go (a warning). A model the catalog does not know is the API's to judge: `models.get` must know it and
list `batchGenerateContent` among its methods, or the run stops here, with nothing uploaded. Offline (a dry run,
`estimate`) nothing can be asked: such a model gets a warning instead.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Iterable

from . import catalog
from .errors import ApiError, NotFoundError, UsageError
from .cost.pricing import PriceTable, current_table

log = logging.getLogger("batcher")


class ModelRefused(UsageError):
    """A model that cannot take batch jobs (shut down, unknown to the API, or without batchGenerateContent)."""

    def __init__(self, model: str, message: str):
        super().__init__(message)
        self.model = model


def check_models(models: Iterable[str], backend=None, *, today: dt.date | None = None) -> list[str]:
    """Raise UsageError for a model that cannot take batch jobs; return the warnings to show. `backend`: the API to
    ask about models batcher does not know (None: offline, they are only warned about)."""
    warnings: list[str] = []
    for name in sorted(set(models)):
        refused = catalog.refusal(name, today)
        if refused:
            raise ModelRefused(name, refused)
        note = catalog.warning(name, today)
        if note:
            warnings.append(note)
        if catalog.model_spec(name) is not None:
            continue
        if backend is None:
            warnings.append(f"{name} is not in batcher's catalog and was not checked against the API (offline); "
                            "submit and run ask models.get before they send")
            continue
        try:
            info = backend.get_model(name)
        except NotFoundError as exc:
            raise ModelRefused(name, f"model {name!r}: the API does not know it ({exc}); see `batcher models` for the "
                               "models it lists") from None
        if info is None:
            warnings.append(f"{name} is not in batcher's catalog and this backend cannot list models: not checked")
        elif not info.batch_capable:
            methods = ", ".join(info.methods) or "none"
            raise ModelRefused(name, f"model {name!r} does not take batch jobs: the API lists its methods as {methods}, "
                               "without batchGenerateContent")
    return warnings


def warn(warnings: Iterable[str]) -> None:
    for w in warnings:
        log.warning(w)


# ---- the list `batcher models` shows ----------------------------------------------------------------------

def describe(table: PriceTable | None = None, backend=None, *, include_shut_down: bool = False,
             today: dt.date | None = None) -> dict:
    """The models batcher knows (sizes, ratios, tokens, $ per image batch and interactive per size, thinking,
    lifecycle, sources), and, with `backend`, the image models the API lists for batch, each marked with whether
    batcher has a price for it. JSON-ready."""
    table = table or current_table()
    known = []
    for spec in catalog.MODELS.values():
        status = spec.status(today)
        if status == "shut_down" and not include_shut_down:
            continue
        price = table.get(spec.name)
        known.append({
            "name": spec.name, "display_name": spec.display_name, "default": spec.default, "status": status,
            "released": str(spec.released) if spec.released else None,
            "shutdown": str(spec.shutdown) if spec.shutdown else None, "shutdown_is_earliest": spec.shutdown_is_earliest,
            "replacement": spec.replacement, "image_sizes": list(spec.image_sizes), "default_image_size": spec.default_image_size,
            "aspect_ratios": list(spec.aspect_ratios), "max_reference_images": spec.max_reference_images,
            "thinking": spec.thinking, "expected_thoughts_tokens": price.expected_thoughts_tokens,
            "usd_per_mtok": {"input": price.input_usd_per_mtok, "image_output": price.output_usd_per_mtok,
                             "text_and_thinking_output": price.text_rate, "batch_discount": price.batch_discount},
            "per_image": {size: {"tokens": price.image_tokens(size), "batch_usd": round(price.image_usd(size, True), 6),
                                 "interactive_usd": round(price.image_usd(size, False), 6)} for size in spec.image_sizes},
            "sources": {group: {"url": src.url, "read": str(src.read)} for group, src in spec.sources.items()},
            "assumptions": list(spec.assumptions),
        })
    doc: dict = {"models": known, "api": None, "api_error": None}
    if backend is not None:
        try:
            listed = [m for m in backend.list_models() if m.batch_capable and _looks_like_image_model(m.name)]
        except ApiError as exc:
            doc["api_error"] = str(exc)
        else:
            doc["api"] = [{"name": m.name, "display_name": m.display_name, "thinking": m.thinking,
                           "in_catalog": catalog.model_spec(m.name) is not None, "priced": table.get(m.name) is not None}
                          for m in sorted(listed, key=lambda m: m.name)]
    return doc


def _looks_like_image_model(name: str) -> bool:
    """The API's model list does not say which models make images; their names do ("...-image", "nano-banana")."""
    return "image" in name or "nano-banana" in name


def describe_models(backend: str | None = "gemini", include_shut_down: bool = False) -> dict:
    """`describe`, with the API's own list from `backend` (a backends.factory name) when it can be reached: for
    the Gemini API only with a key. None: batcher's list only."""
    from .backends.factory import backend_factory

    if backend is None:
        return describe(include_shut_down=include_shut_down)
    with backend_factory(backend) as factory:
        try:
            api = factory()
        except UsageError:  # no API key: batcher's own list only
            api = None
        return describe(backend=api, include_shut_down=include_shut_down)
