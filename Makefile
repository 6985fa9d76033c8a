# The two commands: `make run` and `make test`. Both make .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck unit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var
	CHAT_TYPING_DELAY_MS=$${CHAT_TYPING_DELAY_MS:-25} $(BIN)/chat-gateway --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check server bridge agents tests scripts
	$(BIN)/ruff format --check server bridge agents tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
