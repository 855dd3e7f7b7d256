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
    thumbs = [x for x in srcs if x.startswith("thumbs/")]
    assert len(thumbs) == 4  # one per ok row
    for path in srcs:
        assert not path.startswith("/") and ".." not in path and ":" not in path, path
        assert (s.out / path).is_file(), path
        assert re.fullmatch(r"(thumbs|images)/[0-9a-f]{2}/[0-9a-f]+\.\w+|contact_sheet\.png", path), path
    for path in thumbs:
        with Image.open(s.out / path) as im:
            assert max(im.size) <= report.THUMB_PX


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
def test_cli_report_is_rerunnable_and_skips_fresh_thumbnails(tmp_path, emulator, backend_factory):
    s, _ = run(tmp_path, backend_factory)
    (s.out / "report.html").unlink()
    r = CliRunner().invoke(main, ["report", "--workdir", str(s.workdir), "--out", str(s.out)])
    assert r.exit_code == 0, r.output
    assert "report.html" in r.output and (s.out / "report.html").exists()
    again = pipeline.report(s)
    assert again.thumbnails == 0  # every thumbnail was up to date
    assert not [p for p in s.out.rglob("*") if p.name.endswith(".tmp")]  # no temp file left


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
