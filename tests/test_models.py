"""Today's models: retired ones refused, unknown ones asked about (models.get), `batcher models`, and the
thinking models' tokens and interim images, through the real SDK and the emulator."""

from __future__ import annotations

import json
import time
import logging

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import batcher.pipeline as pipeline
from batcher.cli import main
from tests.helpers import settings, write_csv

NEW = "gemini-nano-banana-2.1"  # a model batcher's catalog does not know (reported by third parties)
NEW_PRICES = {NEW: {"input_usd_per_mtok": 1.5, "output_usd_per_mtok": 30.0, "text_output_usd_per_mtok": 7.5,
                    "batch_discount": 0.5, "tokens_per_image": {"1K": 1120}}}


def prompts(tmp_path, n: int = 3, model: str | None = None):
    header = ["id", "prompt"] + (["model"] if model else [])
    return write_csv(tmp_path / "m.csv", header, [[f"r{i}", f"a teapot, take {i}"] + ([model] if model else []) for i in range(n)])


def test_a_shut_down_model_exits_2_naming_its_replacement(tmp_path, emulator_env):
    r = CliRunner().invoke(main, ["run", str(prompts(tmp_path)), "--model", "gemini-3-pro-image-preview",
                                  "--workdir", str(tmp_path / "work"), "-q"])
    assert r.exit_code == 2, r.output
    assert "gemini-3-pro-image-preview was shut down on 2026-06-25; use gemini-3-pro-image" in r.output
    stats = emulator_env.stats()
    assert stats["files_uploaded"] == 0 and stats["batches_created"] == 0 and not stats["requests"]


def test_an_unknown_model_the_api_does_not_know_stops_before_any_upload(tmp_path, emulator, backend_factory):
    with pytest.raises(Exception) as info:
        pipeline.run(prompts(tmp_path, model="gemini-9-ultra-image"), settings(tmp_path), backend_factory=backend_factory)
    assert info.value.exit_code == 2
    assert "model 'gemini-9-ultra-image': the API does not know it" in str(info.value)
    stats = emulator.stats()
    assert stats["requests"] == {"GET /{v}/models/{model}": 1}  # asked, then nothing uploaded, nothing created
    assert stats["files_uploaded"] == 0 and stats["batches_created"] == 0


def test_an_unknown_model_without_batch_support_is_refused(tmp_path, emulator, backend_factory):
    emulator.configure(extra_models={"gemini-4-image-live": {"methods": ["generateContent", "countTokens"]}})
    with pytest.raises(Exception) as info:
        pipeline.run(prompts(tmp_path, model="gemini-4-image-live"), settings(tmp_path), backend_factory=backend_factory)
    assert info.value.exit_code == 2 and "does not take batch jobs" in str(info.value)
    assert "generateContent, countTokens" in str(info.value)
    assert emulator.stats()["files_uploaded"] == 0


