"""What batcher knows about the image models: valid options, limits, token counts and prices.

One data table, so a price or limit change is a one-line edit (and users can override prices in a job spec).
Sources: ../shared/docs/pricing.md and gemini-batch-protocol.md §5, §7 (documentation snapshots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
EXTRA_ASPECT_RATIOS_31 = ("1:4", "1:8", "4:1", "8:1")

BATCH_DISCOUNT = 0.5  # batch mode bills 50% of the interactive price, input and output alike

# Tier -> enqueued tokens per model across active jobs (Gemini Developer API, batch).
TIERS = ("1", "2", "3")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    aspect_ratios: tuple[str, ...]
    image_sizes: tuple[str, ...]
    default_image_size: str
    max_reference_images: int
    tokens_per_image: dict[str, int]  # by image size
    input_usd_per_mtok: float  # interactive price
    output_usd_per_mtok: float  # interactive price, image output tokens
    enqueued_token_caps: dict[str, int] = field(default_factory=dict)  # by tier
    typical_png_bytes: dict[str, int] = field(default_factory=dict)  # by image size, for job sizing


MODELS: dict[str, ModelSpec] = {
    "gemini-2.5-flash-image": ModelSpec(
        name="gemini-2.5-flash-image",
        aspect_ratios=BASE_ASPECT_RATIOS,
        image_sizes=("1K",),
        default_image_size="1K",
        max_reference_images=3,
        tokens_per_image={"1K": 1290},
        input_usd_per_mtok=0.30,
        output_usd_per_mtok=30.0,
        enqueued_token_caps={"1": 3_000_000, "2": 400_000_000, "3": 1_000_000_000},
        typical_png_bytes={"1K": 1_600_000},
    ),
    "gemini-3-pro-image-preview": ModelSpec(
        name="gemini-3-pro-image-preview",
        aspect_ratios=BASE_ASPECT_RATIOS,
        image_sizes=("1K", "2K", "4K"),
        default_image_size="1K",
        max_reference_images=14,
        tokens_per_image={"1K": 1120, "2K": 1120, "4K": 2000},
        input_usd_per_mtok=2.00,
        output_usd_per_mtok=120.0,
        enqueued_token_caps={"1": 2_000_000, "2": 270_000_000, "3": 1_000_000_000},
        typical_png_bytes={"1K": 1_600_000, "2K": 6_000_000, "4K": 22_000_000},
    ),
    "gemini-3.1-flash-image-preview": ModelSpec(
        name="gemini-3.1-flash-image-preview",
        aspect_ratios=BASE_ASPECT_RATIOS + EXTRA_ASPECT_RATIOS_31,
        image_sizes=("512", "1K", "2K", "4K"),
        default_image_size="1K",
        max_reference_images=14,
        # Not published in our sources: assumed equal to 3 Pro Image (pricing.md says so).
        tokens_per_image={"512": 1120, "1K": 1120, "2K": 1120, "4K": 2000},
        input_usd_per_mtok=0.25,
        output_usd_per_mtok=60.0,
        enqueued_token_caps={"1": 1_000_000, "2": 250_000_000, "3": 750_000_000},
        typical_png_bytes={"512": 400_000, "1K": 1_600_000, "2K": 6_000_000, "4K": 22_000_000},
    ),
}

DEFAULT_MODEL = "gemini-2.5-flash-image"

# Limits of the Batch API (gemini-batch-protocol.md §7).
MAX_INPUT_FILE_BYTES = 2 * 1024**3
MAX_CONCURRENT_JOBS = 100
FILES_STORAGE_BYTES = 20 * 1024**3
FILE_RETENTION_HOURS = 48
JOB_TARGET_HOURS = 24
JOB_EXPIRY_HOURS = 48


def model_spec(name: str) -> ModelSpec | None:
    """The spec for a model name, accepting an optional `models/` prefix."""
    return MODELS.get(name.removeprefix("models/"))
