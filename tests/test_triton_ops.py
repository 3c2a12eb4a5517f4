"""Fused Triton P-KL / H-KL ops (xtoken::pkl_rows, xtoken::hkl_rows) vs a float64 autograd oracle in row space and
vs xt.reference through the public API. Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors.

Tolerances. Half-precision logits are compared with the oracle evaluated on the SAME rounded inputs (upcast to
float64), so input rounding is not an error source. What remains:
- fp32 kernel math: TOL_F32 × max|ref| (unit roundoff 6e-8 × tens of accumulated operations × the cancellation in
  gradients such as gS − p Σ gS, whose terms can be ~10× the result; observed ≤ 4.2e-6 over 300 random cases);
- for the gradient, rounding to the logits dtype twice (the forward's gradient, then its product with grad_output
  in backward): ≤ (u_kernel + u)·|ref| with u = 2^-8 (bf16), 2^-11 (fp16), 2^-24 (fp32), plus the fp16
  subnormal spacing. u_kernel = u on a GPU (round to nearest even), but Triton's interpreter converts
  fp32 -> bf16 by truncating the significand (triton/runtime/interpreter.py `_convert_float` without a rounding
  mode), an error of up to one ulp: u_kernel = 2u for bf16 under TRITON_INTERPRET=1.
"""
import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import xtoken_ext.ops.hkl  # noqa: E402,F401  (registers xtoken::hkl_rows)
from xtoken_ext.ops import pkl as pkl_mod  # noqa: E402  (registers xtoken::pkl_rows)
from xtoken_ext.projection import Projection  # noqa: E402

# Masked lanes of the interpreter evaluate log(0), 0·inf, ... in numpy before tl.where discards them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
KERNEL_ROUNDOFF = dict(UNIT_ROUNDOFF)
if os.environ.get("TRITON_INTERPRET") == "1":
    KERNEL_ROUNDOFF[torch.bfloat16] = 2.0 ** -7
SUBNORMAL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -24}
TOL_F32 = 2e-5
MAX_ERR: dict[str, tuple] = {}  # (worst error/tolerance, largest abs error) per (check, dtype); printed with -s


def _record(key, err, tol):
    if err.numel():
        ratio, worst = MAX_ERR.get(key, (0.0, 0.0))
        MAX_ERR[key] = (max(ratio, float((err / tol).max())), max(worst, float(err.max())))


def assert_close_grad(out, ref, dtype, key):
    """|out − ref| ≤ (u_kernel + u)|ref| + TOL_F32·max|ref| + subnormal spacing (see the module docstring)."""
    out, ref = out.detach().double(), ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    tol = (KERNEL_ROUNDOFF[dtype] + UNIT_ROUNDOFF[dtype]) * ref.abs() + TOL_F32 * scale + SUBNORMAL[dtype] + 1e-12
    err = (out - ref).abs()
    _record(key + "/" + str(dtype), err, tol)
    assert bool((err <= tol).all()), f"{key}: max err {err.max().item():.3e}, worst err/tol {(err / tol).max():.3f}"


def assert_close_loss(out, ref, key, dtype):
    out, ref = out.detach().double(), ref.double()
    tol = TOL_F32 * (1 + ref.abs())
    err = (out - ref).abs()
    _record(key + "/" + str(dtype), err, tol)
    assert bool((err <= tol).all()), f"{key}: loss {out.tolist()} vs {ref.tolist()}"


# ---------------------------------------------------------------------------------------------------------------
# float64 oracle in row space (contract of ops.fallback), differentiated by autograd
# ---------------------------------------------------------------------------------------------------------------

def dense_w(w_idx, w_val, V_T):
    idx = w_idx.long()
    keep = idx >= 0
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    return torch.zeros(idx.shape[0], V_T, dtype=w_val.dtype).index_put((rows[keep], idx[keep]), w_val[keep],
                                                                       accumulate=True)


def teacher_logpi(t, t_cols, col_mask, tau):
    """log π rows [N_t, V_T]: log-softmax of t/τ over A (∩ the row's columns if sparse), −inf elsewhere."""
    t = t.double()
    if t_cols is not None:
        t = torch.full((t.shape[0], col_mask.numel()), float("-inf"), dtype=torch.float64).scatter(1, t_cols, t)
    x = torch.where(col_mask, t / tau, float("-inf"))
    lse = torch.logsumexp(x, 1, keepdim=True)
    return torch.where(torch.isfinite(lse), x - lse, float("-inf"))


