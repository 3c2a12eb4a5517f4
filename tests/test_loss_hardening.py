"""Issue 12 (hardening), loss parts. The non-finite / degenerate-chunk policy (README "Non-finite logits and
degenerate chunks") on every backend against xt.reference, at the public API and at the op level, and the bad inputs
that the losses, the ops and Projection.load reject with a clear error. Each test here failed before the change it
guards: NaN hidden or spread (finding 3), empty W rows (finding 4), silent acceptance (finding 8). Finding 9 (a UB
shift for NaN in the C++ exp) shows under `scripts/sanitize.sh tests/test_loss_hardening.py -k "not triton"`.

The special-values test runs every backend; the Triton one under the interpreter (slow) sees small problems only."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import xtoken_ext as xt
from helpers import BACKENDS, LOSSES, check, dense_w, device, grad_bound, kappa, loss_bound, make_problem, \
    oracle_pkl, run_pkl, teacher_logpi
from xtoken_ext import reference as ref
from xtoken_ext.losses import LearnableProjection
from xtoken_ext.projection import Projection, ProjectionFileError
from xtoken_ext.testing import C, loss_problem, math_roundoff

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's masked lanes
pkl_rows, hkl_rows = torch.ops.xtoken.pkl_rows, torch.ops.xtoken.hkl_rows

V_S, V_T = 11, 13
EMPTY_ROW = 9  # W rows 9 and 10 are empty (as <|eot_id|> in the real Llama-3 -> Qwen3 W); columns 11, 12 uncovered
UNCOVERED = 12
NAN, INF = math.nan, math.inf


def projection() -> Projection:
    """Rows 0..8 -> 1, 2 or 3 distinct teacher columns in [0, 11) (weights .6/.3/.1 cut and renormalized: every
    row has a relaxed common pair, the one-piece rows a strict one)."""
    g = torch.Generator().manual_seed(0)
    idx, w = torch.full((V_S, 4), -1, dtype=torch.int32), torch.zeros(V_S, 4)
    for s in range(EMPTY_ROW):
        n = 1 + s % 3
        idx[s, :n] = torch.randperm(V_T - 2, generator=g)[:n].to(torch.int32)
        w[s, :n] = torch.tensor([0.6, 0.3, 0.1][:n]) / sum([0.6, 0.3, 0.1][:n])
    return Projection(idx, w, V_T)


PROJ = projection()


def alignment() -> xt.Alignment:
    """Two sequences of 6 logit rows per side; valid chunks with 1-2 rows per side (row_spans: seq 0 rows
    [0,2)/[0,1), [2,3)/[1,3), [3,4)/[3,4); seq 1 rows [0,1)/[0,1), [1,2)/[1,3), [2,4)/[3,4)), last row idle."""
    return xt.Alignment.from_chunks(
        [[(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 4), (4, 5, 4, 5)], [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 4),
                                                                    (3, 5, 4, 5)]],
        [[True] * 4] * 2, [5, 5], [5, 5], T_S=6, T_T=6,
        student_ids=[[1, 2, 3, 4, 5], [6, 7, 8, 0, 1]], teacher_ids=[[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


def logits(seed: int = 0):
    """float64 student / teacher logits exact in fp16; every student row one shared order of the vocabulary plus a
    jitter (no sorted-L1 ties between nonzero values under any merge)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(V_S, generator=g)).double()
    z = (perm * 8 + torch.randint(-3, 4, (2, 6, V_S), generator=g) - 4 * V_S) / 32
    t = (torch.randn(2, 6, V_T, generator=g, dtype=torch.float64) * 2).half().double()
    return z, t


def _edit(*edits):
    """In-place edits ("z" | "t", index, value) of the float64 logits."""
    def apply(z, t):
        for side, where, value in edits:
            (z if side == "z" else t)[where] = value
    return apply


def _scaled(f):
    """Both float64 logits times f (a power of two: exact)."""
    def apply(z, t):
        z.mul_(f)
        t.mul_(f)
    return apply


A_COLS = slice(0, UNCOVERED - 1)  # allowed teacher columns (covered: 0..10)
# name -> (edits, temperature, merge, logit dtype); several special values per case (in different chunks) keep the
# Triton interpreter's share short. Rows / chunks: see alignment(); with nonfinite="raise" the first bad chunk in
# (sequence, chunk) order is named.
SPECIAL = {
    "NaN student row, NaN uncovered teacher column, -inf entries": (_edit(
        ("z", (0, 1, 3), NAN), ("t", (1, 1, UNCOVERED), NAN), ("z", (0, 3, slice(0, 5)), -INF),
        ("t", (1, 0, slice(0, 4)), -INF)), 1.0, "mean", torch.float32),
    "fp16: +inf teacher (overflow), 65504, -65504, smallest subnormal": (_edit(
        ("t", (0, 3, 2), INF), ("z", (0, 2, 0), 65504.0), ("z", (1, 1, 4), -65504.0),
        ("t", (slice(None), slice(None), 1), 2.0 ** -24), ("t", (1, 1, 7), 65504.0)), 0.7, "mean", torch.float16),
    "+inf student (first merge), student row without a finite value": (_edit(
        ("z", (1, 2, 0), INF), ("z", (0, 3), -INF), ("z", (0, 1), NAN)), 1.0, "first", torch.float32),
    "teacher -inf on A, +-1e4, student mass on an empty W row": (_edit(
        ("t", (0, 1, A_COLS), -INF), ("z", (0, 3, EMPTY_ROW), 1e4), ("z", (1, 0, 2), -1e4),
        ("t", (1, 3, 5), 1e4)), 1.0, "mean", torch.float32),
    "chain merge: NaN in later rows, a -inf chain scalar": (_edit(  # t[0, 2, 4]: the realized token's logit
        ("t", (1, 2, UNCOVERED), NAN), ("z", (0, 1, 5), NAN), ("t", (0, 2, 4), -INF)), 1.0, "chain",
        torch.float32),
    "one teacher row (1-to-1 chunks): NaN, +inf outside A": (_edit(
        ("t", (0, 3, UNCOVERED), NAN), ("t", (1, 0, UNCOVERED - 1), INF)), 1.0, "mean", torch.float32),
    "one teacher row (first merge): +inf, NaN outside A": (_edit(
        ("t", (0, 1, UNCOVERED), INF), ("t", (1, 3, UNCOVERED - 1), NAN)), 0.7, "first", torch.float32),
    "bf16: NaN / +inf student entries, NaN teacher outside A (mean)": (_edit(
        ("z", (0, 1, 3), NAN), ("z", (1, 2, 0), INF), ("t", (1, 1, UNCOVERED), NAN)), 0.7, "mean", torch.bfloat16),
    "bf16: NaN / +inf student entries (first merge)": (_edit(
        ("z", (1, 1, 3), NAN), ("z", (0, 2, 5), INF)), 1.0, "first", torch.bfloat16),
    "tiny temperature 2**-63": (_edit(), 2.0 ** -63, "mean", torch.float32),
    # logits scaled with τ: the same softmaxes as at τ = 1 (κ too), gradients and τ² scaled down to the fp32 limits
    "tiny temperature 2**-63, logits scaled by it, first merge": (_scaled(2.0 ** -63), 2.0 ** -63, "first",
                                                                   torch.float32),
    "tiny temperature 2**-60, logits scaled by it, chain merge": (_scaled(2.0 ** -60), 2.0 ** -60, "chain",
                                                                  torch.float32),
    "large temperature 1e3": (_edit(), 1e3, "first", torch.float32),
}


