# Everything a fresh machine needs (Python >= 3.11 and make) is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: `make run` installs the package and what running it needs; `make test` (lint, typecheck, unit, ...)
# adds the `test` extra (pytest, mypy, ruff, ...: most of a cold start's download and install time).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= config.example.yaml

# pip's output (and setuptools' banner on every editable install) goes to $(PIP_LOG), shown only if pip fails.
PIP_LOG := $(VENV)/pip.log
define pip_install
	@echo "pip install $(1)   (into $(VENV); log: $(PIP_LOG))"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check $(1) >$(PIP_LOG) 2>&1 \
	  || { cat $(PIP_LOG); echo "pip install $(1) failed (log: $(PIP_LOG))"; exit 1; }
endef

.PHONY: run test test-long lint typecheck unit clean systemd-tools faketime-tools mosquitto-tools adaptivecards-tools postgresql-tools bench

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "webhookd needs Python >= 3.11"'
	@test -x $(BIN)/python || { echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(call pip_install,--upgrade pip)
	$(call pip_install,-e .)
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP) pyproject.toml
	$(call pip_install,-e '.[test]')
	@touch $(TEST_STAMP)

run: $(STAMP)
	mkdir -p var
	$(BIN)/webhookd run -c $(CONFIG)

lint: $(TEST_STAMP)
	$(BIN)/ruff check webhookd tests bench
	$(BIN)/ruff format --check webhookd tests bench

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

# The suite runs on PYTEST_WORKERS pytest-xdist workers (every test has its own tmp dir and ports); worksteal
# rebalances the slow whole-daemon tests. PYTEST_WORKERS=0 runs it in one process, as `.venv/bin/pytest -q` does.
PYTEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist worksteal

# The suite starts the daemon and the CLI as processes hundreds of times; with PYTHONDONTWRITEBYTECODE set (as
# some environments do) each would compile webhookd from source again (~0.2 CPU-s a start). compileall writes
# the bytecode once; the interpreter reads it whatever that variable says.
COMPILE := $(BIN)/python -m compileall -q webhookd tests >/dev/null

unit: $(TEST_STAMP) systemd-tools faketime-tools mosquitto-tools adaptivecards-tools postgresql-tools
	@$(COMPILE)
	$(BIN)/pytest -q $(PYTEST_PARALLEL)

test: $(TEST_STAMP) systemd-tools faketime-tools mosquitto-tools adaptivecards-tools postgresql-tools
	$(BIN)/ruff check webhookd tests bench
	$(BIN)/mypy
	@$(COMPILE)
	$(BIN)/pytest -q $(PYTEST_PARALLEL)

# The long fault-injection runs (tests marked `long`: e.g. >= 20 SIGKILLs under load); figures on stdout. Serial
# on purpose: -s shows the figures (xdist workers would swallow them), and other tests' load would skew them.
test-long: $(TEST_STAMP) faketime-tools mosquitto-tools postgresql-tools
	$(BIN)/pytest -q -s -p no:xdist -m long tests/faults

# tests/test_systemd.py checks systemd/webhookd.service with systemd-analyze, and the unit's ExecReload needs
# /bin/kill: install Debian's packages when they are missing (root on Debian/Ubuntu). Elsewhere those tests skip.
systemd-tools:
	@if ! command -v systemd-analyze >/dev/null 2>&1 || ! test -x /bin/kill; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's systemd and procps packages (systemd-analyze, /bin/kill)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends systemd procps; } >/dev/null 2>&1 \
	      || echo "warning: could not install systemd; tests/test_systemd.py will skip its systemd-analyze checks"; \
	  else \
	    echo "note: systemd-analyze is missing (needs root and apt-get to install); test_systemd.py will skip"; \
	  fi; \
	fi

# tests/faults/test_clock.py jumps the daemon's wall clock with libfaketime (Debian's faketime package): install
# it when missing (root on Debian/Ubuntu). Elsewhere that test falls back to an injected wall clock.
faketime-tools:
	@if ! test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 && ! command -v faketime >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's faketime package (libfaketime)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        faketime; } >/dev/null 2>&1 \
	      || echo "warning: could not install faketime; tests/faults/test_clock.py uses its injected-clock fallback"; \
	  else \
	    echo "note: libfaketime is missing (needs root and apt-get); test_clock.py uses its injected-clock fallback"; \
	  fi; \
	fi

