"""`batcher estimate` and the budget: what a manifest (or the rest of a run) is expected to cost.

The estimate reads and validates the manifest exactly as planning does, hashes its requests and asks the cache,
but writes no ledger and needs no API key. Tokens: a prompt is ~len(text)/4 tokens plus 258 per reference
image; an image's output tokens and price come from the price table (batcher.pricing, overridable).

The budget (`--budget-usd`, `limits.budget_usd`): the spend of a run is the realized cost of its finished
requests + the estimated cost of requests in jobs + the estimated cost of what is about to be sent;
planned requests that would take it over the budget stay planned (held back), and the command exits 4.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ManifestError
from .ledger import PLANNED, QUEUED, Ledger
from .manifest import ManifestOptions, RowProblem, read_manifest
from .planner import MAX_PROBLEMS_SHOWN
from .prepare import References, image_requests
from .pricing import PriceTable, current_table
from .requests import request_hash
from .store import ImageStore

TOKENS_PER_REFERENCE_IMAGE = 258


def prompt_tokens(text_chars: int, references: int) -> int:
    return math.ceil(text_chars / 4) + TOKENS_PER_REFERENCE_IMAGE * references


@dataclass
class ModelEstimate:
    model: str
    requests: int = 0  # rows x variants
    distinct: int = 0
    cache_hits: int = 0
    to_generate: int = 0
    prompt_tokens: int = 0  # of the requests to generate
    output_tokens: int = 0
    images_batch_usd: float = 0.0
    images_interactive_usd: float = 0.0
    input_batch_usd: float = 0.0
    input_interactive_usd: float = 0.0

    @property
    def batch_usd(self) -> float:
        return self.images_batch_usd + self.input_batch_usd

    @property
    def interactive_usd(self) -> float:
        return self.images_interactive_usd + self.input_interactive_usd

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(batch_usd=self.batch_usd, interactive_usd=self.interactive_usd,
                 savings_usd=self.interactive_usd - self.batch_usd)
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


@dataclass
class Estimate:
    manifest: str
    rows: int = 0
    rejected: int = 0
    models: dict[str, ModelEstimate] = field(default_factory=dict)

    def total(self) -> ModelEstimate:
        t = ModelEstimate(model="total")
        for m in self.models.values():
            for k in ("requests", "distinct", "cache_hits", "to_generate", "prompt_tokens", "output_tokens", "images_batch_usd",
                      "images_interactive_usd", "input_batch_usd", "input_interactive_usd"):
                setattr(t, k, getattr(t, k) + getattr(m, k))
        return t

    def to_dict(self) -> dict:
        return {"manifest": self.manifest, "rows": self.rows, "rejected": self.rejected,
                "models": {k: m.to_dict() for k, m in self.models.items()}, "total": self.total().to_dict()}


def estimate(manifest: str | Path, options: ManifestOptions = ManifestOptions(), *, cache_dir: str | Path | None = None,
             refresh: bool = False, skip_invalid: bool = False, table: PriceTable | None = None) -> Estimate:
    """Count rows, requests, distinct requests and cache hits of a manifest, and price what is left to generate."""
    table = table or current_table()
    manifest = Path(manifest)
    if not manifest.exists():
        raise ManifestError(f"{manifest}: no such file; check the path")
    if manifest.is_dir():
        raise ManifestError(f"{manifest}: is a directory, not a manifest file; pass a .parquet, .csv or .tsv file")
    store = None if refresh else ImageStore(cache_dir)
    result = Estimate(manifest=str(manifest))
    problems: list[RowProblem] = []
    refs = References()
    seen: set[str] = set()
    for item in read_manifest(manifest, options):
        if isinstance(item, RowProblem):
            problems.append(item)
            continue
        try:
            requests = image_requests(item, refs)
        except OSError as exc:
            problems.append(RowProblem(str(manifest), item.row, "reference_images", None, f"cannot read reference image: {exc}"))
            continue
        result.rows += 1
        price = table.get(item.model)
        m = result.models.setdefault(item.model, ModelEstimate(model=item.model))
        chars = len(item.prompt) + len(item.system_instruction or "")
        for req in requests:
            m.requests += 1
            h = request_hash(req)
            if h in seen:
                continue
            seen.add(h)
            m.distinct += 1
            if store is not None and store.has(h):
                m.cache_hits += 1
                continue
            m.to_generate += 1
            pt = prompt_tokens(chars, len(req.references))
            m.prompt_tokens += pt
            if price is None:
                continue  # (the manifest reader rejects unknown models; kept safe)
            m.output_tokens += price.image_tokens(req.image_size)
            m.images_batch_usd += price.image_usd(req.image_size, batch=True)
            m.images_interactive_usd += price.image_usd(req.image_size, batch=False)
            m.input_batch_usd += price.input_usd(pt, batch=True)
            m.input_interactive_usd += price.input_usd(pt, batch=False)
    if problems and not skip_invalid:
        shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
        more = len(problems) - len(shown)
        raise ManifestError(f"{manifest}: {len(problems)} invalid row(s). Fix them, or pass --skip-invalid to estimate the "
                            "valid rows." + (f" ({more} more not shown)" if more > 0 else ""), problems=shown)
    result.rejected = len(problems)
    if result.rows == 0:
        raise ManifestError(f"{manifest}: no valid rows to estimate")
    return result


def usd(x: float) -> str:
    """Dollars to the cent; under a dollar, to 1/100 cent unless that is the same."""
    return f"${x:,.2f}" if x >= 0.995 or abs(x - round(x, 2)) < 1e-9 else f"${x:,.4f}"


def render(e: Estimate) -> str:
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
              f"input tokens (~{t.prompt_tokens:,}): {usd(t.input_batch_usd)} batch vs {usd(t.input_interactive_usd)} interactive",
              f"total: {usd(t.batch_usd)} batch vs {usd(t.interactive_usd)} interactive",
              "(estimate: published per-image prices where Google quotes one, else tokens x rate; prompts ~4 characters a token)"]
    return "\n".join(lines)


# ---- the budget -------------------------------------------------------------------------------------------

def request_estimate_usd(model: str, body_json: str, table: PriceTable | None = None, batch: bool = True) -> float:
    """The estimated cost of one request of the ledger, from its GenerateContentRequest body."""
    price = (table or current_table()).get(model)
    if price is None:
        return 0.0
    body = json.loads(body_json)
    chars = refs = 0
    for content in body.get("contents", []) + [body.get("systemInstruction") or {}]:
        for part in content.get("parts", []):
            if "text" in part:
                chars += len(part["text"])
            elif "fileData" in part or "inlineData" in part:
                refs += 1
    size = body.get("generationConfig", {}).get("imageConfig", {}).get("imageSize")
    return price.image_usd(size, batch) + price.input_usd(prompt_tokens(chars, refs), batch)


@dataclass
class BudgetCheck:
    budget_usd: float
    spent_usd: float = 0.0  # realized: finished requests of this run
    queued_usd: float = 0.0  # estimated: requests in jobs
    allowed: int = 0  # planned requests that fit
    allowed_usd: float = 0.0
    held: int = 0  # planned requests held back
    held_usd: float = 0.0

    @property
    def needed_usd(self) -> float:
        """How much more budget the held-back requests need."""
        return self.spent_usd + self.queued_usd + self.allowed_usd + self.held_usd - self.budget_usd

    def note(self) -> str:
        if not self.held:
            return ""
        return (f"budget {usd(self.budget_usd)}: {self.held:,} requests held back (est. {usd(self.needed_usd)} more needed; "
                f"{usd(self.spent_usd)} spent, {usd(self.queued_usd)} in jobs); raise --budget-usd (or limits.budget_usd "
                "in the job spec) and run again to send them")


def run_spend_usd(ledger: Ledger, run) -> float:
    """What the run has paid: the payments for its requests since it began, not served from the cache, whatever
    state they are in now (one planned again within the run keeps what it cost: planner.REPLANNED_IN_RUN). An
    earlier run's requests in the same workdir were paid by that run; they are not counted again."""
    if run is None:
        return 0.0
    where, params = ledger.in_run(run["id"])
    return ledger.conn.execute(
        "SELECT COALESCE(SUM(cost_usd),0) FROM requests WHERE cached=0 "
        f"AND updated_at >= ? AND {where}", (run["created_at"], *params)).fetchone()[0]


