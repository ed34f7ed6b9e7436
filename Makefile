# tickpipe: `make run` starts everything, `make test` runs the whole suite. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND := noninteractive

WEB_STAMP := web/node_modules/.installed-stamp

.PHONY: setup system-deps run test lint format bench bench-history bench-recorder clean

setup: system-deps $(STAMP) $(WEB_STAMP)

# Debian packages the project needs at run and test time (chromium: the dashboard's browser
# tests drive it with Playwright; `playwright install` is never used).
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium (Debian package)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@command -v npm >/dev/null || { \
	  echo "installing npm (Debian package)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq npm >/dev/null; }

# The dashboard's chart library (lightweight-charts), from npm into web/node_modules (not committed).
$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	@touch $(WEB_STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: setup
	@mkdir -p data
	$(BIN)/honcho start -f Procfile

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: setup
	$(BIN)/python bench/fanout.py $(ARGS)

# ArcticDB (with pandas and numpy) is for the history benchmark only: it lives in its own venv
# so the project's venv, and `make test`, never have it.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed-stamp:
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q arcticdb duckdb
	@touch $@

# e.g. make bench-history ARGS=--quick
bench-history: setup $(BENCH_VENV)/.installed-stamp
	$(BIN)/python bench/history.py $(ARGS)

bench-recorder: setup
	$(BIN)/python bench/recorder.py $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .ruff_cache
