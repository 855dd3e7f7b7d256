"""How many tokens a request counts: the one estimator behind estimates, the budget, the interactive fallback,
quota waves and job packing.

- A prompt: about 4 characters a token, plus the model's `input_image_tokens` for each reference image (the price
  table's, from batcher/catalog.toml; a model batcher does not know counts the largest of the catalog's, so a wave
  of it is never too large).
- An image: the price table's tokens for its size, plus the model's expected thinking allowance (thoughts count
  against enqueued-token caps too).
- Enqueued tokens (quota waves, packing) are counted on the whole stored body, JSON included, not just its text:
  shard measures bodies in SQLite by their length, and over-counting a little keeps a wave under the API's cap.
"""

from __future__ import annotations

import json
import math

from ..catalog import MODELS
from .pricing import PriceTable, current_table

CHARS_PER_TOKEN = 4
# For a model with no price table: the largest of the catalog (quota waves and job sizing only; costs refuse it).
UNKNOWN_MODEL_IMAGE_TOKENS = max(spec.tokens_per_image.get("1K", 0) for spec in MODELS.values())
UNKNOWN_MODEL_INPUT_IMAGE_TOKENS = max(spec.input_image_tokens for spec in MODELS.values())


def prompt_tokens(text_chars: int, references: int, per_image: int) -> int:
    """A prompt of `text_chars` characters with `references` reference images of `per_image` tokens each."""
    return math.ceil(text_chars / CHARS_PER_TOKEN) + per_image * references


def input_image_tokens(model: str, table: PriceTable | None = None) -> int:
    price = (table or current_table()).get(model)
    return price.input_image_tokens if price else UNKNOWN_MODEL_INPUT_IMAGE_TOKENS


def expected_output_tokens(model: str, image_size: str | None, table: PriceTable | None = None) -> int:
    """The output tokens of one image of `image_size` (None: the model's default), its thinking allowance included."""
    price = (table or current_table()).get(model)
    if price is None:
        return UNKNOWN_MODEL_IMAGE_TOKENS
    return price.image_tokens(image_size) + price.expected_thoughts_tokens


def enqueued_tokens(model: str, body_chars: int, references: int, image_size: str | None,
                    table: PriceTable | None = None) -> int:
    """What one request counts against its model's enqueued-token cap, from its stored body's length in
    characters, its reference images and its image size."""
    table = table or current_table()
    # Planning measures every request of a million-row manifest: what a table says per model and size is kept.
    known = table.memo.get((model, image_size))
    if known is None:
        known = table.memo[(model, image_size)] = (input_image_tokens(model, table),
                                                   expected_output_tokens(model, image_size, table))
    per_image, output = known
    return prompt_tokens(body_chars, references, per_image) + output


def request_tokens(model: str, body_json: str, image_size: str | None) -> int:
    """`enqueued_tokens` of a stored GenerateContentRequest body."""
    return enqueued_tokens(model, len(body_json), body_json.count('"fileData"'), image_size)


def body_prompt(body_json: str) -> tuple[int, int, str | None]:
    """(text characters, reference images, image size) of a GenerateContentRequest body: what its price depends on."""
    body = json.loads(body_json)
    chars = refs = 0
    for content in body.get("contents", []) + [body.get("systemInstruction") or {}]:
        for part in content.get("parts", []):
            if "text" in part:
                chars += len(part["text"])
            elif "fileData" in part or "inlineData" in part:
                refs += 1
    return chars, refs, body.get("generationConfig", {}).get("imageConfig", {}).get("imageSize")
