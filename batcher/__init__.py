"""batcher: bulk image generation on the Gemini Batch API.

The library API (the CLI is a thin layer over it):

    import batcher
    outcome = batcher.run("prompts.parquet", batcher.Settings(workdir=".batcher", out="dataset"))

The names below are imported on first use, so `import batcher.storage.store` (or the collect decoder processes,
`python -m batcher.results.decoder`) does not load the SDK and pyarrow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

# name -> the module that defines it. No public name is also a submodule's name (test_public_api pins both): once
# `batcher.x` is imported as a module, Python sets the attribute `batcher.x` to it, and a function of that name
# would be shadowed.
_EXPORTS = {
    # commands
    "run": "pipeline", "submit": "pipeline", "collect": "pipeline", "status": "pipeline", "cancel": "pipeline",
    "estimate": "pipeline", "export": "pipeline", "prune": "pipeline", "describe_models": "models",
    # what they take and give
    "Settings": "settings", "ManifestOptions": "manifest", "ShardLimits": "planning.packing", "Quota": "jobs.quota",
    "Outcome": "outcome", "Estimate": "cost.estimate",
    # errors (exit codes: BatcherError.exit_code)
    "BatcherError": "errors", "UsageError": "errors", "ManifestError": "errors", "ApiError": "errors",
    "QuotaError": "errors", "SpendLimitError": "errors", "LedgerError": "errors",
}

__all__ = [  # as _EXPORTS (a literal, for linters)
    "run", "submit", "collect", "status", "cancel", "estimate", "export", "prune", "describe_models",
    "Settings", "ManifestOptions", "ShardLimits", "Quota", "Outcome", "Estimate",
    "BatcherError", "UsageError", "ManifestError", "ApiError", "QuotaError", "SpendLimitError", "LedgerError",
]

if TYPE_CHECKING:
    from .cost.estimate import Estimate
    from .errors import ApiError, BatcherError, LedgerError, ManifestError, QuotaError, SpendLimitError, UsageError
    from .jobs.quota import Quota
    from .manifest import ManifestOptions
    from .models import describe_models
    from .outcome import Outcome
    from .pipeline import cancel, collect, estimate, export, prune, run, status, submit
    from .planning.packing import ShardLimits
    from .settings import Settings


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
