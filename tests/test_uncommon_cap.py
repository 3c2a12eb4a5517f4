"""H-KL / GOLD hand the op min(uncommon_topk, max(m₀, _CAP_FLOOR)), m₀ = min(|U_S|, |U_T|), where the allowed columns
are known on the host (losses._uncommon_cap): never below the op's m = min(m₀, uncommon_topk), so the same losses and
gradients on every backend, while the Triton kernel's sort networks are sized by a bound of 4,096 instead of the
default 8,192 where m₀ is small (hkl_kernel.sort_widths). The counts are checked with the floor at 0 (the cap is
then m itself: a wrong count changes m)."""
from __future__ import annotations

import pytest
import torch

import xtoken_ext as xt
from xtoken_ext import losses as L
from xtoken_ext.testing import loss_problem

PROBLEMS = [loss_problem(3, 97, 113, 24), loss_problem(3, 113, 60, 24)]  # |U_S| ≤ |U_T|, then |U_T| < |U_S|


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


@pytest.mark.parametrize("P", PROBLEMS)
@pytest.mark.parametrize("kind", ["hkl", "gold"])
@pytest.mark.parametrize("uncovered", ["renormalize", "epsilon"])
def test_cap_handed_to_the_op(P, kind, uncovered, monkeypatch):
    u_s, u_t = _op_counts(P.proj, kind, uncovered)
    m0 = min(u_s, u_t)
    assert 0 < m0 < min(P.proj.student_vocab_size, P.proj.teacher_vocab_size)
    fn = getattr(xt, f"{kind}_loss")
    seen = _seen_caps(monkeypatch)
    for floor, topk, want in ((4096, 8192, 4096), (4096, None, 4096), (4096, 3, 3), (0, 8192, m0), (0, None, m0),
                              (0, 3, 3), (0, 0, 0), (m0 + 5, 8192, m0 + 5)):
        monkeypatch.setattr(L, "_CAP_FLOOR", floor)
        fn(P.z, P.t, P.alignment, P.proj, uncovered=uncovered, uncommon_topk=topk, backend="torch")
        assert seen[-1] == want, (floor, topk, seen)
    # a per-call teacher top-k changes A on the device: the option goes to the op as given
    fn(P.z, P.t, P.alignment, P.proj, uncovered=uncovered, teacher_topk=20, backend="torch")
    assert seen[-1] == 8192
    xt.uld_loss(P.z, P.t, P.alignment, P.proj, backend="torch")
    assert seen[-1] is None


@pytest.mark.parametrize("P", PROBLEMS)
@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("kind", ["hkl", "gold"])
def test_same_losses_and_gradients_as_the_option_itself(P, kind, backend, monkeypatch):
    """Bitwise, with the floor at 0 (the op gets m itself as its cap): the op's m is the same either way."""
    fn = getattr(xt, f"{kind}_loss")
    monkeypatch.setattr(L, "_CAP_FLOOR", 0)
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


def test_cap_floor_keeps_the_small_network():
    """_CAP_FLOOR is the smallest bound whose networks keep the 1,024-lane small network (beside W = 4,096)."""
    from xtoken_ext.ops.hkl_kernel import _SMALL_CAP, sort_widths

    assert sort_widths(L._CAP_FLOOR) == (4096, _SMALL_CAP) and sort_widths(L._CAP_FLOOR // 2)[1] < _SMALL_CAP
    assert sort_widths(8192) == (8192, _SMALL_CAP)
