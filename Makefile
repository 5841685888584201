# Two commands from a fresh clone:  `make run`  and  `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	&& echo $$p && break; done)

.PHONY: run test bench lint typecheck check-config clean redis-server bench-tools prometheus \
	browser node-clients

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

## Install into .venv and run the gateway on its embedded default, with local SAMPLE upstreams.
run: $(VENV)/.installed
	$(VENV)/bin/gateway serve --demo

## Install with the dev extras, lint, and run the whole test suite (real redis-server, real
## uvicorn, the benchmark's wrk, nginx and valgrind for its tests, Prometheus and promtool
## for the dashboard's and the alert rules' tests, Chromium for the console's, and the Node
## clients' packages, openai-node and the Vercel AI SDK, for tests/test_node_clients.py).
test: $(VENV)/.installed redis-server bench-tools prometheus browser node-clients lint
	$(PY) -m pytest

## The benchmark (wrk + nginx as the fast fake upstream); see bench/README.md.
bench: $(VENV)/.installed redis-server bench-tools
	$(PY) bench/run.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

check-config: $(VENV)/.installed
	$(VENV)/bin/gateway check-config

redis-server:
	@command -v redis-server >/dev/null || $(call apt,redis-server)

# nginx lives in /usr/sbin, which is not on every user's PATH
# valgrind: bench/instructions.py counts a request's instructions under callgrind
bench-tools:
	@command -v wrk >/dev/null && PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null && \
		command -v callgrind_control >/dev/null || $(call apt,wrk nginx-light valgrind)

# without its recommends (node-exporter, smartmontools and more): the tests start their own
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		$(call apt,--no-install-recommends prometheus)

# Debian's headless Chromium, which Playwright drives (it never downloads a browser of its own)
browser:
	@command -v chromium >/dev/null || $(call apt,chromium)

# the Node clients' packages as locked; installed again when package-lock.json changes
NODE_CLIENTS := tests/node/node_modules/.installed
$(NODE_CLIENTS): tests/node/package-lock.json
	@command -v npm >/dev/null || $(call apt,nodejs npm)
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

node-clients: $(NODE_CLIENTS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache artifacts tests/node/node_modules

define apt
	{ SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(1) >/dev/null; }
endef
