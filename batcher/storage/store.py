"""The content-addressed image cache, keyed by request hash, shared between runs and workdirs.

Layout: <root>/<hash[:2]>/<hash>.png plus <hash>.json (small metadata: model, tokens, cost, and a digest of the
image's bytes, so `batcher cache verify` can tell a changed image). An entry is written to a temp file,
fsynced and renamed, so a reader never sees half an image, and images are verified (they decode) before they
enter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from . import atomic, gcs

if TYPE_CHECKING:
    from ..hashtable import HashTable


class InvalidImage(ValueError):
    pass


def default_cache_dir() -> Path:
    env = os.environ.get("BATCHER_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("batcher")) / "images"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _verify_png(data: bytes) -> None:
    """What Pillow's verify checks for a PNG, without Pillow: the signature, IHDR first, every chunk whole with
    a matching CRC, image data present, and IEND (so truncated or corrupted files are rejected). zlib.crc32
    releases the GIL on large chunks, so other threads run meanwhile."""
    view = memoryview(data)
    n = len(data)
    pos = 8
    seen_idat = False
    while True:
        if pos + 12 > n:
            raise InvalidImage("not a decodable image (truncated PNG: no IEND chunk)")
        length = int.from_bytes(view[pos:pos + 4], "big")
        ctype = bytes(view[pos + 4:pos + 8])
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n:
            raise InvalidImage(f"not a decodable image (truncated PNG: chunk {ctype!r} runs past the end)")
        if pos == 8 and (ctype != b"IHDR" or length != 13 or not int.from_bytes(view[16:20], "big")
                         or not int.from_bytes(view[20:24], "big")):
            raise InvalidImage("not a decodable image (PNG does not start with a valid IHDR chunk)")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            raise InvalidImage(f"not a decodable image (PNG chunk {ctype!r} has a bad CRC)")
        if ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            break
        pos = end
    if not seen_idat:
        raise InvalidImage("not a decodable image (PNG without image data)")


def verify_image(data: bytes) -> str:
    """Return the image format ('PNG', 'JPEG', ...) or raise InvalidImage if the bytes do not decode."""
    if data[:8] == _PNG_SIGNATURE:
        _verify_png(data)  # the common case, checked as Pillow's verify does but ~20x cheaper
        return "PNG"
    from PIL import Image  # only for formats other than PNG: decoder processes start without it

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            fmt = im.format or "PNG"
    except Exception as exc:  # Pillow raises many types for bad data
        raise InvalidImage(f"not a decodable image ({exc.__class__.__name__}: {exc})") from None
    return fmt


EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif"}
IMAGE_EXTS = tuple(EXTENSIONS.values())  # where find() looks, in this order
_IMAGE_EXT_SET = frozenset(IMAGE_EXTS)
_HEX = frozenset("0123456789abcdef")
HASH_CHARS = 64  # a request hash: sha256, in hex
# Cache entries: several processes may write one at once (unique temp names), an image lost to a power cut is
# money lost (fsync), and the cache is the user's own (0600, as before).
CACHE_WRITE = {"unique": True, "durable": True, "mode": 0o600}


# The meta key holding the digest (hex) of the image's bytes: XXH3-128, which finds a changed or corrupted file as
# surely as SHA-256 (nobody forges cache entries: whoever can write the image can write its .json) at ~17x the speed:
# 0.08 ms against 1.3 ms for a 1.5 MB image here, where SHA-256 was a quarter of collect's decoding CPU (issue 19).
DIGEST_KEY = "xxh3_128"
# Each digest `batcher cache verify` can check: entries written before 2026-12-05 carry a SHA-256.
DIGESTS = {DIGEST_KEY: xxhash.xxh3_128_hexdigest, "sha256": lambda data: hashlib.sha256(data).hexdigest()}


def with_digest(meta: dict | None, data: bytes) -> dict:
    """The meta to record beside `data`: the writer's fields and the image's digest (every writer gets it here)."""
    return {**(meta or {}), DIGEST_KEY: DIGESTS[DIGEST_KEY](data)}


def recorded_digest(meta: dict | None) -> tuple[str, str] | None:
    """(digest name, hex) of the digest an entry's meta records, or None (written before digests were recorded)."""
    for name in DIGESTS:
        value = (meta or {}).get(name)
        if isinstance(value, str):
            return name, value
    return None


