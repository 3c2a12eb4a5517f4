"""H-KL / GOLD hand the op min(uncommon_topk, |U_S|, |U_T|) where the allowed columns are known on the host
(losses._uncommon_cap): the same m as the op computes from uncommon_topk itself, so the same losses and gradients on
every backend, while the Triton kernel sizes its sort networks by m (hkl_kernel.sort_widths) rather than by
min(V_S, V_T, uncommon_topk)."""
from __future__ import annotations

import pytest
import torch

import xtoken_ext as xt
from xtoken_ext import losses as L
from xtoken_ext.testing import loss_problem

P = loss_problem(3, 97, 113, 24)


def _op_counts(proj, kind, uncovered):
    """|U_S|, |U_T| as the op forms them from the device-side arguments (ops.hkl_kernel.hkl_rows)."""
    cs, ct = (x.long() for x in proj.common_pairs("relaxed" if kind == "hkl" else "strict"))
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    mask = proj.covered_columns("cpu") if uncovered == "renormalize" else torch.ones(V_T, dtype=torch.bool)
    keep = mask[ct]
    smap = torch.full((V_S,), -1).scatter_(0, cs, torch.where(keep, ct, -1))
    tmap = torch.full((V_T,), -1).scatter_(0, ct, torch.where(keep, cs, -1))
    return int((smap < 0).sum()), int((mask & (tmap < 0)).sum())


def _seen_caps(monkeypatch):
    """The uncommon_topk each call of the public loss hands the op."""
    seen, op = [], L.hkl_rows
    monkeypatch.setattr(L, "hkl_rows", lambda *a: seen.append(a[-2]) or op(*a))
    return seen


@pytest.mark.parametrize("kind", ["hkl", "gold"])
@pytest.mark.parametrize("uncovered", ["renormalize", "epsilon"])
def test_cap_is_the_ops_m(kind, uncovered, monkeypatch):
    u_s, u_t = _op_counts(P.proj, kind, uncovered)
    assert 0 < min(u_s, u_t) < min(97, 113)  # a cap below the kernel's bound: the case this is for
    fn = getattr(xt, f"{kind}_loss")
    seen = _seen_caps(monkeypatch)
    for topk, want in ((8192, min(u_s, u_t)), (None, min(u_s, u_t)), (3, 3), (0, 0)):
        fn(P.z, P.t, P.alignment, P.proj, uncovered=uncovered, uncommon_topk=topk, backend="torch")
        assert seen[-1] == want, (topk, seen)
    # a per-call teacher top-k changes A on the device: the option goes to the op as given
    fn(P.z, P.t, P.alignment, P.proj, uncovered=uncovered, teacher_topk=20, backend="torch")
    assert seen[-1] == 8192
    xt.uld_loss(P.z, P.t, P.alignment, P.proj, backend="torch")
    assert seen[-1] is None


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("kind", ["hkl", "gold"])
def test_same_losses_and_gradients_as_the_uncapped_option(kind, backend, monkeypatch):
    """Bitwise: the op's m is the same either way (the torch and C++ backends select the top m, the Triton kernel's
    sums run in its sort network's order, checked against the float64 reference by the loss tests)."""
    fn = getattr(xt, f"{kind}_loss")
    out = []
    for tight in (True, False):
        if not tight:
            monkeypatch.setattr(L, "_uncommon_cap", lambda proj, o: o.uncommon_topk)
        for topk in (8192, None):
            z = P.z.clone().requires_grad_()
            loss = fn(z, P.t, P.alignment, P.proj, uncommon_topk=topk, reduction="none", backend=backend)
            loss.sum().backward()
            out.append((loss.detach(), z.grad))
    for (a, ga), (b, gb) in zip(out[:2], out[2:]):
        assert torch.equal(a, b) and torch.equal(ga, gb)
    assert (out[0][0] > 0).any()


def test_sort_widths():
    """The networks for a host bound m_up: the W-lane one holds every m ≤ m_up up to _SORT_CAP (above it the merge
    sort), the small one W/4 lanes at most; where m_up ≤ _SMALL_CAP (the cap is m itself) the small one takes every
    window, at the real W's m the 1,024 lanes that the default cap's bound gave, beside W = 4,096."""
    pytest.importorskip("triton")
    from xtoken_ext.ops.hkl_kernel import _SMALL_CAP, _SORT_CAP, sort_widths

    for m_up in [*range(0, 70), 100, 128, 261, 700, 1023, 1024, 1025, 2047, 2048, 5000, 8191, 8192, 8193, 10 ** 5]:
        W, W_SMALL = sort_widths(m_up)
        assert W_SMALL * 4 <= W <= _SORT_CAP and W >= min(m_up, _SORT_CAP), m_up
        assert W_SMALL >= (m_up if m_up <= _SMALL_CAP else min(_SMALL_CAP, W // 4)), m_up
    assert sort_widths(128) == sort_widths(261) == (4096, 1024) and sort_widths(8192) == (8192, 1024)
