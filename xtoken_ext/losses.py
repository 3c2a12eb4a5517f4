"""Public cross-tokenizer KD losses: P-KL, H-KL, GOLD, ULD (semantics: DESIGN.md §2, METHOD.md §5–8), as
functions (``xt.pkl_loss`` ...) and nn.Modules (``xt.PKLLoss`` ...).

Each call validates its inputs, flattens logits to rows, turns ``alignment.row_spans()`` into flat [K, 4] chunk
spans, builds the allowed teacher columns A (covered ∩ teacher top-k) and the chain scalars, and runs one row-space
custom op per loss family (``xtoken::pkl_rows`` / ``xtoken::hkl_rows``, backends Triton / native C++ / torch) that
returns per-chunk losses and the gradient wrt the student logits in one pass. ``xtoken_ext.reference`` holds the
slow oracle with the same signatures.

No host sync on CUDA tensors between the call and the kernels when the alignment stays on the CPU (recommended: the
loss moves the few index tensors it needs): span planning and checks then run on the CPU copy.

Non-finite logits (``nonfinite``): a chunk reads its merged rows (all rows for merge="mean", the first otherwise, plus
the later rows whose log-probs form the chain scalars for merge="chain"). NaN or +inf in any column of such a row, or
a student row without a finite value, makes the chunk's loss NaN: "raise" (default) raises ValueError naming the
tensor, batch index, position and chunk (CUDA: an asynchronous device assert), "mask" excludes the chunk. Excluded
always: P-KL chunks without projected student mass (Z = 0; with fp32 math Z < 2^-180, ops.pkl) or with an infinite
KL, and any chunk whose loss is +inf.
Excluded chunks give 0 (reduction="none"), no gradient, and do not count in the "mean" denominator; the Modules keep
their number as ``last_excluded``. Teacher rows with NaN / +inf are ignored by ``teacher_topk``'s column ranking.
"""
from __future__ import annotations

import math
import numbers
import os
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .alignment import Alignment
from .ops._common import BACKENDS, MERGES, check_data, check_temperature, chunk_any, expand, math_dtype, \
    nonfinite_rows
from .ops.hkl import hkl_rows
from .ops.pkl import pkl_rows
from .projection import Projection

__all__ = ["pkl_loss", "hkl_loss", "gold_loss", "uld_loss", "PKLLoss", "HKLLoss", "GOLDLoss", "ULDLoss",
           "LearnableProjection"]

_REDUCTIONS = ("mean", "sum", "none")
_NONFINITE = ("raise", "mask")
_UNCOVERED = {"renormalize": 0.0, "epsilon": 1e-10}  # -> eps inside log(Q + eps)
_ROW_BLOCK = 256  # teacher rows per block in the no-grad scans (top-k importance, chain scalars)


class LearnableProjection(nn.Module):
    """Learnable W on the fixed ≤ 4-slot support of ``proj`` (P-KL only): θ [V_S, 4] = log(initial weights), the
    effective row is softmax(θ_row) over the row's non-empty slots (an empty row stays empty). Pass it as ``proj``."""

    def __init__(self, proj: Projection):
        super().__init__()
        if not isinstance(proj, Projection):  # a LearnableProjection: learn from its frozen copy, .projection()
            raise TypeError(f"LearnableProjection needs an xt.Projection, got {type(proj).__name__}"
                            + (" (use its .projection())" if isinstance(proj, LearnableProjection) else ""))
        self.base = proj
        support = (proj.indices >= 0) & (proj.weights > 0)
        self.register_buffer("indices", torch.where(support, proj.indices, torch.full_like(proj.indices, -1)))
        self.register_buffer("support", support)
        self.theta = nn.Parameter(torch.where(support, proj.weights.clamp_min(1e-30).log(),
                                              torch.zeros_like(proj.weights)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """θ's slots mean this W's entries: a state dict of a LearnableProjection on another W (other indices or
        support) is refused, not loaded onto this W's base (which covered_columns and projection read)."""
        for name in ("indices", "support"):
            saved = state_dict.get(prefix + name)
            if saved is not None and not torch.equal(saved.cpu(), getattr(self, name).cpu()):
                raise ValueError(f"{prefix}{name}: the state dict is of a LearnableProjection on another W (its "
                                 f"{name} differ from this one's); build the LearnableProjection from that W")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        """A frozen Projection with the current weights (e.g. to save the learned W), their softmax taken in float64
        so that rows sum to 1 in float32 whatever θ's dtype (a bf16 θ's rows sum to 1 ± 2^-8)."""
        theta = self.theta.detach().cpu().double().masked_fill(~self.support.cpu(), float("-inf"))
        w = torch.where(self.support.cpu(), torch.softmax(theta, dim=1), 0.0)  # all-empty rows: NaN -> 0
        return Projection(self.indices.cpu(), w.float(), self.teacher_vocab_size, self.base.meta,
                          exact_rows=self.base.exact_rows, alias_rows=self.base.alias_rows)  # same support


def _check(cond: bool, msg: str, exc: type = ValueError):
    if not cond:
        raise exc(msg)


def _int_option(value, name: str, lo: int) -> int | None:
    """None, or an int (not bool, not a float) in [lo, 2^63)."""
    if value is None:
        return None
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool),
           f"{name} must be an int or None, got {value!r}", TypeError)
    _check(value >= lo, f"{name} must be >= {lo} or None, got {value}")
    _check(value < 2 ** 63, f"{name} must be < 2^63 (int64) or None, got {value}")
    return int(value)


