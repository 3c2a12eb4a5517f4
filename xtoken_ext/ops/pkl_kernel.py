"""Fused P-KL Triton kernel: per-chunk loss and its gradient wrt the student logits (and, optionally, the W
weights) in one launch. Imported lazily by ``ops.pkl`` (its ``triton`` backend); math in ``ops.pkl``'s docstring.

One program per chunk, persistent over chunks; all math fp32, int64 row offsets:
  A: per student row, online LSE over V_S tiles and Z_r;  B: per teacher row, LSE over A (dense) or its columns ∩ A
  (sparse);  C: over teacher-column tiles (all of V_T, or the first teacher row's k columns): Qu via the CSC
  column lists, T, loss, M, and h into a per-program fp32 scratch row of |V_T| (sparse: rows after the first are
  scattered into two more scratch rows first, to intersect their column sets);  D: per student tile, the ELL
  gather H_s and the gradient (and the W gradient). Rows outside every chunk get a zero gradient.
Sparse teacher columns must be unique per row.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from . import _tl
from ._common import SLOTS, covered_rows


@triton.jit
def _pkl_kernel(
    z_ptr, stride_z, t_ptr, stride_t, tc_ptr, stride_tc,
    a_ptr, widx_ptr, wval_ptr, colptr_ptr, rowidx_ptr, cscval_ptr, mask_ptr,
    spans_ptr, tchain_ptr, scale_ptr, covered_ptr,
    loss_ptr, dz_ptr, stride_dz, gw_ptr, gw_prog_stride,
    lse_s_ptr, zr_ptr, dr_ptr, lse_t_ptr, h_ptr, tacc_ptr, tcnt_ptr,
    K, N_s, V_S, V_T, C, inv_tau, tau, eps,
    MEAN: tl.constexpr, CHAIN: tl.constexpr, SPARSE: tl.constexpr,
    GRAD_W: tl.constexpr, ATOMIC_W: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr, SLOTS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    slot = pid.to(tl.int64) * V_T
    h_row = h_ptr + slot
    tacc_row = tacc_ptr + slot
    tcnt_row = tcnt_ptr + slot
    gw_row = gw_ptr + pid.to(tl.int64) * gw_prog_stride
    offs_s = tl.arange(0, BLOCK_S)
    offs_t = tl.arange(0, BLOCK_T)
    for k in range(pid, K, nprog):
        c_t = _tl.chain_offset(tchain_ptr, spans_ptr + 4 * k + 2, CHAIN, BLOCK_T)
        s_lo, s_hi, t_lo, t_hi = _tl.chunk_rows(spans_ptr, k, MEAN)
        n_s = (s_hi - s_lo).to(tl.float32)

        # A: student rows, lse_r = LSE(z_r/τ) and Z_r = Σ p_r a (online over V_S tiles).
        z_sum = tl.zeros((), tl.float32)
        for r in range(s_lo, s_hi):
            lse_r, z_r = _tl.student_lse(z_ptr + r * stride_z, a_ptr, V_S, inv_tau, True, BLOCK_S)
            tl.store(lse_s_ptr + r, lse_r)
            tl.store(zr_ptr + r, z_r)
            z_sum += z_r
        Z = z_sum / n_s

        # B: teacher rows, LSE over the allowed columns of t_r/τ.
        for r in range(t_lo, t_hi):
            lse_r = _tl.teacher_lse(t_ptr + r * stride_t, tc_ptr + r * stride_tc, mask_ptr, C, inv_tau, SPARSE,
                                    BLOCK_T)
            tl.store(lse_t_ptr + r, lse_r)
        if SPARSE:
            _tl.scatter_later_rows(t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, lse_t_ptr, tacc_row, tcnt_row,
                                   t_lo, t_hi, C, inv_tau, BLOCK_T)

        # lse_s / lse_t were stored by single lanes above and are read by every lane below.
        tl.debug_barrier()

        # C: teacher-column tiles: T, P, Qu (CSC gather), loss, M, h.
        loss = tl.zeros((), tl.float32)
        M = tl.zeros((), tl.float32)
        for c0 in range(0, C, BLOCK_T):
            o, v, inside, ok = _tl.col_tile(tc_ptr + t_lo * stride_tc, mask_ptr, c0, C, SPARSE, BLOCK_T)
            tv, P, ok = _tl.teacher_merged(t_ptr, stride_t, lse_t_ptr, tacc_row, tcnt_row, t_lo, t_hi, o, v, ok,
                                           c_t, inv_tau, SPARSE, BLOCK_T)
            # Qu[v] = mean_r Σ_{s→v} W_sv p_r[s]: ragged column lists, masked lanes have length 0.
            start = tl.load(colptr_ptr + v, mask=ok, other=0)
            length = tl.load(colptr_ptr + v + 1, mask=ok, other=0) - start
            qu = tl.zeros((BLOCK_T,), tl.float32)
            for j in range(0, tl.max(length)):
                jm = j < length
                s = tl.load(rowidx_ptr + start + j, mask=jm, other=0)
                w = tl.load(cscval_ptr + start + j, mask=jm, other=0.0)
                pr = tl.zeros((BLOCK_T,), tl.float32)
                for r in range(s_lo, s_hi):
                    pr += _tl.softmax_tile(z_ptr + r * stride_z, s, jm, inv_tau, tl.load(lse_s_ptr + r))
                qu += w * pr
            q = qu / (n_s * Z)
            live = P > 0
            loss += tl.sum(tl.where(live, P * (tv - tl.log(q + eps)), 0.0))
            h = tl.where(live, P / (q + eps), 0.0)
            M += tl.sum(h * q)
            # dense: every column is written (0 outside A); sparse: only this row's columns, the rest of
            # the scratch row stays 0 and is cleared again below.
            tl.store(h_row + v, h, mask=ok if SPARSE else inside)
        tl.store(loss_ptr + k, loss * tau * tau)

        # D: gradient rows (and the W gradient).
        tl.debug_barrier()
        if HAS_SCALE:
            scale = tl.load(scale_ptr + k)
        else:
            scale = 1.0
        if s_hi - s_lo > 1:
            # D_r = Σ_s p_r[s] H_s needs its own sweep over the row before the gradient is written.
            for r in range(s_lo, s_hi):
                lse_r = tl.load(lse_s_ptr + r)
                d = tl.zeros((), tl.float32)
                for v0 in range(0, V_S, BLOCK_S):
                    o = v0 + offs_s
                    om = o < V_S
                    hs = _tl.ell_gather(widx_ptr, wval_ptr, h_row, o, om, SLOTS, BLOCK_S)
                    d += tl.sum(_tl.softmax_tile(z_ptr + r * stride_z, o, om, inv_tau, lse_r) * hs)
                tl.store(dr_ptr + r, d)
        else:
            tl.store(dr_ptr + s_lo, Z * M)
        tl.debug_barrier()
        # No teacher mass on A (M = 0): loss 0 and gradient 0, also when Z = 0 (as the other backends give).
        coef = tl.where(M > 0, tau / (n_s * Z) * scale, 0.0)
        for v0 in range(0, V_S, BLOCK_S):
            o = v0 + offs_s
            om = o < V_S
            a = tl.load(a_ptr + o, mask=om, other=0.0)
            hs = _tl.ell_gather(widx_ptr, wval_ptr, h_row, o, om, SLOTS, BLOCK_S)
            pbar = tl.zeros((BLOCK_S,), tl.float32)
            for r in range(s_lo, s_hi):
                p = _tl.softmax_tile(z_ptr + r * stride_z, o, om, inv_tau, tl.load(lse_s_ptr + r))
                # (D_r − H_s) and (a_s − Z_r) are each formed before the product: the 1 − g
                # cancellation stays in fp32 at the scale of its terms.
                dz = coef * p * ((tl.load(dr_ptr + r) - hs) + M * (a - tl.load(zr_ptr + r)))
                tl.store(dz_ptr + r * stride_dz + o, dz.to(dz_ptr.dtype.element_ty), mask=om)
                pbar += p
            if GRAD_W:
                cw = tau * coef
                for sl in tl.static_range(SLOTS):
                    ci = tl.load(widx_ptr + o * SLOTS + sl, mask=om, other=-1)
                    cm = ci >= 0
                    ci = tl.where(cm, ci, 0)
                    in_a = cm & (tl.load(mask_ptr + ci, mask=cm, other=0) != 0)
                    gw = tl.where(in_a, cw * pbar * (M - tl.load(h_row + ci, mask=in_a, other=0.0)), 0.0)
                    if ATOMIC_W:
                        tl.atomic_add(gw_row + o * SLOTS + sl, gw, mask=om, sem="relaxed")
                    else:  # this program's own partial row: plain read-modify-write, reduced later
                        prev = tl.load(gw_row + o * SLOTS + sl, mask=om, other=0.0)
                        tl.store(gw_row + o * SLOTS + sl, prev + gw, mask=om)
        tl.debug_barrier()
        if SPARSE:  # leave the scratch rows all-zero for the next chunk
            for c0 in range(0, C, BLOCK_T):
                o = c0 + offs_t
                v = tl.load(tc_ptr + t_lo * stride_tc + o, mask=o < C, other=-1)
                tl.store(h_row + v, tl.zeros((BLOCK_T,), tl.float32), mask=v >= 0)
            _tl.clear_later_rows(tc_ptr, stride_tc, tacc_row, tcnt_row, t_lo, t_hi, C, BLOCK_T)
            tl.debug_barrier()

    # Rows that no chunk's (effective) span covers get a zero gradient.
    _tl.zero_uncovered_rows(dz_ptr, stride_dz, covered_ptr, N_s, V_S, BLOCK_S)


_launch = _tl.launcher(
    _pkl_kernel, dict(BLOCK_S=128, BLOCK_T=64),
    [triton.Config({"BLOCK_S": bs, "BLOCK_T": bt}, num_warps=nw)
     for bs, bt, nw in ((1024, 256, 4), (2048, 256, 8), (4096, 512, 8), (4096, 512, 16))],
    key=["V_S", "V_T", "C", "MEAN", "SPARSE", "GRAD_W"], reset_to_zero=["gw_ptr"])

_CSC_CACHE: dict[int, tuple] = {}


def _csc_structure(w_idx: torch.Tensor, V_T: int):
    """(col_ptr int64 [V_T+1], row_idx int32 [4V_S], perm int64 [4V_S]) of the ELL slots sorted by column.

    Empty slots sort last (key V_T), so entries past col_ptr[V_T] are never read and no host sync is needed.
    The CSC values are w_val.flatten()[perm] (per call: W may be learnable). Cached per w_idx tensor."""
    key = id(w_idx)
    hit = _CSC_CACHE.get(key)
    if hit is not None and hit[0]() is w_idx and hit[1] == (w_idx._version, V_T):
        return hit[2]
    flat = w_idx.reshape(-1).long()
    col = torch.where(flat >= 0, flat, V_T)
    perm = torch.argsort(col, stable=True)
    col_ptr = torch.searchsorted(col[perm], torch.arange(V_T + 1, device=w_idx.device))
    out = (col_ptr, (perm // SLOTS).to(torch.int32), perm)
    if len(_CSC_CACHE) >= 16:
        _CSC_CACHE.clear()
    _CSC_CACHE[key] = (weakref.ref(w_idx), (w_idx._version, V_T), out)
    return out


def _num_programs(K: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(K, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(K, 2))


def pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
             chunk_scale, need_grad_w):
    """The ``triton`` backend of ``xtoken::pkl_rows`` (contract in ops.pkl): -> (loss [K] f32, grad in the logits'
    dtype, grad_w [V_S, 4] f32 or None). Deterministic W gradient (per-program partials reduced in a fixed order)
    when ``torch.are_deterministic_algorithms_enabled()``, relaxed fp32 atomics otherwise."""
    sparse = t_cols is not None
    device = s_logits.device
    t_cols = t_vals if t_cols is None else t_cols  # dense: a placeholder, unused with SPARSE=False
    (N_s, V_S), V_T, K, C = s_logits.shape, col_mask.numel(), spans.shape[0], t_vals.shape[1]
    f32 = dict(dtype=torch.float32, device=device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    loss = torch.zeros(K, **f32)
    grad = torch.empty_like(s_logits)
    if K == 0:
        return loss, grad.zero_(), (torch.zeros(V_S, SLOTS, **f32) if need_grad_w else None)

    w_idx = w_idx.to(torch.int32).contiguous()
    w_val = w_val.detach().to(torch.float32).contiguous()
    col_ptr, row_idx, perm = _csc_structure(w_idx, V_T)
    csc_val = w_val.reshape(-1)[perm]
    in_a = (w_idx >= 0) & (col_mask[w_idx.long().clamp(min=0)])
    a = (w_val * in_a).sum(1)
    nprog = _num_programs(K, device)
    h = torch.zeros(nprog, V_T, **f32)
    if sparse:
        tacc = torch.zeros(nprog, V_T, **f32)
        tcnt = torch.zeros(nprog, V_T, dtype=torch.int32, device=device)
    else:
        tacc, tcnt = h, h  # unused placeholders (SPARSE=False)
    grad_w_buf = torch.zeros(nprog if deterministic else 1, V_S, SLOTS, **f32) if need_grad_w else loss
    row_stats = torch.empty(3, N_s, **f32)
    lse_t = torch.empty(t_vals.shape[0], **f32)
    chain = t_chain.to(**f32).contiguous() if merge == "chain" else loss
    scale = chunk_scale.to(**f32).contiguous() if chunk_scale is not None else loss
    _launch((nprog,),
            s_logits, s_logits.stride(0), t_vals, t_vals.stride(0), t_cols, t_cols.stride(0),
            a, w_idx, w_val, col_ptr, row_idx, csc_val, col_mask.to(torch.int8), spans, chain, scale,
            covered_rows(spans, merge, N_s), loss, grad, grad.stride(0),
            grad_w_buf, V_S * SLOTS if (need_grad_w and deterministic) else 0,
            row_stats[0], row_stats[1], row_stats[2], lse_t, h, tacc, tcnt,
            K, N_s, V_S, V_T, C, 1.0 / float(temperature), float(temperature), float(eps),
            MEAN=merge == "mean", CHAIN=merge == "chain", SPARSE=sparse, GRAD_W=need_grad_w,
            ATOMIC_W=not deterministic, HAS_SCALE=chunk_scale is not None, SLOTS=SLOTS)
    return loss, grad, (grad_w_buf.sum(0) if need_grad_w else None)  # fixed-order reduction of the partials
