"""batcher's exception hierarchy. The CLI maps each class to an exit code in one place.

    BatcherError (exit 1)
    ├── UsageError (exit 2)             bad options, bad job spec
    │   └── ManifestError (exit 2)      invalid manifest rows (nothing was submitted)
    ├── ApiError (exit 1)               the API refused or failed; SDK errors are mapped into it
    │   ├── NotFoundError
    │   ├── QuotaError                  429 RESOURCE_EXHAUSTED (wait for capacity)
    │   └── TransientApiError           5xx, timeouts, dropped connections
    ├── LedgerError (exit 1)            the ledger is locked, corrupt, or a state transition was refused
    └── CollectError (exit 1)           a results file could not be read
"""

from __future__ import annotations


class BatcherError(Exception):
    exit_code = 1


class UsageError(BatcherError):
    exit_code = 2


class ManifestError(UsageError):
    """Invalid input. `problems` lists every problem found (file, row, column, value, what to do)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class ApiError(BatcherError):
    def __init__(self, message: str, code: int | None = None, status: str | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


class NotFoundError(ApiError):
    pass


class QuotaError(ApiError):
    def __init__(self, message: str, code: int | None = 429, status: str | None = None, retry_after: float | None = None):
        super().__init__(message, code, status)
        self.retry_after = retry_after


class TransientApiError(ApiError):
    pass


class LedgerError(BatcherError):
    pass


class CollectError(BatcherError):
    pass
