"""Crash hook for the crash-consistency tests (a TEST HOOK: it does nothing unless asked to).

`maybe_crash("point")` calls sit at the stage boundaries where a crash is most interesting. When the
environment variable ``BATCHER_CRASH_AT=<point>[:<n>]`` names that point, the process kills itself with
SIGKILL the n-th time (default 1) it passes there: no cleanup, no atexit, no flush, as if the machine
lost power or the OOM killer struck. The variable is read once at import; when it is unset the hook is
a single comparison.

With ``BATCHER_CRASH_ONCE=<path>`` too, the process kills itself only if it is the one that creates `path`:
across processes (a Ray task retried in a new worker, a command run again) only the first one crashes, and a
test disarms the hook by creating the file first.

Points (see docs/reliability.md): plan, upload, uploaded, create, created, poll, download, decode, image,
dataset, dataset-replace, prune, pruned; prepare, in the child process that prepares a large manifest (batcher.planning.prepare);
imported, after the owner of a `collect --engine ray` recorded a job's outcomes (batcher.results.on_ray).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("BATCHER_CRASH_AT") or None
_POINT, _, _NTH = (_SPEC or "").partition(":")
_NTH_INT = int(_NTH) if _NTH else 1
_ONCE = os.environ.get("BATCHER_CRASH_ONCE") or None
_seen = 0


def maybe_crash(point: str) -> None:
    """SIGKILL this process if BATCHER_CRASH_AT names `point` and this is its n-th passage."""
    if _SPEC is None or point != _POINT:
        return
    global _seen
    _seen += 1
    if _seen >= _NTH_INT and _first_to_crash():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_to_crash() -> bool:
    if _ONCE is None:
        return True
    try:
        os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
