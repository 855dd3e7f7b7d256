"""Crash-consistency harness: run the `batcher` CLI as a subprocess against an emulator that lives in this
process (its state survives the child's death, like the real service), SIGKILL the child at a named stage
point (`BATCHER_CRASH_AT`, see batcher/faults.py) or after a random delay, run it again until it finishes,
then check the invariants (docs/reliability.md).

Used by tests/test_crash.py (fast, default suite) and tests/crash_campaign.py (the long campaign).
"""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from batcher.emulator import Emulator, EmulatorConfig

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Every stage point wired with maybe_crash() in the batcher package.
STAGE_POINTS = ["prepare", "plan", "upload", "uploaded", "create", "created", "poll", "download", "decode:3", "image:2",
                "dataset", "dataset-replace"]
EMULATOR_BASE = dict(pending_seconds=0.05, running_seconds=0.2, image_bytes=3_000)
RUN_TIMEOUT_S = 90.0  # one CLI invocation; beyond this it is a hang (a violation)
MAX_RECOVERY_RUNS = 12


@dataclass
class Shape:
    """A kind of run: the manifest and the faults the emulator injects."""

    name: str
    rows: int = 6
    variants_every: int = 0  # every n-th row asks for 2 variants (0: none)
    duplicates_every: int = 0  # every n-th row repeats an earlier prompt (same request)
    blocked: int = 0  # rows with an [emulator:image_safety] / [emulator:text_only] marker
    always_error: int = 0  # rows with [emulator:line_error] (fail every attempt -> status failed)
    max_requests_per_job: int = 1000
    max_attempts: int = 3
    emulator: dict = field(default_factory=dict)  # EmulatorConfig fields over EMULATOR_BASE
    mode: str = "run"  # "run" or "submit-collect"
    typical_s: float = 3.0  # rough uninterrupted duration, for random kill delays

    @property
    def expect_exit(self) -> int:
        return 3 if self.blocked or self.always_error else 0


SHAPES = {
    "small": Shape("small", rows=4),
    "variants-dups": Shape("variants-dups", rows=10, variants_every=3, duplicates_every=4),
    "multi-job": Shape("multi-job", rows=14, variants_every=5, max_requests_per_job=3, typical_s=4.0),
    "blocked": Shape("blocked", rows=8, blocked=2, always_error=1, max_attempts=2, typical_s=4.0),
    "line-errors": Shape("line-errors", rows=10, max_requests_per_job=4, max_attempts=10,
                         emulator=dict(line_error_rate=0.3), typical_s=5.0),
    "dropped-download": Shape("dropped-download", rows=8, emulator=dict(drop_download_after_bytes=6_000,
                                                                        drop_download_times=3)),
    "job-outcomes": Shape("job-outcomes", rows=8, max_requests_per_job=3,
                          emulator=dict(job_outcomes=["FAILED", "SUCCEEDED", "EXPIRED"]), typical_s=5.0),
    "large": Shape("large", rows=120, variants_every=7, duplicates_every=9, max_requests_per_job=40, typical_s=6.0),
    "submit-collect": Shape("submit-collect", rows=10, variants_every=4, max_requests_per_job=4, mode="submit-collect",
                            typical_s=5.0),
}


def write_manifest(path: Path, shape: Shape) -> Path:
    rows = []
    for i in range(shape.rows):
        prompt = f"{shape.name} crash test image number {i}, a lighthouse at dusk"
        if shape.duplicates_every and i and i % shape.duplicates_every == 0:
            prompt = rows[i - 1][1]  # the same request as the row before: sent once, shared
        variants = 2 if shape.variants_every and i % shape.variants_every == 1 else ""
        rows.append([f"r{i:04d}", prompt, variants, f"cat{i % 3}"])
    for j in range(shape.blocked):
        marker = "[emulator:image_safety]" if j % 2 == 0 else "[emulator:text_only]"
        rows.append([f"blk{j}", f"blocked row {j} {marker}", "", "blocked"])
    for j in range(shape.always_error):
        rows.append([f"err{j}", f"always failing row {j} [emulator:line_error]", "", "error"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "variants", "category"])
        w.writerows(rows)
    return path


def expected_rows(shape: Shape) -> int:
    n = sum(2 if shape.variants_every and i % shape.variants_every == 1 else 1 for i in range(shape.rows))
    return n + shape.blocked + shape.always_error


# ---- the emulator and what it saw ---------------------------------------------------------------------

