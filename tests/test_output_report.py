"""The morning report: report.html and contact_sheet.png, from `batcher report` and at the end of `run`."""

from __future__ import annotations

import pytest

import re

import pyarrow.parquet as pq
from click.testing import CliRunner
from PIL import Image

import batcher.pipeline as pipeline
from tests import helpers
import batcher.output.report as report
from batcher.cost.money import usd
from batcher.cli import main
from tests.helpers import write_csv

HEADER = ["id", "prompt", "variants"]
ROWS = [
    ["ok1", "a calm sea <script>alert(1)</script> & waves", ""],
    ["ok2", "a red fox in snow", "2"],
    ["<b>ok3</b>", "a bowl of ramen", ""],
    ["blk", "something [emulator:image_safety]", ""],
    ["err", "always broken [emulator:line_error]", ""],
]


def settings(tmp_path, **kw) -> pipeline.Settings:
    kw.setdefault("max_attempts", 2)
    return helpers.settings(tmp_path, **kw)


def run(tmp_path, backend_factory, rows=ROWS, **kw) -> tuple[pipeline.Settings, pipeline.Outcome]:
    s = settings(tmp_path, **kw)
    return s, pipeline.run(write_csv(tmp_path / "m.csv", HEADER, rows), s, backend_factory=backend_factory)


@pytest.mark.slow
def test_run_writes_the_report(tmp_path, emulator, backend_factory):
    s, outcome = run(tmp_path, backend_factory)
    assert outcome.exit_code == 3, outcome.summary
    page = (s.out / "report.html").read_text(encoding="utf-8")
    # Counts by status: 4 ok rows (ok2 has 2 variants), 1 blocked, 1 failed.
    for label, n in (("ok", 4), ("blocked", 1), ("failed", 1), ("pending", 0)):
        assert re.search(rf'<div class="l">{label}</div><div class="n[^"]*">{n}</div>', page), label
    # Failures grouped by reason, with example ids.
    assert "IMAGE_SAFETY" in page
    meta = {r["id"]: r for r in pq.read_table(s.out / "metadata.parquet").to_pylist()}
    from html import escape

    assert escape(meta["err"]["error"][:100]) in page
    assert "<code>blk</code>" in page and "<code>err</code>" in page
    # Jobs from status(): the batch names and their windows.
    doc = pipeline.status(s, refresh=False)
    for job in doc["jobs"]:
        assert job["display_name"] in page and job["name"] in page
        assert job["expires_at"][:10] in page
    # Cost: batch and interactive (2x).
    total = sum(r["cost_usd"] or 0 for r in pq.read_table(s.out / "metadata.parquet").to_pylist())
    assert total > 0
    assert usd(total) in page and usd(total * 2) in page


