"""Fused H-KL / GOLD / ULD (Triton + torch sort): loss per chunk and its gradient wrt the student logits.

Math for one chunk (student rows R_S, n_s; teacher rows R_T; temperature τ; allowed columns A; common pairs
(s_c, t_c) with t_c ∈ A; U_S = V_S \\ {s_c}, U_T = A \\ {t_c}; ULD = no pairs):
  S = mean_r ℓ_r (+ s-chain scalar), ℓ_r = log_softmax(z_r/τ);  T = mean_r log π_r (+ t-chain scalar), P = exp T
  L = τ² (Σ_c P[t_c](T[t_c] − S[s_c]) + Σ_{i<m} |a_i − b_i|),  a = sort↓(exp S[U_S]), b = sort↓(P[U_T]),
  m = min(|U_S|, |U_T|, uncommon_topk)
  gS = ∂L/∂S: −τ² P[t_c] at s_c;  τ² sign(a_i − b_i) a_i at a_i's column
  ∂L/∂z_r = (gS − p_r Σ_v gS[v]) / (τ n_s)   (first/chain: the first row only, n_s = 1)
  ∂L/∂(s-chain scalar) = Σ_v gS[v]  (returned per later row for merge="chain")

What is fused and what is not. Chunks are processed in blocks sized to a scratch budget:
  Triton `_hkl_merge_kernel` (one program per chunk of the block): online LSE of every student and teacher row,
    the merged S written as exp S on U_S (−1 on common ids) into a[kb, V_S], the merged T walked over teacher
    columns (all of V_T, or the first row's k columns for a sparse teacher, intersected with the later rows'
    columns through a per-program scratch), P written on U_T into b[kb, V_T] (−1 outside U_T), and the common-set
    KL with its gradient −τ² P[t_c] stored at s_c (S[s_c] gathered from the logit rows through a teacher→student
    id map).
  torch: top-m of a and b per chunk (torch.topk, or a full sort when m is a large share of the row), the L1 and
    its gradient τ² sign·a scattered back to the sorted student ids, Σ gS.
  Triton `_hkl_grad_kernel`: dz_r = (gS − p_r Σ gS)/(τ n_s) streamed over V_S tiles in the logits dtype.
Spans must have disjoint student rows; sparse teacher columns must be unique per row.
"""
from __future__ import annotations

import functools

import torch

from .pkl import _check_merge, _covered_rows, _inputs, _row_chunk_scale, _scale_rows

__all__ = ["hkl_rows", "hkl_rows_autograd"]

_SCRATCH_BYTES = 256 << 20  # per-block scratch budget (a, b, gS, top-m values / positions, sparse scratch)


