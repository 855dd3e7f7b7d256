"""batcher's helper processes (collect's decoders, planning's row preparer): how they are started, so that
they import this very batcher, and how they report their peak memory. Standard library only: a decoder
process imports nothing else."""

from __future__ import annotations

import os
import sys


def module_command(module: str) -> list[str]:
    """`python -P -m batcher.<module>`: -P keeps the current directory off the import path, where another copy
    of batcher (a checkout) would come first and could, say, hash requests differently from this one."""
    return [sys.executable, "-P", "-m", f"batcher.{module}"]


def child_env() -> dict:
    """The environment for a `python -m batcher.<module>` child process that must import this very batcher."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(root) not in ("site-packages", "dist-packages"):
        # A source tree (run from it, or an editable install): the child imports this very copy. An installed
        # package is found as usual (site-packages ahead of the standard library would shadow it).
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM). Not getrusage: a child's ru_maxrss starts from the RSS of the process
    that forked it, which it never had of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
