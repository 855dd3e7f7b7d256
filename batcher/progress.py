"""Progress bars (tqdm) that stay quiet when output is not a terminal or with --quiet."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from tqdm import tqdm


class _Bar:
    def __init__(self, bar: tqdm | None):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_to(self, n: int) -> None:
        if self._bar is not None:
            self._bar.n = n
            self._bar.refresh()


class Progress:
    def __init__(self, quiet: bool = False):
        self.enabled = not quiet and sys.stderr.isatty()

    @contextlib.contextmanager
    def _bar(self, desc: str, total, **kw) -> Iterator[_Bar]:
        if not self.enabled:
            yield _Bar(None)
            return
        bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, **kw)
        try:
            yield _Bar(bar)
        finally:
            bar.close()

    def bytes(self, desc: str, total: int | None):
        return self._bar(desc, total, unit="B", unit_scale=True, unit_divisor=1024)

    def count(self, desc: str, total: int | None):
        return self._bar(desc, total, unit="img")
