"""End to end: library API and CLI, the real SDK against the emulator."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import batcher.pipeline as pipeline
from batcher.cost.money import usd
from batcher.errors import UsageError
from batcher.cli import main
from batcher.planning.planner import ShardLimits
from tests.helpers import settings, write_csv

PROMPTS = [
    ["p1", "a red fox in snow", "", "1", "animal"],
    ["p2", "a blue vintage car", "16:9", "2", "vehicle"],
    ["p3", "a red fox in snow", "", "1", "animal"],  # same request as p1
    ["p4", "a bowl of ramen, studio light", "4:3", "1", "food"],
    ["p5", "a mountain lake at dawn", "9:16", "", "landscape"],
]
HEADER = ["id", "prompt", "aspect_ratio", "variants", "category"]


def manifest(tmp_path: Path, rows=PROMPTS, name="m.csv") -> Path:
    return write_csv(tmp_path / name, HEADER, rows)


def metadata(s: pipeline.Settings) -> list[dict]:
    return pq.read_table(s.out / "metadata.parquet").to_pylist()


@pytest.mark.slow
def test_run_writes_a_complete_dataset(tmp_path, emulator, backend_factory):
    s = settings(tmp_path)
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    rows = metadata(s)
    assert len(rows) == 6  # 5 rows, one with 2 variants
    assert [r["id"] for r in rows] == ["p1", "p2", "p2", "p3", "p4", "p5"]
    assert {r["status"] for r in rows} == {"ok"}
    expected_ratio = {"p1": 1.0, "p2": 16 / 9, "p3": 1.0, "p4": 4 / 3, "p5": 9 / 16}
    for r in rows:
        with Image.open(s.out / r["file_name"]) as im:
            im.load()
            assert im.width / im.height == pytest.approx(expected_ratio[r["id"]], rel=0.03)
        assert r["category"]  # carried through
    # p1 and p3 are the same request: sent once, sharing one image, paid once.
    p1, p3 = rows[0], rows[3]
    assert p1["request_hash"] == p3["request_hash"] and p1["file_name"] == p3["file_name"]
    stats = emulator.stats()
    assert stats["batches_created"] == 1
    assert stats["lines_processed"] == 5
    # Paid once per request, at the batch rate: prompt $0.50, image $60, thoughts $3 per 1M tokens (gemini-3.1-flash-image).
    paid = {r["request_hash"]: (r["prompt_tokens"] * 0.5 + r["output_tokens"] * 60 + r["thoughts_tokens"] * 3) / 1e6 * 0.5 for r in rows}
    assert all(r["output_tokens"] == 1120 and 100 <= r["thoughts_tokens"] < 300 for r in rows)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(sum(paid.values()))


@pytest.mark.slow
def test_variants_are_distinct_requests(tmp_path, emulator, backend_factory):
    s = settings(tmp_path)
    pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    p2 = [r for r in metadata(s) if r["id"] == "p2"]
    assert [r["variant"] for r in p2] == [0, 1]
    assert p2[0]["request_hash"] != p2[1]["request_hash"]
    assert (s.out / p2[0]["file_name"]).read_bytes() != (s.out / p2[1]["file_name"]).read_bytes()


@pytest.mark.slow
def test_second_run_uses_the_cache_and_creates_no_job(tmp_path, emulator, backend_factory):
    m = manifest(tmp_path)
    first = settings(tmp_path)
    assert pipeline.run(m, first, backend_factory=backend_factory).exit_code == 0
    before = emulator.stats()["batches_created"]
    # A different workdir sharing the cache: nothing is paid twice.
    second = pipeline.Settings(workdir=tmp_path / "work2", out=tmp_path / "out2", cache_dir=tmp_path / "cache",
                               poll_interval=0.05, timeout=30, quiet=True)
    result = pipeline.run(m, second, backend_factory=backend_factory)
    assert result.exit_code == 0
    assert emulator.stats()["batches_created"] == before
    rows = metadata(second)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"} and all(r["cached"] for r in rows)
    assert all((second.out / r["file_name"]).exists() for r in rows)
    # The same workdir again: also no job.
    assert pipeline.run(m, first, backend_factory=backend_factory).exit_code == 0
    assert emulator.stats()["batches_created"] == before


@pytest.mark.slow
def test_a_later_run_in_the_same_workdir_does_not_count_earlier_payments(tmp_path, emulator, backend_factory):
    """Tonight's manifest shares prompts with last night's, in the same workdir: the shared rows were paid for
    last night, so tonight's dataset and status show them as cached at no cost, and only the new rows' cost."""
    s = settings(tmp_path)
    assert pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory).exit_code == 0
    first_cost = sum(r["cost_usd"] for r in metadata(s))
    tonight = PROMPTS[:2] + [["n1", "a lighthouse in a storm", "", "1", "landscape"]]
    s = settings(tmp_path, switch_manifest=True)  # tonight's is another file: the workdir moves on to it
    result = pipeline.run(manifest(tmp_path, tonight, name="tonight.csv"), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    rows = {(r["id"], r["variant"]): r for r in metadata(s)}
    assert len(rows) == 4
    for key in (("p1", 0), ("p2", 0), ("p2", 1)):
        assert rows[key]["cached"] and rows[key]["cost_usd"] == 0.0, rows[key]
    new = rows[("n1", 0)]
    assert not new["cached"] and new["cost_usd"] > 0
    assert first_cost > 3 * new["cost_usd"]
    status = pipeline.status(s, backend_factory=backend_factory)
    assert status["cost_usd"] == pytest.approx(new["cost_usd"], abs=1e-6)  # status rounds to 6 places


@pytest.mark.slow
def test_a_request_planned_again_carries_no_earlier_payment(tmp_path, emulator, backend_factory):
    """--refresh plans every request again: until it is generated again, this run has paid nothing for it."""
    s = settings(tmp_path)
    assert pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory).exit_code == 0
    assert pipeline.status(s, backend_factory=backend_factory)["cost_usd"] > 0
    again = settings(tmp_path, refresh=True)
    pipeline.submit(manifest(tmp_path), again, dry_run=True, backend_factory=backend_factory)
    assert pipeline.status(again, backend_factory=backend_factory)["cost_usd"] == 0
    con = sqlite3.connect(s.workdir / "ledger.sqlite")
    assert con.execute("SELECT COUNT(*) FROM requests WHERE cost_usd IS NOT NULL OR prompt_tokens IS NOT NULL").fetchone()[0] == 0
    con.close()


@pytest.mark.slow
def test_parquet_manifest_and_multi_job_sharding(tmp_path, emulator, backend_factory):
    table = pa.table({"id": [f"r{i}" for i in range(7)], "prompt": [f"product shot number {i}" for i in range(7)],
                      "price": [float(i) for i in range(7)]})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    s = settings(tmp_path, limits=ShardLimits(max_requests=3))
    result = pipeline.run(path, s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["batches_created"] == 3
    rows = metadata(s)
    assert [r["price"] for r in rows] == [float(i) for i in range(7)]  # carried through with its type


@pytest.mark.slow
def test_blocked_and_failing_rows_exit_3_with_reasons(tmp_path, emulator, backend_factory):
    rows = [["ok1", "a calm sea", "", "", "x"],
            ["blk", "something [emulator:image_safety]", "", "", "x"],
            ["txt", "answer in words [emulator:text_only]", "", "", "x"],
            ["err", "always broken [emulator:line_error]", "", "", "x"]]
    s = settings(tmp_path, max_attempts=2)
    result = pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    assert result.exit_code == 3, result.summary
    by_id = {r["id"]: r for r in metadata(s)}
    assert by_id["ok1"]["status"] == "ok"
    assert by_id["blk"]["status"] == "blocked" and by_id["blk"]["finish_reason"] == "IMAGE_SAFETY"
    assert by_id["txt"]["status"] == "blocked" and "text only" in by_id["txt"]["error"]
    assert by_id["err"]["status"] == "failed" and by_id["err"]["attempts"] == 2
    assert by_id["blk"]["file_name"] is None
    # The erroring request was retried in a second job, the blocked ones were not.
    assert emulator.stats()["batches_created"] == 2


@pytest.mark.slow
def test_transient_line_errors_are_retried_until_they_succeed(tmp_path, emulator, backend_factory):
    emulator.configure(line_error_rate=0.5, seed=7)
    s = settings(tmp_path, max_attempts=10)
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["batches_created"] >= 2


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["FAILED", "EXPIRED", "CANCELLED"])
def test_ended_jobs_are_requeued(tmp_path, emulator, backend_factory, outcome):
    emulator.configure(job_outcomes=[outcome])
    s = settings(tmp_path)
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["batches_created"] == 2
    assert {r["attempts"] for r in metadata(s)} == {2}


@pytest.mark.slow
def test_reference_images_are_uploaded_once(tmp_path, emulator, backend_factory):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(ref)
    rows = [["a", "this product on a beach", "", "", "x"], ["b", "this product in a kitchen", "", "", "x"]]
    header = HEADER + ["reference_images"]
    path = write_csv(tmp_path / "refs.csv", header, [r + ["ref.png"] for r in rows])
    s = settings(tmp_path)
    result = pipeline.run(path, s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["files_uploaded"] == 2  # the reference image once, the JSONL once
    jsonl_requests = stats["requests"]
    assert any("upload" in k for k in jsonl_requests)


def test_invalid_manifest_exits_2_naming_the_row_and_uploads_nothing(tmp_path, emulator_env):
    rows = [["a", "fine", "", "", "x"], ["b", "", "", "", "x"], ["c", "bad ratio", "7:3", "", "x"]]
    path = manifest(tmp_path, rows)
    r = CliRunner().invoke(main, ["run", str(path), "--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 2, r.output
    assert "row 3" in r.output and "prompt" in r.output
    assert "row 4" in r.output and "7:3" in r.output
    assert "Traceback" not in r.output
    stats = emulator_env.stats()
    assert stats["files_uploaded"] == 0 and stats["batches_created"] == 0
    # Nothing half-done in the ledger either.
    conn = sqlite3.connect(tmp_path / "w" / "ledger.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 0


def test_duplicate_ids_are_rejected(tmp_path, emulator, backend_factory):
    rows = [["a", "one", "", "", "x"], ["a", "two", "", "", "x"]]
    s = settings(tmp_path)
    from batcher.errors import ManifestError

    with pytest.raises(ManifestError) as info:
        pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    assert any("row 3" in p and "duplicate id" in p for p in info.value.problems)
    assert emulator.stats()["batches_created"] == 0


@pytest.mark.slow
def test_skip_invalid_submits_the_rest_and_writes_rejects(tmp_path, emulator, backend_factory):
    rows = [["a", "fine", "", "", "x"], ["b", "", "", "", "x"]]
    s = settings(tmp_path, skip_invalid=True, rejects_path=tmp_path / "rejects.csv")
    result = pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    # Not "every row has its image": exit 3, and the summary names the rows left out and where they are.
    assert result.exit_code == 3, result.summary
    assert result.summary.startswith(f"done: 2 rows read (1 invalid, skipped: see {tmp_path / 'rejects.csv'}), 1 image ")
    assert [r["id"] for r in metadata(s)] == ["a"]
    assert "prompt" in (tmp_path / "rejects.csv").read_text()
    again = pipeline.collect(s, backend_factory=backend_factory)  # a later command still knows
    assert again.exit_code == 3 and "(1 invalid, skipped" in again.summary, again.summary


@pytest.mark.slow
def test_cli_submit_status_collect(tmp_path, emulator_env):
    runner = CliRunner()
    common = ["--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"]
    r = runner.invoke(main, ["submit", str(manifest(tmp_path))] + common)
    assert r.exit_code == 4, r.output  # submitted, still in progress
    assert "1 job(s) created" in r.output
    import time

    for _ in range(100):
        r = runner.invoke(main, ["status", "--json", "--workdir", str(tmp_path / "w")])
        doc = json.loads(r.output)
        if doc["jobs"][0]["api_state"] == "SUCCEEDED":
            break
        time.sleep(0.05)
    job = doc["jobs"][0]
    for key in ("name", "display_name", "state", "created_at", "window_ends_at", "expires_at", "request_count",
                "succeeded", "failed", "pending"):
        assert key in job
    assert job["name"].startswith("batches/") and job["request_count"] == 5 and job["succeeded"] == 5
    assert doc["requests"]["queued"] == 5 and "cache_hits" in doc
    r = runner.invoke(main, ["collect"] + common)
    assert r.exit_code == 0, r.output
    # Counted as the dataset counts them: 6 images (rows x variants), of which two share a request.
    assert "6 images (5 requests, 0 from the cache)" in r.output and "images: 6 ok," in r.output, r.output
    assert len(pq.read_table(tmp_path / "o" / "metadata.parquet")) == 6
    r = runner.invoke(main, ["status", "--workdir", str(tmp_path / "w")])
    assert "collected" in r.output and r.exit_code == 0


def test_dry_run_writes_jsonl_and_uploads_nothing(tmp_path, emulator_env):
    r = CliRunner().invoke(main, ["submit", str(manifest(tmp_path)), "--dry-run", "--workdir", str(tmp_path / "w"),
                                  "--cache-dir", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 0, r.output
    files = list((tmp_path / "w" / "jobs").glob("*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert len(lines) == 5
    assert lines[1]["request"]["generationConfig"]["imageConfig"]["aspectRatio"] == "16:9"
    assert lines[0]["request"]["generationConfig"]["responseModalities"] == ["IMAGE"]
    assert emulator_env.stats()["files_uploaded"] == 0


def test_no_api_key_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["run", str(manifest(tmp_path)), "--workdir", str(tmp_path / "w"), "-q"])
    assert r.exit_code == 2
    assert "GEMINI_API_KEY" in r.output


@pytest.mark.slow
def test_a_crash_inside_create_never_creates_a_job_twice(tmp_path, emulator, backend_factory):
    """Simulate death right after batches.create returned, before the ledger recorded it."""
    s = settings(tmp_path)
    m = manifest(tmp_path)
    with pipeline.open_workspace(s, backend_factory) as ws:
        from batcher.jobs import lifecycle as jobs_mod

        (job_id,) = pipeline.plan(ws, m).jobs  # a plan into an empty workdir shards as it loads
        jobs_mod.upload_job(ws.ledger, ws.backend, job_id, {})
        job = ws.ledger.job(job_id)
        with ws.ledger.transaction() as c:
            ws.ledger.job_transition(c, job_id, ("uploaded",), "creating")
        ws.backend.create_batch(job["model"], job["input_file"], job["display_name"])  # ...and the process "dies"
    assert emulator.stats()["batches_created"] == 1
    result = pipeline.run(m, s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["batches_created"] == 1


@pytest.mark.slow
def test_a_crash_before_create_creates_the_job_once(tmp_path, emulator, backend_factory):
    s = settings(tmp_path)
    m = manifest(tmp_path)
    with pipeline.open_workspace(s, backend_factory) as ws:

        (job_id,) = pipeline.plan(ws, m).jobs  # a plan into an empty workdir shards as it loads
        with ws.ledger.transaction() as c:  # died after recording the intent, before calling create
            ws.ledger.job_transition(c, job_id, ("planned",), "uploading")
    result = pipeline.run(m, s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["batches_created"] == 1


@pytest.mark.slow
def test_dropped_download_is_resumed(tmp_path, emulator, backend_factory):
    emulator.configure(drop_download_after_bytes=5_000, drop_download_times=2)
    s = settings(tmp_path)
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert {r["status"] for r in metadata(s)} == {"ok"}


@pytest.mark.slow
def test_server_errors_and_rate_limits_do_not_duplicate_jobs(tmp_path, emulator, backend_factory):
    emulator.configure(fail_rate=0.3, seed=3, rate_limit_rate=0.1, retry_delay="0.01s")
    s = settings(tmp_path, limits=ShardLimits(max_requests=2))
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    with pipeline.open_workspace(s, backend_factory) as ws:
        recorded = ws.ledger.conn.execute("SELECT COUNT(*) FROM jobs WHERE batch_name IS NOT NULL").fetchone()[0]
    assert emulator.stats()["batches_created"] == recorded


def test_second_process_on_the_same_workdir_is_refused(tmp_path, emulator, backend_factory):
    from batcher.errors import LedgerError

    s = settings(tmp_path)
    with pipeline.open_workspace(s, backend_factory):
        with pytest.raises(LedgerError, match="in use by another batcher process"):
            with pipeline.open_workspace(s, backend_factory):
                pass
    with pipeline.open_workspace(s, backend_factory):  # released: usable again
        pass


@pytest.mark.slow
def test_the_api_key_never_reaches_disk_or_output(tmp_path, emulator, monkeypatch):
    canary = "canary-KEY-7f3a9c"
    emulator.configure(api_key=canary, line_error_rate=0.3, seed=1)
    monkeypatch.setenv("GEMINI_API_KEY", canary)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", emulator.url)
    rows = PROMPTS + [["bad", "x [emulator:line_error]", "", "", "x"]]
    r = CliRunner().invoke(main, ["run", str(manifest(tmp_path, rows)), "--workdir", str(tmp_path / "w"), "--out",
                                  str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "-vv", "--poll-interval", "0.05",
                                  "--max-attempts", "2"])
    emulator.configure(api_key=None)
    assert r.exit_code == 3, r.output
    assert canary not in r.output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path


def test_status_windows_use_the_api_clock(tmp_path, emulator, backend_factory):
    """Ages, 24 h windows and 48 h expiry come from the API's clock (here 30 emulated hours ahead)."""
    emulator.configure(job_outcomes=["STUCK"])
    s = settings(tmp_path)
    pipeline.submit(manifest(tmp_path), s, backend_factory=backend_factory)
    emulator.advance(30 * 3600)
    doc = pipeline.status(s, backend_factory=backend_factory)
    (job,) = doc["jobs"]
    assert job["age_hours"] == pytest.approx(30, abs=0.1)
    assert job["window_hours_left"] == pytest.approx(-6, abs=0.1)
    assert job["expiry_hours_left"] == pytest.approx(18, abs=0.1)
    assert "past its 24 h target window" in job["warnings"]
    emulator.advance(13 * 3600)
    (job,) = pipeline.status(s, backend_factory=backend_factory)["jobs"]
    assert any("expires in under 6 h" in w for w in job["warnings"])


