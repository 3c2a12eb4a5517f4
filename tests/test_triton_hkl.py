"""The Triton backend of xtoken::hkl_rows (ops/hkl_kernel.py) on the cases its in-kernel selection must get right,
against the float64 oracle of helpers.py: exact ties in the top m, m = 0, m above a sparse teacher's entries, m above
the sort network (merge sort) and the overflow (exact) compaction (forced with a small window and no list slack), the
merge sort and the network's stages on their own, level-1 bins pushed to their ends (logits shifted by ±1000, the
per-program shift carried across chunks), all-equal logits, and the non-finite input contract of notes/POLICY.md (bad
chunks -> NaN loss, zero gradient rows and chain gradient)."""
from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl

from helpers import check, device, grad_bound, kappa, loss_bound, make_problem, oracle_hkl, pairs_of, \
    run_hkl_triton
from xtoken_ext.ops import hkl_kernel
from xtoken_ext.ops import pkl as _ops  # noqa: F401  (registers both xtoken:: ops)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked interpreter lanes evaluate log(0)


def tie_problem(seed, merge, sparse_k):
    """Logits on a coarse grid (exact ties everywhere, distinct values ≥ 0.5/τ apart); for "mean" every row of a
    chunk is a copy of its first, so the merged S ties exactly where the rows do."""
    P = make_problem(seed, 61, 97, 4, 3, sparse_k, "covered", 0.1, True)
    g = torch.Generator().manual_seed(seed)
    P.z = torch.randint(-4, 5, P.z.shape, generator=g).float() / 2
    if merge == "mean":
        for s_lo, s_hi, _, _ in P.spans.tolist():
            P.z[s_lo:s_hi] = P.z[s_lo]
    if not sparse_k:
        P.t = torch.randint(-4, 5, P.t.shape, generator=g).float() / 2
    return P


@pytest.mark.parametrize("merge,sparse_k,topk", [("first", 0, 20), ("mean", 0, None), ("chain", 7, 20)])
def test_exact_ties_in_top_m(merge, sparse_k, topk):
    run_hkl_triton(tie_problem(5, merge, sparse_k), merge, "relaxed", topk, tie_sums=True)


@pytest.mark.parametrize("topk,sparse_k", [(0, 0), (0, 7), (3, 0), (None, 7), (10 ** 6, 0)])
def test_m_zero_small_and_above_candidates(topk, sparse_k):
    """m = 0 (the KL alone); m < candidates; m above a sparse teacher's k entries (b padded with zeros); an
    uncommon_topk above |U| (m = min(|U_S|, |U_T|))."""
    run_hkl_triton(make_problem(7, 97, 61, 3, 2, sparse_k, "covered", 0.1, True), "mean", "relaxed", topk)


@pytest.fixture
def tiny_windows(monkeypatch):
    """Sort windows of 16 lanes and no list slack: m above the network (both lists merge-sorted), and the exact
    compaction whenever the level-1 bin of the m-th largest holds more than 2 m keys."""
    monkeypatch.setattr(hkl_kernel, "_SORT_CAP", 16)
    monkeypatch.setattr(hkl_kernel, "_SLACK", 0)
    monkeypatch.setattr(hkl_kernel, "_hint_states", {})  # a fresh hint state: no program has seen a chunk


@pytest.mark.parametrize("merge,sparse_k,pairs,topk", [("mean", 0, "none", None), ("chain", 40, "strict", 37),
                                                       ("first", 0, "relaxed", 23)])
def test_merge_sort_and_exact_compaction(tiny_windows, merge, sparse_k, pairs, topk):
    """m above the sort network (W = 16): both lists merge-sorted whole (path bit 4), hits and misses."""
    run_hkl_triton(make_problem(11, 131, 97, 5, 3, sparse_k, "all", 0.05, True), merge, pairs, topk)
    assert all(p & 16 for p in hkl_kernel.last_paths.tolist())


def test_merge_sort_with_ties_bf16(tiny_windows):
    P = tie_problem(13, "first", 0)
    run_hkl_triton(P, "first", "none", None, dt=torch.bfloat16, tie_sums=True)


def test_shifted_logits_and_equal_logits(tiny_windows):
    """Per chunk the student logits get +1000, −1000, 0 (the teacher's the opposite) or become all equal: the
    level-1 bins clamp (every key in an end bin -> the exact compaction on both sides), the shift carried from the
    previous chunk is far off, and all-equal values make one tie group of the whole row. Softmax is shift-invariant;
    the rounded inputs go to the oracle."""
    P = make_problem(17, 97, 61, 6, 1, 0, "all", 0.0, True)
    for k, (s_lo, s_hi, t_lo, t_hi) in enumerate(P.spans.tolist()):
        if k % 4 == 3:
            P.z[s_lo:s_hi] = 0.25
        else:
            P.z[s_lo:s_hi] += (1000.0, -1000.0, 0.0)[k % 4]
            P.t[t_lo:t_hi] -= (1000.0, -1000.0, 0.0)[k % 4]
    loss, _ = run_hkl_triton(P, "first", "none", 20, tau=1.0, tie_sums=True)
    assert bool(torch.isfinite(loss).all())


