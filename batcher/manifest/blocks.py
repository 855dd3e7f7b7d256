"""The columnar blocks: each record batch validated column by column (in Arrow where it can be, cell by cell
where it must), giving a RowBlock of valid rows and their problems; `rows_of` turns blocks into ManifestRows."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batcher import catalog

from .cells import (
    CONVERTERS, MAX_PROMPT_CHARS, MAX_VARIANTS, SEED_MAX, SEED_MIN, TEMPERATURE_RANGE, TOP_P_RANGE, BadCell, aspect_ratio_problem,
    column_values, convert_model, image_size_problem, is_empty, jsonable, plain_type, shown_cell,
)
from .references import ImageChecker, split_references
from .sources import Source
from .types import SETTING_COLUMNS, ManifestOptions, ManifestRow, RowProblem


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
    conv = CONVERTERS[col]
    cache: dict[Any, tuple[Any, str | None]] = {}
    values: list[Any] = []
    append = values.append
    for j, raw in enumerate(raws):
        try:
            result = cache[raw]
        except (KeyError, TypeError):
            if is_empty(raw):
                result = (None, None)
            else:
                try:
                    result = (conv(raw), None)
                except BadCell as bad:
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
        shown = None if raw is None else shown_cell(raw)
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
                    canonical[name] = convert_model(name)
                except BadCell as bad:
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

    def references(self, images: ImageChecker, models: list[Any] | None, default_model: str) -> list[tuple[str, ...]] | None:
        arr = self.batch.column(self.index["reference_images"])
        if arr.null_count == len(arr):
            return None
        raws = arr.to_pylist()
        out: list[tuple[str, ...]] = []
        cache: dict[Any, tuple[tuple[str, ...], list[tuple[str, str]], str | None]] = {}
        for j, raw in enumerate(raws):
            if is_empty(raw):
                out.append(())
                continue
            key = tuple(raw) if isinstance(raw, list) else raw
            try:
                paths, item_problems, cell_problem = cache[key]
            except (KeyError, TypeError):
                paths, item_problems, cell_problem = (), [], None
                try:
                    items = split_references(raw)
                except BadCell as bad:
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


def rows_of(source: Source, options: ManifestOptions, default_model: str) -> Iterator[ManifestRow | RowProblem]:
    with contextlib.closing(blocks_of(source, options, default_model)) as blocks:  # closed with us: the file too
        for block in blocks:
            yield from block.items()


def blocks_of(source: Source, options: ManifestOptions, default_model: str) -> Iterator[RowBlock]:
    names = source.names
    index = {name: i for i, name in enumerate(names)}
    prompt_col = options.prompt_column
    id_col = options.id_column if options.id_column in index else None
    special = {prompt_col, id_col}
    settings = {c for c in SETTING_COLUMNS if c in index and c not in special}
    extras = [n for n in names if n not in special and n not in settings]
    plain = {n: True for n in names}
    if source.types is not None:
        plain = {n: plain_type(t) for n, t in zip(names, source.types)}

    images = ImageChecker(os.path.dirname(source.path))
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
            for name, allowed, problem, flag in (("aspect_ratio", _ASPECT_RATIOS, aspect_ratio_problem, "--aspect-ratio"),
                                                 ("image_size", _IMAGE_SIZES, image_size_problem, "--image-size")):
                columns[name] = b.check_for_model(name, b.setting(name) if name in settings else None,
                                                  getattr(options, name), filled_models, default_model, allowed, problem, flag)
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
                extra_values=[column_values(batch.column(index[name]), plain[name]) for name in extras],
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
    return str(jsonable(raw))
