"""Fused P-KL Triton kernels: per-chunk loss and its gradient wrt the student logits in one launch (and, for a
learnable W, its gradient in a second kernel). Imported lazily by ``ops.pkl`` (its ``triton`` backend); math and
notation in ``ops.pkl``'s docstring. Bad-input and degenerate chunks follow the op contract (``ops._common``).

Structure derived once per W, device and tile geometry (cached, ``_w_structure``): W's nonzeros sorted by teacher
column; for the dense teacher pass a column ELL of K slots (each column's first min(length, K) entries, slot-major
8-byte words with the call's weight) and the residual entries of the longer columns (past their first K) in pieces
of one column, K and the piece size chosen per W (``_column_slots``, ``_residual_piece``: 1 and 4 for the real
Llama-3 × Qwen3 W, whose extra entries sit in a few long columns, 4 and 1 for ``Projection.random``); for a sparse
teacher the flat entry list (8-byte words of weight and student, a key per entry); and the gradient pass's
compact ELL: per student its used slots first (nslot int8) and per slot one slot-major int64 word (the weight, with
the slots outside A zeroed, ``w_eff``; the column or its rank) — 9 B per student plus the few multi-slot ids,
against 32 B for [V_S, 4] ids and weights (every row of the batch reads it from L2). Persistent
programs, one chunk at a time, fp32 math, int64 row offsets, every per-row pass a fixed-length loop over tiles:
  A  student rows: online LSE, Z_r = Σ_s p_r[s] a_s (a = row sums of w_eff); bad input makes the sums NaN, then
     the row is scanned (ops._tl.row_bad). Z < 2^-64 (the mass almost all on ids W maps nowhere): Z is summed
     again as 2^64 Z from 2^64 p (A's exps flush below 2^-126 on a GPU: _z_scaled) and the rows' stored LSE is
     lowered by 64 ln 2, so that every p formed below is 2^88 p, not 2^24 p (unit = 2^-64 in the factors of 1/Z,
     which then stay finite; below Z = 2^-180 the chunk counts as Z = 0, ops.pkl)                     [reads z]
  B  (sparse teacher, or several teacher rows) per-row teacher LSE over A, bad-input flag        [reads t]
  R  dense teacher: the residual entries in blocks of BLOCK_E, in pieces of RPIECE entries of one column (a
     column's last piece padded; 1, 2 or 4 per W, _residual_piece: 4 for the real W), gathering p̄' = Σ_r p_r at their
     students, each piece summed in its thread, then a segmented scan over the pieces per column (no differences of a
     running sum: cancellation would wipe out a small column sum; 906 / 650 / 412 instructions per thread per block
     at 1 / 2 / 4 entries a piece, sm_90 SASS), each column's sum stored where C keeps its h (the scratch row), read
     back by C before h replaces it.
  C  ONE flat loop over the teacher in BLOCK_T tiles: _single_pass for one student and one dense teacher row (merge
     "first" / "chain", and merge="mean"'s 1-to-1 chunks), software-pipelined by hand; _teacher_pass for a sparse
     teacher or merged rows (a loop over the chunk's rows inside the tile loop), unpipelined. Per tile:
     C1 Qu = Wᵀp̄ on its columns: the column ELL's K slots gather p̄' at their students (a slot past the column's
        length holds the zero word: weight 0) and sum in order, plus R's sum of a longer column (the longer columns
        hold the ranks below the spare r_spare, whose never-written h entry is 0: an unmasked gather at
        min(rank, r_spare), _w_structure). Every Qu is summed as 2^24 Qu
        (ops._tl.softmax_exp2: 2^24 p is one multiply-add and ex2) and q = Qu/(n_s Z) takes the 2^-24 back; q_s =
        2^24 q keeps the bits a subnormal q loses.
     C2 the teacher tile, read once: the merged teacher x̄ (vectorized loads, A selected with tl.where) folded into
        an online pass with rescaling: running max m (per tile; one dense row with a frozen W, per group of a
        thread's 8 lanes, rescaled to the row's after the loop: no cross-thread reduction and barrier per tile,
        _tl.lse_groups), l = Σe, e = exp(x̄ − m), S1 = Σ e (x̄ − m − log(q + eps)),
        Mu = Σ e q/(q + eps) (eps = 0: l, _c_update; the SFU's log, ops._tl.fast_log_pair: ~6 instructions where a
        correctly rounded logf takes ~25) and the column's h: dense, frozen W (FOLD) u = x̄ − log(q + eps),
        the log S1 takes anyway, else h_u = 2^-24 e/(q + eps) by the SFU's reciprocal with the tile's max (scaled by
        2^-24, h_u stays finite where q is subnormal and e is not: e/q reaches 2^149). A single dense row's NaN / +inf
        (bad input; B checks the rows where it runs) makes its lane's S1 term NaN: no per-tile count and reduction.
        With c the teacher's log-normalizer (−LSE for one dense row, computed at the end; −mean_r LSE_r after B):
        F = exp(m + c), L = τ² F (S1 + (m + c) l), M' = 2^-24 F Mu, h' = 2^-24 P/(q + eps) (P = exp(x̄ + c); M and
        h scaled by 2^-24, and so is g below): FOLD, exp2(u log₂e − β) with β = −c log₂e + 24; else h_u exp(m_tile −
        m) F.
     Sparse teacher: C1 first, over the whole entry list in blocks of BLOCK_E into a per-program scratch row (a
     column cut by a block boundary completed by read-add-write), then C2 over fixed BLOCK_T tiles of its k columns.
  C3 (sparse teacher or learnable W) h rescaled in the scratch row (tile maxima -> the final m); dense, frozen W:
     nothing (β is a scalar).
  D  gradient rows, in the logits' dtype: g'_s = Σ_slot w_eff (M' − h'[col]) (one ELL gather of the scratch row
     per slot, the dense frozen-W case's h' one exp2 of it; a slice runs as many slots as its widest student has:
     one on half of the real Llama-3 W's slices), dz_r = τ/(n_s Z) ((2^24 p_r)(g' − d_r)), the
     product of the 2^24- and 2^-24-scaled factors bounded where g' alone reaches 2^127, d_r = ⟨p_r, g'⟩ (kept as
     2^24 d_r / unit, which does not underflow where Z is tiny, and subtracted as (2^24 p_r)(2^24 d_r) 2^-24 unit);
     for one student row d_r = 0 exactly (⟨p, g⟩ = MZ − Σ Qu h: _slice_single, pipelined by hand; merged rows
     _slice_rows, unpipelined). The owner computes d_r, stores (M, coef, valid and unit, β) and publishes the chunk
     (a release); its dz rows are then G slices of SLICE student tiles that ANY program may take (an acquire on the
     chunk's sync word, read past L1) and compute. Every program, before
     its next chunk (whose C overwrites its scratch rows), takes open slices oldest first, its previous chunk's
     included, then waits for that chunk's slices in flight (a take never waits, so neither does anything it waits
     for). So a chunk's scratch row lives shorter than C/2 + D (a simulation of this protocol with 132 programs:
     54 rows live on average instead of 80, bench/costmodel.py), which brings the working set (z rows gathered in C,
     h rows read in D, W) under L2's size for the real Llama-3 × Qwen3 W. Dense teacher, frozen W: h is kept at the
     ranks of the columns with W entries (the ELL keys hold the rank; _w_structure), 72 % of V_T for that W.
     Results are bitwise the same whoever computes a slice (tests: help_split).
D's gathers and C1's of a single dense row run in Triton's layout of the tile (8 adjacent lanes a thread) or, in the
LANE1 autotune config, one element a thread (_gather).
Bytes per single-row chunk from HBM: z twice (A, D), t once (C), dz once; W's structure, a, mask and the scratch row
are shared or per-program and L2-resident (the z row too, for R's and C's gathers; streams read or written once
carry evict_first hints) (``bench/costmodel.py`` prints the model: C's tiles and R's blocks for a given W, and the
instructions each issues, from the sm_90 SASS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tl
from ._common import SLOTS, cached_on_tensors, covered_rows, interpret

NEG = _tl.NEG
PUB = tl.constexpr(1 << 16)  # a published chunk's sync word: (owner + 1)·PUB, + 1 per slice taken
_GRAD_W_BYTES = 256 << 20  # per-block h rows kept for the W gradient kernel
# the kernel's phases as _tl.PhaseTimes reports them (slots of _tl.lap): A the student rows (and the chunk's set-up),
# B the teacher rows' LSEs, R the residual sums (sparse: C1's entries), C the teacher pass, tail C3 and d_r up to
# the chunk's publication, D the slices this program took (any chunk's), wait the guard's polls and waits (and a
# sparse teacher's zeroing of h)
PHASES = ("A", "B", "R", "C", "tail", "D", "wait")
# tests: one program per chunk, run as two launches (_pkl_kernel's HELP), so that slices are computed by programs
# that do not own them, under the interpreter too
help_split = False


@triton.jit
def _seg_add(v1, f1, v2, f2):
    """Segmented-sum combine: a lane flagged as a segment start restarts the sum."""
    return tl.where(f2 != 0, v2, v1 + v2), f1 | f2


@triton.jit
def _seg_scan(v, f, N: tl.constexpr):
    """Segmented inclusive sum of v (a segment restarts where f ≠ 0) in two levels: within rows of 4 lanes, then the
    rows' totals across rows, each row's carry (the scan up to the row before) added to its lanes before their first
    segment start. A flat associative_scan runs in the entry loads' one-lane-per-thread layout, a warp scan per lane
    held (C: 2,784 instructions per thread per tile with it, 2,476 with this; sm_90 SASS, bench/sass.py)."""
    S: tl.constexpr = 4
    R: tl.constexpr = N // S
    s_in, f_in = tl.associative_scan((tl.reshape(v, [R, S]), tl.reshape(f, [R, S])), 1, _seg_add)
    last = tl.arange(0, S)[None, :] == S - 1
    inc, _ = tl.associative_scan((tl.sum(tl.where(last, s_in, 0.0), 1), tl.max(tl.where(last, f_in, 0), 1)), 0,
                                 _seg_add)
    r = tl.arange(0, R)
    cin = tl.where(r > 0, tl.gather(inc, tl.maximum(r - 1, 0), 0), 0.0)
    return tl.reshape(s_in + tl.where(f_in == 0, cin[:, None], 0.0), [N])


@triton.jit
def _row_stats(row_ptr, a_ptr, V, inv_tau, BLOCK: tl.constexpr):
    """One student row -> (lse = LSE_v row[v]/τ, Σ_v softmax(row/τ)[v] a[v], bad = 1 if a NaN / +inf logit (_tl.
    row_bad), + 1 if no finite value), online over V in BLOCK tiles: the running max reduced per tile, the sums per
    lane. The next tile's logits and a are loaded before this one is folded (pipelined by hand, carried in
    registers)."""
    m = tl.full((), NEG, tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    lw = tl.zeros((BLOCK,), tl.float32)
    offs = tl.arange(0, BLOCK)
    x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
    a = tl.load(a_ptr + offs, mask=offs < V, other=0.0)
    for v0 in range(0, V, BLOCK):
        o = v0 + BLOCK + offs
        xf = x.to(tl.float32)
        aw = a
        x = tl.load(row_ptr + o, mask=o < V, other=float("-inf"))
        a = tl.load(a_ptr + o, mask=o < V, other=0.0)
        m, l, e, alpha = _tl.lse_step(m, l, xf * inv_tau)
        lw = lw * alpha + e * aw
    l = tl.sum(l)
    return m + tl.log(l), tl.sum(lw) / l, _tl.row_bad(row_ptr, V, l, BLOCK) + (l == 0).to(tl.int32)


@triton.jit
def _z_scaled(row_ptr, a_ptr, V, inv_tau, lse, BLOCK: tl.constexpr):
    """2^64 Σ_v softmax(row/τ)[v] a[v] from the row's lse: A's Z_r where it is below 2^-64, from 2^64 p (normal down
    to p = 2^-190; A's running sums flush its terms below 2^-126 on a GPU)."""
    a, b = _tl.exp2_args(inv_tau, lse)
    acc = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        o = v0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + o, mask=o < V, other=float("-inf"))
        acc += _tl.softmax_exp2(x, a, b - 40.0) * tl.load(a_ptr + o, mask=o < V, other=0.0)  # 2^(24 + 40) p
    return tl.sum(acc)


