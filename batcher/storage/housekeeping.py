"""Looking after the image cache, local or gs://: what it holds (`stats`), whether its images are whole (`verify`),
and making room (`gc`). `batcher cache stats | verify | gc` is a thin layer over these three.

An entry is <hash[:2]>/<hash><image extension> with its <hash>.json (store.ImageStore). What is never touched:
- temp files (`.tmp-...`, `.NAME.tmp`, see atomic): a collect may be writing them;
- an entry changed in the last `min_age` seconds: a writer puts the .json a moment before the image, and
  `--refresh` replaces an entry in place, so a young entry may be half-way through a write;
- a file changed between the listing and its removal (checked: inode and mtime locally, generation on GCS).
The image goes before its .json (readers take the image's presence as the entry's). Bad entries are moved to
<root>/quarantine/<when>/, never deleted, so the next run generates them again and the evidence stays.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator

from ..errors import UsageError
from ..progress import Progress
from . import atomic, gcs
from .store import DIGESTS, HASH_CHARS, IMAGE_EXTS, GcsImageStore, ImageStore, InvalidImage, open_store, recorded_digest, verify_image

QUARANTINE = "quarantine"
# An hour: far longer than any write of an entry takes (milliseconds to seconds), short enough not to matter to a
# cache whose entries live for weeks.
DEFAULT_MIN_AGE = 3600.0
IMAGE_SUFFIXES = (*IMAGE_EXTS, ".img")  # .img: a format without an extension of its own (store.put)
META_SUFFIX = ".json"
DAY = 86400.0
AGE_BUCKETS = ((DAY, "<1d"), (7 * DAY, "1-7d"), (30 * DAY, "7-30d"), (90 * DAY, "30-90d"), (math.inf, ">90d"))
_HEX = frozenset("0123456789abcdef")


# ---- what a listing gives ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CacheFile:
    path: str  # a local path or a gs:// URI
    size: int
    mtime: float  # when it was last written, epoch seconds
    version: object  # what it was when listed: (inode, mtime_ns) locally, its generation on GCS
    links: int = 1  # hard links to it: a local dataset links its images from the cache


@dataclass(slots=True)
class Entry:
    hash: str
    images: list[CacheFile]
    meta: CacheFile | None = None

    @property
    def files(self) -> list[CacheFile]:
        return [*self.images, self.meta] if self.meta is not None else list(self.images)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def written(self) -> float:
        """When its image was written (an entry without one: its .json)."""
        return max(f.mtime for f in self.images) if self.images else self.meta.mtime

    @property
    def last_change(self) -> float:
        return max(f.mtime for f in self.files)


def _is_prefix(name: str) -> bool:
    return len(name) == 2 and all(c in _HEX for c in name)


def _is_temp(name: str) -> bool:
    return name.startswith(atomic.UNIQUE_PREFIX) or (name.startswith(".") and name.endswith(".tmp"))


def _entries_of(named: Iterable[tuple[str, CacheFile]], temps: list[CacheFile]) -> list[Entry]:
    """The entries among one prefix dir's files, by hash; temp files go to `temps`; files not named like an entry
    are not batcher's and are left out."""
    by_hash: dict[str, Entry] = {}
    for name, f in named:
        if _is_temp(name):
            temps.append(f)
            continue
        h, suffix = name[:HASH_CHARS], name[HASH_CHARS:]
        if len(h) != HASH_CHARS or not _HEX.issuperset(h):
            continue
        if suffix in IMAGE_SUFFIXES:
            by_hash.setdefault(h, Entry(h, [])).images.append(f)
        elif suffix == META_SUFFIX:
            by_hash.setdefault(h, Entry(h, [])).meta = f
    return [by_hash[h] for h in sorted(by_hash)]