def chunk_rows(spans, merge):
    for s_lo, s_hi, t_lo, t_hi in spans.tolist():
        if merge == "mean":
            yield list(range(s_lo, s_hi)), list(range(t_lo, t_hi)), (s_lo, s_hi, t_lo, t_hi)
        else:
            yield [s_lo], [t_lo], (s_lo, s_hi, t_lo, t_hi)


def oracle_pkl(z, t, t_cols, w_idx, w_val, col_mask, spans, tau, merge, eps, t_chain):
    W = dense_w(w_idx, w_val, col_mask.numel())
    logpi = teacher_logpi(t, t_cols, col_mask, tau)
    out = []
    for sr, tr, (_, _, t_lo, t_hi) in chunk_rows(spans, merge):
        q = torch.stack([torch.softmax(z[r] / tau, 0) @ W for r in sr]).mean(0)[col_mask]
        Q = q / q.sum()
        T = logpi[tr].mean(0)[col_mask]
        if merge == "chain":
            T = T + t_chain[t_lo + 1:t_hi].double().sum()
        P = T.exp()
        live = P > 0
        out.append(tau * tau * (P[live] * (T[live] - torch.log(Q[live] + eps))).sum())
    return torch.stack(out)


def oracle_hkl(z, t, t_cols, col_mask, spans, tau, merge, s_chain, t_chain, cs, ct, uncommon_topk):
    """-> (loss [K], tie_columns bool [N_s, V_S]).

    The sorted-L1 gradient τ² sign(a_i − b_i) a_i is a subgradient choice where student values tie (or nearly tie,
    within fp32 error): tied columns may swap sorted positions, and so their signs, between two correct
    implementations (Σ gS and every other column are unaffected). ``tie_columns`` marks them, for the rows of their
    chunk, so the gradient comparison skips exactly those entries."""
    V_S, V_T = z.shape[1], col_mask.numel()
    keep = col_mask[ct]
    cs, ct = cs[keep], ct[keep]
    u_s = torch.ones(V_S, dtype=torch.bool)
    u_s[cs] = False
    u_t = col_mask.clone()
    u_t[ct] = False
    m = min(int(u_s.sum()), int(u_t.sum()), V_S if uncommon_topk is None else uncommon_topk)
    logpi = teacher_logpi(t, t_cols, col_mask, tau)
    out = []
    ties = torch.zeros(z.shape, dtype=torch.bool)
    u_ids = torch.nonzero(u_s).squeeze(1)
    for sr, tr, (s_lo, s_hi, t_lo, t_hi) in chunk_rows(spans, merge):
        S = torch.stack([torch.log_softmax(z[r] / tau, 0) for r in sr]).mean(0)
        order = torch.sort(S.detach()[u_s], descending=True, stable=True)
        near = (order.values[:-1] - order.values[1:]) < 1e-5  # log-space gap = relative gap of exp S
        near[m:] = False  # positions past m get no gradient in either order unless tied with position m − 1
        tied = torch.zeros(order.values.shape, dtype=torch.bool)
        tied[:-1] |= near
        tied[1:] |= near
        ties[torch.tensor(sr).unsqueeze(1), u_ids[order.indices[tied]].unsqueeze(0)] = True
        T = logpi[tr].mean(0)
        if merge == "chain":
            S = S + s_chain[s_lo + 1:s_hi].sum()
            T = T + t_chain[t_lo + 1:t_hi].double().sum()
        P = T.exp()
        live = P[ct] > 0
        kl = (P[ct][live] * (T[ct][live] - S[cs][live])).sum()
        a = torch.sort(S[u_s].exp(), descending=True, stable=True).values[:m]
        b = torch.sort(P[u_t], descending=True, stable=True).values[:m]
        out.append(tau * tau * (kl + (a - b).abs().sum()))
    return torch.stack(out), ties


# ---------------------------------------------------------------------------------------------------------------
# random problems
# ---------------------------------------------------------------------------------------------------------------

