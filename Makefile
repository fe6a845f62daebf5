# Two entry points: `make demo` (set up, then run the embedded sDPO demo) and `make test`
# (set up, then run the test suite). Set-up is a local virtual environment in .venv.
#
# torch: if the environment has no torch yet, TORCH_SPEC is installed first. The default is the
# CPU build this project is developed against; on a GPU machine use your CUDA build, e.g.
#   make demo TORCH_SPEC="torch --index-url <your CUDA wheel index>"
# or install torch into .venv yourself before the first `make`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# test processes (pytest-xdist; each test file runs whole in one of them, so a module's shared
# set-up is built once); 0 runs the suite in this process
TEST_WORKERS ?= 2

.PHONY: setup demo test lint format gpu-wheels gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/sdpo demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(TEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The packages the GPU check compares against (TRL, Liger-Kernel) and what they need beyond a
# CUDA machine with torch, transformers, accelerate, pandas and pyarrow (datasets, dill,
# multiprocess), as wheels for that machine's Python (GPU_PYTHON, x86-64 Linux) in .whl/, one
# version each; benchmarks/gpu_check.sh installs them offline from there.
GPU_WHEELS ?= trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
GPU_PYTHON ?= 3.12
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
