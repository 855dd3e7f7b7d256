"""The morning report: `OUT/report.html` and `OUT/contact_sheet.png`, written into the output dataset.

report.html is one static, self-contained page (inline CSS, no script, no external URL) that opens from disk
or a bucket: rows by status, cost (batch vs interactive), cache hits, jobs and their 24 h / 48 h windows,
failures grouped by reason, the blocked/failed rows, and a grid of the dataset's own images (`images/...`,
referenced by relative path, loaded lazily by the browser, their width and height read from the file headers).
contact_sheet.png is a grid image of the first ok images with their ids as captions.

No thumbnail files: a real 1024x1024 PNG costs ~26 ms to decode and shrink, so 500 thumbnails were ~15 CPU-s of
every collect. Only the contact sheet decodes images (at most SHEET_COUNT), and not at all when the sheet on
disk was made of the same tiles (a digest in its PNG text chunk). Bounded whatever the dataset size:
metadata.parquet is streamed in batches, and the grid, the problem table, the reasons and the jobs are capped.
Everything user-supplied is HTML-escaped; file paths come only from `file_name`. Every file is written to a
temp name and renamed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from ..storage import atomic, gcs
from ..catalog import BATCH_DISCOUNT
from ..cost.money import usd
from ..errors import UsageError

log = logging.getLogger("batcher")

GRID_LIMIT = 500  # ok rows shown in the grid
PROBLEM_LIMIT = 1000  # blocked/failed rows listed in the table
REASON_LIMIT = 200  # distinct failure reasons tracked; the rest are counted as "other reasons"
EXAMPLES_PER_REASON = 5
JOB_LIMIT = 500
THUMB_DIR = "thumbs"  # JPEG thumbnails written by earlier versions; removed by the next report
SHEET_COUNT = 48
SHEET_COLS = 8
SHEET_TILE = 192  # thumbnail box in the contact sheet
SHEET_PAD = 6
SHEET_CAPTION = 18
SHEET_DIGEST_KEY = "batcher:tiles"  # the contact sheet's text chunk: the digest of what its tiles were made of
PROMPT_CHARS = 120
BATCH_ROWS = 10_000
COLUMNS = ("file_name", "id", "variant", "status", "prompt", "request_hash", "error", "finish_reason", "attempts", "cached", "cost_usd")
STATUSES = ("ok", "blocked", "failed", "pending")

_FILE_NAME = re.compile(r"^images/[0-9a-f]{2}/[0-9a-f]{16,128}\.[A-Za-z0-9]{1,5}$")


@dataclass
class ReportSummary:
    html_path: Path  # the local page (for a gs:// dataset: in WORKDIR/report/, also uploaded to `uploaded_to`)
    sheet_path: Path
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    sheet_made: bool = False  # contact_sheet.png written this time (False: its tiles had not changed)
    uploaded_to: str | None = None  # a gs:// dataset: where report.html and contact_sheet.png went


@dataclass
class _Scan:
    rows: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STATUSES})
    cost_usd: float = 0.0
    cached_rows: int = 0
    grid: list[dict] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    reasons: dict[tuple[str, str], list] = field(default_factory=dict)  # (status, reason) -> [count, example ids]
    other_reasons: int = 0
    extra_columns: list[str] = field(default_factory=list)


def contact_sheet_size(n: int) -> tuple[int, int]:
    """Pixel size of a contact sheet of `n` images (a one-tile placeholder when there are none)."""
    n = max(1, min(n, SHEET_COUNT))
    cols, rows = min(n, SHEET_COLS), -(-n // SHEET_COLS)
    return cols * (SHEET_TILE + 2 * SHEET_PAD), rows * (SHEET_TILE + 2 * SHEET_PAD + SHEET_CAPTION)


# ---- reading ----------------------------------------------------------------------------------------

def _reason(row: dict) -> str:
    parts = [p for p in (row.get("finish_reason"), row.get("error")) if p]
    return " / ".join(str(p) for p in parts) or "(no reason recorded)"


def _scan(metadata: Path) -> _Scan:
    scan = _Scan()
    pf = pq.ParquetFile(metadata)
    names = pf.schema_arrow.names
    columns = [c for c in COLUMNS if c in names]
    scan.extra_columns = [c for c in names if c not in COLUMNS]
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            scan.rows += 1
            status = row.get("status") if row.get("status") in STATUSES else "pending"
            scan.counts[status] += 1
            scan.cost_usd += row.get("cost_usd") or 0.0
            scan.cached_rows += bool(row.get("cached"))
            if status == "ok":
                if len(scan.grid) < GRID_LIMIT:
                    scan.grid.append(row)
            elif status in ("blocked", "failed"):
                if len(scan.problems) < PROBLEM_LIMIT:
                    scan.problems.append(row)
                key = (status, _reason(row)[:500])
                entry = scan.reasons.get(key)
                if entry is None and len(scan.reasons) >= REASON_LIMIT:
                    scan.other_reasons += 1
                    continue
                if entry is None:
                    entry = scan.reasons[key] = [0, []]
                entry[0] += 1
                if len(entry[1]) < EXAMPLES_PER_REASON:
                    entry[1].append(str(row.get("id")))
    return scan


# ---- files ------------------------------------------------------------------------------------------

def _write_into_place(dest: Path, write: Callable[[Path], None]) -> None:
    with atomic.into_place(dest, mode=0o644) as tmp:  # readable by whoever serves the report
        write(tmp)


def _safe_file_name(row: dict) -> str | None:
    name = row.get("file_name")
    return name if isinstance(name, str) and _FILE_NAME.match(name) else None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header alone: a PNG's IHDR (the first 24 bytes; Pillow would read
    every chunk before the first IDAT), else Pillow's open (which reads the header, it does not decode)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        if not (width and height):
            raise ValueError("a PNG of zero pixels")
        return width, height
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _image_sizes(out: Path, rows: list[dict], *, remote: bool = False,
                 absent: frozenset[str] = frozenset()) -> dict[str, tuple[int, int] | None]:
    """{file_name: (width, height)} of the grid rows' images, read from their headers. A missing or unreadable
    image is left out (the page says "image missing"; one warning counts them). `remote`: the images are in a
    bucket and only some were copied down (those of the contact sheet): one not on disk maps to None (shown,
    size unknown), unless it is in `absent` (the bucket did not have it)."""
    sizes: dict[str, tuple[int, int] | None] = {}
    missing = 0
    first = ""
    for row in rows:
        name = _safe_file_name(row)
        if name is None or name in sizes:
            continue
        path = out / name
        if remote and name not in absent and not path.exists():
            sizes[name] = None
            continue
        try:
            if name in absent:
                raise FileNotFoundError("not in the bucket")
            sizes[name] = _image_size(path)
        except (OSError, ValueError) as exc:  # missing or not an image: no picture, the rest go on
            missing += 1
            first = first or f"{name}: {exc}"
    if missing:
        log.warning("report: %d image(s) missing or unreadable (first: %s)", missing, first)
    return sizes


def _caption(row: dict) -> str:
    return str(row.get("id")) + (f" v{row['variant']}" if row.get("variant") else "")


def _sheet_tiles(rows: list[dict], sizes: dict[str, tuple[int, int] | None]) -> list[tuple[dict, str]]:
    """The contact sheet's tiles: (row, file_name) of the first SHEET_COUNT ok rows whose image is on disk."""
    tiles = [(r, _safe_file_name(r)) for r in rows]
    return [(r, name) for r, name in tiles if name is not None and sizes.get(name) is not None][:SHEET_COUNT]


