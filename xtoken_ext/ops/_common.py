"""Helpers shared by the loss ops (torch only; the Triton helpers live in ``_tl``).

Row-space contract of every op: student logit rows s_logits [N_s, V_S], teacher rows t_vals [N_t, C] (dense: C = V_T;
sparse: top-k values with their column ids t_cols [N_t, k]), chunk spans [K, 4] int64 (s_lo, s_hi, t_lo, t_hi) with
disjoint student rows, the allowed teacher columns col_mask bool [V_T]. Each op returns the per-chunk loss together
with the gradient of Σ_k loss_k wrt s_logits, computed in the forward pass (the loss is terminal); autograd's
backward only rescales that gradient, in place, by the incoming per-chunk gradient.

Non-finite input (every backend): a chunk whose merged rows hold NaN or +inf in any column (a sparse teacher: in
its top-k values), or a student row without a finite value, or a NaN / +inf chain scalar, has loss NaN and exact-zero
gradient rows (no W-gradient / chain-gradient part); −inf logits are zero probabilities. P-KL then: no teacher mass
on A -> loss 0, zero gradient; projected student mass Z = 0 or an infinite KL (P > 0 where Q + eps = 0) -> loss
+inf, zero gradient (with fp32 math Z counts as 0 below 2^-180, and below τ max(1, |c|) 2^-192, c the chunk scale:
the reach of the gradient's scaled factors, ops.pkl). The public losses raise on or exclude such chunks
(xtoken_ext.losses).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import numbers
import os
import sys
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

SLOTS = 4  # W's ELL slots per student row
BACKENDS = ("auto", "triton", "native", "torch")


def cached_on_tensors(n: int, size: int = 16):
    """Decorator: f(*tensors, *rest) kept while its first ``n`` arguments are the same tensor objects, unchanged
    (their version counters and data pointers: an in-place update or a swapped ``.data`` computes it anew), and
    ``rest`` (hashable) the same values: what the kernels derive from a frozen W, the column mask or the common
    pairs, the same tensors in every training step. Never kept for a tensor that requires grad (a parameter, which
    fused optimizers update without a version bump) or an inference tensor (no version counter); a write through
    ``.data`` or a NumPy view, which bumps no version either, needs a new tensor. Weak references to the tensors; an
    entry whose tensors are gone is dropped at the next miss, and at most ``size`` are kept."""
    def wrap(f):
        entries: dict = {}

        @functools.wraps(f)
        def cached(*args):
            tensors, rest = args[:n], args[n:]
            if any(t.is_inference() or t.requires_grad for t in tensors):
                return f(*args)
            key, state = (tuple(map(id, tensors)), rest), tuple((t._version, t.data_ptr()) for t in tensors)
            hit = entries.get(key)
            if hit is not None and hit[1] == state and all(r() is t for r, t in zip(hit[0], tensors)):
                return hit[2]
            out = f(*args)
            for k, e in list(entries.items()):  # a copy: another thread may insert meanwhile
                if any(r() is None for r in e[0]):
                    entries.pop(k, None)
            if len(entries) >= size:
                entries.clear()
            entries[key] = (tuple(weakref.ref(t) for t in tensors), state, out)
            return out

        return cached
    return wrap


def interpret() -> bool:
    """Triton runs on CPU tensors through its interpreter: TRITON_INTERPRET=1, set before triton is imported (triton
    builds its standard library's functions for the interpreter at import; set later, every kernel failed with
    "Cannot call @triton.jit'd outside of the scope of a kernel")."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    std = sys.modules.get("triton.language.standard")
    return std is None or type(std.cdiv).__name__ == "InterpretedFunction"


