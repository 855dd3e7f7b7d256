"""Stream-read and validate prompt manifests (Parquet, CSV, TSV).

A manifest is a table of prompts (see docs/product.md, "Manifest"). `read_manifest` streams it in batches,
so its size is bounded by disk, not memory, and yields one item per data row, in file order:

- a `ManifestRow` when the row is valid (job defaults from `ManifestOptions` applied where a cell is empty), or
- one `RowProblem` per problem when it is not (the caller collects them all and reports them, or skips the
  rows with --skip-invalid).

Problems with the file as a whole (missing, unreadable, empty, corrupt, no prompt column, ...) raise
`ManifestError` with a message that names the file and says what to do. Duplicate ids are *not* checked
here: the caller does that in the ledger so that it scales to millions of rows.

Row numbers are 1-based and match what a spreadsheet shows: in CSV/TSV the header is row 1, so the first
data row is row 2 (a record with quoted newlines still counts as one row; blank lines are skipped and not
counted). In Parquet the first row is row 1.

Limits checked per row: prompt at most `MAX_PROMPT_CHARS` characters; temperature in [0, 2]; top_p in [0, 1];
seed a 32-bit signed integer; variants an integer in [1, `MAX_VARIANTS`]; at most the model's
`max_reference_images` reference images, each a readable PNG/JPEG/WEBP/HEIF file that Pillow can verify.
"""

from __future__ import annotations

import base64
import bisect
import codecs
import contextlib
import csv
import datetime as _dt
import decimal
import itertools
import math
import io
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batcher import catalog
from batcher.storage import gcs
from batcher.errors import BatcherError
from batcher.errors import ManifestError

__all__ = [
    "FORMATS",
    "KNOWN_COLUMNS",
    "MAX_PROMPT_CHARS",
    "MAX_VARIANTS",
    "ManifestOptions",
    "ManifestRow",
    "RowProblem",
    "read_manifest",
]

#: Longest prompt accepted, in characters. The image models take 32k-64k input tokens; 100,000 characters is
#: roughly 25k tokens of English, so a longer prompt is almost certainly a broken cell (an unclosed quote).
MAX_PROMPT_CHARS = 100_000
#: Most images asked for one row.
MAX_VARIANTS = 100
SEED_MIN, SEED_MAX = -(2**31), 2**31 - 1  # GenerationConfig.seed is an int32
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
#: Image formats the Gemini API accepts as input, by Pillow's format name (MPO is a multi-picture JPEG).
REFERENCE_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "HEIF", "HEIC"})

FORMATS = ("parquet", "csv", "tsv")
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
#: CSV/TSV are parsed in blocks of this many bytes; a single record must fit in one block.
_CSV_BLOCK_BYTES = 8 * 1024 * 1024
#: Reference-image checks are cached per path; the cache is cleared when it grows past this many paths.
_IMAGE_CACHE_MAX = 200_000

SETTING_COLUMNS = (
    "model",
    "aspect_ratio",
    "image_size",
    "temperature",
    "top_p",
    "seed",
    "variants",
    "reference_images",
    "system_instruction",
)
#: Columns with a meaning (besides the prompt and id columns, whose names are options).
KNOWN_COLUMNS = SETTING_COLUMNS

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


@dataclass(frozen=True)
class ManifestOptions:
    prompt_column: str = "prompt"
    id_column: str = "id"
    format: str | None = None  # "parquet" | "csv" | "tsv"; None = by extension
    model: str = catalog.DEFAULT_MODEL  # job defaults, overridden per row by columns of the same name
    aspect_ratio: str | None = None
    image_size: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    variants: int = 1
    system_instruction: str | None = None


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~2 µs a row at millions of rows
class ManifestRow:
    row: int  # 1-based, as a spreadsheet shows it (CSV/TSV: header is row 1; Parquet: first row is 1)
    id: str  # the id column's value as a string; default when the column is absent: str(data row index + 1)
    prompt: str
    model: str  # canonical catalog name (a "models/" prefix is removed)
    aspect_ratio: str | None
    image_size: str | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    variants: int
    reference_images: tuple[str, ...]  # absolute paths (URIs such as gs://... are passed through unchanged)
    system_instruction: str | None
    extra: dict = field(default_factory=dict)  # every other column, untouched (JSON-serialisable values)


@dataclass(frozen=True, slots=True)
class RowProblem:
    file: str
    row: int
    column: str | None
    value: str | None
    message: str

    def __str__(self) -> str:
        text = f"{self.file}, row {self.row}"
        if self.column is not None:
            text += f", column {self.column!r}"
        if self.value is not None:
            shown = self.value if len(self.value) <= 60 else self.value[:57] + "..."
            text += f" = {shown!r}"
        return f"{text}: {self.message}"


# --------------------------------------------------------------------------------------------------------
# Cell converters. Each takes a raw cell (a str from CSV; any Python value from Parquet) that is not empty
# and returns the converted value, or raises _Bad with a message saying what is wrong and what to do.


class _Bad(Exception):
    pass


def _shown(raw: Any) -> str:
    return raw if isinstance(raw, str) else str(raw)