def supported(backend, loss_name, dtype):
    """The dtype a backend takes for this case: the C++ H-KL kernel is fp32-only (the values stay the same)."""
    return torch.float32 if backend == "native" and loss_name != "pkl_loss" else dtype


def call(impl, loss_name, z, t, ali, tau, merge, **kw):
    fn = getattr(impl, loss_name)
    return fn(z, t, ali, PROJ, tau, merge=merge, student_ids=ali.student_ids, teacher_ids=ali.teacher_ids, **kw)


def outcome(impl, loss_name, z, t, ali, tau, merge, raise_check=True, **kw):
    """-> (the error message of the default nonfinite="raise", or None (also when not ``raise_check``ed); then with
    nonfinite="mask": per-chunk losses and the gradient wrt z, on the CPU)."""
    raised = None
    if raise_check:
        try:
            call(impl, loss_name, z.detach(), t, ali, tau, merge, **kw)
        except ValueError as e:
            raised = str(e)
    z = z.detach().clone().requires_grad_()
    per = call(impl, loss_name, z, t, ali, tau, merge, reduction="none", nonfinite="mask", **kw)
    w = torch.linspace(0.5, 1.5, per.numel(), dtype=torch.float64)
    (gz,) = torch.autograd.grad((per * w.to(per.device, per.dtype)).sum(), z, allow_unused=True)
    return raised, per.detach().cpu(), (torch.zeros_like(z) if gz is None else gz).cpu()


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_match_reference(backend, loss_name):
    """NaN, ±inf, ±1e4, fp16 extremes (65504, the smallest subnormal 2⁻²⁴), tiny and large τ: the public loss
    raises exactly when the reference does (same message: tensor, batch, position, chunk), and with
    nonfinite="mask" matches it per chunk and in the gradient within the per-entry bounds; excluded chunks are
    exact zeros on both sides. On CUDA a raise is an asynchronous device assert that ends the process, so there
    only the inputs the reference accepts run with nonfinite="raise" (the message is checked on the CPU backends)."""
    ali = alignment()
    dev = torch.device("cpu") if backend == "native" else device()
    for name, (edit, tau, merge, dtype) in SPECIAL.items():
        dt = supported(backend, loss_name, dtype)
        z, t = logits()
        edit(z, t)
        z, t = z.to(dt), t.to(dt)
        raised_r, per_r, gz_r = outcome(ref, loss_name, z.double(), t.double(), ali, tau, merge)
        check_raise = dev.type == "cpu" or raised_r is None
        raised, per, gz = outcome(xt, loss_name, z.to(dev), t.to(dev), ali, tau, merge, check_raise, backend=backend)
        kap = kappa(z, t, tau)
        key = f"{backend}/special"
        bad_rows = ~(z < INF).all(-1, keepdim=True) | ~(z > -INF).any(-1, keepdim=True)
        safe = torch.where(bad_rows, 0.0, z.double())  # for the bound only: bad rows' gradients are 0 on both sides
        try:
            assert raised == raised_r or not check_raise
            check(f"{key}/loss", per, per_r, loss_bound(per_r, tau, kap, dt))
            assert torch.equal(per == 0, per_r == 0)  # excluded (and empty) chunks on both sides
            check(f"{key}/grad", gz, gz_r, grad_bound(gz_r, safe, tau, kap, dt, backend, 1.5))
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def _chunks_rows(ali):
    """Student logit rows (flat) of each valid chunk, in row_spans order."""
    rs = ali.row_spans()
    return [list(range(int(b) * 6 + lo, int(b) * 6 + hi)) for b, lo, hi, _, _ in rs.tolist()]


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_one_nan_teacher_column_raises_or_is_masked(backend, loss_name):
    """Finding 3: one NaN in an uncovered teacher column changed P-KL silently (it was read as "no allowed
    column"); in a covered column it gave a finite loss with a NaN gradient. Now: a clear error naming the tensor,
    batch, position and chunk; with nonfinite="mask" that chunk is excluded, the others are bit-for-bit unchanged,
    the mean is over the remaining chunks, the gradient is finite and 0 on the excluded chunk's rows."""
    ali = alignment()
    z, t = (x.float() for x in logits(1))
    for col in (UNCOVERED, 4):
        bad = t.clone()
        bad[1, 1, col] = NAN  # teacher row 1 of sequence 1: chunk 2 of sequence 1 (valid chunk 4) reads it
        fn = getattr(xt, loss_name)
        with pytest.raises(ValueError, match=r"teacher_logits at batch 1, position 1 holds NaN \(chunk 2 of "
                                             r"sequence 1 reads that row\)"):
            fn(z, bad, ali, PROJ, backend=backend)
        clean = fn(z, t, ali, PROJ, reduction="none", backend=backend)
        zg = z.clone().requires_grad_()
        per = fn(zg, bad, ali, PROJ, reduction="none", backend=backend, nonfinite="mask")
        keep = torch.arange(per.numel()) != 4
        assert per[4] == 0 and torch.equal(per[keep], clean[keep])
        mean = fn(z, bad, ali, PROJ, backend=backend, nonfinite="mask")
        assert torch.allclose(mean, clean[keep].mean(), rtol=1e-6)
        (gz,) = torch.autograd.grad(per.sum(), zg)
        assert torch.isfinite(gz).all() and torch.equal(gz.reshape(12, V_S)[_chunks_rows(ali)[4]],
                                                        torch.zeros(1, V_S))
        module = getattr(xt, {"pkl_loss": "PKLLoss", "hkl_loss": "HKLLoss", "gold_loss": "GOLDLoss",
                              "uld_loss": "ULDLoss"}[loss_name])(PROJ, nonfinite="mask", backend=backend)
        assert torch.equal(module(z, bad, ali), mean) and module.last_excluded.dtype == torch.int64
        assert int(module.last_excluded) == 1 and int(module(z, t, ali) * 0 + module.last_excluded) == 0


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_rows_no_chunk_reads_are_not_checked(backend):
    """NaN in an idle row, or in a later row under merge="first", changes nothing: no chunk reads it."""
    ali = alignment()
    z, t = (x.float() for x in logits(2))
    want = xt.pkl_loss(z, t, ali, PROJ, merge="first", reduction="none", backend=backend)
    z2, t2 = z.clone(), t.clone()
    z2[:, 5], t2[:, 5] = NAN, INF  # idle last rows
    z2[0, 1], t2[0, 2] = NAN, NAN  # later rows of chunks 1 / 2 of sequence 0: not read by merge="first"
    assert torch.equal(xt.pkl_loss(z2, t2, ali, PROJ, merge="first", reduction="none", backend=backend), want)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_student_row_without_finite_value(backend, loss_name):
    ali = alignment()
    z, t = (x.float() for x in logits(3))
    z[0, 3] = -INF  # chunk 2 of sequence 0
    with pytest.raises(ValueError, match="student_logits at batch 0, position 3 holds no finite value"):
        getattr(xt, loss_name)(z, t, ali, PROJ, backend=backend)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_sparse_teacher_nan_is_located(backend):
    """A sparse (top-k) teacher: its values are checked; the native kernel has no sparse path, so "native"
    resolves to an error naming the backend, and the default backend runs."""
    ali = alignment()
    z, _ = logits(4)
    vals = torch.log_softmax(torch.randn(2, 6, 4, dtype=torch.float64), -1).float()
    idx = torch.stack([torch.randperm(V_T)[:4] for _ in range(12)]).reshape(2, 6, 4)
    vals[0, 3, 2] = NAN
    b = None if backend == "native" else backend
    with pytest.raises(ValueError, match="teacher_logits at batch 0, position 3 holds NaN"):
        xt.hkl_loss(z.float(), vals, ali, PROJ, teacher_indices=idx, backend=b)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("reach", ["-inf elsewhere", "+1e4 on the empty row"])
