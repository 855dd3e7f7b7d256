"""Planning at scale: a plan that shards as it loads, rows prepared in a child process, and the journal of a
bulk load. Each fast path must end exactly where the plain path ends."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest

from batcher.planning import prepare
from batcher.errors import BatcherError, ManifestError
from batcher.ledger.plans import PlanTuning
from batcher.ledger import Ledger
from batcher.manifest import ManifestOptions
from batcher.planning.planner import ShardLimits, plan_manifest, shard
from batcher.storage.store import ImageStore

from .helpers import png_bytes, write_csv


MODELS = ("gemini-2.5-flash-image", "gemini-3-pro-image")


def mixed_manifest(tmp_path, n: int = 60):
    """Two models, image sizes, reference images, variants, shared prompts, extra columns and two bad rows."""
    (tmp_path / "a.png").write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "b.png").write_bytes(png_bytes((4, 5, 6)))
    rows = []
    for i in range(n):
        model = MODELS[i % 2]
        size = ["", "2K", "1K"][i % 3] if model == MODELS[1] else ""
        rows.append([f"r{i}", f"a prompt with ünïcode \"{i % 23}\"", model, size, ["", "a.png", "a.png|b.png"][i % 3],
                     str(1 + i % 2), f"c{i % 4}"])
    rows[11][1] = ""  # an empty prompt
    rows[40][3] = "7K"  # an image size no model has
    return write_csv(tmp_path / "m.csv", ["id", "prompt", "model", "image_size", "reference_images", "variants", "colour"], rows)


def jobs_of(ledger: Ledger) -> list[tuple]:
    """Each job's model, totals and requests in order; sorted, so job ids and creation order don't matter."""
    c = ledger.conn
    out = []
    for job in c.execute("SELECT * FROM jobs ORDER BY id"):
        members = [h for (h,) in c.execute("SELECT hash FROM requests WHERE job_id=? ORDER BY rowid", (job["id"],))]
        recorded = sorted(h for (h,) in c.execute("SELECT hash FROM job_requests WHERE job_id=?", (job["id"],)))
        assert recorded == sorted(members)
        assert job["display_name"] == f"batcher-{ledger.ledger_id}-job{job['id']:05d}" and job["state"] == "planned"
        out.append((job["model"], job["request_count"], job["input_bytes"], job["est_tokens"], tuple(members)))
    return sorted(out)


def states_of(ledger: Ledger) -> list[tuple]:
    return [tuple(r) for r in ledger.conn.execute(
        "SELECT hash, model, body_json, state, cached, variant, attempts, job_id IS NULL FROM requests ORDER BY rowid")]


def rows_of(ledger: Ledger) -> list[tuple]:
    return [tuple(r) for r in ledger.conn.execute("SELECT * FROM rows ORDER BY run_id, seq")]


def test_a_plan_that_shards_as_it_loads_makes_the_jobs_shard_makes(tmp_path):
    """Same limits, same token caps: the same requests in the same jobs with the same totals, whether the plan
    shards as it loads (an empty ledger, no budget) or `shard` runs after it."""
    m = mixed_manifest(tmp_path)
    store = ImageStore(tmp_path / "cache")
    probe = Ledger(tmp_path / "probe")
    plan_manifest(probe, None, m, ManifestOptions(), skip_invalid=True)
    for (h,) in probe.conn.execute("SELECT hash FROM requests ORDER BY rowid LIMIT 3"):
        store.put(h, png_bytes())  # three cache hits: never in a job
    limits = ShardLimits(max_requests=7, max_input_bytes=3_000)
    caps = {MODELS[0]: None, MODELS[1]: 9_000}.get
    after, inline = Ledger(tmp_path / "after"), Ledger(tmp_path / "inline")
    planned = plan_manifest(after, store, m, ManifestOptions(), skip_invalid=True)
    assert planned.jobs == [] and planned.cache_hits == 3
    made = shard(after, limits, token_cap_for=caps)
    result = plan_manifest(inline, store, m, ManifestOptions(), skip_invalid=True, shard_limits=limits, token_cap_for=caps)
    assert len(result.jobs) == len(made) > 4 and result.rejected == 2 and result.cache_hits == 3
    assert jobs_of(inline) == jobs_of(after)
    assert states_of(inline) == states_of(after)
    assert rows_of(inline) == rows_of(after)
    assert shard(inline, limits, token_cap_for=caps) == []  # nothing left for shard


def test_a_ledger_that_holds_requests_is_not_sharded_while_planning(tmp_path):
    """Sharding as it loads is only for an empty ledger: elsewhere requests already in jobs, cached or failed
    decide what is new, and `shard` does it."""
    m = mixed_manifest(tmp_path)
    ledger = Ledger(tmp_path / "wd")
    other = write_csv(tmp_path / "other.csv", ["id", "prompt"], [["x", "something else"]])
    first = plan_manifest(ledger, None, other, ManifestOptions(), shard_limits=ShardLimits())
    assert len(first.jobs) == 1
    second = plan_manifest(ledger, None, m, ManifestOptions(), skip_invalid=True, shard_limits=ShardLimits())
    assert second.jobs == [] and second.requests > 0
    assert ledger.conn.execute("SELECT COUNT(*) FROM requests WHERE state='planned'").fetchone()[0] == second.requests


def plan_with(monkeypatch, tmp_path, name: str, manifest, child: bool, **kw):
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1" if child else "0")
    ledger = Ledger(tmp_path / name)
    result = plan_manifest(ledger, ImageStore(tmp_path / "cache"), manifest, ManifestOptions(), **kw)
    return ledger, result


@pytest.mark.slow
@pytest.mark.parametrize("shard_limits", [None, ShardLimits(max_requests=5)])
def test_rows_prepared_in_a_child_process_are_the_rows_prepared_in_process(tmp_path, monkeypatch, shard_limits):
    m = mixed_manifest(tmp_path, n=120)
    tuning = PlanTuning(plan_batch_rows=16)
    rejects = {}
    outcomes = []
    for child in (False, True):
        name = "child" if child else "in-process"
        rejects[name] = tmp_path / f"{name}.csv"
        ledger, result = plan_with(monkeypatch, tmp_path, name, m, child, skip_invalid=True, rejects_path=rejects[name],
                                   shard_limits=shard_limits, tuning=tuning)
        outcomes.append((rows_of(ledger), states_of(ledger), jobs_of(ledger), result.rows, result.requests,
                         result.duplicates, result.rejected, rejects[name].read_text()))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][6] == 2 and ",13,prompt," in outcomes[0][7] and ",42,image_size,7K," in outcomes[0][7]


def test_invalid_rows_found_by_the_child_process_are_reported_as_in_process(tmp_path, monkeypatch):
    m = mixed_manifest(tmp_path)
    errors = []
    for child in (False, True):
        with pytest.raises(ManifestError) as info:
            plan_with(monkeypatch, tmp_path, f"wd{child}", m, child)
        errors.append((str(info.value), info.value.problems))
        ledger = Ledger(tmp_path / f"wd{child}")
        assert ledger.conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0  # nothing half-done
    assert errors[0] == errors[1] and len(errors[0][1]) == 2


@pytest.mark.slow
def test_a_duplicate_id_found_through_the_child_process_is_reported_with_its_first_row(tmp_path, monkeypatch):
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "one"], ["b", "two"], ["a", "three"]])
    with pytest.raises(ManifestError) as info:
        plan_with(monkeypatch, tmp_path, "wd", m, True)
    assert any("row 4" in p and "duplicate id (first used at row 2)" in p for p in info.value.problems)


def test_a_child_process_that_dies_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "one"]])
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1")
    monkeypatch.setenv("BATCHER_CRASH_AT", "prepare")  # read by the child: SIGKILL before its first batch
    ledger = Ledger(tmp_path / "wd")
    with pytest.raises(BatcherError, match=r"child process failed \(exit status -9\).*BATCHER_PLAN_PROCESS=0"):
        plan_manifest(ledger, None, m, ManifestOptions())
    assert ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_bad_plan_process_setting_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "yes")
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "one"]])
    with pytest.raises(BatcherError, match="BATCHER_PLAN_PROCESS='yes': expected 0"):
        plan_manifest(Ledger(tmp_path / "wd"), None, m, ManifestOptions())


def test_only_a_large_local_manifest_is_prepared_in_a_child(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.delenv(prepare.ENV_PLAN_PROCESS, raising=False)
    tuning = prepare.PrepareTuning(child_min_rows=50)
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(10)], "prompt": ["p"] * 10}), small)
    pq.write_table(pa.table({"id": [str(i) for i in range(60)], "prompt": ["p"] * 60}), large)
    monkeypatch.setattr(prepare.os, "sched_getaffinity", lambda pid: {0, 1})
    assert not prepare.use_child(small, tuning) and prepare.use_child(large, tuning)
    assert not prepare.use_child(large)  # at the default threshold, 60 rows are not worth a child
    assert not prepare.use_child(str(large), tuning)  # gs:// manifests are passed as text: read in-process
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1")
    assert prepare.use_child(small, tuning) and not prepare.use_child("gs://bucket/manifest.csv", tuning)  # even when forced
    monkeypatch.delenv(prepare.ENV_PLAN_PROCESS)
    monkeypatch.setattr(prepare.os, "sched_getaffinity", lambda pid: {0})
    assert not prepare.use_child(large, tuning)  # one CPU: nothing to overlap with


def test_a_bulk_load_writes_with_a_rollback_journal_and_gives_the_wal_back(tmp_path, monkeypatch):
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"p{i}"] for i in range(20)])
    modes = []  # the journal mode while each plan loads
    real_bulk_load = Ledger.bulk_load

    def spy(self, c):
        modes.append(c.execute("PRAGMA journal_mode").fetchone()[0])
        return real_bulk_load(self, c)

    monkeypatch.setattr(Ledger, "bulk_load", spy)
    ledger = Ledger(tmp_path / "wd")
    plan_manifest(ledger, None, m, ManifestOptions())
    # A reader holding the database open keeps the WAL: the plan still works, only slower.
    busy = Ledger(tmp_path / "wd2")
    reader = sqlite3.connect(tmp_path / "wd2" / "ledger.sqlite")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM runs").fetchone()
    plan_manifest(busy, None, m, ManifestOptions())
    reader.execute("COMMIT")
    reader.close()
    assert modes == ["delete", "wal"]
    for wd, mine in (("wd", ledger), ("wd2", busy)):
        assert mine.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        check = Ledger(tmp_path / wd)
        assert check.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal" and check.integrity_ok()
        assert check.conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 20


def test_a_child_that_dies_in_the_middle_of_a_batch_is_the_same_clear_error(tmp_path, monkeypatch):
    """Killed while it writes a frame (the OOM killer), not between two: the planner reads half a pickle."""
    import sys

    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "one"]])
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1")
    half_a_frame = ("import pickle, sys; frame = pickle.dumps(('batch', list(range(100_000))));"
                    "sys.stdout.buffer.write(frame[:5000]); sys.stdout.flush(); sys.exit(137)")
    monkeypatch.setattr(prepare, "module_command", lambda module: [sys.executable, "-c", half_a_frame])
    ledger = Ledger(tmp_path / "wd")
    with pytest.raises(BatcherError, match=r"child process failed \(exit status 137\)"):
        plan_manifest(ledger, None, m, ManifestOptions())
    assert ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_the_child_imports_this_batcher_not_one_in_the_current_directory(tmp_path, monkeypatch):
    """`python -m` puts the current directory first on the import path: a checkout of another batcher there
    would prepare (and hash) the rows. The child must import the planner's own copy."""
    shadow = tmp_path / "elsewhere" / "batcher"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the batcher in the current directory was imported')\n")
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "one"], ["b", "two"]])
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1")
    monkeypatch.chdir(shadow.parent)
    result = plan_manifest(Ledger(tmp_path / "wd"), None, m, ManifestOptions())
    assert result.rows == 2 and result.requests == 2


