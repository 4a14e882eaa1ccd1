# Everything a fresh machine needs (Python >= 3.11 and make) is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.example.yaml

.PHONY: run test test-long lint typecheck unit clean systemd-tools

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "webhookd needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var
	$(BIN)/webhookd run -c $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check webhookd tests bench
	$(BIN)/ruff format --check webhookd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) systemd-tools
	$(BIN)/pytest -q

test: $(STAMP) systemd-tools
	$(BIN)/ruff check webhookd tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

# The long fault-injection runs (tests marked `long`: e.g. >= 20 SIGKILLs under load); figures on stdout.
test-long: $(STAMP)
	$(BIN)/pytest -q -s -m long tests/faults

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

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache
