"""Public losses (xt.pkl_loss / hkl_loss / gold_loss / uld_loss) on every backend × loss × dtype against
xt.reference in float64 on the same rounded inputs, with the per-entry bounds derived in helpers.py; options,
reductions, validation, nn.Module forms, custom-op checks (opcheck, torch.compile, one backward per forward)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings

import xtoken_ext as xt
from helpers import BACKENDS, DTYPES, LOSSES, api_case, check, device, distinct_logits, examples, fails, grad_bound, \
    kappa, loss_bound, make_problem, random_alignment, sparse_teacher
from xtoken_ext import reference as ref
from xtoken_ext.losses import LearnableProjection
from xtoken_ext.testing import loss_problem

# Masked lanes of the Triton interpreter evaluate log(0), 0·inf, ... in numpy before tl.where discards them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def native_ok(loss_name, dtype, sparse):
    """Where the C++ kernels apply: dense teacher; P-KL fp32/bf16/fp16, H-KL family fp32."""
    return not sparse and (loss_name == "pkl_loss" or dtype == torch.float32)


def run_case(c, loss_name, backend, dtype, w_scale=1.0):
    """One public-API problem: -> (out, gf, exp, gr, z, t, kw); out/gf from ``backend`` on ``dtype`` logits, exp/gr
    from the float64 reference on the same rounded values, gradients of Σ_k w_k loss_k (w ≠ 1)."""
    g = torch.Generator().manual_seed(c["seed"])
    V_S, V_T, B = c["V_S"], c["V_T"], c["B"]
    if loss_name != "pkl_loss" and dtype != torch.float32:
        V_S = min(V_S, 31)  # shared-order logits stay exact (so tie-free) in bf16/fp16 up to 4·V_S ≤ 128 units
    proj = xt.Projection.random(V_S, V_T, seed=c["seed"] % 1000, empty_rows=c["empty_rows"],
                                max_pieces=min(4, V_T))
    alignment = random_alignment(g, B, max_chunks=5)
    T_S, T_T = alignment.student_chunk_ids.shape[1], alignment.teacher_chunk_ids.shape[1]
    z = distinct_logits(g, (B, T_S, V_S), dtype, shared_order=loss_name != "pkl_loss")
    kw = dict(merge=c["merge"], uncovered=c["uncovered"], teacher_topk=c["teacher_topk"],
              temperature=c["temperature"], reduction="none",
              student_ids=torch.randint(0, V_S, (B, T_S), generator=g),
              teacher_ids=torch.randint(0, V_T, (B, T_T), generator=g))
    if loss_name != "pkl_loss" and c["uncommon_topk"] != "default":
        kw["uncommon_topk"] = c["uncommon_topk"]
    if c["sparse"]:
        t, kw["teacher_indices"] = sparse_teacher(g, B, T_T, V_T, k=min(4, V_T))
    else:
        t = (torch.randn(B, T_T, V_T, generator=g) * 2).to(dtype)
    dev = device()
    zf = z.to(dev).requires_grad_()
    dkw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = getattr(xt, loss_name)(zf, t.to(dev), alignment, proj, backend=backend, **dkw)
    zr = z.double().requires_grad_()
    exp = getattr(ref, loss_name)(zr, t.double(), alignment, proj, **kw)
    w = (torch.rand(exp.shape, generator=g, dtype=torch.float64) + 0.5) * w_scale
    gf = torch.autograd.grad((out * w.to(dev, out.dtype)).sum(), zf, allow_unused=True)[0] if out.numel() else None
    gr = torch.autograd.grad((exp * w).sum(), zr, allow_unused=True)[0] if exp.numel() else None
    gf = torch.zeros_like(zf) if gf is None else gf
    gr = torch.zeros_like(zr) if gr is None else gr
    return out.cpu(), gf.cpu(), exp.detach(), gr, z, t, kw, float(w.max()) if w.numel() else 1.0


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, loss_name, dtype):
    """Hypothesis over options and shapes; the Triton interpreter is slow, so it takes fewer, smaller cases
    (tests/test_triton_ops.py adds the multi-tile ones)."""
    dt = DTYPES[dtype]

    @settings(max_examples=examples(8 if backend == "triton" else 40))
    @given(c=api_case)
    def case(c):
        if backend == "native" and not native_ok(loss_name, dt, c["sparse"]):
            with pytest.raises(ValueError, match="backend='native'"):
                run_case(c, loss_name, backend, dt)
            return
        if backend == "triton":
            assume(c["V_S"] <= 97 and c["V_T"] <= 101)
        out, gf, exp, gr, z, t, kw, w_max = run_case(c, loss_name, backend, dt)
        assert out.shape == exp.shape and out.dtype == torch.float32 and gf.dtype == dt
        # Chunks with no projected student mass (e.g. all of it on empty W rows under "renormalize"): excluded, 0
        # with no gradient on both sides; with no teacher mass on A as well: loss 0, zero gradient (policy).
        tau = kw["temperature"]
        kap = kappa(z, t, tau)
        key = f"{backend}/{dtype}"
        check(f"{key}/loss", out, exp, loss_bound(exp, tau, kap, dt))
        check(f"{key}/grad", gf, gr, grad_bound(gr, z, tau, kap, dt, backend, w_max))

    case()


@pytest.mark.parametrize("backend,loss_name,dtype", [
    (b, loss, d) for b in BACKENDS for loss in ("pkl_loss", "hkl_loss") for d in ("fp32", "bf16")
    if native_ok(loss, DTYPES[d], False) or b != "native"])  # the C++ H-KL kernel takes fp32 only
def test_mutation_zeroing_small_gradient_entries_fails(backend, loss_name, dtype):
    """The per-entry bound rejects a gradient whose 90 % smallest nonzero entries are zeroed (a 'broken kernel')."""
    dt = DTYPES[dtype]
    c = dict(seed=7, V_S=97 if dt == torch.float32 or loss_name == "pkl_loss" else 31, V_T=101, B=2, merge="mean",
             uncovered="renormalize", teacher_topk=None, uncommon_topk="default", temperature=1.0, sparse=False,
             empty_rows=0.0)
    out, gf, exp, gr, z, t, kw, w_max = run_case(c, loss_name, backend, dt)
    bound = grad_bound(gr, z, 1.0, kappa(z, t, 1.0), dt, backend, w_max)
    assert not fails(gf, gr, bound)
    nz = gf != 0
    cut = gf.double().abs()[nz].quantile(0.9)
    broken = torch.where(gf.double().abs() < cut, torch.zeros_like(gf), gf)
    assert int((broken != gf).sum()) > 0.85 * int(nz.sum()) and fails(broken, gr, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_projection_grad_matches_reference(backend):
    settings(max_examples=examples(4 if backend == "triton" else 15))(given(c=api_case)(_learnable_case))(backend)


def _learnable_case(backend, c):
    if backend == "triton":
        assume(c["V_S"] <= 97 and c["V_T"] <= 101)
    if backend == "native":
        assume(not c["sparse"])
    g = torch.Generator().manual_seed(c["seed"])
    V_S, V_T = c["V_S"], c["V_T"]
    base = xt.Projection.random(V_S, V_T, seed=c["seed"] % 1000, empty_rows=0.2, max_pieces=min(4, V_T))
    alignment = random_alignment(g, 2, max_chunks=4)
    assume(alignment.row_spans().shape[0] > 0)  # θ needs a valid chunk to receive a gradient
    T_S, T_T = alignment.student_chunk_ids.shape[1], alignment.teacher_chunk_ids.shape[1]
    z = torch.randn(2, T_S, V_S, generator=g)
    t = torch.randn(2, T_T, V_T, generator=g)
    kw = dict(merge=c["merge"], uncovered=c["uncovered"], temperature=c["temperature"], reduction="none",
              student_ids=torch.randint(0, V_S, (2, T_S), generator=g),
              teacher_ids=torch.randint(0, V_T, (2, T_T), generator=g))
    lp_fast, lp_ref = LearnableProjection(base), LearnableProjection(base)
    with torch.no_grad():  # move θ off its log-init so the softmax Jacobian is non-trivial
        noise = torch.randn(V_S, 4, generator=g)
        lp_fast.theta += noise
        lp_ref.theta += noise
    zf, zr = z.clone().requires_grad_(), z.double().requires_grad_()
    a = xt.pkl_loss(zf, t, alignment, lp_fast, backend=backend, **kw)
    b = ref.pkl_loss(zr, t.double(), alignment, lp_ref, **kw)
    v = torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5
    (a * v.float()).sum().backward()
    (b * v).sum().backward()
    tau = kw["temperature"]
    kap = kappa(z, t, tau)
    check(f"{backend}/fp32/loss (learnable W)", a, b.detach(), loss_bound(b, tau, kap, torch.float32))
    check(f"{backend}/fp32/grad (learnable W)", zf.grad, zr.grad,
          grad_bound(zr.grad, z, tau, kap, torch.float32, backend, float(v.max())))
    # θ's gradient: Σ over chunks of p̄_s G[col] terms (each ≤ 2τ² by the bound in helpers.py) through W's softmax
    # (no chunk with teacher and student mass, e.g. every chain scalar −inf: no gradient reaches θ, None = 0)
    gt, gt_ref = (torch.zeros_like(lp.theta, dtype=torch.float64) if lp.theta.grad is None else lp.theta.grad.double()
                  for lp in (lp_fast, lp_ref))
    bound = 8 * 2.0 ** -24 * kap * (gt_ref.abs() + 2 * tau * tau * float(v.max()) * 0.25 * b.numel())
    check(f"{backend}/fp32/grad_theta", gt, gt_ref, bound)


def test_learnable_w_state_dict_of_another_w_is_refused():
    """load_state_dict took another W's indices and support while base (covered columns, projection()) stayed this
    W's: every chunk then had teacher mass where Q = 0, and the loss was silently 0 (or an IndexError for another
    V_T). Now such a state dict is refused; this W's own loads and trains on."""
    a, b = xt.Projection.random(50, 40, seed=1), xt.Projection.random(50, 40, seed=2, empty_rows=0.3)
    la = LearnableProjection(a)
    for other in (b, xt.Projection.random(50, 41, seed=1), xt.Projection.random(51, 40, seed=1)):
        with pytest.raises(ValueError, match="a LearnableProjection on another W"):
            la.load_state_dict(LearnableProjection(other).state_dict())
    mine = LearnableProjection(a)
    with torch.no_grad():
        mine.theta.add_(torch.randn(mine.theta.shape, generator=torch.Generator().manual_seed(0)))
    la.load_state_dict(mine.state_dict())
    assert torch.equal(la.theta, mine.theta) and torch.equal(la.weights, mine.weights)


def test_learnable_w_keeps_float64_gradients_in_float64():
    """fp64 logits and a learnable W: backward reruns the op with the incoming gradient as its chunk scale, which
    stays float64 (rounded to fp32 it cost the student gradient 8 digits: 9e-9 relative where 2e-16 is due), and
    so does W's gradient (it was fp32 too)."""
    g = torch.Generator().manual_seed(3)
    proj = xt.Projection.random(7, 5, seed=0)
    alignment = xt.Alignment.from_chunks([[(0, 1, 0, 1), (1, 2, 1, 2)], [(0, 1, 0, 1), (1, 3, 1, 3)]],
                                         [[True, True], [True, True]], [2, 3], [2, 3], T_S=3, T_T=3)
    z = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    v = torch.tensor([1 / 3, 0.1, math.pi], dtype=torch.float64)[:alignment.row_spans().shape[0]]
    lp, lp_ref = LearnableProjection(proj).double(), LearnableProjection(proj).double()
    zf, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    a = xt.pkl_loss(zf, t, alignment, lp, reduction="none", backend="torch", temperature=0.7)
    b = ref.pkl_loss(zr, t, alignment, lp_ref, reduction="none", temperature=0.7)
    (a * v).sum().backward()
    (b * v).sum().backward()
    kap = kappa(z, t, 0.7)
    check("torch/fp64/grad (learnable W)", zf.grad, zr.grad,
          grad_bound(zr.grad, z, 0.7, kap, torch.float64, "torch", float(v.max())))
    assert lp.theta.grad.dtype == torch.float64
    check("torch/fp64/grad_theta", lp.theta.grad, lp_ref.theta.grad,
          8 * 2.0 ** -53 * kap * (lp_ref.theta.grad.abs() + 2 * 0.49 * float(v.max()) * 0.25 * b.numel()))


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_invariant_to_row_constant(loss_name, side):
    g = torch.Generator().manual_seed(11)
    proj = xt.Projection.random(13, 17, seed=11, empty_rows=0.2)
    alignment = random_alignment(g, 2, max_chunks=5)
    z = torch.randn(2, alignment.student_chunk_ids.shape[1], 13, generator=g, dtype=torch.float64)
    t = torch.randn(2, alignment.teacher_chunk_ids.shape[1], 17, generator=g, dtype=torch.float64)
    shift = torch.randn(*(z if side == "student" else t).shape[:2], 1, generator=g, dtype=torch.float64) * 20
    z2, t2 = (z + shift, t) if side == "student" else (z, t + shift)
    fn = getattr(xt, loss_name)
    a, b = fn(z, t, alignment, proj, reduction="none"), fn(z2, t2, alignment, proj, reduction="none")
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("merge", ["mean", "first", "chain"])
def test_pkl_nonnegative_for_one_row_chunks(backend, merge):
    g = torch.Generator().manual_seed(5)
    proj = xt.Projection.random(13, 17, seed=5, empty_rows=0.3)
    n = 6  # 1-to-1 chunks: P is a normalized distribution over A, Q too -> a true KL
    alignment = xt.Alignment.from_chunks([[(i, i + 1, i, i + 1) for i in range(n)]], [[True] * n], [n], [n])
    z, t = torch.randn(1, n, 13, generator=g) * 3, torch.randn(1, n, 17, generator=g) * 3
    ids = torch.zeros(1, n, dtype=torch.long)
    out = xt.pkl_loss(z, t, alignment, proj, 0.7, reduction="none", merge=merge, student_ids=ids, teacher_ids=ids,
                      backend=backend)
    assert out.numel() == n - 1 and (out >= -1e-6).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_pkl_is_plain_kl_for_identity_w(temperature):
    g = torch.Generator().manual_seed(3)
    V, n = 19, 5
    proj = xt.Projection(torch.cat([torch.arange(V).unsqueeze(1), torch.full((V, 3), -1)], 1),
                         torch.cat([torch.ones(V, 1), torch.zeros(V, 3)], 1), V)
    alignment = xt.Alignment.from_chunks([[(i, i + 1, i, i + 1) for i in range(n)]], [[True] * n], [n], [n])
    z = torch.randn(1, n, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(1, n, V, generator=g, dtype=torch.float64) * 2
    out = xt.pkl_loss(z, t, alignment, proj, temperature, reduction="none")
    lt, ls = torch.log_softmax(t[0, :-1] / temperature, -1), torch.log_softmax(z[0, :-1] / temperature, -1)
    assert torch.allclose(out, temperature ** 2 * (lt.exp() * (lt - ls)).sum(-1), atol=1e-12)


def small_inputs(seed: int, B: int, max_chunks: int, grad: bool = True):
    """(proj 11 -> 13, alignment of B sequences, student logits [B, T_S, 11] (requiring grad), teacher logits)."""
    g = torch.Generator().manual_seed(seed)
    proj = xt.Projection.random(11, 13, seed=seed)
    alignment = random_alignment(g, B, max_chunks=max_chunks)
    z = torch.randn(B, alignment.student_chunk_ids.shape[1], 11, generator=g, requires_grad=grad)
    t = torch.randn(B, alignment.teacher_chunk_ids.shape[1], 13, generator=g)
    return proj, alignment, z, t


@pytest.mark.parametrize("loss_name", LOSSES)
def test_reductions_and_normalizer(loss_name):
    proj, alignment, z, t = small_inputs(3, 2, 6)
    fn = getattr(xt, loss_name)
    per = fn(z, t, alignment, proj, reduction="none")
    assert per.shape == (alignment.row_spans().shape[0],)
    assert torch.allclose(fn(z, t, alignment, proj, reduction="sum"), per.sum())
    assert torch.allclose(fn(z, t, alignment, proj), per.mean())
    # a global normalizer (e.g. valid chunks over all ranks): two half-batches summed == one batch
    assert torch.allclose(fn(z, t, alignment, proj, normalizer=per.numel() * 4), per.sum() / (per.numel() * 4))
    # a [1] or float64 tensor normalizer gave a [1] or float64 loss
    for n in (torch.tensor([7.0]), torch.tensor([[7.0]]), torch.tensor(7.0, dtype=torch.float64)):
        out = fn(z, t, alignment, proj, normalizer=n)
        assert out.shape == () and out.dtype == torch.float32 and torch.allclose(out, per.sum() / 7)


def test_xtoken_backend_sets_the_default_backend(monkeypatch):
    """$XTOKEN_BACKEND was read only by the ops, which the losses always passed "auto": it changed nothing, and a bad
    value passed silently. It sets the default (backend=None); an explicit backend= wins."""
    from xtoken_ext.ops import pkl as pk

    proj, alignment, z, t = small_inputs(3, 2, 6)
    used = []

    def logged(name, run):
        return lambda *a, **k: used.append(name) or run(*a, **k)

    for name in ("native", "torch"):
        monkeypatch.setitem(pk._BACKENDS, name, logged(name, pk._BACKENDS[name]))
    monkeypatch.setenv("XTOKEN_BACKEND", "torch")
    want = xt.pkl_loss(z, t, alignment, proj)
    assert used == ["torch"]
    torch.testing.assert_close(xt.pkl_loss(z, t, alignment, proj, backend="native"), want)
    assert used == ["torch", "native"]
    monkeypatch.setenv("XTOKEN_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$XTOKEN_BACKEND must be one of"):
        xt.pkl_loss(z, t, alignment, proj)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_no_valid_chunk_is_zero_with_zero_grad(loss_name, backend):
    proj = xt.Projection.random(7, 5, seed=0)
    alignment = xt.Alignment.from_chunks([[(0, 2, 0, 0), (2, 2, 0, 3)]], [[True, True]], [2], [3])  # gaps only
    z = torch.randn(1, 2, 7, requires_grad=True)
    t = torch.randn(1, 3, 5)
    fn = getattr(xt, loss_name)
    for reduction in ("mean", "sum"):
        out = fn(z, t, alignment, proj, reduction=reduction, backend=backend)
        (gz,) = torch.autograd.grad(out, z)
        assert out.item() == 0.0 and torch.equal(gz, torch.zeros_like(z))
    assert fn(z, t, alignment, proj, reduction="none", backend=backend).shape == (0,)


def test_flattened_rows_match_batched():
    proj, alignment, z, t = small_inputs(5, 1, 6, grad=False)
    assert torch.equal(xt.pkl_loss(z, t, alignment, proj, reduction="none"),
                       xt.pkl_loss(z[0], t[0], alignment, proj, reduction="none"))


def test_input_validation():
    proj = xt.Projection.random(7, 5, seed=0)
    alignment = xt.Alignment.from_chunks([[(0, 1, 0, 1), (1, 2, 1, 2)]], [[True, True]], [2], [2])
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
        (dict(backend="cuda"), "backend"),
        (dict(uncommon_topk=3), "uncommon_topk"),
        (dict(alignment=object()), "xt.Alignment"),
    ]
    for override, msg in bad:
        args = dict(student_logits=z, teacher_logits=t, alignment=alignment, proj=proj) | override
        with pytest.raises(ValueError, match=msg):
            xt.pkl_loss(**args)
    with pytest.raises(ValueError, match="pkl_loss only"):
        xt.hkl_loss(z, t, alignment, LearnableProjection(proj))
    with pytest.raises(ValueError, match="backend='native'"):  # sparse teacher: no native kernel
        xt.hkl_loss(z, t.log_softmax(-1)[..., :3], alignment, proj, teacher_indices=torch.arange(3).expand(1, 2, 3),
                    backend="native")


