"""The native C++ backends of xtoken::pkl_rows / xtoken::hkl_rows at the op level: larger vocabularies than the
public-API property tests, shuffled spans, idle rows, chunk scales, W gradients, a small allowed set (the kernel's
compact column space), low-precision rows converted inside the kernels and thread-count independence, against the
float64 reference (bounds from helpers.py)."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xtoken_ext as xt
from helpers import check, examples, grad_bound, kappa, loss_bound, random_alignment
from xtoken_ext import losses as L
from xtoken_ext import reference as ref
from xtoken_ext.ops import hkl as hkl_op
from xtoken_ext.ops import pkl as pkl_op  # registers both xtoken:: ops

pkl_rows, hkl_rows = torch.ops.xtoken.pkl_rows, torch.ops.xtoken.hkl_rows


def native_spy():
    """Counts calls of the native P-KL backend (the op dispatches through pkl._BACKENDS)."""
    spy = mock.MagicMock(wraps=pkl_op._native)
    return mock.patch.dict(pkl_op._BACKENDS, native=spy), spy


@settings(max_examples=examples(30))
@given(seed=st.integers(0, 2 ** 31 - 1), V_S=st.sampled_from([257, 1031]), V_T=st.sampled_from([263, 1049]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       teacher_dtype=st.sampled_from([torch.float32, torch.bfloat16]), merge=st.sampled_from(["mean", "chain"]),
       temperature=st.sampled_from([1.0, 0.6, 2.5]), logit_scale=st.sampled_from([1.0, 6.0]))
def test_native_pkl_large_vocab_matches_reference(seed, V_S, V_T, dtype, teacher_dtype, merge, temperature,
                                                  logit_scale):
    """Wide rows (p down to ~e^-70 at scale 6, τ = 0.6), low-precision inputs converted row by row in the kernel."""
    g = torch.Generator().manual_seed(seed)
    proj = xt.Projection.random(V_S, V_T, seed=seed % 1000, empty_rows=0.1)
    alignment = random_alignment(g, 2, max_chunks=6)
    T_S, T_T = alignment.student_chunk_ids.shape[1], alignment.teacher_chunk_ids.shape[1]
    z = (torch.randn(2, T_S, V_S, generator=g, dtype=torch.float64) * logit_scale).to(dtype)
    t = (torch.randn(2, T_T, V_T, generator=g, dtype=torch.float64) * 2).to(teacher_dtype)
    kw = dict(merge=merge, temperature=temperature, reduction="none",
              student_ids=torch.randint(0, V_S, (2, T_S), generator=g),
              teacher_ids=torch.randint(0, V_T, (2, T_T), generator=g))
    zf, zr = z.clone().requires_grad_(), z.double().requires_grad_()
    patch, spy = native_spy()
    with patch:
        out = xt.pkl_loss(zf, t, alignment, proj, backend="native", **kw)
    assert spy.called
    exp = ref.pkl_loss(zr, t.double(), alignment, proj, **kw)
    if not exp.numel():
        return
    w = torch.rand(exp.shape, generator=g, dtype=torch.float64) + 0.5
    (gf,) = torch.autograd.grad((out * w.float()).sum(), zf)
    (gr,) = torch.autograd.grad((exp * w).sum(), zr)
    kap = kappa(z, t, temperature)
    key = f"native/{str(dtype)[6:]}"
    check(f"{key}/loss (wide)", out, exp.detach(), loss_bound(exp, temperature, kap, dtype))
    check(f"{key}/grad (wide)", gf, gr, grad_bound(gr, z, temperature, kap, dtype, "native", float(w.max())))


def _op_inputs(seed: int, V_S: int = 1031, V_T: int = 1201, K: int = 9):
    """Row-space op inputs: chunks of 1–3 rows per side in shuffled order, idle student rows, a column mask."""
    g = torch.Generator().manual_seed(seed)
    proj = xt.Projection.random(V_S, V_T, seed=seed, empty_rows=0.1)
    sizes = torch.randint(1, 4, (K, 2), generator=g)
    s_end, t_end = torch.cumsum(sizes[:, 0] + 1, 0), torch.cumsum(sizes[:, 1], 0)  # one idle student row each
    spans = torch.stack([s_end - 1 - sizes[:, 0], s_end - 1, t_end - sizes[:, 1], t_end], 1)
    spans = spans[torch.randperm(K, generator=g)]
    z = torch.randn(int(s_end[-1]) + 1, V_S, generator=g) * 3
    t = torch.randn(int(t_end[-1]), V_T, generator=g) * 3
    mask = proj.covered_columns() & (torch.rand(V_T, generator=g) < 0.9)
    chain = -torch.rand(t.shape[0], generator=g) * 3
    scale = torch.rand(K, generator=g) + 0.5
    return z, t, proj, mask, spans, chain, scale


def s_chain(z, merge):
    return -torch.linspace(0, 2, z.shape[0]) if merge == "chain" else None


def _idle(spans, n):
    idle = torch.ones(n, dtype=torch.bool)
    for s_lo, s_hi, _, _ in spans.tolist():
        idle[s_lo:s_hi] = False
    return idle


def _native_vs_float64(label, z, t, proj, mask, spans, tau, merge, eps, chain, scale):
    """The native P-KL op (W gradient on) against the torch op in float64 on the same inputs, per entry within the
    fp32 bounds -> the native (loss, grad, grad_w) and the op's positional arguments."""
    args = (proj.indices, proj.weights, mask, spans, tau, merge, eps, chain, scale, True)
    loss, grad, gw = pkl_rows(z, t, None, *args, "native")
    e_loss, e_grad, e_gw = pkl_rows(z.double(), t.double(), None, proj.indices, proj.weights.double(), *args[2:],
                                    "torch")
    kap = kappa(z, t, tau)
    check(f"native/fp32/op loss{label}", loss, e_loss, loss_bound(e_loss, tau, kap, torch.float32))
    check(f"native/fp32/op grad{label}", grad, e_grad, grad_bound(e_grad, z, tau, kap, torch.float32, "native",
                                                                   float(scale.max())))
    check(f"native/fp32/op grad_w{label}", gw, e_gw,
          8 * 2.0 ** -24 * kap * (e_gw.abs() + 2 * 0.64 * 1.5 * 0.25 * 9))
    return (loss, grad, gw), args


