"""The nightly deadline, and what happens to requests still unfinished when it passes.

    --deadline 06:00        the next 06:00, local time
    --deadline 7h           7 hours from now (also 90m, 45s, 1h30m)
    --deadline 2026-11-23T06:00:00+01:00

Policies:
    wait         keep waiting (the default): the deadline only warns
    report       stop, write the dataset, exit 4; jobs keep running for a later `collect`
    resubmit     cancel unfinished jobs and send their unfinished requests in fresh jobs
    interactive  cancel unfinished jobs, then generate their requests with interactive calls at full price
"""

from __future__ import annotations

import datetime as dt
import re

from ..errors import UsageError

POLICIES = ("wait", "report", "resubmit", "interactive")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_deadline(text: str, now: dt.datetime | None = None) -> float:
    """Epoch seconds of the deadline described by `text` (see the module docstring)."""
    now = now or dt.datetime.now().astimezone()
    value = text.strip()
    if re.fullmatch(r"\d{1,2}:\d{2}", value):
        hour, minute = map(int, value.split(":"))
        if hour > 23 or minute > 59:
            raise UsageError(f"--deadline {text!r}: not a time of day; use HH:MM, e.g. 06:00")
        target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if target <= now:
            target += dt.timedelta(days=1)
        return target.timestamp()
    m = _DURATION.match(value)
    if value and m and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        return now.timestamp() + h * 3600 + mi * 60 + s
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--deadline {text!r}: use a time of day (06:00), a duration (7h, 90m) or an ISO date-time") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as a cron user means it
    return when.timestamp()


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise UsageError(f"--deadline-policy {policy!r}: use one of {', '.join(POLICIES)}")
    return policy