def _check_normalizer(normalizer):
    """A finite number > 0 (or a 1-element real tensor, checked without a host sync on the device)."""
    if isinstance(normalizer, Tensor):
        _check(normalizer.numel() == 1 and normalizer.dtype != torch.bool and not normalizer.is_complex(),
               f"normalizer must be a number or a 1-element tensor, got {normalizer.dtype} {tuple(normalizer.shape)}",
               TypeError)
        check_data((torch.isfinite(normalizer) & (normalizer > 0)).all(), "normalizer must be finite and > 0")
    else:
        _check(isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool),
               f"normalizer must be a number or a 1-element tensor, got {type(normalizer).__name__}", TypeError)
        _check(math.isfinite(normalizer) and normalizer > 0, f"normalizer must be finite and > 0, got {normalizer}")


def _int_tensor(x, name: str):
    _check(isinstance(x, Tensor), f"{name} must be a tensor, got {type(x).__name__}", TypeError)
    _check(x.dtype != torch.bool and not x.is_floating_point() and not x.is_complex(),
           f"{name} must be an integer tensor, got {x.dtype}", TypeError)


def _rows(x: Tensor, name: str) -> tuple[Tensor, int, int]:
    """[B, T, V] or [N, V] -> ([B*T, V] contiguous rows, B, T)."""
    _check(x.dim() in (2, 3), f"{name} must be [B, T, V] or [N, V], got shape {tuple(x.shape)}")
    B, T = (1, x.shape[0]) if x.dim() == 2 else x.shape[:2]
    return x.reshape(B * T, x.shape[-1]).contiguous(), B, T


def _flat_spans(alignment, B: int, T_S: int, T_T: int) -> Tensor:
    """row_spans() [N, 5] (b, s_lo, s_hi, t_lo, t_hi) -> flat [N, 4] int64 row ranges (row = b * T + p), on the
    alignment's device. The alignment must be for these logits (B sequences, T_S / T_T rows) and its chunks'
    rows non-empty, in range and disjoint per side (what the kernels rely on; a hand-edited Alignment can break
    it)."""
    (b_s, w_s), (b_t, w_t) = (getattr(alignment, f"{side}_chunk_ids").shape for side in ("student", "teacher"))
    _check((b_s, w_s, b_t, w_t) == (B, T_S, B, T_T),
           f"the alignment is for {b_s} sequences of {w_s} student / {w_t} teacher rows but the logits have {B} of "
           f"{T_S} / {T_T}: build it for these sequences (Alignment.from_chunks takes T_S / T_T)")
    rs = alignment.row_spans().to(torch.int64)
    _check(rs.dim() == 2 and rs.shape[1] == 5, f"alignment.row_spans() must be [N, 5], got {tuple(rs.shape)}")
    flat = rs[:, 1:] + rs[:, :1] * torch.tensor([T_S, T_S, T_T, T_T], device=rs.device)
    if rs.shape[0]:
        cpu = rs.device.type == "cpu"  # checked in NumPy there: a fraction of torch's per-op cost at these sizes
        c = None
        if hasattr(alignment, "chunks"):  # row_spans() clamps a chunk start below 0 to row 0: checked on the chunks
            c, valid = alignment.chunks, alignment.chunk_valid
            c = c.numpy()[valid.numpy()] if cpu else c[valid]
        bad = _span_faults(rs.numpy() if cpu else rs, flat.numpy() if cpu else flat, c, B, T_S, T_T)
        msg = (f"the alignment's valid chunks must cover non-empty, disjoint row ranges within the logits' "
               f"{T_S} student / {T_T} teacher rows per sequence")
        if cpu and bad.any():
            i = int(bad.argmax())
            raise ValueError(f"{msg}; valid chunk {i} (sequence {int(rs[i, 0])}) has student rows "
                             f"[{int(rs[i, 1])}, {int(rs[i, 2])}), teacher rows [{int(rs[i, 3])}, {int(rs[i, 4])})")
        if not cpu:
            check_data(~bad.any(), msg)
    return flat


def _span_faults(rs, flat, c, B: int, T_S: int, T_T: int):
    """bool [N]: the valid chunks (row_spans() rows ``rs``, their flat ranges ``flat``, their chunks ``c`` or None)
    out of sequence, empty, out of range or overlapping another's rows on a side. NumPy arrays or tensors alike."""
    bad = (rs[:, 0] < 0) | (rs[:, 0] >= B)
    if c is not None:
        bad |= (c[:, 0] < 0) | (c[:, 2] < 0)
    for lo, hi, T in ((1, 2, T_S), (3, 4, T_T)):
        bad |= (rs[:, lo] < 0) | (rs[:, lo] >= rs[:, hi]) | (rs[:, hi] > T)
        order = flat[:, lo - 1].argsort()  # by start: a range overlaps another iff it overlaps its successor
        overlap = flat[order[:-1], hi - 1] > flat[order[1:], lo - 1]
        bad[order[1:]] |= overlap
        bad[order[:-1]] |= overlap
    return bad


