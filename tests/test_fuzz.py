"""Property-based fuzzing (hypothesis) of the manifest reader and the request builder.

Manifest reader: random tables (unicode, newlines, quotes, commas, tabs, random types, random nulls) written
as CSV, TSV and Parquet never make `read_manifest` raise anything but ManifestError; rows come out in file
order; every valid row round-trips its id and prompt exactly.
Request builder: `request_body` / `request_hash` over random ImageRequests are deterministic and
JSON-serialisable, the hash is 64 hex digits, and the body round-trips through JSON.

Example counts are bounded (FUZZ_EXAMPLES, default below) so the file runs in well under 20 s.
"""

from __future__ import annotations

import pytest

import csv
import json
import math
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings, strategies as st

from batcher import catalog
from batcher.errors import ManifestError
from batcher.manifest import ManifestOptions, ManifestRow, RowProblem, read_manifest
from batcher.planning.requests import (ImageRequest, ReferenceImage, canonical_json, referenced_hashes, request_body,
                              request_hash, resolve_references)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text with the characters that break naive CSV handling, plus any unicode (no surrogates: not encodable).
NASTY = st.sampled_from(list(',"\'\n\r\t;|\\ ') + ["\u00a0", "\u2028", "\ufeff", "é", "😀", "NA", "null", "NaN", "#"])
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=6)), max_size=8).map("".join)
CELL = st.one_of(st.none(), TEXT, st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                 st.booleans())


@st.composite
def tables(draw):
    n = draw(st.integers(1, 12))
    ids = draw(st.lists(TEXT, min_size=n, max_size=n, unique=True))
    prompts = draw(st.lists(st.one_of(TEXT, st.none()), min_size=n, max_size=n))
    extra_names = draw(st.lists(st.text("abcdefgh_ é", min_size=1, max_size=6).map(lambda s: "x_" + s),
                                max_size=3, unique=True))
    extras = {}
    for name in extra_names:
        kind = draw(st.sampled_from(["text", "int", "float", "bool", "mixed"]))
        elem = {"text": st.one_of(st.none(), TEXT), "int": st.one_of(st.none(), st.integers(-10**9, 10**9)),
                "float": st.one_of(st.none(), st.floats(allow_nan=True)), "bool": st.one_of(st.none(), st.booleans()),
                "mixed": CELL}[kind]
        extras[name] = (kind, draw(st.lists(elem, min_size=n, max_size=n)))
    # Sometimes a known column with random junk in it: must be a RowProblem, never an exception.
    junk = {}
    for name in draw(st.lists(st.sampled_from(["temperature", "top_p", "seed", "variants", "aspect_ratio",
                                               "image_size", "model"]), max_size=2, unique=True)):
        junk[name] = draw(st.lists(st.one_of(st.none(), TEXT, st.integers(-5, 200).map(str)), min_size=n, max_size=n))
    return ids, prompts, extras, junk


def _cell_text(v) -> str:
    return "" if v is None else str(v)


def write(fmt: str, d: Path, ids, prompts, extras, junk) -> Path:
    header = ["id", "prompt"] + list(extras) + list(junk)
    cols = [ids, prompts] + [v for _, v in extras.values()] + list(junk.values())
    if fmt == "parquet":
        arrays = [pa.array(ids, pa.string()), pa.array(prompts, pa.string())]
        for kind, values in extras.values():
            if kind == "mixed":
                arrays.append(pa.array([None if v is None else repr(v) for v in values], pa.string()))
            else:
                arrays.append(pa.array(values, {"text": pa.string(), "int": pa.int64(), "float": pa.float64(),
                                                "bool": pa.bool_()}[kind]))
        arrays += [pa.array(v, pa.string()) for v in junk.values()]
        path = d / "m.parquet"
        pq.write_table(pa.Table.from_arrays(arrays, names=header), path)
        return path
    path = d / f"m.{fmt}"
    with open(path, "w", newline="", encoding="utf-8") as f:
        if fmt == "tsv":  # TSV has no quoting: every field as it is, one line per row
            for record in [header] + [[_cell_text(c[i]) for c in cols] for i in range(len(ids))]:
                f.write("\t".join(record) + "\n")
            return path
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(ids)):
            w.writerow([_cell_text(c[i]) for c in cols])
    return path


def tsv_can_hold(ids, prompts, extras, junk) -> bool:
    """Whether every cell can be written as TSV (no tab, no line break in it)."""
    cells = [*ids, *prompts, *(v for _, vs in extras.values() for v in vs), *(v for vs in junk.values() for v in vs)]
    return not any(ch in _cell_text(c) for c in cells for ch in "\t\n\r")


