"""The Triton backends of xtoken::pkl_rows / xtoken::hkl_rows against float64 row-space oracles (helpers.py), on
CUDA when present and under TRITON_INTERPRET=1 on the CPU otherwise.

Sizes: Hypothesis cases at small vocabularies (odd and prime widths, partial tiles), plus explicit cases at
multi-tile sizes (V_S and V_T > 4,096: several BLOCK tiles of the online LSE even at the GPU configs, full tiles),
more chunks than programs, a teacher column shared by hundreds of student rows, τ ≠ 1, every merge, dense and
sparse teacher, bf16 and fp32. The interpreter runs a representative subset of the explicit cases; the ones marked
``large`` run on a GPU (or with XTOKEN_TEST_LARGE=1)."""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import device, examples, make_problem, run_hkl_triton, run_pkl
from xtoken_ext.ops import _tl
from xtoken_ext.ops import pkl as _ops  # noqa: F401  (registers both xtoken:: ops)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked interpreter lanes evaluate log(0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_hkl(P, dt, merge, tau, pairs, uncommon_topk):
    run_hkl_triton(P, merge, pairs, uncommon_topk, tau, dt, what="op")


VOCAB = st.one_of(st.sampled_from([61, 97, 131]), st.integers(5, 140))
problems = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2 ** 16), V_S=VOCAB, V_T=VOCAB, n_chunks=st.integers(1, 4), max_rows=st.integers(1, 3),
    sparse_k=st.sampled_from([0, 0, 7, 40]), mask_mode=st.sampled_from(["covered", "all", "subset"]),
    empty_rows=st.sampled_from([0.0, 0.2]), hub=st.booleans()))


@settings(max_examples=examples(20))
@given(pb=problems, dtype=st.sampled_from(list(DTYPES)), merge=st.sampled_from(["mean", "first", "chain"]),
       tau=st.sampled_from([1.0, 0.7, 2.0]), learn_w=st.booleans())
def test_pkl_small_matches_oracle(pb, dtype, merge, tau, learn_w):
    run_pkl(make_problem(**pb), DTYPES[dtype], merge, tau, learn_w, eps=1e-10 if pb["mask_mode"] == "all" else 0.0)


@pytest.mark.parametrize("eps,kind", [(0.0, 0), (1e-50, 0), (1e-40, 1), (2.0 ** -126, 2), (1e-10, 2)])
def test_pkl_eps_kinds(eps, kind):
    """The KL pass is specialized by the fp32 eps the kernel receives (ops.pkl_kernel._eps_kind): 0 (Mu taken from
    l; 1e-50 rounds to it), a positive eps below the smallest normal fp32 (q + eps may be subnormal: the SFU log keeps
    its subnormal scaling) and a normal one (the log without it). Most students and the teacher columns only they
    reach sit 90 below the rest, so q + eps is subnormal at those columns for eps = 0 and 1e-40 (their P tiny too;
    test_pkl_gradient_where_q_is_below_the_normal_range has P large there): on a GPU the unscaled log would flush it
    to 0 and make the loss NaN or +inf there (under the interpreter both logs are tl.log: there the kinds are checked
    by _eps_kind). Each matches the float64 oracle (eps = 0 on the covered columns: a column without W entries has
    q = 0, an infinite KL)."""
    from xtoken_ext.ops.pkl_kernel import _eps_kind

    assert _eps_kind(eps) == kind
    P = make_problem(seed=3, V_S=97, V_T=61, n_chunks=3, max_rows=2, sparse_k=0,
                     mask_mode="covered" if kind == 0 else "all", empty_rows=0.0, hub=False)
    keep = torch.arange(P.z.shape[1]) < 8
    reached = torch.zeros(P.t.shape[1], dtype=torch.bool)
    reached[P.w_idx[keep][P.w_idx[keep] >= 0].long()] = True
    P.z[:, ~keep] -= 90.0
    P.t[:, ~reached] -= 90.0
    # the shifted students' gradients are subnormal (p ~ 1e-40): they are checked up to flush-to-zero (2^-126
    # absolute, the kernels' ftz exps' own semantics); there the fp32 backends, torch and native included, are off
    # by up to 3 % (≤ 2.5e-42), 82x the relative bound alone. The other entries keep the relative bound.
    run_pkl(P, torch.float32, "mean", 1.0, False, eps=eps, grad_floor=2.0 ** -126)


@settings(max_examples=examples(20))
@given(pb=problems, dtype=st.sampled_from(list(DTYPES)), merge=st.sampled_from(["mean", "first", "chain"]),
       tau=st.sampled_from([1.0, 0.7, 2.0]), pairs=st.sampled_from(["relaxed", "strict", "none"]),
       uncommon_topk=st.sampled_from([None, 3, 20]))
def test_hkl_small_matches_oracle(pb, dtype, merge, tau, pairs, uncommon_topk):
    run_hkl(make_problem(**pb), DTYPES[dtype], merge, tau, pairs, uncommon_topk)