def _teacher_block(raw, cols, V_T, tau, col_mask, md):
    """Dense teacher values/τ of teacher rows ``raw`` (with their sparse columns ``cols``, or None) in dtype md, −inf
    outside A (and outside a sparse teacher's columns)."""
    x = raw.to(md)
    if cols is not None:
        x = torch.full((x.shape[0], V_T), float("-inf"), dtype=md, device=x.device).scatter_(1, cols.long(), x)
    x = x / tau
    return x if col_mask is None else x.masked_fill(~col_mask, float("-inf"))


def _fetch_rows(t_vals: Tensor, t_cols: Tensor | None):
    """``fetch(r)`` -> (values, sparse columns or None) of the teacher rows r of given logit rows; ``fetch.dense`` is
    the dense teacher [N_t, V_T] (None for a sparse one), which _topk_columns reads in place."""
    def fetch(r):
        return t_vals.index_select(0, r), None if t_cols is None else t_cols.index_select(0, r)

    fetch.dense = t_vals if t_cols is None else None
    return fetch


def _row_blocks(fetch, rows):
    """(i, rows, their values, their sparse columns or None) in blocks of _ROW_BLOCK rows."""
    for i in range(0, rows.numel(), _ROW_BLOCK):
        r = rows[i:i + _ROW_BLOCK]
        yield (i, r, *fetch(r))


_NATIVE_TOPK_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@torch.no_grad()
def _topk_columns(fetch, rows, V_T, k, md, device) -> Tensor:
    """bool [V_T]: the k columns with the largest max-over-rows teacher value (rows with NaN / +inf ignored);
    ties -> lower id. A dense CPU teacher in fp32 / bf16 / fp16 goes to the C++ kernel (one pass over the rows in
    place, selection in O(V); its fp32 maxima are exact, so they rank as in md), any other block by block in torch."""
    dense = getattr(fetch, "dense", None)
    if dense is not None and dense.device.type == "cpu" and dense.dtype in _NATIVE_TOPK_DTYPES:
        from . import _C

        out = torch.empty(V_T, dtype=torch.bool)
        x = dense.contiguous()
        _C.teacher_topk_columns((x if x.dtype == torch.float32 else x.view(torch.int16)).numpy(),
                                rows.contiguous().numpy(), k, out.numpy(), torch.get_num_threads(),
                                _NATIVE_TOPK_DTYPES[x.dtype])
        return out
    imp = torch.full((V_T,), float("-inf"), dtype=md, device=device)
    for _, _, raw, cols in _row_blocks(fetch, rows):
        x = _teacher_block(raw, cols, V_T, 1.0, None, md)
        imp = torch.maximum(imp, x.masked_fill_(nonfinite_rows(raw, False).unsqueeze(1), float("-inf")).amax(0))
    return _top_k_mask(imp, k)


def _top_k_mask(imp: Tensor, k: int) -> Tensor:
    """bool mask of the k largest entries of imp (no NaN), ties -> lower index: the first k of a stable descending
    sort, in O(V) and without a host sync: v = the k-th largest value; every entry > v, and the first k − #(> v)
    entries equal to v."""
    if k >= imp.numel():
        return torch.ones_like(imp, dtype=torch.bool)
    v = torch.topk(imp, k, sorted=False).values.min()  # the k-th largest value (whichever tied entries topk took)
    above, tie = imp > v, imp == v
    return above | (tie & (torch.cumsum(tie, 0) <= k - above.sum()))


@torch.no_grad()
def _teacher_chain(fetch, next_ids, rows, N_t, V_T, tau, col_mask, md, device) -> tuple[Tensor, Tensor]:
    """log π_r(next_ids) (the realized next token; −inf when it is outside A) at ``rows``, [N_t] in md (0 elsewhere),
    and which of ``rows`` have bad input (NaN / +inf in any column; their value is 0, the caller marks their
    chunks)."""
    out = torch.zeros(N_t, dtype=md, device=device)
    bad = torch.zeros(rows.numel(), dtype=torch.bool, device=device)
    for i, r, raw, cols in _row_blocks(fetch, rows):
        x = _teacher_block(raw, cols, V_T, tau, col_mask, md)
        lse = torch.logsumexp(x, 1)
        val = x.gather(1, next_ids[i:i + r.numel()].unsqueeze(1)).squeeze(1)
        val -= torch.where(torch.isfinite(lse), lse, 0.0)
        bad[i:i + r.numel()] = nonfinite_rows(raw, False)
        out[r] = val.masked_fill_(bad[i:i + r.numel()], 0.0)
    return out, bad


