"""`batcher estimate`: what a manifest is expected to cost, and the estimate of one request's price.

The estimate reads and validates the manifest exactly as planning does, hashes its requests and asks the cache,
but writes no ledger and needs no API key. Tokens: a prompt is ~len(text)/4 tokens plus the model's
input_image_tokens per reference image; an image's output tokens and price come from the price table
(cost.pricing, overridable), and a thinking model's expected thoughts are priced on a line of their own. A model
with no price is refused, with how to add one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..catalog import TIERS, model_spec, warning as model_warning
from ..errors import ManifestError, UsageError
from ..manifest import ManifestOptions, RowProblem
from .money import usd
from .pricing import PriceTable, current_table
from .tokens import body_prompt, prompt_tokens
from ..planning.requests import request_hash
from ..storage.store import open_store

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
    thoughts_tokens: int = 0  # the expected thinking allowance of the requests to generate
    thinking_batch_usd: float = 0.0
    thinking_interactive_usd: float = 0.0

    @property
    def batch_usd(self) -> float:
        return self.images_batch_usd + self.input_batch_usd + self.thinking_batch_usd

    @property
    def interactive_usd(self) -> float:
        return self.images_interactive_usd + self.input_interactive_usd + self.thinking_interactive_usd

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(batch_usd=self.batch_usd, interactive_usd=self.interactive_usd,
                 savings_usd=self.interactive_usd - self.batch_usd)
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


@dataclass
class Estimate:
    """What `estimate` found for a manifest: rows, requests, cache hits, tokens and dollars, batch and interactive
    (by model), and the tier's monthly cap it is held against. `to_dict()` is `estimate --json`."""

    manifest: str
    rows: int = 0
    rejected: int = 0
    models: dict[str, ModelEstimate] = field(default_factory=dict)
    tier: str | None = None  # the usage tier whose monthly spend cap the estimate is held against
    warnings: list[str] = field(default_factory=list)

    def total(self) -> ModelEstimate:
        t = ModelEstimate(model="total")
        for m in self.models.values():
            for k in ("requests", "distinct", "cache_hits", "to_generate", "prompt_tokens", "output_tokens", "images_batch_usd",
                      "images_interactive_usd", "input_batch_usd", "input_interactive_usd", "thoughts_tokens",
                      "thinking_batch_usd", "thinking_interactive_usd"):
                setattr(t, k, getattr(t, k) + getattr(m, k))
        return t

    def tier_cap_note(self) -> str:
        return tier_cap_note(self.total().batch_usd, self.tier)

    def to_dict(self) -> dict:
        cap = TIERS.get(self.tier) if self.tier else None
        return {"manifest": self.manifest, "rows": self.rows, "rejected": self.rejected,
                "models": {k: m.to_dict() for k, m in self.models.items()}, "total": self.total().to_dict(),
                "tier": self.tier, "tier_monthly_spend_cap_usd": cap.monthly_spend_cap_usd if cap else None,
                "over_tier_cap": bool(self.tier_cap_note()), "warnings": list(self.warnings)}


def tier_cap_note(batch_usd: float, tier: str | None, at_least: bool = False) -> str:
    """What to say when a batch estimate is over the usage tier's monthly spend cap (else ""); `at_least`: the
    estimate is a lower bound."""
    cap = TIERS.get(tier) if tier else None
    if cap is None or batch_usd <= cap.monthly_spend_cap_usd:
        return ""
    return (f"the batch estimate ({'at least ' if at_least else ''}{usd(batch_usd)}) is over Tier {tier}'s monthly spend cap of "
            f"{usd(cap.monthly_spend_cap_usd)} (the billing account's, whatever else it spends this month): the API will "
            f"stop answering past it. Send less (--budget-usd), or move to a higher tier and say so with --tier")


