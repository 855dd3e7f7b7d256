"""The ledger: migrations (blank, old, newer ledgers), state transitions, a run's own counts."""

from __future__ import annotations

import sqlite3

import pytest

from batcher.errors import LedgerError
from batcher.ledger import MIGRATIONS, Ledger, connect, migrate, schema_version


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
