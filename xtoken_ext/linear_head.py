"""Fused linear-head losses: P-KL / H-KL / GOLD / ULD from the student's last hidden states and its lm-head weight,
without materializing the [rows, V_S] logits (``xt.pkl_loss_from_hidden`` ...; DESIGN.md §2 for the losses).

Logit rows (student; the teacher alike when it is given as hidden states):
  x = h Wᵀ + b,  z = c·tanh(s·x/c)   (logit_scale s, Gemma-style softcap c; z = s·x without a softcap)
The rows a loss reads (per chunk: all its rows for merge="mean" and, H-KL family, "chain"; the first otherwise) are
processed in blocks of whole chunks (a chunk is never split; block size from ``block_rows`` or ``block_bytes``):
the block's logits, the row-space op of xtoken_ext.losses (any backend; it returns ∂Σ_k L_k/∂z in its forward), the
chain rule and the accumulations
  ∂x = ∂z · s·(1 − (z/c)²),   ∂h[rows] = ∂x W,   ∂W += ∂xᵀ h,   ∂b += Σ_rows ∂x,
then the block is freed. Peak extra memory: O(block rows × (V_S + V_T)) beside the gradients of h, W and b
themselves; independent of T. ∂W and ∂b accumulate in the weight's dtype when it is fp32 / fp64, else in fp32 (each
block's product computed in the weight's dtype, as torch's matmul would) and are rounded once at the end.

The gradient is formed in the forward with unit weight per kept chunk; backward multiplies it by the incoming
gradient of the scalar loss. So the reduction is "sum" or "mean" (the mean's 1/count, or 1/normalizer, is a uniform
factor applied in backward); reduction="none" would need per-chunk weights and is refused. Everything else — chunk
exclusion, ``nonfinite``, ``normalizer`` for gradient accumulation across micro-batches or ranks — is exactly
``xt.pkl_loss`` on the materialized logits, except that the rows of an excluded chunk contribute exactly 0 to ∂W
and ∂b as well (autograd through a materialized head would give 0·NaN = NaN there for a NaN row of h). The
functions run eagerly under torch.compile (a graph break: the block loop is data-dependent); one backward per
forward. Autocast does not apply inside: the head runs in the dtype of h and W.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import losses as L
from .alignment import Alignment
from .ops._common import math_dtype, plan, saved
from .projection import Projection

__all__ = ["pkl_loss_from_hidden", "hkl_loss_from_hidden", "gold_loss_from_hidden", "uld_loss_from_hidden"]

BLOCK_BYTES = 256 << 20  # default scratch budget of one block (logits, their gradient, teacher rows, temporaries)


class _Head(NamedTuple):
    """A linear lm-head z = c·tanh(s·(h Wᵀ + b)/c)."""
    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    scale: float | None

    def logits(self, h: Tensor) -> Tensor:
        z = F.linear(h, self.weight, self.bias)
        if self.scale is not None:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def chain_(self, dz: Tensor, z: Tensor, md, drop: Tensor) -> Tensor:
        """∂x from ∂z in place: ∂z · s·(1 − (z/c)²), the factor formed in the math dtype md; rows ``drop`` (of
        excluded chunks: zero ∂z, maybe NaN z) stay exactly 0."""
        s = 1.0 if self.scale is None else self.scale
        if self.softcap is not None:
            f = (z.to(md) / self.softcap).square_().mul_(-s).add_(s)
            return dz.mul_(f.masked_fill_(drop.unsqueeze(1), 0.0))
        return dz.mul_(s) if s != 1.0 else dz


def _check_head(name: str, hidden, weight, bias, softcap, scale, rows: int, device=None) -> tuple[_Head, Tensor]:
    """A head's checks -> (head, hidden as flat [N, d] rows). ``rows``: the vocabulary W must have."""
    for what, x in ((f"{name}_hidden", hidden), (f"{name}_head_weight", weight)):
        L._check(isinstance(x, Tensor) and x.is_floating_point(), f"{what} must be a floating-point tensor")
    L._check(hidden.dim() in (2, 3), f"{name}_hidden must be [B, T, d] or [N, d], got shape {tuple(hidden.shape)}")
    L._check(weight.dim() == 2 and weight.shape == (rows, hidden.shape[-1]),
             f"{name}_head_weight must be [V, d] = [{rows}, {hidden.shape[-1]}] (proj's vocabulary, the hidden "
             f"size), got shape {tuple(weight.shape)}")
    L._check(weight.dtype == hidden.dtype and weight.device == hidden.device,
             f"{name}_head_weight ({weight.dtype}, {weight.device}) must match {name}_hidden's dtype and device "
             f"({hidden.dtype}, {hidden.device})")
    L._check(device is None or hidden.device == device,
             f"{name}_hidden on {hidden.device} but the student on {device}")
    if bias is not None:
        L._check(isinstance(bias, Tensor) and bias.shape == (rows,) and bias.dtype == weight.dtype and
                 bias.device == weight.device, f"{name}_head_bias must be a [{rows}] tensor like the weight")
    for what, v in (("softcap", softcap), ("logit_scale", scale)):
        if v is not None:
            L._check(isinstance(v, numbers.Real) and not isinstance(v, bool), f"{what} must be a number or None, "
                                                                           f"got {type(v).__name__}", TypeError)
            L._check(math.isfinite(v) and (v > 0 if what == "softcap" else v != 0),
                     f"{what} must be finite and {'> 0' if what == 'softcap' else 'nonzero'}, got {v}")
    head = _Head(weight, bias, None if softcap is None else float(softcap), None if scale is None else float(scale))
    return head, hidden.reshape(-1, hidden.shape[-1])


