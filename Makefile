# The two commands of the README:
#   make up     install everything, then start local Triton workers and the router
#   make test   install everything, then run the whole suite (compiled core, then the twin)
# The suite runs on both data paths: the compiled pass on the native one (the router's
# default where _h2 is built), the twin pass (no _h2) on grpc.aio.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test test-compiled test-twin test-debug fuzz bench-core clean

# The tested set: constraints.txt (.ci/install_check.py checks a plain install resolves it).
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard _core/*.pyx _core/*.pxi _core/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel Cython
	$(BIN)/python -m pip install -q --no-build-isolation -c constraints.txt -e '.[local,test]'
	touch $(STAMP)

install: $(STAMP)

# The machine's CPUs serve the port (processes: auto); ARGS="--processes 1" for one process.
up: install
	$(BIN)/tritonmesh up --processes auto $(ARGS)

test: test-compiled test-twin

test-compiled: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The twin pass also runs on the stdlib event loop (the compiled pass runs on uvloop), and on
# the grpc.aio data path (the twin has no _h2). It leaves out what no router runs in and so
# does not change with the core's build: the benchmark harness's end-to-end runs (marker
# "bench", about 4 minutes; every router path they drive is in the rest of the suite), the
# Triton workers' own tests (no router), and lint and types (the same files either way).
TWIN_SKIPS := --ignore=tests/test_workers.py \
	--deselect tests/test_sourcecode.py::test_ruff \
	--deselect tests/test_sourcecode.py::test_cython_lint \
	--deselect tests/test_sourcecode.py::test_mypy_strict
test-twin: install
	TRITONMESH_NO_EXTENSIONS=1 TRITONMESH_EVENT_LOOP=asyncio $(BIN)/python -m pytest \
		-m "not bench" $(TWIN_SKIPS) $(PYTEST_ARGS)

# The core with its invariant check compiled in after every mutation, then rebuilt for speed.
test-debug: install
	TRITONMESH_DEBUG=1 $(BIN)/python setup.py -q build_ext --inplace --force
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/test_core.py tests/test_shared_table.py \
		tests/test_shared_index.py tests/test_shared_weights.py
	$(BIN)/python setup.py -q build_ext --inplace --force

# The wire peek under Hypothesis and atheris, and atheris over the native HTTP/2 engine, against
# an AddressSanitizer build (in build/asan).
fuzz: install
	.ci/fuzz

bench-core: install
	$(BIN)/python bench/core_bench.py
	$(BIN)/python bench/wire_bench.py
	$(BIN)/python bench/shared_bench.py

clean:
	rm -rf build *.egg-info _core/*.c _core/*.so