@triton.jit
def _p_bar(z_ptr, stride_z, lse_s_ptr, s, mask, s_lo, s_hi, inv_tau, MEAN: tl.constexpr):
    """2^24 p̄'[s] = 2^24 Σ_r p_r[s] over the chunk's student rows, gathered at the ids s (0 where masked;
    _tl.softmax_exp2: every Qu the kernel sums is scaled by 2^24, inv_qz takes it out)."""
    if MEAN:
        pr = tl.zeros(s.shape, tl.float32)
        for r in range(s_lo, s_hi):
            pr += _tl.softmax_tile_exp2(z_ptr + r * stride_z, s, mask, inv_tau, tl.load(lse_s_ptr + r))
    else:  # one student row: no loop in the tile loop
        pr = _tl.softmax_tile_exp2(z_ptr + s_lo * stride_z, s, mask, inv_tau, tl.load(lse_s_ptr + s_lo))
    return pr


@triton.jit
def _entry_block(z_ptr, stride_z, lse_s_ptr, word_ptr, key_ptr, i_lo, i_hi, qu_row, s_lo, s_hi, inv_tau,
                 MEAN: tl.constexpr, PIECE: tl.constexpr, BLOCK_E: tl.constexpr):
    """One block of pieces [i_lo, i_lo + BLOCK_E / PIECE) ∩ [i_lo, i_hi) of column-sorted entries (sparse teacher:
    all of W's, one entry a piece; dense: the residual entries of the columns longer than the column ELL, in pieces
    of PIECE entries of one column, keyed by the column's rank (FOLD) or column; _w_structure) -> qu_row[col] =
    Σ_{entries of col} w p̄'[s]: each piece summed in its thread, then a segmented scan over the pieces per column (no
    differences of a running sum: cancellation would wipe out a small column sum; a segment restarts at a column's
    first piece, flagged by the sign bit of its key; lane 0 starts one anyway), stored at each column's last piece in
    the block; a column begun before i_lo is completed by read-add-write (the caller orders blocks with a barrier).
    The entry words (w's fp32 bits << 32 | s) are padded to whole blocks with the zero word: unmasked vector loads,
    the zero word's gather masked off."""
    N: tl.constexpr = BLOCK_E // PIECE
    wd = tl.load(word_ptr + i_lo * PIECE + tl.arange(0, BLOCK_E))
    val = _weight(wd) * _p_bar(z_ptr, stride_z, lse_s_ptr, wd.to(tl.int32), wd != 0, s_lo, s_hi, inv_tau, MEAN)
    if PIECE > 1:
        val = tl.sum(tl.reshape(val, [N, PIECE]), 1)
    i = i_lo + tl.arange(0, N)
    im = i < i_hi
    key = tl.load(key_ptr + i, mask=im, other=0)
    col = key & 0x7FFFFFFF
    last = im & (col != tl.load(key_ptr + i + 1, mask=i + 1 < i_hi, other=-1))  # a flagged key: another column
    seg = _seg_scan(val, (key < 0).to(tl.int32), N)
    before = tl.load(key_ptr + i_lo - 1, mask=i_lo > 0, other=-1) & 0x7FFFFFFF  # the column of the piece before
    carry = tl.load(qu_row + before, mask=i_lo > 0, other=0.0)  # its sum so far (one load, not one per lane)
    seg += tl.where(last & (col == before), carry, 0.0)
    _tl.scatter(qu_row + col, seg, last, 4)


@triton.jit
def _entries(args, lists, MEAN: tl.constexpr, PIECE: tl.constexpr, BLOCK_E: tl.constexpr):
    """_entry_block over the pieces [0, n) of lists = (entry words, piece keys, n, target row), block after block (a
    barrier between them: the read-add-write of a column cut by a block boundary)."""
    z_ptr, stride_z, lse_s_ptr, s_lo, s_hi, inv_tau = args
    word_ptr, key_ptr, n, qu_row = lists
    N: tl.constexpr = BLOCK_E // PIECE
    for i0 in range(0, n, N):
        _entry_block(z_ptr, stride_z, lse_s_ptr, word_ptr, key_ptr, i0, tl.minimum(i0 + N, n), qu_row, s_lo, s_hi,
                     inv_tau, MEAN, PIECE, BLOCK_E)
        tl.debug_barrier()


