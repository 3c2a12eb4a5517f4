"""Row-space ops for CPU (or any device without Triton): loss AND gradient in one forward pass. P-KL on CPU with a
dense teacher runs the native kernel ``_C.pkl_rows``, H-KL / GOLD / ULD on CPU with dense fp32 logits
``_C.hkl_rows`` (csrc/losses.cpp, same math in fp32); everything else runs the chunked pure-torch code below.

The loss is terminal, so each op returns d(Σ_k loss_k)/d(student logits) next to the per-chunk losses; the autograd
wrapper (``xtoken::pkl_rows_fallback`` / ``xtoken::hkl_rows_fallback``) only rescales it by the incoming gradient.
Valid chunks are processed in blocks of consecutive chunks, so scratch is O(block rows × (V_S + |A|)), never
[all rows, V] in fp32; teacher-side math runs over the allowed columns A only (compressed, no masking). All math
is fp32 (float64 when the student logits are float64; the losses are then float64 too).

Per chunk k (rows r ∈ R_S on the student side, R_T on the teacher side, A = allowed teacher columns):
  p_r = softmax(z_r/τ), ℓ_r = log p_r; log π_r = log_softmax_A(t_r/τ); T = merged log π, P = exp T.
  P-KL: Qraw = Wᵀ p̄ with p̄ = mean_r p_r (Wᵀ is linear, so the merge happens before the projection), Σ = Σ_A Qraw,
        Q = Qraw/Σ, L = τ² Σ_A P (T − log(Q + eps)).
        G = ∂L/∂Qraw = τ²/Σ · (−P/(Q+eps) + Σ_v P_v Q_v/(Q_v+eps)) on A, 0 outside;
        ∂L/∂p_r = g/n with g_s = Σ_slot W_s,slot G[col] (ELL gather); dz_r = p_r ⊙ (g_r − ⟨p_r, g_r⟩)/τ;
        ∂L/∂W_s,slot = Σ_k p̄_k[s] G_k[col].
  H-KL: S = merged ℓ; L = τ² (Σ_c P[t_c](T[t_c] − S[s_c]) + Σ_{i<m} |a_i − b_i|), a/b = sorted top-m of exp S on U_S
        and P on U_T. gS = ∂L/∂S: −τ² P[t_c] at s_c, τ² sign(a_i − b_i)·a_i at a_i's column;
        dz_r = (gS_r − p_r Σ gS_r)/τ with gS_r = gS/n (mean) or gS (first row); ∂L/∂(chain scalar) = Σ gS.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

__all__ = ["pkl_rows", "hkl_rows", "pkl_rows_autograd", "hkl_rows_autograd"]

_NEG_INF = float("-inf")
_SCRATCH_BYTES = 192 << 20  # per-block scratch budget (fp32)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NATIVE_BLOCK_BYTES = 64 << 20  # fp32 copies of low-precision rows (student, its gradient, teacher) per native call


def _block_rows(V_S: int, V_A: int) -> int:
    """Rows per block such that the ~4 [rows, V_S] and ~6 [rows, |A|] live buffers fit the scratch budget."""
    return max(1, min(256, _SCRATCH_BYTES // (4 * (4 * V_S + 6 * V_A))))


def _expand(lo: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Rows lo_k + [0, n_k) of every chunk, concatenated, and the chunk id of each row."""
    seg = torch.repeat_interleave(torch.arange(lo.numel(), device=lo.device), n)
    start = torch.cumsum(n, 0) - n
    rows = lo[seg] + torch.arange(seg.numel(), device=lo.device) - start[seg]
    return rows, seg


