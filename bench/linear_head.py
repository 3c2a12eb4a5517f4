"""Fused linear-head P-KL benchmark: forward+backward time and peak extra memory of ``xt.pkl_loss_from_hidden``
(the student's hidden states and lm-head weight; logits formed block by block) against

- "logits + pkl_loss": materialize z = h Wᵀ, then ``xt.pkl_loss`` (the same row-space op on all rows at once);
- "logits + release-style": materialize z, then bench.losses' unfused baseline written the way the authors'
  release computes P-KL (its options are described there), only at the shortest T of the full run (its chunk
  pooling is quadratic; ``--quick`` runs it at every T).

All three get the same inputs: student hidden states [1, T, d] and head weight [V_S, d] (fp32, both requiring grad),
dense fp32 teacher logits [1, T, V_T] (an input: not counted), one sequence of mostly 1-to-1 chunks (bench.losses).
Memory as in bench.losses: every measurement in a fresh subprocess, peak resident memory (VmHWM) after the inputs
exist minus the resident memory then, gradients of h and W included. The logits path holds [T, V_S] logits and
their gradient (8·T·V_S bytes in fp32); the fused path's extra memory does not grow with T.

Besides the table, a plot of peak extra memory and time against T for the three methods (log-log) is written to
``$XTOKEN_BENCH_DIR/linear_head.png`` (default ``./xtoken-bench/``; ``linear_head-quick.png`` for ``--quick``).
"""
from __future__ import annotations

import os
import time

import torch

from . import losses as plain

SIZES = dict(d=576, V_S=128_256, V_T=151_646)  # SmolLM2-135M-like student head, Qwen3-like teacher vocabulary
T_DEFAULT = (1024, 4096)
T_LONG = 16384  # opt-in (XTOKEN_BENCH_LONG=1): about 3 min of fused run on 2 cores; the logits path needs ~17 GiB
QUICK = dict(d=64, V_S=4_099, V_T=5_003)
T_QUICK = (64, 256)
IMPLS = {"fused": "fused (pkl_loss_from_hidden)", "logits": "logits + pkl_loss", "release": "logits + release-style"}


def _inputs(T: int, d: int, V_S: int, V_T: int, seed: int = 0):
    import xtoken_ext as xt

    chunks, L_s, L_t = plain._chunks(T, seed)
    batch = xt.Alignment.from_chunks([chunks], [[True] * len(chunks)], [L_s], [L_t])
    proj = xt.Projection.random(V_S, V_T, seed=seed, empty_rows=0.01)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, L_s, d, generator=g).requires_grad_()
    W = (torch.randn(V_S, d, generator=g) * (3 / d ** 0.5)).requires_grad_()  # logits of std ~3
    base = torch.randn(64, V_T, generator=g).mul_(2)
    t = base[torch.arange(L_t) % 64].unsqueeze(0)  # 64 distinct rows, tiled: cheap to build at 16k rows
    return h, W, t, batch, proj


def _loss(impl: str):
    import xtoken_ext as xt

    if impl == "fused":
        return lambda h, W, t, batch, proj: xt.pkl_loss_from_hidden(h, W, t, batch, proj)
    if impl == "logits":
        return lambda h, W, t, batch, proj: xt.pkl_loss(h @ W.T, t, batch, proj)
    return lambda h, W, t, batch, proj: plain._release_style("pkl", h @ W.T, t, batch, proj)


def measure(impl: str, T: int, d: int, V_S: int, V_T: int, repeats: int = 1) -> dict:
    """Fwd+bwd seconds (best of ``repeats``) and peak extra bytes, after a warm-up step at a tiny shape."""
    fn = _loss(impl)

    def step(h, W, t, batch, proj):
        h.grad = W.grad = None
        fn(h, W, t, batch, proj).backward()

    step(*_inputs(8, 16, 257, 263))
    args = _inputs(T, d, V_S, V_T)
    base = plain._reset_peak_rss()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(*args)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "peak_extra_bytes": plain._status("VmHWM") - base}


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x" if a and b and key in a and b.get(key) else "-"  # 0: below RSS resolution


