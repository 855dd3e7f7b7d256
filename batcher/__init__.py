"""batcher: bulk image generation on the Gemini Batch API.

The library API (the CLI is a thin layer over it):

    import batcher
    outcome = batcher.run("prompts.parquet", batcher.Settings(workdir=".batcher", out="dataset"))

The names below are imported on first use, so `import batcher.store` (or the collect decoder processes,
`python -m batcher.decoder`) does not load the SDK and pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ApiError": "errors", "BatcherError": "errors", "LedgerError": "errors", "ManifestError": "errors",
    "UsageError": "errors", "ManifestOptions": "manifest", "Outcome": "pipeline", "Settings": "pipeline",
    "cancel": "pipeline", "collect": "pipeline", "run": "pipeline", "status": "pipeline", "submit": "pipeline",
    "ShardLimits": "planner",
}

__all__ = [
    "ApiError", "BatcherError", "LedgerError", "ManifestError", "ManifestOptions", "Outcome", "Settings", "ShardLimits",
    "UsageError", "cancel", "collect", "run", "status", "submit",
]

if TYPE_CHECKING:
    from .errors import ApiError, BatcherError, LedgerError, ManifestError, UsageError
    from .manifest import ManifestOptions
    from .pipeline import Outcome, Settings, cancel, collect, run, status, submit
    from .planning.planner import ShardLimits


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
