"""Scaling benchmark: time and peak extra memory of the aligner, the W build and each loss against sequence length
and vocabulary size, with the measured growth exponent.

Series (x = what varies; everything else fixed):
  aligner auto / dp: ``Aligner(llama3, qwen3).align_ids`` (offline tokenizers) with method "auto" and "dp" on one
    pair of id sequences; x = tokens on both sides. The text is synthetic prose plus a number table (bench.align),
    tokenized once per side as a block of ~27k tokens and repeated: each point is a whole number of blocks, so both
    sides always cover the same bytes.
  W build: ``Projection.from_tokenizers(cache=False)`` with the student = Llama-3's byte-level BPE cut to its first
    x ranks and the teacher = Qwen3's cut to the same fraction of its ranks (x · 151,643 / 128,000); x = V_S. A
    BPE cut to a prefix of its ranks is still a valid BPE (each token is merged from two lower-ranked ones); the
    cut tokenizers have no special tokens. Both token tables are built before the timing; "pass-2 rows" = student
    rows without an exact teacher match, the ones the build re-tokenizes.
  P-KL / H-KL / GOLD: ``xt.pkl_loss`` / ``hkl_loss`` / ``gold_loss`` with their defaults, forward + backward (on
    CPU the C++ kernels), fp32, inputs as bench.losses (Projection.random W, one sequence of mostly 1-to-1 chunks);
    x = rows per side at V_S = V_T = 32,768, and x = V_S = V_T at 256 rows.
``--quick`` runs every series in this process at small sizes, with gpt2 x mistral-spm in place of llama3 x qwen3.

Time: the best of 3..20 runs per point (more runs while under 0.5 s in all), after one untimed run at each
series' first point (lazy imports, thread pools).
Memory: each group of series runs in a fresh subprocess (the quick run in this process); before each point the
previous point's objects are freed, glibc's ``malloc_trim(0)`` hands freed heap pages back to the kernel and the
peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``); peak extra = VmHWM after the first timed run −
VmRSS once the inputs exist (the loss gradient, the built W, the chunks included).

Growth exponent b: least-squares slope of log y on log x over the series' points, y ∝ x^b. Verdict: "linear" for
0.85 ≤ b ≤ 1.15, "constant" for |b| ≤ 0.15, else "sublinear" / "superlinear" / "decreasing". Fixed per-call costs
pull b below 1 at the smallest sizes; the slope between the two largest points is printed beside it. Memory below
1 MiB is at the resolution of the measurement and left out of its fit.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import sys
import time

import numpy as np
import torch

from . import losses as plain

ROWS = (128, 256, 512, 1024)
ROWS_VOCAB = 32_768  # V_S = V_T of the rows series
VOCABS = (16_384, 32_768, 65_536, 128_000)  # losses: V_S = V_T; W build: Llama-3 ranks kept (128,000 = all)
VOCAB_ROWS = 256  # rows of the vocab series
ALIGN_BLOCKS = {"auto": (1, 2, 4, 8, 16), "dp": (1, 2, 4, 8)}  # blocks of ~53k tokens (both sides)
PAIR = ("llama3", "qwen3")  # offline tokenizers (xtoken_ext.testing): aligner pair, W build student / teacher
QUICK = dict(rows=(16, 32, 64), rows_vocab=4_096, vocabs=(2_048, 4_096, 8_192), vocab_rows=16,
             align_blocks={"auto": (1, 2, 4), "dp": (1, 2, 4)}, pair=("gpt2", "mistral-spm"))
MIN_RUNS, MAX_RUNS, RUN_SECONDS = 3, 20, 0.5  # timed runs per point (the best counts)
GROUPS = ("tokenizers", "losses")  # one subprocess each: aligner + W build, P-KL + H-KL + GOLD
LOSS_NAMES = {"pkl": "P-KL", "hkl": "H-KL", "gold": "GOLD"}
MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------

def _release_memory() -> int:
    """Return freed heap pages to the kernel (glibc), then reset the peak-RSS counter to the current RSS -> it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident (the peak then reads low)
        pass
    return plain._reset_peak_rss()


