"""H-KL / GOLD / ULD loss op ``xtoken::hkl_rows``: per-chunk loss and the gradient wrt the student logits in one
forward pass, on three backends: "triton" (ops.hkl_kernel; CUDA, or CPU under the interpreter), "native" (the C++
kernel ``_C.hkl_rows``: CPU, dense teacher, fp32 logits) and "torch" (chunked torch ops: any device, dtype, teacher).
Row-space contract: ops._common. GOLD passes the strict common pairs, H-KL the relaxed ones, ULD none.

Math for one chunk (student rows R_S, n_s; teacher rows R_T; temperature τ; allowed columns A; common pairs
(s_c, t_c), a matching (each id at most once; checked), with t_c ∈ A — pairs whose t_c is outside A are dropped;
U_S = V_S \\ {s_c}, U_T = A \\ {t_c}):
  S = mean_r ℓ_r (+ s-chain scalar), ℓ_r = log_softmax(z_r/τ);  T = mean_r log π_r (+ t-chain scalar), P = exp T
  L = τ² (Σ_c P[t_c](T[t_c] − S[s_c]) + Σ_{i<m} |a_i − b_i|),  a = sort↓(exp S[U_S]), b = sort↓(P[U_T]),
  m = min(|U_S|, |U_T|, uncommon_topk)
  gS = ∂L/∂S: −τ² P[t_c] at s_c;  τ² sign(a_i − b_i) a_i at a_i's column
  dz_r = (gS − p_r Σ_v gS[v]) / (τ n_s)   (first/chain: the first row only, n_s = 1)
  ∂L/∂(s-chain scalar of chunk k) = Σ_v gS[v], returned at each of the chunk's later rows (merge="chain")
A chunk with bad input (ops._common) has loss NaN, zero gradient rows and Σ gS = 0.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._common import chain_sums, check_options, check_pairs, check_rows, check_spans, check_temperature, chunk_any, \
    expand, math_dtype, no_autocast, nonfinite_rows, ran_triton, resolve_backend, row_scale, saved, scale_grad, \
    softmax_rows, teacher_block, top, torch_setup, write_grad

__all__ = ["hkl_rows", "native_applies"]


def native_applies(s_logits: Tensor, t_vals: Tensor, t_cols: Tensor | None) -> bool:
    """The C++ kernel's preconditions: CPU, dense teacher, fp32 student and teacher logits."""
    return s_logits.device.type == "cpu" and t_cols is None and s_logits.dtype == t_vals.dtype == torch.float32


def _allowed_pairs(common_s: Tensor, common_t: Tensor, col_mask: Tensor) -> tuple[Tensor, Tensor]:
    keep = col_mask[common_t]
    return common_s[keep], common_t[keep]


def _native(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
            uncommon_topk):
    """``_C.hkl_rows`` on ``torch.get_num_threads()`` threads; logits and gradient as zero-copy numpy views (fp32,
    or bf16 / fp16 as their 16-bit words, converted per row inside the kernel)."""
    from .. import _C
    from .pkl import _DTYPE_NAMES, _words

    K = spans.shape[0]
    cs, ct = _allowed_pairs(common_s, common_t, col_mask)
    chains = [c.detach().float().contiguous().numpy() if merge == "chain" else None for c in (s_chain, t_chain)]
    loss, gsum = torch.empty(K, dtype=torch.float32), torch.empty(K, dtype=torch.float32)
    grad = torch.empty_like(s_logits)
    _C.hkl_rows(_words(s_logits), _words(t_vals), col_mask.contiguous().numpy(), spans.numpy(), float(temperature),
                merge, *chains, cs.long().contiguous().numpy(), ct.long().contiguous().numpy(),
                -1 if uncommon_topk is None else int(uncommon_topk), loss.numpy(), _words(grad), gsum.numpy(),
                torch.get_num_threads(), _DTYPE_NAMES[s_logits.dtype], _DTYPE_NAMES[t_vals.dtype])
    return loss, grad, gsum


