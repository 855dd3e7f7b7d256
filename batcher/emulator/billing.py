"""The account's money, as the service keeps it: what each answer bills, the monthly spend caps, the spend-based
rate limit, and a prepay balance (api-2026-12.md §3; numbers from batcher/catalog.toml's tiers).

Spend is billed as batch lines and interactive calls are answered, at the emulated time. Before a job is created or
a call answered, the account must be under its caps: a depleted prepay balance answers 402 (429 on the service
before mid-2026), a project or billing-account monthly cap 429 until the month turns or the cap is raised, the
spend-based rate limit 429 with a RetryInfo delay until the last 10 minutes' spend falls under it. The real
service enforces a project cap about 10 minutes late; here every limit holds at once.

One account per emulated project (core/project.py holds it), whichever service bills it: it lives beside the
services (batcher/emulator/), not in the service-agnostic core.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import threading
from typing import Any, Callable

from batcher import catalog as facts

from .core.errors import ApiError

WINDOW_S = 600.0  # the spend-based rate limit looks at the last 10 minutes
HELP = {"@type": "type.googleapis.com/google.rpc.Help",
        "links": [{"description": "Learn more about Gemini API rate limits", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}
PREPAY_DEPLETED = ("Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage "
                   "your project and billing. Learn more at https://ai.google.dev/gemini-api/docs/billing#prepay.")


def _month(t: float) -> tuple[int, int]:
    d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return d.year, d.month


class Billing:
    def __init__(self, config: Callable[[], Any], now: Callable[[], float]) -> None:
        self._config, self._now = config, now
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (time, usd) in the window
            self._month = _month(self._now())
            self._month_usd = 0.0  # billed by this emulator this month (the config adds what came before)
            self.total_usd = 0.0

    def charge(self, usd: float) -> None:
        if usd <= 0:
            return
        now = self._now()
        with self._lock:
            self._roll(now)
            self._recent.append((now, usd))
            self._month_usd += usd
            self.total_usd += usd

    def _roll(self, now: float) -> None:
        if _month(now) != self._month:  # a new month: the caps start again (and the pre-start spend is last month's)
            self._month, self._month_usd = _month(now), 0.0
            self._config().spent_this_month_usd = 0.0
        while self._recent and self._recent[0][0] <= now - WINDOW_S:
            self._recent.popleft()

    def stats(self) -> dict[str, float]:
        cfg = self._config()
        with self._lock:
            self._roll(self._now())
            return {"spend_usd_total": round(self.total_usd, 6), "spend_usd_this_month": round(self._month_usd + cfg.spent_this_month_usd, 6),
                    "spend_usd_last_10_min": round(sum(u for _, u in self._recent), 6)}

    def check(self) -> None:
        """Raise the API's error if the account may not spend now."""
        cfg = self._config()
        if not cfg.spend_limits:
            return
        tier = facts.TIERS.get(str(cfg.tier))
        now = self._now()
        with self._lock:
            self._roll(now)
            month = self._month_usd + cfg.spent_this_month_usd
            recent = sum(u for _, u in self._recent)
            if cfg.prepay_balance_usd is not None and self.total_usd >= cfg.prepay_balance_usd:
                raise ApiError(cfg.prepay_status, "RESOURCE_EXHAUSTED", PREPAY_DEPLETED)
            # The project cap counts this project's spend (this emulator's); the account's cap, everything billed.
            if cfg.project_spend_cap_usd is not None and self._month_usd >= cfg.project_spend_cap_usd:
                raise ApiError(429, "RESOURCE_EXHAUSTED",
                               "Your project has exceeded its monthly spending cap. Please go to AI Studio at https://ai.studio/spend "
                               "to manage your project's spend cap.", [HELP])
            cap = cfg.monthly_spend_cap_usd if cfg.monthly_spend_cap_usd is not None else (tier.monthly_spend_cap_usd if tier else None)
            if cap is not None and month >= cap:
                raise ApiError(429, "RESOURCE_EXHAUSTED",
                               "Your billing account has exceeded its monthly spending cap. Please go to AI Studio at "
                               "https://ai.studio/billing to manage your billing. Learn more at "
                               "https://ai.google.dev/gemini-api/docs/billing#tier-spend-caps.", [HELP])
            rate = cfg.spend_rate_usd_per_10min if cfg.spend_rate_usd_per_10min is not None else (
                tier.spend_rate_usd_per_10min if tier else None)
            if rate is not None and recent >= rate:
                # Free once enough of the window's oldest spend has aged out of it.
                left, wait = recent, 1.0
                for t, usd in self._recent:
                    left -= usd
                    wait = t + WINDOW_S - now
                    if left < rate:
                        break
                if cfg.time_scale > 0:  # the client waits in real seconds: emulated time may run faster
                    wait /= cfg.time_scale
                raise ApiError(429, "RESOURCE_EXHAUSTED",
                               "You exceeded your spend-based rate limit. Your spending rate has exceeded the allowed limit "
                               "for your account's billing history and tier.",
                               [HELP, {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{max(1, math.ceil(wait))}s"}])
