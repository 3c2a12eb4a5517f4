"""Public cross-tokenizer KD losses: P-KL, H-KL, GOLD, ULD (semantics: DESIGN.md §2, METHOD.md §5–8), as
functions (``xt.pkl_loss`` ...) and nn.Modules (``xt.PKLLoss`` ...).

Each call validates its inputs, flattens logits to rows, turns ``alignment.row_spans()`` into flat [K, 4] chunk
spans, builds the allowed teacher columns A (covered ∩ teacher top-k) and the chain scalars, and runs one row-space
custom op per loss family (``xtoken::pkl_rows`` / ``xtoken::hkl_rows``, backends Triton / native C++ / torch) that
returns per-chunk losses and the gradient wrt the student logits in one pass. ``xtoken_ext.reference`` holds the
slow oracle with the same signatures.

No host sync on CUDA tensors between the call and the kernels when the alignment stays on the CPU (recommended: the
loss moves the few index tensors it needs): span planning and checks then run on the CPU copy.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .alignment import Alignment
from .ops._common import BACKENDS, expand, math_dtype
from .ops.hkl import hkl_rows
from .ops.pkl import pkl_rows
from .projection import Projection

__all__ = ["pkl_loss", "hkl_loss", "gold_loss", "uld_loss", "PKLLoss", "HKLLoss", "GOLDLoss", "ULDLoss",
           "LearnableProjection"]

_REDUCTIONS = ("mean", "sum", "none")
_MERGES = ("mean", "first", "chain")
_UNCOVERED = {"renormalize": 0.0, "epsilon": 1e-10}  # -> eps inside log(Q + eps)
_ROW_BLOCK = 256  # teacher rows per block in the no-grad scans (top-k importance, chain scalars)


class LearnableProjection(nn.Module):
    """Learnable W on the fixed ≤ 4-slot support of ``proj`` (P-KL only): θ [V_S, 4] = log(initial weights), the
    effective row is softmax(θ_row) over the row's non-empty slots (an empty row stays empty). Pass it as ``proj``."""

    def __init__(self, proj: Projection):
        super().__init__()
        self.base = proj
        support = (proj.indices >= 0) & (proj.weights > 0)
        self.register_buffer("indices", torch.where(support, proj.indices, torch.full_like(proj.indices, -1)))
        self.register_buffer("support", support)
        self.theta = nn.Parameter(torch.where(support, proj.weights.clamp_min(1e-30).log(),
                                              torch.zeros_like(proj.weights)))

    @property
    def student_vocab_size(self) -> int:
        return self.indices.shape[0]

    @property
    def teacher_vocab_size(self) -> int:
        return self.base.teacher_vocab_size

    @property
    def weights(self) -> Tensor:
        """Effective W weights [V_S, 4] (differentiable in θ)."""
        w = torch.softmax(self.theta.masked_fill(~self.support, float("-inf")), dim=1)
        return torch.where(self.support, w, torch.zeros_like(w))  # all-empty rows: NaN -> 0

    def covered_columns(self, device=None) -> Tensor:
        return self.base.covered_columns(device)

    def projection(self) -> Projection:
        """A frozen Projection with the current weights (e.g. to save the learned W)."""
        return Projection(self.indices.cpu(), self.weights.detach().cpu(), self.teacher_vocab_size, self.base.meta)


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _check_data(cond: Tensor, msg: str):
    """A data-dependent check: raised now for CPU tensors, asserted asynchronously on the device (no host sync)."""
    if cond.device.type == "cpu":
        _check(bool(cond), msg)
    else:
        torch._assert_async(cond, msg)


def _rows(x: Tensor, name: str) -> tuple[Tensor, int, int]:
    """[B, T, V] or [N, V] -> ([B*T, V] contiguous rows, B, T)."""
    _check(x.dim() in (2, 3), f"{name} must be [B, T, V] or [N, V], got shape {tuple(x.shape)}")
    B, T = (1, x.shape[0]) if x.dim() == 2 else x.shape[:2]
    return x.reshape(B * T, x.shape[-1]).contiguous(), B, T


