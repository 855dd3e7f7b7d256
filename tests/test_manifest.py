"""Tests for batcher.manifest: streaming reads of Parquet/CSV/TSV manifests and their validation."""

from __future__ import annotations

import builtins
import csv
import io
import json
import os
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batcher import catalog
from batcher import manifest
from batcher.errors import ManifestError
from batcher.manifest import ManifestOptions, ManifestRow, RowProblem, read_manifest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


# ------------------------------------------------------------------------------------------------ helpers


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def write_parquet(tmp_path: Path, name: str, data: dict | pa.Table, **kwargs) -> Path:
    path = tmp_path / name
    table = data if isinstance(data, pa.Table) else pa.table(data)
    pq.write_table(table, path, **kwargs)
    return path


def read(path, batch_rows: int = 65536, **options) -> tuple[list[ManifestRow], list[RowProblem]]:
    rows, problems = [], []
    for item in read_manifest(path, ManifestOptions(**options), batch_rows=batch_rows):
        (rows if isinstance(item, ManifestRow) else problems).append(item)
    return rows, problems


def where(problems: list[RowProblem]) -> list[tuple[int, str | None, str | None]]:
    return [(p.row, p.column, p.value) for p in problems]


def make_image(path: Path, fmt: str = "PNG", size=(8, 8)) -> Path:
    Image.new("RGB", size, (10, 200, 30)).save(path, format=fmt)
    return path


def file_error(path, **options) -> str:
    with pytest.raises(ManifestError) as info:
        list(read_manifest(path, ManifestOptions(**options)))
    return str(info.value)


# ------------------------------------------------------------------------------------------------ samples


def test_samples_are_valid_and_csv_matches_parquet():
    csv_rows, csv_problems = read(SAMPLES / "prompts.csv")
    pq_rows, pq_problems = read(SAMPLES / "prompts.parquet")
    assert csv_problems == [] and pq_problems == []
    assert len(csv_rows) >= 30 and len(csv_rows) == len(pq_rows)
    for a, b in zip(csv_rows, pq_rows):
        assert a.row == b.row + 1  # CSV has the header row
        assert (a.id, a.prompt, a.aspect_ratio, a.variants, a.reference_images, a.extra) == (
            b.id,
            b.prompt,
            b.aspect_ratio,
            b.variants,
            b.reference_images,
            b.extra,
        )
    assert {r.variants for r in csv_rows} >= {1, 2, 3}
    with_refs = [r for r in csv_rows if r.reference_images]
    assert 2 <= len(with_refs) <= 3
    assert all(os.path.isabs(p) and os.path.isfile(p) for r in with_refs for p in r.reference_images)
    prompts = [r.prompt for r in csv_rows]
    assert len(set(prompts)) < len(prompts)  # exact duplicates share an image
    assert set(csv_rows[0].extra) == {"category", "sku"}
    for ref in (SAMPLES / "refs").iterdir():
        assert ref.stat().st_size <= 20_000


# ------------------------------------------------------------------------------------------------ formats and row numbers


def test_csv_row_numbers_start_at_2_and_default_ids_at_1(tmp_path):
    path = write(tmp_path, "m.csv", "prompt\na cat\na dog\n")
    rows, problems = read(path)
    assert problems == []
    assert [(r.row, r.id, r.prompt) for r in rows] == [(2, "1", "a cat"), (3, "2", "a dog")]
    row = rows[0]
    assert row.model == catalog.DEFAULT_MODEL
    assert (row.aspect_ratio, row.image_size, row.temperature, row.top_p, row.seed) == (None,) * 5
    assert (row.variants, row.reference_images, row.system_instruction, row.extra) == (1, (), None, {})


def test_parquet_row_numbers_start_at_1(tmp_path):
    path = write_parquet(tmp_path, "m.parquet", {"prompt": ["a", "b", "c"]})
    rows, _ = read(path)
    assert [(r.row, r.id) for r in rows] == [(1, "1"), (2, "2"), (3, "3")]


def test_tsv_and_tab_extensions(tmp_path):
    text = "id\tprompt\taspect_ratio\nx1\ta red, shiny apple\t16:9\n"
    for name in ("m.tsv", "m.tab", "M.TSV"):
        rows, problems = read(write(tmp_path, name, text))
        assert problems == []
        assert [(r.row, r.id, r.prompt, r.aspect_ratio) for r in rows] == [(2, "x1", "a red, shiny apple", "16:9")]


def test_pq_extension_and_format_override(tmp_path):
    rows, _ = read(write_parquet(tmp_path, "m.pq", {"prompt": ["a"]}))
    assert rows[0].prompt == "a"
    odd = write(tmp_path, "prompts.txt", "prompt\nhello\n")
    message = file_error(odd)
    assert "prompts.txt" in message and "--format" in message
    rows, _ = read(odd, format="csv")
    assert rows[0].prompt == "hello" and rows[0].row == 2
    tsv_named_csv = write(tmp_path, "t.csv", "prompt\tid\nhi, there\tz\n")
    rows, _ = read(tsv_named_csv, format="tsv")
    assert (rows[0].prompt, rows[0].id) == ("hi, there", "z")
    assert "Unknown manifest format 'xls'" in file_error(odd, format="xls")


