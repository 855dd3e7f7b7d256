"""Preparing manifest rows: validated rows -> their requests (hash and body JSON), in columnar batches.

Reading, validating and hashing rows is CPU-bound Python, and so is writing them into the ledger: in one
process the two take turns on one core. For a large local manifest the planner therefore takes its batches
from a child process (`python -m batcher.planning.prepare`) on another core, which streams them back while the planner
writes the ones before. A batch travels as a handful of lists (cheap to pickle: ~0.5 µs a row, against ~2.5 µs
for a tuple per row), and the same batches come from either path. The cache lookups for the rows' requests
are made here too (in the child, for a large manifest).

Protocol: pickle frames on the child's stdin and stdout (between two copies of this same code).
    -> (manifest, options, batch_rows, cache_root, measure)
    <- ("batch", PreparedBatch) ...
    <- ("manifest-error", message, problems)    (instead of the rest)
    <- ("done", peak_rss_kb)
The child stops when the parent closes its end of the pipe (it finished early, or died).

BATCHER_PLAN_PROCESS=0 always prepares in-process, =1 always in a child; unset, a child is used for a local
manifest of about PrepareTuning.child_min_rows rows or more on a machine with two or more CPUs.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..children import child_env, module_command, peak_rss_kb
from ..cost.pricing import current_table, default_table, use_prices
from ..errors import BatcherError, ManifestError
from ..faults import maybe_crash
from ..manifest import ManifestOptions, ManifestRow, RowBlock, RowProblem, read_manifest_blocks
from .packing import measure_body
from .requests import (
    HASH_SCHEMA_VERSION, ImageRequest, ReferenceImage, canonical_json, dump_body, file_sha256, image_mime_type,
    request_body, request_hash,
)
from ..storage.store import ImageStore, StoreLookup

log = logging.getLogger(__name__)

ENV_PLAN_PROCESS = "BATCHER_PLAN_PROCESS"
CSV_BYTES_PER_ROW = 100  # a rough size of a CSV/TSV row, to guess its row count from the file size


@dataclass(frozen=True)
class PrepareTuning:
    """Where preparing rows changes strategy (measured on 2 cores at 1M rows; docs/benchmarks.md). Tests make them
    small; a child process gets the same values."""

    child_min_rows: int = 200_000  # below this the child's start-up (~0.5 s of imports) outweighs the overlap
    manifest_block_rows: int = 65536  # rows per block read from the manifest
    columns_at_a_time: bool = True  # False: every block a row at a time (tests compare the two)
    # Requests remembered to mark repeats (~140 bytes each; ~850 MB child at 3M): up to here a plan shards as it
    # loads. 2M -> 3M (issue 19): a 3M-row dry run 59 s -> 41 s, 10M 246 s -> 216 s, 1.7 GB summed at 10M.
    max_marked_requests: int = 3_000_000


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
        key = _shape_key(row, references, variant)
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

    def shape(self, row: ManifestRow, references: tuple, variant: int) -> tuple | None:
        """The template (body before and after the prompt, identity before and after) of requests with `row`'s
        settings, checked on `row`; None: they have none (each is built and hashed in full)."""
        self.request(row, references, variant)
        try:
            return self._shapes.get(_shape_key(row, references, variant))
        except TypeError:  # an unhashable value
            return None

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



def _shape_key(row: ManifestRow, references: tuple, variant: int) -> tuple:
    return (row.model, row.aspect_ratio, row.image_size, row.temperature, row.top_p, row.seed,
            row.system_instruction, references, variant)


_encode_str = json.encoder.encode_basestring  # what json.dumps(str, ensure_ascii=False) writes
_EXTRA_JSON = json.JSONEncoder(default=str, ensure_ascii=False)  # json.dumps(extra, default=str, ensure_ascii=False)


def extra_json(extra: dict) -> str:
    """json.dumps(extra, default=str, ensure_ascii=False) of a row's extra columns, ~3x faster for what they
    usually hold (text, integers, nulls, booleans); anything else goes through the encoder."""
    parts = []
    for key, value in extra.items():
        text = _value_json(value)
        if text is None or type(key) is not str:  # a column name is text; anything else as json.dumps writes it
            return _EXTRA_JSON.encode(extra)
        parts.append(f"{_encode_str(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def extras_json(names: list[str], columns: list[list], n: int) -> list[str | None]:
    """Per row of a block of `n` rows, its extra columns (`names`, each one's values) as extra_json writes
    them, or None if there are none."""
    if not names:
        return [None] * n
    if not all(type(name) is str for name in names):
        return [extra_json(dict(zip(names, values))) for values in zip(*columns)]
    texts = []
    for name, values in zip(names, columns):
        if set(map(type, values)) == {str}:
            column = [_encode_str(v) for v in values]
        else:
            column = [_value_json(v) for v in values]
            if None in column:
                return [extra_json(dict(zip(names, values))) for values in zip(*columns)]
        key = _encode_str(name) + ": "
        texts.append([key + text for text in column])
    if len(texts) == 1:
        return ["{" + text + "}" for text in texts[0]]
    return ["{" + ", ".join(parts) + "}" for parts in zip(*texts)]


def _value_json(value) -> str | None:
    """json.dumps(value, ensure_ascii=False) for text, integers, booleans and null; None for anything else."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    if value is None or kind is bool:
        return _JSON_CONSTANTS[value]
    return None


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
    measures: list[tuple | None] = field(default_factory=list)  # when asked: packing.measure_body, None for a cache hit
    repeated: list[int] = field(default_factory=list)  # requests (indexes) that repeat an earlier one of the plan
    repeats_marked: bool = True  # `repeated` holds every repeat (the preparer still remembers every request)
    problems: list[tuple[int, RowProblem]] = field(default_factory=list)

    def requests(self, start: int = 0, stop: int | None = None) -> list[tuple]:
        """(model, variant, hash, body JSON, image size, in the cache or None: not looked up) of requests [start, stop)."""
        s = slice(start, stop)
        cached = self.cached[s] if self.cached else itertools.repeat(None)
        return list(zip(self.models[s], self.request_variants[s], self.hashes[s], self.bodies[s], self.sizes[s], cached))


def prepared_batches(manifest: Path | str, options: ManifestOptions, refs: References, batch_rows: int,
                     cache_root: str | None = None, measure: bool = False,
                     list_cache_ahead: bool = False, tuning: PrepareTuning = PrepareTuning()) -> Iterator[PreparedBatch]:
    """The manifest's rows, prepared, `batch_rows` valid rows at a time (problems in between ride along).
    With `cache_root` (a plain local cache), whether each request's image is in it, too; `list_cache_ahead`:
    list the whole cache from the start, in threads, while the first rows are read (a large manifest's
    requests touch every prefix dir anyway). `measure`: what each request that is not a cache hit counts
    against a job's limits (for a plan that shards as it loads).

    A block of rows that all share their settings (no problems, no per-row settings or references: the usual
    nightly manifest) is prepared a column at a time; any other block a row at a time. Both give the same
    batches (tests/test_planning.py compares them)."""
    templates = _Templates()
    lookup = StoreLookup(ImageStore(cache_root)) if cache_root is not None else None
    if lookup is not None and list_cache_ahead:
        lookup.list_ahead()
    out = _Batches(batch_rows, lookup, measure, tuning.max_marked_requests)
    for block in read_manifest_blocks(manifest, options, tuning.manifest_block_rows):
        shapes = _shared_shapes(block, templates) if tuning.columns_at_a_time else None
        if shapes is None:
            for item in block.items():
                out.add(item, refs, templates, manifest)
                if out.full():
                    yield out.take()
            continue
        hashes, bodies = _requests_of_prompts(block.prompts, shapes)
        extras = extras_json(block.extra_names, block.extra_values, block.n)
        start = 0
        while start < block.n:
            stop = min(block.n, start + out.room())
            out.add_shared(block, start, stop, hashes, bodies, extras)
            start = stop
            if out.full():
                yield out.take()
    if out.rows or out.problems:
        yield out.take()


def _shared_shapes(block: RowBlock, templates: _Templates) -> list[tuple] | None:
    """When every row of the block has the same settings and no problems: the template of each variant's
    requests. None: the block goes a row at a time."""
    if block.problems or block.references is not None or block.n == 0:
        return None
    if any(values is not None for values in block.settings.values()):
        return None
    first = block.row(0)
    shapes = [templates.shape(first, (), v) for v in range(first.variants)]
    return None if None in shapes else shapes


def _requests_of_prompts(prompts: list[str], shapes: list[tuple]) -> tuple[list[list[str]], list[list[str]]]:
    """Per variant (each one's template), the hash and body JSON of each prompt's request."""
    encoded = [_encode_str(p) for p in prompts]
    sha256 = hashlib.sha256
    hashes, bodies = [], []
    for body_pre, body_post, ident_pre, ident_post in shapes:
        hashes.append([sha256((ident_pre + p + ident_post).encode("utf-8")).hexdigest() for p in encoded])
        bodies.append([body_pre + p + body_post for p in encoded])
    return hashes, bodies


class _Batches:
    """Prepared rows and requests, gathered into batches of `batch_rows` valid rows: a tuple per row and per
    request, made into columns per batch (fewer appends than a list per column)."""

    def __init__(self, batch_rows: int, lookup: StoreLookup | None, measure: bool, max_marked_requests: int):
        self.batch_rows, self.lookup, self.measure = batch_rows, lookup, measure
        self.max_marked_requests = max_marked_requests
        # The requests so far (while they fit in max_marked_requests): one seen before is marked in
        # PreparedBatch.repeated, so a bulk load need not write it twice and remove the copy afterwards.
        self.requests_seen: set[str] | None = set()
        self.rows: list[tuple] = []
        self.reqs: list[tuple] = []
        self.problems: list[tuple[int, RowProblem]] = []

    def room(self) -> int:
        return self.batch_rows - len(self.rows)

    def full(self) -> bool:
        return len(self.rows) >= self.batch_rows

    def add(self, item: ManifestRow | RowProblem, refs: References, templates: _Templates, manifest) -> None:
        """One row (or problem) of the manifest."""
        if isinstance(item, RowProblem):
            self.problems.append((len(self.rows), item))
            return
        try:
            references = tuple(refs.get(p) for p in item.reference_images)
        except OSError as exc:
            self.problems.append((len(self.rows), RowProblem(str(manifest), item.row, "reference_images", None,
                                                             f"cannot read reference image: {exc}")))
            return
        owner = len(self.rows)
        self.rows.append((item.row, item.id, item.prompt, extra_json(item.extra) if item.extra else None,
                          references, item.variants))
        for v in range(item.variants):
            model, variant, h, body = templates.request(item, references, v)
            self.reqs.append((owner, model, variant, h, body, item.image_size))

    def add_shared(self, block: RowBlock, start: int, stop: int, hashes: list[list[str]], bodies: list[list[str]],
                   extras: list[str | None]) -> None:
        """Rows [start, stop) of a block whose rows share their settings (_shared_shapes), with their
        requests' hashes and bodies per variant and their extra columns' JSON."""
        k = stop - start
        first = len(self.rows)
        model, size, variants = block.defaults["model"], block.defaults["image_size"], block.defaults["variants"]
        numbers = block.numbers[start:stop] if block.numbers is not None else range(block.row0 + start, block.row0 + stop)
        self.rows.extend(zip(numbers, block.ids[start:stop], block.prompts[start:stop], extras[start:stop],
                             itertools.repeat((), k), itertools.repeat(variants, k)))
        if variants == 1:
            self.reqs.extend(zip(range(first, first + k), itertools.repeat(model, k), itertools.repeat(0, k),
                                 hashes[0][start:stop], bodies[0][start:stop], itertools.repeat(size, k)))
            return
        for j in range(start, stop):
            owner = first + j - start
            self.reqs.extend((owner, model, v, hashes[v][j], bodies[v][j], size) for v in range(variants))

    def take(self) -> PreparedBatch:
        b = PreparedBatch(problems=self.problems)
        if self.rows:
            b.rows, b.ids, b.prompts, b.extras, b.references, b.variants = map(list, zip(*self.rows))
        if self.reqs:
            b.owners, b.models, b.request_variants, b.hashes, b.bodies, b.sizes = map(list, zip(*self.reqs))
            if self.lookup is not None:
                b.cached = self.lookup.has_all(b.hashes)
            if self.measure:
                b.measures = [None if hit else measure_body(model, body, size) for model, body, size, hit
                              in zip(b.models, b.bodies, b.sizes, b.cached or itertools.repeat(False))]
            b.repeats_marked = self.requests_seen is not None
            b.repeated = self._repeated(b.hashes)
        self.rows, self.reqs, self.problems = [], [], []
        return b

    def _repeated(self, hashes: list[str]) -> list[int]:
        seen = self.requests_seen
        if seen is None:
            return []
        repeated = []
        if len(set(hashes)) == len(hashes) and seen.isdisjoint(hashes):  # the usual batch: every request new
            seen.update(hashes)
        else:
            for i, h in enumerate(hashes):
                if h in seen:
                    repeated.append(i)
                else:
                    seen.add(h)
        if len(seen) > self.max_marked_requests:  # bounded memory: later repeats go in, and the bulk load removes them
            self.requests_seen = None
        return repeated


def batches(manifest: Path | str, options: ManifestOptions, refs: References, batch_rows: int,
            cache_root: str | None = None, measure: bool = False,
            tuning: PrepareTuning = PrepareTuning()) -> Iterator[PreparedBatch]:
    """prepared_batches, from a child process when that is faster (see module doc). A child starts at once, so
    the caller can work while it reads its first rows; close() the iterator if it is not read to its end."""
    if use_child(manifest, tuning):
        return ChildBatches(manifest, options, batch_rows, cache_root, measure, tuning)
    return prepared_batches(manifest, options, refs, batch_rows, cache_root, measure, tuning=tuning)


def use_child(manifest, tuning: PrepareTuning = PrepareTuning()) -> bool:
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
    return cpus >= 2 and estimated_rows(manifest) >= tuning.child_min_rows


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


class ChildBatches:
    """The batches of a child process (python -P -m batcher.planning.prepare), which starts when this is made."""

    def __init__(self, manifest: Path | str, options: ManifestOptions, batch_rows: int,
                 cache_root: str | None = None, measure: bool = False, tuning: PrepareTuning = PrepareTuning()):
        self.manifest = manifest
        self.proc = subprocess.Popen(module_command("planning.prepare"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=child_env(), close_fds=True)
        try:
            assert self.proc.stdin is not None
            # The prices in force (a job spec's, WORKDIR/prices.json) size each request against the token cap (measure):
            # the child measures with the same table.
            prices = current_table().overrides
            pickle.dump((manifest, options, batch_rows, cache_root, measure, tuning, prices), self.proc.stdin,
                        protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.close()
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[PreparedBatch]:
        proc, manifest = self.proc, self.manifest
        assert proc.stdout is not None
        try:
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
            self.close()

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class _Sender:
    """Messages to the planner, pickled here and written by a thread, up to AHEAD batches ahead: preparing goes
    on while the planner is busy writing (a pipe holds 64 KB, a batch ~2 MB), so it never waits for a block of
    rows to be read and hashed."""

    AHEAD = 8

    def __init__(self, out):
        self.out = out
        self.queue: queue.Queue[bytes | None] = queue.Queue(self.AHEAD)
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._write, name="batcher-prepare-sender", daemon=True)
        self.thread.start()

    def send(self, message: tuple) -> None:
        if self.failed is not None:
            raise self.failed
        self.queue.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.failed is not None:
            raise self.failed

    def _write(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.failed is None:
                try:
                    self.out.write(data)
                except BaseException as exc:  # the planner stopped reading: say so to the sender, drain the queue
                    self.failed = exc
        if self.failed is None:
            try:
                self.out.flush()
            except BaseException as exc:
                self.failed = exc


def _child_main() -> None:
    # Millions of short-lived tuples and no reference cycles: the cyclic GC would only rescan them (~20 % of the time).
    gc.disable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the planner's to handle; it stops us
    manifest, options, batch_rows, cache_root, measure, tuning, prices = pickle.load(sys.stdin.buffer)
    sender = _Sender(sys.stdout.buffer)
    try:
        with use_prices(default_table().with_overrides(prices)):
            for b in prepared_batches(manifest, options, References(), batch_rows, cache_root, measure,
                                      list_cache_ahead=True, tuning=tuning):
                maybe_crash("prepare")  # test hook: see batcher/faults.py
                sender.send(("batch", b))
    except ManifestError as exc:
        sender.send(("manifest-error", str(exc), exc.problems))
    sender.send(("done", peak_rss_kb()))
    sender.close()


if __name__ == "__main__":
    from batcher.planning.prepare import _child_main as main  # the module itself, not __main__: pickles name its classes

    try:
        main()
    except BrokenPipeError:  # the planner stopped reading (it failed, finished early, or was killed)
        os._exit(0)
