# The few commands the README names. Everything installs itself into .venv/ on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast bench memory info microbench lint

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

# The test command (CI runs exactly this, through .ci/run).
test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not interpreter and not slow"

# The main job: the benchmark suite (quick on a CPU-only machine, full on a GPU).
bench: $(STAMP)
	$(PY) -m bench

memory: $(STAMP)
	$(PY) -m bench.memory

info: $(STAMP)
	$(PY) -m rapkern.info

microbench: $(STAMP)
	$(PY) -m pytest bench/micro -q --benchmark-only --benchmark-enable

lint: $(STAMP)
	$(PY) -m ruff check rapkern tests bench
