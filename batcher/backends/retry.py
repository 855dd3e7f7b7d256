"""Retrying calls to the API: exponential backoff with full jitter, capped, honouring RetryInfo delays."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ..errors import QuotaError, TransientApiError

T = TypeVar("T")
log = logging.getLogger("batcher.backends.retry")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    initial_delay: float = 1.0
    max_delay: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay * 5)
        return random.uniform(0, min(self.max_delay, self.initial_delay * 2**attempt))

    def call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except (TransientApiError, QuotaError) as exc:
                if attempt + 1 >= self.attempts:
                    raise
                wait = self.delay(attempt, getattr(exc, "retry_after", None))
                # The error names what failed already ("upload x.png: ..."), unless it is another library's own.
                shown = str(exc) if str(exc).startswith(what) else f"{what}: {exc}"
                log.warning("%s; retrying in %.1fs (attempt %d of %d)", shown, wait, attempt + 2, self.attempts)
                self.sleep(wait)
        raise AssertionError("unreachable")