def _table(title: str, results: dict) -> None:
    """results: {T: {impl: measurement}}; ratios are impl / "logits + pkl_loss" at the same T."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{title}; ratios = impl / logits + pkl_loss at the same T; load average {load:.1f}")
    head = f"{'impl':<30}{'T':>7}{'fwd+bwd s':>11}{'peak extra MiB':>16}{'time ratio':>12}{'memory ratio':>14}"
    print(head)
    print("-" * len(head))
    for T, per in results.items():
        ref = per.get("logits")
        ref = ref if ref and "error" not in ref else None
        for impl, r in per.items():
            if "error" in r:
                print(f"{IMPLS[impl]:<30}{T:>7}  failed: {r['error']}")
                continue
            print(f"{IMPLS[impl]:<30}{T:>7}{r['seconds']:>11.2f}{r['peak_extra_bytes'] / 2**20:>16.0f}"
                  f"{_ratio(r, ref, 'seconds'):>12}{_ratio(r, ref, 'peak_extra_bytes'):>14}")
    print()


def _plot(results: dict, name: str, title: str) -> None:
    """Peak extra memory and fwd+bwd time against T, one line per method (the T it was run at)."""
    from . import save_figure

    def draw(fig):
        axes = fig.subplots(1, 2)
        for impl, label in IMPLS.items():
            pts = [(T, per[impl]) for T, per in results.items() if impl in per and "error" not in per[impl]]
            if not pts:
                continue
            mem = [(T, r["peak_extra_bytes"] / 2**20) for T, r in pts if r["peak_extra_bytes"] > 0]  # log axis
            if mem:
                axes[0].loglog(*zip(*mem), "o-", label=label)
            axes[1].loglog([T for T, _ in pts], [r["seconds"] for _, r in pts], "o-", label=label)
        for ax, ylabel in zip(axes, ("peak extra memory (MiB)", "forward + backward (s)")):
            ax.set_xlabel("T (rows)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{title}; load average {os.getloadavg()[0]:.1f}", fontsize=9)

    save_figure(name, draw)


def run(quick: bool = False) -> None:
    threads = torch.get_num_threads()
    if quick:  # in-process smoke run at tiny sizes
        s = QUICK
        results = {T: {impl: measure(impl, T, s["d"], s["V_S"], s["V_T"]) for impl in IMPLS} for T in T_QUICK}
        title = f"fused linear-head P-KL (quick): d {s['d']}, V_S {s['V_S']:,}, V_T {s['V_T']:,} fp32, CPU"
        _table(title, results)
        _plot(results, "linear_head-quick", title)
        return
    s = SIZES
    Ts = T_DEFAULT + ((T_LONG,) if os.environ.get("XTOKEN_BENCH_LONG") == "1" else ())
    results = {}
    for T in Ts:
        impls = ["fused"] + (["logits"] if T <= T_DEFAULT[-1] else []) + (["release"] if T == Ts[0] else [])
        results[T] = {impl: plain._measure_subprocess(impl, T, s["d"], s["V_S"], s["V_T"], suite="linear_head") for impl in impls}
    title = (f"fused linear-head P-KL: d {s['d']}, V_S {s['V_S']:,}, V_T {s['V_T']:,} fp32, CPU ({threads} threads, "
             f"one measurement per cell)")
    _table(title, results)
    _plot(results, "linear_head", title)
    # The logits path's extra memory is affine in T (logits and their gradient): fit it on the two measured T.
    (T0, T1) = T_DEFAULT
    m0, m1 = (results[T].get("logits", {}).get("peak_extra_bytes") for T in (T0, T1))
    if m0 is None or m1 is None:
        return
    slope = (m1 - m0) / (T1 - T0)
    print(f"logits path: {slope / s['V_S']:.1f} bytes per row and student column (fp32 logits + gradient: 8)")
    for T, per in results.items():
        f = per["fused"]
        if "error" in f:
            continue
        logits = per.get("logits", {}).get("peak_extra_bytes")
        est = m0 + slope * (T - T0)
        how = "measured" if logits is not None else "extrapolated from the fit, not run here"
        logits = logits if logits is not None else est
        print(f"T = {T:>6}: fused peak extra {f['peak_extra_bytes'] / 2**20:,.0f} MiB = "
              f"{f['peak_extra_bytes'] / logits:.3f} of the logits path's {logits / 2**20:,.0f} MiB ({how}; "
              f"target at T = 16k: <= 0.125)" +
              (f"; time {f['seconds'] / per['logits']['seconds']:.2f}x of it (target <= 1.2)"
               if "logits" in per and "seconds" in per["logits"] else ""))
    if T_LONG not in results:
        print(f"(T = {T_LONG}: XTOKEN_BENCH_LONG=1, about 3 more minutes on 2 cores; the logits path does not fit "
              f"a 23 GiB machine there)")
    print()