def _sheet_digest(out: Path, tiles: list[tuple[dict, str]]) -> str:
    """What the contact sheet is made of: its layout, and each tile's file name, caption, and the image file's
    size and mtime (an image is replaced by writing a new file: a new mtime)."""
    h = hashlib.sha256(json.dumps(["sheet/1", SHEET_COUNT, SHEET_COLS, SHEET_TILE, SHEET_PAD, SHEET_CAPTION]).encode())
    for row, name in tiles:
        try:
            st = (out / name).stat()
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        h.update(json.dumps([name, _caption(row), stamp]).encode() + b"\n")
    return h.hexdigest()


def _sheet_digest_of(path: Path) -> str | None:
    """The tiles' digest an existing contact sheet carries (a PNG text chunk before its pixels: no decode)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            value = im.info.get(SHEET_DIGEST_KEY)
    except (OSError, ValueError):  # none yet, or not a PNG of ours
        return None
    return value if isinstance(value, str) else None


def _tile(path: Path):
    """One image, decoded and shrunk to fit a SHEET_TILE box, in RGB (transparency flattened on white)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (SHEET_TILE, SHEET_TILE))  # a JPEG decodes at a reduced scale; a PNG ignores it
        im.load()  # inside the `with`: thumbnail() does not load an image already small enough
        im.thumbnail((SHEET_TILE, SHEET_TILE), reducing_gap=2.0)
        if im.mode in ("RGBA", "LA", "PA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            return bg
        return im if im.mode == "RGB" else im.convert("RGB")


def _contact_sheet(out: Path, rows: list[dict], sizes: dict[str, tuple[int, int] | None], dest: Path) -> bool:
    """Write the contact sheet of the first ok images unless the existing one was made of the same tiles (the
    digest in its text chunk): then nothing is decoded. True if it was written."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    tiles = _sheet_tiles(rows, sizes)
    digest = _sheet_digest(out, tiles)
    if _sheet_digest_of(dest) == digest:
        return False
    width, height = contact_sheet_size(len(tiles))
    sheet = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    tile_w, tile_h = SHEET_TILE + 2 * SHEET_PAD, SHEET_TILE + 2 * SHEET_PAD + SHEET_CAPTION

    def caption(text: str, x: int, y: int) -> None:
        text = text if len(text) <= 30 else text[:29] + "…"
        while text and draw.textlength(text, font=font) > SHEET_TILE:
            text = text[:-2] + "…"
        try:
            draw.text((x, y), text, fill=(40, 40, 40), font=font)
        except UnicodeEncodeError:  # a bitmap font without the glyphs
            draw.text((x, y), text.encode("ascii", "replace").decode(), fill=(40, 40, 40), font=font)

    if not tiles:
        caption("no ok images", SHEET_PAD, SHEET_TILE // 2)
    # Decoded by up to 4 threads (Pillow decodes and resizes without the GIL): a real 1024x1024 PNG takes
    # ~26 ms; the sheet's 48 are the only images a report decodes.
    bad = 0
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="batcher-sheet") as pool:
        futures = {name: pool.submit(_tile, out / name) for _, name in tiles}
        for i, (row, name) in enumerate(tiles):
            x0, y0 = (i % SHEET_COLS) * tile_w, (i // SHEET_COLS) * tile_h
            try:
                im = futures[name].result()
            except (OSError, ValueError, SyntaxError) as exc:  # undecodable: a blank tile with its caption
                bad += 1
                log.debug("report: contact sheet tile %s: %s", name, exc)
            else:
                sheet.paste(im, (x0 + SHEET_PAD + (SHEET_TILE - im.width) // 2, y0 + SHEET_PAD + (SHEET_TILE - im.height) // 2))
            caption(_caption(row), x0 + SHEET_PAD, y0 + SHEET_PAD + SHEET_TILE + 3)
    if bad:
        log.warning("report: %d image(s) of the contact sheet could not be decoded", bad)
    info = PngInfo()
    info.add_text(SHEET_DIGEST_KEY, digest)
    _write_into_place(dest, lambda tmp: sheet.save(tmp, "PNG", pnginfo=info))
    return True


def _remove_old_thumbs(out: Path) -> None:
    """OUT/thumbs/ was written by batcher's earlier reports (JPEG thumbnails the page no longer uses): it is
    batcher's own, nothing else writes there, so it goes once the new report.html is in place."""
    old = out / THUMB_DIR
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)


