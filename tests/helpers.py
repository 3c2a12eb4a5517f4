"""Shared test helpers: tolerances, random problems, Hypothesis strategies and float64 row-space oracles.

Tolerances (``xtoken_ext.testing``: kappa, grad_bound, loss_bound; per entry; the reference is fed the SAME rounded inputs, upcast to float64, so input rounding is not an
error source). Every backend computes in fp32 (fp64 for fp64 logits; unit roundoff u_m), then rounds the gradient
to the logits' dtype (u_d) in the forward and once more when backward scales it in place by grad_output.

Gradient. Both loss families have dz_r = p_r ⊙ (g − ⟨p_r, g⟩)/(τ n) (P-KL, g = ∂L/∂p̄) or (gS − p_r Σ gS)/(τ n)
(H-KL, gS = ∂L/∂S). In floating point:
  - p_s = exp(x_s/τ − lse) carries a relative error ≤ u_m·κ, κ ≈ |x/τ| + |lse| ≤ 2 max|x|/τ + ln V (the argument's
    absolute error, amplified by exp); the teacher side enters through P and log π in the same way;
  - the difference (g_s − ⟨p, g⟩) has an absolute error ≤ u_m·κ·(|g_s| + ⟨p, |g|⟩). One shows
    p̄_s|g_s| ≤ 2τ², Σ_s p̄_s|g_s| ≤ 2τ² (P-KL: p̄_s W_sv ≤ Z·Q_v bounds h_v = P_v/Q_v; H-KL: |Σ gS| ≤ 2τ²),
    so this part is ≤ u_m·κ·(τ n |dz_s| + 2τ²·p_s)/(τ n) per entry.
  Hence |err_s| ≤ (2·u_d' + c·u_m·κ)·|ref_s| + c·u_m·κ·2τ·p_s·|w| (+ subnormals, below), where w is the
  incoming gradient of the chunk, p_s = softmax(x/τ)_s of the row (float64 on the rounded inputs), u_d' the dtype's
  roundoff (2u for bf16 under the Triton interpreter, which truncates fp32 -> bf16) and c = 8 a small constant for
  the handful of chained roundings per term; the gradient's dtype adds (1 + |w|) times half its subnormal spacing
  (rounded in the forward, scaled by w, rounded again: fp16 2⁻²⁵, which matters; bf16 2⁻¹³⁴ and fp32 2⁻¹⁵⁰, which
  only entries that no such dtype holds meet). The bound is relative per entry: a kernel that zeroes or perturbs
  the small entries fails it (test_mutation_* checks exactly that).
Loss. L = τ² Σ P (T − log Q) (+ τ² Σ|a − b| ≤ 2τ²): |err| ≤ c·u_m·κ·(|ref| + τ²).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from collections import defaultdict

import torch
from hypothesis import settings
from hypothesis import strategies as st

import xtoken_ext as xt
from xtoken_ext.projection import Projection
from xtoken_ext.testing import C, HALF_SPACING, UNIT_ROUNDOFF, grad_bound, kappa, loss_bound, math_roundoff, \
    store_roundoff  # noqa: F401 (the bounds derived above live in the package: the GPU check uses them too)

LOSSES = ["pkl_loss", "hkl_loss", "gold_loss", "uld_loss"]
BACKENDS = ["torch", "native", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Worst err / bound and largest absolute error seen per (check, backend, dtype); printed at the end of the session.
MAX_ERR: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])


def examples(n: int) -> int:
    """n Hypothesis examples under the default profile, scaled with the active profile (thorough: 10×)."""
    return max(1, n * settings.default.max_examples // 100)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compiled_json(tmp_path, script: str, *argv: str, timeout: int):
    """Run ``script`` (python -c, with argv) in a subprocess without TRITON_INTERPRET (the test session may run
    Triton under the interpreter, which replaces compilation) -> the JSON of the last line it prints. Its compiles go
    to the Triton cache the session's other sm_90 compiles use (bench.sass: test_bench_costmodel's SASS counts), which
    serves a variant both compile (the cache's writes are atomic: the xdist workers may share it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(key: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, mask: torch.Tensor | None = None):
    """Assert |got − ref| ≤ bound per entry (on ``mask`` if given) and record the worst ratio under ``key``."""
    err = (got.detach().double() - ref.detach().double()).abs()
    bound = bound.detach()
    if mask is not None:
        err, bound = err[mask], bound[mask]
    if err.numel() == 0:
        return
    ratio = float((err / bound.clamp_min(1e-300)).max().detach())
    rec = MAX_ERR[key]
    rec[0], rec[1] = max(rec[0], ratio), max(rec[1], float(err.max()))
    assert bool((err <= bound).all()), f"{key}: max err {float(err.max()):.3e}, worst err/bound {ratio:.3f}"


def fails(got, ref, bound) -> bool:
    """True when the per-entry check rejects ``got`` (for mutation tests)."""
    return not bool(((got.double() - ref.double()).abs() <= bound).all())


# ---------------------------------------------------------------------------------------------------------------
# random alignments and logits for the public API
# ---------------------------------------------------------------------------------------------------------------

def random_alignment(g: torch.Generator, B: int, max_chunks: int, max_len: int = 3) -> xt.Alignment:
    """Random chunkings (1-to-many, many-to-1, gaps, incorrect chunks) of B sequence pairs."""
    chunks_list, correct_list, s_lens, t_lens = [], [], [], []
    for _ in range(B):
        K = int(torch.randint(1, max_chunks + 1, (), generator=g))
        chunks, correct, s, t = [], [], 0, 0
        for _ in range(K):
            ns, nt = (int(x) for x in torch.randint(0, max_len + 1, (2,), generator=g))
            if ns == nt == 0:
                ns = nt = 1
            chunks.append((s, s + ns, t, t + nt))
            correct.append(bool(torch.rand((), generator=g) < 0.85))
            s, t = s + ns, t + nt
        chunks_list.append(chunks)
        correct_list.append(correct)
        s_lens.append(s)
        t_lens.append(t)
    T_S, T_T = max(s_lens) + 1, max(t_lens) + 1  # one padding row at least
    return xt.Alignment.from_chunks(chunks_list, correct_list, s_lens, t_lens, T_S=T_S, T_T=T_T)


def distinct_logits(g: torch.Generator, shape, dtype, shared_order: bool, scale: float = 2.0) -> torch.Tensor:
    """Logits exact in bf16/fp16 with distinct values in every row, |z| ≤ ~scale·2.

    shared_order: every row of a sequence is one permutation of the vocab (gap 8 units) plus a per-row jitter of at
    most ±3 units, so any mean over rows keeps that strict order: no ties in the sorted-L1, whose gradient is not
    defined at ties. Otherwise each row has its own permutation (fine for P-KL). Units are a power of two small
    enough that the values stay exact in bf16 (≤ 8 significant bits) for the vocabularies used here."""
    B, T, V = shape
    order_shape = (B, 1, V) if shared_order else shape
    perm = torch.argsort(torch.rand(order_shape, generator=g), dim=-1).expand(shape).to(torch.float64)
    jitter = torch.randint(-3, 4, shape, generator=g).to(torch.float64) if shared_order else 0.0
    unit = 2.0 ** math.floor(math.log2(scale / (4 * V)))
    return ((perm * 8 + jitter - 4 * V) * unit).to(dtype)


def sparse_teacher(g: torch.Generator, B: int, T: int, V_T: int, k: int):
    idx = torch.argsort(torch.rand(B, T, V_T, generator=g), dim=-1)[..., :k]
    lp = torch.log_softmax(torch.randn(B, T, k, generator=g, dtype=torch.float64) * 2, -1)
    return lp.float(), idx


api_case = st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "V_S": st.sampled_from([7, 13, 31, 97, 257]),
    "V_T": st.sampled_from([5, 17, 41, 101, 263]),
    "B": st.integers(1, 2),
    "merge": st.sampled_from(["mean", "first", "chain"]),
    "uncovered": st.sampled_from(["renormalize", "epsilon"]),
    "teacher_topk": st.sampled_from([None, None, 3, 20]),
    "uncommon_topk": st.sampled_from(["default", None, 0, 2]),
    "temperature": st.sampled_from([1.0, 1.0, 0.7, 2.5]),
    "sparse": st.sampled_from([False, False, True]),
    "empty_rows": st.sampled_from([0.0, 0.3]),
})


