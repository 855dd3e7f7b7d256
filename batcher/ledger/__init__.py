"""The ledger: SQLite (WAL) in the workdir, the single source of truth for resuming, and the one boundary to the
database (every SQL statement of batcher is in this package). See `core` (the connection, transactions, runs,
jobs, counts), `schema` (states, migrations), and the stages' SQL: `plans`, `sending`, `outcomes`, `reading`.
"""

from .core import Ledger, WorkdirLock
from .schema import (
    BLOCKED, BULK_INDEXES, BUSY_TIMEOUT_MS, FAILED, DatabaseError, J_CANCELLED, J_COLLECTED, J_CREATING, J_EXPIRED, J_FAILED, J_PLANNED,
    J_SUBMITTED, J_SUCCEEDED, J_UPLOADED, J_UPLOADING, JOB_TERMINAL_API, MIGRATIONS, PLANNED, QUEUED, SUCCEEDED, connect,
    migrate, schema_version, use_wal,
)

__all__ = [
    "BLOCKED", "BULK_INDEXES", "BUSY_TIMEOUT_MS", "DatabaseError", "FAILED", "J_CANCELLED", "J_COLLECTED", "J_CREATING", "J_EXPIRED",
    "J_FAILED", "J_PLANNED", "J_SUBMITTED", "J_SUCCEEDED", "J_UPLOADED", "J_UPLOADING", "JOB_TERMINAL_API", "Ledger",
    "MIGRATIONS", "PLANNED", "QUEUED", "SUCCEEDED", "WorkdirLock", "connect", "migrate", "schema_version", "use_wal",
]
