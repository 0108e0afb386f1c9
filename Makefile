# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs
# the project (torch 2.13.0 CPU first, so the range in pyproject.toml pulls nothing bigger).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install clean-venv

$(BIN)/diffedit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/diffedit

install: $(BIN)/diffedit

demo: $(BIN)/diffedit
	PATH="$(abspath $(BIN)):$$PATH" bash samples/demo.sh

test: $(BIN)/diffedit
	$(BIN)/python -m pytest -q

bench: $(BIN)/diffedit
	$(BIN)/diffedit bench overhead

clean-venv:
	rm -rf $(VENV)
