"""The output dataset: images plus `metadata.parquet`, one row per manifest row and variant.

Image file names are request hashes (`images/ab/<hash>.png`), never user strings, so no id can write
outside the output directory. Images are hard-linked from the cache when it is on the same filesystem,
copied otherwise; every file is written to a temp name and renamed, metadata.parquet last.

A dataset belongs to one run: metadata.parquet records its owner (the workdir's ledger, the run, the manifest) in
its key-value metadata. Writing another manifest's dataset over it is refused unless asked (check_owner); when a
new run's dataset replaces an older one's, the images no row names any more are removed, so every image in a
dataset is named by a row of its metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import gcs
from ..storage import atomic
from ..errors import BatcherError, UsageError
from ..faults import maybe_crash
from ..ledger import BLOCKED, FAILED, SUCCEEDED, Ledger, reading
from ..manifest.cells import from_jsonable, plain_type
from ..storage.store import ImageStore
from . import formats, shards as shards_mod

STATUS = {SUCCEEDED: "ok", BLOCKED: "blocked", FAILED: "failed"}  # anything else: pending
OWNER_KEY = b"batcher.owner"  # metadata.parquet's key-value metadata: {"ledger", "run", "manifest"} as JSON
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
    # the request's own settings, as sent (None: the model's default)
    pa.field("aspect_ratio", pa.string()),
    pa.field("image_size", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("temperature", pa.float64()),
    pa.field("top_p", pa.float64()),
    pa.field("variants", pa.int32()),  # images asked of the row
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
    removed: int = 0  # images of an earlier run's dataset that no row of this one names, removed
    format: str = "files"  # files | webdataset | parquet (output.shards)
    shard_names: list[str] = field(default_factory=list)  # webdataset, parquet: the dataset's shards, in order
    shards_written: int = 0  # of which written by this write (the others held the same samples already)


def carried_array(values: list, field: pa.Field) -> pa.Array:
    """A carried-through column, back in its manifest's Arrow type from the ledger's JSON (manifest.cells)."""
    t = field.type
    try:
        if pa.types.is_string(t):  # text, or a type that does not round-trip: as JSON text, never Python's repr
            return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values], t)
        return pa.array(values if plain_type(t) else [from_jsonable(v, t) for v in values], type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as exc:
        raise BatcherError(f"column {field.name!r} of the manifest cannot be written back as {t} ({exc})") from None


def _remove_images_not_in(out: Path | str, keep: set[bytes]) -> int:
    """Remove every image under OUT/images/ whose hash is not in `keep`; how many were removed."""
    removed = 0
    if gcs.is_gcs(out):
        for uri in list(gcs.list_names(gcs.join(str(out), "images") + "/")):
            if _image_hash(uri.rsplit("/", 1)[-1]) not in keep:
                gcs.delete(uri)
                removed += 1
        return removed
    images = Path(out) / "images"
    if not images.is_dir():
        return 0
    for prefix in os.scandir(images):
        if not prefix.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(prefix.path):
            if _image_hash(entry.name) not in keep:
                os.unlink(entry.path)
                removed += 1
        with contextlib.suppress(OSError):
            os.rmdir(prefix.path)  # only when it is empty now
    with contextlib.suppress(OSError):
        images.rmdir()  # no image left (a sharded dataset replaced this one)
    return removed


def _image_hash(name: str) -> bytes | None:
    """The request hash an image's file name is made of (None: not an image name of ours)."""
    stem = name.split(".", 1)[0]
    try:
        return bytes.fromhex(stem) if len(stem) == 64 else None
    except ValueError:
        return None


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


# ---- the dataset card: how to load it -------------------------------------------------------------------

CARD = "README.md"
# Hugging Face `datasets` reads a dataset card's YAML `configs`: `all` (every row; a row without an image has
# image=None) and `ok` (only the rows with their image), both imagefolder over metadata.parquet and images/.
CARD_CONFIGS = """---
configs:
- config_name: all
  default: true
  data_files:
  - split: train
    path: ["metadata.parquet", "images/**"]
- config_name: ok
  data_files:
  - split: train
    path: ["metadata.parquet", "images/**"]
  filters:
  - ["status", "==", "ok"]
---
"""


def card(owner: dict, summary: DatasetSummary) -> str:
    return CARD_CONFIGS + f"""
# Images generated by batcher

From `{owner.get("manifest")}`: {summary.rows:,} images (one row of `metadata.parquet` each: a manifest row and
variant): {summary.ok:,} ok, {summary.blocked:,} blocked, {summary.failed:,} failed, {summary.pending:,} pending.
Each row says why it has no image (`status`, `error`, `finish_reason`) and what made it (`model`, `prompt`, the
request's settings, `request_hash`, tokens and `cost_usd`).

```python
import datasets
everything = datasets.load_dataset("path/to/this/folder", split="train")         # image=None where there is none
images = datasets.load_dataset("path/to/this/folder", "ok", split="train")      # only the rows with their image
```
"""


# ---- whose dataset ----------------------------------------------------------------------------------

