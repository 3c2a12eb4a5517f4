"""P-KL loss op ``xtoken::pkl_rows``: per-chunk loss and the gradient wrt the student logits (and optionally the W
weights) in one forward pass, on three backends: "triton" (fused kernel, ops.pkl_kernel; CUDA, or CPU under the
interpreter), "native" (the torch-free C++ kernel ``_C.pkl_rows``: CPU, dense teacher, fp32/bf16/fp16 logits) and
"torch" (chunked torch ops: any device, dtype and teacher). Row-space contract: ops._common.

Math for one chunk (student rows R_S, n_s = |R_S|; teacher rows R_T; temperature τ; allowed columns A):
  p_r = softmax(z_r/τ), p̄ = mean_r p_r;  Qu = Wᵀp̄ on A, Z = Σ_A Qu, Q = Qu/Z   (Wᵀ is linear: merge, then project)
  T = mean_r log π_r (+ chain scalar), log π_r = log_softmax_A(t_r/τ), P = exp T
  L = τ² Σ_A P (T − log(Q + eps))
  G = ∂L/∂Qu = (τ²/Z)(M − h) on A, 0 outside;  h = P/(Q + eps), M = Σ_A P Q/(Q + eps)   (⟨Qu, G⟩ = 0)
  g_s = Σ_slot W_s,slot G[col]  (ELL gather);  dz_r = p_r ⊙ (g − ⟨p_r, g⟩)/(τ n_s);  ∂L/∂W_s,slot = p̄[s] G[col]
Merge "first" uses the first row of each side; "chain" adds Σ_{r>first} t_chain[r] to T (the student's chain scalar
multiplies Qu and cancels in its renormalization, so it has no gradient). Terms with P = 0 count as 0.
fp32: P/Q reaches 2^149 where Q is subnormal and P is not, so every backend forms h, M and G scaled by 2^-24 and p, Q
as 2^24 p, 2^24 Q (normal where p, Q are not; p as 2^88 p where Z < 2^-64, as when the student's mass is almost all
on an id W maps nowhere) and applies τ²/Z only to their products with p, which stay bounded.
Per chunk, in this order (ops._common): bad input -> loss NaN; Σ_A P = 0 -> loss 0; Z = 0 or P > 0 where Q + eps = 0
-> loss +inf; each with exact-zero gradient rows and no W-gradient part. fp32 math (the reach of the scaled factors):
Z counts as 0 below 2^-180, and where τ max(1, |c|)/Z' passes fp32's range (Z' = Z, or 2^64 Z where Z < 2^-64;
c: the chunk scale), i.e. Z < τ max(1, |c|) 2^-192.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

from ._common import SLOTS, check_options, check_rows, check_spans, check_temperature, chunk_any, expand, math_dtype, \
    no_autocast, nonfinite_rows, ran_triton, resolve_backend, row_scale, saved, scale_grad, softmax_rows, \
    teacher_block, torch_setup, write_grad

__all__ = ["pkl_rows", "native_applies"]

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_STUDENT_VOCAB = 2 ** 29  # native and Triton kernels: W slot indices 4·V_S are int32


def native_applies(s_logits: Tensor, t_cols: Tensor | None) -> bool:
    """The C++ kernel's preconditions: CPU, dense teacher, student logits fp32 / bf16 / fp16 (math in fp32)."""
    return s_logits.device.type == "cpu" and t_cols is None and s_logits.dtype in _NATIVE_DTYPES


def _native(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
            chunk_scale, need_grad_w):
    """``_C.pkl_rows`` on ``torch.get_num_threads()`` threads. The logits and the gradient go in as zero-copy
    numpy views (bf16 / fp16 as their 16-bit words; the kernel converts each row where it reads it and writes the
    gradient once, in the student's dtype); a teacher of another dtype is converted to fp32 first."""
    from .. import _C

    V_S, K = s_logits.shape[1], spans.shape[0]
    if t_vals.dtype not in _NATIVE_DTYPES:
        t_vals = t_vals.float()
    t_chain = t_chain.detach().float().contiguous().numpy() if merge == "chain" else None
    scale = chunk_scale.detach().float().contiguous().numpy() if chunk_scale is not None else None
    loss = torch.empty(K, dtype=torch.float32)
    grad = torch.empty_like(s_logits)  # the kernel writes every row
    grad_w = torch.zeros(V_S, SLOTS, dtype=torch.float32) if need_grad_w else None
    _C.pkl_rows(_words(s_logits), _words(t_vals), w_idx.to(torch.int32).contiguous().numpy(),
                w_val.detach().float().contiguous().numpy(), col_mask.contiguous().numpy(), spans.numpy(),
                float(temperature), merge, float(eps), t_chain, scale, loss.numpy(), _words(grad),
                None if grad_w is None else grad_w.numpy(), torch.get_num_threads(), _DTYPE_NAMES[s_logits.dtype],
                _DTYPE_NAMES[t_vals.dtype])
    return loss, grad, grad_w


