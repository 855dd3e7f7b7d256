"""storage.housekeeping: `batcher cache stats | verify | gc` on a local cache and on a gs:// one (a GCS emulator)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner

from batcher.cli import main
from batcher.errors import UsageError
from batcher.ledger.reading import referenced_hashes
from batcher.storage import gcs, housekeeping
from batcher.storage.store import ImageStore, open_store
from tests.gcs_support import set_updated
from tests.helpers import png_bytes, settings, write_csv

DAY = 86400.0
NOW = time.time()


def h(i: int) -> str:
    return hashlib.sha256(f"request {i}".encode()).hexdigest()


class Cache:
    """A cache under test, local or gs://, and what a test does to its files behind the store's back."""

    def __init__(self, root):
        self.root = str(root)
        self.store = open_store(root)
        self.gcs = gcs.is_gcs(self.root)

    def path(self, request_hash: str, ext: str) -> str:
        return f"{self.root}/{request_hash[:2]}/{request_hash}{ext}"

    def put(self, request_hash: str, *, model: str = "m", age_days: float = 0.0, color=(1, 2, 3)) -> None:
        self.store.put(request_hash, png_bytes(color), {"model": model})
        self.age(request_hash, age_days)

    def age(self, request_hash: str, days: float) -> None:
        when = NOW - days * DAY
        for ext in (".png", ".json"):
            if self.gcs:
                set_updated(self.path(request_hash, ext), when)
            elif os.path.exists(self.path(request_hash, ext)):
                os.utime(self.path(request_hash, ext), (when, when))

    def write(self, request_hash: str, ext: str, data: bytes) -> None:
        """Replace a file's bytes as a disk or a stray tool would, keeping its age."""
        if self.gcs:
            gcs.delete(self.path(request_hash, ext))
            gcs.write_if_absent(self.path(request_hash, ext), data)
        else:
            Path(self.path(request_hash, ext)).write_bytes(data)

    def read(self, request_hash: str, ext: str) -> bytes | None:
        if self.gcs:
            return gcs.read_bytes(self.path(request_hash, ext))
        p = Path(self.path(request_hash, ext))
        return p.read_bytes() if p.exists() else None

    def names(self) -> set[str]:
        """Every file of the cache, relative to its root (the quarantine included)."""
        if self.gcs:
            return {uri[len(self.root) + 1:] for uri in gcs.list_names(self.root + "/")}
        return {str(p.relative_to(self.root)) for p in Path(self.root).rglob("*") if p.is_file()}


@pytest.fixture(params=["local", "gcs"])
def cache(request, tmp_path) -> Cache:
    if request.param == "gcs":
        return Cache(request.getfixturevalue("bucket") + "/cache")
    return Cache(tmp_path / "cache")


def test_stats_by_model_and_by_age(cache):
    for i in range(3):
        cache.put(h(i), model="gemini-3.1-flash-image", age_days=0.5)
    for i in range(3, 5):
        cache.put(h(i), model="gemini-3-pro-image", age_days=45)
    cache.put(h(5), model="gemini-3-pro-image", age_days=120)
    image_bytes = len(png_bytes())
    st = housekeeping.stats(cache.store, now=NOW)
    assert st.entries == 6 and st.without_meta == 0 and st.orphan_meta == 0
    assert {m: t.entries for m, t in st.by_model.items()} == {"gemini-3.1-flash-image": 3, "gemini-3-pro-image": 3}
    assert {a: t.entries for a, t in st.by_age.items()} == {"<1d": 3, "1-7d": 0, "7-30d": 0, "30-90d": 2, ">90d": 1}
    meta_bytes = sum(len(cache.read(h(i), ".json")) for i in range(6))
    assert st.bytes == 6 * image_bytes + meta_bytes
    assert st.by_model["gemini-3-pro-image"].bytes == 3 * image_bytes + sum(len(cache.read(h(i), ".json")) for i in (3, 4, 5))
    assert st.oldest == pytest.approx(NOW - 120 * DAY, abs=1) and st.newest == pytest.approx(NOW - 0.5 * DAY, abs=1)
    assert json.loads(json.dumps(st.to_dict()))["by_age"][">90d"] == {"entries": 1, "bytes": image_bytes + len(cache.read(h(5), ".json"))}


