"""Write time and peak RSS of `batcher export` in each dataset format (files, webdataset, parquet), from one
finished run of N small images (default 20,000 PNGs of 64x64 noise, ~12 KB each), and of writing it again.

    .venv/bin/python -m bench.formats [--images 20000] [--shard-size 100MB]

Each export runs as its own process under /usr/bin/time (peak RSS from the OS). Data is built under
bench/out/formats/ (git-ignored)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIME = shutil.which("time") or "/usr/bin/time"


def build_run(base: Path, n: int) -> None:
    """A workdir whose run of `n` rows is done, and a cache holding each row's image."""
    import random
    import zlib

    from batcher.ledger import Ledger
    from batcher.manifest import ManifestOptions
    from batcher.planning.planner import plan_manifest
    from batcher.storage.store import ImageStore

    (base / "m.csv").write_text("id,prompt\n" + "".join(f"i{i},picture number {i}\n" for i in range(n)))
    store, ledger = ImageStore(base / "cache"), Ledger(base / "work")
    plan_manifest(ledger, store, base / "m.csv", ManifestOptions())
    hashes = [h for (h,) in ledger.conn.execute("SELECT hash FROM requests")]
    with ledger.transaction() as c:
        c.execute("UPDATE requests SET state='succeeded', attempts=1, cost_usd=0.039")
    rng = random.Random(0)
    for h in hashes:  # a 64x64 grey PNG of noise (incompressible: ~12 KB), straight into the cache's layout
        raw = b"".join(b"\0" + rng.randbytes(64 * 3) for _ in range(64))
        png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", (64).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0") \
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
        (base / "cache" / h[:2]).mkdir(parents=True, exist_ok=True)
        (base / "cache" / h[:2] / f"{h}.png").write_bytes(png)
    ledger.close()


def _chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def export(base: Path, fmt: str, out: Path, shard_size: str) -> tuple[float, int, str]:
    argv = [TIME, "-f", "%e %M", sys.executable, "-m", "batcher.cli", "export", "--workdir", str(base / "work"),
            "--cache-dir", str(base / "cache"), "--out", str(out), "--dataset-format", fmt, "--shard-size", shard_size, "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.monotonic() - started
    rss_kb = int(proc.stderr.strip().splitlines()[-1].split()[1])
    if proc.returncode != 0:
        raise SystemExit(f"{fmt}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return wall, rss_kb, proc.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--shard-size", default="100MB")
    args = ap.parse_args()
    base = ROOT / "bench" / "out" / "formats"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    t = time.monotonic()
    build_run(base, args.images)
    print(f"built {args.images:,} images in {time.monotonic() - t:.1f} s")
    print(f"{'format':<11} {'first write':>12} {'peak RSS':>10} {'again':>8} {'peak RSS':>10}  size")
    for fmt in ("files", "webdataset", "parquet"):
        out = base / f"out-{fmt}"
        first = export(base, fmt, out, args.shard_size)
        again = export(base, fmt, out, args.shard_size)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{fmt:<11} {first[0]:>10.2f} s {first[1] / 1024:>7.0f} MB {again[0]:>6.2f} s {again[1] / 1024:>7.0f} MB"
              f"  {size / 1e6:,.0f} MB  ({first[2].split('; ')[-1]})")


if __name__ == "__main__":
    main()
