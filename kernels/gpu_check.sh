#!/usr/bin/env bash
# The GPU checks of the CUDA kernel, as one command (run from anywhere, on a machine with an NVIDIA
# GPU of compute capability 8.0+, the CUDA toolkit (nvcc) and a CUDA build of torch in .venv):
#
#     kernels/gpu_check.sh            # build, GPU tests, benchmark (~5 min on an H100/H200)
#     kernels/gpu_check.sh --no-bench # build and GPU tests only
#
# 1. builds the extension ahead of time (python -m dfw_kernels; cached under DFW_KERNELS_BUILD_DIR,
#    default build/dfw_kernels next to this repo's root),
# 2. runs the whole kernel test suite with the GPU tests (tests/kernels, -m gpu included): outputs,
#    final state and every gradient against the float64 reference, NaN-poisoned outputs,
# 3. prints the benchmark table (python -m dfw.bench kernel) at GPT-2-small shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export DFW_KERNELS_BUILD_DIR=${DFW_KERNELS_BUILD_DIR:-$PWD/build/dfw_kernels}
export HF_HUB_OFFLINE=1

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
"$PY" -m dfw_kernels
"$PY" -m pytest tests/kernels -q -rs -p no:cacheprovider
if [[ "${1:-}" != "--no-bench" ]]; then
    "$PY" -m dfw.bench kernel
fi