def make_problem(seed, V_S, V_T, n_chunks, max_rows, sparse_k, mask_mode, empty_rows, hub, gaps=True):
    """Random logits, W (optionally a 'hub' teacher column that most student rows reach, like a digit), spans with
    gap rows between chunks, teacher (dense or top-k sparse with unique columns), col_mask, chain scalars."""
    g = torch.Generator().manual_seed(seed)
    proj = Projection.random(V_S, V_T, seed=seed, empty_rows=empty_rows)
    w_idx, w_val = proj.indices.clone(), proj.weights.clone()
    if hub:  # slot 0 of ~3/4 of the non-empty rows -> column 0 (one CSC column far longer than the others)
        rows = (w_idx[:, 0] >= 0) & (torch.rand(V_S, generator=g) < 0.75) & ~(w_idx[:, 1:] == 0).any(1)
        w_idx[rows, 0] = 0
    spans, s, t = [], 0, 0
    for _ in range(n_chunks):
        s += int(gaps and torch.randint(0, 2, (1,), generator=g))
        t += int(gaps and torch.randint(0, 2, (1,), generator=g))
        ns = int(torch.randint(1, max_rows + 1, (1,), generator=g))
        nt = int(torch.randint(1, max_rows + 1, (1,), generator=g))
        spans.append([s, s + ns, t, t + nt])
        s, t = s + ns, t + nt
    N_s, N_t = s + int(gaps), t + int(gaps)
    # Distinct values in every row even after rounding to bf16: a shuffled grid of step 6/V_S ≥ 0.04 (|z| ≤ 3) plus
    # a jitter below half a step (see tie_columns for why ties matter).
    grid = torch.stack([torch.randperm(V_S, generator=g) for _ in range(N_s)]).float().sub_(V_S / 2)
    z = (grid + 0.5 * torch.rand(N_s, V_S, generator=g)).mul_(6 / V_S)
    covered = torch.zeros(V_T, dtype=torch.bool)
    covered[w_idx[(w_idx >= 0) & (w_val > 0)].long()] = True
    if mask_mode == "covered":
        col_mask = covered
    elif mask_mode == "all":
        col_mask = torch.ones(V_T, dtype=torch.bool)
    else:  # covered ∩ a random "top-k" subset
        col_mask = covered & (torch.rand(V_T, generator=g) < 0.6)
        col_mask[w_idx[0, 0].clamp(min=0)] = True
    if sparse_k:
        k = min(sparse_k, V_T)
        base = torch.randperm(V_T, generator=g)
        cols = []
        for r in range(N_t):  # overlapping column sets so multi-row chunks have a non-empty intersection
            shift = int(torch.randint(0, max(1, k // 3), (1,), generator=g))
            cols.append(base[(torch.arange(k) + shift) % V_T])
        t_cols = torch.stack(cols)
        t_vals = torch.log_softmax(torch.randn(N_t, k, generator=g) * 2, 1)
    else:
        t_cols, t_vals = None, torch.randn(N_t, V_T, generator=g) * 3
    t_chain = -torch.rand(N_t, generator=g) * 2
    s_chain = -torch.rand(N_s, generator=g) * 2
    g_out = torch.rand(len(spans), generator=g) * 2 - 0.5
    return types.SimpleNamespace(z=z, t=t_vals, t_cols=t_cols, w_idx=w_idx.to(torch.int32), w_val=w_val,
                                 col_mask=col_mask, spans=torch.tensor(spans, dtype=torch.int64), t_chain=t_chain,
                                 s_chain=s_chain, g_out=g_out, proj=Projection(w_idx, w_val, V_T))


VOCAB = st.one_of(st.sampled_from([61, 97, 131]), st.integers(5, 140))
problems = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2 ** 16), V_S=VOCAB, V_T=VOCAB, n_chunks=st.integers(1, 3), max_rows=st.integers(1, 3),
    sparse_k=st.sampled_from([0, 0, 7, 40]), mask_mode=st.sampled_from(["covered", "all", "subset"]),
    empty_rows=st.sampled_from([0.0, 0.2]), hub=st.booleans()))


# ---------------------------------------------------------------------------------------------------------------
# P-KL
# ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(pb=problems, dtype=st.sampled_from(list(DTYPES)), merge=st.sampled_from(["mean", "first", "chain"]),
       tau=st.sampled_from([1.0, 0.7, 2.0]), learn_w=st.booleans())