def _series(xs, make, quick: bool) -> list[dict]:
    """``make(x) -> (step, info)`` builds a point's inputs (untimed); ``step()`` runs the measured call once and
    ``info`` is a dict, or a function of the last step's result giving one. A warm-up run on the first point's
    own inputs comes first. Runs per point: 1 when quick, else at least MIN_RUNS, then more until RUN_SECONDS are
    spent or MAX_RUNS; the best time counts, the peak memory is the first run's. The cyclic garbage collector is
    off while timing (as in timeit)."""
    step, _ = make(xs[0])
    step()
    del step
    points = []
    for x in xs:
        step, info = make(x)
        base = _release_memory()
        times, result, peak = [], None, None
        gc.disable()
        try:
            while len(times) < (1 if quick else MIN_RUNS) or (not quick and sum(times) < RUN_SECONDS
                                                                and len(times) < MAX_RUNS):
                result = None  # the previous run's output is freed first
                t0 = time.perf_counter()
                result = step()
                times.append(time.perf_counter() - t0)
                peak = plain._status("VmHWM") - base if peak is None else peak
        finally:
            gc.enable()
        points.append({"x": x, "seconds": min(times), "peak_extra_bytes": peak,
                       **(info(result) if callable(info) else info)})
        del step, result
    return points


def _aligner_series(quick: bool) -> dict:
    from xtoken_ext import Aligner
    from xtoken_ext.testing import offline_tokenizer

    from .align import _numbers, _prose

    student, teacher = (offline_tokenizer(name) for name in (QUICK["pair"] if quick else PAIR))
    rng = np.random.default_rng(0)
    text = (_prose(24_000, rng) + _numbers(4_000, rng)).decode()  # ends with a newline: blocks concatenate cleanly
    block = [np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64) for tok in (student, teacher)]
    out = {}
    for method, blocks in (QUICK["align_blocks"] if quick else ALIGN_BLOCKS).items():
        aligner = Aligner(student, teacher, method=method)

        def make(k):
            s, t = np.tile(block[0], k), np.tile(block[1], k)
            return (lambda: aligner.align_ids(s, t)), lambda chunks: {"x": len(s) + len(t), "chunks": len(chunks)}

        out[f"aligner {method}"] = _series(blocks, make, quick)
    return out