# ---- rendering --------------------------------------------------------------------------------------

def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _short(text, n: int) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _when(iso: str | None) -> str:
    if not iso:
        return "—"
    iso = re.sub(r"\.\d+", "", str(iso))  # whole seconds are enough
    return iso.replace("T", " ").replace("Z", " UTC")


CSS = """
:root { --ok:#1a7f37; --blocked:#b35900; --failed:#c62828; --pending:#57606a; --line:#d8dee4; --muted:#57606a; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1f2328; background: #f6f8fa; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
.meta { color: var(--muted); font-size: 13px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin-top: 18px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .n { font-size: 26px; font-weight: 650; line-height: 1.2; }
.card .l { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .s { color: var(--muted); font-size: 12px; }
.ok { color: var(--ok); } .blocked { color: var(--blocked); } .failed { color: var(--failed); } .pending { color: var(--pending); }
.bar { display: flex; height: 10px; border-radius: 5px; overflow: hidden; margin-top: 14px; background: var(--line); }
.bar span { display: block; }
.bar .b-ok { background: var(--ok); } .bar .b-blocked { background: var(--blocked); }
.bar .b-failed { background: var(--failed); } .bar .b-pending { background: #afb8c1; }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line); font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { overflow-wrap: anywhere; }
td.idc { min-width: 8em; overflow-wrap: anywhere; } td.job { min-width: 15em; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.pill { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; font-weight: 600;
        border: 1px solid currentColor; white-space: nowrap; }
.warn { color: var(--failed); }
.zero { color: #8c959f; }
.note { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
figure a { display: flex; align-items: center; justify-content: center; aspect-ratio: 1 / 1; background: #eaeef2; }
figure img { display: block; max-width: 100%; max-height: 100%; width: auto; height: auto; }
figcaption { padding: 7px 9px 9px; font-size: 12px; }
figcaption .id { font-weight: 600; overflow-wrap: anywhere; }
figcaption .p { color: var(--muted); display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical;
                overflow: hidden; overflow-wrap: anywhere; }
.sheet img { max-width: 100%; border: 1px solid var(--line); border-radius: 8px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""


def _jobs_html(status: dict | None, status_error: str | None) -> str:
    if status is None:
        return f'<p class="note">Jobs unavailable: {_e(status_error)}</p>'
    jobs = status.get("jobs") or []
    if not jobs:
        return '<p class="note">No batch job: every request was served from the cache.</p>'
    shown = jobs[-JOB_LIMIT:]
    out = ['<table><thead><tr><th>job</th><th>state</th><th>created</th><th>24 h window ends</th><th>48 h expiry</th>'
           '<th class="num">requests</th><th class="num">images</th><th class="num">blocked</th><th class="num">failed</th>'
           '<th>warnings</th></tr></thead><tbody>']
    for j in shown:
        state = j.get("state") or ""
        if j.get("collected"):
            state = f"{j.get('outcome')}, collected"
        elif j.get("api_state") and j.get("api_state") != state:
            state += f" ({j['api_state']})"
        # Images and blocked are known once a job is collected; until then, the API's count of its answered lines.
        images = j.get("ok") if j.get("collected") else None
        blocked = j.get("blocked") if j.get("collected") else None
        warnings = "; ".join(j.get("warnings") or [])
        if j.get("error"):
            warnings = (warnings + "; " if warnings else "") + str(j["error"])
        out.append(
            f"<tr><td class=\"job\"><b>{_e(j.get('display_name'))}</b><br><code class=\"meta\">{_e(j.get('name'))}</code></td>"
            f"<td>{_e(state)}</td><td>{_e(_when(j.get('created_at')))}</td><td>{_e(_when(j.get('window_ends_at')))}</td>"
            f"<td>{_e(_when(j.get('expires_at')))}</td><td class=\"num\">{_e(j.get('request_count'))}</td>"
            f"<td class=\"num\">{_e('-' if images is None else images)}</td><td class=\"num\">{_e('-' if blocked is None else blocked)}</td>"
            f"<td class=\"num\">{_e(j.get('failed'))}</td>"
            f"<td class=\"warn wrap\">{_e(_short(warnings, 300))}</td></tr>")
    out.append("</tbody></table>")
    if len(jobs) > len(shown):
        out.append(f'<p class="note">Showing the last {len(shown):,} of {len(jobs):,} jobs; '
                   "<code>batcher status --json</code> lists them all.</p>")
    return "".join(out)


def _render(scan: _Scan, status: dict | None, status_error: str | None,
            sizes: dict[str, tuple[int, int] | None], generated: str) -> str:
    c = scan.counts
    total = max(scan.rows, 1)
    interactive = scan.cost_usd / BATCH_DISCOUNT if BATCH_DISCOUNT else scan.cost_usd
    cache_hits = status.get("cache_hits") if status else None
    req = (status or {}).get("requests") or {}
    title = "batcher report"
    manifest = (status or {}).get("manifest")
    p = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
         "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'\">"
         f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
         f"<style>{CSS}</style></head><body><main>",
         f"<h1>{_e(title)}</h1><div class=\"meta\">generated {_e(generated)}"
         + (f" · manifest <code>{_e(manifest)}</code>" if manifest else "") + "</div>"]

    # Summary cards.
    p.append('<div class="cards">')
    p.append(f'<div class="card"><div class="l">rows</div><div class="n">{scan.rows:,}</div>'
             f'<div class="s">{scan.cached_rows:,} from the cache</div></div>')
    for s in STATUSES:
        p.append(f'<div class="card"><div class="l">{s}</div><div class="n {s if c[s] else "zero"}">{c[s]:,}</div>'
                 f'<div class="s">{100 * c[s] / total:.1f}% of rows</div></div>')
    p.append('</div><div class="bar" aria-hidden="true">'
             + "".join(f'<span class="b-{s}" style="width:{100 * c[s] / total:.3f}%"></span>' for s in STATUSES if c[s])
             + "</div>")

    p.append('<div class="cards">')
    p.append(f'<div class="card"><div class="l">spent (batch)</div><div class="n">{usd(scan.cost_usd)}</div>'
             f'<div class="s">at the batch price</div></div>')
    p.append(f'<div class="card"><div class="l">interactive would cost</div><div class="n">{usd(interactive)}</div>'
             f'<div class="s">saved {usd(interactive - scan.cost_usd)} ({100 * (1 - BATCH_DISCOUNT):.0f}%)</div></div>')
    hits = f"{cache_hits:,}" if isinstance(cache_hits, int) else "—"
    p.append(f'<div class="card"><div class="l">cache hits</div><div class="n">{hits}</div>'
             f'<div class="s">requests not paid again</div></div>')
    if req:
        p.append(f'<div class="card"><div class="l">requests</div><div class="n">{sum(req.values()):,}</div>'
                 f'<div class="s">{req.get("succeeded", 0):,} ok · {req.get("blocked", 0):,} blocked · '
                 f'{req.get("failed", 0):,} failed · {req.get("queued", 0) + req.get("planned", 0):,} pending</div></div>')
    jobs = (status or {}).get("jobs") or []
    p.append(f'<div class="card"><div class="l">batch jobs</div><div class="n">{len(jobs):,}</div>'
             f'<div class="s">{sum(1 for j in jobs if j.get("state") == "submitted")} running</div></div>')
    p.append("</div>")

    # Jobs.
    p.append("<h2>Jobs</h2>")
    p.append(_jobs_html(status, status_error))

    # Failures by reason.
    p.append("<h2>Failures by reason</h2>")
    if scan.reasons or scan.other_reasons:
        p.append('<table><thead><tr><th>status</th><th>reason (finish_reason / error)</th><th class="num">rows</th>'
                 "<th>example ids</th></tr></thead><tbody>")
        for (status_, reason), (count, examples) in sorted(scan.reasons.items(), key=lambda kv: -kv[1][0]):
            p.append(f'<tr><td><span class="pill {status_}">{status_}</span></td><td class="wrap">{_e(_short(reason, 300))}</td>'
                     f'<td class="num">{count:,}</td><td class="wrap">{", ".join(f"<code>{_e(_short(i, 60))}</code>" for i in examples)}</td></tr>')
        if scan.other_reasons:
            p.append(f'<tr><td></td><td>(other reasons)</td><td class="num">{scan.other_reasons:,}</td><td></td></tr>')
        p.append("</tbody></table>")
    else:
        p.append('<p class="note">No blocked or failed rows.</p>')

    # Problem rows.
    n_problems = c["blocked"] + c["failed"]
    if n_problems:
        p.append(f"<h2>Blocked and failed rows ({n_problems:,})</h2>")
        p.append('<table><thead><tr><th>id</th><th>status</th><th>reason</th><th class="num">attempts</th><th>prompt</th>'
                 "</tr></thead><tbody>")
        for r in scan.problems:
            st = r.get("status")
            p.append(f'<tr><td class="idc"><code>{_e(_short(r.get("id"), 80))}</code></td>'
                     f'<td><span class="pill {_e(st)}">{_e(st)}</span></td><td class="wrap">{_e(_short(_reason(r), 200))}</td>'
                     f'<td class="num">{_e(r.get("attempts"))}</td>'
                     f'<td class="wrap" title="{_e(_short(r.get("prompt"), 1000))}">{_e(_short(r.get("prompt"), PROMPT_CHARS))}</td></tr>')
        p.append("</tbody></table>")
        if n_problems > len(scan.problems):
            p.append(f'<p class="note">Showing the first {len(scan.problems):,}; every row is in '
                     "<code>metadata.parquet</code> (column <code>status</code>).</p>")

    # The grid: the dataset's images themselves, loaded by the browser as they scroll into view; their
    # width/height (from the file's header) reserve the space. Nothing is decoded or resized here.
    p.append(f"<h2>Images ({c['ok']:,} ok)</h2>")
    if c["ok"] > len(scan.grid):
        p.append(f'<p class="note">The first {len(scan.grid):,} ok rows; the contact sheet is '
                 '<a href="contact_sheet.png">contact_sheet.png</a>.</p>')
    if scan.grid:
        p.append('<div class="grid">')
        for r in scan.grid:
            full = _safe_file_name(r)
            if full is not None and full in sizes:
                size = sizes[full]  # None: in the bucket, not copied down (its size is not known)
                dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
                img = (f'<img src="{_e(full)}"{dims} loading="lazy" decoding="async" '
                       f'alt="{_e(_short(r.get("prompt"), 200))}">')
            else:
                img = '<span class="note">image missing</span>'
            link = f'<a href="{_e(full)}">{img}</a>' if full else f"<a>{img}</a>"
            variant = f' <span class="meta">v{_e(r.get("variant"))}</span>' if r.get("variant") else ""
            p.append(f'<figure>{link}<figcaption><div class="id">{_e(_short(r.get("id"), 80))}{variant} '
                     f'<span class="pill ok">ok</span></div>'
                     f'<div class="p" title="{_e(_short(r.get("prompt"), 1000))}">{_e(_short(r.get("prompt"), PROMPT_CHARS))}</div>'
                     "</figcaption></figure>")
        p.append("</div>")
    else:
        p.append('<p class="note">No ok images yet.</p>')

    if scan.grid:
        p.append('<h2>Contact sheet</h2><div class="sheet"><a href="contact_sheet.png">'
                 '<img src="contact_sheet.png" alt="contact sheet of the first images"></a></div>')
    p.append('<footer>Written by <code>batcher report</code>. Every row is in <code>metadata.parquet</code>; '
             "images are under <code>images/</code>.</footer></main></body></html>\n")
    return "".join(p)


# ---- entry point ------------------------------------------------------------------------------------

def write_report(settings, *, status: dict | None = None, status_error: str | None = None,
                 now: dt.datetime | None = None) -> ReportSummary:
    """Write OUT/report.html and OUT/contact_sheet.png for the dataset of `settings` (and remove the thumbs/
    directory earlier versions wrote).

    `status`: the workdir's status document (output.status), or `status_error` saying why there is none (the
    page says so and the rest is still written). `batcher.pipeline.report` reads both."""
    if gcs.is_gcs(settings.out):
        return _write_gcs_report(settings, status=status, status_error=status_error, now=now)
    out = Path(settings.out)
    metadata = out / "metadata.parquet"
    if not metadata.exists():
        raise UsageError(f"no dataset at {out} (no metadata.parquet): run `batcher collect` or `batcher run` first")
    return _write(out, _scan(metadata), status=status, status_error=status_error, now=now)


def _write(out: Path, scan: _Scan, *, status: dict | None, status_error: str | None, now: dt.datetime | None,
           remote: bool = False, absent: frozenset[str] = frozenset()) -> ReportSummary:
    if status is None and status_error is None:
        status_error = "not read"
    sizes = _image_sizes(out, scan.grid, remote=remote, absent=absent)
    sheet = out / "contact_sheet.png"
    made = _contact_sheet(out, scan.grid, sizes, sheet)
    generated = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    page = _render(scan, status, status_error, sizes, generated)
    dest = out / "report.html"
    _write_into_place(dest, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    _remove_old_thumbs(out)  # after the new page is in place: the old one linked to them
    return ReportSummary(html_path=dest, sheet_path=sheet, rows=scan.rows, counts=dict(scan.counts), sheet_made=made)


def _write_gcs_report(settings, *, status: dict | None, status_error: str | None, now: dt.datetime | None) -> ReportSummary:
    """A gs:// dataset: the report is made in WORKDIR/report/ (metadata.parquet and the contact sheet's images,
    at most SHEET_COUNT, copied down) and report.html and contact_sheet.png are uploaded next to the dataset,
    where the page's relative `images/...` links find the dataset's images; the local copy stays. A `thumbs/`
    prefix an earlier version uploaded is left in the bucket (nothing links to it any more; delete it with
    `gcloud storage rm -r`)."""
    import dataclasses

    uri = str(settings.out).rstrip("/")
    staging = Path(settings.workdir) / "report"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        _write_into_place(staging / "metadata.parquet", lambda tmp: gcs.download_file(gcs.join(uri, "metadata.parquet"), str(tmp)))
    except UsageError:  # gcs: not found
        raise UsageError(f"no dataset at {uri} (no metadata.parquet): run `batcher collect` or `batcher run` first") from None
    scan = _scan(staging / "metadata.parquet")
    absent: set[str] = set()
    for name in [n for n in map(_safe_file_name, scan.grid) if n][:SHEET_COUNT]:
        if name in absent or (staging / name).exists():
            continue
        try:
            _write_into_place(staging / name, lambda tmp, n=name: gcs.download_file(gcs.join(uri, n), str(tmp)))
        except UsageError:  # gcs: not found
            absent.add(name)  # "image missing" on the page; the report warns how many
    summary = _write(staging, scan, status=status, status_error=status_error, now=now, remote=True,
                     absent=frozenset(absent))
    for path, content_type in ((summary.html_path, "text/html; charset=utf-8"), (summary.sheet_path, "image/png")):
        gcs.upload_file(gcs.join(uri, path.name), str(path), content_type=content_type)
    return dataclasses.replace(summary, uploaded_to=uri)
