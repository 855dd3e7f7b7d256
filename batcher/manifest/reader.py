"""The reader: a manifest opened and its header checked as a whole (unique column names, the prompt and id
columns, the job defaults), then streamed as validated rows or as columnar blocks."""

from __future__ import annotations

import os
from collections.abc import Iterator

from batcher import catalog
from batcher.errors import ManifestError

from .blocks import RowBlock, blocks_of, rows_of
from .cells import aspect_ratio_problem, check_options, image_size_problem
from .sources import Source, open_source
from .types import ManifestOptions, ManifestRow, RowProblem


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
    return rows_of(source, options, default_model)


def read_manifest_blocks(
    path: str | os.PathLike,
    options: ManifestOptions = ManifestOptions(),
    batch_rows: int = 65536,
) -> Iterator[RowBlock]:
    """read_manifest, a block of rows at a time, as columns (RowBlock.items() gives its rows and problems)."""
    source, default_model = _opened(path, options, batch_rows)
    return blocks_of(source, options, default_model)


def _opened(path: str | os.PathLike, options: ManifestOptions, batch_rows: int) -> tuple[Source, str]:
    """The manifest opened, with the checks of the whole file made (see read_manifest)."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    default_model = check_options(options)
    default_spec = catalog.model_spec(default_model)
    source = open_source(path, options, batch_rows)
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
            ("aspect-ratio", options.aspect_ratio, aspect_ratio_problem),
            ("image-size", options.image_size, image_size_problem),
        ):
            if value is not None and (message := check(default_spec, value)):
                raise ManifestError(f"Invalid default --{name} {value!r}: {message}.")
    return source, default_model
