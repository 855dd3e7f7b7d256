"""`make demo`: the main job end to end on the built-in emulator (no API key, no network).

Runs the sample manifest twice: the first run generates every image through batch jobs, the second finds
them all in the cache and creates no job. Prints where the dataset is.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

from . import pipeline
from .backends.gemini import Connection, GeminiBackend
from .emulator import Emulator, EmulatorConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "prompts.csv"
OUT = ROOT / "demo-out"


def shown(path: Path) -> str:
    """A path as the demo prints it: relative to where it runs, when it is below."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(out: Path = OUT) -> int:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    config = EmulatorConfig(pending_seconds=0.5, running_seconds=1.5, image_bytes=60_000, seed=1)
    with Emulator(config) as emu:
        print(f"emulator: {emu.url} (the real google-genai SDK talks to it over HTTP)")
        factory = lambda: GeminiBackend(Connection(api_key="demo-key", base_url=emu.url, timeout_s=60))  # noqa: E731
        settings = pipeline.Settings(workdir=out / "work", out=out / "dataset", cache_dir=out / "cache", poll_interval=0.5,
                                     timeout=300)
        first = pipeline.run(SAMPLE, settings, backend_factory=factory)
        print(f"first run:  {first.summary.replace(str(settings.out), shown(settings.out))}")
        second_settings = pipeline.Settings(workdir=out / "work-again", out=out / "dataset-again", cache_dir=out / "cache",
                                            poll_interval=0.5, timeout=60)
        second = pipeline.run(SAMPLE, second_settings, backend_factory=factory)
        print(f"second run: {second.summary.replace(str(second_settings.out), shown(second_settings.out))}")
        stats = emu.stats()
    rows = pq.read_table(settings.out / "metadata.parquet").to_pylist()
    print(f"emulator counted {stats['batches_created']} batch job(s), {stats['files_uploaded']} upload(s), "
          f"{stats['bytes_downloaded']:,} bytes downloaded")
    print(f"\ndataset: {shown(settings.out)}  ({len(rows)} images, a metadata row each; under {shown(settings.out / 'images')})")
    for r in rows[:3]:
        print(f"  {r['status']:7} {r['file_name']}  <- {r['prompt'][:60]!r}")
    print(f"  ... metadata: {shown(settings.out / 'metadata.parquet')}; load it with Hugging Face `datasets` "
          f"(see {shown(settings.out / 'README.md')})")
    print(f"morning report: {shown(settings.out / 'report.html')} (and contact_sheet.png)")
    return 0 if first.exit_code in (0, 3) and second.jobs_created == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