@pytest.mark.slow
def test_blocked_rows_are_final_unless_asked(tmp_path, emulator, backend_factory):
    rows = [["ok1", "a calm sea", "", "", "x"], ["blk", "a storm [emulator:image_safety]", "", "", "x"]]
    m = manifest(tmp_path, rows)
    s = settings(tmp_path)
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 3
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 3
    assert emulator.stats()["batches_created"] == 1  # not retried by a plain re-run
    s.retry_blocked = True
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 3  # the marker blocks again...
    assert emulator.stats()["batches_created"] == 2  # ...but it was sent again, as asked
    assert {r["id"]: r["attempts"] for r in metadata(s)}["blk"] == 1


@pytest.mark.slow
def test_an_upload_orphaned_by_a_crash_is_deleted(tmp_path, emulator, backend_factory):
    """Died after the server finished an upload, before the ledger recorded it: the orphan costs quota."""
    s = settings(tmp_path)
    m = manifest(tmp_path)
    with pipeline.open_workspace(s, backend_factory) as ws:
        from batcher.jobs import lifecycle as jobs_mod

        (job_id,) = pipeline.plan(ws, m).jobs  # a plan into an empty workdir shards as it loads
        with ws.ledger.transaction() as c:
            ws.ledger.job_transition(c, job_id, ("planned",), "uploading")
        path = jobs_mod.write_jsonl(ws.ledger, job_id, {})
        orphan = ws.backend.upload_jsonl(path, display_name=ws.ledger.job(job_id)["display_name"])
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 0
    assert orphan.name not in {f.name for f in backend_factory().list_files()}
    assert emulator.stats()["batches_created"] == 1 and emulator.stats()["files_deleted"] >= 1


