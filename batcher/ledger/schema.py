"""The ledger's schema: request and job states, the numbered migrations (each applied atomically with its record in
`PRAGMA user_version`), and how a connection is opened (WAL, busy timeout, foreign keys)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from ..errors import LedgerError

DatabaseError = sqlite3.Error  # what SQLite raises (disk full, read-only, I/O errors): the environment's errors

# Request states (product.md "Lifecycle and states").
PLANNED, QUEUED, SUCCEEDED, BLOCKED, FAILED = "planned", "queued", "succeeded", "blocked", "failed"
# Job states. API states are stored as the SDK's JOB_STATE_* names without the prefix.
J_PLANNED, J_UPLOADING, J_UPLOADED, J_CREATING, J_SUBMITTED = "planned", "uploading", "uploaded", "creating", "submitted"
J_SUCCEEDED, J_FAILED, J_EXPIRED, J_CANCELLED, J_COLLECTED = "succeeded", "failed", "expired", "cancelled", "collected"
JOB_TERMINAL_API = (J_SUCCEEDED, J_FAILED, J_EXPIRED, J_CANCELLED)
BUSY_TIMEOUT_MS = 30_000

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        manifest TEXT NOT NULL,
        options_json TEXT NOT NULL,
        extra_schema BLOB,
        row_count INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE rows (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        row INTEGER NOT NULL,
        id TEXT NOT NULL,
        variant INTEGER NOT NULL,
        request_hash TEXT NOT NULL,
        prompt TEXT NOT NULL,
        extra_json TEXT,
        PRIMARY KEY (run_id, id, variant)
    );
    CREATE INDEX rows_by_seq ON rows(run_id, seq);
    CREATE TABLE requests (
        hash TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        body_json TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        job_id INTEGER,
        error TEXT,
        finish_reason TEXT,
        prompt_tokens INTEGER,
        output_tokens INTEGER,
        cost_usd REAL,
        cached INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE INDEX requests_by_state ON requests(state, model);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        display_name TEXT NOT NULL UNIQUE,
        model TEXT NOT NULL,
        state TEXT NOT NULL,
        request_count INTEGER NOT NULL,
        input_bytes INTEGER NOT NULL DEFAULT 0,
        jsonl_path TEXT,
        input_file TEXT,
        batch_name TEXT UNIQUE,
        api_state TEXT,
        api_created_at TEXT,
        stats_json TEXT,
        output_file TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE job_requests (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        hash TEXT NOT NULL,
        PRIMARY KEY (job_id, hash)
    );
    CREATE INDEX job_requests_by_hash ON job_requests(hash);
    CREATE TABLE reference_files (sha256 TEXT PRIMARY KEY, path TEXT NOT NULL);
    CREATE TABLE uploads (
        sha256 TEXT PRIMARY KEY,
        file_name TEXT NOT NULL,
        uri TEXT NOT NULL,
        mime_type TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # 2: enqueued-token estimates per job, so a run is fed to the API in waves under the per-model cap
    """
    ALTER TABLE jobs ADD COLUMN est_tokens INTEGER NOT NULL DEFAULT 0
    """,
    # 3: the variant index of each request (a fallback model's request hashes like a direct one) and
    #    which request a fallback replaces
    """
    ALTER TABLE requests ADD COLUMN variant INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN fallback_of TEXT
    """,
    # 4: no query looks job_requests up by hash; keeping that index cost a random-order B-tree insert per request
    """
    DROP INDEX IF EXISTS job_requests_by_hash
    """,
    # 5: how many distinct requests a run's rows point to (NULL: unknown), so the run's counts can come from
    #    the state index when the run's requests are all the ledger holds, instead of a join over its rows
    """
    ALTER TABLE runs ADD COLUMN request_count INTEGER
    """,
    # 6: a job's requests by job id (writing its JSONL, finishing it, releasing it) without a scan of every request
    """
    CREATE INDEX requests_by_job ON requests(job_id)
    """,
    # 7: unique keys as ordinary indexes, so planning into an empty ledger can load `requests` and `rows` bare and
    #    build each index once, sorted (see Ledger.bulk_load): a random-order insert into the 64-hex hash key cost
    #    more than the rest of a request's insert. `rows` is keyed by (run_id, seq), the order it is written and read
    #    in, and `job_requests` by its primary key alone (no rowid B-tree beside it).
    """
    CREATE TABLE requests_v7 (
        hash TEXT NOT NULL,
        model TEXT NOT NULL,
        body_json TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        job_id INTEGER,
        error TEXT,
        finish_reason TEXT,
        prompt_tokens INTEGER,
        output_tokens INTEGER,
        cost_usd REAL,
        cached INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL,
        variant INTEGER NOT NULL DEFAULT 0,
        fallback_of TEXT
    );
    INSERT INTO requests_v7(rowid, hash, model, body_json, state, attempts, job_id, error, finish_reason, prompt_tokens,
                            output_tokens, cost_usd, cached, updated_at, variant, fallback_of)
        SELECT rowid, hash, model, body_json, state, attempts, job_id, error, finish_reason, prompt_tokens,
               output_tokens, cost_usd, cached, updated_at, variant, fallback_of FROM requests;
    DROP TABLE requests;
    ALTER TABLE requests_v7 RENAME TO requests;
    CREATE UNIQUE INDEX requests_by_hash ON requests(hash);
    CREATE INDEX requests_by_state ON requests(state, model);
    CREATE INDEX requests_by_job ON requests(job_id);
    CREATE TABLE rows_v7 (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        row INTEGER NOT NULL,
        id TEXT NOT NULL,
        variant INTEGER NOT NULL,
        request_hash TEXT NOT NULL,
        prompt TEXT NOT NULL,
        extra_json TEXT,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;
    INSERT INTO rows_v7 SELECT run_id, seq, row, id, variant, request_hash, prompt, extra_json FROM rows;
    DROP TABLE rows;
    ALTER TABLE rows_v7 RENAME TO rows;
    CREATE UNIQUE INDEX rows_by_id ON rows(run_id, id, variant);
    CREATE TABLE job_requests_v7 (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        hash TEXT NOT NULL,
        PRIMARY KEY (job_id, hash)
    ) WITHOUT ROWID;
    INSERT INTO job_requests_v7 SELECT job_id, hash FROM job_requests;
    DROP TABLE job_requests;
    ALTER TABLE job_requests_v7 RENAME TO job_requests
    """,
    # 8: the job index holds only requests that are in a job (every query by job asks job_id=?, which implies it):
    #    a re-plan's cache hits, never in a job, no longer go into it (0.35 s -> 0.1 s to build at 1M requests)
    """
    DROP INDEX requests_by_job;
    CREATE INDEX requests_by_job ON requests(job_id) WHERE job_id IS NOT NULL
    """,
    # 9: thinking models (the Gemini 3 image models) bill their thoughts: usageMetadata.thoughtsTokenCount
    """
    ALTER TABLE requests ADD COLUMN thoughts_tokens INTEGER
    """,
    # 10: a run remembers the manifest rows it left out as invalid (--skip-invalid) and where they were written, so
    #     every later command says so and does not call the run complete (exit 3)
    """
    ALTER TABLE runs ADD COLUMN rejected INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN rejects_path TEXT
    """,
]

# The indexes Ledger.bulk_load drops and builds again (the same definitions as the migrations above).
BULK_INDEXES = {
    "requests_by_hash": "CREATE UNIQUE INDEX requests_by_hash ON requests(hash)",
    "requests_by_state": "CREATE INDEX requests_by_state ON requests(state, model)",
    "requests_by_job": "CREATE INDEX requests_by_job ON requests(job_id) WHERE job_id IS NOT NULL",
    "rows_by_id": "CREATE UNIQUE INDEX rows_by_id ON rows(run_id, id, variant)",
}


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    use_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def connect_read_only(path: str | os.PathLike) -> sqlite3.Connection:
    """A connection that reads the ledger beside the command that holds its workdir (WAL lets readers in while it
    writes), and can change nothing: no migration, no lock, no file created."""
    conn = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, isolation_level=None,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    return conn


def use_wal(conn: sqlite3.Connection, attempts: int = 1) -> bool:
    """Switch to (or stay in) WAL mode. Leaving a rollback journal needs the database to itself, so while another
    process bulk-loads a new ledger (Ledger.journal_for_new_pages) this fails: the connection then works in
    that mode, waiting on the loader's locks, and the next one to open switches back."""
    for attempt in range(attempts):
        try:
            return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal"
        except sqlite3.OperationalError:  # database is locked
            if attempt + 1 < attempts:
                time.sleep(0.05)
    return False


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> None:
    current = schema_version(conn)
    if current > len(MIGRATIONS):
        raise LedgerError(
            f"this ledger has schema version {current}, newer than this batcher knows ({len(MIGRATIONS)}); upgrade batcher"
        )
    for number in range(current + 1, len(MIGRATIONS) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