# Multi-tile cases: V_S = 4,099 and V_T = 4,111 (primes > 4,096), 5 chunks (> the 2 interpreter programs) of up to 3
# rows, a hub column reached by ~300 student rows, τ = 0.7. (merge, sparse k, dtype, learnable W / pairs), the
# first of each list in the interpreter's default run.
BIG = dict(V_S=4099, V_T=4111, n_chunks=5, max_rows=3, mask_mode="covered", empty_rows=0.05, hub=300)
PKL_BIG = [pytest.param("mean", 0, "bf16", False, id="mean-dense-bf16"),
           pytest.param("chain", 300, "fp32", True, id="chain-sparse-fp32-learnW", marks=pytest.mark.large),
           pytest.param("first", 0, "fp32", False, id="first-dense-fp32", marks=pytest.mark.large),
           pytest.param("mean", 300, "bf16", True, id="mean-sparse-bf16-learnW", marks=pytest.mark.large),
           pytest.param("chain", 0, "bf16", False, id="chain-dense-bf16", marks=pytest.mark.large)]
HKL_BIG = [pytest.param("mean", 0, "fp32", "relaxed", id="mean-dense-fp32-relaxed"),
           pytest.param("chain", 300, "bf16", "strict", id="chain-sparse-bf16-strict"),
           pytest.param("first", 0, "bf16", "none", id="first-dense-bf16-uld", marks=pytest.mark.large),
           pytest.param("mean", 300, "fp32", "relaxed", id="mean-sparse-fp32-relaxed", marks=pytest.mark.large),
           pytest.param("chain", 0, "fp32", "strict", id="chain-dense-fp32-strict", marks=pytest.mark.large)]


@pytest.mark.parametrize("merge,sparse_k,dtype,learn_w", PKL_BIG)
def test_pkl_multi_tile_matches_oracle(merge, sparse_k, dtype, learn_w):
    P = make_problem(seed=21, sparse_k=sparse_k, **BIG)
    assert int((P.w_idx == 0).sum()) >= 200  # the hub column
    run_pkl(P, DTYPES[dtype], merge, 0.7, learn_w)


@pytest.mark.parametrize("merge,sparse_k,dtype,pairs", HKL_BIG)
def test_hkl_multi_tile_matches_oracle(merge, sparse_k, dtype, pairs):
    run_hkl(make_problem(seed=22, sparse_k=sparse_k, **BIG), DTYPES[dtype], merge, 0.7, pairs, 1000)


