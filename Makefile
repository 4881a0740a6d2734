# The two commands of the README: `make setup` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/embedded.yaml

.PHONY: setup install test test-fast bench java

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
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/etl.py
