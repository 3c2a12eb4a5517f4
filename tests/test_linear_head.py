"""Fused linear-head losses (xt.*_loss_from_hidden) against "materialize the logits, then xt.reference's loss" in
float64, differentiated by autograd wrt the hidden states, the head weight and bias (and θ of a LearnableProjection).

Bounds per entry (fused run in dtype with math roundoff u_m, storage roundoff u_d; the reference gets the same rounded
h, W, b in float64):
  logits  x = h Wᵀ + b: |δx| ≤ γ_{d+1} (|h| |W|ᵀ + |b|) (+ u_d |x| rounded to a 16-bit dtype), γ_n = n u_m/(1 − n u_m);
          z = c·tanh(s x/c): |δz| ≤ |s| |δx| + 4 u' |z|, u' = max(u_m, u_d).
  An argument error δ of the softmaxes is a relative error 2δ/τ of p (and of π for the teacher): helpers' κ (whose
  u_m·κ is that relative error) grows by 2 max|δz|/(τ u_m), and helpers' loss_bound / grad_bound then bound the loss
  and ∂L/∂z (w = the uniform chunk weight: 1 for "sum", 1/count for "mean").
  chain   f = s(1 − y²), y = z/c: |δy| ≤ |δz|/c + 2u_m|y|, |δf| ≤ 2|s y| |δy| + 3u_m |f|;
          |δ∂x| ≤ Bz |f| + |∂z| |δf| + 2u' |∂x|   (Bz: the ∂L/∂z bound).
  matmul  ∂h = ∂x W: |δ∂h| ≤ |δ∂x| |W| + (γ_{V_S} + 2u_d)(|∂x| + |δ∂x|) |W|;  ∂W = Σ_blocks ∂xᵀ h: the same with
          γ_N and h (each block's product rounded to a 16-bit weight dtype once: u_d);  ∂b: Σ_rows, γ_N.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import xtoken_ext as xt
from helpers import LOSSES, check, fails, grad_bound, kappa, loss_bound, math_roundoff, random_alignment, \
    sparse_teacher, store_roundoff
from xtoken_ext import reference as ref
from xtoken_ext.losses import LearnableProjection

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's masked lanes

MERGES = ["mean", "first", "chain"]
TEACHERS = ["dense", "sparse", "hidden"]


def _head(h, W, b, scale, softcap):
    x = h @ W.transpose(-1, -2) + (0 if b is None else b)
    x = x if scale is None else x * scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def make_case(seed, loss_name, merge, teacher, dtype=torch.float32, V_S=31, V_T=37, d=8, bias=None, softcap=None,
              scale=None, B=2, max_chunks=6):
    """Random alignment, hidden states, head and teacher; kw: the loss options both sides get."""
    g = torch.Generator().manual_seed(seed)
    proj = xt.Projection.random(V_S, V_T, seed=seed, empty_rows=0.1, max_pieces=4)
    ali = random_alignment(g, B, max_chunks=max_chunks)
    while ali.row_spans().shape[0] < 3:  # at least 3 valid chunks: no vacuous case
        ali = random_alignment(g, B, max_chunks=max_chunks)
    T_S, T_T = ali.student_chunk_ids.shape[1], ali.teacher_chunk_ids.shape[1]
    h = torch.randn(B, T_S, d, generator=g).to(dtype)
    W = (torch.randn(V_S, d, generator=g) * 1.5 / math.sqrt(d)).to(dtype)
    b = (torch.randn(V_S, generator=g) * 0.5).to(dtype) if (seed % 4 != 0 if bias is None else bias) else None
    kw = dict(merge=merge, temperature=[1.0, 0.7, 2.0][seed % 3], teacher_topk=[None, 20][seed % 2],
              student_ids=torch.randint(0, V_S, (B, T_S), generator=g),
              teacher_ids=torch.randint(0, V_T, (B, T_T), generator=g))
    if loss_name != "pkl_loss":
        kw["uncommon_topk"] = [None, 5][seed % 2]
    head_kw = dict(student_head_bias=b, softcap=softcap, logit_scale=scale)
    if teacher == "hidden":
        th = torch.randn(B, T_T, 6, generator=g).to(dtype)
        tW = (torch.randn(V_T, 6, generator=g) * 2).to(dtype)
        head_kw |= dict(teacher_hidden=th, teacher_head_weight=tW, teacher_softcap=5.0)
        t = _head(th.double(), tW.double(), None, None, 5.0)
        t_fused = None
    elif teacher == "sparse":
        t, kw["teacher_indices"] = sparse_teacher(g, B, T_T, V_T, k=6)
        t_fused = t
    else:
        t = (torch.randn(B, T_T, V_T, generator=g) * 2).to(dtype)
        t_fused = t
    return proj, ali, h, W, b, t, t_fused, kw, head_kw


def reference(loss_name, proj, ali, h, W, b, t, kw, head_kw, reduction="mean", normalizer=None):
    """Float64 loss and gradients wrt (h, W, b) of the materialized path, ∂L/∂z, z."""
    hr, Wr = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()  # new leaves, also in fp64
    br = None if b is None else b.detach().double().requires_grad_()
    z = _head(hr, Wr, br, head_kw.get("logit_scale"), head_kw.get("softcap"))
    z.retain_grad()
    out = getattr(ref, loss_name)(z, t.double(), ali, proj, reduction=reduction, normalizer=normalizer, **kw)
    out.backward()
    return out.detach(), hr.grad, Wr.grad, None if br is None else br.grad, z.grad, z.detach()


def bounds(h, W, b, z, gz, t, V_T, kw, head_kw, dtype, backend, w):
    """Per-entry bounds (module docstring) on the loss and the gradients wrt h, W, b."""
    um, ud = math_roundoff(dtype), store_roundoff(dtype, backend)
    up = max(um, ud)
    h, W = h.double(), W.double()
    gam = lambda n: n * um / (1 - n * um)  # noqa: E731
    s, c, tau = head_kw.get("logit_scale") or 1.0, head_kw.get("softcap"), kw["temperature"]
    x_mag = h.abs() @ W.abs().T + (0 if b is None else b.double().abs())
    dx = gam(h.shape[-1] + 1) * x_mag + (ud * x_mag if dtype != torch.float32 else 0)
    dz = abs(s) * dx + 4 * up * z.abs()
    t_err = 0.0
    if "teacher_hidden" in head_kw:  # the teacher's logits, computed in dtype as well (softcap 5, no bias)
        th, tW = head_kw["teacher_hidden"].double(), head_kw["teacher_head_weight"].double()
        t_mag = th.abs() @ tW.abs().T
        t_err = float((gam(th.shape[-1]) * t_mag + 4 * up * t.abs() + (ud * t_mag if dtype != torch.float32 else 0))
                      .max())
    kap = kappa(z, t, tau, V_T) + 2 * (float(dz.max()) + t_err) / (tau * um)
    bz = grad_bound(gz, z, tau, kap, dtype, backend, w)
    if c is None:
        f, df = torch.full_like(z, s), torch.full_like(z, 3 * um * abs(s))
    else:
        y = z / c
        f = s * (1 - y * y)
        df = 2 * abs(s) * y.abs() * (dz / c + 2 * um * y.abs()) + 3 * um * f.abs()
    gx = gz * f
    bx = bz * f.abs() + gz.abs() * df + 2 * up * gx.abs()
    mag = gx.abs() + bx
    N, V_S = h.reshape(-1, h.shape[-1]).shape[0], W.shape[0]
    b_h = bx @ W.abs() + (gam(V_S) + 2 * ud) * (mag @ W.abs())
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    b_W = flat(bx).T @ flat(h).abs() + (gam(N) + 2 * ud) * (flat(mag).T @ flat(h).abs())
    b_b = flat(bx).sum(0) + (gam(N) + 2 * ud) * flat(mag).sum(0)
    return kap, b_h, b_W, b_b


def run_and_check(key, loss_name, backend, case, dtype, reduction="mean", block_rows=3, normalizer=None):
    proj, ali, h, W, b, t, t_fused, kw, head_kw = case
    hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
    bf = None if b is None else b.clone().requires_grad_()
    fn = getattr(xt, f"{loss_name}_from_hidden").with_excluded
    out, n_exc = fn(hf, Wf, t_fused, ali, proj, reduction=reduction, normalizer=normalizer, block_rows=block_rows,
                    backend=backend, **kw, **(head_kw | dict(student_head_bias=bf)))
    grads = torch.autograd.grad(out, [x for x in (hf, Wf, bf) if x is not None])
    exp, gh, gW, gb, gz, z = reference(loss_name, proj, ali, h, W, b, t, kw, head_kw, reduction, normalizer)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    K = ali.row_spans().shape[0]
    assert K >= 3 and exp != 0 and all(g.abs().sum() > 0 for g in grads)
    w = 1.0 if reduction == "sum" else 1.0 / (normalizer or max(K - int(n_exc), 1))
    kap, b_h, b_W, b_b = bounds(h, W, b, z, gz, t, proj.teacher_vocab_size, kw, head_kw, dtype, backend, w)
    tau = kw["temperature"]
    check(f"{key}/loss", out, exp, loss_bound(exp, tau, kap, dtype) * max(w * K, 1.0))
    for name, got, want, bound in zip(("h", "W", "b"), grads, (gh, gW, gb), (b_h, b_W, b_b)):
        assert got.dtype == dtype and got.shape == want.shape
        check(f"{key}/grad {name}", got, want, bound)
    return out, grads


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_float64_matches_reference(loss_name, merge, teacher):
    """Torch backend in float64, several blocks of whole chunks (block_rows=2, chunks of up to 3 rows), bias,
    softcap and logit scale, dense / sparse / hidden-state teacher, teacher top-k and uncommon top-k."""
    seed = LOSSES.index(loss_name) * 9 + MERGES.index(merge) * 3 + TEACHERS.index(teacher)
    case = make_case(seed, loss_name, merge, teacher, torch.float64, softcap=[None, 3.0][seed % 2],
                     scale=[None, 1.3, None][seed % 3])
    run_and_check("fused/fp64", loss_name, "torch", case, torch.float64, block_rows=2)


BACKEND_CASES = [(b, loss, m) for b in ("native", "torch", "triton") for loss in LOSSES for m in MERGES
                 if b != "triton" or m != "first" or loss in ("pkl_loss", "uld_loss")]


@pytest.mark.parametrize("backend,loss_name,merge", BACKEND_CASES)
def test_float32_backends_match_reference(backend, loss_name, merge):
    """fp32 on every backend (the native kernels take a dense teacher, so they get a dense or a hidden-state one)."""
    seed = 100 + BACKEND_CASES.index((backend, loss_name, merge))
    teacher = ["dense", "hidden"][seed % 2] if backend == "native" else TEACHERS[seed % 3]
    case = make_case(seed, loss_name, merge, teacher, softcap=[None, 3.0][seed % 2], scale=[None, 0.8][seed % 3 == 0])
    run_and_check(f"fused/{backend}/fp32", loss_name, backend, case, torch.float32,
                  reduction=["mean", "sum"][seed % 2])


@pytest.mark.parametrize("backend,loss_name", [("native", "pkl_loss"), ("torch", "hkl_loss")])
def test_bfloat16_matches_reference(backend, loss_name):
    """bf16 hidden states and head: logits, their gradient and the block products rounded to bf16, ∂W and ∂b
    accumulated in fp32 and rounded once."""
    case = make_case(5, loss_name, "mean", "dense", torch.bfloat16, softcap=3.0)
    run_and_check(f"fused/{backend}/bf16", loss_name, backend, case, torch.bfloat16)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_block_size_does_not_change_the_result(loss_name):
    """One row per block (each multi-row chunk a block alone), a few, or everything in one block: the same loss
    and gradients up to rounding (the blocks cut at chunk boundaries)."""
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(3, loss_name, "mean", "dense", torch.float64)
    fn = getattr(xt, f"{loss_name}_from_hidden")
    res = []
    for rows in (1, 4, None):
        hf = h.clone().requires_grad_()
        out = fn(hf, W, t_fused, ali, proj, block_rows=rows, backend="torch", **kw, **head_kw)
        res.append((out, torch.autograd.grad(out, hf)[0]))
    for out, g in res[1:]:
        assert torch.allclose(out, res[0][0], rtol=1e-12, atol=0) and torch.allclose(g, res[0][1], rtol=1e-10,
                                                                                      atol=1e-15)


def test_tied_embeddings_accumulate():
    """The head weight is the input embedding: its gradient is the lookup part plus the head part, as autograd of
    the materialized path gives it."""
    proj, ali, *_ = make_case(1, "pkl_loss", "mean", "dense", torch.float64)
    g = torch.Generator().manual_seed(11)
    B, T_S = ali.student_chunk_ids.shape
    T_T = ali.teacher_chunk_ids.shape[1]
    ids = torch.randint(0, 31, (B, T_S), generator=g)
    E0 = torch.randn(31, 8, generator=g, dtype=torch.float64)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64) / 3
    t = torch.randn(B, T_T, 37, generator=g, dtype=torch.float64) * 2
    grads = []
    for fused in (True, False):
        E = E0.clone().requires_grad_()
        hid = torch.tanh(E[ids] @ A)
        if fused:
            out = xt.pkl_loss_from_hidden(hid, E, t, ali, proj, block_rows=2, backend="torch")
        else:
            out = ref.pkl_loss(hid @ E.T, t, ali, proj)
        grads.append(torch.autograd.grad(out, E)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def _sequence(ali, i):
    """Sequence i of an alignment as a B = 1 alignment."""
    return xt.Alignment(**{f.name: None if (v := getattr(ali, f.name)) is None else v[i:i + 1]
                           for f in dataclasses.fields(ali)})


@pytest.mark.parametrize("loss_name", ["pkl_loss", "gold_loss"])
def test_gradient_accumulation_with_a_global_normalizer(loss_name):
    """Two micro-batches (one sequence each) with normalizer = the valid chunks of both, backward twice into .grad:
    the full batch's "mean" loss and gradients; the same with "sum"."""
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(7, loss_name, "mean", "dense", torch.float64)
    del kw["teacher_topk"]  # a top-k column set is per batch: it would differ between the micro-batches
    fn = getattr(xt, f"{loss_name}_from_hidden")
    n_valid = int(ali.chunk_valid.sum())
    for reduction, normalizer in (("mean", n_valid), ("sum", None)):
        hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
        full = fn(hf, Wf, t_fused, ali, proj, reduction=reduction, backend="torch", **kw, **head_kw)
        full.backward()
        hm, Wm = h.clone().requires_grad_(), W.clone().requires_grad_()
        total = 0.0
        for i in range(2):
            sub_kw = kw | dict(student_ids=kw["student_ids"][i:i + 1], teacher_ids=kw["teacher_ids"][i:i + 1])
            part = fn(hm[i:i + 1], Wm, t_fused[i:i + 1], _sequence(ali, i), proj, reduction=reduction,
                      normalizer=normalizer, backend="torch", **sub_kw, **head_kw)
            part.backward()
            total = total + part.detach()
        assert torch.allclose(total, full.detach(), rtol=1e-12, atol=0)
        assert torch.allclose(hm.grad, hf.grad, rtol=1e-10, atol=1e-15)
        assert torch.allclose(Wm.grad, Wf.grad, rtol=1e-10, atol=1e-15)