def test_pkl_matches_oracle(pb, dtype, merge, tau, learn_w):
    P = make_problem(**pb)
    dt = DTYPES[dtype]
    eps = 0.0 if pb["mask_mode"] != "all" else 1e-10
    z = P.z.to(dt).requires_grad_()
    w_val = P.w_val.clone().requires_grad_(learn_w)
    loss, grad, grad_w = torch.ops.xtoken.pkl_rows(z, P.t.to(dt), P.t_cols, P.w_idx, w_val, P.col_mask, P.spans,
                                                   tau, merge, eps, P.t_chain, None, learn_w)
    (loss * P.g_out).sum().backward()

    z64 = z.detach().double().requires_grad_()
    w64 = P.w_val.double().requires_grad_()
    ref = oracle_pkl(z64, P.t.to(dt), P.t_cols, P.w_idx, w64, P.col_mask, P.spans, tau, merge, eps, P.t_chain)
    (ref * P.g_out.double()).sum().backward()
    assert_close_loss(loss, ref.detach(), "pkl loss", dt)
    assert_close_grad(z.grad, z64.grad, dt, "pkl grad")
    # the forward's own (unit-scale) gradient: d Σ_k loss_k / dz
    z1 = z.detach().double().requires_grad_()
    torch.autograd.backward(oracle_pkl(z1, P.t.to(dt), P.t_cols, P.w_idx, P.w_val.double(), P.col_mask, P.spans,
                                       tau, merge, eps, P.t_chain).sum())
    assert_close_grad(grad, z1.grad, dt, "pkl grad (forward)")
    if learn_w:
        assert_close_grad(w_val.grad, w64.grad, torch.float32, "pkl grad_w")
    else:
        assert w_val.grad is None and grad_w.numel() == 0


def test_pkl_grad_w_deterministic_matches_atomic():
    P = make_problem(3, 61, 97, 3, 3, 0, "covered", 0.1, True)
    args = (P.z, P.t, None, P.w_idx, P.w_val, P.col_mask, P.spans, 1.0, "mean", 0.0, None, None, False, True)
    atomic = pkl_mod.pkl_rows(*args)[2]
    torch.use_deterministic_algorithms(True)
    try:
        det = [pkl_mod.pkl_rows(*args)[2] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(det[0], det[1])
    torch.testing.assert_close(det[0], atomic, rtol=1e-6, atol=1e-6 * det[0].abs().max().item())


def test_pkl_no_chunks():
    z = torch.randn(5, 13, requires_grad=True)
    W = Projection.random(13, 17, seed=0)
    loss, grad, _ = torch.ops.xtoken.pkl_rows(z, torch.randn(4, 17), None, W.indices, W.weights,
                                              W.covered_columns(), torch.zeros(0, 4, dtype=torch.int64), 1.0,
                                              "mean", 0.0, None, None, False)
    assert loss.shape == (0,) and torch.equal(grad, torch.zeros_like(z))


# ---------------------------------------------------------------------------------------------------------------
# H-KL / GOLD / ULD
# ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(pb=problems, dtype=st.sampled_from(list(DTYPES)), merge=st.sampled_from(["mean", "first", "chain"]),
       tau=st.sampled_from([1.0, 0.7, 2.0]), pairs=st.sampled_from(["relaxed", "strict", "none"]),
       uncommon_topk=st.sampled_from([None, 3, 20]))
def test_hkl_matches_oracle(pb, dtype, merge, tau, pairs, uncommon_topk):
    P = make_problem(**pb)
    dt = DTYPES[dtype]
    if pairs == "none":
        cs = ct = torch.zeros(0, dtype=torch.int64)
    else:
        cs, ct = P.proj.common_pairs(pairs)
    z = P.z.to(dt).requires_grad_()
    s_chain = P.s_chain.clone().requires_grad_(merge == "chain")
    loss, grad, _ = torch.ops.xtoken.hkl_rows(z, P.t.to(dt), P.t_cols, P.col_mask, P.spans, tau, merge,
                                              s_chain if merge == "chain" else None, P.t_chain, cs, ct,
                                              uncommon_topk)
    (loss * P.g_out).sum().backward()

    z64 = z.detach().double().requires_grad_()
    sc64 = P.s_chain.double().requires_grad_()
    ref, ties = oracle_hkl(z64, P.t.to(dt), P.t_cols, P.col_mask, P.spans, tau, merge, sc64, P.t_chain, cs, ct,
                           uncommon_topk)
    (ref * P.g_out.double()).sum().backward()
    assert_close_loss(loss, ref.detach(), "hkl loss", dt)
    assert_close_grad(z.grad[~ties], z64.grad[~ties], dt, "hkl grad")
    if merge == "chain":
        assert_close_grad(s_chain.grad, sc64.grad, torch.float32, "hkl grad s_chain")


# ---------------------------------------------------------------------------------------------------------------
# Public API on the Triton path (XTOKEN_FORCE_TRITON=1) vs xt.reference
# ---------------------------------------------------------------------------------------------------------------

