"""Fused H-KL / GOLD / ULD Triton kernels, imported lazily by ``ops.hkl`` (its ``triton`` backend); math in
``ops.hkl``'s docstring. Chunks are processed in blocks sized to a scratch budget:
  `_hkl_merge_kernel` (one program per chunk of the block): online LSE of every student and teacher row, the merged S
    written as exp S on U_S (−1 on common ids) into a[kb, V_S], the merged T walked over teacher columns (all of V_T,
    or the first row's k columns for a sparse teacher, intersected with the later rows' columns through a
    per-program scratch), P written on U_T into b[kb, V_T] (−1 outside U_T), and the common-set KL with its
    gradient −τ² P[t_c] stored at s_c (S[s_c] gathered from the logit rows through a teacher→student id map).
  torch: top-m of a and b per chunk, the L1 and its gradient τ² sign·a scattered back to the sorted student ids.
  `_hkl_grad_kernel`: dz_r = (gS − p_r Σ gS)/(τ n_s) streamed over V_S tiles in the logits dtype.
Sparse teacher columns must be unique per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tl
from ._common import covered_rows, top

_SCRATCH_BYTES = 256 << 20  # per-block scratch budget (a, b, gS, top-m values / positions, sparse scratch)


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

    tl.debug_barrier()  # lse_s / lse_t were stored by single lanes and are read by every lane below

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


_merge = _tl.launcher(_hkl_merge_kernel, dict(BLOCK_S=128, BLOCK_T=64),
                      [triton.Config({"BLOCK_S": bs, "BLOCK_T": bt}, num_warps=nw)
                       for bs, bt, nw in ((1024, 256, 4), (2048, 512, 8), (4096, 512, 16))],
                      key=["V_S", "V_T", "C", "MEAN", "SPARSE"])
_grad = _tl.launcher(_hkl_grad_kernel, dict(BLOCK_S=128),
                     [triton.Config({"BLOCK_S": bs}, num_warps=nw) for bs, nw in ((1024, 4), (2048, 8), (4096, 16))],
                     key=["V_S", "MEAN"])
_zero = _tl.launcher(_tl.zero_uncovered_rows, dict(BLOCK=128), [triton.Config({"BLOCK": 2048}, num_warps=8)])


def _chunks_per_block(V_S: int, V_T: int, m_up: int, sparse: bool) -> int:
    """Chunks per block so that a, b, gS, the top-m values/positions and the sparse scratch fit the budget."""
    per_chunk = 4 * (2 * V_S + V_T) + 2 * 12 * m_up + (8 * V_T if sparse else 0)
    return max(1, _SCRATCH_BYTES // per_chunk)


def hkl_rows(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
             uncommon_topk):
    """The ``triton`` backend of ``xtoken::hkl_rows`` (contract in ops.hkl): -> (loss [K] f32, grad in the logits'
    dtype, Σ_v ∂L/∂S_k[v] [K] f32). No host sync: m is kept on the device, positions past it are masked."""
    sparse = t_cols is not None
    device = s_logits.device
    t_cols = t_vals if t_cols is None else t_cols  # dense: a placeholder, unused with SPARSE=False
    (N_s, V_S), V_T, K, C = s_logits.shape, col_mask.numel(), spans.shape[0], t_vals.shape[1]
    tau, chain = float(temperature), merge == "chain"
    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.zeros(K, **f32)
    grad = torch.empty_like(s_logits)
    gsum_all = torch.zeros(K, **f32)
    lse_s = torch.empty(N_s, **f32)
    lse_t = torch.empty(t_vals.shape[0], **f32)
    s_ch = s_chain.to(**f32).contiguous() if chain else lse_s
    t_ch = t_chain.to(**f32).contiguous() if chain else lse_t
    # Common pairs with an allowed teacher id: teacher -> student map, uncommon-student flags, m (on device).
    cs, ct = common_s.long(), common_t.long()
    keep = col_mask[ct]
    tmap = torch.full((V_T,), -1, dtype=torch.int64, device=device).scatter_(0, ct, torch.where(keep, cs, -1))
    ucs = torch.ones(V_S, dtype=torch.int8, device=device).scatter_(0, cs, (~keep).to(torch.int8))
    u_t = col_mask & (tmap < 0)
    cap = V_S if uncommon_topk is None else uncommon_topk
    m_up = min(V_S, V_T, cap)  # host upper bound of m
    m_dev = torch.minimum(V_S - keep.sum(), u_t.sum()).clamp(max=cap)
    in_m = torch.arange(m_up, device=device) < m_dev
    mask8 = col_mask.to(torch.int8)
    per_block = _chunks_per_block(V_S, V_T, m_up, sparse)
    b_init = torch.where(u_t, 0.0, -1.0).to(torch.float32)
    if sparse:
        n_scratch = min(per_block, K)
        tacc = torch.zeros(n_scratch, V_T, **f32)
        tcnt = torch.zeros(n_scratch, V_T, dtype=torch.int32, device=device)
    else:
        tacc = tcnt = loss  # unused placeholders
    tt = tau * tau
    for k0 in range(0, K, per_block):
        Kb = min(per_block, K - k0)
        a = torch.empty(Kb, V_S, **f32)
        b = b_init.expand(Kb, V_T).contiguous() if sparse else torch.empty(Kb, V_T, **f32)
        gS = torch.zeros(Kb, V_S, **f32)
        kl = torch.empty(Kb, **f32)
        _merge((Kb,), s_logits, s_logits.stride(0), t_vals, t_vals.stride(0), t_cols, t_cols.stride(0), mask8, ucs,
               tmap, spans, s_ch, t_ch, k0, a, b, gS, kl, lse_s, lse_t, tacc, tcnt, V_S, V_T, C, 1.0 / tau, tau,
               MEAN=merge == "mean", CHAIN=chain, SPARSE=sparse)
        l1 = torch.zeros(Kb, **f32)
        if m_up > 0:
            av, apos = top(a, m_up)
            bv = top(b, m_up)[0]
            diff = torch.where(in_m, av - bv, 0.0)
            l1 = diff.abs().sum(1)
            gS.scatter_add_(1, apos, tt * torch.sign(diff) * av)
        loss[k0:k0 + Kb] = kl + tt * l1
        gsum = gS.sum(1)
        gsum_all[k0:k0 + Kb] = gsum
        _grad((Kb,), s_logits, s_logits.stride(0), spans, k0, gS, gsum, lse_s, grad, grad.stride(0), V_S, 1.0 / tau,
              MEAN=merge == "mean")
    n_prog = max(1, min(N_s, 1024 if device.type == "cuda" else 2))
    _zero((n_prog,), grad, grad.stride(0), covered_rows(spans, merge, N_s), N_s, V_S)
    return loss, grad, gsum_all
