"""Money limits of today's API (api-2026-12.md §3): which 429s wait and which stop a run, and a run that meets a
monthly spend cap or an empty prepay balance stops at once with exit 4, nothing lost, and resumes when run again."""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import batcher.pipeline as pipeline
from tests import helpers
from batcher.backends.errors import limit_error
from batcher.cli import main
from batcher.errors import QuotaError, SpendLimitError
from batcher.planning.planner import ShardLimits
from batcher.jobs.quota import Quota
from tests.helpers import write_csv

# The descriptions Google's 429s and 402 carry (public captures; api-2026-12.md §3).
RATE = "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
SPEND_RATE = "You exceeded your spend-based rate limit. Your spending rate has exceeded the allowed limit for your account's billing history and tier."
TIER_CAP = "Your billing account has exceeded its monthly spending cap. Please go to AI Studio at https://ai.studio/billing to manage your billing."
PROJECT_CAP = "Your project has exceeded its monthly spending cap. Please go to AI Studio at https://ai.studio/spend"
PREPAY = "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage your project and billing."
ENQUEUED = "You exceeded your current quota: batch enqueued tokens for model gemini-3.1-flash-image (2000 enqueued + 1400 requested > 3000)."


@pytest.mark.parametrize("code, message, kind, cause", [
    (429, RATE, QuotaError, "rate"),
    (429, SPEND_RATE, QuotaError, "spend_rate"),
    (429, ENQUEUED, QuotaError, "capacity"),
    (429, TIER_CAP, SpendLimitError, "spend_cap"),
    (429, PROJECT_CAP, SpendLimitError, "spend_cap"),
    (402, PREPAY, SpendLimitError, "prepay"),
    (429, PREPAY, SpendLimitError, "prepay"),  # what the API answered before mid-2026
])
def test_each_limit_is_told_by_its_description(code, message, kind, cause):
    details = {"error": {"code": code, "message": message, "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "42s"}]}}
    err = limit_error(f"create job j: HTTP {code} RESOURCE_EXHAUSTED: {message}", code, "RESOURCE_EXHAUSTED", message, details)
    assert type(err) is kind
    if kind is QuotaError:
        assert err.cause == cause and err.retry_after == 42.0 and err.exit_code == 1
    else:
        assert err.limit == cause and err.exit_code == 4
        assert "nothing is lost: run the same command again" in str(err) and "AI Studio" in str(err)


def settings(tmp_path, **kw) -> pipeline.Settings:
    # One job of two requests in flight at a time (a request: ~1,410 tokens with thoughts): the next waits for it.
    kw.setdefault("quota", Quota(token_cap=2 * 1450))
    kw.setdefault("limits", ShardLimits(max_requests=2))
    return helpers.settings(tmp_path, **kw)


def manifest(tmp_path):
    return write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"a chair, design {i}"] for i in range(6)])


@pytest.mark.parametrize("limit, words", [
    ({"project_spend_cap_usd": 0.05}, "Your project has exceeded its monthly spending cap"),
    ({"prepay_balance_usd": 0.05}, "Your prepayment credits are depleted"),
    ({"monthly_spend_cap_usd": 0.05}, "Your billing account has exceeded its monthly spending cap"),
])
@pytest.mark.slow
def test_a_run_that_meets_a_spend_limit_stops_at_once_and_resumes_later(tmp_path, emulator, backend_factory, limit, words):
    emulator.configure(**limit)  # the first job ($0.068) takes the account past it
    s = settings(tmp_path)
    started = time.monotonic()
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert time.monotonic() - started < 10
    assert result.exit_code == 4, result.summary
    assert result.summary.startswith("stopped at a spend limit: ") and words in result.summary
    assert "nothing is lost: run the same command again" in result.summary
    # The first job's images are kept; the rest wait in jobs not yet created (or not yet sharded).
    assert result.counts["succeeded"] == 2 and result.counts["planned"] + result.counts["queued"] == 4
    assert emulator.stats()["batches_created"] == 1
    assert {r["status"] for r in pq.read_table(s.out / "metadata.parquet").to_pylist()} == {"ok", "pending"}
    emulator.configure(project_spend_cap_usd=None, prepay_balance_usd=None, monthly_spend_cap_usd=None)  # raised
    again = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert again.exit_code == 0, again.summary
    assert emulator.stats()["lines_processed"] == 6  # nothing generated twice


