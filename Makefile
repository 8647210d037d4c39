# edgeauth developer commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed

.PHONY: run test lint typecheck install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEPS): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q '.[test]'
	touch $(DEPS)

# A non-editable install, as operators get it: the twistd plugins must be found from site-packages.
install: $(DEPS)
	$(BIN)/pip install -q --no-deps --force-reinstall .

lint: $(DEPS)
	$(BIN)/ruff check edgeauth tests bench twisted

typecheck: $(DEPS)
	$(BIN)/mypy edgeauth

test: install lint typecheck
	$(BIN)/python -m pytest -q

TOKENS := var/operator.token var/edge.token var/reader.token

var/%.token:
	@mkdir -p var
	@$(BIN)/python -c 'import secrets; print(secrets.token_hex(24))' > $@

# The master with demo tokens (under var/) on 127.0.0.1:4000; Ctrl-C stops it.
run: install $(TOKENS)
	@echo "operator token: $$(cat var/operator.token)   (export TOKEN=$$(cat var/operator.token))"
	EDGEAUTH_OPERATOR_TOKEN=$$(cat var/operator.token) \
	EDGEAUTH_EDGE_TOKEN=$$(cat var/edge.token) \
	EDGEAUTH_READER_TOKEN=$$(cat var/reader.token) \
	$(BIN)/twistd --nodaemon --pidfile= edgeauth-master --config etc/edgeauth.ini

bench: install
	$(BIN)/python bench/master_append.py
	$(BIN)/python bench/master_fanout.py

clean:
	rm -rf $(VENV) build *.egg-info var
