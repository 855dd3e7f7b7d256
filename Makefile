# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m batcher.demo

test: $(STAMP)
	$(BIN)/python -m pyflakes batcher tests bench
	$(BIN)/python -m pytest -q

# The quick loop while working: every test not marked slow (make test still runs everything).
test-fast: $(STAMP)
	$(BIN)/python -m pyflakes batcher tests bench
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .batcher build *.egg-info

# Long campaigns, not part of `make test`.
.PHONY: reliability bench bench-ledger bench-scale test-oldest-sdk
reliability: $(STAMP)
	$(BIN)/python -m tests.crash_campaign

bench: $(STAMP)
	$(BIN)/python -m bench.run

# 100 nights of 1M rows, with and without `batcher prune --keep-runs 7` (slow: hours; see docs/benchmarks.md).
bench-ledger: $(STAMP)
	$(BIN)/python -m bench.ledger_growth --nights 100 --rows 1000000

# Planning at 1M, 3M and 10M rows (~20-30 min, ~10M cache entries as hard links): how its cost grows.
bench-scale: $(STAMP)
	$(BIN)/python -m bench.run --only plan-growth

# The suite against the oldest google-genai that pyproject.toml allows, in a venv of its own (not part of `make test`).
OLDEST_VENV := .venv-oldest-sdk
OLDEST_GENAI = $(shell $(PYTHON) -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(next(re.search(r'>=([0-9.]+)', d).group(1) for d in deps if d.startswith('google-genai')))")
test-oldest-sdk:
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/pip install --quiet -e '.[test]' 'google-genai==$(OLDEST_GENAI)'
	$(OLDEST_VENV)/bin/python -c "import google.genai as g; print('google-genai', g.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q
