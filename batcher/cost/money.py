"""Money as batcher writes it, everywhere (summaries, estimates, status, the report): one formatter."""

from __future__ import annotations


def usd(x: float) -> str:
    """Dollars: to the cent from $1 up ($1,344.00), else to a hundredth of a cent unless that is the same ($0.12,
    $0.0336)."""
    return f"${x:,.2f}" if abs(x) >= 0.995 or abs(x - round(x, 2)) < 1e-9 else f"${x:,.4f}"
