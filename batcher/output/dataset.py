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

from ..storage import gcs
from ..storage import atomic
from ..errors import BatcherError
from ..faults import maybe_crash
from ..ledger import BLOCKED, FAILED, SUCCEEDED, Ledger, reading
from ..storage.store import ImageStore

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
    pa.field("thoughts_tokens", pa.int64()),
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
    lost: int = 0  # of the pending rows: done in the ledger, but the cache no longer has their image
    cost_usd: float = 0.0


def _place_image(src: Path | str, dest: Path) -> None:
    if dest.exists():
        return
    with atomic.into_place(dest) as tmp:
        tmp.unlink(missing_ok=True)  # left by a writer killed half-way (os.link needs the name free)
        if gcs.is_gcs(src):  # a gs:// cache
            gcs.download_file(str(src), str(tmp))
        else:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)


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


class _Linker:
    """Places a plain local cache's images into a local dataset: a hard link per new image, one system call
    each, the common extension first (a missing one, or another extension, goes through ImageStore.find).
    A link is atomic, so no temp file is needed; a copy (another filesystem) still goes through one."""

    def __init__(self, store: ImageStore, out: Path):
        self.store, self.out = store, out
        self.cache = os.fspath(store.root)
        self.images = os.path.join(os.fspath(out), "images")
        self.made_dirs: set[str] = set()
        self.links = True  # until the filesystem says no (another device, or no hard links)

    def place(self, h: str) -> str | None:
        """The image's file name in the dataset (placed), or None when the cache has no image for `h`."""
        prefix = h[:2]
        src = f"{self.cache}/{prefix}/{h}.png"
        dest = f"{self.images}/{prefix}/{h}.png"
        if self.links:
            try:
                self._link(prefix, src, dest)
                return f"images/{prefix}/{h}.png"
            except FileExistsError:  # placed by an earlier write (same hash, same bytes), if it is still a file...
                # ...and the cache must still have it (Linux looks the source up first; POSIX does not say)
                if os.path.exists(dest) and os.path.exists(src):
                    return f"images/{prefix}/{h}.png"
            except FileNotFoundError:
                pass  # no PNG in the cache: another extension, or none
            except OSError:
                self.links = False  # e.g. the cache is on another filesystem: copies from now on
        # A copy, another extension, or an entry in the way (replaced):
        return _find_and_place(self.store, h, lambda src, file_name: _place_image(src, self.out / file_name))

    def _link(self, prefix: str, src: str, dest: str) -> None:
        try:
            os.link(src, dest)
        except FileNotFoundError:
            if prefix in self.made_dirs or not os.path.exists(src):
                raise
            os.makedirs(os.path.join(self.images, prefix), exist_ok=True)  # the first image of this prefix
            self.made_dirs.add(prefix)
            os.link(src, dest)


def _find_and_place(store: ImageStore, h: str, place) -> str | None:
    """The image of `h` placed by `place(src, file_name)` as its file name in the dataset, which this returns; None
    when the cache has no image for it."""
    src = store.find(h)
    if src is None:
        return None
    file_name = f"images/{h[:2]}/{h}{os.path.splitext(str(src))[1]}"
    place(src, file_name)  # a no-op when it is there
    return file_name


def _write_dataset(ledger: Ledger, store: ImageStore, run_id: int, out: Path, place=None) -> DatasetSummary:
    """Write metadata.parquet into `out`; each image is placed by `place(src, file_name)` (default: linked or
    copied into `out`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if place is None and type(store) is ImageStore:
        placed = _Linker(store, out).place
    else:
        place = place or (lambda src, file_name: _place_image(src, out / file_name))
        placed = lambda h: _find_and_place(store, h, place)  # noqa: E731

    run_started, extra_schema = reading.run_start(ledger, run_id)
    extra = pa.ipc.read_schema(pa.py_buffer(extra_schema)) if extra_schema else pa.schema([])
    taken = {f.name for f in BASE_FIELDS}
    extra_fields = [f for f in extra if f.name not in taken]
    schema = pa.schema(BASE_FIELDS + extra_fields)
    summary = DatasetSummary(path=out)
    seen_cost: set[str] = set()  # rows sharing a request share its cost: count it once
    counts = dict.fromkeys(("ok", "blocked", "failed", "pending"), 0)
    with atomic.into_place(out / "metadata.parquet") as tmp:  # `maybe_crash("dataset-replace")`: before it is in place
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in reading.dataset_rows(ledger, run_id, BATCH_ROWS):  # columns: reading.DATASET_COLUMNS
                (row, ids, variant, prompt, hashes, extra_json, state, error, finish_reason, model, attempts, cached,
                 prompt_tokens, output_tokens, thoughts_tokens, cost_usd, updated_at, job) = zip(*batch)
                statuses, file_names, errors, costs, cached_out = [], [], [], [], []
                for h, st, err, was_cached, paid, at in zip(hashes, state, error, cached, cost_usd, updated_at):
                    status = STATUS.get(st, "pending")
                    file_name = None
                    if status == "ok":
                        file_name = placed(h)
                        if file_name is None:
                            status = "pending"  # the cache lost it: the next submit generates it again
                            summary.lost += 1
                    counts[status] += 1
                    # A request that ended before this run began was paid for by an earlier run in this workdir: to
                    # this run it is a cache hit. Rows sharing a request share one payment: the first row carries it,
                    # so the column sums to this run's spend.
                    earlier = at < run_started and st in (SUCCEEDED, BLOCKED)
                    cost = paid if not was_cached and not earlier and h not in seen_cost else 0.0
                    if cost:
                        seen_cost.add(h)
                        summary.cost_usd += cost
                    statuses.append(status)
                    file_names.append(file_name)
                    errors.append(err if status != "ok" else None)
                    costs.append(cost)
                    cached_out.append(bool(was_cached) or (earlier and status == "ok"))
                columns = {"file_name": file_names, "id": ids, "row": row, "variant": variant, "prompt": prompt,
                           "request_hash": hashes, "status": statuses, "error": errors, "finish_reason": finish_reason,
                           "model": model, "job": job, "attempts": attempts, "cached": cached_out,
                           "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "thoughts_tokens": thoughts_tokens,
                           "cost_usd": costs}
                if extra_fields:
                    extras = [json.loads(x) if x else {} for x in extra_json]
                    for f in extra_fields:
                        columns[f.name] = [e.get(f.name) for e in extras]
                arrays = []
                for f in schema:
                    values = columns[f.name]
                    try:
                        arrays.append(pa.array(values, type=f.type))
                    except (pa.ArrowInvalid, pa.ArrowTypeError):
                        arrays.append(pa.array([None if v is None else str(v) for v in values], type=pa.string()).cast(f.type, safe=False))
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                maybe_crash("dataset")  # test hook: see batcher/faults.py
        summary.rows = sum(counts.values())
        summary.ok, summary.blocked, summary.failed, summary.pending = (counts[k] for k in ("ok", "blocked", "failed", "pending"))
        maybe_crash("dataset-replace")
    return summary
