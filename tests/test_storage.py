"""storage: every file batcher writes appears whole or not at all (atomic), and the image cache (store)."""

from __future__ import annotations


import xxhash
import os
import stat

import pytest

from batcher.storage import atomic
from batcher.storage.store import ImageStore, InvalidImage
from tests.helpers import png_bytes


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



def test_store_verifies_and_writes_atomically(tmp_path):
    store = ImageStore(tmp_path)
    h = "a" * 64
    assert not store.has(h)
    path = store.put(h, png_bytes(), {"model": "m"})
    assert store.find(h) == path and path.suffix == ".png"
    assert store.meta(h) == {"model": "m", "xxh3_128": xxhash.xxh3_128_hexdigest(png_bytes())}  # every put records it
    store.put("d" * 64, png_bytes((1, 2, 3)))  # a writer without meta of its own gets the digest too
    assert store.meta("d" * 64) == {"xxh3_128": xxhash.xxh3_128_hexdigest(png_bytes((1, 2, 3)))}
    with pytest.raises(InvalidImage):
        store.put("b" * 64, b"not an image at all")
    with pytest.raises(InvalidImage):
        store.put("c" * 64, png_bytes()[:40])  # truncated
    assert not store.has("b" * 64) and not store.has("c" * 64)
    assert not list(tmp_path.rglob(".tmp-*"))
    with pytest.raises(ValueError):
        store.find("../../etc/passwd")


def test_cache_lookup_by_listing_agrees_with_the_store(tmp_path):
    """The planner lists each cache prefix dir once instead of asking the store per request; both must agree
    for every image extension, temp files and a prefix that does not exist."""
    from batcher.storage.store import StoreLookup as _StoreLookup

    store = ImageStore(tmp_path / "cache")
    png_hash, jpg_hash, temp_hash, absent = "ab" + "1" * 62, "ab" + "2" * 62, "ab" + "3" * 62, "cd" + "4" * 62
    store.put(png_hash, png_bytes())
    (tmp_path / "cache" / "ab" / f"{jpg_hash}.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "cache" / "ab" / f".{temp_hash}.png").write_bytes(b"partial")
    (tmp_path / "cache" / "ab" / f"{temp_hash}.png.tmp").write_bytes(b"partial")
    lookup = _StoreLookup(store)
    for h in (png_hash, jpg_hash, temp_hash, absent):
        assert lookup.has(h) == store.has(h), h
    assert lookup.has(png_hash) and lookup.has(jpg_hash) and not lookup.has(temp_hash) and not lookup.has(absent)
    hashes = [absent, png_hash, temp_hash, jpg_hash, png_hash]
    assert _StoreLookup(store).has_all(hashes) == [store.has(h) for h in hashes] == [False, True, False, True, True]
    ahead = _StoreLookup(store)
    ahead.list_ahead()  # all 256 prefix dirs, listed in a thread while the caller goes on
    assert ahead.has_all(hashes) == [False, True, False, True, True]
    assert ahead.whole is not None and len(ahead.whole) == 2  # every prefix listed: one table, searched once a batch


def test_cache_lookup_leaves_out_stray_files_named_like_entries(tmp_path):
    """A file with an image extension whose name is not a hash, or sits under another hash's prefix dir, is no entry
    (and does not spoil the listing of the ones that are)."""
    from batcher.storage.store import StoreLookup as _StoreLookup

    store = ImageStore(tmp_path / "cache")
    good, misplaced = "ab" + "5" * 62, "cd" + "6" * 62
    store.put(good, png_bytes())
    (tmp_path / "cache" / "ab" / ("zz" * 32 + ".png")).write_bytes(png_bytes())  # 64 characters, not hex
    upper = "ab" + "7" * 31 + "c" * 31  # an entry of this hash would be named in lower case
    (tmp_path / "cache" / "ab" / f"{upper.upper()}.png").write_bytes(png_bytes())
    (tmp_path / "cache" / "ab" / f"{misplaced}.png").write_bytes(png_bytes())  # under the wrong prefix
    lookup, ahead = _StoreLookup(store), _StoreLookup(store)
    ahead.list_ahead()
    for each in (lookup, ahead):
        assert each.has_all([good, misplaced, upper]) == [True, False, False] == [store.has(h) for h in (good, misplaced, upper)]
    assert ahead.whole is not None and len(ahead.whole) == 1


def test_cache_lookup_memory_is_bounded_past_its_listing_limit(tmp_path, monkeypatch):
    """Past MAX_LISTED_HASHES listed, prefixes not listed yet are asked one hash at a time: same answers."""
    from batcher.storage import store as store_mod

    store = ImageStore(tmp_path / "cache")
    hashes = [f"{p:02x}" + str(i) * 62 for p in range(4) for i in range(3)]
    for h in hashes[::2]:
        store.put(h, png_bytes())
    monkeypatch.setattr(store_mod, "MAX_LISTED_HASHES", 2)
    lookup = store_mod.StoreLookup(store)
    assert [lookup.has(h) for h in hashes] == [store.has(h) for h in hashes] == [i % 2 == 0 for i in range(len(hashes))]
    assert len(lookup.dirs) == 1 and lookup.listed == 2  # the first prefix listed (2 images), the rest asked
    batched = store_mod.StoreLookup(store)
    assert batched.has_all(hashes) == [i % 2 == 0 for i in range(len(hashes))]
    assert len(batched.dirs) == 1 and batched.listed == 2
    ahead = store_mod.StoreLookup(store)
    ahead.list_ahead(threads=1)  # every prefix dir, in a thread: it stops at the limit too
    assert ahead.has_all(hashes) == [i % 2 == 0 for i in range(len(hashes))]
    assert list(ahead.dirs) == ["00"] and ahead.listed == 2
    ahead = store_mod.StoreLookup(store)
    ahead.list_ahead(threads=2)  # which prefixes get listed depends on the threads' order; the answers do not
    assert ahead.has_all(hashes) == [i % 2 == 0 for i in range(len(hashes))]
    assert 1 <= len(ahead.dirs) <= 2 and ahead.listed <= 3


def test_a_unique_temp_name_another_writer_holds_is_never_shared(tmp_path, monkeypatch):
    """Two processes writing one cache entry: each gets its own temp file (O_EXCL, a new name on a clash), and a
    writer never removes the other's."""
    dest = tmp_path / "ab" / f"{'ab' * 32}.png"
    dest.parent.mkdir()
    draws = iter([b"\x00" * 6, b"\x00" * 6, b"\x01" * 6])  # the first name clashes, the second is free
    monkeypatch.setattr(atomic.os, "urandom", lambda n: next(draws))
    other = atomic.temp_path(dest, unique=True)
    other.write_bytes(b"another writer's half-written image")
    atomic.write_bytes(dest, b"mine", unique=True, durable=True, mode=0o600)
    assert dest.read_bytes() == b"mine" and other.read_bytes() == b"another writer's half-written image"