def test_the_bounds_reject_broken_gradients():
    """The per-entry bounds are tight enough to fail a gradient without the softcap factor, a ∂W missing one row's
    contribution, and a ∂h whose smaller half of entries is zeroed."""
    case = make_case(2, "pkl_loss", "mean", "dense", softcap=3.0, bias=True)
    proj, ali, h, W, b, t, t_fused, kw, head_kw = case
    _, (gh_f, gW_f, gb_f) = run_and_check("fused/mutation", "pkl_loss", "torch", case, torch.float32)
    _, gh, gW, gb, gz, z = reference("pkl_loss", proj, ali, h, W, b, t, kw, head_kw)
    K = ali.row_spans().shape[0]
    _, b_h, b_W, _ = bounds(h, W, b, z, gz, t, 37, kw, head_kw, torch.float32, "torch", 1 / K)
    assert fails(gz @ W.double(), gh, b_h)  # ∂z W instead of ∂x W
    gx = (gz * (1 - (z / 3.0) ** 2)).reshape(-1, 31)
    r = int(gx.abs().sum(1).argmax())
    assert fails(gW_f.double() - torch.outer(gx[r], h.reshape(-1, 8)[r].double()), gW, b_W)
    nz = gh_f != 0
    small = nz & (gh_f.abs() < gh_f.abs()[nz].median())
    assert int(small.sum()) >= int(nz.sum()) // 2 - 1 and fails(gh_f.masked_fill(small, 0.0), gh, b_h)


