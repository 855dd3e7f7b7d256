"""How Google's JSON front end reads a request body: its lenient syntax, and its refusal of unknown fields.

- Syntax: proto-JSON parsing accepts what the documentation's curl examples send, single-quoted strings included.
- Field names: both the proto name (`generation_config`) and its JSON name (`generationConfig`) are accepted; a name
  the message does not have is a 400 INVALID_ARGUMENT: `Invalid JSON payload received. Unknown name "fooBar" at
  'generation_config': Cannot find field.` with a google.rpc.BadRequest field violation (none of the path for an
  unknown name at the top), several unknown names joined by newlines (api-2026-12.md §6).

The messages and fields below are those of the v1beta GenerateContentRequest that image generation uses, as the
google-genai SDK (3.6.1) writes them for the Gemini API; a message not listed (tools, schemas, function calls) is
taken as it comes.

Every request body of both services is read this way (by the core's request handler), and so are the Gemini batch
worker's input lines: it is Google's front end, beside the services (batcher/emulator/), not part of either.
"""

from __future__ import annotations

import json
import re
from typing import Any

_CAMEL_RE = re.compile(r"_([a-z0-9])")

# message -> {JSON field name: (message of the field or None, repeated)}
MESSAGES: dict[str, dict[str, tuple[str | None, bool]]] = {
    "GenerateContentRequest": {
        "model": (None, False), "contents": ("Content", True), "tools": (None, True), "toolConfig": (None, False),
        "safetySettings": ("SafetySetting", True), "systemInstruction": ("Content", False),
        "generationConfig": ("GenerationConfig", False), "cachedContent": (None, False), "labels": (None, False),
        "serviceTier": (None, False), "store": (None, False), "continuationToken": (None, False),
    },
    "Content": {"role": (None, False), "parts": ("Part", True)},
    "Part": {name: (child, False) for name, child in (
        ("text", None), ("inlineData", "Blob"), ("fileData", "FileData"), ("functionCall", None), ("functionResponse", None),
        ("executableCode", None), ("codeExecutionResult", None), ("thought", None), ("thoughtSignature", None),
        ("videoMetadata", None), ("mediaResolution", None), ("partMetadata", None), ("toolCall", None), ("toolResponse", None),
        ("audioTranscription", None), ("mediaProcessing", None), ("speechMetadata", None), ("documentMetadata", None),
        ("spreadsheetMetadata", None), ("audioMetadata", None))},
    "Blob": {"mimeType": (None, False), "data": (None, False), "displayName": (None, False)},
    "FileData": {"mimeType": (None, False), "fileUri": (None, False), "displayName": (None, False)},
    "SafetySetting": {"category": (None, False), "threshold": (None, False)},
    "GenerationConfig": {name: (child, False) for name, child in (
        ("temperature", None), ("topP", None), ("topK", None), ("candidateCount", None), ("maxOutputTokens", None),
        ("stopSequences", None), ("responseLogprobs", None), ("logprobs", None), ("presencePenalty", None),
        ("frequencyPenalty", None), ("seed", None), ("responseMimeType", None), ("responseSchema", None),
        ("responseJsonSchema", None), ("responseModalities", None), ("mediaResolution", None), ("speechConfig", None),
        ("thinkingConfig", "ThinkingConfig"), ("imageConfig", "ImageConfig"), ("enableEnhancedCivicAnswers", None),
        ("responseFormat", None), ("audioTranscriptionConfig", None))},
    "ThinkingConfig": {"includeThoughts": (None, False), "thinkingBudget": (None, False), "thinkingLevel": (None, False)},
    "ImageConfig": {"aspectRatio": (None, False), "imageSize": (None, False)},
    # batchGenerateContent's body and one line of a JSONL input file
    "BatchGenerateContentRequest": {"batch": ("GenerateContentBatch", False)},
    "GenerateContentBatch": {name: (None, False) for name in (
        "model", "name", "displayName", "inputConfig", "output", "createTime", "endTime", "updateTime", "batchStats",
        "state", "priority", "webhookConfig", "labels")},
    "InputLine": {"key": (None, False), "request": (None, False), "metadata": (None, False)},
}


class BadPayload(ValueError):
    """A body the front end refuses (400 INVALID_ARGUMENT); `violations` are google.rpc.BadRequest field violations."""

    def __init__(self, message: str, violations: list[dict[str, str]]):
        super().__init__(message)
        self.message = message
        self.violations = violations

    def details(self) -> list[dict[str, Any]]:
        return [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": self.violations}]


def camel(name: str) -> str:
    return _CAMEL_RE.sub(lambda m: m.group(1).upper(), name)


def snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def check_fields(value: Any, message: str, path: str = "") -> None:
    """Raise BadPayload for every field name `message` (and what it holds) does not have."""
    unknown: list[tuple[str, str]] = []
    _walk(value, message, path, unknown)
    if not unknown:
        return
    texts = [f'Invalid JSON payload received. Unknown name "{name}"' + (f" at '{where}'" if where else "") + ": Cannot find field."
             for where, name in unknown]
    violations = [({"field": where} if where else {}) | {"description": text} for (where, _), text in zip(unknown, texts)]
    raise BadPayload("\n".join(texts), violations)


def _walk(value: Any, message: str, path: str, unknown: list[tuple[str, str]]) -> None:
    fields = MESSAGES.get(message)
    if fields is None or not isinstance(value, dict):
        return
    for key, child_value in value.items():
        known = fields.get(camel(key))
        if known is None:
            unknown.append((path, key))
            continue
        child, _ = known
        if child is None or child_value is None:
            continue
        where = f"{path}.{snake(camel(key))}" if path else snake(camel(key))
        if isinstance(child_value, list):
            for i, item in enumerate(child_value):
                _walk(item, child, f"{where}[{i}]", unknown)
        else:
            _walk(child_value, child, where, unknown)


def loads(raw: bytes | str) -> Any:
    """JSON as Google's front end reads it: standard JSON, or the lenient form with single-quoted strings."""
    try:
        return json.loads(raw)
    except ValueError as first:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if "'" not in text:
            raise BadPayload(f"Invalid JSON payload received. {first}", []) from None
        try:
            return json.loads(_double_quoted(text))
        except ValueError as exc:
            raise BadPayload(f"Invalid JSON payload received. {exc}", []) from None


def _double_quoted(text: str) -> str:
    """Single-quoted strings rewritten as JSON strings (escapes kept; a double quote inside escaped)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':  # a double-quoted string: copy it whole
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif c == "'":
            j = i + 1
            chars: list[str] = []
            while j < n and text[j] != "'":
                if text[j] == "\\" and j + 1 < n:
                    nxt = text[j + 1]
                    chars.append("'" if nxt == "'" else "\\" + nxt)
                    j += 2
                    continue
                chars.append('\\"' if text[j] == '"' else text[j])
                j += 1
            out.append('"' + "".join(chars) + '"')
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)
