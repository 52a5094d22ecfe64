# The README's commands. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Offline-safe defaults for tests: no hub retries, W&B writes to disk.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

.PHONY: install demo test lint gpu-check clean

install: $(VENV)/.installed

# torch is installed on its own first, and only when the venv has none: `torch==2.13.0` resolves to
# the local CPU wheel on a CPU machine (never a multi-GB CUDA build); pyproject.toml asks only
# torch>=2.4, so an environment that already has a newer torch keeps it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(PY) -m dfw.demo

# The whole suite, slow tests included, on two workers; tests sharing an expensive fixture share a worker.
test: install
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadgroup

# On a machine with an NVIDIA GPU: build the kernel, run the GPU tests, print the kernel benchmark.
gpu-check: install
	PY=$(PY) kernels/gpu_check.sh

lint: install
	$(VENV)/bin/ruff check dfw kernels tests

clean:
	rm -rf $(VENV) .pytest_cache outputs/*/ multirun
