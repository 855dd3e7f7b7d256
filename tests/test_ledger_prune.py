"""`batcher prune`: the ledger kept bounded (ledger.housekeeping, pipeline.prune), the real SDK against the emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import batcher
import batcher.pipeline as pipeline
from batcher.cli import main
from batcher.errors import LedgerError, UsageError
from batcher.ledger import Ledger, housekeeping, reading
from batcher.ledger.plans import PlanTuning
from batcher.manifest import ManifestOptions
from batcher.planning.planner import plan_manifest
from tests.helpers import settings, write_csv

HEADER = ["id", "prompt"]
NIGHT_1 = [["a", "a red fox in snow"], ["b", "a blue vintage car"], ["c", "a glass teapot"]]
NIGHT_2 = [["a", "a red fox in snow"], ["d", "a lighthouse in a storm"]]
NIGHT_3 = [["a", "a red fox in snow"], ["e", "a kite over the sea"]]


def tonight(tmp_path: Path, rows: list[list[str]]) -> Path:
    """The nightly manifest: one file, a new version of it each night (a new run in the same workdir)."""
    return write_csv(tmp_path / "nightly.csv", HEADER, rows)


def dump(workdir: Path) -> list[str]:
    ledger = Ledger(workdir)
    try:
        return list(ledger.conn.iterdump())
    finally:
        ledger.close()


def held(workdir: Path) -> dict:
    """What the ledger holds: its table counts, the ids of the rows of each run, the requests' prompts, the jobs."""
    ledger = Ledger(workdir)
    c = ledger.conn
    try:
        return {
            "counts": housekeeping.table_counts(ledger),
            "runs": {run: sorted(i for (i,) in c.execute("SELECT id FROM rows WHERE run_id=?", (run,)))
                     for (run,) in c.execute("SELECT id FROM runs")},
            "prompts": sorted(json.loads(b)["contents"][0]["parts"][0]["text"] for (b,) in c.execute("SELECT body_json FROM requests")),
            "jobs": sorted(n for (n,) in c.execute("SELECT display_name FROM jobs")),
        }
    finally:
        ledger.close()


def three_nights(tmp_path: Path, backend_factory) -> pipeline.Settings:
    s = settings(tmp_path)
    for rows in (NIGHT_1, NIGHT_2, NIGHT_3):
        out = pipeline.run(tonight(tmp_path, rows), s, backend_factory=backend_factory)
        assert out.exit_code == 0, out.summary
    return s


def test_prune_keeps_the_newest_runs_and_drops_what_only_older_runs_used(tmp_path, emulator, backend_factory):
    """Three nights, one job each ({a,b,c}, {d}, {e}). Keeping 1 run: runs 1 and 2 and their rows go, and the
    requests only they used (b, c, d); the first night's job stays (its request `a` is tonight's too, and tonight's
    dataset names that job), the second's goes with its JSONL file. A dry run says so and changes nothing."""
    s = three_nights(tmp_path, backend_factory)
    before = held(s.workdir)
    assert before["counts"] == {"runs": 3, "rows": 7, "requests": 5, "jobs": 3}
    first_job, second_job, third_job = before["jobs"]
    dataset_before = pq.read_table(s.out / "metadata.parquet").to_pylist()
    ledger_dump = dump(s.workdir)

    dry = batcher.prune(s, keep_runs=1, dry_run=True)
    assert dry.dry_run and dry.bytes_after is None
    assert dry.dropped == {"runs": 2, "rows": 5, "requests": 3, "jobs": 1, "job_files": 0}, dry.summary
    assert "would drop 2 runs (5 rows), 3 requests" in dry.summary
    assert dump(s.workdir) == ledger_dump  # nothing changed
    assert (s.workdir / "jobs" / f"{second_job}.jsonl").exists()

    pruned = batcher.prune(s, keep_runs=1)
    assert pruned.dropped == {"runs": 2, "rows": 5, "requests": 3, "jobs": 1, "job_files": 1}, pruned.summary
    assert pruned.kept_runs == [3] and pruned.unfinished_runs == []
    after = held(s.workdir)
    assert after["runs"] == {3: ["a", "e"]}
    assert after["prompts"] == ["a kite over the sea", "a red fox in snow"]
    assert after["jobs"] == sorted([first_job, third_job])
    assert not (s.workdir / "jobs" / f"{second_job}.jsonl").exists()
    assert pruned.bytes_after <= pruned.bytes_before and pruned.remaining == after["counts"]
    assert not (s.workdir / "ledger.sqlite-wal").exists() or (s.workdir / "ledger.sqlite-wal").stat().st_size == 0
    ledger = Ledger(s.workdir)
    assert ledger.integrity_ok()
    ledger.close()

    # Tonight's status, dataset and report read as before.
    doc = pipeline.status(s, refresh=False)
    assert doc["requests"]["succeeded"] == 2 and doc["exit_code"] == 0
    assert sorted(j["display_name"] for j in doc["jobs"]) == after["jobs"]
    out = pipeline.collect(s, backend_factory=backend_factory)
    assert out.exit_code == 0, out.summary
    assert pq.read_table(s.out / "metadata.parquet").to_pylist() == dataset_before
    assert pipeline.report(s).rows == 2

    again = batcher.prune(s, keep_runs=1)  # nothing more to drop
    assert again.dropped == {"runs": 0, "rows": 0, "requests": 0, "jobs": 0, "job_files": 0}