def _scaled(x: Tensor, g: Tensor, dtype) -> Tensor:
    """x·g in ``dtype``: in place when x has it. g as a 1-element dimensioned tensor, so a bf16 x is multiplied in
    fp32 and rounded once."""
    g = g.reshape([1] * x.dim())
    return x.mul_(g) if x.dtype == dtype else (x * g).to(dtype)


class _Fused(torch.autograd.Function):
    """(Σ kept chunk losses, excluded count) of ``run``, which returns them with the gradients of that sum wrt
    (hidden, weight, bias, W weights) or None; backward scales them by the incoming gradient, in place."""

    @staticmethod
    def forward(ctx, run, hidden, weight, bias, w_val):
        total, n_excluded, grads = run()
        ctx.mark_non_differentiable(n_excluded)
        ctx.dtypes = [None if x is None else x.dtype for x in (hidden, weight, bias, w_val)]
        ctx.save_for_backward(*grads)
        return total, n_excluded

    @staticmethod
    def backward(ctx, g, _):  # saved() refuses create_graph=True: the gradients are constants
        return (None, *(None if x is None else _scaled(x, g, dt) for x, dt in zip(saved(ctx), ctx.dtypes)))


def _run(kind, student_hidden, student_head_weight, teacher_logits, alignment, proj, temperature, reduction, *,
         student_head_bias, softcap, logit_scale, teacher_hidden, teacher_head_weight, teacher_head_bias,
         teacher_softcap, teacher_logit_scale, block_rows, block_bytes, merge, uncovered, teacher_topk, uncommon_topk,
         normalizer, teacher_indices, student_ids, teacher_ids, backend, nonfinite):
    """-> (loss, number of excluded chunks as a 0-dim int64 tensor)."""
    o = L._check_options(kind, alignment, proj, temperature, reduction, merge, uncovered, teacher_topk,
                         uncommon_topk, normalizer, student_ids, teacher_ids, backend, nonfinite)
    L._check(reduction != "none", "reduction='none' is not supported by the fused linear-head losses (their "
                                  "gradient is formed in the forward with one weight per chunk): use 'sum' or "
                                  "'mean', or materialize the logits and call the plain loss")
    block_rows = L._int_option(block_rows, "block_rows", 1)
    L._check(isinstance(block_bytes, numbers.Integral) and not isinstance(block_bytes, bool) and block_bytes > 0,
             f"block_bytes must be an int > 0, got {block_bytes!r}")
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    head, hs = _check_head("student", student_hidden, student_head_weight, student_head_bias, softcap, logit_scale,
                           V_S)
    device, dim2 = hs.device, student_hidden.dim() == 2
    B, T_S = (1, student_hidden.shape[0]) if dim2 else student_hidden.shape[:2]
    if teacher_hidden is None:
        for name, value in (("teacher_head_weight", teacher_head_weight), ("teacher_head_bias", teacher_head_bias),
                            ("teacher_softcap", teacher_softcap), ("teacher_logit_scale", teacher_logit_scale)):
            L._check(value is None, f"{name} is given without teacher_hidden (teacher_logits are used as they are)")
        L._check(teacher_logits is not None, "the teacher is needed: teacher_logits, or teacher_hidden with "
                                             "teacher_head_weight")
        sparse = L._check_teacher(teacher_logits, teacher_indices, proj, student_hidden, "student_hidden")
        t_vals, B_t, T_T = L._rows(teacher_logits.detach(), "teacher_logits")
        t_cols = L._rows(teacher_indices, "teacher_indices")[0] if sparse else None
        t_fetch, t_elem = L._fetch_rows(t_vals, t_cols), 0  # a block's teacher rows: a view, no copy
    else:
        L._check(teacher_logits is None and teacher_indices is None,
                 "give the teacher as teacher_logits (and teacher_indices) or as teacher_hidden, not both")
        L._check(teacher_head_weight is not None, "teacher_hidden needs teacher_head_weight")
        L._check(teacher_hidden.dim() == student_hidden.dim(),
                 f"student_hidden and teacher_hidden must both be [B, T, d] or both [N, d], got shapes "
                 f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
        t_head, t_hs = _check_head("teacher", teacher_hidden.detach(), teacher_head_weight.detach(),
                                   None if teacher_head_bias is None else teacher_head_bias.detach(), teacher_softcap,
                                   teacher_logit_scale, V_T, device)
        B_t, T_T = (1, teacher_hidden.shape[0]) if dim2 else teacher_hidden.shape[:2]
        t_vals, t_elem = None, t_head.weight.element_size()

        @torch.no_grad()
        @torch.autocast(device.type, enabled=False)  # the rows _prepare reads (top-k, chain) as run()'s blocks do
        def t_fetch(r):
            return t_head.logits(t_hs.index_select(0, r)), None
    md = math_dtype(head.weight.dtype)
    p = L._prepare(o, alignment, proj, B, T_S, B_t, T_T, B_t * T_T, dim2, md, device, t_fetch)

    # rows each chunk's op reads: student side all of them for "mean" and the H-KL family's "chain" (chain scalars),
    # the first otherwise; teacher side (computed from hidden states) all but for "first" (chain: the op sums the
    # later rows' chain scalars). Given teacher logits: the block's rows as one slice (chunks are in row order).
    sp = p.spans_host
    n_s = sp[:, 1] - sp[:, 0] if merge == "mean" or (merge == "chain" and kind != "pkl") else torch.ones_like(sp[:, 0])
    n_t = sp[:, 3] - sp[:, 2] if merge != "first" else torch.ones_like(sp[:, 0])
    if block_rows is None:  # per row: logits and their gradient, an md temporary; a computed teacher row
        per_row = (2 * head.weight.element_size() + md.itemsize) * V_S + t_elem * V_T
        block_rows = max(1, block_bytes // per_row)
    zero = torch.zeros_like(n_s)
    blocks = plan(torch.stack([zero, n_s, zero, n_t], 1), "mean", V_S, V_T, block_rows)[2]  # whole chunks

    w_val = p.w_val
    grad_on = torch.is_grad_enabled()
    need = [x is not None and x.requires_grad and grad_on for x in (student_hidden, head.weight, head.bias, w_val)]

    names = ("the logits of student_hidden", "teacher_logits" if teacher_hidden is None else
             "the logits of teacher_hidden")  # the nonfinite error's

    def s_fetch(r):  # student logit rows (the nonfinite error path)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return head.logits(hs.index_select(0, r.to(device)))

    @torch.autocast(device.type, enabled=False)  # the head runs in the weight's dtype (cast h and W for bf16)
    def run():
        total = torch.zeros((), dtype=md, device=device)
        n_excluded = torch.zeros((), dtype=torch.int64, device=device)
        W = head.weight
        grads = [torch.zeros(student_hidden.shape, dtype=W.dtype, device=device) if need[0] else None,
                 torch.zeros(W.shape, dtype=md, device=device) if need[1] else None,  # block sums in fp32 / fp64
                 torch.zeros(W.shape[0], dtype=md, device=device) if need[2] else None,
                 torch.zeros(w_val.shape, dtype=math_dtype(w_val.dtype), device=device) if need[3] else None]
        any_grad = any(need)
        for k0, k1 in blocks:
            Kb = k1 - k0
            s_rows, s_seg = L._expand_to(sp[k0:k1, 0], n_s[k0:k1], device)
            s_end = torch.cumsum(n_s[k0:k1], 0)
            if t_vals is not None:
                lo, hi = int(sp[k0:k1, 2].min()), int(sp[k0:k1, 3].max())
                t_b, tc_b = t_vals[lo:hi], None if t_cols is None else t_cols[lo:hi]
                t_local, t_chain = sp[k0:k1, 2:] - lo, None if p.t_chain is None else p.t_chain[lo:hi]
            else:
                t_rows = L._expand_to(sp[k0:k1, 2], n_t[k0:k1], device)[0]
                t_b, tc_b = t_fetch(t_rows)
                t_end = torch.cumsum(n_t[k0:k1], 0)
                t_local, t_chain = torch.stack([t_end - n_t[k0:k1], t_end], 1), \
                    None if p.t_chain is None else p.t_chain[t_rows]
            local_host = torch.cat([torch.stack([s_end - n_s[k0:k1], s_end], 1), t_local], 1)  # block-local rows
            local = local_host.to(device, non_blocking=True)
            h = hs.index_select(0, s_rows)
            with torch.no_grad():
                z = head.logits(h)
            with torch.set_grad_enabled(any_grad):
                zl = z.requires_grad_(any_grad)
                wl = w_val.detach().requires_grad_(need[3]) if w_val is not None else None
                s_chain = None
                bad = p.chain_bad[k0:k1]
                if merge == "chain" and kind != "pkl":  # the later rows: local positions, global next ids
                    later, seg = L._later_rows(local_host, 0, device)
                    g_later = L._later_rows(sp[k0:k1], 0, device)[0]
                    s_chain, s_bad = L._student_chain(zl, p.student_ids[g_later + 1], later, seg, Kb, o.tau, md)
                    bad = bad | s_bad
                loss = L._op(o, p, zl, t_b, tc_b, local, t_chain, s_chain, wl)
                if merge == "chain":
                    loss = loss.masked_fill(bad, math.nan)
                excluded = L._excluded(loss.detach(), nonfinite, lambda j: L._raise_nonfinite(
                    k0 + j, kind, merge, alignment, sp, s_fetch, t_fetch, T_S, T_T, o.backend, o.tau, names))
                kept = loss.masked_fill(excluded, 0.0)
                total += kept.detach().sum()
                n_excluded += excluded.sum()
                if not any_grad:
                    continue
                dz, *dw = torch.autograd.grad(kept.sum(), [zl] + ([wl] if need[3] else []))
            drop = excluded[s_seg]  # rows of excluded chunks: no gradient, also not 0·NaN from a NaN row of h
            dx = head.chain_(dz, z, md, drop)
            del z, zl, t_b, dz
            if need[0]:
                grads[0].view(-1, W.shape[1]).index_copy_(0, s_rows, dx @ W)
            if need[1]:
                h = h.masked_fill(drop.unsqueeze(1), 0.0)
                if md == W.dtype:
                    grads[1].addmm_(dx.t(), h)
                else:
                    grads[1] += dx.t() @ h
            if need[2]:
                grads[2] += dx.sum(0, dtype=md)
            if need[3]:
                grads[3] += dw[0]
        return total, n_excluded, grads

    if any(need):
        total, n_excluded = _Fused.apply(run, student_hidden, head.weight, head.bias, w_val)
    else:
        total, n_excluded, _ = run()
    return L._normalized(total, n_excluded, sp.shape[0], o), n_excluded


_DOC = """

    Fused linear head (xtoken_ext.linear_head): the student's logits z = c·tanh(s·(h Wᵀ + b)/c) are formed block by
    block, never all at once; loss and gradients (wrt student_hidden, student_head_weight, student_head_bias, and a
    LearnableProjection's θ) equal the plain loss on the materialized logits.
    student_hidden [B, T_S, d] (or [N, d]); student_head_weight [V_S, d] (same dtype and device; tied to the input
    embedding or not); student_head_bias [V_S] or None; softcap c (Gemma-style final logit soft-capping) and
    logit_scale s: None or a number.
    The teacher: teacher_logits [B, T_T, V_T] (or top-k log-probs with teacher_indices), or teacher_logits=None with
    teacher_hidden [B, T_T, d_T] and teacher_head_weight [V_T, d_T] (teacher_head_bias, teacher_softcap,
    teacher_logit_scale as for the student; no gradient), its logits formed block by block too (with teacher_topk or
    merge="chain" a first pass computes them once more, without keeping them).
    block_rows: logit rows per block (whole chunks; a longer chunk is a block alone), default from block_bytes
    (scratch budget, default 256 MiB).
    reduction: "mean" (default) | "sum"; "none" is refused. The other options are those of the plain loss
    (xt.{kind}_loss), with the same meaning."""


def _make(kind: str):
    @torch.compiler.disable  # a data-dependent block loop: runs eagerly under torch.compile (a graph break)
    def run(student_hidden, student_head_weight, teacher_logits, alignment, proj, temperature=1.0, reduction="mean",
            *, student_head_bias=None, softcap=None, logit_scale=None, teacher_hidden=None, teacher_head_weight=None,
            teacher_head_bias=None, teacher_softcap=None, teacher_logit_scale=None, block_rows=None,
            block_bytes=BLOCK_BYTES, merge="mean", uncovered="renormalize", teacher_topk=None,
            uncommon_topk=L._DEFAULT, normalizer=None, teacher_indices=None, student_ids=None, teacher_ids=None,
            backend=None, nonfinite="raise"):  # -> (loss, excluded chunks)
        return _run(kind, student_hidden, student_head_weight, teacher_logits, alignment, proj, temperature,
                    reduction, student_head_bias=student_head_bias, softcap=softcap, logit_scale=logit_scale,
                    teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head_weight,
                    teacher_head_bias=teacher_head_bias, teacher_softcap=teacher_softcap,
                    teacher_logit_scale=teacher_logit_scale, block_rows=block_rows, block_bytes=block_bytes,
                    merge=merge, uncovered=uncovered, teacher_topk=teacher_topk,
                    uncommon_topk=L._UNCOMMON_DEFAULT[kind] if uncommon_topk is L._DEFAULT else uncommon_topk,
                    normalizer=normalizer, teacher_indices=teacher_indices, student_ids=student_ids,
                    teacher_ids=teacher_ids, backend=backend, nonfinite=nonfinite)

    @torch.compiler.disable
    def loss(student_hidden: Tensor, student_head_weight: Tensor, teacher_logits: Tensor | None,
             alignment: Alignment, proj: Projection | L.LearnableProjection, temperature: float = 1.0,
             reduction: str = "mean", **options) -> Tensor:
        return run(student_hidden, student_head_weight, teacher_logits, alignment, proj, temperature, reduction,
                   **options)[0]

    loss.__name__ = loss.__qualname__ = f"{kind}_loss_from_hidden"
    loss.__doc__ = L._SUMMARY[kind] + _DOC.format(kind=kind)
    loss.with_excluded = run
    return loss


pkl_loss_from_hidden = _make("pkl")
hkl_loss_from_hidden = _make("hkl")
gold_loss_from_hidden = _make("gold")
uld_loss_from_hidden = _make("uld")
