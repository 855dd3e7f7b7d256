"""The `batcher` command as a whole: each command takes the options it uses, the commands on an existing run take
its job spec, and `report` finds the dataset the run wrote."""

import json
import re

import pytest
from click.testing import CliRunner

from batcher.cli import main


def options_of(command: str) -> set[str]:
    text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    return set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", text, flags=re.M))


@pytest.mark.parametrize("command, not_used", [
    ("status", {"--max-attempts", "--engine", "--staging", "--out", "--cache-dir", "--switch-manifest"}),
    ("cancel", {"--max-attempts", "--engine", "--staging", "--out", "--cache-dir", "--switch-manifest"}),
    ("submit", {"--engine", "--ray-address"}),
    ("estimate", {"--workdir", "--retry-blocked", "--fallback-model", "--max-requests-per-job", "--token-cap",
                  "--max-attempts", "--backend"}),
    ("report", {"--backend", "--cache-dir", "--max-attempts", "--engine"}),
])
def test_a_commands_help_lists_only_the_options_it_uses(command, not_used):
    options = options_of(command)
    assert options and not options & not_used


def test_the_run_commands_keep_every_option():
    for command in ("submit", "run"):
        assert {"--workdir", "--out", "--cache-dir", "--backend", "--staging", "--max-attempts",
                "--retry-blocked", "--fallback-model", "--skip-invalid", "--tier"} <= options_of(command)
    assert {"--engine", "--ray-address"} <= options_of("run")
    assert {"--staging", "--max-attempts", "--switch-manifest", "--out", "--cache-dir", "--engine",
            "--ray-address"} <= options_of("collect")


def test_estimate_says_what_skip_invalid_does_there():
    text = CliRunner().invoke(main, ["estimate", "--help"], terminal_width=200).output
    assert "WORKDIR" not in text and "valid rows only" in text