class LineLog:
    """Observes every line the emulator processes: (batch id, key, ok). Installed by wrapping the
    emulator's generator in this process; the emulator itself is unchanged."""

    def __init__(self, emu: Emulator):
        self.lock = threading.Lock()
        self.lines: list[tuple[str, str, bool]] = []
        gen = emu.service.generator
        original = gen.generate

        def generate(model_name, request, response_salt, key=None):
            batch_id = str(response_salt).rsplit(":", 1)[0]
            try:
                out = original(model_name, request, response_salt, key=key)
            except Exception:
                with self.lock:
                    self.lines.append((batch_id, key, False))
                raise
            with self.lock:
                self.lines.append((batch_id, key, True))
            return out

        gen.generate = generate

    def clear(self) -> None:
        with self.lock:
            self.lines.clear()


def start_emulator() -> tuple[Emulator, LineLog]:
    emu = Emulator(EmulatorConfig(**EMULATOR_BASE)).start()
    return emu, LineLog(emu)


def reset_emulator(emu: Emulator, log: LineLog, shape: Shape, seed: int) -> None:
    defaults = EmulatorConfig(**EMULATOR_BASE).to_dict()
    for fixed in ("host", "port"):
        defaults.pop(fixed, None)
    emu.configure(**defaults)
    emu.reset()
    emu.configure(seed=seed, **shape.emulator)
    log.clear()


# ---- running the CLI ----------------------------------------------------------------------------------

@dataclass
class Invocation:
    argv: list[str]
    code: int | None
    killed: bool
    stderr: str
    seconds: float


def cli(args: list[str], emu: Emulator, *, crash_at: str | None = None, kill_after: float | None = None,
        timeout: float = RUN_TIMEOUT_S) -> Invocation:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHER_CRASH_AT", "GOOGLE_API_KEY")}
    env.update(GEMINI_API_KEY="any", GOOGLE_GEMINI_BASE_URL=emu.url, PYTHONPATH=str(ROOT))
    # Rows prepared in a child process, as for a large manifest: that path (and its `prepare` point) is killed too.
    env.setdefault("BATCHER_PLAN_PROCESS", "1")
    if crash_at:
        env["BATCHER_CRASH_AT"] = crash_at
    argv = [PYTHON, "-m", "batcher.cli", *args]
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    try:
        out, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        killed = kill_after is not None
        if not killed:
            err += f"\n[harness] HANG: killed after {timeout}s"
    if proc.returncode == -signal.SIGKILL:
        killed = True
    if crash_at == "prepare" and proc.returncode == 1 and "child process failed (exit status -9)" in (err or ""):
        killed = True  # the planner's row-preparing child died: the planner rolled back and exited 1
    return Invocation(argv, proc.returncode, killed, (out or "") + (err or ""), time.monotonic() - started)


def command_args(shape: Shape, manifest: Path, work: Path, out: Path, cache: Path, which: str = "run") -> list[str]:
    common = ["--workdir", str(work), "--cache-dir", str(cache), "--max-attempts", str(shape.max_attempts), "-q"]
    if which == "run":
        return ["run", str(manifest), "--out", str(out), "--poll-interval", "0.05",
                "--max-requests-per-job", str(shape.max_requests_per_job), *common]
    if which == "submit":
        return ["submit", str(manifest), "--max-requests-per-job", str(shape.max_requests_per_job), *common]
    return ["collect", "--out", str(out), *common]


# ---- a scenario: crash, recover, check ------------------------------------------------------------------

@dataclass
class Result:
    shape: str
    kind: str  # the stage point, or "random"
    seed: int
    kills_tried: int = 0
    kills_landed: int = 0  # the child really died of SIGKILL
    recovered: bool = False
    rows_checked: int = 0
    rows_lost: int = 0
    duplicate_jobs: int = 0
    runs: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    final_exit: int | None = None

    @property
    def ok(self) -> bool:
        return self.recovered and not self.violations


def _finish(shape: Shape, manifest: Path, work: Path, out: Path, cache: Path, emu: Emulator, res: Result) -> int | None:
    """Run without faults until the run completes. Returns the final exit code (None if it never did)."""
    for _ in range(MAX_RECOVERY_RUNS):
        if shape.mode == "run":
            inv = cli(command_args(shape, manifest, work, out, cache, "run"), emu)
            res.runs += 1
            if inv.killed:
                res.violations.append(f"recovery run hung or died: {inv.stderr[-500:]}")
                return None
            if inv.code in (0, 3):
                return inv.code
            res.violations.append(f"recovery run exited {inv.code}: {inv.stderr[-800:]}")
            return None
        # submit, then collect until nothing is pending; submit again when requests were requeued
        inv = cli(command_args(shape, manifest, work, out, cache, "submit"), emu)
        res.runs += 1
        if inv.code not in (0, 3, 4):
            res.violations.append(f"recovery submit exited {inv.code}: {inv.stderr[-800:]}")
            return None
        for _ in range(200):
            inv = cli(command_args(shape, manifest, work, out, cache, "collect"), emu)
            res.runs += 1
            if inv.code in (0, 3):
                return inv.code
            if inv.code != 4:
                res.violations.append(f"recovery collect exited {inv.code}: {inv.stderr[-800:]}")
                return None
            if "to send again" in inv.stderr or "to send again" in inv.stderr:
                break
            if _planned(work):
                break
            time.sleep(0.1)
    res.violations.append("did not finish within the recovery runs")
    return None


