"""Ledger growth over many nights, with and without `batcher prune --keep-runs K` (issue 17).

    make bench-ledger                                          # 100 nights of 1M rows (slow; see docs/benchmarks.md)
    .venv/bin/python -m bench.ledger_growth --nights 100 --rows 100000 --known-max 200000

Two workdirs live through the same nights: one is pruned after every night (the real `batcher.prune`: one
transaction, then VACUUM), the other never. Each night is a new version of one manifest: the same rows, 1 in 100
asking for something new (so 1 % new requests), all generated and collected by the morning.

What is real and what is simulated, honestly: the first night and the last night are planned by batcher's real
planner (`plan_manifest` on a Parquet manifest; the last night's plan is the measured one, with which path it took:
PlanResult.ledger_lookup). The nights in between ("filler") are written with bulk SQL, as a plan followed by a
collect would leave them (a run, its rows, the night's new requests done, one collected job holding them): planning
100 manifests of 1M rows would take hours. Pruning always runs the real code. `--known-max` scales the planner's
in-memory bound (PlanTuning.known_max_requests: 4,000,000 since issue 19; 2,000,000 when measured) for a smaller run, so the slow path still shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

from bench.run import OUT, prompt_for, write_manifest_parquet

NEW_EVERY = 100  # 1 row in 100 asks for something new each night


def new_hash(night: int, seq: int) -> str:
    return hashlib.sha256(f"night {night} row {seq}".encode()).hexdigest()


def first_night(workdir: Path, manifest: Path, known_max: int) -> tuple[float, str]:
    """Night 1, planned by the real planner into an empty workdir, then done (generated and collected)."""
    from batcher.ledger import Ledger
    from batcher.ledger.plans import PlanTuning
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import plan_manifest

    ledger = Ledger(workdir)
    t0 = time.perf_counter()
    p = plan_manifest(ledger, None, manifest, ManifestOptions(), tuning=PlanTuning(known_max_requests=known_max))
    took = time.perf_counter() - t0
    ledger.close()
    con = sqlite3.connect(workdir / "ledger.sqlite")
    with con:
        con.execute("UPDATE requests SET state='succeeded', attempts=1, cost_usd=0.0195 WHERE state='planned'")
    con.close()
    return took, p.ledger_lookup


def filler_night(workdir: Path, night: int, rows: int) -> None:
    """A night as a plan and a collect leave it, in bulk SQL: a run of the manifest's rows (those of night 1, 1 in
    100 with tonight's request), tonight's new requests done, and the collected job that made them."""
    con = sqlite3.connect(workdir / "ledger.sqlite", isolation_level=None)
    con.execute("PRAGMA cache_size=-262144")
    now = time.time()
    con.execute("BEGIN IMMEDIATE")
    base = con.execute("SELECT MIN(id) FROM runs").fetchone()[0]
    template = con.execute("SELECT body_json, model FROM requests LIMIT 1").fetchone()
    run = con.execute("INSERT INTO runs(fingerprint, manifest, options_json, extra_schema, row_count, request_count, "
                      "created_at) SELECT ?, manifest, options_json, extra_schema, row_count, request_count, ? FROM runs "
                      "WHERE id=?", (f"night-{night}", now, base)).lastrowid
    con.execute(f"INSERT INTO rows SELECT ?, seq, row, id, variant, request_hash, prompt, extra_json FROM rows "
                f"WHERE run_id=? AND seq % {NEW_EVERY} <> 0", (run, base))
    new = [(run, seq, seq, f"r{seq:07d}", 0, new_hash(night, seq), f"{prompt_for(seq)}, night {night}", None)
           for seq in range(0, rows, NEW_EVERY)]
    con.executemany("INSERT INTO rows VALUES (?,?,?,?,?,?,?,?)", new)
    job = con.execute("INSERT INTO jobs(display_name, model, state, request_count, created_at, updated_at) "
                      "VALUES (?,?,?,?,?,?)", (f"bench-night-{night}", template[1], "collected", len(new), now, now)).lastrowid
    con.executemany("INSERT INTO requests(hash, model, body_json, state, attempts, job_id, cost_usd, updated_at) "
                    "VALUES (?,?,?,'succeeded',1,?,0.0195,?)",
                    [(r[5], template[1], template[0].replace("variation", f"night {night} variation"), job, now) for r in new])
    con.execute("INSERT INTO job_requests(job_id, hash) SELECT job_id, hash FROM requests WHERE job_id=?", (job,))
    con.execute("COMMIT")
    con.close()


def tonights_manifest(base: Path, path: Path, night: int) -> None:
    """The last night's manifest: night 1's rows, 1 in 100 with tonight's new prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(base)
    prompts = table.column("prompt").to_pylist()
    for i in range(0, len(prompts), NEW_EVERY):
        prompts[i] += f", night {night}"
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string())), path)