def test_column_ell_and_residual_hold_every_entry():
    """The dense P-KL pass's W structure: each column's first min(length, K) entries in the slot-major column ELL
    (the longer columns ranked first, 1 .. n_long, then the spare r_spare, then the others), the rest as residual
    entries in W's column order, in pieces of rpiece entries of one column (the last one padded with -1), each piece
    keyed by its column and the column's rank, a column's first piece flagged by the sign bit of its keys, the list
    padded to whole entry blocks; the sparse teacher's entry list keyed per entry the same way; _column_slots takes
    K = 1 when a few long columns hold the extra entries and a larger K when many columns have 2-3 entries."""
    from xtoken_ext.ops.pkl_kernel import SLOTS, _column_slots, _residual_piece, _w_structure

    g = torch.Generator().manual_seed(0)
    V_S, V_T = 700, 1000
    w_idx = torch.randint(0, V_T, (V_S, SLOTS), generator=g, dtype=torch.int32)
    w_idx[torch.rand(V_S, SLOTS, generator=g) < 0.3] = -1
    w_idx[:300, 0] = 13  # a hub longer than several entry blocks
    st = _w_structure(w_idx, V_T, 64, 64)
    K = st["cslots"]
    flat = w_idx.reshape(-1).long()
    col_len = torch.bincount(flat[flat >= 0], minlength=V_T)
    assert st["r_spare"] == int((col_len > K).sum()) + 1
    rank = st["rank"][:V_T]
    assert (rank < st["r_spare"]).tolist() == (col_len > K).tolist()
    ranked = rank[col_len > 0]  # the columns with W entries: distinct ranks, the spare skipped
    assert ranked.unique().numel() == ranked.numel() and int((ranked == st["r_spare"]).sum()) == 0
    assert bool((rank[col_len == 0] == st["r_spare"]).all())
    # padded by a tile past the last one (C's loads are unmasked): the spare rank, no ELL entry
    pad = (-(-V_T // 64) + 1) * 64
    assert st["rank"].numel() == pad and bool((st["rank"][V_T:] == st["r_spare"]).all())
    assert st["cell_slot"].shape == (K, pad) and bool((st["cell_slot"][:, V_T:] == -1).all())
    P = st["rpiece"]
    n = st["n_pieces"]
    r_cols, r_ranks = (k & 0x7FFFFFFF for k in st["r_keys"])
    assert st["r_slot"].numel() == -(-n * P // 64) * 64 and bool((st["r_slot"][n * P:] == -1).all())
    pieces = st["r_slot"][:n * P].view(n, P)
    for c in range(V_T):
        want = torch.nonzero(flat == c).squeeze(1)  # W's slots of column c, in order
        assert st["cell_slot"][:, c].tolist() == want[:K].tolist() + [-1] * (K - min(K, len(want)))
        r = torch.nonzero(r_cols == c).squeeze(1)
        n_res = max(0, int(col_len[c]) - K)
        assert len(r) == -(-n_res // P) and bool((r_ranks[r] == st["rank"][c]).all())
        if len(r):
            assert bool((r[1:] == r[:-1] + 1).all())  # the column's pieces in a row
            assert pieces[r].reshape(-1).tolist() == want[K:].tolist() + [-1] * (len(r) * P - n_res)
            assert (st["r_keys"][0][r] < 0).tolist() == [True] + [False] * (len(r) - 1)
            assert (st["r_keys"][1][r] < 0).tolist() == [True] + [False] * (len(r) - 1)
    assert int((col_len[13] - K)) > 2 * 64 and bool((r_cols[1:] >= r_cols[:-1]).all())  # column-sorted
    # the sparse teacher's list: every entry, column-sorted, a column's first entry flagged
    e_cols = st["e_key"] & 0x7FFFFFFF
    assert st["nnz"] == int(col_len.sum()) and st["e_slot"].numel() == -(-st["nnz"] // 64) * 64
    assert bool((st["e_slot"][st["nnz"]:] == -1).all())
    assert (flat[st["e_slot"][:st["nnz"]]] == e_cols.long()).all() and bool((e_cols[1:] >= e_cols[:-1]).all())
    assert (st["e_key"] < 0).tolist() == [True] + (e_cols[1:] != e_cols[:-1]).tolist()
    few_long = torch.zeros(4096, dtype=torch.int64)
    few_long[:20] = 300
    few_long[20:3000] = 1
    many_short = torch.randint(1, 4, (4096,), generator=g)
    assert _column_slots(few_long, 2048, 4096) == 1 and _column_slots(many_short, 2048, 4096) > 1
    # R's pieces: long for a few long columns, one entry where most residual columns have one entry past K
    one_past = torch.full((4096,), 5)
    assert _residual_piece(few_long, 1, 4096) == 4 and _residual_piece(one_past, 4, 4096) == 1


@pytest.mark.parametrize("merge,dtype", [pytest.param("first", "fp32", id="first-fp32"),
                                         pytest.param("mean", "bf16", id="mean-bf16")])
def test_pkl_hub_longer_than_entry_block(merge, dtype):
    """Dense teacher, a hub column with more than two blocks of residual W entries (at the active tile geometry)
    inside a teacher tile: the residual pass sums it over several blocks (read-add-write across blocks) and the
    tile adds that sum to its column ELL's slots."""
    from xtoken_ext.ops import pkl_kernel as K

    bt, be = K._TILES["BLOCK_T"], K._TILES["BLOCK_E"]
    hub = bt // 2 + 3
    P = make_problem(seed=7, V_S=4 * be, V_T=2 * bt + 37, n_chunks=3, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.05, hub=True)
    w = P.w_idx.clone()  # move the hub from column 0 to column `hub`, inside the first tile
    P.w_idx[w == 0], P.w_idx[w == hub] = hub, 0
    P.col_mask[[0, hub]] = P.col_mask[[hub, 0]].clone()
    st = K._w_structure(P.w_idx.to(torch.int32).contiguous(), 2 * bt + 37, bt, be)
    assert int(((st["r_keys"][0] & 0x7FFFFFFF) == hub).sum()) * st["rpiece"] > 2 * be
    assert int(st["rank"][hub]) < st["r_spare"]
    run_pkl(P, DTYPES[dtype], merge, 0.7, False)


@pytest.mark.parametrize("width,piece", [(1, 1), (1, 2), (1, 4), (2, 4), (3, 2), (4, 1)])
def test_pkl_any_column_ell_width(width, piece, monkeypatch):
    """Every column-ELL width K and residual piece size the W structure may choose (forced here): the dense pass's
    C1 (K slots plus the residual entries of longer columns, summed by R in pieces) gives the oracle's loss and
    gradient, one row with a frozen W (h kept by rank) and merged rows with a learnable one (h kept by column)."""
    from xtoken_ext.ops import pkl_kernel as K

    monkeypatch.setattr(K, "_column_slots", lambda *a: width)
    monkeypatch.setattr(K, "_residual_piece", lambda *a: piece)
    for merge, learn_w in (("first", False), ("mean", True)):  # a fresh problem per run: run_pkl sets
        # requires_grad on fp32 logits in place
        P = make_problem(seed=30 + width, V_S=300, V_T=150, n_chunks=5, max_rows=2, sparse_k=0, mask_mode="covered",
                         empty_rows=0.05, hub=True)
        st = K._w_structure(P.w_idx.to(torch.int32).contiguous(), 150, K._TILES["BLOCK_T"], K._TILES["BLOCK_E"])
        assert (st["cslots"], st["rpiece"]) == (width, piece) and st["n_pieces"] > 0
        assert int((st["cell_slot"] >= 0).sum(0).max()) == width
        run_pkl(P, DTYPES["fp32"], merge, 0.7, learn_w)


@pytest.mark.parametrize("piece", [2, 4])
def test_pkl_residual_column_starting_at_a_block_boundary(piece, monkeypatch):
    """R's carry across entry blocks goes to the column cut by the boundary only: a column whose first piece starts
    a block gets none. The scratch row holds the previous chunk's h (u = x̄ − log q) at that column's rank, which a
    student row of that chunk (run by the same program) peaked on a hub student makes large enough to show (an
    off-by-one read of the column before the block passes every other test; with h kept as u it still fails this one
    at 95x / 5,000x the bound). Dense teacher, frozen W, K = 1."""
    from xtoken_ext.ops import pkl_kernel as K

    monkeypatch.setattr(K, "_column_slots", lambda *a: 1)
    monkeypatch.setattr(K, "_residual_piece", lambda *a: piece)
    P = make_problem(seed=31, V_S=300, V_T=150, n_chunks=5, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.05, hub=True)
    st = K._w_structure(P.w_idx.to(torch.int32).contiguous(), 150, K._TILES["BLOCK_T"], K._TILES["BLOCK_E"])
    n = K._TILES["BLOCK_E"] // piece
    assert any(int(st["r_keys"][1][i]) < 0 for i in range(n, st["n_pieces"], n))  # a first piece starts a block
    P.z[int(P.spans[0, 0]), int(torch.nonzero(P.w_idx[:, 0] == 0)[0, 0])] += 25.0  # chunk 0: a peak at a hub student
    run_pkl(P, DTYPES["fp32"], "first", 0.7, False)


@pytest.mark.parametrize("learn_w", [False, True], ids=["frozen", "learnable"])
def test_pkl_slots_in_any_order(learn_w):
    """The gradient pass reads a compact ELL (used slots first, masked per slot): W rows with empty slots before
    used ones and slots outside A (a mask that drops some covered columns) give the oracle's loss, gradient and
    (learnable W) ∂L/∂W in the caller's slot order."""
    P = make_problem(seed=11, V_S=300, V_T=211, n_chunks=6, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.05, hub=False)
    g = torch.Generator().manual_seed(5)
    perm = torch.stack([torch.randperm(4, generator=g) for _ in range(P.w_idx.shape[0])])
    P.w_idx, P.w_val = P.w_idx.gather(1, perm), P.w_val.gather(1, perm)
    used = P.w_idx >= 0
    assert bool((~used[:, :-1] & used[:, 1:]).any())  # some row has an empty slot before a used one
    P.col_mask[P.w_idx[used][::5].long()] = False  # slots outside A: weight 0 in the kernel's ELL
    run_pkl(P, DTYPES["fp32"], "mean", 0.7, learn_w)


@pytest.mark.parametrize("V_T", [63, 64])
def test_pkl_every_column_ranked(V_T):
    """Every teacher column has a W entry, so the dense frozen-W pass keeps h at ranks up to V_T + 1 (0 and r_spare
    are spares, _w_structure), V_T + 1 a power of two in one case: every rank's students read their own column's h,
    none a spare."""
    from xtoken_ext.ops import pkl_kernel as K

    P = make_problem(seed=3, V_S=300, V_T=V_T, n_chunks=3, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.0, hub=False)
    st = K._w_structure(P.w_idx.contiguous(), V_T, K._TILES["BLOCK_T"], K._TILES["BLOCK_E"])
    assert bool(st["has_entry"].all()) and int(st["rank"].max()) == V_T + 1
    for merge in ("first", "mean"):
        run_pkl(P, DTYPES["fp32"], merge, 0.7, False)


@pytest.mark.parametrize("shift", [-150.0, 150.0])
def test_pkl_teacher_far_from_zero(shift):
    """P-KL does not change when a constant is added to the teacher rows (their softmax does not). The dense
    frozen-W pass keeps h as u = x̄ − log(q + eps) and D takes 2^-24 h = exp2(u log₂e − β) (ops.pkl_kernel.
    _c_update): a teacher far from 0 (|x̄| ≈ 214 at τ = 0.7) tests that representation (the bound's κ grows with |t|
    as its error does), every merge and eps kind, and the spare u = −inf that weightless slots read (those of the
    students with fewer slots than their slice runs, empty W rows included: a finite spare makes exp2(−β) ≈ 2^300
    at shift −150, times a zero weight a NaN gradient)."""
    P = make_problem(seed=21, V_S=300, V_T=211, n_chunks=4, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.05, hub=True)
    assert bool(((P.w_idx >= 0).sum(1) == 0).any())  # empty W rows: every slot run for them is weightless
    P.t = P.t + shift
    for merge, eps in (("first", 0.0), ("mean", 0.0), ("chain", 0.0), ("mean", 1e-40), ("first", 1e-10)):
        run_pkl(P, DTYPES["fp32"], merge, 0.7, False, eps=eps)


@pytest.mark.parametrize("learn_w", [False, True], ids=["frozen", "learnable"])
def test_pkl_slices_by_slot_count(learn_w):
    """A gradient slice runs the instantiation with as many W slots as its widest student has (single rows: 1, 2, 3
    or 4, the real Llama-3 W's 8 slices taking 3, 3, 1, 1, 1, 1, 4, 4; merged rows: 1 or 4): W with rows cut to
    their first 1, 2 and 3 used slots on the first three slices gives the oracle's loss and gradient on each, with
    merged rows (mean) and single ones (first)."""
    from xtoken_ext.ops import pkl_kernel as K
    from xtoken_ext.ops._common import interpret

    span = K._SLICES["SLICE"] * (128 if interpret() else K._CONFIGS[0].kwargs["BLOCK_S"])  # students per slice
    P = make_problem(seed=17, V_S=4 * span + 37, V_T=150, n_chunks=5, max_rows=2, sparse_k=0, mask_mode="covered",
                     empty_rows=0.05, hub=False)
    for i in range(3):  # slice i: at most i + 1 slots per student
        rows = slice(i * span, (i + 1) * span)
        used = P.w_idx[rows] >= 0
        drop = used & (used.cumsum(1) > i + 1)  # every slot after a row's first i + 1 used ones
        P.w_idx[rows][drop], P.w_val[rows][drop] = -1, 0.0
    P.col_mask = torch.zeros_like(P.col_mask)  # "covered": the columns W still reaches
    P.col_mask[P.w_idx[(P.w_idx >= 0) & (P.w_val > 0)].long()] = True
    nslot = (P.w_idx >= 0).sum(1)
    assert [int(nslot[i * span:(i + 1) * span].max()) for i in range(4)] == [1, 2, 3, 4]
    for merge in ("mean", "first"):
        run_pkl(P, DTYPES["fp32"], merge, 0.7, learn_w)


@pytest.mark.parametrize("case", ["dense-first", "dense-mean", "sparse-chain", "dense-learnable"])
def test_pkl_slices_computed_by_other_programs(case, monkeypatch):
    """A chunk's gradient slices give bitwise the same results whichever program computes them. Under the
    interpreter the programs run one after another, each computing its own slices; here the kernel runs as two
    launches (one program per chunk: the chunks, published but with no slice taken, then only the guards), so that
    program 0 computes every other program's slices from what their owners published (scalars, scratch rows,
    tile maxima, d_r): the GPU path apart from its memory ordering."""
    from xtoken_ext.ops import pkl_kernel as K

    args = _case_args(case, seed=13, n_chunks=4)
    own = torch.ops.xtoken.pkl_rows(*args, "triton")
    monkeypatch.setattr(K, "help_split", True)
    _assert_bitwise(own, torch.ops.xtoken.pkl_rows(*args, "triton"))


def _case_args(case: str, seed: int, n_chunks: int, hub: bool = True) -> list:
    """xtoken::pkl_rows' arguments (before the backend) for a "<dense|sparse>-<merge|learnable>" case: bf16 logits,
    V 300 × 211, a hub column (``hub``), τ 0.7; "learnable" is merge="mean" with a learnable W."""
    kind, merge = case.split("-")
    learn_w = merge == "learnable"
    P = make_problem(seed=seed, V_S=300, V_T=211, n_chunks=n_chunks, max_rows=2,
                     sparse_k=7 if kind == "sparse" else 0, mask_mode="covered", empty_rows=0.05, hub=hub)
    dev = device()
    return [x.to(dev) if isinstance(x, torch.Tensor) else x
            for x in (P.z.to(torch.bfloat16), P.t.to(torch.bfloat16), P.t_cols, P.w_idx, P.w_val, P.col_mask,
                      P.spans, 0.7, "mean" if learn_w else merge, 0.0, P.t_chain, None, learn_w)]


def _assert_bitwise(ref: tuple, out: tuple) -> None:
    """The op's outputs (loss, grad, grad_w or None) bitwise equal; ref's gradient nonzero, its losses finite."""
    assert ref[1].abs().amax() > 0 and bool(torch.isfinite(ref[0]).all())
    for a, b in zip(ref, out, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("lane1", [False, True], ids=["tile-layout", "one-a-thread"])
def test_pkl_each_autotune_config(lane1, monkeypatch):
    """Each of the kernel's autotune configs (ops.pkl_kernel._CONFIGS: C's and D's gathers as Triton lays out the
    tile, or one element a thread through an [N/32, 32] view, _gather) matches the oracle on its own: dense merged
    and single rows, first, a learnable W (D's merged-rows gathers) and a sparse teacher."""
    from xtoken_ext.ops import pkl_kernel as K

    (cfg,) = [c for c in K._CONFIGS if c.kwargs["LANE1"] == lane1]
    monkeypatch.setattr(K, "_launch", K.launch_configs([cfg]))
    for sparse_k, cases in ((0, (("mean", False), ("first", False), ("mean", True))), (7, (("chain", False),))):
        P = make_problem(seed=13, V_S=300, V_T=211, n_chunks=4, max_rows=2, sparse_k=sparse_k, mask_mode="covered",
                         empty_rows=0.05, hub=True)
        for merge, learn_w in cases:
            run_pkl(P, DTYPES["bf16"], merge, 0.7, learn_w)


@pytest.mark.parametrize("case", ["dense-mean", "dense-first", "sparse-chain", "dense-learnable"])
def test_pkl_autotune_configs_agree_bitwise(case, monkeypatch):
    """The op is deterministic whichever config autotuning picks (it may pick differently in another process): the
    configs gather the same values and reduce them in the same layouts (the sm_90 TTGIR's reductions take the same
    operand layouts in both), so their results are bitwise the same."""
    from xtoken_ext.ops import pkl_kernel as K

    args = _case_args(case, seed=31, n_chunks=4)
    outs = []
    for cfg in K._CONFIGS:
        monkeypatch.setattr(K, "_launch", K.launch_configs([cfg]))
        outs.append(torch.ops.xtoken.pkl_rows(*args, "triton"))
    for out in outs[1:]:
        _assert_bitwise(outs[0], out)


@pytest.mark.parametrize("case", ["dense-mean", "dense-first", "sparse-mean", "sparse-chain", "dense-learnable",
                                  "sparse-learnable"])
def test_pkl_repeated_launches_on_the_same_buffers(case, monkeypatch):
    """Autotuning (several configs: ops.pkl_kernel._CONFIGS) times a launch by repeating it on the same arguments,
    with only the sync words zeroed in between (reset_to_zero), and then launches once more: every output and
    scratch row the kernel reads must come out of each launch as it went in (the h rows' spare, R's sums, a sparse
    teacher's h zeroed at its columns and its merged rows' accumulators cleared). Three launches of one config on
    the same buffers give bitwise one launch's results. The sparse teacher rows have no hub column, so that a
    program's first chunk does not overwrite every column its previous launch's last chunk left."""
    from xtoken_ext.ops import pkl_kernel as K

    sparse = case.startswith("sparse")
    args = _case_args(case, seed=29, n_chunks=5, hub=not sparse)
    if sparse:  # chunks on different columns
        assert len({tuple(sorted(r.tolist())) for r in args[2].cpu()}) > 1
    launch, sync = K.launch_configs(K._CONFIGS[:1]), K._pkl_kernel.arg_names.index("sync_ptr")
    monkeypatch.setattr(K, "_launch", launch)  # one config: no autotuning's runs on a GPU
    once = torch.ops.xtoken.pkl_rows(*args, "triton")

    def thrice(grid, *a, **kw):
        for _ in range(3):
            a[sync].zero_()
            launch(grid, *a, **kw)

    monkeypatch.setattr(K, "_launch", thrice)
    _assert_bitwise(once, torch.ops.xtoken.pkl_rows(*args, "triton"))


def test_pkl_grad_w_deterministic_matches_atomic():
    P = make_problem(3, 61, 97, 5, 3, 0, "covered", 0.1, True)
    dev = device()
    args = [x.to(dev) if isinstance(x, torch.Tensor) else x
            for x in (P.z, P.t, None, P.w_idx, P.w_val, P.col_mask, P.spans, 1.0, "mean", 0.0, None, None, True)]
    atomic = torch.ops.xtoken.pkl_rows(*args, "triton")[2]
    torch.use_deterministic_algorithms(True)
    try:
        det = [torch.ops.xtoken.pkl_rows(*args, "triton")[2] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(det[0], det[1])
    torch.testing.assert_close(det[0], atomic, rtol=1e-6, atol=1e-6 * det[0].abs().max().item())


def test_no_chunks_gives_zero_gradient():
    dev = device()
    P = make_problem(4, 13, 17, 1, 1, 0, "covered", 0.0, False)
    empty = torch.zeros(0, 4, dtype=torch.int64, device=dev)
    z = P.z.to(dev)
    loss, grad, _ = torch.ops.xtoken.pkl_rows(z, P.t.to(dev), None, P.w_idx.to(dev), P.w_val.to(dev),
                                              P.col_mask.to(dev), empty, 1.0, "mean", 0.0, None, None, False,
                                              "triton")
    assert loss.shape == (0,) and torch.equal(grad, torch.zeros_like(z))
    cs, ct = P.proj.common_pairs("relaxed")
    loss, grad, _ = torch.ops.xtoken.hkl_rows(z, P.t.to(dev), None, P.col_mask.to(dev), empty, 1.0, "mean", None,
                                              None, cs.to(dev), ct.to(dev), None, "triton")
    assert loss.shape == (0,) and torch.equal(grad, torch.zeros_like(z))


@pytest.mark.parametrize("sparse_k", [0, 7])
def test_pkl_w_words_cached_until_w_or_mask_changes(sparse_k):
    """pkl_kernel._w_words packs W's weights once per (w_idx, w_val, col_mask) and their versions
    (_common.cached_on_tensors): a second call with the same tensors takes the cached words (and gives the same
    losses and gradient, bitwise); an in-place update of the weights (an optimizer step on W) or a new column mask
    is packed anew and gives what fresh tensors give; inference tensors (no version counter) are packed every
    call."""
    from xtoken_ext.ops import pkl_kernel as pk

    dev = device()
    P = make_problem(5, 97, 61, 3, 2, sparse_k, "subset", 0.0, True)
    z, t = P.z.to(dev), P.t.to(dev)
    cols = None if P.t_cols is None else P.t_cols.to(dev)
    w_idx, w_val, mask, spans = (x.to(dev) for x in (P.w_idx, P.w_val, P.col_mask, P.spans))

    def run(w_val, mask):
        return torch.ops.xtoken.pkl_rows(z, t, cols, w_idx, w_val, mask, spans, 0.7, "mean", 0.0, None, None, False,
                                         "triton")[:2]

    def words(w_val, mask):
        return pk._w_words(w_idx, w_val, mask, not sparse_k, bool(sparse_k), pk._TILES["BLOCK_T"], pk._TILES["BLOCK_E"])

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    first = run(w_val, mask)
    assert words(w_val, mask) is words(w_val, mask)  # cached
    assert same(run(w_val, mask), first)
    w_val.mul_(torch.rand(w_val.shape, generator=torch.Generator().manual_seed(1)).to(dev) + 0.5)  # in place
    assert same(run(w_val, mask), run(w_val.clone(), mask)) and not same(run(w_val, mask), first)
    other = mask.clone()
    other[mask.nonzero()[:2, 0]] = False
    assert same(run(w_val, other), run(w_val, other.clone())) and not same(run(w_val, other), run(w_val, mask))
    with torch.inference_mode():
        frozen = w_val.clone()
    assert words(frozen, mask) is not words(frozen, mask) and same(run(frozen, mask), run(w_val, mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_scale_rows_is_the_rounded_product(dtype, monkeypatch):
    """_tl.scale_rows (the backward's in-place row scale after a Triton forward) equals torch's CPU mul_ by a column
    of scales (the product in fp32 for 16-bit rows, rounded once), NaN for NaN: rows strided wider than V, V past two
    GPU blocks with a partial last one, more rows than programs (each program strides over several), ±inf and NaN
    entries, scales 1 (skipped), 0, −1, random, one that underflows the row's dtype (a subnormal fp32 one among
    them), one that overflows it; the padding between rows stays as it was. Under the interpreter bf16 rounds toward
    zero instead, and its subnormal results are not checked (its cast mangles them: 7.2e-39 for 7.4e-41)."""
    monkeypatch.setattr(_tl, "SCALE_PROGRAMS", 5)
    gen = torch.Generator().manual_seed(0)
    N, V = 37, 2 * 4096 + 333
    buf = (torch.randn(N, V + 5, generator=gen, dtype=torch.float64) * 3).to(dtype)
    buf[6, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(N, generator=gen, dtype=torch.float64) * 6 - 3).to(md)
    scale[::5], scale[1::7], scale[2], scale[3], scale[4], scale[8] = 1.0, 0.0, -1.0, 1e-30, 1e30, 1e-40
    want = buf.clone()
    want[:, :V].mul_(scale.unsqueeze(1))
    got = buf.to(device(), copy=True)
    _tl.scale_rows(got[:, :V], scale.to(got.device))
    got = got.cpu()
    assert torch.equal(got[:, V:], buf[:, V:])
    if dtype == torch.bfloat16 and _tl.interpret():  # the interpreter truncates fp32 -> bf16 (its cast_impl): < 1 ulp
        exact = buf[:, :V].double() * scale.double().unsqueeze(1)
        ok = ((got[:, :V].double() - exact).abs() <= exact.abs() * 2.0 ** -7) | (got[:, :V].double() == exact)
        assert (ok | exact.isnan() & got[:, :V].isnan() | (exact != 0) & (exact.abs() < 2.0 ** -126)).all()
        assert not torch.equal(got, want)  # else the GPU's rounding is on here too: compare bitwise below
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA notion")
def test_public_losses_make_no_host_sync_on_cuda():
    import xtoken_ext as xt
    from helpers import random_alignment

    g = torch.Generator().manual_seed(0)
    proj = xt.Projection.random(257, 263, seed=0)
    alignment = random_alignment(g, 2, max_chunks=6)  # stays on the CPU, as the docs recommend
    z = torch.randn(2, alignment.student_chunk_ids.shape[1], 257, device="cuda", requires_grad=True)
    t = torch.randn(2, alignment.teacher_chunk_ids.shape[1], 263, device="cuda")
    for fn in (xt.pkl_loss, xt.hkl_loss):
        fn(z, t, alignment, proj).backward()  # warm-up: caches, compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn in (xt.pkl_loss, xt.hkl_loss):
            fn(z, t, alignment, proj).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@triton.jit
def _fast_math_kernel(x_ptr, log_ptr, exp_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(x_ptr + o)
    tl.store(log_ptr + o, _tl.fast_log(x))
    tl.store(exp_ptr + o, _tl.fast_exp(-tl.abs(_tl.fast_log(x))))


def test_fast_log_and_exp():
    """ops._tl.fast_log (P-KL's per-column ln(q + eps)) and fast_exp (the online softmax's terms; on a GPU the SFU's
    lg2.approx and ex2.approx.ftz, exact under the interpreter) against float64, subnormals included: ln of a
    subnormal is finite (lg2.approx.ftz alone would flush it to 0: −inf), within CUDA's documented bound for __logf
    (2^-21.41 absolute on [0.5, 2], 3 ulp elsewhere) plus an ulp for the 2^24 rescaling; e^y (y = −|ln x| down to
    −103) within 2 ulp plus the rounding of y·log₂e, or below 2^-126 where the GPU flushes it."""
    g = torch.Generator().manual_seed(0)
    N = 1024
    x = torch.cat([torch.tensor([0.0, 1e-45, 3e-42, 1e-39, 1.1e-38, 1.2e-38, 0.5, 1.0, 2.0, 1e30]),
                   torch.exp(torch.empty(N - 10).uniform_(-100, 20, generator=g))]).float()
    dev = device()
    log, exp = torch.empty(2, N, device=dev)
    _fast_math_kernel[(1,)](x.to(dev), log, exp, N=N)
    ref, got, ulp = torch.log(x.double()), log.cpu().double(), 2.0 ** -23
    assert got[0] == float("-inf") and bool(torch.isfinite(got[1:]).all())
    bound = torch.where((x >= 0.5) & (x <= 2), 2 ** -21.41, 3 * ulp * ref.abs()) + ulp * ref.abs()
    assert bool(((got - ref).abs()[1:] <= bound[1:]).all())
    y = -got.abs()  # the arguments fast_exp got, down to −103
    ref_e, got_e = torch.exp(y), exp.cpu().double()
    assert got_e[0] == 0 and bool(((got_e - ref_e).abs() <= (2 + y.abs()) * ulp * ref_e + 2.0 ** -126)[1:].all())


@triton.jit
def _pair_div_kernel(x_ptr, x24_ptr, a_ptr, log_ptr, div_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    x24 = tl.load(x24_ptr + o)
    tl.store(log_ptr + o, _tl.fast_log_pair(tl.load(x_ptr + o), x24))
    tl.store(div_ptr + o, _tl.fast_div(tl.load(a_ptr + o), x24))


def test_fast_log_pair_and_div():
    """ops._tl.fast_log_pair (P-KL's ln q from q and q_s = 2^24 q, q_s formed without q's rounding) and fast_div
    (h_u = e / q_s; on a GPU the SFU's reciprocal, div.approx.ftz) against float64 at the exact value the pair
    carries: a subnormal q's log comes from q_s, so it keeps the bits q lost (the log of the rounded q would not:
    3e-45 rounds to 2^-148, 7 % off); a / b within 2 ulp, or below 2^-126 where the GPU flushes it."""
    g = torch.Generator().manual_seed(1)
    N = 1024
    f64 = torch.float64
    xd = torch.cat([torch.tensor([3e-45, 1e-42, 7e-40, 1e-39, 1.17e-38, 1.2e-38, 0.5, 1.0, 2.0, 1.0], dtype=f64),
                    torch.exp(torch.empty(N - 10, dtype=f64).uniform_(-103, 0, generator=g))])
    x, x24 = xd.float(), (xd * 2.0 ** 24).float()
    a = torch.exp(torch.empty(N, dtype=f64).uniform_(-120, 0, generator=g)).float()
    a[:10] = 1.0
    dev = device()
    log, div = torch.empty(2, N, device=dev)
    _pair_div_kernel[(1,)](x.to(dev), x24.to(dev), a.to(dev), log, div, N=N)
    ulp, exact = 2.0 ** -23, x24.double() * 2.0 ** -24  # the value x24 carries (xd up to its fp32 rounding)
    ref, got = torch.log(exact), log.cpu().double()
    bound = torch.where((exact >= 0.5) & (exact <= 2), 2 ** -21.41, 3 * ulp * ref.abs()) + ulp * ref.abs()
    assert bool(((got - ref).abs() <= bound).all())
    assert abs(math.log(float(x[0])) - float(ref[0])) > 1000 * float(bound[0])  # the rounded q's log: far off
    ref_d, got_d = a.double() / x24.double(), div.cpu().double()
    assert bool(((got_d - ref_d).abs() <= 2 * ulp * ref_d + 2.0 ** -126).all())
