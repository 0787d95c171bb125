# The two commands of the README:  make demo  and  make test  (what CI runs: every test).
# Both create .venv, install torch==2.13.0 *first* (a looser requirement would pull multi-GB CUDA
# wheels on CPU machines), then the project with its test extras (which also builds data_shards/_native.c:
# an edit of it reinstalls).
# make test-fast skips the tests marked slow (torchrun, hivemind peers, spawned daemons, PostgreSQL,
# Prometheus, Chromium, the demo): every package's unit tests in a few minutes on a 2-core CPU.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml data_shards/_native.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/model_throughput.py

clean:
	rm -rf runs/demo
