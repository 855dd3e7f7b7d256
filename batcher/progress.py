"""Progress bars (tqdm) that stay quiet when output is not a terminal or with --quiet."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Callable, Iterator

from tqdm import tqdm

LABEL_WIDTH = 24  # a bar's label (upload NAME, ...) at most: the counts beside it fit in 80 columns


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


class _Line:
    """A line of text redrawn in place (tqdm keeps it apart from the bars and from log lines)."""

    def __init__(self, bar: tqdm | None):
        self._bar = bar

    def show(self, text_for_width: Callable[[int], str]) -> None:
        if self._bar is not None:
            # one column short of the width: a line that fills the last column wraps in some terminals
            self._bar.set_description_str(text_for_width(stderr_width() - 1), refresh=True)


def stderr_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return shutil.get_terminal_size((80, 24)).columns


def label(verb: str, name: str) -> str:
    """`upload batcher-3f…job00001`: a bar's label in LABEL_WIDTH characters, the name cut in the middle."""
    from .output.render import elide

    return f"{verb} {elide(name, LABEL_WIDTH - len(verb) - 1)}"


class Progress:
    def __init__(self, quiet: bool = False):
        self.enabled = not quiet and sys.stderr.isatty()

    @contextlib.contextmanager
    def _bar(self, desc: str, total, **kw) -> Iterator[tqdm | None]:
        if not self.enabled:
            yield None
            return
        bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, **kw)
        try:
            yield bar
        finally:
            bar.close()

    @contextlib.contextmanager
    def bytes(self, desc: str, total: int | None) -> Iterator[_Bar]:
        with self._bar(desc, total, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            yield _Bar(bar)

    @contextlib.contextmanager
    def count(self, desc: str, total: int | None) -> Iterator[_Bar]:
        with self._bar(desc, total, unit="img") as bar:
            yield _Bar(bar)

    @contextlib.contextmanager
    def line(self) -> Iterator[_Line]:
        """A line the caller redraws (a run's progress: output.render.progress_line)."""
        with self._bar("", None, bar_format="{desc}") as bar:
            yield _Line(bar)
