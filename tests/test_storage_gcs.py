"""gs:// I/O against a GCS emulator (with generation preconditions enforced, as real GCS does)."""

from __future__ import annotations

import pytest

from batcher.storage import gcs
from batcher.errors import UsageError


def test_create_if_absent_never_clobbers(bucket):
    uri = gcs.join(bucket, "cache/ab/x.png")
    assert gcs.write_if_absent(uri, b"first")
    assert not gcs.write_if_absent(uri, b"second")  # lost the race: not an error
    assert gcs.read_bytes(uri) == b"first"


def test_streamed_buffered_read(bucket, tmp_path):
    uri = gcs.join(bucket, "m/big.csv")
    data = b"id,prompt\n" + b"".join(b"%d,prompt number %d\n" % (i, i) for i in range(20000))
    src = tmp_path / "big.csv"
    src.write_bytes(data)
    gcs.upload_file(uri, str(src))
    with gcs.open_read(uri, chunk_size=1 << 16) as f:
        lines = sum(1 for _ in f)
    assert lines == 20001
    assert gcs.size(uri) == len(data)


def test_errors_are_clear(bucket):
    with pytest.raises(UsageError, match="not found in GCS"):
        gcs.size(gcs.join(bucket, "missing.csv"))
    with pytest.raises(UsageError, match="no bucket"):
        gcs.split("gs:///x")
    assert gcs.read_bytes(gcs.join(bucket, "missing")) is None
    gcs.delete(gcs.join(bucket, "missing"))  # deleting what isn't there is fine


def test_manifests_stream_from_gcs(bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batcher.manifest import ManifestOptions, ManifestRow, RowProblem, manifest_fingerprint, read_manifest

    csv_path = tmp_path / "m.csv"
    csv_path.write_text('id,prompt,category\na,"a fox, in snow",x\nb,"two\nlines",y\nc,,z\n', encoding="utf-8")
    pq_path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(5000)], "prompt": [f"prompt {i}" for i in range(5000)]}), pq_path,
                   row_group_size=1000)
    gcs.upload_file(gcs.join(bucket, "in/m.csv"), str(csv_path))
    gcs.upload_file(gcs.join(bucket, "in/m.parquet"), str(pq_path))
    items = list(read_manifest(gcs.join(bucket, "in/m.csv")))
    assert [i.id for i in items if isinstance(i, ManifestRow)] == ["a", "b"]
    assert [i.prompt for i in items if isinstance(i, ManifestRow)] == ["a fox, in snow", "two\nlines"]
    (problem,) = [i for i in items if isinstance(i, RowProblem)]
    assert problem.row == 4 and problem.column == "prompt" and problem.file.startswith("gs://")
    rows = list(read_manifest(gcs.join(bucket, "in/m.parquet"), batch_rows=700))
    assert len(rows) == 5000 and rows[-1].id == "r4999"
    fp = manifest_fingerprint(gcs.join(bucket, "in/m.parquet"), ManifestOptions())
    assert fp["size"] == pq_path.stat().st_size and fp["generation"]


def test_missing_or_empty_gcs_manifest_is_a_clear_error(bucket):
    from batcher.errors import ManifestError
    from batcher.manifest import read_manifest

    with pytest.raises(ManifestError, match="not found in GCS"):
        read_manifest(gcs.join(bucket, "nope.csv"))
    gcs.write_if_absent(gcs.join(bucket, "empty.csv"), b"")
    with pytest.raises(ManifestError, match="empty"):
        read_manifest(gcs.join(bucket, "empty.csv"))