# ---------------------------------------------------------------------------------------------------------------
# row-space problems and float64 oracles (the ops' contract), differentiated by autograd
# ---------------------------------------------------------------------------------------------------------------

def dense_w(w_idx, w_val, V_T):
    idx = w_idx.long()
    keep = idx >= 0
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    return torch.zeros(idx.shape[0], V_T, dtype=w_val.dtype).index_put((rows[keep], idx[keep]), w_val[keep],
                                                                       accumulate=True)


def teacher_logpi(t, t_cols, col_mask, tau):
    """log π rows [N_t, V_T]: log-softmax of t/τ over A (∩ the row's columns if sparse), −inf elsewhere."""
    t = t.double()
    if t_cols is not None:
        t = torch.full((t.shape[0], col_mask.numel()), float("-inf"), dtype=torch.float64).scatter(1, t_cols, t)
    x = torch.where(col_mask, t / tau, float("-inf"))
    lse = torch.logsumexp(x, 1, keepdim=True)
    return torch.where(torch.isfinite(lse), x - lse, float("-inf"))


def _chunk_rows(spans, merge):
    for s_lo, s_hi, t_lo, t_hi in spans.tolist():
        if merge == "mean":
            yield list(range(s_lo, s_hi)), list(range(t_lo, t_hi)), (s_lo, s_hi, t_lo, t_hi)
        else:
            yield [s_lo], [t_lo], (s_lo, s_hi, t_lo, t_hi)