def _plan(spans: Tensor, merge: str, max_rows: int):
    """Per-chunk row counts n_s / n_t that enter the merged vectors (all rows for "mean", the first otherwise), and
    blocks (k0, k1) of consecutive chunks with ≤ max_rows such rows per side (a larger chunk is a block alone)."""
    s_lo, s_hi, t_lo, t_hi = spans.unbind(1)
    if merge == "mean":
        n_s, n_t = s_hi - s_lo, t_hi - t_lo
    else:
        n_s, n_t = torch.ones_like(s_lo), torch.ones_like(t_lo)
    blocks, k0, rs, rt = [], 0, 0, 0
    for k, (a, b) in enumerate(zip(n_s.tolist(), n_t.tolist())):
        if k > k0 and (rs + a > max_rows or rt + b > max_rows):
            blocks.append((k0, k))
            k0, rs, rt = k, 0, 0
        rs, rt = rs + a, rt + b
    if spans.shape[0]:
        blocks.append((k0, spans.shape[0]))
    return n_s, n_t, blocks


def _csr_pair(s_j: Tensor, t_j: Tensor, w_j: Tensor, V_S: int, V_T: int) -> tuple[Tensor, Tensor]:
    """W [V_S, V_T] and Wᵀ [V_T, V_S] as CSR from the flat ELL entries (s_j ascending)."""
    def csr(rows, cols, vals, n_rows, n_cols):
        ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
        ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(ptr, cols, vals, (n_rows, n_cols))

    order = torch.argsort(t_j, stable=True)
    return csr(s_j, t_j, w_j, V_S, V_T), csr(t_j[order], s_j[order], w_j[order], V_T, V_S)


def _chain_sums(chain: Optional[Tensor], lo: Tensor, hi: Tensor, dtype) -> Optional[Tensor]:
    """Σ_{lo < r < hi} chain[r] per chunk (−inf entries propagate)."""
    if chain is None:
        return None
    rows, seg = _expand(lo + 1, (hi - lo - 1).clamp(min=0))
    out = torch.zeros(lo.numel(), dtype=dtype, device=lo.device)
    return out.index_add_(0, seg, chain.to(dtype)[rows])


def _allowed(col_mask: Tensor):
    """Allowed teacher columns A: (ids [|A|] or None when A = all, position in A of every column or −1, |A|).
    Both ops work in this compressed column space, so no masking is needed inside the loop."""
    if bool(col_mask.all()):
        return None, None, col_mask.numel()
    a_idx = torch.nonzero(col_mask).squeeze(1)
    remap = torch.full((col_mask.numel(),), -1, dtype=torch.int64, device=col_mask.device)
    remap[a_idx] = torch.arange(a_idx.numel(), device=col_mask.device)
    return a_idx, remap, a_idx.numel()


def _teacher_block(t_vals, t_cols, rows, seg, n, K, cols, tau, md, chain_sum):
    """Merged teacher log-probs T [K, |A|] for one block: mean (or first row + chain sum) of log_softmax_A(t/τ)."""
    a_idx, remap, n_a = cols
    if t_cols is None:
        x = t_vals.index_select(0, rows) if a_idx is None else t_vals[rows.unsqueeze(1), a_idx]
        x = x.to(md)
    else:  # sparse: a distribution that is 0 outside its columns; columns outside A go to a dropped extra slot
        c = t_cols.index_select(0, rows).long()
        if remap is not None:
            c = remap[c]
            c = torch.where(c < 0, n_a, c)
        x = torch.full((rows.numel(), n_a + 1), _NEG_INF, dtype=md, device=t_vals.device).scatter_(
            1, c, t_vals.index_select(0, rows).to(md))[:, :n_a]
    if tau != 1.0:
        x.div_(tau)
    lse = torch.logsumexp(x, 1, keepdim=True)
    x.sub_(torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))  # an all −inf row stays −inf
    if chain_sum is not None:
        return x.add_(chain_sum.to(md).unsqueeze(1))
    if rows.numel() == K:
        return x
    return torch.zeros(K, n_a, dtype=md, device=x.device).index_add_(0, seg, x).div_(n.unsqueeze(1))


def _softmax_rows(s_logits: Tensor, rows: Tensor, tau: float, md, log: bool) -> Tensor:
    """(log_)softmax(z/τ) of the given student rows, in the math dtype."""
    x = s_logits.index_select(0, rows).to(md)
    if tau != 1.0:
        x.div_(tau)
    return torch.log_softmax(x, 1) if log else torch.softmax(x, 1)