@pytest.mark.slow
def test_a_run_reads_its_manifest_from_gcs(bucket, tmp_path, emulator, backend_factory):
    import pyarrow.parquet as pq

    import batcher.pipeline as pipeline

    src = tmp_path / "m.csv"
    src.write_text("id,prompt,sku\na,a teapot,T1\nb,a kettle,K1\nc,a teapot,T2\n", encoding="utf-8")
    uri = gcs.join(bucket, "manifests/m.csv")
    gcs.upload_file(uri, str(src))
    s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                          timeout=30, quiet=True)
    result = pipeline.run(uri, s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    rows = pq.read_table(s.out / "metadata.parquet").to_pylist()
    assert [(r["id"], r["sku"], r["status"]) for r in rows] == [("a", "T1", "ok"), ("b", "K1", "ok"), ("c", "T2", "ok")]
    # Unchanged object: the same run (no new job). A new version of the object: a new run.
    assert pipeline.run(uri, s, backend_factory=backend_factory).exit_code == 0
    assert emulator.stats()["batches_created"] == 1
    src.write_text("id,prompt\na,a teapot\nd,a mug\n", encoding="utf-8")
    gcs.upload_file(uri, str(src))
    assert pipeline.run(uri, s, backend_factory=backend_factory).exit_code == 0
    assert [r["id"] for r in pq.read_table(s.out / "metadata.parquet").to_pylist()] == ["a", "d"]
    assert emulator.stats()["batches_created"] == 2  # only the mug was new


def test_the_library_estimates_a_manifest_on_gcs_against_a_gcs_cache(bucket, tmp_path):
    """batcher.estimate reads manifests as planning does (it once took gs://b/m.csv for a local path "gs:/b/m.csv")."""
    import batcher

    src = tmp_path / "m.csv"
    src.write_text("id,prompt\na,a teapot\nb,a kettle\nc,a teapot\n", encoding="utf-8")
    uri = gcs.join(bucket, "manifests/m.csv")
    gcs.upload_file(uri, str(src))
    est = batcher.estimate(uri, batcher.Settings(cache_dir=gcs.join(bucket, "cache")))
    assert (est.manifest, est.rows, est.total().requests, est.total().distinct, est.total().to_generate) == (uri, 3, 3, 2, 2)
    with pytest.raises(Exception, match="manifests/gone.csv"):
        batcher.estimate(gcs.join(bucket, "manifests/gone.csv"))


@pytest.mark.slow
def test_cache_and_dataset_on_gcs(bucket, tmp_path, emulator, backend_factory):
    """Cache and output on gs://: a second workdir sharing the bucket cache creates no job."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    import batcher.pipeline as pipeline

    m = tmp_path / "m.csv"
    m.write_text("id,prompt,variants\na,a lighthouse,2\nb,a lighthouse,\nc,a barn,\n", encoding="utf-8")
    cache, out = gcs.join(bucket, "cache"), gcs.join(bucket, "datasets/nightly")
    s = pipeline.Settings(workdir=tmp_path / "w1", out=out, cache_dir=cache, poll_interval=0.05, timeout=30, quiet=True)
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 0
    with gcs.open_read(gcs.join(out, "metadata.parquet")) as f:
        rows = pq.read_table(f).to_pylist()
    assert [(r["id"], r["variant"], r["status"]) for r in rows] == [("a", 0, "ok"), ("a", 1, "ok"), ("b", 0, "ok"), ("c", 0, "ok")]
    for r in rows:
        data = gcs.read_bytes(gcs.join(out, r["file_name"]))
        Image.open(io.BytesIO(data)).verify()
    assert len(list(gcs.list_names(cache + "/"))) == 2 * 3  # three distinct requests: image + metadata each
    before = emulator.stats()["batches_created"]
    s2 = pipeline.Settings(workdir=tmp_path / "w2", out=tmp_path / "o2", cache_dir=cache, poll_interval=0.05, timeout=30,
                           quiet=True)
    assert pipeline.run(m, s2, backend_factory=backend_factory).exit_code == 0
    assert emulator.stats()["batches_created"] == before
    assert {r["cached"] for r in pq.read_table(s2.out / "metadata.parquet").to_pylist()} == {True}


def test_the_morning_report_of_a_gcs_dataset_is_uploaded_next_to_it(bucket, tmp_path, emulator, backend_factory,
                                                                     monkeypatch):
    """run writes report.html and contact_sheet.png into the gs:// dataset (made in WORKDIR/report/ from
    metadata.parquet and the contact sheet's images only); the page's grid links to the dataset's images."""
    import io
    import re

    import pyarrow.parquet as pq
    from PIL import Image

    import batcher.output.report as report
    import batcher.pipeline as pipeline

    monkeypatch.setattr(report, "SHEET_COUNT", 1)  # a sheet of one image: the other is not copied down
    downloads, uploads = [], []
    real_download, real_upload = gcs.download_file, gcs.upload_file
    monkeypatch.setattr(gcs, "download_file", lambda uri, path: (downloads.append(uri), real_download(uri, path)))

    m = tmp_path / "m.csv"
    m.write_text("id,prompt\na,a red kite\nb,a blue kite\nc,a kite [emulator:image_safety]\n", encoding="utf-8")
    out = gcs.join(bucket, "datasets/kites")
    s = pipeline.Settings(workdir=tmp_path / "w", out=out, cache_dir=tmp_path / "cache", poll_interval=0.05, timeout=30,
                          quiet=True, max_attempts=1)
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 3  # one row blocked
    page = gcs.read_bytes(gcs.join(out, "report.html")).decode()
    assert "a red kite" in page and "blocked" in page
    Image.open(io.BytesIO(gcs.read_bytes(gcs.join(out, "contact_sheet.png")))).verify()
    assert not list(gcs.list_names(gcs.join(out, "thumbs") + "/"))
    # Read back: the metadata and the one image of the contact sheet, not the grid's.
    assert [u.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for u in downloads] == ["parquet", "png"]
    rows = pq.read_table(s.workdir / "report" / "metadata.parquet").to_pylist()
    ok = [r["file_name"] for r in rows if r["status"] == "ok"]
    assert downloads[1] == gcs.join(out, ok[0])
    imgs = re.findall(r'<img src="(images/[^"]+)"( width="\d+" height="\d+")? loading="lazy"', page)
    with Image.open(s.workdir / "report" / ok[0]) as im:
        assert imgs == [(ok[0], f' width="{im.width}" height="{im.height}"'), (ok[1], "")]  # the other's size: unknown
    links = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert links == {*ok, "contact_sheet.png"}
    for rel in links:
        assert gcs.exists(gcs.join(out, rel)), rel  # the page's relative links resolve in the bucket
    monkeypatch.setattr(gcs, "upload_file", lambda uri, path, **kw: (uploads.append(uri), real_upload(uri, path, **kw)))
    again = pipeline.report(s)  # the command: the same files, replaced
    assert again.uploaded_to == out and again.rows == 3 and again.html_path == tmp_path / "w" / "report" / "report.html"
    assert sorted(uploads) == [gcs.join(out, "contact_sheet.png"), gcs.join(out, "report.html")]
    with pytest.raises(UsageError, match="no dataset at gs://.*/nothing-here"):
        pipeline.report(pipeline.Settings(workdir=tmp_path / "w", out=gcs.join(bucket, "nothing-here")))


def test_a_gcs_dataset_from_a_gcs_cache_copies_server_side(bucket, tmp_path, emulator, backend_factory, monkeypatch):
    """No image goes through the owner's disk: only metadata.parquet is staged locally."""
    import batcher.pipeline as pipeline

    m = tmp_path / "m.csv"
    m.write_text("id,prompt\na,a red door\nb,a blue door\nc,a red door\n", encoding="utf-8")
    downloads = []
    real = gcs.download_file
    monkeypatch.setattr(gcs, "download_file", lambda uri, path: (downloads.append(uri), real(uri, path)))
    out = gcs.join(bucket, "datasets/doors")
    s = pipeline.Settings(workdir=tmp_path / "w", out=out, cache_dir=gcs.join(bucket, "cache"), poll_interval=0.05,
                          timeout=30, quiet=True)
    # The dataset itself is copied server side; only the morning report (made in WORKDIR/report/ after the
    # dataset is written) reads anything back: its metadata and the images of its contact sheet.
    monkeypatch.setattr(pipeline, "write_dataset", _no_downloads_during(pipeline.write_dataset, downloads))
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 0
    assert sorted(u.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for u in downloads) == ["parquet", "png", "png"]
    dataset = [u for u in gcs.list_names(out + "/") if not u.endswith(("report.html", "contact_sheet.png"))]
    assert sorted(u.rsplit(".", 1)[-1] for u in dataset) == ["md", "parquet", "png", "png"]  # md: the dataset card
    assert not (s.workdir / "dataset-staging" / "images").exists()


def _no_downloads_during(write_dataset, downloads: list):
    def wrapped(*args, **kwargs):
        before = len(downloads)
        result = write_dataset(*args, **kwargs)
        assert len(downloads) == before, downloads[before:]  # no image went through the owner's disk
        return result
    return wrapped
