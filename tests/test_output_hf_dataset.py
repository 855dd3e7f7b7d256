"""The output dataset loads with Hugging Face `datasets` (imagefolder + metadata.parquet), offline."""

from __future__ import annotations

import pytest

import batcher.pipeline as pipeline
from tests.helpers import write_csv


@pytest.mark.slow
def test_the_dataset_loads_with_hugging_face_imagefolder(tmp_path, emulator, backend_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")  # a declared test dependency; skip only on a bare install
    m = write_csv(tmp_path / "m.csv", ["id", "prompt", "aspect_ratio", "variants", "sku"],
                  [["a", "a calm sea", "16:9", "2", "S1"], ["b", "a storm [emulator:image_safety]", "", "", "S2"],
                   ["c", "a forest", "", "", "S3"]])
    s = pipeline.Settings(workdir=tmp_path / "w", out=tmp_path / "o", cache_dir=tmp_path / "c", poll_interval=0.05,
                          timeout=30, quiet=True)
    assert pipeline.run(m, s, backend_factory=backend_factory).exit_code == 3  # one blocked row
    ds = datasets.load_dataset("imagefolder", data_dir=str(s.out), split="train")
    rows = list(ds)
    assert [(r["id"], r["variant"], r["status"], r["sku"]) for r in rows] == [
        ("a", 0, "ok", "S1"), ("a", 1, "ok", "S1"), ("b", 0, "blocked", "S2"), ("c", 0, "ok", "S3")]
    assert rows[0]["image"].size == (1376, 768)  # 16:9 at 1K on gemini-3.1-flash-image
    assert rows[2]["image"] is None  # a blocked row has no image, and says why
    assert rows[2]["finish_reason"] == "IMAGE_SAFETY"
    # The dataset card's configs: every row (the default), or only the rows with their image.
    everything = datasets.load_dataset(str(s.out), split="train")
    assert [(r["id"], r["status"]) for r in everything] == [(r["id"], r["status"]) for r in rows]
    images = datasets.load_dataset(str(s.out), "ok", split="train")
    assert [(r["id"], r["variant"]) for r in images] == [("a", 0), ("a", 1), ("c", 0)]
    assert all(r["image"] is not None for r in images)