def poison(P, merge):
    """Bad input in chunks 1-3 (NaN student value, +inf in a teacher column / entry, an all −inf student row);
    chunk 0 gets values the contract does not call bad: NaN in a student row it does not read (merge "first": a
    later row; else the gap row after the last chunk) and a first teacher row with no mass on A (all of A at −inf;
    sparse: every entry), so P = 0."""
    z, t = P.z.clone(), P.t.clone()
    spans = P.spans.tolist()
    z[spans[1][0], 3] = float("nan")
    t[spans[2][2], 0] = float("inf")
    z[spans[3][0]] = float("-inf")
    if P.t_cols is None:
        t[spans[0][2], P.col_mask] = float("-inf")
    else:
        t[spans[0][2]] = float("-inf")
    unread = spans[0][0] + 1 if merge == "first" and spans[0][1] > spans[0][0] + 1 else z.shape[0] - 1
    z[unread] = float("nan")
    return z, t, unread


def test_nonfinite_chain_sum_is_bad_input():
    """merge="chain": a chunk whose student or teacher chain sum is NaN or +inf is bad input (as the torch backend)."""
    P = make_problem(23, 61, 97, 4, 1, 0, "covered", 0.1, True)
    P.spans[:, 1] += 1  # two student and two teacher rows per chunk: one chain scalar each (spans stay disjoint:
    P.spans[:, 3] += 1  # make_problem leaves gap rows, and the last chunk ends before the trailing one)
    P.spans[1:, [0, 2]] += torch.arange(1, P.spans.shape[0]).unsqueeze(1)
    P.spans[1:, [1, 3]] += torch.arange(1, P.spans.shape[0]).unsqueeze(1)
    P.z = torch.cat([P.z, P.z[:4]])
    P.t = torch.cat([P.t, P.t[:4]])
    s_chain, t_chain = torch.zeros(P.z.shape[0]) - 0.5, torch.zeros(P.t.shape[0]) - 0.5
    s_chain[P.spans[1, 0] + 1] = float("nan")
    t_chain[P.spans[2, 2] + 1] = float("inf")
    dev = device()
    cs, ct = P.proj.common_pairs("relaxed")
    loss, grad, grad_chain = (x.cpu() for x in torch.ops.xtoken.hkl_rows(
        P.z.to(dev), P.t.to(dev), None, P.col_mask.to(dev), P.spans.to(dev), 0.7, "chain", s_chain.to(dev),
        t_chain.to(dev), cs.to(dev), ct.to(dev), 20, "triton"))
    assert torch.isnan(loss).tolist() == [False, True, True, False]
    for s_lo, s_hi, _, _ in P.spans[1:3].tolist():
        assert not bool(grad[s_lo:s_hi].any()) and not bool(grad_chain[s_lo:s_hi].any())
    assert bool(grad[P.spans[0, 0]].any()) and bool(grad_chain[P.spans[0, 0] + 1] != 0)


@pytest.mark.parametrize("merge,sparse_k", [("first", 0), ("mean", 0), ("chain", 0), ("mean", 7)])
def test_bad_input_chunks(merge, sparse_k):
    P = make_problem(19, 61, 97, 5, 3, sparse_k, "covered", 0.1, True)
    z, t, unread = poison(P, merge)
    dev = device()
    cs, ct = P.proj.common_pairs("relaxed")
    s_chain = P.s_chain.to(dev) if merge == "chain" else None
    args = (t.to(dev), None if P.t_cols is None else P.t_cols.to(dev), P.col_mask.to(dev), P.spans.to(dev), 0.7,
            merge, s_chain, P.t_chain.to(dev), cs.to(dev), ct.to(dev), 20)
    loss, grad, grad_chain = (x.cpu() for x in torch.ops.xtoken.hkl_rows(z.to(dev), *args, "triton"))
    assert bool(torch.isnan(loss[1:4]).all()) and bool(torch.isfinite(loss[[0, 4]]).all())
    for s_lo, s_hi, _, _ in P.spans[1:4].tolist():
        assert torch.equal(grad[s_lo:s_hi], torch.zeros_like(grad[s_lo:s_hi]))
        assert torch.equal(grad_chain[s_lo:s_hi], torch.zeros_like(grad_chain[s_lo:s_hi]))
    assert bool(torch.isfinite(grad).all())
    # chunks 0 and 4 against the oracle on the same inputs (the unread NaN row replaced: the oracle reads every row
    # for κ, and chunks never read it)
    good = [0, 4]
    z_ok = z.clone()
    z_ok[unread] = 0.0
    z_ok[P.spans[1, 0], 3] = 0.0
    z_ok[P.spans[3, 0]] = 0.0
    z64 = z_ok.double().requires_grad_()
    ref, ties = oracle_hkl(z64, t, P.t_cols, P.col_mask, P.spans, 0.7, merge, P.s_chain.double(), P.t_chain, cs, ct,
                           20)
    ref[good].sum().backward()
    kap = kappa(z_ok, torch.where(torch.isfinite(t), t, 0.0), 0.7)
    check("triton/float32/hkl bad-input loss", loss[good], ref.detach()[good], loss_bound(ref[good], 0.7, kap,
                                                                                         torch.float32))
    rows = torch.zeros(z.shape[0], dtype=torch.bool)
    for k in good:
        s_lo, s_hi = P.spans[k, :2].tolist()
        rows[s_lo:s_hi if merge == "mean" else s_lo + 1] = True
    mask = rows.unsqueeze(1) & ~ties
    check("triton/float32/hkl bad-input grad", grad, z64.grad, grad_bound(z64.grad, z_ok, 0.7, kap, torch.float32,
                                                                          "triton"), mask=mask)