# The MQTT tests (tests/test_mqtt_broker.py, tests/faults) run a throwaway broker (Debian's mosquitto) on a free
# 127.0.0.1 port and publish with mosquitto_pub (mosquitto-clients): install them when missing (root on
# Debian/Ubuntu). The package's own service (port 1883) is not used by the tests; without systemd as PID 1 it does
# not even start. Elsewhere the tests that need a broker skip.
mosquitto-tools:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto || ! command -v mosquitto_pub >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's mosquitto and mosquitto-clients packages (the MQTT tests' broker and clients)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        mosquitto mosquitto-clients; } >/dev/null 2>&1 \
	      || echo "warning: could not install mosquitto; the MQTT tests that need a broker will skip"; \
	  else \
	    echo "note: mosquitto or mosquitto_pub is missing (needs root and apt-get to install); the MQTT broker tests will skip"; \
	  fi; \
	fi

# The PostgreSQL store's tests (tests/test_store_conformance.py, tests/test_store_postgres.py) run throwaway
# clusters (initdb + pg_ctl in a temp dir on a free 127.0.0.1 port, as the postgres system user when root): install
# Debian's postgresql package when initdb/pg_ctl are missing (root on Debian/Ubuntu; Debian puts them in
# /usr/lib/postgresql/<version>/bin, where the tests look). Its own cluster and service are not used by the tests.
# Elsewhere the PostgreSQL tests skip.
postgresql-tools:
	@if ! { command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; } \
	    && ! ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's postgresql package (initdb, pg_ctl: the PostgreSQL store tests' throwaway clusters)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        postgresql; } >/dev/null 2>&1 \
	      || echo "warning: could not install postgresql; the PostgreSQL store tests will skip"; \
	  else \
	    echo "note: initdb/pg_ctl are missing (needs root and apt-get to install); the PostgreSQL store tests will skip"; \
	  fi; \
	fi

# tests/test_messages.py checks the `teams` format's Adaptive Card with Microsoft's own parser (the npm package
# adaptivecards, pinned with its lock file in tests/adaptivecards/): installed there with npm (node >= 18), and
# Debian's nodejs and npm packages first when npm is missing (root on Debian/Ubuntu). Without them that test skips
# (and fails under CI=true).
AC_STAMP := tests/adaptivecards/node_modules/.installed
$(AC_STAMP): tests/adaptivecards/package.json tests/adaptivecards/package-lock.json
	@if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's nodejs and npm packages (the Adaptive Card check of tests/test_messages.py)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      nodejs npm; } >/dev/null 2>&1 || echo "warning: could not install npm; the Adaptive Card check will skip"; \
	fi
	@if command -v npm >/dev/null 2>&1; then \
	  echo "npm ci (tests/adaptivecards: Microsoft's Adaptive Cards parser)"; \
	  cd tests/adaptivecards && npm ci --no-audit --no-fund --silent && touch node_modules/.installed; \
	else \
	  echo "note: npm is missing; the Adaptive Card check of tests/test_messages.py will skip"; \
	fi

adaptivecards-tools:
	@$(MAKE) -s --no-print-directory $(AC_STAMP) || echo "warning: npm ci failed; the Adaptive Card check will skip"

# Benchmarks (issue 5), never part of `make test`: the real daemon vs bare baselines in the same run, with and
# without uvloop; ~35 min (rows 7-9 add ~12; rows 10-12, MQTT against a throwaway mosquitto, ~5). BENCH_ARGS="--rows 1,2 --repeats 5", "--profile" (py-spy), BENCH_QUICK=1 (smoke run).
# wrk (Debian package) drives the load; without it bench/loadgen.py (aiohttp) does, and the output says so.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(TEST_STAMP) pyproject.toml
	$(call pip_install,-e '.[test,speed,bench]')
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) mosquitto-tools postgresql-tools
	@if ! command -v wrk >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's wrk package"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } >/dev/null 2>&1 \
	      || echo "note: could not install wrk; the aiohttp load generator (bench/loadgen.py) drives the load"; \
	  else \
	    echo "note: wrk is missing; the aiohttp load generator (bench/loadgen.py) drives the load"; \
	  fi; \
	fi
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache tests/adaptivecards/node_modules