def test_a_request_dropped_by_prune_that_comes_back_is_a_cache_hit_and_not_paid_again(tmp_path, emulator, backend_factory):
    """The image cache is not touched: last week's manifest, run again after its run was pruned, sends nothing.
    A dataset's pending tidy-up (meta `dataset_prune:<out>`) survives the prune and is done by the next write."""
    s = three_nights(tmp_path, backend_factory)
    ledger = Ledger(s.workdir)
    reading.set_prune_pending(ledger, str(s.out), True)
    ledger.close()
    pruned = batcher.prune(s, keep_runs=1)
    assert pruned.dropped["requests"] == 3
    ledger = Ledger(s.workdir)
    assert reading.prune_pending(ledger, str(s.out))
    ledger.close()
    sent = {k: emulator.stats()[k] for k in ("batches_created", "lines_processed", "generate_content_calls")}

    out = pipeline.run(tonight(tmp_path, NIGHT_1), s, backend_factory=backend_factory)
    assert out.exit_code == 0, out.summary
    assert {k: emulator.stats()[k] for k in sent} == sent  # 0 requests sent
    # b and c, dropped from the ledger, are cache hits; a is tonight's too, done in the ledger.
    assert out.plan.new_run and out.plan.images_before == 3 and out.plan.cache_hits == 2
    rows = pq.read_table(s.out / "metadata.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == ["a", "b", "c"] and {r["status"] for r in rows} == {"ok"}
    assert all((s.out / r["file_name"]).exists() for r in rows)
    ledger = Ledger(s.workdir)
    assert not reading.prune_pending(ledger, str(s.out))  # the dataset's write tidied it
    ledger.close()


def test_a_run_with_work_to_finish_is_kept_until_it_is_collected(tmp_path, emulator, backend_factory):
    """Night 1 submitted (its job not yet collected), night 2 planned behind it (a dry run: its job not created):
    keeping 1 run keeps both, and every request and job. Once night 1 is collected it goes, with the requests
    only it used; night 2's planned job and queued requests stay."""
    s = settings(tmp_path)
    assert pipeline.submit(tonight(tmp_path, NIGHT_1), s, backend_factory=backend_factory).exit_code == 4
    assert pipeline.submit(tonight(tmp_path, NIGHT_2), s, dry_run=True).exit_code == 0
    before = dump(s.workdir)

    kept = batcher.prune(s, keep_runs=1)
    assert kept.kept_runs == [2, 1] and kept.unfinished_runs == [1], kept.summary
    assert kept.dropped == {"runs": 0, "rows": 0, "requests": 0, "jobs": 0, "job_files": 0}
    assert "1 beyond the newest 1: work to finish" in kept.summary
    assert dump(s.workdir) == before

    for _ in range(200):  # night 1's job: done by the API, then collected
        pipeline.collect(s, backend_factory=backend_factory)
        if any(j["state"] == "collected" for j in pipeline.status(s, refresh=False)["jobs"]):
            break
        time.sleep(0.05)
    after_collect = held(s.workdir)
    pruned = batcher.prune(s, keep_runs=1)
    assert pruned.kept_runs == [2] and pruned.dropped["runs"] == 1 and pruned.dropped["requests"] == 2, pruned.summary
    assert pruned.dropped["jobs"] == 0  # night 1's job still holds `a`, a request of night 2
    after = held(s.workdir)
    assert after["runs"] == {2: ["a", "d"]} and after["jobs"] == after_collect["jobs"]
    ledger = Ledger(s.workdir)
    states = ledger.request_counts()
    ledger.close()
    assert states == {"succeeded": 1, "queued": 1}  # night 2's `d`, in its job not yet created
    out = pipeline.run(tonight(tmp_path, NIGHT_2), s, backend_factory=backend_factory)  # and it finishes
    assert out.exit_code == 0 and out.counts["succeeded"] == 2, out.summary


def test_a_failure_inside_the_prune_transaction_leaves_the_ledger_as_it_was(tmp_path, emulator, backend_factory, monkeypatch):
    s = three_nights(tmp_path, backend_factory)
    before = dump(s.workdir)

    def fail(point):
        if point == "prune":  # every delete done, not committed
            raise RuntimeError("killed")

    monkeypatch.setattr(housekeeping, "maybe_crash", fail)
    with pytest.raises(RuntimeError, match="killed"):
        batcher.prune(s, keep_runs=1)
    assert dump(s.workdir) == before
    monkeypatch.undo()
    assert batcher.prune(s, keep_runs=1).dropped["runs"] == 2  # and a prune after it works


def test_a_prune_killed_before_or_after_its_commit_leaves_the_ledger_before_or_after(tmp_path, emulator, backend_factory):
    """SIGKILL (BATCHER_CRASH_AT) inside the transaction: the ledger as before. After the commit, before the job
    files and VACUUM: the ledger pruned, and the next prune removes the file left behind."""
    s = three_nights(tmp_path, backend_factory)
    before = dump(s.workdir)
    second_job = held(s.workdir)["jobs"][1]
    argv = [sys.executable, "-m", "batcher.cli", "prune", "--workdir", str(s.workdir), "--keep-runs", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    killed = subprocess.run(argv, env={**env, "BATCHER_CRASH_AT": "prune"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert dump(s.workdir) == before

    killed = subprocess.run(argv, env={**env, "BATCHER_CRASH_AT": "pruned"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert held(s.workdir)["runs"] == {3: ["a", "e"]}
    assert (s.workdir / "jobs" / f"{second_job}.jsonl").exists()  # killed before the files went
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "dropped 0 runs" in done.stdout and "1 JSONL file(s)" in done.stdout
    assert not (s.workdir / "jobs" / f"{second_job}.jsonl").exists()


def test_prune_is_refused_while_another_batcher_process_holds_the_workdir(tmp_path, emulator, backend_factory):
    s = three_nights(tmp_path, backend_factory)
    before = dump(s.workdir)
    with pipeline.open_workspace(s, backend_factory):
        with pytest.raises(LedgerError, match=r"in use by another batcher process \(pid [0-9]+\): nothing was pruned"):
            batcher.prune(s, keep_runs=1)
        r = CliRunner().invoke(main, ["prune", "--workdir", str(s.workdir), "--keep-runs", "1"])
        assert r.exit_code == 1 and "nothing was pruned" in r.output
    assert dump(s.workdir) == before


def test_prune_cli_json_and_bad_input(tmp_path, emulator, backend_factory):
    s = three_nights(tmp_path, backend_factory)
    r = CliRunner().invoke(main, ["prune", "--workdir", str(s.workdir), "--keep-runs", "2", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["dry_run"] and doc["kept_runs"] == [3, 2] and doc["dropped"]["runs"] == 1 and doc["dropped"]["requests"] == 2
    r = CliRunner().invoke(main, ["prune", "--workdir", str(s.workdir), "--keep-runs", "0"])
    assert r.exit_code == 2 and "--keep-runs" in r.output and "x>=1" in r.output
    r = CliRunner().invoke(main, ["prune", "--workdir", str(tmp_path / "nowhere"), "--keep-runs", "1"])
    assert r.exit_code == 2 and "no run in" in r.output and not (tmp_path / "nowhere").exists()
    with pytest.raises(UsageError):
        batcher.prune(s, keep_runs=0)


def test_after_a_prune_tonights_plan_reads_the_ledger_whole_again(tmp_path):
    """The fast path (every request read into memory once) holds while the ledger has at most known_max_requests
    requests. Its first check, the largest rowid, only grows: after a prune deleted requests below it, the plan
    counts them instead of falling back to SQL a batch at a time."""
    tuning = PlanTuning(known_max_requests=4, plan_batch_rows=2)
    ledger = Ledger(tmp_path / "wd")
    m = tmp_path / "nightly.csv"

    def night(rows) -> str:
        p = plan_manifest(ledger, None, write_csv(m, HEADER, rows), ManifestOptions(), tuning=tuning)
        with ledger.transaction() as c:  # the night's jobs, generated and collected
            c.execute("UPDATE requests SET state='succeeded' WHERE state='planned'")
        return p.ledger_lookup

    assert night(NIGHT_1 + [["f", "a paper crane"]]) == "fresh"  # 4 requests
    assert night(NIGHT_2) == "memory"  # 4 requests before it, 5 after
    assert night(NIGHT_3) == "sql"  # 5 > 4
    assert housekeeping.prune_runs(ledger, keep_runs=1).requests == 4  # b, c, f, d
    assert housekeeping.table_counts(ledger)["requests"] == 2
    assert night(NIGHT_2) == "memory"
    ledger.close()