@pytest.mark.slow
def test_an_unknown_model_the_api_serves_runs_with_its_prices_from_the_job_spec(tmp_path, emulator, backend_factory):
    emulator.configure(extra_models={NEW: {"like": "gemini-3.1-flash-image"}})
    result = pipeline.run(prompts(tmp_path, model=NEW), settings(tmp_path, prices=NEW_PRICES), backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    rows = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    assert {r["model"] for r in rows} == {NEW} and {r["status"] for r in rows} == {"ok"}
    r0 = rows[0]
    assert r0["cost_usd"] == pytest.approx((r0["prompt_tokens"] * 1.5 + 1120 * 30 + r0["thoughts_tokens"] * 7.5) / 1e6 / 2)
    assert emulator.stats()["requests"]["GET /{v}/models/{model}"] == 1


def test_an_unknown_model_without_a_price_cannot_have_a_budget_or_an_estimate(tmp_path, emulator, backend_factory):
    emulator.configure(extra_models={NEW: {}})
    with pytest.raises(Exception) as info:
        pipeline.run(prompts(tmp_path, model=NEW), settings(tmp_path, budget_usd=5), backend_factory=backend_factory)
    assert info.value.exit_code == 2
    assert f'[prices."{NEW}"]' in str(info.value) and "output_usd_per_mtok" in str(info.value)
    assert emulator.stats()["files_uploaded"] == 0
    r = CliRunner().invoke(main, ["estimate", str(prompts(tmp_path, model=NEW))])
    assert r.exit_code == 2 and f'[prices."{NEW}"]' in r.output
    spec = tmp_path / "job.toml"
    spec.write_text(f'manifest = "m.csv"\n[prices."{NEW}"]\ninput_usd_per_mtok = 1.5\noutput_usd_per_mtok = 30\n'
                    'batch_discount = 0.5\ntokens_per_image = { "1K" = 1120 }\n')
    r = CliRunner().invoke(main, ["estimate", str(spec)])
    assert r.exit_code == 0, r.output
    assert "images: $0.0504 batch vs $0.1008 interactive" in r.output  # 3 x 1120 tokens x $30 per 1M
    assert f"warning: {NEW} is not in batcher's catalog" in r.output


def test_a_dry_run_warns_that_an_unknown_model_was_not_checked(tmp_path, emulator, backend_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="batcher"):
        result = pipeline.submit(prompts(tmp_path, model=NEW), settings(tmp_path), dry_run=True, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert any(f"{NEW} is not in batcher's catalog and was not checked against the API" in m for m in caplog.messages)
    assert emulator.stats()["requests"] == {}  # offline: nothing asked


@pytest.mark.slow
def test_a_model_past_its_earliest_shutdown_warns_then_its_404_names_the_replacement(tmp_path, emulator, backend_factory, caplog):
    m = prompts(tmp_path, model="gemini-2.5-flash-image")
    with caplog.at_level(logging.WARNING, logger="batcher"):
        assert pipeline.run(m, settings(tmp_path), backend_factory=backend_factory).exit_code == 0
    assert any("gemini-2.5-flash-image may have been shut down" in m for m in caplog.messages)
    emulator.configure(shutdown_models=["gemini-2.5-flash-image"])  # Google switches it off
    with pytest.raises(Exception) as info:
        pipeline.run(prompts(tmp_path, 4, model="gemini-2.5-flash-image"), settings(tmp_path / "second"),
                     backend_factory=backend_factory)
    text = str(info.value)
    assert "404" in text and "is no longer served; use gemini-3.1-flash-image" in text


def test_the_default_run_uses_gemini_31_flash_image_at_its_documented_sizes(tmp_path, emulator, backend_factory):
    from PIL import Image

    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "aspect_ratio", "image_size"],
                  [["a", "a dune", "21:9", ""], ["b", "a tower", "1:8", "512"], ["c", "a field", "", "2K"]])
    s = settings(tmp_path)
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 0
    rows = {r["id"]: r for r in pq.read_table(s.out / "metadata.parquet").to_pylist()}
    sizes = {k: Image.open(s.out / r["file_name"]).size for k, r in rows.items()}
    assert sizes == {"a": (1584, 672), "b": (192, 1536), "c": (2048, 2048)}  # the guide's table for 3.1 Flash Image
    assert {r["model"] for r in rows.values()} == {"gemini-3.1-flash-image"}
    assert [rows[k]["output_tokens"] for k in "abc"] == [1120, 747, 1680]
    assert all(100 <= r["thoughts_tokens"] < 300 for r in rows.values())


@pytest.mark.slow
def test_interim_thought_images_are_never_the_result(tmp_path, emulator, backend_factory):
    """A thinking model's response can hold drafts marked `thought: true` before its final image: the dataset has
    the final one (the emulator's drafts are a quarter of its size and drawn from another digest)."""
    from google import genai
    from google.genai import types

    emulator.configure(thought_parts="always", image_bytes=8_000)
    s = settings(tmp_path)
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "seed"], [["a", "a lighthouse at dusk", "7"]])
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 0
    (row,) = pq.read_table(s.out / "metadata.parquet").to_pylist()
    stored = (s.out / row["file_name"]).read_bytes()
    client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emulator.url, api_version="v1beta"))
    resp = client.models.generate_content(model="gemini-3.1-flash-image", contents="a lighthouse at dusk",
                                          config={"response_modalities": ["IMAGE"], "seed": 7})
    parts = resp.candidates[0].content.parts
    assert [bool(p.thought) for p in parts] == [True, True, False]  # thought text, draft image, final image
    draft, final = parts[1].inline_data.data, parts[2].inline_data.data
    assert stored == final and stored != draft and parts[2].thought_signature
    assert resp.usage_metadata.thoughts_token_count == row["thoughts_tokens"]


