"""Property tests for the emulator's deterministic PNGs (no server needed)."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batcher.emulator.images import make_png
from batcher.emulator.image_models import KNOWN


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 700), h=st.integers(1, 700), digest=st.binary(min_size=1, max_size=32),
       target=st.integers(0, 60_000))
def test_png_valid_deterministic_and_sized(w, h, digest, target):
    png = make_png(w, h, digest, target)
    assert png == make_png(w, h, digest, target)
    im = Image.open(io.BytesIO(png))
    im.load()
    assert im.format == "PNG" and im.size == (w, h)
    bare = len(make_png(w, h, digest, 0))
    assert len(png) == max(bare, target) or (target > bare and len(png) in (bare, target))


@settings(max_examples=20, deadline=None)
@given(a=st.binary(min_size=1, max_size=16), b=st.binary(min_size=1, max_size=16))
def test_different_digests_give_different_bytes(a, b):
    if a != b:
        assert make_png(64, 32, a, 2_000) != make_png(64, 32, b, 2_000)


def test_model_table_dimensions():
    for model in KNOWN.values():
        for size in model.image_sizes:
            assert size in model.tokens_per_image
            for aspect in model.pixels[size]:
                w, h = model.dimensions(aspect, size)
                assert w > 0 and h > 0 and w % 8 == 0 and h % 8 == 0
