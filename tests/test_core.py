"""Identities and state: golden request hashes, the ledger's migrations and transitions, the cache store."""

from __future__ import annotations

import contextlib
import io
import sqlite3

import pytest
from PIL import Image

from batcher.errors import LedgerError
from batcher.ledger.plans import PlanTuning
from batcher.ledger import MIGRATIONS, Ledger, connect, migrate, schema_version
from batcher.planning.requests import ImageRequest, ReferenceImage, request_body, request_hash, resolve_references
from batcher.storage.store import ImageStore, InvalidImage

# Pinned: these values must never change without bumping HASH_SCHEMA_VERSION (every cache would go cold).
GOLDEN = [
    (ImageRequest(model="gemini-2.5-flash-image", prompt="a red fox in snow"),
     "507174e1630029e0279a0b37e8c015d613bfa5385457fc6168ccca9af697f99c"),
    (ImageRequest(model="gemini-3-pro-image-preview", prompt="a red fox in snow", variant=2, aspect_ratio="16:9",
                  image_size="2K", temperature=0.7, seed=42, system_instruction="photoreal",
                  references=(ReferenceImage("ab" * 32, "image/png", "/x.png"),)),
     "49502281de2688075c294ea7d55a40f3608b498ee5b2901c8c86c5a8e69d528f"),
]


@pytest.mark.parametrize("req, expected", GOLDEN)
def test_golden_request_hashes(req, expected):
    assert request_hash(req) == expected


def test_hash_depends_on_everything_that_determines_the_output():
    base = ImageRequest(model="gemini-2.5-flash-image", prompt="p")
    variants = [
        ImageRequest(model="gemini-3-pro-image-preview", prompt="p"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p "),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", variant=1),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", aspect_ratio="1:1"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", seed=1),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", temperature=1.0),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", system_instruction="s"),
        ImageRequest(model="gemini-2.5-flash-image", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/a"),)),
    ]
    hashes = {request_hash(v) for v in variants} | {request_hash(base)}
    assert len(hashes) == len(variants) + 1
    # ...but not on where a reference image lives: the same bytes elsewhere are the same request.
    a = ImageRequest(model="m", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/a.png"),))
    b = ImageRequest(model="m", prompt="p", references=(ReferenceImage("0" * 64, "image/png", "/b/c.png"),))
    assert request_hash(a) == request_hash(b)
    assert request_hash(ImageRequest(model="models/m", prompt="p")) == request_hash(ImageRequest(model="m", prompt="p"))


def test_request_body_is_an_image_generate_content_request():
    body = request_body(ImageRequest(model="m", prompt="a cat", aspect_ratio="3:2", image_size="2K", seed=5,
                                     system_instruction="studio", references=(ReferenceImage("f" * 64, "image/jpeg", "/r.jpg"),)))
    assert body["generationConfig"] == {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "3:2", "imageSize": "2K"}, "seed": 5}
    assert body["systemInstruction"] == {"parts": [{"text": "studio"}]}
    resolved = resolve_references(body, {"f" * 64: "https://x/v1beta/files/abc"})
    assert resolved["contents"][0]["parts"][0] == {"fileData": {"fileUri": "https://x/v1beta/files/abc", "mimeType": "image/jpeg"}}
    with pytest.raises(KeyError):
        resolve_references(body, {})


def test_blank_ledger_gets_every_migration(tmp_path):
    ledger = Ledger(tmp_path)
    assert schema_version(ledger.conn) == len(MIGRATIONS)
    tables = {r[0] for r in ledger.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "rows", "requests", "jobs", "job_requests", "uploads", "reference_files", "meta"} <= tables
    assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.integrity_ok()
    ledger_id = ledger.ledger_id
    ledger.close()
    assert Ledger(tmp_path).ledger_id == ledger_id  # stable: display names depend on it


def test_a_newer_ledger_is_refused(tmp_path):
    conn = connect(tmp_path / "ledger.sqlite")
    migrate(conn)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(LedgerError, match="upgrade batcher"):
        migrate(conn)


def test_impossible_transitions_are_refused(tmp_path):
    ledger = Ledger(tmp_path)
    with ledger.transaction() as c:
        c.execute("INSERT INTO jobs(display_name, model, state, request_count, created_at, updated_at) VALUES ('j','m','planned',1,0,0)")
    with pytest.raises(LedgerError, match="cannot go from planned to submitted"):
        with ledger.transaction() as c:
            ledger.job_transition(c, 1, ("creating",), "submitted")
    with ledger.transaction() as c:
        ledger.job_transition(c, 1, ("planned",), "uploading")
    assert ledger.job(1)["state"] == "uploading"


