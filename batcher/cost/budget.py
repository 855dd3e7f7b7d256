"""The budget (`--budget-usd`, `limits.budget_usd`) and what is still to be sent, in money.

The spend of a run is the realized cost of its finished requests + the estimated cost of requests in jobs + the
estimated cost of what is about to be sent; planned requests that would take it over the budget stay planned (held
back), and the command exits 4. Each request is priced by cost.estimate.request_estimate_usd, the one estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ledger import Ledger, sending
from ..ledger.reading import run_spend_usd
from .estimate import request_estimate_usd
from .money import usd
from .pricing import PriceTable, current_table


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


def check_budget(ledger: Ledger, budget_usd: float, table: PriceTable | None = None) -> BudgetCheck:
    """How many planned requests can be sent, in the order `planner.shard` takes them, within the budget."""
    table = table or current_table()
    check = BudgetCheck(budget_usd=budget_usd, spent_usd=run_spend_usd(ledger, ledger.current_run()))
    for model, body_json in sending.queued_bodies(ledger):
        check.queued_usd += request_estimate_usd(model, body_json, table)
    left = budget_usd - check.spent_usd - check.queued_usd
    # The requests in the order the shard takes them (one query path): its limit_requests takes the first N.
    for model in sending.planned_models(ledger):
        for page in sending.planned_pages(ledger, model, bodies=True):
            for *_, body_json in page:
                cost = request_estimate_usd(model, body_json, table)
                if not check.held and check.allowed_usd + cost <= left + 1e-9:
                    check.allowed += 1
                    check.allowed_usd += cost
                else:
                    check.held += 1
                    check.held_usd += cost
    return check


def unsent_batch_usd(ledger: Ledger, table: PriceTable | None = None, over: float | None = None) -> tuple[float, bool]:
    """The batch estimate of the requests still to be sent (planned, or in jobs not yet created): image at its size,
    thinking allowance (prompts left out: a fraction of a cent); and whether it is a lower bound. With `over`, the
    bodies are read only when counts alone cannot tell whether the estimate is over it (then a bound is returned)."""
    table = table or current_table()
    counts = sending.unsent_by_model(ledger)
    prices = {m: table.get(m) for m in counts}
    if any(p is None for p in prices.values()):
        return 0.0, False  # a model without a price: nothing to hold against a cap (the budget refuses it)
    low = sum(n * (min(p.image_usd(s) for s in p.tokens_per_image) + p.thinking_usd()) for m, n in counts.items() if (p := prices[m]))
    high = sum(n * (max(p.image_usd(s) for s in p.tokens_per_image) + p.thinking_usd()) for m, n in counts.items() if (p := prices[m]))
    if over is not None and (low > over or high <= over):
        return (low, True) if low > over else (high, False)
    total = 0.0
    for model, price in prices.items():
        for size, n in sending.unsent_by_size(ledger, model, price.tokens_per_image).items():
            total += n * (price.image_usd(size) + price.thinking_usd())
    return total, False
