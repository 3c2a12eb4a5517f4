"""Fused P-KL (Triton): loss per chunk and its gradient wrt the student logits (and, optionally, the W weights)
in one launch. The loss is terminal, so the gradient is computed in the forward and only rescaled in backward.

Math for one chunk (student rows R_S, n_s = |R_S|; teacher rows R_T, n_t; temperature τ; allowed columns A):
  p_r = softmax(z_r/τ), a_s = Σ_k W_sk [col_sk ∈ A]             (student mass that W sends into A)
  Z_r = Σ_s p_r[s] a_s, Z = mean_r Z_r                            (= Σ_{v∈A} Qu[v])
  Qu[v] = mean_r Σ_{s→v} W_sv p_r[s]   (CSC gather),   Q = Qu / Z
  T[v] = mean_r log π_r[v] (+ chain scalar),  P = exp T
  L = τ² Σ_{v∈A} P (T − log(Q + eps))
  h[v] = P[v] / (Q[v] + eps) (0 outside A),  M = Σ_v P Q / (Q + eps)
  g = ∂L/∂Qu = (τ²/Z)(M − h) on A  (Q's renormalization included; ⟨Qu, g⟩ = 0)
  H_s = Σ_k W_sk h[col_sk]  (ELL gather),  D_r = Σ_s p_r[s] H_s  (= Z·M when n_s = 1)
  ∂L/∂z_r[s] = (τ / (n_s Z)) p_r[s] ((D_r − H_s) + M (a_s − Z_r))
  ∂L/∂W_sk   = (τ²/Z) mean_r p_r[s] (M − h[col_sk]) [col_sk ∈ A]
Merge "first" uses the first row of each side; "chain" adds Σ_{r>first} t_chain[r] to T (the student's chain
scalar multiplies Q and cancels in its renormalization, so its gradient is 0).

Kernel (one program per chunk, persistent over chunks; all math fp32, int64 row offsets):
  A: per student row, online LSE over V_S tiles and Z_r;  B: per teacher row, LSE over A (dense) or its columns ∩ A
  (sparse);  C: over teacher-column tiles (all of V_T, or the first teacher row's k columns): Qu via the CSC
  column lists, T, loss, M, and h into a per-program fp32 scratch row of |V_T| (sparse: rows after the first are
  scattered into two more scratch rows first, to intersect their column sets);  D: per student tile, the ELL
  gather H_s and the gradient (and the W gradient). Rows outside every chunk get a zero gradient.
Spans must have disjoint student rows (row_spans() guarantees it); sparse teacher columns must be unique per row.
"""
from __future__ import annotations

import functools
import os
import weakref

import torch

__all__ = ["pkl_rows", "pkl_rows_autograd"]

