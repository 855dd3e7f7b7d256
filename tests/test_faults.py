"""Fault matrix through the real pipeline: the real SDK against the emulator, one fault per test.

Each test injects one kind of fault the service can produce (corrupt results files, odd wire formats, error
storms, expired inputs, jobs cancelled by someone else) and checks that the run completes: affected requests
are failed with a reason and sent again in a later job, the others are kept, and no job is created twice.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

import batcher.pipeline as pipeline
from batcher.planning.planner import ShardLimits
from tests.helpers import settings, write_csv

HEADER = ["id", "prompt", "category"]
ROWS = [[f"f{i}", f"fault matrix prompt number {i}", "x"] for i in range(8)]


def manifest(tmp_path, rows=ROWS):
    return write_csv(tmp_path / "m.csv", HEADER, rows)


def metadata(s):
    return pq.read_table(s.out / "metadata.parquet").to_pylist()


def ledger_jobs(s, backend_factory) -> list[dict]:
    with pipeline.open_workspace(s, backend_factory) as ws:
        cur = ws.ledger.conn.execute("SELECT * FROM jobs ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def assert_no_duplicate_jobs(emulator, s, backend_factory):
    recorded = [j for j in ledger_jobs(s, backend_factory) if j["batch_name"]]
    assert emulator.stats()["batches_created"] == len(recorded)
    assert len({j["batch_name"] for j in recorded}) == len(recorded)


def run_and_check_ok(tmp_path, emulator, backend_factory, **kw):
    s = settings(tmp_path, **kw)
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    rows = metadata(s)
    assert len(rows) == len(ROWS) and {r["status"] for r in rows} == {"ok"}
    assert_no_duplicate_jobs(emulator, s, backend_factory)
    return s, rows


# ---- results-file corruption --------------------------------------------------------------------

class _Spy:
    """Record every (reason) a queued request was failed with, by wrapping the ledger's transition in-process."""

    def __init__(self, monkeypatch):
        from batcher.ledger import outcomes

        self.reasons: list[str] = []
        real = outcomes.requeue_or_fail

        def spy(c, h, attempts, max_attempts, reason, finish, now):
            self.reasons.append(reason)
            return real(c, h, attempts, max_attempts, reason, finish, now)

        monkeypatch.setattr(outcomes, "requeue_or_fail", spy)


@pytest.mark.slow
def test_truncated_results_file_missing_keys_are_retried(tmp_path, emulator, backend_factory, monkeypatch):
    spy = _Spy(monkeypatch)
    emulator.configure(truncate_results_lines=3, truncate_results_times=1)
    s, rows = run_and_check_ok(tmp_path, emulator, backend_factory)
    assert emulator.stats()["faults"].get("truncate_results") == 1
    assert spy.reasons.count("missing from the job's results") == 3
    assert emulator.stats()["batches_created"] == 2
    attempts = sorted(r["attempts"] for r in rows)
    assert attempts == [1] * 5 + [2] * 3  # the 5 kept lines were not sent again


@pytest.mark.slow
def test_corrupt_base64_lines_are_retried_and_the_rest_kept(tmp_path, emulator, backend_factory, monkeypatch):
    spy = _Spy(monkeypatch)
    emulator.configure(corrupt_base64_rate=0.4, seed=11)
    s, rows = run_and_check_ok(tmp_path, emulator, backend_factory, max_attempts=10)
    injected = emulator.stats()["faults"].get("corrupt_base64", 0)
    assert injected >= 1
    assert len(spy.reasons) == injected and all("corrupt base64" in r for r in spy.reasons)
    assert emulator.stats()["batches_created"] >= 2
    assert sum(r["attempts"] for r in rows) == len(ROWS) + injected  # only the damaged ones were sent again