@pytest.mark.slow
def test_user_strings_are_escaped_and_paths_are_relative(tmp_path, emulator, backend_factory):
    s, _ = run(tmp_path, backend_factory)
    page = (s.out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; waves" in page
    assert "<b>ok3</b>" not in page and "&lt;b&gt;ok3&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page  # self-contained: no external URL
    srcs = re.findall(r'(?:src|href)="([^"]+)"', page)
    for path in srcs:
        assert not path.startswith("/") and ".." not in path and ":" not in path, path
        assert (s.out / path).is_file(), path
        assert re.fullmatch(r"images/[0-9a-f]{2}/[0-9a-f]+\.\w+|contact_sheet\.png", path), path
    # The grid shows the dataset's images themselves (one per ok row), sized from their headers, loaded lazily.
    imgs = re.findall(r'<img src="(images/[^"]+)" width="(\d+)" height="(\d+)" loading="lazy" decoding="async"', page)
    ok_files = sorted(r["file_name"] for r in pq.read_table(s.out / "metadata.parquet").to_pylist() if r["status"] == "ok")
    assert sorted(src for src, _, _ in imgs) == ok_files and len(ok_files) == 4
    for src, w, h in imgs:
        with Image.open(s.out / src) as im:
            assert im.size == (int(w), int(h))
    assert not (s.out / "thumbs").exists()


@pytest.mark.slow
def test_contact_sheet_decodes_with_the_expected_size(tmp_path, emulator, backend_factory):
    s, _ = run(tmp_path, backend_factory)
    with Image.open(s.out / "contact_sheet.png") as im:
        im.load()
        assert im.format == "PNG"
        assert im.size == report.contact_sheet_size(4)
    cols = report.SHEET_TILE + 2 * report.SHEET_PAD
    assert report.contact_sheet_size(4) == (4 * cols, report.SHEET_TILE + 2 * report.SHEET_PAD + report.SHEET_CAPTION)
    assert report.contact_sheet_size(100)[0] == report.SHEET_COLS * cols


@pytest.mark.slow
def test_cli_report_is_rerunnable_and_keeps_an_unchanged_contact_sheet(tmp_path, emulator, backend_factory, monkeypatch):
    s, _ = run(tmp_path, backend_factory)
    sheet = s.out / "contact_sheet.png"
    before = (sheet.stat().st_mtime_ns, sheet.read_bytes())
    (s.out / "report.html").unlink()
    monkeypatch.setattr(report, "_tile", _no_decode)
    r = CliRunner().invoke(main, ["report", "--workdir", str(s.workdir), "--out", str(s.out)])
    assert r.exit_code == 0, r.output
    assert "report.html" in r.output and (s.out / "report.html").exists()
    again = pipeline.report(s)
    assert not again.sheet_made  # its tiles had not changed: nothing decoded, the file untouched
    assert (sheet.stat().st_mtime_ns, sheet.read_bytes()) == before
    assert not [p for p in s.out.rglob("*") if p.name.endswith(".tmp")]  # no temp file left


def _no_decode(path):
    raise AssertionError(f"decoded {path}")


def _fake_dataset(out, images: dict[str, tuple[int, int] | None], mode: str = "RGB"):
    """OUT/metadata.parquet of one ok row per entry of `images` (id -> the size of its PNG, None: no file)."""
    import hashlib

    import pyarrow as pa

    rows = []
    for i, (id_, size) in enumerate(images.items()):
        h = hashlib.sha256(id_.encode()).hexdigest()
        name = f"images/{h[:2]}/{h}.png"
        if size is not None:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new(mode, size, i * 40 % 256 if mode != "RGB" else (i * 40 % 256, 90, 160)).save(out / name)
        rows.append({"file_name": name, "id": id_, "variant": 0, "status": "ok", "prompt": f"prompt of {id_}",
                     "request_hash": h, "error": None, "finish_reason": "STOP", "attempts": 1, "cached": False,
                     "cost_usd": 0.02})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "metadata.parquet")
    return rows


def _report(tmp_path, out):
    return report.write_report(pipeline.Settings(workdir=tmp_path / "w", out=out), status={"jobs": [], "requests": {}, "cache_hits": 0})


def test_the_grid_shows_the_images_at_their_header_sizes_and_old_thumbnails_go(tmp_path, caplog):
    out = tmp_path / "out"
    rows = _fake_dataset(out, {"wide": (64, 40), "tall": (30, 50), "gone": None})
    (out / "thumbs" / "ab").mkdir(parents=True)  # what an earlier version wrote
    (out / "thumbs" / "ab" / "ab12.jpg").write_bytes(b"old thumbnail")
    r = _report(tmp_path, out)
    page = r.html_path.read_text()
    imgs = re.findall(r'<a href="([^"]+)"><img src="([^"]+)" width="(\d+)" height="(\d+)" loading="lazy" decoding="async"', page)
    assert imgs == [(rows[0]["file_name"], rows[0]["file_name"], "64", "40"),
                    (rows[1]["file_name"], rows[1]["file_name"], "30", "50")]  # linked to the full image, too
    assert page.count("<figure>") == 3 and page.count('<span class="note">image missing</span>') == 1
    assert "1 image(s) missing or unreadable" in caplog.text and rows[2]["file_name"] in caplog.text
    assert not (out / "thumbs").exists()  # batcher's own, removed once the new page was in place
    assert "thumbs/" not in page
    assert r.sheet_made
    with Image.open(r.sheet_path) as im:
        assert im.size == report.contact_sheet_size(2)