def check_reader(fmt: str, table) -> None:
    ids, prompts, extras, junk = table
    first_row = 1 if fmt == "parquet" else 2
    with tempfile.TemporaryDirectory() as d:
        path = write(fmt, Path(d), ids, prompts, extras, junk)
        try:
            items = list(read_manifest(path, ManifestOptions()))
        except ManifestError:
            # A clear refusal of the whole file is allowed (any other exception fails the test), but not of a TSV
            # whose cells TSV can hold: its quotes, commas and the rest are text like any other.
            assert fmt != "tsv" or not tsv_can_hold(*table), "a TSV that can hold its cells was refused"
            return
    if fmt == "tsv" and not tsv_can_hold(*table):
        return  # a cell with a tab or a line break is not a TSV cell: the file was read as other rows, without error
    rows_seen = [it.row for it in items]
    assert rows_seen == sorted(rows_seen), "rows out of file order"
    valid = [it for it in items if isinstance(it, ManifestRow)]
    rejected = {it.row for it in items if isinstance(it, RowProblem)}
    assert all(isinstance(it, (ManifestRow, RowProblem)) for it in items)
    assert len({r.row for r in valid}) == len(valid), "a row was yielded twice"
    assert not ({r.row for r in valid} & rejected), "a row was both yielded and rejected"
    for r in valid:
        i = r.row - first_row
        assert 0 <= i < len(ids)
        assert r.id == ids[i], (r.id, ids[i])
        assert r.prompt == prompts[i], (r.prompt, prompts[i])
    # Every row is accounted for, and a row with a real id and prompt and no junk is never dropped.
    assert {r.row for r in valid} | rejected == set(range(first_row, first_row + len(ids)))
    for i, (id_, prompt) in enumerate(zip(ids, prompts)):
        if not junk and prompt is not None and prompt.strip() and id_.strip():
            assert (first_row + i) not in rejected, f"row {first_row + i} ({id_!r}, {prompt!r}) rejected: " + \
                "; ".join(str(p) for p in items if isinstance(p, RowProblem) and p.row == first_row + i)


@pytest.mark.slow
@FUZZ
@given(tables())
def test_csv_reader_never_crashes_and_round_trips(table):
    check_reader("csv", table)


@pytest.mark.slow
@FUZZ
@given(tables())
def test_tsv_reader_never_crashes_and_round_trips(table):
    check_reader("tsv", table)


@pytest.mark.slow
@FUZZ
@given(tables())
def test_parquet_reader_never_crashes_and_round_trips(table):
    check_reader("parquet", table)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(st.binary(max_size=400), st.sampled_from(["csv", "tsv", "parquet"]))
def test_random_bytes_are_refused_cleanly(data, fmt):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"m.{fmt}"
        path.write_bytes(b"id,prompt\n" + data if fmt == "csv" and data[:1] != b"P" else data)
        try:
            items = list(read_manifest(path, ManifestOptions()))
        except ManifestError as exc:  # refused as a whole: the message names the file
            assert str(path) in str(exc) and str(exc).strip() != str(path)
            return
        # Read: every item a valid row or a problem that names the file and a row of it, in file order
        assert all(isinstance(i, (ManifestRow, RowProblem)) for i in items)
        assert all(i.file == str(path) and i.row >= 1 and i.message for i in items if isinstance(i, RowProblem))
        rows = [i.row for i in items]
        assert rows == sorted(rows)


# ---- the request builder ------------------------------------------------------------------------

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def image_requests(draw):
    model = draw(st.sampled_from(sorted(catalog.MODELS)))
    spec = catalog.MODELS[model]
    refs = draw(st.lists(st.builds(ReferenceImage, HEX, st.sampled_from(["image/png", "image/jpeg", "image/webp"]),
                                   TEXT), max_size=3, unique_by=lambda r: r.sha256))
    return ImageRequest(
        model=model, prompt=draw(TEXT), variant=draw(st.integers(0, 99)),
        aspect_ratio=draw(st.one_of(st.none(), st.sampled_from(list(spec.aspect_ratios)))),
        image_size=draw(st.one_of(st.none(), st.sampled_from(list(spec.image_sizes)))),
        temperature=draw(st.one_of(st.none(), FINITE)), top_p=draw(st.one_of(st.none(), FINITE)),
        seed=draw(st.one_of(st.none(), st.integers(-2**31, 2**31 - 1))),
        system_instruction=draw(st.one_of(st.none(), TEXT)), references=tuple(refs))


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 3, deadline=None, derandomize=True)
@given(image_requests())
def test_request_body_and_hash_are_deterministic_and_json(req):
    body = request_body(req)
    h = request_hash(req)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert request_hash(req) == h and request_body(req) == body  # deterministic
    text = json.dumps(body, allow_nan=False)
    assert json.loads(text) == body  # JSON-serialisable, round-trips
    assert json.loads(canonical_json(body)) == body
    parts = body["contents"][0]["parts"]
    assert parts[-1] == {"text": req.prompt}
    assert referenced_hashes(json.dumps(body)) == [r.sha256 for r in req.references]
    resolved = resolve_references(body, {r.sha256: f"https://files.example/{i}" for i, r in enumerate(req.references)})
    assert "batcher-ref:" not in json.dumps(resolved) or "batcher-ref:" in req.prompt + (req.system_instruction or "")
    assert resolved["contents"][0]["parts"][-1] == {"text": req.prompt}  # the prompt survives resolution
    # The identity covers the variant and the prompt.
    other = ImageRequest(**{**req.__dict__, "variant": req.variant + 1})
    assert request_hash(other) != h
    changed = ImageRequest(**{**req.__dict__, "prompt": req.prompt + "!"})
    assert request_hash(changed) != h
    if req.temperature is not None:
        assert math.isfinite(body["generationConfig"]["temperature"])
