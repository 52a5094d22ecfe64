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

.PHONY: install demo test lint gpu-check gpu-check-dry-run wheelhouse clean

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

# On a machine with an NVIDIA GPU (docs/gpu-check.md): the GPU check as two commands of under 540 s each,
# `make gpu-check PART=1 OUT=...` (build, AOT report, kernel tests, kernel benchmark) and `PART=2`
# (decode and training benchmarks, the demo), or stages by name (`STAGES="build train"`). OUT receives
# summary.json, results.md and details.tar.gz, rewritten after every stage. Interpreter: PY=... if
# given, else python3 (or .venv) where its torch has CUDA; what it lacks comes from WHEELHOUSE, offline.
PART ?= all
gpu-check:
	$(if $(filter command line,$(origin PY)),PY=$(PY)) PART=$(PART) $(if $(STAGES),STAGES="$(STAGES)") \
		WHEELHOUSE=$(WHEELHOUSE) kernels/gpu_check.sh $(OUT)

# The same on this machine, without a GPU: every stage's CPU stand-in (what CI runs, tests/kernels/test_gpu_check.py).
gpu-check-dry-run: install
	DRY_RUN=1 PY=$(PY) PART=$(PART) $(if $(STAGES),STAGES="$(STAGES)") WHEELHOUSE=$(WHEELHOUSE) \
		kernels/gpu_check.sh $(OUT)

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
