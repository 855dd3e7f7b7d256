"""Planning: manifest rows -> requests (bodies and hashes) -> the ledger -> jobs of bounded size."""