@functools.cache
def _kernels():
    """Launchers of the merge, gradient and zero-row kernels, built on first use."""
    global _tl  # a module global: the interpreter resolves a kernel's names in its module only
    import triton
    import triton.language as tl

    from . import _tl

    @triton.jit
    def _hkl_merge_kernel(
        z_ptr, stride_z, t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, ucs_ptr, tmap_ptr,
        spans_ptr, schain_ptr, tchain_ptr, k0,
        a_ptr, b_ptr, gs_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, tacc_ptr, tcnt_ptr,
        V_S, V_T, C, inv_tau, tau,
        MEAN: tl.constexpr, CHAIN: tl.constexpr, SPARSE: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        kb = tl.program_id(0).to(tl.int64)
        k = k0 + kb
        a_row = a_ptr + kb * V_S
        gs_row = gs_ptr + kb * V_S
        b_row = b_ptr + kb * V_T
        tacc_row = tacc_ptr + kb * V_T
        tcnt_row = tcnt_ptr + kb * V_T
        c_s = _tl.chain_offset(schain_ptr, spans_ptr + 4 * k, CHAIN, BLOCK_S)
        c_t = _tl.chain_offset(tchain_ptr, spans_ptr + 4 * k + 2, CHAIN, BLOCK_T)
        s_lo, s_hi, t_lo, t_hi = _tl.chunk_rows(spans_ptr, k, MEAN)
        n_s = (s_hi - s_lo).to(tl.float32)

        # LSE of the student rows z_r/τ, and of the teacher rows t_r/τ over their allowed columns.
        for r in range(s_lo, s_hi):
            lse_r, _ = _tl.student_lse(z_ptr + r * stride_z, z_ptr, V_S, inv_tau, False, BLOCK_S)
            tl.store(lse_s_ptr + r, lse_r)
        for r in range(t_lo, t_hi):
            lse_r = _tl.teacher_lse(t_ptr + r * stride_t, tc_ptr + r * stride_tc, mask_ptr, C, inv_tau, SPARSE, BLOCK_T)
            tl.store(lse_t_ptr + r, lse_r)

        # a = exp S on U_S, −1 on common student ids.
        offs_s = tl.arange(0, BLOCK_S)
        for v0 in range(0, V_S, BLOCK_S):
            o = v0 + offs_s
            om = o < V_S
            sv = _tl.logp_sum(z_ptr, stride_z, lse_s_ptr, s_lo, s_hi, o, om, inv_tau, BLOCK_S)
            unc = tl.load(ucs_ptr + o, mask=om, other=0) != 0
            tl.store(a_row + o, tl.where(unc, tl.exp(sv / n_s + c_s), -1.0), mask=om)

        if SPARSE:
            _tl.scatter_later_rows(t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, lse_t_ptr, tacc_row, tcnt_row,
                                   t_lo, t_hi, C, inv_tau, BLOCK_T)

        # Teacher columns: T, P; common pairs -> KL and gS[s_c]; uncommon allowed columns -> b = P.
        kl = tl.zeros((), tl.float32)
        for c0 in range(0, C, BLOCK_T):
            o, v, inside, allowed = _tl.col_tile(tc_ptr + t_lo * stride_tc, mask_ptr, c0, C, SPARSE, BLOCK_T)
            tv, P, ok = _tl.teacher_merged(t_ptr, stride_t, lse_t_ptr, tacc_row, tcnt_row, t_lo, t_hi, o, v, allowed,
                                           c_t, inv_tau, SPARSE, BLOCK_T)
            sc = tl.load(tmap_ptr + v, mask=allowed, other=-1)
            com = allowed & (sc >= 0)
            sc = tl.where(com, sc, 0)
            s_c = _tl.logp_sum(z_ptr, stride_z, lse_s_ptr, s_lo, s_hi, sc, com, inv_tau, BLOCK_T) / n_s + c_s
            kl += tl.sum(tl.where(com & (P > 0), P * (tv - s_c), 0.0))
            tl.store(gs_row + sc, -tau * tau * P, mask=com)
            if SPARSE:  # b was pre-filled (0 on U_T, −1 elsewhere); only the teacher's own columns carry mass
                tl.store(b_row + v, P, mask=ok & ~com)
            else:
                tl.store(b_row + v, tl.where(allowed & ~com, P, -1.0), mask=inside)
        tl.store(kl_ptr + kb, kl * tau * tau)

        if SPARSE:  # leave the scratch rows all-zero for the next block
            tl.debug_barrier()
            _tl.clear_later_rows(tc_ptr, stride_tc, tacc_row, tcnt_row, t_lo, t_hi, C, BLOCK_T)

    @triton.jit
    def _hkl_grad_kernel(z_ptr, stride_z, spans_ptr, k0, gs_ptr, gsum_ptr, lse_s_ptr, dz_ptr, stride_dz,
                         V_S, inv_tau, MEAN: tl.constexpr, BLOCK_S: tl.constexpr):
        kb = tl.program_id(0).to(tl.int64)
        s_lo, s_hi, _, _ = _tl.chunk_rows(spans_ptr, k0 + kb, MEAN)
        coef = inv_tau / (s_hi - s_lo).to(tl.float32)
        gsum = tl.load(gsum_ptr + kb)
        offs = tl.arange(0, BLOCK_S)
        for v0 in range(0, V_S, BLOCK_S):
            o = v0 + offs
            om = o < V_S
            g = tl.load(gs_ptr + kb * V_S + o, mask=om, other=0.0)
            for r in range(s_lo, s_hi):
                p = _tl.softmax_tile(z_ptr + r * stride_z, o, om, inv_tau, tl.load(lse_s_ptr + r))
                tl.store(dz_ptr + r * stride_dz + o, (coef * (g - p * gsum)).to(dz_ptr.dtype.element_ty), mask=om)

    merge_cfg = [triton.Config({"BLOCK_S": bs, "BLOCK_T": bt}, num_warps=nw)
                 for bs, bt, nw in ((1024, 256, 4), (2048, 512, 8), (4096, 512, 16))]
    grad_cfg = [triton.Config({"BLOCK_S": bs}, num_warps=nw) for bs, nw in ((1024, 4), (2048, 8), (4096, 16))]
    return (_tl.launcher(_hkl_merge_kernel, dict(BLOCK_S=128, BLOCK_T=64), merge_cfg,
                         key=["V_S", "V_T", "C", "MEAN", "SPARSE"]),
            _tl.launcher(_hkl_grad_kernel, dict(BLOCK_S=128), grad_cfg, key=["V_S", "MEAN"]),
            _tl.launcher(_tl.zero_uncovered_rows, dict(BLOCK=128), [triton.Config({"BLOCK": 2048}, num_warps=8)]))


def _chunks_per_block(V_S: int, V_T: int, m_up: int, sparse: bool) -> int:
    """Chunks per block so that a, b, gS, the top-m values/positions and the sparse scratch fit the budget."""
    per_chunk = 4 * (2 * V_S + V_T) + 2 * 12 * m_up + (8 * V_T if sparse else 0)
    return max(1, _SCRATCH_BYTES // per_chunk)


def hkl_rows(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, teacher_is_logprob,
             common_s, common_t, uncommon_topk, want_grad_chain=False):
    """Row-space H-KL / GOLD / ULD (contract in ops.fallback): -> (loss [K] f32, grad [N_s, V_S]) and, with
    ``want_grad_chain``, d Σ loss / d s_chain [N_s] f32 (nonzero at rows after a chunk's first; merge="chain").
    Common pairs whose teacher id is outside ``col_mask`` are ignored (their student id becomes uncommon).
    ``teacher_is_logprob`` does not change the math (log π = log-softmax of t/τ over the allowed columns)."""
    del teacher_is_logprob
    _check_merge(merge, s_chain=s_chain, t_chain=t_chain)
    sparse = t_cols is not None
    s_logits, t_vals, t_cols, spans = _inputs(s_logits, t_vals, t_cols, spans)
    device = s_logits.device
    (N_s, V_S), V_T, K, C = s_logits.shape, col_mask.numel(), spans.shape[0], t_vals.shape[1]
    tau = float(temperature)
    f32 = dict(dtype=torch.float32, device=device)

    # Common pairs with an allowed teacher id: teacher -> student map, uncommon-student flags, m (on device).
    cs, ct = common_s.to(device).long(), common_t.to(device).long()
    keep = col_mask[ct]
    tmap = torch.full((V_T,), -1, dtype=torch.int64, device=device)
    tmap.scatter_(0, ct, torch.where(keep, cs, -1))
    ucs = torch.ones(V_S, dtype=torch.int8, device=device)
    ucs.scatter_(0, cs, torch.where(keep, 0, 1).to(torch.int8))
    u_t = col_mask & (tmap < 0)
    n_keep = keep.sum()
    cap = V_S if uncommon_topk is None else int(uncommon_topk)
    m_up = min(V_S, V_T, cap)  # host upper bound of m; positions >= m are masked on device (no sync)
    m_dev = torch.minimum(torch.minimum(V_S - n_keep, u_t.sum()), torch.tensor(cap, device=device))

    loss = torch.zeros(K, **f32)
    grad = torch.empty_like(s_logits)
    gsum_all = torch.zeros(K, **f32)
    mask8 = col_mask.to(torch.int8)
    lse_s = torch.empty(N_s, **f32)
    lse_t = torch.empty(t_vals.shape[0], **f32)
    chain = merge == "chain"
    s_ch = s_chain.to(**f32).contiguous() if chain else lse_s
    t_ch = t_chain.to(**f32).contiguous() if chain else lse_t
    per_block = _chunks_per_block(V_S, V_T, m_up, sparse)
    merge_k, grad_k, zero_k = _kernels()
    b_init = torch.where(u_t, 0.0, -1.0).to(torch.float32)
    if sparse:
        n_scratch = min(per_block, K)
        tacc = torch.zeros(n_scratch, V_T, **f32)
        tcnt = torch.zeros(n_scratch, V_T, dtype=torch.int32, device=device)
    else:
        tacc = tcnt = loss  # unused placeholders
    pos = torch.arange(m_up, device=device)
    in_m = pos < m_dev
    tt = tau * tau
    for k0 in range(0, K, per_block):
        Kb = min(per_block, K - k0)
        a = torch.empty(Kb, V_S, **f32)
        b = b_init.expand(Kb, V_T).contiguous() if sparse else torch.empty(Kb, V_T, **f32)
        gS = torch.zeros(Kb, V_S, **f32)
        kl = torch.empty(Kb, **f32)
        merge_k((Kb,), s_logits, s_logits.stride(0), t_vals, t_vals.stride(0), t_cols, t_cols.stride(0), mask8, ucs,
                tmap, spans, s_ch, t_ch, k0, a, b, gS, kl, lse_s, lse_t, tacc, tcnt, V_S, V_T, C, 1.0 / tau, tau,
                MEAN=merge == "mean", CHAIN=chain, SPARSE=sparse)
        l1 = torch.zeros(Kb, **f32)
        if m_up > 0:
            av, apos = _top(a, m_up)
            bv = _top(b, m_up)[0]
            diff = torch.where(in_m, av - bv, 0.0)
            l1 = diff.abs().sum(1)
            gS.scatter_add_(1, apos, tt * torch.sign(diff) * av)
        loss[k0:k0 + Kb] = kl + tt * l1
        gsum = gS.sum(1)
        gsum_all[k0:k0 + Kb] = gsum
        grad_k((Kb,), s_logits, s_logits.stride(0), spans, k0, gS, gsum, lse_s, grad, grad.stride(0), V_S, 1.0 / tau,
               MEAN=merge == "mean")
    n_prog = max(1, min(N_s, 1024 if device.type == "cuda" else 2))
    zero_k((n_prog,), grad, grad.stride(0), _covered_rows(spans, merge, N_s), N_s, V_S)
    if not want_grad_chain:
        return loss, grad
    grad_chain = torch.zeros(N_s, **f32)
    if chain and K:
        later = torch.stack([spans[:, 0] + 1, spans[:, 1]], 1)
        grad_chain = _row_chunk_scale(later, gsum_all, N_s)
    return loss, grad, grad_chain


def _top(x: torch.Tensor, m: int):
    """Largest m values per row, sorted descending."""
    if 4 * m < x.shape[1]:
        return torch.topk(x, m, dim=1)
    vals, pos = torch.sort(x, dim=1, descending=True, stable=True)
    return vals[:, :m], pos[:, :m]


# torch.library custom op xtoken::hkl_rows (schema of xtoken::hkl_rows_fallback) -> (loss, grad, grad_chain).
# Backward scales each chunk's gradient rows (and chain-scalar gradients) by its grad_output.

@torch.library.custom_op("xtoken::hkl_rows", mutates_args=())
def _hkl_op(s_logits: torch.Tensor, t_vals: torch.Tensor, t_cols: torch.Tensor | None, col_mask: torch.Tensor,
            spans: torch.Tensor, temperature: float, merge: str, s_chain: torch.Tensor | None,
            t_chain: torch.Tensor | None, common_s: torch.Tensor, common_t: torch.Tensor,
            uncommon_topk: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hkl_rows(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, False,
                    common_s, common_t, uncommon_topk, want_grad_chain=True)


@_hkl_op.register_fake
def _(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
      uncommon_topk):
    return (s_logits.new_empty(spans.shape[0], dtype=torch.float32), torch.empty_like(s_logits),
            s_logits.new_empty(s_logits.shape[0], dtype=torch.float32))


def _hkl_setup(ctx, inputs, output):
    ctx.has_chain = inputs[7] is not None
    ctx.save_for_backward(inputs[4], output[1], output[2])


def _hkl_backward(ctx, g_loss, _g_grad, _g_chain):
    spans, grad, grad_chain = ctx.saved_tensors
    d_grad, scale = _scale_rows(spans, grad, g_loss)
    return (d_grad,) + (None,) * 6 + (grad_chain * scale if ctx.has_chain else None,) + (None,) * 4


_hkl_op.register_autograd(_hkl_backward, setup_context=_hkl_setup)


def hkl_rows_autograd(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain,
                      teacher_is_logprob, common_s, common_t, uncommon_topk) -> torch.Tensor:
    """Differentiable per-chunk H-KL / GOLD / ULD [K] (``xtoken::hkl_rows``): gradients flow to ``s_logits`` and
    ``s_chain``. Arguments as in :func:`hkl_rows`."""
    del teacher_is_logprob
    return torch.ops.xtoken.hkl_rows(s_logits, t_vals, t_cols, col_mask, spans, float(temperature), merge, s_chain,
                                     t_chain, common_s, common_t, uncommon_topk)[0]