def test_quotes_and_newlines_inside_csv_fields(tmp_path):
    text = (
        'id,prompt,category\n'
        'a,"line one\nline two, with a comma",x\n'
        'b,"she said ""cheese""",y\n'
        'c,"multi\r\nline\n\nwith blank line",z\n'
        'd,plain,w\n'
    )
    rows, problems = read(write(tmp_path, "q.csv", text))
    assert problems == []
    assert [(r.row, r.id, r.prompt) for r in rows] == [
        (2, "a", "line one\nline two, with a comma"),
        (3, "b", 'she said "cheese"'),
        (4, "c", "multi\r\nline\n\nwith blank line"),
        (5, "d", "plain"),
    ]


def test_blank_lines_count_as_rows_as_a_spreadsheet_shows_them(tmp_path):
    """pyarrow skips blank lines; a spreadsheet shows them as rows. Row numbers (of rows and of problems)
    follow the spreadsheet, and an empty line inside a quoted value is not a blank line."""
    text = (
        'id,prompt\r\n'
        'a,one\r\n'
        '\r\n'  # row 3: blank
        'b,"two\n\nwith an empty line inside"\n'
        '\n'  # row 5: blank
        '\n'  # row 6: blank
        'c,\n'  # row 7: empty prompt
        'd,four\n'
        '\n'  # trailing blank lines change nothing
    )
    rows, problems = read(write(tmp_path, "blank.csv", text))
    assert [(r.row, r.id) for r in rows] == [(2, "a"), (4, "b"), (8, "d")]
    assert [(p.row, p.column) for p in problems] == [(7, "prompt")]
    tsv, tsv_problems = read(write(tmp_path, "blank.tsv", "id\tprompt\n\na\tone\n\n\nb\t\n"))
    assert [r.row for r in tsv] == [3] and [p.row for p in tsv_problems] == [6]


def test_blank_lines_next_to_a_very_long_cell(tmp_path):
    """Finding the blank lines must not trip on a cell longer than the csv module's default limit (128 KiB)."""
    notes = "a very detailed note. " * 10_000  # 220 000 characters, in a carried column
    text = f'id,prompt,notes\na,a lamp,"{notes}"\n\nb,,x\n'
    rows, problems = read(write(tmp_path, "long.csv", text))
    assert [(r.row, len(r.extra["notes"])) for r in rows] == [(2, len(notes))]
    assert [(p.row, p.column) for p in problems] == [(4, "prompt")]


def test_utf8_bom_and_unicode(tmp_path):
    path = write(tmp_path, "b.csv", "\ufeffid,prompt\n1,un café très élégant ☕ 東京\n")
    rows, problems = read(path)
    assert problems == [] and rows[0].prompt == "un café très élégant ☕ 東京" and rows[0].id == "1"


def test_crlf_line_endings(tmp_path):
    rows, problems = read(write(tmp_path, "w.csv", "id,prompt\r\n1,a\r\n2,b\r\n"))
    assert problems == [] and [(r.row, r.id, r.prompt) for r in rows] == [(2, "1", "a"), (3, "2", "b")]


# ------------------------------------------------------------------------------------------------ file-level problems


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "nope.csv")  # raised at call time, before iterating


def test_other_uri_schemes_are_refused_with_advice():
    message = file_error("s3://bucket/prompts.parquet")  # gs:// is read (tests/test_storage_gcs.py); others are not
    assert "s3://bucket/prompts.parquet" in message and "local file" in message


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    assert "is a directory" in file_error(tmp_path / "dir.csv")
    assert "is a directory" in file_error(tmp_path)  # no extension: still says what is wrong first