def _torch(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
           uncommon_topk):
    """Chunked torch ops over blocks of consecutive chunks, math in fp32 (fp64 for fp64 logits)."""
    md, dev, tau, V_S, K, cols, n_s, n_t, blocks, t_chain_sum = torch_setup(s_logits, spans, merge, col_mask,
                                                                            temperature, t_chain)
    _, remap, n_a = cols
    chain = merge == "chain"
    s_chain_sum = chain_sums(s_chain, spans[:, 0], spans[:, 1], md) if chain else None
    cs, ct = (x.long() for x in _allowed_pairs(common_s, common_t, col_mask))
    if remap is not None:
        ct = remap[ct]  # positions in A
    u_s = torch.ones(V_S, dtype=torch.bool, device=dev)
    u_s[cs] = False
    u_t = torch.ones(n_a, dtype=torch.bool, device=dev)
    u_t[ct] = False
    us_idx, ut_idx = torch.nonzero(u_s).squeeze(1), torch.nonzero(u_t).squeeze(1)
    m = min(us_idx.numel(), ut_idx.numel(), V_S if uncommon_topk is None else uncommon_topk)
    loss = torch.zeros(K, dtype=md, device=dev)
    grad = torch.zeros_like(s_logits)
    gsum = torch.zeros(K, dtype=md, device=dev)
    tt = tau * tau
    zero = torch.zeros((), dtype=md, device=dev)
    bad_s, bad_t = nonfinite_rows(s_logits, True), nonfinite_rows(t_vals, False)
    for k0, k1 in blocks:
        Kb = k1 - k0
        rows, seg = expand(spans[k0:k1, 0], n_s[k0:k1])
        t_rows, t_seg = expand(spans[k0:k1, 2], n_t[k0:k1])
        bad = chunk_any(bad_s[rows], seg, Kb) | chunk_any(bad_t[t_rows], t_seg, Kb)
        for c in (s_chain_sum, t_chain_sum) if chain else ():
            bad |= ~(c[k0:k1] < math.inf)
        ell = softmax_rows(s_logits, rows, tau, md, log=True)
        p = torch.exp(ell)
        if chain:
            S = ell + s_chain_sum[k0:k1].unsqueeze(1)
        elif rows.numel() == Kb:
            S = ell
        else:
            S = torch.zeros(Kb, V_S, dtype=md, device=dev).index_add_(0, seg, ell).div_(n_s[k0:k1].unsqueeze(1))
        T = teacher_block(t_vals, t_cols, t_rows, t_seg, n_t[k0:k1], Kb, cols, tau, md,
                          None if t_chain_sum is None else t_chain_sum[k0:k1])
        P = torch.exp(T)
        gS = torch.zeros(Kb, V_S, dtype=md, device=dev)
        Pc = P.index_select(1, ct)
        kl = torch.where(Pc > 0, Pc * (T.index_select(1, ct) - S.index_select(1, cs)), zero).sum(1)
        gS.index_copy_(1, cs, Pc.mul_(-tt))
        l1 = torch.zeros(Kb, dtype=md, device=dev)
        if m > 0:
            a, a_pos = top(torch.exp(S.index_select(1, us_idx)), m)
            b = top(P.index_select(1, ut_idx), m)[0]
            diff = a - b
            l1 = diff.abs().sum(1)
            gS.scatter_add_(1, us_idx[a_pos], tt * torch.sign(diff) * a)
        loss[k0:k1] = torch.where(bad, math.nan, tt * (kl + l1))
        if bool(bad.any()):  # no gradient: exact zeros, whatever gS and p hold for these chunks
            gS.masked_fill_(bad.unsqueeze(1), 0.0)
            p = p.masked_fill(bad[seg].unsqueeze(1), 0.0)
        gsum[k0:k1] = gS.sum(1)
        write_grad(grad, rows, seg, n_s[k0:k1], p, gS, tau, merge, wrt_log_p=True)
    return loss, grad, gsum


def _triton(*args):
    from .hkl_kernel import hkl_rows as launch  # imports triton: only when this backend runs

    return launch(*args)


_BACKENDS = {"native": _native, "torch": _torch, "triton": _triton}


