"""storage.atomic: every file batcher writes appears whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from batcher.storage import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    dest = tmp_path / "d" / "metadata.parquet"
    atomic.write_bytes(dest, b"old")
    with pytest.raises(RuntimeError):
        with atomic.into_place(dest) as tmp:
            tmp.write_bytes(b"half of the ne")
            raise RuntimeError("disk full")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["metadata.parquet"]


def test_a_writer_killed_half_way_leaves_a_temp_the_next_writer_reuses(tmp_path):
    dest = tmp_path / "job.jsonl"
    atomic.temp_path(dest).write_bytes(b"left by a killed writer")  # what a SIGKILL mid-write leaves
    atomic.write_text(dest, "whole\n")
    assert dest.read_text() == "whole\n"
    assert [p.name for p in tmp_path.iterdir()] == ["job.jsonl"]


def test_unique_temps_let_writers_of_one_file_not_share_a_name(tmp_path):
    dest = tmp_path / "ab" / f"{'ab' * 32}.png"
    names = {atomic.temp_path(dest, unique=True).name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(".tmp-") and n.endswith(".png") for n in names)
    atomic.write_bytes(dest, b"\x89PNG", unique=True, durable=True, mode=0o600)
    assert dest.read_bytes() == b"\x89PNG" and stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert os.listdir(dest.parent) == [dest.name]


def test_mode_none_keeps_the_mode_a_file_was_made_with(tmp_path):
    src = tmp_path / "cached.png"
    src.write_bytes(b"img")
    os.chmod(src, 0o600)
    dest = tmp_path / "out" / "cached.png"
    with atomic.into_place(dest) as tmp:
        os.link(src, tmp)  # the dataset links cache files: a chmod here would change the cache's file too
    assert stat.S_IMODE(os.stat(src).st_mode) == 0o600 and dest.read_bytes() == b"img"
