"""The output dataset: images linked from a local cache, one system call per new image, must end exactly where
placing each image through ImageStore.find and a temp file ends (files, links, metadata.parquet)."""

from __future__ import annotations

import errno
import io
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from batcher.output import dataset
from batcher.ledger import Ledger
from batcher.manifest import ManifestOptions
from batcher.planning.planner import plan_manifest
from batcher.storage.store import ImageStore

from .helpers import png_bytes, write_csv


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buf, "JPEG")
    return buf.getvalue()


def finished_run(tmp_path) -> tuple[Ledger, ImageStore, int, list[str]]:
    """A run of 9 rows (two share a request) whose requests are done, failed or pending; the cache holds PNGs,
    a JPEG, and has lost one done request's image."""
    store = ImageStore(tmp_path / "cache")
    ledger = Ledger(tmp_path / "wd")
    prompts = ["a", "b", "c", "d", "a", "e", "f", "g", "h"]
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "colour"], [[f"r{i}", p, f"c{i % 3}"] for i, p in enumerate(prompts)])
    result = plan_manifest(ledger, store, m, ManifestOptions())
    hashes = [h for (h,) in ledger.conn.execute("SELECT hash FROM requests ORDER BY rowid")]
    states = ["succeeded", "succeeded", "succeeded", "failed", "succeeded", "planned", "succeeded", "blocked"]
    with ledger.transaction() as c:
        for i, (h, state) in enumerate(zip(hashes, states)):
            c.execute("UPDATE requests SET state=?, attempts=1, cost_usd=?, error=? WHERE hash=?",
                      (state, 0.02 * (i + 1), "boom" if state != "succeeded" else None, h))
    for i in (0, 1, 4):
        store.put(hashes[i], png_bytes((i, i, i)))
    store.put(hashes[2], jpeg_bytes())  # hashes[6]: done, but the cache lost its image
    return ledger, store, result.run_id, hashes


def dataset_files(out) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(out) for f in files if f != "metadata.parquet"}


def test_a_dataset_linked_from_the_cache_is_the_one_placed_through_find(tmp_path):
    ledger, store, run_id, hashes = finished_run(tmp_path)
    linked = dataset.write_dataset(ledger, store, run_id, tmp_path / "linked")
    plain_out = tmp_path / "plain"
    plain = dataset._write_dataset(ledger, store, run_id, plain_out,
                                   place=lambda src, name: dataset._place_image(src, plain_out / name))
    a = pq.read_table(tmp_path / "linked" / "metadata.parquet").to_pylist()
    b = pq.read_table(plain_out / "metadata.parquet").to_pylist()
    assert a == b and len(a) == 9
    assert (linked.ok, linked.pending, linked.failed, linked.blocked) == (plain.ok, plain.pending, plain.failed, plain.blocked) == (5, 2, 1, 1)
    assert linked.cost_usd == pytest.approx(plain.cost_usd)
    linked_files = dataset_files(tmp_path / "linked")
    assert linked_files.pop(dataset.CARD).startswith(b"---\nconfigs:")  # write_dataset adds the dataset card
    assert linked_files == dataset_files(plain_out)
    assert {r["file_name"] for r in a if r["file_name"]} == {
        f"images/{hashes[0][:2]}/{hashes[0]}.png", f"images/{hashes[1][:2]}/{hashes[1]}.png",
        f"images/{hashes[2][:2]}/{hashes[2]}.jpg", f"images/{hashes[4][:2]}/{hashes[4]}.png"}
    png = tmp_path / "linked" / "images" / hashes[0][:2] / f"{hashes[0]}.png"
    assert png.stat().st_ino == store.find(hashes[0]).stat().st_ino  # a hard link, not a copy
    # Written again (the next collect): the same dataset; an image the cache has lost since is pending.
    store.find(hashes[1]).unlink()
    again = dataset.write_dataset(ledger, store, run_id, tmp_path / "linked")
    rows = pq.read_table(tmp_path / "linked" / "metadata.parquet").to_pylist()
    assert (again.ok, again.pending) == (4, 3)
    assert [r["status"] for r in rows if r["request_hash"] == hashes[1]] == ["pending"]
    assert [r for r in rows if r["request_hash"] != hashes[1]] == [r for r in a if r["request_hash"] != hashes[1]]


def test_a_cache_on_another_filesystem_is_copied_into_the_dataset(tmp_path, monkeypatch):
    ledger, store, run_id, hashes = finished_run(tmp_path)

    def no_links(src, dest):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(dataset.os, "link", no_links)
    summary = dataset.write_dataset(ledger, store, run_id, tmp_path / "out")
    assert summary.ok == 5
    png = tmp_path / "out" / "images" / hashes[0][:2] / f"{hashes[0]}.png"
    assert png.read_bytes() == store.find(hashes[0]).read_bytes() and png.stat().st_nlink == 1
    assert not [f for f in dataset_files(tmp_path / "out") if f.endswith(".tmp") or "/.tmp-" in f or f.startswith(".tmp-")]


def test_an_entry_in_the_way_is_replaced_and_a_lost_image_makes_no_directory(tmp_path):
    """An entry already at an image's place that is not a file (a dangling link left from elsewhere) is replaced
    by the image, as placing it through find did; a request whose image the cache lost leaves no empty
    directory behind."""
    ledger, store, run_id, hashes = finished_run(tmp_path)
    out = tmp_path / "out"
    dest = out / "images" / hashes[0][:2] / f"{hashes[0]}.png"
    dest.parent.mkdir(parents=True)
    dest.symlink_to(tmp_path / "nowhere.png")
    summary = dataset.write_dataset(ledger, store, run_id, out)
    assert summary.ok == 5 and not dest.is_symlink() and dest.read_bytes() == store.find(hashes[0]).read_bytes()
    placed = {p.name for p in (out / "images").iterdir()}
    assert placed == {h[:2] for h in (hashes[0], hashes[1], hashes[2], hashes[4])}
