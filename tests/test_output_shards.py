"""The dataset in training shapes (output.shards): WebDataset tar shards and Parquet shards, each loaded with the
library its users load it with (`webdataset`, Hugging Face `datasets`), written again identically, and exported
from a finished run as `run --dataset-format` writes it."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import batcher.pipeline as pipeline
from batcher.cli import main
from batcher.errors import UsageError
from batcher.output import dataset, shards
from batcher.settings import Settings

from .helpers import write_csv
from .test_output_dataset import finished_run

SHARD_SIZE = 200  # bytes: the test images are ~70-600 bytes, so a shard holds one to three


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("datasets")  # a declared test dependency; skip only on a bare install


def shard_files(out) -> dict[str, bytes]:
    """Every file under OUT/shards and OUT/data (temp files too), by path relative to OUT."""
    return {os.path.relpath(p, out): open(p, "rb").read()
            for d in ("shards", "data") for p in sorted(glob.glob(os.path.join(out, d, "*")) + glob.glob(os.path.join(out, d, ".*")))}


def tar_members(path) -> list[tuple[str, int]]:
    with tarfile.open(path) as tar:
        return [(m.name, m.size) for m in tar.getmembers()]


# ---- webdataset --------------------------------------------------------------------------------------------

def test_webdataset_shards_load_with_webdataset_and_hugging_face(tmp_path, hf_offline):
    wds = pytest.importorskip("webdataset")
    ledger, store, run_id, _ = finished_run(tmp_path)
    out = tmp_path / "out"
    summary = dataset.write_dataset(ledger, store, run_id, out, fmt="webdataset", shard_size=SHARD_SIZE)
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    with_image = [r for r in meta if r["status"] == "ok"]
    assert len(meta) == 9 and len(with_image) == summary.ok == 5
    # Rows without their image (failed, blocked, pending, and the one the cache lost) are in metadata.parquet only.
    assert all(r["shard"] is None and r["file_name"] is None for r in meta if r["status"] != "ok")
    assert {r["shard"] for r in with_image} == set(summary.shard_names) and len(summary.shard_names) > 1
    assert sorted(os.listdir(out / "shards")) == [n.split("/")[1] for n in summary.shard_names]
    assert not (out / "images").exists()

    # The size limit: a shard holds more than one sample only while their images fit in it.
    for name in summary.shard_names:
        images = [size for member, size in tar_members(out / name) if not member.endswith(".json")]
        assert sum(images) <= SHARD_SIZE or len(images) == 1, (name, images)

    # The webdataset library: every sample once, in the rows' order, its image and its metadata row.
    urls = [str(out / n) for n in summary.shard_names]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    keys = [s["__key__"] for s in samples]
    assert keys == [r["file_name"].split(".")[0] for r in with_image] and len(set(keys)) == len(keys)
    for sample, row in zip(samples, with_image):
        image = sample.get("png") or sample.get("jpg")
        assert isinstance(image, Image.Image) and image.size == (8, 8)
        assert sample["json"] == {k: v for k, v in row.items() if k != "shard"}
    assert [s["json"]["colour"] for s in samples] == [r["colour"] for r in with_image]  # carried-through columns too

    # Hugging Face `datasets`: the folder (its card names the shards and every field's type) ...
    ds = hf_offline.load_dataset(str(out), split="train")
    rows = list(ds)
    assert [r["json"]["id"] for r in rows] == [r["id"] for r in with_image]
    assert all(isinstance(r["png"] if r["png"] is not None else r["jpg"], Image.Image) for r in rows)
    assert rows[0]["json"]["request_hash"] == with_image[0]["request_hash"]
    # ... and the shards as data files
    ds = hf_offline.load_dataset("webdataset", data_files={"train": urls}, split="train")
    assert sorted(r["__key__"] for r in ds) == sorted(keys)


def test_a_sample_key_is_dot_free_unique_and_in_row_order():
    keys = [shards.sample_key(row, v) for row in (2, 10, 999_999_999) for v in (0, 1)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys)


# ---- parquet -----------------------------------------------------------------------------------------------

def test_parquet_shards_load_with_hugging_face_as_images(tmp_path, hf_offline):
    ledger, store, run_id, _ = finished_run(tmp_path)
    out = tmp_path / "out"
    summary = dataset.write_dataset(ledger, store, run_id, out, fmt="parquet", shard_size=SHARD_SIZE)
    meta = pq.read_table(out / "metadata.parquet")
    assert len(summary.shard_names) > 1 and all(n.startswith("data/train-") for n in summary.shard_names)
    # Every row is in a shard (no image: image None), with the columns of metadata.parquet.
    shard_columns = pq.read_schema(out / summary.shard_names[0]).names
    assert shard_columns == ["image"] + [c for c in meta.column_names if c != "shard"]
    for name in summary.shard_names:  # row groups of bounded size: the shard limit holds here too
        t = pq.read_table(out / name, columns=["image"]).column("image").to_pylist()
        sizes = [len(x["bytes"]) for x in t if x is not None]
        assert sum(sizes) <= SHARD_SIZE or len(sizes) == 1

    files = sorted(str(out / n) for n in summary.shard_names)
    ds = hf_offline.load_dataset("parquet", data_files={"train": files}, split="train")
    rows = list(ds)
    expected = meta.to_pylist()
    assert [(r["id"], r["status"]) for r in rows] == [(r["id"], r["status"]) for r in expected]
    for r in rows:
        assert isinstance(r["image"], Image.Image) if r["status"] == "ok" else r["image"] is None
    assert {r["image"].format for r in rows if r["image"] is not None} == {"PNG", "JPEG"}
    # The folder, through its card: every row, or only those with their image.
    assert len(hf_offline.load_dataset(str(out), split="train")) == 9
    ok = hf_offline.load_dataset(str(out), "ok", split="train")
    assert [r["id"] for r in ok] == [r["id"] for r in expected if r["status"] == "ok"]


# ---- written again -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_writing_again_gives_the_same_shards_and_rewrites_none(tmp_path, fmt):
    ledger, store, run_id, _ = finished_run(tmp_path)
    out = tmp_path / "out"
    first = dataset.write_dataset(ledger, store, run_id, out, fmt=fmt, shard_size=SHARD_SIZE)
    before = shard_files(out)
    again = dataset.write_dataset(ledger, store, run_id, out, fmt=fmt, shard_size=SHARD_SIZE)
    assert shard_files(out) == before and again.shard_names == first.shard_names
    assert first.shards_written == len(first.shard_names) and again.shards_written == 0
    # A shard changed behind batcher's back (a different size) is written again, the others are not.
    victim = out / first.shard_names[0]
    victim.write_bytes(b"junk")
    third = dataset.write_dataset(ledger, store, run_id, out, fmt=fmt, shard_size=SHARD_SIZE)
    assert third.shards_written == 1 and shard_files(out) == before


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_write_killed_half_way_is_completed_by_the_next_without_duplicates(tmp_path, fmt, monkeypatch):
    ledger, store, run_id, _ = finished_run(tmp_path)
    clean = tmp_path / "clean"
    dataset.write_dataset(ledger, store, run_id, clean, fmt=fmt, shard_size=SHARD_SIZE)
    out = tmp_path / "out"
    dataset.write_dataset(ledger, store, run_id, out, fmt=fmt, shard_size=40)  # an earlier write: more, smaller shards
    assert len(shard_files(out)) > len(shard_files(clean))

    # The next write dies while writing its second shard: the first is replaced, the rest are the earlier write's.
    writes = []
    real = shards.ShardWriter._write_tar if fmt == "webdataset" else shards.ShardWriter._write_parquet

    def dies_on_the_second(self, tmp):
        writes.append(tmp)
        if len(writes) == 2:
            tmp.write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        return real(self, tmp)

    monkeypatch.setattr(shards.ShardWriter, "_write_tar" if fmt == "webdataset" else "_write_parquet", dies_on_the_second)
    with pytest.raises(Exception, match="No space left"):
        dataset.write_dataset(ledger, store, run_id, out, fmt=fmt, shard_size=SHARD_SIZE)
    monkeypatch.undo()
    summary = dataset.write_dataset(ledger, store, run_id, out, fmt=fmt, shard_size=SHARD_SIZE)
    assert shard_files(out) == shard_files(clean)  # no stale shard, no temp file, no sample twice
    assert summary.shards_written == len(summary.shard_names) - 1  # the first was already in place
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    assert meta == pq.read_table(clean / "metadata.parquet").to_pylist()
    if fmt == "webdataset":
        keys = [m for n in summary.shard_names for m, _ in tar_members(out / n)]
        assert len(keys) == len(set(keys)) == 2 * summary.ok


def test_changing_format_removes_the_other_layout_and_leaves_other_files(tmp_path):
    ledger, store, run_id, _ = finished_run(tmp_path)
    out = tmp_path / "out"
    dataset.write_dataset(ledger, store, run_id, out)
    assert (out / "images").is_dir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "mine.parquet").write_bytes(b"not ours")
    s = dataset.write_dataset(ledger, store, run_id, out, fmt="webdataset", shard_size=SHARD_SIZE)
    assert not (out / "images").exists() and s.removed == 4  # four distinct images were placed
    dataset.write_dataset(ledger, store, run_id, out, fmt="parquet", shard_size=SHARD_SIZE)
    assert not (out / "shards").exists() and len(os.listdir(out / "data")) > 1
    dataset.write_dataset(ledger, store, run_id, out)
    assert sorted(os.listdir(out / "data")) == ["mine.parquet"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["README.md", "data", "images", "metadata.parquet", "notes.txt"]
    assert "shard" not in pq.read_schema(out / "metadata.parquet").names  # the files layout is as before


# ---- options -----------------------------------------------------------------------------------------------

def test_the_format_options_are_checked(tmp_path):
    assert Settings(dataset_format="parquet", shard_size="64KiB").shard_size == 65536
    assert Settings(shard_size="1.5GB").shard_size == 1_500_000_000
    with pytest.raises(UsageError, match="--dataset-format 'tar'"):
        Settings(dataset_format="tar")
    with pytest.raises(UsageError, match="--shard-size: not a size: 'big'"):
        Settings(shard_size="big")
    with pytest.raises(UsageError, match="local --out only"):
        Settings(out="gs://bucket/ds", dataset_format="webdataset")
    assert Settings(out="gs://bucket/ds").dataset_format == "files"
    write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "x"]])
    (tmp_path / "job.toml").write_text('manifest = "m.csv"\ndataset_format = "webdataset"\nshard_size = "10MB"\n')
    _, s = Settings.from_spec(tmp_path / "job.toml")
    assert (s.dataset_format, s.shard_size) == ("webdataset", 10_000_000)
    (tmp_path / "bad.toml").write_text('manifest = "m.csv"\ndataset_format = "zip"\n')
    with pytest.raises(UsageError, match="'dataset_format' is 'zip'; use one of files, webdataset, parquet"):
        Settings.from_spec(tmp_path / "bad.toml")


# ---- export ------------------------------------------------------------------------------------------------

def webdataset_samples(out) -> list[tuple[str, bytes]]:
    """Every member of the dataset's tar shards, in order (name, bytes)."""
    members = []
    for path in sorted(glob.glob(str(out / "shards" / "*.tar"))):
        with tarfile.open(path) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return members


