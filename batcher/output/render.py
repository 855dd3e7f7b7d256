"""Everything batcher prints for people, in one place: the status table, the estimate, the list of models, and the
phrases of command summaries. The library returns data (documents, dataclasses); they are rendered here."""

from __future__ import annotations

import shutil
import textwrap
from typing import TYPE_CHECKING

from ..cost.money import usd
from ..ledger import BLOCKED, FAILED, SUCCEEDED

if TYPE_CHECKING:
    from ..cost.estimate import Estimate
    from ..pipeline import PruneSummary
    from ..planning.planner import PlanResult
    from ..errors import SpendLimitError
    from .dataset import DatasetSummary
    from .live import RunProgress
    from ..storage.housekeeping import CacheStats, GcReport, VerifyReport


# ---- command summaries ---------------------------------------------------------------------------------

# Words, the same in every summary, in the dataset and in the report: a manifest *row* asks for its variants'
# *images* (one dataset row each); images that ask for the same thing share one *request* (one payment, one cache
# entry). Outcomes are counted in images, as the dataset and the report count them.
IMAGE_STATUS = {SUCCEEDED: "ok", BLOCKED: "blocked", FAILED: "failed"}  # any other request state: pending


def image_statuses(by_state: dict[str, int]) -> dict[str, int]:
    """Images by request state (ledger.reading.image_counts) -> images by dataset status."""
    out = dict.fromkeys(("ok", "blocked", "failed", "pending"), 0)
    for state, n in by_state.items():
        out[IMAGE_STATUS.get(state, "pending")] += n
    return out


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def rows_read(plan: PlanResult) -> str:
    """"34 rows read", and those left out as invalid: a short count is visible."""
    text = plural(plan.rows + plan.rejected, "row") + " read"
    if plan.rejected:
        text += f" ({plan.rejected:,} invalid, skipped" + (f": see {plan.rejects_path}" if plan.rejects_path else "") + ")"
    return text


def plan_images(plan: PlanResult) -> str:
    return f"{plural(plan.images, 'image')} ({plural(plan.requests, 'request')}, {plan.images_before:,} from the cache)"


def run_line(state: str, plan: PlanResult, images: dict[str, int], *, jobs_created: int | None = None,
             paid_now: float | None = None, run_paid: float | None = None, dataset: str | None = None) -> str:
    """A command's summary of its run: rows read (and those left out), images, requests, jobs created, the images'
    outcomes, what this command paid and what the run's images cost in all, and where the dataset is."""
    text = f"{state}: {rows_read(plan)}, {plan_images(plan)}"
    if jobs_created is not None:
        text += f"; {jobs_created} job(s) created"
    text += (f"; images: {images['ok']:,} ok, {images['blocked']:,} blocked, {images['failed']:,} failed, "
             f"{images['pending']:,} pending")
    if paid_now is not None:
        text += f"; paid now {usd(paid_now)}" + (f", the run's images {usd(run_paid)} in all" if run_paid is not None else "")
    if dataset is not None:
        text += f"; dataset {dataset}"
    return text


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def prune_line(p: PruneSummary) -> str:
    """`batcher prune`'s summary: what it dropped (a dry run: would drop), what it kept, and the ledger's size."""
    d = p.dropped
    verb = "would drop" if p.dry_run else "dropped"
    text = (f"prune{' (dry run)' if p.dry_run else ''}: {verb} {plural(d['runs'], 'run')} ({plural(d['rows'], 'row')}), "
            f"{plural(d['requests'], 'request')} no kept run uses, {plural(d['jobs'], 'finished job')}")
    if d.get("job_files"):
        text += f" and {d['job_files']} JSONL file(s)"
    kept = ", ".join(str(r) for r in p.kept_runs) or "none"
    text += f"; kept {plural(len(p.kept_runs), 'run')} ({kept})"
    if p.unfinished_runs:
        text += f", of which {', '.join(str(r) for r in p.unfinished_runs)} beyond the newest {p.keep_runs}: work to finish"
    if p.bytes_after is None:
        text += f"; ledger {megabytes(p.bytes_before)} (nothing changed)"
    else:
        text += f"; ledger {megabytes(p.bytes_before)} -> {megabytes(p.bytes_after)}"
    text += f"; it holds {plural(p.remaining['rows'], 'row')}, {plural(p.remaining['requests'], 'request')}"
    text += "; image cache untouched (a dropped request that comes back is a cache hit)"
    return text + "".join(f"; {n}" for n in p.notes)