class _LocalCache:
    def __init__(self, root: Path):
        self.root = root
        self.name = str(root)

    def check(self) -> None:
        if not self.root.is_dir():
            raise UsageError(f"image cache {self.root}: no such directory; name the cache with --cache-dir (the default "
                             "is the user cache dir, or $BATCHER_CACHE_DIR)")

    def walk(self, temps: list[CacheFile]) -> Iterator[Entry]:
        for prefix in sorted(os.listdir(self.root)):
            if not _is_prefix(prefix):
                continue  # the quarantine, and anything else that is not an entry's dir
            try:
                with os.scandir(self.root / prefix) as it:
                    named = [(e.name, f) for e in it if (f := self._file(e)) is not None]
            except (FileNotFoundError, NotADirectoryError):
                continue
            yield from _entries_of(named, temps)

    @staticmethod
    def _file(e: os.DirEntry) -> CacheFile | None:
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed since the listing (a temp file renamed into place)
            return None
        if not e.is_file(follow_symlinks=False):
            return None
        return CacheFile(e.path, st.st_size, st.st_mtime, (st.st_ino, st.st_mtime_ns), st.st_nlink)

    def read(self, f: CacheFile) -> bytes | None:
        try:
            with open(f.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def _unchanged(self, f: CacheFile) -> bool:
        try:
            st = os.stat(f.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_mtime_ns) == f.version

    def remove(self, f: CacheFile) -> bool:
        if not self._unchanged(f):
            return False
        try:
            os.unlink(f.path)
            return True
        except FileNotFoundError:
            return False

    def quarantine_dir(self, stamp: str) -> str:
        return str(self.root / QUARANTINE / stamp)

    def move(self, f: CacheFile, dest_dir: str) -> str | None:
        if not self._unchanged(f):
            return None
        dest = Path(dest_dir) / Path(f.path).relative_to(self.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(f.path, dest)  # one file system: the entry is gone from the cache and whole in the quarantine
        except FileNotFoundError:
            return None
        return str(dest)


class _GcsCache:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.name = self.root

    def check(self) -> None:
        gcs.split(self.root)

    def walk(self, temps: list[CacheFile]) -> Iterator[Entry]:
        base = self.root + "/"
        current, named = None, []
        for obj in gcs.list_objects(base):  # in name order: a prefix's objects come together
            prefix, sep, name = obj.uri[len(base):].partition("/")
            if not sep or "/" in name or not _is_prefix(prefix):
                continue
            if prefix != current:
                yield from _entries_of(named, temps)
                current, named = prefix, []
            named.append((name, CacheFile(obj.uri, obj.size, obj.updated, obj.generation)))
        yield from _entries_of(named, temps)

    def read(self, f: CacheFile) -> bytes | None:
        return gcs.read_bytes(f.path)

    def remove(self, f: CacheFile) -> bool:
        return gcs.delete(f.path, generation=f.version)

    def quarantine_dir(self, stamp: str) -> str:
        return f"{self.root}/{QUARANTINE}/{stamp}"

    def move(self, f: CacheFile, dest_dir: str) -> str | None:
        dest = f"{dest_dir}/{f.path[len(self.root) + 1:]}"
        gcs.copy_if_absent(f.path, dest)  # server-side
        if not gcs.delete(f.path, generation=f.version):  # written again (or removed) since the listing: stays
            gcs.delete(dest)
            return None
        return dest


def _cache(store) -> _LocalCache | _GcsCache:
    """The cache to look after: an ImageStore, a GcsImageStore, or a root (a path or gs://bucket/prefix)."""
    if not isinstance(store, (ImageStore, GcsImageStore)):
        store = open_store(store)
    cache = _GcsCache(store.root) if isinstance(store, GcsImageStore) else _LocalCache(Path(store.root))
    cache.check()
    return cache


def _in_threads(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn of each item, in order, computed in `workers` threads with a bounded number in flight (a listing of any
    size streams through)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="batcher-cache") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * 4:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _workers(cache, workers: int | None, local: int = 1) -> int:
    """GCS: each call is a round trip, so many at once. Locally, threads pay off only for large images (reading,
    CRC and digests release the GIL: 2 threads verify 1.5 MB images ~20% faster); for the small .json files stats
    reads, and for unlinks, one thread is faster (measured, 20,000 entries)."""
    return workers if workers is not None else 16 if isinstance(cache, _GcsCache) else local


def _read_meta(cache, entry: Entry) -> dict | None:
    if entry.meta is None:
        return None
    raw = cache.read(entry.meta)
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _listed(cache, progress: Progress, temps: list[CacheFile], desc: str) -> Iterator[Entry]:
    with progress.count(desc, None) as bar:
        for entry in cache.walk(temps):
            bar.update()
            yield entry


# ---- stats -------------------------------------------------------------------------------------------------------

@dataclass
class Tally:
    entries: int = 0
    bytes: int = 0

    def add(self, nbytes: int) -> None:
        self.entries += 1
        self.bytes += nbytes


@dataclass
class CacheStats:
    root: str
    entries: int = 0  # images, one per request hash
    bytes: int = 0  # every image and .json of the cache (temp files aside)
    by_model: dict[str, Tally] = field(default_factory=dict)  # by the model its .json names ("unknown": none)
    by_age: dict[str, Tally] = field(default_factory=lambda: {label: Tally() for _, label in AGE_BUCKETS})
    without_meta: int = 0  # images without a readable .json
    orphan_meta: int = 0  # a .json without its image: a write under way, or a gc interrupted between the two
    linked_bytes: int = 0  # images a local dataset hard-links too: removing them from the cache frees no space
    temp_files: int = 0  # writes under way, or left by a writer that was killed
    temp_bytes: int = 0
    oldest: float | None = None  # when the oldest image was written (epoch seconds)
    newest: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def age_label(age_seconds: float) -> str:
    return next(label for limit, label in AGE_BUCKETS if age_seconds < limit)


def stats(store, *, now: float | None = None, progress: Progress | None = None, workers: int | None = None) -> CacheStats:
    """Entries, bytes, by model (read from each entry's .json) and by age (when its image was written)."""
    started = time.monotonic()
    cache = _cache(store)
    now = time.time() if now is None else now
    out = CacheStats(cache.name)
    temps: list[CacheFile] = []
    entries = _listed(cache, progress or Progress(), temps, "cache stats")
    for entry, meta in _in_threads(lambda e: (e, _read_meta(cache, e)), entries, _workers(cache, workers)):
        out.bytes += entry.bytes
        if not entry.images:
            out.orphan_meta += 1
            continue
        out.entries += 1
        written = entry.written
        out.oldest = written if out.oldest is None else min(out.oldest, written)
        out.newest = written if out.newest is None else max(out.newest, written)
        model = str(meta.get("model") or "unknown") if meta else "unknown"
        out.by_model.setdefault(model, Tally()).add(entry.bytes)
        out.by_age[age_label(now - written)].add(entry.bytes)
        out.without_meta += meta is None
        out.linked_bytes += sum(f.size for f in entry.images if f.links > 1)
    out.by_model = dict(sorted(out.by_model.items(), key=lambda kv: (-kv[1].bytes, kv[0])))
    out.temp_files, out.temp_bytes = len(temps), sum(f.size for f in temps)
    out.seconds = time.monotonic() - started
    return out


# ---- verify ------------------------------------------------------------------------------------------------------

@dataclass
class BadEntry:
    hash: str
    reason: str
    files: list[str]  # where they were
    moved_to: list[str]  # where they are now; empty: left in place (changed in the last min_age, or not asked to)


@dataclass
class VerifyReport:
    root: str
    checked: int = 0  # entries whose image was read and checked
    ok: int = 0
    without_digest: int = 0  # checked by decoding only: written before digests were recorded (or no .json)
    bad: list[BadEntry] = field(default_factory=list)
    quarantine: str | None = None  # where bad entries were moved
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.checked / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 1)}


