# The few commands the README names. Everything installs itself into .venv/ on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# rapkern._C (the C++ kernels) is rebuilt, incrementally, whenever a source under csrc/ changes.
EXT_STAMP := $(VENV)/.ext-built
EXT_SRC   := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup build test test-fast bench memory info microbench lint

# torch must be importable when the C++ extension builds, hence --no-build-isolation (setup.py explains).
# The package installs first without rapkern._C (RAPKERN_SKIP_EXT=1), then $(EXT_STAMP) builds it once, in the
# tree, so later C++ edits rebuild incrementally; a failed C++ build does not fail either step: `make info`
# then says why the cpp backend is unavailable.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 setuptools wheel ninja
	RAPKERN_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $(STAMP)

$(EXT_STAMP): $(STAMP) $(EXT_SRC)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) setup.py -q build_ext --inplace
	touch $(EXT_STAMP)

setup: $(EXT_STAMP)

build: $(EXT_STAMP)

# The test command (CI runs exactly this, through .ci/run).
test: $(EXT_STAMP)
	$(PY) -m pytest -n 2 -q

test-fast: $(EXT_STAMP)
	$(PY) -m pytest -n 2 -q -m "not interpreter and not slow"

# The main job: the benchmark suite (quick on a CPU-only machine, full on a GPU).
bench: $(EXT_STAMP)
	$(PY) -m bench

memory: $(EXT_STAMP)
	$(PY) -m bench.memory

info: $(EXT_STAMP)
	$(PY) -m rapkern.info

microbench: $(EXT_STAMP)
	$(PY) -m pytest bench/micro -q --benchmark-only --benchmark-enable

lint: $(STAMP)
	$(PY) -m ruff check rapkern tests bench