@pytest.mark.slow
def test_payload_that_is_not_an_image_is_retried(tmp_path, emulator, backend_factory, monkeypatch):
    spy = _Spy(monkeypatch)
    emulator.configure(not_image_rate=0.4, seed=5)
    s, rows = run_and_check_ok(tmp_path, emulator, backend_factory, max_attempts=10)
    injected = emulator.stats()["faults"].get("not_image", 0)
    assert injected >= 1
    assert len(spy.reasons) == injected and all("returned image is invalid" in r for r in spy.reasons)
    assert sum(r["attempts"] for r in rows) == len(ROWS) + injected
    for r in rows:  # nothing invalid reached the cache or the dataset
        assert (s.out / r["file_name"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_corruption_exhausting_attempts_is_failed_with_the_reason(tmp_path, emulator, backend_factory):
    emulator.configure(corrupt_base64_rate=1.0)
    s = settings(tmp_path, max_attempts=2)
    result = pipeline.run(manifest(tmp_path, ROWS[:2]), s, backend_factory=backend_factory)
    assert result.exit_code == 3, result.summary
    rows = metadata(s)
    assert {r["status"] for r in rows} == {"failed"}
    assert all("corrupt base64" in r["error"] and "after 2 attempts" in r["error"] for r in rows)
    assert emulator.stats()["batches_created"] == 2


# ---- wire-format variants -----------------------------------------------------------------------

@pytest.mark.slow
def test_job_state_style_end_to_end(tmp_path, emulator, backend_factory):
    emulator.configure(state_style="JOB_STATE")
    run_and_check_ok(tmp_path, emulator, backend_factory)
    assert emulator.stats()["batches_created"] == 1


@pytest.mark.slow
def test_finalize_error_for_jsonl_mime_falls_back(tmp_path, emulator, backend_factory):
    emulator.configure(finalize_error_mime_types=["jsonl"])
    run_and_check_ok(tmp_path, emulator, backend_factory)
    stats = emulator.stats()
    assert stats["faults"].get("finalize_error", 0) >= 1
    assert stats["batches_created"] == 1


def test_finalize_error_for_every_mime_is_a_clear_api_error(tmp_path, emulator, backend_factory):
    from batcher.backends.gemini import JSONL_MIME_TYPES
    from batcher.errors import ApiError

    emulator.configure(finalize_error_mime_types=list(JSONL_MIME_TYPES))
    s = settings(tmp_path)
    with pytest.raises(ApiError, match="every JSONL MIME type"):
        pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert emulator.stats()["batches_created"] == 0


@pytest.mark.slow
def test_omitted_optional_fields_end_to_end(tmp_path, emulator, backend_factory):
    emulator.configure(omit_optional_fields=True)
    run_and_check_ok(tmp_path, emulator, backend_factory, limits=ShardLimits(max_requests=3))
    assert emulator.stats()["batches_created"] == 3


# ---- error storms -------------------------------------------------------------------------------

@pytest.mark.slow
def test_429_storm_and_30_percent_5xx_create_no_duplicate_jobs(tmp_path, emulator, backend_factory):
    emulator.configure(rate_limit_rate=0.4, retry_delay="0.01s", fail_rate=0.3, fail_status=503, seed=21)
    s, _ = run_and_check_ok(tmp_path, emulator, backend_factory, limits=ShardLimits(max_requests=2))
    stats = emulator.stats()
    assert stats["faults"].get("rate_limit", 0) >= 3 and stats["faults"].get("fail", 0) >= 3
    assert stats["batches_created"] == 4


@pytest.mark.slow
def test_500_at_30_percent_creates_no_duplicate_jobs(tmp_path, emulator, backend_factory):
    # Upload routes excluded: the SDK's own retry there sleeps whole seconds (covered by the 503 storm above).
    emulator.configure(fail_rate=0.3, fail_status=500, seed=8,
                       fail_routes=["GET /{v}/batches/{id}", "POST batchGenerateContent", "GET :download", "DELETE"])
    run_and_check_ok(tmp_path, emulator, backend_factory, limits=ShardLimits(max_requests=3))
    assert emulator.stats()["faults"].get("fail", 0) >= 1


# ---- job lifecycle faults -----------------------------------------------------------------------

@pytest.mark.slow
def test_input_file_expired_before_create_is_uploaded_again(tmp_path, emulator, backend_factory):
    from batcher.jobs import lifecycle as jobs_mod

    s = settings(tmp_path)
    m = manifest(tmp_path)
    with pipeline.open_workspace(s, backend_factory) as ws:
        (job_id,) = pipeline.plan(ws, m).jobs  # a plan into an empty workdir shards as it loads
        jobs_mod.upload_job(ws.ledger, ws.backend, job_id, {})
        assert ws.ledger.job(job_id)["state"] == "uploaded"
    assert emulator.stats()["files_uploaded"] == 1
    emulator.advance(49 * 3600)  # the uploaded JSONL expires (48 h TTL) before the job is created
    result = pipeline.run(m, s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["files_uploaded"] == 2  # uploaded again
    assert stats["batches_created"] == 1
    assert {r["status"] for r in metadata(s)} == {"ok"}
    assert_no_duplicate_jobs(emulator, s, backend_factory)


@pytest.mark.slow
def test_job_cancelled_outside_batcher_is_requeued(tmp_path, emulator, backend_factory):
    emulator.configure(job_outcomes=["STUCK"])  # the first job never finishes on its own
    cancelled: list[str] = []

    def canceller():
        ops: list = []
        for _ in range(500):
            with urllib.request.urlopen(f"{emulator.url}/v1beta/batches?pageSize=10&key=k") as r:
                ops = json.loads(r.read()).get("operations") or []
            if ops:
                break
            time.sleep(0.02)
        time.sleep(0.2)  # let the run poll it a few times
        name = ops[0]["name"]
        post = urllib.request.Request(f"{emulator.url}/v1beta/{name}:cancel?key=k", data=b"{}", method="POST",
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post) as r:  # raw HTTP, as another tool (or a person in AI Studio) would
            r.read()
        cancelled.append(name)

    t = threading.Thread(target=canceller, daemon=True)
    t.start()
    s, rows = run_and_check_ok(tmp_path, emulator, backend_factory)
    t.join(5)
    assert cancelled, "the canceller never found the job"
    stats = emulator.stats()
    assert stats["batches_cancelled"] == 1 and stats["batches_created"] == 2
    assert {r["attempts"] for r in rows} == {2}
    jobs = ledger_jobs(s, backend_factory)
    assert jobs[0]["batch_name"] == cancelled[0]