def no_autocast(device: torch.device):
    """The ops compute in their own math dtype: autocast would run the torch backend's sparse products in bf16/fp16
    (which the CPU's sparse kernels refuse, and which lose the precision the tests bound)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else \
        contextlib.nullcontext()


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute (and return the loss) in: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype, native_ok: bool) -> str:
    """"auto" (default: $XTOKEN_BACKEND or "auto") -> "triton" on CUDA with Triton importable (float64 excepted),
    "native" where the C++ kernel applies (``native_ok``), else "torch"; an explicit backend is checked (Triton: not
    for float64 logits, which it would compute in float32)."""
    backend = backend or os.environ.get("XTOKEN_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "native" if native_ok else "torch"
    if backend == "native" and not native_ok:
        raise ValueError("backend='native' needs CPU tensors and a dense teacher with float32 (P-KL: or bf16/fp16) "
                         "logits; use backend='torch' or 'auto'")
    if backend == "triton" and dtype == torch.float64:
        raise ValueError("backend='triton' computes in float32; float64 logits need backend='torch' (or 'auto', "
                         "which picks it for them)")
    if backend == "triton" and device.type != "cuda" and not interpret():
        raise ValueError(f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                         f"imported to run on {device.type} tensors")
    return backend


MERGES = ("mean", "first", "chain")
TAU_RANGE = (2.0 ** -63, 2.0 ** 64)  # τ, τ² and 1/τ are finite normal fp32 numbers exactly for τ in [lo, hi)


def check_temperature(temperature) -> float:
    """τ as a float, checked as the kernels use it: fp32 τ, τ² and 1/τ finite and normal, i.e. 2⁻⁶³ ≤ τ < 2⁶⁴
    (TypeError for bool / non-numbers, ValueError for NaN, ±inf, ≤ 0 or out of that range)."""
    if isinstance(temperature, Tensor) and temperature.numel() == 1 and temperature.dtype != torch.bool:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    tau = float(temperature)
    if not TAU_RANGE[0] <= tau < TAU_RANGE[1]:
        raise ValueError(f"temperature must be a finite number in [2**-63, 2**64) (τ, τ² and 1/τ are used in "
                         f"float32), got {temperature}")
    return tau


def check_data(cond: Tensor, msg: str) -> None:
    """A data-dependent check: ValueError now for CPU tensors, asserted asynchronously on the device (no host
    sync; it surfaces as a device-side assert with ``msg``)."""
    if cond.device.type == "cpu":
        if not bool(cond):
            raise ValueError(msg)
    else:
        torch._assert_async(cond, msg)


def check_rows(s_logits: Tensor, t_vals: Tensor, t_cols: Tensor | None, col_mask: Tensor) -> None:
    """The row-space contract's shapes (module docstring), checked before any backend indexes by them (the Triton
    kernels load a dense teacher row's V_T columns without a bounds mask)."""
    if s_logits.dim() != 2 or t_vals.dim() != 2 or col_mask.dim() != 1:
        raise ValueError(f"s_logits [N_s, V_S], t_vals [N_t, C] and col_mask [V_T] expected, got shapes "
                         f"{tuple(s_logits.shape)}, {tuple(t_vals.shape)} and {tuple(col_mask.shape)}")
    if t_cols is None and t_vals.shape[1] != col_mask.numel():
        raise ValueError(f"a dense teacher needs t_vals [N_t, V_T] with V_T = col_mask.numel() = {col_mask.numel()}, "
                         f"got {t_vals.shape[1]} columns")
    if t_cols is not None and t_cols.shape != t_vals.shape:
        raise ValueError(f"a sparse teacher needs t_cols shaped like t_vals, got {tuple(t_cols.shape)} and "
                         f"{tuple(t_vals.shape)}")