@triton.jit
def _sort_kernel(x_ptr, y_ptr, n, N: tl.constexpr, PAD: tl.constexpr, TRUNC: tl.constexpr):
    lanes = tl.arange(0, N)
    x = tl.load(x_ptr + lanes, mask=lanes < n, other=PAD)
    tl.store(y_ptr + lanes, hkl_kernel._sort_desc(x, N, n, TRUNC, False, 1))


@triton.jit
def _sort_pair_kernel(x_ptr, u_ptr, y_ptr, v_ptr, nx, nu, N: tl.constexpr, PAD: tl.constexpr):
    lanes = tl.arange(0, N)
    x = tl.load(x_ptr + lanes, mask=lanes < nx, other=PAD)
    u = tl.load(u_ptr + lanes, mask=lanes < nu, other=PAD)
    y, v = tl.split(hkl_kernel._sort_desc(tl.join(x, u), N, tl.maximum(nx, nu), True, True, 1))
    tl.store(y_ptr + lanes, y)
    tl.store(v_ptr + lanes, v)


@triton.jit
def _merge_kernel(x_ptr, y_ptr, N: tl.constexpr):
    lanes = tl.arange(0, N)
    tl.store(y_ptr + lanes, hkl_kernel._sort_desc(tl.load(x_ptr + lanes), N, N, False, False, N.bit_length() - 1))


