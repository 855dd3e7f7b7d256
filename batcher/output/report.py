"""The morning report: `OUT/report.html` and `OUT/contact_sheet.png`, written into the output dataset.

report.html is one static, self-contained page (inline CSS, no script, no external URL) that opens from disk
or a bucket: rows by status, cost (batch vs interactive), cache hits, jobs and their 24 h / 48 h windows,
failures grouped by reason, the blocked/failed rows, and a grid of thumbnails (`OUT/thumbs/`, referenced by
relative path). contact_sheet.png is a grid image of the first ok images with their ids as captions.

Bounded whatever the dataset size: metadata.parquet is streamed in batches, the grid, the problem table,
the reasons and the jobs are capped, and only the thumbnails shown are generated (skipped if up to date).
Everything user-supplied is HTML-escaped; file paths come only from `file_name` and request hashes.
Every file is written to a temp name and renamed.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from ..storage import atomic, gcs
from ..catalog import BATCH_DISCOUNT
from ..cost.money import usd
from ..errors import UsageError

log = logging.getLogger("batcher")

GRID_LIMIT = 500  # ok rows shown as thumbnails
PROBLEM_LIMIT = 1000  # blocked/failed rows listed in the table
REASON_LIMIT = 200  # distinct failure reasons tracked; the rest are counted as "other reasons"
EXAMPLES_PER_REASON = 5
JOB_LIMIT = 500
THUMB_PX = 256
THUMB_DIR = "thumbs"
SHEET_COUNT = 48
SHEET_COLS = 8
SHEET_TILE = 192  # thumbnail box in the contact sheet
SHEET_PAD = 6
SHEET_CAPTION = 18
PROMPT_CHARS = 120
BATCH_ROWS = 10_000
COLUMNS = ("file_name", "id", "variant", "status", "prompt", "request_hash", "error", "finish_reason", "attempts", "cached", "cost_usd")
STATUSES = ("ok", "blocked", "failed", "pending")

_HASH = re.compile(r"^[0-9a-f]{16,128}$")
_FILE_NAME = re.compile(r"^images/[0-9a-f]{2}/[0-9a-f]{16,128}\.[A-Za-z0-9]{1,5}$")


@dataclass
class ReportSummary:
    html_path: Path  # the local page (for a gs:// dataset: in WORKDIR/report/, also uploaded to `uploaded_to`)
    sheet_path: Path
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    thumbnails: int = 0  # generated this time (the others were up to date)
    uploaded_to: str | None = None  # a gs:// dataset: where report.html, contact_sheet.png and thumbs/ went


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


def _thumb_rel(row: dict) -> str | None:
    h = row.get("request_hash")
    if not isinstance(h, str) or not _HASH.match(h) or _safe_file_name(row) is None:
        return None
    return f"{THUMB_DIR}/{h[:2]}/{h}.jpg"


def _make_thumb(src: Path, dest: Path) -> bool:
    """Write a JPEG thumbnail of src (at most THUMB_PX a side) unless an up-to-date one exists."""
    from PIL import Image

    if dest.exists() and dest.stat().st_mtime >= src.stat().st_mtime:
        return False

    def write(tmp: Path) -> None:
        with Image.open(src) as im:
            im.draft("RGB", (THUMB_PX, THUMB_PX))
            im.thumbnail((THUMB_PX, THUMB_PX), reducing_gap=2.0)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            elif im.mode != "RGB":
                im = im.convert("RGB")
            im.save(tmp, "JPEG", quality=82, optimize=True)

    _write_into_place(dest, write)
    return True


def _thumbnail(out: Path, row: dict, rel: str) -> tuple[bool, tuple[int, int]]:
    """(made now, its size) of one grid row's thumbnail."""
    from PIL import Image

    made = _make_thumb(out / row["file_name"], out / rel)
    with Image.open(out / rel) as im:
        return made, im.size


def _thumbnails(out: Path, rows: list[dict]) -> tuple[dict[str, tuple[int, int]], int]:
    """Thumbnails for the grid rows: {relative path: (width, height)}, and how many were generated. Made by a
    thread per CPU (Pillow decodes and resizes without the GIL): 500 thumbnails of 1.5 MB PNGs took ~3 s of a
    collect in one thread (docs/benchmarks.md, issue 19)."""
    from concurrent.futures import ThreadPoolExecutor

    wanted: dict[str, dict] = {}
    for row in rows:
        rel = _thumb_rel(row)
        if rel is not None and rel not in wanted:
            wanted[rel] = row
    sizes: dict[str, tuple[int, int]] = {}
    made = missing = 0
    first = ""
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="batcher-thumbs") as pool:
        futures = {rel: pool.submit(_thumbnail, out, row, rel) for rel, row in wanted.items()}
        for rel, fut in futures.items():  # in the rows' order
            try:
                now, sizes[rel] = fut.result()
                made += now
            except (OSError, ValueError) as exc:  # a missing or undecodable image: no thumbnail, the rest go on
                missing += 1
                first = first or f"{wanted[rel]['file_name']}: {exc}"
    if missing:
        log.warning("report: %d image(s) without a thumbnail (first: %s)", missing, first)
    return sizes, made