def _check(cache, entry: Entry) -> tuple[Entry, str | None, bool, int]:
    """(entry, what is wrong or None, whether a digest was compared, bytes read)."""
    meta = _read_meta(cache, entry)
    digest = recorded_digest(meta)
    nbytes = 0
    for f in entry.images:
        data = cache.read(f)
        if data is None:
            continue  # removed since the listing (another gc): nothing to check
        nbytes += len(data)
        try:
            verify_image(data)
        except InvalidImage as exc:
            return entry, str(exc), digest is not None, nbytes
        if digest is not None and DIGESTS[digest[0]](data) != digest[1]:
            return entry, (f"{Path(f.path).name}: its bytes do not match the {digest[0]} digest its .json records "
                           f"({digest[1][:12]}...)"), True, nbytes
    return entry, None, digest is not None, nbytes


def verify(store, *, quarantine: bool = True, min_age: float = DEFAULT_MIN_AGE, now: float | None = None,
           progress: Progress | None = None, workers: int | None = None) -> VerifyReport:
    """Read every image: it must decode, and match the digest its .json records (entries from before digests were
    recorded: decoding only). Bad entries are moved (image first, then its .json) to <root>/quarantine/<when>/, so
    `has()` says missing and the next run generates them again; one changed in the last `min_age` seconds is
    reported but left in place (a writer may be replacing it)."""
    started = time.monotonic()
    cache = _cache(store)
    now = time.time() if now is None else now
    out = VerifyReport(cache.name)
    temps: list[CacheFile] = []
    entries = (e for e in _listed(cache, progress or Progress(), temps, "cache verify") if e.images)
    for entry, problem, compared, nbytes in _in_threads(lambda e: _check(cache, e), entries, _workers(cache, workers, local=2)):
        out.checked += 1
        out.bytes_read += nbytes
        out.without_digest += not compared
        if problem is None:
            out.ok += 1
            continue
        bad = BadEntry(entry.hash, problem, [f.path for f in entry.files], [])
        out.bad.append(bad)
        if quarantine and entry.last_change <= now - min_age:
            if out.quarantine is None:
                out.quarantine = cache.quarantine_dir(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-"
                                                      + secrets.token_hex(2))
            for f in entry.files:  # images first: without its image the entry is missing
                moved = cache.move(f, out.quarantine)
                if moved is None:
                    break  # written again since the listing: what is there now is not what was checked
                bad.moved_to.append(moved)
    out.seconds = time.monotonic() - started
    return out