def check_options(merge: str, col_mask: Tensor, chains: dict[str, tuple[Tensor | None, int]]) -> None:
    """The options every backend reads alike: the merge, the allowed-column mask's dtype and, for merge="chain",
    the chain scalars (``chains``: name -> (tensor, rows of its side))."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if col_mask.dtype != torch.bool:
        raise TypeError(f"col_mask must be a bool tensor [V_T], got {col_mask.dtype}")
    if merge != "chain":
        return
    for name, (c, n) in chains.items():
        if c is None or c.shape != (n,) or not c.is_floating_point():
            got = "None" if c is None else f"{c.dtype} {tuple(c.shape)}"
            raise ValueError(f"merge='chain' needs {name} [{n}] (a floating tensor, one scalar per row), got {got}")


def check_spans(spans: Tensor, N_s: int, N_t: int) -> None:
    """spans [K, 4] as every backend needs them: 0 ≤ lo < hi ≤ N on each side and disjoint student rows
    (``check_data``: raised for CPU spans, asserted on the device)."""
    if not spans.shape[0]:
        return
    s_lo, s_hi, t_lo, t_hi = spans.unbind(1)
    ok = ((0 <= s_lo) & (s_lo < s_hi) & (s_hi <= N_s) & (0 <= t_lo) & (t_lo < t_hi) & (t_hi <= N_t)).all()
    order = torch.argsort(s_lo)
    ok &= (s_hi[order[:-1]] <= s_lo[order[1:]]).all()
    check_data(ok, f"spans must have 0 <= lo < hi <= N (N_s = {N_s}, N_t = {N_t}) and disjoint student rows")


def check_pairs(common_s: Tensor, common_t: Tensor, V_S: int, V_T: int) -> None:
    """Common pairs as every backend needs them: [C] integer ids, 0 ≤ s_c < V_S and 0 ≤ t_c < V_T, each student
    and each teacher id at most once (a matching, as ``Projection.common_pairs`` gives; the kernels map each id to
    one partner, so a repeated id gave backend-dependent losses). ``check_data``: no host sync on the device."""
    if common_s.dim() != 1 or common_s.shape != common_t.shape:
        raise ValueError(f"common_s and common_t must be [C], got shapes {tuple(common_s.shape)} and "
                         f"{tuple(common_t.shape)}")
    if common_s.is_floating_point() or common_t.is_floating_point() or torch.bool in (common_s.dtype, common_t.dtype):
        raise TypeError(f"common pairs must be integer ids, got {common_s.dtype} and {common_t.dtype}")
    if not common_s.numel():
        return
    ok = torch.ones((), dtype=torch.bool, device=common_s.device)
    for ids, V in ((common_s.long(), V_S), (common_t.long(), V_T)):
        ok &= ((0 <= ids) & (ids < V)).all()
        uses = torch.zeros(max(V, 1), dtype=torch.int32, device=ids.device)
        ok &= uses.index_add_(0, ids.clamp(0, max(V - 1, 0)), torch.ones_like(ids, dtype=torch.int32)).amax() <= 1
    check_data(ok, f"common pairs must be ids with 0 <= s_c < V_S = {V_S} and 0 <= t_c < V_T = {V_T}, each student "
                   f"and each teacher id at most once (a matching, as Projection.common_pairs gives)")


def nonfinite_rows(x: Tensor, student: bool) -> Tensor:
    """bool [N]: rows of x [N, C] with a NaN or +inf entry; for ``student`` rows also rows without a finite value
    (all −inf). One max reduction per row, no copy: max is NaN (propagated), +inf or −inf exactly then."""
    m = x.amax(1) if x.shape[1] else x.new_full((x.shape[0],), -math.inf)
    return ~torch.isfinite(m) if student else ~(m < math.inf)


def chunk_any(flags: Tensor, seg: Tensor, K: int) -> Tensor:
    """bool [K]: chunk k has a flagged row (flags [n] of the rows whose chunk is seg [n])."""
    return torch.zeros(K, dtype=torch.int32, device=flags.device).index_add_(0, seg, flags.to(torch.int32)) > 0


def expand(lo: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Rows lo_k + [0, n_k) of every chunk, concatenated, and the chunk of each row (data-dependent size: call it on
    CPU index tensors, or accept the host sync)."""
    seg = torch.repeat_interleave(torch.arange(lo.numel(), device=lo.device), n)
    start = torch.cumsum(n, 0) - n
    return lo[seg] + torch.arange(seg.numel(), device=lo.device) - start[seg], seg


def covered_rows(spans: Tensor, merge: str, n: int) -> Tensor:
    """int8 [n]: 1 at the student rows some chunk merges ([lo, hi) for "mean", lo alone otherwise); difference
    array + cumsum, no host sync."""
    lo = spans[:, 0]
    hi = spans[:, 1] if merge == "mean" else lo + 1
    d = torch.zeros(n + 1, dtype=torch.int32, device=spans.device)
    d.index_add_(0, lo, torch.ones_like(lo, dtype=torch.int32))
    d.index_add_(0, hi, -torch.ones_like(hi, dtype=torch.int32))
    return (torch.cumsum(d, 0)[:n] > 0).to(torch.int8)


def row_scale(lo: Tensor, hi: Tensor, g: Tensor, n: int) -> Tensor:
    """[n] in g's dtype: g[k] at rows [lo_k, hi_k) (disjoint ranges), 0 elsewhere. The chunk id of each row comes
    from an exact integer difference array (no host sync)."""
    k1 = torch.arange(1, lo.numel() + 1, device=lo.device)
    d = torch.zeros(n + 1, dtype=torch.int64, device=lo.device)
    d.index_add_(0, lo, k1)
    d.index_add_(0, hi, -k1)
    chunk = torch.cumsum(d, 0)[:n] - 1  # −1 outside every range: picks the appended 0
    return torch.cat([g, g.new_zeros(1)])[chunk]


_SCALE_BLOCK_BYTES = 16 << 20