@pytest.mark.slow
def test_the_command_line_exits_4_naming_the_cap(tmp_path, emulator_env):
    emulator_env.configure(project_spend_cap_usd=0.05)
    args = ["run", str(manifest(tmp_path)), "--workdir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
            "--max-requests-per-job", "2", "--token-cap", "2900", "--poll-interval", "0.05", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 4, r.output
    assert "Your project has exceeded its monthly spending cap" in r.output and "AI Studio" in r.output
    submit = CliRunner().invoke(main, ["submit", str(manifest(tmp_path)), "--workdir", str(tmp_path / "w2"), "-q"])
    assert submit.exit_code == 4 and "stopped at a spend limit" in submit.output  # submit too: nothing created


@pytest.mark.slow
def test_a_spend_rate_limit_waits_and_the_run_finishes(tmp_path, emulator, backend_factory):
    # $0.05 in any 10 minutes; 10 emulated minutes pass in 3 s here.
    emulator.configure(spend_rate_usd_per_10min=0.05, time_scale=200.0)
    result = pipeline.run(manifest(tmp_path), settings(tmp_path), backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["batches_created"] == 3 and stats["http_errors"] >= 1  # refused (429) then created once the window moved
    # Each refusal's RetryInfo (~3 s here) was honoured: a few creates, not one every 0.05 s poll.
    assert stats["requests"]["POST /{v}/models/{model}:batchGenerateContent"] <= 3 + 2 * stats["http_errors"] <= 9


@pytest.mark.slow
def test_the_interactive_fallback_stops_at_a_spend_limit(tmp_path, emulator, backend_factory):
    """Past the deadline the stragglers go interactive; a 402 there stops the run (exit 4), spending no attempt."""
    emulator.configure(job_outcomes=["STUCK"])

    def deplete_once_the_job_exists():
        for _ in range(400):
            if emulator.stats()["batches_created"]:
                emulator.configure(prepay_balance_usd=0.0)
                return
            time.sleep(0.01)

    threading.Thread(target=deplete_once_the_job_exists, daemon=True).start()
    s = settings(tmp_path, deadline=time.time() + 1.5, deadline_policy="interactive", limits=ShardLimits(), quota=Quota())
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 4, result.summary
    assert "Your prepayment credits are depleted" in result.summary
    assert emulator.stats()["generate_content_calls"] == 0
    with pipeline.open_workspace(s) as ws:
        found = set(ws.ledger.conn.execute("SELECT state, attempts FROM requests").fetchall())
    assert {tuple(r) for r in found} == {("planned", 1)}  # the cancelled job's attempt only: a money limit is no failure


def test_jobs_created_before_a_spend_limit_are_in_the_summary(tmp_path, emulator, backend_factory):
    # The prepay balance runs out between the second and third create of one round (spent elsewhere meanwhile).
    emulator.configure(fail_nth={"POST /{v}/models/{model}:batchGenerateContent": [3]}, fail_status=402, job_outcomes=["STUCK"] * 3)
    result = pipeline.submit(manifest(tmp_path), settings(tmp_path, quota=Quota()), backend_factory=backend_factory)
    assert result.exit_code == 4, result.summary
    assert emulator.stats()["batches_created"] == 2
    assert result.jobs_created == 2 and "2 job(s) created" in result.summary, result.summary


@pytest.mark.slow
def test_uploads_wait_while_the_api_asks_creates_to_wait(tmp_path, emulator, backend_factory):
    """A rate 429 on create with a RetryInfo: nothing more is uploaded until the hint has passed."""
    emulator.configure(rate_limit_nth={"POST /{v}/models/{model}:batchGenerateContent": [1]}, retry_delay="30s")
    s = settings(tmp_path, quota=Quota(), limits=ShardLimits(max_requests=1), timeout=1.0)
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 4 and "0 job(s) created" in result.summary, result.summary  # timed out waiting
    stats = emulator.stats()
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 0, stats["requests"]
