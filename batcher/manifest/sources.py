"""Where rows come from: a manifest located and opened (a local file or a gs:// object; Parquet, CSV or TSV by
extension or option), read as Arrow record batches, with every file-level problem (missing, empty, corrupt, an
unclosed quote, invalid UTF-8) raised as a ManifestError that names the file and the place."""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batcher.errors import BatcherError, ManifestError
from batcher.storage import gcs

from .cells import round_trips
from .types import FORMATS, KNOWN_COLUMNS, ManifestOptions


_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}


#: CSV/TSV are parsed in blocks of this many bytes; a single record must fit in one block.
_CSV_BLOCK_BYTES = 8 * 1024 * 1024
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


@dataclass
class Source:
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
    if URI_RE.match(display):
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
    """The columns carried through to the output, with their types: a Parquet column keeps its Arrow type (lists,
    structs, maps, timestamps, decimals, dictionaries...; cells.round_trips), one of a type that cannot is text;
    every CSV/TSV column is text."""
    source = open_source(path, options, 1)
    try:
        skip = set(KNOWN_COLUMNS) | {options.prompt_column, options.id_column}
        types = source.types or [pa.string()] * len(source.names)
        return pa.schema([pa.field(n, t if round_trips(t) else pa.string()) for n, t in zip(source.names, types) if n not in skip])
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


def _open_parquet(path: str, display: str, batch_rows: int) -> Source:
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

    return Source(display, path, "parquet", list(schema.names), list(schema.types), 1, batches())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_csv(path: str, display: str, fmt: str, batch_rows: int) -> Source:
    """CSV (RFC 4180: fields may be quoted, a quoted field may hold commas, newlines and doubled quotes) or TSV
    (IANA text/tab-separated-values: no quoting at all; every field is taken as written, one line per row, so a
    field cannot hold a tab or a newline)."""
    delimiter = "\t" if fmt == "tsv" else ","
    if fmt == "tsv":
        parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False, newlines_in_values=False)
    else:
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
        if fmt != "tsv":
            _check_unclosed_quote(path, display, last, rows)

    source = Source(display, path, fmt, names, None, 2, batches(), _blank_lines(path, delimiter))
    if first.num_rows == 0:  # pyarrow can return an empty first batch; make sure there is a row somewhere
        source.batches = _require_rows(source.batches, display)
    return source


_BLANK_LINE = re.compile(rb"\n\r?\n")


def _reader(fh, delimiter: str):
    """The csv module reading as pyarrow does: CSV with quotes, TSV without."""
    if delimiter == "\t":
        return csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE)
    return csv.reader(fh, delimiter=delimiter, quotechar='"', doublequote=True, strict=False)


def _blank_lines(path: str, delimiter: str) -> list[int]:
    """Where the file's blank lines are, as counts of data rows before each (see Source.blank_lines).

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
            records = _reader(fh, delimiter)
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
            reader = _reader(fh, delimiter)
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
                        opened = next((i for i, cell in enumerate(record) if "\n" in cell or "\r" in cell), None)
                        if opened is not None and delimiter != "\t":
                            column = header[opened] if opened < len(header) else f"#{opened + 1}"
                            return (f"row {row}, column {column!r}: a quote is opened and never closed, so the rows "
                                    f"after it were read into this cell; close the quote.")
                        if delimiter == "\t":
                            return (f"row {row}: expected {len(header)} tab-separated fields like the header, found "
                                    f"{len(record)}; in TSV a field cannot hold a tab (use CSV or Parquet for such text).")
                        return (f"row {row}: expected {len(header)} columns like the header, found {len(record)}; "
                                f"quote cells that contain commas.")
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


def open_source(path: str | os.PathLike, options: ManifestOptions, batch_rows: int) -> Source:
    display = os.fsdecode(os.fspath(path))
    located = locate(display)
    abspath = located if isinstance(located, str) else os.path.abspath(display)
    fmt = _format_for(display, display, options)
    if fmt == "parquet":
        return _open_parquet(abspath, display, batch_rows)
    return _open_csv(abspath, display, fmt, batch_rows)