def _invalidated(ali, b, k):
    """The alignment with chunk k of sequence b no longer valid."""
    valid = ali.chunk_valid.clone()
    valid[b, k] = False
    return dataclasses.replace(ali, chunk_valid=valid)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nonfinite_rows_raise_or_are_excluded(backend, side):
    """NaN in a hidden row the loss reads (student) or in a teacher row: "raise" names the row like the plain loss;
    "mask" gives the loss and gradients of the alignment without that chunk (the NaN row's ∂h is 0 and ∂W, ∂b
    stay finite)."""
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(4, "pkl_loss", "mean", "dense", torch.float32,
                                                            softcap=3.0, bias=True)
    kw = {k: v for k, v in kw.items() if k != "teacher_topk"}
    bk, k = (int(x) for x in ali.chunk_valid.nonzero()[1])
    j = 1  # that chunk's index in row_spans order
    _, s_lo, _, t_lo, _ = ali.row_spans()[j].tolist()
    h_bad, t_bad = h.clone(), t_fused.clone()
    if side == "student":
        h_bad[bk, s_lo, 3] = math.nan
    else:
        t_bad[bk, t_lo, 5] = math.nan
    name, pos = ("the logits of student_hidden", s_lo) if side == "student" else ("teacher_logits", t_lo)
    with pytest.raises(ValueError, match=f"{name} at batch {bk}, position {pos} holds NaN"):
        xt.pkl_loss_from_hidden(h_bad, W, t_bad, ali, proj, backend=backend, **kw, **head_kw)
    hf, Wf, bf = h_bad.requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()
    out, n_exc = xt.pkl_loss_from_hidden.with_excluded(hf, Wf, t_bad, ali, proj, backend=backend, nonfinite="mask",
                                                       **kw, **(head_kw | dict(student_head_bias=bf)))
    assert int(n_exc) == 1
    got = torch.autograd.grad(out, [hf, Wf, bf])
    h_ok = torch.where(torch.isnan(h_bad.detach()), 0.0, h_bad.detach())
    exp, gh, gW, gb, _, _ = reference("pkl_loss", proj, _invalidated(ali, bk, k), h_ok, W, b, t, kw, head_kw)
    assert torch.allclose(out.double(), exp, rtol=1e-5)
    for g, want in zip(got, (gh, gW, gb)):
        assert torch.isfinite(g).all() and torch.allclose(g.double(), want, rtol=1e-4, atol=1e-7)