@pytest.mark.parametrize("child", [False, True])
def test_past_the_marking_bound_a_plan_still_shards_as_it_loads_and_mends_jobs_that_lost_a_copy(tmp_path, monkeypatch, child):
    """Past PrepareTuning.max_marked_requests the preparer stops marking repeats: their copies go into jobs too, the
    bulk load keeps the first copy, and a job counted with a removed copy is measured again from its members (one
    left with none is dropped). So no request is left for a second `shard` pass (at 10M rows that pass was ~100 s),
    and the jobs add up to what a plan that marked every repeat makes."""
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1" if child else "0")
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "model"], [[f"r{i}", f"p{i % 17}", MODELS[i % 2]] for i in range(200)])
    limits = ShardLimits(max_requests=4)
    totals = []
    for marked in (5, 1000):
        ledger = Ledger(tmp_path / f"wd-{marked}")
        result = plan_manifest(ledger, None, m, ManifestOptions(), shard_limits=limits, tuning=PlanTuning(plan_batch_rows=8),
                               prepare_tuning=prepare.PrepareTuning(max_marked_requests=marked))
        c = ledger.conn
        assert result.requests == 34 and result.duplicates == 200 - 34
        assert c.execute("SELECT COUNT(*) FROM requests WHERE state<>'queued'").fetchone()[0] == 0  # none left for shard
        members = [h for (h,) in c.execute("SELECT hash FROM job_requests")]
        assert len(members) == len(set(members)) == 34  # every request in exactly one job
        assert sorted(result.jobs) == [j for (j,) in c.execute("SELECT id FROM jobs ORDER BY id")]  # none empty, none lost
        for job in c.execute("SELECT id, request_count FROM jobs"):
            assert 1 <= c.execute("SELECT COUNT(*) FROM job_requests WHERE job_id=?", (job[0],)).fetchone()[0] == job[1] <= 4
        totals.append(c.execute("SELECT SUM(request_count), SUM(input_bytes), SUM(est_tokens) FROM jobs").fetchone()[:])
    mended, marked_all = totals
    assert mended == marked_all