def _is_empty(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _to_float(raw: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(raw, bool):
        raise _Bad(f"{name} must be a number from {lo:g} to {hi:g}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise _Bad(f"{name} must be a number from {lo:g} to {hi:g}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _Bad(f"{name} must be a number from {lo:g} to {hi:g}")
    return value


def _to_int(raw: Any) -> int | None:
    """An integer from 42, 42.0, "42", "42.0"; None if the value is not a whole number."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            try:
                raw = float(text)
            except ValueError:
                return None
    if isinstance(raw, (float, decimal.Decimal)):
        try:
            return int(raw) if math.isfinite(raw) and raw == int(raw) else None
        except (ValueError, OverflowError):
            return None
    return None


def _conv_temperature(raw: Any) -> float:
    return _to_float(raw, "temperature", *TEMPERATURE_RANGE)


def _conv_top_p(raw: Any) -> float:
    return _to_float(raw, "top_p", *TOP_P_RANGE)


def _conv_seed(raw: Any) -> int:
    value = _to_int(raw)
    if value is None:
        raise _Bad("seed must be a whole number (e.g. 42)")
    if not SEED_MIN <= value <= SEED_MAX:
        raise _Bad(f"seed must be a 32-bit integer, from {SEED_MIN} to {SEED_MAX}")
    return value


def _conv_variants(raw: Any) -> int:
    value = _to_int(raw)
    if value is None or not 1 <= value <= MAX_VARIANTS:
        raise _Bad(f"variants must be a whole number from 1 to {MAX_VARIANTS}")
    return value


def _conv_model(raw: Any) -> str:
    """A model name as the API takes it ("models/" dropped). A model the catalog does not know is accepted here
    (the API is asked about it before anything is sent); one that is shut down is refused, naming its successor."""
    if not isinstance(raw, str):
        raise _Bad("model must be text")
    name = raw.strip().removeprefix("models/")
    problem = catalog.model_name_problem(name) or catalog.refusal(name)
    if problem:
        raise _Bad(problem)
    return name


def _conv_text(name: str) -> Callable[[Any], str]:
    def conv(raw: Any) -> str:
        if not isinstance(raw, str):
            raise _Bad(f"{name} must be text")
        return raw.strip()

    return conv


def _conv_system_instruction(raw: Any) -> str:
    if not isinstance(raw, str):
        raise _Bad("system_instruction must be text")
    return raw  # kept as written (only an all-whitespace cell counts as empty)


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "model": _conv_model,
    "aspect_ratio": _conv_text("aspect_ratio"),
    "image_size": _conv_text("image_size"),
    "temperature": _conv_temperature,
    "top_p": _conv_top_p,
    "seed": _conv_seed,
    "variants": _conv_variants,
    "system_instruction": _conv_system_instruction,
}


def _aspect_ratio_problem(spec: catalog.ModelSpec, value: str) -> str | None:
    if value in spec.aspect_ratios:
        return None
    return f"not a valid aspect ratio for {spec.name}; use one of {', '.join(spec.aspect_ratios)}"


def _image_size_problem(spec: catalog.ModelSpec, value: str) -> str | None:
    if value in spec.image_sizes:
        return None
    message = f"not a valid image size for {spec.name}; use one of {', '.join(spec.image_sizes)}"
    if value.upper() in spec.image_sizes:
        message += f" (sizes are case-sensitive: did you mean {value.upper()!r}?)"
    return message


# --------------------------------------------------------------------------------------------------------
# Reference images


def _split_references(raw: Any) -> list[str]:
    """The paths in a reference_images cell: a `|`-separated string or a list of strings."""
    if isinstance(raw, str):
        items = raw.split("|")
    elif isinstance(raw, (list, tuple)):
        items = []
        for item in raw:
            if item is None:
                continue
            if not isinstance(item, str):
                raise _Bad("reference_images must be text: paths separated by '|', or a list of paths")
            items.append(item)
    else:
        raise _Bad("reference_images must be text: paths separated by '|', or a list of paths")
    return [item.strip() for item in items if item.strip()]


class _ImageChecker:
    """Checks reference images once per distinct path."""

    def __init__(self, base_dir: str):
        self.base_dir = base_dir
        self.cache: dict[str, str | None] = {}

    def resolve(self, item: str) -> str:
        if _URI_RE.match(item):
            return item
        if gcs.is_gcs(self.base_dir):  # relative to a gs:// manifest: an object beside it
            return gcs.join(self.base_dir, os.path.normpath(item).lstrip("./"))
        return os.path.abspath(os.path.join(self.base_dir, item))

    def problem(self, path: str) -> str | None:
        if _URI_RE.match(path):
            return None  # remote objects are checked where they are read
        try:
            return self.cache[path]
        except KeyError:
            pass
        if len(self.cache) >= _IMAGE_CACHE_MAX:
            self.cache.clear()
        result = self.cache[path] = _image_problem(path)
        return result

    def close(self) -> None:
        self.cache.clear()


def _image_problem(path: str) -> str | None:
    from PIL import Image  # imported lazily: most manifests have no reference images

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"reference image not found: {path}"
    except OSError as exc:
        return f"reference image cannot be read: {path} ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return f"reference image is not a file: {path}"
    try:
        with open(path, "rb") as fh:
            with Image.open(fh) as image:
                fmt = image.format
                image.verify()
    except PermissionError:
        return f"reference image is not readable (permission denied): {path}; check its permissions"
    except Exception as exc:  # Pillow raises many kinds (UnidentifiedImageError, SyntaxError, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"reference image is not a readable image: {path} ({detail})"
    if fmt not in REFERENCE_IMAGE_FORMATS:
        return f"reference image format {fmt} is not accepted by the API; use PNG, JPEG or WEBP: {path}"
    return None


# --------------------------------------------------------------------------------------------------------
# JSON-safe carried-through columns


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _plain_type(t: pa.DataType) -> bool:
    """True when to_pylist() of this type gives JSON-serialisable values as they are."""
    if pa.types.is_dictionary(t):
        return _plain_type(t.value_type)
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or getattr(pa.types, "is_list_view", lambda _t: False)(t)
    ):
        return _plain_type(t.value_type)
    if pa.types.is_struct(t):
        return all(_plain_type(t.field(i).type) for i in range(t.num_fields))
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or getattr(pa.types, "is_string_view", lambda _t: False)(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
    )


def _column_values(array: pa.Array | pa.ChunkedArray, plain: bool) -> list:
    values = array.to_pylist()
    return values if plain else [_jsonable(v) for v in values]


# --------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Source:
    display: str  # the path as given, for messages
    path: str  # absolute path
    fmt: str
    names: list[str]
    types: list[pa.DataType] | None  # None for CSV/TSV (every column is a string)
    first_row: int  # row number of the first data row
    batches: Iterator[pa.RecordBatch]
    # CSV/TSV: for each blank line (which a spreadsheet shows as a row, but the reader skips), how many data
    # rows come before it; sorted. Empty when there are none.
    blank_lines: list[int] = field(default_factory=list)

    def row_numbers(self, first_index: int, n: int) -> list[int] | None:
        """The row numbers of data rows first_index..first_index+n-1 (0-based), or None when they are simply
        first_row + index (no blank lines)."""
        if not self.blank_lines:
            return None
        return [self.first_row + k + bisect.bisect_right(self.blank_lines, k) for k in range(first_index, first_index + n)]


def _format_for(path: str, display: str, options: ManifestOptions) -> str:
    if options.format is not None:
        fmt = options.format.lower().lstrip(".")
        if fmt not in FORMATS:
            raise ManifestError(f"Unknown manifest format {options.format!r}; use one of {', '.join(FORMATS)}.")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise ManifestError(
            f"{display}: cannot tell the manifest format from the extension {ext or '(none)'!r}; "
            f"use .parquet, .csv or .tsv, or pass --format parquet|csv|tsv."
        )
    return _EXTENSIONS[ext]


def _open_binary(path: str):
    """A binary reader for a local path or a gs:// object (streamed, buffered)."""
    return gcs.open_read(path) if gcs.is_gcs(path) else open(path, "rb")


def _open_arrow(path: str):
    return pa.PythonFile(gcs.open_read(path), mode="r") if gcs.is_gcs(path) else pa.OSFile(path)


def locate(path: str | os.PathLike) -> str | Path:
    """A manifest's location, checked as reading it would (a gs:// object that exists, or a readable local file):
    a gs:// URI as a string, a local path as a Path. Raises ManifestError saying what is wrong."""
    display = os.fsdecode(os.fspath(path))
    if gcs.is_gcs(display):
        _check_gcs_object(display)
        return display
    if _URI_RE.match(display):
        raise ManifestError(f"{display}: only local paths and gs:// URIs are read; copy it to a local file first.")
    _check_file(display, display)
    return Path(display)


def _check_gcs_object(uri: str) -> None:
    try:
        size = gcs.size(uri)
    except BatcherError as exc:
        raise ManifestError(str(exc)) from None
    if size == 0:
        raise ManifestError(f"{uri}: the manifest is empty (0 bytes); it needs a header and at least one row.")


def manifest_fingerprint(path: str, options: "ManifestOptions") -> dict:
    """What identifies this manifest's content for a run: its location, size and version."""
    if gcs.is_gcs(path):
        return {"manifest": path, "size": gcs.size(path), "generation": gcs.generation(path), "options": asdict(options)}
    st = os.stat(path)
    return {"manifest": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "options": asdict(options)}


def carried_schema(path: str, options: "ManifestOptions") -> pa.Schema:
    """The columns carried through to the output, with their types as the reader yields them: Parquet's
    numbers, booleans and strings keep their type; everything else (and every CSV/TSV column) is a string."""
    source = _open(path, options, 1)
    try:
        skip = set(KNOWN_COLUMNS) | {options.prompt_column, options.id_column}
        types = source.types or [pa.string()] * len(source.names)
        simple = lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t)  # noqa: E731
        return pa.schema([pa.field(n, t if simple(t) else pa.string()) for n, t in zip(source.names, types) if n not in skip])
    finally:
        getattr(source.batches, "close", lambda: None)()


def _check_file(path: str, display: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ManifestError(f"{display}: no such file (the manifest); check the path.") from None
    except OSError as exc:
        raise ManifestError(f"{display}: cannot read the manifest ({exc.strerror or exc}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise ManifestError(f"{display}: is a directory, not a manifest file; give the path of a .parquet, .csv or .tsv file.")
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{display}: is not a regular file; give the path of a .parquet, .csv or .tsv file.")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ManifestError(f"{display}: permission denied reading the manifest; check the file's permissions.") from None
    except OSError as exc:
        raise ManifestError(f"{display}: cannot read the manifest ({exc.strerror or exc}).") from None
    if st.st_size == 0:
        raise ManifestError(f"{display}: the manifest is empty (0 bytes); it needs a header and at least one row.")


def _slice(batch: pa.RecordBatch, rows: int) -> Iterator[pa.RecordBatch]:
    if batch.num_rows <= rows:
        if batch.num_rows:
            yield batch
        return
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def _open_parquet(path: str, display: str, batch_rows: int) -> _Source:
    try:
        pf = pq.ParquetFile(_open_binary(path) if gcs.is_gcs(path) else path)
        schema = pf.schema_arrow
    except Exception as exc:
        raise ManifestError(
            f"{display}: not a readable Parquet file ({_first_line(exc)}); "
            f"check that it was written completely, or pass --format csv if it is a CSV file."
        ) from None
    if pf.metadata.num_rows == 0:
        raise ManifestError(f"{display}: the manifest has no rows (only a schema); add at least one row.")

    def batches() -> Iterator[pa.RecordBatch]:
        done = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                done += batch.num_rows
                yield from _slice(batch, batch_rows)
        except ManifestError:
            raise
        except Exception as exc:
            raise ManifestError(
                f"{display}: the Parquet file is corrupt or unreadable after row {done} "
                f"({_first_line(exc)}); rewrite it."
            ) from None
        finally:
            pf.close()

    return _Source(display, path, "parquet", list(schema.names), list(schema.types), 1, batches())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_csv(path: str, display: str, fmt: str, batch_rows: int) -> _Source:
    delimiter = "\t" if fmt == "tsv" else ","
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    read = pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=True)

    def fail(exc: BaseException) -> ManifestError:
        return _csv_error(path, display, delimiter, exc)

    # Read the header (the first block, once), then reopen with every column typed as a string so that a
    # column's type cannot change from one block to the next, and so that cells are never reinterpreted.
    try:
        with _open_arrow(path) as fh:
            names = list(pacsv.open_csv(fh, read_options=read, parse_options=parse).schema.names)
    except Exception as exc:
        raise fail(exc) from None
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )
    try:
        fh = _open_arrow(path)
        reader = pacsv.open_csv(fh, read_options=read, parse_options=parse, convert_options=convert)
        first = reader.read_next_batch()
    except StopIteration:
        fh.close()
        raise ManifestError(f"{display}: the manifest has a header but no rows; add at least one row.") from None
    except Exception as exc:
        fh.close()
        raise fail(exc) from None

    def batches() -> Iterator[pa.RecordBatch]:
        last, rows = first, first.num_rows
        try:
            yield from _slice(first, batch_rows)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except Exception as exc:
                    raise fail(exc) from None
                if batch.num_rows:
                    last, rows = batch, rows + batch.num_rows
                yield from _slice(batch, batch_rows)
        finally:
            fh.close()
        _check_unclosed_quote(path, display, last, rows)

    source = _Source(display, path, fmt, names, None, 2, batches(), _blank_lines(path, delimiter))
    if first.num_rows == 0:  # pyarrow can return an empty first batch; make sure there is a row somewhere
        source.batches = _require_rows(source.batches, display)
    return source


_BLANK_LINE = re.compile(rb"\n\r?\n")


def _blank_lines(path: str, delimiter: str) -> list[int]:
    """Where the file's blank lines are, as counts of data rows before each (see _Source.blank_lines).

    A byte scan finds out whether the file has a blank line at all (most don't: then that is all it costs);
    only then is it parsed with the csv module, which sees quoted newlines as pyarrow does and yields an empty
    record for a blank line. (A quoted value with an empty line inside can trigger that parse; it finds no blank
    line there.) Blank lines before the header are not counted. A gs:// manifest is not read twice: its rows are
    numbered without blank lines."""
    if gcs.is_gcs(path):
        return []
    with open(path, "rb") as fh:
        tail = b""  # the end of the previous block: a blank line can straddle two
        for block in iter(lambda: fh.read(1 << 22), b""):
            if _BLANK_LINE.search(tail + block):
                break
            tail = block[-2:]
        else:
            return []
    blanks: list[int] = []
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long prompt is a valid cell
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            records = csv.reader(fh, delimiter=delimiter, quotechar='"', doublequote=True, strict=False)
            data_rows = -1  # the header is not a data row
            for record in records:
                if record:
                    data_rows += 1
                elif data_rows >= 0:
                    blanks.append(data_rows)
    except csv.Error:
        return []  # a file the csv module can't read: pyarrow's verdict stands, rows numbered without blank lines
    finally:
        csv.field_size_limit(old_limit)
    return blanks


def _check_unclosed_quote(path: str, display: str, last: pa.RecordBatch, rows: int) -> None:
    """pyarrow accepts a quote that is never closed in the last column: the rest of the file becomes one cell.

    Such a cell holds a newline (so it was quoted), yet the file does not end with a closing quote.
    """
    if not last.num_rows or not last.num_columns:
        return
    value = last.column(last.num_columns - 1)[last.num_rows - 1].as_py()
    if not isinstance(value, str) or ("\n" not in value and "\r" not in value):
        return
    with _open_binary(path) as fh:
        end = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, end - 64))
        tail = fh.read().rstrip(b"\r\n")
    if not tail.endswith(b'"'):
        column = last.schema.names[-1]
        raise ManifestError(
            f"{display}, row {rows + 1}, column {column!r}: a quote is opened and never closed, so the rest of the "
            f"file was read into this cell; close the quote."
        )


