"""Collecting on Ray (results.on_ray, results.detached): Ray tasks download and decode each finished job into the
shared cache; the owner records their outcomes exactly once. One local Ray (2 CPUs) serves the whole module."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from batcher import pipeline
from batcher.ledger import J_COLLECTED, Ledger
from batcher.planning.packing import ShardLimits
from batcher.storage import gcs
from tests import gcs_support
from tests.helpers import settings

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster(emulator_session, gcs_url, tmp_path_factory):
    """A local Ray whose workers reach the emulator and the GCS emulator through their environment (as a cluster's
    nodes would), with the crash hook set on `image` and disarmed: a test removes `marker` to have the first task
    that passes its second image SIGKILLed (once: the dying worker makes the marker again)."""
    marker = tmp_path_factory.mktemp("faults") / "worker-crashed"
    marker.touch()
    env = {"GEMINI_API_KEY": "test-key", "GOOGLE_GEMINI_BASE_URL": emulator_session.url, "STORAGE_EMULATOR_HOST": gcs_url,
           "BATCHER_CRASH_AT": "image:2", "BATCHER_CRASH_ONCE": str(marker),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield SimpleNamespace(marker=marker, address=ray.get_runtime_context().gcs_address, home=os.environ.get("HOME"))
    ray.shutdown()


def manifest(tmp_path: Path, rows: int) -> Path:
    m = tmp_path / "m.csv"
    m.write_text("id,prompt\n" + "".join(f"r{i},a lighthouse at dusk number {i}\n" for i in range(rows)), encoding="utf-8")
    return m


def submitted(tmp_path: Path, backend_factory, rows: int, **kw) -> pipeline.Settings:
    """A run of `rows` rows in jobs of 2 requests, submitted, its jobs finished at the API."""
    s = settings(tmp_path, limits=ShardLimits(max_requests=2), **kw)
    assert pipeline.submit(manifest(tmp_path, rows), s, backend_factory=backend_factory).exit_code == 4
    time.sleep(0.5)  # the emulator finishes a job in ~0.15 s
    return s


def dataset(out: Path) -> tuple[list[dict], dict[str, bytes]]:
    rows = sorted(pq.read_table(out / "metadata.parquet").to_pylist(), key=lambda r: r["id"])
    for r in rows:
        r.pop("job")  # the job's display name differs between workdirs
    return rows, {r["file_name"]: (out / r["file_name"]).read_bytes() for r in rows}


def test_a_run_collected_by_ray_tasks_makes_the_same_dataset_as_a_local_one(ray_cluster, tmp_path, emulator, backend_factory):
    m = manifest(tmp_path, 7)
    local = pipeline.run(m, settings(tmp_path / "local", limits=ShardLimits(max_requests=2)), backend_factory=backend_factory)
    on_ray = pipeline.run(m, settings(tmp_path / "ray", limits=ShardLimits(max_requests=2), engine="ray"),
                          backend_factory=backend_factory)
    assert local.exit_code == on_ray.exit_code == 0, (local.summary, on_ray.summary)
    rows, images = dataset(tmp_path / "ray" / "out")
    assert (rows, images) == dataset(tmp_path / "local" / "out")
    assert len(rows) == 7 and {r["status"] for r in rows} == {"ok"}
    assert emulator.stats()["downloads"] == 2 * 4  # 4 jobs a run, each results file downloaded once
    assert ray.is_initialized()  # a Ray this process was already connected to is left running


def test_a_worker_killed_mid_task_is_retried_and_no_image_is_written_twice(ray_cluster, tmp_path, emulator, backend_factory,
                                                                           bucket):
    cache = gcs.join(bucket, "cache")
    s = submitted(tmp_path, backend_factory, 6, cache_dir=cache, engine="ray")
    ray_cluster.marker.unlink()  # armed: the first task to write its second image dies
    result = pipeline.collect(s, backend_factory=backend_factory)
    assert ray_cluster.marker.exists(), "no worker was killed"
    assert result.exit_code == 0, result.summary
    rows, images = dataset(s.out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"} and all(images.values())
    written = {uri: n for uri, n in gcs_support.writes.items() if uri.startswith(cache + "/")}
    assert len(written) == 2 * 6 and set(written.values()) == {1}  # an image and its .json each, written once
    assert emulator.stats()["downloads"] == 3 + 1  # the killed task's job again, before it was recorded
    assert pipeline.collect(s, backend_factory=backend_factory).exit_code == 0
    assert emulator.stats()["downloads"] == 4  # a recorded job is never downloaded again


def test_an_owner_killed_between_tasks_resumes_from_its_ledger(ray_cluster, tmp_path, emulator, backend_factory, bucket):
    cache = gcs.join(bucket, "cache")
    s = submitted(tmp_path, backend_factory, 8, cache_dir=cache)
    env = {**os.environ, "GEMINI_API_KEY": "test-key", "GOOGLE_GEMINI_BASE_URL": emulator.url,
           "HOME": ray_cluster.home or "", "BATCHER_CRASH_AT": "imported"}  # HOME: where Ray keeps its token
    owner = subprocess.run([sys.executable, "-m", "batcher.cli", "collect", "--engine", "ray", "--ray-address",
                            ray_cluster.address, "--workdir", str(s.workdir), "--out", str(s.out), "--cache-dir", cache,
                            "-q"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert owner.returncode == -9, owner.stderr  # SIGKILLed right after recording its first job
    ledger = Ledger(s.workdir)
    recorded = len(ledger.jobs((J_COLLECTED,)))
    ledger.close()
    assert recorded == 1
    before = emulator.stats()["downloads"]
    result = pipeline.collect(dataclasses.replace(s, engine="ray"), backend_factory=backend_factory)
    assert result.exit_code == 0, result.summary
    assert emulator.stats()["downloads"] - before == 4 - recorded  # the recorded job is not downloaded again
    rows, _ = dataset(s.out)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert result.collect.succeeded == 8 - 2  # the killed owner recorded its first job's 2 images; none twice


def test_the_same_records_imported_twice_change_nothing(tmp_path, emulator, backend_factory):
    """The owner's half alone (no Ray): a job already recorded is skipped, whatever records arrive again."""
    from batcher.results.collect import CollectStats
    from batcher.results.detached import FinishedJob, collect_detached, import_records
    from batcher.storage.store import open_store

    s = submitted(tmp_path, backend_factory, 2)
    with pipeline.open_workspace(s, backend_factory, existing=True) as ws:
        pipeline.refresh_jobs(ws)
        (job,) = ws.ledger.jobs()
        records = collect_detached(FinishedJob.of(ws.ledger, job), ws.backend, open_store(s.cache_dir),
                                   scratch_root=tmp_path / "scratch")
        assert [r["kind"] for r in records] == ["image", "image"]
        first, again = CollectStats(), CollectStats()
        assert import_records(ws.ledger, ws.backend, ws.store, job["id"], records, 3, first)
        assert not import_records(ws.ledger, ws.backend, ws.store, job["id"], records, 3, again)
        assert (first.succeeded, first.jobs, again.succeeded, again.jobs) == (2, 1, 0, 0)
        assert ws.ledger.job(job["id"])["state"] == J_COLLECTED
    assert not (tmp_path / "scratch" / "batcher-collect" / f"{job['display_name']}-{os.getpid()}").exists()


def test_engine_ray_without_ray_installed_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from batcher.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    r = CliRunner().invoke(main, ["collect", "--engine", "ray", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "pip install 'batcher[ray]'" in r.output, r.output


def test_a_job_whose_task_fails_is_named_and_left_for_the_next_collect(ray_cluster, tmp_path, emulator, backend_factory):
    from batcher.errors import CollectError
    from batcher.ledger import J_SUCCEEDED

    s = submitted(tmp_path, backend_factory, 6, engine="ray")
    with pipeline.open_workspace(s, backend_factory, existing=True) as ws:
        pipeline.refresh_jobs(ws)
        lost = ws.ledger.jobs()[0]
        ws.backend.delete_file(lost["output_file"])  # its results are gone at the API: the task gets a 404
    with pytest.raises(CollectError, match=f"{lost['display_name']}: its Ray task failed"):
        pipeline.collect(s, backend_factory=backend_factory)
    ledger = Ledger(s.workdir)
    assert [j["display_name"] for j in ledger.jobs((J_SUCCEEDED,))] == [lost["display_name"]]  # nothing recorded
    assert len(ledger.jobs((J_COLLECTED,))) == 2  # the other jobs are in
    ledger.close()