@pytest.mark.parametrize("value", ["", "plain", 'a "quote" and \\ backslash', "ünïcode 中文 😀", "\x00\x1f\u2028", 0, -7, 10**30,
                                   True, False, None, 1.5, float("nan"), float("inf"), [1, "a"], {"k": "v"}, b"raw"])
def test_extra_columns_are_stored_as_json_dumps_writes_them(value):
    """prepare.extra_json is a faster json.dumps(extra, default=str, ensure_ascii=False): the same text for every
    kind of value a manifest's extra column can hold, in any position, under any column name."""
    import json

    for extra in ({"colour": value}, {"ü \"name\"": value, "after": "x"}, {"before": 1, "colour": value}):
        assert prepare.extra_json(extra) == json.dumps(extra, default=str, ensure_ascii=False)


def _prepared(manifest, options: ManifestOptions, cache, columns: bool) -> list:
    # Several blocks of 16 rows, cut across batches of 7 rows.
    tuning = prepare.PrepareTuning(manifest_block_rows=16, columns_at_a_time=columns)
    return list(prepare.prepared_batches(manifest, options, prepare.References(), 7, str(cache), tuning=tuning))


@pytest.mark.parametrize("options", [ManifestOptions(), ManifestOptions(variants=3, temperature=0.4, aspect_ratio="16:9")])
def test_rows_that_share_their_settings_are_prepared_a_column_at_a_time_as_a_row_at_a_time(tmp_path, monkeypatch, options):
    """A block of rows with the same settings and no problems is prepared from its columns: same batches (rows,
    requests, hashes, bodies, extra columns' JSON, cache hits, problems, batch cuts) as row by row, whether
    blocks are uniform or not, in Parquet (typed extra columns) or CSV (a quoted prompt over two lines)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 60
    prompts = [f"a prompt with ünïcode \"{i % 23}\"\\ {'😀' * (i % 2)}" for i in range(n)]
    prompts[37] = ""  # a bad row: its block goes row by row, the others a column at a time
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "id": [f"r{i}" for i in range(n)], "prompt": prompts,
        "label": [None if i % 5 == 0 else f"l{i}\n\t" for i in range(n)],
        "count": pa.array([None if i % 7 == 0 else i - 30 for i in range(n)], pa.int64()),
        "flag": [i % 3 == 0 for i in range(n)],
        "score": [i / 7 if i >= 48 else None for i in range(n)],  # floats (the last block): not extra_json's own kinds
    }), parquet)
    rows = [[f"r{i}", prompts[i] if i != 12 else "two\nlines", f"c{i % 4}"] for i in range(n)]
    csv = write_csv(tmp_path / "m.csv", ["id", "prompt", "colour"], rows)
    bare = write_csv(tmp_path / "bare.csv", ["prompt"], [[p] for p in prompts[:20]])  # no id, no extra columns
    for manifest in (parquet, csv, bare):
        cache = tmp_path / f"cache-{manifest.name}"
        store = ImageStore(cache)
        by_row = _prepared(manifest, options, cache, columns=False)
        hits = {b.hashes[0] for b in by_row[:2]}
        for h in hits:
            store.put(h, png_bytes())  # some cache hits
        by_row = _prepared(manifest, options, cache, columns=False)
        by_column = _prepared(manifest, options, cache, columns=True)
        assert by_column == by_row, manifest
        assert [c for b in by_row for c in b.cached] == [h in hits for b in by_row for h in b.hashes] and len(hits) == 2
        assert sum(len(b.problems) for b in by_row) == (0 if manifest == bare else 1)  # the empty prompt


@pytest.mark.parametrize("known_max, bound", [(10**6, None), (10**6, 3), (0, None), (0, 3)])
def test_a_plan_into_a_ledger_that_holds_requests_counts_its_distinct_requests(tmp_path, monkeypatch, known_max, bound):
    """A run's distinct requests are counted as its rows load, whether the plan reads the ledger's requests once
    or asks SQL a batch at a time (and past the bound on what it keeps, in SQL at the end): the same figure as
    COUNT(DISTINCT) over its rows, with rows sharing requests, a request of another run, and a duplicate id."""

    tuning = PlanTuning(known_max_requests=known_max, inline_max_requests=bound if bound is not None else PlanTuning().inline_max_requests, plan_batch_rows=4)
    ledger = Ledger(tmp_path / "wd")
    plan_manifest(ledger, None, write_csv(tmp_path / "a.csv", ["id", "prompt"], [["x", "shared"], ["y", "only a"]]),
                  ManifestOptions(), tuning=tuning)
    rows = [[f"r{i}", "shared" if i % 5 == 0 else f"prompt {i % 7}"] for i in range(30)]
    rows[9][0] = "r2"  # a duplicate id: its batch goes a row at a time
    result = plan_manifest(ledger, None, write_csv(tmp_path / "b.csv", ["id", "prompt"], rows), ManifestOptions(),
                           skip_invalid=True, tuning=tuning)
    c = ledger.conn
    distinct = c.execute("SELECT COUNT(DISTINCT request_hash) FROM rows WHERE run_id=?", (result.run_id,)).fetchone()[0]
    assert result.requests == distinct == 8 and result.rejected == 1
    assert c.execute("SELECT request_count FROM runs WHERE id=?", (result.run_id,)).fetchone()[0] == distinct


def test_a_request_cached_in_one_batch_and_gone_in_a_later_one_is_recorded_once_and_never_queued(tmp_path, monkeypatch):
    """Asked one hash at a time (a cache past its listing limit), an image pruned while the plan runs makes a
    request a hit in its first batch and a miss in a later one: it stays the first batch's cache hit, in no
    job, and every job holds exactly the requests it counts (its JSONL can be written)."""
    from batcher.storage import store as store_mod
    from batcher.jobs.lifecycle import write_jsonl

    monkeypatch.setattr(store_mod, "MAX_LISTED_HASHES", 0)
    tuning = PlanTuning(plan_batch_rows=5)
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "0")
    prompts = ["shared"] + [f"p{i}" for i in range(1, 12)] + ["shared"]  # rows 1 and 13: batches 1 and 3
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", p] for i, p in enumerate(prompts)])
    store = ImageStore(tmp_path / "cache")
    shared = next(prepare.prepared_batches(m, ManifestOptions(), prepare.References(), 100)).hashes[0]
    image = store.put(shared, png_bytes())
    real_batches = prepare.batches

    def pruned_after_the_first(*args, **kwargs):
        for k, b in enumerate(real_batches(*args, **kwargs)):
            yield b
            if k == 0:
                image.unlink()

    monkeypatch.setattr(prepare, "batches", pruned_after_the_first)  # the planner imports it as it plans
    ledger = Ledger(tmp_path / "wd")
    result = plan_manifest(ledger, store, m, ManifestOptions(), shard_limits=ShardLimits(max_requests=100), tuning=tuning)
    c = ledger.conn
    assert [tuple(r) for r in c.execute("SELECT state, cached, job_id FROM requests WHERE hash=?", (shared,))] == \
        [("succeeded", 1, None)]
    assert result.jobs and result.cache_hits == 1
    for job_id in result.jobs:
        job = ledger.job(job_id)
        queued = c.execute("SELECT COUNT(*) FROM requests WHERE job_id=? AND state='queued'", (job_id,)).fetchone()[0]
        members = c.execute("SELECT COUNT(*) FROM job_requests WHERE job_id=?", (job_id,)).fetchone()[0]
        assert job["request_count"] == queued == members == 11
        write_jsonl(ledger, job_id, {})


def test_requests_keep_manifest_order_with_cache_hits_among_them(tmp_path, monkeypatch):
    """Requests go into the ledger in manifest order, cache hits among the rest: re-planned later (--refresh),
    `shard` packs them by rowid, so each job's JSONL still follows the manifest."""
    import json


    tuning = PlanTuning(plan_batch_rows=7)
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"p{i}"] for i in range(30)])
    store = ImageStore(tmp_path / "cache")
    probe = Ledger(tmp_path / "probe")
    plan_manifest(probe, None, m, ManifestOptions(), tuning=tuning)
    for (h,) in probe.conn.execute("SELECT hash FROM requests ORDER BY rowid").fetchall()[::3]:
        store.put(h, png_bytes())  # every third request is a cache hit
    for sharded in (False, True):
        ledger = Ledger(tmp_path / f"wd-{sharded}")
        limits = {"shard_limits": ShardLimits(max_requests=10)} if sharded else {}
        assert plan_manifest(ledger, store, m, ManifestOptions(), **limits, tuning=tuning).cache_hits == 10
        prompts = [json.loads(b)["contents"][0]["parts"][0]["text"]
                   for (b,) in ledger.conn.execute("SELECT body_json FROM requests ORDER BY rowid")]
        assert prompts == [f"p{i}" for i in range(30)]
        plan_manifest(ledger, store, m, ManifestOptions(), refresh=True, tuning=tuning)
        jobs = shard(ledger, ShardLimits(max_requests=10))
        first = [json.loads(b)["contents"][0]["parts"][0]["text"] for (b,) in ledger.conn.execute(
            "SELECT body_json FROM requests WHERE job_id=? ORDER BY rowid", (jobs[0],))]
        # Sharded as it loaded, the misses are in that plan's jobs: the re-planned hits make the new one.
        assert first == ([f"p{i}" for i in range(0, 30, 3)] if sharded else [f"p{i}" for i in range(10)])