_SLOTS = 4


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels():
    """The kernel's launcher, built on first use (TRITON_INTERPRET is read when a kernel is decorated)."""
    global _tl  # a module global: the interpreter resolves a kernel's names in its module only
    import triton
    import triton.language as tl

    from . import _tl

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
        BLOCK_T: tl.constexpr,
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
                        hs = _tl.ell_gather(widx_ptr, wval_ptr, h_row, o, om, 4, BLOCK_S)
                        d += tl.sum(_tl.softmax_tile(z_ptr + r * stride_z, o, om, inv_tau, lse_r) * hs)
                    tl.store(dr_ptr + r, d)
            else:
                tl.store(dr_ptr + s_lo, Z * M)
            tl.debug_barrier()
            coef = tau / (n_s * Z) * scale
            for v0 in range(0, V_S, BLOCK_S):
                o = v0 + offs_s
                om = o < V_S
                a = tl.load(a_ptr + o, mask=om, other=0.0)
                hs = _tl.ell_gather(widx_ptr, wval_ptr, h_row, o, om, 4, BLOCK_S)
                pbar = tl.zeros((BLOCK_S,), tl.float32)
                for r in range(s_lo, s_hi):
                    p = _tl.softmax_tile(z_ptr + r * stride_z, o, om, inv_tau, tl.load(lse_s_ptr + r))
                    # (D_r − H_s) and (a_s − Z_r) are each formed before the product: the 1 − g
                    # cancellation stays in fp32 at the scale of its terms.
                    dz = coef * p * ((tl.load(dr_ptr + r) - hs) + M * (a - tl.load(zr_ptr + r)))
                    tl.store(dz_ptr + r * stride_dz + o, dz.to(dz_ptr.dtype.element_ty), mask=om)
                    pbar += p
                if GRAD_W:
                    cw = tau * tau / (n_s * Z) * scale
                    for sl in tl.static_range(4):
                        ci = tl.load(widx_ptr + o * 4 + sl, mask=om, other=-1)
                        cm = ci >= 0
                        ci = tl.where(cm, ci, 0)
                        in_a = cm & (tl.load(mask_ptr + ci, mask=cm, other=0) != 0)
                        gw = tl.where(in_a, cw * pbar * (M - tl.load(h_row + ci, mask=in_a, other=0.0)), 0.0)
                        if ATOMIC_W:
                            tl.atomic_add(gw_row + o * 4 + sl, gw, mask=om)
                        else:  # this program's own partial row: plain read-modify-write, reduced later
                            prev = tl.load(gw_row + o * 4 + sl, mask=om, other=0.0)
                            tl.store(gw_row + o * 4 + sl, prev + gw, mask=om)
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

    configs = [triton.Config({"BLOCK_S": bs, "BLOCK_T": bt}, num_warps=nw)
               for bs, bt, nw in ((1024, 256, 4), (2048, 256, 8), (4096, 512, 8), (4096, 512, 16))]
    return _tl.launcher(_pkl_kernel, dict(BLOCK_S=128, BLOCK_T=64), configs,
                        key=["V_S", "V_T", "C", "MEAN", "SPARSE", "GRAD_W"], reset_to_zero=["gw_ptr"])


