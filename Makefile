# The two commands a new user runs: `make demo` and `make test`. Each installs what it needs
# into .venv first (Python >= 3.11 must be on PATH as python3, or set PYTHON=...).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/ruff check common broker peer launcher sim tests bench examples
	$(BIN)/ruff format --check common broker peer launcher sim tests bench examples
	$(BIN)/mypy common broker peer launcher sim

bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.transfer
	$(BIN)/python -m bench.swarm
	$(BIN)/python -m bench.broker
	$(BIN)/python -m bench.scan

clean:
	rm -rf $(VENV) demo-run bench/results .pytest_cache