@pytest.mark.slow
@pytest.mark.parametrize("child", [False, True])
@pytest.mark.parametrize("marked", [None, 5])
def test_a_bulk_load_leaves_out_repeated_requests_instead_of_removing_them_afterwards(tmp_path, monkeypatch, child, marked):
    """Rows that share a request (cache hits and not, within a batch and across batches) have it written once
    in a bulk load: the preparer marks repeats (PreparedBatch.repeated), so Ledger.bulk_load has no copies to
    remove (~2 s per million requests). Past the marking bound copies go in and are removed: same ledger."""

    prepare_tuning = prepare.PrepareTuning(max_marked_requests=marked or 2_000_000)  # the child gets it too
    tuning = PlanTuning(plan_batch_rows=8)
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "colour"], [[f"r{i}", f"p{i % 17}", f"c{i % 3}"] for i in range(90)])
    store = ImageStore(tmp_path / "cache")
    probe = Ledger(tmp_path / "probe")
    plan_manifest(probe, None, m, ManifestOptions(), tuning=tuning)
    for (h,) in probe.conn.execute("SELECT hash FROM requests ORDER BY rowid").fetchall()[::4]:
        store.put(h, png_bytes())  # 5 of the 17 requests are cache hits
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1" if child else "0")
    outcomes = []
    for limits in (None, ShardLimits(max_requests=7)):
        ledger = Ledger(tmp_path / f"wd-{limits is not None}")
        statements: list[str] = []
        ledger.conn.set_trace_callback(statements.append)
        result = plan_manifest(ledger, store, m, ManifestOptions(), shard_limits=limits, tuning=tuning,
                               prepare_tuning=prepare_tuning)
        ledger.conn.set_trace_callback(None)
        removed = any(s.startswith("DELETE FROM requests WHERE rowid NOT IN") for s in statements)
        assert removed == (marked is not None), statements[-5:]  # past the bound, in the child as in-process
        assert result.duplicates == 90 - 17 and result.cache_hits == 5
        outcomes.append((states_of(ledger), rows_of(ledger), jobs_of(ledger)))
        if limits is not None:
            for job_id in result.jobs:
                queued = ledger.conn.execute("SELECT COUNT(*) FROM requests WHERE job_id=? AND state='queued'",
                                             (job_id,)).fetchone()[0]
                assert ledger.job(job_id)["request_count"] == queued
    plain, sharded = outcomes
    assert plain[1] == sharded[1]  # the same rows
    assert [r[:3] for r in plain[0]] == [r[:3] for r in sharded[0]]  # the same requests, in the same order


