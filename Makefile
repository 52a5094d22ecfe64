# The README's commands. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Offline-safe defaults for tests: no hub retries, W&B writes to disk.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# The GPU check: where its tables and numbers go, and the wheelhouse it installs from offline.
OUT        ?= outputs/gpu-check/$(shell date +%Y-%m-%d_%H-%M-%S)
WHEELHOUSE ?= wheelhouse
PYTHON_VERSION ?= 3.12

.PHONY: install demo test lint gpu-check wheelhouse clean

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

# On a machine with an NVIDIA GPU (see the README, "GPU machine without internet"): builds the kernel,
# runs the kernel tests, every benchmark and the demo, writes tables and summary.json to OUT. It uses
# an interpreter that already has a CUDA build of torch and never installs torch: PY=... if given
# (`make gpu-check PY=python3`), else .venv if its torch has CUDA, else .venv-gpu made with
# --system-site-packages over python3. Missing dependencies come from WHEELHOUSE, offline.
gpu-check:
	$(if $(filter command line,$(origin PY)),PY=$(PY)) WHEELHOUSE=$(WHEELHOUSE) kernels/gpu_check.sh $(OUT)

# On a connected machine: the wheels gpu-check installs offline, for the GPU machine's Python
# (PYTHON_VERSION, default 3.12), and the embedded corpus, into WHEELHOUSE (ignored by git).
wheelhouse:
	PYTHON=$(PYTHON) PYTHON_VERSION=$(PYTHON_VERSION) WHEELHOUSE=$(WHEELHOUSE) kernels/wheelhouse.sh

# Lint, format and types: what CI and pre-commit run. `ruff format --check` passes once the whole tree
# has been formatted (the maintainers' one formatting pass); mypy checks the paths of [tool.mypy].
lint: install
	$(PY) -m ruff check dfw kernels tests
	$(PY) -m mypy
	$(PY) -m ruff format --check dfw kernels tests

clean:
	rm -rf $(VENV) .pytest_cache outputs/*/ multirun