@triton.jit
def _sort_list_kernel(x_ptr, n, PAD: tl.constexpr, W: tl.constexpr):
    tl.store(x_ptr - 1, hkl_kernel._sort_list(x_ptr, n + 3, n, PAD, W))  # the result's buffer, before the list


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_sort_network(dtype):
    """_sort_desc (the window sorts): n ≤ N keys (the other lanes padded with the smallest key) come out descending
    in the first n lanes, with all N lanes' merge stages and with only the first ⌈log₂ n⌉ of them (TRUNC), and
    two columns sorted side by side (PAIR, as the small network sorts both windows)."""
    g = torch.Generator().manual_seed(0)
    N = 64
    for n in (1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 64):
        info = torch.iinfo(dtype)  # full-range keys: the partner sums wrap around
        x = torch.randint(info.min + 1, info.max, (n,), generator=g, dtype=dtype)
        x[n // 2:n // 2 + 2] = x[0]  # ties
        for trunc in (False, True):
            y = torch.empty(N, dtype=dtype, device=device())
            _sort_kernel[(1,)](x.to(device()), y, n, N, info.min, trunc)
            assert torch.equal(y[:n].cpu(), x.sort(descending=True).values), (n, trunc)
        # PAIR: two columns side by side (n and n // 2 keys, either one first), each sorted on its own
        u = torch.randint(info.min + 1, info.max, (n // 2,), generator=g, dtype=dtype)
        for p, q in ((x, u), (u, x)):
            y, v = (torch.empty(N, dtype=dtype, device=device()) for _ in range(2))
            _sort_pair_kernel[(1,)](p.to(device()), q.to(device()), y, v, p.numel(), q.numel(), N, info.min)
            assert torch.equal(y[:p.numel()].cpu(), p.sort(descending=True).values), n
            assert torch.equal(v[:q.numel()].cpu(), q.sort(descending=True).values), n
        # FIRST = log₂ N, the last merge stage alone: a bitonic sequence (n keys descending, then the rest ascending,
        # as _sort_list loads a merge tile) comes out descending
        w = torch.randint(info.min + 1, info.max, (N,), generator=g, dtype=dtype)
        w[n // 2] = w[0]
        w = torch.cat([w[:n].sort(descending=True).values, w[n:].sort().values])
        y = torch.empty(N, dtype=dtype, device=device())
        _merge_kernel[(1,)](w.to(device()), y, N)
        assert torch.equal(y.cpu(), w.sort(descending=True).values), n


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_sort_list(dtype):
    """_sort_list (the merge sort of whole lists, m above the largest network): lists of 1 to 9 blocks of W = 16 keys
    (full and partial blocks, an odd run left over in a round, a single block) with many ties and the extreme keys
    come out descending, in the buffer it returns; the padding (the smallest key) never enters the list."""
    g = torch.Generator().manual_seed(3)
    info = torch.iinfo(dtype)
    for n in (1, 16, 17, 31, 32, 33, 48, 64, 65, 100, 129, 144):
        x = torch.randint(-6, 6, (n,), generator=g, dtype=dtype) * (info.max // 8)  # ties, both signs
        x[n // 3] = info.max
        x[n // 2] = info.min + 1
        buf = torch.full((1 + 2 * n + 3,), 7, dtype=dtype)
        buf[1:1 + n] = x
        buf = buf.to(device())
        _sort_list_kernel[(1,)](buf[1:], n, info.min, 16)
        buf = buf.cpu()
        off = 1 + int(buf[0]) * (n + 3)
        assert torch.equal(buf[off:off + n], x.sort(descending=True).values), n
        assert bool((buf[1 + n:4 + n] == 7).all()), n  # nothing stored past either buffer's n keys


@pytest.mark.parametrize("n_u,merge,dt", [(6, "first", torch.float32), (20, "mean", torch.bfloat16),
                                          (6, "chain", torch.bfloat16), (20, "first", torch.float32)])
def test_small_sort_network(n_u, merge, dt):
    """m far below the host's bound (allowed columns: the paired teacher ids and n_u others, so m = |U_T| = n_u):
    the kernel sorts in its W_SMALL-lane network, run for only ⌈log₂ m⌉ of its merge stages. First with W_SMALL
    = 64: both lists (the student's 43 uncommon ids, the teacher's n_u) fit it and are sorted whole, no selection
    pass; then with W_SMALL = 32, where the student's single-pass list (43 keys) hit: both windows are selected and
    gathered into the network."""
    P, u_s = _small_m_problem(n_u)
    w_small = min(hkl_kernel._SMALL_CAP, triton.next_power_of_2(131) // 4)
    assert 2 * n_u <= w_small and n_u < u_s <= w_small  # m = n_u, a truncated network
    run_hkl_triton(P, merge, "relaxed", None)
    assert all(p & 12 == 12 for p in hkl_kernel.last_paths.tolist())  # bit 2: the small network, 3: whole lists
    P.z = P.z.detach().clone()  # fp32 on the CPU: the first run's z is P.z itself, and holds its gradient
    run_hkl_triton(P, merge, "relaxed", 2 * w_small)  # uncommon_topk 128: W 128, W_SMALL 32, the same m
    paths = hkl_kernel.last_paths.tolist()
    assert all(p & 4 for p in paths) and 0 < sum(p & 1 for p in paths) == sum(p & 9 == 1 for p in paths)


def test_tied_keys_take_the_same_columns_on_both_paths():
    """Student logits tied at the m-th largest uncommon value (in every row ranks 4-9 share a value, 2 of them
    inside the top m = 6): the small network's sort of the whole lists (W_SMALL = 64) and the selected windows
    (uncommon_topk 128: W_SMALL = 32 below the student's 43 keys) take the same tied columns, the lowest (prefix's
    row order), in the same order: bitwise the same loss and gradient. A whole-list sort that took other tied
    columns would put the sorted-L1 gradient on them, so the result would depend on the hint state, which picks
    the path."""
    P, _ = _small_m_problem(6)
    cs, ct = pairs_of(P, "relaxed")
    u = torch.ones(P.z.shape[1], dtype=torch.bool)
    u[cs.long()] = False
    ids = torch.nonzero(u).squeeze(1)
    z = P.z.clone()
    for r in range(z.shape[0]):
        top = ids[torch.sort(z[r, ids], descending=True, stable=True).indices]
        z[r, top[4:10]] = float(z[r, top[7]])
    dev = device()
    out = []
    for topk, whole in ((None, True), (128, False)):
        zz = z.to(dev).clone().requires_grad_()  # a copy per run: z itself would accumulate both gradients
        args = [x.to(dev) if isinstance(x, torch.Tensor) else x
                for x in (P.t, P.t_cols, P.col_mask, P.spans, 0.7, "first", None, P.t_chain, cs, ct)]
        loss, _, _ = torch.ops.xtoken.hkl_rows(zz, *args, topk, "triton")
        assert all(bool(p & 8) == whole and p & 3 == 3 for p in hkl_kernel.last_paths.tolist())
        (loss * P.g_out.to(dev)).sum().backward()
        out.append((loss.detach().cpu(), zz.grad.cpu().clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _small_m_problem(n_u):
    """V_S = 131, V_T = 211; allowed columns: the teacher ids paired with a student id and n_u others, so
    m = |U_T| = n_u. -> (problem, |U_S|)."""
    P = make_problem(7, 131, 211, 6, 2, 0, "all", 0.02, False)
    cs, ct = pairs_of(P, "relaxed")
    mask = torch.zeros(211, dtype=torch.bool)
    mask[ct.long()] = True
    free = torch.nonzero(~mask).squeeze(1)
    mask[free[torch.randperm(free.numel(), generator=torch.Generator().manual_seed(3))[:n_u]]] = True
    P.col_mask = mask
    return P, 131 - torch.unique(cs).numel()


def test_uncommon_set_listed_whole_only_near_m(no_slack):
    """The first pass appends a side's whole uncommon set only when it is at most 2 m + _SLACK keys (here 2 m): the
    teacher's 6 (= m) are, so every chunk hits on that side; the student's 43 are not (more than 2 m = 12, though
    within the list's capacity min(V_S, 2 m_up) = 131, where the rule before appended them whole), so each
    program's first chunk, with no hint yet, compacts in a second pass."""
    P, u_s = _small_m_problem(6)
    assert 12 < u_s <= 131
    run_hkl_triton(P, "first", "relaxed", None)
    paths = [p & 3 for p in hkl_kernel.last_paths.tolist()]
    assert paths[:2] == [2, 2] and all(p & 2 for p in paths)


def test_hint_state_outlives_the_launch(no_slack):
    """Each program's hint state (the |θ − c| scales and what gives the level-1 shifts) is kept from launch to launch:
    run again, even the programs' first chunks hit on both sides, with bitwise the same results. Student logits near
    40 and m = 4 (the list's capacity 8 below |U_S|), every row a copy of one (θ does not move): a hint that lost its
    shift (θ − anchor: 0, the shift then the row's mean) would list about half of them and overflow."""
    P, _ = _small_m_problem(6)
    P.z = P.z[:1].expand_as(P.z) + 40.0
    first = run_hkl_triton(P, "first", "relaxed", 4)[0]
    paths = [p & 3 for p in hkl_kernel.last_paths.tolist()]
    assert paths == [2, 2, 2, 2, 3, 3]  # no hint in each program's first two chunks (no θ, then no Δθ yet)
    P.z = P.z.detach().clone()  # fp32 on the CPU: the first run's z is P.z itself, and holds its gradient
    again = run_hkl_triton(P, "first", "relaxed", 4)[0]
    assert [p & 3 for p in hkl_kernel.last_paths.tolist()] == [3] * 6 and torch.equal(first, again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams (the CPU has one state per problem)")
def test_hint_state_per_stream(monkeypatch):
    """Launches on two CUDA streams keep two hint states: running at once on one, they would interleave a program's
    reads and writes (each thread reads the state for itself), so its warps could append with different hints."""
    monkeypatch.setattr(hkl_kernel, "_hint_states", {})
    dev = torch.device("cuda")
    a = hkl_kernel._hint_state(dev, 1, (64, 64, 8))
    with torch.cuda.stream(torch.cuda.Stream(dev)):
        b = hkl_kernel._hint_state(dev, 1, (64, 64, 8))
    assert b.data_ptr() != a.data_ptr() and hkl_kernel._hint_state(dev, 1, (64, 64, 8)) is a


@pytest.fixture
def no_slack(monkeypatch):
    """L's capacity 2 m, below the rows' |U|: the first pass appends only the hinted bins (not the whole row). Two
    programs, as under the interpreter, also on CUDA: the hint needs a program to run several chunks (k = pid,
    pid + 2, ...), which the expected paths below assume."""
    monkeypatch.setattr(hkl_kernel, "_SLACK", 0)
    monkeypatch.setattr(hkl_kernel, "_hint_states", {})  # a fresh hint state: no program has seen a chunk
    monkeypatch.setattr(hkl_kernel, "_programs", lambda device, K, per_program: min(2, K))


def test_single_pass_compaction_hits(no_slack, monkeypatch):
    """One-row chunks from one distribution (4 problems), one of them sorted ascending (its top m at the end of the
    row): each program's first two chunks have no |θ − c| yet (S2 / T2 compact); later chunks compact both sides in
    their first pass (hkl_kernel.last_paths: bit 0 student, bit 1 teacher), the sorted one included, but for a θ
    past the hint's margin e (~10 % per side by _track's 80th percentile; m = 20 of these few keys is noisy): 39 of
    the 48 later chunks hit on both sides (the shift θ_prev and margin 3e before the anchor: 22)."""
    hits = 0
    for seed in range(31, 35):
        monkeypatch.setattr(hkl_kernel, "_hint_states", {})
        P = make_problem(seed, 97, 61, 16, 1, 0, "all", 0.0, True)
        s_lo, _, t_lo, _ = P.spans[6].tolist()
        P.z[s_lo] = P.z[s_lo].sort().values
        P.t[t_lo] = P.t[t_lo].sort().values
        run_hkl_triton(P, "first", "none", 20, tau=1.0)
        paths = hkl_kernel.last_paths.tolist()
        assert paths[:4] == [0] * 4 and (seed > 31 or paths[6] == 3)
        hits += paths[4:].count(3)
    assert hits >= 32


def test_single_pass_compaction_merged_rows(no_slack):
    """Several-row chunks (merged S, sparse teacher keyed on T): the merged level-1 pass compacts too. A sparse row
    (k entries ≤ the list) is always appended whole."""
    P = make_problem(31, 97, 61, 16, 3, 7, "all", 0.0, True)
    run_hkl_triton(P, "mean", "none", 20)
    paths = hkl_kernel.last_paths.tolist()
    assert all(p & 2 for p in paths)
    assert any(p & 1 for p, (s_lo, s_hi, _, _) in zip(paths, P.spans.tolist()) if s_hi - s_lo > 1)


def test_single_pass_misses_fall_back(no_slack):
    """Program 0 (even chunks, the second one 0's hint already set) gets rows the hint cannot hold: the student's
    logits × 0.25 (θ − anchor a quarter of the previous rows': its list short of m keys), all-equal rows (one bin),
    +1000 on most of each row's columns (the anchor, their mean, ≈ 600 below them: end bins, the lists past their
    capacity, and bin b1 too, so S2 / T2 then take the exact compaction). None of the 8 bins _rescue counts next to
    b_h holds m to capacity keys at and above it there (path bits 5 / 6 clear): those sides must take the exact path
    and still match the oracle. (A row moved as a whole, ±1000 before the anchor, now hits, and a row × 0.25 of
    4,099 columns is rescued: test_single_pass_compaction_multi_tile.)"""
    P = make_problem(31, 97, 61, 16, 1, 0, "all", 0.0, True)
    spans = P.spans.tolist()
    P.z[spans[6][0]] *= 0.25
    P.z[spans[10][0]] = 0.25
    P.t[spans[10][2]] = -0.5
    P.z[spans[14][0], :60] += 1000.0
    P.t[spans[14][2], :50] += 1000.0
    run_hkl_triton(P, "first", "none", 20, tau=1.0, tie_sums=True)
    paths = hkl_kernel.last_paths.tolist()
    assert paths[6] & 33 == 0 and paths[10] == 0 and paths[14] == 0
    assert sum(p & 1 for p in paths[5::2]) >= 5  # program 1's rows are unchanged: its student side keeps hitting


@pytest.mark.parametrize("m", [600, 1000])
def test_single_pass_compaction_multi_tile(no_slack, m):
    """Multi-tile rows in bf16 (hub column, relaxed pairs: |U_S| = 1731, |U_T| = 1296). m = 600, L's capacity 1200
    below both: one-pass hits from each program's third chunk on; chunk 6 (student −2, teacher +2: moved as a whole)
    hits too, its shift following the row's anchor (_anchor; before it, the student side fell back); chunk 8 (the
    student × 0.25) misses on the student side, short of m, and _rescue lists it from a bin below b_h (path bit 5;
    before it, S2 compacted). m = 1000, capacity 2000: both uncommon sets fit their lists, so
    the first pass appends them whole and every chunk hits on both sides, the first two of each program and the
    changed ones included."""
    P = make_problem(22, 4099, 4111, 10, 1, 0, "covered", 0.05, 300)
    s_lo, _, t_lo, _ = P.spans[6].tolist()
    P.z[s_lo] -= 2.0
    P.t[t_lo] += 2.0
    P.z[P.spans[8, 0]] *= 0.25
    run_hkl_triton(P, "first", "relaxed", m, dt=torch.bfloat16)
    paths = hkl_kernel.last_paths.tolist()
    if m == 600:
        assert paths[:4] == [0] * 4 and paths[4:8] == [3] * 4 and paths[8] == 32 | 2 and paths[9] == 3
    else:
        assert paths == [3] * 10


@triton.jit
def _hint_edge_kernel(e_ptr, out_ptr, n, cap, N: tl.constexpr):
    e = tl.load(e_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), hkl_kernel._bin_edge(hkl_kernel._hint_bin(e, n, cap)))


def test_hint_margin():
    """The first pass appends the keys x with x − c ≥ the edge of _hint_bin's bin: the margin e below the shift,
    rounded down to its half-octave bin's end (the bins split |x − c| at 2^k and 1.5 · 2^k): −1.5 e ≤ edge ≤ −e for e
    in the fine bins' range (3e before the raw rows' anchor; test_single_pass_* check the paths it gives). Every key
    where the side's uncommon set fits the list (n ≤ cap: −inf); none while e is unknown (+inf: NaN, no compare
    holds)."""
    e = torch.cat([2.0 ** torch.linspace(-6, 7, 62), torch.tensor([float("inf"), 0.3])])
    dev = device()
    out = torch.zeros(64, device=dev)
    _hint_edge_kernel[(1,)](e.to(dev), out, 10_000, 100, N=64)
    edge = out.cpu()
    assert bool(((edge[:62] >= -1.5 * e[:62]) & (edge[:62] <= -e[:62])).all()), (e, edge)
    assert torch.isnan(edge[62])
    _hint_edge_kernel[(1,)](e.to(dev), out, 100, 100, N=64)
    assert bool((out.cpu() == float("-inf")).all())


@triton.jit
def _bin_edges_kernel(out_ptr):
    b = tl.arange(0, 64)
    tl.store(out_ptr + b, hkl_kernel._bin_edge(b))


@triton.jit
def _rescue_kernel(x_ptr, cls_ptr, lse_ptr, dst_ptr, out_ptr, n, r0, rows, c, target, cap, cnt, b_h,
                   STUDENT: tl.constexpr, BLOCK: tl.constexpr):
    if STUDENT:  # one raw student row (smap < 0: uncommon): its keys are its logits, packed with their columns
        src = (x_ptr, 0, lse_ptr, r0, rows, 1.0, cls_ptr, c)
        cnt, ok = hkl_kernel._rescue(2, n, src, target, cap, dst_ptr, cnt, b_h, True, False, BLOCK)
    else:  # one raw dense teacher row (class 1: uncommon), keys alone
        src = (x_ptr, 0, x_ptr, 0, cls_ptr, lse_ptr, lse_ptr, lse_ptr, r0, rows, 0.0, 1.0, c)
        cnt, ok = hkl_kernel._rescue(3, n, src, target, cap, dst_ptr, cnt, b_h, False, False, BLOCK)
    tl.store(out_ptr, cnt)
    tl.store(out_ptr + 1, ok)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("b_h,target,cap,expect", [
    (44, 300, 1000, 41),  # short (116 keys of bin ≥ 44): the highest bin below with ≥ 300 keys, 41 (379)
    (38, 300, 400, 41),  # past the capacity (509 > 400): bin 41 above it
    (26, 300, 600, 34),  # past it (689) with bin 41 beyond the 8 bins counted: the last, 34, counts every bin above
    (58, 300, 1000, None),  # short, no bin of the 8 below holds 300 keys
    (38, 300, 378, None),  # bin 41 holds the top 300 but not within the capacity
])
def test_rescue(side, b_h, target, cap, expect):
    """_rescue on a 3,001-column row (47 tiles of 64: a lane's 16-bit counters hold 47 keys) whose uncommon keys
    fill bins 18–46 about the shift c (bin ≥ b ⟺ x − c ≥ _bin_edge(b), counted here in fp32 as the kernel does):
    the bin it picks (the highest of the 8 next to b_h on the side the first pass missed with target to cap keys at
    and above it) and the list it writes, every uncommon key of that bin and above in row order (the student's as
    _pack words with their columns, the teacher's keys alone; a teacher column outside the allowed set, class 0, is
    not a key); where none, the first pass's count and an untouched list."""
    dev = device()
    edges = torch.zeros(64, device=dev)
    _bin_edges_kernel[(1,)](edges)
    edges = edges.cpu()
    g = torch.Generator().manual_seed(5)
    n, c = 3001, 0.5
    x = torch.randn(n, generator=g) * 0.3 + c
    u = torch.rand(n, generator=g) < 0.4
    above = [int((u & (x - c >= edges[b])).sum()) for b in range(64)]  # keys of bin ≥ b
    assert above[41] == 379 and above[42] == 288 and above[34] == 569  # the bins the cases name
    first = above[b_h]
    student = side == "student"
    if student:
        cls = torch.where(u, -1, 0).int()
    else:  # uncommon 1; the rest common (2) or outside the allowed set (0)
        cls = torch.where(u, 1, torch.where(torch.arange(n) % 3 == 0, 0, 2)).to(torch.int8)
    out = torch.zeros(2, dtype=torch.int32, device=dev)
    dst = torch.full((cap + 1,), -7, dtype=torch.int64 if student else torch.int32, device=dev)
    _rescue_kernel[(1,)](x.to(dev), cls.to(dev), torch.zeros(1, device=dev), dst, out, n, 0, 1, c, target, cap, first,
                         b_h, STUDENT=student, BLOCK=64)
    cnt, ok = out.tolist()
    if expect is None:
        assert (cnt, ok) == (first, 0) and bool((dst == -7).all())
        return
    cols = torch.nonzero(u & (x - c >= edges[expect])).squeeze(1)
    assert (cnt, ok) == (above[expect], 1) == (cols.numel(), 1)
    words = dst[:cnt].cpu()
    if student:
        assert torch.equal((words & 0xFFFFFFFF) ^ 0x7FFFFFFF, cols)  # in row order
        k = (words >> 32).int()
    else:
        k = words
    assert torch.equal((k ^ ((k >> 31) & 0x7FFFFFFF)).view(torch.float32), x[cols])  # _unkey: the logits


@triton.jit
def _anchor_kernel(x_ptr, out_ptr, C):
    tl.store(out_ptr, hkl_kernel._anchor(x_ptr, C))


def test_anchor():
    """_anchor (a raw row's shift base) against float64: the mean of the finite values among a row's first 2,048
    columns; a shorter row, −inf / NaN / +inf entries left out, none finite -> 0, values near the fp32 maximum (no
    overflow in the sum) clamped to 1e30."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3000, generator=g) * 4 + 7
    x[1, 5:900] = float("-inf")
    x[2, 3] = float("nan")
    x[2, 10] = float("inf")
    x[3, :2048] = float("-inf")
    x[4, :2048] = 3.0e38
    rows = [(x[r, :2048], 3000) for r in range(5)] + [(x[5, :700], 700)]
    out = torch.zeros(6, device=device())
    for r, (_, C) in enumerate(rows):
        _anchor_kernel[(1,)](x[r].to(device()), out[r:], C)
    for r, (v, _) in enumerate(rows):
        fin = v[v.abs() < float("inf")].double()
        ref = min(float(fin.mean()), 1e30) if fin.numel() else 0.0
        # a summation tree of depth 11 over x / 2048, then × 2048 / n: 14 roundings of at most u relative of Σ|x|/n
        bound = 14 * 2.0 ** -24 * (float(fin.abs().mean()) if fin.numel() else 0.0)
        assert abs(float(out[r]) - ref) <= bound, (r, float(out[r]), ref)
    assert float(out[4]) == float(torch.tensor(1e30)) and float(out[3]) == 0.0  # clamped; none finite


@triton.jit
def _tile_has_kernel(ub_ptr, out_ptr, n, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    tl.store(out_ptr + t, hkl_kernel._tile_has(ub_ptr, t * BLOCK, n, BLOCK).to(tl.int32))


@pytest.mark.parametrize("block", [64, 2048, 4096, 8192])
def test_tile_has(block):
    """_uncommon_bits (64-id blocks, 64 per int64 word) and the row passes' per-tile test read from it: against
    `any` per tile of a mask whose True ids cluster (long empty runs, single ids at word and tile edges), one id past
    a tile's end and before its start included."""
    n = 3 * 8192 + 517
    u = torch.zeros(n, dtype=torch.bool)
    u[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:40]] = True
    u[:9000] = False
    for i in (12287, 12288, 16383, 16384 + 63, 16384 + 64, n - 1):
        u[i] = True
    dev = device()
    tiles = triton.cdiv(n, block)
    out = torch.zeros(tiles, dtype=torch.int32, device=dev)
    _tile_has_kernel[(tiles,)](hkl_kernel._uncommon_bits(u.to(dev)), out, n, BLOCK=block)
    ref = torch.nn.functional.pad(u, (0, tiles * block - n)).view(tiles, block).any(1)
    assert ref.any() and not ref.all()
    assert torch.equal(out.cpu().bool(), ref)


@pytest.mark.parametrize("merge,rows", [("first", 1), ("mean", 3)])
def test_single_pass_skips_tiles_without_uncommon_ids(no_slack, merge, rows):
    """Common pairs s = t for the ids below 3,000: the uncommon ids of both sides lie in the last of their 1,024-id
    interpreter tiles (2,048 on a GPU), the first ones skip the append (_tile_has). The one-pass lists must still
    hold every key of bin ≥ b1: the results match the oracle, and chunks past each program's first two hit."""
    P = make_problem(23, 4099, 4111, 10, rows, 0, "all", 0.0, False)
    ids = torch.arange(3000)
    P.proj = types.SimpleNamespace(common_pairs=lambda pairs: (ids, ids))
    run_hkl_triton(P, merge, "relaxed", 600, dt=torch.bfloat16)
    paths = [p & 3 for p in hkl_kernel.last_paths.tolist()]
    assert paths[4:] == [3] * 6


def test_hint_paths_script_checks_its_runs_first(capsys, monkeypatch):
    """A malformed run failed with an IndexError after the model's logits were computed (about 20 s)."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "hint_paths.py"
    for run in ("128", "128:x", "0:0.5", "128:1.5", "1:0.5:2:3"):
        monkeypatch.setattr("sys.argv", ["hint_paths.py", "no-such-model", run])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(script), run_name="__main__")
        assert e.value.code == 2 and "expected m" in capsys.readouterr().err, run


def test_hint_paths_script(capsys, monkeypatch):
    """scripts/hint_paths.py (the measurement behind bench/costmodel.py's HIT_RATE and RESCUE_RATE) on a tiny random
    GPT-2 over the offline gpt2 tokenizer, both kinds of run: its counts of hits, rescues and exact paths per side
    against a count of its last run's paths here (past each program's first two chunks; the tiny model's rows are
    near-uniform, and hit), and the sets it builds (|U_T| = m where uncommon_topk is above m)."""
    import re
    import runpy
    from pathlib import Path

    n = 400 if torch.cuda.is_available() else 8  # a GPU runs a program per SM
    script = Path(__file__).resolve().parents[1] / "scripts" / "hint_paths.py"
    argv = ["hint_paths.py", "tiny-gpt2:gpt2", "128:0.15", "128:0.15:8192", "--chunks", str(n)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "uncommon_topk = 128, |U_S| = 7538, |U_T| = 7538 of 50257" in lines[0], lines
    assert "uncommon_topk = 8192, |U_S| = 7538, |U_T| = 128 of 50257" in lines[1], lines
    paths = hkl_kernel.last_paths.tolist()[2 * hkl_kernel._programs(device(), n, 0):]
    assert len(paths) > 0 and f"{len(paths)} chunks" in lines[1]
    for side, hit, res in (("student", 1, 32), ("teacher", 2, 64)):
        h, r = sum(p & hit != 0 for p in paths), sum(p & res != 0 for p in paths)
        assert re.search(f"{side} hit {h}, rescued {r}, exact {len(paths) - h - r}[;( ]", lines[1]), lines[1]