def test_stats_counts_temp_files_and_half_written_entries_apart(tmp_path):
    cache = Cache(tmp_path / "cache")
    cache.put(h(0))
    prefix = Path(cache.root) / h(0)[:2]
    (prefix / ".tmp-0123456789ab.png").write_bytes(b"half an im")  # a write under way (atomic's unique temp name)
    (prefix / f"{h(1)}.json").write_text('{"model": "m"}')  # its .json written, its image not yet
    (prefix / f"{h(2)}.png").write_bytes(png_bytes())  # an image without metadata (from before meta was written)
    (Path(cache.root) / "quarantine").mkdir()
    (Path(cache.root) / "README.txt").write_text("not batcher's")
    st = housekeeping.stats(cache.store)
    assert (st.entries, st.orphan_meta, st.without_meta, st.temp_files, st.temp_bytes) == (2, 1, 1, 1, 10)
    assert st.by_model["unknown"].entries == 1 and st.by_model["m"].entries == 1


def test_verify_checks_the_sha256_of_entries_written_before_the_digest_changed(tmp_path):
    """Entries written before 2026-12-05 record a SHA-256 instead of XXH3-128: verify still compares it."""
    cache = Cache(tmp_path / "cache")
    for i, colour in enumerate(((1, 2, 3), (4, 5, 6))):
        cache.put(h(i), age_days=3, color=colour)
        old_meta = {"model": "m", "sha256": hashlib.sha256(png_bytes(colour)).hexdigest()}
        cache.write(h(i), ".json", json.dumps(old_meta).encode())
    cache.write(h(1), ".png", png_bytes((9, 9, 9)))  # a valid PNG, but not the one its SHA-256 was taken of
    report = housekeeping.verify(cache.store, now=NOW)
    assert (report.checked, report.ok, report.without_digest) == (2, 1, 0)
    assert [b.hash for b in report.bad] == [h(1)] and "do not match the sha256 digest" in report.bad[0].reason


def test_stats_of_a_missing_cache_dir_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such directory.*--cache-dir"):
        housekeeping.stats(ImageStore(tmp_path / "nowhere"))


def test_verify_moves_a_corrupted_and_a_changed_image_aside(cache):
    for i in range(4):
        cache.put(h(i), age_days=3)
    good = png_bytes((1, 2, 3))
    flipped = bytearray(good)
    flipped[40] ^= 0xFF  # inside IHDR/IDAT: the chunk's CRC no longer matches
    cache.write(h(1), ".png", bytes(flipped))
    cache.write(h(2), ".png", png_bytes((200, 0, 0)))  # a valid PNG, but not the image the digest was taken of
    cache.age(h(1), 3)
    cache.age(h(2), 3)
    before = cache.names()

    report = housekeeping.verify(cache.store, now=NOW)
    assert (report.checked, report.ok, report.without_digest) == (4, 2, 0)
    bad = {b.hash: b for b in report.bad}
    assert set(bad) == {h(1), h(2)}
    assert "bad CRC" in bad[h(1)].reason and "do not match the xxh3_128 digest" in bad[h(2)].reason
    assert not cache.store.has(h(1)) and not cache.store.has(h(2))  # missing: the next run generates them again
    assert cache.store.has(h(0)) and cache.store.has(h(3))
    # Kept, not deleted: the image and its .json, under quarantine/<when>/<prefix>/.
    moved = {n for n in cache.names() if n.startswith("quarantine/")}
    assert {n.split("/", 2)[2] for n in moved} == {f"{x[:2]}/{x}{ext}" for x in (h(1), h(2)) for ext in (".png", ".json")}
    assert report.quarantine.endswith("/" + next(iter(moved)).split("/")[1])
    assert cache.names() - moved == before - {f"{x[:2]}/{x}{ext}" for x in (h(1), h(2)) for ext in (".png", ".json")}
    # The next run's put makes the entry again (on GCS too: its old .json went with the image, so it is no obstacle).
    cache.store.put(h(2), png_bytes((200, 0, 0)), {"model": "m"})
    again = housekeeping.verify(cache.store, now=NOW)
    assert (again.checked, again.ok, again.bad) == (3, 3, [])


def test_verify_decodes_entries_without_a_digest_and_leaves_young_bad_ones_in_place(tmp_path):
    cache = Cache(tmp_path / "cache")
    old_style = h(0)  # written before digests were recorded
    prefix = Path(cache.root) / old_style[:2]
    prefix.mkdir(parents=True)
    (prefix / f"{old_style}.png").write_bytes(png_bytes())
    (prefix / f"{old_style}.json").write_text('{"model": "m"}')
    cache.put(h(1))  # young, and bad
    cache.write(h(1), ".png", png_bytes((9, 9, 9)))
    report = housekeeping.verify(cache.store)  # default min_age: an hour
    assert (report.checked, report.ok, report.without_digest) == (2, 1, 1)
    (bad,) = report.bad
    assert bad.hash == h(1) and bad.moved_to == [] and cache.store.has(h(1))  # a writer may be replacing it
    assert report.quarantine is None and not (Path(cache.root) / "quarantine").exists()
    assert housekeeping.verify(cache.store, min_age=0).bad[0].moved_to  # once old enough, it goes
    assert not cache.store.has(h(1))


