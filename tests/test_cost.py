"""Cost: the price table and its overrides, `batcher estimate`, the budget, realized cost at overridden prices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import batcher.pipeline as pipeline
from batcher.cli import main
from batcher.errors import UsageError
from batcher.estimate import estimate
from batcher.manifest import ManifestOptions, read_manifest
from batcher.prepare import References, image_requests
from batcher.pricing import default_table, parse_overrides
from batcher.requests import request_hash
from batcher.spec import load_spec
from tests.helpers import write_csv

FLASH, PRO = "gemini-2.5-flash-image", "gemini-3-pro-image-preview"


def prompts_csv(path: Path, n: int, start: int = 0) -> Path:
    return write_csv(path, ["id", "prompt"], [[f"r{i}", f"a studio photo of product number {i}"] for i in range(start, start + n)])


def fill_cache(cache: Path, manifest: Path, options: ManifestOptions, n: int) -> None:
    """Put the first n requests of the manifest in the cache (has() only looks for the file)."""
    refs = References()
    for i, row in enumerate(read_manifest(manifest, options)):
        if i >= n:
            break
        for req in image_requests(row, refs):
            h = request_hash(req)
            (cache / h[:2]).mkdir(parents=True, exist_ok=True)
            (cache / h[:2] / f"{h}.png").write_bytes(b"x")


# ---- the examples of pricing.md -------------------------------------------------------------------------

def test_1000_flash_images_cost_19_50_in_batch_and_39_interactive(tmp_path):
    m = prompts_csv(tmp_path / "m.csv", 1000)
    e = estimate(m, ManifestOptions(model=FLASH), cache_dir=tmp_path / "cache").total()
    assert (e.requests, e.distinct, e.cache_hits, e.to_generate) == (1000, 1000, 0, 1000)
    assert e.output_tokens == 1000 * 1290
    assert e.images_batch_usd == pytest.approx(19.50)
    assert e.images_interactive_usd == pytest.approx(39.00)
    assert 0 < e.input_batch_usd < 0.01  # a separate line, so the headline is the published one
    r = CliRunner().invoke(main, ["estimate", str(m), "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "images: $19.50 batch vs $39.00 interactive (save $19.50, 50%)" in r.output
    assert "input tokens" in r.output


def test_10000_pro_images_at_2k_cost_1340_interactive_670_batch_and_67_with_90pct_cache_hits(tmp_path):
    m = prompts_csv(tmp_path / "m.csv", 10_000)
    cache = tmp_path / "cache"
    args = ["estimate", str(m), "--cache-dir", str(cache), "--model", PRO, "--image-size", "2K", "--json"]
    doc = json.loads(CliRunner().invoke(main, args).output)["total"]
    assert doc["to_generate"] == 10_000 and doc["output_tokens"] == 10_000 * 1120
    assert doc["images_interactive_usd"] == pytest.approx(1340.0)
    assert doc["images_batch_usd"] == pytest.approx(670.0)
    fill_cache(cache, m, ManifestOptions(model=PRO, image_size="2K"), 9_000)
    r = CliRunner().invoke(main, args[:-1])
    assert r.exit_code == 0, r.output
    assert "9,000 cache hits, 1,000 to generate" in r.output
    assert "images: $67.00 batch vs $134.00 interactive" in r.output


def test_estimate_counts_variants_duplicates_and_references(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ref.png")
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "variants", "reference_images"],
                  [["a", "x" * 40, "3", ""], ["b", "x" * 40, "1", ""], ["c", "y" * 40, "1", "ref.png"]])
    e = estimate(m, ManifestOptions(model=FLASH), cache_dir=tmp_path / "cache").total()
    assert (e.requests, e.distinct, e.to_generate) == (5, 4, 4)  # b is a's variant 0
    assert e.prompt_tokens == 4 * 10 + 258
    assert e.images_batch_usd == pytest.approx(4 * 0.0195)


def test_estimate_writes_no_ledger_and_needs_no_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = prompts_csv(tmp_path / "m.csv", 3)
    r = CliRunner().invoke(main, ["estimate", str(m)])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / ".batcher").exists()


def test_estimate_of_an_invalid_manifest_exits_2(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "aspect_ratio"], [["a", "ok", "1:1"], ["b", "bad", "7:3"]])
    r = CliRunner().invoke(main, ["estimate", str(m)])
    assert r.exit_code == 2 and "invalid row" in r.output
    r = CliRunner().invoke(main, ["estimate", str(m), "--skip-invalid"])
    assert r.exit_code == 0 and "(1 invalid, skipped)" in r.output


# ---- the price table and its overrides --------------------------------------------------------------------

def test_default_table_matches_the_catalog():
    t = default_table()
    assert t.get("models/" + FLASH).image_usd("1K") == pytest.approx(0.0195)
    assert t.get(PRO).image_usd("4K", batch=False) == pytest.approx(0.24)
    assert t.get("gemini-3.1-flash-image-preview").image_usd("1K") == pytest.approx(1120 * 60 / 1e6 / 2)  # no published price
    assert t.get(FLASH).tokens_usd(1000, 1290) == pytest.approx((1000 * 0.3 + 1290 * 30) / 1e6 / 2)


def test_overriding_a_rate_drops_the_published_per_image_price():
    t = default_table().with_overrides({FLASH: {"output_usd_per_mtok": 60.0}})
    assert t.get(FLASH).image_usd("1K", batch=False) == pytest.approx(1290 * 60 / 1e6)
    same = default_table().with_overrides({FLASH: {"output_usd_per_mtok": 30.0, "tokens_per_image": {"1K": 1290}}})
    assert same.get(FLASH).image_usd("1K", batch=False) == pytest.approx(0.039)
    t = default_table().with_overrides({FLASH: {"batch_discount": 1.0, "usd_per_image": {"1K": 0.05}}})
    assert t.get(FLASH).image_usd("1K") == pytest.approx(0.05)


def spec(tmp_path: Path, body: str) -> Path:
    prompts_csv(tmp_path / "m.csv", 10)
    p = tmp_path / "job.toml"
    p.write_text('manifest = "m.csv"\nworkdir = "w"\nout = "o"\ncache_dir = "c"\n' + body)
    return p


def test_job_spec_prices_override_the_estimate(tmp_path):
    p = spec(tmp_path, '[prices."gemini-2.5-flash-image"]\ninput_usd_per_mtok = 0.30\noutput_usd_per_mtok = 60\n'
                       'batch_discount = 0.5\ntokens_per_image = { "1K" = 1290 }\n')
    assert load_spec(p).values["prices"][FLASH]["output_usd_per_mtok"] == 60.0
    doc = json.loads(CliRunner().invoke(main, ["estimate", str(p), "--json"]).output)
    assert doc["total"]["images_batch_usd"] == pytest.approx(10 * 1290 * 60 / 1e6 / 2)


@pytest.mark.parametrize("body, message", [
    ('[prices."gemini-2.5-flash-image"]\noutput_usd = 1\n', "unknown key 'prices.\"gemini-2.5-flash-image\".output_usd'"),
    ('[prices."gemini-9-image"]\noutput_usd_per_mtok = 1\n', "missing prices.\"gemini-9-image\".input_usd_per_mtok"),
    ('[prices."gemini-2.5-flash-image"]\nbatch_discount = 2\n', "batch_discount' must be in (0, 1]"),
    ('[prices."gemini-2.5-flash-image"]\ntokens_per_image = { "1K" = "many" }\n', "tokens_per_image.1K' must be a positive integer"),
    ('[prices."gemini-2.5-flash-image"]\ninput_usd_per_mtok = "cheap"\n', "must be a number"),
    ('prices = 3\n', "'prices' must be a table"),
    ('[limits]\nbudget_usd = "lots"\n', "'limits.budget_usd' must be a float"),
])
def test_bad_price_keys_are_errors_naming_key_and_file(tmp_path, body, message):
    p = spec(tmp_path, body)
    with pytest.raises(UsageError) as exc:
        load_spec(p)
    assert message in str(exc.value) and str(p) in str(exc.value)


def test_an_unknown_model_is_allowed_with_every_price_key(tmp_path):
    o = parse_overrides({"gemini-9-image": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 10, "batch_discount": 0.5,
                                            "tokens_per_image": {"1K": 1000}}}, "job.toml")
    assert default_table().with_overrides(o).get("gemini-9-image").image_usd(None) == pytest.approx(0.005)


# ---- the budget (the real SDK against the emulator) --------------------------------------------------------

def settings(tmp_path: Path, **kw) -> pipeline.Settings:
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("timeout", 60)
    kw.setdefault("quiet", True)
    return pipeline.Settings(workdir=tmp_path / "work", out=tmp_path / "out", cache_dir=tmp_path / "cache", **kw)


def test_a_budget_holds_back_what_it_cannot_pay_for_then_a_higher_one_finishes(tmp_path, emulator, backend_factory):
    m = prompts_csv(tmp_path / "m.csv", 10)
    # A Flash image is estimated at $0.0195 in batch: $0.10 pays for 5 of the 10.
    result = pipeline.run(m, settings(tmp_path, budget_usd=0.10), backend_factory=backend_factory)
    assert result.exit_code == 4, result.summary
    assert emulator.stats()["lines_processed"] == 5
    assert result.counts["succeeded"] == 5 and result.counts["planned"] == 5
    assert "stopped at the budget" in result.summary
    assert "budget $0.10: 5 requests held back (est. $0.0" in result.summary and "raise --budget-usd" in result.summary
    result = pipeline.run(m, settings(tmp_path, budget_usd=1.0), backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["lines_processed"] == 10
    assert "held back" not in result.summary


def test_submit_with_a_budget_sends_what_fits_and_exits_4(tmp_path, emulator, backend_factory):
    m = prompts_csv(tmp_path / "m.csv", 10)
    result = pipeline.submit(m, settings(tmp_path, budget_usd=0.05), backend_factory=backend_factory)
    assert result.exit_code == 4
    assert result.counts["queued"] == 2 and result.counts["planned"] == 8
    assert "8 requests held back" in result.summary


def test_a_dry_run_shards_as_submit_would_under_the_budget_and_token_cap(tmp_path, emulator, backend_factory):
    """A dry run leaves the jobs a later submit sends, so it honours the budget and each model's token cap,
    and says what the budget holds back; then the real submit sends exactly those jobs."""
    from batcher.quota import Quota

    m = prompts_csv(tmp_path / "m.csv", 10)
    s = settings(tmp_path, budget_usd=0.10, quota=Quota(token_cap=2 * 1400))
    result = pipeline.submit(m, s, dry_run=True, backend_factory=backend_factory)
    assert result.counts["queued"] == 5 and result.counts["planned"] == 5, result.summary
    assert "5 to send in 3 new job(s)" in result.summary  # 2 + 2 + 1 under the cap
    assert "budget $0.10: 5 requests held back" in result.summary
    assert emulator.stats()["files_uploaded"] == 0
    result = pipeline.submit(m, s, backend_factory=backend_factory)
    assert emulator.stats()["batches_created"] == 1  # one job fills the cap; the others wait for it
    with pipeline.open_workspace(s, backend_factory) as ws:
        sizes = [r[0] for r in ws.ledger.conn.execute("SELECT request_count FROM jobs ORDER BY id")]
    assert sizes == [2, 2, 1]


def test_budget_from_the_job_spec_and_the_command_line(tmp_path, emulator_env):
    p = spec(tmp_path, '[limits]\nbudget_usd = 0.10\n[poll]\ninterval_seconds = 0.05\ntimeout_seconds = 60\n')
    r = CliRunner().invoke(main, ["run", str(p), "-q"])
    assert r.exit_code == 4, r.output
    assert "5 requests held back" in r.output
    assert emulator_env.stats()["lines_processed"] == 5
    r = CliRunner().invoke(main, ["run", str(p), "-q", "--budget-usd", "5"])
    assert r.exit_code == 0, r.output
    assert emulator_env.stats()["lines_processed"] == 10


def test_realized_cost_and_status_use_the_overridden_prices(tmp_path, emulator, backend_factory):
    m = prompts_csv(tmp_path / "m.csv", 4)
    prices = {FLASH: {"output_usd_per_mtok": 60.0, "input_usd_per_mtok": 0.0}}
    result = pipeline.run(m, settings(tmp_path, prices=prices), backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    expected = 4 * 1290 * 60 / 1e6 / 2
    assert result.dataset.cost_usd == pytest.approx(expected)
    assert f"${expected:.4f}" in result.summary
    # status (no prices given) uses the prices the workdir's run was made with
    doc = pipeline.status(settings(tmp_path), refresh=False, backend_factory=backend_factory)
    assert doc["cost_usd"] == pytest.approx(expected)


def test_jobs_a_dry_run_left_are_sharded_again_under_a_later_budget(tmp_path, emulator, backend_factory):
    """A dry run without a budget shards everything; a submit with a budget must not send all of it."""
    m = prompts_csv(tmp_path / "m.csv", 10)
    pipeline.submit(m, settings(tmp_path), dry_run=True, backend_factory=backend_factory)
    result = pipeline.submit(m, settings(tmp_path, budget_usd=0.05), backend_factory=backend_factory)
    assert result.counts["queued"] == 2 and result.counts["planned"] == 8, result.summary
    assert "8 requests held back" in result.summary
    assert emulator.stats()["batches_created"] == 1


@pytest.mark.parametrize("shape", ["only run", "distinct rows", "shared rows"])
def test_a_runs_summary_in_one_pass_is_its_counts_hits_and_spend(tmp_path, shape):
    """Ledger.run_summary (what `status` and the morning report show) equals the separate counts, cache hits and
    spend, whichever way the run's requests are found: every request of the ledger, a join of rows that each
    have their own request, or the set of their hashes when rows share requests."""
    import time

    from batcher.estimate import run_spend_usd
    from batcher.ledger import Ledger
    from batcher.planner import plan_manifest

    ledger = Ledger(tmp_path / "wd")
    if shape != "only run":  # last night's run, with requests tonight's run shares and one it does not
        plan_manifest(ledger, None, write_csv(tmp_path / "a.csv", ["id", "prompt"], [["x", "p1"], ["y", "old"]]),
                      ManifestOptions())
    prompts = [f"p{i}" for i in range(10)] + (["p1", "p2"] if shape == "shared rows" else [])
    run = plan_manifest(ledger, None, write_csv(tmp_path / "b.csv", ["id", "prompt"], [[f"r{i}", p] for i, p in enumerate(prompts)]),
                        ManifestOptions())
    started = ledger.conn.execute("SELECT created_at FROM runs WHERE id=?", (run.run_id,)).fetchone()[0]
    states = ["succeeded", "succeeded", "blocked", "failed", "queued", "planned", "succeeded", "succeeded", "blocked", "succeeded"]
    with ledger.transaction() as c:
        for i, (h,) in enumerate(c.execute("SELECT hash FROM requests ORDER BY rowid").fetchall()):
            c.execute("UPDATE requests SET state=?, cached=?, cost_usd=?, updated_at=? WHERE hash=?",
                      (states[i % 10], int(i % 4 == 0), 0.01 * (i + 1), started - 5 if i == 7 else time.time(), h))
    counts, hits, spent = ledger.run_summary(run.run_id, paid_since=started)
    where, params = ledger.in_run(run.run_id)
    assert counts == {k: v for k, v in pipeline.run_counts(ledger, run.run_id).items() if v}
    assert hits == ledger.conn.execute(f"SELECT COUNT(*) FROM requests WHERE cached=1 AND {where}", params).fetchone()[0] > 0
    assert spent == pytest.approx(run_spend_usd(ledger, ledger.run(run.run_id))) and spent > 0