@pytest.mark.parametrize("merge", ["mean", "first", "chain"])
@pytest.mark.parametrize("eps", [0.0, 1e-10])
def test_native_pkl_op_matches_float64_torch_op(merge, eps):
    """chunk_scale, grad_w, shuffled spans, idle rows (their gradient rows must be written as zeros)."""
    z, t, proj, mask, spans, chain, scale = _op_inputs(1)
    (_, grad, _), _ = _native_vs_float64("", z, t, proj, mask, spans, 0.8, merge, eps, chain, scale)
    idle = _idle(spans, z.shape[0])
    assert idle.any() and torch.equal(grad[idle], torch.zeros_like(grad[idle]))


@pytest.mark.parametrize("merge", ["mean", "chain"])
def test_native_ops_are_bitwise_independent_of_thread_count(merge):
    z, t, proj, mask, spans, chain, scale = _op_inputs(2, K=23)
    cs, ct = proj.common_pairs("relaxed")
    outs = []
    for threads in (1, 2, 3, 8):
        with mock.patch.object(torch, "get_num_threads", return_value=threads):
            outs.append(pkl_rows(z, t, None, proj.indices, proj.weights, mask, spans, 1.3, merge, 0.0, chain, scale,
                                 True, "native")
                        + hkl_rows(z, t, None, mask, spans, 1.3, merge, s_chain(z, merge), chain, cs, ct, 50, "native"))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_native_kernel_rejects_bad_spans():
    z, t, proj, mask, spans, _, _ = _op_inputs(3)
    bad = {"two chunks": torch.cat([spans, spans[:1]]), "out of range": spans + z.shape[0],
           "empty": torch.tensor([[0, 0, 0, 1]])}
    for msg, sp in bad.items():
        with pytest.raises(ValueError, match=msg):
            pkl_rows(z, t, None, proj.indices, proj.weights, mask, sp, 1.0, "mean", 0.0, None, None, False, "native")


