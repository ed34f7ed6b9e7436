# tickpipe: `make run` starts everything, `make test` runs the whole suite. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND := noninteractive

WEB_STAMP := web/node_modules/.installed-stamp

.PHONY: setup system-deps run test lint format bench bench-history bench-recorder bench-chaos clean

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

# tickpipe's own Redis on 127.0.0.1:6380 (data/redis), or the one TICKPIPE_REDIS_URL names;
# never another server that happens to answer (see server/ops/own_redis.py).
run: setup
	@mkdir -p data
	$(BIN)/honcho start -f Procfile

# Six workers on two cores: most of a test's time is spent waiting on its own Redis, web and
# feed processes (four workers left a third of the machine idle). A module's tests stay on one
# worker (--dist loadfile: its fixtures start once); the longest modules go first
# (LONGEST_FIRST in tests/conftest.py, an order --no-loadscope-reorder keeps). The schemathesis
# fuzz (FUZZ: its items share one node id, so pytest-xdist cannot run them) runs beside that pass
# in a pytest process of its own, its output printed after the pass's; it alone needs the
# schemathesis and hypothesis plugins, which the other passes leave out (each pytest process,
# each worker too, took 4 s more to start with them). Tests marked `alone` (a thousand sockets
# at once) run last, one at a time, from the files that mark any. Every pass always runs and any
# failing fails the target; the 15 slowest tests of the parallel pass are listed.
FUZZ = tests/test_rest_fuzz.py
ALONE_FILES = $(filter-out $(FUZZ),$(shell grep -l 'mark\.alone' tests/test_*.py))
NO_FUZZ_PLUGINS = -p no:schemathesis -p no:hypothesispytest
test: lint
	@rc=0; log=$$(mktemp); \
	  $(BIN)/pytest -m alone $(FUZZ) </dev/null >$$log 2>&1 & fuzz=$$!; \
	  $(BIN)/pytest -n 6 --dist loadfile --no-loadscope-reorder -m 'not alone' --durations=15 \
	    $(NO_FUZZ_PLUGINS) --ignore=$(FUZZ) || rc=$$?; \
	  wait $$fuzz || rc=$$((rc ? rc : $$?)); cat $$log; rm -f $$log; \
	  $(BIN)/pytest -m alone $(NO_FUZZ_PLUGINS) $(ALONE_FILES) || rc=$$((rc ? rc : $$?)); exit $$rc

# ruff, the import contracts in pyproject.toml (layers, no cycles, the client stands alone) and
# mypy (strict) on server/ and tickpipe/.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

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
	$(BENCH_VENV)/bin/python -m pip install -q arcticdb duckdb pyarrow
	@touch $@

# e.g. make bench-history ARGS=--quick
bench-history: setup $(BENCH_VENV)/.installed-stamp
	$(BIN)/python bench/history.py $(ARGS)

bench-recorder: setup
	$(BIN)/python bench/recorder.py $(ARGS)

# Faults (recorder, Redis, web kills, full disk, slow consumer, hostile frames, REST fuzz) and a
# 30-minute soak; about 45 minutes (ARGS=--quick: a few; ARGS="--soak-minutes 0" skips the soak).
# Run as root so the data directory can be a tmpfs the disk-full fault fills.
bench-chaos: setup
	$(BIN)/python bench/chaos.py $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .ruff_cache