def test_unreadable_file_permission(tmp_path, monkeypatch):
    path = write(tmp_path, "m.csv", "prompt\na\n")
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(manifest.sources, "open", fake_open, raising=False)
    message = file_error(path)
    assert "m.csv" in message and "permission denied" in message


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file_chmod(tmp_path):
    path = write(tmp_path, "m.csv", "prompt\na\n")
    path.chmod(0)
    try:
        assert "permission denied" in file_error(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name", ["e.csv", "e.tsv", "e.parquet"])
def test_empty_file(tmp_path, name):
    message = file_error(write(tmp_path, name, b""))
    assert name in message and "empty" in message


def test_header_only_csv_and_zero_row_parquet(tmp_path):
    message = file_error(write(tmp_path, "h.csv", "id,prompt\n"))
    assert "h.csv" in message and "no rows" in message
    empty = pa.table({"prompt": pa.array([], pa.string())})
    message = file_error(write_parquet(tmp_path, "h.parquet", empty))
    assert "h.parquet" in message and "no rows" in message


def test_corrupt_parquet(tmp_path):
    junk = write(tmp_path, "junk.parquet", b"this is not parquet at all")
    message = file_error(junk)
    assert "junk.parquet" in message and "not a readable Parquet file" in message
    good = write_parquet(tmp_path, "good.parquet", {"prompt": [f"p{i}" for i in range(1000)]})
    truncated = write(tmp_path, "trunc.parquet", good.read_bytes()[:-100])
    assert "not a readable Parquet file" in file_error(truncated)
    csv_named_parquet = write(tmp_path, "c.parquet", "prompt\na\n")
    assert "--format csv" in file_error(csv_named_parquet)


def test_corrupt_parquet_page_raises_while_iterating(tmp_path):
    path = write_parquet(
        tmp_path, "big.parquet", {"prompt": [f"prompt number {i} " * 3 for i in range(20000)]}, row_group_size=5000
    )
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = b"\x55" * 3000
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="corrupt or unreadable after row"):
        list(read_manifest(path, batch_rows=1000))


def test_missing_prompt_column_lists_columns(tmp_path):
    message = file_error(write(tmp_path, "m.csv", "id,Prompt,style\n1,a,b\n"))
    assert "m.csv" in message and "'prompt'" in message
    assert "'id', 'Prompt', 'style'" in message and "--prompt-column" in message and "Did you mean 'Prompt'" in message
    rows, _ = read(tmp_path / "m.csv", prompt_column="Prompt")
    assert rows[0].prompt == "a" and rows[0].extra == {"style": "b"}


def test_custom_id_column_and_missing_custom_id_column(tmp_path):
    path = write(tmp_path, "m.csv", "sku,prompt,id\nA-1,a,first\n")
    rows, _ = read(path, id_column="sku")
    assert rows[0].id == "A-1" and rows[0].extra == {"id": "first"}
    message = file_error(path, id_column="key")
    assert "'key'" in message and "--id-column" in message


def test_duplicate_column_names(tmp_path):
    message = file_error(write(tmp_path, "d.csv", "prompt,x,x\na,1,2\n"))
    assert "'x'" in message and "more than once" in message


def test_invalid_utf8_names_row_and_column(tmp_path):
    content = b"id,prompt,note\n1,fine,ok\n2,\"multi\nline\",ok\n3,caf\xe9 au lait,ok\n"
    message = file_error(write(tmp_path, "latin1.csv", content))
    assert message.startswith(f"{tmp_path / 'latin1.csv'}, row 4, column 'prompt': invalid UTF-8")
    assert "UTF-8" in message


def test_invalid_utf8_in_a_later_block(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest.sources, "_CSV_BLOCK_BYTES", 4096)
    lines = [f"{i},prompt number {i}" for i in range(1, 2001)]
    body = ("id,prompt\n" + "\n".join(lines) + "\n").encode()
    body += b"2001,bad \xff byte\n"
    path = write(tmp_path, "late.csv", body)
    items = read_manifest(path)  # the first block is fine: no error yet
    with pytest.raises(ManifestError, match=r"late\.csv, row 2002, column 'prompt': invalid UTF-8"):
        list(items)


def test_wrong_number_of_cells(tmp_path):
    message = file_error(write(tmp_path, "c.csv", "id,prompt\n1,a\n2,b,extra\n"))
    assert message.startswith(f"{tmp_path / 'c.csv'}, row 3: expected 2 columns") and "found 3" in message


def test_unclosed_quote(tmp_path):
    # In the last column, pyarrow reads the rest of the file into the cell; that is caught at the end.
    message = file_error(write(tmp_path, "u.csv", 'id,prompt\n0,fine\n1,"never closed\n2,b\n'))
    assert message.startswith(f"{tmp_path / 'u.csv'}, row 3, column 'prompt': a quote is opened and never closed")
    # In another column, the record is short of cells.
    message = file_error(write(tmp_path, "v.csv", 'prompt,id\nfine,0\n"never closed,1\nb,2\n'))
    assert message.startswith(str(tmp_path / "v.csv")) and "row 3" in message
    # A legitimate multi-line cell at the end of the file is fine.
    rows, problems = read(write(tmp_path, "w.csv", 'id,prompt\n1,"two\nlines"\n'))
    assert problems == [] and rows[0].prompt == "two\nlines"