def test_student_mass_on_empty_w_rows_is_excluded(backend, reach):
    """Finding 4: all student mass of a chunk on empty W rows (Z = 0) gave loss inf / NaN and NaN gradients, and
    one such chunk made the batch NaN. Now it is excluded (0, no gradient, not in the mean) and counted."""
    ali = alignment()
    z, t = (x.float() for x in logits(5))
    clean = xt.pkl_loss(z, t, ali, PROJ, reduction="none", backend=backend)
    if reach == "-inf elsewhere":
        z[1, 0] = -INF
        z[1, 0, EMPTY_ROW] = 0.0  # chunk 1 of sequence 1 (valid chunk 3): p one-hot on the empty row
    else:
        z[1, 0, EMPTY_ROW] = 1e4
    zg = z.clone().requires_grad_()
    module = xt.PKLLoss(PROJ, reduction="none", backend=backend)
    per = module(zg, t, ali)
    keep = torch.arange(per.numel()) != 3
    assert per[3] == 0 and torch.equal(per[keep], clean[keep]) and int(module.last_excluded) == 1
    (gz,) = torch.autograd.grad(per.sum(), zg)
    assert torch.isfinite(gz).all() and torch.equal(gz[1, 0], torch.zeros(V_S))
    mean = xt.pkl_loss(z, t, ali, PROJ, backend=backend)  # default nonfinite="raise": degenerate is no error
    assert torch.allclose(mean, clean[keep].mean(), rtol=1e-6)
    assert torch.allclose(xt.pkl_loss(z, t, ali, PROJ, normalizer=7.0, backend=backend), clean[keep].sum() / 7.0,
                          rtol=1e-6)