def oracle_pkl(z, t, t_cols, w_idx, w_val, col_mask, spans, tau, merge, eps, t_chain):
    W = dense_w(w_idx, w_val, col_mask.numel())
    logpi = teacher_logpi(t, t_cols, col_mask, tau)
    out = []
    for sr, tr, (_, _, t_lo, t_hi) in _chunk_rows(spans, merge):
        q = torch.stack([torch.softmax(z[r] / tau, 0) @ W for r in sr]).mean(0)[col_mask]
        Q = q / q.sum()
        T = logpi[tr].mean(0)[col_mask]
        if merge == "chain":
            T = T + t_chain[t_lo + 1:t_hi].double().sum()
        P = T.exp()
        live = P > 0
        out.append(tau * tau * (P[live] * (T[live] - torch.log(Q[live] + eps))).sum())
    return torch.stack(out) if out else z.new_zeros(0)


def run_pkl(P, dt, merge, tau, learn_w, eps=0.0, grad_floor=0.0, backend="triton"):
    """The op's loss, gradient (forward and through backward) and W gradient on ``backend`` (native: on the CPU)
    against the float64 oracle; grad_floor: an absolute term added to the gradient bounds (scaled by the incoming
    gradient through backward)."""
    dev = torch.device("cpu") if backend == "native" else device()
    z = P.z.to(dt).to(dev).clone().requires_grad_()  # a copy: P.z (fp32 on the CPU) would keep .grad
    w_val = P.w_val.clone().to(dev).requires_grad_(learn_w)
    args = [x.to(dev) if isinstance(x, torch.Tensor) else x
            for x in (P.t.to(dt), P.t_cols, P.w_idx, w_val, P.col_mask, P.spans, tau, merge, eps, P.t_chain)]
    loss, grad, grad_w = torch.ops.xtoken.pkl_rows(z, *args, None, learn_w, backend)
    grad_fwd = grad.detach().cpu().clone()  # backward scales the saved gradient in place
    (loss * P.g_out.to(dev)).sum().backward()

    z64 = z.detach().cpu().double().requires_grad_()
    w64 = P.w_val.double().requires_grad_()
    zr = z.detach().cpu()
    ref = oracle_pkl(z64, P.t.to(dt), P.t_cols, P.w_idx, w64, P.col_mask, P.spans, tau, merge, eps, P.t_chain)
    (ref * P.g_out.double()).sum().backward()
    kap = kappa(zr, P.t.to(dt), tau)
    key = f"{backend}/{str(dt)[6:]}/pkl op"
    check(key + " loss", loss.cpu(), ref.detach(), loss_bound(ref, tau, kap, dt))
    g_max = float(P.g_out.abs().max())
    check(key + " grad", z.grad.cpu(), z64.grad, grad_bound(z64.grad, zr, tau, kap, dt, backend, g_max)
          + grad_floor * g_max)
    z1 = zr.double().requires_grad_()  # the forward's own gradient, d Σ_k loss_k / dz
    torch.autograd.backward(oracle_pkl(z1, P.t.to(dt), P.t_cols, P.w_idx, P.w_val.double(), P.col_mask, P.spans,
                                       tau, merge, eps, P.t_chain).sum())
    check(key + " grad (forward)", grad_fwd, z1.grad, grad_bound(z1.grad, zr, tau, kap, dt, backend) + grad_floor)
    if learn_w:
        check(key + " grad_w", w_val.grad.cpu(), w64.grad,
              8 * 2.0 ** -24 * kap * (w64.grad.abs() + 2 * tau * tau * P.spans.shape[0]))
    else:
        assert w_val.grad is None and grad_w.numel() == 0