def test_progress_bars_on_a_terminal(tmp_path, emulator, backend_factory, monkeypatch, capsys):
    """Bars are drawn only on a terminal; force that path and check it draws and finishes cleanly."""
    import batcher.progress

    monkeypatch.setattr(batcher.progress.Progress, "__init__", lambda self, quiet=False: setattr(self, "enabled", True))
    s = settings(tmp_path, quiet=False)
    assert pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory).exit_code == 0
    err = capsys.readouterr().err
    assert "succeeded, 0 failed" in err and "download" in err and "decode" in err and "upload" in err


@pytest.mark.slow
def test_a_run_under_a_token_cap_goes_out_in_waves(tmp_path, emulator, backend_factory):
    """The emulator enforces the same cap: a create over it would be a 429. None happens; jobs go in waves."""
    from batcher.jobs.quota import Quota

    cap = 2 * 1410  # two flash images' worth of enqueued tokens (1,120 image + 250 thinking + ~31 prompt, each)
    emulator.configure(enqueued_token_cap=cap, running_seconds=0.3)
    s = settings(tmp_path, quota=Quota(token_cap=cap))
    rows = [[f"w{i}", f"wave test prompt {i}", "", "", "x"] for i in range(7)]
    result = pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["batches_created"] == 4  # 2 + 2 + 2 + 1 requests
    assert stats["http_errors"] == 0  # not one create was refused: we waited for capacity ourselves
    with pipeline.open_workspace(s, backend_factory) as ws:
        created = [r[0] for r in ws.ledger.conn.execute("SELECT api_created_at FROM jobs ORDER BY id")]
    assert len(set(created)) == 4