def _last_nights_workdir(tmp_path) -> tuple[Ledger, ImageStore, list[str]]:
    """A ledger whose 12 requests (p0..p11) ended last night in every state a request can be in: two done with
    their images in the cache, one done but its image pruned, queued, failed, blocked and left planned."""
    store = ImageStore(tmp_path / "cache")
    ledger = Ledger(tmp_path / "wd")
    plan_manifest(ledger, store, write_csv(tmp_path / "a.csv", ["id", "prompt"], [[f"a{i}", f"p{i}"] for i in range(12)]),
                  ManifestOptions())
    hashes = [h for (h,) in ledger.conn.execute("SELECT hash FROM requests ORDER BY rowid")]
    states = ["succeeded", "succeeded", "succeeded", "queued", "failed", "blocked", "planned",
              "succeeded", "failed", "blocked", "queued", "planned"]
    with ledger.transaction() as c:
        for h, state in zip(hashes, states):
            c.execute("UPDATE requests SET state=?, attempts=2, cached=? WHERE hash=?", (state, int(h == hashes[1]), h))
    for i in (0, 1, 7):
        store.put(hashes[i], png_bytes())  # hashes[2]: done, but its image is gone
    return ledger, store, hashes


@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("retry_blocked", [False, True])
def test_a_plan_into_last_nights_ledger_looks_requests_up_in_a_map_as_in_sql(tmp_path, monkeypatch, refresh, retry_blocked):
    """Tonight's manifest (last night's requests in every state, new ones, repeats within a batch and across
    batches, a duplicate id) gives the same ledger, summary and counts whether the plan looks the ledger's
    requests up in a dict read once (KNOWN_MAX_REQUESTS) or in SQL a batch at a time; and the plan's own
    counts of its requests' states are those SQL counts."""
    import shutil

    from batcher import pipeline

    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "0")
    _last_nights_workdir(tmp_path / "night1")
    prompts = [f"p{i % 12}" for i in range(0, 24, 2)] + [f"p{i}" for i in range(12)] + ["new 1", "new 2", "new 1", "p3"]
    rows = [[f"r{i}", p] for i, p in enumerate(prompts)]
    rows[26][0] = "r5"  # a duplicate id: its batch goes a row at a time
    tonight = write_csv(tmp_path / "b.csv", ["id", "prompt"], rows)
    outcomes = []
    for bound in (PlanTuning().known_max_requests, 0):
        tuning = PlanTuning(plan_batch_rows=4, known_max_requests=bound)
        night = tmp_path / f"night2-{bound}"
        shutil.copytree(tmp_path / "night1", night)
        ledger, store = Ledger(night / "wd"), ImageStore(night / "cache")
        result = plan_manifest(ledger, store, tonight, ManifestOptions(), refresh=refresh, retry_blocked=retry_blocked,
                               skip_invalid=True, tuning=tuning)
        counts = pipeline.run_counts(ledger, result.run_id)
        assert result.states == counts  # kept as it planned, in either mode
        outcomes.append((states_of(ledger), rows_of(ledger), result.requests, result.cache_hits, result.duplicates,
                         result.rejected, counts))
    in_map, in_sql = outcomes
    assert in_map == in_sql
    counts = in_map[-1]
    assert in_map[2] == 14 and in_map[5] == 1 and sum(counts.values()) == 14
    # What each of last night's states called for (queued ones stay in their jobs whatever the options).
    assert counts["queued"] == 2 and counts["blocked"] == (0 if retry_blocked or refresh else 2)
    assert counts["succeeded"] == (0 if refresh else 3) and in_map[3] == (0 if refresh else 1)


