"""Hand-checkable oracles from METHOD.md §17 (O-5, O-12..O-17) on the public losses and the reference."""
from __future__ import annotations

import math

import pytest
import torch

import xtoken_ext as xt
from xtoken_ext import reference as ref

IMPLS = [pytest.param(xt, id="fast"), pytest.param(ref, id="reference")]


def ell(rows):
    """Projection from per-row {teacher: weight} dicts (V_T inferred + extra)."""
    idx = torch.full((len(rows), 4), -1, dtype=torch.int32)
    w = torch.zeros(len(rows), 4)
    for s, row in enumerate(rows):
        for k, (t, v) in enumerate(row.items()):
            idx[s, k], w[s, k] = t, v
    return idx, w


def identity(V: int):
    return xt.Projection(torch.tensor([[i, -1, -1, -1] for i in range(V)]),
                         torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(V, 1), V)


def o5_projection():
    """O-5: A->a (1), B->b (1), C->{c: 0.909091, d: 0.090909}."""
    idx, w = ell([{0: 1.0}, {1: 1.0}, {2: 1 / 1.1, 3: 0.1 / 1.1}])
    return xt.Projection(idx, w, 4)


def one_chunk(n_s: int, n_t: int):
    """One valid chunk whose student side is predicted by n_s rows and teacher side by n_t rows (token 0 of each
    side forms a leading 1-to-1 chunk that has no predictor and is therefore invalid)."""
    return xt.Alignment.from_chunks([[(0, 1, 0, 1), (1, 1 + n_s, 1, 1 + n_t)]], [[True, True]], [1 + n_s],
                                    [1 + n_t], T_S=1 + n_s, T_T=1 + n_t)


def logits_from_probs(rows, width=None):
    p = torch.tensor(rows, dtype=torch.float64)
    return p.log().unsqueeze(0) if width is None else p.log().reshape(1, -1, width)


def pad_row(x):
    """Append one unused final logit row (the row after the last predictive row)."""
    return torch.cat([x, torch.zeros_like(x[:, :1])], 1)