def _op_problem():
    """Row-space problem with 6 one/two-row chunks; chunks 1-4 get bad input / no mass / Z = 0 / infinite KL."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(14, V_S, generator=g) * 2
    t = torch.randn(14, V_T, generator=g) * 2
    spans = torch.tensor([[2 * k, 2 * k + 2, 2 * k, 2 * k + 1 + k % 2] for k in range(6)])
    mask = PROJ.covered_columns()
    z_bad, t_bad = z.clone(), t.clone()
    z_bad[3, 1] = NAN  # chunk 1 reads student row 3 (mean merge)
    t_bad[4, UNCOVERED] = INF  # chunk 2's teacher row: an unallowed column counts too
    t_bad[6, mask] = -INF  # chunk 3: no teacher mass on A -> 0
    z_bad[8:10] = -INF
    z_bad[8:10, EMPTY_ROW] = 0.0  # chunk 4: Z = 0 -> +inf
    return z, t, z_bad, t_bad, spans, mask


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("merge", ["mean", "chain"])
@pytest.mark.parametrize("eps", [0.0, 1e-10])
def test_pkl_op_policy(backend, merge, eps):
    """xtoken::pkl_rows: NaN / 0 / +inf per chunk, exact-zero gradient rows and no grad_w part for them (Z = 0
    with P > 0 gave NaN gradients, Z = 0 with P = 0 a 0/0), the other chunks bit-for-bit as on clean input."""
    z, t, z_bad, t_bad, spans, mask = _op_problem()
    chain = -torch.rand(14, generator=torch.Generator().manual_seed(7))
    args = (PROJ.indices, PROJ.weights, mask, spans, 0.9, merge, eps, chain, None, True, backend)
    loss, grad, gw = pkl_rows(z_bad, t_bad, None, *args)
    clean = pkl_rows(z, t, None, *args)
    if merge == "mean":
        assert torch.isnan(loss[1]) and loss[3] == 0 and loss[4] == INF
    ok = torch.tensor([0, 5])
    assert torch.equal(loss[ok], clean[0][ok]) and torch.equal(grad[:2], clean[1][:2])
    assert torch.isfinite(grad).all() and torch.equal(grad[2:10], torch.zeros(8, V_S)) == (merge == "mean")
    rest = pkl_rows(z, t, None, *args[:3], spans[ok], *args[4:])[2]  # grad_w of the good chunks alone
    if merge == "mean":
        assert torch.allclose(gw, rest, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_hkl_op_policy(backend):
    z, t, z_bad, t_bad, spans, mask = _op_problem()
    z_bad[2, 0] = NAN  # chunk 1's first row (the only one merge="chain" reads; row 3 enters through s_chain)
    cs, ct = PROJ.common_pairs("relaxed")
    s_chain = -torch.rand(14, generator=torch.Generator().manual_seed(8), requires_grad=True)
    t_chain = -torch.rand(14, generator=torch.Generator().manual_seed(9))
    t_chain[11] = NAN  # chunk 5 (teacher rows [10, 12)): a NaN chain scalar is bad input too
    loss, grad, gchain = hkl_rows(z_bad, t_bad, None, mask, spans, 0.9, "chain", s_chain, t_chain, cs, ct, None,
                                  backend)
    assert torch.isnan(loss[[1, 2, 5]]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isfinite(grad).all() and torch.equal(grad[[2, 4, 10]], torch.zeros(3, V_S))
    assert torch.equal(gchain[[3, 5, 11]], torch.zeros(3))
    want = hkl_rows(z, t, None, mask, spans, 0.9, "chain", s_chain, t_chain, cs, ct, None, backend)
    assert torch.equal(loss[0], want[0][0]) and torch.equal(grad[:2], want[1][:2])


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_ops_reject_rows_of_the_wrong_shape(backend):
    """Both ops check the row-space contract's shapes before any backend indexes by them (the Triton kernels load a
    dense teacher row's V_T columns without a bounds mask; the torch backend took a narrower dense row as the
    allowed columns' values): a dense teacher one column short, sparse columns shaped unlike their values, W's slots
    of the wrong shape; the same rows of the right shapes pass."""
    z, t, _, _, spans, mask = _op_problem()
    cs, ct = PROJ.common_pairs("relaxed")
    top = t.topk(4, 1)

    def pkl(t_vals, t_cols, w_idx=PROJ.indices, w_val=PROJ.weights):
        return pkl_rows(z, t_vals, t_cols, w_idx, w_val, mask, spans, 0.9, "mean", 0.0, None, None, False, backend)

    def hkl(t_vals, t_cols):
        return hkl_rows(z, t_vals, t_cols, mask, spans, 0.9, "mean", None, None, cs, ct, None, backend)

    for op in (pkl, hkl):
        with pytest.raises(ValueError, match="a dense teacher needs t_vals"):
            op(t[:, :-1], None)
        with pytest.raises(ValueError, match="a sparse teacher needs t_cols shaped like t_vals"):
            op(top.values, top.indices[:, :3])
    for w_idx, w_val in ((PROJ.indices[:-1], PROJ.weights[:-1]), (PROJ.indices[:, :2], PROJ.weights[:, :2]),
                         (PROJ.indices, PROJ.weights[:, :3])):
        with pytest.raises(ValueError, match=r"w_idx and w_val must be \[V_S, 4\]"):
            pkl(t, None, w_idx, w_val)
    if backend != "native":  # the native kernels take a dense teacher only
        assert torch.isfinite(pkl(top.values, top.indices)[1]).all()
        assert torch.isfinite(hkl(top.values, top.indices)[1]).all()
    assert torch.isfinite(pkl(t, None)[1]).all() and torch.isfinite(hkl(t, None)[1]).all()


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_ops_check_their_options(backend):
    """The ops' options are checked alike on every backend. Before, the torch and Triton backends took an unknown
    merge as "mean" or "first", a negative eps into log(Q + eps), merge="chain" without (or with short) chain
    scalars to an index error or a silent "first", a float column mask as indices, and hkl's negative
    uncommon_topk as "none" (torch) or "all" (C++)."""
    z, t, _, _, spans, mask = _op_problem()
    cs, ct = PROJ.common_pairs("relaxed")
    s_chain, t_chain = torch.zeros(z.shape[0]), torch.zeros(t.shape[0])

    def pkl(merge="mean", eps=0.0, chain=None, col_mask=mask):
        return pkl_rows(z, t, None, PROJ.indices, PROJ.weights, col_mask, spans, 0.9, merge, eps, chain, None, False,
                        backend)

    def hkl(merge="mean", sc=None, tc=None, col_mask=mask, topk=None):
        return hkl_rows(z, t, None, col_mask, spans, 0.9, merge, sc, tc, cs, ct, topk, backend)

    for op in (pkl, hkl):
        with pytest.raises(ValueError, match=r"merge must be one of \('mean', 'first', 'chain'\), got 'max'"):
            op(merge="max")
        with pytest.raises(TypeError, match="col_mask must be a bool tensor"):
            op(col_mask=mask.float())
    for bad in (-1e-10, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            pkl(eps=bad)
    with pytest.raises(ValueError, match=r"merge='chain' needs t_chain \[14\]"):
        pkl("chain")
    with pytest.raises(ValueError, match=r"merge='chain' needs t_chain \[14\]"):
        pkl("chain", chain=t_chain[:-1])
    with pytest.raises(ValueError, match=r"merge='chain' needs s_chain \[14\]"):
        hkl("chain", None, t_chain)
    with pytest.raises(ValueError, match=r"merge='chain' needs t_chain \[14\]"):
        hkl("chain", s_chain, t_chain.long())
    with pytest.raises(ValueError, match="uncommon_topk must be None or an integer >= 0, got -1"):
        hkl(topk=-1)
    assert torch.isfinite(pkl("chain", chain=t_chain)[0]).all() and torch.isfinite(hkl(topk=0)[0]).all()
    assert torch.isfinite(hkl("chain", s_chain, t_chain)[0]).all()


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_hkl_op_rejects_common_pairs_that_are_not_a_matching(backend):
    """xtoken::hkl_rows checks its common pairs on every backend: ids in range, each student and each teacher id at
    most once (the kernels map each id to one partner: a student paired with two teachers gave the Triton and torch
    backends losses 29x apart; the C++ kernel, called directly, refuses it too); Projection's own pairs pass."""
    from xtoken_ext.ops.hkl import _native

    z, t, _, _, spans, mask = _op_problem()
    cs, ct = PROJ.common_pairs("relaxed")
    allowed = torch.nonzero(mask).flatten()
    spare_t = int(allowed[~torch.isin(allowed, ct)][0])  # an allowed teacher id no pair uses
    spare_s = int(torch.nonzero(~torch.isin(torch.arange(V_S), cs))[0])

    def hkl(s_ids, t_ids):
        return hkl_rows(z, t, None, mask, spans, 0.9, "mean", None, None, s_ids, t_ids, None, backend)

    msg = "each student and each teacher id at most once"
    bad = {"a student twice": (torch.cat([cs, cs[:1]]), torch.cat([ct, torch.tensor([spare_t])])),
           "a teacher twice": (torch.cat([cs, torch.tensor([spare_s])]), torch.cat([ct, ct[:1]])),
           "student id V_S": (torch.cat([cs, torch.tensor([V_S])]), torch.cat([ct, torch.tensor([spare_t])])),
           "teacher id -1": (torch.cat([cs, torch.tensor([spare_s])]), torch.cat([ct, torch.tensor([-1])]))}
    for name, (s_ids, t_ids) in bad.items():
        with pytest.raises(ValueError, match=msg):
            hkl(s_ids, t_ids)
    with pytest.raises(ValueError, match="common_s and common_t must be \\[C\\]"):
        hkl(cs, ct[:-1])
    with pytest.raises(TypeError, match="integer ids"):
        hkl(cs.float(), ct)
    assert torch.isfinite(hkl(cs, ct)[0]).all() and torch.isfinite(hkl(cs[:0], ct[:0])[0]).all()
    if backend == "native":  # past the op's check: the kernel's own
        with pytest.raises(ValueError, match="at most once"):
            _native(z, t, None, mask, spans, 0.9, "mean", None, None, *bad["a student twice"], None)


def test_native_pkl_tiny_projected_mass_keeps_a_finite_loss():
    """0 < Z < the smallest normal fp32 (student logit gaps ~95 to the empty W row): 1/Z overflows fp32, which made
    the native loss NaN (then reported as bad input); now it agrees with the torch op and float64 (the gradient:
    test_pkl_gradient_where_z_is_below_the_normal_range)."""
    z = torch.full((2, V_S), -95.0)
    z[:, EMPTY_ROW] = 0.0
    t = torch.randn(2, V_T, generator=torch.Generator().manual_seed(13))
    args = (None, PROJ.indices, PROJ.weights, PROJ.covered_columns(), torch.tensor([[0, 1, 0, 1], [1, 2, 1, 2]]),
            1.0, "mean", 0.0, None, None, False)
    native = pkl_rows(z, t, *args, "native")[0]
    want = pkl_rows(z.double(), t.double(), *args, "torch")[0]
    assert torch.allclose(native.double(), want, rtol=1e-3)


