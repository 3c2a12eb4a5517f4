#!/usr/bin/env bash
# The command sequence for a GPU machine (issue 8), at most ~7.5 minutes:
#   1. install the package from this checkout (no network there: torch, triton, pybind11, the test and the bench
#      extras must already be installed; --no-build-isolation uses them, --no-deps installs nothing else);
#   2. the GPU check's timing stage (xtoken_ext.bench.gpu --stage timing), first: the numbers that need the GPU;
#   3. its correctness and repeatability stages (--stage correctness; GPU_CHECK_QUICK=1 adds --quick: bf16 only);
#   4. the CUDA tests of the Triton backends (ops at multi-tile sizes, public losses vs the float64 reference) in
#      the time left of GPU_CHECK_BUDGET seconds (default 440).
# Each step has a time limit so that one slow step cannot eat the machine's budget; what it printed before the
# limit stays in the log. LOG_DIR (default: the working directory) receives timing.log, correctness.log, tests.log.
#
# Usage: XTOKEN_CACHE=$PWD/.devkit/cache bash scripts/gpu_check.sh   (scripts/device_kit.sh prepares .devkit)
# Exit status: 0 when the tests and the check pass, else 1 (a failed install stops at once).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
logs=$(mkdir -p "${LOG_DIR:-.}" && cd "${LOG_DIR:-.}" && pwd)
budget=${GPU_CHECK_BUDGET:-440}
export PYTHONUNBUFFERED=1
start=$SECONDS
step() { printf '\n=== %s (at %d s) ===\n' "$*" $((SECONDS - start)); }
status=0

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"

step "install"
cd "$repo"
python3 -m pip install -q --no-build-isolation --no-deps . || exit 1

# Outside the checkout: `python -m` puts the working directory first on sys.path, and the checkout's xtoken_ext/
# has neither the built extension nor the bench subpackage.
step "GPU check, timing (limit 240 s)"
(cd "${TMPDIR:-/tmp}" && timeout 240 python3 -m xtoken_ext.bench.gpu --stage timing) 2>&1 | tee "$logs/timing.log" \
    || status=1

step "GPU check, correctness (limit 150 s)"
(cd "${TMPDIR:-/tmp}" && timeout 150 python3 -m xtoken_ext.bench.gpu --stage correctness \
    ${GPU_CHECK_QUICK:+--quick}) 2>&1 | tee "$logs/correctness.log" || status=1

left=$((budget - (SECONDS - start)))
step "CUDA tests (limit ${left} s)"
# -P: the checkout is not put on sys.path; the tests import the installed package.
if [ "$left" -gt 20 ]; then
    timeout "$left" python3 -P -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_losses.py \
        -k "triton or cuda" --durations=8 2>&1 | tee "$logs/tests.log" || status=1
else
    echo "skipped: no time left" && status=1
fi

step "done: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
