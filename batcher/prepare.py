"""Preparing manifest rows: validated rows -> their requests (hash and body JSON), in columnar batches.

Reading, validating and hashing rows is CPU-bound Python, and so is writing them into the ledger: in one
process the two take turns on one core. For a large local manifest the planner therefore takes its batches
from a child process (`python -m batcher.prepare`) on another core, which streams them back while the planner
writes the ones before. A batch travels as a handful of lists (cheap to pickle: ~0.5 µs a row, against ~2.5 µs
for a tuple per row), and the same batches come from either path. The cache lookups for the rows' requests
are made here too (in the child, for a large manifest).

Protocol: pickle frames on the child's stdin and stdout (between two copies of this same code).
    -> (manifest, options, batch_rows, cache_root)
    <- ("batch", PreparedBatch) ...
    <- ("manifest-error", message, problems)    (instead of the rest)
    <- ("done", peak_rss_kb)
The child stops when the parent closes its end of the pipe (it finished early, or died).

BATCHER_PLAN_PROCESS=0 always prepares in-process, =1 always in a child; unset, a child is used for a local
manifest of about CHILD_MIN_ROWS rows or more on a machine with two or more CPUs.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .children import child_env, module_command, peak_rss_kb
from .errors import BatcherError, ManifestError
from .faults import maybe_crash
from .manifest import ManifestOptions, ManifestRow, RowProblem, read_manifest
from .requests import (
    HASH_SCHEMA_VERSION, ImageRequest, ReferenceImage, canonical_json, dump_body, file_sha256, image_mime_type,
    request_body, request_hash,
)
from .store import ImageStore, StoreLookup

log = logging.getLogger(__name__)

ENV_PLAN_PROCESS = "BATCHER_PLAN_PROCESS"
CHILD_MIN_ROWS = 200_000  # below this the child's start-up (~0.5 s of imports) outweighs the overlap
CSV_BYTES_PER_ROW = 100  # a rough size of a CSV/TSV row, to guess its row count from the file size


class References:
    """Content hashes of reference images, computed once per distinct path."""

    def __init__(self):
        self._by_path: dict[str, ReferenceImage] = {}

    def get(self, path: str) -> ReferenceImage:
        ref = self._by_path.get(path)
        if ref is None:
            ref = ReferenceImage(sha256=file_sha256(path), mime_type=image_mime_type(path), path=path)
            self._by_path[path] = ref
        return ref


def image_requests(row: ManifestRow, refs: References) -> list[ImageRequest]:
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


def extra_json(extra: dict) -> str:
    """json.dumps(extra, default=str, ensure_ascii=False) of a row's extra columns, ~3x faster for what they
    usually hold (text, integers, nulls, booleans); anything else goes through the encoder."""
    parts = []
    for key, value in extra.items():
        kind = type(value)
        if type(key) is not str:  # a column name is text; anything else as json.dumps writes it
            return _EXTRA_JSON.encode(extra)
        if kind is str:
            parts.append(f"{_encode_str(key)}: {_encode_str(value)}")
        elif kind is int:
            parts.append(f"{_encode_str(key)}: {int.__repr__(value)}")
        elif value is None or kind is bool:
            parts.append(f"{_encode_str(key)}: {_JSON_CONSTANTS[value]}")
        else:
            return _EXTRA_JSON.encode(extra)
    return "{" + ", ".join(parts) + "}"


_JSON_CONSTANTS = {None: "null", True: "true", False: "false"}


@dataclass
class PreparedBatch:
    """Consecutive manifest rows, prepared. Per valid row: its row number, id, prompt, extra columns (JSON or
    None), reference images and how many requests it has (its variants); per request, in row order: its row
    (an index into the row lists), model, variant, hash, body JSON, image size and, when asked, whether its
    image is in the cache. `problems` are the rejected rows, each with how many valid rows come before it."""

    rows: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    extras: list[str | None] = field(default_factory=list)
    references: list[tuple] = field(default_factory=list)
    variants: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # per request: its row's index in the batch
    models: list[str] = field(default_factory=list)
    request_variants: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    sizes: list[str | None] = field(default_factory=list)  # per request: its image size (None: the model's default)
    cached: list[bool] = field(default_factory=list)  # per request, when asked: is its image in the cache
    problems: list[tuple[int, RowProblem]] = field(default_factory=list)

    def requests(self, start: int = 0, stop: int | None = None) -> list[tuple]:
        """(model, variant, hash, body JSON, image size, in the cache or None: not looked up) of requests [start, stop)."""
        s = slice(start, stop)
        cached = self.cached[s] if self.cached else itertools.repeat(None)
        return list(zip(self.models[s], self.request_variants[s], self.hashes[s], self.bodies[s], self.sizes[s], cached))


def prepared_batches(manifest: Path | str, options: ManifestOptions, refs: References, batch_rows: int,
                     cache_root: str | None = None) -> Iterator[PreparedBatch]:
    """The manifest's rows, prepared, `batch_rows` valid rows at a time (problems in between ride along).
    With `cache_root` (a plain local cache), whether each request's image is in it, too."""
    templates = _Templates()
    lookup = StoreLookup(ImageStore(cache_root)) if cache_root is not None else None
    rows: list[tuple] = []  # a tuple per row and per request, made into columns per batch (fewer appends)
    reqs: list[tuple] = []
    problems: list[tuple[int, RowProblem]] = []
    for item in read_manifest(manifest, options):
        if isinstance(item, RowProblem):
            problems.append((len(rows), item))
            continue
        try:
            references = tuple(refs.get(p) for p in item.reference_images)
        except OSError as exc:
            problems.append((len(rows), RowProblem(str(manifest), item.row, "reference_images", None,
                                                   f"cannot read reference image: {exc}")))
            continue
        owner = len(rows)
        rows.append((item.row, item.id, item.prompt, extra_json(item.extra) if item.extra else None,
                     references, item.variants))
        for v in range(item.variants):
            model, variant, h, body = templates.request(item, references, v)
            reqs.append((owner, model, variant, h, body, item.image_size))
        if len(rows) >= batch_rows:
            yield _columns(rows, reqs, problems, lookup)
            rows, reqs, problems = [], [], []
    if rows or problems:
        yield _columns(rows, reqs, problems, lookup)