def test_gc_dry_run_lists_and_removes_nothing(cache):
    for i in range(5):
        cache.put(h(i), age_days=10 * (i + 1))
    before = cache.names()
    report = housekeeping.gc(cache.store, older_than=25 * DAY, dry_run=True, now=NOW, examples=2)
    assert (report.selected, report.deleted, report.scanned) == (3, 0, 5)
    assert [e["hash"] for e in report.examples] == [h(4), h(3)]  # oldest first
    assert report.examples[0]["age_days"] == pytest.approx(50, abs=0.1)
    assert report.remaining_bytes == report.scanned_bytes - report.selected_bytes
    assert cache.names() == before


def test_gc_by_age_removes_image_and_meta(cache):
    for i in range(5):
        cache.put(h(i), age_days=10 * (i + 1))
    report = housekeeping.gc(cache.store, older_than=25 * DAY, now=NOW)
    assert (report.selected, report.deleted, report.changed) == (3, 3, 0)
    assert [cache.store.has(h(i)) for i in range(5)] == [True, True, False, False, False]
    assert cache.names() == {f"{h(i)[:2]}/{h(i)}{ext}" for i in (0, 1) for ext in (".png", ".json")}
    assert report.remaining_bytes == housekeeping.stats(cache.store).bytes


def test_gc_to_a_size_budget_removes_the_oldest_first(cache):
    ages = [5, 40, 2, 90, 20, 60]
    for i, age in enumerate(ages):
        cache.put(h(i), age_days=age)
    entry = housekeeping.stats(cache.store).bytes // len(ages)
    report = housekeeping.gc(cache.store, max_bytes=3 * entry + 10, now=NOW)
    assert report.deleted == 3 and not report.over_budget
    assert {i for i in range(6) if cache.store.has(h(i))} == {0, 2, 4}  # 90, 60 and 40 days old went
    assert housekeeping.stats(cache.store).bytes <= 3 * entry + 10
    # Under budget already: nothing goes.
    assert housekeeping.gc(cache.store, max_bytes=3 * entry + 10, now=NOW).deleted == 0


def test_gc_never_removes_a_young_entry_or_a_temp_file(tmp_path):
    cache = Cache(tmp_path / "cache")
    cache.put(h(0), age_days=400)
    cache.put(h(1), age_days=0.01)  # 15 minutes old: a collect may still be writing it
    temp = Path(cache.root) / h(0)[:2] / ".tmp-a1b2c3d4e5f6.png"
    temp.write_bytes(b"a write under way")
    os.utime(temp, (NOW - 400 * DAY, NOW - 400 * DAY))
    half = Path(cache.root) / h(2)[:2] / f"{h(2)}.json"  # a put that has written its .json, not yet its image
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_text('{"model": "m"}')
    report = housekeeping.gc(cache.store, keep=set(), max_bytes=0, now=NOW)  # everything unreferenced, budget 0
    assert report.deleted == 1 and report.kept_young == 2 and report.temp_files == 1 and report.over_budget
    assert not cache.store.has(h(0)) and cache.store.has(h(1)) and temp.exists() and half.exists()
    assert housekeeping.gc(cache.store, older_than=0, min_age=0, now=time.time() + 1).deleted == 2  # the .json alone too
    assert temp.exists()