@pytest.mark.parametrize("backend,sparse", [(b, s) for b in BACKENDS for s in (False, True) if b != "native" or not s])
def test_pkl_merged_teacher_without_mass_is_zero_also_where_z_is_zero(backend, sparse):
    """Two teacher rows peaked on different columns of A, merge="mean": P = exp(mean log π) is 0 everywhere (also
    in float64), so Σ_A P = 0 and the loss is 0 with no gradient, before the Z = 0 rule (+inf). The Triton kernel
    tested its exp-normalized sum (≥ 1) in place of Σ_A P = F l, and gave +inf where the student's mass lay on
    empty W rows (chunk 0); chunk 1's student is ordinary (Z > 0). (The native kernel takes dense teachers only.)"""
    t = torch.full((2, V_T), -2000.0)
    t[0, 0] = t[1, 1] = 0.0
    cols = None
    if sparse:
        t, cols = torch.tensor([[0.0, -2000.0], [0.0, -2000.0]]), torch.tensor([[0, 1], [1, 0]])
    z = torch.full((2, V_S), -INF)
    z[0, EMPTY_ROW] = 0.0
    z[1] = torch.randn(V_S, generator=torch.Generator().manual_seed(14))
    spans = torch.tensor([[0, 1, 0, 2], [1, 2, 0, 2]])
    args = (PROJ.indices, PROJ.weights, PROJ.covered_columns(), spans, 1.0, "mean", 0.0, None, None, False, backend)
    dev = torch.device("cpu") if backend == "native" else device()
    loss, grad, _ = pkl_rows(z.to(dev), t.to(dev), None if cols is None else cols.to(dev), *args)
    assert torch.equal(loss.cpu(), torch.zeros(2)) and torch.equal(grad.cpu(), torch.zeros(2, V_S))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merge,learn_w", [("mean", True), ("first", False)])
def test_pkl_gradient_where_q_is_below_the_normal_range(backend, merge, learn_w):
    """Most student ids 85 below the rest (τ = 1), the teacher unshifted: at the columns only they reach, Q is
    below the smallest normal fp32 where P is not small, so h = P/Q (up to 2^149) and τ²/Z (M − h) passed fp32's
    range although the loss is finite: the gradient came out inf / NaN on every backend (README "Limit" before).
    Now h, M and G are formed scaled by 2^-24 and only their products with 2^24 p (bounded) take the factors,
    and p and Q are formed as 2^24 p, 2^24 Q (normal where p, Q are not): loss, gradient and W gradient match the
    float64 oracle on every backend. fp32 logits: many of these gradient entries are subnormal, where a bf16 store
    is exact to 2^-134 only (and the Triton interpreter's fp32 -> bf16 conversion is wrong: 5.9e-40 -> 7.0e-39)."""
    P = make_problem(seed=3, V_S=97, V_T=61, n_chunks=3, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.0, hub=False)
    P.z[:, 8:] -= 85.0
    z = P.z.double()
    W = dense_w(P.w_idx, P.w_val.double(), P.col_mask.numel())
    logpi = teacher_logpi(P.t.double(), None, P.col_mask, 1.0)
    h = [logpi[t_lo] - torch.log(torch.softmax(z[s_lo], 0) @ W / (torch.softmax(z[s_lo], 0) @ W).sum())
         for s_lo, _, t_lo, _ in P.spans.tolist()]
    assert float(torch.cat(h)[P.col_mask.repeat(len(h))].max()) > 128 * math.log(2)  # log h: past fp32's range
    run_pkl(P, torch.float32, merge, 1.0, learn_w, backend=backend)


def _empty_row_problem(tau, gap, merge, compact=False):
    """-> (P, W over A, [(rows, Z)] per chunk): 3 chunks whose student mass is almost all on an id with an empty W
    row, every other id ``gap`` nats below it (z/τ as at τ = 1, within ±6); Z in float64 over the merged rows."""
    P = make_problem(seed=5, V_S=97, V_T=61, n_chunks=3, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.1, hub=False)
    if compact:
        P.col_mask[30:] = False
    empty = int(torch.nonzero((P.w_idx < 0).all(1))[0])
    P.z.mul_(tau).sub_(gap * tau)
    P.z[:, empty] += gap * tau
    P.t.mul_(tau)
    W = dense_w(P.w_idx, P.w_val.double(), P.col_mask.numel())[:, P.col_mask]
    chunks = []
    for s_lo, s_hi, _, _ in P.spans.tolist():
        rows = range(s_lo, s_hi if merge == "mean" else s_lo + 1)
        chunks.append((rows, float(torch.stack([torch.softmax(P.z[r].double() / tau, 0) @ W for r in rows]).mean(0)
                                   .sum())))
    return P, W, chunks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merge,learn_w,tau,compact,gap", [
    ("mean", True, 1.0, False, 102), ("first", False, 0.25, True, 95), ("mean", False, 0.5, True, 130),
    ("first", True, 0.05, False, 129)])
def test_pkl_gradient_where_z_is_below_the_normal_range(backend, merge, learn_w, tau, compact, gap):
    """The student's mass almost all on an id whose W row is empty (as <|eot_id|> in the real Llama-3 -> Qwen3 W),
    every other id ``gap`` nats below it: Z = Σ_A Wᵀp̄ (below 1e-40) is below the smallest normal fp32 and the
    loss (of the renormalized Q) finite. Before: τ²/Z passed fp32's range (the gradient inf / NaN; with τ < 1 2^24/Z
    alone did, a finite wrong gradient), ⟨p, g⟩ ~ Z g underflowed (Triton's merged rows: 4.6× the gradient bound at
    gap 95; the C++ merged rows: the empty id's gradient 2.4 % off at 102), the torch and C++ losses took the log of
    the rounded subnormal Q (7-8× the loss bound), and where Z < 2^-150 (gap 130) they formed p as 2^24 p, which
    drops it (the loss +inf). Now the chunk's p are formed as 2^88 p (unit 2^-64 in the factors), ⟨p, g⟩ is kept
    scaled and the log of a subnormal Q comes from 2^24 Q: loss, gradient and W gradient match the float64 oracle on
    every backend. compact: A is at most half of the teacher columns (the C++ kernel's column space is then A's).
    Bound: the gradient bound's p term stands for the M term τ (p/Z) w M of dz at Z ~ 1; here it is taken at p w/Z
    (w: the id's W row sum over A; 0 at the empty id, whose gradient is the ⟨p, g⟩ term alone, of order 1), and the
    subnormal entries to 2^-126 (flush-to-zero, as test_pkl_eps_kinds)."""
    P, W, chunks = _empty_row_problem(tau, gap, merge, compact)
    inv_z = torch.zeros(P.z.shape[0], dtype=torch.float64)
    for rows, Z in chunks:
        assert 0 < Z < 2.0 ** -126
        inv_z[list(rows)] = 1 / Z
    p = torch.softmax(P.z.double() / tau, 1)
    um = C * math_roundoff(torch.float32) * kappa(P.z, P.t, tau)
    run_pkl(P, torch.float32, merge, tau, learn_w, backend=backend,
            grad_floor=um * 2 * tau * p * W.sum(1) * inv_z.unsqueeze(1) + 2.0 ** -126)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau,eps,gap,scale", [
    (0.05, 1e-10, 147, None), (1.0, 0.0, 147, None), (1.0, 0.0, 128, 2.0 ** 20)])
