"""Emulated time (``Clock``), how the API writes a time (``rfc3339``), and random resource ids (``new_id``)."""

from __future__ import annotations

import secrets
import threading
import time
from datetime import datetime, timezone


def rfc3339(t: float) -> str:
    ns = int(round(t * 1e9))
    secs, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def new_id(n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


class Clock:
    """Emulated time: start + real elapsed * time_scale + advances."""

    def __init__(self, scale: float) -> None:
        self._lock = threading.Lock()
        self._base = time.time()
        self._mono = time.monotonic()
        self._scale = scale

    def now(self) -> float:
        with self._lock:
            return self._base + (time.monotonic() - self._mono) * self._scale

    def set_scale(self, scale: float) -> None:
        with self._lock:
            m = time.monotonic()
            self._base += (m - self._mono) * self._scale
            self._mono, self._scale = m, scale

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._base += seconds