@triton.jit
def _teacher_row_lse(t_row, tc_row, mask_ptr, C, inv_tau, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """One teacher row -> (LSE of t/τ over its allowed columns (−inf if none), bad = 1 if a NaN / +inf in any of
    its columns (_tl.probe_max), else 0)."""
    m = tl.full((), NEG, tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    probe = tl.full((BLOCK,), float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK):
        o, v, inside, ok = _tl.col_tile(tc_row, mask_ptr, c0, C, SPARSE, BLOCK)
        x = tl.load(t_row + o, mask=o < C, other=0.0).to(tl.float32)
        probe = _tl.probe_max(probe, tl.where(inside, x, float("-inf")))
        m, l, e, alpha = _tl.lse_step(m, l, tl.where(ok, x * inv_tau, float("-inf")))
    return m + tl.log(tl.sum(l)), _tl.probe_bad(probe)


@triton.jit
def _pkl_kernel(
    z_ptr, stride_z, t_ptr, stride_t, tc_ptr, stride_tc,
    a_ptr, ell_ptr, nslot_ptr, ew_ptr, ek_ptr, NNZ, cell_ptr, rank_ptr, rw_ptr, rk_ptr, NRES, r_spare,
    mask_ptr,
    spans_ptr, tchain_ptr, scale_ptr,
    loss_ptr, dz_ptr, stride_dz,
    lse_s_ptr, dr_ptr, lse_t_ptr, qu_ptr, h_ptr, tm_ptr, n_tiles_max, tacc_ptr, tcnt_ptr, stat_ptr, sync_ptr, rs_ptr,
    prof_ptr, k0, k1, V_S, V_T, row_len, C, inv_tau, tau, eps,
    MEAN: tl.constexpr, CHAIN: tl.constexpr, SPARSE: tl.constexpr, GRAD_W: tl.constexpr,
    HAS_SCALE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    CSLOTS: tl.constexpr, RPIECE: tl.constexpr, SLOTS: tl.constexpr, SLICE: tl.constexpr, WIN: tl.constexpr,
    EPS: tl.constexpr, HELP: tl.constexpr, LANE1: tl.constexpr, PROFILE: tl.constexpr,
):
    FOLD: tl.constexpr = not (SPARSE or GRAD_W)
    PIECE: tl.constexpr = 1 if SPARSE else RPIECE  # entries per piece of _entries' lists (_residual_piece)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # HELP (tests; one chunk per program): 1 runs the chunks without guards, 2 only the guards, so that under the
    # interpreter program 0 computes the slices of the other programs' published chunks, as programs do on a GPU
    k_run = k0 if HELP == 2 else k1  # chunks k < k_run run
    k_guard = k1 + nprog if HELP == 1 else k0  # guards for previous chunks ≥ k_guard run
    n_k = k1 - k0
    G = tl.cdiv(tl.cdiv(V_S, BLOCK_S), SLICE)  # D slices per chunk
    row = pid.to(tl.int64) * row_len  # the per-program scratch rows: V_T entries and a spare (_w_structure)
    qu_row = qu_ptr + row
    tm_row = tm_ptr + pid.to(tl.int64) * n_tiles_max
    tacc_row = tacc_ptr + row
    tcnt_row = tcnt_ptr + row
    offs_s = tl.arange(0, BLOCK_S)
    offs_t = tl.arange(0, BLOCK_T)
    t_ph = _tl.stamp(prof_ptr, PROFILE)  # PhaseTimes (PROFILE): the time between stamps by PHASES
    for k in range(k0 + pid, k1 + nprog, nprog):  # one more round: the last chunk's guard
        # guard: this program's scratch rows (h, C3's tile maxima) are free once its previous chunk's D slices are
        # done. Take open slices of published chunks, oldest first (the previous chunk's included), until none is
        # open in the window and all of the previous chunk's are taken, then wait for those in flight (they wait for
        # nothing); sparse: zero h at its columns.
        if k - nprog >= k_guard:
            c_p = k - nprog - k0
            busy = True
            while busy:
                # the head and the own chunk's count by scalar atomics: one thread reads, every thread gets its value
                # (per-thread volatile loads could differ between warps, which would then disagree on busy and
                # reach different barriers); the window's words are per lane and only reduced
                hd = tl.atomic_add(sync_ptr, 0, sem="relaxed", scope="gpu")
                i = hd + tl.arange(0, WIN)
                w = tl.load(sync_ptr + 1 + i, mask=i < n_k, other=0, volatile=True)
                gone = (w >= PUB) & (w % PUB >= G)
                tl.atomic_max(sync_ptr, tl.min(tl.where(gone, hd + WIN, i)), sem="relaxed", scope="gpu")
                open_ = (w >= PUB) & ~gone
                own_open = tl.atomic_add(sync_ptr + 1 + c_p, 0, sem="relaxed", scope="gpu") % PUB < G
                busy = own_open | (tl.max(open_.to(tl.int32)) > 0)
                oldest = tl.min(tl.where(open_, i, n_k))
                if busy:
                    t_ph = _tl.lap(t_ph, prof_ptr, 6, PROFILE)
                    _take_slice(tl.where(own_open, tl.minimum(oldest, c_p), oldest), sync_ptr, rs_ptr, n_k, G, z_ptr,
                                stride_z, ell_ptr, nslot_ptr, spans_ptr, lse_s_ptr, dr_ptr, h_ptr, dz_ptr, stride_dz,
                                k0, V_S, V_T, row_len, inv_tau, MEAN, GRAD_W, FOLD, BLOCK_S, SLOTS, SLICE, LANE1)
                    t_ph = _tl.lap(t_ph, prof_ptr, 5, PROFILE)
            n_done = 0
            while n_done < G:
                n_done = tl.atomic_add(sync_ptr + 1 + n_k + c_p, 0, sem="acquire", scope="gpu")
            if SPARSE and not GRAD_W:
                _, _, tp_lo, _ = _tl.chunk_rows(spans_ptr, k - nprog, MEAN)
                for c0 in range(0, C, BLOCK_T):
                    o = c0 + offs_t
                    v = tl.load(tc_ptr + tp_lo * stride_tc + o, mask=o < C, other=-1)
                    tl.store(h_ptr + row + v, tl.zeros((BLOCK_T,), tl.float32), mask=v >= 0)
            tl.debug_barrier()
            t_ph = _tl.lap(t_ph, prof_ptr, 6, PROFILE)
        if k < k_run:
            # GRAD_W: h rows of the block's chunks stay for the W-gradient kernel; else a per-program scratch row
            # (dense: the Qu row, which the dense pass does not use).
            h_row = h_ptr + ((k - k0).to(tl.int64) * V_T if GRAD_W else row)
            c_t = _tl.chain_offset(tchain_ptr, spans_ptr + 4 * k + 2, CHAIN, BLOCK_T)
            s_lo, s_hi, t_lo, t_hi = _tl.chunk_rows(spans_ptr, k, MEAN)
            n_s = (s_hi - s_lo).to(tl.float32)
            n_t = t_hi - t_lo
            bad = ((c_t != c_t) | (c_t == float("inf"))).to(tl.int32)  # a NaN / +inf chain scalar is bad input
            if SPARSE:
                two_pass = n_t > 0
            else:
                two_pass = n_t > 1

            # A: student rows.
            z_sum = tl.zeros((), tl.float32)
            for r in range(s_lo, s_hi):
                lse_r, z_r, bad_r = _row_stats(z_ptr + r * stride_z, a_ptr, V_S, inv_tau, BLOCK_S)
                tl.store(lse_s_ptr + r, lse_r)
                z_sum += z_r
                bad += bad_r
            Z = z_sum / n_s
            # Z below 2^-64 (the student's mass almost all on ids W maps nowhere, e.g. an empty W row's <|eot_id|>):
            # Zu = 2^64 Z summed again from 2^64 p (A's exps flush below 2^-126 on a GPU), and the chunk's p formed
            # as 2^88 p instead of 2^24 p from here on (its rows' stored LSE lowered by 64 ln 2), so that the factors
            # of 1/Z stay finite; unit = 2^-64 takes it back in them (and in D's ⟨p, g⟩ term). Else Zu = Z
            unit = tl.where(Z < 5.421010862427522e-20, 5.421010862427522e-20, 1.0)  # NaN (bad input): 1
            Zu = Z
            if unit != 1.0:
                tl.debug_barrier()  # the LSEs were stored by single lanes
                z_sum = tl.zeros((), tl.float32)
                for r in range(s_lo, s_hi):
                    lse_r = tl.load(lse_s_ptr + r)
                    z_sum += _z_scaled(z_ptr + r * stride_z, a_ptr, V_S, inv_tau, lse_r, BLOCK_S)
                    tl.debug_barrier()  # every lane has read the LSE before it is replaced
                    tl.store(lse_s_ptr + r, lse_r - 44.3614195558365)  # 64 ln 2
                Zu = z_sum / n_s
            t_ph = _tl.lap(t_ph, prof_ptr, 0, PROFILE)
            inv_qz = _tl.P_UNIT / (n_s * tl.where(Zu > 0, Zu, 1.0))  # q = 2^-24 Qu / (n_s Z), Qu = 2^24 Σ Wᵀp_r / unit

            # B: teacher row LSEs (sparse, or several rows), their sum, and for sparse the later rows' columns.
            lse_sum = tl.zeros((), tl.float32)
            if two_pass:
                for r in range(t_lo, t_hi):
                    lse_r, bad_r = _teacher_row_lse(t_ptr + r * stride_t, tc_ptr + r * stride_tc, mask_ptr, C, inv_tau,
                                                    SPARSE, BLOCK_T)
                    tl.store(lse_t_ptr + r, lse_r)
                    lse_sum += lse_r
                    bad += bad_r
                if SPARSE:
                    _tl.scatter_later_rows(t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, lse_t_ptr, tacc_row, tcnt_row,
                                           t_lo, t_hi, C, inv_tau, BLOCK_T)
            tl.debug_barrier()  # lse_s / lse_t were stored by single lanes and are read by every lane below
            t_ph = _tl.lap(t_ph, prof_ptr, 1, PROFILE)

            if SPARSE:  # C1 over all entries (one a piece): the teacher's columns are anywhere in V_T
                lists = (ew_ptr, ek_ptr, NNZ, qu_row)
            else:  # R: the sums of the long columns' residual entries (past their first CSLOTS), kept in the h row
                # where C stores the column's h (its rank, FOLD, or the column), which reads them first
                lists = (rw_ptr, rk_ptr, NRES, h_row)
            e_args = (z_ptr, stride_z, lse_s_ptr, s_lo, s_hi, inv_tau)
            if MEAN:  # one student row: the single-row instantiation (no row loop per gathered entry)
                if s_hi - s_lo > 1:
                    _entries(e_args, lists, True, PIECE, BLOCK_E)
                else:
                    _entries(e_args, lists, False, PIECE, BLOCK_E)
            else:
                _entries(e_args, lists, False, PIECE, BLOCK_E)
            t_ph = _tl.lap(t_ph, prof_ptr, 2, PROFILE)
            n_c2 = tl.cdiv(C, BLOCK_T)

            # C: one online pass over the teacher in BLOCK_T tiles. Dense: per tile C1 from the column ELL (and R's
            # sums) and C2, pipelined by hand for single rows (_single_pass): it reads what was written before the loop
            # and writes h and C3's tile maxima (a long column's R sum is read by the lane that then overwrites it).
            # Sparse: C2 over the k columns (Qu from the scratch row). The running max m is per tile (per lane group in
            # _single_pass under FOLD); l, S1, Mu and the zero-mass max (the last two as eps needs, _c_update) are kept
            # per lane (with the common rescaling) and reduced once after the loop: a reduction per tile and sum costs
            # more instructions than the lane-wise updates (sm_90 SASS). Bad input: B checked every teacher row where it
            # ran (sparse, or several rows); a single dense row is checked here, a NaN or +inf x̄ making its lane's S1
            # term NaN
            c_args = (t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, lse_t_ptr, tacc_row, tcnt_row, rank_ptr, cell_ptr,
                      z_ptr, stride_z, lse_s_ptr, h_row, qu_row, tm_row, s_lo, s_hi, t_lo, t_hi, C, V_T,
                      inv_tau, inv_qz, eps, two_pass, r_spare)
            if SPARSE:
                m, l_v, s1_v, mu_v, mz_v = _teacher_pass(c_args, MEAN, SPARSE, FOLD, CSLOTS, EPS, BLOCK_T)
            elif MEAN:
                if (s_hi - s_lo > 1) | (n_t > 1):  # merged rows
                    m, l_v, s1_v, mu_v, mz_v = _teacher_pass(c_args, True, SPARSE, FOLD, CSLOTS, EPS, BLOCK_T)
                else:  # a 1-to-1 chunk
                    m, l_v, s1_v, mu_v, mz_v = _single_pass(c_args, FOLD, CSLOTS, EPS, BLOCK_T, LANE1)
            else:  # merge "first" / "chain": one student and one teacher row
                m, l_v, s1_v, mu_v, mz_v = _single_pass(c_args, FOLD, CSLOTS, EPS, BLOCK_T, LANE1)
            t_ph = _tl.lap(t_ph, prof_ptr, 3, PROFILE)
            l = tl.sum(l_v)
            s1 = tl.sum(s1_v)
            bad += (s1 != s1).to(tl.int32)
            # eps = 0: Mu = Σ e over the lanes with q > 0, i.e. l but for lanes with q = 0, an infinite KL (inf_kl)
            # unless their P = e F is 0 in fp32: M = F l is then off by less than 2^-149 per such lane
            if EPS == 0:
                mu = l
            else:
                mu = tl.sum(mu_v)
            m_zero = tl.max(mz_v)
            # log-normalizer: m + c = −log l (one dense row) or m − mean_r LSE_r (after B), plus the chain scalar
            if SPARSE:  # x̄ is already normalized per row
                mc = m + c_t
            elif two_pass:
                mc = m - lse_sum / n_t.to(tl.float32) + c_t
            else:
                mc = c_t - tl.log(l)
            # P = 0 everywhere: a teacher row without allowed mass (LSE −inf), or a −inf chain scalar
            l = tl.where((lse_sum > float("-inf")) & (c_t > float("-inf")), l, 0.0)
            F = tl.exp(mc)
            M = F * mu * _tl.P_UNIT  # 2^-24 M, in h's scale (_c_update): g = Σ w (M − h) is formed scaled by 2^-24
            # Σ_A P = F l, not l ≥ 1: a merged teacher's F = exp(mean log π) underflows where its rows disagree (and
            # F = +inf where l = 0 above)
            has_p = (l > 0) & (F * l > 0)
            if HAS_SCALE:
                scale = tl.load(scale_ptr + k)
            else:
                scale = 1.0
            # degenerate: Z = 0 (so counted, as in every backend, below 2^-180, where the products of 2^88 p with the
            # factors go subnormal, and where τ max(1, |c|)/Zu, the gradient's factor of 1/Z, passes fp32's range), or
            # a column with P > 0 (in fp32) and Q + eps = 0 (an infinite KL)
            inf_kl = tl.exp(m_zero - m) * F > 0
            reach = (Zu >= 1.2037062152420224e-35) & (tau * tl.maximum(tl.abs(scale), 1.0) / Zu < float("inf"))
            valid = (bad == 0) & has_p & reach & ~inf_kl  # Zu ≥ 2^-116: Z ≥ 2^-180 where unit ≠ 1
            loss = tl.where(bad > 0, float("nan"), tl.where(has_p, float("inf"), 0.0))
            tl.store(loss_ptr + k, tl.where(valid, tau * tau * F * (s1 + mc * l), loss))
            coef = tl.where(valid, tau * scale / (n_s * tl.where(Zu > 0, Zu, 1.0)), 0.0)  # unit τ c/(n_s Z)
            if GRAD_W:
                tl.store(stat_ptr + 2 * (k - k0), coef * n_s)  # ∂L/∂W_sv = τ (τ c/Z) p̄_s (M − h_v)
                tl.store(stat_ptr + 2 * (k - k0) + 1, M)
            tl.debug_barrier()

            # C3 (sparse or learnable W): h = h_u exp(m_tile − m) F in place. Dense, frozen W (FOLD): the h row holds
            # u = x̄ − log(q + eps), whose 2^-24 h = exp2(u log₂e − β), β = (m − mc) log₂e + 24, D forms per ELL slot
            hb = (m - mc) * _tl.LOG2E + 24.0
            if valid & (SPARSE or GRAD_W):  # D writes zeros for an invalid chunk
                for t in range(0, n_c2):
                    f = tl.exp(tl.load(tm_row + t) - m) * F
                    if SPARSE:
                        _, v, _, wm = _tl.col_tile(tc_ptr + t_lo * stride_tc, mask_ptr, t * BLOCK_T, C, SPARSE, BLOCK_T)
                    else:
                        v = t * BLOCK_T + offs_t
                        wm = v < C
                    tl.store(h_row + v, tl.load(h_row + v, mask=wm, other=0.0) * f, mask=wm)
            tl.debug_barrier()

            # D: ⟨p_r, g⟩ for merged rows (0 for one row), then the chunk is published: its gradient rows are D slices
            # of SLICE student tiles that any program may compute (_take_slice), so the scratch rows live only until
            # they are done, not for the whole of D.
            if valid & (s_hi - s_lo > 1):
                for r in range(s_lo, s_hi):
                    lse_r = tl.load(lse_s_ptr + r)
                    d = tl.zeros((), tl.float32)
                    for v0 in range(0, V_S, BLOCK_S):
                        o = v0 + offs_s
                        om = o < V_S
                        g = _ell_g(ell_ptr, nslot_ptr, h_row, hb, o, om, M, V_S, FOLD, SLOTS, LANE1)
                        d += tl.sum(_tl.softmax_tile_exp2(z_ptr + r * stride_z, o, om, inv_tau, lse_r) * g)
                    tl.store(dr_ptr + r, d)  # 2^24 ⟨p_r, g⟩ / unit: ⟨p_r, g⟩ ~ Z g would underflow where Z is tiny
            else:
                tl.store(dr_ptr + s_lo, 0.0)
            if SPARSE and n_t > 1:  # the later rows' scratch is C's only
                _tl.clear_later_rows(tc_ptr, stride_tc, tacc_row, tcnt_row, t_lo, t_hi, C, BLOCK_T)
            c = k - k0
            tl.store(rs_ptr + 4 * c, M)
            tl.store(rs_ptr + 4 * c + 1, coef)
            tl.store(rs_ptr + 4 * c + 2, tl.where(valid, unit, 0.0))  # valid, and the chunk's unit
            tl.store(rs_ptr + 4 * c + 3, hb)
            tl.debug_barrier()  # every lane's h, d_r and stats stores precede the release
            tl.atomic_xchg(sync_ptr + 1 + c, (pid + 1) * PUB, sem="release", scope="gpu")
            t_ph = _tl.lap(t_ph, prof_ptr, 4, PROFILE)


@triton.jit
def _teacher_pass(args, MEAN: tl.constexpr, SPARSE: tl.constexpr, FOLD: tl.constexpr, CSLOTS: tl.constexpr,
                  EPS: tl.constexpr, BLOCK_T: tl.constexpr):
    """C over the chunk's teacher (_pkl_kernel) -> the running max m and the per-lane l, S1, Mu and zero-mass max
    (the last two as eps needs, _c_update). Sparse teacher or merged rows (one student and one dense teacher row run
    _single_pass), unpipelined."""
    (t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, lse_t_ptr, tacc_row, tcnt_row, rank_ptr, cell_ptr, z_ptr, stride_z,
     lse_s_ptr, h_row, qu_row, tm_row, s_lo, s_hi, t_lo, t_hi, C, V_T, inv_tau, inv_qz, eps, two_pass,
     r_spare) = args
    n_t = t_hi - t_lo
    offs_t = tl.arange(0, BLOCK_T)
    m = tl.full((), NEG, tl.float32)
    l_v = tl.zeros((BLOCK_T,), tl.float32)
    s1_v = tl.zeros((BLOCK_T,), tl.float32)
    mu_v = tl.zeros((BLOCK_T,), tl.float32)
    mz_v = tl.full((BLOCK_T,), NEG, tl.float32)  # largest x̄ among allowed columns with q + eps = 0
    inv_nt = 1.0 / n_t.to(tl.float32)
    poison = tl.where(two_pass, 0.0, float("nan"))
    for t in range(0, tl.cdiv(C, BLOCK_T)):
        if SPARSE:
            o, v, inside, ok = _tl.col_tile(tc_ptr + t_lo * stride_tc, mask_ptr, t * BLOCK_T, C, SPARSE, BLOCK_T)
            x = tl.load(t_ptr + t_lo * stride_t + o, mask=o < C, other=0.0).to(tl.float32)
            xb = x * inv_tau - tl.load(lse_t_ptr + t_lo)
            if n_t > 1:
                xb += tl.load(tacc_row + v, mask=ok, other=0.0)
                ok = ok & (tl.load(tcnt_row + v, mask=ok, other=0) == n_t - 1)
            poison_x = 0.0
        else:
            o = t * BLOCK_T + offs_t
            inside = o < C
            v = o
            mk = tl.load(mask_ptr + o)  # 0 past V_T (padded, pkl_rows)
            ok = mk != 0
            xb = tl.load(t_ptr + t_lo * stride_t + o, mask=inside, other=0.0, eviction_policy="evict_first")
            xb = xb.to(tl.float32)
            if two_pass:  # a chunk's later teacher rows (B checked them)
                for r in range(t_lo + 1, t_hi):
                    x = tl.load(t_ptr + r * stride_t + o, mask=inside, other=0.0, eviction_policy="evict_first")
                    xb += x.to(tl.float32)
            poison_x = tl.where(xb < float("inf"), 0.0, poison)  # NaN: one row's NaN or +inf (not B's)
            xb = xb * inv_tau
            # C1 (as _single_pass's, each merged row's p gathered where the slot is used)
            rk, ew = _c_words(rank_ptr, cell_ptr, o, V_T, CSLOTS, BLOCK_T)
            hk = _h_key(rk, o, FOLD)
            qu = tl.zeros((BLOCK_T,), tl.float32)
            for j in tl.static_range(CSLOTS):  # a slot past the column's length: the zero word
                qu += _weight(ew[j]) * _p_bar(z_ptr, stride_z, lse_s_ptr, ew[j].to(tl.int32), ew[j] != 0, s_lo, s_hi,
                                              inv_tau, MEAN)
            qu += _r_sum(h_row, rk, hk, r_spare, FOLD)
        xb = xb * inv_nt
        live = ok & (xb > float("-inf"))
        if SPARSE:
            mk = tl.load(mask_ptr + v, mask=inside, other=0)
            qu = tl.load(qu_row + v, mask=live & (mk == 1), other=0.0)
        m_new, l_new, ex, alpha = _tl.lse_step(m, l_v, tl.where(live, xb, float("-inf")))
        s1_v, mu_v, mz_v, h = _c_update(m - m_new, m_new, l_v, ex, alpha, s1_v, mu_v, mz_v, xb, live, qu, inv_qz, eps,
                                        poison_x, EPS, FOLD)
        m, l_v = m_new, l_new
        if SPARSE:
            tl.store(h_row + v, h, mask=ok)
        else:
            _h_store(h_row, hk, h, _h_kept(inside, mk, FOLD), FOLD)
        if not FOLD:  # C3's rescale
            tl.store(tm_row + t, m)
    return m, l_v, s1_v, mu_v, mz_v


@triton.jit
def _single_pass(args, FOLD: tl.constexpr, CSLOTS: tl.constexpr, EPS: tl.constexpr, BLOCK_T: tl.constexpr,
                 LANE1: tl.constexpr):
    """C for one dense teacher row and one student row, software-pipelined by hand: tile t + 1's teacher logits and
    mask are loaded once tile t's have been folded into the running max and sum, its structure words once tile t's
    Qu is summed, each carried in registers to the next tile, whose gathers (p at its slots' students, R's sums)
    are issued before its teacher logits are folded (the bottom of the file: Triton's own pipelining costs more).
    FOLD (no tile maxima for C3): the running max is kept per group of G lanes, a thread's 8 of the 16-byte teacher
    loads (_tl.lse_groups), and the groups' sums are rescaled to the row's max after the loop: the tile max's
    cross-thread reduction and barrier (~35 instructions per thread per tile at K = 1: 478 -> 443, sm_90 SASS)
    are gone; m − m_new and m_new reach _c_update per lane."""
    (t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, lse_t_ptr, tacc_row, tcnt_row, rank_ptr, cell_ptr, z_ptr, stride_z,
     lse_s_ptr, h_row, qu_row, tm_row, s_lo, s_hi, t_lo, t_hi, C, V_T, inv_tau, inv_qz, eps, two_pass,
     r_spare) = args
    offs_t = tl.arange(0, BLOCK_T)
    G: tl.constexpr = _tl.GROUP
    if FOLD:  # no tile maxima needed (C3): a running max per group of G lanes, a thread's (_tl.lse_groups)
        m = tl.full((BLOCK_T // G,), NEG, tl.float32)
    else:
        m = tl.full((), NEG, tl.float32)
    l_v = tl.zeros((BLOCK_T,), tl.float32)
    s1_v = tl.zeros((BLOCK_T,), tl.float32)
    mu_v = tl.zeros((BLOCK_T,), tl.float32)
    mz_v = tl.full((BLOCK_T,), NEG, tl.float32)
    t_row = t_ptr + t_lo * stride_t
    z_row = z_ptr + s_lo * stride_z
    a_s, b_s = _tl.exp2_args(inv_tau, tl.load(lse_s_ptr + s_lo))
    PRE: tl.constexpr = CSLOTS <= 2  # wider column ELLs' words, carried, would spill
    if PRE:
        rk, ew = _c_words(rank_ptr, cell_ptr, offs_t, V_T, CSLOTS, BLOCK_T)
    mk, x = _c_teacher(t_row, mask_ptr, offs_t, C, BLOCK_T)
    for t in range(0, tl.cdiv(C, BLOCK_T)):
        o = t * BLOCK_T + offs_t
        if not PRE:
            rk, ew = _c_words(rank_ptr, cell_ptr, o, V_T, CSLOTS, BLOCK_T)
        hk = _h_key(rk, o, FOLD)
        # the tile's gathers: the logits at the slots' students (unmasked: a word past the column's length is 0,
        # w = 0 times the finite p of student 0 — a NaN or +inf student logit makes the chunk bad input anyway) and
        # R's sum of a longer column
        zs = ()
        for j in tl.static_range(CSLOTS):
            zs = zs + (_gather(z_row, ew[j].to(tl.uint32), LANE1, ""),)  # unsigned: no sign extension
        hr = _r_sum(h_row, rk, hk, r_spare, FOLD)
        inside = o < C
        xb = x.to(tl.float32)
        poison_x = tl.where(xb < float("inf"), 0.0, float("nan"))  # NaN: the row's NaN or +inf
        xb = xb * inv_tau
        live = (mk != 0) & (xb > float("-inf"))  # mk = 0 past C
        keep = _h_kept(inside, mk, FOLD)
        if FOLD:
            m_new, l_new, ex, alpha, dm, m_lane = _tl.lse_groups(m, l_v, tl.where(live, xb, float("-inf")), G)
        else:
            m_new, l_new, ex, alpha = _tl.lse_step(m, l_v, tl.where(live, xb, float("-inf")))
            dm, m_lane = m - m_new, m_new
        mk, x = _c_teacher(t_row, mask_ptr, o + BLOCK_T, C, BLOCK_T)
        # C1: Qu[c] = 2^24 Σ_j w_j p[s_j] over the column's first min(len, CSLOTS) entries (in order), + R's sum
        qu = tl.zeros((BLOCK_T,), tl.float32)
        for j in tl.static_range(CSLOTS):
            qu += _weight(ew[j]) * _tl.softmax_exp2(zs[j], a_s, b_s)
        qu += hr
        if PRE:
            rk, ew = _c_words(rank_ptr, cell_ptr, o + BLOCK_T, V_T, CSLOTS, BLOCK_T)
        s1_v, mu_v, mz_v, h = _c_update(dm, m_lane, l_v, ex, alpha, s1_v, mu_v, mz_v, xb, live, qu, inv_qz, eps,
                                        poison_x, EPS, FOLD)
        m, l_v = m_new, l_new
        _h_store(h_row, hk, h, keep, FOLD)
        if not FOLD:  # C3's rescale
            tl.store(tm_row + t, m)
    if FOLD:  # the groups' sums rescaled to the row's max
        m, a, dm = _tl.lse_merge(m, G)
        s1_v = a * (s1_v + dm * l_v)
        l_v = a * l_v
        mu_v = a * mu_v
    return m, l_v, s1_v, mu_v, mz_v


@triton.jit
def _c_teacher(t_row, mask_ptr, o, C, BLOCK_T: tl.constexpr):
    """The dense teacher tile at columns o (none past C): its mask bytes (unmasked: the mask is padded with zeros by
    a tile past the last one, pkl_rows) and logits."""
    return (tl.load(mask_ptr + o),
            tl.load(t_row + o, mask=o < C, other=0.0, eviction_policy="evict_first"))


@triton.jit
def _c_words(rank_ptr, cell_ptr, o, V_T, CSLOTS: tl.constexpr, BLOCK_T: tl.constexpr):
    """W's structure words of the dense teacher tile at columns o: the columns' ranks (_w_structure: those longer
    than the column ELL, whose R sums are in the h row, first; r_spare past V_T) and the column ELL's CSLOTS slot
    words (w's fp32 bits << 32 | s, 0 past the column's length), slot-major rows of the padded length (_w_structure:
    a tile past the last one, so that the loads of any tile, the next one prefetched past the last included, need no
    mask: 16-byte vector loads without the masked lanes' fill, 512 -> 493 instructions per thread per tile in C at
    K = 1 with the mask bytes' load, sm_90 SASS; a per-column mask made one 8-byte copy per column and slot)."""
    VP = (tl.cdiv(V_T, BLOCK_T) + 1) * BLOCK_T
    ew = ()
    for j in tl.static_range(CSLOTS):
        ew = ew + (tl.load(cell_ptr + j * VP + o),)
    return tl.load(rank_ptr + o), ew


@triton.jit
def _weight(word):
    """The fp32 weight a structure word (column ELL, gradient ELL) carries in its high 32 bits."""
    return (word >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _h_key(rk, o, FOLD: tl.constexpr):
    """Where the h row keeps column o's h (and R's sum before it): its rank rk (FOLD: the ELL's keys, only those
    are read), else o."""
    if FOLD:
        hk = rk
    else:
        hk = o
    return hk


@triton.jit
def _r_sum(h_row, rk, hk, r_spare, FOLD: tl.constexpr):
    """R's sum of the residual entries of the tile's longer columns (ranks below r_spare), 0 for the others: FOLD,
    an unmasked gather at min(rank, r_spare), the spare entry r_spare never written (0); else a masked load at the
    columns."""
    if FOLD:
        r = tl.load(h_row + tl.minimum(hk, r_spare).to(tl.uint32))
    else:
        r = tl.load(h_row + hk, mask=rk < r_spare, other=0.0)
    return r


@triton.jit
def _h_kept(inside, mk, FOLD: tl.constexpr):
    """The lanes of a dense tile whose h the h row keeps: FOLD, the allowed columns with W entries (mask 1; the
    mask bytes are loaded as 0 past C), else those inside."""
    if FOLD:
        keep = mk == 1
    else:
        keep = inside
    return keep


@triton.jit
def _h_store(h_row, hk, h, keep, FOLD: tl.constexpr):
    """A dense tile's h (_c_update) into the h row at its keys (_h_key), on the lanes kept (_h_kept)."""
    if FOLD:
        _tl.scatter(h_row + hk, h, keep, 8)
    else:
        tl.store(h_row + hk, h, mask=keep)


@triton.jit
def _c_update(dm, m_new, l_v, ex, alpha, s1_v, mu_v, mz_v, xb, live, qu, inv_qz, eps, poison_x, EPS: tl.constexpr,
              LOGH: tl.constexpr):
    """Fold a tile's q = Qu/(n_s Z) (q = qu inv_qz, qu = 2^24 Qu) into the online state, its x̄ (the merged teacher
    logits / τ, live on its allowed finite lanes) already folded into the running max and sum (_tl.lse_step or
    lse_groups: m -> m_new, dm = m − m_new, ex = e = exp(x̄ − m_new), alpha = exp(m − m_new)) -> (S1, Mu, zero-mass
    max, the column's h): S1 = Σ e (x̄ − m − log(q + eps)), Mu = Σ e q/(q + eps), each kept where it can differ (EPS,
    _eps_kind): eps = 0, Mu = Σ e over q > 0 is taken from l after the loop and the log from q and q_s
    (_tl.fast_log_pair: no scaling multiply, a subnormal q's bits kept); eps > 0, no lane has q + eps = 0, so the
    zero-mass max stays at its initial NEG, and for eps ≥ 2^-126 the log needs no subnormal scaling. q_s = 2^24 q is
    formed from qu without q's subnormal rounding.
    h: LOGH (the dense frozen-W pass, FOLD) u = x̄ − log(q + eps), the log S1 takes anyway (−inf where q + eps = 0 or x̄
    = −inf), from which D forms 2^-24 h = exp2(u log₂e − β) with the chunk's β = (m − mc) log₂e + 24 (P = exp(x̄ − m +
    mc), _pkl_kernel): no tile maxima and no reciprocal here, one exp2 per ELL slot in D instead of a gather of its
    tile's factor (C at K = 1: 493 -> 478 instructions per thread per tile, D 195 / 318 / 438 / 556 -> 159 / 254 / 342 /
    428 at 1-4 slots, sm_90 SASS; C takes 2 + K transcendentals per column, D 1 + K per student). The log domain costs
    accuracy: h's relative error is the absolute error of its exponent, u's and β's roundings (≈ 2^-24 (|x̄| + |log(q +
    eps)| + |β| ln 2)) and, on a GPU, the SFU log's (≤ 2^-21.4 near 1, a few ulp elsewhere), where the reciprocal and
    the tile's factor (an exp of a max difference) took a few ulp: the fp32 gradient's worst error / bound in the op
    tests 0.05 -> 0.14, within the bound, whose κ grows with |x̄|, the LSE and |log q| as this error does. Else h_u =
    2^-24 e/(q + eps) = e/(q_s + 2^24 eps) by the SFU's reciprocal (_tl.fast_div: q_s + 2^24 eps in [2^-126, 2^25] where
    q > 0 or eps > 0), rescaled by its tile's factor after C (C3); scaled, h_u stays finite where q + eps is subnormal
    (e/q reaches 2^149). On a GPU an e or h below 2^-126 (h < 2^-102) is flushed to 0 (.ftz): a dropped term of D's g,
    below τ 2^-102 in dz (p_s w h ≤ n_s Z h).
    poison_x: NaN in the S1 term of a lane whose (single dense row's) x̄ is NaN or +inf, else 0."""
    q = qu * inv_qz
    q_s = qu * (inv_qz * 16777216.0)  # 2^24 q
    if EPS == 0:
        pos = live & (q > 0)
        mz_v = tl.maximum(mz_v, tl.where(q > 0, float("-inf"), tl.where(live, xb, float("-inf"))))
        lq = _tl.fast_log_pair(q, q_s)
    else:
        pos = live
        if EPS == 2:
            lq = _tl.fast_log_normal(q + eps)
        elif LOGH:  # h is this log: a subnormal q + eps keeps its bits in q_s + 2^24 eps
            lq = _tl.fast_log_pair(q + eps, q_s + eps * 16777216.0)
        else:
            lq = _tl.fast_log(q + eps)
    d = xb - m_new - lq  # x̄ − m first: S1's terms round at their size, not at |x̄|'s
    if LOGH:
        h = tl.where(pos, xb - lq, float("-inf"))
        if EPS != 0:
            mu_v = alpha * mu_v + ex * _tl.fast_div(q_s, q_s + eps * 16777216.0)
    else:
        if EPS == 0:
            h = tl.where(pos, _tl.fast_div(ex, q_s), 0.0)
        else:
            h = tl.where(pos, _tl.fast_div(ex, q_s + eps * 16777216.0), 0.0)
            mu_v = alpha * mu_v + h * q_s
    s1_v = alpha * (s1_v + dm * l_v) + tl.where(pos, ex * d, poison_x)
    return s1_v, mu_v, mz_v, h


@triton.jit
def _take_slice(c, sync_ptr, rs_ptr, n_k, G, z_ptr, stride_z, ell_ptr, nslot_ptr, spans_ptr, lse_s_ptr, dr_ptr,
                h_ptr, dz_ptr, stride_dz, k0, V_S, V_T, row_len, inv_tau, MEAN: tl.constexpr, GRAD_W: tl.constexpr,
                FOLD: tl.constexpr, BLOCK_S: tl.constexpr, SLOTS: tl.constexpr, SLICE: tl.constexpr,
                LANE1: tl.constexpr):
    """Take the next open D slice j of published chunk k0 + c and compute it -> j (≥ G: none was open): its
    gradient rows on student tiles [j SLICE, (j + 1) SLICE), dz_r = τ c/(n_s Z) p_r (g − d_r) (zero for an invalid
    chunk), from what its owner program published. sync: [0] the help window's head, [1 + c] (owner + 1)·PUB once
    published + 1 per take, [1 + n_k + c] slices done. The take is an acquire (it reads the owner's release or a
    later take), the done count a release (after this program's loads of the owner's scratch rows). Everything the
    owner wrote is read past L1 (.cg): this program may have cached an older chunk's values at the same addresses."""
    old = tl.atomic_add(sync_ptr + 1 + c, 1, sem="acq_rel", scope="gpu")
    j = old % PUB
    if j < G:
        own = old // PUB - 1
        s_lo, s_hi, _, _ = _tl.chunk_rows(spans_ptr, k0 + c, MEAN)
        M = tl.load(rs_ptr + 4 * c, cache_modifier=".cg")
        coef = tl.load(rs_ptr + 4 * c + 1, cache_modifier=".cg")
        unit = tl.load(rs_ptr + 4 * c + 2, cache_modifier=".cg")
        hb = tl.load(rs_ptr + 4 * c + 3, cache_modifier=".cg")
        valid = unit != 0
        h_row = h_ptr + (c.to(tl.int64) * V_T if GRAD_W else own.to(tl.int64) * row_len)
        # the slice's widest student: the slice runs the instantiation with that many ELL slots
        v_lo = j * SLICE * BLOCK_S
        sv = v_lo + tl.arange(0, SLICE * BLOCK_S)
        v_hi = tl.minimum(V_S, v_lo + SLICE * BLOCK_S)
        args = (v_lo, v_hi, ell_ptr, nslot_ptr, h_row, hb, M, coef, s_lo, s_hi, z_ptr, stride_z, lse_s_ptr, dr_ptr,
                dz_ptr, stride_dz, V_S, inv_tau, unit)
        ks = tl.max(tl.load(nslot_ptr + sv, mask=sv < V_S, other=0).to(tl.int32))
        if not valid:  # zero rows (M, β and h may be anything)
            for r in range(s_lo, s_hi):
                _tl.zero_row(dz_ptr + r * stride_dz + v_lo, v_hi - v_lo, BLOCK_S)
        elif MEAN:  # a 1-to-1 chunk runs the single-row instantiation
            if s_hi - s_lo == 1:
                _slices(args, ks, FOLD, SLOTS, BLOCK_S, True, LANE1)
            else:
                _slices(args, ks, FOLD, SLOTS, BLOCK_S, False, LANE1)
        else:
            _slices(args, ks, FOLD, SLOTS, BLOCK_S, True, LANE1)
        tl.debug_barrier()
        tl.atomic_add(sync_ptr + 1 + n_k + c, 1, sem="release", scope="gpu")
    return j


@triton.jit
def _slices(args, ks, FOLD: tl.constexpr, SLOTS: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
            LANE1: tl.constexpr):
    """The slice's dz rows, g from the first ks ELL slots (ks: the slice's widest student): one student row,
    _slice_single instantiated for 1, 2, 3 and SLOTS = 4 slots (the real Llama-3 W's 8 slices take 3, 3, 1, 1, 1,
    1, 4, 4); merged rows, _slice_rows for 1 or SLOTS."""
    tl.static_assert(SLOTS == 4)
    if SINGLE:
        if ks <= 1:
            _slice_single(args, FOLD, 1, BLOCK_S, LANE1)
        elif ks == 2:
            _slice_single(args, FOLD, 2, BLOCK_S, LANE1)
        elif ks == 3:
            _slice_single(args, FOLD, 3, BLOCK_S, LANE1)
        else:
            _slice_single(args, FOLD, SLOTS, BLOCK_S, LANE1)
    else:
        if ks > 1:
            _slice_rows(args, FOLD, SLOTS, BLOCK_S, LANE1)
        else:
            _slice_rows(args, FOLD, 1, BLOCK_S, LANE1)


@triton.jit
def _slice_rows(args, FOLD: tl.constexpr, K: tl.constexpr, BLOCK_S: tl.constexpr, LANE1: tl.constexpr):
    """dz rows of a chunk's merged student rows on the student ids [v_lo, v_hi) (_take_slice), g from the ELL's
    first K slots (the row loop inside the tile loop: Triton pipelines innermost loops only, so this one is not)."""
    (v_lo, v_hi, ell_ptr, nslot_ptr, h_row, hb, M, coef, s_lo, s_hi, z_ptr, stride_z, lse_s_ptr, dr_ptr, dz_ptr,
     stride_dz, V_S, inv_tau, unit) = args
    offs = tl.arange(0, BLOCK_S)
    for v0 in range(v_lo, v_hi, BLOCK_S):
        o = v0 + offs
        om = o < V_S
        g = _ell_g(ell_ptr, nslot_ptr, h_row, hb, o, om, M, V_S, FOLD, K, LANE1)
        for r in range(s_lo, s_hi):
            a, b = _tl.exp2_args(inv_tau, tl.load(lse_s_ptr + r, cache_modifier=".cg"))
            p = _tl.softmax_exp2(tl.load(z_ptr + r * stride_z + o, mask=om, other=float("-inf"),
                                         eviction_policy="evict_first"), a, b)
            # (2^24 p)(2^-24 g) − (2^24 p)(2^24 d_r) 2^-24 unit: d_r is kept as 2^24 ⟨p_r, g⟩ / unit (the D prologue)
            pd = p * tl.load(dr_ptr + r, cache_modifier=".cg")
            dz = coef * (p * g - pd * (_tl.P_UNIT * unit))
            tl.store(dz_ptr + r * stride_dz + o, dz.to(dz_ptr.dtype.element_ty), mask=om,
                     eviction_policy="evict_first")


@triton.jit
def _slice_single(args, FOLD: tl.constexpr, K: tl.constexpr, BLOCK_S: tl.constexpr, LANE1: tl.constexpr):
    """The dz row of a chunk's one student row on the student ids [v_lo, v_hi) (d_r = 0: dz = τ c/Z p g),
    software-pipelined by hand: a tile's gathers of the h row are issued before its p is computed from the logits
    loaded during the tile before; then the next tile's logits are loaded, and (one slot) its ELL words, carried in
    registers (K slots: loaded at the tile's start, 4 × 8 B per student would spill; the bottom of the file)."""
    (v_lo, v_hi, ell_ptr, nslot_ptr, h_row, hb, M, coef, s_lo, s_hi, z_ptr, stride_z, lse_s_ptr, dr_ptr, dz_ptr,
     stride_dz, V_S, inv_tau, unit) = args
    offs = tl.arange(0, BLOCK_S)
    z_row = z_ptr + s_lo * stride_z
    dz_row = dz_ptr + s_lo * stride_dz
    a, b = _tl.exp2_args(inv_tau, tl.load(lse_s_ptr + s_lo, cache_modifier=".cg"))
    o = v_lo + offs
    if K == 1:
        e = _ell_words(ell_ptr, nslot_ptr, o, o < v_hi, V_S, K)
    x = tl.load(z_row + o, mask=o < v_hi, other=float("-inf"), eviction_policy="evict_first")
    for v0 in range(v_lo, v_hi, BLOCK_S):
        o = v0 + offs
        if K > 1:
            e = _ell_words(ell_ptr, nslot_ptr, o, o < v_hi, V_S, K)
        ws, hs = _ell_gathers(e, h_row, K, LANE1)
        p = _tl.softmax_exp2(x, a, b)
        x = tl.load(z_row + o + BLOCK_S, mask=o + BLOCK_S < v_hi, other=float("-inf"), eviction_policy="evict_first")
        if K == 1:
            e = _ell_words(ell_ptr, nslot_ptr, o + BLOCK_S, o + BLOCK_S < v_hi, V_S, K)
        dz = coef * (p * _ell_sum(ws, hs, M, hb, FOLD, K))  # (2^24 p)(2^-24 g): bounded, unlike g
        tl.store(dz_row + o, dz.to(dz_ptr.dtype.element_ty), mask=o < v_hi, eviction_policy="evict_first")


@triton.jit
def _ell_g(ell_ptr, nslot_ptr, h_row, hb, o, om, M, V_S, FOLD: tl.constexpr, K: tl.constexpr,
          LANE1: tl.constexpr):
    """g_s = Σ_slot w_eff[slot, s] (M − h[col]) for the student ids o (lanes om), from the compact slot-major ELL's
    first K slots (students with more must not be in o): _ell_words, _ell_gathers, _ell_sum."""
    ws, hs = _ell_gathers(_ell_words(ell_ptr, nslot_ptr, o, om, V_S, K), h_row, K, LANE1)
    return _ell_sum(ws, hs, M, hb, FOLD, K)


@triton.jit
def _ell_words(ell_ptr, nslot_ptr, o, om, V_S, K: tl.constexpr):
    """The ELL words of the student ids o (lanes om): per slot k < K one int64 = w_eff's fp32 bits (0 off A) << 32 |
    the column (FOLD: its rank), 0 where the student has at most k slots (nslot[s] used slots first). Slot 0 is
    loaded by the tile's mask (a student without slots has the zero word there too): vector loads, where a
    per-student mask made one 8-byte load per student and 3 more instructions; a slot k ≥ 1 is masked off where the
    student has at most k slots, so its 32-byte sector is read only where one of its 4 students has k + 1 (86 % of
    Llama-3's ids have one)."""
    e = (tl.load(ell_ptr + o, mask=om, other=0),)
    if K > 1:
        ns = tl.load(nslot_ptr + o, mask=om, other=0)
        for k in tl.static_range(1, K):
            e = e + (tl.load(ell_ptr + k * V_S + o, mask=om & (ns > k), other=0),)
    return e


@triton.jit
def _ell_gathers(e, h_row, K: tl.constexpr, LANE1: tl.constexpr):
    """Per slot of the ELL words e: (w, the h row at its key), the gathers read past L1 (.cg: another program's chunk
    may have left older values at these addresses in this SM's L1) and unmasked: a slot without a weight (w = 0: no
    slot, or off A) has the zero word and reads h[0], a valid address (FOLD: the h row's spare, −inf: ranks start at
    1, _w_structure)."""
    ws = ()
    hs = ()
    for k in tl.static_range(K):
        ws = ws + (_weight(e[k]),)
        hs = hs + (_gather(h_row, e[k].to(tl.uint32), LANE1, ".cg"),)  # unsigned: no sign extension
    return ws, hs


@triton.jit
def _gather(base, off, LANE1: tl.constexpr, CACHE: tl.constexpr):
    """base[off] at a tile of unsigned offsets, unmasked (CACHE: the load's cache modifier). A 1-D tile's accesses
    share one layout (Triton's coalescing takes the widest of a loop's loads of that shape): 8 adjacent lanes a
    thread at 2,048 lanes and 8 warps, so the 32 lanes of a gather instruction lie 8 positions apart, touching up to
    16 sectors of a map that keeps neighbours close, as the real W's does. LANE1 loads through an [N/32, 32] view,
    which Triton lays out one element a thread: an instruction's lanes on 32 adjacent positions (2-3 sectors on such
    a map), the offsets and the values moved between the layouts through shared memory, the streams untouched."""
    if LANE1:
        N: tl.constexpr = off.shape[0]
        tl.static_assert(N % 32 == 0)
        return tl.reshape(tl.load(base + tl.reshape(off, (N // 32, 32)), cache_modifier=CACHE), (N,))
    else:
        return tl.load(base + off, cache_modifier=CACHE)


@triton.jit
def _ell_sum(ws, hs, M, hb, FOLD: tl.constexpr, K: tl.constexpr):
    """g = Σ_slot w (M − h) over the gathered slots with w ≠ 0 (_ell_gathers). FOLD: 2^-24 h = exp2(u log₂e − β) from
    the row's u (_c_update), and a weightless slot reads the spare u = −inf, h = 0, a term 0 (M is finite in a valid
    chunk; D writes zeros for the others); else a select, not a product with w = 0: a column's h may be +inf (2
    instructions per slot and student, sm_90 SASS)."""
    g = tl.zeros(ws[0].shape, tl.float32)
    for k in tl.static_range(K):
        if FOLD:
            g += ws[k] * (M - tl.exp2(hs[k] * _tl.LOG2E - hb))
        else:
            g += tl.where(ws[k] != 0, ws[k] * (M - hs[k]), 0.0)
    return g


@triton.jit
def _pkl_grad_w_kernel(z_ptr, stride_z, spans_ptr, widx_ptr, mask_ptr, lse_s_ptr, h_ptr, stat_ptr, gw_ptr,
                       k0, k1, V_S, V_T, inv_tau, tau, MEAN: tl.constexpr, BLOCK: tl.constexpr,
                       SLOTS: tl.constexpr):
    """∂L/∂W[s, slot] += τ Σ_{k0 ≤ k < k1} (τ c_k / Z_k) p̄_k[s] (M_k − h_k[col]) for one tile of student ids
    (col ∈ A), from the h rows and (τ c/Z, M) the main kernel kept (τ² c/Z may pass fp32's range where the products
    do not); one program per tile: no atomics."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    om = o < V_S
    at = o[:, None] * SLOTS + tl.arange(0, SLOTS)[None, :]
    ci = tl.load(widx_ptr + at, mask=om[:, None], other=-1)
    in_a = (ci >= 0) & (tl.load(mask_ptr + tl.where(ci >= 0, ci, 0), mask=ci >= 0, other=0) != 0)
    ci = tl.where(in_a, ci, 0)
    acc = tl.zeros((BLOCK, SLOTS), tl.float32)
    for k in range(k0, k1):
        cw = tl.load(stat_ptr + 2 * (k - k0))
        if cw != 0:
            s_lo, s_hi, _, _ = _tl.chunk_rows(spans_ptr, k, MEAN)
            pbar = _p_bar(z_ptr, stride_z, lse_s_ptr, o, om, s_lo, s_hi, inv_tau, MEAN)
            h = tl.load(h_ptr + (k - k0).to(tl.int64) * V_T + ci, mask=in_a, other=0.0)
            M = tl.load(stat_ptr + 2 * (k - k0) + 1)
            c = cw / (s_hi - s_lo).to(tl.float32)  # (2^24 p̄' (_p_bar)) (2^-24 (M − h)): bounded, unlike h
            acc += tl.where(in_a, c * (pbar[:, None] * (M - h)), 0.0)
    tl.store(gw_ptr + at, tl.load(gw_ptr + at, mask=om[:, None], other=0.0) + acc * tau, mask=om[:, None])


# The tile geometry of the teacher pass and the entry blocks is fixed: W's column ELL and residual entries are built for
# it once per W. A and the single-row loops of C and D are software-pipelined by hand: the next tile's loads are issued
# before this one is computed and carried in registers (Triton's num_stages pipelining stages every load through shared
# memory with cp.async, the gathers included: per thread per tile, C 747 where unpipelined it was 610 and by hand it is
# 641, A 192 where by hand 161, D 472 where unpipelined it was 297 and by hand 301; sm_90 SASS); merged rows' C and D
# are not pipelined (their row loops sit inside the tile loops, and Triton pipelines innermost loops only). Per thread
# and 2048-lane tile at K = 1, eps = 0 (sm_90 SASS, 8 warps): A 138, C 443 (its p gathers and structure loads unmasked;
# 883 for merged rows; 413 with eps = 1e-10), D 159 / 254 / 342 / 428 (1-4 ELL slots; merged rows 204 / 481, one /
# four), R 412 per entry block of pieces (555 for merged rows). Per tile much of the work is per-thread overhead (the
# scans' and reductions' cross-warp steps), so fewer warps issue fewer instructions: at 8 warps a row issued 22 %
# fewer than at 16 when measured (4 warps: 28 %, but they spill; 16 warps spill too, with C's per-lane accumulators).
# On an H200 the kernel took 5x (real W) to 9x (Projection.random) its issue time, its times on the two W's following
# the L2<->SM sectors it moves counted per warp instruction (bench/costmodel.py, L2_WARP): hence the LANE1 config
# below. (An earlier pair of configs differed only in the merged rows' D's num_stages, which compiled to the same
# code, so autotuning timed one kernel twice.) sm_90, bf16, offline ptxas (tests/test_kernels_compile.py): no spill
# inside a per-tile pass; at 255 registers a few scalars live across the teacher loop may be spilled once per chunk.
TILES_GPU = dict(BLOCK_T=2048, BLOCK_E=4096)
_TILES = dict(BLOCK_T=64, BLOCK_E=64) if interpret() else TILES_GPU
# D slices of 8 student tiles (16,384 ids: 8 slices at V_S = 128,256; fewer, longer slices take fewer handshakes but
# keep h live longer: 16 tiles put Projection.random's modelled working set 0.3 MiB over an H100's L2,
# bench/costmodel.py); the help window covers ≥ 2 chunks per program of a 132-SM grid. The
# interpreter's 1-tile slices put several slices in every test (run by their owner: the interpreter runs the
# programs one after another; help_split makes other programs compute them, the memory ordering is a GPU's only).
SLICES_GPU = dict(SLICE=8, WIN=256)
_SLICES = dict(SLICE=1, WIN=16) if interpret() else SLICES_GPU
# C's cost per teacher column and column-ELL slot and R's per residual entry lane at each piece size, in instructions
# per thread (sm_90 SASS, bench/sass.py, 8 warps; ×256 threads / lanes per tile): _column_slots and _residual_piece
# weigh them per W
SLOT_COST, ENTRY_COST = 8, {1: 57, 2: 41, 4: 26}
# maxnreg: without it ptxas held some variants (sparse teacher, merge "first" / "chain") to 128 registers and spilled.
# LANE1 (_gather): C's and D's gathers one element a thread. Not measured on a GPU yet (issue 8): by the cost model's
# per-warp-instruction count a row of the real Llama-3 × Qwen3 W moves 9.76 instead of 13.44 MiB between L2 and the
# SMs (its ids keep neighbours close; Projection.random's do not: the same count), for 19-31 more instructions per
# thread and tile at one slot (sm_90 SASS: C 443 -> 474, D 159 -> 178); autotuning times both on the GPU at hand.
_CONFIGS = [triton.Config({"BLOCK_S": 2048, "LANE1": lane1}, num_warps=8, maxnreg=255) for lane1 in (False, True)]


def launch_configs(configs: list) -> _tl.Launch:
    """The P-KL kernel's launcher over these configs (autotuned where several; the interpreter runs BLOCK_S 128 with
    the first one's LANE1). The sync words start at zero in every run, autotuning's timed runs and the run after them
    included (a run on stale words would find no slice open to help with)."""
    return _tl.launcher(_pkl_kernel, dict(BLOCK_S=128, LANE1=configs[0].kwargs["LANE1"]), configs,
                        key=["V_S", "V_T", "C", "NNZ", "MEAN", "SPARSE", "GRAD_W", "EPS"], reset_to_zero=["sync_ptr"])


_launch = launch_configs(_CONFIGS)
_grad_w = _tl.launcher(_pkl_grad_w_kernel, dict(BLOCK=128), [triton.Config({"BLOCK": 1024}, num_warps=8)])
_zero = _tl.launcher(_tl.zero_uncovered_rows, dict(BLOCK=128), [triton.Config({"BLOCK": 2048}, num_warps=8)])

def _residual_pieces(col_len: torch.Tensor, k: int, piece: int) -> torch.Tensor:
    """Per column, R's pieces of ``piece`` entries past its first k (the column ELL's; the last one padded)."""
    return -(-(col_len - k).clamp(min=0) // piece)


def _residual_cost(col_len: torch.Tensor, k: int, block_e: int) -> tuple[int, int]:
    """(instructions per thread, piece size) of R's blocks for the entries past k at the piece size (ENTRY_COST's)
    that issues the fewest: 4 where long columns hold the residual (the real Llama-3 × Qwen3 W), 1 where most
    residual columns have one entry past k (Projection.random), whose pieces would be mostly padding."""
    return min((-(-int(_residual_pieces(col_len, k, p).sum()) * p // block_e) * block_e * c, p)
               for p, c in ENTRY_COST.items())


def _residual_piece(col_len: torch.Tensor, k: int, block_e: int) -> int:
    """R's piece size for the entries past k (_residual_cost)."""
    return _residual_cost(col_len, k, block_e)[1]


def _column_slots(col_len: torch.Tensor, block_t: int, block_e: int) -> int:
    """The column ELL's width K for W's column lengths: the K in 1..SLOTS that issues the fewest instructions per
    row, C's K slots on every column (SLOT_COST each) against R's blocks of the entries past K at their piece size
    (_residual_cost): K = 1 for the real Llama-3 × Qwen3 W (few long columns hold its extra entries), 4 for
    Projection.random (128,256 × 151,936)."""
    n_col = -(-col_len.numel() // block_t) * block_t
    return min(range(1, SLOTS + 1), key=lambda k: n_col * k * SLOT_COST + _residual_cost(col_len, k, block_e)[0])


@cached_on_tensors(1)
def _w_structure(w_idx: torch.Tensor, V_T: int, block_t: int, block_e: int):
    """W's nonzero slots sorted by teacher column -> a dict of the kernel's structure arrays, kept per w_idx tensor
    and geometry (one host sync when built):
    - the entry lists of C1 for a sparse teacher (_entries, one entry a piece): e_slot (flat slot int64, for the
      call's weights and the student; −1 padding to whole blocks of block_e) and e_key (column int32, its sign bit
      set on a column's first entry), nnz entries;
    - the dense pass's column ELL: K = cslots (_column_slots), cell_slot int64 [K, VP] slot-major (the flat slot of
      each column's j-th entry, −1 past its length and past V_T: VP = (⌈V_T / block_t⌉ + 1) block_t, so that C's
      loads need no mask, _c_words); the residual entries (each longer column's entries past K) in n_pieces pieces
      of rpiece entries of one column (_residual_piece): r_slot (flat slot int64, −1 padding each column's last
      piece and the list to whole blocks of block_e entries) and per piece r_keys = (its column, the column's rank)
      int32, the sign bit set on a column's first piece: where R keeps their sums in the h row;
    - the gradient pass's compact ELL: every row's used slots first (slot_order int64 [V_S, SLOTS], the slot
      permutation), nslot int8 [V_S], keys int32 [SLOTS, V_S] slot-major = the column, and the same with the
      column's rank in place of the column;
    - rank int32 [VP]: where the dense frozen-W pass keeps a column's h: the n_long columns longer than K at 1 ..
      n_long, the other columns with W entries from n_long + 2 on (in column order), the spare r_spare = n_long + 1
      for the columns without and past V_T; the h row's entries 0 (read by the ELL's weightless slots: −inf, set by
      pkl_rows) and r_spare (C's read of a short column's R sum, at min(rank, r_spare): 0) are never written;
      has_entry bool [V_T].
    The weights, which depend on the call's column mask, are packed beside slots and keys by _w_words."""
    dev = w_idx.device
    flat = w_idx.reshape(-1).long()
    slot_ids = torch.nonzero(flat >= 0).squeeze(1)
    cols = flat[slot_ids]
    order = torch.argsort(cols, stable=True)
    slot_ids, cols = slot_ids[order], cols[order]
    col_len = torch.bincount(cols, minlength=V_T)
    has_entry = col_len > 0
    first = torch.ones_like(cols, dtype=torch.bool)  # a column's first entry: the sign bit of its key
    first[1:] = cols[1:] != cols[:-1]

    def padded(x, n, fill):  # x, then fill up to length n
        return torch.cat([x, x.new_full((n - x.numel(),), fill)])
    # the column ELL and the residual entries
    K = _column_slots(col_len.cpu(), block_t, block_e)
    piece = _residual_piece(col_len.cpu(), K, block_e)
    start = torch.cumsum(col_len, 0) - col_len  # each column's first entry in the sorted list
    j = torch.arange(cols.numel(), device=dev) - start[cols]  # an entry's position in its column
    n_tiles = -(-V_T // block_t)
    vp = (n_tiles + 1) * block_t  # C's columns: a tile past the last one (_c_words)
    cell_slot = torch.full((K, vp), -1, dtype=torch.int64, device=dev)
    in_ell = j < K
    cell_slot[j[in_ell], cols[in_ell]] = slot_ids[in_ell]
    # the residual: each longer column's entries past K in pieces (its last piece padded with −1)
    n_pc = _residual_pieces(col_len, K, piece)
    p_off = torch.cumsum(n_pc, 0) - n_pc  # each column's first piece
    n_pieces = int(n_pc.sum())
    r_slot = torch.full((-(-n_pieces * piece // block_e) * block_e,), -1, dtype=torch.int64, device=dev)
    res = ~in_ell
    r_slot[p_off[cols[res]] * piece + j[res] - K] = slot_ids[res]
    p_col = torch.repeat_interleave(torch.arange(V_T, device=dev), n_pc)
    p_first = torch.arange(n_pieces, device=dev) == p_off[p_col]
    slot_order = torch.argsort((w_idx < 0).to(torch.int8), dim=1, stable=True)
    idx = w_idx.long().gather(1, slot_order)
    used = idx >= 0
    long = col_len > K
    r_spare = int(long.sum()) + 1
    rank = torch.where(long, torch.cumsum(long, 0), torch.cumsum(has_entry & ~long, 0) + r_spare)
    rank = torch.where(has_entry, rank, r_spare)
    ell_keys = tuple(torch.where(used, c, 0).to(torch.int32).t().contiguous()
                     for c in (idx, rank[idx.clamp(min=0)]))
    out = dict(e_slot=padded(slot_ids, -(-cols.numel() // block_e) * block_e, -1), nnz=cols.numel(),
               e_key=(cols - (first.long() << 31)).to(torch.int32), has_entry=has_entry, cslots=K,
               cell_slot=cell_slot, r_slot=r_slot, n_pieces=n_pieces, rpiece=piece,
               r_keys=tuple((c - (p_first.long() << 31)).to(torch.int32) for c in (p_col, rank[p_col])),
               slot_order=slot_order,
               nslot=used.sum(1).to(torch.int8), ell_keys=ell_keys, r_spare=r_spare,
               rank=padded(rank, vp, r_spare).to(torch.int32))
    return out


@cached_on_tensors(3)
def _w_words(w_idx, w_val, col_mask, fold: bool, sparse: bool, block_t: int, block_e: int):
    """The call's weights packed beside _w_structure's slots and keys (the weights of columns outside A are 0) ->
    (a [V_S] fp32 row sums on A, the gradient pass's ELL words, C1's entry words (sparse), R's residual words and the
    column ELL's words (dense), the column flags mask8: 0 off A, 1 with W entries, 2 without). Kept per tensors
    (cached_on_tensors), as a frozen W's are in every training step: ~30 tensor ops less per call for the host to
    issue (it took 5.8-6.5 ms to issue a fused forward on an H200 machine, README)."""
    V_T = col_mask.numel()
    st = _w_structure(w_idx, V_T, block_t, block_e)
    in_a = (w_idx >= 0) & col_mask[w_idx.long().clamp(min=0)]
    w_eff = torch.where(in_a, w_val.detach().to(torch.float32), 0.0).contiguous()
    w_flat = w_eff.reshape(-1)

    def words(w, key):  # 8-byte words w_eff's fp32 bits << 32 | key (int32 ≥ 0)
        return (w.contiguous().view(torch.int32).long() << 32) | key.long()

    def entry_words(slot):  # w_eff and the student of each flat slot (column ELL, _entries), the zero word at −1
        sl = slot.clamp(min=0)
        return torch.where(slot >= 0, words(w_flat[sl], sl // SLOTS), 0)

    # the gradient pass's ELL, slot-major (as ell_key); a weightless slot (off A) the zero word: FOLD, the spare
    w_ell = w_eff.gather(1, st["slot_order"]).t().contiguous()
    ell = torch.where(w_ell != 0, words(w_ell, st["ell_keys"][fold]), 0)
    if sparse:  # C1 reads all of W's entries; the dense pass the column ELL and the residual entries (empty: unused)
        e_words, r_words, cell = entry_words(st["e_slot"]), ell[:0], ell[:0]
    else:  # the column ELL (slot-major): weight and student
        e_words, r_words = ell[:0], entry_words(st["r_slot"])
        cell = entry_words(st["cell_slot"])
    mask8 = torch.zeros(st["rank"].numel(), dtype=torch.int8, device=w_idx.device)  # padded as the column ELL
    mask8[:V_T] = torch.where(col_mask, torch.where(st["has_entry"], 1, 2), 0)
    return w_eff.sum(1), ell, e_words, r_words, cell, mask8


def _num_programs(K: int, device: torch.device) -> int:
    """One persistent program per SM (each with a V_T fp32 scratch row): at 8 warps and 195-255 registers a second
    one would not be resident (offline sm_90 compile, tests/test_kernels_compile.py). 2 under the interpreter."""
    if device.type == "cuda":
        return max(1, min(K, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(K, 2))


def _eps_kind(eps: float) -> int:
    """The kernel's EPS for the fp32 eps it receives: 0 for eps = 0 (an eps below 2^-150 rounds to it), 2 for eps ≥
    2^-126 (q + eps is never subnormal), else 1."""
    e = float(torch.tensor(float(eps), dtype=torch.float32))
    return 0 if e == 0.0 else 2 if e >= 2.0 ** -126 else 1


def pkl_rows(s_logits, t_vals, t_cols, w_idx, w_val, col_mask, spans, temperature, merge, eps, t_chain,
             chunk_scale, need_grad_w):
    """The ``triton`` backend of ``xtoken::pkl_rows`` (contract in ops.pkl): -> (loss [K] f32, grad in the logits'
    dtype, grad_w [V_S, 4] f32 or None). Deterministic: no float atomics (the sums are added in a fixed order)."""
    sparse = t_cols is not None
    device = s_logits.device
    t_cols = t_vals if t_cols is None else t_cols  # dense: a placeholder, unused with SPARSE=False
    (N_s, V_S), V_T, K, C = s_logits.shape, col_mask.numel(), spans.shape[0], t_vals.shape[1]
    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.zeros(K, **f32)
    grad = torch.empty_like(s_logits)
    grad_w = torch.zeros(V_S, SLOTS, **f32) if need_grad_w else None
    covered = covered_rows(spans, merge, N_s)
    _zero((max(1, min(N_s, 1024 if device.type == "cuda" else 2)),), grad, grad.stride(0), covered, N_s, V_S)
    if K == 0:
        return loss, grad, grad_w

    w_idx = w_idx.to(torch.int32).contiguous()
    st = _w_structure(w_idx, V_T, _TILES["BLOCK_T"], _TILES["BLOCK_E"])
    fold = not (sparse or need_grad_w)  # the dense frozen-W pass keeps h by rank (FOLD in the kernel)
    r_key = st["r_keys"][fold]
    a, ell, e_words, r_words, cell, mask8 = _w_words(w_idx, w_val, col_mask, fold, sparse, _TILES["BLOCK_T"],
                                                     _TILES["BLOCK_E"])
    nprog = K if help_split else _num_programs(K, device)
    row_len = (V_T + 17) // 16 * 16  # scratch rows: ranks 0 .. V_T + 1 (_w_structure), 16-entry aligned
    qu = torch.zeros(nprog, row_len, **f32)
    if fold:  # the h row (dense: the Qu row's buffer) of u = x̄ − log(q + eps): the weightless slots' spare u = −inf
        qu[:, 0] = float("-inf")
    # C's tile maxima for C3's rescale (sparse or learnable W); FOLD keeps none: an unused placeholder
    tm = qu if fold else torch.empty(nprog, max(1, triton.cdiv(C, _TILES["BLOCK_T"])), **f32)
    if sparse:
        tacc = torch.zeros(nprog, row_len, **f32)
        tcnt = torch.zeros(nprog, row_len, dtype=torch.int32, device=device)
    else:
        tacc, tcnt = qu, qu  # unused placeholders (SPARSE=False)
    lse_s, d_r = torch.empty(2, N_s, **f32)
    lse_t = torch.empty(t_vals.shape[0], **f32)
    chain = t_chain.to(**f32).contiguous() if merge == "chain" else loss
    scale = chunk_scale.to(**f32).contiguous() if chunk_scale is not None else loss
    if need_grad_w:  # blocks of chunks whose h rows fit the budget, each followed by the W-gradient kernel
        per_block = max(1, min(K, _GRAD_W_BYTES // (4 * V_T)))
        blocks = [(k0, min(K, k0 + per_block)) for k0 in range(0, K, per_block)]
    else:
        per_block, blocks = 0, [(0, K)]
    for k0, k1 in blocks:
        if need_grad_w:
            h, stat = torch.zeros(k1 - k0, V_T, **f32), torch.zeros(k1 - k0, 2, **f32)
        else:
            h, stat = (torch.zeros(nprog, row_len, **f32) if sparse else qu), loss
        sync, rs = torch.zeros(1 + 2 * (k1 - k0), dtype=torch.int32, device=device), torch.empty(k1 - k0, 4, **f32)
        prof, profile = _tl.phase_args("P-KL", PHASES, nprog, device, spans)
        for help_ in (1, 2) if help_split else (0,):
            _launch((nprog,),
                    s_logits, s_logits.stride(0), t_vals, t_vals.stride(0), t_cols, t_cols.stride(0),
                    a, ell, st["nslot"], e_words, st["e_key"], st["nnz"], cell, st["rank"], r_words,
                    r_key, st["n_pieces"], st["r_spare"], mask8,
                    spans, chain, scale, loss, grad, grad.stride(0), lse_s, d_r, lse_t, qu, h, tm, tm.shape[1], tacc,
                    tcnt, stat, sync, rs, prof,
                    k0, k1, V_S, V_T, row_len, C, 1.0 / float(temperature), float(temperature), float(eps),
                    MEAN=merge == "mean", CHAIN=merge == "chain", SPARSE=sparse, GRAD_W=need_grad_w,
                    HAS_SCALE=chunk_scale is not None, CSLOTS=st["cslots"], RPIECE=1 if sparse else st["rpiece"],
                    SLOTS=SLOTS, EPS=_eps_kind(eps),
                    **_TILES, **_SLICES, HELP=help_, PROFILE=profile)
        if need_grad_w:
            _grad_w(lambda meta: (triton.cdiv(V_S, meta["BLOCK"]),), s_logits, s_logits.stride(0), spans, w_idx,
                    mask8, lse_s, h, stat, grad_w, k0, k1, V_S, V_T, 1.0 / float(temperature), float(temperature),
                    MEAN=merge == "mean", SLOTS=SLOTS)
    return loss, grad, grad_w