def test_o5_row_stochastic_projection():
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64) @ o5_projection().dense()
    assert torch.allclose(q, torch.tensor([0.5, 0.3, 0.181818, 0.018182], dtype=torch.float64), atol=1e-6)
    assert math.isclose(float(q.sum()), 1.0, abs_tol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_o12_code_style_mean_merge_can_be_negative(impl):
    """3-row teacher chunk, mean of log-probs (mass 0.785401, not renormalized) vs q = [.5,.2,.2,.1]: −0.128913."""
    z = pad_row(logits_from_probs([[0.5, 0.2, 0.2, 0.1]]))  # W = I: q = p_S
    t = pad_row(logits_from_probs([[.7, .1, .1, .1], [.1, .6, .2, .1], [.2, .2, .5, .1]]))
    out = impl.pkl_loss(z, t, one_chunk(1, 3), identity(4), merge="mean")
    assert math.isclose(float(out), -0.128913, abs_tol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_o13_pkl_single_position(impl):
    proj = o5_projection()
    z = pad_row(logits_from_probs([[0.5, 0.3, 0.2]]))
    t = pad_row(logits_from_probs([[0.4, 0.3, 0.25, 0.05]]))
    batch = one_chunk(1, 1)
    # Full vocabulary: every column is covered, so "renormalize" is exact and "epsilon" differs by ~1e-10.
    for uncovered in ("renormalize", "epsilon"):
        assert math.isclose(float(impl.pkl_loss(z, t, batch, proj, uncovered=uncovered)), 0.040936, abs_tol=1e-6)
    # teacher_topk=3 keeps {a, b, c}; both sides renormalized over it (either `uncovered` mode): 0.022793.
    for uncovered in ("renormalize", "epsilon"):
        out = impl.pkl_loss(z, t, batch, proj, uncovered=uncovered, teacher_topk=3)
        assert math.isclose(float(out), 0.022793, abs_tol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_o14_two_row_student_chunk(impl):
    z = pad_row(logits_from_probs([[.5, .3, .15, .05], [.1, .6, .2, .1]]))  # W = I: q_r = p_r
    t = pad_row(logits_from_probs([[.3, .4, .2, .1]]))
    out = impl.pkl_loss(z, t, one_chunk(2, 1), identity(4))  # Q = [0.3, 0.45, 0.175, 0.075]
    assert math.isclose(float(out), 0.008361, abs_tol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_o15_gold_and_hkl(impl):
    proj = o5_projection()
    z = pad_row(logits_from_probs([[0.5, 0.3, 0.2]]))
    t = pad_row(logits_from_probs([[0.4, 0.3, 0.25, 0.05]]))
    batch = one_chunk(1, 1)
    assert math.isclose(float(impl.gold_loss(z, t, batch, proj)), -0.039257, abs_tol=1e-6)  # −0.089257 + 0.05
    assert math.isclose(float(impl.hkl_loss(z, t, batch, proj)), -0.033472, abs_tol=1e-6)  # U_S = ∅ -> L1 = 0


def test_o16_collisions_in_common_pairs():
    idx, w = ell([{0: 1.0}, {0: 1.0}, {2: .9009, 0: .0901, 1: .0090}, {5: .909, 6: .091}, {7: 0.5, 8: 0.5}])
    proj = xt.Projection(idx, w, 9)
    s, t = proj.common_pairs("relaxed")
    assert list(zip(s.tolist(), t.tolist())) == [(0, 0), (2, 2), (3, 5)]  # s1 loses to s0; s4 below 0.6
    s, t = proj.common_pairs("strict")
    assert list(zip(s.tolist(), t.tolist())) == [(0, 0)]
    # In the loss, the losing s1 is uncommon: with uncommon_topk=0 (no L1) it only gets the softmax coupling
    # −p[s1]·Σ_c ∂L/∂S[s_c], the same as every other uncommon student token.
    z = pad_row(torch.randn(1, 1, 5, dtype=torch.float64)).requires_grad_()
    t_logits = pad_row(torch.randn(1, 1, 9, dtype=torch.float64))
    (gz,) = torch.autograd.grad(xt.hkl_loss(z, t_logits, one_chunk(1, 1), proj, uncommon_topk=0), z)
    p = torch.softmax(z[0, 0].detach(), -1)
    ratio = gz[0, 0] / p
    assert torch.allclose(ratio[1], ratio[4]) and not torch.allclose(ratio[0], ratio[1])


def o17_setup():
    """V_S = 4 with z = [1, .5, −.2, .3]; strict common pairs (0,t0), (1,t1) with teacher probs .5/.2 (M_C = .7),
    the remaining .3 on t2 which only non-exact rows reach. uncommon_topk=0 isolates L_common (no L1)."""
    idx, w = ell([{0: 1.0}, {1: 1.0}, {2: 0.5, 1: 0.5}, {2: 0.6, 0: 0.4}])
    proj = xt.Projection(idx, w, 3)
    z = pad_row(torch.tensor([[[1.0, 0.5, -0.2, 0.3]]], dtype=torch.float64)).requires_grad_()
    t = pad_row(logits_from_probs([[0.5, 0.2, 0.3]]))
    return proj, z, t


@pytest.mark.parametrize("impl", IMPLS)
def test_o17_proposition1_gold_pushes_uncommon_logits_down(impl):
    proj, z, t = o17_setup()
    (gz,) = torch.autograd.grad(impl.gold_loss(z, t, one_chunk(1, 1), proj, uncommon_topk=0), z)
    expected = torch.tensor([-0.208856, -0.023412, 0.087691, 0.144578], dtype=torch.float64)
    assert torch.allclose(gz[0, 0], expected, atol=1e-6)
    p = torch.softmax(z[0, 0].detach(), -1)
    assert torch.allclose(gz[0, 0, 2:], p[2:] * 0.7, atol=1e-6)  # p_S[j]·M_C > 0 for every uncommon j


@pytest.mark.parametrize("merge", ["first", "chain"])
def test_o17_pkl_does_not_push_a_digit_by_digit_numeral_down(merge):
    """Student token "201" (uncommon: W row 2: .9009, 0: .0901, 1: .0090) vs a teacher that predicts "2","0","1"
    one digit per position. GOLD pushes z["201"] down (Proposition 1); P-KL pushes it UP because "201"'s mass
    lands on the teacher's first digit. (Under merge="mean" the teacher target is the geometric mean over the
    three positions, which flattens the first digit's mass; the sign then depends on the per-position spread.)"""
    num = 3  # student vocab: "2", "0", "1", "201", "x"; teacher vocab: "2", "0", "1", "y"
    idx, w = ell([{0: 1.0}, {1: 1.0}, {2: 1.0}, {0: .9009, 1: .0901, 2: .0090}, {3: 1.0}])
    proj = xt.Projection(idx, w, 4)
    z = pad_row(torch.zeros(1, 1, 5, dtype=torch.float64)).requires_grad_()
    t = pad_row(logits_from_probs([[.9, .03, .03, .04], [.05, .9, .03, .02], [.02, .03, .9, .05]]))
    batch = one_chunk(1, 3)
    ids = dict(student_ids=torch.tensor([[4, num]]), teacher_ids=torch.tensor([[3, 0, 1, 2]]))
    (g_pkl,) = torch.autograd.grad(xt.pkl_loss(z, t, batch, proj, merge=merge, **ids), z)
    (g_gold,) = torch.autograd.grad(xt.gold_loss(z, t, batch, proj, merge=merge, **ids), z)
    assert g_pkl[0, 0, num] < 0  # gradient descent raises z["201"]
    assert g_gold[0, 0, num] > 0  # GOLD lowers it
