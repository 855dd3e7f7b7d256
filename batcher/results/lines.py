"""One line of a job's results file: parse it, classify the response (image, block, error) and decode the image.

Standard library and pybase64 only (no SDK, no pyarrow, no Pillow unless an image is not a PNG): the collect
decoder processes (results.decoder) import this, and their start-up is paid on every collect.
"""

from __future__ import annotations

import binascii
import json

import pybase64

# Strict base64: only the standard alphabet, no whitespace, padding only at the end and the length a multiple of 4
# (as binascii.a2b_base64(strict_mode=True), and also no padding past a full group). SIMD: ~10 GB/s on x86-64
# against ~0.3 GB/s for binascii, which was most of collect's CPU (docs/benchmarks.md, issue 19).
# Raises binascii.Error.


def b64decode_strict(data) -> bytes:
    return pybase64.b64decode(data, validate=True)

BLOCK_FINISH_REASONS = {
    "SAFETY", "PROHIBITED_CONTENT", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST", "SPII",
    "RECITATION", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE", "OTHER",
}


class Outcome:
    """A line's outcome. A plain class, not a dataclass: `dataclasses` imports `inspect`, ~1.5 MB in every
    decoder process."""

    __slots__ = ("kind", "data", "reason", "finish_reason", "prompt_tokens", "output_tokens", "thoughts_tokens", "text_tokens")

    def __init__(self, kind: str, data: bytes | None = None, reason: str | None = None, finish_reason: str | None = None,
                 prompt_tokens: int = 0, output_tokens: int = 0, thoughts_tokens: int = 0, text_tokens: int = 0):
        self.kind = kind  # "image" | "blocked" | "error"
        self.data = data
        self.reason = reason
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens  # candidatesTokenCount: the image's tokens, and any text the model wrote
        self.thoughts_tokens = thoughts_tokens  # thoughtsTokenCount: billed, at the text output rate
        self.text_tokens = text_tokens  # of output_tokens, those candidatesTokensDetails counts as TEXT (text rate)

    @property
    def usage(self) -> list[int]:
        """The token counts as collect passes them on (decoder replies, pricing.cost_usd)."""
        return [self.prompt_tokens, self.output_tokens, self.thoughts_tokens, self.text_tokens]

    def _fields(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other) -> bool:
        return isinstance(other, Outcome) and self._fields() == other._fields()

    def __repr__(self) -> str:
        data = None if self.data is None else f"<{len(self.data)} bytes>"
        return (f"Outcome(kind={self.kind!r}, data={data}, reason={self.reason!r}, finish_reason={self.finish_reason!r}, "
                f"usage={self.usage})")


def _get(d: dict, camel: str, snake: str):
    v = d.get(camel)
    return d.get(snake) if v is None else v


def image_meta(model: str, o: Outcome, **extra) -> dict:
    """What the cache records beside an image: the model and what the image cost in tokens."""
    return {"model": model, "prompt_tokens": o.prompt_tokens, "output_tokens": o.output_tokens,
            "thoughts_tokens": o.thoughts_tokens, "finish_reason": o.finish_reason, **extra}


def usage_of(response: dict) -> dict:
    """The billed token counts of a response: prompt, output (candidates), thoughts, and the text part of the output
    (candidatesTokensDetails by modality; without details, every output token counts as image)."""
    usage = _get(response, "usageMetadata", "usage_metadata") or {}
    output = int(_get(usage, "candidatesTokenCount", "candidates_token_count") or 0)
    text = 0
    for d in _get(usage, "candidatesTokensDetails", "candidates_tokens_details") or ():
        if isinstance(d, dict) and str(d.get("modality", "")).rsplit(".", 1)[-1] == "TEXT":
            text += int(_get(d, "tokenCount", "token_count") or 0)
    return {"prompt_tokens": int(_get(usage, "promptTokenCount", "prompt_token_count") or 0), "output_tokens": output,
            "thoughts_tokens": int(_get(usage, "thoughtsTokenCount", "thoughts_token_count") or 0),
            "text_tokens": min(text, output)}