def test_torch_compile_around_the_fused_loss():
    """A compiled student (embedding, a layer, tied head) followed by the fused loss, fullgraph=False: the loss runs
    eagerly at a graph break, loss and gradients equal the eager run."""
    proj, ali, _, _, _, t, t_fused, kw, _ = make_case(6, "hkl_loss", "mean", "dense")
    B, T_S = ali.student_chunk_ids.shape
    torch.manual_seed(0)
    emb, layer = torch.nn.Embedding(31, 8), torch.nn.Linear(8, 8)
    ids = torch.randint(0, 31, (B, T_S))

    def step(ids):
        hid = torch.tanh(layer(emb(ids)))
        return xt.hkl_loss_from_hidden(hid, emb.weight, t_fused, ali, proj, softcap=3.0, block_rows=2, **kw)

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=False)):
        out = fn(ids)
        results.append((out, torch.autograd.grad(out, [emb.weight, layer.weight])))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, rtol=1e-6) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-8)
                                                     for a, b in zip(g1, g2))


def test_autocast_does_not_apply_inside():
    """Under autocast the head still runs in the dtype of h and W: the same loss and gradients as without it."""
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(10, "hkl_loss", "mean", "dense", softcap=3.0)
    res = []
    for enabled in (False, True):
        hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = xt.hkl_loss_from_hidden(hf, Wf, t_fused, ali, proj, backend="torch", **kw, **head_kw)
        res.append((out, *torch.autograd.grad(out, [hf, Wf])))
    assert all(torch.equal(a, b) for a, b in zip(*res))


