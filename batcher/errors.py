"""batcher's exception hierarchy. The CLI maps each class to an exit code in one place.

    BatcherError (exit 1)
    ├── UsageError (exit 2)             bad options, bad job spec
    │   └── ManifestError (exit 2)      invalid manifest rows (nothing was submitted)
    ├── ApiError (exit 1)               the API refused or failed; SDK errors are mapped into it
    │   ├── NotFoundError
    │   ├── QuotaError                  429 that clears by waiting: rate, spend rate, enqueued tokens, concurrent jobs
    │   ├── SpendLimitError (exit 4)    429 monthly spend cap (tier or project), 402 prepay balance: stop, run again later
    │   └── TransientApiError           5xx, timeouts, dropped connections
    ├── LedgerError (exit 1)            the ledger is locked, corrupt, or a state transition was refused
    │   └── WorkdirBusyError            another batcher process holds the workdir
    └── CollectError (exit 1)           a results file could not be read
"""

from __future__ import annotations


class BatcherError(Exception):
    """Any error batcher reports: its message says what is wrong, where, and what to do; `exit_code` is the
    command's exit code (README "Exit codes")."""

    exit_code = 1


class UsageError(BatcherError):
    """Bad options, a bad job spec, or a command that cannot apply here (no run in the workdir, ...): nothing was
    sent (exit 2)."""

    exit_code = 2


class NoApiKey(UsageError):
    """The Gemini API needs a key and none is set (a command that can do without the API says how)."""


class ManifestError(UsageError):
    """Invalid input. `problems` lists every problem found (file, row, column, value, what to do)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class ApiError(BatcherError):
    """The API refused or failed after batcher's retries. `code`: the HTTP status; `status`: the API's status name
    (NOT_FOUND, RESOURCE_EXHAUSTED, ...)."""

    def __init__(self, message: str, code: int | None = None, status: str | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


class NotFoundError(ApiError):
    pass


class QuotaError(ApiError):
    """A limit that clears by waiting. `cause`: "rate", "spend_rate", "capacity" (enqueued tokens, concurrent jobs,
    storage); `retry_after`: the API's RetryInfo hint in seconds, if any."""

    def __init__(self, message: str, code: int | None = 429, status: str | None = None, retry_after: float | None = None,
                 cause: str = "rate"):
        super().__init__(message, code, status)
        self.retry_after = retry_after
        self.cause = cause


class SpendLimitError(ApiError):
    """A money limit that waiting tonight will not clear: the billing account's monthly spend cap (its usage tier's,
    or a project spend cap set in AI Studio) or a depleted prepay balance (402). Never retried: the run stops with
    nothing lost (exit 4) and says which limit it met and what to do."""

    exit_code = 4

    def __init__(self, message: str, code: int | None = 429, status: str | None = None, limit: str = "spend_cap"):
        super().__init__(message, code, status)
        self.limit = limit  # "spend_cap" | "prepay"


class TransientApiError(ApiError):
    pass


class LedgerError(BatcherError):
    """The ledger is locked by another command, corrupt, or refused a state change."""


class WorkdirBusyError(LedgerError):
    """Another batcher process holds the workdir's lock (`holder`: its pid, as it wrote it)."""

    def __init__(self, message: str, holder: str = "unknown"):
        super().__init__(message)
        self.holder = holder


class CollectError(BatcherError):
    """A results file could not be read."""
