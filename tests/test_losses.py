"""Property tests: xt.*_loss (chunked fallback ops) against xt.reference, values and gradients, every option.

Tolerances (derived, per dtype of the student logits; the reference runs in float64 on the same quantized values):
- fp32 math in the op: each loss / gradient entry is a sum of ≤ V terms, so its error is ≤ c·V·2⁻²⁴ times the
  sum of the magnitudes involved; we use atol = 16·V·2⁻²⁴·(1 + scale) with scale = max |reference| (c = 16 covers
  exp/log ulps and the two-pass normalizations).
- bf16 / fp16 gradients are rounded twice (forward output, then the per-chunk rescale in backward): relative error
  ≤ 2u with u = 2⁻⁸ (bf16, 8 significant bits) or 2⁻¹¹ (fp16); fp16 also flushes values below its subnormal
  spacing 2⁻²⁴ (absolute error ≤ 2⁻²⁵). Loss values stay fp32 math, so they use the fp32 bound.
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import xtoken_ext as xt
from xtoken_ext import reference as ref
from xtoken_ext.losses import LearnableProjection
from xtoken_ext.ops import fallback

LOSSES = ["pkl_loss", "hkl_loss", "gold_loss", "uld_loss"]
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FLUSH = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -25}


def fp32_atol(V: int, scale: float) -> float:
    return 16 * V * 2.0 ** -24 * (1.0 + scale)


def random_alignment(g: torch.Generator, B: int, max_chunks: int, max_len: int = 3):
    """Random chunkings (1-to-many, many-to-1, gaps, incorrect chunks) of B sequence pairs -> xt.Alignment."""
    chunks_list, correct_list, s_lens, t_lens = [], [], [], []
    for _ in range(B):
        K = int(torch.randint(1, max_chunks + 1, (), generator=g))
        chunks, correct, s, t = [], [], 0, 0
        for _ in range(K):
            ns, nt = (int(x) for x in torch.randint(0, max_len + 1, (2,), generator=g))
            if ns == nt == 0:
                ns = nt = 1
            chunks.append((s, s + ns, t, t + nt))
            correct.append(bool(torch.rand((), generator=g) < 0.85))
            s, t = s + ns, t + nt
        chunks_list.append(chunks)
        correct_list.append(correct)
        s_lens.append(s)
        t_lens.append(t)
    T_S, T_T = max(s_lens) + 1, max(t_lens) + 1  # one padding row at least
    return xt.Alignment.from_chunks(chunks_list, correct_list, s_lens, t_lens, T_S=T_S, T_T=T_T)


def distinct_logits(g: torch.Generator, shape, dtype, shared_order: bool) -> torch.Tensor:
    """Logits exact in bf16/fp16 (integers < 256 times 2⁻⁵) with distinct values in every row.

    shared_order: every row of a sequence is one permutation of the vocab (gap 8 units) plus a per-row jitter of at
    most ±3 units, so any mean over rows keeps that strict order: no ties in the sorted-L1, whose gradient is not
    defined at ties. Otherwise each row has its own permutation (fine for P-KL)."""
    B, T, V = shape
    order_shape = (B, 1, V) if shared_order else shape
    perm = torch.argsort(torch.rand(order_shape, generator=g), dim=-1).expand(shape).to(torch.float64)
    jitter = torch.randint(-3, 4, shape, generator=g).to(torch.float64) if shared_order else 0.0
    return ((perm * 8 + jitter - 4 * V) * 2.0 ** -5).to(dtype)


def sparse_teacher(g: torch.Generator, B: int, T: int, V_T: int, k: int):
    idx = torch.argsort(torch.rand(B, T, V_T, generator=g), dim=-1)[..., :k]
    lp = torch.log_softmax(torch.randn(B, T, k, generator=g, dtype=torch.float64) * 2, -1)
    return lp.float(), idx


case = st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "V_S": st.sampled_from([7, 11, 13, 29, 31]),
    "V_T": st.sampled_from([5, 13, 17, 37, 41]),
    "B": st.integers(1, 2),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    "merge": st.sampled_from(["mean", "first", "chain"]),
    "uncovered": st.sampled_from(["renormalize", "epsilon"]),
    "teacher_topk": st.sampled_from([None, None, 3, 6]),
    "uncommon_topk": st.sampled_from([None, None, 0, 2]),
    "temperature": st.sampled_from([1.0, 1.0, 0.7, 2.5]),
    "sparse": st.sampled_from([False, False, True]),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "empty_rows": st.sampled_from([0.0, 0.3]),
    "one_row_blocks": st.booleans(),  # force the fallback's multi-block path (blocks of one chunk each)
})


@pytest.mark.parametrize("loss_name", LOSSES)
@given(c=case)
def test_fallback_matches_reference(loss_name, c):
    g = torch.Generator().manual_seed(c["seed"])
    V_S, V_T, B, dtype = c["V_S"], c["V_T"], c["B"], c["dtype"]
    proj = xt.Projection.random(V_S, V_T, seed=c["seed"] % 1000, empty_rows=c["empty_rows"],
                                max_pieces=min(4, V_T))
    batch = random_alignment(g, B, max_chunks=5)
    T_S, T_T = batch.student_chunk_ids.shape[1], batch.teacher_chunk_ids.shape[1]
    z = distinct_logits(g, (B, T_S, V_S), dtype, shared_order=loss_name != "pkl_loss")
    kw = dict(merge=c["merge"], uncovered=c["uncovered"], teacher_topk=c["teacher_topk"],
              uncommon_topk=c["uncommon_topk"], temperature=c["temperature"], reduction=c["reduction"],
              student_ids=torch.randint(0, V_S, (B, T_S), generator=g),
              teacher_ids=torch.randint(0, V_T, (B, T_T), generator=g))
    if c["sparse"]:
        t, kw["teacher_indices"] = sparse_teacher(g, B, T_T, V_T, k=min(4, V_T))
    else:
        t = (torch.randn(B, T_T, V_T, generator=g) * 2).to(dtype)
    zf = z.clone().requires_grad_()
    zr = z.double().requires_grad_()
    with mock.patch.object(fallback, "_SCRATCH_BYTES", 1 if c["one_row_blocks"] else fallback._SCRATCH_BYTES):
        out = getattr(xt, loss_name)(zf, t, batch, proj, **kw)
    exp = getattr(ref, loss_name)(zr, t.double(), batch, proj, **kw)
    assert out.shape == exp.shape
    assert torch.isfinite(out).all() == torch.isfinite(exp).all()
    if not torch.isfinite(exp).all():  # e.g. an all-mass-on-empty-rows student under "renormalize": both inf
        return
    V = max(V_S, V_T)
    tol = fp32_atol(V, float(exp.detach().abs().max()) if exp.numel() else 0.0)
    assert (out.double() - exp).abs().max().item() <= tol if exp.numel() else True
    # grad_output != 1: a random weight per chunk ("none") or a scalar
    v = torch.rand(exp.shape, generator=g, dtype=torch.float64) + 0.5
    (gf,) = torch.autograd.grad((out * v.to(out.dtype)).sum(), zf, allow_unused=True)
    (gr,) = torch.autograd.grad((exp * v).sum(), zr, allow_unused=True)
    gf = torch.zeros_like(z) if gf is None else gf
    gr = torch.zeros_like(zr) if gr is None else gr
    assert gf.dtype == dtype
    scale = float(gr.abs().max())
    err = (gf.double() - gr).abs()
    bound = 2 * UNIT_ROUNDOFF[dtype] * gr.abs() + fp32_atol(V, scale) + FLUSH[dtype]
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, max excess {(err - bound).max().item():.3e}"


@settings(max_examples=30)
@given(seed=st.integers(0, 2 ** 31 - 1), merge=st.sampled_from(["mean", "first", "chain"]),
       reduction=st.sampled_from(["mean", "none"]))
def test_learnable_projection_grad_matches_reference(seed, merge, reduction):
    g = torch.Generator().manual_seed(seed)
    V_S, V_T = 11, 13
    base = xt.Projection.random(V_S, V_T, seed=seed % 1000, empty_rows=0.2)
    batch = random_alignment(g, 2, max_chunks=4)
    assume(batch.row_spans().shape[0] > 0)  # θ needs a valid chunk to receive a gradient
    T_S, T_T = batch.student_chunk_ids.shape[1], batch.teacher_chunk_ids.shape[1]
    z = torch.randn(2, T_S, V_S, generator=g, dtype=torch.float64)
    t = torch.randn(2, T_T, V_T, generator=g, dtype=torch.float64)
    ids = dict(student_ids=torch.randint(0, V_S, (2, T_S), generator=g),
               teacher_ids=torch.randint(0, V_T, (2, T_T), generator=g))
    lp_fast, lp_ref = LearnableProjection(base), LearnableProjection(base)
    with torch.no_grad():  # move θ off its log-init so the softmax Jacobian is non-trivial
        noise = torch.randn(V_S, 4, generator=g)
        lp_fast.theta += noise
        lp_ref.theta += noise
    a = xt.pkl_loss(z, t, batch, lp_fast, merge=merge, reduction=reduction, **ids)
    b = ref.pkl_loss(z, t, batch, lp_ref, merge=merge, reduction=reduction, **ids)
    v = torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5
    (a * v).sum().backward()
    (b * v).sum().backward()
    assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    # w_val is fp32 inside the op, so θ's gradient carries fp32 rounding of W
    assert torch.allclose(lp_fast.theta.grad, lp_ref.theta.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss_name", LOSSES)
@settings(max_examples=25)
@given(seed=st.integers(0, 2 ** 31 - 1), side=st.sampled_from(["student", "teacher"]))
def test_invariant_to_row_constant(loss_name, seed, side):
    g = torch.Generator().manual_seed(seed)
    proj = xt.Projection.random(13, 17, seed=seed % 1000, empty_rows=0.2)
    batch = random_alignment(g, 2, max_chunks=5)
    z = torch.randn(2, batch.student_chunk_ids.shape[1], 13, generator=g)
    t = torch.randn(2, batch.teacher_chunk_ids.shape[1], 17, generator=g)
    shift = torch.randn(*(z if side == "student" else t).shape[:2], 1, generator=g) * 20
    z2, t2 = (z + shift, t) if side == "student" else (z, t + shift)
    fn = getattr(xt, loss_name)
    a, b = fn(z, t, batch, proj, reduction="none"), fn(z2, t2, batch, proj, reduction="none")
    assert torch.allclose(a, b, atol=fp32_atol(17, 1.0) * 25)  # |shift| ~ 20 costs ~log2(20) bits of fp32


@given(seed=st.integers(0, 2 ** 31 - 1), merge=st.sampled_from(["mean", "first", "chain"]),
       temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_pkl_nonnegative_for_one_row_chunks(seed, merge, temperature):
    g = torch.Generator().manual_seed(seed)
    proj = xt.Projection.random(13, 17, seed=seed % 1000, empty_rows=0.3)
    n = 6  # 1-to-1 chunks: P is a normalized distribution over A, Q too -> a true KL
    batch = xt.Alignment.from_chunks([[(i, i + 1, i, i + 1) for i in range(n)]], [[True] * n], [n], [n])
    z = torch.randn(1, n, 13, generator=g) * 3
    t = torch.randn(1, n, 17, generator=g) * 3
    ids = torch.zeros(1, n, dtype=torch.long)
    out = xt.pkl_loss(z, t, batch, proj, temperature, reduction="none", merge=merge, student_ids=ids, teacher_ids=ids)
    assert out.numel() == n - 1 and (out >= -fp32_atol(17, 1.0)).all()


@given(seed=st.integers(0, 2 ** 31 - 1), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_pkl_is_plain_kl_for_identity_w(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    V = 19
    proj = xt.Projection(torch.cat([torch.arange(V).unsqueeze(1), torch.full((V, 3), -1)], 1),
                         torch.cat([torch.ones(V, 1), torch.zeros(V, 3)], 1), V)
    n = 5
    batch = xt.Alignment.from_chunks([[(i, i + 1, i, i + 1) for i in range(n)]], [[True] * n], [n], [n])
    z = torch.randn(1, n, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(1, n, V, generator=g, dtype=torch.float64) * 2
    out = xt.pkl_loss(z, t, batch, proj, temperature, reduction="none")
    lt, ls = torch.log_softmax(t[0, :-1] / temperature, -1), torch.log_softmax(z[0, :-1] / temperature, -1)
    plain = temperature ** 2 * (lt.exp() * (lt - ls)).sum(-1)
    assert torch.allclose(out, plain, atol=1e-12)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_reductions_and_normalizer(loss_name):
    g = torch.Generator().manual_seed(3)
    proj = xt.Projection.random(11, 13, seed=3)
    batch = random_alignment(g, 2, max_chunks=6)
    z = torch.randn(2, batch.student_chunk_ids.shape[1], 11, generator=g, requires_grad=True)
    t = torch.randn(2, batch.teacher_chunk_ids.shape[1], 13, generator=g)
    fn = getattr(xt, loss_name)
    per = fn(z, t, batch, proj, reduction="none")
    assert per.shape == (batch.row_spans().shape[0],)
    assert torch.allclose(fn(z, t, batch, proj, reduction="sum"), per.sum())
    assert torch.allclose(fn(z, t, batch, proj), per.mean())
    # a global normalizer (e.g. valid chunks over all ranks): two half-batches summed == one batch
    assert torch.allclose(fn(z, t, batch, proj, normalizer=per.numel() * 4), per.sum() / (per.numel() * 4))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_no_valid_chunk_is_zero_with_zero_grad(loss_name):
    proj = xt.Projection.random(7, 5, seed=0)
    batch = xt.Alignment.from_chunks([[(0, 2, 0, 0), (2, 2, 0, 3)]], [[True, True]], [2], [3])  # gaps only
    z = torch.randn(1, 2, 7, requires_grad=True)
    t = torch.randn(1, 3, 5)
    fn = getattr(xt, loss_name)
    for reduction in ("mean", "sum"):
        out = fn(z, t, batch, proj, reduction=reduction)
        (gz,) = torch.autograd.grad(out, z)
        assert out.item() == 0.0 and torch.equal(gz, torch.zeros_like(z))
    assert fn(z, t, batch, proj, reduction="none").shape == (0,)


def test_flattened_rows_match_batched():
    g = torch.Generator().manual_seed(5)
    proj = xt.Projection.random(11, 13, seed=5)
    batch = random_alignment(g, 1, max_chunks=6)
    z = torch.randn(1, batch.student_chunk_ids.shape[1], 11, generator=g)
    t = torch.randn(1, batch.teacher_chunk_ids.shape[1], 13, generator=g)
    assert torch.equal(xt.pkl_loss(z, t, batch, proj, reduction="none"),
                       xt.pkl_loss(z[0], t[0], batch, proj, reduction="none"))


def test_input_validation():
    proj = xt.Projection.random(7, 5, seed=0)
    batch = xt.Alignment.from_chunks([[(0, 1, 0, 1), (1, 2, 1, 2)]], [[True, True]], [2], [2])
    z, t = torch.randn(1, 2, 7), torch.randn(1, 2, 5)
    bad = [
        (dict(student_logits=torch.randn(1, 2, 8)), "V_S"),
        (dict(teacher_logits=torch.randn(1, 2, 6)), "V_T"),
        (dict(student_logits=torch.randn(2, 2, 7), teacher_logits=torch.randn(2, 2, 5)), "sequences"),
        (dict(teacher_logits=torch.randn(2, 5)), "both"),
        (dict(student_logits=torch.zeros(1, 2, 7, dtype=torch.long)), "floating"),
        (dict(reduction="avg"), "reduction"),
        (dict(merge="max"), "merge"),
        (dict(uncovered="drop"), "uncovered"),
        (dict(merge="chain"), "student_ids"),
        (dict(temperature=0.0), "temperature"),
        (dict(teacher_indices=torch.zeros(1, 2, 3, dtype=torch.long)), "teacher_indices"),
    ]
    for override, msg in bad:
        args = dict(student_logits=z, teacher_logits=t, batch=batch, proj=proj) | override
        with pytest.raises(ValueError, match=msg):
            xt.pkl_loss(**args)
    with pytest.raises(ValueError, match="pkl_loss only"):
        xt.hkl_loss(z, t, batch, LearnableProjection(proj))


def _op_args(g, sparse, merge):
    V_S, V_T = 11, 13
    proj = xt.Projection.random(V_S, V_T, seed=1, empty_rows=0.2)
    spans = torch.tensor([[0, 1, 0, 2], [1, 3, 2, 3], [4, 5, 3, 5]])
    s = torch.randn(5, V_S, generator=g, requires_grad=True)
    if sparse:
        t_cols = torch.argsort(torch.rand(5, V_T, generator=g), 1)[:, :4]
        t_vals = torch.log_softmax(torch.randn(5, 4, generator=g), 1)
    else:
        t_cols, t_vals = None, torch.randn(5, V_T, generator=g)
    mask = proj.covered_columns()
    chain = torch.randn(5, generator=g) if merge == "chain" else None
    return proj, s, t_vals, t_cols, mask, spans, chain


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("merge", ["mean", "chain"])
def test_opcheck_custom_ops(sparse, merge):
    g = torch.Generator().manual_seed(0)
    proj, s, t_vals, t_cols, mask, spans, chain = _op_args(g, sparse, merge)
    w_val = proj.weights.clone().requires_grad_()
    for need_grad_w, w in ((False, proj.weights), (True, w_val)):
        torch.library.opcheck(torch.ops.xtoken.pkl_rows_fallback.default,
                              (s, t_vals, t_cols, proj.indices, w, mask, spans, 1.3, merge, 0.0, chain, None,
                               need_grad_w))
    cs, ct = proj.common_pairs("relaxed")
    keep = mask[ct]
    s_chain = None if chain is None else chain.clone().requires_grad_()
    torch.library.opcheck(torch.ops.xtoken.hkl_rows_fallback.default,
                          (s, t_vals, t_cols, mask, spans, 1.3, merge, s_chain, chain, cs[keep], ct[keep], None))


def test_torch_compile_traces_fallback_op():
    g = torch.Generator().manual_seed(1)
    proj = xt.Projection.random(11, 13, seed=1)
    batch = random_alignment(g, 2, max_chunks=4)
    z = torch.randn(2, batch.student_chunk_ids.shape[1], 11, generator=g, requires_grad=True)
    t = torch.randn(2, batch.teacher_chunk_ids.shape[1], 13, generator=g)
    spans = torch.cat([batch.row_spans()[:, 1:3] + batch.row_spans()[:, :1] * z.shape[1],
                       batch.row_spans()[:, 3:5] + batch.row_spans()[:, :1] * t.shape[1]], 1)
    args = (t.reshape(-1, 13), None, proj.indices, proj.weights, proj.covered_columns(), spans, 1.0, "mean", 0.0)

    def f(x):
        return fallback.pkl_rows_autograd(x.reshape(-1, 11), *args).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (g1,) = torch.autograd.grad(compiled(z), z)
    (g2,) = torch.autograd.grad(f(z), z)
    assert torch.allclose(g1, g2) and math.isfinite(float(compiled(z).detach()))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_force_triton_dispatch_matches_reference(loss_name, monkeypatch):
    """XTOKEN_FORCE_TRITON=1 routes CPU tensors through the Triton ops (interpreter when no GPU)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("XTOKEN_FORCE_TRITON", "1")
    g = torch.Generator().manual_seed(0)
    proj = xt.Projection.random(11, 13, seed=0, empty_rows=0.2)
    batch = random_alignment(g, 2, max_chunks=4)
    z = torch.randn(2, batch.student_chunk_ids.shape[1], 11, generator=g, requires_grad=True)
    t = torch.randn(2, batch.teacher_chunk_ids.shape[1], 13, generator=g)
    out = getattr(xt, loss_name)(z, t, batch, proj, reduction="none")
    assert "xtoken_pkl_rows_default" in out.grad_fn.name() or "xtoken_hkl_rows_default" in out.grad_fn.name()
    exp = getattr(ref, loss_name)(z.double(), t.double(), batch, proj, reduction="none")
    (gf,) = torch.autograd.grad(out.sum(), z)
    (gr,) = torch.autograd.grad(exp.sum(), z)
    assert torch.allclose(out.double(), exp, atol=fp32_atol(13, 1.0))
    assert torch.allclose(gf, gr, atol=fp32_atol(13, float(gr.abs().max())))  # both wrt the fp32 z
