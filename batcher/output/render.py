"""Everything batcher prints for people, in one place: the status table, the estimate, the list of models, and the
phrases of command summaries. The library returns data (documents, dataclasses); they are rendered here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cost.money import usd
from ..ledger import BLOCKED, FAILED, SUCCEEDED

if TYPE_CHECKING:
    from ..cost.estimate import Estimate
    from ..pipeline import PruneSummary
    from ..planning.planner import PlanResult
    from ..errors import SpendLimitError
    from .dataset import DatasetSummary


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


def status_table(doc: dict) -> str:
    head = ("JOB", "STATE", "DONE", "OK", "BLOCKED", "FAILED", "PENDING", "AGE", "WINDOW LEFT", "EXPIRES IN", "WARNINGS")
    rows = [head]
    for j in doc["jobs"]:
        fmt = lambda h: "-" if h is None else f"{h:.1f}h"  # noqa: E731
        known = lambda n: "-" if n is None else str(n)  # noqa: E731  (ok and blocked: known once collected)
        state = j["state"] + (f" ({j['api_state']})" if j["api_state"] and j["state"] == "submitted" else "")
        if j.get("collected"):
            state = f"{j['outcome']}, collected"
        rows.append((j["display_name"], state, str(j["succeeded"]), known(j.get("ok")), known(j.get("blocked")),
                     str(j["failed"]), str(j["pending"]), fmt(j["age_hours"]), fmt(j["window_hours_left"]),
                     fmt(j["expiry_hours_left"]), "; ".join(j["warnings"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    c, i = doc["requests"], doc.get("images") or {}
    lines.append("")
    if i:
        lines.append(f"images: {i['ok']:,} ok, {i['blocked']:,} blocked, {i['failed']:,} failed, {i['pending']:,} pending")
    lines.append(f"requests: {c.get('succeeded', 0)} ok, {c.get('blocked', 0)} blocked, {c.get('failed', 0)} failed, "
                 f"{c.get('queued', 0)} in jobs, {c.get('planned', 0)} planned; {doc['cache_hits']} cache hits; "
                 f"{usd(doc['cost_usd'])} spent")
    for model, cap in (doc.get("capacity") or {}).items():
        limit = f"{cap['token_cap']:,}" if cap.get("token_cap") else "no cap"
        lines.append(f"capacity {model}: {cap['in_flight_tokens']:,} of {limit} enqueued tokens in flight; "
                     f"{cap['jobs_waiting']} job(s) ({cap['waiting_tokens']:,} tokens) waiting; "
                     f"{cap['requests_not_in_jobs']} request(s) not in a job yet")
    return "\n".join(lines)


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