def test_pkl_z_past_fp32s_reach_is_degenerate_not_nan(backend, tau, eps, gap, scale):
    """As above, every id but the empty W row's ``gap`` nats below it; float64 gives a finite loss. Gap 147: Z below
    2^-180 (and above 2^-213, where Triton's 2^64 Z is still > 0), where the products of 2^88 p with the gradient's
    factors go subnormal; gap 128 (Z above 2^-180) with chunk scale 2^20 (a loss scaler's): τ c/Z' (Z' = 2^64 Z),
    the gradient's factor of 1/Z, passes fp32's range. Either way the chunk counts as Z = 0: loss +inf, zero gradient
    rows and no W-gradient part, on every backend (without the scale gap 128 is a finite chunk, as in the test
    above). Before: a finite loss and all-NaN gradient rows and grad_w (a fuzz campaign's find)."""
    P, _, chunks = _empty_row_problem(tau, gap, "mean")
    for _, Z in chunks:
        assert (2.0 ** -213 < Z < 2.0 ** -181) if scale is None else (2.0 ** -180 < Z < 2.0 ** -172)
    ref_loss = oracle_pkl(P.z.double(), P.t, P.t_cols, P.w_idx, P.w_val.double(), P.col_mask, P.spans, tau, "mean",
                          eps, P.t_chain)
    assert torch.isfinite(ref_loss).all()
    dev = torch.device("cpu") if backend == "native" else device()
    args = [x.to(dev) if isinstance(x, torch.Tensor) else x
            for x in (P.z, P.t, P.t_cols, P.w_idx, P.w_val, P.col_mask, P.spans, tau, "mean", eps, P.t_chain)]
    c = None if scale is None else torch.full((P.spans.shape[0],), scale, device=dev)
    loss, grad, grad_w = torch.ops.xtoken.pkl_rows(*args, c, True, backend)
    assert (loss.cpu() == math.inf).all()
    assert torch.equal(grad.cpu(), torch.zeros_like(P.z)) and torch.equal(grad_w.cpu(), torch.zeros_like(P.w_val))
    if scale is not None:
        assert torch.isfinite(torch.ops.xtoken.pkl_rows(*args, None, True, backend)[0]).all()


# ---------------------------------------------------------------------------------------------------------------
# finding 8: bad inputs -> a clear error at the call
# ---------------------------------------------------------------------------------------------------------------

def _edited_alignment(edit):
    ali = alignment()
    edit(ali)
    return ali


def _dup_indices():
    idx = torch.arange(4).repeat(2, 6, 1)
    idx[1, 2, 3] = 0
    return idx


