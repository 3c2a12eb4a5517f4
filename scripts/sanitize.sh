#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the native extension (issue 12; a documented script, not CI).
#
# Builds xtoken_ext._C from csrc/ with -fsanitize=address,undefined (UB is fatal: -fno-sanitize-recover) into a
# temporary copy of the package and its tests, then runs the aligner tests and the short fuzz (ci Hypothesis
# profile) there, so the in-tree build is never touched.
#
# Python itself is not built with ASan, so the ASan runtime must be loaded first: LD_PRELOAD=libasan. It must
# also preload libstdc++: otherwise the ASan interceptor of __cxa_throw resolves before libstdc++ is loaded and
# every C++ throw (each "clear error" of the bindings) aborts. Leak checking is off (CPython's allocations at
# exit are not leaks of ours).
#
# Usage: scripts/sanitize.sh [pytest args]   (default: the aligner tests and the fuzz)
#   run from anywhere; needs g++ with libasan/libubsan and the dev virtualenv (or any Python with the test deps,
#   pybind11 included). Exit status: pytest's; a sanitizer report aborts the run with its stack trace.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d /tmp/xtoken-sanitize.XXXXXX)
trap 'rm -rf "$work"' EXIT

cp -r "$repo/xtoken_ext" "$repo/tests" "$work/"
rm -f "$work"/xtoken_ext/_C*.so
suffix=$("$python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
includes=$("$python" -c "import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()['include'])")
flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -shared -fPIC -pthread -I"$repo/csrc")
for inc in $includes; do flags+=(-I"$inc"); done
echo "building the sanitized extension in $work ..."
g++ "${flags[@]}" "$repo"/csrc/*.cpp -o "$work/xtoken_ext/_C$suffix"

export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_init_order=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export XTOKEN_SANITIZED=1  # tests that cannot run under ASan (address-space limits) skip with this reason
cd "$work"  # `python -m pytest` puts the cwd first on sys.path: the sanitized copy wins over the editable install
if [ $# -eq 0 ]; then
  set -- tests/test_align.py tests/test_align_hardening.py tests/test_align_real.py tests/test_align_fuzz.py
fi
"$python" -c "import xtoken_ext._C as c, sys; assert c.__file__.startswith('$work'), c.__file__"
"$python" -m pytest -q -p no:cacheprovider "$@"
