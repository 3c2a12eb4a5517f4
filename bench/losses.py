"""Loss benchmark: forward+backward time and peak extra memory of P-KL / H-KL / GOLD.

Compared: our row-space op (on CPU: the native C++ kernels for fp32 logits with a dense teacher, else the chunked
torch fallback; fused Triton on CUDA), an unfused baseline written the way the
authors' release does it (fp32 full log-softmax, torch.sparse.mm projection, dense one-hot chunk pooling via bmm),
and ``xt.reference`` (dense W, so only at a small shape).

Memory: every CPU measurement runs in a fresh subprocess; after the inputs exist it resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs``) and reports VmHWM − VmRSS(before) = peak resident memory the loss
added on top of its inputs (gradient included). On CUDA: torch.cuda.max_memory_allocated() − allocated(before).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
import time

import torch

CPU_SHAPE = (128, 128_256, 151_646)  # rows, V_S, V_T (Llama-3 x Qwen3-like widths), fp32; sized for the time budget
TARGET_SHAPE = (1024, 128_256, 151_646)  # DESIGN §4 CPU target: P-KL fwd+bwd ≤ 0.7 s, ≤ 700 MiB beyond the inputs
SMALL_SHAPE = (64, 4_099, 5_003)  # the reference needs a dense [V_S, V_T] W
QUICK_SHAPE = (16, 2_003, 3_001)
GPU_SHAPE = (8192, 128_256, 151_936)  # bf16


def _chunks(n_rows: int, seed: int = 0):
    """A single sequence of ~n_rows predictive rows per side: mostly 1-to-1 chunks, some 1-to-2 / 2-to-1."""
    g = torch.Generator().manual_seed(seed)
    chunks, s, t = [(0, 1, 0, 1)], 1, 1
    while s < n_rows + 1 and t < n_rows + 1:
        u = float(torch.rand((), generator=g))
        ns, nt = (1, 2) if u < 0.1 else (2, 1) if u < 0.2 else (1, 1)
        ns, nt = min(ns, n_rows + 1 - s), min(nt, n_rows + 1 - t)
        if ns == 0 or nt == 0:
            break
        chunks.append((s, s + ns, t, t + nt))
        s, t = s + ns, t + nt
    return chunks, s, t


def _inputs(shape, dtype, device, seed=0):
    import xtoken_ext as xt

    n, V_S, V_T = shape
    chunks, L_s, L_t = _chunks(n, seed)
    batch = xt.Alignment.from_chunks([chunks], [[True] * len(chunks)], [L_s], [L_t]).to(device)
    proj = xt.Projection.random(V_S, V_T, seed=seed, empty_rows=0.01).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(1, L_s, V_S, generator=g, device=device).mul_(2).to(dtype).requires_grad_()
    t = torch.randn(1, L_t, V_T, generator=g, device=device).mul_(2).to(dtype)
    return z, t, batch, proj


def _release_style(kind, z, t, batch, proj):
    """Unfused P-KL / H-KL / GOLD as in the authors' release: full fp32 (log-)softmax of both sides, W as a sparse
    matrix, chunk pooling by a dense one-hot [K, T] matrix and bmm (quadratic in rows)."""
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    K = batch.chunk_valid.shape[1]

    def pool(x, ids):  # mean over each chunk's rows via one-hot bmm
        onehot = torch.nn.functional.one_hot(ids + 1, K + 1)[..., 1:].to(x.dtype)  # [B, T, K]
        return torch.bmm(onehot.transpose(1, 2), x) / onehot.sum(1).clamp_min(1).unsqueeze(-1)

    valid = batch.chunk_valid
    log_t = pool(torch.log_softmax(t.float(), -1), batch.teacher_chunk_ids)
    if kind == "pkl":
        keep = proj.indices >= 0
        rows = torch.arange(V_S, device=z.device).unsqueeze(1).expand_as(proj.indices)[keep]
        W = torch.sparse_coo_tensor(torch.stack([rows, proj.indices[keep].long()]), proj.weights[keep],
                                    (V_S, V_T)).coalesce()
        p = torch.softmax(z.float(), -1)
        q = torch.sparse.mm(W.t(), p[0].t()).t().unsqueeze(0)  # [1, T, V_T]
        Q = pool(q, batch.student_chunk_ids)
        log_q = torch.log(Q / (Q.sum(-1, keepdim=True) + 1e-10) + 1e-10)
        per_chunk = (log_t.exp() * (log_t - log_q)).sum(-1)
    else:
        log_s = pool(torch.log_softmax(z.float(), -1), batch.student_chunk_ids)
        cs, ct = proj.common_pairs("relaxed" if kind == "hkl" else "strict")
        cs, ct = cs.to(z.device), ct.to(z.device)
        kl = (log_t[..., ct].exp() * (log_t[..., ct] - log_s[..., cs])).sum(-1)
        us = torch.ones(V_S, dtype=torch.bool, device=z.device)
        us[cs] = False
        ut = torch.ones(V_T, dtype=torch.bool, device=z.device)
        ut[ct] = False
        a = torch.sort(log_s[..., us].exp(), -1, descending=True).values
        b = torch.sort(log_t[..., ut].exp(), -1, descending=True).values
        m = min(a.shape[-1], b.shape[-1])
        per_chunk = kl + (a[..., :m] - b[..., :m]).abs().sum(-1)
    return per_chunk[valid].sum() / valid.sum()


def _loss_fn(impl, kind):
    import xtoken_ext as xt

    if impl == "release":
        return lambda z, t, b, p: _release_style(kind, z, t, b, p)
    mod = xt.reference if impl == "reference" else xt
    return getattr(mod, {"pkl": "pkl_loss", "hkl": "hkl_loss", "gold": "gold_loss"}[kind])


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


def measure(impl: str, kind: str, shape, dtype: str = "float32", device: str = "cpu", repeats: int = 1) -> dict:
    """Fwd+bwd seconds (best of ``repeats``) and peak extra bytes of one configuration, after a warm-up step at a
    tiny shape (lazy imports, custom-op and Triton first-call costs stay out of the timing)."""
    dev = torch.device(device)
    fn = _loss_fn(impl, kind)

    def step(z, t, batch, proj):
        z.grad = None
        fn(z, t, batch, proj).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step(*_inputs((4, 257, 263), getattr(torch, dtype), dev))
    z, t, batch, proj = _inputs(shape, getattr(torch, dtype), dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(z, t, batch, proj)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else _status("VmHWM") - base
    return {"seconds": best, "peak_extra_bytes": peak}


def _measure_subprocess(*args) -> dict:
    code = ("import json, sys; from xtoken_ext.bench.losses import measure; "
            f"print(json.dumps(measure(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                         cwd=tempfile.gettempdir())  # outside a source checkout: import the installed package
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(title, rows, ref_name):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{title}; speedup = {ref_name} time / time; load average {load:.1f}")
    head = f"{'impl':<30}{'loss':<6}{'fwd+bwd s':>11}{'peak extra MiB':>16}{'speedup':>10}"
    print(head)
    print("-" * len(head))
    base = {kind: r for name, kind, r in rows if name == ref_name and "seconds" in r}
    for name, kind, r in rows:
        if "error" in r:
            print(f"{name:<30}{kind:<6}  failed: {r['error']}")
            continue
        ratio = base[kind]["seconds"] / r["seconds"] if kind in base else float("nan")
        print(f"{name:<30}{kind:<6}{r['seconds']:>11.3f}{r['peak_extra_bytes'] / 2**20:>16.0f}{ratio:>9.1f}x")
    print()


def run(quick: bool = False) -> None:
    kinds = ("pkl", "hkl", "gold")
    if quick:  # in-process smoke run at a tiny shape
        shape = QUICK_SHAPE
        rows = [(name, k, measure(impl, k, shape)) for k in ("pkl", "hkl")
                for name, impl in (("xtoken_ext CPU path", "xtoken"), ("release-style unfused", "release"),
                                   ("reference (dense W, loops)", "reference"))]
        _table(f"losses (quick): {shape[0]} rows x V_S {shape[1]:,} x V_T {shape[2]:,} fp32, CPU", rows,
               "reference (dense W, loops)")
        return
    shape = SMALL_SHAPE
    rows = [(name, "pkl", _measure_subprocess(impl, "pkl", shape, "float32", "cpu", 2))
            for name, impl in (("xtoken_ext CPU path", "xtoken"), ("release-style unfused", "release"),
                               ("reference (dense W, loops)", "reference"))]
    _table(f"losses vs reference: {shape[0]} rows x V_S {shape[1]:,} x V_T {shape[2]:,} fp32, CPU "
           f"({torch.get_num_threads()} threads)", rows, "reference (dense W, loops)")
    shape = CPU_SHAPE
    rows = [(name, k, _measure_subprocess(impl, k, shape, "float32", "cpu", 1)) for k in kinds
            for name, impl in (("xtoken_ext CPU path", "xtoken"), ("release-style unfused", "release"))]
    _table(f"losses: {shape[0]} rows x V_S {shape[1]:,} x V_T {shape[2]:,} fp32, CPU "
           f"({torch.get_num_threads()} threads)", rows, "release-style unfused")
    print("(CPU path: fp32 logits with a dense teacher run the C++ kernels in xtoken_ext._C for P-KL and "
          "H-KL / GOLD / ULD; other dtypes and sparse teachers run the chunked torch fallback)\n")
    n, V_S, V_T = TARGET_SHAPE
    for kind, label, target, reps in (("pkl", "P-KL (C++ kernel)", "0.7", 3), ("hkl", "H-KL (C++ kernel)", "1", 3)):
        r = _measure_subprocess("xtoken", kind, TARGET_SHAPE, "float32", "cpu", reps)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        if "error" in r:
            print(f"{label} at the DESIGN target shape failed: {r['error']}")
            continue
        print(f"{label} at the DESIGN target shape, {n:,} rows x V_S {V_S:,} x V_T {V_T:,} fp32, "
              f"{torch.get_num_threads()} threads, best of {reps}, load average {load:.1f}: fwd+bwd "
              f"{r['seconds']:.3f} s (target <= {target}), peak extra {r['peak_extra_bytes'] / 2**20:.0f} MiB "
              f"(memory target <= 700; the gradient is {n * V_S * 4 / 2**20:.0f})")
    print()
    if torch.cuda.is_available():
        _run_gpu()


def _run_gpu() -> None:
    shape = GPU_SHAPE
    n, V_S, V_T = shape
    rows = [(name, "pkl", measure(impl, "pkl", shape, "bfloat16", "cuda", 5))
            for name, impl in (("xtoken fused (Triton)", "xtoken"), ("release-style unfused", "release"))]
    _table(f"losses: {n} rows x V_S {V_S:,} x V_T {V_T:,} bf16, {torch.cuda.get_device_name()}", rows,
           "release-style unfused")
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else 3.35e12  # DDR; H100 SXM fallback
    moved = 2 * n * (2 * V_S + V_T)  # read student + teacher logits once, write the bf16 gradient
    fused = rows[0][2]
    if "seconds" in fused:
        print(f"fused P-KL: {moved / 1e9:.2f} GB moved at the floor, {moved / fused['seconds'] / 1e9:.0f} GB/s = "
              f"{100 * moved / fused['seconds'] / peak:.0f}% of peak {peak / 1e12:.2f} TB/s")