_LP = torch.log_softmax(torch.randn(2, 6, 4), -1)
BAD_INPUTS = [  # (keyword overrides, exception, message)
    (dict(teacher_logits=_LP, teacher_indices=_dup_indices()), ValueError, "batch 1, position 2 repeats a column"),
    (dict(teacher_logits=_LP, teacher_indices=torch.ones(2, 6, 4, dtype=torch.bool)), TypeError, "integer tensor"),
    (dict(teacher_logits=_LP, teacher_indices=torch.zeros(2, 6, 4)), TypeError, "integer tensor"),
    (dict(teacher_logits=_LP, teacher_indices=[[0, 1, 2, 3]]), TypeError, "teacher_indices must be a tensor"),
    (dict(student_logits=torch.randn(2, 8, V_S), teacher_logits=torch.randn(2, 8, V_T)), ValueError,
     "the alignment is for 2 sequences of 6 student / 6 teacher rows but the logits have 2 of 8 / 8"),
    (dict(student_logits=torch.randn(2, 4, V_S), teacher_logits=torch.randn(2, 4, V_T)), ValueError,
     "the alignment is for 2 sequences"),
    (dict(student_logits=torch.randn(1, 6, V_S), teacher_logits=torch.randn(1, 6, V_T)), ValueError,
     "logits have 1 of 6"),
    (dict(alignment=_edited_alignment(lambda a: a.chunks[0, 2].copy_(torch.tensor([2, 4, 2, 4])))), ValueError,
     "disjoint row ranges"),
    (dict(alignment=_edited_alignment(lambda a: a.chunks[1, 1].copy_(torch.tensor([-3, 2, 1, 2])))), ValueError,
     "valid chunk 3 \\(sequence 1\\)"),
    (dict(alignment=None), ValueError, "alignment must be an xt.Alignment, got NoneType"),
    (dict(normalizer=0), ValueError, "normalizer must be finite and > 0, got 0"),
    (dict(normalizer=-2.0), ValueError, "normalizer must be finite and > 0"),
    (dict(normalizer=NAN), ValueError, "normalizer must be finite and > 0"),
    (dict(normalizer=INF), ValueError, "normalizer must be finite and > 0"),
    (dict(normalizer=torch.tensor(0.0)), ValueError, "normalizer must be finite and > 0"),
    (dict(normalizer=torch.tensor([NAN])), ValueError, "normalizer must be finite and > 0"),
    (dict(normalizer=torch.ones(2)), TypeError, "1-element tensor"),
    (dict(normalizer=True), TypeError, "normalizer must be a number"),
    (dict(normalizer="4"), TypeError, "normalizer must be a number"),
    (dict(teacher_topk=1.5), TypeError, "teacher_topk must be an int or None, got 1.5"),
    (dict(teacher_topk=True), TypeError, "teacher_topk must be an int"),
    (dict(teacher_topk=0), ValueError, "teacher_topk must be >= 1"),
    (dict(fn="hkl_loss", uncommon_topk=2.5), TypeError, "uncommon_topk must be an int"),
    (dict(fn="hkl_loss", uncommon_topk=-1), ValueError, "uncommon_topk must be >= 0"),
    (dict(fn="gold_loss", uncommon_topk=2 ** 64), ValueError, r"uncommon_topk must be < 2\^63"),
    (dict(teacher_topk=2 ** 63), ValueError, r"teacher_topk must be < 2\^63"),
    (dict(merge="chain", student_ids=torch.zeros(6, 2, dtype=torch.long)), ValueError,
     r"student_ids must be the input token ids \[B, T\] = \[2, 6\], got shape \(6, 2\)"),
    (dict(merge="chain", teacher_ids=torch.zeros(12, dtype=torch.long)), ValueError, "teacher_ids must be"),
    (dict(merge="chain", student_ids=torch.zeros(2, 6)), TypeError, "student_ids must be an integer tensor"),
    (dict(merge="chain", student_ids=torch.zeros(2, 6, dtype=torch.bool)), TypeError, "integer tensor"),
    (dict(merge="chain", teacher_ids=torch.full((2, 6), V_T)), ValueError,
     "teacher_ids must lie in \\[0, 13\\) where the chain reads them"),
    (dict(merge="chain", student_ids=torch.full((2, 6), -1)), ValueError, "student_ids must lie in"),
    (dict(temperature=1e-30), ValueError, "temperature must be a finite number in \\[2\\*\\*-63, 2\\*\\*64\\)"),
    (dict(temperature=1e-45), ValueError, "temperature must be a finite number"),
    (dict(temperature=1e39), ValueError, "temperature must be a finite number"),
    (dict(temperature=2.0 ** 64), ValueError, "temperature must be a finite number"),
    (dict(temperature=INF), ValueError, "temperature must be a finite number"),
    (dict(temperature=NAN), ValueError, "temperature must be a finite number"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number"),
    (dict(temperature=True), TypeError, "temperature must be a real number, got bool"),
    (dict(temperature="1"), TypeError, "temperature must be a real number, got str"),
    (dict(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
    (dict(student_logits=torch.zeros(2, 6, V_S, dtype=torch.float64), backend="triton"), ValueError,
     "backend='triton' computes in float32; float64 logits need backend='torch'"),
    (dict(fn="gold_loss", student_logits=torch.zeros(2, 6, V_S, dtype=torch.float64), backend="triton"), ValueError,
     "backend='triton' computes in float32"),
    (dict(student_logits=torch.where(torch.arange(V_S) == 2, NAN, torch.zeros(2, 6, V_S))), ValueError,
     "student_logits at batch 0, position 0 holds NaN"),
]


@pytest.mark.parametrize("override, exc, msg", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_gets_a_clear_error(override, exc, msg):
    z, t = (x.float() for x in logits(10))
    override = dict(override)
    fn = getattr(xt, override.pop("fn", "pkl_loss"))
    ali = alignment()
    args = dict(student_logits=z, teacher_logits=t, alignment=ali, proj=PROJ, student_ids=ali.student_ids,
                teacher_ids=ali.teacher_ids) | override
    with pytest.raises(exc, match=msg):
        fn(**args)


def test_span_faults_on_tensors_and_arrays():
    """losses._span_faults flags the same chunks whether it gets NumPy arrays (a CPU alignment, the usual place) or
    tensors (an alignment on the device, where the flags stay there: no host sync), one chunk per kind of fault."""
    from xtoken_ext.losses import _span_faults

    rs = torch.tensor([[0, 0, 2, 0, 1], [0, 2, 3, 1, 3],  # fine
                       [0, 3, 3, 3, 4],  # empty student rows
                       [0, 4, 6, 4, 5], [0, 5, 7, 5, 6],  # overlapping student rows (both flagged)
                       [1, 0, 2, 9, 11],  # past T_T
                       [2, 0, 1, 0, 1],  # a sequence past B
                       [1, 3, 4, 3, 4]])  # fine, but its chunk starts below 0 (row_spans clamps it)
    chunks = torch.tensor([[0, 2, 0, 1]] * 7 + [[-1, 4, 3, 4]])
    flat = rs[:, 1:] + rs[:, :1] * torch.tensor([10, 10, 10, 10])
    want = [False, False, True, True, True, True, True, True]
    assert _span_faults(rs.numpy(), flat.numpy(), chunks.numpy(), 2, 10, 10).tolist() == want
    assert _span_faults(rs, flat, chunks, 2, 10, 10).tolist() == want
    assert _span_faults(rs[:2], flat[:2], None, 2, 10, 10).tolist() == [False, False]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_over_temperature_past_fp32s_range_get_a_clear_error(backend):
    """Finite logits whose |z|/τ passes float32's range (the fp32 kernels compute z/τ): the NaN loss names that
    cause instead of an internal inconsistency (float64 logits and the C++ kernel's double sums stay finite)."""
    z, t = (x.float() for x in logits(12))
    z, t = z / z.abs().max() * 1e21, t / t.abs().max() * 1e21
    with pytest.raises(ValueError, match=r"\|logit\| / temperature reaches 1e\+39, past float32's range"):
        xt.gold_loss(z, t, alignment(), PROJ, temperature=1e-18, backend=backend)
    assert torch.isfinite(xt.gold_loss(z / 1e4, t / 1e4, alignment(), PROJ, temperature=1e-18, backend=backend))


def test_accepted_edges_of_the_checked_ranges():
    """The limits are the documented ones, not stricter: τ = 2⁻⁶³ and just below 2⁶⁴, an integer normalizer tensor,
    numpy ints, a bf16 normalizer."""
    z, t = (x.float() for x in logits(11))
    ali = alignment()
    for tau in (2.0 ** -63, 2.0 ** 64 * (1 - 2.0 ** -24)):
        assert not torch.isnan(xt.pkl_loss(z, t, ali, PROJ, tau, nonfinite="mask"))
    per = xt.pkl_loss(z, t, ali, PROJ, reduction="none")
    big = dict(teacher_topk=2 ** 63 - 1, uncommon_topk=2 ** 63 - 1)  # no cap, as None
    assert torch.equal(xt.gold_loss(z, t, ali, PROJ, **big), xt.gold_loss(z, t, ali, PROJ, uncommon_topk=None))
    for n in (torch.tensor(4), np.int64(4), torch.tensor(4.0, dtype=torch.bfloat16)):
        assert torch.allclose(xt.pkl_loss(z, t, ali, PROJ, normalizer=n), per.sum() / 4)
    assert torch.isfinite(xt.pkl_loss(z, t, ali, PROJ, teacher_topk=np.int32(5)))


def test_ops_check_their_inputs():
    """The custom ops, called directly: temperature as fp32, overlapping spans on the torch path (the native
    kernel already refused them), and student vocabularies whose W slot indices overflow int32 in the native and
    Triton kernels (a [0, 2²⁹] logit tensor: no allocation)."""
    z, t, _, _, spans, mask = _op_problem()
    cs, ct = PROJ.common_pairs("relaxed")
    for backend in ("native", "torch"):
        with pytest.raises(ValueError, match="temperature"):
            pkl_rows(z, t, None, PROJ.indices, PROJ.weights, mask, spans, 1e-40, "mean", 0.0, None, None, False,
                     backend)
        with pytest.raises(ValueError, match="temperature"):
            hkl_rows(z, t, None, mask, spans, INF, "mean", None, None, cs, ct, None, backend)
        overlapping = torch.cat([spans, torch.tensor([[1, 3, 0, 1]])])
        with pytest.raises(ValueError, match="two chunks" if backend == "native" else "disjoint student rows"):
            pkl_rows(z, t, None, PROJ.indices, PROJ.weights, mask, overlapping, 1.0, "mean", 0.0, None, None,
                     False, backend)
        with pytest.raises(ValueError, match="out of range" if backend == "native" else "0 <= lo < hi"):
            hkl_rows(z, t, None, mask, spans - 1, 1.0, "mean", None, None, cs, ct, None, backend)
    V = 2 ** 29
    w_idx = torch.full((1, 4), -1, dtype=torch.int32).expand(V, 4)
    with pytest.raises(ValueError, match="student vocabulary < 2\\*\\*29"):
        pkl_rows(torch.empty(0, V), torch.empty(0, 5), None, w_idx, torch.zeros(1, 4).expand(V, 4),
                 torch.ones(5, dtype=torch.bool), torch.zeros(0, 4, dtype=torch.long), 1.0, "mean", 0.0, None, None,
                 False, "native")


def _resave_meta(path, **fields):
    """Rewrite a saved W's metadata with a recomputed checksum (a consistent file that lies about its sizes)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from xtoken_ext.projection import _META_KEY, _checksum

    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    tensors = load_file(str(path))
    meta.pop("checksum")
    meta.update(fields)
    meta["checksum"] = _checksum(meta, tensors)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


@pytest.mark.parametrize("fields, msg", [
    (dict(teacher_vocab_size=10 ** 11), "'teacher_vocab_size' = 100000000000 exceeds 2147483647"),
    (dict(teacher_vocab_size=2 ** 31), "exceeds 2147483647"),
    (dict(teacher_vocab_size=True), "not a non-negative int"),
])
def test_projection_load_rejects_a_huge_teacher_vocab(tmp_path, fields, msg):
    """Finding 8: a W whose metadata claims a 10¹¹ teacher vocabulary loaded, then failed on a 93 GiB allocation."""
    path = tmp_path / "w.safetensors"
    PROJ.save(path)
    _resave_meta(path, **fields)
    with pytest.raises(ProjectionFileError, match=msg):
        Projection.load(path)


def test_learnable_projection_keeps_the_policy():
    """grad θ stays finite with a NaN chunk masked and a Z = 0 chunk excluded (θ gets no part from them)."""
    ali = alignment()
    z, t = (x.float() for x in logits(12))
    z[1, 0] = -INF
    z[1, 0, EMPTY_ROW] = 0.0
    t[0, 3, 0] = NAN
    lp = LearnableProjection(PROJ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("native", "torch"):
            lp.theta.grad = None
            xt.pkl_loss(z, t, ali, lp, backend=backend, nonfinite="mask").backward()
            assert torch.isfinite(lp.theta.grad).all() and lp.theta.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_apply_inside_the_ops(backend):
    """CPU autocast ran the torch backend's sparse products in bf16 / fp16: P-KL raised "addmm_out_sparse_csr_impl_mkl
    not implemented for 'BFloat16'" for every top-k teacher (backend "auto" picks torch there). Under autocast every
    loss, backend and teacher form gives bitwise the loss and gradients of a run without it."""
    P = loss_problem(3, 40, 50, 10, sparse_k=8)
    dense = loss_problem(3, 40, 50, 10)
    learn = LearnableProjection(P.proj)
    cases = [(name, prob, {"teacher_indices": prob.teacher_indices} if prob is P else {}, P.proj)
             for name in ("pkl_loss", "hkl_loss") for prob in (P, dense)] + [("pkl_loss", P, {
                 "teacher_indices": P.teacher_indices}, learn)]
    for name, prob, kw, proj in cases:
        if backend == "native" and prob is P:  # the C++ kernels take dense teachers
            continue
        runs = []
        for dtype in (None, torch.bfloat16, torch.float16):
            z = prob.z.clone().requires_grad_()  # fp32: autocast would lower what the ops compute from it
            learn.zero_grad()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = getattr(xt, name)(z, prob.t, prob.alignment, proj, backend=backend, **kw)
            loss.backward()
            runs.append((loss.detach(), z.grad, None if learn.theta.grad is None else learn.theta.grad.clone()))
        for got in runs[1:]:
            for a, b in zip(runs[0], got):
                assert (a is None and b is None) or torch.equal(a, b), (name, backend, proj is learn)


def test_triton_interpret_set_after_triton_is_imported_is_named(tmp_path):
    """TRITON_INTERPRET=1 set after `import triton` passed the backend check, then every kernel failed inside the
    interpreter ("Cannot call @triton.jit'd outside of the scope of a kernel"). A fresh process: this one's triton
    was imported with the variable set."""
    code = ("import os, triton\nos.environ['TRITON_INTERPRET'] = '1'\nimport xtoken_ext as xt\n"
            "from xtoken_ext.testing import loss_problem\nP = loss_problem(1, 40, 50, 10)\n"
            "try:\n    xt.pkl_loss(P.z, P.t, P.alignment, P.proj, backend='triton')\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)  # outside the checkout: the installed package, with its built extension
    assert "ValueError: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported" \
        in out.stdout, (out.stdout, out.stderr[-2000:])


_FAST = r"""
import json, torch
import xtoken_ext as xt
from xtoken_ext.testing import fast_interpreter, loss_problem
import triton.language as tl
from triton.runtime import interpreter as itp

P = loss_problem(3, 300, 400, 8, hub=40)  # multi-tile rows, a hub column, merged rows
scans = [0]
patch_builtin = itp._patch_builtin
def counted(*args):  # the interpreter's scan of a language module, which each _patch_lang runs
    scans[0] += 1
    return patch_builtin(*args)
itp._patch_builtin = counted
def run():
    out, scans[0] = [], 0
    for name in ("pkl_loss", "hkl_loss", "gold_loss"):
        z = P.z.clone().requires_grad_()
        per = getattr(xt, name)(z, P.t, P.alignment, P.proj, reduction="none", backend="triton", merge="mean")
        (per.double() * P.weights).sum().backward()
        out += [per.detach(), z.grad]
    return out, scans[0]
stock, n_stock = run()
applied = fast_interpreter()
fast, n_fast = run()
print(json.dumps(dict(applied=applied, again=fast_interpreter(), equal=all(torch.equal(a, b) for a, b in
                      zip(stock, fast)), sanitize=itp.interpreter_builder.options.sanitize_overflow,
                      restored=tl.core.is_builtin(tl.program_id), scans=[n_stock, n_fast])))
"""


def test_fast_interpreter_gives_the_stock_interpreters_results(tmp_path):
    """xtoken_ext.testing.fast_interpreter (the suite's conftest and --dry apply it) applies to the pinned Triton, and
    the three fused losses give bit for bit the stock interpreter's losses and gradients (a fresh process: first
    without it, then with it); its two hooks took effect: the overflow check is off, and the helpers' calls no longer
    scan triton.language (the scans counted); after a launch triton.language holds its builtins again."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _FAST], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"] and r["again"] and r["equal"] and r["restored"] and r["sanitize"] is False, r
    stock, fast = r["scans"]
    assert 0 < 20 * fast < stock, r

@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_pkl_teacher_block_below_fp32s_range_at_a_small_temperature(backend):
    """The native kernel sums the KL terms per 512-column block at the block's own maximum and rescales by
    f = e^{(m_b − max)/τ}. At τ = 2^-9 a block 10 logits below the maximum has f = 0, and where its Q is 0 its
    P'·(T' − log Q) and r' = P'/Q are +inf: 0·inf made the loss NaN ("NaN although the rows are finite") and the
    gradient NaN. The block's P is below fp32's range, 0 as in the other backends: the loss is 0 (P = Q = e_0)."""
    V = 600  # one-hot rows onto 600 columns: two blocks of the allowed columns
    proj = Projection(torch.stack([torch.arange(V, dtype=torch.int32)] + [torch.full((V,), -1, dtype=torch.int32)] * 3,
                                  1), torch.eye(1, 4).expand(V, 4), V)
    z, t = torch.zeros(1, 2, V), torch.zeros(1, 2, V)
    z[..., 0] = t[..., 0] = 10.0
    al = xt.Alignment.from_chunks([np.array([[0, 1, 0, 1], [1, 2, 1, 2]])], [np.array([True, True])], [2], [2])
    for tau in (2.0 ** -9, 2.0 ** -20):
        zz = z.clone().requires_grad_()
        loss = xt.pkl_loss(zz, t, al, proj, temperature=tau, backend=backend, reduction="sum")
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.equal(zz.grad, torch.zeros_like(z)), (tau, zz.grad.abs().max())
