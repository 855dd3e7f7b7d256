"""Deadlines: each policy does what it says when a job is still unfinished at the deadline."""

from __future__ import annotations

import datetime as dt
import time

import pyarrow.parquet as pq
import pytest

import batcher.pipeline as pipeline
from batcher.jobs.deadline import parse_deadline
from batcher.errors import UsageError
from tests.helpers import write_csv

ROWS = [[f"d{i}", f"deadline prompt {i}"] for i in range(5)]


def run_with_stuck_job(tmp_path, emulator, backend_factory, policy, **kw):
    emulator.configure(job_outcomes=["STUCK"])  # the first job stays PENDING past the deadline
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], ROWS)
    s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                          timeout=kw.pop("timeout", 30), quiet=True, deadline=time.time() + 1.5, deadline_policy=policy, **kw)
    return s, pipeline.run(m, s, backend_factory=backend_factory)


@pytest.mark.slow
def test_report_stops_and_leaves_jobs_running(tmp_path, emulator, backend_factory):
    s, result = run_with_stuck_job(tmp_path, emulator, backend_factory, "report")
    assert result.exit_code == 4, result.summary
    assert "deadline passed" in result.summary
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["batches_cancelled"] == 0
    rows = pq.read_table(s.out / "metadata.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"pending"}


@pytest.mark.slow
def test_resubmit_cancels_stragglers_and_sends_fresh_jobs(tmp_path, emulator, backend_factory):
    s, result = run_with_stuck_job(tmp_path, emulator, backend_factory, "resubmit")
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["batches_cancelled"] == 1 and stats["batches_created"] == 2
    assert stats["generate_content_calls"] == 0


@pytest.mark.slow
def test_interactive_generates_the_unfinished_requests_at_full_price(tmp_path, emulator, backend_factory):
    s, result = run_with_stuck_job(tmp_path, emulator, backend_factory, "interactive")
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["batches_cancelled"] == 1
    assert stats["generate_content_calls"] == 5
    rows = pq.read_table(s.out / "metadata.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    # Full price: twice the batch rate (1120 image tokens at $60/M, undiscounted, and the thoughts at $3/M).
    assert all(1120 * 60 / 1e6 < r["cost_usd"] < (1120 * 60 + 300 * 3 + 100) / 1e6 for r in rows)
    assert all(100 <= r["thoughts_tokens"] < 300 for r in rows)


@pytest.mark.slow
def test_interactive_stays_within_the_budget(tmp_path, emulator, backend_factory):
    s, result = run_with_stuck_job(tmp_path, emulator, backend_factory, "interactive", budget_usd=0.14, timeout=4)
    assert result.exit_code == 4, result.summary
    assert emulator.stats()["generate_content_calls"] == 2  # ~$0.068 each at full price: two fit in $0.14
    rows = pq.read_table(s.out / "metadata.parquet").to_pylist()
    assert sum(r["cost_usd"] or 0 for r in rows) <= 0.14


@pytest.mark.slow
def test_wait_keeps_waiting(tmp_path, emulator, backend_factory):
    s, result = run_with_stuck_job(tmp_path, emulator, backend_factory, "wait", timeout=2.5)
    assert result.exit_code == 4
    stats = emulator.stats()
    assert stats["batches_cancelled"] == 0 and stats["generate_content_calls"] == 0


def test_parse_deadline():
    now = dt.datetime(2026, 11, 22, 23, 30, tzinfo=dt.timezone.utc)
    assert parse_deadline("06:00", now) == dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.timezone.utc).timestamp()
    assert parse_deadline("23:45", now) == dt.datetime(2026, 11, 22, 23, 45, tzinfo=dt.timezone.utc).timestamp()
    assert parse_deadline("7h", now) == now.timestamp() + 7 * 3600
    assert parse_deadline("1h30m", now) == now.timestamp() + 5400
    assert parse_deadline("2026-11-23T06:00:00+00:00", now) == dt.datetime(2026, 11, 23, 6, tzinfo=dt.timezone.utc).timestamp()
    for bad in ("25:00", "tomorrow", "", "7x"):
        with pytest.raises(UsageError, match="--deadline"):
            parse_deadline(bad, now)


def test_a_create_killed_half_way_is_found_before_the_interactive_fallback(tmp_path, emulator, backend_factory):
    """The process died inside create (the job exists at the API, the ledger says `creating`) and the re-run
    starts past the deadline with policy interactive: the job is found by its name and cancelled like any
    straggler, and its requests are generated interactively; none is left queued in a job nobody watches."""
    import sqlite3

    emulator.configure(job_outcomes=["STUCK"])
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], ROWS)
    s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                          timeout=10, quiet=True)
    assert pipeline.submit(m, s, backend_factory=backend_factory).jobs_created == 1
    con = sqlite3.connect(s.workdir / "ledger.sqlite")  # as a kill between the API's answer and the ledger leaves it
    con.execute("UPDATE jobs SET state='creating', batch_name=NULL, api_state=NULL")
    con.commit()
    con.close()
    late = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                             timeout=10, quiet=True, deadline=time.time() - 1, deadline_policy="interactive")
    result = pipeline.run(m, late, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["batches_cancelled"] == 1
    assert stats["generate_content_calls"] == 5
    assert {r["status"] for r in pq.read_table(s.out / "metadata.parquet").to_pylist()} == {"ok"}
