"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def settings(tmp_path: Path, **kw):
    """Settings for a test run in `tmp_path` (work/, out/, cache/): polls fast, gives up after a minute, quiet.
    Keyword arguments override any field."""
    from batcher.settings import Settings

    for name, default in (("workdir", "work"), ("out", "out"), ("cache_dir", "cache")):
        kw.setdefault(name, tmp_path / default)
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("timeout", 60)
    kw.setdefault("quiet", True)
    return Settings(**kw)


def png_bytes(color=(10, 20, 30)) -> bytes:
    """A small valid PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()
