"""Money: the price table, estimates, the budget."""