def _student_chain(z, next_ids, rows, seg, K, tau, md) -> tuple[Tensor, Tensor]:
    """log p_r(next_ids) at ``rows`` of z (chunk ``seg`` each), differentiable in z, [z rows] in md (0 elsewhere), and
    which of the K chunks have a bad such row (NaN / +inf, or no finite value): it is read as zeros, for a finite
    value and gradient (the caller marks those chunks NaN, so that gradient is scaled by 0)."""
    x = z.index_select(0, rows).to(md)
    bad = nonfinite_rows(x.detach(), True)
    x = x.masked_fill(bad.unsqueeze(1), 0.0) / tau
    val = x.gather(1, next_ids.unsqueeze(1)).squeeze(1) - torch.logsumexp(x, 1)
    return torch.zeros(z.shape[0], dtype=md, device=z.device).index_put((rows,), val), chunk_any(bad, seg, K)


_COMMON: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # proj -> {(mode, device): (cs, ct)}


def _common_pairs(proj: Projection, mode: str, device) -> tuple[Tensor, Tensor]:
    """proj.common_pairs(mode) on ``device``, copied there once per projection."""
    per_proj = _COMMON.setdefault(proj, {})
    key = (mode, str(device))
    if key not in per_proj:
        per_proj[key] = tuple(x.to(device) for x in proj.common_pairs(mode))
    return per_proj[key]


class _Options(NamedTuple):
    """A loss call's checked options (``_check_options``)."""
    kind: str
    reduction: str
    merge: str
    uncovered: str
    tau: float
    teacher_topk: int | None
    uncommon_topk: int | None
    normalizer: float | Tensor | None
    student_ids: Tensor | None
    teacher_ids: Tensor | None
    backend: str | None
    nonfinite: str