@pytest.mark.slow
def test_a_429_on_create_waits_for_capacity(tmp_path, emulator, backend_factory):
    """The API's cap is tighter than ours (our tier table is only a snapshot): wait, don't fail."""
    emulator.configure(enqueued_token_cap=2 * 1400, running_seconds=0.2)
    s = settings(tmp_path, limits=ShardLimits(max_requests=2))
    rows = [[f"q{i}", f"quota test prompt {i}", "", "", "x"] for i in range(6)]
    result = pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["batches_created"] == 3
    assert stats["http_errors"] >= 1  # the API did refuse a create (429), and the run waited it out


@pytest.mark.slow
def test_a_fallback_model_takes_requests_that_keep_failing(tmp_path, emulator, backend_factory):
    rows = [["ok1", "a calm sea", "", "", "x"], ["err", "always broken on flash [emulator:line_error]", "", "", "x"]]
    s = settings(tmp_path, max_attempts=2, fallback_model="gemini-3-pro-image")
    # The marker fails every model in the emulator: the fallback is tried, then fails too, and stays failed.
    result = pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    assert result.exit_code == 3, result.summary
    by_id = {r["id"]: r for r in metadata(s)}
    assert by_id["ok1"]["model"] == "gemini-3.1-flash-image"
    assert by_id["err"]["model"] == "gemini-3-pro-image" and by_id["err"]["status"] == "failed"
    assert emulator.stats()["batches_created"] == 4  # flash twice, then pro twice