def test_invalid_default_options_raise(tmp_path):
    path = write(tmp_path, "m.csv", "prompt\na\n")
    message = file_error(path, model="gemini-3-pro-image-preview")  # shut down: refused, naming its successor
    assert "--model" in message and "shut down on 2026-06-25; use gemini-3-pro-image" in message
    assert "not a model name" in file_error(path, model="gemini 9")
    assert "--temperature" in file_error(path, temperature=5.0)
    assert "--variants" in file_error(path, variants=0)
    message = file_error(path, image_size="8K")  # no model column: every row uses the default model
    assert "--image-size" in message and "1K" in message
    assert "--aspect-ratio" in file_error(path, aspect_ratio="7:3")
    assert "--aspect-ratio" in file_error(path, aspect_ratio="1:8", model="gemini-2.5-flash-image")


# ------------------------------------------------------------------------------------------------ row-level problems


def test_prompt_problems(tmp_path):
    long_prompt = "x" * (manifest.MAX_PROMPT_CHARS + 1)
    text = f'id,prompt\n1,ok\n2,\n3,"   "\n4,"{long_prompt}"\n5,"{"y" * manifest.MAX_PROMPT_CHARS}"\n'
    rows, problems = read(write(tmp_path, "p.csv", text))
    assert [r.id for r in rows] == ["1", "5"]
    assert where(problems) == [(3, "prompt", ""), (4, "prompt", "   "), (5, "prompt", long_prompt)]
    assert "empty" in problems[0].message and "empty" in problems[1].message
    assert "100,000" in problems[2].message
    assert all(p.file == str(tmp_path / "p.csv") for p in problems)


def test_null_prompt_in_parquet(tmp_path):
    path = write_parquet(tmp_path, "n.parquet", {"prompt": ["a", None, " \t\n"]})
    rows, problems = read(path)
    assert [r.row for r in rows] == [1]
    assert where(problems) == [(2, "prompt", None), (3, "prompt", " \t\n")]


def test_empty_id(tmp_path):
    rows, problems = read(write(tmp_path, "i.csv", "id,prompt\nA,a\n,b\n  ,c\n"))
    assert [r.id for r in rows] == ["A"]
    assert where(problems) == [(3, "id", ""), (4, "id", "  ")]
    assert "id is empty" in problems[0].message
    rows, problems = read(write_parquet(tmp_path, "i.parquet", {"id": [1, None], "prompt": ["a", "b"]}))
    assert rows[0].id == "1" and where(problems) == [(2, "id", None)]


def test_duplicate_ids_are_not_checked_here(tmp_path):
    rows, problems = read(write(tmp_path, "d.csv", "id,prompt\nsame,a\nsame,b\n"))
    assert problems == [] and [r.id for r in rows] == ["same", "same"]


def test_unknown_models_pass_and_shut_down_ones_are_refused(tmp_path):
    # A model batcher does not know goes on (the API is asked before anything is sent); its settings are not checked.
    text = ("prompt,model,aspect_ratio\na,gemini-3-pro-image,\nb,models/gemini-3.1-flash-image,\nc,gemini-nano-banana-2.1,7:3\n"
            "d,,\ne,gemini-3-pro-image-preview,\nf,gemini-3.1-flash-image-preview,\ng,not a model,\n")
    rows, problems = read(write(tmp_path, "m.csv", text))
    assert [(r.row, r.model) for r in rows] == [
        (2, "gemini-3-pro-image"),
        (3, "gemini-3.1-flash-image"),
        (4, "gemini-nano-banana-2.1"),
        (5, catalog.DEFAULT_MODEL),
    ]
    assert rows[2].aspect_ratio == "7:3"  # as written: the API judges a model batcher does not know
    assert where(problems) == [(6, "model", "gemini-3-pro-image-preview"), (7, "model", "gemini-3.1-flash-image-preview"),
                               (8, "model", "not a model")]
    assert problems[0].message == "gemini-3-pro-image-preview was shut down on 2026-06-25; use gemini-3-pro-image"
    assert problems[1].message.endswith("use gemini-3.1-flash-image")
    assert "not a model name" in problems[2].message


def test_aspect_ratio_depends_on_model(tmp_path):
    text = (
        "prompt,model,aspect_ratio\n"
        "a,gemini-3.1-flash-image,1:8\n"
        "b,gemini-2.5-flash-image,1:8\n"
        "c,,7:3\n"
        "d,, 16:9 \n"
    )
    path = write(tmp_path, "ar.csv", text)
    rows, problems = read(path)
    assert [(r.row, r.aspect_ratio) for r in rows] == [(2, "1:8"), (5, "16:9")]
    assert where(problems) == [(3, "aspect_ratio", "1:8"), (4, "aspect_ratio", "7:3")]
    assert str(problems[1]) == (
        f"{path}, row 4, column 'aspect_ratio' = '7:3': not a valid aspect ratio for gemini-3.1-flash-image; "
        "use one of 1:1, 1:4, 1:8, 2:3, 3:2, 3:4, 4:1, 4:3, 4:5, 5:4, 8:1, 9:16, 16:9, 21:9"
    )