# ---- gc ----------------------------------------------------------------------------------------------------------

@dataclass
class GcReport:
    root: str
    dry_run: bool
    scanned: int = 0  # entries listed (an image and its .json; or a .json alone)
    scanned_bytes: int = 0
    selected: int = 0  # entries the rules chose
    selected_bytes: int = 0
    deleted: int = 0  # removed (0 on a dry run)
    deleted_bytes: int = 0
    examples: list[dict] = field(default_factory=list)  # a few of the chosen, oldest first
    kept_young: int = 0  # changed in the last min_age: a collect may be writing them
    kept_referenced: int = 0  # named by a --keep-referenced workdir
    changed: int = 0  # written again after the listing: kept
    temp_files: int = 0  # never touched
    remaining_bytes: int = 0  # what the cache holds afterwards (on a dry run: would hold)
    over_budget: bool = False  # still over max_bytes: what is left is young or referenced
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def gc(store, *, older_than: float | None = None, max_bytes: int | None = None, keep: Collection[str] | None = None,
       min_age: float = DEFAULT_MIN_AGE, dry_run: bool = False, now: float | None = None,
       progress: Progress | None = None, examples: int = 5, workers: int | None = None) -> GcReport:
    """Remove entries: those whose image was written more than `older_than` seconds ago; then, oldest first, as many
    as it takes to bring the cache to `max_bytes`. `keep` (request hashes, e.g. ledger.reading.referenced_hashes)
    protects what it names; given alone, every other entry goes. Entries changed in the last `min_age` seconds
    and temp files are never removed. `dry_run`: choose and report, remove nothing."""
    if older_than is None and max_bytes is None and keep is None:
        raise UsageError("cache gc: say what to remove: --older-than AGE, --max-bytes SIZE and/or --keep-referenced "
                         "WORKDIR (add --dry-run to see what would go)")
    for name, value in (("older_than", older_than), ("max_bytes", max_bytes), ("min_age", min_age)):
        if value is not None and value < 0:
            raise UsageError(f"cache gc: {name} {value} is negative")
    started = time.monotonic()
    cache = _cache(store)
    now = time.time() if now is None else now
    out = GcReport(cache.name, dry_run)
    temps: list[CacheFile] = []
    removable: list[Entry] = []
    for entry in _listed(cache, progress or Progress(), temps, "cache gc: listing"):
        out.scanned += 1
        out.scanned_bytes += entry.bytes
        if entry.last_change > now - min_age:
            out.kept_young += 1
        elif keep is not None and entry.hash in keep:
            out.kept_referenced += 1
        else:
            removable.append(entry)
    out.temp_files = len(temps)

    removable.sort(key=lambda e: (e.written, e.hash))  # oldest first
    if older_than is not None:
        chosen = [e for e in removable if e.written <= now - older_than]
    else:
        chosen = removable if max_bytes is None else []  # --keep-referenced alone: all the rest
    remaining = out.scanned_bytes - sum(e.bytes for e in chosen)
    if max_bytes is not None:
        for e in removable[len(chosen):]:  # the age rule took a prefix of the oldest: go on from there
            if remaining <= max_bytes:
                break
            chosen.append(e)
            remaining -= e.bytes
        out.over_budget = remaining > max_bytes
    out.selected, out.selected_bytes = len(chosen), sum(e.bytes for e in chosen)
    out.examples = [{"hash": e.hash, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.written)),
                     "age_days": round((now - e.written) / DAY, 1), "bytes": e.bytes} for e in chosen[:examples]]

    if dry_run:
        out.remaining_bytes = remaining
    else:
        with (progress or Progress()).count("cache gc: removing", len(chosen)) as bar:
            for entry, removed in _in_threads(lambda e: (e, _remove(cache, e)), chosen, _workers(cache, workers)):
                bar.update()
                if removed:
                    out.deleted += 1
                    out.deleted_bytes += entry.bytes
                else:
                    out.changed += 1
        out.remaining_bytes = out.scanned_bytes - out.deleted_bytes
        if max_bytes is not None:
            out.over_budget = out.remaining_bytes > max_bytes
    out.seconds = time.monotonic() - started
    return out


def _remove(cache, entry: Entry) -> bool:
    """The entry's images, then its .json. False: an image was written again (or removed) since the listing, and
    the entry is left as it is."""
    for f in entry.images:
        if not cache.remove(f):
            return False
    if entry.meta is not None:
        cache.remove(entry.meta)  # changed since: a writer is putting the entry again, and its .json stays
    return True


# ---- option values -----------------------------------------------------------------------------------------------

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY, "w": 7 * DAY}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_age(text: str, option: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' (or plain seconds) as seconds."""
    m = _AGE.fullmatch(str(text).strip().lower())
    if not m:
        raise UsageError(f"{option} {text!r}: not an age; use a number and a unit: 30d, 12h, 90m, 45s, 2w")
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


def parse_size(text: str, option: str) -> int:
    """'50G', '500M', '1.5T', '800K' (binary: G is 2**30 bytes; a B or iB after it is allowed) or plain bytes."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise UsageError(f"{option} {text!r}: not a size; use a number and a unit: 50G, 500M, 1.5T (G = 2**30 bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