def png_bytes(color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def test_store_verifies_and_writes_atomically(tmp_path):
    store = ImageStore(tmp_path)
    h = "a" * 64
    assert not store.has(h)
    path = store.put(h, png_bytes(), {"model": "m"})
    assert store.find(h) == path and path.suffix == ".png" and store.meta(h) == {"model": "m"}
    with pytest.raises(InvalidImage):
        store.put("b" * 64, b"not an image at all")
    with pytest.raises(InvalidImage):
        store.put("c" * 64, png_bytes()[:40])  # truncated
    assert not store.has("b" * 64) and not store.has("c" * 64)
    assert not list(tmp_path.rglob(".tmp-*"))
    with pytest.raises(ValueError):
        store.find("../../etc/passwd")


def test_an_old_ledger_is_upgraded_in_place(tmp_path):
    conn = connect(tmp_path / "ledger.sqlite")
    for statement in MIGRATIONS[0].split(";"):  # a ledger written by the first release
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs(display_name, model, state, request_count, created_at, updated_at) VALUES ('j','m','submitted',3,0,0)")
    conn.execute("INSERT INTO requests(hash, model, body_json, state, updated_at) VALUES ('h','m','{}','queued',0)")
    conn.close()
    ledger = Ledger(tmp_path)
    assert schema_version(ledger.conn) == len(MIGRATIONS)
    job = ledger.job(1)
    assert job["state"] == "submitted" and job["est_tokens"] == 0
    req = ledger.conn.execute("SELECT * FROM requests WHERE hash='h'").fetchone()
    assert req["state"] == "queued" and req["variant"] == 0 and req["fallback_of"] is None


def test_migration_7_keeps_every_row_and_every_unique_key(tmp_path):
    """Migration 7 rebuilds requests, rows and job_requests (unique keys as droppable indexes): nothing is lost,
    rowids (shard's order) are kept, and each key is still unique."""
    conn = connect(tmp_path / "ledger.sqlite")
    for number in range(1, 7):  # a ledger written by the release before migration 7
        for statement in MIGRATIONS[number - 1].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 6")
    conn.execute("INSERT INTO runs(id, fingerprint, manifest, options_json, created_at) VALUES (1, 'f', 'm', '{}', 0)")
    conn.execute("INSERT INTO jobs(id, display_name, model, state, request_count, created_at, updated_at) VALUES (1,'j','m','submitted',2,0,0)")
    for rowid, h in ((5, "h5"), (9, "h9")):
        conn.execute("INSERT INTO requests(rowid, hash, model, body_json, state, job_id, cost_usd, updated_at) "
                     "VALUES (?,?,'m','{}','queued',1,0.5,0)", (rowid, h))
        conn.execute("INSERT INTO job_requests(job_id, hash) VALUES (1, ?)", (h,))
    conn.execute("INSERT INTO rows VALUES (1, 0, 2, 'a', 0, 'h5', 'p', NULL), (1, 1, 3, 'b', 0, 'h9', 'q', '{\"k\": 1}')")
    conn.close()
    ledger = Ledger(tmp_path)
    c = ledger.conn
    assert schema_version(c) == len(MIGRATIONS) and ledger.integrity_ok()
    assert [tuple(r) for r in c.execute("SELECT rowid, hash, state, job_id, cost_usd FROM requests ORDER BY rowid")] == \
        [(5, "h5", "queued", 1, 0.5), (9, "h9", "queued", 1, 0.5)]
    assert [tuple(r) for r in c.execute("SELECT * FROM rows ORDER BY seq")] == \
        [(1, 0, 2, "a", 0, "h5", "p", None), (1, 1, 3, "b", 0, "h9", "q", '{"k": 1}')]
    assert [tuple(r) for r in c.execute("SELECT * FROM job_requests ORDER BY hash")] == [(1, "h5"), (1, "h9")]
    for duplicate in ("INSERT INTO requests(hash, model, body_json, state, updated_at) VALUES ('h5','m','{}','planned',0)",
                      "INSERT INTO rows VALUES (1, 2, 4, 'a', 0, 'h9', 'p', NULL)",
                      "INSERT INTO job_requests VALUES (1, 'h9')"):
        with pytest.raises(sqlite3.IntegrityError):
            c.execute(duplicate)


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

    from .helpers import write_csv

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


def test_reference_placeholders_are_spliced_only_as_whole_values():
    import json

    from batcher.jobs.lifecycle import splice_references

    sha = "a" * 64
    req = ImageRequest(model="m", prompt=f'see "batcher-ref:sha256:{sha}" here',
                       references=(ReferenceImage(sha, "image/png", "/r.png"),))
    body_json = json.dumps(request_body(req), ensure_ascii=False)
    out = json.loads(splice_references(body_json, {sha: "https://x/files/f1"}))
    assert out["contents"][0]["parts"][0]["fileData"]["fileUri"] == "https://x/files/f1"
    assert out["contents"][0]["parts"][1]["text"] == f'see "batcher-ref:sha256:{sha}" here'  # the prompt is untouched
    with pytest.raises(KeyError):
        splice_references(body_json, {})


def test_run_counts_are_the_runs_own_whether_or_not_the_ledger_holds_other_runs(tmp_path):
    """A run that has every request in the ledger is counted from the state index; once another run adds
    requests, each run still counts only its own (and both ways agree with the join over the run's rows)."""
    from batcher.ledger import PLANNED, SUCCEEDED
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import plan_manifest

    from .helpers import write_csv

    ledger = Ledger(tmp_path / "wd")
    a = write_csv(tmp_path / "a.csv", ["id", "prompt"], [[f"a{i}", f"prompt {i}"] for i in range(6)] + [["dup", "prompt 0"]])
    b = write_csv(tmp_path / "b.csv", ["id", "prompt"], [[f"b{i}", f"prompt {i}"] for i in range(3, 10)])
    run_a = plan_manifest(ledger, None, a, ManifestOptions())
    assert (run_a.rows, run_a.requests, run_a.duplicates) == (7, 6, 1)
    assert ledger.in_run(run_a.run_id)[0] == "1"  # the fast path is taken
    ledger.conn.execute("UPDATE requests SET state=? WHERE hash IN (SELECT request_hash FROM rows WHERE id='a0')", (SUCCEEDED,))
    assert ledger.request_counts(run_a.run_id) == {PLANNED: 5, SUCCEEDED: 1}

    run_b = plan_manifest(ledger, None, b, ManifestOptions())  # shares prompts 3..5 with run a
    assert (run_b.rows, run_b.requests, run_b.duplicates) == (7, 7, 0)
    assert ledger.in_run(run_a.run_id)[0] != "1" and ledger.in_run(run_b.run_id)[0] != "1"
    assert ledger.request_counts(run_a.run_id) == {PLANNED: 5, SUCCEEDED: 1}  # a duplicate row: the set of hashes
    assert ledger._run_rows_have_distinct_requests(run_b.run_id)  # no duplicate: the join of its rows
    assert ledger.request_counts(run_b.run_id) == {PLANNED: 7}
    assert ledger.request_counts() == {PLANNED: 9, SUCCEEDED: 1}
    ledger.conn.execute("UPDATE requests SET state=? WHERE hash IN (SELECT request_hash FROM rows WHERE id='b3')", (SUCCEEDED,))
    assert ledger.request_counts(run_b.run_id) == {PLANNED: 6, SUCCEEDED: 1}
    assert ledger.request_counts(run_a.run_id) == {PLANNED: 4, SUCCEEDED: 2}  # prompt 3 is in both runs


def test_shard_estimates_match_the_per_request_formulas(tmp_path):
    """shard measures bodies in SQLite (bytes, characters, image size, reference count); its job totals must
    equal the Python formulas applied to each stored body."""
    from batcher.ledger import QUEUED
    from batcher.manifest import ManifestOptions
    from batcher.planning.packing import ShardLimits, expected_output_bytes
    from batcher.planning.planner import plan_manifest, shard
    from batcher.cost.tokens import request_tokens
    from batcher.planning.requests import image_size_of

    from .helpers import write_csv

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


def test_a_job_whose_requests_changed_under_it_writes_no_jsonl(tmp_path):
    """write_jsonl takes a job's requests by job id; if that ever disagrees with the job's size, it is loud
    and leaves no file, rather than sending a job short of requests."""
    from batcher.jobs.lifecycle import jsonl_path, write_jsonl
    from batcher.ledger import PLANNED
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import ShardLimits, plan_manifest, shard

    from .helpers import write_csv

    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"prompt {i}"] for i in range(5)])
    ledger = Ledger(tmp_path / "wd")
    plan_manifest(ledger, None, m, ManifestOptions())
    (job_id,) = shard(ledger, ShardLimits())
    path = write_jsonl(ledger, job_id, {})
    assert len(path.read_text().splitlines()) == 5
    path.unlink()
    ledger.conn.execute("UPDATE requests SET state=?, job_id=NULL WHERE rowid=(SELECT MIN(rowid) FROM requests)", (PLANNED,))
    with pytest.raises(LedgerError, match="4 queued requests in the ledger, but the job was made with 5"):
        write_jsonl(ledger, job_id, {})
    assert not jsonl_path(ledger, ledger.job(job_id)["display_name"]).exists()
    assert not list((tmp_path / "wd" / "jobs").glob("*.tmp"))