def test_module_forms_match_functions():
    proj, alignment, z, t = small_inputs(2, 2, 4, grad=False)
    for cls, fn in ((xt.PKLLoss, xt.pkl_loss), (xt.HKLLoss, xt.hkl_loss), (xt.GOLDLoss, xt.gold_loss),
                    (xt.ULDLoss, xt.uld_loss)):
        mod = cls(proj, temperature=1.5, merge="first")
        assert torch.equal(mod(z, t, alignment), fn(z, t, alignment, proj, temperature=1.5, merge="first"))
        assert torch.equal(mod(z, t, alignment, reduction="sum"),
                           fn(z, t, alignment, proj, temperature=1.5, merge="first", reduction="sum"))
        assert "temperature=1.5" in repr(mod)
    lp = LearnableProjection(proj)
    assert [p for p in xt.PKLLoss(lp).parameters()] == [lp.theta]  # a learnable W trains with the module


@pytest.mark.parametrize("op", ["pkl", "hkl"])
def test_one_backward_per_forward(op):
    """backward scales the saved gradient in place; a second backward through the graph is refused clearly."""
    proj, alignment, z, t = small_inputs(0, 1, 4)
    out = getattr(xt, f"{op}_loss")(z, t, alignment, proj)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        out.backward()


@pytest.mark.parametrize("op, learnable", [("pkl", False), ("pkl", True), ("hkl", False), ("gold", False),
                                          ("uld", False)])
