"""batcher.hashtable: request hashes -> codes in sorted NumPy arrays (planning's ledger lookup and cache listing)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from batcher.hashtable import HashTable


def h(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_positions_find_every_hash_and_only_those():
    hashes = [h(i) for i in range(1000)]
    table = HashTable.build([(hashes[:600], [i % 7 for i in range(600)]), (hashes[600:], [i % 7 for i in range(600, 1000)])])
    assert len(table) == 1000 and table.nbytes == 1000 * 17
    pos = table.positions(hashes[::-1] + [h(-1), h(-2)])
    assert (pos[:1000] >= 0).all() and (pos[1000:] == -1).all()
    assert table.codes[pos[:1000]].tolist() == [i % 7 for i in range(1000)][::-1]
    assert table.contains([h(5), h(5000)]) == [True, False]
    assert HashTable.of([]).contains([h(1)]) == [False] and HashTable.of([h(1)]).positions([]).tolist() == []


def test_codes_change_in_place_and_a_repeated_hash_keeps_its_first_code():
    table = HashTable.build([([h(1), h(2), h(1)], [3, 4, 9])])
    assert len(table) == 2
    p1, p2 = table.positions([h(1), h(2)]).tolist()
    assert table.codes[p1] == 3 and table.codes[p2] == 4
    table.codes[p1] = 16 | 3
    assert table.codes[table.positions([h(1)])[0]] == 19


def test_hashes_that_share_their_first_64_bits_are_told_apart():
    """The search is on the high 64 bits; equal high halves (rare: ~1e-5 of 10M-hash tables) are resolved by the low."""
    base = "0123456789abcdef"
    twins = [base + f"{i:016x}" + "0" * 32 for i in (5, 1, 9, 3)]
    table = HashTable.build([(twins, [5, 1, 9, 3])])
    pos = table.positions(twins + [base + f"{2:016x}" + "0" * 32])
    assert table.codes[pos[:4]].tolist() == [5, 1, 9, 3] and pos[4] == -1


def test_only_the_first_128_bits_count_and_bad_hex_is_refused():
    a = "ab" * 16 + "0" * 32
    assert HashTable.of([a]).contains(["ab" * 16 + "f" * 32]) == [True]  # 128 bits stand for the hash
    with pytest.raises(ValueError):
        HashTable.of(["not hex" + "0" * 57])


def test_joined_tables_of_ordered_prefixes_search_as_one():
    hashes = sorted(h(i) for i in range(300))
    by_prefix: dict[str, list[str]] = {}
    for x in hashes:
        by_prefix.setdefault(x[:2], []).append(x)
    whole = HashTable.joined([HashTable.of(v) for _, v in sorted(by_prefix.items())])
    assert (np.diff(whole.high.astype(np.float64)) >= 0).all()
    assert whole.contains(hashes + [h(-1)]) == [True] * 300 + [False]


def test_a_table_is_sorted_by_both_halves_whatever_the_input_order():
    """Runs of equal high halves, in any input order, end sorted by their low halves, duplicates keeping the first."""
    base = "0123456789abcdef"
    twins = [base + f"{i:016x}" + "0" * 32 for i in (9, 3, 7, 3, 1)]
    others = [h(i) for i in range(50)]
    table = HashTable.build([(others[:25] + twins + others[25:], list(range(25)) + [90, 91, 92, 93, 94] + list(range(25, 50)))])
    assert len(table) == 54
    pairs = list(zip(table.high.tolist(), table.low.tolist()))
    assert pairs == sorted(pairs)
    assert table.codes[table.positions([twins[1]])[0]] == 91  # the first of the two copies of ...03...
    assert table.contains(twins + others) == [True] * 55
