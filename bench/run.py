"""Performance figures for batcher, measured side by side in one run against the emulator.

    make bench                          # default sizes (~300 MB and ~1 GB results, 1M-row plan, 1 GB upload)
    .venv/bin/python -m bench.run --quick   # small smoke sizes (a minute or two)
    .venv/bin/python -m bench.run --full    # adds a ~2 GB results file

Every measured thing runs as its own subprocess under `/usr/bin/time` (peak RSS from the OS, `%M`); the
emulator runs in another process so its memory is never counted. Data is built deterministically under
bench/out/ (git-ignored). Prints a table and writes bench/out/results.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import binascii
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PY = sys.executable
BATCHER = [PY, "-m", "batcher.cli"]
# batcher, printing its own peak RSS (VmHWM) at exit: /usr/bin/time reports the largest peak among a process and the
# children it waited for (wait4), so for a command with helper processes it cannot tell the command's own peak.
BATCHER_OWN_RSS = [PY, "-c", "import atexit, sys; from batcher.children import peak_rss_kb; "
                   "atexit.register(lambda: print(f'bench: own peak RSS {peak_rss_kb()} kB', file=sys.stderr)); "
                   "sys.argv[0] = 'batcher'; from batcher.cli import entry_point; entry_point()"]
TIME = shutil.which("time") or "/usr/bin/time"
IMAGE_BYTES = 1_500_000
# A nightly team of this size is on usage tier 3 (enqueued-token caps of 750M+ tokens per model): one job per
# workdir, as the figures before gemini-3.1-flash-image (1M tokens at tier 1) were measured.
TIER = "3"
API_KEY = "x"

SUBJECTS = ["a red fox", "a lighthouse", "a bowl of ramen", "a vintage bicycle", "an astronaut", "a glass teapot",
            "a mountain village", "a tabby cat", "a sailing ship", "a desert cactus", "a neon street", "a paper crane"]
STYLES = ["watercolor", "studio photo", "isometric 3D render", "oil painting", "pencil sketch", "pixel art",
          "35mm film still", "ukiyo-e print", "flat vector illustration"]
SETTINGS_ = ["at dawn", "in heavy rain", "under studio lights", "on a white background", "at golden hour",
             "in the snow", "at night", "in fog"]
CATEGORIES = ["animals", "architecture", "food", "vehicles", "people", "objects", "landscape"]


def prompt_for(i: int) -> str:
    return (f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[(i // 7) % len(STYLES)]}, {SETTINGS_[(i // 11) % len(SETTINGS_)]}"
            f", variation {i}")


# ---- measurement harness ------------------------------------------------------------------------------

def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None, check: bool = True,
             helpers_rss=None) -> dict:
    """Run argv under /usr/bin/time; return wall seconds, peak RSS (MB) and CPU seconds. `/usr/bin/time` sees
    one process: for a command with helper processes, `helpers_rss(stderr)` returns their peaks (MB, from the
    command's log) and `peak_rss_mb` is the sum of every process's peak (`main_peak_rss_mb` is the command's
    own). `cpu_s`: user + system time of the command and every process it waited for (its decoder or
    row-preparing children), from getrusage(RUSAGE_CHILDREN) before and after (the emulator, never waited for
    while a measurement runs, is not in it)."""
    fd, tfile = tempfile.mkstemp(prefix="bench-time-")
    os.close(fd)
    full_env = dict(os.environ)
    full_env.update(env or {})
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    p = subprocess.run([TIME, "-f", "%M %e", "-o", tfile, *argv], env=full_env, cwd=cwd,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    rss_kb, _ = Path(tfile).read_text().strip().splitlines()[-1].split()
    os.unlink(tfile)
    res = {"name": name, "wall_s": round(wall, 3), "peak_rss_mb": round(int(rss_kb) / 1024, 1), "cpu_s": round(cpu, 2),
           "rc": p.returncode}
    if check and p.returncode not in (0, 3, 4):
        raise RuntimeError(f"{name} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    res["stdout_tail"] = p.stdout.strip()[-300:]
    note = ""
    if helpers_rss is not None:
        helpers = helpers_rss(p.stderr)
        own = re.findall(r"bench: own peak RSS ([0-9]+) kB", p.stderr)  # BATCHER_OWN_RSS; else time's figure
        res["main_peak_rss_mb"] = round(int(own[-1]) / 1024, 1) if own else res["peak_rss_mb"]
        res["helpers_peak_rss_mb"] = helpers
        res["peak_rss_mb"] = round(res["main_peak_rss_mb"] + sum(helpers), 1)
        note = f"  (sum: main {res['main_peak_rss_mb']:.0f} + helpers {' + '.join(f'{h:.0f}' for h in helpers) or 'none'})"
    print(f"  {name:<44} {res['wall_s']:9.2f} s  {res['peak_rss_mb']:8.1f} MB  cpu {res['cpu_s']:6.2f} s  rc={p.returncode}{note}",
          flush=True)
    return res


class EmulatorProc:
    def __init__(self, image_bytes: int = IMAGE_BYTES):
        self.data_dir = tempfile.mkdtemp(prefix="bench-emu-", dir=OUT)
        self.p = subprocess.Popen(
            [PY, "-m", "batcher.emulator", "--port", "0", "--image-bytes", str(image_bytes), "--pending-seconds", "0",
             "--running-seconds", "0.1", "--data-dir", self.data_dir, "--tier", TIER,
             "--config-json", '{"spend_limits": false}'],  # the bench measures speed, not the account's money limits
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.p.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError("emulator did not start")

    def env(self) -> dict:
        return {"GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": self.url, "GOOGLE_API_KEY": ""}

    def get_json(self, path: str) -> dict:
        u = urllib.parse.urlsplit(self.url)
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        c.request("GET", path, headers={"x-goog-api-key": API_KEY})
        r = c.getresponse()
        body = r.read()
        c.close()
        return json.loads(body)

    def close(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# ---- workers (run as subprocesses: python -m bench.run --worker NAME ...) ---------------------------------

def worker_floor(url: str, file_name: str, decode: str) -> None:
    """Floor: stream the results file over loopback; with decode=1 parse each line (json) and a2b_base64 it
    (strict), with decode=2 the same with pybase64 (strict: validate=True), the decoder batcher uses."""
    import pybase64

    b64decode = ((lambda s: binascii.a2b_base64(s, strict_mode=True)) if decode == "1"
                 else (lambda s: pybase64.b64decode(s, validate=True)))
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    c.request("GET", f"/v1beta/{file_name}:download?alt=media", headers={"x-goog-api-key": API_KEY})
    r = c.getresponse()
    assert r.status == 200, r.status
    n = images = 0
    if decode != "0":
        for line in r:  # HTTPResponse is a buffered reader: one line at a time
            n += len(line)
            if not line.strip():
                continue
            obj = json.loads(line)
            for p in obj["response"]["candidates"][0]["content"]["parts"]:
                if "inlineData" in p:
                    b64decode(p["inlineData"]["data"])
                    images += 1
    else:
        with open(os.devnull, "wb") as devnull:
            while chunk := r.read(1 << 20):
                devnull.write(chunk)
                n += len(chunk)
    print(json.dumps({"bytes": n, "images": images}))


def worker_naive(url: str, file_name: str, out_dir: str) -> None:
    """The script users write: SDK download to bytes, splitlines, json.loads, b64decode, write each image."""
    import base64

    from google import genai
    from google.genai import types

    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=url + "/", api_version="v1beta"))
    data = client.files.download(file=file_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        for p in obj["response"]["candidates"][0]["content"]["parts"]:
            if "inlineData" in p:
                (out / f"{obj['key']}.png").write_bytes(base64.b64decode(p["inlineData"]["data"]))
                images += 1
    print(json.dumps({"bytes": len(data), "images": images}))


def worker_upload_batcher(url: str, path: str) -> None:
    """upload_s: the upload_jsonl call (resumable start + 8 MiB chunks through the SDK), after imports and client
    set-up, which a run pays once per process, not per file (setup_s)."""
    t0 = time.perf_counter()
    from batcher.backends.gemini import Connection, GeminiBackend

    backend = GeminiBackend(Connection(api_key=API_KEY, base_url=url))
    backend.client  # the SDK is imported and its client made on first use (~0.45 s): set-up, paid once per process
    t1 = time.perf_counter()
    f = backend.upload_jsonl(Path(path), "bench")
    t2 = time.perf_counter()
    print(json.dumps({"name": f.name, "size": f.size_bytes, "setup_s": round(t1 - t0, 3), "upload_s": round(t2 - t1, 3)}))


def worker_upload_plain(url: str, path: str, chunk: str = "0") -> None:
    """Plain streaming HTTP: one resumable start, then one 'upload, finalize' POST with the file as the body
    (chunk=0), or sequential POSTs of `chunk` bytes each on one keep-alive connection (the SDK's protocol).
    upload_s: from the start request to the final response, as for the batcher worker."""
    u = urllib.parse.urlsplit(url)
    size = os.path.getsize(path)
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    c.request("POST", "/upload/v1beta/files", body=json.dumps({"file": {"displayName": "bench-plain"}}),
              headers={"x-goog-api-key": API_KEY, "Content-Type": "application/json",
                       "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                       "X-Goog-Upload-Header-Content-Length": str(size),
                       "X-Goog-Upload-Header-Content-Type": "application/jsonl"})
    r = c.getresponse()
    r.read()
    upload = urllib.parse.urlsplit(r.getheader("X-Goog-Upload-URL"))
    c.close()
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300, blocksize=1 << 20)
    step = int(chunk) or size
    with open(path, "rb") as body:
        offset = 0
        while offset < size:
            n = min(step, size - offset)
            last = offset + n >= size
            data = body if step == size else body.read(n)
            c.request("POST", f"{upload.path}?{upload.query}", body=data,
                      headers={"x-goog-api-key": API_KEY, "Content-Length": str(n), "X-Goog-Upload-Offset": str(offset),
                               "X-Goog-Upload-Command": "upload, finalize" if last else "upload"})
            r = c.getresponse()
            payload = r.read()
            offset += n
    upload_s = time.perf_counter() - t0
    f = json.loads(payload)["file"]
    print(json.dumps({"name": f["name"], "size": f.get("sizeBytes"), "upload_s": round(upload_s, 3)}))


def worker_ledger_floor(workdir: str, rows: str) -> None:
    """The ledger's share of a dry run of `rows` rows: batcher's own plan_manifest (bulk load into an empty
    ledger, sharding as it loads, index builds, commit) fed with prepared batches made up front (synthetic
    prompts, real hashes and bodies), so no manifest is read, validated or hashed while it is timed. What is
    left of a dry run without preparing rows (and without writing JSONL)."""
    import hashlib

    from batcher import catalog
    from batcher.ledger.plans import PlanTuning
    from batcher.planning import planner
    from batcher.ledger import Ledger
    from batcher.manifest import ManifestOptions
    from batcher.planning.packing import ShardLimits
    from batcher.planning import prepare
    from batcher.planning.prepare import PreparedBatch

    n = int(rows)
    made = []
    batch_rows = PlanTuning().plan_batch_rows
    for start in range(0, n, batch_rows):
        idx = range(start, min(n, start + batch_rows))
        prompts = [prompt_for(i) for i in idx]
        made.append(PreparedBatch(
            rows=[i + 1 for i in idx], ids=[f"r{i:07d}" for i in idx], prompts=prompts,
            extras=['{"category": "x"}'] * len(idx), references=[()] * len(idx), variants=[1] * len(idx),
            owners=list(range(len(idx))), models=[catalog.DEFAULT_MODEL] * len(idx), request_variants=[0] * len(idx),
            hashes=[hashlib.sha256(p.encode()).hexdigest() for p in prompts],
            bodies=['{"contents":[{"parts":[{"text":' + json.dumps(p, ensure_ascii=False) + '}],"role":"user"}],'
                    '"generationConfig":{"responseModalities":["IMAGE"]}}' for p in prompts],
            sizes=[None] * len(idx)))
    prepare.batches = lambda *args, **kw: (b for b in made)  # an iterator with close(), as batches() returns
    tiny = Path(workdir).parent / "floor-manifest.csv"  # for the run's fingerprint and schema only
    tiny.write_text("id,prompt,category\nr0000000,x,x\n")
    t0 = time.perf_counter()
    result = planner.plan_manifest(Ledger(workdir), None, tiny, ManifestOptions(), shard_limits=ShardLimits())
    t1 = time.perf_counter()
    print(json.dumps({"plan_and_shard_s": round(t1 - t0, 2), "jobs": len(result.jobs), "requests": result.requests}))


WORKERS = {"floor": worker_floor, "naive": worker_naive, "upload_batcher": worker_upload_batcher,
           "upload_plain": worker_upload_plain, "ledger_floor": worker_ledger_floor}


def worker(name: str, *args: str) -> list[str]:
    return [PY, "-m", "bench.run", "--worker", name, *args]


# ---- 1 + 2: collect -------------------------------------------------------------------------------------

def wait_succeeded(workdir: Path, env: dict, timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        p = subprocess.run([*BATCHER, "status", "--workdir", str(workdir), "--json"], env={**os.environ, **env},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            jobs = json.loads(p.stdout)["jobs"]
        except ValueError:  # status can fail while the emulator is busy generating; ask again
            print(f"  (status rc={p.returncode}: {p.stderr.strip()[-200:]}; retrying)", flush=True)
            if time.time() > deadline:
                raise RuntimeError("status kept failing") from None
            time.sleep(2.0)
            continue
        if jobs and all(j["api_state"] == "SUCCEEDED" for j in jobs):
            return jobs
        if any(j["api_state"] in ("FAILED", "CANCELLED", "EXPIRED") for j in jobs):
            raise RuntimeError(f"job ended badly: {jobs}")
        if time.time() > deadline:
            raise RuntimeError(f"jobs not SUCCEEDED after {timeout}s: {[j['api_state'] for j in jobs]}")
        time.sleep(1.0)


def decoders_rss(stderr: str) -> list[float]:
    """The peaks of collect's decoder processes (MB), from its log (`-v`): one line per job collected, its
    decoders' peaks as the OS counted them (wait4). Jobs are collected one after another, so the largest sum."""
    sums = [[float(x) for x in m.group(1).split(" + ")]
            for m in re.finditer(r"decoder processes, peak RSS ([0-9.]+(?: \+ [0-9.]+)*) MB", stderr)]
    return max(sums, key=sum, default=[])


def write_prompts_csv(path: Path, n: int) -> Path:
    """The collect benches' manifest: `n` distinct prompts, with a category column carried through."""
    with open(path, "w") as f:
        f.write("id,prompt,category\n")
        for i in range(n):
            f.write(f"img{i:06d},\"{prompt_for(i)}\",{CATEGORIES[i % len(CATEGORIES)]}\n")
    return path


def bench_collect(n: int, base: Path, repeats: int = 3) -> dict:
    """`repeats` workdirs submit the same prompts (one job each, so the emulator makes `repeats` identical
    results files); then, `repeats` times, the floors, the naive script and `batcher collect` of one of them run
    one after another, so load from other processes falls on all alike. Each figure is the median run; the
    ratios are the medians' ratios, with their range over runs made next to each other."""
    print(f"\n[collect] {n} images x ~{IMAGE_BYTES / 1e6:.1f} MB PNG, {repeats} interleaved repeats", flush=True)
    d = base / f"collect-{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    manifest = write_prompts_csv(d / "prompts.csv", n)
    emu = EmulatorProc()
    runs: dict[str, list[dict]] = {"transfer_floor": [], "floor": [], "fast_floor": [], "naive": [], "collect": []}
    try:
        env = emu.env()
        common = [[f"--workdir={d / f'wd{i}'}", f"--cache-dir={d / f'cache{i}'}"] for i in range(repeats)]
        subs = [measured(f"batcher submit #{i + 1}", [*BATCHER, "submit", str(manifest), *common[i], "--quiet", "--tier", TIER,
                                                      "--max-requests-per-job", str(max(n, 1000))], env)
                for i in range(repeats)]
        t0 = time.time()
        files = []
        for i in range(repeats):
            jobs = wait_succeeded(d / f"wd{i}", env, timeout=max(120, n * 2) * repeats)
            assert len(jobs) == 1, jobs
            op = emu.get_json(f"/v1beta/{jobs[0]['name']}")
            files.append(op["metadata"]["output"]["responsesFile"])
        gen_s = time.time() - t0
        size = int(emu.get_json(f"/v1beta/{files[0]}").get("sizeBytes"))
        print(f"  {repeats} results files of {size / 1e6:.1f} MB (the emulator made them in ~{gen_s:.1f} s)", flush=True)
        for i, file_name in enumerate(files):
            tag = f" #{i + 1}"
            runs["transfer_floor"].append(measured("floor: transfer only (GET -> /dev/null)" + tag,
                                                   worker("floor", emu.url, file_name, "0")))
            runs["floor"].append(measured("floor: GET + json + a2b_base64" + tag, worker("floor", emu.url, file_name, "1")))
            runs["fast_floor"].append(measured("floor: GET + json + pybase64" + tag, worker("floor", emu.url, file_name, "2")))
            runs["naive"].append(measured("naive: SDK download + b64decode + write" + tag,
                                          worker("naive", emu.url, file_name, str(d / "naive"))))
            shutil.rmtree(d / "naive", ignore_errors=True)
            # -v: collect logs its decoder processes' peak RSS (summed with its own; /usr/bin/time sees one process)
            runs["collect"].append(measured("batcher collect" + tag, [*BATCHER_OWN_RSS, "collect", *common[i], "-v",
                                                                      "--out", str(d / f"dataset{i}")], env,
                                            helpers_rss=decoders_rss))
            images = sum(1 for _ in (d / f"cache{i}").rglob("*.png"))
            if images != n:
                raise RuntimeError(f"batcher collect cached {images} images, expected {n}")
            shutil.rmtree(d / f"cache{i}", ignore_errors=True)
            shutil.rmtree(d / f"dataset{i}", ignore_errors=True)
    finally:
        emu.close()
    shutil.rmtree(d, ignore_errors=True)
    mb = size / 1e6
    out: dict = {"images": n, "results_mb": round(mb, 1), "repeats": repeats, "submit": subs[0], "runs": runs}
    for key, rs in runs.items():
        out[key] = sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]
        out[f"{key}_wall_range"] = [min(r["wall_s"] for r in rs), max(r["wall_s"] for r in rs)]
        out[f"{key}_peak_rss_range"] = [min(r["peak_rss_mb"] for r in rs), max(r["peak_rss_mb"] for r in rs)]
    col, floor, naive, transfer = out["collect"], out["floor"], out["naive"], out["transfer_floor"]
    fast = out["fast_floor"]
    over_floor = sorted(c["wall_s"] / f["wall_s"] for c, f in zip(runs["collect"], runs["floor"]))
    over_fast = sorted(c["wall_s"] / f["wall_s"] for c, f in zip(runs["collect"], runs["fast_floor"]))
    gb = size / 1e9
    over_naive = sorted(nv["wall_s"] / c["wall_s"] for c, nv in zip(runs["collect"], runs["naive"]))
    out.update({
        "collect_mb_per_s": round(mb / col["wall_s"], 1), "floor_mb_per_s": round(mb / floor["wall_s"], 1),
        "collect_over_floor": round(col["wall_s"] / floor["wall_s"], 2),
        "collect_over_floor_range": [round(over_floor[0], 2), round(over_floor[-1], 2)],
        "collect_over_transfer": round(col["wall_s"] / transfer["wall_s"], 2),
        "naive_over_collect": round(naive["wall_s"] / col["wall_s"], 2),
        "naive_over_collect_range": [round(over_naive[0], 2), round(over_naive[-1], 2)],
        "fast_floor_mb_per_s": round(mb / fast["wall_s"], 1),
        "collect_over_fast_floor": round(col["wall_s"] / fast["wall_s"], 2),
        "collect_over_fast_floor_range": [round(over_fast[0], 2), round(over_fast[-1], 2)],
        "collect_images_per_s": round(n / col["wall_s"], 1),
        # CPU-seconds per GB of results: the median run's (collector + decoder processes), and the others'.
        "cpu_s_per_gb": {k: round(out[k]["cpu_s"] / gb, 2) for k in ("transfer_floor", "floor", "fast_floor", "naive", "collect")},
    })
    return out


def bench_collect_jobs(jobs: int, per_job: int, base: Path) -> dict:
    """One `batcher collect` of `jobs` finished jobs of `per_job` images each: its wall time, CPU and the peak RSS
    of its process tree (the collector, plus its decoder processes: one set serves every job of the collect)."""
    n = jobs * per_job
    print(f"\n[collect-jobs] {jobs} jobs of {per_job} images x ~{IMAGE_BYTES / 1e6:.1f} MB PNG, one collect", flush=True)
    d = base / f"collect-jobs-{jobs}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    manifest = write_prompts_csv(d / "prompts.csv", n)
    emu = EmulatorProc()
    try:
        env = emu.env()
        common = [f"--workdir={d / 'wd'}", f"--cache-dir={d / 'cache'}"]
        measured("batcher submit", [*BATCHER, "submit", str(manifest), *common, "--quiet", "--tier", TIER,
                                    "--max-requests-per-job", str(per_job)], env)
        t0 = time.time()
        got = wait_succeeded(d / "wd", env, timeout=max(300, n * 2))
        if len(got) != jobs:
            raise RuntimeError(f"submit made {len(got)} jobs, expected {jobs}")
        print(f"  {jobs} jobs succeeded (the emulator made them in ~{time.time() - t0:.1f} s)", flush=True)
        col = measured(f"batcher collect of {jobs} jobs", [*BATCHER_OWN_RSS, "collect", *common, "-v", "--out", str(d / "dataset")],
                       env, helpers_rss=decoders_rss)
        images = sum(1 for _ in (d / "cache").rglob("*.png"))
        if images != n:
            raise RuntimeError(f"batcher collect cached {images} images, expected {n}")
    finally:
        emu.close()
    shutil.rmtree(d, ignore_errors=True)
    return {"jobs": jobs, "images_per_job": per_job, "images": n, "collect": col, "images_per_s": round(n / col["wall_s"], 1)}


# ---- 3: planning ----------------------------------------------------------------------------------------

def write_manifest_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and pq.read_metadata(path).num_rows == rows:
        return
    writer = None
    step = 100_000
    for start in range(0, rows, step):
        idx = range(start, min(rows, start + step))
        table = pa.table({
            "id": pa.array([f"r{i:07d}" for i in idx], pa.string()),
            "prompt": pa.array([prompt_for(i) for i in idx], pa.string()),
            "category": pa.array([CATEGORIES[i % len(CATEGORIES)] for i in idx], pa.string()),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


TINY_PNG = None


def tiny_png() -> bytes:
    global TINY_PNG
    if TINY_PNG is None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (1, 1), (200, 10, 10)).save(buf, format="PNG")
        TINY_PNG = buf.getvalue()
    return TINY_PNG


LINKS_PER_FILE = 60_000  # below ext4's 65,000 links per inode


def populate_cache(cache: Path, hashes: list[str]) -> None:
    """What ImageStore(root).put(h, png) leaves on disk (<root>/<h[:2]>/<h>.png), without its per-file fsync.
    The files are hard links to a few copies of one tiny PNG: the planner only lists and stats the cache, and
    ten million real files would take ten million inodes (plan-growth)."""
    from batcher.storage.store import ImageStore

    png = tiny_png()
    store = ImageStore(cache)
    store.put(hashes[0], png)  # one through the real API: the layout below must be what it produces
    expected = store.find(hashes[0])
    for prefix in {h[:2] for h in hashes}:
        (cache / prefix).mkdir(parents=True, exist_ok=True)
    source = None
    for i, h in enumerate(hashes[1:]):
        path = cache / h[:2] / f"{h}.png"
        if i % LINKS_PER_FILE == 0:
            with open(path, "wb") as f:
                f.write(png)
            source = path
        else:
            os.link(source, path)
    assert store.find(hashes[1]) == cache / hashes[1][:2] / f"{hashes[1]}.png" and expected is not None


def prepare_rss(stderr: str) -> list[float]:
    """The peak RSS (MB) of the child process that prepared a large manifest's rows, from the plan's log (`-v`)."""
    return [float(m.group(1)) for m in re.finditer(r"in a child process \(peak RSS ([0-9.]+) MB\)", stderr)]


def bench_plan(rows: int, base: Path, ledger_floor: bool = True, history_nights: int = 0) -> dict:
    """A dry run of a fresh `rows`-row manifest, the same again with 99 % of its images in the cache, and tonight's
    plan (1 % new) in last night's workdir; with `history_nights`, also in a workdir that holds that many nights."""
    print(f"\n[plan] dry-run of a {rows:,}-row Parquet manifest", flush=True)
    d = base / f"plan-{rows}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    manifest = base / f"manifest-{rows}.parquet"
    t0 = time.time()
    write_manifest_parquet(manifest, rows)
    print(f"  manifest built in {time.time() - t0:.1f} s ({manifest.stat().st_size / 1e6:.1f} MB)", flush=True)
    env = {"GEMINI_API_KEY": API_KEY}
    first = measured("submit --dry-run (empty cache)", [*BATCHER_OWN_RSS, "submit", str(manifest), "--dry-run", "-v", "--tier", TIER,
                                                         "--workdir", str(d / "wd1"), "--cache-dir", str(d / "cacheA")], env,
                     helpers_rss=prepare_rss)
    floor = None
    if ledger_floor:  # it holds every prepared batch in memory: not at plan-growth's sizes
        floor = measured("ledger floor: plan_manifest on prepared rows", worker("ledger_floor", str(d / "floor"), str(rows)))
        # Its own timing of plan_manifest alone (the process also makes the batches, and starts up).
        floor["floor_s"] = json.loads(floor["stdout_tail"].splitlines()[-1])["plan_and_shard_s"]
        print(f"  {'  of which plan_manifest':<44} {floor['floor_s']:9.2f} s", flush=True)
    # The request hashes, exactly as batcher computed them, from the first run's ledger.
    con = sqlite3.connect(d / "wd1" / "ledger.sqlite")
    hashes = [h for (h,) in con.execute("SELECT request_hash FROM rows ORDER BY seq")]
    con.close()
    assert len(hashes) == rows, (len(hashes), rows)
    hit = [h for i, h in enumerate(hashes) if i % 100 != 0]  # 99 %
    del hashes
    t0 = time.time()
    populate_cache(d / "cacheB", hit)
    os.sync()  # a real cache was written nights ago: its writeback must not land on the measured re-plan
    print(f"  cache pre-populated with {len(hit):,} images in {time.time() - t0:.1f} s", flush=True)
    replan = measured("re-plan, 99% cache hits (fresh workdir)", [*BATCHER_OWN_RSS, "submit", str(manifest), "--dry-run", "-v", "--tier", TIER,
                                                                 "--workdir", str(d / "wd2"), "--cache-dir", str(d / "cacheB")], env,
                      helpers_rss=prepare_rss)
    con = sqlite3.connect(d / "wd2" / "ledger.sqlite")
    cached = con.execute("SELECT COUNT(*) FROM requests WHERE cached=1").fetchone()[0]
    # Last night, in wd2: its jobs were generated and collected (the images they made are now in the cache).
    generated = [h for (h,) in con.execute("SELECT hash FROM requests WHERE state='queued'")]
    con.execute("UPDATE requests SET state='succeeded', attempts=1 WHERE state='queued'")
    con.execute("UPDATE jobs SET state='collected'")
    con.commit()
    con.close()
    if cached != len(hit):
        raise RuntimeError(f"re-plan saw {cached} cache hits, expected {len(hit)}")
    populate_cache(d / "cacheB", generated)
    del hit, generated
    tonight = base / f"manifest-{rows}-tonight.parquet"
    write_tonights_manifest(manifest, tonight)
    if history_nights > 1:
        shutil.copytree(d / "wd2", d / "wd3")
        t0 = time.time()
        add_history(d / "wd3" / "ledger.sqlite", history_nights - 1, rows // 100)
        print(f"  {history_nights - 1} earlier nights added to a copy of last night's workdir in {time.time() - t0:.1f} s", flush=True)
    os.sync()

    def nightly_in(workdir: Path, label: str) -> dict:
        m = measured(label, [*BATCHER_OWN_RSS, "submit", str(tonight), "--dry-run", "--switch-manifest", "--tier", TIER,
                             "-v", "--workdir", str(workdir), "--cache-dir", str(d / "cacheB")], env, helpers_rss=prepare_rss)
        print(f"  {'':<44} {m['stdout_tail'].splitlines()[-1][:110]}", flush=True)
        return m

    nightly = nightly_in(d / "wd2", "tonight's plan in last night's workdir")
    out = {"rows": rows, "first": first, "first_rows_per_s": round(rows / first["wall_s"]),
           "replan": replan, "replan_rows_per_s": round(rows / replan["wall_s"]), "replan_cache_hits": cached,
           "nightly": nightly, "nightly_rows_per_s": round(rows / nightly["wall_s"])}
    if history_nights > 1:
        out["history"] = nightly_in(d / "wd3", f"tonight's plan, {history_nights} nights in the workdir")
        out["history_nights"] = history_nights
        out["history_rows_per_s"] = round(rows / out["history"]["wall_s"])
    if floor is not None:
        out.update({"ledger_floor": floor, "first_over_ledger_floor": round(first["wall_s"] / floor["floor_s"], 2)})
    shutil.rmtree(d, ignore_errors=True)
    return out


def add_history(ledger_path: Path, nights: int, new_per_night: int) -> None:
    """Earlier nights in a workdir's ledger, as `nights` nightly runs would have left them: each a run whose rows
    are the first run's (the same manifest, rows for rows), and `new_per_night` requests of its own, done. Written
    in SQL (the bench may; batcher keeps its SQL in batcher/ledger/): planning them for real would take hours."""
    import hashlib

    con = sqlite3.connect(ledger_path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(runs)") if r[1] not in ("id", "fingerprint", "created_at")]
    first_run = con.execute("SELECT MIN(id) FROM runs").fetchone()[0]
    model, body = con.execute("SELECT model, body_json FROM requests LIMIT 1").fetchone()
    for k in range(1, nights + 1):
        run_id = con.execute(f"INSERT INTO runs(fingerprint, created_at, {', '.join(cols)}) "
                             f"SELECT fingerprint || '-night-{k}', created_at - {86400 * k}, {', '.join(cols)} FROM runs WHERE id=?",
                             (first_run,)).lastrowid
        con.execute("INSERT INTO rows(run_id, seq, row, id, variant, request_hash, prompt, extra_json) "
                    "SELECT ?, seq, row, id, variant, request_hash, prompt, extra_json FROM rows WHERE run_id=?", (run_id, first_run))
        con.executemany("INSERT INTO requests(hash, model, body_json, state, attempts, cached, updated_at) "
                        "VALUES (?, ?, ?, 'succeeded', 1, 0, ?)",
                        ((hashlib.sha256(f"night {k} request {i}".encode()).hexdigest(), model, body, time.time() - 86400 * k)
                         for i in range(new_per_night)))
        con.commit()
    con.close()


def write_tonights_manifest(last_night: Path, path: Path) -> None:
    """Last night's manifest with 1 row in 100 asking for something new (the rows whose images were generated
    last night, so tonight's cache hits are last night's cache hits): 99 % of its requests are in the ledger, done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(last_night)
    prompts = table.column("prompt").to_pylist()
    for i in range(0, len(prompts), 100):
        prompts[i] += ", tonight"
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string())), path)


# ---- 4: upload ------------------------------------------------------------------------------------------

def write_jsonl(path: Path, target_bytes: int) -> int:
    if path.exists() and path.stat().st_size >= target_bytes:
        return path.stat().st_size
    lines = []
    for i in range(2000):
        body = {"contents": [{"role": "user", "parts": [{"text": prompt_for(i) + " " + "detail " * 60}]}],
                "generationConfig": {"responseModalities": ["IMAGE"]}}
        lines.append(json.dumps({"key": f"{i:064x}", "request": body}) + "\n")
    block = "".join(lines).encode()
    written = 0
    with open(path, "wb") as f:
        while written < target_bytes:
            f.write(block)
            written += len(block)
    return written


def _delete_file(emu: EmulatorProc, name: str) -> None:
    """Free the emulator's disk and storage quota between repeats (not timed)."""
    u = urllib.parse.urlsplit(emu.url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("DELETE", f"/v1beta/{name}", headers={"x-goog-api-key": API_KEY})
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 200, r.status


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["upload_s"])[len(runs) // 2]


def bench_upload(target: int, base: Path, repeats: int = 3) -> dict:
    """Three uploads of one file to one emulator, interleaved `repeats` times so load from other processes
    falls on all three alike. Throughput is bytes over the worker's own upload time (`upload_s`: start request
    to final response); `wall_s` is the whole process (interpreter, imports, the SDK client) for reference."""
    print(f"\n[upload] ~{target / 1e6:.0f} MB JSONL, {repeats} interleaved repeats", flush=True)
    path = base / f"upload-{target}.jsonl"
    size = write_jsonl(path, target)
    emu = EmulatorProc(image_bytes=20_000)
    kinds = [("plain", "plain streaming POST (http.client)", ["upload_plain"]),
             ("plain_chunked_8mb", "plain POSTs of 8 MB chunks (http.client)", ["upload_plain", str(8 << 20)]),
             ("batcher", "GeminiBackend.upload_jsonl (SDK)", ["upload_batcher"])]
    runs: dict[str, list[dict]] = {k: [] for k, _, _ in kinds}
    try:
        for i in range(repeats):
            for key, label, (name, *extra) in kinds:
                r = measured(f"{label} #{i + 1}", worker(name, emu.url, str(path), *extra))
                r.update(json.loads(r.pop("stdout_tail").splitlines()[-1]))
                assert int(r["size"]) == size, (r["size"], size)
                print(f"  {'':<44} upload {r['upload_s']:6.2f} s = {size / 1e6 / r['upload_s']:5.0f} MB/s", flush=True)
                _delete_file(emu, r["name"])
                runs[key].append(r)
    finally:
        emu.close()
    path.unlink(missing_ok=True)
    mb = size / 1e6
    out: dict = {"mb": round(mb, 1), "repeats": repeats, "runs": runs}
    for key in runs:
        rates = [mb / r["upload_s"] for r in runs[key]]
        out[key] = _median_run(runs[key])
        out[f"{key}_mb_per_s"] = round(mb / out[key]["upload_s"], 1)
        out[f"{key}_mb_per_s_range"] = [round(min(rates), 1), round(max(rates), 1)]
    # The median throughputs' ratio; its range over the repeats pairs runs made next to each other in time.
    ratios = sorted(p["upload_s"] / b["upload_s"] for p, b in zip(runs["plain"], runs["batcher"]))
    out["batcher_over_plain_throughput"] = round(out["plain"]["upload_s"] / out["batcher"]["upload_s"], 2)
    out["batcher_over_plain_range"] = [round(ratios[0], 2), round(ratios[-1], 2)]
    out["batcher_over_plain_process_wall"] = round(out["plain"]["wall_s"] / out["batcher"]["wall_s"], 2)
    # Old key names, kept for readers of results.json.
    out["plain_chunked_mb_per_s"] = out["plain_chunked_8mb_mb_per_s"]
    return out


# ---- main -----------------------------------------------------------------------------------------------

def _rss(m: dict) -> str:
    """Peak RSS: the sum over the processes, then each process's (main+helpers), if it had helpers."""
    text = f"{m['peak_rss_mb']:.0f}"
    return text + (f" ({m['main_peak_rss_mb']:.0f}+{'+'.join(f'{h:.0f}' for h in m['helpers_peak_rss_mb'])})"
                   if m.get("helpers_peak_rss_mb") else "")


def _plan_rows(p: dict, tag: str = "plan") -> list[tuple]:
    rows = []
    if "ledger_floor" in p:
        rows.append((f"{tag} {p['rows']:,} rows: ledger floor (plan_manifest on prepared rows)",
                     f"{p['ledger_floor'].get('floor_s', p['ledger_floor']['wall_s']):.2f}", "", "", "", ""))
    rows.append((f"{tag} {p['rows']:,} rows: submit --dry-run", f"{p['first']['wall_s']:.2f}", _rss(p["first"]),
                 f"{p['first'].get('cpu_s', 0):.1f}", f"{p['first_rows_per_s']:,} rows/s",
                 f"dry-run/ledger floor {p['first_over_ledger_floor']:.2f}x" if "first_over_ledger_floor" in p else ""))
    rows.append((f"{tag} {p['rows']:,} rows: re-plan 99% cached", f"{p['replan']['wall_s']:.2f}", _rss(p["replan"]),
                 f"{p['replan'].get('cpu_s', 0):.1f}", f"{p['replan_rows_per_s']:,} rows/s", ""))
    if "nightly" in p:
        rows.append((f"{tag} {p['rows']:,} rows: tonight's, in last night's workdir", f"{p['nightly']['wall_s']:.2f}",
                     _rss(p["nightly"]), f"{p['nightly'].get('cpu_s', 0):.1f}", f"{p['nightly_rows_per_s']:,} rows/s", ""))
    if "history" in p:
        rows.append((f"{tag} {p['rows']:,} rows: tonight's, {p['history_nights']} nights in the workdir", f"{p['history']['wall_s']:.2f}",
                     _rss(p["history"]), f"{p['history'].get('cpu_s', 0):.1f}", f"{p['history_rows_per_s']:,} rows/s", ""))
    return rows


def table(results: dict) -> str:
    rows = [("measurement", "wall s", "peak RSS MB", "CPU s", "throughput", "ratio")]
    for c in results.get("collect", []):
        # wall s and peak RSS: the median run (collect: main process + decoder processes); ratio: medians' (range).
        tag = f"collect {c['images']} img / {c['results_mb']:.0f} MB"
        rng = lambda key: f" ({c[key][0]:.2f}-{c[key][1]:.2f})" if key in c else ""  # noqa: E731
        cpu = lambda key: f"{c[key]['cpu_s']:.2f}" if "cpu_s" in c[key] else ""  # noqa: E731
        per_gb = lambda key: f"; {c['cpu_s_per_gb'][key]:.2f} CPU-s/GB" if "cpu_s_per_gb" in c else ""  # noqa: E731
        rows.append((f"{tag}: floor transfer only", f"{c['transfer_floor']['wall_s']:.2f}", f"{c['transfer_floor']['peak_rss_mb']:.0f}",
                     cpu("transfer_floor"), f"{c['results_mb'] / c['transfer_floor']['wall_s']:.0f} MB/s{per_gb('transfer_floor')}", ""))
        rows.append((f"{tag}: floor GET+json+b64 (binascii)", f"{c['floor']['wall_s']:.2f}", f"{c['floor']['peak_rss_mb']:.0f}",
                     cpu("floor"), f"{c['floor_mb_per_s']:.0f} MB/s{per_gb('floor')}", ""))
        if "fast_floor" in c:
            rows.append((f"{tag}: floor GET+json+pybase64", f"{c['fast_floor']['wall_s']:.2f}", f"{c['fast_floor']['peak_rss_mb']:.0f}",
                         cpu("fast_floor"), f"{c['fast_floor_mb_per_s']:.0f} MB/s{per_gb('fast_floor')}", ""))
        rows.append((f"{tag}: naive SDK script", f"{c['naive']['wall_s']:.2f}", f"{c['naive']['peak_rss_mb']:.0f}", cpu("naive"),
                     f"{c['results_mb'] / c['naive']['wall_s']:.0f} MB/s{per_gb('naive')}",
                     f"naive/batcher {c['naive_over_collect']:.2f}x{rng('naive_over_collect_range')}"))
        ratio = f"batcher/old floor {c['collect_over_floor']:.2f}x{rng('collect_over_floor_range')}"
        if "collect_over_fast_floor" in c:
            ratio = (f"batcher/pybase64 floor {c['collect_over_fast_floor']:.2f}x{rng('collect_over_fast_floor_range')}; "
                     f"old floor {c['collect_over_floor']:.2f}x")
        images = f"; {c['collect_images_per_s']:.0f} img/s" if "collect_images_per_s" in c else ""
        rows.append((f"{tag}: batcher collect", f"{c['collect']['wall_s']:.2f}", _rss(c["collect"]), cpu("collect"),
                     f"{c['collect_mb_per_s']:.0f} MB/s{images}{per_gb('collect')}", ratio))
    cj = results.get("collect_jobs")
    if cj:
        m = cj["collect"]
        rows.append((f"collect {cj['jobs']} jobs x {cj['images_per_job']} img: batcher collect (process tree)",
                     f"{m['wall_s']:.2f}", _rss(m), f"{m['cpu_s']:.2f}", f"{cj['images_per_s']:.0f} img/s", ""))
    for p in results.get("plan", []):
        rows += _plan_rows(p)
    growth = results.get("plan_growth", [])
    for p in growth:
        rows += _plan_rows(p, "plan-growth")
    if len(growth) > 1:
        g0 = growth[0]
        for p in growth[1:]:
            k = p["rows"] / g0["rows"]
            rows.append((f"plan-growth {g0['rows']:,} -> {p['rows']:,} rows ({k:.0f}x): time grew", "", "", "", "",
                         f"dry-run {p['first']['wall_s'] / g0['first']['wall_s']:.2f}x, "
                         f"re-plan {p['replan']['wall_s'] / g0['replan']['wall_s']:.2f}x, "
                         f"nightly {p['nightly']['wall_s'] / g0['nightly']['wall_s']:.2f}x"))
    u = results.get("upload")
    if u:
        # wall s: the median run's whole process; throughput: its upload time (median, range over the repeats).
        for key, label in (("plain", "plain POST"), ("plain_chunked_8mb", "plain 8 MB chunks"),
                           ("batcher", "batcher upload_jsonl")):
            r, (lo, hi) = u[key], u[f"{key}_mb_per_s_range"]
            ratio = ""
            if key == "batcher":
                a, b = u["batcher_over_plain_range"]
                ratio = (f"of plain {u['batcher_over_plain_throughput'] * 100:.0f}% (per repeat {a * 100:.0f}-{b * 100:.0f}%); "
                         f"process wall {u['batcher_over_plain_process_wall'] * 100:.0f}%")
            rows.append((f"upload {u['mb']:.0f} MB: {label}", f"{r['wall_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                         f"{r['cpu_s']:.2f}" if "cpu_s" in r else "",
                         f"{u[f'{key}_mb_per_s']:.0f} MB/s ({lo:.0f}-{hi:.0f})", ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(r[i].ljust(widths[i]) for i in range(len(widths))) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke sizes")
    ap.add_argument("--full", action="store_true", help="also a ~2 GB results file")
    ap.add_argument("--only", choices=["collect", "collect-jobs", "plan", "plan-growth", "upload"], action="append",
                    help="run only these sections (plan-growth is never run by default: `make bench-scale`)")
    ap.add_argument("--plan-rows", type=int, action="append", help="manifest sizes for the planning measurement")
    ap.add_argument("--collect-images", type=int, action="append", help="image counts for the collect measurement")
    ap.add_argument("--collect-jobs", type=int, default=None, help="jobs in the many-jobs collect (default 100; 10 with --quick)")
    ap.add_argument("--growth-rows", type=int, action="append",
                    help="manifest sizes for plan-growth (default 1M, 3M, 10M; --quick 30k, 100k)")
    ap.add_argument("--history-nights", type=int, default=30,
                    help="plan-growth: nights of history in the workdir of the extra nightly row (at its smallest size)")
    ap.add_argument("--upload-repeats", type=int, default=3, help="interleaved repeats of the three uploads")
    ap.add_argument("--collect-repeats", type=int, default=None,
                    help="interleaved repeats of the collect measurements (default 3; 1 with --quick)")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        WORKERS[args.worker[0]](*args.worker[1:])
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    base = OUT / "work"
    base.mkdir(exist_ok=True)
    if args.quick:
        collect_sizes, plan_rows, upload_bytes = [10, 30], [10_000], 50_000_000
    else:
        collect_sizes, plan_rows, upload_bytes = [150, 500], [100_000, 1_000_000], 1_000_000_000
        if args.full:
            collect_sizes.append(930)  # ~1.9 GB: the most one job holds (ShardLimits.max_output_bytes, 2 GB)
    collect_sizes = args.collect_images or collect_sizes
    plan_rows = args.plan_rows or plan_rows
    sections = args.only or ["collect", "collect-jobs", "plan", "upload"]
    growth_rows = args.growth_rows or ([30_000, 100_000] if args.quick else [1_000_000, 3_000_000, 10_000_000])
    results: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "mode": "quick" if args.quick else ("full" if args.full else "default"),
        "image_bytes": IMAGE_BYTES,
    }
    t0 = time.time()
    if "collect" in sections:
        repeats = args.collect_repeats or (1 if args.quick else 3)
        results["collect"] = [bench_collect(n, base, repeats) for n in collect_sizes]
    if "plan" in sections:
        results["plan"] = []
        for rows in plan_rows:
            done = results["plan"]
            if done and not args.plan_rows:
                prev = done[-1]
                predicted = (prev["first"]["wall_s"] + prev["replan"]["wall_s"]) * rows / prev["rows"]
                if predicted > 400:  # both runs of the bigger size; extrapolated linearly
                    print(f"\n[plan] skipping {rows:,} rows: extrapolated {predicted:.0f} s from {prev['rows']:,}", flush=True)
                    results["plan_skipped"] = {"rows": rows, "extrapolated_s": round(predicted)}
                    continue
            results["plan"].append(bench_plan(rows, base))
    if "collect-jobs" in sections:
        results["collect_jobs"] = bench_collect_jobs(args.collect_jobs or (10 if args.quick else 100), 2, base)
    if "plan-growth" in sections:
        results["plan_growth"] = [bench_plan(rows, base, ledger_floor=False,
                                             history_nights=args.history_nights if rows == min(growth_rows) else 0)
                                  for rows in sorted(growth_rows)]
    if "upload" in sections:
        results["upload"] = bench_upload(upload_bytes, base, args.upload_repeats)
    results["total_s"] = round(time.time() - t0, 1)
    results["table"] = table(results)
    name = "results-quick" if args.quick else ("results-scale" if sections == ["plan-growth"] else "results")
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + results["table"])
    print(f"\nwrote {path.relative_to(ROOT)} ({results['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
