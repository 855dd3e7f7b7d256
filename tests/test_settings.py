"""Job specs: `batcher run JOB.toml`, strict keys, command-line options over the file."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batcher.cli import main
from batcher.errors import UsageError
from batcher.settings import load_spec
from tests.helpers import write_csv


def spec_file(tmp_path, body: str):
    write_csv(tmp_path / "m.csv", ["id", "prompt"], [["a", "a lighthouse at night"], ["b", "a teapot"]])
    p = tmp_path / "job.toml"
    p.write_text('manifest = "m.csv"\nworkdir = "w"\nout = "o"\ncache_dir = "c"\n' + body)
    return p


def test_run_a_job_spec(tmp_path, emulator_env):
    p = spec_file(tmp_path, '[defaults]\naspect_ratio = "16:9"\n[poll]\ninterval_seconds = 0.05\ntimeout_seconds = 60\n')
    r = CliRunner().invoke(main, ["run", str(p), "-q"])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "o" / "metadata.parquet").to_pylist()
    assert [x["id"] for x in rows] == ["a", "b"]
    assert emulator_env.stats()["batches_created"] == 1


def test_command_line_options_override_the_spec(tmp_path, emulator_env):
    p = spec_file(tmp_path, '[poll]\ninterval_seconds = 0.05\n')
    r = CliRunner().invoke(main, ["run", str(p), "-q", "--out", str(tmp_path / "elsewhere")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "elsewhere" / "metadata.parquet").exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("body, message", [
    ("colour = 1\n", "unknown key 'colour'"),
    ("[limits]\nmax_atempts = 3\n", "unknown key 'limits.max_atempts'"),
    ("[limits]\nmax_attempts = \"three\"\n", "'limits.max_attempts' must be a int"),
    ("defaults = 3\n", "'defaults' must be a table"),
    ("[poll\n", "not valid TOML"),
    ("[collect]\nengine = \"spark\"\n", "'collect.engine' is 'spark'; use one of local, ray"),
])
def test_bad_specs_name_the_key_and_the_file(tmp_path, body, message):
    p = spec_file(tmp_path, body)
    with pytest.raises(UsageError, match="job.toml") as info:
        load_spec(p)
    assert message in str(info.value)
    r = CliRunner().invoke(main, ["run", str(p)])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_missing_manifest_key(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('out = "o"\n')
    with pytest.raises(UsageError, match="'manifest' is required"):
        load_spec(p)


def test_shipped_demo_spec_is_valid():
    from pathlib import Path

    spec = load_spec(Path(__file__).parent.parent / "jobs" / "demo.toml")
    assert spec.values["manifest"].endswith("samples/prompts.csv")
    assert spec.values["backend"] == "emulator"


def test_estimate_of_a_vertex_job_spec_needs_no_cloud_settings(tmp_path, monkeypatch):
    """estimate writes nothing and needs no API: a spec with backend = "vertex" is estimated without its project,
    location or staging area; a submit of it says what is missing before anything is planned."""
    import batcher

    for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "BATCHER_VERTEX_STAGING"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "m.csv").write_text("id,prompt\na,a teapot\n", encoding="utf-8")
    spec = tmp_path / "v.toml"
    spec.write_text('manifest = "m.csv"\nbackend = "vertex"\nworkdir = "w"\n', encoding="utf-8")
    assert batcher.estimate(str(spec)).rows == 1
    r = CliRunner().invoke(main, ["estimate", str(spec)])
    assert r.exit_code == 0, r.output
    with pytest.raises(batcher.UsageError, match="Vertex AI needs a project"):
        batcher.submit(str(spec))
    assert not (tmp_path / "w").exists()  # refused before the workdir was made


def test_a_policy_error_is_not_blamed_on_the_specs_deadline(tmp_path):
    from batcher.errors import UsageError
    from batcher.settings import Settings

    (tmp_path / "m.csv").write_text("id,prompt\na,a teapot\n", encoding="utf-8")
    spec = tmp_path / "s.toml"
    spec.write_text('manifest = "m.csv"\n[window]\ndeadline = "7h"\n', encoding="utf-8")
    with pytest.raises(UsageError) as info:
        Settings.from_spec(spec, deadline_policy="sometimes")
    assert "window.deadline" not in str(info.value) and "--deadline-policy 'sometimes'" in str(info.value)


def test_a_spec_collects_on_ray_at_its_address(tmp_path):
    from batcher.settings import Settings

    p = spec_file(tmp_path, '[collect]\nengine = "ray"\nray_address = "ray://head:10001"\n')
    _, s = Settings.from_spec(p)
    assert (s.engine, s.ray_address) == ("ray", "ray://head:10001")
    _, s = Settings.from_spec(p, engine="local")  # the command line's engine wins
    assert s.engine == "local"
    r = CliRunner().invoke(main, ["collect", "--ray-address", "ray://head:10001", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "--ray-address is for --engine ray" in r.output, r.output