def checked_hash(request_hash: str) -> str:
    """A request hash (64 lowercase hex digits), or ValueError: never a path or an object name of its own."""
    if len(request_hash) != HASH_CHARS or not _HEX.issuperset(request_hash):
        raise ValueError(f"not a request hash: {request_hash!r}")
    return request_hash


class _Cache:
    """What both caches share: an entry is <hash><image extension> under its hash's two-digit prefix, and finding
    one tries each image extension in turn."""

    def _entry(self, request_hash: str, ext: str):
        raise NotImplementedError

    def _exists(self, entry) -> bool:
        raise NotImplementedError

    def find(self, request_hash: str):
        for ext in IMAGE_EXTS:
            entry = self._entry(request_hash, ext)
            if self._exists(entry):
                return entry
        return None

    def has(self, request_hash: str) -> bool:
        return self.find(request_hash) is not None


class ImageStore(_Cache):
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def _dir(self, request_hash: str) -> Path:
        return self.root / checked_hash(request_hash)[:2]

    def _entry(self, request_hash: str, ext: str) -> Path:
        return self._dir(request_hash) / f"{request_hash}{ext}"

    def _exists(self, entry: Path) -> bool:
        return entry.exists()

    def put(self, request_hash: str, data: bytes, meta: dict | None = None) -> Path:
        fmt = verify_image(data)
        path = self._dir(request_hash) / f"{request_hash}{EXTENSIONS.get(fmt, '.img')}"
        meta = with_digest(meta, data)
        atomic.write_bytes(path.with_suffix(".json"), json.dumps(meta, sort_keys=True).encode(), **CACHE_WRITE)
        atomic.write_bytes(path, data, **CACHE_WRITE)  # the image last: its presence means the entry is complete
        return path

    def meta(self, request_hash: str) -> dict:
        p = self._dir(request_hash) / f"{request_hash}.json"
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, ValueError):
            return {}


class GcsImageStore(_Cache):
    """The same cache on GCS (`gs://bucket/prefix`), for teams and for several machines collecting at once.

    Entries are created if absent (a generation precondition): two writers of one hash never clobber each
    other, and the loser's write is simply not needed (same request, same hash). The image goes last, so
    its presence means the entry is complete.
    """

    def __init__(self, root: str):
        gcs.split(root)  # validates the URI
        self.root = root.rstrip("/")

    def _entry(self, request_hash: str, ext: str) -> str:
        return f"{self.root}/{checked_hash(request_hash)[:2]}/{request_hash}{ext}"

    def _exists(self, entry: str) -> bool:
        return gcs.exists(entry)

    def list_dir(self, prefix2: str) -> set[str]:
        """The entry names under one two-hex-digit prefix (one listing instead of a lookup per hash)."""
        return {uri.rsplit("/", 1)[-1] for uri in gcs.list_names(f"{self.root}/{prefix2}/")}

    def put(self, request_hash: str, data: bytes, meta: dict | None = None) -> str:
        fmt = verify_image(data)
        ext = EXTENSIONS.get(fmt, ".img")
        uri = self._entry(request_hash, ext)
        gcs.write_if_absent(self._entry(request_hash, ".json"), json.dumps(with_digest(meta, data), sort_keys=True).encode(),
                            "application/json")
        gcs.write_if_absent(uri, data, f"image/{fmt.lower()}")
        return uri

    def meta(self, request_hash: str) -> dict:
        raw = gcs.read_bytes(self._entry(request_hash, ".json"))
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}


def open_store(root: str | os.PathLike | None = None):
    """The cache at `root`: a local directory, or gs://bucket/prefix."""
    if root is not None and gcs.is_gcs(root):
        return GcsImageStore(str(root))
    return ImageStore(root)


# A cache listing keeps its hashes in compact tables (hashtable: 17 bytes each; ~140 as a set of str, which bounded
# it at 2M before issue 19); past this many, the prefixes not listed yet are asked one hash at a time (bounded memory
# for a cache of any size).
MAX_LISTED_HASHES = 30_000_000