def _check_options(kind, alignment, proj, temperature, reduction, merge, uncovered, teacher_topk, uncommon_topk,
                   normalizer, student_ids, teacher_ids, backend, nonfinite) -> _Options:
    _check(reduction in _REDUCTIONS, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check(merge in MERGES, f"merge must be one of {MERGES}, got {merge!r}")
    _check(uncovered in _UNCOVERED, f"uncovered must be one of {tuple(_UNCOVERED)}, got {uncovered!r}")
    if backend is None and os.environ.get("XTOKEN_BACKEND"):  # the default; the ops take "auto" as given
        backend = os.environ["XTOKEN_BACKEND"]
        _check(backend in BACKENDS, f"$XTOKEN_BACKEND must be one of {BACKENDS}, got {backend!r}")
    _check(backend is None or backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(nonfinite in _NONFINITE, f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
    _check(hasattr(alignment, "row_spans"), f"alignment must be an xt.Alignment, got {type(alignment).__name__}")
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
    tau = check_temperature(temperature)
    teacher_topk = _int_option(teacher_topk, "teacher_topk", 1)
    uncommon_topk = _int_option(uncommon_topk, "uncommon_topk", 0)
    if normalizer is not None:
        _check_normalizer(normalizer)
    return _Options(kind, reduction, merge, uncovered, tau, teacher_topk, uncommon_topk, normalizer, student_ids,
                    teacher_ids, backend, nonfinite)


def _check_teacher(teacher_logits, teacher_indices, proj, student: Tensor, student_name: str) -> bool:
    """Teacher logits [B, T_T, V_T] (or top-k values with ``teacher_indices``) beside the student tensor ``student``
    (logits or hidden states): same rank and device. -> whether the teacher is sparse."""
    _check(isinstance(teacher_logits, Tensor) and teacher_logits.is_floating_point(),
           "teacher_logits must be a floating-point tensor")
    _check(student.dim() == teacher_logits.dim(),
           f"{student_name} and teacher_logits must both be [B, T, ·] or both [N, ·] rows, got shapes "
           f"{tuple(student.shape)} and {tuple(teacher_logits.shape)}")
    _check(teacher_logits.device == student.device,
           f"{student_name} on {student.device} but teacher logits on {teacher_logits.device}")
    V_T = proj.teacher_vocab_size
    if teacher_indices is None:
        _check(teacher_logits.shape[-1] == V_T, f"teacher_logits have {teacher_logits.shape[-1]} columns but proj "
                                                f"has V_T = {V_T} columns")
        return False
    _int_tensor(teacher_indices, "teacher_indices")
    _check(teacher_indices.shape == teacher_logits.shape,
           "teacher_indices must be shaped like teacher_logits (the top-k log-probs), got "
           f"{tuple(teacher_indices.shape)} and {tuple(teacher_logits.shape)}")
    if teacher_indices.numel():
        check_data((teacher_indices.min() >= 0) & (teacher_indices.max() < V_T),
                   f"teacher_indices must lie in [0, {V_T})")
        _check_unique(teacher_indices)
    return True


def _expand_to(lo: Tensor, n: Tensor, device) -> tuple[Tensor, Tensor]:
    """ops._common.expand where the spans live (the CPU: no host sync), moved to ``device``."""
    r, seg = expand(lo, n)
    return r.to(device, non_blocking=True), seg.to(device, non_blocking=True)


# The smallest uncommon_topk that _uncommon_cap hands the op: its bound still gives the Triton kernel its 1,024-lane
# small network (ops.hkl_kernel.sort_widths: W = next_pow2 of the bound, W_SMALL = min(1,024, W/4)), beside W 4,096
_CAP_FLOOR = 4096


def _uncommon_cap(proj: Projection, o: _Options) -> int | None:
    """H-KL / GOLD: ``uncommon_topk`` as the op gets it, min(uncommon_topk, max(min(|U_S|, |U_T|), _CAP_FLOOR)) where
    the allowed columns A are known on the host (no ``teacher_topk``). Never below m = min(|U_S|, |U_T|,
    uncommon_topk), so the op's m and results are the same on every backend; the Triton kernel sizes its sort
    networks and lists by its host bound min(V_S, V_T, uncommon_topk), which at the default 8,192 compiled an
    8,192-lane network that no window took where m ≤ 1,024 (the real Llama-3 × Qwen3 W: m = 128 for H-KL, 261 for
    GOLD): 4,096 lanes now, the same 1,024-lane small network sorting (offline sm_90 compile, 8 warps, a loaded
    2-core host: 50 s instead of 77 s). |U_S| and |U_T| count as the op does (ops.hkl: the ids of the common pairs
    whose teacher column is in A), once per projection, mode and ``uncovered``, from the projection's host arrays
    (no device sync)."""
    if o.kind == "uld" or o.teacher_topk is not None:
        return o.uncommon_topk
    per_proj = _COMMON.setdefault(proj, {})
    key = ("uncommon", o.kind, o.uncovered)
    if key not in per_proj:
        cs, ct = proj.common_pairs("relaxed" if o.kind == "hkl" else "strict")
        allowed = (proj.covered_columns("cpu") if o.uncovered == "renormalize"
                   else torch.ones(proj.teacher_vocab_size, dtype=torch.bool))
        keep = allowed[ct.long()]
        per_proj[key] = min(proj.student_vocab_size - torch.unique(cs[keep]).numel(),
                            int(allowed.sum()) - torch.unique(ct[keep]).numel())
    return _op_cap(o.uncommon_topk, per_proj[key])


def _op_cap(uncommon_topk: int | None, m0: int) -> int:
    """The cap _uncommon_cap hands the op for the option and m0 = min(|U_S|, |U_T|): never below min(m0,
    uncommon_topk), the op's m (bench/costmodel.py models the kernel's bound with it)."""
    cap = max(m0, _CAP_FLOOR)
    return cap if uncommon_topk is None else min(uncommon_topk, cap)


def _later_rows(spans: Tensor, side: int, device) -> tuple[Tensor, Tensor]:
    """The rows after each chunk's first on one side (0 student, 2 teacher) of flat spans, and their chunks."""
    return _expand_to(spans[:, side] + 1, (spans[:, side + 1] - spans[:, side] - 1).clamp(min=0), device)


class _Plan(NamedTuple):
    """What a loss call derives from its options, alignment and teacher before running its op (``_prepare``)."""
    spans_host: Tensor  # flat [K, 4] row ranges, where the alignment lives
    spans: Tensor  # the same on the logits' device
    col_mask: Tensor  # allowed teacher columns A
    t_chain: Tensor | None  # teacher chain scalars [N_t] (merge="chain")
    chain_bad: Tensor  # [K]: a chunk's teacher chain reads a bad row
    student_ids: Tensor | None  # flat input ids on the device (merge="chain")
    w_idx: Tensor | None  # P-KL: W's ELL slots and weights (differentiable for a LearnableProjection)
    w_val: Tensor | None
    common: tuple  # H-KL / GOLD: the common pairs (cs, ct); ULD: empty ones
    uncommon_topk: int | None  # H-KL family: the op's (_uncommon_cap)


def _prepare(o: _Options, alignment, proj, B, T_S, B_t, T_T, N_t, dim2: bool, md, device, t_fetch) -> _Plan:
    """Spans, allowed columns (covered ∩ teacher top-k), chain scalars of the teacher and the op's W arguments, for
    B × T_S student rows (``dim2``: given as flat [N, ·]) and the teacher rows ``t_fetch`` reads (N_t of them)."""
    _check(B == B_t, f"batch size mismatch: student {B}, teacher {B_t}")
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    spans_host = _flat_spans(alignment, B, T_S, T_T)  # planning below stays on the alignment's device
    spans = spans_host.to(device, non_blocking=True)
    K = spans.shape[0]
    col_mask = proj.covered_columns(device) if o.uncovered == "renormalize" else \
        torch.ones(V_T, dtype=torch.bool, device=device)
    if o.teacher_topk is not None and K:
        t_rows = _expand_to(spans_host[:, 2], spans_host[:, 3] - spans_host[:, 2], device)[0]
        col_mask = col_mask & _topk_columns(t_fetch, t_rows, V_T, o.teacher_topk, md, device)

    # merge="chain": the later rows enter through their chain scalars; a bad one (NaN / +inf, or a student row
    # without a finite value) is read as finite and its chunk marked NaN after the op
    t_chain, ids = None, {}
    chain_bad = torch.zeros(K, dtype=torch.bool, device=device)
    if o.merge == "chain":
        for name, x, T in (("student_ids", o.student_ids, T_S), ("teacher_ids", o.teacher_ids, T_T)):
            _int_tensor(x, name)
            _check(tuple(x.shape) == (B, T) or (dim2 and tuple(x.shape) == (T,)),
                   f"{name} must be the input token ids [B, T] = [{B}, {T}], got shape {tuple(x.shape)}")
            ids[name] = x.reshape(-1).to(device).long()
        t_later, t_seg = _later_rows(spans_host, 2, device)
        s_later = _later_rows(spans_host, 0, device)[0]
        for name, later, V in (("teacher_ids", t_later, V_T), ("student_ids", s_later, V_S)):
            if later.numel():  # the ids of the realized later tokens
                x = ids[name][later + 1]
                check_data((x >= 0).all() & (x < V).all(), f"{name} must lie in [0, {V}) where the chain reads them")
        t_chain, bad = _teacher_chain(t_fetch, ids["teacher_ids"][t_later + 1], t_later, N_t, V_T, o.tau, col_mask,
                                      md, device)
        chain_bad |= chunk_any(bad, t_seg, K)

    w_idx = w_val = None
    common = ()
    if o.kind == "pkl":
        if isinstance(proj, LearnableProjection):
            w_idx, w_val = proj.indices.to(device), proj.weights.to(device)
        else:
            dev_proj = proj.to(device)
            w_idx, w_val = dev_proj.indices, dev_proj.weights
    elif o.kind == "uld":
        common = (torch.zeros(0, dtype=torch.int64, device=device),) * 2
    else:  # pairs whose teacher column is outside A are dropped by the op
        common = _common_pairs(proj, "relaxed" if o.kind == "hkl" else "strict", device)
    cap = None if o.kind == "pkl" else _uncommon_cap(proj, o)
    return _Plan(spans_host, spans, col_mask, t_chain, chain_bad, ids.get("student_ids"), w_idx, w_val, common, cap)


def _op(o: _Options, p: _Plan, z, t_vals, t_cols, spans, t_chain, s_chain, w_val=None) -> Tensor:
    """Per-chunk losses [K] of the row-space op on student rows z and teacher rows t_vals (``spans`` index them),
    differentiable in z (and in ``w_val``, default the plan's, for P-KL)."""
    if o.kind == "pkl":
        w_val = p.w_val if w_val is None else w_val
        need_grad_w = w_val.requires_grad and torch.is_grad_enabled()
        return pkl_rows(z, t_vals, t_cols, p.w_idx, w_val, p.col_mask, spans, o.tau, o.merge, _UNCOVERED[o.uncovered],
                        t_chain, None, need_grad_w, o.backend or "auto")[0]
    return hkl_rows(z, t_vals, t_cols, p.col_mask, spans, o.tau, o.merge, s_chain, t_chain, *p.common,
                    p.uncommon_topk, o.backend or "auto")[0]


def _excluded(loss: Tensor, nonfinite: str, raise_at) -> Tensor:
    """bool [K]: chunks the loss excludes (NaN with nonfinite="mask", +inf always). A NaN chunk with "raise":
    ``raise_at(first such chunk)`` on CPU, an asynchronous device assert elsewhere."""
    nan = torch.isnan(loss)
    if nonfinite == "raise":
        if nan.device.type == "cpu":
            if bool(nan.any()):
                raise_at(int(nan.nonzero()[0, 0]))
        else:
            torch._assert_async(~nan.any(), "non-finite logits (NaN or +inf, or a student row without a finite "
                                            "value) in a chunk of the loss; nonfinite='mask' excludes such chunks")
    return nan | (loss == math.inf)


def _normalized(total: Tensor, n_excluded: Tensor, K: int, o: _Options) -> Tensor:
    """The sum of the kept chunk losses, reduced: "sum" as is, "mean" over the kept chunks or the normalizer."""
    if o.reduction == "sum":
        return total
    count = (K - n_excluded).clamp_min(1)  # no remaining chunk: the sum is 0, never 0/0
    n = o.normalizer
    if isinstance(n, Tensor):  # a [1] or float64 tensor must not change the loss's shape or dtype
        n = n.reshape(()).to(total.device, total.dtype)
    return total / (count if n is None else n)


def _run(kind, student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered,
         teacher_topk, uncommon_topk, normalizer, teacher_indices, student_ids, teacher_ids, backend, nonfinite):
    """-> (loss, number of excluded chunks as a 0-dim int64 tensor on the logits' device)."""
    o = _check_options(kind, alignment, proj, temperature, reduction, merge, uncovered, teacher_topk, uncommon_topk,
                       normalizer, student_ids, teacher_ids, backend, nonfinite)
    _check(isinstance(student_logits, Tensor) and student_logits.is_floating_point(),
           "student_logits must be a floating-point tensor")
    V_S = proj.student_vocab_size
    _check(student_logits.shape[-1] == V_S, f"student_logits have {student_logits.shape[-1]} columns but proj has "
                                            f"V_S = {V_S} rows")
    sparse = _check_teacher(teacher_logits, teacher_indices, proj, student_logits, "student_logits")

    z, B, T_S = _rows(student_logits, "student_logits")
    t_vals, B_t, T_T = _rows(teacher_logits.detach(), "teacher_logits")
    t_cols = _rows(teacher_indices, "teacher_indices")[0] if sparse else None
    t_fetch = _fetch_rows(t_vals, t_cols)
    md, device = math_dtype(z.dtype), z.device
    p = _prepare(o, alignment, proj, B, T_S, B_t, T_T, t_vals.shape[0], student_logits.dim() == 2, md, device,
                 t_fetch)
    K = p.spans.shape[0]
    s_chain, chain_bad = None, p.chain_bad
    if merge == "chain" and kind != "pkl":  # P-KL: the student scalar cancels in the renormalization of Q
        s_later, s_seg = _later_rows(p.spans_host, 0, device)
        s_chain, bad = _student_chain(z, p.student_ids[s_later + 1], s_later, s_seg, K, o.tau, md)
        chain_bad = chain_bad | bad
    loss = _op(o, p, z, t_vals, t_cols, p.spans, p.t_chain, s_chain)
    if merge == "chain":
        loss = loss.masked_fill(chain_bad, math.nan)

    excluded = _excluded(loss, nonfinite, lambda j: _raise_nonfinite(
        j, kind, merge, alignment, p.spans_host, lambda r: z.detach().index_select(0, r), t_fetch, T_S, T_T, o.backend,
        o.tau))
    loss = loss.masked_fill(excluded, 0.0)  # no gradient through excluded chunks
    n_excluded = excluded.sum()
    if reduction == "none":
        return loss, n_excluded
    return _normalized(loss.sum(), n_excluded, K, o), n_excluded


def _check_unique(teacher_indices: Tensor):
    """Each row's top-k teacher ids must be distinct (a duplicate would overwrite the other entry's value)."""
    srt = teacher_indices.sort(-1).values
    dup = (srt[..., 1:] == srt[..., :-1]).any(-1)
    msg = "teacher_indices must hold distinct columns in every row (top-k ids)"
    if dup.device.type == "cpu" and bool(dup.any()):
        b, p = (int(i) for i in dup.reshape(-1, dup.shape[-1]).nonzero()[0])
        raise ValueError(f"{msg}; the row at batch {b}, position {p} repeats a column")
    check_data(~dup.any(), msg)


def _raise_nonfinite(j, kind, merge, alignment, spans, s_fetch, t_fetch, T_S, T_T, backend, tau,
                     names=("student_logits", "teacher_logits")):
    """The error for NaN chunk j (flat, in row_spans order): the first row it reads (student rows first) that holds
    NaN or +inf, or (student) has no finite value; else, where a finite |logit| / τ passes float32's range (the
    fp32 kernels' domain), that. ``s_fetch(r)`` / ``t_fetch(r)[0]``: the logit rows r; ``names``: what the user
    passed for them."""
    s_lo, s_hi, t_lo, t_hi = (int(x) for x in spans[j])
    s_all = merge == "mean" or (merge == "chain" and kind != "pkl")  # P-KL has no student chain scalar
    t_all = merge != "first"
    reads = ((names[0], s_fetch, range(s_lo, s_hi if s_all else s_lo + 1), T_S, True),
             (names[1], lambda r: t_fetch(r)[0], range(t_lo, t_hi if t_all else t_lo + 1), T_T, False))
    valid = getattr(alignment, "chunk_valid", None)
    b, k = (int(x) for x in valid.nonzero()[j]) if valid is not None else (s_lo // T_S, j)
    where = f"chunk {k} of sequence {b}"
    for name, fetch, r, T, is_student in reads:
        rows = fetch(torch.arange(r.start, r.stop)).detach()  # CPU logits: raised on CPU only
        flags = nonfinite_rows(rows, is_student)
        if bool(flags.any()):
            i = int(flags.nonzero()[0, 0])
            row = rows[i].float()
            what = "NaN" if bool(row.isnan().any()) else "+inf" if bool((row == math.inf).any()) else \
                "no finite value"
            raise ValueError(f"non-finite logits: {name} at batch {(r.start + i) // T}, position {(r.start + i) % T} "
                             f"holds {what} ({where} reads that row); pass nonfinite='mask' to exclude such chunks")
        finite = rows[rows.isfinite()]  # −inf entries are legitimate zero probabilities
        big = float(finite.double().abs().max()) / tau if finite.numel() else 0.0
        if rows.dtype != torch.float64 and big > torch.finfo(torch.float32).max:
            raise ValueError(f"{name} of {where}: |logit| / temperature reaches {big:.3g}, past float32's range "
                             "(the kernels compute logits / temperature in fp32): rescale the logits or raise the "
                             "temperature")
    raise ValueError(f"the loss of {where} is NaN although the logit rows it reads are finite (backend "
                     f"{backend or 'auto'!r})")


_DEFAULT = object()  # uncommon_topk's default: 8192 for H-KL and GOLD (release parity), None for ULD and P-KL
_UNCOMMON_DEFAULT = {"pkl": None, "hkl": 8192, "gold": 8192, "uld": None}

_DOC = """

    student_logits [B, T_S, V_S] / teacher_logits [B, T_T, V_T] (any float dtype; or flattened [N, V] rows with a
    B == 1 alignment); ``alignment`` an xt.Alignment (keep it on the CPU: no host sync on CUDA); ``proj`` an
    xt.Projection (or xt.LearnableProjection for P-KL).
    Sparse teacher: teacher_logits = top-k log-probs [B, T_T, k] with teacher_indices [B, T_T, k] (unique per row).
    merge: "mean" (default) | "first" | "chain" (needs student_ids / teacher_ids [B, T], default: the alignment's).
    uncovered: "renormalize" (teacher renormalized over covered columns) | "epsilon" (release parity, 1e-10 floor).
    teacher_topk: restrict to the k teacher columns with the largest max-over-rows logit, over the rows of valid
        chunks (the release ranks every teacher position, padding included), of the values given (a sparse
        teacher's log-probs rank differently from its logits, which differ per row by the log-normalizer).
    uncommon_topk (H-KL / GOLD / ULD only): length cap m of the sorted-L1 term; default 8192 for H-KL and GOLD as in
    the authors' release (it only matters past 8,192 uncommon ids), None (uncapped) for ULD.
    reduction: "mean" (Σ_k L_k / normalizer, default the number of valid chunks not excluded; a normalizer is a
    finite number > 0, used as given) | "sum" | "none" ([N_valid], 0 for excluded chunks).
    backend: "auto" (default: $XTOKEN_BACKEND or auto: Triton on CUDA, the C++ kernel on CPU where it applies,
    else chunked torch) | "triton" | "native" | "torch".
    nonfinite: "raise" (default: NaN / +inf logits in a row a chunk reads -> ValueError naming the tensor, batch
    index, position and chunk; on CUDA an asynchronous device assert) | "mask" (exclude such chunks). Chunks without
    projected student mass or with an infinite loss are always excluded (module docstring).
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
             backend: str | None = None, nonfinite: str = "raise") -> Tensor:
        return run(student_logits, teacher_logits, alignment, proj, temperature, reduction, merge=merge,
                   uncovered=uncovered, teacher_topk=teacher_topk, uncommon_topk=uncommon_topk, normalizer=normalizer,
                   teacher_indices=teacher_indices, student_ids=student_ids, teacher_ids=teacher_ids, backend=backend,
                   nonfinite=nonfinite)[0]

    def run(student_logits, teacher_logits, alignment, proj, temperature=1.0, reduction="mean", *, merge="mean",
            uncovered="renormalize", teacher_topk=None, uncommon_topk=_DEFAULT, normalizer=None, teacher_indices=None,
            student_ids=None, teacher_ids=None, backend=None, nonfinite="raise"):  # -> (loss, excluded chunks)
        return _run(kind, student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered,
                    teacher_topk, _UNCOMMON_DEFAULT[kind] if uncommon_topk is _DEFAULT else uncommon_topk,
                    normalizer, teacher_indices, student_ids, teacher_ids, backend, nonfinite)

    loss.__name__ = loss.__qualname__ = f"{kind}_loss"
    loss.__doc__ = _SUMMARY[kind] + _DOC
    loss.with_excluded = run
    return loss


pkl_loss = _make_loss("pkl")
hkl_loss = _make_loss("hkl")
gold_loss = _make_loss("gold")
uld_loss = _make_loss("uld")


class _KDLoss(nn.Module):
    """nn.Module form: options fixed at construction, ``forward(student_logits, teacher_logits, alignment, **kw)``
    (keyword options given there override them); ``from_hidden(student_hidden, student_head_weight, teacher_logits,
    alignment, **kw)`` is the fused linear-head form. A LearnableProjection becomes a submodule (its θ a parameter).
    After each call ``last_excluded`` holds the number of chunks the loss excluded (0-dim int64 tensor on the
    logits' device, no host sync)."""

    fn = None  # the functional form

    def __init__(self, proj: Projection | LearnableProjection, temperature: float = 1.0, reduction: str = "mean",
                 **options):
        super().__init__()
        self.proj = proj
        self.options = dict(temperature=temperature, reduction=reduction, **options)
        self.last_excluded: Tensor | None = None

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, alignment: Alignment, **overrides) -> Tensor:
        out, self.last_excluded = self.fn.with_excluded(student_logits, teacher_logits, alignment, self.proj,
                                                        **(self.options | overrides))
        return out

    def from_hidden(self, student_hidden: Tensor, student_head_weight: Tensor, teacher_logits: Tensor | None,
                    alignment: Alignment, **overrides) -> Tensor:
        """The fused linear-head form (``xt.<loss>_from_hidden``, xtoken_ext.linear_head) with these options: the
        student's last hidden states and lm-head weight instead of its logits."""
        from . import linear_head

        fn = getattr(linear_head, f"{self.fn.__name__}_from_hidden")
        out, self.last_excluded = fn.with_excluded(student_hidden, student_head_weight, teacher_logits, alignment,
                                                   self.proj, **(self.options | overrides))
        return out

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