def classify(response: dict, blobs: "_Blobs | None" = None) -> Outcome:
    """Turn one GenerateContentResponse into an image, a block (final) or an error (retried).
    `blobs`: the base64 strings that `loads_line` cut out of the results line (the response holds placeholders).
    Parts marked `thought: true` (a thinking model's interim images and text) are never the result."""
    usage = usage_of(response)
    feedback = _get(response, "promptFeedback", "prompt_feedback") or {}
    block = _get(feedback, "blockReason", "block_reason")
    candidates = response.get("candidates") or []
    if block or not candidates:
        return Outcome("blocked", reason=f"prompt blocked: {block or 'no candidates'}", finish_reason=block or "NO_CANDIDATES",
                       **usage)
    cand = candidates[0]
    finish = _get(cand, "finishReason", "finish_reason")
    parts = ((cand.get("content") or {}).get("parts")) or []
    images = [p for p in parts if (_get(p, "inlineData", "inline_data") or {}) and not p.get("thought")]
    images = [p for p in images if str(_get(_get(p, "inlineData", "inline_data"), "mimeType", "mime_type") or "").startswith("image/")]
    if not images:
        if finish in BLOCK_FINISH_REASONS:
            reason = f"no image: finish reason {finish}"
        else:
            reason = "no image: the model replied with text only"
            finish = finish if finish and finish != "STOP" else "NO_IMAGE"
        return Outcome("blocked", reason=reason, finish_reason=finish, **usage)
    inline = _get(images[-1], "inlineData", "inline_data")  # the last image is the final one (earlier ones may be drafts)
    if isinstance(inline.get("data"), bytes):  # an interactive response, decoded by the SDK already
        return Outcome("image", data=inline["data"], finish_reason=finish, **usage)
    try:
        data = inline.get("data") or ""
        data = blobs.decode(data) if blobs is not None and blobs.holds(data) else b64decode_strict(data)
    except (binascii.Error, ValueError) as exc:
        return Outcome("error", reason=f"corrupt base64 image data ({exc})", finish_reason=finish)
    return Outcome("image", data=data, finish_reason=finish, **usage)


_PLACEHOLDER = "\x00batcher-b64:"
_BLOB_MIN = 1024  # base64 strings shorter than this are left to json.loads


class _Blobs:
    """The long "data" strings of one results line, kept as slices of the line's bytes."""

    def __init__(self, line: bytes, spans: list[tuple[int, int]]):
        self.view = memoryview(line)
        self.spans = spans

    def holds(self, value) -> bool:
        return isinstance(value, str) and value.startswith(_PLACEHOLDER)

    def decode(self, placeholder: str) -> bytes:
        """Strict base64 decoding straight from the line's bytes, in one call: at SIMD speed a 2 MB string
        holds the GIL for ~0.2 ms, well below the interpreter's 5 ms switch interval, so the download and
        image-writer threads are not stalled (binascii needed pieces of 128 KB for that)."""
        start, end = self.spans[int(placeholder[len(_PLACEHOLDER):])]
        return b64decode_strict(self.view[start:end])


def loads_line(line: bytes) -> tuple[dict, _Blobs | None]:
    """json.loads of one results line without turning its megabytes of base64 into a str first: each long
    `"data": "..."` string value (base64 has no escapes and no quotes) is cut out and replaced by a placeholder
    that `classify` decodes straight from the line's bytes. Anything unusual is left to json.loads."""
    if len(line) < _BLOB_MIN:
        return json.loads(line), None
    parts: list[bytes] = []
    spans: list[tuple[int, int]] = []
    n, pos, i = len(line), 0, 0
    while (k := line.find(b'"data"', i)) >= 0:
        i = q = k + 6
        while q < n and line[q] in b" \t\r\n":
            q += 1
        if q >= n or line[q] != 0x3A:  # ':' -- not a key
            continue
        q += 1
        while q < n and line[q] in b" \t\r\n":
            q += 1
        if q >= n or line[q] != 0x22:  # '"' -- not a string value
            continue
        start = q + 1
        end = line.find(b'"', start)
        if end < 0:
            break  # unterminated: json.loads reports it
        i = end + 1
        if end - start < _BLOB_MIN or line.find(b"\\", start, end) >= 0:
            continue
        parts += (line[pos:start], b"\\u0000batcher-b64:%d" % len(spans))
        spans.append((start, end))
        pos = end
    if not spans:
        return json.loads(line), None
    parts.append(line[pos:])
    return json.loads(b"".join(parts)), _Blobs(line, spans)


def read_line(line: bytes, wanted) -> tuple[str, object, Outcome | None]:
    """One results line: ("blank", None, None), ("bad-json", None, None), ("unwanted", key, None) for a key
    `wanted(key)` refuses (nothing decoded), or ("outcome", key, Outcome); an image outcome carries the bytes."""
    if line[:1] in (b"", b" ", b"\t", b"\r", b"\n") and not line.strip():
        return "blank", None, None
    try:
        obj, blobs = loads_line(line)
        key = obj.get("key")
    except (ValueError, AttributeError):
        return "bad-json", None, None
    if not (isinstance(key, str) and wanted(key)):
        return "unwanted", key, None
    if obj.get("error") is not None or obj.get("response") is None:
        err = obj.get("error") or {}
        err = err if isinstance(err, dict) else {"message": str(err)}
        reason = f"API error {err.get('code', '')} {err.get('status', '')}: {err.get('message', 'no response')}".strip()
        return "outcome", key, Outcome("error", reason=reason)
    return "outcome", key, classify(obj["response"], blobs)
