# All targets do the whole set-up on a fresh machine: a venv, the CPU torch wheel first
# (so pip never pulls a CUDA build), then leantrain and its test extras.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.leantrain-installed
export OMP_NUM_THREADS ?= 2
export MPLBACKEND := Agg

.PHONY: run test bench lint readme setup clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/leantrain reproduce --quick --out results/

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/leantrain bench all --json

readme: $(STAMP)
	$(BIN)/leantrain report --out results --readme README.md

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) results .pytest_cache
