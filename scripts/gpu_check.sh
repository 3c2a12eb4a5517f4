#!/usr/bin/env bash
# The command sequence for a GPU machine (issue 8). Its stages take longer than one 10-minute device call (measured
# on an H200 machine, 2026-12-04: install 45-48 s; timing past its former 240 s limit with both W's, 120 s with the
# real W only; sweep 48 s; correctness and tests bound by compiling; probe not yet run): run them in two calls, e.g.
# GPU_CHECK_STAGES="probe timing phases" GPU_CHECK_REAL_ONLY=1, then GPU_CHECK_QUICK=1 GPU_CHECK_STAGES="sweep
# correctness tests".
#   1. install the package from this checkout (no network there: torch, triton, pybind11, the test and the bench
#      extras must already be installed; --no-build-isolation uses them, --no-deps installs nothing else);
#   2. the stages named in GPU_CHECK_STAGES (default "probe timing phases sweep correctness tests"), in that order:
#      probe: the GPU check's probe of P-KL's per-row permutation (--stage probe, bench/permute.py): the data for
#        rebuilding P-KL's C and D;
#      timing: the GPU check's timing stage (xtoken_ext.bench.gpu --stage timing): the numbers that need the GPU
#        (GPU_CHECK_REAL_ONLY=1 adds --real-only: the real W only);
#      phases: the fused P-KL and H-KL kernels' time per phase (--stage phases, the real W; their timed variants
#        compile first, H-KL's about a minute): where the kernels' time goes;
#      sweep: its P-KL launch-configuration sweep (--stage sweep), the data for tuning;
#      correctness: its correctness and repeatability stages (GPU_CHECK_QUICK=1 adds --quick: bf16 only), the
#        cases in one process per core up to 16 (GPU_CHECK_JOBS=N sets --jobs N): that stage is bound by compiling;
#      tests: the CUDA tests of the Triton backends (ops at multi-tile sizes, public losses vs the float64
#      reference, the phase timer; GPU_CHECK_K sets pytest's -k, default "triton or cuda or phase") in the time left
#      of GPU_CHECK_BUDGET seconds
#      (default 440), in one process per core (up to 16) where pytest-xdist is installed or its wheels are in
#      .devkit/wheels (scripts/device_kit.sh).
# Each step has a time limit so that one slow step cannot eat the machine's budget; what it printed before the
# limit stays in the log. LOG_DIR (default: the working directory) receives <stage>.log for each stage. The H-KL
# kernel is slow to compile: its first call took 80.8 s (real W) and 110.9 s (random W; each W its own variant),
# both autotune configurations compiled at once, and the correctness stage's 16 processes finished 22 of its 60
# cases in 128 s (H200 machine, 2026-12-04). TRITON_PRINT_AUTOTUNING=1 prints the configurations autotuning picks.
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
if ls "$repo"/.devkit/wheels/*.whl > /dev/null 2>&1; then  # pytest-xdist from the kit (scripts/device_kit.sh)
    python3 -m pip install -q --no-index --no-deps "$repo"/.devkit/wheels/*.whl || true
fi
cores=$(nproc)  # the cores this process may use, up to 16
[ "$cores" -gt 16 ] && cores=16
xdist=()
if python3 -c "import xdist" 2> /dev/null; then xdist=(-n "$cores"); fi

export TRITON_PRINT_AUTOTUNING=1
check() {  # stage, limit s, extra options: the GPU check's stage, outside the checkout (`python -m` puts the
    # working directory first on sys.path, and the checkout's xtoken_ext/ has neither the built extension nor the
    # bench subpackage)
    step "GPU check, $1 (limit $2 s)"
    (cd "${TMPDIR:-/tmp}" && timeout "$2" python3 -m xtoken_ext.bench.gpu --stage "$1" "${@:3}") 2>&1 \
        | tee "$logs/$1.log" || status=1
}
for stage in ${GPU_CHECK_STAGES:-probe timing phases sweep correctness tests}; do
    case $stage in
        timing) check timing 330 ${GPU_CHECK_REAL_ONLY:+--real-only} ;;
        probe) check probe 120 ;;
        phases) check phases 240 ;;
        sweep) check sweep 120 ;;
        correctness) check correctness 150 ${GPU_CHECK_QUICK:+--quick} ${GPU_CHECK_JOBS:+--jobs "$GPU_CHECK_JOBS"} ;;
        tests)
            left=$((budget - (SECONDS - start)))
            step "CUDA tests (limit ${left} s)"
            # PYTHONSAFEPATH (-P, inherited by xdist's workers): the checkout is not put on sys.path; the tests
            # import the installed package.
            if [ "$left" -gt 20 ]; then
                PYTHONSAFEPATH=1 timeout "$left" python3 -m pytest -q -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} \
                    tests/test_triton_ops.py tests/test_losses.py tests/test_phase_times.py \
                    -k "${GPU_CHECK_K:-triton or cuda or phase}" \
                    --durations=8 2>&1 \
                    | tee "$logs/tests.log" || status=1
            else
                echo "skipped: no time left" && status=1
            fi ;;
        *) echo "unknown stage $stage (probe, timing, phases, sweep, correctness, tests)" && exit 2 ;;
    esac
done

step "done: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
