"""Planning: manifest rows -> request hashes in the ledger (validated, deduped, cache-checked), then
uncached requests -> shards (jobs) bounded by requests, input bytes and expected output bytes.

Validation happens here, before anything is uploaded: the whole manifest is streamed into the ledger in
one transaction, and on any problem the transaction is rolled back, so an invalid manifest leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from . import catalog, gcs
from .errors import LedgerError, ManifestError
from .faults import maybe_crash
from .ledger import BLOCKED, FAILED, J_PLANNED, PLANNED, QUEUED, SUCCEEDED, Ledger
from .pricing import expected_output_tokens
from .quota import prompt_tokens_estimate
from .manifest import ManifestOptions, ManifestRow, RowProblem, carried_schema, manifest_fingerprint, read_manifest
from .requests import (
    HASH_SCHEMA_VERSION, ImageRequest, ReferenceImage, dump_body, canonical_json, file_sha256, identity_hash, image_mime_type, request_body, request_hash,
)
from .store import IMAGE_EXTS, ImageStore

KNOWN_COLUMNS = {"model", "aspect_ratio", "image_size", "temperature", "top_p", "seed", "variants", "reference_images", "system_instruction"}
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class ShardLimits:
    max_requests: int = 1000
    max_input_bytes: int = 1_900_000_000  # under the API's 2 GB per input file
    max_output_bytes: int = 2_000_000_000  # expected base64 results, so a job's results stay retrievable


@dataclass
class PlanResult:
    run_id: int
    rows: int = 0
    requests: int = 0  # distinct requests of the run
    cache_hits: int = 0
    duplicates: int = 0  # rows sharing another row's request
    rejected: int = 0
    new_run: bool = True


def run_fingerprint(manifest: Path | str, options: ManifestOptions) -> str:
    return hashlib.sha256(canonical_json(manifest_fingerprint(str(manifest), options)).encode()).hexdigest()


class _References:
    """Content hashes of reference images, computed once per distinct path."""

    def __init__(self):
        self._by_path: dict[str, ReferenceImage] = {}

    def get(self, path: str) -> ReferenceImage:
        ref = self._by_path.get(path)
        if ref is None:
            ref = ReferenceImage(sha256=file_sha256(path), mime_type=image_mime_type(path), path=path)
            self._by_path[path] = ref
        return ref


def image_requests(row: ManifestRow, refs: _References) -> list[ImageRequest]:
    references = tuple(refs.get(p) for p in row.reference_images)
    return [
        ImageRequest(
            model=row.model,
            prompt=row.prompt,
            variant=v,
            aspect_ratio=row.aspect_ratio,
            image_size=row.image_size,
            temperature=row.temperature,
            top_p=row.top_p,
            seed=row.seed,
            system_instruction=row.system_instruction,
            references=references,
        )
        for v in range(row.variants)
    ]


SHARD_PAGE = 20_000  # requests read at a time while sharding
PLAN_BATCH_ROWS = 5_000  # manifest rows per bulk insert into the ledger


class _Templates:
    """Request bodies and hashes without building and serialising each body twice: for every request "shape"
    (everything but the prompt) the stored body JSON and the canonical identity JSON are rendered once around
    a sentinel prompt, and each row's JSON-encoded prompt is spliced in. The first request of each shape is
    checked against `request_body`/`request_hash`; a shape that does not match falls back to them."""

    SENTINEL = "\x00batcher-prompt\x00"

    def __init__(self):
        self._shapes: dict[tuple, tuple | None] = {}

    def request(self, row: ManifestRow, references: tuple, variant: int) -> tuple:
        """(model, variant, hash, body_json) of one request of a row."""
        key = (row.model, row.aspect_ratio, row.image_size, row.temperature, row.top_p, row.seed,
               row.system_instruction, references, variant)
        try:
            shape = self._shapes[key]
        except (KeyError, TypeError):  # TypeError: an unhashable value; no template
            return self._slow(row, references, variant, key)
        if shape is None:
            return self._exact(row, references, variant)
        body_pre, body_post, ident_pre, ident_post = shape
        p = _encode_str(row.prompt)
        h = hashlib.sha256((ident_pre + p + ident_post).encode("utf-8")).hexdigest()
        return row.model, variant, h, body_pre + p + body_post

    @staticmethod
    def _req(row: ManifestRow, references: tuple, variant: int, prompt: str) -> ImageRequest:
        return ImageRequest(model=row.model, prompt=prompt, variant=variant, aspect_ratio=row.aspect_ratio,
                            image_size=row.image_size, temperature=row.temperature, top_p=row.top_p, seed=row.seed,
                            system_instruction=row.system_instruction, references=references)

    def _exact(self, row: ManifestRow, references: tuple, variant: int) -> tuple:
        req = self._req(row, references, variant, row.prompt)
        return row.model, variant, request_hash(req), dump_body(request_body(req))

    def _slow(self, row: ManifestRow, references: tuple, variant: int, key: tuple) -> tuple:
        exact = self._exact(row, references, variant)
        shape = None
        try:
            sentinel = self._req(row, references, variant, self.SENTINEL)
            s_body = request_body(sentinel)
            s_json = dump_body(s_body)
            ident = canonical_json({"schema": HASH_SCHEMA_VERSION, "model": row.model.removeprefix("models/"),
                                    "request": s_body, "variant": variant})
            enc = _encode_str(self.SENTINEL)
            if s_json.count(enc) == 1 and ident.count(enc) == 1:
                body_pre, body_post = s_json.split(enc)
                ident_pre, ident_post = ident.split(enc)
                p = _encode_str(row.prompt)
                mine = (hashlib.sha256((ident_pre + p + ident_post).encode("utf-8")).hexdigest(), body_pre + p + body_post)
                if mine == exact[2:]:
                    shape = (body_pre, body_post, ident_pre, ident_post)
        except (ValueError, TypeError):
            shape = None
        try:
            self._shapes[key] = shape
        except TypeError:
            pass
        return exact


_encode_str = json.encoder.encode_basestring  # what json.dumps(str, ensure_ascii=False) writes
_EXTRA_JSON = json.JSONEncoder(default=str, ensure_ascii=False)  # json.dumps(extra, default=str, ensure_ascii=False)


class _StoreLookup:
    """`store.has` for many hashes at once: each prefix dir of the cache is listed once (os.listdir) on first
    use instead of up to four stat calls per request."""

    def __init__(self, store):
        self.store = store
        root = getattr(store, "root", None)
        plain = type(store).has is ImageStore.has and type(store).find is ImageStore.find
        self.root = os.fspath(root) if root is not None and plain else None
        self.dirs: dict[str, set[str]] = {}

    def has(self, h: str) -> bool:
        listing = getattr(self.store, "list_dir", None)  # a gs:// cache: one listing per prefix too
        if self.root is None and listing is None:
            return self.store.has(h)
        hashes = self.dirs.get(h[:2])
        if hashes is None:
            if self.root is None:
                names = listing(h[:2])
            else:
                try:
                    names = os.listdir(os.path.join(self.root, h[:2]))
                except (FileNotFoundError, NotADirectoryError):
                    names = ()
            # The hashes that have an image file: one set lookup per request instead of one per extension.
            hashes = self.dirs[h[:2]] = {stem for stem, dot, ext in (n.rpartition(".") for n in names)
                                         if dot and "." + ext in IMAGE_EXTS and not stem.startswith(".")}
        return h in hashes


def _prepared_rows(manifest: Path | str, options: ManifestOptions, refs: _References) -> Iterator[RowProblem | tuple]:
    """The manifest's problems, in order, and for each valid row (row, its reference images, its requests as
    (model, variant, hash, body JSON), its extra columns as JSON or None)."""
    templates = _Templates()
    for item in read_manifest(manifest, options):
        if isinstance(item, RowProblem):
            yield item
            continue
        try:
            references = tuple(refs.get(p) for p in item.reference_images)
        except OSError as exc:
            yield RowProblem(str(manifest), item.row, "reference_images", None, f"cannot read reference image: {exc}")
            continue
        reqs = [templates.request(item, references, v) for v in range(item.variants)]
        yield item, references, reqs, _EXTRA_JSON.encode(item.extra) if item.extra else None


# A request planned again starts over: no attempts, and no payment yet (an earlier one belongs to an earlier run;
# kept, it would be counted as this run's spend, or stay on a request that then fails).
REPLANNED = f"state='{PLANNED}', attempts=0, cost_usd=NULL, prompt_tokens=NULL, output_tokens=NULL, updated_at=?"


class _BulkPlanner:
    """Writes batches of planned rows and their requests into the ledger (inside plan_manifest's transaction)
    with the same outcome as inserting each row and recording each request one at a time."""

    def __init__(self, c: sqlite3.Connection, store, refresh: bool, now: float, retry_blocked: bool, fresh: bool):
        self.c, self.refresh, self.now, self.retry_blocked, self.fresh = c, refresh, now, retry_blocked, fresh
        self.store = store
        self.lookup = _StoreLookup(store) if store is not None else None

    def cached(self, h: str) -> bool:
        return self.lookup is not None and not self.refresh and self.lookup.has(h)

    def load(self, run_id: int, manifest: Path | str, options: ManifestOptions, refs: _References,
             problems: list[RowProblem]) -> tuple[int, int]:
        """Record the manifest's valid rows and their requests; append its problems. Returns (rows written, one
        per variant; manifest rows)."""
        pending: list[tuple] = []  # (item, [(model, variant, hash, body_json)], extra JSON, position in problems)
        seq = rows = 0
        for entry in _prepared_rows(manifest, options, refs):
            if isinstance(entry, RowProblem):
                problems.append(entry)
                continue
            item, references, reqs, extra = entry
            for ref in references if item.variants else ():
                self.c.execute("INSERT OR REPLACE INTO reference_files(sha256, path) VALUES (?,?)", (ref.sha256, ref.path))
            pending.append((item, reqs, extra, len(problems)))
            rows += 1
            if len(pending) >= PLAN_BATCH_ROWS:
                seq, duplicates = self.flush(run_id, seq, pending, problems, manifest, options)
                rows -= duplicates
                pending.clear()
        seq, duplicates = self.flush(run_id, seq, pending, problems, manifest, options)
        return seq, rows - duplicates

    def flush(self, run_id: int, seq: int, pending: list, problems: list, manifest: Path,
              options: ManifestOptions) -> tuple[int, int]:
        """Write a batch of rows and their requests. Returns (the next seq, how many rows were rejected as
        duplicate ids)."""
        if not pending:
            return seq, 0
        c = self.c
        params = []
        s = seq
        for item, reqs, extra, _pos in pending:
            for _model, variant, h, _body in reqs:
                params.append((run_id, s, item.row, item.id, variant, h, item.prompt, extra))
                s += 1
        recorded: list[tuple] = []
        c.execute("SAVEPOINT plan_batch")
        try:
            c.executemany("INSERT INTO rows(run_id, seq, row, id, variant, request_hash, prompt, extra_json) VALUES (?,?,?,?,?,?,?,?)", params)
        except sqlite3.IntegrityError:  # a duplicate id in this batch: redo it a row at a time to report it
            c.execute("ROLLBACK TO plan_batch")
            c.execute("RELEASE plan_batch")
            s = seq
            dups: list[tuple[int, RowProblem]] = []
            for item, reqs, extra, pos in pending:
                for req in reqs:
                    try:
                        c.execute("INSERT INTO rows(run_id, seq, row, id, variant, request_hash, prompt, extra_json) VALUES (?,?,?,?,?,?,?,?)",
                                  (run_id, s, item.row, item.id, req[1], req[2], item.prompt, extra))
                    except sqlite3.IntegrityError:
                        first = c.execute("SELECT row FROM rows WHERE run_id=? AND id=? LIMIT 1", (run_id, item.id)).fetchone()
                        dups.append((pos, RowProblem(str(manifest), item.row, options.id_column, item.id,
                                                     f"duplicate id (first used at row {first[0] if first else '?'}); ids must be unique")))
                        break
                    s += 1
                    recorded.append(req)
            for pos, problem in reversed(dups):  # where the one-at-a-time loop would have reported them
                problems.insert(pos, problem)
            self._record(recorded)
            return s, len(dups)
        c.execute("RELEASE plan_batch")
        self._record([req for _item, reqs, _extra, _pos in pending for req in reqs])
        return s, 0

    def _record(self, reqs: list[tuple]) -> None:
        c, now = self.c, self.now
        batch: dict[str, tuple] = {}
        for req in reqs:
            batch.setdefault(req[2], req)
        existing: dict[str, str] = {}
        if not self.fresh:
            existing = dict(c.execute("SELECT hash, state FROM requests WHERE hash IN (SELECT value FROM json_each(?))",
                                      (json.dumps(list(batch)),)).fetchall())
        new = []
        for h, (model, variant, _h, body_json) in batch.items():
            state = existing.get(h)
            if state is None:
                cached = self.cached(h)
                new.append((h, model, body_json, SUCCEEDED if cached else PLANNED, int(cached), variant, now))
            elif state == QUEUED:
                continue  # in a job already: it will be collected
            elif self.refresh and state in (SUCCEEDED, FAILED, BLOCKED):
                c.execute(f"UPDATE requests SET {REPLANNED}, error=NULL, finish_reason=NULL, cached=0 WHERE hash=?", (now, h))
            elif state == SUCCEEDED and self.lookup is not None and not self.lookup.has(h):
                # The ledger says done but the image is gone from the cache (cleaned, moved): generate it again.
                c.execute(f"UPDATE requests SET {REPLANNED}, cached=0 WHERE hash=?", (now, h))
            elif state == FAILED or (state == BLOCKED and self.retry_blocked):
                # A new run gives requests that ran out of attempts before a fresh set.
                c.execute(f"UPDATE requests SET {REPLANNED} WHERE hash=?", (now, h))
        # OR IGNORE: a request of an earlier batch of this run (fresh ledger, no lookup) is left as it is.
        c.executemany("INSERT OR IGNORE INTO requests(hash, model, body_json, state, cached, variant, updated_at) VALUES (?,?,?,?,?,?,?)", new)


def plan_manifest(
    ledger: Ledger,
    store: ImageStore | None,
    manifest: Path,
    options: ManifestOptions,
    *,
    refresh: bool = False,
    skip_invalid: bool = False,
    rejects_path: Path | None = None,
    retry_blocked: bool = False,
) -> PlanResult:
    """Validate the manifest and record its rows and requests. Idempotent for an unchanged manifest."""
    manifest = str(manifest) if gcs.is_gcs(manifest) else Path(manifest)
    if isinstance(manifest, Path) and not manifest.exists():
        raise ManifestError(f"{manifest}: no such file; check the path")
    if isinstance(manifest, Path) and manifest.is_dir():
        raise ManifestError(f"{manifest}: is a directory, not a manifest file; pass a .parquet, .csv or .tsv file")
    fingerprint = run_fingerprint(manifest, options)
    existing = ledger.run_by_fingerprint(fingerprint)
    if existing is not None and retry_blocked:
        where, params = ledger.in_run(existing["id"])
        with ledger.transaction() as c:
            c.execute(f"UPDATE requests SET {REPLANNED} WHERE state=? AND {where}", (time.time(), BLOCKED, *params))
    if existing is not None and not refresh:
        return _summary(ledger, existing["id"], new_run=False)

    problems: list[RowProblem] = []
    refs = _References()
    now = time.time()
    result = PlanResult(run_id=0)
    try:
        schema = carried_schema(str(manifest), options)
    except (OSError, pa.ArrowException, ValueError):
        read_manifest(manifest, options)  # a file the reader rejects: raise its ManifestError (file, problem)
        raise
    with ledger.big_page_cache(), ledger.transaction() as c:
        if existing is not None:  # --refresh of the same manifest: plan it again from scratch
            c.execute("DELETE FROM rows WHERE run_id=?", (existing["id"],))
            c.execute("DELETE FROM runs WHERE id=?", (existing["id"],))
        cur = c.execute(
            "INSERT INTO runs(fingerprint, manifest, options_json, extra_schema, created_at) VALUES (?,?,?,?,?)",
            (fingerprint, str(manifest), json.dumps(asdict(options)), schema.serialize().to_pybytes(), now),
        )
        run_id = result.run_id = cur.lastrowid
        # Bulk path: rows and requests go in batches (executemany), each request body is serialised once per
        # row from a per-shape template, cache hits come from one listing per prefix dir, and the requests
        # that already exist are looked up per batch (skipped entirely when the ledger had none). An empty
        # ledger is loaded without its indexes, which are then built once (Ledger.bulk_load).
        fresh = c.execute("SELECT 1 FROM requests LIMIT 1").fetchone() is None
        planner = _BulkPlanner(c, store, refresh, now, retry_blocked, fresh)
        c.execute("SAVEPOINT plan_rows")
        if fresh and ledger.is_empty():
            try:
                with ledger.bulk_load(c):
                    seq, result.rows = planner.load(run_id, manifest, options, refs, problems)
            except sqlite3.IntegrityError:
                # Two rows share an id: plan again with the indexes in place, which find each duplicate where
                # it is and report it with the row it repeats.
                c.execute("ROLLBACK TO plan_rows")
                problems.clear()
                seq, result.rows = planner.load(run_id, manifest, options, refs, problems)
        else:
            seq, result.rows = planner.load(run_id, manifest, options, refs, problems)
        c.execute("RELEASE plan_rows")
        if problems and not skip_invalid:
            shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
            more = len(problems) - len(shown)
            raise ManifestError(
                f"{manifest}: {len(problems)} invalid row(s); nothing was submitted. Fix them, or pass --skip-invalid "
                "to submit the valid rows and write the rejects to a file." + (f" ({more} more not shown)" if more > 0 else ""),
                problems=shown,
            )  # the transaction rolls back: the ledger is as it was
        if result.rows == 0:
            raise ManifestError(f"{manifest}: no valid rows to submit")
        c.execute("UPDATE runs SET row_count=? WHERE id=?", (result.rows, run_id))
        if fresh:  # the ledger held no requests before this run: every request in it is this run's
            c.execute("UPDATE runs SET request_count=(SELECT COUNT(*) FROM requests) WHERE id=?", (run_id,))
        else:
            ledger.set_run_request_count(c, run_id)
    maybe_crash("plan")  # test hook: see batcher/faults.py
    if problems and rejects_path is not None:
        write_rejects(rejects_path, problems)
    summary = _summary(ledger, run_id, new_run=True, planned_rows=seq)
    summary.rejected = len(problems)
    return summary


def _summary(ledger: Ledger, run_id: int, new_run: bool, planned_rows: int | None = None) -> PlanResult:
    """The run's figures. `planned_rows`: how many rows (one per variant) the plan just wrote, if known."""
    c = ledger.conn
    run = c.execute("SELECT row_count, request_count FROM runs WHERE id=?", (run_id,)).fetchone()
    if planned_rows is None:
        planned_rows = c.execute("SELECT COUNT(*) FROM rows WHERE run_id=?", (run_id,)).fetchone()[0]
    if run["request_count"] is None:  # a run planned before the ledger recorded it
        with ledger.transaction() as tx:
            ledger.set_run_request_count(tx, run_id)
        run = c.execute("SELECT row_count, request_count FROM runs WHERE id=?", (run_id,)).fetchone()
    distinct = run["request_count"]
    where, params = ledger.in_run(run_id)
    hits = c.execute(f"SELECT COUNT(*) FROM requests WHERE cached=1 AND {where}", params).fetchone()[0]
    return PlanResult(run_id=run_id, rows=run["row_count"], requests=distinct, cache_hits=hits,
                      duplicates=planned_rows - distinct, new_run=new_run)