def _contact_sheet(out: Path, rows: list[dict], sizes: dict[str, tuple[int, int]], dest: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    tiles = [(r, _thumb_rel(r)) for r in rows]
    tiles = [(r, rel) for r, rel in tiles if rel in sizes][:SHEET_COUNT]
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
    for i, (row, rel) in enumerate(tiles):
        x0, y0 = (i % SHEET_COLS) * tile_w, (i // SHEET_COLS) * tile_h
        with Image.open(out / rel) as im:
            im = im.convert("RGB")
            im.thumbnail((SHEET_TILE, SHEET_TILE))
            sheet.paste(im, (x0 + SHEET_PAD + (SHEET_TILE - im.width) // 2, y0 + SHEET_PAD + (SHEET_TILE - im.height) // 2))
        caption(str(row.get("id")) + (f" v{row['variant']}" if row.get("variant") else ""), x0 + SHEET_PAD, y0 + SHEET_PAD + SHEET_TILE + 3)
    _write_into_place(dest, lambda tmp: sheet.save(tmp, "PNG", optimize=True))


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


def _render(scan: _Scan, status: dict | None, status_error: str | None, sizes: dict[str, tuple[int, int]],
            generated: str) -> str:
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

    # Thumbnails.
    p.append(f"<h2>Images ({c['ok']:,} ok)</h2>")
    if c["ok"] > len(scan.grid):
        p.append(f'<p class="note">The first {len(scan.grid):,} ok rows; the contact sheet is '
                 '<a href="contact_sheet.png">contact_sheet.png</a>.</p>')
    if scan.grid:
        p.append('<div class="grid">')
        for r in scan.grid:
            rel = _thumb_rel(r)
            full = _safe_file_name(r)
            if rel in sizes:
                w, h = sizes[rel]
                img = f'<img src="{_e(rel)}" width="{w}" height="{h}" loading="lazy" alt="{_e(_short(r.get("prompt"), 200))}">'
            else:
                img = '<span class="note">no thumbnail</span>'
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
    """Write OUT/report.html, OUT/contact_sheet.png and OUT/thumbs/ for the dataset of `settings`.

    `status`: the workdir's status document (output.status), or `status_error` saying why there is none (the
    page says so and the rest is still written). `batcher.pipeline.report` reads both."""
    if gcs.is_gcs(settings.out):
        return _write_gcs_report(settings, status=status, status_error=status_error, now=now)
    out = Path(settings.out)
    metadata = out / "metadata.parquet"
    if not metadata.exists():
        raise UsageError(f"no dataset at {out} (no metadata.parquet): run `batcher collect` or `batcher run` first")
    if status is None and status_error is None:
        status_error = "not read"
    scan = _scan(metadata)
    sizes, made = _thumbnails(out, scan.grid)
    sheet = out / "contact_sheet.png"
    _contact_sheet(out, scan.grid, sizes, sheet)
    generated = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    page = _render(scan, status, status_error, sizes, generated)
    dest = out / "report.html"
    _write_into_place(dest, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return ReportSummary(html_path=dest, sheet_path=sheet, rows=scan.rows, counts=dict(scan.counts), thumbnails=made)


def _write_gcs_report(settings, *, status: dict | None, status_error: str | None, now: dt.datetime | None) -> ReportSummary:
    """A gs:// dataset: the report is made in WORKDIR/report/ (metadata.parquet and the grid's images, at most
    GRID_LIMIT, copied down) and its files are uploaded next to the dataset; the local copy stays."""
    import dataclasses

    uri = str(settings.out).rstrip("/")
    staging = Path(settings.workdir) / "report"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        _write_into_place(staging / "metadata.parquet", lambda tmp: gcs.download_file(gcs.join(uri, "metadata.parquet"), str(tmp)))
    except UsageError:  # gcs: not found
        raise UsageError(f"no dataset at {uri} (no metadata.parquet): run `batcher collect` or `batcher run` first") from None
    for row in _scan(staging / "metadata.parquet").grid:
        name = _safe_file_name(row)
        if name and not (staging / name).exists():
            try:
                _write_into_place(staging / name, lambda tmp, n=name: gcs.download_file(gcs.join(uri, n), str(tmp)))
            except UsageError:  # gcs: not found
                pass  # no thumbnail for it; the report says how many are missing
    summary = write_report(dataclasses.replace(settings, out=staging), status=status, status_error=status_error, now=now)
    uploads = [(summary.html_path, "text/html; charset=utf-8"), (summary.sheet_path, "image/png")]
    uploads += [(p, "image/jpeg" if p.suffix == ".jpg" else "image/png") for p in sorted((staging / THUMB_DIR).glob("**/*"))
                if p.is_file() and not p.name.startswith(".")]  # not a temp file a killed writer left
    for path, content_type in uploads:
        gcs.upload_file(gcs.join(uri, path.relative_to(staging).as_posix()), str(path), content_type=content_type)
    return dataclasses.replace(summary, uploaded_to=uri)

