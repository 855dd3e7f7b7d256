"""One GenerateContentRequest in, one GenerateContentResponse (or a google.rpc.Status) out.

Shared by the batch workers (per JSONL line / inline request) and the interactive generateContent routes of both
services: what a model answers is the same through the Gemini API and Vertex AI, so it lives beside the services
(batcher/emulator/), not in either, nor in the service-agnostic core.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from .core import faults as F
from .core.config import EmulatorConfig
from .image_models import ImageModel
from .images import make_png
from .schema import BadPayload, check_fields, loads

# gRPC code numbers and HTTP statuses for google.rpc.Code names.
GRPC_CODES = {"CANCELLED": 1, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
              "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "INTERNAL": 13}
HTTP_CODES = {"CANCELLED": 499, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
              "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
              "INTERNAL": 500}

_CAMEL_RE = re.compile(r"_([a-z0-9])")


class LineError(Exception):
    """A per-request failure: becomes ``{"error": Status}`` in batch output or an HTTP error envelope."""

    def __init__(self, status: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    def status_json(self, style: str) -> dict[str, Any]:
        code = GRPC_CODES[self.status] if style == "grpc" else HTTP_CODES[self.status]
        out: dict[str, Any] = {"code": code, "message": self.message, "status": self.status}
        if self.details:
            out["details"] = self.details
        return out


def camelize(obj: Any) -> Any:
    """snake_case keys -> camelCase, recursively (proto-JSON parsers accept both)."""
    if isinstance(obj, dict):
        return {_CAMEL_RE.sub(lambda m: m.group(1).upper(), k): camelize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [camelize(v) for v in obj]
    return obj


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def approx_text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


@dataclass
class Parsed:
    model: ImageModel
    request: dict[str, Any]  # camelCase
    prompt_text: str
    prompt_tokens: int
    text_tokens: int
    image_tokens_in: int
    n_input_images: int
    modalities: list[str]
    aspect_ratio: str
    image_size: str
    file_uris: list[str]

    @property
    def output_tokens(self) -> int:
        return self.model.tokens_per_image[self.image_size] if "IMAGE" in self.modalities else 0


def _texts(content: Any) -> list[str]:
    out = []
    if isinstance(content, dict):
        for p in content.get("parts") or []:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                out.append(p["text"])
    return out


def parse_request(model: ImageModel, request: Any) -> Parsed:
    """Validate like the real service; raises LineError(INVALID_ARGUMENT) on a bad request."""
    if not isinstance(request, dict):
        raise LineError("INVALID_ARGUMENT", "Invalid JSON payload: request must be a JSON object.")
    try:
        check_fields(request, "GenerateContentRequest")
    except BadPayload as bad:
        raise LineError("INVALID_ARGUMENT", bad.message, bad.details()) from None
    req = camelize(request)
    contents = req.get("contents")
    if not contents or not isinstance(contents, list):
        raise LineError("INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified\n")
    texts: list[str] = []
    n_images = 0
    file_uris: list[str] = []
    for c in contents:
        if not isinstance(c, dict) or not isinstance(c.get("parts"), list) or not c["parts"]:
            raise LineError("INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents.parts must not be empty.\n")
        texts += _texts(c)
        for p in c["parts"]:
            if not isinstance(p, dict):
                raise LineError("INVALID_ARGUMENT", "Invalid JSON payload: part must be an object.")
            if "inlineData" in p:
                if str((p["inlineData"] or {}).get("mimeType", "")).startswith("image/"):
                    n_images += 1
            if "fileData" in p:
                uri = (p["fileData"] or {}).get("fileUri")
                if not uri:
                    raise LineError("INVALID_ARGUMENT", "* GenerateContentRequest.contents[].parts[].file_data.file_uri: file_uri is required.\n")
                file_uris.append(uri)
                n_images += 1
    sys_texts = _texts(req.get("systemInstruction"))
    gen = req.get("generationConfig") or {}
    if not isinstance(gen, dict):
        raise LineError("INVALID_ARGUMENT", "Invalid JSON payload: generation_config must be an object.")
    modalities = gen.get("responseModalities") or ["TEXT", "IMAGE"]
    modalities = [str(m).upper() for m in modalities]
    for m in modalities:
        if m not in ("TEXT", "IMAGE"):
            raise LineError("INVALID_ARGUMENT", f"Unsupported response modality: {m}.")
    image_config = gen.get("imageConfig") or {}
    if not image_config:  # the guide's newer REST form: generationConfig.responseFormat[].image
        formats = gen.get("responseFormat") or []
        for f in formats if isinstance(formats, list) else [formats]:
            if isinstance(f, dict) and isinstance(f.get("image"), dict):
                image_config = f["image"]
    aspect = image_config.get("aspectRatio") or "1:1"
    size = image_config.get("imageSize") or model.default_image_size
    if aspect not in model.aspect_ratios:
        raise LineError("INVALID_ARGUMENT", f"Unsupported aspect ratio: {aspect}. Supported: {', '.join(model.aspect_ratios)}.")
    if size not in model.image_sizes:
        raise LineError("INVALID_ARGUMENT", f"Unsupported image size: {size}. Supported for {model.name}: {', '.join(model.image_sizes)}.")
    prompt_text = "\n".join(texts)
    text_tokens = approx_text_tokens(prompt_text + "".join(sys_texts))
    image_tokens_in = model.input_image_tokens * n_images
    return Parsed(model, req, prompt_text, max(1, text_tokens + image_tokens_in), text_tokens,
                  image_tokens_in, n_images, modalities, aspect, size, file_uris)


def estimate_tokens(model: ImageModel, line: bytes) -> int:
    """Enqueued tokens for one JSONL input line (prompt + output image); 0 for unparseable lines."""
    try:
        obj = loads(line)
        p = parse_request(model, obj.get("request", obj))  # a bare request line is its own request
    except Exception:
        return 0
    return p.prompt_tokens + p.output_tokens


def _usage(p: Parsed, out_image_tokens: int, out_text_tokens: int = 0, thoughts: int = 0) -> dict[str, Any]:
    prompt_details = [{"modality": "TEXT", "tokenCount": p.text_tokens}]
    if p.image_tokens_in:
        prompt_details.append({"modality": "IMAGE", "tokenCount": p.image_tokens_in})
    u: dict[str, Any] = {"promptTokenCount": p.prompt_tokens}
    cand = out_image_tokens + out_text_tokens
    if cand:
        u["candidatesTokenCount"] = cand
    u["totalTokenCount"] = p.prompt_tokens + cand + thoughts
    u["promptTokensDetails"] = prompt_details
    details = []
    if out_text_tokens:
        details.append({"modality": "TEXT", "tokenCount": out_text_tokens})
    if out_image_tokens:
        details.append({"modality": "IMAGE", "tokenCount": out_image_tokens})
    if details:
        u["candidatesTokensDetails"] = details
    if thoughts:
        u["thoughtsTokenCount"] = thoughts
    return u


def billed_usd(model: ImageModel, response: dict[str, Any], batch: bool) -> float:
    """What a response costs the account: prompt at the input rate, image tokens at the image rate, text and
    thoughts at the text rate (the batch discount in batch mode)."""
    u = response.get("usageMetadata") or {}
    cand = int(u.get("candidatesTokenCount", 0))
    image = sum(int(d.get("tokenCount", 0)) for d in u.get("candidatesTokensDetails", []) if d.get("modality") == "IMAGE")
    return model.usd(int(u.get("promptTokenCount", 0)), image, cand - image + int(u.get("thoughtsTokenCount", 0)), batch)


def thought_tokens(model: ImageModel, digest: bytes) -> int:
    """A thinking model's thoughts for one request: 100-299 tokens, fixed by the request (published usageMetadata
    shows 106 and 232 for one image)."""
    return 100 + int.from_bytes(digest[:2], "big") % 200 if model.thinking else 0


class Generator:
    """Turns requests into responses. ``file_ok(uri)`` says whether a fileData URI refers to a live file;
    ``cfg()`` returns the live EmulatorConfig; ``injector`` makes the seeded rate decisions;
    ``on_fault`` counts injected faults."""

    def __init__(self, cfg: Callable[[], EmulatorConfig], injector: F.FaultInjector,
                 file_ok: Callable[[str], bool], on_fault: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.injector = injector
        self.file_ok = file_ok
        self.on_fault = on_fault

    def generate(self, model: ImageModel, request: Any, response_salt: str,
                 key: Any = None) -> tuple[dict[str, Any], bool]:
        """Returns (GenerateContentResponse, produced_image). Raises LineError.

        Image bytes are a function of the model, the (camelized) request and, when the request sets no
        ``generationConfig.seed``, the caller's key (JSONL ``key`` / inline ``metadata``): the real model
        samples, so two unseeded lines with the same request (e.g. variants) get different images, while a
        seeded request gives the same image wherever it is sent."""
        cfg = self.cfg()
        p = parse_request(model, request)
        for uri in p.file_uris:
            if not self.file_ok(uri):
                raise LineError("PERMISSION_DENIED",
                                f"You do not have permission to access the File {uri} or it may not exist.")
        text = p.prompt_text
        identity = canonical(p.request)
        if key is not None and (p.request.get("generationConfig") or {}).get("seed") is None:
            identity += b"\x00key:" + canonical(key)
        digest = hashlib.sha256(model.name.encode() + b"\x00" + identity).digest()
        base = {
            "modelVersion": model.name,
            "responseId": base64.urlsafe_b64encode(
                hashlib.sha256(digest + response_salt.encode()).digest()[:15]).decode(),
        }

        def outcome(marker: str, rate: float, concern: str) -> bool:
            if marker in text:
                return True
            if self.injector.chance(concern, rate):
                self.on_fault(concern)
                return True
            return False

        thoughts = thought_tokens(model, digest)
        if outcome(F.MARKER_LINE_ERROR, cfg.line_error_rate, "line_error"):
            raise LineError("INTERNAL", "Internal error encountered.")
        if outcome(F.MARKER_PROMPT_BLOCKED, cfg.prompt_block_rate, "prompt_block"):
            return {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": _usage(p, 0), **base}, False
        if outcome(F.MARKER_IMAGE_SAFETY, cfg.safety_block_rate, "safety_block"):
            cand = {"finishReason": "IMAGE_SAFETY", "index": 0}
            return {"candidates": [cand], "usageMetadata": _usage(p, 0, 0, thoughts), **base}, False
        if outcome(F.MARKER_TEXT_ONLY, cfg.text_only_rate, "text_only"):
            t = "I can't create that image, but here is a description of it instead."
            cand = {"content": {"parts": [{"text": t}], "role": "model"}, "finishReason": "STOP", "index": 0}
            return {"candidates": [cand], "usageMetadata": _usage(p, 0, approx_text_tokens(t), thoughts), **base}, False
        parts: list[dict[str, Any]] = []
        thinking = (p.request.get("generationConfig") or {}).get("thinkingConfig") or {}
        if thoughts and (cfg.thought_parts == "always" or (cfg.thought_parts == "requested" and thinking.get("includeThoughts"))):
            # A thinking model's interim drafts (up to two, marked thought: true, not billed as output) come first.
            parts.append({"text": "**Planning the composition**\nChecking layout, subject and lighting first.", "thought": True})
            if "IMAGE" in p.modalities:
                w, h = model.dimensions(p.aspect_ratio, p.image_size)
                draft = make_png(w, h, hashlib.sha256(b"draft:" + digest).digest(), cfg.image_bytes // 4)
                parts.append({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(draft).decode()}, "thought": True})
        if "TEXT" in p.modalities:
            parts.append({"text": "Here is the image you asked for."})
        produced = False
        out_tokens = 0
        if "IMAGE" in p.modalities:
            w, h = model.dimensions(p.aspect_ratio, p.image_size)
            png = make_png(w, h, digest, cfg.image_bytes)
            data = base64.b64encode(png).decode()
            if self.injector.chance("corrupt_base64", cfg.corrupt_base64_rate):
                self.on_fault("corrupt_base64")
                data = data[:64] + "*!?" + data[64:-3]  # characters outside the base64 alphabet, bad padding
            elif self.injector.chance("not_image", cfg.not_image_rate):
                self.on_fault("not_image")
                data = base64.b64encode(b"<html>502 Bad Gateway</html>" + digest).decode()
            image_part: dict[str, Any] = {"inlineData": {"mimeType": "image/png", "data": data}}
            if thoughts:  # a thinking model signs its final image
                image_part["thoughtSignature"] = base64.b64encode(hashlib.sha256(b"signature:" + digest).digest()).decode()
            parts.append(image_part)
            produced = True
            out_tokens = p.output_tokens
        cand = {"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}
        return {"candidates": [cand], "usageMetadata": _usage(p, out_tokens, 0, thoughts), **base}, produced
