"""The emulator's own table of image models (it plays Google, so it does not import batcher.catalog)."""

from __future__ import annotations

from dataclasses import dataclass

# Pixel dimensions at "1K" (gemini-batch-protocol.md §5; image-generation docs).
BASE_DIMENSIONS_1K: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
    "4:3": (1184, 864),
    "3:4": (864, 1184),
    "5:4": (1152, 896),
    "4:5": (896, 1152),
    "21:9": (1536, 672),
}
# Gemini 3.1 Flash Image extras. Real pixel sizes are not published in our sources: these keep ~1 MP.
EXTRA_DIMENSIONS_1K_31: dict[str, tuple[int, int]] = {
    "1:4": (512, 2048),
    "4:1": (2048, 512),
    "1:8": (384, 3072),
    "8:1": (3072, 384),
}
SIZE_SCALE = {"512": 0.5, "1K": 1.0, "2K": 2.0, "4K": 4.0}

# Tokens per input image in the prompt (documented 258 per image up to 384 px tiles; a fixed count here).
INPUT_IMAGE_TOKENS = 258


@dataclass(frozen=True)
class ImageModel:
    name: str
    aspect_ratios: dict[str, tuple[int, int]]
    image_sizes: tuple[str, ...]
    tokens_per_image: dict[str, int]
    enqueued_token_caps: dict[str, int]  # by tier "1"/"2"/"3"

    def dimensions(self, aspect_ratio: str, image_size: str) -> tuple[int, int]:
        w, h = self.aspect_ratios[aspect_ratio]
        s = SIZE_SCALE[image_size]
        return int(w * s), int(h * s)


MODELS: dict[str, ImageModel] = {
    m.name: m
    for m in (
        ImageModel(
            name="gemini-2.5-flash-image",
            aspect_ratios=BASE_DIMENSIONS_1K,
            image_sizes=("1K",),
            tokens_per_image={"1K": 1290},
            enqueued_token_caps={"1": 3_000_000, "2": 400_000_000, "3": 1_000_000_000},
        ),
        ImageModel(
            name="gemini-3-pro-image-preview",
            aspect_ratios=BASE_DIMENSIONS_1K,
            image_sizes=("1K", "2K", "4K"),
            tokens_per_image={"1K": 1120, "2K": 1120, "4K": 2000},
            enqueued_token_caps={"1": 2_000_000, "2": 270_000_000, "3": 1_000_000_000},
        ),
        ImageModel(
            name="gemini-3.1-flash-image-preview",
            aspect_ratios={**BASE_DIMENSIONS_1K, **EXTRA_DIMENSIONS_1K_31},
            image_sizes=("512", "1K", "2K", "4K"),
            # Not published in our sources: assumed equal to 3 Pro Image.
            tokens_per_image={"512": 1120, "1K": 1120, "2K": 1120, "4K": 2000},
            enqueued_token_caps={"1": 1_000_000, "2": 250_000_000, "3": 750_000_000},
        ),
    )
}