def test_status_collect_cancel_and_report_take_the_runs_job_spec(tmp_path, emulator_env, monkeypatch):
    """A nightly user names the spec, never the paths in it: the spec's workdir, dataset and cache are used."""
    (tmp_path / "m.csv").write_text("id,prompt\na,a red door\nb,a blue door\n", encoding="utf-8")
    spec = tmp_path / "nightly.toml"
    spec.write_text('manifest = "m.csv"\nworkdir = "w"\nout = "data"\ncache_dir = "c"\n[poll]\ninterval_seconds = 0.05\n',
                    encoding="utf-8")
    monkeypatch.chdir(tmp_path / "..")  # not the spec's folder: its paths are relative to the spec
    r = CliRunner().invoke(main, ["submit", str(spec), "-q"])
    assert r.exit_code == 4 and "1 job(s) created" in r.output, r.output  # 4: in progress
    r = CliRunner().invoke(main, ["status", str(spec), "--json"])
    doc = json.loads(r.output)
    assert doc["workdir"] == str(tmp_path / "w") and len(doc["jobs"]) == 1
    r = CliRunner().invoke(main, ["collect", str(spec), "-q"])
    while r.exit_code == 4:  # the job is still running
        r = CliRunner().invoke(main, ["collect", str(spec), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "metadata.parquet").exists()
    assert f"report {tmp_path / 'data' / 'report.html'}" in r.output  # collect leaves the report, and says where
    r = CliRunner().invoke(main, ["report", str(spec)])
    assert r.exit_code == 0 and str(tmp_path / "data" / "report.html") in r.output, r.output
    r = CliRunner().invoke(main, ["cancel", str(spec), "--all"])
    assert r.exit_code == 0 and "cancel requested for 0 job(s)" in r.output, r.output
    r = CliRunner().invoke(main, ["status", str(tmp_path / "m.csv")])
    assert r.exit_code == 2 and "takes a job spec (a .toml file)" in r.output


def test_report_finds_the_dataset_the_run_wrote(tmp_path, emulator_env, monkeypatch):
    """`collect --out dataset` then `report`: the report is of that dataset, not of WORKDIR/dataset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("id,prompt\na,a red door\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["run", "m.csv", "--out", "dataset", "--poll-interval", "0.05", "-q"])
    assert r.exit_code == 0, r.output
    (tmp_path / "dataset" / "report.html").unlink()
    r = CliRunner().invoke(main, ["report"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dataset" / "report.html").exists() and not (tmp_path / ".batcher" / "dataset").exists()
    r = CliRunner().invoke(main, ["report", "--out", str(tmp_path / "elsewhere")])  # an --out given is the one used
    assert r.exit_code == 2 and "no dataset at" in r.output


def test_status_without_a_key_suggests_no_refresh(tmp_path, emulator_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("id,prompt\na,a red door\n", encoding="utf-8")
    emulator_env.configure(pending_seconds=3600)  # the job stays open
    assert CliRunner().invoke(main, ["submit", "m.csv", "-q"]).exit_code == 4
    monkeypatch.delenv("GEMINI_API_KEY")
    r = CliRunner().invoke(main, ["status"])
    assert r.exit_code == 2
    assert "no API key to ask about 1 running job" in r.output and "--no-refresh" in r.output
    assert "--backend emulator" not in r.output
    r = CliRunner().invoke(main, ["status", "--no-refresh"])
    assert r.exit_code == 4, r.output


@pytest.mark.slow
def test_status_shows_a_run_in_progress_from_its_ledger(tmp_path, emulator_env):
    """`run` holds the workdir while it works; `status` (and `status --watch`) beside it read its ledger without the
    lock and say whose poll the jobs are from, instead of refusing."""
    import os
    import subprocess
    import sys
    import time

    emulator_env.configure(pending_seconds=0.1, running_seconds=4.0)
    (tmp_path / "m.csv").write_text("id,prompt\na,a red door\nb,a blue door\n", encoding="utf-8")
    run = subprocess.Popen([sys.executable, "-m", "batcher.cli", "run", "m.csv", "--poll-interval", "0.2", "-q"],
                           cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path / ".batcher"), "--json"])
            if r.exit_code == 4 and json.loads(r.output)["jobs"]:
                break
            time.sleep(0.2)
        doc = json.loads(r.output)
        assert doc["busy"]["pid"] == str(run.pid) and len(doc["jobs"]) == 1, r.output
        r = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path / ".batcher")], env={"COLUMNS": "80"})
        assert r.exit_code == 4 and f"in use by batcher pid {run.pid}" in r.output, r.output
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, out + err
    finally:
        run.kill()


# What only planning needs (reading and validating a manifest, preparing its rows): submit, run and estimate load it
# when they plan; collect, status, report, cancel, prune, cache and export never read a manifest.
PLANNING_ONLY = ["batcher.planning.prepare", "batcher.manifest.blocks", "batcher.manifest.reader",
                 "batcher.manifest.references", "pyarrow.compute"]

_COLLECT_IN_A_FRESH_PROCESS = """
import json, sys
import batcher
from batcher.cli import entry_point
heavy = json.loads(sys.argv.pop(1))
try:
    entry_point()  # the `batcher` program: main, without pandas
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "batcher": batcher.__file__, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_collect_loads_nothing_only_planning_needs(tmp_path, emulator_env):
    """Every command paid ~0.24 s of imports for planning (the manifest readers with pyarrow.compute, the row
    preparer, the estimate) when `batcher.cli` imported them all: a real collect, in a fresh process, loads none."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    emulator_env.configure(pending_seconds=0.0, running_seconds=0.1)
    (tmp_path / "m.csv").write_text("id,prompt\na,a red door\nb,a blue door\n", encoding="utf-8")
    paths = ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c")]
    r = CliRunner().invoke(main, ["submit", str(tmp_path / "m.csv"), *paths, "-q"])
    assert r.exit_code == 4, r.output  # in progress
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    for _ in range(50):
        out = subprocess.run([sys.executable, "-c", _COLLECT_IN_A_FRESH_PROCESS, json.dumps(PLANNING_ONLY),
                              "collect", *paths, "-q"], capture_output=True, text=True, env=env, check=True)
        done = json.loads(out.stdout.splitlines()[-1])
        assert done["batcher"].startswith(str(root)) and done["loaded"] == [], (done, out.stderr)
        if done["code"] != 4:  # 4: the job still running
            break
    assert done["code"] == 0 and (tmp_path / "data" / "metadata.parquet").exists(), (done, out.stderr)
