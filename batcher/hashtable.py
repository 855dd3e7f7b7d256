"""Millions of request hashes in little memory: a table of 64-hex-digit hashes (each with a small int code), kept
as sorted NumPy arrays of each hash's first 128 bits.

A hash costs 17 bytes here against ~170 as a str key of a dict (or ~140 in a set): 10M requests take ~170 MB, not
1.7 GB, so planning keeps the ledger's requests, and the cache's listing, in memory at any size it is measured at
(docs/benchmarks.md, issue 19). Two different requests share their first 128 bits with a probability of ~1e-25 in
a table of 10M (the birthday bound): far below any other failure, so 128 bits stand for the hash.

Lookups go a batch at a time (`positions`): ~0.3-0.5 us a hash, against ~0.1 us for a dict and ~5 us for a probe
of the ledger's hash index in SQLite once it outgrows the page cache.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

_KEY = np.dtype(">u8")  # the hash's hex digits read as big-endian 64-bit halves: the same order as the hex


def keys_of(hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (high, low) 64-bit halves of each hash's first 128 bits (ValueError if one is not hex)."""
    halves = np.frombuffer(bytes.fromhex("".join([h[:32] for h in hashes])), dtype=_KEY).astype(np.uint64)
    if len(halves) != 2 * len(hashes):
        raise ValueError("a request hash is shorter than 32 hex digits")
    return halves[0::2], halves[1::2]


class HashTable:
    """Request hashes with a code each (uint8: a state, flags), sorted for binary search. Built once (`build`);
    the codes can change in place, the hashes cannot (a plan keeps the requests it adds elsewhere)."""

    def __init__(self, high: np.ndarray, low: np.ndarray, codes: np.ndarray):
        self.high, self.low, self.codes = high, low, codes

    @classmethod
    def build(cls, chunks: Iterable[tuple[list[str], list[int]]]) -> "HashTable":
        """From (hashes, codes) chunks, e.g. pages of a query. A hash given twice keeps one entry (the first)."""
        highs, lows, codes = [], [], []
        for hashes, chunk_codes in chunks:
            high, low = keys_of(hashes)
            highs.append(high)
            lows.append(low)
            codes.append(np.asarray(chunk_codes, dtype=np.uint8))
        if not highs:
            return cls(np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.uint8))
        high, low, code = np.concatenate(highs), np.concatenate(lows), np.concatenate(codes)
        del highs, lows, codes
        order = np.argsort(high)  # by the high halves: 0.45 s for 10M, against 3.5 s for a lexsort of both
        sorted_high = high[order]
        ties = np.flatnonzero(sorted_high[1:] == sorted_high[:-1]).tolist()
        start = 0
        for k, i in enumerate(ties):  # equal high halves (rare): by the low, then as given (the first copy first)
            if k + 1 < len(ties) and ties[k + 1] == i + 1:
                continue
            first = ties[start]
            order[first:i + 2] = sorted(order[first:i + 2].tolist(), key=lambda j: (int(low[j]), j))
            start = k + 1
        high, low, code = sorted_high, low[order], code[order]
        if len(high) > 1:
            keep = np.ones(len(high), dtype=bool)
            keep[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
            if not keep.all():
                high, low, code = high[keep], low[keep], code[keep]
        return cls(high, low, code)

    @classmethod
    def of(cls, hashes: list[str]) -> "HashTable":
        """A set of hashes (every code 0)."""
        return cls.build([(hashes, [0] * len(hashes))])

    @classmethod
    def joined(cls, tables: list["HashTable"]) -> "HashTable":
        """Tables whose hashes do not overlap and are in order between them (each after the one before), as one."""
        return cls(np.concatenate([t.high for t in tables]), np.concatenate([t.low for t in tables]),
                   np.concatenate([t.codes for t in tables]))

    def __len__(self) -> int:
        return len(self.high)

    @property
    def nbytes(self) -> int:
        return self.high.nbytes + self.low.nbytes + self.codes.nbytes

    def positions(self, hashes: list[str]) -> np.ndarray:
        """Where each hash is in the table (an index into `codes`), or -1."""
        if not len(self.high) or not hashes:
            return np.full(len(hashes), -1, dtype=np.int64)
        high, low = keys_of(hashes)
        # Searched in their sorted order: each search starts where the last ended and the table is read in order
        # (in random order, a 10M table's searches miss the CPU caches: 2x slower, and the one part of a 10M-row
        # plan that grew faster than the rows; docs/benchmarks.md, issue 19).
        order = np.argsort(high)
        high, low = high[order], low[order]
        pos = np.searchsorted(self.high, high)  # the first entry with this high half, if any
        pos[pos == len(self.high)] = 0
        found = (self.high[pos] == high) & (self.low[pos] == low)
        # Equal high halves (two hashes sharing 64 bits: ~1 in 10^5 tables of 10M) need a look past the first.
        for i in np.flatnonzero(~found & (self.high[pos] == high)):
            j = pos[i] + 1
            while j < len(self.high) and self.high[j] == high[i]:
                if self.low[j] == low[i]:
                    pos[i], found[i] = j, True
                    break
                j += 1
        out = np.empty(len(hashes), dtype=np.int64)
        out[order] = np.where(found, pos, -1)
        return out

    def contains(self, hashes: list[str]) -> list[bool]:
        return (self.positions(hashes) >= 0).tolist()