def missing_price(model: str) -> UsageError:
    return UsageError(
        f"no price for model {model!r}: batcher's catalog does not know it, and estimates and budgets need its rates. "
        f"Add them to a job spec (these four keys are needed for a new model; text_output_usd_per_mtok prices its "
        f"thinking and text, else they are billed at the image rate):\n"
        f"  [prices.\"{model}\"]\n  input_usd_per_mtok = ...\n  output_usd_per_mtok = ...\n"
        f"  batch_discount = 0.5\n  tokens_per_image = {{ \"1K\" = ... }}\n"
        f"then run `batcher estimate JOB.toml` (see `batcher models` for the models batcher knows)")


def estimate(manifest: str | Path, options: ManifestOptions = ManifestOptions(), *, cache_dir: str | Path | None = None,
             refresh: bool = False, skip_invalid: bool = False, table: PriceTable | None = None, tier: str | None = None) -> Estimate:
    """Count rows, requests, distinct requests and cache hits of a manifest, and price what is left to generate.
    `tier`: hold the batch estimate against that usage tier's monthly spend cap."""
    # Here, not at the top: every command loads this module (the budget prices requests with it), and only an
    # estimate reads a manifest (the readers load pyarrow.compute).
    from ..manifest import locate, read_manifest
    from ..planning.planner import MAX_PROBLEMS_SHOWN, duplicate_id
    from ..planning.prepare import References, image_requests

    table = table or current_table()
    manifest = locate(manifest)
    store = None if refresh else open_store(cache_dir)
    result = Estimate(manifest=str(manifest), tier=tier)
    problems: list[RowProblem] = []
    refs = References()
    seen: set[str] = set()
    first_row_of: dict[str, int] = {}  # id -> the row that used it first (as planning checks them, in the ledger)
    for item in read_manifest(manifest, options):
        if isinstance(item, RowProblem):
            problems.append(item)
            continue
        try:
            requests = image_requests(item, refs)
        except OSError as exc:
            problems.append(RowProblem(str(manifest), item.row, "reference_images", None, f"cannot read reference image: {exc}"))
            continue
        first = first_row_of.setdefault(item.id, item.row)
        if first != item.row:
            problems.append(duplicate_id(manifest, item.row, options.id_column, item.id, first))
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
            if price is None:
                raise missing_price(item.model)
            pt = prompt_tokens(chars, len(req.references), price.input_image_tokens)
            m.prompt_tokens += pt
            m.output_tokens += price.image_tokens(req.image_size)
            m.thoughts_tokens += price.expected_thoughts_tokens
            m.images_batch_usd += price.image_usd(req.image_size, batch=True)
            m.images_interactive_usd += price.image_usd(req.image_size, batch=False)
            m.input_batch_usd += price.input_usd(pt, batch=True)
            m.input_interactive_usd += price.input_usd(pt, batch=False)
            m.thinking_batch_usd += price.thinking_usd(batch=True)
            m.thinking_interactive_usd += price.thinking_usd(batch=False)
    if problems and not skip_invalid:
        shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
        more = len(problems) - len(shown)
        raise ManifestError(f"{manifest}: {len(problems)} invalid row(s). Fix them, or pass --skip-invalid to estimate the "
                            "valid rows." + (f" ({more} more not shown)" if more > 0 else ""), problems=shown)
    result.rejected = len(problems)
    if result.rows == 0:
        raise ManifestError(f"{manifest}: no valid rows to estimate")
    for model in result.models:
        if model_spec(model) is None:
            result.warnings.append(f"{model} is not in batcher's catalog: priced from [prices], and not checked against "
                                   "the API here (submit and run ask models.get before they send)")
        elif note := model_warning(model):
            result.warnings.append(note)
    return result


# ---- one request -------------------------------------------------------------------------------------------

def request_estimate_usd(model: str, body_json: str, table: PriceTable | None = None, batch: bool = True) -> float:
    """The estimated cost of one request of the ledger, from its GenerateContentRequest body: its image at its
    size, its prompt and the thinking allowance. The one estimator of a request's price (budget, interactive)."""
    price = (table or current_table()).get(model)
    if price is None:
        raise missing_price(model)
    chars, refs, size = body_prompt(body_json)
    return price.request_usd(size, prompt_tokens(chars, refs, price.input_image_tokens), batch)