def _write_grad(grad, rows, seg, n, p, g, tau, merge, wrt_log_p: bool):
    """Student logit gradient rows from g = ∂L/∂(merged vector) per chunk; g_r = g[chunk]/n (mean) or g[chunk]
    (first row). wrt p (P-KL):  dz_r = p_r ⊙ (g_r − ⟨p_r, g_r⟩)/τ;  wrt ℓ = log p:  dz_r = (g_r − p_r Σ g_r)/τ."""
    gr = g.index_select(0, seg) if rows.numel() != g.shape[0] else g
    if merge == "mean" and rows.numel() != g.shape[0]:
        gr = gr / n[seg].unsqueeze(1).to(gr.dtype)
    r0, n_rows = int(rows[0]), rows.numel()
    direct = grad.dtype == p.dtype and int(rows[-1]) - r0 + 1 == n_rows  # write straight into grad's rows
    out = grad[r0:r0 + n_rows] if direct else None
    if wrt_log_p:
        dz = torch.sub(gr, p * gr.sum(1, keepdim=True), out=out)
    else:
        dz = torch.sub(gr, (p * gr).sum(1, keepdim=True), out=out).mul_(p)
    if tau != 1.0:
        dz.div_(tau)
    if not direct:
        grad.index_copy_(0, rows, dz.to(grad.dtype))


def pkl_rows(s_logits: Tensor, t_vals: Tensor, t_cols: Optional[Tensor], w_idx: Tensor, w_val: Tensor,
             col_mask: Tensor, spans: Tensor, temperature: float, merge: str, eps: float,
             s_chain: Optional[Tensor], t_chain: Optional[Tensor], teacher_is_logprob: bool,
             need_grad_w: bool = False, chunk_scale: Optional[Tensor] = None):
    """P-KL per chunk. Returns (loss [K] fp32 (fp64 for fp64 logits), grad [N_s, V_S] in s_logits.dtype,
    grad_w [V_S, 4] fp32 | None); grad / grad_w are d(Σ_k c_k loss_k) with c = ``chunk_scale`` [K] (default 1).

    ``s_chain`` is ignored: the student chain scalar cancels in the renormalization of Q. ``teacher_is_logprob``
    does not change the math (log_softmax over A is shift-invariant, so logits and log-probs give the same π).
    CPU tensors with a dense teacher and fp32/bf16/fp16 student logits run the native kernel (``_C.pkl_rows``),
    everything else the chunked torch code."""
    del s_chain, teacher_is_logprob
    if native_pkl_applies(s_logits, t_cols):
        return _pkl_rows_native(s_logits, t_vals, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
                                need_grad_w, chunk_scale)
    return _pkl_rows_torch(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps,
                           t_chain, need_grad_w, chunk_scale)


def native_pkl_applies(s_logits: Tensor, t_cols: Optional[Tensor]) -> bool:
    """The native CPU kernel's preconditions: CPU, dense teacher, student logits fp32 / bf16 / fp16 (math in fp32)."""
    return s_logits.device.type == "cpu" and t_cols is None and s_logits.dtype in _NATIVE_DTYPES


