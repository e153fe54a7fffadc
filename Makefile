# hoop_addon: `make run` starts the gateway, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
HOME_DIR ?= .hoop
HOST    ?= 127.0.0.1
PORT    ?= 8080
ARGS    ?=
# Gateway workers on the same ports (`hoop serve --workers N`; N > 1: approvals in .hoop/state.db)
WORKERS ?= 1
# Base-URL listeners (`hoop serve --reverse UPSTREAM@PORT`): an SDK's base URL points at
# the port, and every request there goes through the chain to that upstream.
REVERSE ?= http://127.0.0.1:9000@8090 https://api.openai.com@8091 https://api.anthropic.com@8092

# A Python >= 3.12 (mitmproxy 12 needs it): $PYTHON if given, else the first fit on
# PATH, else a pyenv-installed one.
ifndef PYTHON
PYTHON := $(shell for c in python3.14 python3.13 python3.12 python3 \
	$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.1[2-9]*/bin/python3; do \
	p=$$(command -v $$c 2>/dev/null) && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { echo $$p; break; }; done)
endif

.PHONY: help venv init run test demo bench bench-engine bench-masking soak policy-check clean

help:
	@echo "make run    start the gateway on $(HOST):$(PORT) (policy: rules/); ARGS='--set ...' adds mitmproxy options (hoop serve --help); WORKERS=2 runs two workers on the same ports"
	@echo "make test   install and run the whole test suite"
	@echo "make demo   local upstream + gateway + an openai-SDK agent, end to end"
	@echo "make bench  the gateway against bare mitmdump and direct calls, then 1 and 2 workers (ratios; QUICK=1 for a smoke run)"
	@echo "make bench-engine   the masking engine alone: MB/s on 8 KB, 64 KB, 1 MB bodies"
	@echo "make bench-masking  planted-data corpus: recall and false positives per detector, format and body shape"
	@echo "make soak   200 agents for 60 s with upstream and JWKS restarts; then verify (HOOP_SOAK_SECONDS=...)"
	@echo "make policy-check   validate rules/ and run its policy tests (policy-tests/)"

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python >= 3.12 found; install one (e.g. pyenv install 3.12) or pass PYTHON=/path/to/python3.12" >&2; exit 2; fi
	@echo "using $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

init: venv
	@$(PY) -m hoop_addon init --home $(HOME_DIR)

run: init
	@echo
	@echo "hoop gateway: forward proxy on http://$(HOST):$(PORT); base URLs (upstream@port): $(REVERSE)"
	@echo "Point an agent at it (README: Point an agent at the gateway):"
	@echo "  export HTTPS_PROXY=http://agent:\$$($(PY) -m hoop_addon dev-token --subject my-agent --groups agents)@$(HOST):$(PORT)"
	@echo "  export SSL_CERT_FILE=$(CURDIR)/$(HOME_DIR)/mitmproxy/mitmproxy-ca-cert.pem"
	@echo "or, with a base URL: OPENAI_BASE_URL=http://$(HOST):8091/v1 OPENAI_API_KEY=<token>"
	@echo "Recordings and the audit log go to recordings/; check them with"
	@echo "  $(PY) -m hoop_addon verify recordings --public-key $(HOME_DIR)/signing.pub"
	@[ -n "$$OPENAI_API_KEY" ] || echo "note: OPENAI_API_KEY is not set: requests to api.openai.com will carry a placeholder key"
	@[ -n "$$ANTHROPIC_API_KEY" ] || echo "note: ANTHROPIC_API_KEY is not set: requests to api.anthropic.com will carry a placeholder key"
	@echo
	OPENAI_API_KEY=$${OPENAI_API_KEY:-unset-set-OPENAI_API_KEY} \
	ANTHROPIC_API_KEY=$${ANTHROPIC_API_KEY:-unset-set-ANTHROPIC_API_KEY} \
	HOOP_LOCAL_LLM_KEY=$${HOOP_LOCAL_LLM_KEY:-local-llm-key} \
	$(VENV)/bin/hoop serve --rules rules --home $(HOME_DIR) \
		--listen-host $(HOST) --listen-port $(PORT) $(foreach r,$(REVERSE),--reverse $(r)) --workers $(WORKERS) $(ARGS)

# Node agents (the `openai` npm package) for the end-to-end tests, when Node is here.
tests/node/node_modules/.package-lock.json: tests/node/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/node --no-audit --no-fund --silent; fi

test: venv tests/node/node_modules/.package-lock.json
	$(PY) -m pytest

demo: init
	$(PY) -m hoop_addon.dev.demo --home $(HOME_DIR)

soak: venv
	$(PY) -m pytest -m soak tests/soak -s --timeout 600

bench: venv
	$(PY) bench/chain.py $(if $(QUICK),--quick)
	$(PY) bench/streams.py $(if $(QUICK),--streams 100 --rounds 1)
	$(PY) bench/workers.py $(if $(QUICK),--quick)

bench-engine: venv
	$(PY) bench/engine.py

bench-masking: venv
	$(PY) bench/corpus.py

policy-check: venv
	$(PY) -m hoop_addon policy check rules
	$(PY) -m hoop_addon policy test policy-tests --rules rules

clean:
	rm -rf $(VENV) $(HOME_DIR) recordings/*.mitm recordings/*.jsonl .pytest_cache