def test_cache_lookup_by_listing_agrees_with_the_store(tmp_path):
    """The planner lists each cache prefix dir once instead of asking the store per request; both must agree
    for every image extension, temp files and a prefix that does not exist."""
    from batcher.storage.store import StoreLookup as _StoreLookup

    store = ImageStore(tmp_path / "cache")
    png_hash, jpg_hash, temp_hash, absent = "ab" + "1" * 62, "ab" + "2" * 62, "ab" + "3" * 62, "cd" + "4" * 62
    store.put(png_hash, png_bytes())
    (tmp_path / "cache" / "ab" / f"{jpg_hash}.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "cache" / "ab" / f".{temp_hash}.png").write_bytes(b"partial")
    (tmp_path / "cache" / "ab" / f"{temp_hash}.png.tmp").write_bytes(b"partial")
    lookup = _StoreLookup(store)
    for h in (png_hash, jpg_hash, temp_hash, absent):
        assert lookup.has(h) == store.has(h), h
    assert lookup.has(png_hash) and lookup.has(jpg_hash) and not lookup.has(temp_hash) and not lookup.has(absent)
    hashes = [absent, png_hash, temp_hash, jpg_hash, png_hash]
    assert _StoreLookup(store).has_all(hashes) == [store.has(h) for h in hashes] == [False, True, False, True, True]
    ahead = _StoreLookup(store)
    ahead.list_ahead()  # all 256 prefix dirs, listed in a thread while the caller goes on
    assert ahead.has_all(hashes) == [False, True, False, True, True] and len(ahead.dirs) == 256


def test_cache_lookup_memory_is_bounded_past_its_listing_limit(tmp_path, monkeypatch):
    """Past MAX_LISTED_HASHES listed, prefixes not listed yet are asked one hash at a time: same answers."""
    from batcher.storage import store as store_mod

    store = ImageStore(tmp_path / "cache")
    hashes = [f"{p:02x}" + str(i) * 62 for p in range(4) for i in range(3)]
    for h in hashes[::2]:
        store.put(h, png_bytes())
    monkeypatch.setattr(store_mod, "MAX_LISTED_HASHES", 2)
    lookup = store_mod.StoreLookup(store)
    assert [lookup.has(h) for h in hashes] == [store.has(h) for h in hashes] == [i % 2 == 0 for i in range(len(hashes))]
    assert len(lookup.dirs) == 1 and lookup.listed == 2  # the first prefix listed (2 images), the rest asked
    batched = store_mod.StoreLookup(store)
    assert batched.has_all(hashes) == [i % 2 == 0 for i in range(len(hashes))]
    assert len(batched.dirs) == 1 and batched.listed == 2
    ahead = store_mod.StoreLookup(store)
    ahead.list_ahead(threads=1)  # every prefix dir, in a thread: it stops at the limit too
    assert ahead.has_all(hashes) == [i % 2 == 0 for i in range(len(hashes))]
    assert list(ahead.dirs) == ["00"] and ahead.listed == 2
    ahead = store_mod.StoreLookup(store)
    ahead.list_ahead(threads=2)  # which prefixes get listed depends on the threads' order; the answers do not
    assert ahead.has_all(hashes) == [i % 2 == 0 for i in range(len(hashes))]
    assert 1 <= len(ahead.dirs) <= 2 and ahead.listed <= 3
