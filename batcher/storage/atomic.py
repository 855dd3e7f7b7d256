"""Writing a file into place: every file batcher writes appears whole or not at all.

The content goes to a temp file beside the destination, which is then renamed over it (atomic on one file
system): a reader, or a run after a crash, sees the old file or the new one, never half of one. If the writing
fails, the temp file is removed.

Two kinds of temp name:
- fixed (`.NAME.tmp`), for a file one writer makes at a time (a job's JSONL, the dataset's metadata, a report): a
  writer killed half-way leaves it, and the next writer of the same file reuses and renames it, so no temp file
  outlives a recovery;
- unique (`.tmp-<random><suffix>`), for a file several processes may write at once (an image of the shared
  cache); readers of the cache skip such names.

`durable` adds an fsync before the rename, for what costs money to lose (a cached image): after a power cut the
file holds its content, not zeros.

Imports only the standard library's os (decoder child processes use it; they start in milliseconds).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

UNIQUE_PREFIX = ".tmp-"


def temp_path(dest: Path, unique: bool = False) -> Path:
    if unique:
        return dest.with_name(f"{UNIQUE_PREFIX}{os.urandom(6).hex()}{dest.suffix}")
    return dest.with_name(f".{dest.name}.tmp")


def _claim_unique(dest: Path) -> Path:
    """A unique temp path beside `dest`, created empty (O_EXCL): a name another writer holds is never shared."""
    for _ in range(100):
        tmp = temp_path(dest, unique=True)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name in {dest.parent}")


@contextlib.contextmanager
def into_place(dest: str | os.PathLike, *, unique: bool = False, durable: bool = False,
               mode: int | None = None) -> Iterator[Path]:
    """Yields the temp path to write; when the block ends without an exception, the temp file becomes `dest` (with
    permissions `mode`; None: as created). On an exception it is removed and the exception goes on. A unique temp
    file exists (empty, mode 0600) when it is yielded."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _claim_unique(dest) if unique else temp_path(dest)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(dest: str | os.PathLike, data: bytes, *, unique: bool = False, durable: bool = False,
                mode: int | None = None) -> None:
    """`data` as the whole of `dest`, written into place."""
    with into_place(dest, unique=unique, mode=mode) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(tmp, flags, 0o666 if mode is None else 0o600), "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())


def write_text(dest: str | os.PathLike, text: str, **kwargs) -> None:
    write_bytes(dest, text.encode("utf-8"), **kwargs)