@torch.library.custom_op("xtoken::hkl_rows", mutates_args=())
def hkl_rows(s_logits: Tensor, t_vals: Tensor, t_cols: Tensor | None, col_mask: Tensor, spans: Tensor,
             temperature: float, merge: str, s_chain: Tensor | None, t_chain: Tensor | None, common_s: Tensor,
             common_t: Tensor, uncommon_topk: int | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss [K] (fp64 for fp64 logits, else fp32), grad = d Σ_k loss_k / d s_logits in the logits' dtype,
    grad_chain [N_s] = d Σ_k loss_k / d s_chain in the loss dtype: nonzero only at a chunk's rows after its first,
    merge="chain"). ``backend``: "auto" | "triton" | "native" | "torch". Sparse teacher columns must be unique per
    row; spans must have disjoint student rows; common pairs must be a matching (ops._common.check_pairs). Bad
    input: module docstring. The Triton backend keeps what it derives from the common pairs and col_mask per tensor
    and version (ops._common.cached_on_tensors): change them in place or pass new tensors, not writes through
    ``.data`` or a NumPy view."""
    check_temperature(temperature)
    check_rows(s_logits, t_vals, t_cols, col_mask)
    check_options(merge, col_mask, {"s_chain": (s_chain, s_logits.shape[0]), "t_chain": (t_chain, t_vals.shape[0])})
    if uncommon_topk is not None and not (isinstance(uncommon_topk, numbers.Integral) and uncommon_topk >= 0):
        raise ValueError(f"uncommon_topk must be None or an integer >= 0, got {uncommon_topk!r}")
    check_pairs(common_s, common_t, s_logits.shape[1], col_mask.numel())
    backend = resolve_backend(backend, s_logits.device, s_logits.dtype, native_applies(s_logits, t_vals, t_cols))
    spans = spans.long().contiguous()
    if backend != "native":  # the C++ kernel checks its spans itself
        check_spans(spans, s_logits.shape[0], t_vals.shape[0])
    with no_autocast(s_logits.device):
        loss, grad, gsum = _BACKENDS[backend](
            s_logits.contiguous(), t_vals.detach().contiguous(),
            None if t_cols is None else t_cols.long().contiguous(), col_mask, spans, temperature, merge, s_chain,
            t_chain, common_s.long(), common_t.long(), uncommon_topk)
    md, N_s = math_dtype(s_logits.dtype), s_logits.shape[0]
    if merge != "chain":  # no chain scalars: their gradient is 0
        return loss.to(md), grad, torch.zeros(N_s, dtype=md, device=s_logits.device)
    return loss.to(md), grad, row_scale(spans[:, 0] + 1, spans[:, 1], gsum.to(md), N_s)


@hkl_rows.register_fake
def _(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
      uncommon_topk, backend):
    md = math_dtype(s_logits.dtype)
    return (s_logits.new_empty(spans.shape[0], dtype=md), s_logits.new_empty(s_logits.shape),
            s_logits.new_empty(s_logits.shape[0], dtype=md))


# Backward scales each chunk's gradient rows (and its chain-scalar gradients) by the chunk's incoming gradient.

def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])  # the gradients: constants (no grad_fn, not requiring grad)
    ctx.set_materialize_grads(False)
    ctx.has_chain, ctx.triton = inputs[7] is not None, ran_triton(inputs[-1], inputs[0])
    ctx.save_for_backward(inputs[4], output[1], output[2])


def _backward(ctx, g_loss, _g_grad, _g_chain):
    if g_loss is None:
        return (None,) * 13
    spans, grad, grad_chain = saved(ctx)
    scale = row_scale(spans[:, 0], spans[:, 1], g_loss.to(grad_chain.dtype), grad.shape[0])  # the loss's dtype
    d_chain = grad_chain * scale if ctx.has_chain else None
    return (scale_grad(grad, scale, ctx.triton),) + (None,) * 6 + (d_chain,) + (None,) * 5


hkl_rows.register_autograd(_backward, setup_context=_setup)