@pytest.mark.parametrize("leftover", [False, True])
def test_a_dry_runs_counts_after_sharding_are_the_runs_counts(tmp_path, monkeypatch, leftover):
    """The counts a dry run prints come from the plan's own when every planned request is the run's, and from
    SQL when another run left planned requests that shard may take first: the same as counting the run."""
    from batcher import pipeline

    tuning = PlanTuning(plan_batch_rows=4)
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "0")
    ledger, store, hashes = _last_nights_workdir(tmp_path)
    if not leftover:  # last night's planned requests went into jobs
        ledger.conn.execute("UPDATE requests SET state='queued' WHERE state='planned'")
        ledger.conn.commit()
    # Tonight: done, pruned and failed requests (planned again), a queued one and three new ones.
    rows = [[f"r{i}", p] for i, p in enumerate(["p0", "p2", "p4", "p10", "new 1", "new 2", "new 3"])]
    result = plan_manifest(ledger, store, write_csv(tmp_path / "b.csv", ["id", "prompt"], rows), ManifestOptions(), tuning=tuning)
    planned_before = ledger.count_in_state("planned")
    assert (planned_before == result.states["planned"]) == (not leftover)
    new = shard(ledger, ShardLimits(max_requests=2), limit_requests=3)  # in rowid order: a leftover (p6) among them
    assert new
    counts = pipeline.counts_after_shard(ledger, result, planned_before, new)
    assert counts == pipeline.run_counts(ledger, result.run_id)
    assert counts["queued"] == (1 + 3 if not leftover else 1 + 2) and sum(counts.values()) == 7


