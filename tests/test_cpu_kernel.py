"""The native CPU P-KL kernel (csrc/losses.cpp, reached through ops.fallback.pkl_rows) against xt.reference.

Tolerances are the ones derived in test_losses.py (fp32 math: atol = 16·V·2⁻²⁴·(1 + max |reference|); a bf16 /
fp16 gradient is additionally rounded twice, 2u relative, plus fp16's flush of values below 2⁻²⁴); the reference
runs in float64 on the same quantized inputs.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xtoken_ext as xt
from xtoken_ext import reference as ref
from xtoken_ext.losses import LearnableProjection
from xtoken_ext.ops import fallback

from test_losses import FLUSH, UNIT_ROUNDOFF, fp32_atol  # the tolerances derived there
from test_losses import random_alignment as alignment


def native_spy():
    return mock.patch.object(fallback, "_pkl_rows_native", wraps=fallback._pkl_rows_native)


case = st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "V_S": st.sampled_from([7, 13, 31, 257, 1031]),
    "V_T": st.sampled_from([5, 17, 41, 263, 1049]),
    "B": st.integers(1, 3),
    "dtype": st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
    "teacher_dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "merge": st.sampled_from(["mean", "first", "chain"]),
    "uncovered": st.sampled_from(["renormalize", "epsilon"]),
    "teacher_topk": st.sampled_from([None, None, 3]),
    "temperature": st.sampled_from([1.0, 0.6, 2.5]),
    "empty_rows": st.sampled_from([0.0, 0.3, 0.9]),
    "logit_scale": st.sampled_from([1.0, 3.0, 6.0]),  # 6, τ = 0.6: p down to ~e^-70 (fp32 range)
    "small_blocks": st.booleans(),  # low-precision inputs: one chunk per converted block
})


@settings(max_examples=60)
@given(c=case)
def test_native_pkl_matches_reference(c):
    g = torch.Generator().manual_seed(c["seed"])
    V_S, V_T, B, dtype = c["V_S"], c["V_T"], c["B"], c["dtype"]
    proj = xt.Projection.random(V_S, V_T, seed=c["seed"] % 1000, empty_rows=c["empty_rows"])
    batch = alignment(g, B, max_chunks=6)
    T_S, T_T = batch.student_chunk_ids.shape[1], batch.teacher_chunk_ids.shape[1]
    z = (torch.randn(B, T_S, V_S, generator=g, dtype=torch.float64) * c["logit_scale"]).to(dtype)
    t = (torch.randn(B, T_T, V_T, generator=g, dtype=torch.float64) * 2).to(c["teacher_dtype"])
    kw = dict(merge=c["merge"], uncovered=c["uncovered"], teacher_topk=c["teacher_topk"],
              temperature=c["temperature"], reduction="none",
              student_ids=torch.randint(0, V_S, (B, T_S), generator=g),
              teacher_ids=torch.randint(0, V_T, (B, T_T), generator=g))
    zf, zr = z.clone().requires_grad_(), z.double().requires_grad_()
    block = 1 if c["small_blocks"] else fallback._NATIVE_BLOCK_BYTES
    with native_spy() as spy, mock.patch.object(fallback, "_NATIVE_BLOCK_BYTES", block):
        out = xt.pkl_loss(zf, t, batch, proj, **kw)
    assert spy.called
    exp = ref.pkl_loss(zr, t.double(), batch, proj, **kw)
    assert out.dtype == torch.float32 and out.shape == exp.shape
    assert torch.equal(torch.isfinite(out), torch.isfinite(exp))
    if not torch.isfinite(exp).all():  # e.g. all student mass on empty rows under "renormalize": both inf
        return
    V = max(V_S, V_T)
    if exp.numel():
        assert (out.double() - exp).abs().max().item() <= fp32_atol(V, float(exp.detach().abs().max()))
    v = torch.rand(exp.shape, generator=g, dtype=torch.float64) + 0.5  # grad_output != 1
    (gf,) = torch.autograd.grad((out * v.float()).sum(), zf, allow_unused=True)
    (gr,) = torch.autograd.grad((exp * v).sum(), zr, allow_unused=True)
    gf = torch.zeros_like(z) if gf is None else gf
    gr = torch.zeros_like(zr) if gr is None else gr
    assert gf.dtype == dtype
    err = (gf.double() - gr).abs()
    bound = 2 * UNIT_ROUNDOFF[dtype] * gr.abs() + fp32_atol(V, float(gr.abs().max())) + FLUSH[dtype]
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, max excess {(err - bound).max().item():.3e}"


@settings(max_examples=25)
@given(seed=st.integers(0, 2 ** 31 - 1), merge=st.sampled_from(["mean", "first", "chain"]),
       uncovered=st.sampled_from(["renormalize", "epsilon"]), temperature=st.sampled_from([1.0, 1.7]))
def test_native_grad_w_and_chunk_scale_match_reference(seed, merge, uncovered, temperature):
    """A learnable W: backward reruns the kernel with chunk_scale = d loss_k and need_grad_w."""
    g = torch.Generator().manual_seed(seed)
    V_S, V_T = 61, 67
    base = xt.Projection.random(V_S, V_T, seed=seed % 1000, empty_rows=0.2)
    batch = alignment(g, 2, max_chunks=5)
    T_S, T_T = batch.student_chunk_ids.shape[1], batch.teacher_chunk_ids.shape[1]
    z = torch.randn(2, T_S, V_S, generator=g) * 2
    t = torch.randn(2, T_T, V_T, generator=g) * 2
    kw = dict(merge=merge, uncovered=uncovered, temperature=temperature, reduction="none",
              student_ids=torch.randint(0, V_S, (2, T_S), generator=g),
              teacher_ids=torch.randint(0, V_T, (2, T_T), generator=g))
    lp_fast, lp_ref = LearnableProjection(base), LearnableProjection(base)
    with torch.no_grad():  # off the log-init, so the softmax Jacobian of θ is non-trivial
        noise = torch.randn(V_S, 4, generator=g)
        lp_fast.theta += noise
        lp_ref.theta += noise
    zf, zr = z.clone().requires_grad_(), z.double().requires_grad_()
    with native_spy() as spy:
        a = xt.pkl_loss(zf, t, batch, lp_fast, **kw)
        v = torch.rand(a.shape, generator=g) + 0.5
        (a * v).sum().backward()
    b = ref.pkl_loss(zr, t.double(), batch, lp_ref, **kw)
    (b * v.double()).sum().backward()
    assert spy.call_count == 2  # forward, then backward with chunk_scale and grad_w
    V = max(V_S, V_T)
    if a.numel():
        assert (a.double() - b).abs().max().item() <= fp32_atol(V, float(b.detach().abs().max()))
    for got, want in ((zf.grad, zr.grad), (lp_fast.theta.grad, lp_ref.theta.grad)):
        assert got is not None and want is not None
        assert (got.double() - want).abs().max().item() <= fp32_atol(V, float(want.abs().max()))


def _op_inputs(seed: int, V_S: int = 1031, V_T: int = 1201, K: int = 9):
    """Row-space op inputs: chunks of 1–3 rows per side in shuffled order, rows outside every chunk, a mask."""
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


@pytest.mark.parametrize("merge", ["mean", "first", "chain"])
@pytest.mark.parametrize("eps", [0.0, 1e-10])
def test_native_op_matches_float64_torch_op(merge, eps):
    """Op level (chunk_scale, grad_w, shuffled spans, idle rows) against the torch op in float64."""
    z, t, proj, mask, spans, chain, scale = _op_inputs(1)
    args = (proj.indices, proj.weights, mask, spans, 0.8, merge, eps)
    assert fallback.native_pkl_applies(z, None)
    with native_spy() as spy:
        loss, grad, gw = fallback.pkl_rows(z, t, None, *args, None, chain, False, True, scale)
    assert spy.called
    e_loss, e_grad, e_gw = fallback._pkl_rows_torch(z.double(), t.double(), None, proj.indices,
                                                   proj.weights.double(), *args[2:], chain, True, scale)
    V = max(z.shape[1], t.shape[1])
    for got, want in ((loss, e_loss), (grad, e_grad), (gw, e_gw)):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= fp32_atol(V, float(want.abs().max()))
    idle = torch.ones(z.shape[0], dtype=torch.bool)
    for s_lo, s_hi, _, _ in spans.tolist():
        idle[s_lo:s_hi] = False
    assert idle.any() and torch.equal(grad[idle], torch.zeros_like(grad[idle]))  # torch.empty rows were zeroed


@pytest.mark.parametrize("merge", ["mean", "chain"])
def test_native_op_is_bitwise_independent_of_thread_count(merge):
    z, t, proj, mask, spans, chain, scale = _op_inputs(2, K=23)
    outs = []
    for threads in (1, 2, 3, 8):
        with mock.patch.object(torch, "get_num_threads", return_value=threads):
            outs.append(fallback._pkl_rows_native(z, t, proj.indices, proj.weights, mask, spans, 1.3, merge, 0.0,
                                                  chain, True, scale))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_native_kernel_rejects_bad_spans():
    z, t, proj, mask, spans, chain, scale = _op_inputs(3)
    bad = {"two chunks": torch.cat([spans, spans[:1]]), "out of range": spans + z.shape[0],
           "empty": torch.tensor([[0, 0, 0, 1]])}
    for msg, sp in bad.items():
        with pytest.raises(ValueError, match=msg):
            fallback._pkl_rows_native(z, t, proj.indices, proj.weights, mask, sp, 1.0, "mean", 0.0, None, False,
                                      None)


@pytest.mark.parametrize("merge", ["mean", "chain"])
@pytest.mark.parametrize("eps", [0.0, 1e-10])
def test_native_op_no_allowed_column_is_zero_like_torch_op(merge, eps):
    """A = ∅ (e.g. teacher_topk outside the covered columns): loss 0, zero gradients, as the torch op gives."""
    z, t, proj, _, spans, chain, scale = _op_inputs(4)
    mask = torch.zeros(t.shape[1], dtype=torch.bool)
    args = (proj.indices, proj.weights, mask, spans, 1.0, merge, eps, chain, True, scale)
    got = fallback._pkl_rows_native(z, t, *args)
    want = fallback._pkl_rows_torch(z, t, None, *args)
    for a, b in zip(got, want):
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))


def _hkl_op_inputs(seed: int, V_S: int = 1031, V_T: int = 1201, K: int = 9):
    """H-KL op inputs: as _op_inputs, but every student row is one shared permutation of the vocab (gap 8/256)
    plus a jitter of at most ±3/256, so any merge keeps a strict order of e^S (no ties in the sorted-L1)."""
    z, t, proj, mask, spans, chain, _ = _op_inputs(seed, V_S, V_T, K)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.argsort(torch.rand(V_S, generator=g)).float()
    z = (perm * 8 + torch.randint(-3, 4, z.shape, generator=g) - 4 * V_S) / 256
    cs, ct = proj.common_pairs("relaxed")
    keep = mask[ct]
    s_chain = -torch.rand(z.shape[0], generator=g) * 3
    return z, t, mask, spans, s_chain, chain, cs[keep], ct[keep]


def hkl_spy():
    return mock.patch.object(fallback, "_hkl_rows_native", wraps=fallback._hkl_rows_native)


@pytest.mark.parametrize("merge", ["mean", "first", "chain"])
@pytest.mark.parametrize("uncommon_topk", [None, 0, 37])
def test_native_hkl_op_matches_float64_torch_op(merge, uncommon_topk):
    """Op level (shuffled spans, idle rows, a column mask, chain scalars on both sides) against the torch op in
    float64: loss, student gradient and the chain-scalar gradient."""
    z, t, mask, spans, s_chain, t_chain, cs, ct = _hkl_op_inputs(5)
    args = (mask, spans, 0.8, merge, s_chain, t_chain, False, cs, ct, uncommon_topk)
    with hkl_spy() as spy:
        got = fallback.hkl_rows(z, t, None, *args, want_grad_chain=True)
    assert spy.called
    want = fallback.hkl_rows(z.double(), t.double(), None, *args, want_grad_chain=True)
    V = max(z.shape[1], t.shape[1])
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max().item() <= fp32_atol(V, float(b.abs().max()))
    idle = torch.ones(z.shape[0], dtype=torch.bool)
    for s_lo, s_hi, _, _ in spans.tolist():
        idle[s_lo:s_hi] = False
    assert idle.any() and torch.equal(got[1][idle], torch.zeros_like(got[1][idle]))


@pytest.mark.parametrize("merge", ["mean", "chain"])
def test_native_hkl_op_is_bitwise_independent_of_thread_count(merge):
    z, t, mask, spans, s_chain, t_chain, cs, ct = _hkl_op_inputs(6, K=23)
    outs = []
    for threads in (1, 2, 3, 8):
        with mock.patch.object(torch, "get_num_threads", return_value=threads):
            outs.append(fallback._hkl_rows_native(z, t, mask, spans, 1.3, merge, s_chain, t_chain, cs, ct, 50))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_native_hkl_op_no_allowed_column_is_like_torch_op():
    """A = ∅ (so m = 0 and no common pairs): loss 0, zero gradients, as the torch op gives."""
    z, t, _, spans, s_chain, t_chain, cs, ct = _hkl_op_inputs(7)
    mask = torch.zeros(t.shape[1], dtype=torch.bool)
    args = (mask, spans, 1.0, "mean", s_chain, t_chain, cs[:0], ct[:0], None)
    got = fallback._hkl_rows_native(z, t, *args)
    want = fallback._hkl_rows_torch(z.double(), t.double(), None, *args)
    for a, b in zip(got, want):
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))