def _require_rows(batches: Iterator[pa.RecordBatch], display: str) -> Iterator[pa.RecordBatch]:
    seen = False
    for batch in batches:
        seen = True
        yield batch
    if not seen:
        raise ManifestError(f"{display}: the manifest has a header but no rows; add at least one row.")


def _csv_error(path: str, display: str, delimiter: str, exc: BaseException) -> ManifestError:
    """A ManifestError for a pyarrow CSV failure, naming the row at fault when a rescan can find it."""
    detail = _first_line(exc)
    if "Empty CSV file" in detail:
        return ManifestError(f"{display}: the manifest is empty; it needs a header and at least one row.")
    located = _locate_csv_problem(path, delimiter)
    if located:
        return ManifestError(f"{display}, {located}")
    if "straddling" in detail or "straddles" in detail:
        return ManifestError(
            f"{display}: a row is larger than {_CSV_BLOCK_BYTES // (1024 * 1024)} MiB; "
            f"look for a quote that is opened and never closed."
        )
    return ManifestError(f"{display}: cannot parse the file as {'TSV' if delimiter == chr(9) else 'CSV'} ({detail}).")


def _locate_csv_problem(path: str, delimiter: str) -> str | None:
    """Rescan a CSV file that pyarrow refused and describe the first bad record ("row N: ..."), or None.

    Only run on the error path. Rows are numbered as in the normal read: header row 1, a blank line after the
    header counts as a row (see _blank_lines).
    """
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header: list[str] | None = None
            row = 0
            try:
                for record in reader:
                    if not record:
                        row += header is not None
                        continue
                    row += 1
                    if header is None:
                        header = record
                    for i, cell in enumerate(record):
                        if _has_surrogates(cell):
                            column = header[i] if i < len(header) and not _has_surrogates(header[i]) else f"#{i + 1}"
                            offset = _invalid_utf8_offset(cell)
                            return (
                                f"row {row}, column {column!r}: invalid UTF-8 (byte {offset + 1} of the cell); "
                                f"save the file as UTF-8."
                            )
                    if len(record) != len(header):
                        return (
                            f"row {row}: expected {len(header)} columns like the header, found {len(record)}; "
                            f"quote cells that contain {'tabs' if delimiter == chr(9) else 'commas'}."
                        )
            except csv.Error as exc:
                return f"row {row + 1} (line {reader.line_num}): {exc}; look for a quote that is never closed."
    except OSError:
        return None
    finally:
        csv.field_size_limit(old_limit)
    return None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _invalid_utf8_offset(cell: str) -> int:
    raw = cell.encode("utf-8", errors="surrogateescape")
    try:
        codecs.decode(raw, "utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return 0


def _open(path: str | os.PathLike, options: ManifestOptions, batch_rows: int) -> _Source:
    display = os.fsdecode(os.fspath(path))
    located = locate(display)
    abspath = located if isinstance(located, str) else os.path.abspath(display)
    fmt = _format_for(display, display, options)
    if fmt == "parquet":
        return _open_parquet(abspath, display, batch_rows)
    return _open_csv(abspath, display, fmt, batch_rows)


# --------------------------------------------------------------------------------------------------------
# Options


def _check_options(options: ManifestOptions) -> str:
    """Check the job defaults; returns the default model's name (the catalog may not know it)."""
    try:
        default_model = _conv_model(options.model or "")
    except _Bad as bad:
        raise ManifestError(f"Invalid default model {options.model!r} (--model): {bad}.") from None
    checks: list[tuple[str, Callable[[Any], Any], Any]] = [
        ("temperature", _conv_temperature, options.temperature),
        ("top_p", _conv_top_p, options.top_p),
        ("seed", _conv_seed, options.seed),
        ("variants", _conv_variants, options.variants),
    ]
    for name, conv, value in checks:
        if value is None:
            continue
        try:
            conv(value)
        except _Bad as bad:
            raise ManifestError(f"Invalid default --{name.replace('_', '-')} {value!r}: {bad}.") from None
    return default_model


# --------------------------------------------------------------------------------------------------------
# The reader


def read_manifest(
    path: str | os.PathLike,
    options: ManifestOptions = ManifestOptions(),
    batch_rows: int = 65536,
) -> Iterator[ManifestRow | RowProblem]:
    """Stream a manifest's rows, validated, in file order.

    File-level problems raise ManifestError here, before the first row (the file is opened and its header and
    first block read eagerly); a problem found later in the file (a corrupt block) raises while iterating.
    """
    source, default_model = _opened(path, options, batch_rows)
    return _rows(source, options, default_model)


def read_manifest_blocks(
    path: str | os.PathLike,
    options: ManifestOptions = ManifestOptions(),
    batch_rows: int = 65536,
) -> Iterator[RowBlock]:
    """read_manifest, a block of rows at a time, as columns (RowBlock.items() gives its rows and problems)."""
    source, default_model = _opened(path, options, batch_rows)
    return _blocks(source, options, default_model)


def _opened(path: str | os.PathLike, options: ManifestOptions, batch_rows: int) -> tuple[_Source, str]:
    """The manifest opened, with the checks of the whole file made (see read_manifest)."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    default_model = _check_options(options)
    default_spec = catalog.model_spec(default_model)
    source = _open(path, options, batch_rows)
    names = source.names

    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(
            f"{source.display}: column name(s) {', '.join(map(repr, duplicates))} appear more than once; "
            f"rename them so each column has a unique name."
        )
    if options.prompt_column not in names:
        hint = ""
        near = [n for n in names if n.strip().lower() == options.prompt_column.strip().lower()]
        if near:
            hint = f" Did you mean {near[0]!r}?"
        raise ManifestError(
            f"{source.display}: no prompt column {options.prompt_column!r}; the columns are "
            f"{', '.join(map(repr, names))}. Name the prompt column with --prompt-column.{hint}"
        )
    if options.id_column not in names and options.id_column != "id":
        raise ManifestError(
            f"{source.display}: no id column {options.id_column!r}; the columns are "
            f"{', '.join(map(repr, names))}. Name the id column with --id-column, or leave it out to number rows."
        )
    if default_spec is not None and ("model" not in names or options.prompt_column == "model" or options.id_column == "model"):
        # Every row uses the default model: check the default aspect ratio and size once, up front.
        for name, value, check in (
            ("aspect-ratio", options.aspect_ratio, _aspect_ratio_problem),
            ("image-size", options.image_size, _image_size_problem),
        ):
            if value is not None and (message := check(default_spec, value)):
                raise ManifestError(f"Invalid default --{name} {value!r}: {message}.")
    return source, default_model


_BAD = object()  # a cell that failed validation (its row is reported, never yielded)

_NUMERIC: dict[str, tuple[pa.DataType, float, float]] = {
    "temperature": (pa.float64(), *TEMPERATURE_RANGE),
    "top_p": (pa.float64(), *TOP_P_RANGE),
    "seed": (pa.int64(), SEED_MIN, SEED_MAX),
    "variants": (pa.int64(), 1, MAX_VARIANTS),
}
_ASPECT_RATIOS = {name: frozenset(spec.aspect_ratios) for name, spec in catalog.MODELS.items()}
_IMAGE_SIZES = {name: frozenset(spec.image_sizes) for name, spec in catalog.MODELS.items()}
_MAX_REFERENCES = {name: spec.max_reference_images for name, spec in catalog.MODELS.items()}


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _t: False)(t)


def _decoded(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _blank_to_null(arr: pa.Array, strip: bool = True) -> pa.Array:
    """Text cells with whitespace removed (when strip), and all-whitespace cells made null."""
    trimmed = pc.utf8_trim_whitespace(arr)
    empty = pc.equal(pc.utf8_length(trimmed), 0)
    base = trimmed if strip else arr
    return pc.if_else(empty, pa.scalar(None, base.type), base)


def _fast_numeric(arr: pa.Array, target: pa.DataType, lo: float, hi: float) -> list | None:
    """The column's values (None for empty cells) computed in Arrow, or None if any cell needs a closer look."""
    t = arr.type
    try:
        if pa.types.is_null(t):
            return [None] * len(arr)
        if _is_text_type(t):
            arr = pc.cast(_blank_to_null(arr), target)
        elif pa.types.is_integer(t) or (pa.types.is_floating(t) and pa.types.is_floating(target)):
            arr = pc.cast(arr, target)
        else:
            return None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    if pa.types.is_floating(target) and pc.any(pc.invert(pc.is_finite(arr))).as_py():
        return None
    bounds = pc.min_max(arr).as_py()
    if bounds["min"] is not None and (bounds["min"] < lo or bounds["max"] > hi):
        return None
    return arr.to_pylist()


def _fast_text(arr: pa.Array, strip: bool = True) -> list | None:
    if pa.types.is_null(arr.type):
        return [None] * len(arr)
    if not _is_text_type(arr.type):
        return None
    return _blank_to_null(arr, strip).to_pylist()


def _slow_column(col: str, raws: list[Any], add: Callable[[int, str, Any, str], None]) -> list:
    """Values per cell (None for empty, _BAD for invalid), converting each distinct cell once."""
    conv = _CONVERTERS[col]
    cache: dict[Any, tuple[Any, str | None]] = {}
    values: list[Any] = []
    append = values.append
    for j, raw in enumerate(raws):
        try:
            result = cache[raw]
        except (KeyError, TypeError):
            if _is_empty(raw):
                result = (None, None)
            else:
                try:
                    result = (conv(raw), None)
                except _Bad as bad:
                    result = (_BAD, str(bad))
            try:
                cache[raw] = result
            except TypeError:
                pass
        if result[1] is not None:
            add(j, col, raw, result[1])
        append(result[0])
    return values


class _Batch:
    """Validation of one record batch: column by column, in Arrow where it can be."""

    def __init__(self, batch: pa.RecordBatch, index: dict[str, int], display: str, row0: int, rows: list[int] | None = None):
        self.batch = batch
        self.index = index
        self.display = display
        self.row0 = row0
        self.rows = rows  # the rows' numbers when they are not row0, row0 + 1, ... (blank lines in between)
        self.n = batch.num_rows
        self.problems: dict[int, list[RowProblem]] = {}
        self._raws: dict[str, list[Any]] = {}

    def add(self, j: int, column: str | None, raw: Any, message: str) -> None:
        shown = None if raw is None else _shown(raw)
        row = self.rows[j] if self.rows is not None else self.row0 + j
        self.problems.setdefault(j, []).append(RowProblem(self.display, row, column, shown, message))

    def array(self, name: str) -> pa.Array:
        return _decoded(self.batch.column(self.index[name]))

    def raws(self, name: str) -> list[Any]:
        if name not in self._raws:
            self._raws[name] = self.batch.column(self.index[name]).to_pylist()
        return self._raws[name]

    def prompts(self, name: str) -> list[Any]:
        arr = self.array(name)
        if not _is_text_type(arr.type):
            values = arr.to_pylist()
            for j, value in enumerate(values):
                self._check_prompt(j, name, value)
            return values
        values = arr.to_pylist()
        suspect = pc.or_kleene(
            pc.is_null(arr),
            pc.or_(
                pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0),
                pc.greater(pc.utf8_length(arr), MAX_PROMPT_CHARS),
            ),
        )
        if pc.any(suspect).as_py():
            for j, flag in enumerate(suspect.to_pylist()):
                if flag:
                    self._check_prompt(j, name, values[j])
        return values

    def _check_prompt(self, j: int, name: str, prompt: Any) -> None:
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            self.add(j, name, prompt, "the prompt is empty; write a prompt or remove the row")
        elif not isinstance(prompt, str):
            self.add(j, name, prompt, "the prompt must be text")
        elif len(prompt) > MAX_PROMPT_CHARS:
            self.add(
                j,
                name,
                prompt,
                f"the prompt is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,} "
                f"(an unclosed quote can swallow the rows after it)",
            )

    def ids(self, name: str) -> list[str]:
        arr = self.array(name)
        if _is_text_type(arr.type):
            ids = arr.to_pylist()
        elif pa.types.is_integer(arr.type):
            ids = pc.cast(arr, pa.string()).to_pylist()
        else:
            ids = [_id_text(v) for v in arr.to_pylist()]
        if _is_text_type(arr.type) or pa.types.is_integer(arr.type):
            probe = pc.cast(arr, pa.string()) if not _is_text_type(arr.type) else arr
            suspect = pc.or_kleene(pc.is_null(probe), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(probe)), 0))
            rows = [j for j, flag in enumerate(suspect.to_pylist()) if flag] if pc.any(suspect).as_py() else []
        else:
            rows = range(self.n)
        for j in rows:
            value = ids[j]
            if value is None or not value.strip():
                self.add(j, name, value, "the id is empty; give every row an id, or drop the id column to number rows")
        return ids

    def setting(self, col: str) -> list[Any]:
        """Values per row (None = empty cell, _BAD = invalid, reported) for a setting column."""
        arr = self.array(col)
        values: list | None
        if col in _NUMERIC:
            values = _fast_numeric(arr, *_NUMERIC[col])
        else:
            values = _fast_text(arr, strip=col != "system_instruction")
        if values is None:
            return _slow_column(col, self.raws(col), self.add)
        if col == "model":
            names = set(values)
            names.discard(None)
            canonical: dict[Any, Any] = {}
            problems: dict[Any, str] = {}
            for name in names:
                try:
                    canonical[name] = _conv_model(name)
                except _Bad as bad:
                    canonical[name], problems[name] = _BAD, str(bad)
            if any(canonical[n] != n for n in names):
                raws = self.raws(col)
                for j, value in enumerate(values):
                    if value is not None and canonical[value] is _BAD:
                        self.add(j, col, raws[j], problems[value])
                values = [None if v is None else canonical[v] for v in values]
        return values

    def check_for_model(
        self,
        col: str,
        values: list[Any] | None,
        default: str | None,
        models: list[Any] | None,
        default_model: str,
        valid: dict[str, frozenset[str]],
        problem: Callable[[catalog.ModelSpec, str], str | None],
        option: str,
    ) -> list[Any] | None:
        """Check a model-dependent setting (aspect ratio, image size) row by row; return it with defaults filled."""
        if values is None and (default is None or models is None):
            return None  # nothing per row: the default was checked against the default model up front
        filled = values if default is None or values is None else [default if v is None else v for v in values]
        if filled is None:
            filled = [default] * self.n
        pairs = set(zip(models, filled)) if models is not None else {(default_model, v) for v in set(filled)}
        # A model the catalog does not know takes its settings as written: the API is the judge.
        bad = {(m, v) for m, v in pairs if m in valid and v is not None and v is not _BAD and v not in valid[m]}
        if not bad:
            return filled
        model_of = models if models is not None else [default_model] * self.n
        for j, (m, v) in enumerate(zip(model_of, filled)):
            if (m, v) in bad:
                message = problem(catalog.MODELS[m], v) or ""
                if values is None or values[j] is None:
                    message += f" (this is the job default, {option}; set {col} for this row)"
                    self.add(j, col, v, message)
                else:
                    self.add(j, col, self.raws(col)[j], message)
        return filled

    def references(self, images: _ImageChecker, models: list[Any] | None, default_model: str) -> list[tuple[str, ...]] | None:
        arr = self.batch.column(self.index["reference_images"])
        if arr.null_count == len(arr):
            return None
        raws = arr.to_pylist()
        out: list[tuple[str, ...]] = []
        cache: dict[Any, tuple[tuple[str, ...], list[tuple[str, str]], str | None]] = {}
        for j, raw in enumerate(raws):
            if _is_empty(raw):
                out.append(())
                continue
            key = tuple(raw) if isinstance(raw, list) else raw
            try:
                paths, item_problems, cell_problem = cache[key]
            except (KeyError, TypeError):
                paths, item_problems, cell_problem = (), [], None
                try:
                    items = _split_references(raw)
                except _Bad as bad:
                    cell_problem = str(bad)
                else:
                    resolved = []
                    for item in items:
                        path = images.resolve(item)
                        message = images.problem(path)
                        if message:
                            item_problems.append((item, message))
                        resolved.append(path)
                    paths = tuple(resolved)
                try:
                    cache[key] = (paths, item_problems, cell_problem)
                except TypeError:
                    pass
            if cell_problem:
                self.add(j, "reference_images", raw, cell_problem)
            for item, message in item_problems:
                self.add(j, "reference_images", item, message)
            model = default_model if models is None or models[j] is None else models[j]
            if model in _MAX_REFERENCES and len(paths) > _MAX_REFERENCES[model]:
                shown = raw if isinstance(raw, str) else "|".join(str(x) for x in raw if x is not None)
                self.add(
                    j,
                    "reference_images",
                    shown,
                    f"{len(paths)} reference images; {model} takes at most {_MAX_REFERENCES[model]}",
                )
            out.append(paths)
        return out