@pytest.mark.parametrize("merge", ["mean", "chain"])
@pytest.mark.parametrize("eps", [0.0, 1e-10])
def test_native_op_no_allowed_column_is_zero_like_torch_op(merge, eps):
    """A = ∅ (e.g. teacher_topk outside the covered columns): loss 0, zero gradients, as the torch backend gives."""
    z, t, proj, _, spans, chain, scale = _op_inputs(4)
    mask = torch.zeros(t.shape[1], dtype=torch.bool)
    args = (proj.indices, proj.weights, mask, spans, 1.0, merge, eps, chain, scale, True)
    for backend in ("native", "torch"):
        for out in pkl_rows(z, t, None, *args, backend):
            assert torch.equal(out, torch.zeros_like(out))
        for out in hkl_rows(z, t, None, mask, spans, 1.0, merge, s_chain(z, merge),
                            chain, *proj.common_pairs("relaxed"), None, backend):
            assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("merge", ["mean", "first", "chain"])
@pytest.mark.parametrize("uncommon_topk", [None, 0, 37])
def test_native_hkl_op_matches_float64_torch_op(merge, uncommon_topk):
    """Shuffled spans, idle rows, a column mask, chain scalars on both sides; every student row is one shared
    permutation of the vocab plus a small jitter, so any merge keeps a strict order of e^S (no sorted-L1 ties)."""
    z, t, proj, mask, spans, t_chain, _ = _op_inputs(5)
    g = torch.Generator().manual_seed(6)
    V_S = z.shape[1]
    perm = torch.argsort(torch.rand(V_S, generator=g)).float()
    z = (perm * 8 + torch.randint(-3, 4, z.shape, generator=g) - 4 * V_S) / 256
    s_chain = -torch.rand(z.shape[0], generator=g) * 3
    cs, ct = proj.common_pairs("relaxed")
    args = (mask, spans, 0.8, merge, s_chain if merge == "chain" else None, t_chain, cs, ct, uncommon_topk)
    got = hkl_rows(z, t, None, *args, "native")
    want = hkl_rows(z.double(), t.double(), None, *args, "torch")
    kap = kappa(z, t, 0.8)
    check("native/fp32/op hkl loss", got[0], want[0], loss_bound(want[0], 0.8, kap, torch.float32))
    check("native/fp32/op hkl grad", got[1], want[1], grad_bound(want[1], z, 0.8, kap, torch.float32, "native"))
    check("native/fp32/op hkl grad_chain", got[2], want[2], loss_bound(want[2], 0.8, kap, torch.float32))
    idle = _idle(spans, z.shape[0])
    assert idle.any() and torch.equal(got[1][idle], torch.zeros_like(got[1][idle]))


@pytest.mark.parametrize("merge", ["mean", "first", "chain"])
@pytest.mark.parametrize("eps", [0.0, 1e-10])
@pytest.mark.parametrize("keep", [0.03, 0.45])
def test_native_pkl_small_allowed_set_matches_float64_torch_op(merge, eps, keep):
    """A holding at most half of the teacher columns (teacher_topk) runs the kernel in A's compact column space:
    same contract, W gradient included, rows with no slot in A included."""
    z, t, proj, _, spans, chain, scale = _op_inputs(7, V_T=1499)
    mask = proj.covered_columns() & (torch.rand(t.shape[1], generator=torch.Generator().manual_seed(8)) < keep)
    out, args = _native_vs_float64(" (small A)", z, t, proj, mask, spans, 0.8, merge, eps, chain, scale)
    for threads in (1, 3):
        with mock.patch.object(torch, "get_num_threads", return_value=threads):
            again = pkl_rows(z, t, None, *args, "native")
        assert all(torch.equal(a, b) for a, b in zip(out, again))