def oracle_hkl(z, t, t_cols, col_mask, spans, tau, merge, s_chain, t_chain, cs, ct, uncommon_topk):
    """-> (loss [K], tie_columns bool [N_s, V_S]): columns whose student values (nearly) tie within the top m, where
    the sorted-L1 subgradient may legitimately differ between implementations; gradient checks skip them."""
    V_S = z.shape[1]
    keep = col_mask[ct]
    cs, ct = cs[keep], ct[keep]
    u_s = torch.ones(V_S, dtype=torch.bool)
    u_s[cs] = False
    u_t = col_mask.clone()
    u_t[ct] = False
    m = min(int(u_s.sum()), int(u_t.sum()), V_S if uncommon_topk is None else uncommon_topk)
    logpi = teacher_logpi(t, t_cols, col_mask, tau)
    out = []
    ties = torch.zeros(z.shape, dtype=torch.bool)
    u_ids = torch.nonzero(u_s).squeeze(1)
    for sr, tr, (s_lo, s_hi, t_lo, t_hi) in _chunk_rows(spans, merge):
        S = torch.stack([torch.log_softmax(z[r] / tau, 0) for r in sr]).mean(0)
        order = torch.sort(S.detach()[u_s], descending=True, stable=True)
        near = (order.values[:-1] - order.values[1:]) < 1e-5  # log-space gap = relative gap of exp S
        near[m:] = False  # positions past m get no gradient in either order ...
        tied = torch.zeros(order.values.shape, dtype=torch.bool)
        tied[:-1] |= near
        tied[1:] |= near
        if 0 < m < tied.numel():  # ... unless tied with position m − 1: any of that group may enter the top m
            tied[m:] |= (order.values[m - 1] - order.values[m:]) < 1e-5
        ties[torch.tensor(sr).unsqueeze(1), u_ids[order.indices[tied]].unsqueeze(0)] = True
        T = logpi[tr].mean(0)
        if merge == "chain":
            S = S + s_chain[s_lo + 1:s_hi].sum()
            T = T + t_chain[t_lo + 1:t_hi].double().sum()
        P = T.exp()
        live = P[ct] > 0
        kl = (P[ct][live] * (T[ct][live] - S[cs][live])).sum()
        a = torch.sort(S[u_s].exp(), descending=True, stable=True).values[:m]
        b = torch.sort(P[u_t], descending=True, stable=True).values[:m]
        out.append(tau * tau * (kl + (a - b).abs().sum()))
    return (torch.stack(out) if out else z.new_zeros(0)), ties


