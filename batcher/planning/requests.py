"""Building GenerateContentRequests for image generation, and their identity (the request hash).

The request hash is SHA-256 over a canonical JSON of everything that determines the output: the schema
version, model, contents (reference images by content hash, never by upload URI), system instruction,
generation config and variant index. It is the JSONL `key`, the cache key and the image file name.
Changing what goes into it means bumping HASH_SCHEMA_VERSION (golden tests pin the values).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from dataclasses import dataclass
from typing import Any

HASH_SCHEMA_VERSION = 1
# Placeholder URI scheme for a reference image inside a stored request body; replaced by the uploaded
# file's URI when the JSONL is written (uploads expire after 48 h, the body must not).
REF_SCHEME = "batcher-ref:sha256:"


@dataclass(frozen=True)
class ReferenceImage:
    sha256: str
    mime_type: str
    path: str


@dataclass(frozen=True)
class ImageRequest:
    """One request for one image: everything that determines the output."""

    model: str
    prompt: str
    variant: int = 0
    aspect_ratio: str | None = None
    image_size: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    system_instruction: str | None = None
    references: tuple[ReferenceImage, ...] = ()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _generation_config(req: ImageRequest) -> dict:
    config: dict[str, Any] = {"responseModalities": ["IMAGE"]}
    image_config = {}
    if req.aspect_ratio:
        image_config["aspectRatio"] = req.aspect_ratio
    if req.image_size:
        image_config["imageSize"] = req.image_size
    if image_config:
        config["imageConfig"] = image_config
    if req.temperature is not None:
        config["temperature"] = float(req.temperature)
    if req.top_p is not None:
        config["topP"] = float(req.top_p)
    if req.seed is not None:
        config["seed"] = int(req.seed)
    return config


def request_body(req: ImageRequest) -> dict:
    """The GenerateContentRequest (camelCase, as the API's proto-JSON), with reference images as placeholders."""
    parts: list[dict] = [{"fileData": {"fileUri": REF_SCHEME + ref.sha256, "mimeType": ref.mime_type}} for ref in req.references]
    parts.append({"text": req.prompt})
    body: dict[str, Any] = {
        "contents": [{"role": "user", "parts": parts}],
        "generationConfig": _generation_config(req),
    }
    if req.system_instruction:
        body["systemInstruction"] = {"parts": [{"text": req.system_instruction}]}
    return body


def image_size_of(body_json: str) -> str | None:
    """The `imageConfig.imageSize` of a stored request body, or None (the model's default)."""
    if '"imageSize"' not in body_json:
        return None
    return json.loads(body_json)["generationConfig"].get("imageConfig", {}).get("imageSize")


def dump_body(body: dict) -> str:
    """A request body as stored in the ledger and written into JSONL lines: compact JSON, UTF-8 text kept."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def request_hash(req: ImageRequest) -> str:
    return identity_hash(req.model, request_body(req), req.variant)  # references appear by content hash only


def identity_hash(model: str, body: dict, variant: int) -> str:
    identity = {"schema": HASH_SCHEMA_VERSION, "model": model.removeprefix("models/"), "request": body, "variant": variant}
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()


def resolve_references(body: dict, uri_by_sha: dict[str, str]) -> dict:
    """Replace reference placeholders with uploaded file URIs (returns a new body)."""
    text = json.dumps(body)
    if REF_SCHEME not in text:
        return body
    for sha, uri in uri_by_sha.items():
        text = text.replace(REF_SCHEME + sha, uri)
    if REF_SCHEME in text:
        raise KeyError("a reference image has no uploaded file")
    return json.loads(text)


def referenced_hashes(body_json: str) -> list[str]:
    out = []
    start = 0
    while (i := body_json.find(REF_SCHEME, start)) != -1:
        j = i + len(REF_SCHEME)
        out.append(body_json[j : j + 64])
        start = j + 64
    return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_mime_type(path: str) -> str:
    mime, _ = mimetypes.guess_type(path)
    return mime if mime and mime.startswith("image/") else "image/png"