@pytest.mark.parametrize("new_for_big_cache, known_max, takes_it", [(100, 10**6, False), (3, 10**6, True), (100, 0, True)])
def test_a_plan_into_last_nights_ledger_takes_the_big_page_cache_only_when_it_needs_it(
        tmp_path, monkeypatch, new_for_big_cache, known_max, takes_it):
    """Looking requests up in a dict, a plan that makes few new requests keeps SQLite's small page cache (the
    big one would only hold the rows it appends); many new ones, or probing the hash index per request, take
    it. Either way the ledger's own setting is back afterwards."""
    from batcher.ledger.core import BULK_CACHE_KIB

    tuning = PlanTuning(plan_batch_rows=4, new_requests_for_big_cache=new_for_big_cache, known_max_requests=known_max)
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "0")
    ledger, store, _ = _last_nights_workdir(tmp_path)
    before = ledger.conn.execute("PRAGMA cache_size").fetchone()[0]
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    rows = [[f"r{i}", f"p{i % 12}" if i < 12 else f"new {i}"] for i in range(18)]
    plan_manifest(ledger, store, write_csv(tmp_path / "b.csv", ["id", "prompt"], rows), ManifestOptions(), tuning=tuning)
    ledger.conn.set_trace_callback(None)
    assert (f"PRAGMA cache_size=-{BULK_CACHE_KIB}" in statements) == takes_it
    assert ledger.conn.execute("PRAGMA cache_size").fetchone()[0] == before


@pytest.mark.parametrize("known_max", [10**6, 0])
def test_a_done_request_whose_image_goes_while_last_nights_ledger_is_planned_again_is_planned(tmp_path, monkeypatch, known_max):
    """In a ledger that holds requests, a done request seen in one batch and again in a later one, after its image
    was pruned from a cache asked one hash at a time, is planned again: whether the plan looks requests up in
    its dict or in SQL (which reads the state again), as before the dict."""
    from batcher import pipeline

    tuning = PlanTuning(known_max_requests=known_max, plan_batch_rows=1)
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "0")
    ledger, store, hashes = _last_nights_workdir(tmp_path)  # p0: done, its image in the cache
    real_batches = prepare.batches

    def pruned_after_the_first(*args, **kwargs):
        for k, b in enumerate(real_batches(*args, **kwargs)):
            yield b
            if k == 0:
                store.find(hashes[0]).unlink()

    class AskedOneByOne(ImageStore):  # past its listing limit, or a gs:// cache without list_dir
        def has(self, h):
            return super().has(h)

    monkeypatch.setattr(prepare, "batches", pruned_after_the_first)  # the planner imports it as it plans
    result = plan_manifest(ledger, AskedOneByOne(tmp_path / "cache"),
                           write_csv(tmp_path / "b.csv", ["id", "prompt"], [["r0", "p0"], ["r1", "p0"]]), ManifestOptions(), tuning=tuning)
    assert tuple(ledger.conn.execute("SELECT state, cached FROM requests WHERE hash=?", (hashes[0],)).fetchone()) == ("planned", 0)
    assert pipeline.run_counts(ledger, result.run_id)["planned"] == 1 and result.cache_hits == 0
    if result.states is not None:
        assert result.states["planned"] == 1



def index_definitions(c: sqlite3.Connection) -> dict[str, str]:
    return {name: " ".join(sql.split()) for name, sql in c.execute("SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}


def _plan_tables(ledger: Ledger, run_id: int) -> tuple:
    c = ledger.conn
    requests = c.execute("SELECT hash, model, body_json, state, cached, variant FROM requests ORDER BY rowid").fetchall()
    rows = c.execute("SELECT seq, row, id, variant, request_hash, prompt, extra_json FROM rows WHERE run_id=? ORDER BY seq",
                     (run_id,)).fetchall()
    return [tuple(r) for r in requests], [tuple(r) for r in rows]


@pytest.mark.parametrize("duplicate_id", [False, True])
def test_planning_an_empty_ledger_in_bulk_gives_what_planning_with_indexes_gives(tmp_path, monkeypatch, duplicate_id):
    """An empty ledger is loaded without its indexes (Ledger.bulk_load). Rows sharing a request across batches,
    variants, cache hits, extra columns and a duplicate id must end exactly as on the indexed path (a ledger that
    already holds a request), problems included; and every index is back afterwards."""
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import plan_manifest

    from .helpers import png_bytes, write_csv

    tuning = PlanTuning(plan_batch_rows=4)
    bulk_loads = []  # how each bulk load ended: the bulk path must really be taken
    real_bulk_load = Ledger.bulk_load

    @contextlib.contextmanager
    def spy(self, c):
        try:
            with real_bulk_load(self, c):
                yield
        except sqlite3.IntegrityError:
            bulk_loads.append("duplicate id")
            raise
        bulk_loads.append("done")

    monkeypatch.setattr(Ledger, "bulk_load", spy)
    rows = [[f"r{i}", f"prompt {i % 7}", str(1 + i % 2), f"c{i % 3}"] for i in range(30)]
    if duplicate_id:
        rows[17][0] = "r5"
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "variants", "colour"], rows)
    options = ManifestOptions()
    store = ImageStore(tmp_path / "cache")
    outcomes = []
    migrated_indexes = index_definitions(Ledger(tmp_path / "migrated").conn)
    assert {"requests_by_hash", "requests_by_state", "requests_by_job", "rows_by_id"} <= set(migrated_indexes)
    for name in ("bulk", "indexed"):
        ledger = Ledger(tmp_path / name)
        if name == "indexed":  # one unrelated request: not an empty ledger, so the indexed path
            other = write_csv(tmp_path / "other.csv", ["id", "prompt"], [["x", "something else"]])
            plan_manifest(ledger, store, other, options, tuning=tuning)
        if not outcomes:  # cache hits: the images of two of the requests
            first = plan_manifest(Ledger(tmp_path / "probe"), None, m, options, skip_invalid=True, tuning=tuning)
            probe = Ledger(tmp_path / "probe").conn
            for (h,) in probe.execute("SELECT hash FROM requests ORDER BY rowid LIMIT 2"):
                store.put(h, png_bytes())
            assert first.requests == 14
        problems_path = tmp_path / f"{name}-rejects.csv"
        result = plan_manifest(ledger, store, m, options, skip_invalid=True, rejects_path=problems_path, tuning=tuning)
        requests, plan_rows = _plan_tables(ledger, result.run_id)
        if name == "indexed":
            requests = [r for r in requests if r[2].find("something else") < 0]
        outcomes.append((requests, plan_rows, (result.rows, result.requests, result.cache_hits, result.duplicates,
                                               result.rejected), problems_path.read_text() if duplicate_id else None))
        assert index_definitions(ledger.conn) == migrated_indexes  # each index as the migrations define it (BULK_INDEXES agrees with them)
        assert ledger.integrity_ok()
    bulk, indexed = outcomes
    # The probe's, the "bulk" ledger's, then the unrelated request's; the "indexed" ledger's plan takes none.
    ended = "duplicate id" if duplicate_id else "done"
    assert bulk_loads == [ended, ended, "done"]
    assert bulk == indexed
    # 30 rows, 45 requests with their variants, 14 distinct; the duplicate id (row 19, two variants) is rejected.
    assert bulk[2] == ((29, 14, 2, 43 - 14, 1) if duplicate_id else (30, 14, 2, 45 - 14, 0))
    if duplicate_id:
        assert "duplicate id (first used at row 7)" in bulk[3] and ",19," in bulk[3]