@pytest.mark.parametrize("loss_name,merge", [("pkl_loss", "mean"), ("hkl_loss", "chain")])
def test_autocast_does_not_apply_to_a_hidden_teacher(loss_name, merge):
    """A teacher given as hidden states: the rows read before the blocks (its top-k columns, the chain values) ran
    the teacher head under autocast in bf16 while the blocks ran it in fp32, so the top-k set and the loss changed."""
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(11, loss_name, merge, "hidden", softcap=3.0)
    kw["teacher_topk"] = 10  # seed 11: bf16 teacher rows give another top-10 set (seeds 0-10 do not, for P-KL)
    res = []
    for enabled in (False, True):
        hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = getattr(xt, loss_name + "_from_hidden")(hf, Wf, None, ali, proj, backend="torch", **kw, **head_kw)
        res.append((out, *torch.autograd.grad(out, [hf, Wf])))
    assert all(torch.equal(a, b) for a, b in zip(*res))


def test_nonfinite_hidden_teacher_is_named():
    """The error names what the user passed: a hidden teacher's row, not "teacher_logits"."""
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(4, "pkl_loss", "mean", "hidden", torch.float32)
    kw = {k: v for k, v in kw.items() if k != "teacher_topk"}
    bk = int(ali.chunk_valid.nonzero()[1, 0])
    _, _, _, t_lo, _ = ali.row_spans()[1].tolist()
    head_kw["teacher_hidden"] = head_kw["teacher_hidden"].clone()
    head_kw["teacher_hidden"][bk, t_lo, 0] = math.nan  # (softcap maps inf to a finite logit)
    with pytest.raises(ValueError, match=f"the logits of teacher_hidden at batch {bk}, position {t_lo} holds"):
        xt.pkl_loss_from_hidden(h, W, None, ali, proj, backend="torch", **kw, **head_kw)


