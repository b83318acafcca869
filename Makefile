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

# The report's browser test opens the HTML in a headless Chromium: as root (CI on Debian)
# install it when missing; otherwise only say how (the test is skipped without it).
test: install
	@if [ "$$(id -u)" = 0 ]; then \
	  command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; the report's browser test will be skipped"; \
	else \
	  command -v chromium >/dev/null || echo "hint: sudo apt-get install chromium (for the report's browser test)"; \
	fi
	$(BIN)/python -m pytest -q -x --durations=15
