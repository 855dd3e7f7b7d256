"""Crash hook for the crash-consistency tests (a TEST HOOK: it does nothing unless asked to).

`maybe_crash("point")` calls sit at the stage boundaries where a crash is most interesting. When the
environment variable ``BATCHER_CRASH_AT=<point>[:<n>]`` names that point, the process kills itself with
SIGKILL the n-th time (default 1) it passes there: no cleanup, no atexit, no flush, as if the machine
lost power or the OOM killer struck. The variable is read once at import; when it is unset the hook is
a single comparison.

Points (see docs/reliability.md): plan, upload, uploaded, create, created, poll, download, decode, image,
dataset, dataset-replace, prune, pruned; and prepare, in the child process that prepares a large manifest (batcher.planning.prepare).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("BATCHER_CRASH_AT") or None
_POINT, _, _NTH = (_SPEC or "").partition(":")
_NTH_INT = int(_NTH) if _NTH else 1
_seen = 0


def maybe_crash(point: str) -> None:
    """SIGKILL this process if BATCHER_CRASH_AT names `point` and this is its n-th passage."""
    if _SPEC is None or point != _POINT:
        return
    global _seen
    _seen += 1
    if _seen >= _NTH_INT:
        os.kill(os.getpid(), signal.SIGKILL)
