"""The dataset formats a run can write (`--dataset-format`, `--shard-size`): their names and the checks of the
options, without loading pyarrow (Settings checks them in every command)."""

from __future__ import annotations

import re

FORMATS = ("files", "webdataset", "parquet")  # files: images/ + metadata.parquet (output.dataset); others: output.shards
DEFAULT_SHARD_SIZE = 1_000_000_000  # bytes of images per shard: big sequential reads, few files


def parse_size(value: int | str) -> int:
    """Bytes from 1000000, "500MB", "1GB", "64KiB" (ValueError otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ValueError(f"not a size: {value!r} (use bytes, or a number with KB, MB, GB)")
        unit = 1024 if m.group(3) else 1000
        size = int(float(m.group(1)) * unit ** " KMGT".index(m.group(2).upper() or " "))
    if size < 1:
        raise ValueError(f"a shard size must be at least 1 byte, not {value!r}")
    return size


def gcs_refused(fmt: str, out) -> str:
    """Why a sharded format is refused for a gs:// dataset (for now), and what to do instead."""
    return (f"--dataset-format {fmt} writes a local --out only (for now), not {out}: write it to a local directory and "
            f"copy it (e.g. `gcloud storage cp -r OUT {out}`), or use --dataset-format files for a gs:// dataset")