def spend_limit_note(limit: SpendLimitError | None) -> str:
    """What to say when the API refused to spend more (batcher.errors.SpendLimitError): which limit, what to do."""
    if limit is None:
        return ""
    return f"; the API refused to spend more: {limit}"


def lost_images_note(ds: DatasetSummary) -> str:
    """What to say of dataset rows whose image the cache has lost since their request was done (else "")."""
    if not ds.lost:
        return ""
    return (f"; {ds.lost} row(s) pending: their images are gone from the cache; run `batcher submit` or "
            "`batcher run` with the same manifest to generate them again")


# ---- documents -------------------------------------------------------------------------------------------


def terminal_width() -> int:
    """Columns to print in: $COLUMNS if set, else the terminal's, else 80 (a pipe): a script that wants every
    column asks for `--wide` or `--json`."""
    return shutil.get_terminal_size((80, 24)).columns


def elide(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut in the middle; two thirds of what is kept is the end (where a
    job's name has its number)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    tail = (width - 1) * 2 // 3
    return text[: width - 1 - tail] + "…" + text[len(text) - tail:]


def duration(seconds: float) -> str:
    """45s, 4m10s, 2h05m, 3d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def progress_line(p: RunProgress, width: int) -> str:
    """A run's progress in at most `width` characters: a bar, the API's counts over its jobs, the ETA, and each
    live state with how many jobs are in it and the longest time one has been (`2 running 4m10s`). What does not
    fit is left out whole, the job states first, then the ETA."""
    pct = f"{p.done / p.total:4.0%}" if p.total else "  -%"
    counts = f"{p.succeeded:,} succeeded, {p.failed:,} failed, {p.pending:,} pending"
    eta = "ETA " + (duration(p.eta_seconds) if p.eta_seconds is not None else "-")
    states = ", ".join(f"{n} {state} {duration(age)}" for state, n, age in p.states)
    for parts in ((counts, eta, states), (counts, eta), (counts,)):
        text = "; ".join(x for x in parts if x)
        room = width - len(pct) - len(text) - 4  # "pct |bar| text"
        if room >= 5 or parts == (counts,):
            bar = _bar(p.done / p.total if p.total else 0.0, min(max(room, 0), 30))
            return f"{pct} |{bar}| {text}"[:width]
    raise AssertionError("unreachable")


def _bar(fraction: float, width: int) -> str:
    filled = int(round(fraction * width))
    return "#" * filled + " " * (width - filled)


MIN_NAME = 12


def status_table(doc: dict, *, width: int | None = None, wide: bool = False) -> str:
    """The status for people. In `width` columns (default: terminal_width()): each job's name (cut in the middle
    to fit), state, lines done of its total, failed lines and hours left of its 24 h window, then its warnings and
    the run's counts, wrapped at words. `wide`: every column, however long the lines."""
    if wide:
        return _wide_status_table(doc)
    width = width or terminal_width()
    head = ("JOB", "STATE", "DONE", "FAILED", "WINDOW LEFT")
    rows = [(j["display_name"], _job_state(j), f"{j['succeeded'] + j['failed']:,}/{j['request_count']:,}",
             f"{j['failed']:,}", _hours(j["window_hours_left"])) for j in doc["jobs"]]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    # the name takes what the other columns leave; below MIN_NAME (a terminal under ~70 columns) lines run over
    widths[0] = max(min(widths[0], width - sum(widths[1:]) - 2 * (len(head) - 1)), MIN_NAME)
    lines = [_row((elide(r[0], widths[0]),) + r[1:], widths, right=(2, 3)) for r in [head] + rows]
    for j in doc["jobs"]:
        for w in j["warnings"]:
            lines += textwrap.wrap(f"warning: {elide(j['display_name'], 30)}: {w}", width, subsequent_indent="  ")
    lines.append("")
    for line in _status_totals(doc):
        lines += textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)


