# Each target creates .venv when missing; the constraints keep torch on the tested
# 2.13.0 (CPU build here, CUDA build on a GPU machine) instead of the newest CUDA wheels.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS := -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test install

$(BIN)/agpctl: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e ".[test]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import agpctl, agp_models, agp_data, tuning"
	touch $(BIN)/agpctl

install: $(BIN)/agpctl

demo: install
	$(BIN)/agpctl train --config examples/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q -x --durations=15
