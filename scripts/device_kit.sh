#!/usr/bin/env bash
# Prepares .devkit/ (git-ignored) on a machine with the bench extra installed, for a GPU machine that has no network
# and lacks the offline-tokenizer packages (its image has torch, triton, transformers, tokenizers, pybind11, pytest
# and hypothesis): the two tokenizers that the GPU check's real W is built from, converted, and that W, in
# $XTOKEN_CACHE's layout; and the pytest-xdist wheels. With .devkit carried beside the working tree, the GPU machine runs
#   XTOKEN_CACHE=$PWD/.devkit/cache bash scripts/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.log"
# (the W cache is keyed by the tokenizers' fingerprints and the library version; if the machine's tokenizers
# library serializes them differently, it rebuilds W from the converted tokenizers, about a minute on its CPUs).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export XTOKEN_CACHE="$repo/.devkit/cache"
mkdir -p "$XTOKEN_CACHE"
(cd "${TMPDIR:-/tmp}" && python - <<'PY'
from xtoken_ext.projection import Projection
from xtoken_ext.testing import offline_tokenizer

Projection.from_tokenizers(offline_tokenizer("llama3"), offline_tokenizer("qwen3"), 128_256, 151_936, progress=False)
PY
)
# pytest-xdist and execnet (pure-Python wheels), which that image lacks: gpu_check.sh installs them from here and runs
# the compile-bound CUDA tests in one process per core
pip download -q --no-deps -d "$repo/.devkit/wheels" pytest-xdist execnet \
    || echo "no pytest-xdist wheels (no package index?): the GPU machine runs its CUDA tests in one process"
du -sh "$repo/.devkit"