def watched_status(doc: dict, progress: RunProgress, every: float, *, at: str, width: int | None = None,
                   wide: bool = False) -> str:
    """A redraw of `status --watch`: when and how often, the progress line, then the status table."""
    width = width or terminal_width()
    head = elide(f"status at {at}, every {every:g}s until every job has ended (Ctrl-C stops)", width)
    return "\n".join([head, progress_line(progress, width), "", status_table(doc, width=width, wide=wide)])


def _row(cells, widths, right=()) -> str:
    return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def _job_state(j: dict) -> str:
    if j.get("collected"):
        return f"{j['outcome']}, collected"
    if j["state"] == "submitted" and j["api_state"]:
        return j["api_state"].lower()
    return j["state"]


def _hours(h: float | None) -> str:
    return "-" if h is None else f"{h:.1f}h"


def _wide_status_table(doc: dict) -> str:
    head = ("JOB", "STATE", "DONE", "OK", "BLOCKED", "FAILED", "PENDING", "AGE", "WINDOW LEFT", "EXPIRES IN", "WARNINGS")
    rows = [head]
    for j in doc["jobs"]:
        known = lambda n: "-" if n is None else str(n)  # noqa: E731  (ok and blocked: known once collected)
        state = j["state"] + (f" ({j['api_state']})" if j["api_state"] and j["state"] == "submitted" else "")
        if j.get("collected"):
            state = f"{j['outcome']}, collected"
        rows.append((j["display_name"], state, str(j["succeeded"]), known(j.get("ok")), known(j.get("blocked")),
                     str(j["failed"]), str(j["pending"]), _hours(j["age_hours"]), _hours(j["window_hours_left"]),
                     _hours(j["expiry_hours_left"]), "; ".join(j["warnings"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [_row(r, widths) for r in rows]
    return "\n".join(lines + [""] + _status_totals(doc))


def _status_totals(doc: dict) -> list[str]:
    c, i = doc["requests"], doc.get("images") or {}
    lines = [f"note: {doc['busy']['note']}"] if doc.get("busy") else []
    if i:
        lines.append(f"images: {i['ok']:,} ok, {i['blocked']:,} blocked, {i['failed']:,} failed, {i['pending']:,} pending")
    lines.append(f"requests: {c.get('succeeded', 0)} ok, {c.get('blocked', 0)} blocked, {c.get('failed', 0)} failed, "
                 f"{c.get('queued', 0)} in jobs, {c.get('planned', 0)} planned")
    lines.append(f"cost: {usd(doc['cost_usd'])} spent; {doc['cache_hits']} cache hits")
    for model, cap in (doc.get("capacity") or {}).items():
        limit = f"{cap['token_cap']:,}" if cap.get("token_cap") else "no cap"
        lines.append(f"capacity {model}: {cap['in_flight_tokens']:,} of {limit} enqueued tokens in flight; "
                     f"{cap['jobs_waiting']} job(s) ({cap['waiting_tokens']:,} tokens) waiting; "
                     f"{cap['requests_not_in_jobs']} request(s) not in a job yet")
    return lines


def estimate(e: Estimate) -> str:
    t = e.total()
    lines = [f"{e.manifest}: {e.rows:,} rows" + (f" ({e.rejected:,} invalid, skipped)" if e.rejected else "")
             + f", {t.requests:,} requests, {t.distinct:,} distinct, {t.cache_hits:,} cache hits, {t.to_generate:,} to generate", ""]
    head = ("MODEL", "TO GENERATE", "CACHED", "INPUT TOKENS", "OUTPUT TOKENS", "BATCH", "INTERACTIVE", "SAVINGS")
    rows = [head]
    for m in list(e.models.values()) + ([t] if len(e.models) > 1 else []):
        rows.append((m.model, f"{m.to_generate:,}", f"{m.cache_hits:,}", f"{m.prompt_tokens:,}", f"{m.output_tokens:,}",
                     usd(m.images_batch_usd), usd(m.images_interactive_usd), usd(m.images_interactive_usd - m.images_batch_usd)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    saved = t.images_interactive_usd - t.images_batch_usd
    pct = f", {saved / t.images_interactive_usd:.0%}" if t.images_interactive_usd else ""
    lines += ["",
              f"images: {usd(t.images_batch_usd)} batch vs {usd(t.images_interactive_usd)} interactive (save {usd(saved)}{pct})",
              f"input, estimated (~{t.prompt_tokens:,} tokens): {usd(t.input_batch_usd)} batch vs {usd(t.input_interactive_usd)} interactive"]
    if t.thoughts_tokens:
        lines.append(f"thinking, estimated (~{t.thoughts_tokens:,} tokens): {usd(t.thinking_batch_usd)} batch vs "
                     f"{usd(t.thinking_interactive_usd)} interactive")
    lines += [f"total, estimated: {usd(t.batch_usd)} batch vs {usd(t.interactive_usd)} interactive",
              "(images: tokens per image x Google's rate; prompts ~4 characters a token; thinking: an allowance per image "
              "that the catalog states as an assumption; realized cost comes from each response's usage)"]
    if note := e.tier_cap_note():
        lines += ["", f"warning: {note}"]
    lines += [f"warning: {w}" for w in e.warnings]
    return "\n".join(lines)


def models(doc: dict) -> str:
    """`batcher models` for a terminal (80 columns)."""
    lines: list[str] = []
    for m in doc["models"]:
        flags = [m["display_name"]] + (["the default"] if m["default"] else [])
        life = {"current": f"current since {m['released']}", "retiring": f"shuts down {m['shutdown']}",
                "past_earliest_shutdown": f"may be shut down (earliest {m['shutdown']})",
                "shut_down": f"shut down {m['shutdown']}"}[m["status"]]
        if m["replacement"] and m["status"] != "current":
            life += f"; use {m['replacement']}"
        lines.append(f"{m['name']}  ({'; '.join(flags)})")
        lines.append(f"  {life}")
        lines.append(f"  aspect ratios: {', '.join(m['aspect_ratios'])}")
        lines.append(f"  up to {m['max_reference_images']} reference images" + (
            f"; thinks (~{m['expected_thoughts_tokens']} tokens an image, estimated)" if m["thinking"] else ""))
        r = m["usd_per_mtok"]
        lines.append(f"  $ per 1M tokens: {r['input']:g} input, {r['image_output']:g} image, "
                     f"{r['text_and_thinking_output']:g} text and thinking (batch x{r['batch_discount']:g})")
        lines.append("    size   tokens   $ batch   $ interactive")
        for size, p in m["per_image"].items():
            lines.append(f"    {size:<5} {p['tokens']:>7,}  {usd(p['batch_usd']):>8}  {usd(p['interactive_usd']):>14}")
        read = sorted({s["read"] for s in m["sources"].values()})
        lines.append(f"  sources (read {', '.join(read)}):")
        for url in sorted({s["url"] for s in m["sources"].values()}):
            lines.append(f"    {url}")
        lines.append("")
    if doc["api"] is not None:
        lines.append("The API lists these image models for batch jobs:")
        for a in doc["api"]:
            mark = "" if a["priced"] else "  (no price: add [prices.\"%s\"] to a job spec)" % a["name"]
            lines.append(f"  {a['name']}{mark}")
        if not doc["api"]:
            lines.append("  (none)")
    elif doc["api_error"]:
        lines.append(f"The API's model list could not be read: {doc['api_error']}")
    else:
        lines.append("Set GEMINI_API_KEY to also list the image models the API serves for batch jobs.")
    return "\n".join(lines)


# ---- batcher cache -------------------------------------------------------------------------------------------

def size(n: int) -> str:
    """Bytes for people, binary units as `--max-bytes` reads them: 812 B, 3.4 KiB, 1.2 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _entries(n: int) -> str:
    return f"{n:,} entr{'y' if n == 1 else 'ies'}"


def _rate(n: int, seconds: float) -> str:
    return f"{seconds:.1f} s, {n / seconds:,.0f} images/s" if seconds > 0 else f"{seconds:.1f} s"


def cache_stats(st: "CacheStats") -> str:
    lines = [f"cache {st.root}"]
    width = max([len(m) for m in st.by_model] + [8])
    if st.by_model:
        lines.append("by model:")
        lines += [f"  {m:<{width}}  {t.entries:>9,}  {size(t.bytes):>10}" for m, t in st.by_model.items()]
        lines.append("by age (when the image was written):")
        lines += [f"  {a:<{width}}  {t.entries:>9,}  {size(t.bytes):>10}" for a, t in st.by_age.items()]
    notes = []
    if st.without_meta:
        notes.append(f"{plural(st.without_meta, 'image')} without a readable .json (counted as model 'unknown')")
    if st.orphan_meta:
        notes.append(f"{plural(st.orphan_meta, '.json')} without an image (a write under way, or an interrupted gc; "
                     "gc removes them once old)")
    if st.temp_files:
        notes.append(f"{plural(st.temp_files, 'temp file')} ({size(st.temp_bytes)}) of writes under way or killed; "
                     "never removed by gc")
    if st.linked_bytes:
        notes.append(f"{size(st.linked_bytes)} of images are hard-linked by datasets too (removing them from the "
                     "cache frees no space while the dataset keeps them)")
    lines += [f"note: {n}" for n in notes]
    lines.append(f"cache stats: {plural(st.entries, 'image')}, {size(st.bytes)} ({_rate(st.entries, st.seconds)})")
    return "\n".join(lines)


def cache_verify(r: "VerifyReport") -> str:
    lines = []
    for b in r.bad[:50]:
        where = f"moved to {b.moved_to[0].rsplit('/', 2)[0]}/" if b.moved_to else "left in place (changed recently)"
        lines.append(f"bad: {b.hash}: {b.reason}; {where}")
    if len(r.bad) > 50:
        lines.append(f"... and {len(r.bad) - 50:,} more (--json lists them all)")
    moved = sum(1 for b in r.bad if b.moved_to)
    tail = ""
    if r.bad:
        tail = (f"; {moved:,} moved to {r.quarantine} (the next run generates them again)" if moved else "")
        if moved < len(r.bad):
            tail += f"; {len(r.bad) - moved:,} left in place (changed in the last --min-age; run verify again later)"
    lines.append(f"cache verify: {plural(r.checked, 'image')} checked, {r.ok:,} ok, {len(r.bad):,} bad, "
                 f"{r.without_digest:,} with no digest (decoded only), {size(r.bytes_read)} read "
                 f"({_rate(r.checked, r.seconds)}){tail}")
    return "\n".join(lines)


def cache_gc(r: "GcReport") -> str:
    lines = []
    if r.examples:
        lines.append("would remove, e.g.:" if r.dry_run else "removed, e.g.:")
        lines += [f"  {e['hash']}  written {e['written']} ({e['age_days']:g} days ago)  {size(e['bytes'])}"
                  for e in r.examples]
    kept = []
    if r.kept_young:
        kept.append(f"{r.kept_young:,} changed in the last --min-age")
    if r.kept_referenced:
        kept.append(f"{r.kept_referenced:,} referenced by a --keep-referenced workdir")
    if r.changed:
        kept.append(f"{r.changed:,} written again meanwhile")
    if r.temp_files:
        kept.append(f"{plural(r.temp_files, 'temp file')} of writes")
    if r.dry_run:
        head = f"cache gc (dry run): would remove {_entries(r.selected)}, " \
               f"{size(r.selected_bytes)}; nothing removed"
    else:
        head = f"cache gc: removed {_entries(r.deleted)}, {size(r.deleted_bytes)}"
    text = f"{head} of {r.scanned:,} ({size(r.scanned_bytes)}); the cache {'would hold' if r.dry_run else 'holds'} " \
           f"{size(r.remaining_bytes)}"
    if kept:
        text += f"; kept: {', '.join(kept)}"
    if r.over_budget:
        text += "; still over --max-bytes (what is left is young or referenced)"
    lines.append(f"{text} ({r.seconds:.1f} s)")
    return "\n".join(lines)

def shards_note(dataset) -> str:
    """What a summary says of a sharded dataset (a DatasetSummary, or None): its shards, and how many were written
    now (the others already held their samples)."""
    if dataset is None or dataset.format == "files":
        return ""
    kind = "tar shard" if dataset.format == "webdataset" else "Parquet shard"
    return f"; {dataset.format}: {plural(len(dataset.shard_names), kind)} ({dataset.shards_written:,} written now)"