def _pkl_rows_native(s_logits, t_vals, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
                     need_grad_w, chunk_scale):
    """pkl_rows through the torch-free C++ kernel on ``torch.get_num_threads()`` threads. fp32 logits are passed
    as zero-copy numpy views (the kernel writes every gradient row); otherwise blocks of consecutive chunks are
    converted to fp32 (≤ _NATIVE_BLOCK_BYTES) and their fp32 gradient cast back."""
    from .. import _C

    V_S, K = s_logits.shape[1], spans.shape[0]
    spans = spans.long().contiguous()
    t_chain = t_chain.detach().float().contiguous() if merge == "chain" and t_chain is not None else None
    consts = (w_idx.to(torch.int32).contiguous().numpy(), w_val.detach().float().contiguous().numpy(),
              col_mask.contiguous().numpy())
    scale = chunk_scale.detach().float().contiguous() if chunk_scale is not None else None
    loss = torch.empty(K, dtype=torch.float32)
    grad_w = torch.zeros(V_S, 4, dtype=torch.float32) if need_grad_w else None

    def call(z, t, sp, chain, cs, out_loss, out_grad, out_gw):
        _C.pkl_rows(z.numpy(), t.numpy(), *consts, sp.numpy(), float(temperature), merge, float(eps),
                    None if chain is None else chain.numpy(), None if cs is None else cs.numpy(), out_loss.numpy(),
                    out_grad.numpy(), None if out_gw is None else out_gw.numpy(), torch.get_num_threads())

    z_all, t_all = s_logits.detach().contiguous(), t_vals.detach().contiguous()
    if z_all.dtype == torch.float32 and t_all.dtype == torch.float32:
        grad = torch.empty_like(z_all)
        call(z_all, t_all, spans, t_chain, scale, loss, grad, grad_w)
        return loss, grad, grad_w
    grad = torch.zeros_like(z_all)
    n_s, n_t = spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2]
    _, _, blocks = _plan(spans, "mean", max(1, _NATIVE_BLOCK_BYTES // (4 * (2 * V_S + t_all.shape[1]))))
    for k0, k1 in blocks:
        s_rows, _ = _expand(spans[k0:k1, 0], n_s[k0:k1])
        t_rows, _ = _expand(spans[k0:k1, 2], n_t[k0:k1])
        s_end, t_end = torch.cumsum(n_s[k0:k1], 0), torch.cumsum(n_t[k0:k1], 0)
        local = torch.stack([s_end - n_s[k0:k1], s_end, t_end - n_t[k0:k1], t_end], 1)
        z = z_all.index_select(0, s_rows).float()
        g = torch.empty_like(z)
        gw = torch.zeros(V_S, 4, dtype=torch.float32) if need_grad_w else None
        call(z, t_all.index_select(0, t_rows).float(), local, None if t_chain is None else t_chain[t_rows],
             None if scale is None else scale[k0:k1], loss[k0:k1], g, gw)
        grad.index_copy_(0, s_rows, g.to(grad.dtype))
        if need_grad_w:
            grad_w += gw
    return loss, grad, grad_w


def _pkl_rows_torch(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
                    need_grad_w, chunk_scale):
    """pkl_rows in chunked torch ops (any device and dtype, dense or sparse teacher)."""
    md = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    dev, tau = s_logits.device, float(temperature)
    V_S, K = s_logits.shape[1], spans.shape[0]
    spans = spans.long()
    cols = _allowed(col_mask)
    _, remap, n_a = cols
    n_s, n_t, blocks = _plan(spans, merge, _block_rows(V_S, n_a))
    t_chain_sum = _chain_sums(t_chain, spans[:, 2], spans[:, 3], md) if merge == "chain" else None
    # ELL as a flat (student s_j, column t_j in A, weight w_j) list of the non-empty slots that land in A
    keep = w_idx >= 0
    if remap is not None:
        keep &= remap[w_idx.long().clamp(min=0)] >= 0
    s_j = torch.nonzero(keep)[:, 0]
    t_j = w_idx[keep].long() if remap is None else remap[w_idx[keep].long()]
    w_j = w_val[keep].to(md)
    W, Wt = _csr_pair(s_j, t_j, w_j, V_S, n_a)
    loss = torch.zeros(K, dtype=md, device=dev)
    grad = torch.zeros_like(s_logits)
    grad_wj = torch.zeros_like(w_j) if need_grad_w else None
    tt = tau * tau
    for k0, k1 in blocks:
        Kb = k1 - k0
        rows, seg = _expand(spans[k0:k1, 0], n_s[k0:k1])
        p = _softmax_rows(s_logits, rows, tau, md, log=False)
        pbar = p if rows.numel() == Kb else torch.zeros(Kb, V_S, dtype=md, device=dev).index_add_(
            0, seg, p).div_(n_s[k0:k1].unsqueeze(1))
        Q = (Wt @ pbar.t()).t().contiguous()  # [Kb, |A|] = (Wᵀ p̄ᵀ)ᵀ restricted to A, a sparse-dense product
        sigma = Q.sum(1, keepdim=True)
        Q.div_(sigma)
        t_rows, t_seg = _expand(spans[k0:k1, 2], n_t[k0:k1])
        T = _teacher_block(t_vals, t_cols, t_rows, t_seg, n_t[k0:k1], Kb, cols, tau, md,
                           None if t_chain_sum is None else t_chain_sum[k0:k1])
        P = torch.exp(T)
        zero_p = P <= 0  # terms with P = 0 count as 0 (also where T = −inf or Q = 0)
        Qe = Q + eps if eps else Q
        buf = torch.log(Qe)
        loss[k0:k1] = T.sub_(buf).mul_(P).masked_fill_(zero_p, 0.0).sum(1).mul_(tt)
        r = torch.div(P, Qe, out=buf).masked_fill_(zero_p, 0.0)  # P / (Q + eps)
        M = P.sum(1, keepdim=True) if not eps else (r * Q).sum(1, keepdim=True)  # Σ P·Q/(Q+eps)
        G = r.neg_().add_(M).mul_(tt / sigma)  # ∂L/∂Qraw
        if chunk_scale is not None:
            G.mul_(chunk_scale[k0:k1].to(md).unsqueeze(1))
        g = (W @ G.t()).t()  # [Kb, V_S]: g_s = Σ_slot W_s,slot G[col] (ELL gather as a sparse-dense product)
        if grad_wj is not None:
            grad_wj += (pbar.index_select(1, s_j) * G.index_select(1, t_j)).sum(0)
        _write_grad(grad, rows, seg, n_s[k0:k1], p, g, tau, merge, wrt_log_p=False)
    grad_w = None
    if grad_wj is not None:
        grad_w = torch.zeros(w_val.shape, dtype=torch.float32, device=dev)
        grad_w[keep] = grad_wj.float()
    return loss, grad, grad_w


def hkl_rows(s_logits: Tensor, t_vals: Tensor, t_cols: Optional[Tensor], col_mask: Tensor, spans: Tensor,
             temperature: float, merge: str, s_chain: Optional[Tensor], t_chain: Optional[Tensor],
             teacher_is_logprob: bool, common_s: Tensor, common_t: Tensor, uncommon_topk: Optional[int],
             want_grad_chain: bool = False):
    """H-KL / GOLD (ULD = empty common set) per chunk. Precondition: every common_t is in col_mask.

    Returns (loss [K] fp32 (fp64 for fp64 logits), grad [N_s, V_S] in s_logits.dtype) and, with
    ``want_grad_chain``, a third value d(Σ loss)/d s_chain [N_s] in the math dtype (nonzero only at rows after a
    chunk's first; merge="chain"). CPU tensors with a dense fp32 teacher and fp32 student logits run the native
    kernel (``_C.hkl_rows``), everything else the chunked torch code."""
    del teacher_is_logprob
    if s_logits.device.type == "cpu" and t_cols is None and s_logits.dtype == t_vals.dtype == torch.float32:
        loss, grad, gsum = _hkl_rows_native(s_logits, t_vals, col_mask, spans, temperature, merge, s_chain, t_chain,
                                            common_s, common_t, uncommon_topk)
    else:
        loss, grad, gsum = _hkl_rows_torch(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain,
                                           t_chain, common_s, common_t, uncommon_topk)
    if not want_grad_chain:
        return loss, grad
    grad_chain = torch.zeros(s_logits.shape[0], dtype=loss.dtype, device=s_logits.device)
    if merge == "chain" and spans.shape[0]:
        spans = spans.long()
        later, seg = _expand(spans[:, 0] + 1, (spans[:, 1] - spans[:, 0] - 1).clamp(min=0))
        grad_chain[later] = gsum[seg]
    return loss, grad, grad_chain


def _hkl_rows_native(s_logits, t_vals, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
                     uncommon_topk):
    """hkl_rows through the torch-free C++ kernel (fp32 inputs as zero-copy numpy views) on
    ``torch.get_num_threads()`` threads. Returns (loss, grad, Σ_v ∂L/∂S_k[v] per chunk)."""
    from .. import _C

    K = spans.shape[0]
    chains = [c.detach().float().contiguous().numpy() if merge == "chain" and c is not None else None
              for c in (s_chain, t_chain)]
    loss, gsum = torch.empty(K, dtype=torch.float32), torch.empty(K, dtype=torch.float32)
    z = s_logits.detach().contiguous()
    grad = torch.empty_like(z)
    _C.hkl_rows(z.numpy(), t_vals.detach().contiguous().numpy(), col_mask.contiguous().numpy(),
                spans.long().contiguous().numpy(), float(temperature), merge, *chains,
                common_s.long().contiguous().numpy(), common_t.long().contiguous().numpy(),
                -1 if uncommon_topk is None else int(uncommon_topk), loss.numpy(), grad.numpy(), gsum.numpy(),
                torch.get_num_threads())
    return loss, grad, gsum


def _hkl_rows_torch(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s,
                    common_t, uncommon_topk):
    """hkl_rows in chunked torch ops (any device and dtype, dense or sparse teacher); returns (loss, grad, gsum)."""
    md = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    dev, tau = s_logits.device, float(temperature)
    V_S, K = s_logits.shape[1], spans.shape[0]
    spans = spans.long()
    cols = _allowed(col_mask)
    _, remap, n_a = cols
    n_s, n_t, blocks = _plan(spans, merge, _block_rows(V_S, n_a))
    chain = merge == "chain"
    s_chain_sum = _chain_sums(s_chain, spans[:, 0], spans[:, 1], md) if chain else None
    t_chain_sum = _chain_sums(t_chain, spans[:, 2], spans[:, 3], md) if chain else None
    cs, ct = common_s.long(), common_t.long()
    if remap is not None:
        ct = remap[ct]  # positions in A
    u_s = torch.ones(V_S, dtype=torch.bool, device=dev)
    u_s[cs] = False
    u_t = torch.ones(n_a, dtype=torch.bool, device=dev)
    u_t[ct] = False
    us_idx = torch.nonzero(u_s).squeeze(1)
    ut_idx = torch.nonzero(u_t).squeeze(1)
    m = min(us_idx.numel(), ut_idx.numel(), V_S if uncommon_topk is None else int(uncommon_topk))
    loss = torch.zeros(K, dtype=md, device=dev)
    grad = torch.zeros_like(s_logits)
    gsum = torch.zeros(K, dtype=md, device=dev)  # Σ_v ∂L/∂S_k[v] = ∂L/∂(chunk chain scalar)
    tt = tau * tau
    zero = torch.zeros((), dtype=md, device=dev)
    for k0, k1 in blocks:
        Kb = k1 - k0
        rows, seg = _expand(spans[k0:k1, 0], n_s[k0:k1])
        ell = _softmax_rows(s_logits, rows, tau, md, log=True)
        p = torch.exp(ell)
        if chain:
            S = ell + s_chain_sum[k0:k1].to(md).unsqueeze(1)
        elif rows.numel() == Kb:
            S = ell
        else:
            S = torch.zeros(Kb, V_S, dtype=md, device=dev).index_add_(0, seg, ell).div_(n_s[k0:k1].unsqueeze(1))
        t_rows, t_seg = _expand(spans[k0:k1, 2], n_t[k0:k1])
        T = _teacher_block(t_vals, t_cols, t_rows, t_seg, n_t[k0:k1], Kb, cols, tau, md,
                           None if t_chain_sum is None else t_chain_sum[k0:k1])
        P = torch.exp(T)
        gS = torch.zeros(Kb, V_S, dtype=md, device=dev)
        Pc = P.index_select(1, ct)
        kl = torch.where(Pc > 0, Pc * (T.index_select(1, ct) - S.index_select(1, cs)), zero).sum(1)
        gS.index_copy_(1, cs, Pc.mul_(-tt))
        l1 = torch.zeros(Kb, dtype=md, device=dev)
        if m > 0:
            a_all = torch.exp(S.index_select(1, us_idx) if us_idx.numel() < V_S else S)
            b_all = P.index_select(1, ut_idx) if ut_idx.numel() < n_a else P
            a, a_pos = _top(a_all, m)
            b = _top(b_all, m)[0]
            diff = a - b
            l1 = diff.abs().sum(1)
            a_cols = us_idx[a_pos] if us_idx.numel() < V_S else a_pos
            gS.scatter_add_(1, a_cols, tt * torch.sign(diff) * a)
        loss[k0:k1] = tt * (kl + l1)
        gsum[k0:k1] = gS.sum(1)
        _write_grad(grad, rows, seg, n_s[k0:k1], p, gS, tau, merge, wrt_log_p=True)
    return loss, grad, gsum


def _top(x: Tensor, m: int):
    """Largest m values per row, sorted descending. Tied values may come in any order: the sorted-L1 value does
    not depend on it and its gradient is then one valid subgradient."""
    if 4 * m < x.shape[1]:
        return torch.topk(x, m, dim=1)
    vals, pos = torch.sort(x, dim=1, descending=True)
    return vals[:, :m], pos[:, :m]


# ---- torch.library custom ops. The loss is the only differentiable output: backward rescales the gradient that the
# forward already computed by each chunk's incoming gradient (a student row belongs to at most one chunk). The W
# gradient cannot be rescaled per chunk afterwards, so with a learnable W backward reruns the op with chunk_scale.

def _row_scale(spans: Tensor, d_loss: Tensor, n_rows: int) -> Tensor:
    """[n_rows] in d_loss.dtype: d_loss[k] at every student row of chunk k, 0 at rows outside valid chunks."""
    rows, seg = _expand(spans[:, 0].long(), (spans[:, 1] - spans[:, 0]).long())
    out = torch.zeros(n_rows, dtype=d_loss.dtype, device=d_loss.device)
    return out.index_copy_(0, rows, d_loss[seg])


def _scaled(ctx, grad: Tensor, scale: Tensor) -> Tensor:
    """grad ⊙ scale per row (product in fp32/fp64, one rounding to the logits dtype). In eager mode this is done
    IN PLACE in the op's saved gradient output, so backward needs no second [N_s, V_S] buffer; the saved gradient
    is then consumed, and a second backward through the same graph (retain_graph=True) is refused instead of
    silently double-scaling. Under tracing (FakeTensor / functionalization, torch.compile) it is out of place."""
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return (grad * scale.unsqueeze(1)).to(grad.dtype)
    if getattr(ctx, "consumed", False):
        raise RuntimeError("xtoken fallback loss ops support one backward per forward (retain_graph re-use is not "
                           "supported); recompute the loss for a second backward")
    ctx.consumed = True
    return grad.mul_(scale.unsqueeze(1))


@torch.library.custom_op("xtoken::pkl_rows_fallback", mutates_args=())
def _pkl_op(s_logits: Tensor, t_vals: Tensor, t_cols: Optional[Tensor], w_idx: Tensor, w_val: Tensor,
            col_mask: Tensor, spans: Tensor, temperature: float, merge: str, eps: float, t_chain: Optional[Tensor],
            chunk_scale: Optional[Tensor], need_grad_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    loss, grad, grad_w = pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps,
                                  None, t_chain, False, need_grad_w, chunk_scale)
    return loss, grad, grad_w if grad_w is not None else w_val.new_zeros(0, dtype=torch.float32)


@_pkl_op.register_fake
def _(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain, chunk_scale,
      need_grad_w):
    md = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    return (s_logits.new_empty(spans.shape[0], dtype=md), torch.empty_like(s_logits),
            w_val.new_empty(w_val.shape if need_grad_w else (0,), dtype=torch.float32))


def _pkl_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the unused gradient outputs would otherwise get [N_s, V_S] zero grads
    s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain, _, need_grad_w = inputs
    ctx.args = (temperature, merge, eps, need_grad_w)
    if need_grad_w:
        ctx.save_for_backward(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, t_chain)
    else:
        ctx.save_for_backward(spans, output[1])


def _pkl_backward(ctx, d_loss, d_grad, d_grad_w):
    temperature, merge, eps, need_grad_w = ctx.args
    if d_loss is None:  # the loss output was not used
        return (None,) * 13
    if not need_grad_w:
        spans, grad = ctx.saved_tensors
        return (_scaled(ctx, grad, _row_scale(spans, d_loss, grad.shape[0])),) + (None,) * 12
    s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, t_chain = ctx.saved_tensors
    _, grad, grad_w = torch.ops.xtoken.pkl_rows_fallback(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans,
                                                         temperature, merge, eps, t_chain, d_loss.float(), True)
    return (grad,) + (None,) * 3 + (grad_w,) + (None,) * 8


_pkl_op.register_autograd(_pkl_backward, setup_context=_pkl_setup)


def pkl_rows_autograd(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps,
                      s_chain=None, t_chain=None, teacher_is_logprob=False) -> Tensor:
    """Differentiable per-chunk P-KL [K] (``xtoken::pkl_rows_fallback``): gradients flow to ``s_logits`` and, when
    it requires grad, to ``w_val``. Arguments as in :func:`pkl_rows`."""
    del s_chain, teacher_is_logprob
    need_grad_w = w_val.requires_grad and torch.is_grad_enabled()
    return torch.ops.xtoken.pkl_rows_fallback(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans,
                                              float(temperature), merge, float(eps), t_chain, None, need_grad_w)[0]


@torch.library.custom_op("xtoken::hkl_rows_fallback", mutates_args=())
def _hkl_op(s_logits: Tensor, t_vals: Tensor, t_cols: Optional[Tensor], col_mask: Tensor, spans: Tensor,
            temperature: float, merge: str, s_chain: Optional[Tensor], t_chain: Optional[Tensor], common_s: Tensor,
            common_t: Tensor, uncommon_topk: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    return hkl_rows(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, False,
                    common_s, common_t, uncommon_topk, want_grad_chain=True)


@_hkl_op.register_fake
def _(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
      uncommon_topk):
    md = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    return (s_logits.new_empty(spans.shape[0], dtype=md), torch.empty_like(s_logits),
            s_logits.new_empty(s_logits.shape[0], dtype=md))


def _hkl_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.has_chain = inputs[7] is not None
    ctx.save_for_backward(inputs[4], output[1], output[2])


def _hkl_backward(ctx, d_loss, d_grad, d_grad_chain):
    if d_loss is None:  # the loss output was not used
        return (None,) * 12
    spans, grad, grad_chain = ctx.saved_tensors
    scale = _row_scale(spans, d_loss, grad.shape[0])
    d_chain = grad_chain * scale.to(grad_chain.dtype) if ctx.has_chain else None
    return (_scaled(ctx, grad, scale),) + (None,) * 6 + (d_chain,) + (None,) * 4


_hkl_op.register_autograd(_hkl_backward, setup_context=_hkl_setup)


def hkl_rows_autograd(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain,
                      teacher_is_logprob, common_s, common_t, uncommon_topk) -> Tensor:
    """Differentiable per-chunk H-KL / GOLD / ULD [K] (``xtoken::hkl_rows_fallback``): gradients flow to
    ``s_logits`` and ``s_chain``. Arguments as in :func:`hkl_rows`."""
    del teacher_is_logprob
    return torch.ops.xtoken.hkl_rows_fallback(s_logits, t_vals, t_cols, col_mask, spans, float(temperature), merge,
                                              s_chain, t_chain, common_s, common_t, uncommon_topk)[0]