@pytest.mark.parametrize("keep", [1.0, 0.45])
def test_native_pkl_wide_teacher_crosses_projection_blocks(keep):
    """V_T beyond the kernel's 8,192-column projection block, with all columns or (keep 0.45) a compact column
    space of more than 8,192 allowed columns."""
    z, t, proj, _, spans, chain, scale = _op_inputs(11, V_S=24_000, V_T=20_011, K=5)
    mask = proj.covered_columns() & (torch.rand(t.shape[1], generator=torch.Generator().manual_seed(12)) < keep)
    _native_vs_float64(" (wide)", z, t, proj, mask, spans, 1.0, "mean", 0.0, chain, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep", [1.0, 0.1])
def test_native_low_precision_rows_are_the_fp32_computation_rounded(dtype, teacher_dtype, keep):
    """bf16 / fp16 logits are converted row by row inside the kernels (no fp32 copy): the loss is bitwise the one
    of the same values in fp32, and the gradient is that fp32 gradient rounded to nearest even (as torch rounds).
    Logit scale 6 puts gradient entries down to fp16's subnormal range."""
    z, t, proj, _, spans, chain, scale = _op_inputs(9, V_T=1201)
    z, t = (z * 2).to(dtype), t.to(teacher_dtype)
    mask = proj.covered_columns() & (torch.rand(t.shape[1], generator=torch.Generator().manual_seed(10)) < keep)
    for merge in ("mean", "chain"):
        args = (proj.indices, proj.weights, mask, spans, 1.3, merge, 0.0, chain, scale, True, "native")
        low, ref32 = pkl_rows(z, t, None, *args), pkl_rows(z.float(), t.float(), None, *args)
        assert torch.equal(low[0], ref32[0]) and torch.equal(low[2], ref32[2])
        assert low[1].dtype == dtype and torch.equal(low[1], ref32[1].to(dtype))
        cs, ct = proj.common_pairs("relaxed")
        h_args = (mask, spans, 1.3, merge, s_chain(z, merge), chain, cs, ct, 50)
        low = hkl_op._native(z, t, None, *h_args)  # the op sends only fp32 to this kernel so far
        ref32 = hkl_op._native(z.float(), t.float(), None, *h_args)
        assert torch.equal(low[0], ref32[0]) and torch.equal(low[2], ref32[2])
        assert low[1].dtype == dtype and torch.equal(low[1], ref32[1].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 37, 4000, 9001, 20_000])
def test_native_teacher_topk_ranking_is_the_stable_sort_of_the_torch_column_max(dtype, k):
    """teacher_topk's columns of a dense CPU teacher (C++: column max over the rows read in place, O(V) selection)
    and of the torch path: the same mask as the first k of a stable descending sort of the max over the listed
    rows, with rows holding NaN or +inf ignored. Integer logits make many ties (broken by the lower id); −inf
    entries and an all-−inf column included; the same for every thread count (rows cut into runs per thread)."""
    g = torch.Generator().manual_seed(13)
    t = torch.randint(-40, 40, (30, 9001), generator=g).float()
    t[torch.rand(t.shape, generator=g) < 0.05] = -math.inf
    t[:, 17] = -math.inf
    t[3, 5], t[11, 8000], t[20, 40] = math.nan, math.inf, math.nan  # these rows are ignored
    t = t.to(dtype)
    rows = torch.tensor([0, 1, 3, 4, 7, 11, 12, 19, 20, 25, 29])
    good = rows[~L.nonfinite_rows(t[rows], False)]
    imp = t[good].float().amax(0)
    want = torch.zeros(t.shape[1], dtype=torch.bool)
    want[torch.sort(imp, descending=True, stable=True).indices[:k]] = True
    fetch = L._fetch_rows(t, None)
    assert fetch.dense is t
    for threads in (1, 2, 3):
        with mock.patch.object(torch, "get_num_threads", return_value=threads):
            assert torch.equal(L._topk_columns(fetch, rows, t.shape[1], k, torch.float32, "cpu"), want)
    torch_path = lambda r: fetch(r)  # noqa: E731  (no .dense: the block-wise torch path)
    assert torch.equal(L._topk_columns(torch_path, rows, t.shape[1], k, torch.float64, "cpu"), want)
    # every row bad: all maxima −inf, the k lowest ids
    assert torch.equal(L._topk_columns(fetch, torch.tensor([3, 11]), t.shape[1], k, torch.float32, "cpu"),
                       torch.arange(t.shape[1]) < k)
    with pytest.raises(ValueError, match="rows must lie in"):
        L._topk_columns(fetch, torch.tensor([0, 30]), t.shape[1], k, torch.float32, "cpu")
