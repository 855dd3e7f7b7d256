"""The dataset in training shapes: WebDataset tar shards or Parquet shards with the image bytes in a column,
instead of one PNG file per image (`--dataset-format webdataset | parquet`; `files` is dataset.py's layout).

    OUT/shards/train-000000.tar      webdataset: <key>.png + <key>.json (the sample's metadata row) per sample
    OUT/data/train-000000.parquet    parquet: the metadata columns + `image` {bytes, path} (Hugging Face's Image)
    OUT/metadata.parquet             every row, as in every format, with `shard`: where its sample is

Samples go to shards in the rows' order (manifest order): a shard takes samples until the next one would take it
over the size limit (or it holds SHARD_MAX_SAMPLES), so the same rows give the same shards, name for name and
byte for byte. A shard is written to a temp file and renamed over the old one, never appended to; a shard whose
samples are those it already holds (the same digest, recorded in the ledger) is not written again, so a resumed
run rewrites only the shards that changed. Shards of an earlier write that are not part of this one (the dataset
shrank, or changed format) are removed after every write, so a crash before that leaves them to the next write.

Sample keys are `r<row>_v<variant>` (the manifest row, zero-padded, and the variant): unique in a run, stable
when the dataset is written again, made of no user text, and dot-free, since WebDataset readers split a file
name into key and field at the first dot of its base name (an id like "cat.v2" would cut the sample in two).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..ledger import Ledger, reading
from ..manifest.cells import plain_type
from ..storage import atomic, gcs

SHARD_MAX_SAMPLES = 10_000  # per shard, whatever their size: bounds what a shard's plan holds in memory
ROW_GROUP_BYTES = 32 << 20  # parquet: image bytes per row group (what the writer holds at once, a few times over)
LAYOUT_VERSION = "1"  # in every shard's digest: a change of layout rewrites every shard
# Where each format's shards are, and their names (the digits: the shard's index, in row order).
LAYOUT = {"webdataset": ("shards", ".tar"), "parquet": ("data", ".parquet")}
SHARD_NAME = re.compile(r"^\.?train-[0-9]{6,}\.(tar|parquet)(\.tmp)?$")  # ours, or our temp file: what pruning may remove
HF_IMAGE = {"_type": "Image"}
SHARD_FIELD = pa.field("shard", pa.string())  # metadata.parquet of a sharded dataset: the shard of each sample


def sample_key(row: int, variant: int) -> str:
    return f"r{row:09d}_v{variant}"


def json_value(value, field: pa.Field):
    """A metadata value in a sample's JSON: as it is for plain types; the ledger's JSON text form otherwise
    (timestamps, decimals, binary: their string; maps, durations and what holds them: JSON text), so a column has
    one JSON type, which hf_feature names."""
    if value is None or plain_type(field.type) or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def hf_feature(t: pa.DataType) -> dict:
    """The Hugging Face `datasets` feature (as a dataset card's YAML writes it) of a column's JSON values."""
    if pa.types.is_dictionary(t):
        return hf_feature(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if plain_type(t):
            inner = hf_feature(t.value_type)
            return {"list": inner["dtype"]} if "dtype" in inner else {"list": [{"name": "", **inner}]}
        return {"dtype": "string"}
    if pa.types.is_struct(t):
        if plain_type(t):
            return {"struct": [{"name": f.name, **hf_feature(f.type)} for f in t]}
        return {"dtype": "string"}
    if pa.types.is_floating(t):
        return {"dtype": f"float{t.bit_width}"}  # Arrow says "double"; `datasets` says float64
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t):
        return {"dtype": str(t)}
    return {"dtype": "string"}


def _read_image(src) -> bytes:
    if gcs.is_gcs(src):
        return gcs.read_bytes(str(src)) or b""
    with open(src, "rb") as f:
        return f.read()


def _size(src) -> int:
    return gcs.size(str(src)) if gcs.is_gcs(src) else os.stat(src).st_size


class _Sample:
    __slots__ = ("key", "src", "ext", "size", "meta", "index")

    def __init__(self, key, src, ext, size, meta, index):
        self.key, self.src, self.ext, self.size, self.meta, self.index = key, src, ext, size, meta, index


class ShardWriter:
    """Takes the dataset's rows batch by batch (`add`: which shard each row's sample is in) and writes each shard
    once it is complete; `close` writes the last one and removes the shards no longer part of the dataset."""

    def __init__(self, fmt: str, ledger: Ledger, out: Path, shard_size: int, schema: pa.Schema):
        self.fmt, self.ledger, self.out, self.shard_size = fmt, ledger, Path(out), shard_size
        self.dir_name, self.suffix = LAYOUT[fmt]
        self.where = str(self.out.absolute())  # the ledger's name for this dataset (shard digests)
        self.meta_schema = schema  # the metadata columns (without `shard`)
        self.exts: set[str] = set()  # the image extensions written (webdataset: the card's image fields)
        self.names: list[str] = []  # every shard of this write, in order
        self.rewritten = 0  # of which written now (the others held these samples already)
        self._samples: list[_Sample] = []
        self._tables: list[pa.Table] = []  # parquet: this shard's rows, as metadata slices
        self._bytes = 0

    @property
    def shard_name(self) -> str:
        return f"{self.dir_name}/train-{len(self.names):06d}{self.suffix}"

    def add(self, table: pa.Table, columns: dict, srcs: list) -> list[str | None]:
        """The rows of one batch (`table`: their metadata; `columns`: the same as plain values; `srcs`: each row's
        image in the cache, or None): the shard of each row's sample (None: not in a shard)."""
        shards: list[str | None] = []
        fields = list(self.meta_schema)
        start = 0  # parquet: the first row of `table` not yet in a shard's slices
        for i, src in enumerate(srcs):
            if src is None and self.fmt == "webdataset":
                shards.append(None)  # a row without its image is in metadata.parquet only
                continue
            size = _size(src) if src is not None else 0
            if self._samples and (self._bytes + size > self.shard_size or len(self._samples) >= SHARD_MAX_SAMPLES):
                if self.fmt == "parquet":
                    self._tables.append(table.slice(start, i - start))
                    start = i
                self._finish_shard()
            key = sample_key(columns["row"][i], columns["variant"][i])
            ext = os.path.splitext(str(src))[1] if src is not None else ""
            meta = {f.name: json_value(columns[f.name][i], f) for f in fields}
            self._samples.append(_Sample(key, src, ext, size, meta, i))
            self._bytes += size
            shards.append(self.shard_name)
        if self.fmt == "parquet" and start < len(srcs):
            self._tables.append(table.slice(start))
        return shards

    def finish(self) -> None:
        """Write the last shard. (The caller removes the shards no longer part of the dataset once its metadata is
        in place: remove_shards.)"""
        if self._samples:
            self._finish_shard()

    # ---- one shard ------------------------------------------------------------------------------------

    def _digest(self) -> str:
        h = hashlib.sha256(f"{LAYOUT_VERSION}\0{self.fmt}\0".encode())
        for s in self._samples:
            h.update(f"{s.key}\0{s.ext}\0".encode())
            h.update(json.dumps(s.meta, sort_keys=True, ensure_ascii=False, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()

    def _finish_shard(self) -> None:
        name = self.shard_name
        dest = self.out / name
        digest = self._digest()
        recorded = reading.shard_digest(self.ledger, self.where, name)
        if recorded is None or recorded != f"{digest}:{_file_size(dest)}":
            reading.set_shard_digest(self.ledger, self.where, name, None)  # until the new one is in place
            with atomic.into_place(dest) as tmp:
                if self.fmt == "webdataset":
                    self._write_tar(tmp)
                else:
                    self._write_parquet(tmp)
            reading.set_shard_digest(self.ledger, self.where, name, f"{digest}:{_file_size(dest)}")
            self.rewritten += 1
        self.exts.update(s.ext for s in self._samples)
        self.names.append(name)
        self._samples, self._tables, self._bytes = [], [], 0

    def _write_tar(self, tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for s in self._samples:
                meta = json.dumps(s.meta, sort_keys=True, ensure_ascii=False).encode()
                if gcs.is_gcs(s.src):
                    data = _read_image(s.src)  # one image at a time
                    tar.addfile(_member(f"{s.key}{s.ext}", len(data)), io.BytesIO(data))
                else:
                    with open(s.src, "rb") as f:  # streamed from the cache into the tar
                        tar.addfile(_member(f"{s.key}{s.ext}", os.fstat(f.fileno()).st_size), f)
                tar.addfile(_member(f"{s.key}.json", len(meta)), io.BytesIO(meta))

    def _write_parquet(self, tmp: Path) -> None:
        rows = pa.concat_tables(self._tables) if self._tables else self.meta_schema.empty_table()
        assert rows.num_rows == len(self._samples)
        schema = parquet_schema(self.meta_schema)
        with pq.ParquetWriter(tmp, schema) as writer:
            start = 0
            while start < len(self._samples):  # row groups of at most ROW_GROUP_BYTES of images (one image at least)
                end, size = start + 1, self._samples[start].size
                while end < len(self._samples) and size + self._samples[end].size <= ROW_GROUP_BYTES:
                    size += self._samples[end].size
                    end += 1
                chunk = self._samples[start:end]
                images = pa.array([None if s.src is None else {"bytes": _read_image(s.src), "path": f"{s.key}{s.ext}"}
                                   for s in chunk], type=schema.field("image").type)
                part = rows.slice(start, end - start)
                writer.write_table(pa.Table.from_arrays([images, *part.columns], schema=schema))
                start = end

    # ---- the dataset card: how to load it ------------------------------------------------------------------

    def card(self, owner: dict, summary) -> str:
        """OUT/README.md: Hugging Face `datasets` configs for the shards (webdataset: with the features of each
        field, so none is guessed from the first samples), then how to load them. `summary`: the DatasetSummary."""
        if self.fmt == "webdataset":
            features = [{"name": ext.lstrip("."), "dtype": "image"} for ext in sorted(self.exts)]
            features.append({"name": "json", "struct": [{"name": f.name, **hf_feature(f.type)} for f in self.meta_schema]})
            info = {"config_name": "default", "features": features}
            header = ('---\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n  - split: train\n'
                      '    path: "shards/*.tar"\n'
                      f"dataset_info: {json.dumps(info)}\n---\n")  # JSON is YAML: no YAML writer needed
            where = (f"{len(self.names):,} tar shards in `shards/`: each sample is `<key>.png` (the image) and `<key>.json` "
                     "(its row of `metadata.parquet`); rows without an image are in `metadata.parquet` only")
            how = ('everything = datasets.load_dataset("path/to/this/folder", split="train")   # sample["png"], sample["json"]\n'
                   '# or: webdataset.WebDataset(sorted(glob.glob("path/to/this/folder/shards/*.tar"))).decode("pil")')
        else:
            header = ('---\nconfigs:\n- config_name: all\n  default: true\n  data_files:\n  - split: train\n'
                      '    path: "data/*.parquet"\n- config_name: ok\n  data_files:\n  - split: train\n'
                      '    path: "data/*.parquet"\n  filters:\n  - ["status", "==", "ok"]\n---\n')
            where = (f"{len(self.names):,} Parquet shards in `data/`: every row of `metadata.parquet`, with the image's bytes "
                     "in the column `image` (empty where the row has none)")
            how = ('everything = datasets.load_dataset("path/to/this/folder", split="train")         # image=None where there is none\n'
                   'images = datasets.load_dataset("path/to/this/folder", "ok", split="train")      # only the rows with their image')
        return header + f"""
# Images generated by batcher

From `{owner.get("manifest")}`: {summary.rows:,} images (one row of `metadata.parquet` each: a manifest row and
variant): {summary.ok:,} ok, {summary.blocked:,} blocked, {summary.failed:,} failed, {summary.pending:,} pending.
{where}. Each row says why it has no image (`status`, `error`, `finish_reason`) and what made it (`model`,
`prompt`, the request's settings, `request_hash`, tokens and `cost_usd`).

```python
import datasets
{how}
```
"""


def parquet_schema(meta_schema: pa.Schema) -> pa.Schema:
    """A Parquet shard's schema: `image` (Hugging Face's Image feature, as `datasets` stores it: a struct of
    bytes and path, named in the `huggingface` schema metadata) and the metadata columns."""
    image = pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))
    hf = {"info": {"features": {"image": HF_IMAGE}}}
    return pa.schema([image, *meta_schema], metadata={b"huggingface": json.dumps(hf).encode()})


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar member with fixed owner, mode and time: the same samples give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def remove_shards(ledger: Ledger, out: Path | str, keep: set[str] = frozenset()) -> int:
    """Remove every shard of ours under OUT/shards/ and OUT/data/ not in `keep` (names relative to OUT), with
    its digest in the ledger, and the directories left empty; how many shards were removed. Files that are not
    ours by name are left alone."""
    out = Path(out)
    removed = 0
    for dir_name, _ in LAYOUT.values():
        folder = out / dir_name
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name = f"{dir_name}/{entry.name}"
            if name in keep or not SHARD_NAME.match(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            removed += not entry.name.startswith(".")
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when it is empty now
    reading.forget_shard_digests(ledger, str(out.absolute()), keep)
    return removed
