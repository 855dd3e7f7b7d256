"""The long crash-consistency campaign (`make reliability` = `python -m tests.crash_campaign`).

Every stage point x several run shapes, plus random-moment SIGKILLs across all shapes; after each scenario
the run is completed and the invariants checked (tests/crash_support.py, docs/reliability.md). Seeded:
the seed is printed, and `--seed N` replays the same kill points, delays and emulator faults (timing-based
kills land at the same delays; where exactly in the code they land varies with machine speed).

    python -m tests.crash_campaign [--seed N] [--random-kills 80] [--jobs 2] [--figures out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests import crash_support as cs

STAGE_SHAPES = ["small", "multi-job", "blocked", "line-errors", "job-outcomes", "submit-collect"]
KILLS_PER_RANDOM_SCENARIO = 2


def calibrate(base: Path) -> dict[str, float]:
    """Time one uninterrupted run of each shape, so random kill moments fall inside real runs (fixed guesses
    went stale when batcher got faster: most random kills then came after the run had ended)."""
    emu, log = cs.start_emulator()
    durations = {}
    try:
        for name, shape in cs.SHAPES.items():
            d = base / f"calibrate-{name}"
            d.mkdir(parents=True)
            cs.reset_emulator(emu, log, shape, 0)
            manifest = cs.write_manifest(d / "m.csv", shape)
            inv = cs.cli(cs.command_args(shape, manifest, d / "w", d / "o", d / "c"), emu)
            durations[name] = inv.seconds
    finally:
        emu.stop()
    return durations


def plan(seed: int, random_kills: int, stage_shapes: list[str]) -> list[dict]:
    rng = random.Random(seed)
    scenarios = []
    for shape in stage_shapes:
        for point in cs.STAGE_POINTS:
            scenarios.append(dict(shape=shape, crash_at=point, kill_delays=None, seed=rng.randrange(1 << 16)))
    names = list(cs.SHAPES)
    made = 0
    i = 0
    while made < random_kills:
        shape = names[i % len(names)]
        n = min(KILLS_PER_RANDOM_SCENARIO + (i % 2), random_kills - made)  # 2 or 3 kills, the last one fewer
        scenarios.append(dict(shape=shape, crash_at=None, kill_delays=cs.random_delays(rng, cs.SHAPES[shape], n),
                              seed=rng.randrange(1 << 16)))
        made += n
        i += 1
    return scenarios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--random-kills", type=int, default=80)  # kills after the first of a scenario may miss: >= 50 land
    ap.add_argument("--stage-shapes", default=",".join(STAGE_SHAPES))
    ap.add_argument("--jobs", type=int, default=2, help="scenarios at once (each with its own emulator)")
    ap.add_argument("--figures", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the scenario directories")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"crash campaign seed {seed} (replay: python -m tests.crash_campaign --seed {seed})", flush=True)
    base = Path(tempfile.mkdtemp(prefix="batcher-crash-"))
    if args.random_kills:
        durations = calibrate(base)
        print("calibrated run times: " + ", ".join(f"{k} {v:.1f}s" for k, v in durations.items()), flush=True)
        for name, seconds in durations.items():
            cs.SHAPES[name] = dataclasses.replace(cs.SHAPES[name], typical_s=max(0.5, seconds))
    scenarios = plan(seed, args.random_kills, [s for s in args.stage_shapes.split(",") if s])
    local = threading.local()
    emulators = []
    lock = threading.Lock()
    results: list[cs.Result] = [None] * len(scenarios)  # type: ignore[list-item]
    started = time.monotonic()

    def work(index: int) -> None:
        if not hasattr(local, "emu"):
            local.emu, local.log = cs.start_emulator()
            with lock:
                emulators.append(local.emu)
        sc = scenarios[index]
        res = cs.run_scenario(local.emu, local.log, cs.SHAPES[sc["shape"]], base / f"s{index:03d}",
                              crash_at=sc["crash_at"], kill_delays=sc["kill_delays"], seed=sc["seed"])
        results[index] = res
        with lock:
            done = sum(r is not None for r in results)
            print(f"[{done:3d}/{len(scenarios)}] {cs.format_table([res]).splitlines()[1]}", flush=True)

    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(work, range(len(scenarios))))
    finally:
        for emu in emulators:
            emu.stop()
    elapsed = time.monotonic() - started

    print()
    print(cs.format_table(results))
    stage = [r for r in results if r.kind != "random"]
    rand = [r for r in results if r.kind == "random"]
    figures = {
        "seed": seed,
        "scenarios": len(results),
        "stage_point_scenarios": len(stage),
        "random_scenarios": len(rand),
        "kills_tried": sum(r.kills_tried for r in results),
        "kills_landed": sum(r.kills_landed for r in results),
        "stage_kills_landed": sum(r.kills_landed for r in stage),
        "random_kills_tried": sum(r.kills_tried for r in rand),
        "random_kills_landed": sum(r.kills_landed for r in rand),
        "recoveries": sum(r.recovered for r in results),
        "cli_invocations": sum(r.runs for r in results),
        "rows_checked": sum(r.rows_checked for r in results),
        "rows_lost": sum(r.rows_lost for r in results),
        "duplicate_jobs": sum(r.duplicate_jobs for r in results),
        "invariant_violations": sum(len(r.violations) for r in results),
        "failed_scenarios": [dict(shape=r.shape, kind=r.kind, seed=r.seed, violations=r.violations)
                             for r in results if not r.ok],
        "seconds": round(elapsed, 1),
    }
    print("figures:")
    for k, v in figures.items():
        if k != "failed_scenarios":
            print(f"  {k:<22} {v}")
    figures_path = args.figures or base / "figures.json"
    figures_path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {figures_path}")
    if not args.keep and not figures["failed_scenarios"]:
        import shutil

        shutil.rmtree(base / "s000", ignore_errors=True)
        for p in base.glob("s[0-9]*"):
            shutil.rmtree(p, ignore_errors=True)
    elif figures["failed_scenarios"]:
        print(f"scenario directories kept in {base}")
    return 0 if not figures["failed_scenarios"] else 1


if __name__ == "__main__":
    sys.exit(main())