class StoreLookup:
    """`store.has` for many hashes at once (planning): each prefix dir of the cache is listed once on first use
    (os.listdir, or a gs:// cache's list_dir) instead of up to four stat calls per request."""

    def __init__(self, store):
        self.store = store
        root = getattr(store, "root", None)
        plain = isinstance(store, ImageStore) and type(store).has is ImageStore.has and type(store).find is ImageStore.find
        self.root = os.fspath(root) if root is not None and plain else None  # a plain local cache
        self.list_dir = None if self.root is not None else getattr(store, "list_dir", None)
        self.one_by_one = self.root is None and self.list_dir is None
        self.dirs: dict[str, HashTable] = {}  # by prefix; dropped for `whole` once every prefix is listed
        self.whole: HashTable | None = None  # every prefix's hashes in one table: one search per batch
        self.listed = 0
        self._ahead: list = []  # threads listing every prefix dir (list_ahead)
        self._listing_ahead = False

    def list_ahead(self, threads: int = 2) -> None:
        """Start listing every prefix dir, in `threads` threads (os.listdir lets other threads run; two list ~1.5x
        faster than one). Lookups wait for them to end; a prefix they could not list is listed again when it is
        asked for (and fails there)."""
        import threading  # here: the decoder processes import this module, and need no threads

        if self.one_by_one or self._listing_ahead:
            return  # once: a prefix listed is never listed again
        self._listing_ahead = True
        lock = threading.Lock()
        prefixes = [f"{i:02x}" for i in range(256)]
        self._ahead = [threading.Thread(target=self._list_prefixes, args=(prefixes[k::threads], lock),
                                        name=f"batcher-cache-listing-{k}", daemon=True) for k in range(threads)]
        for thread in self._ahead:
            thread.start()

    def _list_prefixes(self, prefixes: list[str], lock) -> None:
        for prefix in prefixes:
            if self.listed >= MAX_LISTED_HASHES:
                return
            try:
                hashes = self._hashes_in(prefix)
            except OSError:  # left unlisted: listed again if a request asks for it, which reports the error there
                continue
            with lock:
                if self.listed >= MAX_LISTED_HASHES:
                    return
                self.dirs[prefix] = hashes
                self.listed += len(hashes)

    def has(self, h: str) -> bool:
        return self.has_all([h])[0]

    def has_all(self, hashes: list[str]) -> list[bool]:
        """`has` of each hash, in order: one search of the listings for them all (a method call per hash cost ~1 s
        per million; a search of a table ~0.3 us a hash)."""
        prefixes = sorted({h[:2] for h in hashes})  # sorted: which ones get listed does not depend on the set order
        for prefix in prefixes:
            self._listing(prefix)
        if self.whole is not None:
            return self.whole.contains(hashes)
        found = [False] * len(hashes)
        at: dict[str, list[int]] = {prefix: [] for prefix in prefixes}
        for i, h in enumerate(hashes):
            at[h[:2]].append(i)
        for prefix, where in at.items():
            listed = self.dirs.get(prefix)
            if listed is None:  # past MAX_LISTED_HASHES (or a store that cannot list): ask it
                answers = [self.store.has(hashes[i]) for i in where]
            else:
                answers = listed.contains([hashes[i] for i in where])
            for i, answer in zip(where, answers):
                found[i] = answer
        return found

    def _listing(self, prefix: str) -> HashTable | None:
        """The hashes with an image under `prefix` (listed on first use), or None: ask the store one by one."""
        while self._ahead:
            self._ahead.pop().join()
        if self.whole is not None:
            return self.whole
        hashes = self.dirs.get(prefix)
        if hashes is None and not self.one_by_one and self.listed < MAX_LISTED_HASHES:
            hashes = self.dirs[prefix] = self._hashes_in(prefix)
            self.listed += len(hashes)
        if len(self.dirs) == 256:  # every prefix: one table (prefixes in order are the hashes in order)
            from ..hashtable import HashTable

            self.whole = HashTable.joined([self.dirs[f"{i:02x}"] for i in range(256)])
            self.dirs = {}
        return hashes

    def _hashes_in(self, prefix: str) -> HashTable:
        if self.root is None:
            names = self.list_dir(prefix)
        else:
            try:
                names = os.listdir(os.path.join(self.root, prefix))
            except (FileNotFoundError, NotADirectoryError):
                names = ()
        # The hashes that have an image file: one lookup per request instead of one per extension. An entry is
        # <64-hex hash><ext> (ImageStore._dir); temp files (".tmp-...") and others are never a hash's name.
        from ..hashtable import HashTable  # here: decoder processes import this module, and need no NumPy

        hashes = [n[:HASH_CHARS] for n in names if n[HASH_CHARS:] in _IMAGE_EXT_SET and n.startswith(prefix)]
        joined = "".join(hashes)
        if joined.lower() == joined:  # (bytes.fromhex takes upper case too, which is no hash's name)
            try:
                return HashTable.of(hashes)
            except ValueError:
                pass
        return HashTable.of([h for h in hashes if _HEX.issuperset(h)])  # a stray file named like an entry: left out