def test_image_size_is_case_sensitive_and_model_dependent(tmp_path):
    text = "prompt,model,image_size\na,gemini-3-pro-image,2K\nb,,1k\nc,,2K\nd,,1K\n"
    rows, problems = read(write(tmp_path, "s.csv", text), model="gemini-2.5-flash-image")
    assert [(r.row, r.image_size) for r in rows] == [(2, "2K"), (5, "1K")]
    assert where(problems) == [(3, "image_size", "1k"), (4, "image_size", "2K")]
    assert "did you mean '1K'" in problems[0].message
    assert "gemini-2.5-flash-image" in problems[1].message


def test_job_default_invalid_for_row_model_override(tmp_path):
    text = "prompt,model\na,gemini-3-pro-image\nb,gemini-2.5-flash-image\n"
    rows, problems = read(write(tmp_path, "d.csv", text), image_size="4K", model="gemini-3-pro-image")
    assert [(r.row, r.image_size) for r in rows] == [(2, "4K")]
    assert where(problems) == [(3, "image_size", "4K")]
    assert "job default" in problems[0].message and "--image-size" in problems[0].message


@pytest.mark.parametrize(
    ("column", "bad", "good"),
    [
        ("temperature", ["hot", "2.5", "-0.1", "nan", "inf"], [("0", 0.0), ("2", 2.0), ("0.7", 0.7)]),
        ("top_p", ["1.5", "-1", "x"], [("0.95", 0.95), ("1", 1.0), ("0", 0.0)]),
        ("seed", ["4.5", "abc", str(2**40), "1e400"], [("42", 42), ("42.0", 42), ("-7", -7), (" 3 ", 3)]),
        ("variants", ["0", "101", "2.5", "two", "-1"], [("1", 1), ("3", 3), ("100", 100), ("2.0", 2)]),
    ],
)
def test_numeric_columns(tmp_path, column, bad, good):
    cells = [g for g, _ in good] + bad
    text = f"prompt,{column}\n" + "".join(f"p,{cell}\n" for cell in cells)
    rows, problems = read(write(tmp_path, "n.csv", text))
    assert [getattr(r, column) for r in rows] == [value for _, value in good]
    first_bad_row = 2 + len(good)
    assert where(problems) == [(first_bad_row + i, column, cell) for i, cell in enumerate(bad)]


def test_numeric_columns_typed_in_parquet(tmp_path):
    path = write_parquet(
        tmp_path,
        "n.parquet",
        {
            "prompt": ["a", "b", "c", "d"],
            "seed": [42.0, 4.5, None, 7.0],
            "variants": pa.array([2, 0, None, 3], pa.int16()),
            "temperature": [0.5, 1.0, None, 3.0],
            "top_p": pa.array([None, None, None, None], pa.null()),
        },
    )
    rows, problems = read(path, variants=2, seed=9)
    assert [(r.row, r.seed, r.variants, r.temperature, r.top_p) for r in rows] == [(1, 42, 2, 0.5, None), (3, 9, 2, None, None)]
    assert where(problems) == [(2, "seed", "4.5"), (2, "variants", "0"), (4, "temperature", "3.0")]


def test_bool_is_not_a_seed(tmp_path):
    rows, problems = read(write_parquet(tmp_path, "b.parquet", {"prompt": ["a"], "seed": [True]}))
    assert rows == [] and where(problems) == [(1, "seed", "True")]


def test_several_problems_in_one_row_are_all_reported(tmp_path):
    text = "id,prompt,aspect_ratio,variants,temperature\n1,ok,,,\n2,,9:9,0,7\n3,fine,,,\n"
    rows, problems = read(write(tmp_path, "x.csv", text))
    assert [r.id for r in rows] == ["1", "3"]
    assert where(problems) == [
        (3, "prompt", ""),
        (3, "aspect_ratio", "9:9"),
        (3, "temperature", "7"),
        (3, "variants", "0"),
    ]


def test_row_problem_str_truncates_and_escapes():
    problem = RowProblem("m.csv", 7, "prompt", "a\nb" + "z" * 100, "too long")
    text = str(problem)
    assert text.startswith("m.csv, row 7, column 'prompt' = 'a\\nb")
    assert text.endswith("...': too long")
    assert len(text) < 120
    assert str(RowProblem("m.csv", 3, "id", None, "the id is empty")) == "m.csv, row 3, column 'id': the id is empty"
    assert str(RowProblem("m.csv", 3, None, None, "bad row")) == "m.csv, row 3: bad row"


# ------------------------------------------------------------------------------------------------ reference images