def owner_of(ledger: Ledger, run_id: int) -> dict:
    run = ledger.run(run_id)
    return {"ledger": ledger.ledger_id, "run": run["fingerprint"], "manifest": run["manifest"]}


def existing_owner(out: Path | str) -> dict | None:
    """The owner recorded in the dataset at `out` ({} for a dataset written before owners were; None: no dataset)."""
    where = gcs.join(str(out), "metadata.parquet") if gcs.is_gcs(out) else Path(out) / "metadata.parquet"
    try:
        if gcs.is_gcs(out):
            if not gcs.exists(str(where)):
                return None
            schema = pq.read_schema(pa.PythonFile(gcs.open_read(str(where)), mode="r"))
        else:
            if not where.is_file():
                return None
            schema = pq.read_schema(where)
    except (OSError, pa.ArrowInvalid):
        return {}  # unreadable: not ours to judge; it is replaced as any stale file would be
    raw = (schema.metadata or {}).get(OWNER_KEY)
    return json.loads(raw) if raw else {}


def check_owner(out: Path | str, ledger_id: str, manifest: str, switch: bool) -> None:
    """Refuse (UsageError) to write the dataset of `manifest` over one that belongs to another manifest or another
    workdir, unless `switch` (--switch-manifest)."""
    owner = existing_owner(out)
    if not owner or switch:
        return
    if owner.get("ledger") != ledger_id:
        raise UsageError(f"output dataset {out} belongs to another workdir's run (of {owner.get('manifest')}): give this "
                         "run its own --out, or pass --switch-manifest to rewrite it for this one")
    if owner.get("manifest") != manifest:
        raise UsageError(f"output dataset {out} holds the run of another manifest ({owner.get('manifest')}): give this "
                         "manifest its own --out, or pass --switch-manifest to rewrite it for this one")


def write_dataset(ledger: Ledger, store: ImageStore, run_id: int, out: Path, fmt: str = "files",
                  shard_size: int = formats.DEFAULT_SHARD_SIZE) -> DatasetSummary:
    """Write the dataset in the format `fmt` (files: images/ + metadata.parquet; webdataset, parquet: shards,
    output.shards); a disk error (full, read-only, a file in the way) names the dataset, not a traceback.
    The images stay in the cache and the ledger keeps every outcome: run the command again once there is room."""
    if fmt not in formats.FORMATS:
        raise UsageError(f"dataset format {fmt!r}: use one of {', '.join(formats.FORMATS)}")
    if fmt != "files" and gcs.is_gcs(out):
        raise UsageError(formats.gcs_refused(fmt, out))
    try:
        owner = owner_of(ledger, run_id)
        previous = existing_owner(out)
        key = str(out)
        if (previous is not None and previous.get("run") != owner["run"]) or reading.prune_pending(ledger, key):
            reading.set_prune_pending(ledger, key, True)  # another run's dataset: tidy it once this one is in place
        keep: set[bytes] | None = set() if reading.prune_pending(ledger, key) else None
        if gcs.is_gcs(out):
            summary = _write_dataset_to_gcs(ledger, store, run_id, str(out), owner, keep)
        elif fmt == "files":
            summary = _write_dataset(ledger, store, run_id, out, owner=owner, keep=keep)
            atomic.write_text(Path(out) / CARD, card(owner, summary))
            shards_mod.remove_shards(ledger, out)  # a sharded dataset written here before: this one replaces it
        else:
            summary = _write_dataset(ledger, store, run_id, out, owner=owner, fmt=fmt, shard_size=shard_size)
            # Now that its metadata is in place: the shards of an earlier write that are not part of this one, and
            # the images of a files-format dataset written here before (a sharded dataset has no images/).
            shards_mod.remove_shards(ledger, out, keep=set(summary.shard_names))
            keep = set()
        if keep is not None:
            summary.removed = _remove_images_not_in(out, keep)
            reading.set_prune_pending(ledger, key, False)
        reading.set_dataset_written(ledger, run_id, str(out) if gcs.is_gcs(out) else str(Path(out).absolute()))
        return summary
    except OSError as exc:
        raise BatcherError(f"output dataset {out}: cannot write it ({exc.strerror or exc}); nothing is lost: "
                           f"free some space (or fix the path) and run the same command again") from None


def _write_dataset_to_gcs(ledger: Ledger, store: ImageStore, run_id: int, out: str, owner: dict,
                          keep: set[bytes] | None) -> DatasetSummary:
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

    summary = _write_dataset(ledger, store, run_id, local, place=place, owner=owner, keep=keep)
    gcs.upload_file(gcs.join(out, "metadata.parquet"), str(local / "metadata.parquet"))
    atomic.write_text(local / CARD, card(owner, summary))
    gcs.upload_file(gcs.join(out, CARD), str(local / CARD), content_type="text/markdown; charset=utf-8")
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