def _columns(rows: list[tuple], reqs: list[tuple], problems: list, lookup: StoreLookup | None) -> PreparedBatch:
    b = PreparedBatch(problems=problems)
    if rows:
        b.rows, b.ids, b.prompts, b.extras, b.references, b.variants = map(list, zip(*rows))
    if reqs:
        b.owners, b.models, b.request_variants, b.hashes, b.bodies, b.sizes = map(list, zip(*reqs))
        if lookup is not None:
            b.cached = lookup.has_all(b.hashes)
    return b


def batches(manifest: Path | str, options: ManifestOptions, refs: References, batch_rows: int,
            cache_root: str | None = None) -> Iterator[PreparedBatch]:
    """prepared_batches, from a child process when that is faster (see module doc)."""
    if use_child(manifest):
        return batches_from_child(manifest, options, batch_rows, cache_root)
    return prepared_batches(manifest, options, refs, batch_rows, cache_root)


def use_child(manifest) -> bool:
    setting = os.environ.get(ENV_PLAN_PROCESS, "").strip()
    if setting not in ("", "0", "1"):
        raise BatcherError(f"{ENV_PLAN_PROCESS}={setting!r}: expected 0 (in-process) or 1 (a child process)")
    if not isinstance(manifest, os.PathLike):  # gs://: read once, by the planner itself (and its credentials)
        return False
    if setting:
        return setting == "1"
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return cpus >= 2 and estimated_rows(manifest) >= CHILD_MIN_ROWS


def estimated_rows(manifest: os.PathLike) -> int:
    path = os.fspath(manifest)
    if path.lower().endswith((".parquet", ".pq")):
        try:
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
        except Exception:  # unreadable: the reader reports it, in-process
            return 0
    try:
        return os.path.getsize(path) // CSV_BYTES_PER_ROW
    except OSError:
        return 0


def batches_from_child(manifest: Path | str, options: ManifestOptions, batch_rows: int,
                       cache_root: str | None = None) -> Iterator[PreparedBatch]:
    proc = subprocess.Popen(module_command("prepare"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=child_env(), close_fds=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        pickle.dump((manifest, options, batch_rows, cache_root), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.close()
        while True:
            try:
                message = pickle.load(proc.stdout)
            except (EOFError, pickle.UnpicklingError):  # it died between frames, or in the middle of one
                raise BatcherError(f"preparing {manifest} in a child process failed (exit status {proc.wait()}); "
                                   f"its error is above. Set {ENV_PLAN_PROCESS}=0 to prepare in-process") from None
            if message[0] == "batch":
                yield message[1]
            elif message[0] == "manifest-error":
                raise ManifestError(message[1], problems=message[2])
            else:
                log.info("prepared %s in a child process (peak RSS %.0f MB)", manifest, message[1] / 1024)
                return
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _child_main() -> None:
    # Millions of short-lived tuples and no reference cycles: the cyclic GC would only rescan them (~20 % of the time).
    gc.disable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the planner's to handle; it stops us
    manifest, options, batch_rows, cache_root = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer
    try:
        for b in prepared_batches(manifest, options, References(), batch_rows, cache_root):
            maybe_crash("prepare")  # test hook: see batcher/faults.py
            pickle.dump(("batch", b), out, protocol=pickle.HIGHEST_PROTOCOL)
    except ManifestError as exc:
        pickle.dump(("manifest-error", str(exc), exc.problems), out, protocol=pickle.HIGHEST_PROTOCOL)
    pickle.dump(("done", peak_rss_kb()), out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


if __name__ == "__main__":
    from batcher.prepare import _child_main as main  # the module itself, not __main__: pickles name its classes

    try:
        main()
    except BrokenPipeError:  # the planner stopped reading (it failed, finished early, or was killed)
        os._exit(0)