@pytest.mark.slow
def test_a_fallback_image_is_cached_under_its_own_hash(tmp_path, emulator, backend_factory):
    from batcher.planning.requests import ImageRequest, request_hash
    from batcher.storage.store import ImageStore

    emulator.configure(job_outcomes=["FAILED", "SUCCEEDED"])  # the first model's job fails; the fallback's does not
    rows = [["r", "a red bicycle", "", "", "x"]]
    s = settings(tmp_path, max_attempts=1, fallback_model="gemini-3-pro-image")
    result = pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    (row,) = metadata(s)
    assert (row["status"], row["model"]) == ("ok", "gemini-3-pro-image")
    direct = request_hash(ImageRequest(model="gemini-3-pro-image", prompt="a red bicycle"))
    assert row["request_hash"] == direct  # the same request sent to the fallback model directly: one cache entry
    assert ImageStore(s.cache_dir).has(direct) and (s.out / row["file_name"]).is_file()
    direct_manifest = write_csv(tmp_path / "direct.csv", ["id", "prompt", "model"], [["r2", "a red bicycle", "gemini-3-pro-image"]])
    again = pipeline.run(direct_manifest, settings(tmp_path / "second", cache_dir=s.cache_dir), backend_factory=backend_factory)
    assert again.exit_code == 0 and "(1 request, 1 from the cache)" in again.summary, again.summary  # asked directly: a cache hit


@pytest.mark.slow
def test_a_create_whose_reply_is_lost_does_not_make_a_second_job(tmp_path, emulator, backend_factory):
    """The server makes the job, then answers 503: batcher must find it by name, not create again."""
    emulator.configure(create_then_fail_times=2)
    s = settings(tmp_path, limits=ShardLimits(max_requests=3))
    result = pipeline.run(manifest(tmp_path), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    stats = emulator.stats()
    assert stats["faults"].get("create_then_fail") == 2
    assert stats["batches_created"] == 2  # 5 requests in jobs of 3: two jobs, each created once


def test_status_shows_planned_vs_in_flight_vs_capacity(tmp_path, emulator_env):
    from batcher.cli import main as cli_main

    emulator_env.configure(job_outcomes=["STUCK"])
    common = ["--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"), "-q", "--token-cap", "3000"]
    r = CliRunner().invoke(cli_main, ["submit", str(manifest(tmp_path)), "--max-requests-per-job", "2"] + common)
    assert r.exit_code == 4, r.output
    r = CliRunner().invoke(cli_main, ["status", "--workdir", str(tmp_path / "w"), "--no-refresh", "--wide"])
    line = next(x for x in r.output.splitlines() if x.startswith("capacity gemini-3.1-flash-image"))
    assert "enqueued tokens in flight" in line and "job(s)" in line and "waiting" in line
    doc = json.loads(CliRunner().invoke(cli_main, ["status", "--json", "--workdir", str(tmp_path / "w"), "--no-refresh"]).output)
    cap = doc["capacity"]["gemini-3.1-flash-image"]
    assert cap["in_flight_tokens"] > 0 and cap["jobs_waiting"] >= 1  # one job created, the rest wait for capacity