def test_batcher_models_lists_both_ga_models_and_what_the_api_serves(tmp_path, emulator_env):
    r = CliRunner().invoke(main, ["models", "--offline"])
    assert r.exit_code == 0, r.output
    for name in ("gemini-3.1-flash-image  (Nano Banana 2; the default)", "gemini-3-pro-image  (Nano Banana Pro)"):
        assert name in r.output
    assert "gemini-3-pro-image-preview" not in r.output  # shut down: only with --all
    assert "1K      1,120   $0.0336         $0.0672" in r.output
    assert "gemini-3-pro-image-preview" in CliRunner().invoke(main, ["models", "--offline", "--all"]).output
    emulator_env.configure(extra_models={NEW: {}})
    doc = json.loads(CliRunner().invoke(main, ["models", "--json"]).output)
    flash = next(m for m in doc["models"] if m["name"] == "gemini-3.1-flash-image")
    assert flash["per_image"]["4K"] == {"tokens": 2520, "batch_usd": 0.0756, "interactive_usd": 0.1512}
    assert flash["sources"]["prices"]["url"] == "https://ai.google.dev/gemini-api/docs/pricing"
    api = {a["name"]: a for a in doc["api"]}
    assert api[NEW]["priced"] is False and api["gemini-3-pro-image"]["priced"] is True
    assert "gemini-3-pro-image-preview" not in api  # the emulator serves today's models
    text = CliRunner().invoke(main, ["models"]).output
    assert f'{NEW}  (no price: add [prices."{NEW}"] to a job spec)' in text


def test_identical_requests_to_a_retired_and_a_current_model_are_different_requests():
    from batcher.planning.requests import ImageRequest, request_hash

    old = request_hash(ImageRequest(model="gemini-3-pro-image-preview", prompt="a red fox in snow"))
    new = request_hash(ImageRequest(model="gemini-3-pro-image", prompt="a red fox in snow"))
    assert old != new  # the model is in the hash: a cache filled by the preview model is not used by the GA one


@pytest.mark.slow
def test_a_model_without_a_price_goes_interactive_at_the_deadline_when_there_is_no_budget(tmp_path, emulator, backend_factory):
    emulator.configure(extra_models={NEW: {"like": "gemini-3.1-flash-image"}}, job_outcomes=["STUCK"])
    s = settings(tmp_path, deadline=time.time() + 1.0, deadline_policy="interactive")
    result = pipeline.run(prompts(tmp_path, 2, model=NEW), s, backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["generate_content_calls"] == 2


def test_a_refused_model_left_unsent_by_an_earlier_run_is_named_as_that_runs(tmp_path, emulator, backend_factory):
    emulator.configure(extra_models={NEW: {"like": "gemini-3.1-flash-image"}})
    old = write_csv(tmp_path / "old.csv", ["id", "prompt", "model"], [["a", "an old prompt", NEW]])
    assert pipeline.submit(old, settings(tmp_path), dry_run=True, backend_factory=backend_factory).exit_code == 0
    emulator.configure(extra_models={})  # Google withdraws the model
    with pytest.raises(Exception) as info:
        pipeline.submit(prompts(tmp_path), settings(tmp_path, switch_manifest=True),  # the default model
                        backend_factory=backend_factory)
    text = str(info.value)
    assert info.value.exit_code == 2 and f"model {NEW!r}: the API does not know it" in text
    assert f"Requests of an earlier run in {tmp_path / 'work'} ({old}) use it" in text
    assert emulator.stats()["files_uploaded"] == 0


@pytest.mark.slow
def test_a_fallback_model_is_named_as_the_api_names_it(tmp_path, emulator, backend_factory):
    s = settings(tmp_path, fallback_model=" models/gemini-3-pro-image")
    assert s.fallback_model == "gemini-3-pro-image"
    emulator.configure(line_error_rate=1.0)
    pipeline.run(prompts(tmp_path, 1), settings(tmp_path, fallback_model="models/gemini-3-pro-image", max_attempts=1,
                                                timeout=5), backend_factory=backend_factory)
    rows = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    with pipeline.open_workspace(s) as ws:
        models = {m for (m,) in ws.ledger.conn.execute("SELECT model FROM requests")}
    assert models == {"gemini-3.1-flash-image", "gemini-3-pro-image"}, (models, rows)


def test_a_run_over_its_tiers_monthly_cap_says_so_on_a_fresh_workdir(tmp_path, emulator, backend_factory, caplog):
    dear = {"gemini-3.1-flash-image": {"output_usd_per_mtok": 1e6}}  # $0.50 an output token in batch
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "image_size"], [[f"r{i}", f"a vase {i}", "2K"] for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="batcher"):
        result = pipeline.submit(m, settings(tmp_path, prices=dear), dry_run=True, backend_factory=backend_factory)
    # Counts alone show it is over (every image at the cheapest size, 512: 747 tokens), so no body is read for sizes.
    assert "the batch estimate (at least $1,120.50) is over Tier 1's monthly spend cap of $250.00" in result.summary
    assert any("over Tier 1's monthly spend cap" in message for message in caplog.messages)