def check_budget(ledger: Ledger, budget_usd: float, table: PriceTable | None = None) -> BudgetCheck:
    """How many planned requests can be sent, in the order `planner.shard` takes them, within the budget."""
    table = table or current_table()
    c = ledger.conn
    check = BudgetCheck(budget_usd=budget_usd, spent_usd=run_spend_usd(ledger, ledger.current_run()))
    for model, body_json in c.execute("SELECT model, body_json FROM requests WHERE state=?", (QUEUED,)).fetchall():
        check.queued_usd += request_estimate_usd(model, body_json, table)
    left = budget_usd - check.spent_usd - check.queued_usd
    # The same queries, in the same order, as planner.shard: its limit_requests takes the first N of these.
    models = [r[0] for r in c.execute("SELECT DISTINCT model FROM requests WHERE state=?", (PLANNED,))]
    for model in models:
        for (body_json,) in c.execute("SELECT body_json FROM requests WHERE state=? AND model=? ORDER BY rowid", (PLANNED, model)).fetchall():
            cost = request_estimate_usd(model, body_json, table)
            if not check.held and check.allowed_usd + cost <= left + 1e-9:
                check.allowed += 1
                check.allowed_usd += cost
            else:
                check.held += 1
                check.held_usd += cost
    return check


def budget_allowance(ws, check: BudgetCheck | None = None) -> int | None:
    """For pipeline.send_pending: how many planned requests may be sharded (None: no budget). Remembers the check
    (`check`: one just made on the same ledger)."""
    budget = getattr(ws.settings, "budget_usd", None)
    if budget is None:
        return None
    ws.budget = check or check_budget(ws.ledger, budget)
    return ws.budget.allowed


def budget_exhausted(ws, counts: dict) -> bool:
    """For pipeline.run: nothing in jobs, requests planned, and none of them fits the budget: stop waiting."""
    if getattr(ws.settings, "budget_usd", None) is None or counts.get(QUEUED) or not counts.get(PLANNED):
        return False
    ws.budget = check_budget(ws.ledger, ws.settings.budget_usd)
    return ws.budget.allowed == 0 and ws.budget.held > 0


def budget_note(ws) -> str:
    check = getattr(ws, "budget", None)
    return f"; {check.note()}" if check is not None and check.held else ""
