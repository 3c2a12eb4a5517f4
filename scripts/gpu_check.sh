#!/usr/bin/env bash
# The command sequence for a GPU machine (issue 8), about 8 minutes on an H200:
#   1. install the package from this checkout (no network there: torch, triton, pybind11, the test and the bench
#      extras must already be installed; --no-build-isolation uses them, --no-deps installs nothing else);
#   2. the CUDA tests of the Triton backends (ops at multi-tile sizes, public losses vs the float64 reference);
#   3. the one-command GPU check: correctness, repeatability and timing tables (xtoken_ext.bench.gpu).
# Each test/check step has a time limit so that one slow step cannot eat the machine's budget; what it printed
# before the limit stays in the log.
#
# Usage: bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log   (from anywhere)
# Exit status: 0 when the tests and the check pass, else 1 (a failed install stops at once).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS
step() { printf '\n=== %s (at %d s) ===\n' "$*" $((SECONDS - start)); }
status=0

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "install"
cd "$repo"
pip install -q --no-build-isolation --no-deps . || exit 1

step "CUDA tests (limit 200 s)"
# The pytest script does not put the checkout on sys.path: the tests import the installed package.
timeout 200 pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_losses.py -k "triton or cuda" \
    --durations=5 || status=1

step "GPU check (limit 300 s)"
# Outside the checkout: `python -m` puts the working directory first on sys.path, and the checkout's xtoken_ext/
# has neither the built extension nor the bench subpackage.
(cd "${TMPDIR:-/tmp}" && timeout 300 python -m xtoken_ext.bench.gpu) || status=1

step "done: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
