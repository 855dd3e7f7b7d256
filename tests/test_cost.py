"""Cost: the price table and its overrides, `batcher estimate`, the budget, realized cost at overridden prices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import batcher.pipeline as pipeline
from batcher.cli import main
from batcher.errors import ManifestError, UsageError
from batcher.cost.estimate import estimate
from batcher.manifest import ManifestOptions, read_manifest
from batcher.planning.prepare import References, image_requests
from batcher.cost.pricing import default_table, parse_overrides
from batcher.planning.requests import request_hash
from batcher.settings import load_spec
from tests.helpers import settings, write_csv

FLASH, PRO, FLASH31 = "gemini-2.5-flash-image", "gemini-3-pro-image", "gemini-3.1-flash-image"


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


# ---- the examples of the issue and pricing notes (tokens per image x Google's rate) -----------------------

def test_1000_images_of_the_default_model_cost_33_60_in_batch_and_67_20_interactive(tmp_path):
    m = prompts_csv(tmp_path / "m.csv", 1000)
    e = estimate(m, ManifestOptions(), cache_dir=tmp_path / "cache").total()  # gemini-3.1-flash-image at 1K
    assert (e.requests, e.distinct, e.cache_hits, e.to_generate) == (1000, 1000, 0, 1000)
    assert e.output_tokens == 1000 * 1120
    assert e.images_batch_usd == pytest.approx(33.60)
    assert e.images_interactive_usd == pytest.approx(67.20)
    assert 0 < e.input_batch_usd < 0.01  # a separate line, so the headline is the images'
    assert e.thoughts_tokens == 1000 * 250  # the catalog's stated allowance, at the $3 per 1M text rate
    assert e.thinking_batch_usd == pytest.approx(0.375) and e.thinking_interactive_usd == pytest.approx(0.75)
    r = CliRunner().invoke(main, ["estimate", str(m), "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "images: $33.60 batch vs $67.20 interactive (save $33.60, 50%)" in r.output
    assert "input, estimated (~" in r.output
    assert "thinking, estimated (~250,000 tokens): $0.3750 batch vs $0.75 interactive" in r.output


def test_1000_pro_images_at_4k_cost_120_in_batch_and_240_interactive(tmp_path):
    m = prompts_csv(tmp_path / "m.csv", 1000)
    r = CliRunner().invoke(main, ["estimate", str(m), "--model", PRO, "--image-size", "4K", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "images: $120.00 batch vs $240.00 interactive" in r.output


def test_1000_flash_25_images_are_priced_by_their_tokens(tmp_path):
    # Google's "equivalent to $0.039 per image" is 1290 tokens x $30 per 1M, rounded: the estimate uses the tokens.
    m = prompts_csv(tmp_path / "m.csv", 1000)
    e = estimate(m, ManifestOptions(model=FLASH), cache_dir=tmp_path / "cache")
    t = e.total()
    assert t.output_tokens == 1000 * 1290 and t.thoughts_tokens == 0  # it does not think
    assert t.images_batch_usd == pytest.approx(19.35) and t.images_interactive_usd == pytest.approx(38.70)
    assert any("earliest shutdown" in w for w in e.warnings)


@pytest.mark.slow
def test_10000_pro_images_at_2k_and_with_90pct_cache_hits(tmp_path):
    m = prompts_csv(tmp_path / "m.csv", 10_000)
    cache = tmp_path / "cache"
    args = ["estimate", str(m), "--cache-dir", str(cache), "--model", PRO, "--image-size", "2K", "--json"]
    doc = json.loads(CliRunner().invoke(main, args).output)["total"]
    assert doc["to_generate"] == 10_000 and doc["output_tokens"] == 10_000 * 1120
    assert doc["images_interactive_usd"] == pytest.approx(1344.0)
    assert doc["images_batch_usd"] == pytest.approx(672.0)
    fill_cache(cache, m, ManifestOptions(model=PRO, image_size="2K"), 9_000)
    r = CliRunner().invoke(main, args[:-1])
    assert r.exit_code == 0, r.output
    assert "9,000 cache hits, 1,000 to generate" in r.output
    assert "images: $67.20 batch vs $134.40 interactive" in r.output


@pytest.mark.slow
def test_an_estimate_over_the_tiers_monthly_spend_cap_says_so(tmp_path):
    m = prompts_csv(tmp_path / "m.csv", 10_000)  # $336 in batch: over Tier 1's $250 a month, under Tier 2's $2,000
    r = CliRunner().invoke(main, ["estimate", str(m), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "is over Tier 1's monthly spend cap of $250.00" in r.output
    r = CliRunner().invoke(main, ["estimate", str(m), "--cache-dir", str(tmp_path / "c"), "--tier", "2", "--json"])
    doc = json.loads(r.output)
    assert doc["tier"] == "2" and doc["tier_monthly_spend_cap_usd"] == 2000 and doc["over_tier_cap"] is False


def test_estimate_counts_variants_duplicates_and_references(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ref.png")
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "variants", "reference_images"],
                  [["a", "x" * 40, "3", ""], ["b", "x" * 40, "1", ""], ["c", "y" * 40, "1", "ref.png"]])
    e = estimate(m, ManifestOptions(model=FLASH), cache_dir=tmp_path / "cache").total()
    assert (e.requests, e.distinct, e.to_generate) == (5, 4, 4)  # b is a's variant 0
    assert e.prompt_tokens == 4 * 10 + 258
    assert e.images_batch_usd == pytest.approx(4 * 0.01935)
    e = estimate(m, ManifestOptions(model=PRO), cache_dir=tmp_path / "cache").total()
    assert e.prompt_tokens == 4 * 10 + 560  # a reference image is 560 prompt tokens on 3 Pro Image


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
    assert t.get("models/" + FLASH).image_usd("1K") == pytest.approx(1290 * 30 / 1e6 / 2)
    assert t.get(PRO).image_usd("4K", batch=False) == pytest.approx(0.24)
    assert t.get(FLASH31).image_usd("512") == pytest.approx(747 * 60 / 1e6 / 2)
    assert t.get(FLASH31).image_usd("4K", batch=False) == pytest.approx(2520 * 60 / 1e6)
    assert t.get(FLASH).tokens_usd(1000, 1290) == pytest.approx((1000 * 0.3 + 1290 * 30) / 1e6 / 2)


def test_realized_cost_bills_thoughts_and_text_at_the_text_rate():
    t = default_table()
    # gemini-3.1-flash-image: $0.50 in, $60 image out, $3 text and thinking out (per 1M, interactive); batch half.
    assert t.get(FLASH31).tokens_usd(100, 1120, thoughts_tokens=232) == pytest.approx((100 * 0.5 + 1120 * 60 + 232 * 3) / 1e6 / 2)
    # 1,223 candidate tokens of which 103 are text (candidatesTokensDetails): 1120 at the image rate, 103 + 106 at the text rate
    assert t.get(PRO).tokens_usd(10, 1223, 106, 103, batch=False) == pytest.approx((10 * 2 + 1120 * 120 + 209 * 12) / 1e6)


def test_overriding_a_rate_changes_the_price_per_image():
    t = default_table().with_overrides({FLASH: {"output_usd_per_mtok": 60.0}})
    assert t.get(FLASH).image_usd("1K", batch=False) == pytest.approx(1290 * 60 / 1e6)
    t = default_table().with_overrides({FLASH: {"batch_discount": 1.0, "usd_per_image": {"1K": 0.05}}})
    assert t.get(FLASH).image_usd("1K") == pytest.approx(0.05)
    t = default_table().with_overrides({FLASH31: {"text_output_usd_per_mtok": 0.0, "expected_thoughts_tokens": 0}})
    assert t.get(FLASH31).thinking_usd() == 0 and t.get(FLASH31).tokens_usd(0, 1120, 300) == pytest.approx(1120 * 60 / 1e6 / 2)


def spec(tmp_path: Path, body: str) -> Path:
    prompts_csv(tmp_path / "m.csv", 10)
    p = tmp_path / "job.toml"
    p.write_text('manifest = "m.csv"\nworkdir = "w"\nout = "o"\ncache_dir = "c"\n' + body)
    return p


def test_job_spec_prices_override_the_estimate(tmp_path):
    p = spec(tmp_path, '[prices."gemini-3.1-flash-image"]\ninput_usd_per_mtok = 0.30\noutput_usd_per_mtok = 120\n'
                       'batch_discount = 0.5\ntokens_per_image = { "1K" = 1290 }\n')
    assert load_spec(p).values["prices"][FLASH31]["output_usd_per_mtok"] == 120.0
    doc = json.loads(CliRunner().invoke(main, ["estimate", str(p), "--json"]).output)
    assert doc["total"]["images_batch_usd"] == pytest.approx(10 * 1290 * 120 / 1e6 / 2)


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


@pytest.mark.slow
def test_a_budget_holds_back_what_it_cannot_pay_for_then_a_higher_one_finishes(tmp_path, emulator, backend_factory):
    m = prompts_csv(tmp_path / "m.csv", 10)
    # A request is estimated at ~$0.0340 in batch (image $0.0336, thinking $0.0004, prompt): $0.17 pays for 5 of the 10.
    result = pipeline.run(m, settings(tmp_path, budget_usd=0.17), backend_factory=backend_factory)
    assert result.exit_code == 4, result.summary
    assert emulator.stats()["lines_processed"] == 5
    assert result.counts["succeeded"] == 5 and result.counts["planned"] == 5
    assert "stopped at the budget" in result.summary
    assert "budget $0.17: 5 requests held back (est. $0.1" in result.summary and "raise --budget-usd" in result.summary
    result = pipeline.run(m, settings(tmp_path, budget_usd=1.0), backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["lines_processed"] == 10
    assert "held back" not in result.summary


def test_submit_with_a_budget_sends_what_fits_and_exits_4(tmp_path, emulator, backend_factory):
    m = prompts_csv(tmp_path / "m.csv", 10)
    result = pipeline.submit(m, settings(tmp_path, budget_usd=0.07), backend_factory=backend_factory)
    assert result.exit_code == 4
    assert result.counts["queued"] == 2 and result.counts["planned"] == 8
    assert "8 requests held back" in result.summary


def test_a_dry_run_shards_as_submit_would_under_the_budget_and_token_cap(tmp_path, emulator, backend_factory):
    """A dry run leaves the jobs a later submit sends, so it honours the budget and each model's token cap,
    and says what the budget holds back; then the real submit sends exactly those jobs."""
    from batcher.jobs.quota import Quota

    m = prompts_csv(tmp_path / "m.csv", 10)
    s = settings(tmp_path, budget_usd=0.17, quota=Quota(token_cap=2 * 1450))  # a request: ~1,410 tokens with thoughts
    result = pipeline.submit(m, s, dry_run=True, backend_factory=backend_factory)
    assert result.counts["queued"] == 5 and result.counts["planned"] == 5, result.summary
    assert "5 requests to send in 3 new job(s)" in result.summary  # 2 + 2 + 1 under the cap
    assert "budget $0.17: 5 requests held back" in result.summary
    assert emulator.stats()["files_uploaded"] == 0
    result = pipeline.submit(m, s, backend_factory=backend_factory)
    assert emulator.stats()["batches_created"] == 1  # one job fills the cap; the others wait for it
    with pipeline.open_workspace(s, backend_factory) as ws:
        sizes = [r[0] for r in ws.ledger.conn.execute("SELECT request_count FROM jobs ORDER BY id")]
    assert sizes == [2, 2, 1]


@pytest.mark.slow
def test_budget_from_the_job_spec_and_the_command_line(tmp_path, emulator_env):
    p = spec(tmp_path, '[limits]\nbudget_usd = 0.17\n[poll]\ninterval_seconds = 0.05\ntimeout_seconds = 60\n')
    r = CliRunner().invoke(main, ["run", str(p), "-q"])
    assert r.exit_code == 4, r.output
    assert "5 requests held back" in r.output
    assert emulator_env.stats()["lines_processed"] == 5
    r = CliRunner().invoke(main, ["run", str(p), "-q", "--budget-usd", "5"])
    assert r.exit_code == 0, r.output
    assert emulator_env.stats()["lines_processed"] == 10


@pytest.mark.slow
def test_realized_cost_and_status_use_the_overridden_prices(tmp_path, emulator, backend_factory):
    m = prompts_csv(tmp_path / "m.csv", 4)
    prices = {FLASH31: {"output_usd_per_mtok": 120.0, "input_usd_per_mtok": 0.0, "text_output_usd_per_mtok": 0.0}}
    result = pipeline.run(m, settings(tmp_path, prices=prices), backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    expected = 4 * 1120 * 120 / 1e6 / 2
    assert result.dataset.cost_usd == pytest.approx(expected)
    assert f"${expected:.4f}" in result.summary
    # status (no prices given) uses the prices the workdir's run was made with
    doc = pipeline.status(settings(tmp_path), refresh=False, backend_factory=backend_factory)
    assert doc["cost_usd"] == pytest.approx(expected)


def test_jobs_a_dry_run_left_are_sharded_again_under_a_later_budget(tmp_path, emulator, backend_factory):
    """A dry run without a budget shards everything; a submit with a budget must not send all of it."""
    m = prompts_csv(tmp_path / "m.csv", 10)
    pipeline.submit(m, settings(tmp_path), dry_run=True, backend_factory=backend_factory)
    result = pipeline.submit(m, settings(tmp_path, budget_usd=0.07), backend_factory=backend_factory)
    assert result.counts["queued"] == 2 and result.counts["planned"] == 8, result.summary
    assert "8 requests held back" in result.summary
    assert emulator.stats()["batches_created"] == 1


@pytest.mark.parametrize("shape", ["only run", "distinct rows", "shared rows"])
def test_a_runs_summary_in_one_pass_is_its_counts_hits_and_spend(tmp_path, shape):
    """Ledger.run_summary (what `status` and the morning report show) equals the separate counts, cache hits and
    spend, whichever way the run's requests are found: every request of the ledger, a join of rows that each
    have their own request, or the set of their hashes when rows share requests."""
    import time

    from batcher.ledger.reading import run_spend_usd
    from batcher.ledger import Ledger
    from batcher.planning.planner import plan_manifest

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


def test_the_interactive_fallback_prices_a_request_at_its_image_size():
    """One estimator for a request (budget and interactive fallback): a 4K 3 Pro Image request is $0.24 of image at
    full price, not the 1K price (it was $0.1345 when the interactive path ignored the size)."""
    from batcher.cost.estimate import request_estimate_usd
    from batcher.jobs.interactive import estimated_cost
    from batcher.planning.requests import ImageRequest, dump_body, request_body

    body = dump_body(request_body(ImageRequest(model=PRO, prompt="a lighthouse", image_size="4K")))
    full = estimated_cost(PRO, body)
    assert full == pytest.approx(request_estimate_usd(PRO, body, batch=False))
    assert full == pytest.approx(0.24 + 3 * 2 / 1e6 + 250 * 12 / 1e6)  # image, prompt, thinking allowance
    assert request_estimate_usd(PRO, body) == pytest.approx(full / 2)


@pytest.mark.parametrize("model, per_image", [(FLASH31, 258), (PRO, 560), ("gemini-3.1-flash-lite-image", 1120),
                                              ("gemini-9-image", 1120)])  # unknown: the catalog's largest
def test_quota_waves_packing_and_estimates_count_a_reference_image_alike(model, per_image, tmp_path):
    """One estimator: a reference image counts the model's input_image_tokens in the enqueued tokens that shard and
    the quota use, and in the estimate's prompt tokens (it was 258 for every model in quota waves)."""
    from batcher.cost.tokens import input_image_tokens, request_tokens
    from batcher.planning.packing import measure_body
    from batcher.planning.requests import ImageRequest, ReferenceImage, dump_body, request_body

    two = tuple(ReferenceImage(c * 64, "image/png", f"{c}.png") for c in "ab")
    bodies = [dump_body(request_body(ImageRequest(model=model, prompt="a lighthouse", references=r))) for r in ((), two)]
    assert input_image_tokens(model) == per_image
    plain, with_two = (request_tokens(model, b, None) for b in bodies)
    assert with_two - plain >= 2 * per_image
    assert [measure_body(model, b, None)[2] for b in bodies] == [plain, with_two]


def test_estimate_refuses_what_submit_refuses_a_duplicate_id(tmp_path):
    """One validation: estimate once passed duplicate ids that run then rejected."""
    m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "one"], ["b", "two"], ["a", "three"]])
    with pytest.raises(ManifestError) as info:
        estimate(m, cache_dir=tmp_path / "c")
    assert info.value.problems == ["%s, row 4, column 'id' = 'a': duplicate id (first used at row 2); ids must be unique" % m]
    e = estimate(m, cache_dir=tmp_path / "c", skip_invalid=True)
    assert (e.rows, e.rejected) == (2, 1)
