# The single entry point. `make test` works on a fresh machine: it builds the virtual environments first.
SHELL := /bin/bash
PY312 := /root/.pyenv/versions/3.12.1/bin/python3.12
PYTHON ?= $(shell if [ -x $(PY312) ]; then echo $(PY312); elif command -v python3.12 >/dev/null; then echo python3.12; else echo python3; fi)
VENV := .venv
SAM_VENV := .venv-sam
PIP_FLAGS := --quiet --disable-pip-version-check
export SAM_CLI_TELEMETRY := 0
export AWS_DEFAULT_REGION ?= us-east-1
export SAM_CLI := $(CURDIR)/$(SAM_VENV)/bin/sam

.PHONY: test lint build clean deps

deps: $(VENV)/.installed $(SAM_VENV)/.installed

$(VENV)/.installed: requirements-dev.txt src/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

$(SAM_VENV)/.installed: requirements-sam.txt
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install $(PIP_FLAGS) -r requirements-sam.txt
	touch $@

test: deps ## the whole suite: unit, integration (moto server + emulator), template checks
	$(VENV)/bin/python -m pytest

lint: deps
	$(VENV)/bin/ruff check src local tests
	$(VENV)/bin/ruff format --check src local tests
	$(VENV)/bin/mypy

build: $(SAM_VENV)/.installed
	PATH="$(dir $(PYTHON)):$$PATH" $(SAM_CLI) build --template template.yaml

clean:
	rm -rf $(VENV) $(SAM_VENV) .aws-sam test-artifacts