class _BPECutter:
    """Cuts an HF fast tokenizer's BPE (ids in merge order) to its first ``n`` ids and the merges among them, with
    its normalizer, pre-tokenizer and decoder, without added tokens."""

    def __init__(self, tok):
        backend = tok.backend_tokenizer
        model = json.loads(backend.to_str())["model"]
        self.backend, self.vocab = backend, model["vocab"]
        self.options = {k: model[k] for k in ("unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                              "fuse_unk", "byte_fallback", "ignore_merges") if model.get(k) is not None}
        self.merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        # a merge survives a cut at n when both parts and the result have ids < n
        self.need = [max(self.vocab[a], self.vocab[b], self.vocab.get(a + b, len(self.vocab))) for a, b in self.merges]

    def __len__(self) -> int:
        return len(self.vocab)

    def cut(self, n: int):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        keep = {piece: i for piece, i in self.vocab.items() if i < n}
        merges = [m for m, k in zip(self.merges, self.need) if k < n]
        out = Tokenizer(models.BPE(keep, merges, **self.options))
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            if getattr(self.backend, part) is not None:
                setattr(out, part, getattr(self.backend, part))
        return PreTrainedTokenizerFast(tokenizer_object=out)


def _wbuild_series(quick: bool) -> dict:
    from xtoken_ext.projection import Projection
    from xtoken_ext.testing import offline_tokenizer
    from xtoken_ext.tokenizers import token_table

    cutters = [_BPECutter(offline_tokenizer(name)) for name in (QUICK["pair"] if quick else PAIR)]
    gc.freeze()  # the cutters' ~10⁶ long-lived objects: out of every collection below

    def make(n):
        s = cutters[0].cut(n)
        t = cutters[1].cut(round(n * len(cutters[1]) / len(cutters[0])))  # Llama-3 / Qwen3: 128,000 / 151,643
        token_table(s), token_table(t)  # cached per tokenizer object: outside the timing

        def step():
            return Projection.from_tokenizers(s, t, cache=False, progress=False)

        return step, lambda proj: {"V_T": len(t), "pass-2 rows": int((~proj.exact_rows).sum())}

    try:
        return {"W build": _series(QUICK["vocabs"] if quick else VOCABS, make, quick)}
    finally:
        gc.unfreeze()


def _loss_series(kind: str, quick: bool) -> dict:
    fn = plain._loss_fn("xtoken", kind, {})
    q = QUICK if quick else dict(rows=ROWS, rows_vocab=ROWS_VOCAB, vocabs=VOCABS, vocab_rows=VOCAB_ROWS)

    def make(shape):
        z, t, batch, proj = plain._inputs(shape, torch.float32, torch.device("cpu"))

        def step():
            z.grad = None
            fn(z, t, batch, proj).backward()

        return step, {}

    name = LOSS_NAMES[kind]
    rows = _series([(n, q["rows_vocab"], q["rows_vocab"]) for n in q["rows"]], make, quick)
    vocab = _series([(q["vocab_rows"], v, v) for v in q["vocabs"]], make, quick)
    for p in rows:
        p["x"] = p["x"][0]
    for p in vocab:
        p["x"] = p["x"][1]
    return {f"{name} vs rows": rows, f"{name} vs V": vocab}


def measure(group: str, quick: bool = False) -> dict:
    """{series name: [point]} of one group (GROUPS) in this process; a point: x, seconds, peak_extra_bytes and
    what the series adds (chunks, V_T, pass-2 rows)."""
    if group == "tokenizers":
        return {**_aligner_series(quick), **_wbuild_series(quick)}
    return {k: v for kind in LOSS_NAMES for k, v in _loss_series(kind, quick).items()}


# ---------------------------------------------------------------------------------------------------------------
# growth exponent and report
# ---------------------------------------------------------------------------------------------------------------

def exponent(xs, ys) -> float:
    """Least-squares slope b of log y = a + b log x (nan with fewer than two points)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def verdict(b: float) -> str:
    if math.isnan(b):
        return "n/a"
    if abs(b) <= 0.15:
        return "constant"
    if 0.85 <= b <= 1.15:
        return "linear"
    return "decreasing" if b < 0 else "sublinear" if b < 0.85 else "superlinear"


def _fits(points: list[dict]) -> dict:
    out = {}
    for key, floor in (("seconds", 0.0), ("peak_extra_bytes", MIB)):
        pts = [(p["x"], p[key]) for p in points if p[key] > floor]
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        out[key] = (exponent(xs, ys), exponent(xs[-2:], ys[-2:]), ys[-1] / ys[0] if len(ys) > 1 else float("nan"))
    return out


_UNITS = {"aligner": "tokens", "W build": "V_S", "vs rows": "rows", "vs V": "V_S=V_T"}


def _unit(name: str) -> str:
    return next(u for k, u in _UNITS.items() if k in name)


def _ratio(r: float) -> str:
    return f"{'-':>8}" if math.isnan(r) else f"{r:>7.1f}x"


def _slope(b: float, width: int) -> str:
    return f"{'-':>{width}}" if math.isnan(b) else f"{b:>{width}.2f}"


def _report(results: dict, title: str) -> None:
    print(f"{title}; load average {plain._load()}")
    head = f"{'series':<18}{'x':>10}{'':<9}{'seconds':>10}{'peak extra MiB':>16}  notes"
    print(head)
    print("-" * len(head))
    for name, points in results.items():
        if isinstance(points, dict):  # {"error": ...} from a subprocess
            print(f"{name:<18}  failed: {points['error']}")
            continue
        for p in points:
            notes = ", ".join(f"{k} {v:,}" for k, v in p.items() if k not in ("x", "seconds", "peak_extra_bytes"))
            print(f"{name:<18}{p['x']:>10,} {_unit(name):<8}{p['seconds']:>10.4f}"
                  f"{p['peak_extra_bytes'] / MIB:>16.1f}  {notes}")
    print()
    print("growth exponent b (y ~ x^b; least squares on log-log over all points; 'last 2' = slope between the two "
          "largest points; memory points under 1 MiB left out)")
    head = (f"{'series':<18}{'x range':>22}{'size':>7}{'time':>8}{'b time':>8}{'last 2':>8}  {'verdict':<12}"
            f"{'memory':>8}{'b mem':>7}{'last 2':>8}  verdict")
    print(head)
    print("-" * len(head))
    for name, points in results.items():
        if isinstance(points, dict):
            continue
        f = _fits(points)
        (bt, lt, rt), (bm, lm, rm) = f["seconds"], f["peak_extra_bytes"]
        x0, x1 = points[0]["x"], points[-1]["x"]
        print(f"{name:<18}{f'{x0:,}..{x1:,}':>22}{x1 / x0:>6.0f}x{_ratio(rt)}{_slope(bt, 8)}{_slope(lt, 8)}  "
              f"{verdict(bt):<12}{_ratio(rm)}{_slope(bm, 7)}{_slope(lm, 8)}  {verdict(bm)}")
    wb = results.get("W build")
    if isinstance(wb, list) and len(wb) > 2:
        _work_fit(wb)
    print()


def _work_fit(points: list[dict]) -> None:
    """The W build does O(V_S + V_T) table work plus one teacher re-tokenization per pass-2 row; the pass-2 share
    depends on how the two vocabularies overlap at each cut. Least squares: seconds = a·V_S + c·(pass-2 rows)."""
    A = np.array([[p["x"], p["pass-2 rows"]] for p in points], float)
    y = np.array([p["seconds"] for p in points])
    (a, c), *_ = np.linalg.lstsq(A, y, rcond=None)
    if a <= 0 or c <= 0:  # pass-2 rows nearly proportional to V_S: the two costs cannot be told apart
        print("W build work fit (seconds = a*V_S + c*pass-2 rows): not identifiable from these points")
        return
    worst = float(np.max(np.abs(A @ [a, c] - y) / y))
    print(f"W build as linear in its work: seconds = a*V_S + c*(pass-2 rows), a = {a * 1e6:.2f} us per student row "
          f"(V_T scaled with it), c = {c * 1e6:.1f} us per re-tokenized row; largest relative residual "
          f"{100 * worst:.0f}%")


def _plot(results: dict, name: str) -> None:
    from . import save_figure

    panels = [("aligner", "tokens (both sides)"), ("W build", "V_S (teacher scaled with it)"),
              ("vs rows", "rows (V_S = V_T)"), ("vs V", "V_S = V_T")]

    def draw(fig):
        from matplotlib.ticker import NullFormatter

        axes = fig.subplots(2, len(panels), squeeze=False)
        for col, (key, xlabel) in enumerate(panels):
            for series, points in results.items():
                if key not in series or isinstance(points, dict):
                    continue
                f = _fits(points)
                for row, (metric, scale) in enumerate((("seconds", 1.0), ("peak_extra_bytes", MIB))):
                    ax = axes[row][col]
                    pts = [(p["x"], p[metric] / scale) for p in points if p[metric] > 0]  # log axes
                    if pts:
                        ax.loglog(*zip(*pts), "o-", label=f"{series} (b = {f[metric][0]:.2f})")
                    ax.xaxis.set_minor_formatter(NullFormatter())
                    ax.set_xlabel(xlabel)
                    ax.set_ylabel("seconds" if row == 0 else "peak extra MiB")
                    ax.legend(fontsize=7)
                    ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"xtoken scaling (CPU, {torch.get_num_threads()} threads, load {plain._load()})")

    save_figure(name, draw, size=(4.2 * len(panels), 7.5))


def run(quick: bool = False) -> None:
    threads = torch.get_num_threads()
    results = {}
    for group in GROUPS:
        got = measure(group, True) if quick else plain._measure_subprocess(group, False, suite="scaling")
        if "error" in got:
            got = {group: got}
        results.update(got)
    pair = " x ".join(QUICK["pair"] if quick else PAIR)
    sizes = (f"losses: rows at V_S = V_T = {(QUICK['rows_vocab'] if quick else ROWS_VOCAB):,}, "
             f"V at {(QUICK['vocab_rows'] if quick else VOCAB_ROWS)} rows, fp32 fwd+bwd")
    _report(results, f"scaling{' (quick, in-process)' if quick else ''}: CPU, {threads} threads; {sizes}; "
                     f"aligner: {pair} align_ids, 1 thread; W build: {pair} BPEs cut to V_S / scaled V_T ids")
    _plot(results, "scaling-quick" if quick else "scaling")


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
