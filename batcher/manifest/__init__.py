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

The package, by concept: `types` (what reading takes and gives), `sources` (locating and opening a file,
file-level problems), `cells` (validating a cell, the job defaults), `references` (reference images), `blocks`
(validating a record batch in columns), `reader` (the header checks and the two ways to read).

The names below are imported on first use: what only needs the types or a cell (settings, the dataset writer, so
`batcher collect`) does not load the readers and pyarrow.compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {  # name -> the submodule that defines it
    "FORMATS": "types", "KNOWN_COLUMNS": "types", "SETTING_COLUMNS": "types", "ManifestOptions": "types",
    "ManifestRow": "types", "RowProblem": "types", "MAX_PROMPT_CHARS": "cells", "MAX_VARIANTS": "cells",
    "carried_schema": "sources", "locate": "sources", "manifest_fingerprint": "sources",
    "RowBlock": "blocks", "read_manifest": "reader", "read_manifest_blocks": "reader",
}

__all__ = [
    "FORMATS", "KNOWN_COLUMNS", "MAX_PROMPT_CHARS", "MAX_VARIANTS", "SETTING_COLUMNS", "ManifestOptions", "ManifestRow",
    "RowBlock", "RowProblem", "carried_schema", "locate", "manifest_fingerprint", "read_manifest", "read_manifest_blocks",
]

if TYPE_CHECKING:
    from .blocks import RowBlock
    from .cells import MAX_PROMPT_CHARS, MAX_VARIANTS
    from .reader import read_manifest, read_manifest_blocks
    from .sources import carried_schema, locate, manifest_fingerprint
    from .types import FORMATS, KNOWN_COLUMNS, SETTING_COLUMNS, ManifestOptions, ManifestRow, RowProblem


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