def test_reference_images_pipe_list_resolves_relative_to_manifest(tmp_path, monkeypatch):
    (tmp_path / "refs").mkdir()
    png = make_image(tmp_path / "refs" / "a.png")
    jpg = make_image(tmp_path / "refs" / "b.jpg", "JPEG")
    other = tmp_path / "elsewhere"
    other.mkdir()
    absolute = make_image(other / "c.webp", "WEBP")
    text = f"prompt,reference_images\na, refs/a.png | refs/b.jpg |\nb,{absolute}\nc,\nd,gs://bucket/x.png\n"
    path = write(tmp_path, "r.csv", text)
    monkeypatch.chdir(other)  # relative paths resolve against the manifest's directory, not the cwd
    rows, problems = read(path)
    assert problems == []
    assert [r.reference_images for r in rows] == [(str(png), str(jpg)), (str(absolute),), (), ("gs://bucket/x.png",)]


def test_reference_images_parquet_list_and_string(tmp_path):
    png = make_image(tmp_path / "a.png")
    jpg = make_image(tmp_path / "b.jpg", "JPEG")
    listed = write_parquet(
        tmp_path,
        "l.parquet",
        {"prompt": ["a", "b", "c"], "reference_images": pa.array([["a.png", "b.jpg"], None, []], pa.list_(pa.string()))},
    )
    rows, problems = read(listed)
    assert problems == [] and [r.reference_images for r in rows] == [(str(png), str(jpg)), (), ()]
    as_text = write_parquet(tmp_path, "s.parquet", {"prompt": ["a"], "reference_images": ["a.png|b.jpg"]})
    rows, problems = read(as_text)
    assert problems == [] and rows[0].reference_images == (str(png), str(jpg))


