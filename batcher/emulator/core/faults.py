"""Seeded fault injection: the prompt markers, which route a fault targets, the seeded RNGs, and the HTTP faults
(``fail_*`` / ``rate_limit_*``) answered before a route's own response."""

from __future__ import annotations

import random
import threading

from ..billing import PREPAY_DEPLETED
from .config import EmulatorConfig
from .errors import STATUS_NAMES, ApiError

# Prompt markers: a prompt containing one of these gets that outcome, deterministically.
MARKER_IMAGE_SAFETY = "[emulator:image_safety]"
MARKER_PROMPT_BLOCKED = "[emulator:prompt_blocked]"
MARKER_TEXT_ONLY = "[emulator:text_only]"
MARKER_LINE_ERROR = "[emulator:line_error]"
PROMPT_MARKERS = (MARKER_IMAGE_SAFETY, MARKER_PROMPT_BLOCKED, MARKER_TEXT_ONLY, MARKER_LINE_ERROR)

# What an injected failure says, by HTTP status: the real service's words for it.
FAULT_MESSAGES = {402: PREPAY_DEPLETED, 500: "Internal error encountered.", 503: "The service is currently unavailable.",
                  502: "Bad gateway.", 504: "Deadline expired before operation could complete."}


def route_matches(target: str, route_key: str) -> bool:
    """Does a user-given route target match a route key like ``POST /{v}/models/{model}:batchGenerateContent``?

    A target matches when it equals the key, or when its method equals the key's method and the rest is a
    substring of the key's template (so ``"POST batchGenerateContent"`` or ``"GET :download"`` work).
    A target with no method (no space) matches any method. A target whose path starts with ``/`` is a full
    template and must match exactly (``"GET /{v}/files"`` is the list route, not ``/{v}/files/{id}``)."""
    if target == route_key:
        return True
    method, _, template = route_key.partition(" ")
    t_method, _, t_rest = target.rpartition(" ")
    if t_method and t_method.upper() != method:
        return False
    if t_rest.startswith("/"):
        return t_rest == template
    return t_rest in template


class FaultInjector:
    """Seeded decisions. One RNG per concern so that, e.g., HTTP faults do not shift line outcomes."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        with self._lock:
            self._rngs: dict[str, random.Random] = {}
            self._seed = seed

    def chance(self, concern: str, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            rng = self._rngs.get(concern)
            if rng is None:
                rng = self._rngs[concern] = random.Random(f"{self._seed}:{concern}")
            return rng.random() < rate


def http_fault(cfg: EmulatorConfig, injector: FaultInjector, route_key: str, kind: str, n: int) -> tuple[str, ApiError] | None:
    """The fault, if any, to answer instead of the `n`th request (since the last reset) of route `route_key`:
    ``("rate_limit" | "fail", the error)``. The rates apply to JSON routes only (``kind == "json"``), and to
    ``fail_routes`` only when it is set; ``fail_nth`` / ``rate_limit_nth`` apply to any route."""

    def nth(spec: dict[str, list[int]]) -> bool:
        return any(route_matches(t, route_key) and n in ns for t, ns in (spec or {}).items())

    def targeted() -> bool:
        if kind != "json":
            return False
        return not cfg.fail_routes or any(route_matches(t, route_key) for t in cfg.fail_routes)

    if nth(cfg.rate_limit_nth) or (targeted() and injector.chance("rate_limit", cfg.rate_limit_rate)):
        return "rate_limit", ApiError(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": cfg.retry_delay}])
    if nth(cfg.fail_nth) or (targeted() and injector.chance("fail", cfg.fail_rate)):
        code = int(cfg.fail_status)
        return "fail", ApiError(code, STATUS_NAMES.get(code, "UNKNOWN"), FAULT_MESSAGES.get(code, "Injected failure."))
    return None
