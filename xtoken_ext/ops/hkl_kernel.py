"""Fused H-KL / GOLD / ULD Triton kernel, imported lazily by ``ops.hkl`` (its ``triton`` backend); math in ``ops.hkl``'s
docstring. One launch of `_hkl_kernel` (a persistent grid, each program walking chunks k = pid, pid + P, ...) computes
every chunk's loss, its Σ_v ∂L/∂S and its student gradient rows; a second small launch zeroes the rows no chunk merges.
No host loop, no host sync (m stays on the device), no torch.topk / torch.sort.

Selection and sorted L1 (per chunk, per side; a = e^S on U_S, b = P on U_T):
  keys: the fp32 bits of the key-space value x (one row: the raw logit, S or T being an increasing affine map of
    it; several rows: x = S or T), made signed-order-preserving (k = s ^ ((s >> 31) & 0x7fffffff)); a, b =
    exp(αx + β) are non-decreasing in k.
  level 1: a 64-bin histogram of half-octaves of x − c (|x − c| in [2^-7, 2^8), end bins beyond), c = a prediction
    of the m-th largest x from this program's previous one on that side (a raw row: its _anchor plus the previous
    θ − anchor; 0 at first), so the threshold tends to fall in a fine bin near 0.
    64 bins because Triton 3.7's tl.histogram keeps bins/32 counters per lane (4096 bins cost 128 registers and ~50
    instructions per element). The bin b1 of the m-th largest gives a superset of the top m (every key of bin ≥ b1)
    to compact into a per-program list L in row order, of capacity 2 m_up + _SLACK.
  single-pass compaction (the common case): the row pass (S1 / T1) appends to L every key of bin ≥ b_h, a bin fixed
    before the pass (_hint_bin: every key when the side's uncommon set fits L and 2 m + _SLACK, else the bin of −e,
    e ≈ the 80th percentile of |θ − c| over this program's chunks, θ the m-th largest x, c its prediction), as
    one compare per element (_bin_edge), and counts the side's keys; no histogram in the row pass (~40
    instructions per element of the row; the kernel is bound by instruction issue, bench/costmodel.py). A tile
    without an uncommon id skips the append (half of the row pass's instructions): one test of a bit per 64 ids
    (_tile_has), W's (the host's _uncommon_bits); a real W's uncommon ids cluster (Llama-3 → Qwen3: U_S in 29 of
    63 student tiles, U_T in 13 of 75 teacher tiles). Since bins
    ascend with the key, that list holds every key of bin ≥ b1 iff it holds ≥ m keys (⟺ b_h ≤ b1; all keys when the
    side has fewer than m), and it is complete iff that count ≤ capacity: both known at the end of the pass, so the
    check is exact; the level-1 histogram of L (which holds every bin ≥ b_h) then gives b1, and a second pass over L
    its key range. Otherwise (a miss: e.g. a row whose θ − anchor lies far from the previous one's, a merged row's θ
    far from the previous θ, equal logits, no e yet: a program's first two chunks since the hint state was created,
    which is kept across launches), a single raw row first tries _rescue: a pass counting the keys at 8 bins next to
    b_h, then, where one of them holds m to capacity keys at and above it, a pass appending those (a hit's list; on
    real logits 91–100 % of the misses, SmolLM2-135M and Gemma-3 270M rows: scripts/hint_paths.py, bench/costmodel.py's
    RESCUE_RATE); else the exact path runs:
    the row's level-1 histogram (S2 / T2, _compact), a pass that compacts bin ≥ b1, and if that exceeds the capacity
    (equal or far-shifted logits), the exact m-th key is first found over the rows (the bisection below, ≤ 5 more
    row passes) and only prefix(m) is compacted.
    ``last_paths`` records per chunk which sides hit, and which were rescued.
  prefix(R) = {k > θ_R} ∪ the first R − #{k > θ_R} keys (in L order) equal to θ_R, θ_R the R-th largest key: ties
    are taken in one fixed order, so prefixes are nested. θ_R: 128-way bisection of a key interval known to hold it,
    one pass per step (≤ 5 steps; ~3 from the key range of bin b1, which the compaction records) over bin b1's keys,
    which the pass finding that range on a hit copies to the sort buffer where they fit (the bisection counts only
    keys in the range: the same θ; ≈ 0.07 m keys as bench/costmodel.py models them), else over L.
    Everything below reads only L (or that copy), which the two paths fill with the same keys of bin ≥ b1 in the
    same row order (the single-pass list may hold more keys below bin b1), so both give bit-identical results.
  the window of W = min(next_pow2(m_up), _SORT_CAP) lanes (m ≤ W): prefix(m) gathered from L into a W-lane buffer
    and sorted (_sort_desc: tl.sort's bitonic network; a: _pack(k, column) as int64, so that keys tie in ascending
    column, L's row order; b: k as int32, descending); lane i of both sorted windows is rank i, so Σ|a_i − b_i| and
    g_i = τ² sign(a_i − b_i) a_i come lane-wise (a side short of ranks, e.g. a sparse teacher, is padded with 0).
    The sizes are the host's (m_up, its bound on m); m itself stays on the device, where the kernel picks the
    network: m ≤ W_SMALL = min(_SMALL_CAP, W/4) sorts in a W_SMALL-lane network run for only its first ⌈log₂ m⌉
    merge stages (_windows / _sort_desc with TRUNC; its runtime branches would make the W-lane network spill), both
    windows side by side in it (PAIR: b's keys widened to int64, one chain of stages), else the W-lane one, a then b
    (one sorted window live at a time). With the default uncovered="renormalize" most teacher columns are paired,
    so m = |U_T| is small: 128 for H-KL with Llama-3 → Qwen3 (28 stages on 2 × 1,024 lanes instead of 2 × 91 on
    8,192). Where both single-pass lists hit and hold ≤ W_SMALL keys too (that W: 256 and 128), the small network
    sorts the whole lists instead, ⌈log₂ |L|⌉ merge stages, with no pass over them (no level-1 histogram, key range,
    bisection or gather: 3 passes over each list and ~3 over bin b1's keys, ~400–500 instructions per thread per
    tile each, bench/costmodel.py): their first m lanes are the top m, the keys equal to θ taken in ascending column
    (_pack) as prefix takes them in row order: the same columns in the same order, so both paths give bit-identical
    results.
    H-KL / GOLD (m ≤ 8192): one window. m > W (ULD: m = |U| ~ 1e5, no cap; the constexpr MERGE where the host's
    m_up exceeds W): no selection; both lists are sorted whole (_sort_list: blocks of W keys in the W-lane network,
    then ⌈log₂(|L|/W)⌉ rounds merging sorted runs pairwise, each W-key output tile found by a merge-path search and
    sorted by the network's last merge stage; a second buffer per list) and paired rank window by rank window of W
    (_sorted_lists). A full sort in the same order (a's keys tie in ascending column) has prefix(m) first, so each
    window holds the ranks a selected window would: O(|L| log(|L|/W)) traffic, where a selection (≤ 5 passes) and
    a gather over both whole lists per window would cost O(m/W · |L|) (~71 passes per list for the real Llama-3 ×
    Qwen3 ULD, by the cost model as it stood for that design).
  the gradient list G (column, g_i) is kept per program; after the dense gradient pass (S3) has written every column
    with the common part, the m listed columns are overwritten with their full value (rounded once).
Common pairs: dense teacher: in S3, gathering the teacher at t_c = smap[s] (KL and gS = −τ²P); sparse teacher: in the
  teacher pass over its k entries, gathering the student at s_c = tmap[t] (gS into G after m_up). Σ_v gS =
  −τ² Σ_c P[t_c] + Σ_i g_i is known before S3 (Σ_c P is folded into T1's online LSE by rescaling).
Bad input (notes/POLICY.md): NaN or +inf in any column of a row the chunk reads (a sparse row: its entries, padding
  excluded), a student row with no finite value, or (merge="chain", as the torch backend) a NaN or +inf chain sum
  -> loss NaN, gsum 0, gradient rows 0 (the selection and sort are skipped).

Cost per row (n_s = n_t = 1, dense teacher, bf16; S = 2 V_S bytes, T = 2 V_T bytes; the cost model reads this block):
  HBM floor = read S + read T + write S.    BLOCK = 2048 (config 0), m = 8192, |L| ≈ 2 m (hit: m + the keys within
  the hint's margin, 1.7 m on real logits at m = 8,192, _anchor; miss: ≈ 1.2 m, bin b1's overshoot)
  pass         HBM reads / writes                         dependent loop per row
  S1 student   S (online LSE, bad check, keys of bin ≥ b_h   ⌈V_S/BLOCK⌉ tiles, pipelined (by hand, a tile ahead)
               appended): writes L_a: 8 B × |L_a| ≈ 131 KB
  T1 teacher   T (online LSE + Σ_c P, bad check, L_b);      ⌈V_T/BLOCK⌉ tiles, pipelined
               writes L_b: 4 B × |L_b| ≈ 66 KB
  S2 student   miss only: S twice (_rescue: a count at 8      2 ⌈V_S/BLOCK⌉ tiles (3 where _rescue finds no
               bins, the append; where it finds no bin,    bin: the count and _compact's two; ≤ 5 more
               the count, then level-1 histogram and       where bin ≥ b1 exceeds the capacity)
               compaction); rewrites L_a
  T2 teacher   miss only: T twice; rewrites L_b            2 ⌈V_T/BLOCK⌉ tiles (as S2)
  window (×1)  per side (hit) 2 passes (level-1 histogram, 3 ⌈|L|/BLOCK⌉ + ~3 ⌈|b1|/BLOCK⌉ tiles per side + 2
               bin b1's key range and copy), 1 gather   sorts of W lanes (½ log₂W (log₂W + 1) = 91
               over L, ~3 bisection passes over bin     compare-and-swap stages at W = 8192; m ≤ W_SMALL:
               b1's keys, W-lane buffer, G: ≈ 1.1 MB    one sort of both windows, ½ ⌈log₂m⌉ (⌈log₂m⌉ + 1)
               total (per-program scratch, L2 if it     stages, 28 at m = 128)
               stays there)
  merge sort   m > W (ULD), per list instead of the window: blocks = ⌈|L|/W⌉ sorts of W lanes, then ⌈log₂ blocks⌉
               rounds of blocks merge tiles (log₂W = 13 stages each), each round reading the list from one of its
               two buffers and writing it to the other (L2 if they stay there); chain: blocks × 91 + rounds ×
               blocks × 13 stages per list
  S3 gradient  S; writes S; the teacher gathered at the    ⌈V_S/BLOCK⌉ tiles, pipelined
               |C| common columns (32 B sectors, from L2:
               T was streamed in T1 (T2 on a miss) just before)
  fixup        G 64 KB, m gathers of S, m scattered stores ⌈m/BLOCK⌉ tiles
  streamed, both sides hit: 3 S + 1 T = 1.31× the floor at V_S = 128,256 (floor 816.9 KB, streamed 1,073.4 KB) and
  1.39× at V_S = 256,000 (floor 1,327.9 KB, streamed 1,839.9 KB), V_T = 151,936. A student miss adds 2 S (1.94× /
  2.16×), a teacher miss 2 T (2.06× / 1.84×), both 5 S + 3 T = 2.7× / 2.6×. The ≈ 1.1 MB of list / buffer /
  G traffic stays in L2 when the active scratch of all programs fits (≈ 0.4 MB per program); where it is evicted to
  HBM the total is up to 2.7× (V_S = 128,256) or 2.2× (V_S = 256,000) on a hit. Several rows (mean): per side n LSE
  passes and one pass of n rows that compacts (a miss adds a level-1 histogram pass and a compaction pass of n
  rows); S3 reads n student rows (and n teacher rows at the common columns), writes n.
  Compute: the kernel is bound by instruction issue, not bytes (bench/costmodel.py reads the loop bodies from the sm_90
  SASS): S1 / T1 issue ~340 / 350 instructions per thread per 2048-lane tile that appends, ~125 / 155 per tile that
  skips (their running max per thread's 8 lanes; ~370 / 380 and ~150 / 180 with one per tile; 8 warps; ~420 / 455 and
  ~195 / 245 pipelined by Triton, 1,330 / 1,410 with the level-1 histogram, a flat tl.cumsum and per-tile sums in the
  row pass, ~550 / 570 with a plain scatter store), S3 ~230, 0.8-2.9× the time the SM's share of HBM bandwidth needs to
  stream the tile. The two sorts at W = 8192 are ~20k + ~11k SASS instructions per thread, ~36 µs of issue time per row
  per SM, not overlapped with the streams: one program per SM (below). At m = 128 in the small network: ≈ 2.3 µs.
Registers (offline sm_90 compile with Triton 3.7.1, bf16; spill stores over first / mean / chain × dense / sparse;
  Triton 3.6.0, a GPU image's, spills more: 424 B of stores, 540 B of loads for the first-row dense variant, all in
  the once-per-chunk code as with 3.7.1): config 0 (2048 lanes, 3 stages, 8 warps) 255 registers
  with 152-216 B at W = 8192, none in a per-tile loop nor in the sorts' stage loops (100-192 B before _rescue, whose
  first version, its 8 bin counts in an 8-lane tensor and a scan over them, put 19-58 local accesses into every stage
  loop of the sorts; 96-176 B before _anchor, 68-128 B before that copy; 164-232 B,
  with 2-12 local accesses per tile in the row and list passes, while the window kept the prefix state of several
  rank windows;
  236-400 B before the row passes and S3 were pipelined by hand, 104-252 B before the row passes'
  tile skip, scatter layout and the small network's whole-list path, 76-204 B while the row passes built the level-1
  histogram, 24-124 B before the W_SMALL network was added); with MERGE (ULD's merge sort compiled in, _rescue left
  out) 396 B (first, dense; 392 before _rescue, 368 before _anchor) and 2-10 local accesses per tile in the row and
  list passes; config 1 (4096 lanes, 2 stages, 16 warps) 128 with 0.78 KB (first, dense; 0.68 / 0.67 / 0.56 / 0.72 /
  0.76 / 0.71 / 0.61 / 0.44 KB before), 2-8 local accesses per tile in the row (_rescue's append included), list and
  gradient passes. What remains: LLVM hoists the per-thread shared-memory
  addresses of every layout conversion, reduction and scan out of the persistent chunk loop (~40-100 registers held
  throughout), and at W = 8192 the a-sort holds 32 int64 keys and their partner sums per thread. Kept down by: no masked
  scatter stores (the compactions and a sparse teacher's G entries send their unselected lanes to a spare slot past the
  capacity: a masked scatter moved its i1 mask through shared memory to the store's layout, one more set of hoisted
  addresses); 16-entry-aligned per-program rows (strides rounded up on the host, so Triton's 16-divisibility
  specialization applies: the window and G accesses vectorize from one base register instead of a 64-bit pointer per
  element, which held ~40 registers of b-value addresses across the a-sort); the sorted a-window's columns stored before
  a, d and g are formed. Occupancy versus spills is for autotuning on a GPU to settle.
Scratch (per program, bounded, independent of K): L_a min(V_S, 2 m_up + _SLACK) × 8 B, L_b min(C, 2 m_up + _SLACK) × 4 B
  (each twice with MERGE: the merge sort's second buffer), G (m_up [+ k sparse]) × 8 B, buffers W × 12 B (each list,
  buffer and G with a spare slot, rows padded to 16 entries: see Registers), and 32 B of hint state kept across launches
  (_hint_state); a sparse teacher with several rows per chunk adds the [V_T] fp32 + int32 intersection scratch of
  ops._tl.scatter_later_rows. Programs: 1 per SM (both configs use the whole register file: 255 × 256 or 128 × 512
  threads, so a second program would not be resident), fewer if the scratch would pass 1 GiB. Sparse teacher columns
  must be unique per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tl
from ._common import cached_on_tensors, covered_rows, interpret

_SORT_CAP = 8192  # largest sort window W (lanes); m above it merge-sorts both lists whole (module docstring)
_SMALL_CAP = 1024  # the second, smaller sort network (W_SMALL lanes) for m ≤ W_SMALL
_SLACK = 4096  # L capacity beyond 2 m_up (single-pass hits, and S2 / T2 before the exact compaction is needed)
_PROGRAMS_PER_SM = 1  # resident programs per SM at the configs' register use (module docstring)
_INT_MIN = tl.constexpr(-2 ** 31)
_INT_MAX = tl.constexpr(2 ** 31 - 1)
_I64_MIN = tl.constexpr(-2 ** 63)
# per chunk of the last launch (on its device, no sync): bit 0 / 1 = the student / teacher candidate list came from
# the single-pass compaction (no S2 / T2), bit 2 = sorted in the W_SMALL-lane network, bit 3 = both lists sorted
# whole there (no selection passes), bit 4 = both lists merge-sorted whole (m > W), bit 5 / 6 = the student /
# teacher side missed and _rescue listed it; 0 where no selection ran (bad input, m = 0). For tests and the bench.
last_paths: torch.Tensor | None = None
_hint_states: dict[tuple, torch.Tensor] = {}  # _hint_state's, per device and problem


@triton.jit
def _key(x):
    """fp32 -> int32 whose signed order is the float order (−0 < +0)."""
    s = x.to(tl.int32, bitcast=True)
    return s ^ ((s >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _pack(k, col):
    """An a-list word: key k (int32) high, column ^ (2^31 − 1) = 2^31 − 1 − column low, so that a descending sort
    orders equal keys by ascending column (the lists' row order, in which prefix takes them). The xor, not the
    difference: LLVM hoists 2^31 − 1 − arange out of the row pass's tile loop, 8 more registers held across the
    chunk loop (Triton 3.6: 28 B more spill at 8 warps)."""
    return (k.to(tl.int64) << 32) | (col ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _column(e):
    """The column of an a-list word (_pack)."""
    return e.to(tl.int32) ^ 0x7FFFFFFF


@triton.jit
def _key_of(e):
    """The key of an a-list word (_pack)."""
    return (e >> 32).to(tl.int32)


@triton.jit
def _sort_desc(x, N: tl.constexpr, n, TRUNC: tl.constexpr, PAIR: tl.constexpr, FIRST: tl.constexpr):
    """Bitonic sort, descending, of N (a power of two) integers: tl.sort's network, with each compare-and-swap
    partner taken as (sum of the pair) − self (exact in wrap-around integer arithmetic). Without TRUNC the same
    instructions as tl.sort when compiled; the interpreter runs sums vectorized where tl.sort's xor_sum goes element
    by element. TRUNC: only the first ⌈log₂ n⌉ merge stages (n on the device; the last of them descending on every
    lane), which sort the first 2^⌈log₂ n⌉ lanes (the others come out in some order). Its runtime branches cost
    registers (the 8,192-lane network would spill): the small network's only. PAIR: x is [N, 2], its two columns
    sorted side by side in one network (one chain of stages, not two). FIRST: the first merge stage run, 1 for a
    sort; log₂ N runs only the last one (log₂ N compare-and-swap steps), which sorts a bitonic x (descending, then
    ascending: _sort_list's merges)."""
    LOG: tl.constexpr = N.bit_length() - 1
    T: tl.constexpr = [2] if PAIR else []  # the pair axis, last: lane bit j on axis LOG − 1 − j either way
    O: tl.constexpr = [1] if PAIR else []
    h = tl.reshape(x, [2] * LOG + T)
    bit = tl.arange(0, 2) == 1
    if TRUNC:
        lg = tl.full((), 0, tl.int32)  # ⌈log₂ n⌉, at most LOG
        for j in tl.static_range(LOG):
            lg += (n > (1 << j)).to(tl.int32)
    else:
        lg = LOG
    for s in tl.static_range(FIRST, LOG + 1):
        if s <= lg:
            if s < LOG:  # merge blocks of 2^s lanes, descending where lane bit s is set (all of them at s = lg)
                desc = tl.reshape(bit, [1] * (LOG - s - 1) + [2] + [1] * s + O)
                if TRUNC:
                    desc = desc | (lg == s)
            else:
                desc = True
            for i in tl.static_range(s):  # compare-and-swap across lane bit s − 1 − i
                y = tl.sum(h, axis=LOG - s + i, keep_dims=True) - h
                h = tl.where((h > y) != (desc ^ tl.reshape(bit, [1] * (LOG - s + i) + [2] + [1] * (s - 1 - i) + O)),
                             y, h)
    return tl.reshape(h, [N] + T)


@triton.jit
def _s_vals(z_ptr, stride_z, lse_s_ptr, s_lo, n_s, o, om, inv_tau, ONE: tl.constexpr, BLOCK: tl.constexpr):
    """Key-space value of the merged student: the raw logit for one row, S = mean_r (z_r/τ − lse_r) for several.
    ONE: one row known at compile time (no row loop: the caller's tile loop stays innermost, hence pipelined)."""
    if ONE:
        x = tl.load(z_ptr + s_lo * stride_z + o, mask=om, other=float("-inf")).to(tl.float32)
    elif n_s == 1:
        x = tl.load(z_ptr + s_lo * stride_z + o, mask=om, other=float("-inf")).to(tl.float32)
    else:
        x = _tl.logp_sum(z_ptr, stride_z, lse_s_ptr, s_lo, s_lo + n_s, o, om, inv_tau, BLOCK) / n_s.to(tl.float32)
    return x


@triton.jit
def _t_vals(t_ptr, stride_t, tc_ptr, stride_tc, tcls_ptr, lse_t_ptr, tacc_row, tcnt_row, t_lo, n_t, c_t, inv_tau,
            C, c0, ONE: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """Teacher column tile at c0 of the chunk's first row -> (key-space value x: the raw logit for a dense single
    row, else T; T; P = e^T; column ids; live = allowed (sparse: held by every row); class 0/1/2 = outside A / U_T /
    common). ONE: a single dense row known at compile time."""
    o = c0 + tl.arange(0, BLOCK)
    if SPARSE:
        o, v, inside, allowed = _tl.col_tile(tc_ptr + t_lo * stride_tc, tcls_ptr, c0, C, True, BLOCK)
        tv, P, live = _tl.teacher_merged(t_ptr, stride_t, lse_t_ptr, tacc_row, tcnt_row, t_lo, t_lo + n_t, o, v,
                                         allowed, c_t, inv_tau, True, BLOCK)
        x = tv
    else:
        v = o
        inside = o < C
        live = inside & (tl.load(tcls_ptr + o, mask=inside, other=0) != 0)
        if ONE:  # no row loop compiled in (_rescue)
            x = tl.load(t_ptr + t_lo * stride_t + o, mask=inside, other=0.0).to(tl.float32)
            tv = x * inv_tau - tl.load(lse_t_ptr + t_lo) + c_t
        elif n_t == 1:
            x = tl.load(t_ptr + t_lo * stride_t + o, mask=inside, other=0.0).to(tl.float32)
            tv = x * inv_tau - tl.load(lse_t_ptr + t_lo) + c_t
        else:
            acc = tl.full((BLOCK,), 0, tl.float32)
            for r in range(t_lo, t_lo + n_t):
                acc += tl.load(t_ptr + r * stride_t + o, mask=inside, other=0.0).to(tl.float32) * inv_tau \
                    - tl.load(lse_t_ptr + r)
            tv = acc / n_t.to(tl.float32)
            x = tv
        tv = tl.where(live, tv, float("-inf"))
        x = tl.where(live, x, float("-inf"))
        P = tl.where(live, tl.exp(tv), 0.0)
    cls = tl.load(tcls_ptr + v, mask=live, other=0)
    return x, tv, P, v, live, cls


@triton.jit
def _bucket1(x):
    """Level-1 bin in [1, 64), non-decreasing in x = key-space value − the chunk's shift: half-octave bins of |x| in
    [2^-7, 2^8) on either side of one bin for |x| < 2^-7, the end bins beyond (a 64-bin tl.histogram is cheap)."""
    u = _key(x) >> 22  # sign, 8 exponent bits, 1 mantissa bit: 2(127 + e) + m for x ≥ +0, −1 − that for x ≤ −0
    t = tl.where(u >= 0, tl.minimum(tl.maximum(u - 239, 0), 31), -tl.minimum(tl.maximum(-1 - u - 239, 0), 31))
    return t + 32


@triton.jit
def _keys(SRC: tl.constexpr, c0, n, src, ONE: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """One tile of a source -> (keys k int32, level-1 bins (rows only), valid, student column). SRC 0: the a-list
    (int64 _pack(k, column)), 1: the b-list (int32 k), 2: the student row(s) on U_S, 3: the teacher row(s) on U_T.
    ``src``: the list pointer, or the row's pointers and scalars ending with the level-1 shift; n: list length or
    row width; ONE: the rows are single (no loop over rows: the tile loops stay innermost, hence pipelined)."""
    o = c0 + tl.arange(0, BLOCK)
    if SRC == 0:
        valid = o < n
        e = tl.load(src + o, mask=valid, other=0)
        k = _key_of(e)
        col = _column(e)
        b = o * 0
    elif SRC == 1:
        valid = o < n
        k = tl.load(src + o, mask=valid, other=0)
        col = o
        b = o * 0
    elif SRC == 2:
        z_ptr, stride_z, lse_s_ptr, s_lo, n_s, inv_tau, smap_ptr, c = src
        om = o < n
        x = _s_vals(z_ptr, stride_z, lse_s_ptr, s_lo, n_s, o, om, inv_tau, ONE, BLOCK)
        valid = om & (tl.load(smap_ptr + o, mask=om, other=0) < 0)
        k = _key(x)
        b = _bucket1(x - c)
        col = o
    else:
        t_ptr, stride_t, tc_ptr, stride_tc, tcls_ptr, lse_t_ptr, tacc_row, tcnt_row, t_lo, n_t, c_t, inv_tau, c = src
        x, tv, P, v, live, cls = _t_vals(t_ptr, stride_t, tc_ptr, stride_tc, tcls_ptr, lse_t_ptr, tacc_row, tcnt_row,
                                         t_lo, n_t, c_t, inv_tau, n, c0, ONE, SPARSE, BLOCK)
        valid = live & (cls == 1)
        k = _key(x)
        b = _bucket1(x - c)
        col = o
    return k, b, valid, col


@triton.jit
def _pick(h, above, R, NB: tl.constexpr):
    """Bins ascend with the key; ``above`` keys lie above every bin. -> (bin d of the R-th largest key: the largest d
    with above + #(bins ≥ d) ≥ R, above + #(bins > d))."""
    b = tl.arange(0, NB)
    d = tl.max(tl.where(above + tl.cumsum(h, 0, reverse=True) >= R, b, 0))
    return d, above + tl.sum(tl.where(b > d, h, 0))


@triton.jit
def _select(SRC: tl.constexpr, n, src, lo, hi, above, R, ONE: tl.constexpr, SPARSE: tl.constexpr,
            BLOCK: tl.constexpr):
    """-> (θ = the R-th largest key of the source, #(keys > θ)), given lo ≤ θ ≤ hi and ``above`` = #(keys > hi):
    128-way bisection of the key interval, one pass over the source per step (≤ 5 steps for 32-bit keys)."""
    lo = lo + tl.full((), 0, tl.int64)  # tensors of fixed types (the arguments may be constants)
    hi = hi + tl.full((), 0, tl.int64)
    above = above + tl.full((), 0, tl.int32)
    while lo < hi:
        # s: a shift with (hi − lo) >> s < 128 (the float exponent of hi − lo never undershoots ⌊log₂⌋)
        e = ((hi - lo).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
        s = tl.maximum(e - 6, 0).to(tl.int64)
        h = tl.full((128,), 0, tl.int32)
        for c0 in range(0, n, BLOCK):
            k, _, valid, _ = _keys(SRC, c0, n, src, ONE, SPARSE, BLOCK)
            k = k.to(tl.int64)
            h += tl.histogram(((k - lo) >> s).to(tl.int32), 128, mask=valid & (k >= lo) & (k <= hi))
        d, above = _pick(h, above, R, 128)
        lo = lo + (d.to(tl.int64) << s)
        hi = tl.minimum(hi, lo + (tl.full((), 1, tl.int64) << s) - 1)
    return lo.to(tl.int32), above


@triton.jit
def _gather(SRC: tl.constexpr, n, src, th, q, b_min, b_eq, dst, cap, PACK: tl.constexpr, ONE: tl.constexpr,
            SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """Append the source's keys in prefix(th, q) with level-1 bin ≥ b_min to dst, in source order (PACK: _pack(k,
    column) as int64, else k); the other lanes store to the spare slot dst[cap] (module docstring, Registers).
    prefix(θ, q) = {k > θ} ∪ the first q keys equal to θ. -> (count, min and max key of those in bin b_eq)."""
    tl.debug_barrier()  # dst may still be read by other lanes (the previous chunk's sort, _select's passes)
    cnt = tl.full((), 0, tl.int32)
    e_hi = tl.full((), 0, tl.int32)
    b_lo = tl.full((), _INT_MAX, tl.int32)
    b_hi = tl.full((), _INT_MIN, tl.int32)
    for c0 in range(0, n, BLOCK):
        k, b, valid, col = _keys(SRC, c0, n, src, ONE, SPARSE, BLOCK)
        valid = valid & (b >= b_min)
        eq_hi = (valid & (k == th)).to(tl.int32)
        sel = valid & ((k > th) | ((eq_hi != 0) & (e_hi + tl.cumsum(eq_hi, 0) - eq_hi < q)))
        e_hi += tl.sum(eq_hi)
        si = sel.to(tl.int32)
        pos = tl.where(sel, cnt + tl.cumsum(si, 0) - si, cap)
        if PACK:
            tl.store(dst + pos, _pack(k, col))
        else:
            tl.store(dst + pos, k)
        cnt += tl.sum(si)
        b_lo = tl.minimum(b_lo, tl.min(tl.where(sel & (b == b_eq), k, _INT_MAX)))
        b_hi = tl.maximum(b_hi, tl.max(tl.where(sel & (b == b_eq), k, _INT_MIN)))
    tl.debug_barrier()  # the list is read by other lanes next
    return cnt, b_lo, b_hi


@triton.jit
def _compact(SRC: tl.constexpr, n, src, m, cap, dst, PACK: tl.constexpr, ONE: tl.constexpr, SPARSE: tl.constexpr,
             BLOCK: tl.constexpr):
    """Write a superset of the side's top m keys (all of them if it has fewer) to the list dst: the keys of the
    level-1 bin b1 of the m-th largest and above (from the rows' level-1 histogram, one pass), or exactly prefix(m)
    when those exceed ``cap`` (found by _select over the rows). -> (length, min and max key of bin b1,
    #(bins > b1))."""
    h1 = tl.full((64,), 0, tl.int32)
    for c0 in range(0, n, BLOCK):
        _k, b, valid, _c = _keys(SRC, c0, n, src, ONE, SPARSE, BLOCK)
        h1 += tl.histogram(b, 64, mask=valid)
    total = tl.sum(h1)
    b1, c1 = _pick(h1, 0, m, 64)
    th = tl.full((), _INT_MIN, tl.int32)  # prefix(INT_MIN, 0): every key
    q = tl.full((), 0, tl.int32)
    b_min = tl.where(m > total, 0, b1)
    if m <= total:
        if c1 + tl.sum(tl.where(tl.arange(0, 64) == b1, h1, 0)) > cap:
            th, c = _select(SRC, n, src, _INT_MIN, _INT_MAX, 0, m, ONE, SPARSE, BLOCK)
            q = m - c
            b_min = 0
    cnt, b_lo, b_hi = _gather(SRC, n, src, th, q, b_min, b1, dst, cap, PACK, ONE, SPARSE, BLOCK)
    return cnt, b_lo, b_hi, c1


@triton.jit
def _append(k, sel, col, cnt, dst, cap, PACK: tl.constexpr):
    """Single-pass compaction, one tile: append its selected keys to dst in row order (PACK: _pack(k, column) as
    int64, else k); keys past ``cap`` go to the spare slot dst[cap] with the unselected lanes (they are dropped), the
    count holds them. The positions are an exclusive prefix count in two levels, rows of 8 lanes (a thread's, as the
    row's 16-byte loads leave them) and across rows, and the store keeps that layout (_tl.scatter): a plain scatter
    store took one lane per thread, converting or recomputing the keys, positions and the scan in it (S1 546 → 397
    instructions per thread per tile with both, sm_90 SASS). -> the new count."""
    N: tl.constexpr = sel.shape[0]
    si = tl.reshape(sel.to(tl.int32), [N // 8, 8])
    rows = tl.sum(si, 1)
    pos = cnt + tl.reshape((tl.cumsum(rows, 0) - rows)[:, None] + tl.cumsum(si, 1) - si, [N])
    pos = tl.where(sel & (pos < cap), pos, cap)
    if PACK:
        _tl.scatter(dst + pos, _pack(k, col), None, 8)
    else:
        _tl.scatter(dst + pos, k, None, 8)
    return cnt + tl.sum(rows)


@triton.jit
def _hint_bin(e, n, cap):
    """Level-1 bin b_h from which the first pass appends: 1 (every key) when the side's uncommon keys fit the list
    (n = |U_S|, |U_T| or a sparse row's k ≤ cap; the host passes 2^30 for a set above 2 m + _SLACK, whose list
    passes would cost more than warm-up misses): a hit in every chunk, a program's first ones included; else the
    bin of −e, e ≈ the 80th percentile of |θ − c| over this program's chunks (_track; θ: the m-th largest key-space
    value, c: its prediction, the shift), or 64 (nothing) while e is unknown. A margin of e, not 3e as before: on
    real logits the lists overflowed far more often than they fell short of m (_anchor's replay: at m = 8,192, 3e
    missed 92 % of the chunks by overflow, e 30 % by overflow and 7 % short)."""
    return tl.where(n <= cap, 1, tl.where(e < float("inf"), _bucket1(-e), 64))


@triton.jit
def _anchor(row_ptr, C):
    """A raw row's anchor: the mean of the finite logits among its first 2,048 columns, clamped to ±1e30 (0 if
    none). The shift of a single row's first pass is this anchor plus the program's last θ − anchor: a raw logit row
    moves as a whole from position to position (softmax ignores the offset), and its m-th largest value with it.
    Host replay of the hint on real bf16 logits (SmolLM2-135M and Gemma-3 270M on prose, code and math, 2,100 rows
    each, shuffled; U a random third of the vocabulary, or 15 % at m = 128 with the list's capacity 20,480): the
    chunks whose first pass hit (both causes of a miss counted) with the shift θ_prev and margin 3e → this anchor and
    margin e, past each program's first two: SmolLM2 m = 128 1.00 → 0.93, m = 2,048 0.00 → 0.89; Gemma-3 m = 128
    0.17 → 0.93, m = 2,048 0.01 → 0.69, m = 8,192 0.01 → 0.64 (the anchor alone, margin 3e: 1.00, 0.31, 0.82, 0.09,
    0.08). A full-row mean (not known before the pass) did little better in a shorter replay. One more 4 KB load per
    row, L2-resident for the pass that follows; only where the hint is in use. Which path a chunk takes depends on
    it, never a result."""
    o = tl.arange(0, 2048)
    x = tl.load(row_ptr + o, mask=o < C, other=float("-inf")).to(tl.float32)
    fin = tl.abs(x) < float("inf")
    n = tl.sum(fin.to(tl.float32))
    a = tl.sum(tl.where(fin, x * (1.0 / 2048), 0.0)) * (2048.0 / tl.maximum(n, 1.0))  # no overflow in the sum
    return tl.minimum(tl.maximum(a, -1.0e30), 1.0e30)


@triton.jit
def _bin_edge(b):
    """The smallest value v with _bucket1(v) ≥ b: bins ascend with the key's top 10 bits (_bucket1), so for a
    non-NaN v, _bucket1(v) ≥ b ⟺ v ≥ _bin_edge(b), one compare per element where a bin costs ~17 instructions.
    b ≤ 1: −inf (every value); b ≥ 64: NaN (none); else the float of key u << 22, never ±0 (|u| ≥ 240), so the
    float compare agrees with the key order."""
    u = tl.where(b > 32, b + 207, b - 272)
    return tl.where(b <= 1, float("-inf"), _unkey(tl.where(b >= 64, _INT_MAX, u << 22)))


@triton.jit
def _track(e, c, th):
    """e ≈ the 80th percentile of |Δθ| = |θ − c| over this program's chunks (c: the shift used, θ's prediction: the
    previous θ, or for a raw row its _anchor plus the previous θ − anchor), by multiplicative steps: ×1.5 when
    |Δθ| > e, else ×0.9 (at equilibrium P(|Δθ| > e) ln 1.5 = P(|Δθ| ≤ e) ln(1/0.9), i.e. P(|Δθ| > e) ≈ 0.2), so an
    outlier row moves it by one bounded step. NaN = no θ yet -> +inf = one θ, no Δθ yet -> |Δθ| (a non-finite one
    restarts this); a step up from 0 goes to |Δθ|."""
    d = tl.abs(th - c)
    step = tl.where(d > e, tl.where(e > 0, 1.5 * e, d), 0.9 * e)
    return tl.where(e != e, float("inf"), tl.where(e == float("inf"), d, step))


@triton.jit
def _candidates(SRC: tl.constexpr, n, src, m, cap, dst, cnt, c, hit, whole, buf, PACK: tl.constexpr,
                ONE: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, W: tl.constexpr):
    """The candidate list of one side. The first pass appended its cnt keys with level-1 bin ≥ b_h to dst (c: the
    level-1 shift) out of the side's n_u keys. Those are a superset of the top m in row order, holding every key of
    bin b1 and above as _compact's list does, iff cnt ≥ min(m, n_u) (for m ≤ n_u: ⟺ b_h ≤ b1) and none was dropped
    (cnt ≤ cap): hit (the caller's, _hit). Then two passes over the list find bin b1 (the list's level-1 histogram:
    the bins ≥ b_h are all there) and its key range, and the second copies bin b1's keys to the sort buffer ``buf``
    (as dst holds them; W entries and a spare slot) where they fit, so that the bisection, which counts only keys in
    that range, reads them there instead of the whole list; unless the lists are sorted whole (whole: the small
    network's both lists, _windows, or m > W, _sorted_lists, which then read neither); else _compact (the exact path)
    rewrites it. -> _compact's results and the keys copied to buf (−1: none, the bisection reads dst)."""
    LSRC: tl.constexpr = SRC - 2  # the list's source id in _keys
    n_b1 = tl.full((), -1, tl.int32)
    if hit:
        b_lo = tl.full((), _INT_MAX, tl.int32)
        b_hi = tl.full((), _INT_MIN, tl.int32)
        c1 = tl.full((), 0, tl.int32)  # whole: not read
        if not whole:
            h1 = tl.full((64,), 0, tl.int32)
            for i0 in range(0, cnt, BLOCK_L):
                k, _b, valid, _c = _keys(LSRC, i0, cnt, dst, ONE, SPARSE, BLOCK_L)
                h1 += tl.histogram(_bucket1(_unkey(k) - c), 64, mask=valid)  # the first pass's bins (x = unkey(k))
            b1, c1 = _pick(h1, 0, m, 64)
            fit = tl.sum(tl.where(tl.arange(0, 64) == b1, h1, 0)) <= W
            n_b1 = tl.where(fit, 0, -1)
            for i0 in range(0, cnt, BLOCK_L):
                k, _b, valid, col = _keys(LSRC, i0, cnt, dst, ONE, SPARSE, BLOCK_L)
                eq = valid & (_bucket1(_unkey(k) - c) == b1)
                b_lo = tl.minimum(b_lo, tl.min(tl.where(eq, k, _INT_MAX)))
                b_hi = tl.maximum(b_hi, tl.max(tl.where(eq, k, _INT_MIN)))
                n_b1 = _append(k, eq & fit, col, n_b1, buf, W, PACK)
        n_l = cnt
    else:
        n_l, b_lo, b_hi, c1 = _compact(SRC, n, src, m, cap, dst, PACK, ONE, SPARSE, BLOCK)
    return n_l, b_lo, b_hi, c1, n_b1


@triton.jit
def _rescue(SRC: tl.constexpr, n, src, target, cap, dst, cnt, b_h, PACK: tl.constexpr, SPARSE: tl.constexpr,
            BLOCK: tl.constexpr):
    """A miss of the hinted first pass over a single raw row (a dense one on the teacher side; merged rows take
    _compact), whose cnt keys of level-1 bin ≥ b_h (1 < b_h < 64) fall short of target = min(m, n_u) or exceed cap,
    rescued in two passes over the row: one counts the keys of the 8 bins next to b_h on the side it missed (short:
    from max(b_h − 8, 1) up, overflow: from b_h + 1 up; the 8th counts its bin and every bin above), per lane in two
    int64 words of four 16-bit counters (a lane sees ⌈n/BLOCK⌉ keys: < 2^16 for n ≤ 65,535 × 2,048 at the configs'
    tiles), no tl.histogram; where some bin b of them has target to cap keys at and above it (the highest such b:
    the shortest list), the second appends those keys (_append, as the first pass does): a list of the same form as
    a hit's. sm_90 SASS per thread and 2,048-key tile (bench/sass.py), student / teacher: count 294 / 345 + append
    367 / 393, against _compact's histogram 878 / 928 + compaction 1,052 / 1,079. -> (the new count and 1, or cnt
    and 0: no such bin, _compact runs)."""
    base = tl.where(cnt < target, tl.maximum(b_h - 8, 1), b_h + 1)
    lo = tl.zeros((BLOCK,), tl.int64)
    hi = tl.zeros((BLOCK,), tl.int64)
    for c0 in range(0, n, BLOCK):
        _k, b, valid, _c = _keys(SRC, c0, n, src, True, SPARSE, BLOCK)
        d = tl.minimum(b - base, 7)
        one = (valid & (d >= 0)).to(tl.int64) << (16 * (d & 3)).to(tl.int64)
        lo += tl.where(d < 4, one, 0)
        hi += tl.where(d >= 4, one, 0)
    best = tl.full((), -1, tl.int32)  # the highest bin base + i with ≥ target keys at and above it, their count
    keys = tl.full((), 0, tl.int32)
    above = tl.full((), 0, tl.int32)
    for i in tl.static_range(7, -1, -1):
        w = lo if i < 4 else hi
        above += tl.sum(((w >> (16 * (i % 4))) & 0xFFFF).to(tl.int32))
        take = (best < 0) & (above >= target)
        best = tl.where(take, i, best)
        keys = tl.where(take, above, keys)
    ok = (best >= 0) & (keys <= cap)
    if ok:
        tl.debug_barrier()  # the first pass's stores to dst are overwritten
        cnt = tl.full((), 0, tl.int32)
        for c0 in range(0, n, BLOCK):
            k, b, valid, col = _keys(SRC, c0, n, src, True, SPARSE, BLOCK)
            cnt = _append(k, valid & (b >= base + best), col, cnt, dst, cap, PACK)
        tl.debug_barrier()  # the list is read by other lanes next
    return cnt, ok.to(tl.int32)


@triton.jit
def _hit(cnt, n_u, m, cap):
    """Whether a side's single-pass list (cnt keys appended of its n_u) holds every key of bin ≥ b1 (_candidates)."""
    return (cnt >= tl.minimum(m, n_u)) & (cnt <= cap)


@triton.jit
def _tile_has(ub_ptr, c0, n, BLOCK: tl.constexpr):
    """Whether the ids [c0, c0 + BLOCK) ∩ [0, n) hold one of the side's uncommon ids (c0 a multiple of BLOCK, a power
    of two ≥ 64): bit j of ub's word w is set iff the 64 ids from 4096 w + 64 j hold one (_uncommon_bits)."""
    if BLOCK <= 4096:  # one word (the GPU configs): a scalar load and test
        w = tl.load(ub_ptr + c0 // 4096)
        if BLOCK < 4096:
            w = (w >> ((c0 % 4096) // 64)) & ((1 << (BLOCK // 64)) - 1)
        has = w != 0
    else:
        i = c0 + 4096 * tl.arange(0, BLOCK // 4096)
        has = tl.sum((tl.load(ub_ptr + i // 4096, mask=i < n, other=0) != 0).to(tl.int32)) > 0
    return has


@triton.jit
def _row_pass(row_ptr, tc_row, cls_ptr, ub_ptr, C, inv_tau, c, edge, lst, cap, STUDENT: tl.constexpr,
              HIST: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """One row over its C columns (dense: the vocabulary; sparse: its k entries, padding −1 skipped) -> (lse of x/τ
    (student: over all columns; teacher: over A, class ≠ 0), bad = NaN or +inf in any column, teacher:
    Σ_{class 2} e^{x/τ − lse}, if HIST the count of U's keys (student: smap < 0; teacher: class 1) with x − c ≥ edge
    (level-1 bin ≥ b_h: _bin_edge), appended to lst (_append)). The number of U's keys of a dense row is W's (the
    host's count), not counted here (~4 % of the pass's instructions). No histogram here: it would cost
    ~40 instructions per element of the row (bench/costmodel.py); _candidates takes it over the list. The running
    max is kept per group of G lanes, a thread's of the 16-byte logit loads (_tl.lse_groups: no cross-thread
    reduction per tile; S1 / T1 371 / 379 -> 341 / 353 instructions per thread per tile, sm_90 SASS), the groups' sums
    rescaled to the row's max after the loop; the sums and counts are kept per lane and reduced once. Pipelined by
    hand: the next tile's logits and (dense) classes or (sparse) column ids are loaded before this tile is folded,
    carried in registers (Triton's pipelining stages them through shared memory: more instructions per tile)."""
    G: tl.constexpr = _tl.GROUP
    m = tl.full((BLOCK // G,), _tl.NEG, tl.float32)
    l = tl.full((BLOCK,), 0, tl.float32)
    lc = tl.full((BLOCK,), 0, tl.float32)
    probe = tl.full((BLOCK,), float("-inf"), tl.float32)  # the teacher's bad-input test (_tl.probe_max)
    cnt = tl.full((), 0, tl.int32)
    o = tl.arange(0, BLOCK)
    xn, kn = _row_words(row_ptr, tc_row, cls_ptr, o, C, SPARSE)
    for c0 in range(0, C, BLOCK):
        o = c0 + tl.arange(0, BLOCK)
        om = o < C
        x = xn.to(tl.float32)
        if SPARSE:
            inside = kn >= 0
            v = tl.where(inside, kn, 0)
            cls = tl.load(cls_ptr + v, mask=inside, other=0)
        else:
            inside = om
            cls = kn
        xn, kn = _row_words(row_ptr, tc_row, cls_ptr, o + BLOCK, C, SPARSE)
        if not STUDENT:  # the student's (every column live): _tl.row_bad after the loop
            if SPARSE:  # padding entries (column −1) are not the row's
                probe = _tl.probe_max(probe, tl.where(inside, x, float("-inf")))
            else:  # past C: x = 0
                probe = _tl.probe_max(probe, x)
        # past C a dense tile loads x = 0 and class 0 (cls is then the lane's own test of inside)
        if STUDENT:
            live = inside
            hm = (cls < 0) if not SPARSE else inside & (cls < 0)
        else:
            live = cls != 0
            hm = cls == 1
        m, l, e, alpha, _, _ = _tl.lse_groups(m, l, tl.where(live, x * inv_tau, float("-inf")), G)
        if not STUDENT:
            lc = lc * alpha + tl.where(live & (cls == 2), e, 0.0)
        if HIST:  # a tile without uncommon ids has no key to append (W's uncommon ids cluster: bench/costmodel.py)
            if _tile_has(ub_ptr, c0, C, BLOCK):
                cnt = _append(_key(x), hm & (x - c >= edge), o, cnt, lst, cap, STUDENT)
    m, a, _ = _tl.lse_merge(m, G)
    l = tl.sum(l * a)
    lc = lc * a
    if STUDENT:
        b = _tl.row_bad(row_ptr, C, l, BLOCK)
    else:
        b = _tl.probe_bad(probe)
    return m + tl.log(l), b, tl.where(l > 0, tl.sum(lc) / l, 0.0), cnt


@triton.jit
def _row_words(row_ptr, tc_row, cls_ptr, o, C, SPARSE: tl.constexpr):
    """A row tile's streamed words at positions o (none past C): its logits and, dense, the columns' classes, sparse,
    its column ids (−1 padded)."""
    om = o < C
    x = tl.load(row_ptr + o, mask=om, other=0.0)
    if SPARSE:
        k = tl.load(tc_row + o, mask=om, other=-1)
    else:
        k = tl.load(cls_ptr + o, mask=om, other=0)
    return x, k


@triton.jit
def _grad_pass(args, ONE: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """dz_r = (gS − p_r Σ gS)/(τ n_s) = −(τ² P[t_c] + p_r Σ gS) c at every column of the chunk's student rows (c =
    1/(τ n_s); the caller zeroes a bad chunk's rows instead), gS = −τ² P[t_c] at the common columns of a dense
    teacher (gathered at t_c = smap[s]) and 0 elsewhere -> the dense teacher's KL Σ_c [P > 0] P (T − S) at t_c. ONE:
    single rows of a sparse teacher (no inner row loops: pipelined; a dense teacher's run _grad_one). p as 2^24 p
    (_tl.softmax_exp2), the 2^-24 in the factor."""
    z_ptr, stride_z, t_ptr, stride_t, smap_ptr, lse_s_ptr, lse_t_ptr, dz_ptr, stride_dz, s_lo, n_s, t_lo, n_t, c_s, \
        c_t, V_S, inv_tau, tt, gsum = args
    ttc, gsc = _grad_scales(tt, gsum, n_s, inv_tau)
    gsc = gsc * _tl.P_UNIT
    lse0 = tl.load(lse_s_ptr + s_lo)
    a0, b0 = _tl.exp2_args(inv_tau, lse0)
    kl = tl.full((BLOCK,), 0, tl.float32)  # per lane, reduced once
    for v0 in tl.range(0, V_S, BLOCK, num_stages=STAGES):
        o = v0 + tl.arange(0, BLOCK)
        om = o < V_S
        gS = tl.full((BLOCK,), 0, tl.float32)
        if not SPARSE:
            tcol = tl.load(smap_ptr + o, mask=om, other=-1)
            com = tcol >= 0
            tcol = tl.where(com, tcol, 0)
            tv = _tl.logp_sum(t_ptr, stride_t, lse_t_ptr, t_lo, t_lo + n_t, tcol, com, inv_tau, BLOCK) \
                / n_t.to(tl.float32)
            S = _s_vals(z_ptr, stride_z, lse_s_ptr, s_lo, n_s, o, om, inv_tau, False, BLOCK)
            S = tl.where(n_s == 1, S * inv_tau - lse0 + c_s, S)
            P = tl.where(com, tl.exp(tv), 0.0)
            kl += tl.where(P > 0, P * (tv - S), 0.0)  # P > 0: a common column
            gS = -ttc * P  # gS c
        if ONE:
            x = tl.load(z_ptr + s_lo * stride_z + o, mask=om, other=float("-inf"))
            dz = gS - _tl.softmax_exp2(x, a0, b0) * gsc
            tl.store(dz_ptr + s_lo * stride_dz + o, dz.to(dz_ptr.dtype.element_ty), mask=om)
        else:
            for r in range(s_lo, s_lo + n_s):
                p = _tl.softmax_tile_exp2(z_ptr + r * stride_z, o, om, inv_tau, tl.load(lse_s_ptr + r))
                dz = gS - p * gsc
                tl.store(dz_ptr + r * stride_dz + o, dz.to(dz_ptr.dtype.element_ty), mask=om)
    return tl.sum(kl)


@triton.jit
def _grad_scales(tt, gsum, n_s, inv_tau):
    """(τ² c, Σ gS c) with c = 1/(τ n_s): the gradient pass's factors (tt = τ², gsum = Σ gS)."""
    coef = inv_tau / n_s.to(tl.float32)
    return tt * coef, gsum * coef


@triton.jit
def _grad_one(args, BLOCK: tl.constexpr):
    """_grad_pass for a single student and a single dense teacher row, software-pipelined by hand: a tile's teacher
    gather (at t_c = smap[s]) is issued first, then the next tile's logits and smap are loaded, carried in registers
    (Triton's pipelining stages every load, the gather included, through shared memory), while this tile's p (from
    the logits loaded during the tile before) and P are formed: as 2^24 p and 2^24 P (_tl.softmax_exp2, a
    multiply-add and an ex2 each; 2^-24 folded into the factors and the KL sum), and the KL term P (T − S) from
    the difference of the logits."""
    z_ptr, stride_z, t_ptr, stride_t, smap_ptr, lse_s_ptr, lse_t_ptr, dz_ptr, stride_dz, s_lo, n_s, t_lo, n_t, c_s, \
        c_t, V_S, inv_tau, tt, gsum = args
    ttc, gsc = _grad_scales(tt, gsum, n_s, inv_tau)
    ttc, gsc = ttc * _tl.P_UNIT, gsc * _tl.P_UNIT  # after c = 1/(τ n_s): τ² 2^-24 underflows for τ < 2^-51
    lse0 = tl.load(lse_s_ptr + s_lo)
    lse_t = tl.load(lse_t_ptr + t_lo)
    a, b_s = _tl.exp2_args(inv_tau, lse0)
    _, b_t = _tl.exp2_args(inv_tau, lse_t - c_t)
    d0 = lse_t - c_t - lse0 + c_s  # T − S = (t − z)/τ − d0 at a common column
    z_row = z_ptr + s_lo * stride_z
    t_row = t_ptr + t_lo * stride_t
    dz_row = dz_ptr + s_lo * stride_dz
    kl = tl.full((BLOCK,), 0, tl.float32)  # per lane, reduced once
    o = tl.arange(0, BLOCK)
    x = tl.load(z_row + o, mask=o < V_S, other=float("-inf"))
    tcol = tl.load(smap_ptr + o, mask=o < V_S, other=-1)
    for v0 in range(0, V_S, BLOCK):
        o = v0 + tl.arange(0, BLOCK)
        com = tcol >= 0
        tv = tl.load(t_row + tl.where(com, tcol, 0), mask=com, other=0.0)
        xz = x.to(tl.float32)
        x = tl.load(z_row + o + BLOCK, mask=o + BLOCK < V_S, other=float("-inf"))
        tcol = tl.load(smap_ptr + o + BLOCK, mask=o + BLOCK < V_S, other=-1)
        P = tl.where(com, _tl.softmax_exp2(tv, a, b_t), 0.0)
        kl += tl.where(P > 0, P * ((tv.to(tl.float32) - xz) * inv_tau - d0), 0.0)  # P > 0: a common column
        dz = -ttc * P - _tl.softmax_exp2(xz, a, b_s) * gsc
        tl.store(dz_row + o, dz.to(dz_ptr.dtype.element_ty), mask=o < V_S)
    return tl.sum(kl) * _tl.P_UNIT


@triton.jit
def _pair(ea, bv, cnt, gc, gv, al_a, be_a, tt, W: tl.constexpr):
    """One rank window: lane i of the sorted a-window ea (_pack words) against b's value bv at the same rank, on
    lanes < cnt: G's columns and g_i = τ² sign(a_i − b_i) a_i at gc / gv -> (Σ|a_i − b_i|, Σ g_i)."""
    lanes = tl.arange(0, W)
    # the columns first: ea's low words are dead before a, d and g are formed (Registers)
    tl.store(gc + lanes, _column(ea), mask=lanes < cnt)
    av = tl.where(lanes < cnt, tl.exp(_unkey(_key_of(ea)) * al_a + be_a), 0.0)
    d = av - bv
    g = tl.where(d > 0, tt * av, tl.where(d < 0, -tt * av, 0.0))
    l1 = tl.sum(tl.where(lanes < cnt, tl.abs(d), 0.0))
    gs = tl.sum(tl.where(lanes < cnt, g, 0.0))
    tl.debug_barrier()  # bv may have been read from gv by other lanes (_windows)
    tl.store(gv + lanes, g, mask=lanes < cnt)
    return l1, gs


@triton.jit
def _windows(args, SPARSE: tl.constexpr, BLOCK_L: tl.constexpr, W: tl.constexpr, TRUNC: tl.constexpr):
    """The sorted-L1 term for m ≤ W, one rank window of W lanes (module docstring): G's entries [0, m) (columns, g),
    and -> (Σ|a_i − b_i|, gsum + Σ g_i, θ_a, θ_b: the m-th largest keys)."""
    (m, tot_b, whole, la, n_a, blo_a, bhi_a, c1_a, nb1_a, lb, n_b, blo_b, bhi_b, c1_b, nb1_b, wa, wb, gc, gv, al_a,
     be_a, al_b, be_b, tt, gsum) = args
    lanes = tl.arange(0, W)
    # whole: the small network (TRUNC) sorts both whole single-pass lists, whose first m lanes are then the top m
    # (keys equal to θ in ascending column, as prefix's), with no selection or gather
    if TRUNC:
        direct = whole
    else:
        direct = False
    th_a = tl.full((), _INT_MIN, tl.int32)  # θ_a; direct: from the sorted lanes below
    q_a = tl.full((), 0, tl.int32)
    th_b = tl.full((), _INT_MIN, tl.int32)  # fewer than m keys: all of them
    q_b = tl.full((), 0, tl.int32)
    if direct:
        cnt_a, cnt_b = n_a, n_b
        ka = tl.load(la + lanes, mask=lanes < cnt_a, other=_I64_MIN)
        kb = tl.load(lb + lanes, mask=lanes < cnt_b, other=_INT_MIN)
    else:  # the m-th largest lies in bin b1: bisect that bin's key range (its keys in the sort buffer where
        # _candidates copied them, else the list), then gather prefix(m)
        tl.debug_barrier()  # the buffers were written by other lanes
        th_a, c = _select(0, tl.where(nb1_a < 0, n_a, nb1_a), tl.where(nb1_a < 0, la, wa), blo_a, bhi_a, c1_a, m,
                          True, SPARSE, BLOCK_L)
        q_a = m - c
        if m <= tot_b:
            th_b, c = _select(1, tl.where(nb1_b < 0, n_b, nb1_b), tl.where(nb1_b < 0, lb, wb), blo_b, bhi_b, c1_b,
                              m, True, SPARSE, BLOCK_L)
            q_b = m - c
        cnt_a, _x0, _x1 = _gather(0, n_a, la, th_a, q_a, 0, -1, wa, W, True, True, SPARSE, BLOCK_L)
        cnt_b, _x0, _x1 = _gather(1, n_b, lb, th_b, q_b, 0, -1, wb, W, False, True, SPARSE, BLOCK_L)
        kb = tl.load(wb + lanes, mask=lanes < cnt_b, other=_INT_MIN)
        if TRUNC:
            ka = tl.load(wa + lanes, mask=lanes < cnt_a, other=_I64_MIN)
    if TRUNC:  # the small network: both windows side by side in one network (b's keys widened to int64)
        ea, eb = tl.split(_sort_desc(tl.join(ka, kb.to(tl.int64)), W, tl.maximum(cnt_a, cnt_b), True, True, 1))
        cnt_a = tl.minimum(cnt_a, m)  # a whole list's window: its first m lanes
        cnt_b = tl.minimum(cnt_b, m)
        if direct:
            th_a = tl.max(tl.where(lanes == m - 1, _key_of(ea), _INT_MIN))
            th_b = tl.max(tl.where((lanes == m - 1) & (m <= tot_b), eb.to(tl.int32), _INT_MIN))
        bv = tl.where(lanes < cnt_b, tl.exp(_unkey(eb.to(tl.int32)) * al_b + be_b), 0.0)
    else:  # one sorted window live at a time: b's values wait in G's value slots while a sorts
        eb = _sort_desc(kb, W, cnt_b, False, False, 1)
        tl.store(gv + lanes, tl.where(lanes < cnt_b, tl.exp(_unkey(eb) * al_b + be_b), 0.0), mask=lanes < cnt_a)
        tl.debug_barrier()
        ea = _sort_desc(tl.load(wa + lanes, mask=lanes < cnt_a, other=_I64_MIN), W, cnt_a, False, False, 1)
        bv = tl.load(gv + lanes, mask=lanes < cnt_a, other=0.0)
    l1, gs = _pair(ea, bv, cnt_a, gc, gv, al_a, be_a, tt, W)
    return l1, gsum + gs, th_a, th_b


@triton.jit
def _splits(src, n, run, t0, MIN, W: tl.constexpr, NT: tl.constexpr):
    """Merge path for the W-key output tiles t0 .. t0 + NT − 1 of a merge round over src[0, n) (sorted runs of
    ``run`` keys, merged pairwise): per tile (its pair's start p0, the lengths of the pair's runs A = src[p0, p0 +
    run) and B after it, the tile's first and end rank d0, d1 in the pair, i0, i1 = #A among the first d0 / d1
    merged keys, ties to A): i = the largest i ≤ min(d, |A|) with A[i − 1] ≥ B[d − i] (a vectorized binary
    search, ⌈log₂(run + 1)⌉ steps)."""
    t = t0 + tl.arange(0, NT)
    g = t * W
    p0 = g // (2 * run) * (2 * run)
    na = tl.minimum(tl.maximum(n - p0, 0), run)
    nb = tl.minimum(tl.maximum(n - p0 - run, 0), run)
    d0 = tl.minimum(g - p0, na + nb)
    d1 = tl.minimum(d0 + W, na + nb)
    lo0 = tl.maximum(d0 - nb, 0)
    hi0 = tl.minimum(d0, na)
    lo1 = tl.maximum(d1 - nb, 0)
    hi1 = tl.minimum(d1, na)
    while tl.max(tl.maximum(hi0 - lo0, hi1 - lo1)) > 0:
        for h in tl.static_range(2):
            lo = lo0 if h == 0 else lo1
            hi = hi0 if h == 0 else hi1
            d = d0 if h == 0 else d1
            act = lo < hi
            mid = (lo + hi) >> 1
            a = tl.load(src + p0 + mid, mask=act, other=MIN)
            b = tl.load(src + p0 + na + d - 1 - mid, mask=act, other=MIN)
            lo = tl.where(act & (a >= b), mid + 1, lo)
            hi = tl.where(act & (a < b), mid, hi)
            if h == 0:
                lo0, hi0 = lo, hi
            else:
                lo1, hi1 = lo, hi
    return p0, na, d0, d1, lo0, lo1


@triton.jit
def _sort_list(lst, off, n, MIN, W: tl.constexpr):
    """Sort lst[0, n) descending (a-lists: _pack words, whose order ties keys in ascending column, L's order; b-lists:
    int32 keys) with lst[off, off + n) as the second buffer -> 0 / 1: the result is at lst / lst + off. Blocks of W
    keys are sorted in place in the W-lane network, then sorted runs of W, 2 W, ... keys merged pairwise: each W-key
    output tile takes A[i0, i1) ∪ B[j0, j1) of its pair (_splits), loaded as A descending, padding (MIN), B ascending
    — a bitonic sequence — and sorted by the network's last merge stage (log₂ W steps)."""
    LOG: tl.constexpr = W.bit_length() - 1
    NT: tl.constexpr = 32  # tiles whose merge paths are searched at once
    lanes = tl.arange(0, W)
    for b0 in range(0, n, W):
        o = b0 + lanes
        x = tl.load(lst + o, mask=o < n, other=MIN)
        tl.store(lst + o, _sort_desc(x, W, n, False, False, 1), mask=o < n)
    par = tl.full((), 0, tl.int32)
    run = tl.full((), W, tl.int32)
    while run < n:
        tl.debug_barrier()  # the previous round's tiles were stored by other lanes
        src = lst + par * off
        dst = lst + (1 - par) * off
        for t0 in range(0, tl.cdiv(n, W), NT):
            p0v, nav, d0v, d1v, i0v, i1v = _splits(src, n, run, t0, MIN, W, NT)
            for u in range(0, tl.minimum(NT, tl.cdiv(n, W) - t0)):
                sel = tl.arange(0, NT) == u
                p0 = tl.sum(tl.where(sel, p0v, 0))
                na = tl.sum(tl.where(sel, nav, 0))
                d0 = tl.sum(tl.where(sel, d0v, 0))
                d1 = tl.sum(tl.where(sel, d1v, 0))
                i0 = tl.sum(tl.where(sel, i0v, 0))
                i1 = tl.sum(tl.where(sel, i1v, 0))
                n_a = i1 - i0
                n_b = (d1 - i1) - (d0 - i0)
                xa = tl.load(src + p0 + i0 + lanes, mask=lanes < n_a, other=MIN)
                xb = tl.load(src + p0 + na + (d0 - i0) + (W - 1 - lanes), mask=lanes >= W - n_b, other=MIN)
                y = _sort_desc(tl.where(lanes < n_a, xa, xb), W, n, False, False, LOG)
                tl.store(dst + p0 + d0 + lanes, y, mask=lanes < d1 - d0)
        par = 1 - par
        run = run * 2
    tl.debug_barrier()  # the sorted list is read by other lanes next
    return par


@triton.jit
def _sorted_lists(args, W: tl.constexpr):
    """The sorted-L1 term for m > W (ULD: m ~ |U|): both lists sorted whole (_sort_list, O(|L| log |L|)), then
    paired rank window by rank window of W lanes (_pair); G's entries [0, m), and -> (Σ|a_i − b_i|, gsum + Σ g_i,
    θ_a, θ_b)."""
    (m, tot_b, la, n_a, sl_a, lb, n_b, sl_b, gc, gv, al_a, be_a, al_b, be_b, tt, gsum) = args
    lanes = tl.arange(0, W)
    sa = la + _sort_list(la, sl_a, n_a, _I64_MIN, W) * sl_a
    sb = lb + _sort_list(lb, sl_b, n_b, _INT_MIN, W) * sl_b
    l1 = tl.full((), 0, tl.float32)
    n_pb = tl.minimum(n_b, m)  # b's ranks past its list are padded with 0 (a sparse teacher)
    for r0 in range(0, m, W):
        cnt = tl.minimum(m - r0, W)
        ea = tl.load(sa + r0 + lanes, mask=lanes < cnt, other=_I64_MIN)
        kb = tl.load(sb + r0 + lanes, mask=r0 + lanes < n_pb, other=_INT_MIN)
        bv = tl.where(r0 + lanes < n_pb, tl.exp(_unkey(kb) * al_b + be_b), 0.0)
        l, gs = _pair(ea, bv, cnt, gc + r0, gv + r0, al_a, be_a, tt, W)
        l1 += l
        gsum += gs
    th_a = _key_of(tl.load(sa + m - 1))
    th_b = tl.load(sb + m - 1, mask=(m <= tot_b) & (m <= n_b), other=_INT_MIN)
    return l1, gsum, th_a, th_b


@triton.jit
def _hkl_kernel(
    z_ptr, stride_z, t_ptr, stride_t, tc_ptr, stride_tc, smap_ptr, tmap_ptr, tcls_ptr, ubs_ptr, ubt_ptr, m_ptr,
    spans_ptr, schain_ptr, tchain_ptr, K,
    loss_ptr, gsum_ptr, path_ptr, dz_ptr, stride_dz, lse_s_ptr, lse_t_ptr,
    la_ptr, lb_ptr, wa_ptr, wb_ptr, gc_ptr, gv_ptr, e_ptr, tacc_ptr, tcnt_ptr, prof_ptr,
    V_S, V_T, C, cap_a, cap_b, sl_a, sl_b, m_up, g_len, inv_tau, tau,
    MEAN: tl.constexpr, CHAIN: tl.constexpr, SPARSE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, W: tl.constexpr, W_SMALL: tl.constexpr,
    MERGE: tl.constexpr, STAGES: tl.constexpr, PROFILE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    la = la_ptr + pid * sl_a * (1 + MERGE)  # per-program scratch (module docstring); MERGE: two buffers per list
    lb = lb_ptr + pid * sl_b * (1 + MERGE)
    wa = wa_ptr + pid * (W + 16)
    wb = wb_ptr + pid * (W + 16)
    gc = gc_ptr + pid * g_len  # G: sorted-L1 entries at [0, m), a sparse teacher's common pairs from m_up on, spare
    # slot at g_len − 1
    gv = gv_ptr + pid * g_len
    tacc_row = tacc_ptr + pid * V_T
    tcnt_row = tcnt_ptr + pid * V_T
    m = tl.load(m_ptr)
    tt = tau * tau
    # hint state, kept across launches (hkl_rows): the |θ − c| scales that place the single-pass compaction's bin
    # b_h (_hint_bin, _track; student raw / merged, teacher raw / merged: read and written in scratch, off the
    # registers the sort needs), then what gives the level-1 shifts c, in the same order: the last m-th largest
    # key-space value θ of this program per side and kind of value (raw logit of a single row: θ − its _anchor; merged
    # S or T, log-probabilities whose offset does not move: θ), so that the next threshold tends to fall in a fine bin
    # near 0
    es = e_ptr + pid * 8
    ca_raw = tl.load(es + 4)
    ca_mrg = tl.load(es + 5)
    cb_raw = tl.load(es + 6)
    cb_mrg = tl.load(es + 7)
    t_ph = _tl.stamp(prof_ptr, PROFILE)  # PhaseTimes (PROFILE): the time between stamps by PHASES
    for k in range(pid, K, tl.num_programs(0)):
        c_s = _tl.chain_offset(schain_ptr, spans_ptr + 4 * k, CHAIN, BLOCK_L)
        c_t = _tl.chain_offset(tchain_ptr, spans_ptr + 4 * k + 2, CHAIN, BLOCK_L)
        s_lo, s_hi, t_lo, t_hi = _tl.chunk_rows(spans_ptr, k, MEAN)
        n_s = s_hi - s_lo
        n_t = t_hi - t_lo
        raw_a = n_s == 1
        if SPARSE:
            raw_b = n_t < 0  # a sparse teacher is keyed on T
        else:
            raw_b = n_t == 1
        # a single raw row's anchor (_anchor), where the hint is in use (n above the list's capacity)
        nh_a = tl.load(m_ptr + 1)  # the keys a row can list, or 2^30 (hkl_rows)
        nh_b = tl.load(m_ptr + 2)
        an_a = tl.full((), 0.0, tl.float32)
        an_b = tl.full((), 0.0, tl.float32)
        if raw_a & (nh_a > cap_a):
            an_a = _anchor(z_ptr + s_lo * stride_z, V_S)
        if not SPARSE:
            if raw_b & (nh_b > cap_b):
                an_b = _anchor(t_ptr + t_lo * stride_t, C)
        # finite shifts: x − c is then never NaN (a θ of −inf, e.g. rows padded with −inf, would make x = −inf NaN)
        sh_a = tl.minimum(tl.maximum(tl.where(raw_a, an_a + ca_raw, ca_mrg), -3.0e38), 3.0e38)
        sh_b = tl.minimum(tl.maximum(tl.where(raw_b, an_b + cb_raw, cb_mrg), -3.0e38), 3.0e38)
        ea_ptr = es + tl.where(raw_a, 0, 1)
        eb_ptr = es + tl.where(raw_b, 2, 3)
        bh_a = _hint_bin(tl.load(ea_ptr), nh_a, cap_a)
        bh_b = _hint_bin(tl.load(eb_ptr), nh_b, cap_b)
        tl.debug_barrier()  # the previous chunk's lists, sort buffers and G are no longer read
        t_ph = _tl.lap(t_ph, prof_ptr, 0, PROFILE)

        # S1 / T1: per row the online LSE and the bad-input check; a single row also gives its number of uncommon
        # keys and the single-pass list (keys of level-1 bin ≥ b_h, of its raw values), and a dense single teacher
        # row the common mass Σ_c P[t_c] (rescaled online), in that pass.
        bad = tl.full((), 0, tl.int32)
        if CHAIN:  # as the torch backend: a NaN or +inf chain sum makes the chunk bad too
            bad = ((c_s < float("inf")) & (c_t < float("inf")) == 0).to(tl.int32)
        cnt_a = tl.full((), 0, tl.int32)  # keys appended to L_a / L_b by the first pass
        cnt_b = tl.full((), 0, tl.int32)
        nu_a = tl.load(m_ptr + 3)  # |U| keys of the side's (merged) row: W's |U_S|, |U_T| for a dense row
        nu_b = tl.load(m_ptr + 4)
        for r in range(s_lo, s_hi):
            lse, b, _, cnt_a = _row_pass(z_ptr + r * stride_z, z_ptr, smap_ptr, ubs_ptr, V_S, inv_tau, sh_a,
                                         _bin_edge(tl.where(raw_a, bh_a, 64)), la, cap_a, True, True, False, BLOCK_S)
            bad |= b | (lse == float("-inf")).to(tl.int32)
            tl.store(lse_s_ptr + r, lse)
        pc = tl.full((), 0, tl.float32)  # Σ_c P[t_c]
        for r in range(t_lo, t_hi):
            lse, b, frac, cnt_b = _row_pass(t_ptr + r * stride_t, tc_ptr + r * stride_tc, tcls_ptr, ubt_ptr, C, inv_tau,
                                            sh_b, _bin_edge(tl.where(raw_b, bh_b, 64)), lb, cap_b, False, not SPARSE,
                                            SPARSE, BLOCK_T)
            bad |= b
            tl.store(lse_t_ptr + r, tl.where(lse == float("-inf"), float("inf"), lse))  # no mass on A: T = −inf
            pc = frac * tl.exp(c_t)
        tl.debug_barrier()  # the lse were stored by single lanes and are read by all below
        t_ph = _tl.lap(t_ph, prof_ptr, 1, PROFILE)

        a_src = (z_ptr, stride_z, lse_s_ptr, s_lo, n_s, inv_tau, smap_ptr, sh_a)
        b_src = (t_ptr, stride_t, tc_ptr, stride_tc, tcls_ptr, lse_t_ptr, tacc_row, tcnt_row, t_lo, n_t, c_t,
                 inv_tau, sh_b)
        # a = e^{α_a x + β_a}, b = e^{α_b x + β_b} from the key-space values x (raw logit of a single row, else S / T)
        al_a = tl.where(raw_a, inv_tau, 1.0)
        be_a = tl.where(raw_a, c_s - tl.load(lse_s_ptr + s_lo), 0.0)
        al_b = tl.where(raw_b, inv_tau, 1.0)
        be_b = tl.where(raw_b, c_t - tl.load(lse_t_ptr + t_lo), 0.0)
        kl = tl.full((), 0, tl.float32)
        l1 = tl.full((), 0, tl.float32)
        gsum = tl.full((), 0, tl.float32)
        n_sc = tl.full((), 0, tl.int32)  # a sparse teacher's common entries in G
        path = tl.full((), 0, tl.int32)
        if bad == 0:
            if n_s > 1:  # the merged S: its single-pass list (its uncommon keys are W's |U_S|, as for one row)
                for v0 in range(0, V_S, BLOCK_S):
                    if _tile_has(ubs_ptr, v0, V_S, BLOCK_S):
                        ka, b, valid, col = _keys(2, v0, V_S, a_src, False, SPARSE, BLOCK_S)
                        cnt_a = _append(ka, valid & (b >= bh_a), col, cnt_a, la, cap_a, True)
            if SPARSE:
                if n_t > 1:
                    _tl.scatter_later_rows(t_ptr, stride_t, tc_ptr, stride_tc, tcls_ptr, lse_t_ptr, tacc_row,
                                           tcnt_row, t_lo, t_hi, C, inv_tau, BLOCK_T)
            if SPARSE or n_t > 1:  # T's single-pass list and Σ_c P; sparse: its uncommon keys (a dense T has W's
                # |U_T|), the common pairs' KL, gS -> G
                if SPARSE:
                    nu_b = tl.full((), 0, tl.int32)
                pc = tl.full((), 0, tl.float32)
                for c0 in range(0, C, BLOCK_T):
                    x, tv, P, v, live, cls = _t_vals(t_ptr, stride_t, tc_ptr, stride_tc, tcls_ptr, lse_t_ptr,
                                                     tacc_row, tcnt_row, t_lo, n_t, c_t, inv_tau, C, c0, False,
                                                     SPARSE, BLOCK_T)
                    u = live & (cls == 1)
                    cnt_b = _append(_key(x), u & (x - sh_b >= _bin_edge(bh_b)), v, cnt_b, lb, cap_b, False)
                    com = live & (cls == 2)
                    pc += tl.sum(tl.where(com, P, 0.0))
                    if SPARSE:
                        nu_b += tl.sum(u.to(tl.int32))
                        sc = tl.load(tmap_ptr + v, mask=com, other=0)
                        s_c = _tl.logp_sum(z_ptr, stride_z, lse_s_ptr, s_lo, s_hi, sc, com, inv_tau, BLOCK_T) \
                            / n_s.to(tl.float32) + c_s
                        kl += tl.sum(tl.where(com & (P > 0), P * (tv - s_c), 0.0))
                        ci = com.to(tl.int32)
                        pos = tl.where(com, m_up + n_sc + tl.cumsum(ci, 0) - ci, g_len - 1)
                        tl.store(gc + pos, sc)
                        tl.store(gv + pos, -tt * P)
                        n_sc += tl.sum(ci)
            gsum = -tt * pc
            t_ph = _tl.lap(t_ph, prof_ptr, 2, PROFILE)
            if m > 0:
                tl.debug_barrier()
                # S2 / T2 (_compact) only where the single-pass list is not provably a superset of the top m
                hit_a = _hit(cnt_a, nu_a, m, cap_a)
                hit_b = _hit(cnt_b, nu_b, m, cap_b)
                path = hit_a.to(tl.int32) | (hit_b.to(tl.int32) << 1)
                # a hinted first pass that missed: _rescue, where a bin next to b_h holds the top m within the list
                # (not compiled into MERGE, m_up above the network: its lists of 2 m_up + _SLACK keys mostly hold a
                # whole uncommon set, and where a side is hinted a miss takes _compact; 0.85 → 1.24 KB of spills with
                # it)
                if not MERGE:
                    if raw_a & (hit_a == 0) & (bh_a > 1) & (bh_a < 64):
                        cnt_a, res = _rescue(2, V_S, a_src, tl.minimum(m, nu_a), cap_a, la, cnt_a, bh_a, True, SPARSE,
                                             BLOCK_S)
                        hit_a = _hit(cnt_a, nu_a, m, cap_a)
                        path |= res << 5
                    if not SPARSE:
                        if raw_b & (hit_b == 0) & (bh_b > 1) & (bh_b < 64):
                            cnt_b, res = _rescue(3, C, b_src, tl.minimum(m, nu_b), cap_b, lb, cnt_b, bh_b, False,
                                                 SPARSE, BLOCK_T)
                            hit_b = _hit(cnt_b, nu_b, m, cap_b)
                            path |= res << 6
                # both single-pass lists fit the small network: it sorts them whole, no pass over them (_windows)
                whole = (m <= W_SMALL) & hit_a & hit_b & (cnt_a <= W_SMALL) & (cnt_b <= W_SMALL)
                if MERGE:  # m above the largest network: both lists sorted whole (_sorted_lists)
                    merge = m > W
                else:  # the path is not compiled in (constexpr)
                    merge = False
                n_a, blo_a, bhi_a, c1_a, nb1_a = _candidates(2, V_S, a_src, m, cap_a, la, cnt_a, sh_a, hit_a,
                                                             whole | merge, wa, True, False, SPARSE, BLOCK_S,
                                                             BLOCK_L, W)
                n_b, blo_b, bhi_b, c1_b, nb1_b = _candidates(3, C, b_src, m, cap_b, lb, cnt_b, sh_b, hit_b,
                                                             whole | merge, wb, False, False, SPARSE, BLOCK_T,
                                                             BLOCK_L, W)
                path |= whole.to(tl.int32) << 3
                t_ph = _tl.lap(t_ph, prof_ptr, 3, PROFILE)
                tot_b = nu_b
                w_args = (m, tot_b, whole, la, n_a, blo_a, bhi_a, c1_a, nb1_a, lb, n_b, blo_b, bhi_b, c1_b, nb1_b, wa,
                          wb, gc, gv, al_a, be_a, al_b, be_b, tt, gsum)
                # the sort network sized to m (on the device): W_SMALL lanes when m fits, else W; above W (ULD)
                # the merge sort of both lists
                if m <= W_SMALL:
                    path |= 4
                    l1, gsum, th_a, th_b = _windows(w_args, SPARSE, BLOCK_L, W_SMALL, True)
                elif merge:
                    path |= 16
                    l1, gsum, th_a, th_b = _sorted_lists((m, tot_b, la, n_a, sl_a, lb, n_b, sl_b, gc, gv, al_a, be_a,
                                                          al_b, be_b, tt, gsum), W)
                else:
                    l1, gsum, th_a, th_b = _windows(w_args, SPARSE, BLOCK_L, W, False)
                tl.store(ea_ptr, _track(tl.load(ea_ptr), sh_a, _unkey(th_a)))
                ca_raw = tl.where(raw_a, _unkey(th_a) - an_a, ca_raw)
                ca_mrg = tl.where(raw_a, ca_mrg, _unkey(th_a))
                if m <= tot_b:
                    tl.store(eb_ptr, _track(tl.load(eb_ptr), sh_b, _unkey(th_b)))
                    cb_raw = tl.where(raw_b, _unkey(th_b) - an_b, cb_raw)
                    cb_mrg = tl.where(raw_b, cb_mrg, _unkey(th_b))
                t_ph = _tl.lap(t_ph, prof_ptr, 4, PROFILE)
            if SPARSE:
                if n_t > 1:  # leave the intersection scratch all-zero for the next chunk
                    tl.debug_barrier()
                    _tl.clear_later_rows(tc_ptr, stride_tc, tacc_row, tcnt_row, t_lo, t_hi, C, BLOCK_T)

        # S3: dz_r = (gS − p_r Σ gS)/(τ n_s) at every column, gS = −τ² P[t_c] at the common columns (dense teacher:
        # gathered at t_c = smap[s], with the KL), else 0; the columns listed in G are overwritten below.
        g_args = (z_ptr, stride_z, t_ptr, stride_t, smap_ptr, lse_s_ptr, lse_t_ptr, dz_ptr, stride_dz, s_lo, n_s, t_lo,
                  n_t, c_s, c_t, V_S, inv_tau, tt, gsum)
        if bad != 0:  # bad input: zero gradient rows
            for r in range(s_lo, s_lo + n_s):
                _tl.zero_row(dz_ptr + r * stride_dz, V_S, BLOCK_S)
        elif raw_a & (raw_b | SPARSE):  # single rows: the pipelined instantiations
            if SPARSE:
                kl += _grad_pass(g_args, True, SPARSE, BLOCK_S, STAGES)
            else:
                kl += _grad_one(g_args, BLOCK_S)
        else:
            kl += _grad_pass(g_args, False, SPARSE, BLOCK_S, STAGES)
        if bad == 0:
            coef = inv_tau / n_s.to(tl.float32)
            tl.debug_barrier()  # the dense pass above wrote G's columns from other lanes
            for i0 in range(0, m + n_sc, BLOCK_L):
                i = i0 + tl.arange(0, BLOCK_L)
                im = i < m + n_sc
                j = tl.where(i < m, i, i - m + m_up)
                col = tl.load(gc + j, mask=im, other=0)
                g = tl.load(gv + j, mask=im, other=0.0)
                for r in range(s_lo, s_hi):
                    p = _tl.softmax_tile(z_ptr + r * stride_z, col, im, inv_tau, tl.load(lse_s_ptr + r), "")
                    tl.store(dz_ptr + r * stride_dz + col, ((g - p * gsum) * coef).to(dz_ptr.dtype.element_ty),
                             mask=im)
        tl.store(loss_ptr + k, tl.where(bad != 0, float("nan"), tt * (kl + l1)))
        tl.store(gsum_ptr + k, tl.where(bad != 0, 0.0, gsum))
        tl.store(path_ptr + k, path)
        t_ph = _tl.lap(t_ph, prof_ptr, 5, PROFILE)
    tl.store(es + 4, ca_raw)
    tl.store(es + 5, ca_mrg)
    tl.store(es + 6, cb_raw)
    tl.store(es + 7, cb_mrg)


# Streaming loops: the row passes and the dense single rows' gradient pass are software-pipelined by hand (the next
# tile's loads carried in registers; Triton's cp.async staging issued more: S1 / T1 421 / 457 -> 391 / 423, S3 354 ->
# 305 per thread per 2,048-lane tile at 8 warps, sm_90 SASS), a sparse teacher's single rows' gradient pass over STAGES
# tiles by Triton; merged rows' gradient passes are not pipelined (their row loop sits inside the tile loop: Triton
# pipelines innermost loops only), nor are the compaction and list passes (pipelining them adds ~60 registers; the
# lists are L2-resident).
# the kernel's phases as _tl.PhaseTimes reports them (slots of _tl.lap): prep the chunk's set-up (hint, anchors),
# rows S1 / T1, merged the merged or sparse rows' list passes, select the rescue and the candidates, sort the
# windows (or the merge sort) up to the hint's update, grad S3, G's columns and the chunk's stores (and a sparse
# teacher's clearing of its later rows' scratch; a time not lapped, e.g. a bad chunk's skipped phases, goes to the
# next lap)
PHASES = ("prep", "rows", "merged", "select", "sort", "grad")
_CONFIGS = [triton.Config({"BLOCK_S": b, "BLOCK_T": b, "BLOCK_L": b, "STAGES": st}, num_warps=nw)
            for b, st, nw in ((2048, 3, 8), (4096, 2, 16))]
# the configs round differently (tile sums), and timing picks one per process: kept in Triton's on-disk cache
# (cache_results), so that later processes on the machine take the same and give bitwise the same results
_launch = _tl.launcher(_hkl_kernel, {}, _CONFIGS, key=["V_S", "C", "W", "MEAN", "SPARSE", "MERGE"], cache_results=True)
_zero = _tl.launcher(_tl.zero_uncovered_rows, dict(BLOCK=128), [triton.Config({"BLOCK": 2048}, num_warps=8)])


def _interp_blocks(V_S: int, C: int, cap: int) -> dict:
    """Interpreter tiles: about 8 per row or list (≥ 64 lanes), so every pass still runs several tiles (a partial
    last one included) while its per-tile interpretation overhead stays bounded."""
    def b(n):
        return max(64, triton.next_power_of_2(max(n, 1)) // 8)
    return dict(BLOCK_S=b(V_S), BLOCK_T=b(C), BLOCK_L=b(cap), STAGES=1)


def _uncommon_bits(u: torch.Tensor) -> torch.Tensor:
    """int64 words, bit j of word w set iff the ids [4096 w + 64 j, + 64) hold a True of u (one bool per id): the
    row passes' per-tile test (_tile_has) whether a tile can append a key."""
    n = -(-u.numel() // 4096) * 4096
    blocks = torch.nn.functional.pad(u, (0, n - u.numel())).view(-1, 64, 64).any(2).long()
    return (blocks << torch.arange(64, device=u.device)).sum(1)


@cached_on_tensors(3)
def _pair_maps(common_s, common_t, col_mask, V_S: int, C: int, sparse: bool, cap: int):
    """What the kernel reads of the common pairs and the allowed columns, kept per tensors (cached_on_tensors: the
    same in every training step) -> (smap, tmap, tcls, m_dev, bits of U_S, bits of U_T). Pairs with an allowed
    teacher id: student -> teacher (smap int32 [V_S], −1 on U_S), teacher -> student (tmap [V_T]); teacher classes
    tcls 0 / 1 / 2 = outside A / U_T / common; m_dev int32 [m, n_a, n_b, |U_S|, |U_T|] on the device, m = min(|U_S|,
    |U_T|, cap), n = the keys a row can list (|U_S|; |U_T| dense, C sparse), or 2^30 where that exceeds 2 m + _SLACK:
    the hint appends every key of a side whose uncommon set fits its list (beyond that, list passes over |U| ≫ m
    keys cost more L2 traffic than a program's warm-up misses: bench/costmodel.py); _uncommon_bits of U_S and U_T."""
    i32 = dict(dtype=torch.int32, device=col_mask.device)
    cs, ct = common_s.long(), common_t.long()
    keep = col_mask[ct]
    smap = torch.full((V_S,), -1, **i32).scatter_(0, cs, torch.where(keep, ct, -1).int())
    tmap = torch.full((col_mask.numel(),), -1, **i32).scatter_(0, ct, torch.where(keep, cs, -1).int())
    tcls = (col_mask.to(torch.int8) + (tmap >= 0).to(torch.int8)).contiguous()
    u_s, u_t = (smap < 0).sum(), (tcls == 1).sum()
    m_d = torch.minimum(u_s, u_t).clamp(max=cap)
    n_u = torch.stack([u_s, torch.full_like(u_t, C) if sparse else u_t])
    m_dev = torch.cat([m_d[None], torch.where(n_u <= 2 * m_d + _SLACK, n_u, 2 ** 30), u_s[None], u_t[None]])
    return smap, tmap, tcls, m_dev.to(torch.int32), _uncommon_bits(smap < 0), _uncommon_bits(tcls == 1)


def _hint_state(device: torch.device, P: int, problem: tuple) -> torch.Tensor:
    """[most programs, 8] fp32 per device, stream and problem (vocabulary sizes and m's bound: losses of other shapes
    keep their own): each program's hint state (_hkl_kernel), kept from launch to launch so that a training step's
    first chunks hit like the rest. Allocated once and never replaced (a captured CUDA graph keeps its address); a
    call under CUDA graph capture that finds none uses a state of its own (set up by each replay). Per stream: two
    launches running at once would write a program's row while the other reads it, every thread its own loads, so
    the warps of one program could append with different hint bins, and a list short of a top-m key would still pass
    the hit check (found by a review). Which path a chunk takes depends on the state, never a result."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, *problem)
    if key not in _hint_states:
        e = torch.full((_max_programs(device), 4), float("nan"), dtype=torch.float32, device=device)  # NaN: no θ yet
        state = torch.cat([e, torch.zeros_like(e)], 1)  # then the shifts c, 0 at first
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return state
        _hint_states[key] = state
    state = _hint_states[key]
    assert state.shape[0] >= P, "more programs than hint-state rows"
    return state


def _max_programs(device: torch.device) -> int:
    """_PROGRAMS_PER_SM per SM (2 under the interpreter or off CUDA)."""
    if interpret() or device.type != "cuda":
        return 2
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _programs(device: torch.device, K: int, per_program: int) -> int:
    """Persistent grid: _max_programs, fewer if the scratch would pass 1 GiB (not under the interpreter)."""
    n = _max_programs(device)
    if device.type == "cuda" and not interpret():
        n = min(n, (1 << 30) // max(per_program, 1))
    return max(1, min(n, K))


def sort_widths(m_up: int) -> tuple[int, int]:
    """(W, W_SMALL): the sort networks' lanes for m ≤ m_up (module docstring; bench/costmodel.py models them)."""
    W = max(16, min(triton.next_power_of_2(max(m_up, 1)), _SORT_CAP))
    return W, min(_SMALL_CAP, W // 4)


def hkl_rows(s_logits, t_vals, t_cols, col_mask, spans, temperature, merge, s_chain, t_chain, common_s, common_t,
             uncommon_topk):
    """The ``triton`` backend of ``xtoken::hkl_rows`` (contract in ops.hkl): -> (loss [K] f32, grad in the logits'
    dtype, Σ_v ∂L/∂S_k [K] f32). No host sync: m is kept on the device, host sizes use its bound m_up."""
    sparse = t_cols is not None
    device = s_logits.device
    t_cols = t_vals if t_cols is None else t_cols  # dense: a placeholder, unused with SPARSE=False
    (N_s, V_S), V_T, K, C = s_logits.shape, col_mask.numel(), spans.shape[0], t_vals.shape[1]
    tau, chain = float(temperature), merge == "chain"
    f32 = dict(dtype=torch.float32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    loss = torch.zeros(K, **f32)
    grad = torch.empty_like(s_logits)
    gsum = torch.zeros(K, **f32)
    paths = torch.zeros(K, **i32)
    lse_s = torch.empty(N_s, **f32)
    lse_t = torch.empty(t_vals.shape[0], **f32)
    s_ch = s_chain.to(**f32).contiguous() if chain else lse_s
    t_ch = t_chain.to(**f32).contiguous() if chain else lse_t
    cap = V_S if uncommon_topk is None else int(uncommon_topk)
    smap, tmap, tcls, m_dev, bits_s, bits_t = _pair_maps(common_s, common_t, col_mask, V_S, C, sparse, cap)
    m_up = max(0, min(V_S, V_T, cap))
    W, W_SMALL = sort_widths(m_up)
    cap_a = max(1, min(V_S, 2 * m_up + _SLACK))
    cap_b = max(1, min(C, 2 * m_up + _SLACK))
    # row strides: a spare slot past the capacity, rounded up to 16 entries (aligned rows; module docstring)
    sl_a, sl_b, g_len = ((n + 16) // 16 * 16 for n in (cap_a, cap_b, m_up + (C if sparse else 0)))
    nbuf = 1 + (W < m_up)  # m may exceed the largest network: a second buffer per list (_sorted_lists)
    per_program = (8 * sl_a + 4 * sl_b) * nbuf + 12 * (W + 16) + 8 * g_len + 528 + (8 * V_T if sparse else 0)
    P = _programs(device, K, per_program)
    la = torch.empty(P, sl_a * nbuf, dtype=torch.int64, device=device)
    lb = torch.empty(P, sl_b * nbuf, **i32)
    wa = torch.empty(P, W + 16, dtype=torch.int64, device=device)
    wb = torch.empty(P, W + 16, **i32)
    gc = torch.empty(P, g_len, **i32)
    gv = torch.empty(P, g_len, **f32)
    hint = _hint_state(device, P, (V_S, C, m_up))
    if sparse:  # all-zero between chunks (scatter_later_rows / clear_later_rows)
        tacc = torch.zeros(P, V_T, **f32)
        tcnt = torch.zeros(P, V_T, **i32)
    else:
        tacc, tcnt = lse_t, gc  # unused placeholders
    if K:
        prof, profile = _tl.phase_args("H-KL", PHASES, P, device, spans)
        _launch((P,), s_logits, s_logits.stride(0), t_vals, t_vals.stride(0), t_cols, t_cols.stride(0), smap, tmap,
                tcls, bits_s, bits_t, m_dev, spans, s_ch, t_ch, K, loss, gsum,
                paths, grad, grad.stride(0), lse_s, lse_t, la, lb, wa, wb, gc, gv, hint, tacc, tcnt, prof, V_S, V_T, C,
                cap_a, cap_b, sl_a, sl_b, m_up, g_len, 1.0 / tau, tau,
                MEAN=merge == "mean", CHAIN=chain, SPARSE=sparse, W=W, W_SMALL=W_SMALL, MERGE=nbuf == 2,
                PROFILE=profile,
                **(_interp_blocks(V_S, C, max(cap_a, cap_b)) if interpret() else {}))
    global last_paths
    last_paths = paths
    n_prog = max(1, min(N_s, 1024 if device.type == "cuda" else 2))
    _zero((n_prog,), grad, grad.stride(0), covered_rows(spans, merge, N_s), N_s, V_S)
    return loss, grad, gsum
