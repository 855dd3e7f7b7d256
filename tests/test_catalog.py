"""The facts table (batcher/catalog.toml): complete, sourced, and consistent with itself."""

from __future__ import annotations

import datetime as dt

import pytest

from batcher import catalog
from batcher.cost.pricing import default_table

# The one entry of Google's tables whose shape does not match its label: 21:9 at 512 is printed as 792x168.
PUBLISHED_ODDITIES = {("gemini-3.1-flash-image", "512", "21:9"), ("gemini-3.1-flash-image-preview", "512", "21:9")}


def test_every_model_names_its_sources_and_their_dates():
    for spec in catalog.MODELS.values():
        for group in ("lifecycle", "sizes", "tokens", "prices", "references"):
            source = spec.sources[group]
            assert source.url.startswith("https://") and isinstance(source.read, dt.date), (spec.name, group)
    for tier in catalog.TIERS.values():
        assert tier.source.url.startswith("https://")


def test_pixel_sizes_have_the_shape_their_aspect_ratio_says():
    for spec in catalog.MODELS.values():
        for size, table in spec.pixels.items():
            for ratio, (w, h) in table.items():
                if (spec.name, size, ratio) in PUBLISHED_ODDITIES:
                    continue
                a, b = map(int, ratio.split(":"))
                assert abs((w / h) / (a / b) - 1) < 0.06, (spec.name, size, ratio, w, h)


def test_tokens_times_rate_is_googles_published_price_per_image():
    # Google's "equivalent to $0.067 per 1K image" is tokens x rate, rounded: the two halves of the table agree.
    table = default_table()
    checked = 0
    for spec in catalog.MODELS.values():
        for size, published in spec.published_usd_per_image.items():
            assert table.get(spec.name).image_usd(size, batch=False) == pytest.approx(published, rel=0.01), (spec.name, size)
            checked += 1
    assert checked >= 8


def test_lifecycle_names_a_current_replacement():
    today = dt.date(2026, 12, 5)
    assert catalog.model_spec(catalog.DEFAULT_MODEL).status(today) == "current"
    assert catalog.DEFAULT_MODEL == "gemini-3.1-flash-image"
    for spec in catalog.MODELS.values():
        if spec.shutdown:
            assert spec.replacement and catalog.MODELS[spec.replacement].status(today) == "current"
    assert "use gemini-3-pro-image" in catalog.refusal("gemini-3-pro-image-preview", today)
    assert "use gemini-3.1-flash-image" in catalog.refusal("models/gemini-3.1-flash-image-preview", today)
    assert catalog.refusal("gemini-2.5-flash-image", today) is None  # only an *earliest* shutdown date: a warning
    assert "earliest" in catalog.warning("gemini-2.5-flash-image", today)
    before = catalog.warning("gemini-2.5-flash-image", dt.date(2026, 9, 1))  # only its earliest date is known
    assert before.startswith("gemini-2.5-flash-image may shut down from 2026-10-02;")
    assert catalog.warning("gemini-3-pro-image-preview", dt.date(2026, 6, 1)).startswith(
        "gemini-3-pro-image-preview shuts down on 2026-06-25;")
    assert catalog.refusal("gemini-3-pro-image-preview", dt.date(2026, 6, 24)) is None  # the day before it went
    assert catalog.refusal("gemini-nano-banana-2.1", today) is None  # unknown: the API decides


def test_model_names_are_checked_for_shape_only():
    assert catalog.model_name_problem("gemini-nano-banana-2.1") is None
    assert catalog.model_name_problem("models/gemini-3-pro-image") is None
    assert "not a model name" in catalog.model_name_problem("gemini 3 pro")
    assert "not a model name" in catalog.model_name_problem("../etc")