def _words(x: Tensor):
    """A numpy view of logits for the native kernels: fp32 as is, bf16 / fp16 as their 16-bit words."""
    return (x if x.dtype == torch.float32 else x.view(torch.int16)).detach().numpy()


def _csr_pair(s_j: Tensor, t_j: Tensor, w_j: Tensor, V_S: int, V_A: int) -> tuple[Tensor, Tensor]:
    """W [V_S, |A|] and Wᵀ as sparse CSR tensors from the flat ELL entries (s_j ascending)."""
    def csr(rows, cols, vals, n_rows, n_cols):
        ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
        ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(ptr, cols, vals, (n_rows, n_cols))

    order = torch.argsort(t_j, stable=True)
    return csr(s_j, t_j, w_j, V_S, V_A), csr(t_j[order], s_j[order], w_j[order], V_A, V_S)


def _torch(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain, chunk_scale,
           need_grad_w):
    """Chunked torch ops over blocks of consecutive chunks, math in fp32 (fp64 for fp64 logits)."""
    md, dev, tau, V_S, K, cols, n_s, n_t, blocks, t_chain_sum = torch_setup(s_logits, spans, merge, col_mask,
                                                                            temperature, t_chain)
    _, remap, n_a = cols
    # ELL as a flat (student s_j, column t_j in A, weight w_j) list of the non-empty slots that land in A
    keep = w_idx >= 0
    if remap is not None:
        keep &= remap[w_idx.long().clamp(min=0)] >= 0
    s_j = torch.nonzero(keep)[:, 0]
    t_j = w_idx[keep].long() if remap is None else remap[w_idx[keep].long()]
    w_j = w_val.detach()[keep].to(md)
    W, Wt = _csr_pair(s_j, t_j, w_j, V_S, n_a)
    loss = torch.zeros(K, dtype=md, device=dev)
    grad = torch.zeros_like(s_logits)
    grad_wj = torch.zeros_like(w_j) if need_grad_w else None
    tt = tau * tau
    bad_s, bad_t = nonfinite_rows(s_logits, True), nonfinite_rows(t_vals, False)
    for k0, k1 in blocks:
        Kb = k1 - k0
        rows, seg = expand(spans[k0:k1, 0], n_s[k0:k1])
        t_rows, t_seg = expand(spans[k0:k1, 2], n_t[k0:k1])
        bad = chunk_any(bad_s[rows], seg, Kb) | chunk_any(bad_t[t_rows], t_seg, Kb)
        if t_chain_sum is not None:
            bad |= ~(t_chain_sum[k0:k1] < math.inf)
        # p as 2^24 p, normal where p is subnormal (there from log p): every Qu and σ below is 2^24 Qu, 2^24 Σ_A Qu
        p = softmax_rows(s_logits, rows, tau, md, log=False).mul_(2.0 ** 24)
        tiny = (p < 2.0 ** -102) & (p > 0)
        log_p = softmax_rows(s_logits, rows, tau, md, log=True) if bool(tiny.any()) else None  # also for 2^88 p
        if log_p is not None:
            p = torch.where(tiny, (log_p + 24 * math.log(2)).exp_(), p)
        pbar, Q, sigma = _project(p, rows, seg, n_s[k0:k1], Kb, Wt)
        # Z below 2^-64 (the student's mass almost all on ids W maps nowhere, e.g. an empty W row's <|eot_id|>): the
        # chunk's p again as 2^88 p from log p (their products with G' would be subnormal), p̄, Qu and σ with it
        # (σ = 2^88 Z there), unit = 2^-64 in write_grad's ⟨p, g⟩ term
        unit = torch.where(sigma.squeeze(1) < 2.0 ** -40, 2.0 ** -64, 1.0)  # σ = 0 too: its p below 2^-174
        if bool((unit != 1).any()):
            big = (unit != 1).index_select(0, seg).unsqueeze(1)
            if log_p is None:
                log_p = softmax_rows(s_logits, rows, tau, md, log=True)
            p = torch.where(big, (log_p + 88 * math.log(2)).exp_(), p)
            pbar, Q, sigma = _project(p, rows, seg, n_s[k0:k1], Kb, Wt)
        Qs = (Q * 2.0 ** 24).div_(sigma)  # 2^24 Q, from the unrounded 2^24 Qu (2^24/σ may pass fp32's range)
        Q.div_(sigma)
        T = teacher_block(t_vals, t_cols, t_rows, t_seg, n_t[k0:k1], Kb, cols, tau, md,
                          None if t_chain_sum is None else t_chain_sum[k0:k1])
        P = torch.exp(T)
        zero_p = P <= 0  # terms with P = 0 count as 0 (also where T = −inf or Q = 0)
        Qe = Q + eps if eps else Q
        Qse = Qs.add_(eps * 2.0 ** 24) if eps else Qs  # 2^24 (Q + eps)
        no_mass = P.sum(1) == 0
        # coef = τ c/Z' (Z' = 2^-24 σ: Z, or 2^64 Z where unit ≠ 1) multiplies the gradient's bounded products. Z
        # counts as 0 where τ max(1, |c|)/Z' passes the math dtype's range and, fp32, below 2^-180 (Z' < 2^-116: the
        # products of 2^88 p with G' go subnormal), as in every backend
        coef = tau * 2.0 ** 24 / sigma.squeeze(1).double()
        c = None if chunk_scale is None else chunk_scale[k0:k1].double()
        reach = coef if c is None else coef * c.abs().clamp(min=1.0)
        degenerate = ~(reach <= torch.finfo(md).max) | (~zero_p & (Qe == 0)).any(1)
        if md == torch.float32:
            degenerate |= sigma.squeeze(1) < 2.0 ** -92
        buf = torch.log(Qe)
        sub = (Qe < 2.0 ** -126) & (Qse > 0)
        if bool(sub.any()):  # a subnormal Q + eps: its log from 2^24 (Q + eps), which kept the bits
            buf = torch.where(sub, torch.log(Qse).sub_(24 * math.log(2)), buf)
        lb = T.sub_(buf).mul_(P).masked_fill_(zero_p, 0.0).sum(1).mul_(tt)
        loss[k0:k1] = torch.where(bad, math.nan, torch.where(no_mass, 0.0, torch.where(degenerate, math.inf, lb)))
        # h = P/(Q + eps) reaches 2^149 where Q + eps is subnormal: G = ∂L/∂Qu = coef (M − h) is formed as G' = M' − h'
        # (M', h' = 2^-24 M, h), its factor τ² c/Z applied only to its products with p (bounded): as coef in dz (whose
        # 1/τ takes one τ), as coef τ in ∂L/∂W
        r = torch.div(P, Qse, out=Qse).masked_fill_(zero_p, 0.0)  # h'
        M = P.sum(1, keepdim=True).mul_(2.0 ** -24) if not eps else (r * Q).sum(1, keepdim=True)
        G = r.neg_().add_(M)
        if c is not None:
            coef = coef * c
        drop = bad | no_mass | degenerate  # no gradient: exact zeros, whatever G and p hold for these chunks
        coef = torch.where(drop, 0.0, coef).to(md)
        if bool(drop.any()):
            G.masked_fill_(drop.unsqueeze(1), 0.0)
            pbar = pbar.masked_fill(drop.unsqueeze(1), 0.0)
            p = p.masked_fill(drop[seg].unsqueeze(1), 0.0)
        g = (W @ G.t()).t()  # [Kb, V_S] ELL gather as a sparse-dense product
        if grad_wj is not None:  # Σ_k coef_k (2^24 p̄_k[s] / unit_k) G'_k[t], times τ below
            grad_wj += (pbar.index_select(1, s_j) * G.index_select(1, t_j)).mul_(coef.unsqueeze(1)).sum(0)
        write_grad(grad, rows, seg, n_s[k0:k1], p, g, 1.0, merge, wrt_log_p=False, scale=coef,
                   p_unit=unit.mul_(2.0 ** -24))
    grad_w = None
    if grad_wj is not None:
        grad_w = torch.zeros(w_val.shape, dtype=md, device=dev)
        grad_w[keep] = grad_wj.mul_(tau)
    return loss, grad, grad_w