def _flat_spans(alignment, B: int, T_S: int, T_T: int) -> Tensor:
    """row_spans() [N, 5] (b, s_lo, s_hi, t_lo, t_hi) -> flat [N, 4] int64 row ranges (row = b * T + p), on the
    alignment's device."""
    _check(hasattr(alignment, "row_spans"), f"alignment must be an xt.Alignment, got {type(alignment).__name__}")
    rs = alignment.row_spans().to(torch.int64)
    _check(rs.dim() == 2 and rs.shape[1] == 5, f"alignment.row_spans() must be [N, 5], got {tuple(rs.shape)}")
    n_b = alignment.student_chunk_ids.shape[0]
    _check(n_b == B, f"the alignment has {n_b} sequences but the logits have {B}")
    if rs.shape[0]:
        _check_data((rs[:, 2].max() <= T_S) & (rs[:, 4].max() <= T_T),
                    f"alignment rows exceed the logits' sequence lengths (student {T_S}, teacher {T_T})")
    b = rs[:, 0:1]
    return torch.cat([rs[:, 1:3] + b * T_S, rs[:, 3:5] + b * T_T], dim=1)


def _teacher_block(t_vals, t_cols, rows, V_T, tau, col_mask, md):
    """Dense teacher values/τ of ``rows`` in dtype md, −inf outside A (and outside a sparse teacher's columns)."""
    x = t_vals.index_select(0, rows).to(md)
    if t_cols is not None:
        x = torch.full((rows.numel(), V_T), float("-inf"), dtype=md, device=x.device).scatter_(
            1, t_cols.index_select(0, rows).long(), x)
    x = x / tau
    return x if col_mask is None else x.masked_fill(~col_mask, float("-inf"))


@torch.no_grad()
def _topk_columns(t_vals, t_cols, rows, V_T, k, md) -> Tensor:
    """bool [V_T]: the k columns with the largest max-over-rows teacher value; ties -> lower id."""
    imp = torch.full((V_T,), float("-inf"), dtype=md, device=t_vals.device)
    for i in range(0, rows.numel(), _ROW_BLOCK):
        imp = torch.maximum(imp, _teacher_block(t_vals, t_cols, rows[i:i + _ROW_BLOCK], V_T, 1.0, None, md).amax(0))
    out = torch.zeros(V_T, dtype=torch.bool, device=t_vals.device)
    out[torch.sort(imp, descending=True, stable=True).indices[:k]] = True
    return out


@torch.no_grad()
def _teacher_chain(t_vals, t_cols, ids, rows, V_T, tau, col_mask, md) -> Tensor:
    """log π_r(realized next token) at ``rows`` (−inf when that token is outside A), [N_t] in md (0 elsewhere)."""
    out = torch.zeros(t_vals.shape[0], dtype=md, device=t_vals.device)
    for i in range(0, rows.numel(), _ROW_BLOCK):
        r = rows[i:i + _ROW_BLOCK]
        x = _teacher_block(t_vals, t_cols, r, V_T, tau, col_mask, md)
        lse = torch.logsumexp(x, 1)
        out[r] = x.gather(1, ids[r + 1].unsqueeze(1)).squeeze(1) - torch.where(torch.isfinite(lse), lse, 0.0)
    return out


def _student_chain(z, ids, rows, tau, md) -> Tensor:
    """log p_r(realized next token) at ``rows``, differentiable in z, [N_s] in md (0 elsewhere)."""
    x = z.index_select(0, rows).to(md) / tau
    val = x.gather(1, ids[rows + 1].unsqueeze(1)).squeeze(1) - torch.logsumexp(x, 1)
    return torch.zeros(z.shape[0], dtype=md, device=z.device).index_put((rows,), val)


