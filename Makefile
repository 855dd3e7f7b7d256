# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

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

clean:
	rm -rf $(VENV) .batcher build *.egg-info

# Long campaigns, not part of `make test`.
.PHONY: reliability bench
reliability: $(STAMP)
	$(BIN)/python -m tests.crash_campaign

bench: $(STAMP)
	$(BIN)/python -m bench.run