@dataclass
class RowBlock:
    """A block of consecutive manifest rows, validated, as columns (the reader's batches): a list per column
    with a value per row, or None where every row takes the same value (`defaults`). `items()` gives the block
    as read_manifest yields it; a consumer that handles columns (planning) can skip making a row object each."""

    n: int
    row0: int  # the first row's number (when `numbers` is None, row j is row0 + j)
    numbers: list[int] | None  # each row's number, where rows are not consecutive in the file
    ids: list[str]
    prompts: list[Any]
    settings: dict[str, list[Any] | None]  # model, aspect_ratio, image_size, temperature, ..., system_instruction
    defaults: dict[str, Any]
    references: list[tuple[str, ...]] | None  # None: no reference column
    extra_names: list[str]
    extra_values: list[list[Any]]  # per extra column, its values
    problems: dict[int, list[RowProblem]]  # rows (by index in the block) that are rejected, and why

    def column(self, name: str) -> Iterable[Any]:
        values = self.settings[name]
        return values if values is not None else itertools.repeat(self.defaults[name], self.n)

    def row_number(self, j: int) -> int:
        return self.numbers[j] if self.numbers is not None else self.row0 + j

    def row(self, j: int) -> ManifestRow:
        """Row j of the block, as items() gives it (a row without problems)."""
        settings = {name: values[j] if (values := self.settings[name]) is not None else self.defaults[name]
                    for name in _ROW_SETTINGS}
        return ManifestRow(self.row_number(j), self.ids[j], self.prompts[j],
                           reference_images=self.references[j] if self.references is not None else (),
                           extra={name: values[j] for name, values in zip(self.extra_names, self.extra_values)},
                           **settings)

    def items(self) -> Iterator[ManifestRow | RowProblem]:
        n = self.n
        extra_dicts: Iterable[dict]
        if self.extra_names:
            extra_dicts = [dict(zip(self.extra_names, values)) for values in zip(*self.extra_values)]
        else:
            extra_dicts = ({} for _ in range(n))
        rows = zip(
            self.ids,
            self.prompts,
            *(self.column(name) for name in _ROW_SETTINGS[:7]),
            self.references if self.references is not None else itertools.repeat((), n),
            self.column("system_instruction"),
            extra_dicts,
        )
        problems = self.problems
        if not problems and self.numbers is None:
            row0 = self.row0
            for j, values in enumerate(rows):
                yield ManifestRow(row0 + j, *values)
        else:
            for j, values in enumerate(rows):
                found = problems.get(j)
                if found:
                    yield from found
                else:
                    yield ManifestRow(self.row_number(j), *values)


