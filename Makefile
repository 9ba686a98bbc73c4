# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memory3-setup

.PHONY: setup demo test test-fast lint clean

$(STAMP): pyproject.toml requirements-cpu.txt requirements-bundled.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements-bundled.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/memory3 demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest

test-fast: setup  # the tests not marked slow: under a minute on 2 cores, for while you work
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV)
