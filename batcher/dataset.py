"""The output dataset: images plus `metadata.parquet`, one row per manifest row and variant.

Image file names are request hashes (`images/ab/<hash>.png`), never user strings, so no id can write
outside the output directory. Images are hard-linked from the cache when it is on the same filesystem,
copied otherwise; every file is written to a temp name and renamed, metadata.parquet last.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import gcs
from .errors import BatcherError
from .faults import maybe_crash
from .ledger import BLOCKED, FAILED, SUCCEEDED, Ledger
from .store import ImageStore

STATUS = {SUCCEEDED: "ok", BLOCKED: "blocked", FAILED: "failed"}  # anything else: pending
BASE_FIELDS = [
    pa.field("file_name", pa.string()),
    pa.field("id", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("variant", pa.int32()),
    pa.field("prompt", pa.string()),
    pa.field("request_hash", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("model", pa.string()),
    pa.field("job", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("cached", pa.bool_()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
]
BATCH_ROWS = 10_000


@dataclass
class DatasetSummary:
    path: Path
    rows: int = 0
    ok: int = 0
    blocked: int = 0
    failed: int = 0
    pending: int = 0
    cost_usd: float = 0.0


def _place_image(src: Path | str, dest: Path) -> None:
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}")
    tmp.unlink(missing_ok=True)
    if gcs.is_gcs(src):  # a gs:// cache
        gcs.download_file(str(src), str(tmp))
    else:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def write_dataset(ledger: Ledger, store: ImageStore, run_id: int, out: Path) -> DatasetSummary:
    """Write the dataset; a disk error (full, read-only, a file in the way) names the dataset, not a traceback.
    The images stay in the cache and the ledger keeps every outcome: run the command again once there is room."""
    try:
        if gcs.is_gcs(out):
            return _write_dataset_to_gcs(ledger, store, run_id, str(out))
        return _write_dataset(ledger, store, run_id, out)
    except OSError as exc:
        raise BatcherError(f"output dataset {out}: cannot write it ({exc.strerror or exc}); nothing is lost: "
                           f"free some space (or fix the path) and run the same command again") from None


def _write_dataset_to_gcs(ledger: Ledger, store: ImageStore, run_id: int, out: str) -> DatasetSummary:
    """A gs:// dataset: built in the workdir, then uploaded; images create-if-absent (same hash, same bytes),
    metadata.parquet last, so a reader never sees metadata whose images are missing."""
    local = ledger.workdir / "dataset-staging"

    def place(src: Path | str, file_name: str) -> None:
        # Straight into the bucket: a server-side copy from a gs:// cache, an upload from a local one. Only
        # metadata.parquet is staged on local disk. Create-if-absent: same name, same bytes.
        dest = gcs.join(out, file_name)
        if gcs.is_gcs(src):
            gcs.copy_if_absent(str(src), dest)
        else:
            gcs.upload_file_if_absent(dest, str(src))

    summary = _write_dataset(ledger, store, run_id, local, place=place)
    gcs.upload_file(gcs.join(out, "metadata.parquet"), str(local / "metadata.parquet"))
    summary.path = out
    return summary


def _write_dataset(ledger: Ledger, store: ImageStore, run_id: int, out: Path, place=None) -> DatasetSummary:
    """Write metadata.parquet into `out`; each image is placed by `place(src, file_name)` (default: linked or
    copied into `out`)."""
    out = Path(out)
    place = place or (lambda src, file_name: _place_image(src, out / file_name))
    out.mkdir(parents=True, exist_ok=True)
    run = ledger.conn.execute("SELECT extra_schema, created_at FROM runs WHERE id=?", (run_id,)).fetchone()
    run_started = run["created_at"] if run else 0.0
    extra = pa.ipc.read_schema(pa.py_buffer(run["extra_schema"])) if run and run["extra_schema"] else pa.schema([])
    taken = {f.name for f in BASE_FIELDS}
    extra_fields = [f for f in extra if f.name not in taken]
    schema = pa.schema(BASE_FIELDS + extra_fields)
    summary = DatasetSummary(path=out)
    tmp = out / ".metadata.parquet.tmp"
    query = ledger.conn.execute(
        """SELECT w.row, w.id, w.variant, w.prompt, w.request_hash, w.extra_json,
                  r.state, r.error, r.finish_reason, r.model, r.attempts, r.cached, r.prompt_tokens, r.output_tokens,
                  r.cost_usd, r.updated_at, j.display_name AS job
           FROM rows w JOIN requests r ON r.hash = w.request_hash LEFT JOIN jobs j ON j.id = r.job_id
           WHERE w.run_id=? ORDER BY w.seq""",
        (run_id,),
    )
    seen_cost: set[str] = set()  # rows sharing a request share its cost: count it once
    with pq.ParquetWriter(tmp, schema) as writer:
        while batch := query.fetchmany(BATCH_ROWS):
            cols: dict[str, list] = {f.name: [] for f in schema}
            for r in batch:
                status = STATUS.get(r["state"], "pending")
                file_name = None
                if status == "ok":
                    src = store.find(r["request_hash"])
                    if src is None:
                        status = "pending"  # the cache lost it: the next submit generates it again
                    else:
                        file_name = f"images/{r['request_hash'][:2]}/{r['request_hash']}{os.path.splitext(str(src))[1]}"
                        place(src, file_name)  # a no-op when it is there (rows sharing a request share it)
                summary.rows += 1
                setattr(summary, status, getattr(summary, status) + 1)
                # A request that ended before this run began was paid for by an earlier run in this workdir: to
                # this run it is a cache hit. Rows sharing a request share one payment: the first row carries it,
                # so the column sums to this run's spend.
                earlier = r["updated_at"] < run_started and r["state"] in (SUCCEEDED, BLOCKED)
                cost = r["cost_usd"] if not r["cached"] and not earlier and r["request_hash"] not in seen_cost else 0.0
                if cost:
                    seen_cost.add(r["request_hash"])
                    summary.cost_usd += cost
                values = {
                    "file_name": file_name, "id": r["id"], "row": r["row"], "variant": r["variant"], "prompt": r["prompt"],
                    "request_hash": r["request_hash"], "status": status, "error": r["error"] if status != "ok" else None,
                    "finish_reason": r["finish_reason"], "model": r["model"], "job": r["job"], "attempts": r["attempts"],
                    "cached": bool(r["cached"]) or (earlier and status == "ok"), "prompt_tokens": r["prompt_tokens"], "output_tokens": r["output_tokens"],
                    "cost_usd": cost,
                }
                extras = json.loads(r["extra_json"]) if r["extra_json"] else {}
                for f in extra_fields:
                    values[f.name] = extras.get(f.name)
                for name in cols:
                    cols[name].append(values.get(name))
            arrays = []
            for f in schema:
                try:
                    arrays.append(pa.array(cols[f.name], type=f.type))
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    arrays.append(pa.array([None if v is None else str(v) for v in cols[f.name]], type=pa.string()).cast(f.type, safe=False))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            maybe_crash("dataset")  # test hook: see batcher/faults.py
    maybe_crash("dataset-replace")
    os.replace(tmp, out / "metadata.parquet")
    return summary
