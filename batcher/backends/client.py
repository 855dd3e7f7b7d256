"""One client and retry set-up for every backend: the google-genai clients (a timeout always; the SDK's own retries
for transient HTTP codes, never for create), and `call`, which maps errors into batcher's and retries them with
batcher's policy (RetryInfo hints honoured)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import ApiError
from .errors import TRANSIENT_CODES, is_transport_error, map_error
from .retry import RetryPolicy

T = TypeVar("T")


class _LazyModule:
    """A module imported on first attribute access. The SDK takes ~0.4 s and ~40 MB to import: commands that only
    read jobs and download results (plain HTTP) start without waiting for it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


if TYPE_CHECKING:
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types
else:
    genai = _LazyModule("google.genai")
    genai_errors = _LazyModule("google.genai.errors")
    types = _LazyModule("google.genai.types")


def http_options(*, api_version: str, timeout_s: float, base_url: str | None = None, retries: bool = True) -> "types.HttpOptions":
    """The SDK's HTTP options: `retries` of transient HTTP codes (408, 5xx: 429 is ours to handle, with its RetryInfo
    and its cause), or none at all (create: a 5xx or a timeout can come after the job was made, and a retry would
    make a second one; the caller reconciles by display name instead)."""
    retry = (types.HttpRetryOptions(attempts=4, initial_delay=1.0, max_delay=30.0, http_status_codes=sorted(TRANSIENT_CODES))
             if retries else types.HttpRetryOptions(attempts=1))
    options = types.HttpOptions(api_version=api_version, timeout=int(timeout_s * 1000), retry_options=retry)
    if base_url:
        options.base_url = base_url.rstrip("/") + "/"
    return options


def genai_client(options: "types.HttpOptions", **kwargs) -> "genai.Client":
    """A google-genai client (kwargs: api_key, or vertexai/project/location/credentials). Kept for as long as its
    backend lives: a client that is garbage-collected closes its transport."""
    return genai.Client(http_options=options, **kwargs)


def call(policy: RetryPolicy, what: str, fn: Callable[[], T], also: Callable[[Exception, str], Exception] | None = None) -> T:
    """Run `fn` (an SDK call), with SDK and transport errors mapped into batcher's (`also`: a backend's own mapping
    for other libraries, such as Cloud Storage's) and retried under `policy`."""
    def once() -> T:
        try:
            return fn()
        except ApiError:
            raise
        except Exception as exc:
            if isinstance(exc, genai_errors.APIError) or is_transport_error(exc):
                raise map_error(exc, what) from None
            mapped = also(exc, what) if also else exc
            if mapped is exc:
                raise
            raise mapped from None

    return policy.call(what, once)


def generate_content(client: "genai.Client", policy: RetryPolicy, model: str, body: dict) -> dict:
    """One interactive call with a stored request body; the response as a dict in the API's camelCase shape, image
    bytes kept as bytes (the JSON mode would re-encode them as URL-safe base64)."""
    config = dict(body.get("generationConfig", {}))
    if "systemInstruction" in body:
        config["systemInstruction"] = body["systemInstruction"]
    model = model.removeprefix("models/")
    resp = call(policy, f"generateContent {model}",
                lambda: client.models.generate_content(model=model, contents=body["contents"], config=config))
    out = resp.model_dump(mode="python", by_alias=True, exclude_none=True)
    out.pop("sdkHttpResponse", None)
    return out
