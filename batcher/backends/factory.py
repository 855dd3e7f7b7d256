"""Which backend a command talks to, by name: `gemini` (the Gemini API: GEMINI_API_KEY or GOOGLE_API_KEY, and
GOOGLE_GEMINI_BASE_URL for another server), `vertex` (Vertex AI batch prediction: project, location, a gs://
staging area; credentials from the environment), or `emulator` (an in-process emulator that lives as long as the
command: demos and dry runs of a pipeline; the only place the library starts the emulator)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from ..errors import UsageError
from .base import Backend

BACKENDS = ("gemini", "emulator", "vertex")


@contextlib.contextmanager
def backend_factory(kind: str = "gemini", *, project: str | None = None, location: str | None = None,
                    staging: str | None = None) -> Iterator[Callable[[], Backend]]:
    """Yields a function that makes the backend (connecting when first asked, so a command that needs no API
    needs no key)."""
    if kind == "vertex":
        from .vertex import VertexBackend, VertexConnection

        connection = VertexConnection.from_env(project=project, location=location, staging=staging)
        yield lambda: VertexBackend(connection)
    elif kind == "emulator":
        from ..emulator import Emulator, EmulatorConfig
        from .gemini import Connection, GeminiBackend

        # Money limits off: a demo is not paying, and a real-time spend-rate wait (up to 10 minutes) would only stall
        # it. `batcher emulator` serves them, for tests of how batcher meets them.
        with Emulator(EmulatorConfig(spend_limits=False)) as emu:
            yield lambda: GeminiBackend(Connection(api_key="emulator-key", base_url=emu.url, timeout_s=60))
    elif kind == "gemini":
        from .gemini import Connection, GeminiBackend

        yield lambda: GeminiBackend(Connection.from_env())
    else:
        raise UsageError(f"unknown backend {kind!r}; use one of {', '.join(BACKENDS)}")
