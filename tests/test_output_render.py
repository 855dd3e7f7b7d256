"""output.render: the status table in 80 columns (and --wide), the progress line, names cut to fit."""

from __future__ import annotations

import pytest

from batcher.output.live import RunProgress
from batcher.output.render import duration, elide, progress_line, status_table

LONG = "batcher-6580e70a182f-job00001-a-name-someone-made-far-too-long-for-any-terminal"


def job(name: str, state: str, api_state: str | None = None, *, outcome: str | None = None, n: int = 2000,
        succeeded: int = 0, failed: int = 0, window: float | None = None, warnings=()) -> dict:
    collected = state == "collected"
    return {"display_name": name, "name": f"batches/{name}", "state": state, "api_state": api_state, "outcome": outcome,
            "collected": collected, "ok": succeeded if collected else None, "blocked": 0 if collected else None,
            "request_count": n, "succeeded": succeeded, "failed": failed, "pending": n - succeeded - failed,
            "age_hours": 1.5, "window_hours_left": window, "expiry_hours_left": None if window is None else window + 24,
            "warnings": list(warnings)}


def document(jobs: list[dict]) -> dict:
    return {"jobs": jobs, "images": {"ok": 123_456, "blocked": 12, "failed": 3, "pending": 1_000_000},
            "requests": {"succeeded": 123_456, "blocked": 12, "failed": 3, "queued": 1_000_000, "planned": 20_000},
            "cache_hits": 4_321, "cost_usd": 1234.5,
            "capacity": {"gemini-3.1-flash-image-and-a-long-model-name": {
                "token_cap": 1_000_000, "in_flight_tokens": 987_654, "jobs_waiting": 12, "waiting_tokens": 123_456_789,
                "requests_not_in_jobs": 20_000}}}


EVERY_STATE = [
    job("batcher-6580e70a182f-job00001", "planned"),
    job("batcher-6580e70a182f-job00002", "uploading"),
    job("batcher-6580e70a182f-job00003", "uploaded"),
    job("batcher-6580e70a182f-job00004", "creating"),
    job("batcher-6580e70a182f-job00005", "submitted", "PENDING", window=23.9),
    job(LONG, "submitted", "RUNNING", succeeded=1_234, failed=56, window=-1.5,
        warnings=["past its 24 h target window", "expires in under 6 h: results will be lost"]),
    job("batcher-6580e70a182f-job00007", "succeeded", "SUCCEEDED", succeeded=2000),
    job("batcher-6580e70a182f-job00008", "failed", "FAILED"),
    job("batcher-6580e70a182f-job00009", "expired", "EXPIRED"),
    job("batcher-6580e70a182f-job00010", "cancelled", "CANCELLED", succeeded=10),
    job("batcher-6580e70a182f-job00011", "collected", "SUCCEEDED", outcome="succeeded", succeeded=1990, failed=10),
    job("batcher-6580e70a182f-job00012", "collected", "CANCELLED", outcome="cancelled"),
]


@pytest.mark.parametrize("width", [80, 100, 72])
def test_status_fits_the_width_with_long_names_and_every_state(width):
    table = status_table(document(EVERY_STATE), width=width)
    lines = table.splitlines()
    assert max(len(x) for x in lines) <= width, "\n".join(x for x in lines if len(x) > width)
    assert lines[0].split() == ["JOB", "STATE", "DONE", "FAILED", "WINDOW", "LEFT"]
    for state in ("planned", "uploading", "uploaded", "creating", "pending", "running", "succeeded", "failed",
                  "expired", "cancelled", "succeeded, collected", "cancelled, collected"):
        assert any(f"  {state}  " in x for x in lines[1:13]), state
    row = next(x for x in lines if "running" in x)
    assert "1,290/2,000" in row and "56" in row and "-1.5h" in row  # done of total, failed, window left
    assert row.startswith("batch") and "…" in row and LONG not in row  # the long name cut in the middle
    assert any(x.startswith("warning: ") and "past its 24 h target window" in x for x in lines)
    text = " ".join(x.strip() for x in lines)  # wrapped at words, never inside one
    assert "$1,234.50 spent" in text and "20000 request(s) not in a job yet" in text
    assert "images: 123,456 ok, 12 blocked, 3 failed, 1,000,000 pending" in text


def test_status_width_comes_from_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert max(len(x) for x in status_table(document(EVERY_STATE)).splitlines()) <= 80
    monkeypatch.setenv("COLUMNS", "200")
    assert LONG in status_table(document(EVERY_STATE))  # room for the whole name: not cut


def test_wide_status_shows_every_column_whatever_the_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lines = status_table(document(EVERY_STATE), wide=True).splitlines()
    assert lines[0].split() == ["JOB", "STATE", "DONE", "OK", "BLOCKED", "FAILED", "PENDING", "AGE", "WINDOW",
                                "LEFT", "EXPIRES", "IN", "WARNINGS"]
    row = next(x for x in lines if x.startswith(LONG))
    assert "submitted (RUNNING)" in row and "past its 24 h target window; expires in under 6 h" in row
    assert max(len(x) for x in lines) > 80  # today's full table: as long as it needs


def test_elide_keeps_both_ends():
    assert elide("short", 10) == "short"
    cut = elide("batcher-6580e70a182f-job00001", 16)
    assert len(cut) == 16 and cut.startswith("batch") and cut.endswith("-job00001") and "…" in cut


def test_duration():
    assert [duration(s) for s in (0, 59, 60, 250, 3600, 7500, 90000)] == [
        "0s", "59s", "1m00s", "4m10s", "1h00m", "2h05m", "1d01h"]


def test_progress_line_fits_and_leaves_out_the_least_needed_first():
    p = RunProgress(succeeded=1_234_567, failed=8_901, pending=2_345_678, jobs=3,
                    states=[("running", 2, 250.0), ("pending", 1, 30.0)], eta_seconds=7500)
    line = progress_line(p, 120)
    assert "1,234,567 succeeded, 8,901 failed, 2,345,678 pending; ETA 2h05m; 2 running 4m10s, 1 pending 30s" in line
    assert line.startswith(" 35% |#")
    narrow = progress_line(p, 79)
    assert len(narrow) <= 79 and "ETA 2h05m" in narrow and "running" not in narrow  # job states left out whole
    assert len(progress_line(p, 50)) <= 50
    assert "ETA -" in progress_line(RunProgress(pending=10), 80) and "  -%" in progress_line(RunProgress(), 80)