def make_problem(seed, V_S, V_T, n_chunks, max_rows, sparse_k, mask_mode, empty_rows, hub, gaps=True):
    """Random row-space problem: logits, W (optionally a 'hub' teacher column that many student rows reach, like a
    digit in a real W), spans with gap rows between chunks, teacher (dense, or top-k sparse with unique
    columns), col_mask, chain scalars, incoming per-chunk gradients."""
    g = torch.Generator().manual_seed(seed)
    proj = Projection.random(V_S, V_T, seed=seed, empty_rows=empty_rows)
    w_idx, w_val = proj.indices.clone(), proj.weights.clone()
    if hub:  # slot 0 of ~``hub`` non-empty rows (hub=True: ~3/4 of them) -> teacher column 0
        frac = 0.75 if hub is True else hub / V_S
        rows = (w_idx[:, 0] >= 0) & (torch.rand(V_S, generator=g) < frac) & ~(w_idx[:, 1:] == 0).any(1)
        w_idx[rows, 0] = 0
    spans, s, t = [], 0, 0
    for _ in range(n_chunks):
        s += int(gaps and torch.randint(0, 2, (1,), generator=g))
        t += int(gaps and torch.randint(0, 2, (1,), generator=g))
        ns = int(torch.randint(1, max_rows + 1, (1,), generator=g))
        nt = int(torch.randint(1, max_rows + 1, (1,), generator=g))
        spans.append([s, s + ns, t, t + nt])
        s, t = s + ns, t + nt
    N_s, N_t = s + int(gaps), t + int(gaps)
    # Distinct values in every row even after rounding to bf16: a shuffled grid of step 6/V_S (|z| ≤ 3) plus a
    # jitter below half a step (ties matter for the sorted-L1).
    grid = torch.stack([torch.randperm(V_S, generator=g) for _ in range(N_s)]).float().sub_(V_S / 2)
    z = (grid + 0.5 * torch.rand(N_s, V_S, generator=g)).mul_(6 / V_S)
    covered = torch.zeros(V_T, dtype=torch.bool)
    covered[w_idx[(w_idx >= 0) & (w_val > 0)].long()] = True
    if mask_mode == "covered":
        col_mask = covered
    elif mask_mode == "all":
        col_mask = torch.ones(V_T, dtype=torch.bool)
    else:  # covered ∩ a random "top-k" subset
        col_mask = covered & (torch.rand(V_T, generator=g) < 0.6)
        col_mask[w_idx[0, 0].clamp(min=0)] = True
    if sparse_k:
        k = min(sparse_k, V_T)
        base = torch.randperm(V_T, generator=g)
        cols = []
        for _ in range(N_t):  # overlapping column sets so multi-row chunks have a non-empty intersection
            shift = int(torch.randint(0, max(1, k // 3), (1,), generator=g))
            cols.append(base[(torch.arange(k) + shift) % V_T])
        t_cols = torch.stack(cols)
        t_vals = torch.log_softmax(torch.randn(N_t, k, generator=g) * 2, 1)
    else:
        t_cols, t_vals = None, torch.randn(N_t, V_T, generator=g) * 3
    return types.SimpleNamespace(
        z=z, t=t_vals, t_cols=t_cols, w_idx=w_idx.to(torch.int32), w_val=w_val, col_mask=col_mask,
        spans=torch.tensor(spans, dtype=torch.int64), t_chain=-torch.rand(N_t, generator=g) * 2,
        s_chain=-torch.rand(N_s, generator=g) * 2, g_out=torch.rand(len(spans), generator=g) * 2 - 0.5,
        proj=Projection(w_idx, w_val, V_T))


def fake_alignment(spans, N_s, N_t):
    """A B=1 alignment-like object with the chunk-id tensors the reference reads and the row_spans() losses use."""
    s_ids = torch.full((1, N_s), -1, dtype=torch.long)
    t_ids = torch.full((1, N_t), -1, dtype=torch.long)
    for k, (s_lo, s_hi, t_lo, t_hi) in enumerate(spans.tolist()):
        s_ids[0, s_lo:s_hi] = k
        t_ids[0, t_lo:t_hi] = k
    K = spans.shape[0]
    return types.SimpleNamespace(
        student_chunk_ids=s_ids, teacher_chunk_ids=t_ids, chunk_valid=torch.ones(1, K, dtype=torch.bool),
        row_spans=lambda: torch.cat([torch.zeros(K, 1, dtype=torch.long), spans], 1))


def pairs_of(P, pairs):
    return (torch.zeros(0, dtype=torch.int64),) * 2 if pairs == "none" else P.proj.common_pairs(pairs)


def run_hkl_triton(P, merge, pairs, uncommon_topk, tau=0.7, dt=torch.float32, tie_sums=False, what="select"):
    """The Triton backend of xtoken::hkl_rows vs oracle_hkl (float64): loss per chunk, gradient per entry off the tie columns; with tie_sums, also Σ over each row's tie
    columns of the gradient (invariant to the order ties are taken in: each tie group shares one value)."""
    dev = device()
    cs, ct = pairs_of(P, pairs)
    z = P.z.to(dt).to(dev).clone().requires_grad_()  # a copy: P.z (fp32 on the CPU) would keep .grad
    s_chain = P.s_chain.clone().to(dev).requires_grad_(merge == "chain")
    args = [x.to(dev) if isinstance(x, torch.Tensor) else x
            for x in (P.t.to(dt), P.t_cols, P.col_mask, P.spans, tau, merge, s_chain if merge == "chain" else None,
                      P.t_chain, cs, ct)]
    loss, _, _ = torch.ops.xtoken.hkl_rows(z, *args, uncommon_topk, "triton")
    (loss * P.g_out.to(dev)).sum().backward()
    zr = z.detach().cpu()
    z64 = zr.double().requires_grad_()
    sc64 = P.s_chain.double().requires_grad_()
    ref, ties = oracle_hkl(z64, P.t.to(dt), P.t_cols, P.col_mask, P.spans, tau, merge, sc64, P.t_chain, cs, ct,
                           uncommon_topk)
    (ref * P.g_out.double()).sum().backward()
    kap = kappa(zr, P.t.to(dt), tau)
    key = f"triton/{str(dt)[6:]}/hkl {what}"
    check(key + " loss", loss.cpu(), ref.detach(), loss_bound(ref, tau, kap, dt))
    bound = grad_bound(z64.grad, zr, tau, kap, dt, "triton", float(P.g_out.abs().max()))
    check(key + " grad", z.grad.cpu(), z64.grad, bound, mask=~ties)
    if tie_sums:
        assert bool(ties.any())
        m = ties.double()
        check(key + " grad tie sums", (z.grad.cpu().double() * m).sum(1), (z64.grad * m).sum(1), (bound * m).sum(1))
    if merge == "chain":
        check(key + " grad s_chain", s_chain.grad.cpu(), sc64.grad, loss_bound(sc64.grad, tau, kap, torch.float32))
    return loss.detach().cpu(), ref.detach()
