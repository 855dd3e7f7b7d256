"""output.live: progress over a run's jobs between polls (the API's counts, time in state, ETA); `run` in a terminal
and `status --watch` show it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import batcher.pipeline as pipeline
from batcher.cli import main
from batcher.output.live import JobCounts, JobsWatch, RateEta, from_ledger
from tests.helpers import write_csv

ROOT = Path(__file__).resolve().parent.parent


def test_eta_needs_two_observations_and_movement():
    eta = RateEta()
    assert eta.eta(100) is None
    eta.observe(0.0, 0)
    assert eta.eta(100) is None  # one observation: no rate yet
    eta.observe(10.0, 0)
    assert eta.eta(100) is None  # nothing moved: no rate
    eta.observe(20.0, 50)
    assert eta.eta(100) == pytest.approx(40.0)  # 50 in 20 s: 2.5/s, 100 left
    eta.observe(30.0, 20)  # fewer done (sent again): a new history
    assert eta.eta(100) is None
    assert eta.eta(0) == 0.0


def test_eta_follows_the_recent_rate():
    eta = RateEta(window=3)
    for t, done in ((0, 0), (10, 100), (20, 110), (30, 120)):
        eta.observe(float(t), done)
    assert eta.eta(100) == pytest.approx(100.0)  # the last three: 10 in 10 s, not the first burst


def test_watch_counts_the_api_stats_times_states_and_estimates():
    now = [100.0]
    watch = JobsWatch(clock=lambda: now[0])
    jobs = [JobCounts("a", "pending", 0, 0, 10), JobCounts("b", "waiting", 0, 0, 5)]
    p = watch.observe(jobs, unsent=3)
    assert (p.succeeded, p.failed, p.pending, p.total, p.jobs) == (0, 0, 18, 18, 2)
    assert p.states == [("pending", 1, 0.0), ("waiting", 1, 0.0)] and p.eta_seconds is None
    now[0] = 130.0
    p = watch.observe([JobCounts("a", "running", 4, 1, 5), JobCounts("b", "pending", 0, 0, 5)], unsent=3)
    assert (p.succeeded, p.failed, p.pending) == (4, 1, 13)
    assert p.states == [("running", 1, 0.0), ("pending", 1, 0.0)]  # both changed state: their clocks start again
    assert p.eta_seconds == pytest.approx(13 / (5 / 30))
    now[0] = 190.0
    p = watch.observe([JobCounts("a", None, 9, 1, 0), JobCounts("b", "pending", 0, 0, 5)], unsent=0)
    assert p.states == [("pending", 1, 60.0)]  # an ended job is in no state; b has been pending for 60 s
    assert (p.done, p.pending) == (10, 5)


def test_from_ledger_reads_the_stats_the_poller_stored():
    rows = [
        {"display_name": "j1", "state": "submitted", "api_state": "RUNNING", "request_count": 10,
         "stats_json": json.dumps({"requestCount": 10, "successfulRequestCount": 6, "failedRequestCount": 1,
                                   "pendingRequestCount": 3})},
        {"display_name": "j2", "state": "submitted", "api_state": "PENDING", "request_count": 4, "stats_json": None},
        {"display_name": "j3", "state": "uploaded", "api_state": None, "request_count": 7, "stats_json": None},
        {"display_name": "j4", "state": "collected", "api_state": "SUCCEEDED", "request_count": 2,
         "stats_json": json.dumps({"successfulRequestCount": 2})},
    ]
    assert from_ledger(rows) == [JobCounts("j1", "running", 6, 1, 3), JobCounts("j2", "pending", 0, 0, 4),
                                 JobCounts("j3", "waiting", 0, 0, 7), JobCounts("j4", None, 2, 0, 0)]


# ---- status --watch ---------------------------------------------------------------------------------------

ROWS = [[f"r{i}", f"a red fox number {i}"] for i in range(12)]


@pytest.mark.slow
def test_status_watch_redraws_until_every_job_has_ended(tmp_path, emulator_env, monkeypatch):
    emulator_env.configure(pending_seconds=0.2, running_seconds=2.0)
    monkeypatch.setenv("COLUMNS", "80")
    common = ["--workdir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "c"), "-q"]
    r = CliRunner().invoke(main, ["submit", str(write_csv(tmp_path / "m.csv", ["id", "prompt"], ROWS)),
                                  "--max-requests-per-job", "5"] + common)
    assert r.exit_code == 4, r.output
    r = CliRunner().invoke(main, ["status", "--watch", "0.3", "--workdir", str(tmp_path / "w"), "-q"])
    assert r.exit_code == 4, r.output  # every job ended, none collected yet: still in progress
    frames = r.output.split("status at ")[1:]
    assert len(frames) >= 3, r.output
    done = [int(f.splitlines()[1].split("|")[2].split()[0].replace(",", "")) for f in frames]
    assert done == sorted(done) and done[0] < done[-1] == 12, done  # it moved, and ended with every line counted
    assert "ETA" in frames[1] and " running " in r.output and "succeeded  " in frames[-1]
    assert max(len(x) for x in r.output.splitlines()) <= 80


def test_status_watch_ctrl_c_is_interrupted_with_130(tmp_path, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(pipeline, "watch_status", interrupted)
    r = CliRunner().invoke(main, ["status", "--watch", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 130 and "interrupted: nothing is lost" in r.output


def test_watch_stops_once_no_job_runs(tmp_path, emulator, backend_factory):
    from tests.helpers import settings

    s = settings(tmp_path)
    pipeline.run(write_csv(tmp_path / "m.csv", ["id", "prompt"], ROWS[:3]), s, backend_factory=backend_factory)
    sleeps = []
    frames = list(pipeline.watch_status(s, 5, backend_factory=backend_factory, sleep=sleeps.append))
    assert len(frames) == 1 and sleeps == []  # nothing running: one status, no wait
    doc, progress = frames[0]
    assert doc["exit_code"] == 0 and progress.jobs == 0  # jobs collected before the watch are not its progress


# ---- run in a terminal ------------------------------------------------------------------------------------


def _pane(socket: str) -> list[str]:
    # -J joins lines the terminal wrapped: a line longer than the pane shows as one
    out = subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-J"], capture_output=True, text=True, check=True)
    return [x.rstrip() for x in out.stdout.splitlines() if x.strip()]


def _progress(lines: list[str]) -> tuple[int, str] | None:
    for x in lines:
        if "succeeded," in x and "pending" in x and "|" in x:
            return int(x.split("|")[2].split()[0].replace(",", "")), x
    return None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_run_in_an_80_column_terminal_shows_progress_moving_between_polls(tmp_path):
    emu = subprocess.Popen([sys.executable, "-m", "batcher.emulator", "--port", "0", "--pending-seconds", "0.3",
                            "--running-seconds", "6", "--image-bytes", "2000"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    socket = f"batcher-test-{uuid.uuid4().hex[:8]}"
    try:
        url = emu.stdout.readline().strip()
        m = write_csv(tmp_path / "m.csv", ["id", "prompt"], [[f"r{i}", f"a red fox number {i}"] for i in range(30)])
        env = {"GEMINI_API_KEY": "k", "GOOGLE_GEMINI_BASE_URL": url, "PYTHONPATH": str(ROOT),
               "BATCHER_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path / "home"), "TERM": "xterm"}
        command = (f"{sys.executable} -m batcher.cli run {m} --workdir {tmp_path / 'w'} --out {tmp_path / 'o'} "
                   f"--poll-interval 0.4 --max-requests-per-job 10; sleep 60")
        subprocess.run(["tmux", "-L", socket, "-f", os.devnull, "new-session", "-d", "-x", "80", "-y", "24",
                        *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], command], check=True, cwd=tmp_path)
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (len(seen) >= 2 and seen[0][0] < seen[-1][0] < 30):
            lines = _pane(socket)
            assert all(len(x) <= 80 for x in lines), lines
            if (p := _progress(lines)) is not None and (not seen or p[0] != seen[-1][0]):
                seen.append(p)
            time.sleep(0.5)
        assert len(seen) >= 2 and seen[0][0] < seen[-1][0] < 30, seen  # moved while jobs ran, before the end
        assert "running" in seen[-1][1] and "ETA" in seen[-1][1]
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
        emu.terminate()
        emu.wait(timeout=10)