def _no_run_yet(which: str, inv, work: Path) -> bool:
    """A `collect` after a `submit` killed before its plan committed: the right answer is exit 2, "no run"
    (nothing was planned, so nothing can be lost), provided the ledger indeed holds no run."""
    if which != "collect" or inv.code != 2 or "no run in" not in inv.stderr:
        return False
    if not (work / "ledger.sqlite").exists():
        return True
    conn = sqlite3.connect(work / "ledger.sqlite")
    try:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    finally:
        conn.close()


def _planned(work: Path) -> bool:
    conn = sqlite3.connect(work / "ledger.sqlite")
    try:
        return conn.execute("SELECT COUNT(*) FROM requests WHERE state='planned'").fetchone()[0] > 0
    finally:
        conn.close()


def run_scenario(emu: Emulator, log: LineLog, shape: Shape, base: Path, *, crash_at: str | None = None,
                 kill_delays: list[float] | None = None, seed: int = 0) -> Result:
    """One scenario in a fresh workdir and a freshly reset emulator.

    crash_at: a stage point, set for the first invocation only (in submit-collect mode: for every
    invocation until one dies, then never again). kill_delays: SIGKILL the k-th invocation after
    kill_delays[k] seconds (random moments)."""
    started = time.monotonic()
    res = Result(shape.name, crash_at or "random", seed)
    reset_emulator(emu, log, shape, seed)
    base.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(base / "manifest.csv", shape)
    work, out, cache = base / "work", base / "out", base / "cache"

    if crash_at:
        res.kills_tried += 1
        if shape.mode == "run":
            inv = cli(command_args(shape, manifest, work, out, cache, "run"), emu, crash_at=crash_at)
            res.runs += 1
            res.kills_landed += inv.killed
        else:
            for which in ["submit"] + ["collect"] * 60:
                inv = cli(command_args(shape, manifest, work, out, cache, which), emu, crash_at=crash_at)
                res.runs += 1
                if inv.killed:
                    res.kills_landed += 1
                    break
                if which == "collect" and inv.code in (0, 3):
                    break
                if which == "collect":
                    time.sleep(0.05)
    cycle = ["run"] if shape.mode == "run" else ["submit", "collect", "collect", "collect"]
    for k, delay in enumerate(kill_delays or []):
        res.kills_tried += 1
        which = cycle[k % len(cycle)]
        inv = cli(command_args(shape, manifest, work, out, cache, which), emu, kill_after=delay)
        res.runs += 1
        res.kills_landed += inv.killed
        if not inv.killed and inv.code not in (0, 3, 4) and not _no_run_yet(which, inv, work):
            res.violations.append(f"interrupted-run {which} exited {inv.code}: {inv.stderr[-800:]}")

    code = _finish(shape, manifest, work, out, cache, emu, res)
    res.final_exit = code
    if code is not None:
        res.recovered = True
        if code != shape.expect_exit:
            res.violations.append(f"final exit {code}, expected {shape.expect_exit}")
        check_invariants(shape, work, out, emu, log, res)
    res.seconds = time.monotonic() - started
    return res


# ---- the invariants -------------------------------------------------------------------------------------