@pytest.mark.slow
def test_an_image_gone_from_the_cache_after_a_run_is_generated_again_by_the_next_run(tmp_path, emulator, backend_factory):
    """The same manifest run again after the cache lost one of its images (cleaned, moved) generates that image,
    and only it, instead of reporting the run done with a dataset row pending for good."""
    s = settings(tmp_path)
    m = manifest(tmp_path)
    first = pipeline.run(m, s, backend_factory=backend_factory)
    assert first.exit_code == 0
    lost = metadata(s)[4]["request_hash"]  # p4
    image = tmp_path / "cache" / lost[:2] / f"{lost}.png"
    image.unlink()
    collected = pipeline.collect(s, backend_factory=backend_factory)  # collect alone: says so, and is not done
    assert collected.exit_code == pipeline.EXIT_PENDING and collected.dataset.lost == 1, collected.summary
    assert "gone from the cache" in collected.summary and "pending" in {r["status"] for r in metadata(s)}
    again = pipeline.run(m, s, backend_factory=backend_factory)  # the same file: the same run, resumed
    assert not again.plan.new_run and again.exit_code == 0 and again.jobs_created == 1, again.summary
    assert image.exists() and {r["status"] for r in metadata(s)} == {"ok"}
    stats = emulator.stats()
    assert stats["batches_created"] == 2 and stats["lines_processed"] == 5 + 1


@pytest.mark.slow
def test_run_counts_its_requests_again_only_after_a_round_that_changed_them(tmp_path, emulator, backend_factory, monkeypatch):
    """While a job runs, a round that changes no request keeps the run's counts instead of counting a million
    rows again (Ledger.change_counter); the rounds that send and collect still count, and the run ends done."""
    import time

    emulator.configure(running_seconds=1.0)
    counted = []
    real_run_counts = pipeline.run_counts
    monkeypatch.setattr(pipeline, "run_counts", lambda *a: counted.append(1) or real_run_counts(*a))
    rounds = []
    result = pipeline.run(manifest(tmp_path), settings(tmp_path, poll_interval=0.05), backend_factory=backend_factory,
                          sleep=lambda s: rounds.append(s) or time.sleep(s))
    assert result.exit_code == 0 and {r["status"] for r in metadata(settings(tmp_path))} == {"ok"}
    assert len(rounds) >= 5 and 1 <= len(counted) <= 3, (len(rounds), len(counted))


def test_the_change_counter_counts_committed_changes_to_requests_and_rows(tmp_path):
    from batcher.ledger import Ledger
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import plan_manifest

    ledger = Ledger(tmp_path / "wd")
    with ledger.change_counter() as changes:
        assert changes() == 0
        plan_manifest(ledger, None, manifest(tmp_path), ManifestOptions())
        after_plan = changes()
        assert after_plan > 0
        with ledger.transaction() as c:
            c.execute("UPDATE jobs SET updated_at=1")  # not a request, not a row
        assert changes() == after_plan
        with pytest.raises(RuntimeError), ledger.transaction() as c:
            c.execute("UPDATE requests SET attempts=7")
            raise RuntimeError("rolled back")
        assert changes() == after_plan
        with ledger.transaction() as c:
            c.execute("UPDATE rows SET prompt='x' WHERE seq=0")
        assert changes() == after_plan + 1
    assert ledger.conn.execute("SELECT COUNT(*) FROM sqlite_temp_master WHERE type='trigger'").fetchone()[0] == 0


def test_the_change_counter_nests_and_never_hides_the_error_that_unwinds_it(tmp_path):
    """Nested uses share one count (the inner one leaves the outer counting); an exception raised while a read
    is still open (Ctrl-C in the middle of writing a job's JSONL) comes out as itself."""
    from batcher.ledger import Ledger
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import plan_manifest

    ledger = Ledger(tmp_path / "wd")
    plan_manifest(ledger, None, manifest(tmp_path), ManifestOptions())
    with ledger.change_counter() as outer:
        with ledger.change_counter() as inner:
            start = outer()
            assert inner() == start
        with ledger.transaction() as c:
            c.execute("UPDATE requests SET attempts=1")
        assert outer() > start
    with pytest.raises(KeyboardInterrupt):
        with ledger.change_counter():
            rows = ledger.conn.execute("SELECT hash FROM requests")
            next(rows)
            raise KeyboardInterrupt  # the read is still open as the counter unwinds
    ledger.conn.execute("UPDATE requests SET attempts=2")  # no trigger left without its table


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 0.17])
def test_a_lost_image_generated_again_is_paid_for_twice_and_the_budget_counts_both(tmp_path, emulator, backend_factory, budget):
    """Within one run, the images lost from the cache and generated again cost a second payment: the run's spend
    (status, the dataset's cost_usd) counts both, and a budget the first payments used up sends nothing more."""
    import shutil

    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"prompt number {i}"] for i in range(10)])
    s = settings(tmp_path, budget_usd=budget)
    pipeline.run(m, s, backend_factory=backend_factory)
    first = pipeline.status(s, refresh=False)["cost_usd"]
    generated = emulator.stats()["lines_processed"]
    assert first > 0 and generated == (10 if budget is None else 5)
    shutil.rmtree(tmp_path / "cache")  # the cache is cleaned
    again = pipeline.run(m, s, backend_factory=backend_factory)
    spent = pipeline.status(s, refresh=False)["cost_usd"]
    if budget is None:
        assert emulator.stats()["lines_processed"] == 20 and again.exit_code == 0
        assert spent == pytest.approx(2 * first, abs=1e-5)  # status rounds to 1e-6
        assert sum(r["cost_usd"] for r in metadata(s)) == pytest.approx(2 * first, abs=1e-5)
    else:
        assert emulator.stats()["lines_processed"] == 5 and again.jobs_created == 0, again.summary
        assert spent == pytest.approx(first) and spent <= budget