def write_rejects(path: Path, problems: list[RowProblem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["file", "row", "column", "value", "reason"])
        for p in problems:
            w.writerow([p.file, p.row, p.column or "", p.value or "", p.message])
    os.replace(tmp, path)


def expected_output_bytes(model: str, size: str | None) -> int:
    spec = catalog.model_spec(model)
    png = (spec.typical_png_bytes.get(size or "1K") if spec else None) or 2_000_000
    return png * 4 // 3 + 2_000  # base64 plus the JSON around it


def shard(ledger: Ledger, limits: ShardLimits, *, limit_requests: int | None = None,
          token_cap_for: Callable[[str], int | None] = lambda model: None) -> list[int]:
    """Group planned requests into new jobs (one model per job). Returns the new job ids.
    A job never holds more enqueued tokens than its model's cap: it could never be created."""
    c = ledger.conn
    new_jobs: list[int] = []
    now = time.time()
    with ledger.big_page_cache(), ledger.transaction():
        models = [r[0] for r in c.execute("SELECT DISTINCT model FROM requests WHERE state=?", (PLANNED,))]
        budget = limit_requests
        for model in models:
            first_rowid = prev_rowid = None  # the job being filled: planned requests of `model` in this rowid range
            count = in_bytes = out_bytes = tokens = 0
            token_cap = token_cap_for(model)
            per_size: dict[str | None, tuple[int, int]] = {}  # image size -> (output bytes, output tokens)
            last_rowid = -1
            done = False
            while not done:
                # A page at a time (bounded memory), in rowid order; the rows already grouped leave the
                # `planned` state only when their job is written, so paging by rowid sees each one once.
                # What the limits need is measured in SQLite: the bodies never come to Python.
                page = c.execute(
                    "SELECT rowid, length(CAST(body_json AS BLOB)), length(body_json), "
                    "CASE WHEN instr(body_json, '\"imageSize\"') THEN json_extract(body_json, '$.generationConfig.imageConfig.imageSize') END, "
                    "CASE WHEN instr(body_json, '\"fileData\"') THEN (length(body_json) - length(replace(body_json, '\"fileData\"', ''))) / 10 ELSE 0 END "
                    "FROM requests WHERE state=? AND model=? AND rowid>? ORDER BY rowid LIMIT ?",
                    (PLANNED, model, last_rowid, SHARD_PAGE)).fetchall()
                if not page:
                    break
                last_rowid = page[-1][0]
                for rowid, body_bytes, body_chars, size, refs in page:
                    if budget is not None and budget <= 0:
                        done = True
                        break
                    line_bytes = body_bytes + 120  # key and wrapper; references grow by their URIs
                    out = per_size.get(size)
                    if out is None:
                        out = per_size[size] = (expected_output_bytes(model, size), expected_output_tokens(model, size))
                    exp = out[0]
                    req_tokens = prompt_tokens_estimate(body_chars, refs) + out[1]
                    if count and (count >= limits.max_requests or in_bytes + line_bytes > limits.max_input_bytes
                                  or out_bytes + exp > limits.max_output_bytes
                                  or (token_cap is not None and tokens + req_tokens > token_cap)):
                        new_jobs.append(_new_job(ledger, model, first_rowid, prev_rowid, count, in_bytes, tokens, now))
                        first_rowid, count, in_bytes, out_bytes, tokens = None, 0, 0, 0, 0
                    if first_rowid is None:
                        first_rowid = rowid
                    prev_rowid = rowid
                    count += 1
                    in_bytes += line_bytes
                    out_bytes += exp
                    tokens += req_tokens
                    if budget is not None:
                        budget -= 1
            if count:
                new_jobs.append(_new_job(ledger, model, first_rowid, prev_rowid, count, in_bytes, tokens, now))
    return new_jobs


def _new_job(ledger: Ledger, model: str, first_rowid: int, last_rowid: int, count: int, in_bytes: int, tokens: int,
             now: float) -> int:
    """A job of the `count` planned requests of `model` with rowids from first_rowid to last_rowid (shard takes
    them in rowid order, so they are exactly the planned requests of that model in that range)."""
    c = ledger.conn
    cur = c.execute(
        "INSERT INTO jobs(display_name, model, state, request_count, input_bytes, est_tokens, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
        (f"pending-{now}-{count}-{first_rowid}", model, J_PLANNED, count, in_bytes, tokens, now, now),
    )
    job_id = cur.lastrowid
    # Deterministic, unique per workdir and job: how a crashed create is found again in the API's job list.
    c.execute("UPDATE jobs SET display_name=? WHERE id=?", (f"batcher-{ledger.ledger_id}-job{job_id:05d}", job_id))
    members = "WHERE state=? AND model=? AND rowid BETWEEN ? AND ?"  # a range of the (state, model) index
    added = c.execute(f"INSERT INTO job_requests(job_id, hash) SELECT ?, hash FROM requests {members} ORDER BY rowid",
                      (job_id, PLANNED, model, first_rowid, last_rowid)).rowcount
    queued = c.execute(f"UPDATE requests SET state=?, job_id=?, updated_at=? {members}",
                       (QUEUED, job_id, now, PLANNED, model, first_rowid, last_rowid)).rowcount
    if added != count or queued != count:  # the range must hold exactly the requests shard counted
        raise LedgerError(f"job {job_id}: expected {count} planned requests of {model} in rowids {first_rowid}..{last_rowid}, "
                          f"found {added} and {queued}")
    return job_id


def plan_fallbacks(ledger: Ledger, store: ImageStore | None, run_id: int, fallback_model: str) -> int:
    """Requests of the run that failed for good on their model get a request to `fallback_model` (same
    prompt and settings; its own hash, so its image is cached under it), and the run's rows point to it.
    Requests the fallback model can't take (an aspect ratio or size it lacks) stay failed. Returns how many."""
    spec = catalog.model_spec(fallback_model)
    if spec is None:
        raise ManifestError(f"fallback model {fallback_model!r} is not known; use one of {', '.join(catalog.MODELS)}")
    now = time.time()
    created = 0
    where, params = ledger.in_run(run_id)
    with ledger.transaction() as c:
        failed = c.execute(f"SELECT hash, body_json, variant, error FROM requests WHERE state=? AND model<>? AND {where}",
                           (FAILED, fallback_model, *params)).fetchall()
        for r in failed:
            body = json.loads(r["body_json"])
            image_config = body.get("generationConfig", {}).get("imageConfig", {})
            if image_config.get("aspectRatio", "1:1") not in spec.aspect_ratios or \
                    image_config.get("imageSize", spec.default_image_size) not in spec.image_sizes:
                continue
            h = identity_hash(fallback_model, body, r["variant"])
            if c.execute("SELECT 1 FROM requests WHERE hash=?", (h,)).fetchone() is None:
                cached = store is not None and store.has(h)
                c.execute(
                    "INSERT INTO requests(hash, model, body_json, state, cached, variant, fallback_of, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                    (h, fallback_model, r["body_json"], SUCCEEDED if cached else PLANNED, int(cached), r["variant"], r["hash"], now))
            c.execute("UPDATE rows SET request_hash=? WHERE run_id=? AND request_hash=?", (h, run_id, r["hash"]))
            created += 1
        if created:
            ledger.set_run_request_count(c, run_id)
    return created