def check_invariants(shape: Shape, work: Path, out: Path, emu: Emulator, log: LineLog, res: Result) -> None:
    v = res.violations
    # 1. every manifest row x variant has exactly one metadata row; every ok row's image decodes
    table = pq.read_table(out / "metadata.parquet").to_pylist()
    want = expected_rows(shape)
    keys = [(r["id"], r["variant"]) for r in table]
    res.rows_checked += len(table)
    if len(set(keys)) != len(keys):
        v.append(f"duplicate metadata rows: {len(keys) - len(set(keys))}")
    if len(set(keys)) < want:
        res.rows_lost += want - len(set(keys))
        v.append(f"rows lost: {want - len(set(keys))} of {want}")
    if len(keys) > want:
        v.append(f"{len(keys)} metadata rows for {want} manifest rows x variants")
    for r in table:
        if r["status"] == "ok":
            path = out / (r["file_name"] or "<none>")
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as exc:  # noqa: BLE001
                res.rows_lost += 1
                v.append(f"row {r['id']}/{r['variant']}: image {r['file_name']} unreadable: {exc}")
        elif r["status"] == "pending":
            res.rows_lost += 1
            v.append(f"row {r['id']}/{r['variant']} still pending after a finished run")
        elif r["status"] in ("blocked", "failed") and not (r["id"].startswith("blk") or r["id"].startswith("err")):
            if not shape.emulator.get("line_error_rate"):
                v.append(f"row {r['id']} ended {r['status']} unexpectedly: {r['error']}")
    # 2. no job created twice: the emulator's count equals the jobs the ledger knows by name
    conn = sqlite3.connect(work / "ledger.sqlite")
    try:
        recorded = conn.execute("SELECT COUNT(*) FROM jobs WHERE batch_name IS NOT NULL").fetchone()[0]
        created = emu.stats()["batches_created"]
        if created != recorded:
            res.duplicate_jobs += created - recorded
            v.append(f"emulator created {created} jobs, the ledger records {recorded}")
        names = {f"batches/{b}" for b, _, _ in log.lines}
        known = {n for (n,) in conn.execute("SELECT batch_name FROM jobs WHERE batch_name IS NOT NULL")}
        if names - known:
            v.append(f"the emulator processed lines of jobs the ledger does not know: {sorted(names - known)}")
        # 3. a request is sent again only after its job ended failed/expired/cancelled or its line errored
        api_state = {n: s for n, s in conn.execute("SELECT batch_name, api_state FROM jobs WHERE batch_name IS NOT NULL")}
        line_ok: dict[tuple[str, str], bool] = {}
        ok_count: dict[str, int] = defaultdict(int)
        for b, key, ok in log.lines:
            line_ok[(f"batches/{b}", key)] = ok
            if ok and api_state.get(f"batches/{b}") == "SUCCEEDED":
                ok_count[key] += 1
        sent: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for h, job_id, batch_name in conn.execute(
                "SELECT jr.hash, j.id, j.batch_name FROM job_requests jr JOIN jobs j ON j.id = jr.job_id "
                "WHERE j.batch_name IS NOT NULL ORDER BY j.id"):
            sent[h].append((job_id, batch_name))
        for h, jobs in sent.items():
            for job_id, batch_name in jobs[:-1]:
                ended_badly = api_state.get(batch_name) in ("FAILED", "EXPIRED", "CANCELLED")
                line_error = line_ok.get((batch_name, h)) is False
                if not (ended_badly or line_error):
                    v.append(f"request {h[:12]} sent again after job {batch_name} ({api_state.get(batch_name)}) "
                             f"where its line did not fail")
        paid_twice = {h: n for h, n in ok_count.items() if n > 1}
        if paid_twice:
            v.append(f"{len(paid_twice)} request(s) generated successfully more than once: {list(paid_twice)[:3]}")
        # requests left in flight
        stuck = conn.execute("SELECT COUNT(*) FROM requests WHERE state IN ('planned','queued')").fetchone()[0]
        if stuck:
            v.append(f"{stuck} requests still planned/queued")
        # 4. the ledger is intact
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            v.append(f"integrity_check: {check}")
    finally:
        conn.close()
    # 5. no temp files left in the dataset
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*")
                 if p.name.startswith(".tmp-") or p.name == ".metadata.parquet.tmp" or p.name.endswith(".tmp")]
    if leftovers:
        v.append(f"temp files left in the dataset: {leftovers[:5]}")


def random_delays(rng: random.Random, shape: Shape, n: int, within: float = 1.0) -> list[float]:
    """n kill delays spread over the first `within` of a typical run: startup, planning, upload, polling, collecting,
    the dataset."""
    return [round(rng.uniform(0.05, shape.typical_s * within), 3) for _ in range(n)]


def format_table(results: list[Result]) -> str:
    buf = io.StringIO()
    buf.write(f"{'shape':<17} {'kind':<16} {'seed':>6} {'kills':>5} {'landed':>6} {'runs':>4} {'rows':>5} "
              f"{'lost':>4} {'dupjobs':>7} {'exit':>4} {'secs':>5}  result\n")
    for r in results:
        buf.write(f"{r.shape:<17} {r.kind:<16} {r.seed:>6} {r.kills_tried:>5} {r.kills_landed:>6} {r.runs:>4} "
                  f"{r.rows_checked:>5} {r.rows_lost:>4} {r.duplicate_jobs:>7} {str(r.final_exit):>4} {r.seconds:>5.1f}  "
                  f"{'ok' if r.ok else 'FAIL: ' + '; '.join(r.violations)[:300]}\n")
    return buf.getvalue()