# --------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------

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
    out = (col_ptr, (perm // _SLOTS).to(torch.int32), perm)
    if len(_CSC_CACHE) >= 16:
        _CSC_CACHE.clear()
    _CSC_CACHE[key] = (weakref.ref(w_idx), (w_idx._version, V_T), out)
    return out


def _covered_rows(spans: torch.Tensor, merge: str, n: int) -> torch.Tensor:
    """int8 [n]: 1 for the student rows some chunk merges, [lo, hi) ("mean") or lo alone ("first"/"chain")
    (difference array + cumsum, no host sync)."""
    lo = spans[:, 0]
    hi = spans[:, 1] if merge == "mean" else lo + 1
    d = torch.zeros(n + 1, dtype=torch.int32, device=spans.device)
    d.index_add_(0, lo, torch.ones_like(lo, dtype=torch.int32))
    d.index_add_(0, hi, -torch.ones_like(hi, dtype=torch.int32))
    return (torch.cumsum(d, 0)[:n] > 0).to(torch.int8)


def _check_device(device: torch.device):
    if device.type != "cuda" and not _interpret():
        raise RuntimeError("the Triton ops need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
                           f"to run on {device.type} tensors")


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _inputs(s_logits, t_vals, t_cols, spans):
    """(s_logits, t_vals, t_cols, spans) checked and in kernel layout: row-major logits and detached teacher values,
    int64 row-major teacher columns (dense: t_vals stands in, unused with SPARSE=False), int64 spans."""
    device = s_logits.device
    _check_device(device)
    t_vals = _row_major(t_vals.detach())
    t_cols = t_vals if t_cols is None else _row_major(t_cols.to(device=device, dtype=torch.int64))
    return _row_major(s_logits), t_vals, t_cols, spans.to(device=device, dtype=torch.int64).contiguous()


def _num_programs(K: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(K, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(K, 2))


def _launch(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
            chunk_scale, need_grad_w, deterministic):
    sparse = t_cols is not None
    s_logits, t_vals, t_cols, spans = _inputs(s_logits, t_vals, t_cols, spans)
    device = s_logits.device
    (N_s, V_S), V_T, K, C = s_logits.shape, col_mask.numel(), spans.shape[0], t_vals.shape[1]
    w_idx = w_idx.to(torch.int32).contiguous()
    w_val = w_val.detach().to(torch.float32).contiguous()
    mask = col_mask.to(torch.int8).contiguous()
    f32 = dict(dtype=torch.float32, device=device)

    loss = torch.zeros(K, **f32)
    grad = torch.empty_like(s_logits)
    grad_w = None
    if K == 0:
        return loss, grad.zero_(), (torch.zeros(V_S, _SLOTS, **f32) if need_grad_w else None)

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
    covered = _covered_rows(spans, merge, N_s)
    if need_grad_w:
        grad_w_buf = torch.zeros(nprog if deterministic else 1, V_S, _SLOTS, **f32)
    row_stats = torch.empty(3, N_s, **f32)
    lse_t = torch.empty(t_vals.shape[0], **f32)
    chain = t_chain.to(**f32).contiguous() if merge == "chain" else loss
    scale = chunk_scale.to(**f32).contiguous() if chunk_scale is not None else loss

    _kernels()((nprog,),
               s_logits, s_logits.stride(0), t_vals, t_vals.stride(0), t_cols, t_cols.stride(0),
               a, w_idx, w_val, col_ptr, row_idx, csc_val, mask, spans, chain, scale, covered,
               loss, grad, grad.stride(0),
               grad_w_buf if need_grad_w else loss, V_S * _SLOTS if (need_grad_w and deterministic) else 0,
               row_stats[0], row_stats[1], row_stats[2], lse_t, h, tacc, tcnt,
               K, N_s, V_S, V_T, C, 1.0 / float(temperature), float(temperature), float(eps),
               MEAN=merge == "mean", CHAIN=merge == "chain", SPARSE=sparse, GRAD_W=need_grad_w,
               ATOMIC_W=not deterministic, HAS_SCALE=chunk_scale is not None)
    if need_grad_w:
        grad_w = grad_w_buf.sum(0)  # fixed-order reduction of the per-program partials (deterministic mode)
    return loss, grad, grad_w


def _check_merge(merge, **chains):
    """merge is one of mean/first/chain; "chain" needs every given chain tensor."""
    if merge not in ("mean", "first", "chain"):
        raise ValueError(f"merge must be 'mean', 'first' or 'chain', got {merge!r}")
    if merge == "chain" and any(c is None for c in chains.values()):
        raise ValueError("merge='chain' needs " + " and ".join(chains))


def pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, s_chain, t_chain,
             teacher_is_logprob, want_grad_w=False, chunk_scale=None):
    """Row-space P-KL (contract in ops.fallback): -> (loss [K] f32, grad [N_s, V_S] in s_logits.dtype =
    d Σ_k c_k loss_k / d s_logits, grad_w [V_S, 4] f32 = d Σ_k c_k loss_k / d w_val if ``want_grad_w`` else None),
    c = ``chunk_scale`` [K] (default 1).

    ``s_chain`` cancels in Q's renormalization; ``teacher_is_logprob`` does not change the math (log π is the
    log-softmax of t/τ over the allowed columns either way). Deterministic W gradient (per-program partials
    reduced in a fixed order) when ``torch.are_deterministic_algorithms_enabled()``, fp32 atomics otherwise."""
    del s_chain, teacher_is_logprob
    _check_merge(merge, t_chain=t_chain)
    return _launch(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
                   chunk_scale, want_grad_w, torch.are_deterministic_algorithms_enabled())


# --------------------------------------------------------------------------------------------------------------
# torch.library custom op xtoken::pkl_rows (schema of xtoken::pkl_rows_fallback) -> (loss, grad, grad_w), grad_w =
# [0] unless need_grad_w. Backward scales each chunk's gradient rows by its grad_output. The W gradient sums over
# chunks and cannot be rescaled per chunk afterwards, so with need_grad_w backward reruns the op with
# chunk_scale = grad_output: exact for any grad_output, at the cost of one more kernel pass.
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("xtoken::pkl_rows", mutates_args=())
def _pkl_op(s_logits: torch.Tensor, t_vals: torch.Tensor, t_cols: torch.Tensor | None, w_idx: torch.Tensor,
            w_val: torch.Tensor, col_mask: torch.Tensor, spans: torch.Tensor, temperature: float, merge: str,
            eps: float, t_chain: torch.Tensor | None, chunk_scale: torch.Tensor | None,
            need_grad_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad, grad_w = pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps,
                                  None, t_chain, False, need_grad_w, chunk_scale)
    return loss, grad, grad_w if grad_w is not None else w_val.new_zeros(0, dtype=torch.float32)


@_pkl_op.register_fake
def _(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain, chunk_scale,
      need_grad_w):
    return (s_logits.new_empty(spans.shape[0], dtype=torch.float32), torch.empty_like(s_logits),
            w_val.new_empty(w_val.shape if need_grad_w else (0,), dtype=torch.float32))


def _row_chunk_scale(spans, g_loss, n):
    """[n] f32: g_loss[k] for the rows of chunk k's student span, 0 elsewhere (spans have disjoint rows)."""
    k1 = torch.arange(1, spans.shape[0] + 1, device=spans.device)
    d = torch.zeros(n + 1, dtype=torch.int64, device=spans.device)
    d.index_add_(0, spans[:, 0], k1)
    d.index_add_(0, spans[:, 1], -k1)
    chunk = torch.cumsum(d, 0)[:n] - 1  # exact integer chunk id of each row, -1 outside every span
    return torch.where(chunk >= 0, g_loss[chunk.clamp(min=0)], torch.zeros((), device=g_loss.device))


def _scale_rows(spans, grad, g_loss):
    """(grad with chunk k's student rows scaled by g_loss[k], the row scale [N_s] f32)."""
    scale = _row_chunk_scale(spans.long(), g_loss.to(torch.float32), grad.shape[0])
    return (grad * scale.unsqueeze(1)).to(grad.dtype), scale


def _pkl_setup(ctx, inputs, output):
    s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain, _, need_grad_w = inputs
    ctx.args = (temperature, merge, eps, need_grad_w)
    if need_grad_w:
        ctx.save_for_backward(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, t_chain)
    else:
        ctx.save_for_backward(spans, output[1])


def _pkl_backward(ctx, g_loss, _g_grad, _g_grad_w):
    temperature, merge, eps, need_grad_w = ctx.args
    g_loss = g_loss.to(torch.float32).contiguous()
    if not need_grad_w:
        return (_scale_rows(*ctx.saved_tensors, g_loss)[0],) + (None,) * 12
    s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, t_chain = ctx.saved_tensors
    _, grad, grad_w = torch.ops.xtoken.pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans,
                                                temperature, merge, eps, t_chain, g_loss, True)
    return (grad,) + (None,) * 3 + (grad_w,) + (None,) * 8


_pkl_op.register_autograd(_pkl_backward, setup_context=_pkl_setup)


def pkl_rows_autograd(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps,
                      s_chain=None, t_chain=None, teacher_is_logprob=False) -> torch.Tensor:
    """Differentiable per-chunk P-KL [K] (``xtoken::pkl_rows``): gradients flow to ``s_logits`` and, when it
    requires grad, to ``w_val``. Arguments as in :func:`pkl_rows`."""
    del s_chain, teacher_is_logprob
    _check_merge(merge, t_chain=t_chain)
    need_grad_w = w_val.requires_grad and torch.is_grad_enabled()
    return torch.ops.xtoken.pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, float(temperature),
                                     merge, float(eps), t_chain, None, need_grad_w)[0]