def test_shard_estimates_match_the_per_request_formulas(tmp_path):
    """shard measures bodies in SQLite (bytes, characters, image size, reference count); its job totals must
    equal the Python formulas applied to each stored body."""
    from batcher.ledger import QUEUED
    from batcher.manifest import ManifestOptions
    from batcher.planning.packing import ShardLimits, expected_output_bytes
    from batcher.planning.planner import plan_manifest, shard
    from batcher.cost.tokens import request_tokens
    from batcher.planning.requests import image_size_of

    from .helpers import png_bytes, write_csv

    (tmp_path / "a.png").write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "b.png").write_bytes(png_bytes((4, 5, 6)))
    rows = [[f"r{i}", f"a prompt with ünïcode and \"quotes\" {i}", ["1K", "2K", ""][i % 3],
             ["", "a.png", "a.png|b.png"][i % 3]] for i in range(30)]
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "image_size", "reference_images"], rows)
    ledger = Ledger(tmp_path / "wd")
    plan_manifest(ledger, None, m, ManifestOptions(model="gemini-3-pro-image"))
    jobs = shard(ledger, ShardLimits(max_requests=7))
    assert len(jobs) == 5
    for job_id in jobs:
        job = ledger.job(job_id)
        bodies = [b for (b,) in ledger.conn.execute(
            "SELECT r.body_json FROM job_requests jr JOIN requests r ON r.hash=jr.hash WHERE jr.job_id=? AND r.state=? AND r.job_id=?",
            (job_id, QUEUED, job_id))]
        assert len(bodies) == job["request_count"]
        assert job["input_bytes"] == sum(len(b.encode()) + 120 for b in bodies)
        assert job["est_tokens"] == sum(request_tokens(job["model"], b, image_size_of(b)) for b in bodies)
    assert any('"fileData"' in b for (b,) in ledger.conn.execute("SELECT body_json FROM requests"))
    assert expected_output_bytes("gemini-3-pro-image", "2K") != expected_output_bytes("gemini-3-pro-image", "1K")


@pytest.mark.parametrize("child", [False, True])
def test_the_child_packs_jobs_with_the_runs_prices(tmp_path, monkeypatch, child):
    """A job spec's prices (here: 10,000 tokens an image) size requests against the token cap in the child process
    as in-process: no job holds more enqueued tokens than its model's cap."""
    from batcher.cost.pricing import default_table, use_prices
    from batcher.cost.tokens import enqueued_tokens

    model = "gemini-3.1-flash-image"
    table = default_table().with_overrides({model: {"tokens_per_image": {"1K": 10_000}}})
    monkeypatch.setenv(prepare.ENV_PLAN_PROCESS, "1" if child else "0")
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"prompt {i}"] for i in range(10)])
    ledger = Ledger(tmp_path / "wd")
    cap = 25_000  # two requests of 10,000+ tokens fit, three do not
    with use_prices(table):
        result = plan_manifest(ledger, None, m, ManifestOptions(model=model), shard_limits=ShardLimits(),
                               token_cap_for=lambda _m: cap)
        held = [sum(enqueued_tokens(model, len(b), 0, None) for (b,) in ledger.conn.execute(
            "SELECT body_json FROM requests WHERE job_id=?", (j,))) for j in result.jobs]
    assert len(held) == 5 and max(held) <= cap, held