@pytest.mark.slow
def test_export_of_a_finished_run_is_what_run_writes_in_that_format(tmp_path, emulator, backend_factory, monkeypatch):
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "variants", "sku"],
                  [["a", "a calm sea", "2", "S1"], ["b", "a storm [emulator:image_safety]", "", "S2"], ["c", "a forest", "", "S3"]])
    s = dict(workdir=tmp_path / "w", cache_dir=tmp_path / "c", poll_interval=0.05, timeout=30, quiet=True)
    assert pipeline.run(m, Settings(out=tmp_path / "files", **s), backend_factory=backend_factory).exit_code == 3
    created = emulator.stats()["batches_created"]
    size = "1KB"  # under any of the emulator's images: a shard each

    # `batcher export` (no API key in this environment, no API call): from the files dataset's run ...
    for fmt in ("webdataset", "parquet"):
        r = CliRunner().invoke(main, ["export", "--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"),
                                      "--out", str(tmp_path / f"export-{fmt}"), "--dataset-format", fmt, "--shard-size", size, "-q"])
        assert r.exit_code == 3, r.output  # as the run: a blocked row
        assert "exported: 3 rows read" in r.output and f"{fmt}: " in r.output and "dataset " in r.output, r.output
    assert emulator.stats()["batches_created"] == created

    # ... equals what run writes in that format (the same run, run again: everything is done, nothing is sent)
    for fmt in ("webdataset", "parquet"):
        settings = Settings(out=tmp_path / f"run-{fmt}", dataset_format=fmt, shard_size=size, **s)
        out = pipeline.run(m, settings, backend_factory=backend_factory)
        assert out.exit_code == 3 and out.dataset.format == fmt
        assert shard_files(tmp_path / f"run-{fmt}") == shard_files(tmp_path / f"export-{fmt}")
        assert pq.read_table(tmp_path / f"run-{fmt}" / "metadata.parquet").equals(
            pq.read_table(tmp_path / f"export-{fmt}" / "metadata.parquet"))
    assert emulator.stats()["batches_created"] == created
    samples = webdataset_samples(tmp_path / "export-webdataset")
    assert [n for n, _ in samples] == ["r000000002_v0.png", "r000000002_v0.json", "r000000002_v1.png", "r000000002_v1.json",
                                       "r000000004_v0.png", "r000000004_v0.json"]
    assert [json.loads(b)["sku"] for n, b in samples if n.endswith(".json")] == ["S1", "S1", "S3"]
    assert Image.open(io.BytesIO(samples[0][1])).size == (1024, 1024)
    assert len(glob.glob(str(tmp_path / "export-webdataset" / "shards" / "*.tar"))) == 3
