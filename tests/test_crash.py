"""Crash consistency: SIGKILL the `batcher` CLI (a subprocess) at every stage point and at random moments,
run it again, and check that nothing was lost and nothing paid twice. The long campaign is
tests/crash_campaign.py (`make reliability`); the harness and the invariants are in tests/crash_support.py."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from tests import crash_support as cs

pytestmark = pytest.mark.slow  # every test here runs the CLI in subprocesses and kills them

QUICK = cs.Shape("quick", rows=6, variants_every=3, duplicates_every=4, max_requests_per_job=3, typical_s=3.0)
SEED = int(os.environ.get("BATCHER_CRASH_SEED", "20261122"))


@pytest.fixture(scope="module")
def crash_emulator():
    emu, log = cs.start_emulator()
    yield emu, log
    emu.stop()


def _assert_ok(res: cs.Result) -> None:
    assert res.ok, cs.format_table([res])
    assert res.rows_lost == 0 and res.duplicate_jobs == 0


@pytest.mark.parametrize("point", cs.STAGE_POINTS)
def test_kill_at_stage_point_then_rerun(point, crash_emulator, tmp_path):
    emu, log = crash_emulator
    res = cs.run_scenario(emu, log, QUICK, tmp_path / "s", crash_at=point, seed=SEED)
    assert res.kills_landed == 1, f"{point}: the process did not die there\n{cs.format_table([res])}"
    _assert_ok(res)


def test_kill_mid_collect_in_submit_collect_mode(crash_emulator, tmp_path):
    emu, log = crash_emulator
    res = cs.run_scenario(emu, log, cs.SHAPES["submit-collect"], tmp_path / "s", crash_at="image:2", seed=SEED)
    assert res.kills_landed == 1
    _assert_ok(res)


@pytest.mark.parametrize("shape", ["blocked", "job-outcomes", "dropped-download"])
def test_random_kills_then_rerun(shape, crash_emulator, tmp_path):
    emu, log = crash_emulator
    rng = random.Random(f"{SEED}-{shape}")  # replay: BATCHER_CRASH_SEED=<seed>
    sh = cs.SHAPES[shape]
    # In the first half of a typical run, so the first kill lands (a rerun may finish before the second's moment).
    res = cs.run_scenario(emu, log, sh, tmp_path / "s", kill_delays=cs.random_delays(rng, sh, 2, within=0.5), seed=SEED)
    assert res.kills_landed >= 1, f"no kill landed: the test checked a run that was never interrupted\n{cs.format_table([res])}"
    _assert_ok(res)


def test_second_process_is_refused_naming_the_holder_and_the_lock_is_taken_over_after_sigkill(crash_emulator, tmp_path):
    emu, log = crash_emulator
    shape = cs.Shape("lock", rows=3)
    cs.reset_emulator(emu, log, shape, SEED)
    emu.configure(running_seconds=60)  # the holder waits on its job
    manifest = cs.write_manifest(tmp_path / "m.csv", shape)
    work, out, cache = tmp_path / "work", tmp_path / "out", tmp_path / "cache"
    args = cs.command_args(shape, manifest, work, out, cache, "run")
    env = {k: v for k, v in os.environ.items() if k != "BATCHER_CRASH_AT"}
    env.update(GEMINI_API_KEY="any", GOOGLE_GEMINI_BASE_URL=emu.url, PYTHONPATH=str(cs.ROOT))
    holder = subprocess.Popen([cs.PYTHON, "-m", "batcher.cli", *args], env=env, cwd=cs.ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while emu.stats()["batches_created"] < 1:  # the holder is well inside its run
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = cs.cli(args, emu)
        assert second.code == 1, second.stderr
        assert f"in use by another batcher process (pid {holder.pid})" in second.stderr
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    emu.configure(running_seconds=0.2)
    emu.advance(120)  # the job started under the long timing finishes now
    res = cs.Result("lock", "lock", SEED)
    code = cs._finish(shape, manifest, work, out, cache, emu, res)
    assert code == 0, res.violations
    cs.check_invariants(shape, work, out, emu, log, res)
    assert not res.violations, res.violations
