"""Aligner benchmark: C++ offset merge, auto and DP paths vs the pure-Python reference on the same inputs, 1 and N
threads (batch API), and the peak memory of a 128k-token banded DP.

Inputs are synthetic but shaped like real pairs: prose and number tables cut by two different rule-based
"tokenizers" (student: words + 3-digit groups, teacher: shorter word pieces + single digits), a BOS on the student
side only. tokens/s counts both sides (n + m) per second.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import sys
import time

import numpy as np

from xtoken_ext import _C
from xtoken_ext.reference import align as ref

BOS = b"\xff<bos>"
_STUDENT = re.compile(rb" ?[a-zA-Z]{1,7}| ?\d{1,3}|\s+|[^\sa-zA-Z\d]+")
_TEACHER = re.compile(rb" ?[a-zA-Z]{1,4}|\d| ?[^\sa-zA-Z\d]|\s")


def _prose(n_bytes: int, rng) -> bytes:
    words = [bytes(rng.choice(list(b"etaoinshrdlucmfw"), size=int(k))) for k in rng.integers(1, 12, size=400)]
    out, size = [], 0
    while size < n_bytes:
        w = words[int(rng.integers(len(words)))] + (b".\n" if rng.random() < 0.05 else b" ")
        out.append(w)
        size += len(w)
    return b"".join(out)


def _numbers(n_bytes: int, rng) -> bytes:
    rows, size = [], 0
    while size < n_bytes:
        a, b, c = rng.integers(0, 10**6), rng.integers(0, 10**4), rng.integers(0, 100)
        row = b"%d, %d.%02d\n" % (a, b, c)
        rows.append(row)
        size += len(row)
    return b"".join(rows)


def _tokens(text: bytes, pattern, bos=False) -> list[bytes]:
    toks = [m.group(0) for m in pattern.finditer(text)]
    assert b"".join(toks) == text
    return [BOS, *toks] if bos else toks


def _pair(text: bytes):
    return _tokens(text, _STUDENT, bos=True), _tokens(text, _TEACHER)


def _offsets(toks):
    lens = np.array([0 if t.startswith(b"\xff") else len(t) for t in toks], dtype=np.int64)
    ends = np.cumsum(lens)
    return ends - lens, ends


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_rss_of_dp(n_bytes: int) -> tuple[int, int, float, float]:
    """One DP in a fresh process: (n, m, seconds, peak RSS during the call minus RSS before it, in MiB). The
    kernel's high-water mark is reset first (/proc/self/clear_refs), so the peak belongs to the call."""
    code = f"""
import time, numpy as np
from xtoken_ext import _C
from xtoken_ext.bench.align import _numbers, _pair
def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
s, t = _pair(_numbers({n_bytes}, np.random.default_rng(3)))
before = kib("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter(); _C.align_tokens(s, t, "dp"); dt = time.perf_counter() - t0
print(len(s), len(t), dt, (kib("VmHWM:") - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout.split()
    return int(out[0]), int(out[1]), float(out[2]), float(out[3])


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:9.2f} M" if x >= 1e5 else f"{x / 1e3:9.1f} k"


def run(quick: bool = False) -> None:
    rng = np.random.default_rng(0)
    threads = os.cpu_count() or 1
    reps = 1 if quick else 3
    rows = []  # (case, tokens, cpp 1-thread s, ref s | None)

    # offset merge on text byte offsets: one big pair
    s, t = _pair(_prose(60_000 if quick else 800_000, rng))
    ss, se = _offsets(s)
    ts, te = _offsets(t)
    n = len(s) + len(t)
    cpp = _best(lambda: _C.merge_offsets_batch([ss], [se], [ts], [te], threads=1), 10 * reps)
    py = _best(lambda: ref.align_offsets(ss, se, ts, te), 1)
    rows.append(("offset merge, prose", n, cpp, py))

    # id path (auto / dp) on token bytes
    cases = [("auto, prose + BOS", _pair(_prose(30_000 if quick else 120_000, rng)), "auto"),
             ("dp, prose (anchors)", _pair(_prose(8_000 if quick else 24_000, rng)), "dp"),
             ("dp, number table", _pair(_numbers(1_500 if quick else 4_000, rng)), "dp")]
    for name, (s, t), method in cases:
        cpp = _best(lambda: _C.align_tokens(s, t, method), 3 * reps)
        py = _best(lambda: ref.align_tokens(s, t, method), 1)
        rows.append((name, len(s) + len(t), cpp, py))
    for n_bytes, repeats in ([] if quick else [(16_000, 3), (256_000, 1)]):  # student ~0.5 tokens per byte
        s, t = _pair(_numbers(n_bytes, rng))
        rows.append((f"dp, numbers {len(s) // 1000}k x {len(t) // 1000}k", len(s) + len(t),
                     _best(lambda: _C.align_tokens(s, t, "dp"), repeats), None))

    print("aligner: tokens/s (both sides); C++ = best of several runs, 1 thread; reference = pure Python "
          "(xtoken_ext.reference), one run")
    print(f"{'case':<28}{'tokens':>10}{'C++ tok/s':>13}{'ref tok/s':>13}{'C++/ref':>10}")
    for name, n, cpp, py in rows:
        ref_col = f"{_fmt_rate(n / py):>13}{n / cpp / (n / py):>9.0f}x" if py else f"{'-':>13}{'-':>10}"
        print(f"{name:<28}{n:>10,}{_fmt_rate(n / cpp):>13}{ref_col}")

    # batch API: B independent pairs, 1 vs N threads
    B = 8 if quick else 32
    print(f"\nbatch API: {B} pairs, 1 vs {threads} threads (load average before: {os.getloadavg()[0]:.1f} on "
          f"{threads} cores; the speedup needs idle cores)")
    print(f"{'case':<28}{'tokens':>10}{'1 thread':>13}{f'{threads} threads':>13}{'speedup':>10}")
    texts = [_prose(20_000 if quick else 60_000, rng) for _ in range(B)]
    pairs = [_pair(x) for x in texts]
    offs = [(*_offsets(s), *_offsets(t)) for s, t in pairs]
    vocab = sorted({tok for s, t in pairs for tok in s + t})
    index = {tok: i for i, tok in enumerate(vocab)}
    v = _C.Vocab(vocab)
    s_ids = [np.array([index[x] for x in s], dtype=np.int64) for s, _ in pairs]
    t_ids = [np.array([index[x] for x in t], dtype=np.int64) for _, t in pairs]
    n = sum(len(x) for x in s_ids) + sum(len(x) for x in t_ids)
    batch_cases = [
        ("offset merge", lambda k: _C.merge_offsets_batch(*(list(col) for col in zip(*offs)), threads=k)),
        ("auto (ids)", lambda k: _C.align_ids_batch(v, v, s_ids, t_ids, "auto", threads=k)),
        ("dp (ids)", lambda k: _C.align_ids_batch(v, v, s_ids, t_ids, "dp", threads=k)),
    ]
    for name, fn in batch_cases:
        one, many = _best(lambda: fn(1), reps), _best(lambda: fn(threads), reps)
        print(f"{name:<28}{n:>10,}{_fmt_rate(n / one):>13}{_fmt_rate(n / many):>13}{one / many:>9.2f}x")

    if not quick:
        n, m, dt, mib = _peak_rss_of_dp(256_000)
        print(f"\nDP on a number table (no anchors, band +-64), {n:,} x {m:,} tokens: {dt:.3f} s; peak memory "
              f"during the call {mib:.1f} MiB above the RSS before it (VmHWM after reset, fresh process; the full "
              f"table would be {n * m / 2**30:.0f} GiB of move bytes)")


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