def _write_dataset(ledger: Ledger, store: ImageStore, run_id: int, out: Path, place=None, owner: dict | None = None,
                   keep: set[bytes] | None = None, fmt: str = "files",
                   shard_size: int = formats.DEFAULT_SHARD_SIZE) -> DatasetSummary:
    """Write metadata.parquet into `out`, recording `owner`; each image is placed by `place(src, file_name)`
    (default: linked or copied into `out`). `keep`: a set to add the hash of every image a row names to.
    `fmt` webdataset or parquet: the images go into shards instead (output.shards), and the card says so."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sharded = fmt != "files"
    if sharded:
        placed = None  # samples go into shards: their images are found in the cache, not placed
    elif place is None and type(store) is ImageStore:
        placed = _Linker(store, out).place
    else:
        place = place or (lambda src, file_name: _place_image(src, out / file_name))
        placed = lambda h: _find_and_place(store, h, place)  # noqa: E731

    run_started, extra_schema = reading.run_start(ledger, run_id)
    extra = pa.ipc.read_schema(pa.py_buffer(extra_schema)) if extra_schema else pa.schema([])
    taken = {f.name for f in BASE_FIELDS}
    extra_fields = [f for f in extra if f.name not in taken]
    schema = pa.schema(BASE_FIELDS + extra_fields, metadata={OWNER_KEY: json.dumps(owner or {}, sort_keys=True).encode()})
    rows_schema = schema  # a batch's metadata columns
    writer_shards = None
    if sharded:
        writer_shards = shards_mod.ShardWriter(fmt, ledger, out, shard_size, pa.schema(BASE_FIELDS + extra_fields))
        schema = schema.append(shards_mod.SHARD_FIELD)
    summary = DatasetSummary(path=out, format=fmt)
    seen_cost: set[str] = set()  # rows sharing a request share its cost: count it once
    counts = dict.fromkeys(("ok", "blocked", "failed", "pending"), 0)
    with atomic.into_place(out / "metadata.parquet") as tmp:  # `maybe_crash("dataset-replace")`: before it is in place
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in reading.dataset_rows(ledger, run_id, BATCH_ROWS):  # columns: reading.DATASET_COLUMNS
                (row, ids, variant, prompt, hashes, extra_json, state, error, finish_reason, model, aspect_ratio, image_size,
                 seed, temperature, top_p, variants, attempts, cached, prompt_tokens, output_tokens, thoughts_tokens,
                 cost_usd, updated_at, job) = zip(*batch)
                statuses, file_names, errors, costs, cached_out, srcs = [], [], [], [], [], []
                for h, st, err, was_cached, paid, at, r, v in zip(hashes, state, error, cached, cost_usd, updated_at,
                                                                  row, variant):
                    status = STATUS.get(st, "pending")
                    file_name = src = None
                    if status == "ok":
                        if sharded:  # the sample's file name in its shard
                            src = store.find(h)
                            if src is not None:
                                file_name = f"{shards_mod.sample_key(r, v)}{os.path.splitext(str(src))[1]}"
                        else:
                            file_name = placed(h)
                        if file_name is None:
                            status = "pending"  # the cache lost it: the next submit generates it again
                            summary.lost += 1
                        elif keep is not None:
                            keep.add(bytes.fromhex(h))
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
                    srcs.append(src)
                    errors.append(err if status != "ok" else None)
                    costs.append(cost)
                    cached_out.append(bool(was_cached) or (earlier and status == "ok"))
                columns = {"file_name": file_names, "id": ids, "row": row, "variant": variant, "prompt": prompt,
                           "request_hash": hashes, "status": statuses, "error": errors, "finish_reason": finish_reason,
                           "model": model, "aspect_ratio": aspect_ratio, "image_size": image_size, "seed": seed,
                           "temperature": temperature, "top_p": top_p, "variants": variants,
                           "job": job, "attempts": attempts, "cached": cached_out,
                           "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "thoughts_tokens": thoughts_tokens,
                           "cost_usd": costs}
                if extra_fields:
                    extras = [json.loads(x) if x else {} for x in extra_json]
                    for f in extra_fields:
                        columns[f.name] = [e.get(f.name) for e in extras]
                arrays = [pa.array(columns[f.name], type=f.type) for f in BASE_FIELDS]
                arrays += [carried_array(columns[f.name], f) for f in extra_fields]
                table = pa.Table.from_arrays(arrays, schema=rows_schema)
                if writer_shards is not None:
                    table = table.append_column(shards_mod.SHARD_FIELD, pa.array(writer_shards.add(table, columns, srcs),
                                                                                 pa.string()))
                writer.write_table(table)
                maybe_crash("dataset")  # test hook: see batcher/faults.py
            if writer_shards is not None:
                writer_shards.finish()  # the last shard
                summary.shard_names, summary.shards_written = writer_shards.names, writer_shards.rewritten
        summary.rows = sum(counts.values())
        summary.ok, summary.blocked, summary.failed, summary.pending = (counts[k] for k in ("ok", "blocked", "failed", "pending"))
        if writer_shards is not None:
            atomic.write_text(out / CARD, writer_shards.card(owner or {}, summary))
        maybe_crash("dataset-replace")
    return summary
