"""What reading a manifest takes and gives: the job defaults (ManifestOptions), a valid row (ManifestRow), a
problem with a row (RowProblem), and the columns that have a meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

from batcher import catalog


FORMATS = ("parquet", "csv", "tsv")
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


@dataclass(frozen=True)
class ManifestOptions:
    """How a manifest is read: its format and prompt/id columns, and the defaults for rows that do not set a column
    (`model`, `aspect_ratio`, `image_size`, ...)."""

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
