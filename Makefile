# Two set-up commands for a newcomer: `make run` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
# Where `segstream fetch` may copy files from instead of downloading (e.g. ../shared).
export SEGSTREAM_FETCH_FROM ?=

.PHONY: setup setup-test setup-gst run test test-fast typecheck lint docs bench mutation clean

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# The service with the low-delay RTSP reader (GStreamer + PyGObject, built against the
# system's GStreamer): `reader: auto`, the default, uses it for RTSP cameras.
$(VENV)/.installed: pyproject.toml scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh runtime
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[gst]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	bash scripts/install_system_deps.sh test
	$(BIN)/pip install -q -e '.[test,gst]'
	touch $@

# Kept for older instructions: `make setup` installs the gst reader now.
setup-gst: setup


run: setup
	$(BIN)/segstream fetch
	$(BIN)/segstream serve --config $(CONFIG)

# Everything: lint, types, the docs site (a broken link or a missing page fails; not with
# --quiet, which hides the warnings strict mode counts), the fast
# unit tests and the end-to-end tests with the real peers.
test: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site-check
	$(BIN)/pytest -ra

# The docs site (MkDocs, Material theme) into site/; the API reference is generated from the
# service's own OpenAPI document. `.venv/bin/mkdocs serve` previews it while editing.
docs: setup-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# For development: lint, types and the unit tests only (tests/unit: no model, no peers,
# under a minute).
test-fast: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -ra tests/unit

typecheck: setup-test
	$(BIN)/mypy

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup-test
	$(BIN)/python scripts/benchmark.py

# Each security rule (roles, signed URLs, sessions, throttles, upload limits, credential
# scrubbing) deleted or inverted in a scratch copy: some test must fail (a few minutes).
mutation: setup-test
	$(BIN)/python scripts/mutation_check.py

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
