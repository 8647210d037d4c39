# edgeauth developer commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed

.PHONY: run demo test lint typecheck install bench clean

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

# A master, three edges and a demo origin on 127.0.0.1 (tokens, ini, databases and logs under
# var/); prints a "try this" block; Ctrl-C stops everything. ARGS="--ports auto" picks free ports.
run: install
	$(BIN)/python -m edgeauth.demo run $(ARGS)

# The same processes on fresh databases, then a scripted tour (ban, 403 on every edge with the
# measured propagation time, invalidation, MISS/HIT); exits 0 when every step did what it shows.
demo: install
	$(BIN)/python -m edgeauth.demo tour $(ARGS)

bench: install
	$(BIN)/python bench/master_append.py
	$(BIN)/python bench/master_fanout.py

clean:
	rm -rf $(VENV) build *.egg-info var