def test_learnable_projection_gets_its_gradient():
    """θ of a LearnableProjection gets ∂L/∂θ through the W weights, accumulated over the blocks in θ's dtype (an
    fp32 sum of fp64 block gradients was off by 5e-8 relative)."""
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(8, "pkl_loss", "mean", "dense", torch.float64)
    lp = LearnableProjection(proj).double()
    out = xt.pkl_loss_from_hidden(h, W, t_fused, ali, lp, block_rows=2, backend="torch", **kw, **head_kw)
    (got,) = torch.autograd.grad(out, lp.theta)
    z = _head(h, W, b, head_kw["logit_scale"], head_kw["softcap"])
    (want,) = torch.autograd.grad(ref.pkl_loss(z, t, ali, lp, **kw), lp.theta)
    # fp64 math bound, relative to the largest entry
    bound = 8 * 2.0 ** -53 * kappa(z, t, kw["temperature"]) * (want.abs() + want.abs().max())
    assert want.abs().sum() > 0
    check("fused/fp64/grad θ", got, want, bound)


def test_module_from_hidden_and_evaluation_without_grad():
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(9, "gold_loss", "first", "dense")
    mod = xt.GOLDLoss(proj, temperature=1.5, merge="first")
    fn_kw = dict(temperature=1.5, merge="first", student_head_bias=b)
    assert torch.equal(mod.from_hidden(h, W, t_fused, ali, student_head_bias=b),
                       xt.gold_loss_from_hidden(h, W, t_fused, ali, proj, **fn_kw))
    assert mod.last_excluded.dtype == torch.int64
    hf = h.clone().requires_grad_()
    with_grad = xt.gold_loss_from_hidden(hf, W, t_fused, ali, proj, **fn_kw)
    with torch.no_grad():
        assert torch.equal(xt.gold_loss_from_hidden(hf, W, t_fused, ali, proj, **fn_kw), with_grad.detach())
    with_grad.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        with_grad.backward()
    with pytest.raises(RuntimeError, match="no second derivative"):  # its gradients are constants to autograd
        torch.autograd.grad(xt.gold_loss_from_hidden(hf, W, t_fused, ali, proj, **fn_kw), hf, create_graph=True)