def test_status_collect_and_cancel_never_make_a_workdir(tmp_path, emulator_env):
    """In a directory with no run they say so (exit 2) and leave nothing behind (status once made .batcher/ledger.sqlite)."""
    runner = CliRunner()
    for args in (["status"], ["status", "--json"], ["collect"], ["cancel", "--all"]):
        r = runner.invoke(main, args + ["--workdir", str(tmp_path / "nothing")])
        assert r.exit_code == 2 and f"no run in {tmp_path / 'nothing'}" in r.output, (args, r.output)
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "empty").mkdir()
    pipeline.Ledger(tmp_path / "empty").close()  # a ledger without a run
    r = runner.invoke(main, ["status", "--workdir", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no run in" in r.output


def test_submit_to_the_emulator_that_dies_with_the_command_is_refused(tmp_path):
    runner = CliRunner()
    common = ["--workdir", str(tmp_path / "w"), "--backend", "emulator"]
    r = runner.invoke(main, ["submit", str(manifest(tmp_path))] + common)
    assert r.exit_code == 2 and "batcher run --backend emulator" in r.output and "batcher emulator" in r.output, r.output
    assert not (tmp_path / "w").exists()  # refused before anything was planned
    r = runner.invoke(main, ["submit", str(manifest(tmp_path)), "--dry-run"] + common)
    assert r.exit_code == 0, r.output  # a dry run reaches no emulator
    r = runner.invoke(main, ["collect"] + common)
    assert r.exit_code == 2 and "lives inside one command" in r.output


def images_on_disk(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}


def test_a_dataset_belongs_to_its_run(tmp_path, emulator, backend_factory):
    """Another manifest into the same workdir and dataset is refused before anything is done (it once rewrote the
    dataset's metadata and left the first run's images in it, named by no row); with --switch-manifest the dataset is
    rewritten for it and holds only the images its rows name. A new version of the same manifest moves on by itself."""
    s = settings(tmp_path)
    first = manifest(tmp_path)
    assert pipeline.run(first, s, backend_factory=backend_factory).exit_code == 0
    before = images_on_disk(s.out)
    assert before == {r["file_name"] for r in metadata(s) if r["file_name"]}
    other = manifest(tmp_path, [["x1", "a kite over the sea", "", "1", "sky"]], name="other.csv")
    with pytest.raises(UsageError, match="holds the run of another manifest") as info:
        pipeline.run(other, s, backend_factory=backend_factory)
    assert info.value.exit_code == 2 and "--switch-manifest" in str(info.value)
    with pytest.raises(UsageError, match="belongs to another workdir"):  # the same dataset from another workdir
        pipeline.run(first, settings(tmp_path, workdir=tmp_path / "elsewhere"), backend_factory=backend_factory)
    assert images_on_disk(s.out) == before and emulator.stats()["batches_created"] == 1  # nothing was done

    switched = pipeline.run(other, settings(tmp_path, switch_manifest=True), backend_factory=backend_factory)
    assert switched.exit_code == 0 and switched.dataset.removed == len(before), switched.summary
    assert images_on_disk(s.out) == {r["file_name"] for r in metadata(s)} and len(metadata(s)) == 1

    other.write_text(other.read_text() + "x2,a red kite,,1,sky\n", encoding="utf-8")  # tonight's version of it
    again = pipeline.run(other, s, backend_factory=backend_factory)
    assert again.exit_code == 0 and len(metadata(s)) == 2 and images_on_disk(s.out) == {r["file_name"] for r in metadata(s)}


def test_carried_columns_keep_their_arrow_types_and_the_request_settings_are_columns(tmp_path, emulator, backend_factory):
    """A Parquet list<string> column once came out as the text "['x', 'y']": every type that can go through the
    ledger and back keeps its Arrow type and values; the request's own settings, as sent, are columns too."""
    import datetime as dt
    import decimal

    import pyarrow as pa

    types = {
        "tags": pa.list_(pa.string()), "box": pa.struct([("w", pa.int32()), ("unit", pa.string())]),
        "shot_at": pa.timestamp("us", tz="UTC"), "price": pa.decimal128(9, 2), "team": pa.dictionary(pa.int32(), pa.string()),
        "day": pa.date32(), "blob": pa.binary(), "attrs": pa.map_(pa.string(), pa.int64()),
    }
    values = {
        "tags": [["x", "y"], []], "box": [{"w": 3, "unit": "cm"}, None], "shot_at": [dt.datetime(2026, 12, 5, 6, 30, tzinfo=dt.timezone.utc), None],
        "price": [decimal.Decimal("12.50"), decimal.Decimal("0.99")], "team": ["red", "blue"], "day": [dt.date(2026, 12, 5), None],
        "blob": [b"\x00\xff", None], "attrs": [[("a", 1)], []],
    }
    table = pa.table({"id": ["r1", "r2"], "prompt": ["a vase", "a cup"], "seed": [7, None], "aspect_ratio": ["16:9", None],
                      **{name: pa.array(values[name], type=t) for name, t in types.items()}})
    pq.write_table(table, tmp_path / "m.parquet")
    from batcher.manifest import ManifestOptions

    s = settings(tmp_path, manifest=ManifestOptions(temperature=0.4, variants=2))
    assert pipeline.run(tmp_path / "m.parquet", s, backend_factory=backend_factory).exit_code == 0
    out = pq.read_table(s.out / "metadata.parquet")
    for name, t in types.items():
        assert out.schema.field(name).type == t, name
        assert out.column(name).to_pylist()[::2] == table.column(name).to_pylist(), name  # 2 variants a row
    rows = out.to_pylist()
    assert [(r["id"], r["variant"], r["variants"], r["seed"], r["aspect_ratio"], r["temperature"]) for r in rows] == [
        ("r1", 0, 2, 7, "16:9", 0.4), ("r1", 1, 2, 7, "16:9", 0.4), ("r2", 0, 2, None, None, 0.4), ("r2", 1, 2, None, None, 0.4)]
    assert {r["image_size"] for r in rows} == {None} and {r["top_p"] for r in rows} == {None}


def test_a_collected_job_keeps_its_outcome_and_counts_images_and_blocked_apart(tmp_path, emulator, backend_factory):
    """status once showed every finished job as `collected`, counted a blocked line as OK (the API's count), and
    counted down to the window and expiry of jobs long finished; an expired job was said only in report.html."""
    from batcher.output.render import status_table

    emulator.configure(job_outcomes=["EXPIRED"])  # the first job expires; its requests go out again
    rows = [["a", "a red fox", "", "1", "x"], ["b", "a grey owl [emulator:image_safety]", "", "1", "x"], ["c", "a blue jay", "", "1", "x"]]
    s = settings(tmp_path)
    result = pipeline.run(manifest(tmp_path, rows), s, backend_factory=backend_factory)
    assert result.exit_code == 3, result.summary  # one blocked
    (expired, resent) = pipeline.status(s, refresh=False)["jobs"]
    assert f"job {expired['display_name']} expired (48 h); its 3 requests planned again" in result.summary
    assert (expired["outcome"], expired["collected"], expired["ok"], expired["blocked"]) == ("expired", True, 0, 0)
    assert (resent["outcome"], resent["ok"], resent["blocked"], resent["succeeded"]) == ("succeeded", 2, 1, 3)
    assert all(j["window_hours_left"] is None and j["expiry_hours_left"] is None for j in (expired, resent))
    table = status_table(pipeline.status(s, refresh=False))
    assert "expired, collected" in table and "succeeded, collected" in table and "images: 2 ok, 1 blocked" in table


@pytest.mark.parametrize("base, words", [
    ("127.0.0.1:9", "GOOGLE_GEMINI_BASE_URL='127.0.0.1:9' is not an http:// or https:// URL"),
    ("http://127.0.0.1:9", "cannot reach the Gemini API at http://127.0.0.1:9 (ConnectionRefusedError"),
    ("http://no-such-host.invalid", "cannot reach the Gemini API at http://no-such-host.invalid"),
])
def test_a_wrong_base_url_fails_at_once_naming_the_variable(tmp_path, monkeypatch, base, words):
    """It once took up to a minute of retries and never named GOOGLE_GEMINI_BASE_URL."""
    import time

    monkeypatch.setenv("GEMINI_API_KEY", "k")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", base)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    started = time.monotonic()
    r = CliRunner().invoke(main, ["run", str(manifest(tmp_path)), "--workdir", str(tmp_path / "w"), "-q"])
    assert r.exit_code in (1, 2) and words in r.output and "GOOGLE_GEMINI_BASE_URL" in r.output, r.output
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_the_readme_shows_the_summaries_the_demo_prints(tmp_path, monkeypatch, capsys):
    """The README's summary lines are what the commands print (the demo's two runs, on the seeded emulator)."""
    from batcher import demo

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- summary lines: tests/test_pipeline.py checks that the demo prints exactly these -->")[1]
    expected = [line for line in block.split("```")[1].splitlines() if line.strip() and line != "text"]
    monkeypatch.chdir(tmp_path)
    assert demo.main(tmp_path / "demo-out") == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("first run:", "second run:"))]
    assert printed == expected


def test_a_second_command_that_sends_nothing_says_it_paid_nothing(tmp_path, emulator, backend_factory):
    """A second run of a finished manifest once printed the run's whole cost as if paid again."""
    s, m = settings(tmp_path), manifest(tmp_path)
    first = pipeline.run(m, s, backend_factory=backend_factory)
    again = pipeline.run(m, s, backend_factory=backend_factory)  # the same run, done: nothing to send
    total = first.dataset.cost_usd
    assert total > 0 and f"paid now {usd(total)}, the run's images {usd(total)} in all" in first.summary
    assert again.jobs_created == 0 and f"paid now $0.00, the run's images {usd(total)} in all" in again.summary, again.summary

    m.write_text(m.read_text(), encoding="utf-8")  # a new version of the manifest: a new run, paid by the first
    tonight = pipeline.run(m, s, backend_factory=backend_factory)
    assert "(5 requests, 5 from the cache)" in tonight.summary and "paid now $0.00, the run's images $0.00 in all" in tonight.summary
