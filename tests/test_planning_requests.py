"""Requests and their identity (planning.requests): golden request hashes, what the hash depends on, the body sent."""

from __future__ import annotations


import pytest

from batcher.planning.requests import ImageRequest, ReferenceImage, request_body, request_hash, resolve_references


# Pinned: these values must never change without bumping HASH_SCHEMA_VERSION (every cache would go cold).
GOLDEN = [
    (ImageRequest(model="gemini-2.5-flash-image", prompt="a red fox in snow"),
     "507174e1630029e0279a0b37e8c015d613bfa5385457fc6168ccca9af697f99c"),
    (ImageRequest(model="gemini-3-pro-image-preview", prompt="a red fox in snow", variant=2, aspect_ratio="16:9",
                  image_size="2K", temperature=0.7, seed=42, system_instruction="photoreal",
                  references=(ReferenceImage("ab" * 32, "image/png", "/x.png"),)),
     "49502281de2688075c294ea7d55a40f3608b498ee5b2901c8c86c5a8e69d528f"),
]


@pytest.mark.parametrize("req, expected", GOLDEN)
def test_golden_request_hashes(req, expected):
    assert request_hash(req) == expected


def test_hash_depends_on_everything_that_determines_the_output():
    base = ImageRequest(model="gemini-2.5-flash-image", prompt="p")
    variants = [
        ImageRequest(model="gemini-3-pro-image-preview", prompt="p"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p "),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", variant=1),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", aspect_ratio="1:1"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", seed=1),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", temperature=1.0),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", system_instruction="s"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/a"),)),
    ]
    hashes = {request_hash(v) for v in variants} | {request_hash(base)}
    assert len(hashes) == len(variants) + 1
    # ...but not on where a reference image lives: the same bytes elsewhere are the same request.
    a = ImageRequest(model="m", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/a.png"),))
    b = ImageRequest(model="m", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/b/c.png"),))
    assert request_hash(a) == request_hash(b)
    assert request_hash(ImageRequest(model="models/m", prompt="p")) == request_hash(ImageRequest(model="m", prompt="p"))


def test_request_body_is_an_image_generate_content_request():
    body = request_body(ImageRequest(model="m", prompt="a cat", aspect_ratio="3:2", image_size="2K", seed=5,
                                     system_instruction="studio", references=(ReferenceImage("f" * 64, "image/jpeg", "/r.jpg"),)))
    assert body["generationConfig"] == {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "3:2", "imageSize": "2K"}, "seed": 5}
    assert body["systemInstruction"] == {"parts": [{"text": "studio"}]}
    resolved = resolve_references(body, {"f" * 64: "https://x/v1beta/files/abc"})
    assert resolved["contents"][0]["parts"][0] == {"fileData": {"fileUri": "https://x/v1beta/files/abc", "mimeType": "image/jpeg"}}
    with pytest.raises(KeyError):
        resolve_references(body, {})


def test_reference_placeholders_are_spliced_only_as_whole_values():
    import json

    from batcher.jobs.lifecycle import splice_references

    sha = "a" * 64
    req = ImageRequest(model="m", prompt=f'see "batcher-ref:sha256:{sha}" here',
                       references=(ReferenceImage(sha, "image/png", "/r.png"),))
    body_json = json.dumps(request_body(req), ensure_ascii=False)
    out = json.loads(splice_references(body_json, {sha: "https://x/files/f1"}))
    assert out["contents"][0]["parts"][0]["fileData"]["fileUri"] == "https://x/files/f1"
    assert out["contents"][0]["parts"][1]["text"] == f'see "batcher-ref:sha256:{sha}" here'  # the prompt is untouched
    with pytest.raises(KeyError):
        splice_references(body_json, {})