def measured_night(workdir: Path, manifest: Path, known_max: int) -> tuple[float, str, dict]:
    """Tonight's plan by the real planner (no cache: the ledger alone says what is done), timed."""
    from batcher.ledger import Ledger
    from batcher.ledger.plans import PlanTuning
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import plan_manifest

    ledger = Ledger(workdir)
    t0 = time.perf_counter()
    p = plan_manifest(ledger, None, manifest, ManifestOptions(), tuning=PlanTuning(known_max_requests=known_max))
    took = time.perf_counter() - t0
    ledger.close()
    return took, p.ledger_lookup, p.states or {}


def size_mb(workdir: Path) -> float:
    return sum(f.stat().st_size for f in workdir.glob("ledger.sqlite*")) / 1e6


def counts(workdir: Path) -> dict[str, int]:
    con = sqlite3.connect(workdir / "ledger.sqlite")
    out = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("runs", "rows", "requests")}
    con.close()
    return out


def main(argv: list[str] | None = None) -> int:
    from batcher import Settings, prune
    from batcher.ledger.plans import PlanTuning

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nights", type=int, default=100)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep-runs", type=int, default=7)
    ap.add_argument("--known-max", type=int, default=PlanTuning().known_max_requests,
                    help="the planner's in-memory bound (PlanTuning.known_max_requests; scale it with --rows)")
    ap.add_argument("--every", type=int, default=10, help="print the sizes every this many nights")
    args = ap.parse_args(argv)
    base = OUT / f"ledger-growth-{args.rows}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    manifest = OUT / f"manifest-{args.rows}.parquet"
    write_manifest_parquet(manifest, args.rows)
    pruned, grown = base / "pruned", base / "unpruned"
    print(f"ledger growth: {args.nights} nights of {args.rows:,} rows, {100 // NEW_EVERY} % new requests a night; "
          f"`prune --keep-runs {args.keep_runs}` after every night in one workdir, never in the other; "
          f"plan bound {args.known_max:,} requests", flush=True)
    print("nights 1 and last: the real planner; nights between: bulk SQL as a plan and a collect leave them "
          "(see the docstring); pruning: the real batcher.prune (one transaction, then VACUUM)", flush=True)
    took, path = first_night(pruned, manifest, args.known_max)
    print(f"night 1 planned in {took:.1f} s ({path}); copied to the unpruned workdir", flush=True)
    shutil.copytree(pruned, grown)
    print(f"{'night':>5} {'pruned MB':>10} {'rows':>11} {'requests':>10} {'prune s':>8}   "
          f"{'unpruned MB':>11} {'rows':>11} {'requests':>10}", flush=True)
    prune_times, history = [], []
    started = time.perf_counter()
    for night in range(2, args.nights):
        for wd in (pruned, grown):
            filler_night(wd, night, args.rows)
        t0 = time.perf_counter()
        prune(Settings(workdir=pruned, quiet=True), keep_runs=args.keep_runs)
        prune_times.append(time.perf_counter() - t0)
        if night % args.every == 0 or night == args.nights - 1:
            a, b = counts(pruned), counts(grown)
            row = {"night": night, "pruned_mb": round(size_mb(pruned), 1), "pruned": a,
                   "unpruned_mb": round(size_mb(grown), 1), "unpruned": b, "prune_s": round(prune_times[-1], 2)}
            history.append(row)
            print(f"{night:>5} {row['pruned_mb']:>10.1f} {a['rows']:>11,} {a['requests']:>10,} {prune_times[-1]:>8.2f}   "
                  f"{row['unpruned_mb']:>11.1f} {b['rows']:>11,} {b['requests']:>10,}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    tonight = base / "tonight.parquet"
    tonights_manifest(manifest, tonight, args.nights)
    result = {"nights": args.nights, "rows": args.rows, "keep_runs": args.keep_runs, "known_max": args.known_max,
              "history": history, "prune_s_median": round(sorted(prune_times)[len(prune_times) // 2], 2) if prune_times else None}
    for name, wd in (("pruned", pruned), ("unpruned", grown)):
        took, path, states = measured_night(wd, tonight, args.known_max)
        result[f"{name}_plan_s"], result[f"{name}_plan_path"] = round(took, 2), path
        print(f"night {args.nights} ({name}): real plan in {took:.2f} s, "
              f"{'fast path (ledger read into memory)' if path == 'memory' else 'SLOW path (SQL a batch at a time)' if path == 'sql' else path}"
              f"; ledger {size_mb(wd):.1f} MB, {counts(wd)['requests']:,} requests; tonight: {states}", flush=True)
    if prune_times:
        print(f"prune after each night: median {result['prune_s_median']:.2f} s, max {max(prune_times):.2f} s "
              "(timings are noisy: a shared 2-core machine)")
    (base / "results.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(pruned, ignore_errors=True)
    shutil.rmtree(grown, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
