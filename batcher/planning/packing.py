"""Packing requests into jobs: the limits a job must stay under, and what each request counts against them.

Used by `planner.shard` (requests already in the ledger) and by a plan that shards as it loads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import catalog
from ..cost.tokens import enqueued_tokens

LINE_OVERHEAD = 120  # a JSONL line's key and wrapper around the body; references grow by their URIs


@dataclass(frozen=True)
class ShardLimits:
    """How big one batch job may be: requests, input bytes (the API's 2 GB per file) and expected output bytes."""

    max_requests: int = 1000
    max_input_bytes: int = 1_900_000_000  # under the API's 2 GB per input file
    max_output_bytes: int = 2_000_000_000  # expected base64 results, so a job's results stay retrievable


# PNG bytes assumed for an image of a size no catalog model gives (or of a model batcher does not know): the
# largest any model of the catalog gives for that size, else 2 MB.
_LARGEST_PNG = {size: max(spec.typical_png_bytes.get(size, 0) for spec in catalog.MODELS.values())
                for size in {s for spec in catalog.MODELS.values() for s in spec.typical_png_bytes}}


@functools.lru_cache(maxsize=256)
def expected_output_bytes(model: str, size: str | None) -> int:
    spec = catalog.model_spec(model)
    size = size or (spec.default_image_size if spec else "1K")
    png = (spec.typical_png_bytes.get(size) if spec else None) or _LARGEST_PNG.get(size) or 2_000_000
    return png * 4 // 3 + 2_000  # base64 plus the JSON around it


def measure(model: str, body_bytes: int, body_chars: int, size: str | None, refs: int) -> tuple[int, int, int]:
    """(JSONL line bytes, expected output bytes, enqueued tokens) of one request, from its stored body's UTF-8 bytes
    and characters, its image size and its number of reference images."""
    return body_bytes + LINE_OVERHEAD, expected_output_bytes(model, size), enqueued_tokens(model, body_chars, refs, size)


def measure_body(model: str, body: str, size: str | None) -> tuple[int, int, int]:
    """`measure` of a body JSON as the planner makes it (what `shard` measures of a stored one, in SQLite)."""
    return measure(model, len(body.encode("utf-8")), len(body), size, body.count('"fileData"'))


class JobFiller:
    """The greedy packing of one model's requests into jobs, in order: a request that would take the open job
    past any limit (requests, input bytes, expected output bytes, the model's enqueued-token cap) closes it
    and starts the next."""

    def __init__(self, model: str, limits: ShardLimits, token_cap: int | None):
        self.model, self.limits, self.token_cap = model, limits, token_cap
        self.count = self.in_bytes = self.out_bytes = self.tokens = 0

    def full_for(self, m: tuple[int, int, int]) -> bool:
        """Whether the open job must close before this request (its `measure`) joins it."""
        limits = self.limits
        return bool(self.count) and (self.count >= limits.max_requests or self.in_bytes + m[0] > limits.max_input_bytes
                                     or self.out_bytes + m[1] > limits.max_output_bytes
                                     or (self.token_cap is not None and self.tokens + m[2] > self.token_cap))

    def add(self, m: tuple[int, int, int]) -> None:
        self.count += 1
        self.in_bytes += m[0]
        self.out_bytes += m[1]
        self.tokens += m[2]

    def reset(self) -> None:
        self.count = self.in_bytes = self.out_bytes = self.tokens = 0