def scale_grad(grad: Tensor, scale: Tensor, triton: bool) -> Tensor:
    """The saved gradient times the row scale [N_s] (``row_scale`` of the incoming per-chunk gradient): IN PLACE in
    the logits' dtype in eager mode (the product is formed per element in fp32/fp64 and rounded once; no second
    [N_s, V_S] buffer). The saved gradient is then consumed, so a second backward through the same graph is refused.
    Under tracing (FakeTensor, torch.compile) it is out of place, which the compiler fuses. ``triton``: the forward
    ran the Triton backend on the GPU (``ran_triton``), so the scale takes ops._tl.scale_rows, one read and write of
    the rows whose scale is not 1 and none of the others; else torch's mul_ (the torch backend, which needs no
    Triton). Call it on ``saved(ctx)``'s gradient."""
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return (grad * scale.unsqueeze(1)).to(grad.dtype)
    if triton and grad.stride(1) == 1:
        from ._tl import scale_rows
        return scale_rows(grad, scale)
    if grad.dtype == scale.dtype or grad.device.type != "cpu":
        return grad.mul_(scale.unsqueeze(1))
    # CPU bf16/fp16: mul_ with an fp32 scale forms the whole product in fp32 before rounding it back; row blocks
    # keep that temporary at ≤ _SCALE_BLOCK_BYTES.
    step = max(1, _SCALE_BLOCK_BYTES // (4 * max(1, grad.shape[1])))
    for r0 in range(0, grad.shape[0], step):
        grad[r0:r0 + step].mul_(scale[r0:r0 + step].unsqueeze(1))
    return grad


def ran_triton(backend: str, s_logits: Tensor) -> bool:
    """Whether an op's forward ran the compiled Triton backend (``backend`` as the op got it; on a GPU, not the
    interpreter): its backward's row scale then takes Triton too (``scale_grad``)."""
    return s_logits.device.type == "cuda" and not interpret() and \
        resolve_backend(backend, s_logits.device, s_logits.dtype, False) == "triton"


def saved(ctx):
    """ctx.saved_tensors, once: the in-place backward consumed the gradient the first time."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError("xtoken loss ops support one backward per forward (the saved gradient is scaled in "
                           "place); recompute the loss for a second backward")
    if torch.is_grad_enabled():  # create_graph=True: the gradient is a forward output, a constant to autograd
        raise RuntimeError("xtoken loss ops have no second derivative: backward / autograd.grad with "
                           "create_graph=True through them is not supported")
    ctx.consumed = True
    return ctx.saved_tensors


def top(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Largest m values per row, sorted descending, and their positions. Tied values may come in any order: the
    sorted-L1 value does not depend on it, and its gradient is then one valid subgradient."""
    if 4 * m < x.shape[1]:
        return torch.topk(x, m, dim=1)
    vals, pos = torch.sort(x, dim=1, descending=True, stable=True)
    return vals[:, :m], pos[:, :m]


# ---- the chunked torch backend's planning and row math, shared by ops.pkl and ops.hkl. Valid chunks are processed
# in blocks of consecutive chunks, so scratch is O(block rows × (V_S + |A|)), never [all rows, V] in fp32; teacher
# math runs over the allowed columns A only (compressed, no masking).

_SCRATCH_BYTES = 192 << 20  # per-block scratch budget of the torch backend


def plan(spans: Tensor, merge: str, V_S: int, V_A: int, max_rows: int | None = None):
    """Per-chunk row counts n_s / n_t that enter the merged vectors (all rows for "mean", the first otherwise), and
    blocks (k0, k1) of consecutive chunks with ≤ max_rows such rows per side (a larger chunk is a block alone);
    max_rows defaults to what keeps the ~4 [rows, V_S] and ~6 [rows, |A|] live buffers within the budget."""
    if max_rows is None:
        max_rows = max(1, min(256, _SCRATCH_BYTES // (4 * (4 * V_S + 6 * V_A))))
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


def allowed(col_mask: Tensor):
    """Allowed teacher columns A: (ids [|A|] or None when A = all, position in A of every column or −1, |A|)."""
    if bool(col_mask.all()):
        return None, None, col_mask.numel()
    a_idx = torch.nonzero(col_mask).squeeze(1)
    remap = torch.full((col_mask.numel(),), -1, dtype=torch.int64, device=col_mask.device)
    remap[a_idx] = torch.arange(a_idx.numel(), device=col_mask.device)
    return a_idx, remap, a_idx.numel()


def chain_sums(chain: Tensor | None, lo: Tensor, hi: Tensor, dtype) -> Tensor | None:
    """Σ_{lo < r < hi} chain[r] per chunk (−inf entries propagate)."""
    if chain is None:
        return None
    rows, seg = expand(lo + 1, (hi - lo - 1).clamp(min=0))
    return torch.zeros(lo.numel(), dtype=dtype, device=lo.device).index_add_(0, seg, chain.to(dtype)[rows])


class TorchSetup(NamedTuple):
    """What both torch backends derive first: math dtype, device, τ, V_S, K, the allowed columns (``allowed``), the
    per-chunk merged row counts and blocks (``plan``), and the teacher chain sums per chunk (merge="chain")."""
    md: torch.dtype
    dev: torch.device
    tau: float
    V_S: int
    K: int
    cols: tuple
    n_s: Tensor
    n_t: Tensor
    blocks: list
    t_chain_sum: Tensor | None


def torch_setup(s_logits: Tensor, spans: Tensor, merge: str, col_mask: Tensor, temperature: float,
                t_chain: Tensor | None) -> TorchSetup:
    md = math_dtype(s_logits.dtype)
    V_S = s_logits.shape[1]
    cols = allowed(col_mask)
    n_s, n_t, blocks = plan(spans, merge, V_S, cols[2])
    t_chain_sum = chain_sums(t_chain, spans[:, 2], spans[:, 3], md) if merge == "chain" else None
    return TorchSetup(md, s_logits.device, float(temperature), V_S, spans.shape[0], cols, n_s, n_t, blocks,
                      t_chain_sum)


def teacher_block(t_vals, t_cols, rows, seg, n, K, cols, tau, md, chain_sum):
    """Merged teacher log-probs T [K, |A|] of one block: mean (or first row + chain sum) of log_softmax_A(t/τ)."""
    a_idx, remap, n_a = cols
    if t_cols is None:
        x = t_vals.index_select(0, rows) if a_idx is None else t_vals[rows.unsqueeze(1), a_idx]
        x = x.to(md)
    else:  # sparse: a distribution that is 0 outside its columns; columns outside A go to a dropped extra slot
        c = t_cols.index_select(0, rows).long()
        if remap is not None:
            c = remap[c]
            c = torch.where(c < 0, n_a, c)
        x = torch.full((rows.numel(), n_a + 1), float("-inf"), dtype=md, device=t_vals.device).scatter_(
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


def softmax_rows(s_logits: Tensor, rows: Tensor, tau: float, md, log: bool) -> Tensor:
    """(log_)softmax(z/τ) of the given student rows, in the math dtype."""
    x = s_logits.index_select(0, rows).to(md)
    if tau != 1.0:
        x.div_(tau)
    return torch.log_softmax(x, 1) if log else torch.softmax(x, 1)


def write_grad(grad, rows, seg, n, p, g, tau, merge, wrt_log_p: bool, scale=None, p_unit=None):
    """Student logit gradient rows from g = ∂L/∂(merged vector) per chunk; g_r = g[chunk]/n (mean) or g[chunk]
    (first row). wrt ℓ = log p (H-KL): dz_r = (g_r − p_r Σ g_r)/τ. wrt p (P-KL): dz_r = p_r ⊙ (g_r − ⟨p_r, g_r⟩)/τ,
    with p as p/u and g as 2^-24 g / scale (per chunk [K]: u = p_unit, 2^-24 or less; h reaches 2^149 where Q is
    subnormal, ops.pkl), formed as ((p_r/u) ⊙ g_r − (p_r/u) ⟨p_r/u, g_r⟩ u) scale/τ: the products are bounded where
    g is not, and ⟨p_r, g_r⟩ is not formed unscaled (~ Z g, it underflows where Z is tiny)."""
    multi = rows.numel() != g.shape[0]
    gr = g.index_select(0, seg) if multi else g
    if merge == "mean" and multi:
        gr = gr / n[seg].unsqueeze(1).to(gr.dtype)
    r0, n_rows = int(rows[0]), rows.numel()
    direct = grad.dtype == p.dtype and int(rows[-1]) - r0 + 1 == n_rows  # write straight into grad's rows
    out = grad[r0:r0 + n_rows] if direct else None

    def per_row(f):
        return (f.index_select(0, seg) if multi else f).unsqueeze(1)

    if wrt_log_p:
        dz = torch.sub(gr, p * gr.sum(1, keepdim=True), out=out)
        if tau != 1.0:
            dz.div_(tau)
    else:
        d = (p * gr).sum(1, keepdim=True)  # ⟨p_r, g_r⟩ / u
        dz = torch.mul(gr, p, out=out).sub_((p * d).mul_(per_row(p_unit))).mul_(per_row(scale / tau))
    if not direct:
        grad.index_copy_(0, rows, dz.to(grad.dtype))