def test_input_validation():
    proj, ali, h, W, b, t, t_fused, kw, head_kw = make_case(0, "pkl_loss", "mean", "dense")
    th = torch.randn(2, t.shape[1], 6)
    bad = [
        (dict(reduction="none"), ValueError, "reduction='none' is not supported"),
        (dict(student_head_weight=W[:, :5]), ValueError, "student_head_weight must be \\[V, d\\] = \\[31, 8\\]"),
        (dict(student_head_weight=W[:30]), ValueError, "student_head_weight must be"),
        (dict(student_head_weight=W.double()), ValueError, "must match student_hidden's dtype"),
        (dict(student_head_bias=torch.zeros(30)), ValueError, "student_head_bias must be a \\[31\\] tensor"),
        (dict(softcap=0.0), ValueError, "softcap must be finite and > 0"),
        (dict(logit_scale=math.inf), ValueError, "logit_scale must be finite and nonzero"),
        (dict(softcap="30"), TypeError, "softcap must be a number"),
        (dict(block_rows=0), ValueError, "block_rows must be >= 1"),
        (dict(block_bytes=0), ValueError, "block_bytes must be an int > 0"),
        (dict(teacher_logits=None), ValueError, "the teacher is needed"),
        (dict(teacher_hidden=th), ValueError, "not both"),
        (dict(teacher_logits=None, teacher_hidden=th), ValueError, "teacher_hidden needs teacher_head_weight"),
        (dict(teacher_logits=None, teacher_hidden=th, teacher_head_weight=torch.randn(36, 6)), ValueError,
         "teacher_head_weight must be \\[V, d\\] = \\[37, 6\\]"),
        (dict(teacher_head_weight=torch.randn(37, 6)), ValueError, "without teacher_hidden"),
        (dict(teacher_head_bias=torch.zeros(37)), ValueError, "teacher_head_bias is given without teacher_hidden"),
        (dict(teacher_softcap=30.0), ValueError, "teacher_softcap is given without teacher_hidden"),
        (dict(teacher_logit_scale=2.0), ValueError, "teacher_logit_scale is given without teacher_hidden"),
        (dict(teacher_logits=t[:, :, :30]), ValueError, "V_T"),
        (dict(student_hidden=h[0]), ValueError, "both"),
        (dict(merge="max"), ValueError, "merge"),
    ]
    for override, exc, msg in bad:
        args = dict(student_hidden=h, student_head_weight=W, teacher_logits=t_fused, alignment=ali, proj=proj) | \
            override
        with pytest.raises(exc, match=msg):
            xt.pkl_loss_from_hidden(**args)