def test_gradients_are_constants(op, learnable):
    """The ops' gradient is a forward output, a constant to autograd: create_graph=True raises (a second derivative
    through it would be silently 0), and a plain autograd.grad returns gradients that do not require grad (they
    used to, as leaves)."""
    p = loss_problem(5, 12, 14, 6, batch=1)
    proj = LearnableProjection(p.proj) if learnable else p.proj
    x = p.z.clone().requires_grad_()
    wrt = [x, proj.theta] if learnable else [x]
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(getattr(xt, f"{op}_loss")(x, p.t, p.alignment, proj), wrt, create_graph=True)
    grads = torch.autograd.grad(getattr(xt, f"{op}_loss")(x, p.t, p.alignment, proj), wrt)
    assert all(not g.requires_grad and bool(g.isfinite().all()) and bool(g.ne(0).any()) for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# the custom ops themselves
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,sparse", [(b, sp) for b in BACKENDS for sp in (False, True)
                                            if not (b == "native" and sp)])  # no native kernel for a sparse teacher
def test_opcheck_custom_ops(backend, sparse):
    P = make_problem(5, 23, 29, 3, 2, 6 if sparse else 0, "covered", 0.1, False)
    z = P.z.requires_grad_()
    w_val = P.w_val.clone().requires_grad_()
    cs, ct = P.proj.common_pairs("relaxed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for merge in ("mean", "chain"):
            for need_grad_w, w in ((False, P.w_val), (True, w_val)):
                torch.library.opcheck(torch.ops.xtoken.pkl_rows.default,
                                      (z, P.t, P.t_cols, P.w_idx, w, P.col_mask, P.spans, 1.3, merge, 0.0,
                                       P.t_chain, None, need_grad_w, backend))
            s_chain = P.s_chain.clone().requires_grad_() if merge == "chain" else None
            torch.library.opcheck(torch.ops.xtoken.hkl_rows.default,
                                  (z, P.t, P.t_cols, P.col_mask, P.spans, 0.8, merge, s_chain, P.t_chain, cs, ct, 5,
                                   backend))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_torch_compile_traces_the_ops(backend):
    proj, alignment, z, t = small_inputs(1, 2, 4)

    def f(x):
        return xt.pkl_loss(x, t, alignment, proj, backend=backend) + xt.hkl_loss(x, t, alignment, proj,
                                                                                 backend=backend)

    compiled = torch.compile(f, backend="aot_eager")
    (g1,) = torch.autograd.grad(compiled(z), z)
    (g2,) = torch.autograd.grad(f(z), z)
    assert torch.allclose(g1, g2) and math.isfinite(float(compiled(z).detach()))


def test_backward_scales_in_place_in_the_logits_dtype():
    """The gradient handed to autograd IS the op's saved bf16 output, scaled in place (no fp32 copy)."""
    P = make_problem(3, 31, 37, 3, 2, 0, "covered", 0.0, False)
    z = P.z.to(torch.bfloat16).requires_grad_()
    loss, grad, _ = torch.ops.xtoken.pkl_rows(z, P.t, None, P.w_idx, P.w_val, P.col_mask, P.spans, 1.0, "mean",
                                              0.0, None, None, False, "torch")
    unscaled = grad.clone()
    w = torch.full_like(loss, 0.5)  # a power of two: the in-place product is exact
    (gz,) = torch.autograd.grad((loss * w).sum(), z)
    assert gz.dtype == torch.bfloat16 and gz.data_ptr() == grad.data_ptr()
    assert torch.equal(gz, unscaled * 0.5)