def test_reference_image_problems(tmp_path, monkeypatch):
    make_image(tmp_path / "ok.png")
    make_image(tmp_path / "anim.gif", "GIF")
    (tmp_path / "folder.png").mkdir()
    write(tmp_path, "text.png", "not an image")
    write(tmp_path, "locked.png", (tmp_path / "ok.png").read_bytes())
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if os.fspath(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(manifest.references, "open", fake_open, raising=False)
    text = (
        "prompt,reference_images\n"
        "a,ok.png|missing.png\n"
        "b,folder.png\n"
        "c,text.png\n"
        "d,locked.png\n"
        "e,anim.gif\n"
        "f,ok.png|ok.png|ok.png|ok.png\n"
        "g,ok.png\n"
    )
    rows, problems = read(write(tmp_path, "r.csv", text), model="gemini-2.5-flash-image")  # at most 3 references
    assert [r.row for r in rows] == [8]
    assert where(problems) == [
        (2, "reference_images", "missing.png"),
        (3, "reference_images", "folder.png"),
        (4, "reference_images", "text.png"),
        (5, "reference_images", "locked.png"),
        (6, "reference_images", "anim.gif"),
        (7, "reference_images", "ok.png|ok.png|ok.png|ok.png"),
    ]
    messages = [p.message for p in problems]
    assert "not found" in messages[0] and str(tmp_path / "missing.png") in messages[0]
    assert "not a file" in messages[1]
    assert "not a readable image" in messages[2]
    assert "permission denied" in messages[3]
    assert "GIF" in messages[4]
    assert "4 reference images" in messages[5] and "at most 3" in messages[5]


def test_reference_image_limit_follows_row_model(tmp_path):
    make_image(tmp_path / "ok.png")
    refs = "|".join(["ok.png"] * 5)
    text = f"prompt,model,reference_images\na,gemini-3-pro-image,{refs}\nb,,{refs}\n"
    rows, problems = read(write(tmp_path, "r.csv", text), model="gemini-2.5-flash-image")
    assert [r.row for r in rows] == [2] and len(rows[0].reference_images) == 5
    assert where(problems) == [(3, "reference_images", refs)]


def test_reference_images_checked_once_per_path(tmp_path, monkeypatch):
    make_image(tmp_path / "ok.png")
    calls = []
    from batcher.manifest import references

    real = references._image_problem
    monkeypatch.setattr(references, "_image_problem", lambda p: calls.append(p) or real(p))
    text = "prompt,reference_images\n" + "".join(f"p{i},ok.png\n" for i in range(50))
    rows, problems = read(write(tmp_path, "r.csv", text), batch_rows=7)
    assert len(rows) == 50 and problems == [] and calls == [str(tmp_path / "ok.png")]


# ------------------------------------------------------------------------------------------------ defaults, overrides, carried columns


def test_per_row_overrides_and_defaults(tmp_path):
    text = (
        "id,prompt,model,aspect_ratio,image_size,temperature,top_p,seed,variants,system_instruction\n"
        "1,a,,,,,,,,\n"
        "2,b,gemini-3-pro-image,21:9,4K,0.2,0.5,11,3,Be bold.\n"
    )
    options = dict(
        model="gemini-3-pro-image",
        aspect_ratio="4:3",
        image_size="2K",
        temperature=1.0,
        top_p=0.9,
        seed=5,
        variants=2,
        system_instruction="Photoreal.",
    )
    rows, problems = read(write(tmp_path, "o.csv", text), **options)
    assert problems == []
    first, second = rows
    assert (first.model, first.aspect_ratio, first.image_size, first.temperature, first.top_p, first.seed) == (
        "gemini-3-pro-image",
        "4:3",
        "2K",
        1.0,
        0.9,
        5,
    )
    assert (first.variants, first.system_instruction) == (2, "Photoreal.")
    assert (second.aspect_ratio, second.image_size, second.temperature, second.top_p, second.seed) == (
        "21:9",
        "4K",
        0.2,
        0.5,
        11,
    )
    assert (second.variants, second.system_instruction) == (3, "Be bold.")


def test_defaults_without_setting_columns(tmp_path):
    rows, _ = read(write(tmp_path, "d.csv", "prompt\na\n"), aspect_ratio="16:9", seed=3, variants=4)
    assert (rows[0].aspect_ratio, rows[0].seed, rows[0].variants) == ("16:9", 3, 4)


def test_carried_through_columns_csv_untouched(tmp_path):
    text = 'id,prompt,sku,price,note\n007,a,A-1,09.90,\n8,b,B-2,10,"x, y"\n'
    rows, _ = read(write(tmp_path, "c.csv", text))
    assert rows[0].id == "007"
    assert rows[0].extra == {"sku": "A-1", "price": "09.90", "note": ""}
    assert rows[1].extra == {"sku": "B-2", "price": "10", "note": "x, y"}
    assert list(rows[0].extra) == ["sku", "price", "note"]  # file order


def test_carried_through_columns_parquet_json_serialisable(tmp_path):
    import datetime as dt
    import decimal

    table = pa.table(
        {
            "prompt": ["a", "b"],
            "count": pa.array([1, None], pa.int64()),
            "score": [0.5, 1.5],
            "flag": [True, False],
            "when": pa.array([dt.datetime(2024, 5, 1, 12, 30), None], pa.timestamp("s")),
            "day": pa.array([dt.date(2024, 5, 1), dt.date(2024, 5, 2)]),
            "price": pa.array([decimal.Decimal("9.99"), None], pa.decimal128(6, 2)),
            "blob": pa.array([b"\x00\x01", None]),
            "tags": [["x", "y"], []],
            "meta": [{"k": 1}, None],
            "cat": pa.array(["u", "v"]).dictionary_encode(),
        }
    )
    rows, problems = read(write_parquet(tmp_path, "c.parquet", table))
    assert problems == []
    assert rows[0].extra == {
        "count": 1,
        "score": 0.5,
        "flag": True,
        "when": "2024-05-01T12:30:00",
        "day": "2024-05-01",
        "price": "9.99",
        "blob": "AAE=",
        "tags": ["x", "y"],
        "meta": {"k": 1},
        "cat": "u",
    }
    assert rows[1].extra["count"] is None and rows[1].extra["tags"] == []
    json.dumps([r.extra for r in rows])


def test_parquet_integer_and_float_ids(tmp_path):
    rows, _ = read(write_parquet(tmp_path, "i.parquet", {"id": [10, 11], "prompt": ["a", "b"]}))
    assert [r.id for r in rows] == ["10", "11"]
    rows, _ = read(write_parquet(tmp_path, "f.parquet", {"id": [10.0, 11.5], "prompt": ["a", "b"]}))
    assert [r.id for r in rows] == ["10", "11.5"]


# ------------------------------------------------------------------------------------------------ streaming


def _big_rows(n: int) -> list[dict]:
    aspects = ["", "16:9", "1:1", "7:3"]  # 7:3 is invalid: problems spread across batches
    return [
        {"id": f"r{i}", "prompt": f"product shot {i}, \"quoted\", line\nbreak" if i % 5 == 0 else f"shot {i}", "aspect_ratio": aspects[i % 4], "variants": str(1 + i % 3), "cat": f"c{i % 7}"}
        for i in range(n)
    ]


def _as_comparable(items):
    return [item if isinstance(item, RowProblem) else (item.row, item.id, item.prompt, item.aspect_ratio, item.variants, item.extra) for item in items]


def test_csv_streaming_over_many_blocks_and_batches(tmp_path, monkeypatch):
    data = _big_rows(1000)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(data[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(data)
    path = write(tmp_path, "big.csv", buffer.getvalue())
    whole = _as_comparable(read_manifest(path))
    monkeypatch.setattr(manifest.sources, "_CSV_BLOCK_BYTES", 2048)
    for batch_rows in (1, 7, 300):
        assert _as_comparable(read_manifest(path, batch_rows=batch_rows)) == whole
    problems = [p for p in whole if isinstance(p, RowProblem)]
    assert len(problems) == 250 and problems[0].row == 5 and problems[-1].row == 1001  # i = 3, 7, ..., 999
    assert len(whole) == 1000


@pytest.mark.slow
def test_parquet_streaming_over_row_groups_and_batches(tmp_path):
    data = _big_rows(1000)
    table = pa.Table.from_pylist(data)
    path = write_parquet(tmp_path, "big.parquet", table, row_group_size=128)
    whole = _as_comparable(read_manifest(path))
    for batch_rows in (1, 7, 300):
        assert _as_comparable(read_manifest(path, batch_rows=batch_rows)) == whole
    rows = [x for x in whole if not isinstance(x, RowProblem)]
    problems = [x for x in whole if isinstance(x, RowProblem)]
    assert rows[0][0] == 1 and rows[-1][0] == 999 and problems[-1].row == 1000 and len(problems) == 250


def test_parquet_row_numbers_do_not_follow_batch_order_tricks(tmp_path):
    path = write_parquet(tmp_path, "p.parquet", {"prompt": ["a", "", "c", "", "e"]}, row_group_size=2)
    rows, problems = read(path, batch_rows=2)
    assert [r.row for r in rows] == [1, 3, 5] and [p.row for p in problems] == [2, 4]
    assert [r.id for r in rows] == ["1", "3", "5"]


# ------------------------------------------------------------------------------------------------ property


printable_prompts = st.text(
    alphabet=st.characters(categories=("L", "M", "N", "P", "S", "Zs"), exclude_characters="\x00"),
    min_size=1,
    max_size=40,
).map(lambda s: s + "x") | st.text(alphabet=string.printable, min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(printable_prompts, min_size=1, max_size=25))
def test_prompts_round_trip_csv_and_parquet(tmp_path, prompts):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # so that a lone \r in a prompt is quoted
    writer.writerow(["prompt"])
    writer.writerows([[p] for p in prompts])
    csv_path = write(tmp_path, "h.csv", buffer.getvalue())
    pq_path = write_parquet(tmp_path, "h.parquet", {"prompt": pa.array(prompts, pa.string())})
    csv_rows, csv_problems = read(csv_path, batch_rows=3)
    pq_rows, pq_problems = read(pq_path, batch_rows=3)
    assert csv_problems == [] and pq_problems == []
    assert [r.prompt for r in csv_rows] == prompts == [r.prompt for r in pq_rows]
    assert [r.row for r in csv_rows] == list(range(2, len(prompts) + 2))
    assert [r.row for r in pq_rows] == list(range(1, len(prompts) + 1))
    assert [r.id for r in csv_rows] == [r.id for r in pq_rows] == [str(i) for i in range(1, len(prompts) + 1)]


# ------------------------------------------------------------------------------------------------ the same prompts, any format

AWKWARD = ['"G I G G L E" painted in thick paint', 'a "quote that never closes', "it's 50\" wide, 3' high",
           "comma, semicolon; pipe | backslash \\", "naïve café, 東京, emoji 😀", "  spaces kept inside  x"]
ONLY_CSV = ["a tab\there", "two\nlines", "\"\"doubled\"\" quotes"]  # TSV cannot hold a tab or a line break


def _hashes(path: Path) -> list[str]:
    from batcher.planning.prepare import References, image_requests
    from batcher.planning.requests import request_hash

    out = []
    for item in read_manifest(path):
        assert isinstance(item, ManifestRow), item
        out += [request_hash(r) for r in image_requests(item, References())]
    return out


def test_the_same_prompts_make_the_same_requests_from_csv_tsv_and_parquet(tmp_path):
    """What the user wrote is what is sent: TSV fields are taken literally (it has no quoting), CSV follows RFC 4180,
    Parquet is typed; the same prompt makes the same request (hash) from each."""
    prompts = AWKWARD + ONLY_CSV
    ids = [f"r{i}" for i in range(len(prompts))]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), tmp_path / "m.parquet")
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "prompt"], *zip(ids, prompts)])
    (tmp_path / "m.tsv").write_text("id\tprompt\n" + "".join(f"{i}\t{p}\n" for i, p in zip(ids, AWKWARD)), encoding="utf-8")
    parquet, csv_hashes, tsv = _hashes(tmp_path / "m.parquet"), _hashes(tmp_path / "m.csv"), _hashes(tmp_path / "m.tsv")
    assert csv_hashes == parquet and tsv == parquet[:len(AWKWARD)]
    assert [r.prompt for r in read_manifest(tmp_path / "m.tsv")][0] == AWKWARD[0]  # the quotes are the user's


def test_a_tsv_field_with_a_tab_is_an_error_naming_its_row(tmp_path):
    path = write(tmp_path, "m.tsv", "id\tprompt\na\tfine\nb\ttab\there\nc\tfine too\n")
    message = file_error(path)
    assert "row 3" in message and "tab" in message


def test_a_csv_quote_that_never_closes_is_an_error_naming_the_row_it_opened(tmp_path):
    path = write(tmp_path, "m.csv", 'id,prompt,colour\na,one,red\nb,"never closed,blue\nc,three,green\nd,four,grey\n')
    message = file_error(path)
    assert "row 3, column 'prompt': a quote is opened and never closed" in message
