# `make demo` and `make test` set everything up themselves: they create .venv
# with pip (torch pinned by constraints.txt) the first time they run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench default-run clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/gspo train

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench

bench: $(BIN)/.installed
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/logprobs.py

# README's default-run numbers and docs/reward.png, regenerated (3 seeds, a few minutes)
default-run: $(BIN)/.installed
	$(BIN)/python scripts/default_run.py --write

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
