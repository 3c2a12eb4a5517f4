"""ops._common.cached_on_tensors, which keeps what the kernels derive from W, the column mask and the common pairs
across calls (P-KL's W structure and packed weights, H-KL's pair maps), and the H-KL op after an in-place update of
its column mask. P-KL's packed weights: tests/test_triton_ops.py::test_pkl_w_words_cached_until_w_or_mask_changes."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from helpers import device, make_problem
from xtoken_ext.ops import pkl as _ops  # noqa: F401  (registers both xtoken:: ops)
from xtoken_ext.ops._common import cached_on_tensors


def test_kept_per_tensor_version_and_arguments():
    calls = []

    @cached_on_tensors(2, size=4)
    def f(a, b, k):
        calls.append(k)
        return [a.sum() + b.sum() + k]

    a, b = torch.ones(3), torch.ones(2)
    out = f(a, b, 1)
    assert f(a, b, 1) is out and calls == [1]  # kept
    assert f(a, b, 2) is not out and calls == [1, 2]  # another argument
    a.add_(1)  # an in-place update: computed anew
    assert float(f(a, b, 1)[0]) == 9 and calls == [1, 2, 1]
    assert f(a.clone(), b, 1) is not f(a, b, 1)  # another tensor with the same values
    with torch.inference_mode():
        c = torch.ones(3)
    assert f(c, b, 1) is not f(c, b, 1)  # no version counter: never kept
    p = torch.nn.Parameter(torch.ones(3))
    assert f(p, b, 1) is not f(p, b, 1)  # a fused optimizer step bumps no version: never kept
    out = f(a, b, 1)
    a.data = torch.zeros(3)  # a swapped .data (Module.to, FSDP) bumps no version either: its pointer changes
    assert f(a, b, 1) is not out and float(f(a, b, 1)[0]) == 3


def test_entries_of_freed_tensors_are_dropped():
    """A learnable W's weights are new tensors in every step: their entries (device tensors, in the kernels' use)
    must not pile up until the size bound."""
    @cached_on_tensors(1, size=16)
    def f(a):
        return [a * 2]

    a = torch.ones(4)
    ref = weakref.ref(f(a)[0])
    del a
    gc.collect()
    f(torch.zeros(4))  # a miss drops the freed tensor's entry
    gc.collect()
    assert ref() is None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked interpreter lanes evaluate 0·inf
def test_hkl_pair_maps_follow_the_column_mask():
    """H-KL's pair maps are kept per (common pairs, column mask): after an in-place change of the mask the op gives
    what a fresh mask gives (bitwise), and not what the old mask gave."""
    dev = device()
    P = make_problem(9, 97, 61, 3, 2, 0, "all", 0.0, False)
    cs, ct = (x.to(dev) for x in P.proj.common_pairs("relaxed"))
    z, t, spans, mask = P.z.to(dev), P.t.to(dev), P.spans.to(dev), P.col_mask.to(dev)

    def run(mask):
        return torch.ops.xtoken.hkl_rows(z, t, None, mask, spans, 1.0, "mean", None, None, cs, ct, None, "triton")[:2]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    before = run(mask)
    assert same(run(mask), before)
    mask[ct[:3]] = False  # three common teacher ids leave A: their pairs drop, U_S grows
    assert same(run(mask), run(mask.clone())) and not same(run(mask), before)