def test_gc_keeps_an_entry_written_again_after_the_listing(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    cache.put(h(0), age_days=100)
    listing = housekeeping._LocalCache.walk

    def listing_then_a_new_write(self, temps):
        yield from listing(self, temps)
        cache.store.put(h(0), png_bytes((7, 7, 7)), {"model": "m"})  # a --refresh collect, between listing and removal

    monkeypatch.setattr(housekeeping._LocalCache, "walk", listing_then_a_new_write)
    report = housekeeping.gc(cache.store, older_than=30 * DAY, now=NOW)
    assert (report.selected, report.deleted, report.changed) == (1, 0, 1)
    assert cache.read(h(0), ".png") == png_bytes((7, 7, 7))
    assert json.loads(cache.read(h(0), ".json"))["xxh3_128"] == xxhash.xxh3_128_hexdigest(png_bytes((7, 7, 7)))


@pytest.mark.slow
def test_gc_keeps_what_a_workdirs_ledger_references(tmp_path, emulator, backend_factory):
    import batcher.pipeline as pipeline

    manifest = write_csv(tmp_path / "m.csv", ["id", "prompt", "variants"],
                         [["a", "a red fox", "2"], ["b", "a blue car", "1"], ["c", "a bowl of ramen", "1"]])
    s = settings(tmp_path)
    assert pipeline.run(manifest, s, backend_factory=backend_factory).exit_code == 0
    cache = Cache(s.cache_dir)
    used = referenced_hashes(s.workdir)
    assert len(used) == 4 and all(cache.store.has(x) for x in used)
    for i in range(3):
        cache.put(h(i), age_days=1)  # another run's images, in a workdir since removed
    for x in used:
        cache.age(x, 1)

    report = housekeeping.gc(cache.store, keep=used, now=NOW)
    assert (report.deleted, report.kept_referenced) == (3, 4)
    assert not any(cache.store.has(h(i)) for i in range(3))
    again = pipeline.run(manifest, settings(tmp_path, workdir=tmp_path / "work2", out=tmp_path / "out2"),
                         backend_factory=backend_factory)
    assert again.exit_code == 0 and emulator.stats()["batches_created"] == 1  # every image still cached: no new job


def test_referenced_hashes_of_a_workdir_without_a_ledger_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no ledger"):
        referenced_hashes(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # nothing made


def test_ages_and_sizes_read_as_documented():
    assert housekeeping.parse_age("30d", "--older-than") == 30 * DAY
    assert housekeeping.parse_age("1.5h", "--min-age") == 5400 and housekeeping.parse_age("0", "--min-age") == 0
    assert housekeeping.parse_age("2w", "x") == 14 * DAY and housekeeping.parse_age("90m", "x") == 5400
    assert housekeeping.parse_size("50G", "--max-bytes") == 50 << 30
    assert housekeeping.parse_size("1.5TiB", "x") == int(1.5 * (1 << 40)) and housekeeping.parse_size("800", "x") == 800
    assert housekeeping.parse_size("500mb", "x") == 500 << 20
    with pytest.raises(UsageError, match="--older-than '30 days': not an age"):
        housekeeping.parse_age("30 days", "--older-than")
    with pytest.raises(UsageError, match="--max-bytes '-5G': not a size"):
        housekeeping.parse_size("-5G", "--max-bytes")


# ---- the CLI ------------------------------------------------------------------------------------------------------

def test_cli_json_outputs_and_exit_codes(tmp_path):
    cache = Cache(tmp_path / "cache")
    for i in range(4):
        cache.put(h(i), model="m1" if i % 2 else "m2", age_days=10 * i + 2)
    cache.write(h(3), ".png", png_bytes((50, 50, 50)))
    cache.age(h(3), 32)
    run = CliRunner().invoke

    r = run(main, ["cache", "stats", "--cache-dir", cache.root, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["entries"] == 4 and {m: t["entries"] for m, t in doc["by_model"].items()} == {"m1": 2, "m2": 2}

    r = run(main, ["cache", "verify", "--cache-dir", cache.root, "--json"])
    assert r.exit_code == 3, r.output  # bad entries found
    doc = json.loads(r.stdout)
    assert (doc["checked"], doc["ok"]) == (4, 3) and [b["hash"] for b in doc["bad"]] == [h(3)]
    assert doc["bad"][0]["moved_to"] and doc["images_per_second"] > 0
    r = run(main, ["cache", "verify", "--cache-dir", cache.root])
    assert r.exit_code == 0 and r.stdout.startswith("cache verify: 3 images checked, 3 ok, 0 bad")

    r = run(main, ["cache", "gc", "--cache-dir", cache.root, "--older-than", "15d", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["dry_run"], doc["selected"], doc["deleted"]) == (True, 1, 0) and doc["examples"][0]["hash"] == h(2)
    r = run(main, ["cache", "gc", "--cache-dir", cache.root, "--older-than", "15d"])
    assert r.exit_code == 0 and "cache gc: removed 1 entry" in r.stdout and not cache.store.has(h(2))

    for args, message in ((["gc"], "say what to remove"), (["gc", "--max-bytes", "lots"], "not a size"),
                          (["gc", "--keep-referenced", str(tmp_path / "nowork")], "no ledger"),
                          (["stats", "--cache-dir", str(tmp_path / "nocache")], "no such directory")):
        r = run(main, ["cache", *args, *([] if "--cache-dir" in args else ["--cache-dir", cache.root])])
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)


def test_cli_uses_the_default_cache_as_the_other_commands_do(tmp_path):
    store = ImageStore()  # BATCHER_CACHE_DIR (conftest): the user cache
    store.put(h(0), png_bytes(), {"model": "m"})
    r = CliRunner().invoke(main, ["cache", "stats"])
    assert r.exit_code == 0 and f"cache {store.root}" in r.stdout and "cache stats: 1 image," in r.stdout