def _project(p, rows, seg, n_s, Kb, Wt):
    """-> (p̄ [Kb, V_S], Qu = Wᵀp̄ [Kb, |A|], σ = Σ_A Qu [Kb, 1]) of a block's student rows p (as scaled)."""
    pbar = p if rows.numel() == Kb else torch.zeros(Kb, p.shape[1], dtype=p.dtype, device=p.device).index_add_(
        0, seg, p).div_(n_s.unsqueeze(1))
    Q = (Wt @ pbar.t()).t().contiguous()  # [Kb, |A|] = (Wᵀ p̄ᵀ)ᵀ restricted to A
    return pbar, Q, Q.sum(1, keepdim=True)


def _triton(*args):
    from .pkl_kernel import pkl_rows as launch  # imports triton: only when this backend runs

    return launch(*args)


_BACKENDS = {"native": _native, "torch": _torch, "triton": _triton}


@torch.library.custom_op("xtoken::pkl_rows", mutates_args=())
def pkl_rows(s_logits: Tensor, t_vals: Tensor, t_cols: Tensor | None, w_idx: Tensor, w_val: Tensor, col_mask: Tensor,
             spans: Tensor, temperature: float, merge: str, eps: float, t_chain: Tensor | None,
             chunk_scale: Tensor | None, need_grad_w: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss [K] (fp64 for fp64 logits, else fp32), grad = d Σ_k c_k loss_k / d s_logits in the logits' dtype,
    grad_w = d Σ_k c_k loss_k / d w_val [V_S, 4] in the loss's dtype if ``need_grad_w`` else [0]), c =
    ``chunk_scale`` [K] (default 1). ``backend``: "auto" | "triton" | "native" | "torch". Sparse teacher columns
    must be unique per row; spans must have disjoint student rows. Non-finite / degenerate chunks: module docstring.
    The Triton backend keeps what it derives from w_idx, w_val and col_mask per tensor and version
    (ops._common.cached_on_tensors; not for tensors that require grad): change them in place (a version bump) or
    pass new tensors, not writes through ``.data`` or a NumPy view."""
    check_temperature(temperature)
    check_rows(s_logits, t_vals, t_cols, col_mask)
    check_options(merge, col_mask, {"t_chain": (t_chain, t_vals.shape[0])})
    if not (isinstance(eps, numbers.Real) and 0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0 (Q is read as log(Q + eps)), got {eps!r}")
    if w_idx.shape != (s_logits.shape[1], SLOTS) or w_val.shape != w_idx.shape:
        raise ValueError(f"w_idx and w_val must be [V_S, {SLOTS}] = [{s_logits.shape[1]}, {SLOTS}], got "
                         f"{tuple(w_idx.shape)} and {tuple(w_val.shape)}")
    backend = resolve_backend(backend, s_logits.device, s_logits.dtype, native_applies(s_logits, t_cols))
    if backend != "torch" and s_logits.shape[1] >= MAX_STUDENT_VOCAB:
        raise ValueError(f"pkl_rows: backend {backend!r} needs a student vocabulary < 2**29 (its W slot indices "
                         f"4·V_S are int32), got V_S = {s_logits.shape[1]}; use backend='torch'")
    if backend != "native":  # the C++ kernel checks its spans itself
        check_spans(spans, s_logits.shape[0], t_vals.shape[0])
    with no_autocast(s_logits.device):
        loss, grad, grad_w = _BACKENDS[backend](
            s_logits.contiguous(), t_vals.detach().contiguous(),
            None if t_cols is None else t_cols.long().contiguous(), w_idx, w_val, col_mask, spans.long().contiguous(),
            temperature, merge, eps, t_chain, chunk_scale, need_grad_w)
    md = math_dtype(s_logits.dtype)
    return loss.to(md), grad, grad_w if need_grad_w else w_val.new_zeros(0, dtype=md)


@pkl_rows.register_fake
def _(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain, chunk_scale,
      need_grad_w, backend):
    return (s_logits.new_empty(spans.shape[0], dtype=math_dtype(s_logits.dtype)), s_logits.new_empty(s_logits.shape),
            w_val.new_empty(w_val.shape if need_grad_w else (0,), dtype=math_dtype(s_logits.dtype)))


# The loss is the only differentiable output. Backward scales the forward's gradient rows by each chunk's incoming
# gradient (a student row belongs to at most one chunk). The W gradient sums over chunks and cannot be rescaled per
# chunk afterwards, so with a learnable W backward reruns the op with chunk_scale = the incoming gradient.

def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])  # the gradients: constants (no grad_fn, not requiring grad)
    ctx.set_materialize_grads(False)  # unused outputs would otherwise get [N_s, V_S] zero gradients
    *args, chunk_scale, need_grad_w, backend = inputs
    ctx.need_grad_w, ctx.consts = need_grad_w, (*args[7:10], backend)  # temperature, merge, eps, backend
    ctx.triton = ran_triton(backend, args[0])
    if need_grad_w:
        ctx.save_for_backward(*args[:7], args[10])
    else:
        ctx.save_for_backward(args[6], output[1])


def _backward(ctx, g_loss, _g_grad, _g_grad_w):
    if g_loss is None:
        return (None,) * 14
    if not ctx.need_grad_w:
        spans, grad = saved(ctx)
        scale = row_scale(spans[:, 0], spans[:, 1], g_loss.to(math_dtype(grad.dtype)), grad.shape[0])
        return (scale_grad(grad, scale, ctx.triton),) + (None,) * 13
    s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, t_chain = saved(ctx)
    temperature, merge, eps, backend = ctx.consts
    _, grad, grad_w = pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps,
                               t_chain, g_loss, True, backend)
    return (grad, None, None, None, grad_w) + (None,) * 9


pkl_rows.register_autograd(_backward, setup_context=_setup)