def test_an_unchanged_contact_sheet_is_not_made_again(tmp_path, monkeypatch):
    import os

    out = tmp_path / "out"
    rows = _fake_dataset(out, {"a": (40, 40), "b": (50, 30)}, mode="P")
    sheet = out / "contact_sheet.png"
    assert _report(tmp_path, out).sheet_made
    first = (sheet.stat().st_mtime_ns, sheet.read_bytes())
    monkeypatch.setattr(report, "_tile", _no_decode)
    r = _report(tmp_path, out)  # a re-run: same tiles, nothing decoded, the file untouched
    assert not r.sheet_made and (sheet.stat().st_mtime_ns, sheet.read_bytes()) == first
    monkeypatch.undo()
    image = out / rows[1]["file_name"]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # an image written again
    assert _report(tmp_path, out).sheet_made
    second = (sheet.stat().st_mtime_ns, sheet.read_bytes())
    assert second[0] != first[0]
    assert not _report(tmp_path, out).sheet_made
    _fake_dataset(out, {"a": (40, 40), "b": (50, 30), "c": (20, 20)}, mode="P")  # another ok row: one more tile
    assert _report(tmp_path, out).sheet_made
    with Image.open(sheet) as im:
        assert im.size == report.contact_sheet_size(3)


def test_cli_report_without_a_dataset_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["report", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no dataset" in r.output


@pytest.mark.slow
def test_a_report_failure_does_not_fail_the_run(tmp_path, emulator, backend_factory, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "_render", boom)
    s, outcome = run(tmp_path, backend_factory, rows=ROWS[:2])
    assert outcome.exit_code == 0, outcome.summary
    assert (s.out / "metadata.parquet").exists() and not (s.out / "report.html").exists()
    assert "report not written" in caplog.text and "disk on fire" in caplog.text


def test_the_page_is_bounded(tmp_path, monkeypatch):
    """A large dataset (fake metadata, no images) gives a capped grid and problem table, read in batches."""
    import pyarrow as pa

    n = 30_000
    out = tmp_path / "out"
    out.mkdir()
    status = ["ok" if i % 3 else "failed" for i in range(n)]
    pq.write_table(pa.table({
        "file_name": [f"images/ab/{'ab' + format(i, '062x')}.png" if st == "ok" else None for i, st in enumerate(status)],
        "id": [f"r{i}" for i in range(n)], "status": status, "prompt": [f"prompt {i}" for i in range(n)],
        "request_hash": ["ab" + format(i, "062x") for i in range(n)],
        "error": [None if st == "ok" else f"error kind {i % 7}" for i, st in enumerate(status)],
        "finish_reason": [None] * n, "cost_usd": [0.01] * n,
    }), out / "metadata.parquet", row_group_size=5_000)
    monkeypatch.setattr(report, "GRID_LIMIT", 50)
    monkeypatch.setattr(report, "PROBLEM_LIMIT", 40)
    r = report.write_report(pipeline.Settings(workdir=tmp_path / "w", out=out), status={"jobs": [], "requests": {}, "cache_hits": 0})
    page = r.html_path.read_text()
    assert r.counts == {"ok": 20_000, "blocked": 0, "failed": 10_000, "pending": 0}
    assert page.count("<figure>") == 50
    assert page.count('<tr><td class="idc"><code>r') == 40  # the problem table
    assert page.count('<td><span class="pill failed">failed</span></td>') == 40 + 7  # the table, one per reason
    assert "error kind 6" in page and "20,000" in page
    assert len(page) < 200_000
