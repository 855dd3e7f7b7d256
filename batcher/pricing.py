"""Cost of requests, from the price table in batcher.catalog (batch mode bills 50% of interactive)."""

from __future__ import annotations

from .catalog import BATCH_DISCOUNT, model_spec


def cost_usd(model: str, prompt_tokens: int, output_tokens: int, batch: bool = True) -> float | None:
    spec = model_spec(model)
    if spec is None:
        return None
    usd = prompt_tokens * spec.input_usd_per_mtok / 1e6 + output_tokens * spec.output_usd_per_mtok / 1e6
    return usd * (BATCH_DISCOUNT if batch else 1.0)


def expected_output_tokens(model: str, image_size: str | None) -> int:
    spec = model_spec(model)
    if spec is None:
        return 1290
    return spec.tokens_per_image.get(image_size or spec.default_image_size, max(spec.tokens_per_image.values()))
