# The two commands from the README: `make demo` and `make test`. Each creates .venv if missing
# and installs what it needs, so a fresh machine with python3 and pip is enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Constraints pin dev/CI to torch 2.13.0 (the CPU wheel on the build machines' disk) and the
# versions known to work together; PIP_CONSTRAINT also reaches pip's isolated build environments.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77.0.3"

# torch first, alone: deepspeed's sdist build imports it.
$(VENV)/.torch: | $(PY)
	$(PIP) install -q "torch==2.13.0"
	touch $@

$(VENV)/.installed-base: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -q -e ".[dev,s3,gcs,azure,deepspeed]"
	touch $@ $(VENV)/.installed-base

# Azurite, the Azure Blob emulator for tests/test_store_azure.py, is an npm package only.
AZURITE := azurite@3.37.0
$(VENV)/azurite/.installed: Makefile | $(PY)
	npm install --silent --no-audit --no-fund --prefix $(VENV)/azurite $(AZURITE)
	touch $@

demo: $(VENV)/.installed-base
	$(PY) examples/train_and_resume.py --root runs/demo

test: $(VENV)/.installed-dev $(VENV)/azurite/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