# ManifestRow's fields between prompt and reference_images, then system_instruction: RowBlock.settings' keys.
_ROW_SETTINGS = ("model", "aspect_ratio", "image_size", "temperature", "top_p", "seed", "variants", "system_instruction")


def _rows(source: _Source, options: ManifestOptions, default_model: str) -> Iterator[ManifestRow | RowProblem]:
    with contextlib.closing(_blocks(source, options, default_model)) as blocks:  # closed with us: the file too
        for block in blocks:
            yield from block.items()


def _blocks(source: _Source, options: ManifestOptions, default_model: str) -> Iterator[RowBlock]:
    names = source.names
    index = {name: i for i, name in enumerate(names)}
    prompt_col = options.prompt_column
    id_col = options.id_column if options.id_column in index else None
    special = {prompt_col, id_col}
    settings = {c for c in SETTING_COLUMNS if c in index and c not in special}
    extras = [n for n in names if n not in special and n not in settings]
    plain = {n: True for n in names}
    if source.types is not None:
        plain = {n: _plain_type(t) for n, t in zip(names, source.types)}

    images = _ImageChecker(os.path.dirname(source.path))
    defaults = {
        "model": default_model,
        "aspect_ratio": options.aspect_ratio,
        "image_size": options.image_size,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "seed": options.seed,
        "variants": options.variants,
        "system_instruction": options.system_instruction,
    }
    next_row = source.first_row  # row number of the batch's first row
    next_index = 1  # 1-based data row index (the default id)

    try:
        for batch in source.batches:
            n = batch.num_rows
            numbers = source.row_numbers(next_index - 1, n)
            b = _Batch(batch, index, source.display, next_row, numbers)
            prompts = b.prompts(prompt_col)
            ids = b.ids(id_col) if id_col else list(map(str, range(next_index, next_index + n)))
            models = b.setting("model") if "model" in settings else None
            filled_models = None if models is None else [default_model if m is None else m for m in models]
            columns: dict[str, list[Any] | None] = {"model": filled_models}
            columns["aspect_ratio"] = b.check_for_model(
                "aspect_ratio",
                b.setting("aspect_ratio") if "aspect_ratio" in settings else None,
                options.aspect_ratio,
                filled_models,
                default_model,
                _ASPECT_RATIOS,
                _aspect_ratio_problem,
                "--aspect-ratio",
            )
            columns["image_size"] = b.check_for_model(
                "image_size",
                b.setting("image_size") if "image_size" in settings else None,
                options.image_size,
                filled_models,
                default_model,
                _IMAGE_SIZES,
                _image_size_problem,
                "--image-size",
            )
            for col in ("temperature", "top_p", "seed", "variants", "system_instruction"):
                default = defaults[col]
                if col in settings:
                    values = b.setting(col)
                    columns[col] = values if default is None else [default if v is None else v for v in values]
                else:
                    columns[col] = None
            refs = b.references(images, filled_models, default_model) if "reference_images" in settings else None
            yield RowBlock(
                n=n,
                row0=next_row,
                numbers=numbers,
                ids=ids,
                prompts=prompts,
                settings=columns,
                defaults=defaults,
                references=refs,
                extra_names=extras,
                extra_values=[_column_values(batch.column(index[name]), plain[name]) for name in extras],
                problems=b.problems,
            )
            next_row += n
            next_index += n
    finally:
        images.close()
        close = getattr(source.batches, "close", None)
        if close:
            close()


def _id_text(raw: Any) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))  # an integer id column with nulls, as pandas writes it
    return str(_jsonable(raw))