def fake_batch(spans, N_s, N_t):
    """A B=1 alignment-like object with the chunk-id tensors the reference reads and the row_spans() losses use."""
    s_ids = torch.full((1, N_s), -1, dtype=torch.long)
    t_ids = torch.full((1, N_t), -1, dtype=torch.long)
    for k, (s_lo, s_hi, t_lo, t_hi) in enumerate(spans.tolist()):
        s_ids[0, s_lo:s_hi] = k
        t_ids[0, t_lo:t_hi] = k
    K = spans.shape[0]
    return types.SimpleNamespace(
        student_chunk_ids=s_ids, teacher_chunk_ids=t_ids, chunk_valid=torch.ones(1, K, dtype=torch.bool),
        row_spans=lambda: torch.cat([torch.zeros(K, 1, dtype=torch.long), spans], 1))


@pytest.mark.parametrize("loss_name", ["pkl_loss", "hkl_loss", "gold_loss", "uld_loss"])
@pytest.mark.parametrize("merge,sparse,uncovered", [("mean", False, "renormalize"), ("chain", True, "renormalize"),
                                                    ("first", False, "epsilon")])
def test_public_api_matches_reference(monkeypatch, loss_name, merge, sparse, uncovered):
    import xtoken_ext as xt
    from xtoken_ext import reference

    monkeypatch.setenv("XTOKEN_FORCE_TRITON", "1")
    P = make_problem(11, 97, 61, 3, 3, 9 if sparse else 0, "covered", 0.1, False)
    batch = fake_batch(P.spans, P.z.shape[0], P.t.shape[0])
    g = torch.Generator().manual_seed(0)
    ids = dict(student_ids=torch.randint(0, 97, (1, P.z.shape[0]), generator=g),
               teacher_ids=torch.randint(0, 61, (1, P.t.shape[0]), generator=g)) if merge == "chain" else {}
    if sparse:
        ids["teacher_indices"] = P.t_cols.unsqueeze(0)
        if merge == "chain":  # realized next token of row r inside row r's top-k columns
            ids["teacher_ids"] = torch.cat([P.t_cols[:1, 0], P.t_cols[:-1, 0]]).unsqueeze(0)
    kw = dict(temperature=1.5, reduction="none", merge=merge, uncovered=uncovered, teacher_topk=40,
              uncommon_topk=25, **ids)
    z = P.z.unsqueeze(0).requires_grad_()
    out = getattr(xt, loss_name)(z, P.t.unsqueeze(0), batch, P.proj, **kw)
    (out * P.g_out).sum().backward()
    z64 = P.z.double().unsqueeze(0).requires_grad_()
    ref = getattr(reference, loss_name)(z64, P.t.unsqueeze(0), batch, P.proj, **kw)
    (ref * P.g_out.double()).sum().backward()
    assert_close_loss(out.detach(), ref.detach(), loss_name + " (public)", torch.float32)
    assert_close_grad(z.grad, z64.grad, torch.float32, loss_name + " grad (public)")


# ---------------------------------------------------------------------------------------------------------------
# torch.library.opcheck
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck(sparse):
    P = make_problem(5, 23, 29, 2, 2, 6 if sparse else 0, "covered", 0.1, False)
    z = P.z.requires_grad_()
    w_val = P.w_val.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for need_grad_w in (False, True):
            torch.library.opcheck(torch.ops.xtoken.pkl_rows.default,
                                  (z, P.t, P.t_cols, P.w_idx, w_val, P.col_mask, P.spans, 1.3, "chain", 0.0,
                                   P.t_chain, None, need_grad_w))
        torch.library.opcheck(torch.ops.xtoken.pkl_rows.default,
                              (P.z, P.t, P.t_cols, P.w_idx, P.w_val, P.col_mask, P.spans, 1.0, "mean", 0.0, None,
                               P.g_out, True))
        cs, ct = P.proj.common_pairs("relaxed")
        torch.library.opcheck(torch.ops.xtoken.hkl_rows.default,
                              (z, P.t, P.t_cols, P.col_mask, P.spans, 0.8, "chain",
                               P.s_chain.clone().requires_grad_(), P.t_chain, cs, ct, 5))


def teardown_module():
    if MAX_ERR:
        print("\n(worst error/tolerance, max abs error):")
        for k, (ratio, worst) in sorted(MAX_ERR.items()):
            print(f"  {k:45s} {ratio:.3f}  {worst:.2e}")
