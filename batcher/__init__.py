"""batcher: bulk image generation on the Gemini Batch API.

The library API (the CLI is a thin layer over it):

    import batcher
    outcome = batcher.run("prompts.parquet", batcher.Settings(workdir=".batcher", out="dataset"))
"""

from .errors import ApiError, BatcherError, LedgerError, ManifestError, UsageError
from .manifest import ManifestOptions
from .pipeline import Outcome, Settings, cancel, collect, run, status, submit
from .planner import ShardLimits

__all__ = [
    "ApiError", "BatcherError", "LedgerError", "ManifestError", "ManifestOptions", "Outcome", "Settings", "ShardLimits",
    "UsageError", "cancel", "collect", "run", "status", "submit",
]