_COMMON: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # proj -> {(mode, device): (cs, ct)}


def _common_pairs(proj: Projection, mode: str, device) -> tuple[Tensor, Tensor]:
    """proj.common_pairs(mode) on ``device``, copied there once per projection."""
    per_proj = _COMMON.setdefault(proj, {})
    key = (mode, str(device))
    if key not in per_proj:
        per_proj[key] = tuple(x.to(device) for x in proj.common_pairs(mode))
    return per_proj[key]


def _run(kind, student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered,
         teacher_topk, uncommon_topk, normalizer, teacher_indices, student_ids, teacher_ids, backend):
    _check(reduction in _REDUCTIONS, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check(merge in _MERGES, f"merge must be one of {_MERGES}, got {merge!r}")
    _check(uncovered in _UNCOVERED, f"uncovered must be one of {tuple(_UNCOVERED)}, got {uncovered!r}")
    _check(backend is None or backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    if kind == "pkl":
        _check(uncommon_topk is None, "uncommon_topk applies to H-KL / GOLD / ULD only (P-KL has no uncommon set)")
    if merge == "chain":  # default: the ids an Alignment built with ids keeps
        student_ids = student_ids if student_ids is not None else getattr(alignment, "student_ids", None)
        teacher_ids = teacher_ids if teacher_ids is not None else getattr(alignment, "teacher_ids", None)
        _check(student_ids is not None and teacher_ids is not None,
               "merge='chain' needs student_ids and teacher_ids (the input token ids, [B, T])")
    learnable = isinstance(proj, LearnableProjection)
    _check(isinstance(proj, Projection) or learnable,
           f"proj must be an xt.Projection or xt.LearnableProjection, got {type(proj).__name__}")
    if learnable:
        _check(kind == "pkl", "a LearnableProjection is supported by pkl_loss only (H-KL/GOLD/ULD keep W fixed)")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        _check(isinstance(x, Tensor) and x.is_floating_point(), f"{name} must be a floating-point tensor")
    _check(student_logits.dim() == teacher_logits.dim(),
           f"student_logits and teacher_logits must both be [B, T, V] or both [N, V], got shapes "
           f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    _check(teacher_logits.device == student_logits.device,
           f"student logits on {student_logits.device} but teacher logits on {teacher_logits.device}")
    _check(float(temperature) > 0, f"temperature must be > 0, got {temperature}")
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    _check(student_logits.shape[-1] == V_S, f"student_logits have {student_logits.shape[-1]} columns but proj has "
                                            f"V_S = {V_S} rows")
    sparse = teacher_indices is not None
    if sparse:
        _check(not teacher_indices.is_floating_point() and teacher_indices.shape == teacher_logits.shape,
               "teacher_indices must be an integer tensor shaped like teacher_logits (the top-k log-probs)")
        if teacher_indices.numel():
            _check_data((teacher_indices.min() >= 0) & (teacher_indices.max() < V_T),
                        f"teacher_indices must lie in [0, {V_T})")
    else:
        _check(teacher_logits.shape[-1] == V_T, f"teacher_logits have {teacher_logits.shape[-1]} columns but proj "
                                                f"has V_T = {V_T} columns")
    _check(teacher_topk is None or int(teacher_topk) >= 1, "teacher_topk must be >= 1 or None")
    _check(uncommon_topk is None or int(uncommon_topk) >= 0, "uncommon_topk must be >= 0 or None")

    device = student_logits.device
    z, B, T_S = _rows(student_logits, "student_logits")
    t_vals, B_t, T_T = _rows(teacher_logits.detach(), "teacher_logits")
    _check(B == B_t, f"batch size mismatch: student {B}, teacher {B_t}")
    t_cols = _rows(teacher_indices, "teacher_indices")[0] if sparse else None
    spans_host = _flat_spans(alignment, B, T_S, T_T)  # planning below stays on the alignment's device
    spans = spans_host.to(device, non_blocking=True)
    if merge == "chain":
        for name, ids, T in (("student_ids", student_ids, T_S), ("teacher_ids", teacher_ids, T_T)):
            _check(not ids.is_floating_point() and ids.numel() == B * T,
                   f"{name} must be integer token ids with {B * T} entries (shape [B, T]), got {tuple(ids.shape)}")
    tau = float(temperature)
    md = math_dtype(z.dtype)  # the ops' math dtype

    def rows(lo, n):  # concatenated row ranges, built where the spans live, used on the logits' device
        return expand(lo, n)[0].to(device, non_blocking=True)

    col_mask = proj.covered_columns(device) if uncovered == "renormalize" else \
        torch.ones(V_T, dtype=torch.bool, device=device)
    if teacher_topk is not None and spans.shape[0]:
        t_rows = rows(spans_host[:, 2], spans_host[:, 3] - spans_host[:, 2])
        col_mask = col_mask & _topk_columns(t_vals, t_cols, t_rows, V_T, int(teacher_topk), md)

    s_chain = t_chain = None
    if merge == "chain":
        s_later = rows(spans_host[:, 0] + 1, (spans_host[:, 1] - spans_host[:, 0] - 1).clamp(min=0))
        t_later = rows(spans_host[:, 2] + 1, (spans_host[:, 3] - spans_host[:, 2] - 1).clamp(min=0))
        t_chain = _teacher_chain(t_vals, t_cols, teacher_ids.reshape(-1).to(device).long(), t_later, V_T, tau,
                                 col_mask, md)
        if kind != "pkl":  # P-KL: the student scalar cancels in the renormalization of Q
            s_chain = _student_chain(z, student_ids.reshape(-1).to(device).long(), s_later, tau, md)

    if kind == "pkl":
        if learnable:
            w_idx, w_val = proj.indices.to(device), proj.weights.to(device)
        else:
            dev_proj = proj.to(device)
            w_idx, w_val = dev_proj.indices, dev_proj.weights
        need_grad_w = w_val.requires_grad and torch.is_grad_enabled()
        loss = pkl_rows(z, t_vals, t_cols, w_idx, w_val, col_mask, spans, tau, merge, _UNCOVERED[uncovered], t_chain,
                        None, need_grad_w, backend or "auto")[0]
    else:
        if kind == "uld":
            cs = ct = torch.zeros(0, dtype=torch.int64, device=device)
        else:  # pairs whose teacher column is outside A are dropped by the op
            cs, ct = _common_pairs(proj, "relaxed" if kind == "hkl" else "strict", device)
        loss = hkl_rows(z, t_vals, t_cols, col_mask, spans, tau, merge, s_chain, t_chain, cs, ct,
                        None if uncommon_topk is None else int(uncommon_topk), backend or "auto")[0]
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum" or (normalizer is None and loss.numel() == 0):  # no valid chunk: 0, never 0/0
        return total
    return total / (loss.numel() if normalizer is None else normalizer)


_DEFAULT = object()  # uncommon_topk's default: 8192 for H-KL and GOLD (release parity), None for ULD and P-KL
_UNCOMMON_DEFAULT = {"pkl": None, "hkl": 8192, "gold": 8192, "uld": None}

_DOC = """

    student_logits [B, T_S, V_S] / teacher_logits [B, T_T, V_T] (any float dtype; or flattened [N, V] rows with a
    B == 1 alignment); ``alignment`` an xt.Alignment (keep it on the CPU: no host sync on CUDA); ``proj`` an
    xt.Projection (or xt.LearnableProjection for P-KL).
    Sparse teacher: teacher_logits = top-k log-probs [B, T_T, k] with teacher_indices [B, T_T, k] (unique per row).
    merge: "mean" (default) | "first" | "chain" (needs student_ids / teacher_ids [B, T], default: the alignment's).
    uncovered: "renormalize" (teacher renormalized over covered columns) | "epsilon" (release parity, 1e-10 floor).
    teacher_topk: restrict to the k teacher columns with the largest max-over-rows logit.
    uncommon_topk (H-KL / GOLD / ULD only): length cap m of the sorted-L1 term; default 8192 for H-KL and GOLD as in
    the authors' release (it only matters past 8,192 uncommon ids), None (uncapped) for ULD.
    reduction: "mean" (Σ_k L_k / normalizer, default the number of valid chunks) | "sum" | "none" ([N_valid]).
    backend: "auto" (default: $XTOKEN_BACKEND or auto: Triton on CUDA, the C++ kernel on CPU where it applies,
    else chunked torch) | "triton" | "native" | "torch".
    Returns a float32 tensor (float64 for float64 student logits); no valid chunk gives 0 with a zero gradient."""

_SUMMARY = {
    "pkl": "P-KL: τ² KL(P ‖ normalize(Wᵀ p_S) over A) per chunk, no vocabulary partition.",
    "hkl": "H-KL: τ² (KL over W's relaxed common pairs + sorted-L1 over the uncommon rest).",
    "gold": "GOLD: the H-KL formula over the strict exact-match common set.",
    "uld": "ULD: τ² sorted-L1 between the full student and teacher chunk distributions.",
}


def _make_loss(kind: str):
    def loss(student_logits: Tensor, teacher_logits: Tensor, alignment: Alignment,
             proj: Projection | LearnableProjection, temperature: float = 1.0, reduction: str = "mean", *,
             merge: str = "mean", uncovered: str = "renormalize", teacher_topk: int | None = None,
             uncommon_topk=_DEFAULT, normalizer: float | Tensor | None = None, teacher_indices: Tensor | None = None,
             student_ids: Tensor | None = None, teacher_ids: Tensor | None = None,
             backend: str | None = None) -> Tensor:
        return _run(kind, student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered,
                    teacher_topk, _UNCOMMON_DEFAULT[kind] if uncommon_topk is _DEFAULT else uncommon_topk,
                    normalizer, teacher_indices, student_ids, teacher_ids, backend)

    loss.__name__ = loss.__qualname__ = f"{kind}_loss"
    loss.__doc__ = _SUMMARY[kind] + _DOC
    return loss


pkl_loss = _make_loss("pkl")
hkl_loss = _make_loss("hkl")
gold_loss = _make_loss("gold")
uld_loss = _make_loss("uld")


class _KDLoss(nn.Module):
    """nn.Module form: options fixed at construction, ``forward(student_logits, teacher_logits, alignment, **kw)``
    (keyword options given there override them). A LearnableProjection becomes a submodule (its θ a parameter)."""

    fn = None  # the functional form

    def __init__(self, proj: Projection | LearnableProjection, temperature: float = 1.0, reduction: str = "mean",
                 **options):
        super().__init__()
        self.proj = proj
        self.options = dict(temperature=temperature, reduction=reduction, **options)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, alignment: Alignment, **overrides) -> Tensor:
        return self.fn(student_logits, teacher_logits, alignment, self.proj, **(self.options | overrides))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class PKLLoss(_KDLoss):
    __doc__ = "nn.Module P-KL (see xt.pkl_loss). " + _KDLoss.__doc__
    fn = staticmethod(pkl_loss)


class HKLLoss(_KDLoss):
    __doc__ = "nn.Module H-KL (see xt.hkl_loss). " + _KDLoss.__doc__
    fn = staticmethod(hkl_loss)


class GOLDLoss(_KDLoss):
    __doc__ = "nn.Module GOLD (see xt.gold_loss). " + _KDLoss.__doc__
    fn = staticmethod(gold_loss)


class ULDLoss(_KDLoss):
    __doc__ = "nn.Module ULD (see xt.uld_loss). " + _KDLoss.__doc__
    fn = staticmethod(uld_loss)
