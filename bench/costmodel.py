"""Cost model of the fused Triton loss kernels, checkable without a GPU: for a given W and shape it counts, per
logit row (a 1-to-1 chunk, the common case), the bytes each kernel moves from HBM, the bytes it moves between L2 and
the SMs, and the longest dependent loop, beside the HBM floor (read the student and teacher rows, write the
gradient row once). Nothing here is timed; the GPU numbers come from ``xtoken bench --suite gpu`` on a GPU.

HBM bytes are counted twice: with the working set in L2 (W-derived arrays shared by all programs, and the rows
reused while they are live: P-KL's z rows gathered in C and scratch rows h, counted by a simulation of its chunk
protocol; H-KL's per-program lists, buffers and the teacher row S3 gathers from, each for the share of a chunk's
time it is live; the total is printed beside L2's size) and with every access to it going to HBM (the bound when it
does not fit: scratch written and read, one 32-byte sector per gather). H-KL is modelled at the m = min(|U_S|,
|U_T|, 8192) that the W and the ``uncovered`` option give (the default, and "epsilon" for the real W), with the time
its top-m window adds after the streams (list passes and the sorts' issue time).
L2<->SM bytes count one 32-byte sector per gathered element (the upper figure) or the distinct sectors per tile (the
lower one, P-KL), and are timed at an assumed L2 bandwidth; P-KL's gathers are also counted per warp instruction
(warp_sectors: the distinct sectors of an instruction's 32 lanes in the kernel's Triton layout, SPT).
Time per row: each streaming pass takes the longest of its HBM bytes at the SM's share of bandwidth, its
instruction issue and its special-function unit's time (the MUFU instructions: ex2, lg2), both read from the kernels'
sm_90 SASS (bench/sass.py, issue_counts): both kernels are issue-bound. The SFU's time alone with the streams (each
pass the longer of the two, the passes back to back as the kernels run them) is printed as a bound: what the kernels'
transcendentals allow in this structure however few instructions the rest of a pass issued.
Against a GPU (one run, an H200, 2026-12-04, README "Measured on a GPU"): the fused kernels took 5.5-10.4x the
issue-bound times modelled here (the 4 instructions per clock are not reached). In the second session's run A,
P-KL's profiled kernel times on both W's were its per-warp-instruction L2<->SM count at one rate, 4.92 and 5.05 TB/s:
the "calibrated" line times P-KL at 5.0 TB/s (L2_WARP), also with one element a thread in C's and D's gathers (the
kernel's LANE1 autotune config, ops.pkl_kernel._gather, at that config's instruction counts; bench/permute.py's probe
tests the pattern alone on a GPU).
H-KL's and GOLD's were far above both their issue and their L2 times: not modelled.
"""
from __future__ import annotations

import functools
import heapq
import json
import math
import os
import random
import subprocess
import sys
import tempfile

import torch

from xtoken_ext.losses import _op_cap
from xtoken_ext.ops.pkl_kernel import _CONFIGS, SLICES_GPU, TILES_GPU

# Nominal H100 SXM figures: HBM3 bandwidth, L2 size, SMs. The model needs only their ratios to the bytes.
# l2_bw: an assumed L2 -> SM bandwidth (not measured here; the order of public H100 microbenchmarks), only for the
# L2-time line.
GPU = dict(name="H100 SXM", hbm=3.35e12, l2=50 << 20, sms=132, l2_bw=5.5e12)
# ops.pkl_kernel's GPU block sizes and D-slice width (student tiles)
CONFIG = dict(BLOCK_S=_CONFIGS[0].kwargs["BLOCK_S"], **TILES_GPU, SLICE=SLICES_GPU["SLICE"])
SECTOR = 32  # bytes an L2 request moves for one gathered element
# Elements per thread in Triton's layout of the P-KL kernel's gathers (sm_90 TTGIR of its dense variants, checked by
# tests/test_kernels_compile.py): C's and D's 2,048-element tiles 8 adjacent elements a thread, so that the 32 lanes
# of one warp instruction lie 8 elements apart; R's 4,096-entry blocks by its piece size (entries a piece: elements)
SPT = dict(C=8, D=8, R={1: 4, 2: 2, 4: 2})
# The rate at which the fused P-KL kernel moved its L2<->SM sectors counted per warp instruction (warp_sectors) in the
# second GPU session's run A (H200, 2026-12-04, the kernel's profiled time, README "Measured on a GPU: second
# session"): 31.67 MiB/row for Projection.random in 55.25 ms, 13.44 MiB/row for the real W in 22.85 ms, at the
# model's 8,192 rows: 4.92 and 5.05 TB/s; the one-sector-per-value figure gives 4.77 and 5.60 for the same times.
# Both W's ran the same inputs (8,161 student rows in 7,439 chunks): their ratio holds, the absolute rate is
# approximate.
L2_WARP = 5.0e12
# H-KL sorts: SASS instructions per lane and compare-and-swap stage (a: int64 keys, b: int32), from the offline sm_90
# compile at 8 warps of ops.hkl_kernel._sort_list's loops (the MERGE variant): its block sort, the 8,192-lane network
# (20,264 / 11,179 per thread per block over 91 stages × 32 lanes per thread; the window's and the small network's
# sorts are taken at the same rate), and a merge tile (3,620 / 2,043 per thread over the last merge stage's 13 steps,
# its loads and merge-path extraction included); issued at ISSUE warp-instructions per clock (4 schedulers) at CLOCK
# (H100 SXM boost)
SORT_INSTR = (7.0, 3.8)
MERGE_INSTR = (8.7, 4.9)
SORT_THREADS = 256
ISSUE, CLOCK = 4, 1.755e9
# results per clock and SM of the special-function unit (MUFU: ex2, lg2, rcp) on sm_90 (the CUDA C++ Programming
# Guide's arithmetic-instruction throughput table, compute capability 9.0): a warp's MUFU occupies it 32 / SFU clocks
SFU = 16
SCRATCH_FIXED = 32 << 10  # per H-KL program: hint state, stream lines in flight
# the window's bisection passes (128-way, ops.hkl_kernel._select): ~3 within the key range of bin b1 (an
# assumption: ≤ 5 for 32 bits)
SELECT_STEPS = 3
# Lists of a hinted single pass (ops.hkl_kernel._anchor's replay of the hint on real bf16 logits, SmolLM2-135M and
# Gemma-3 270M, U a random part of the vocabulary; means over the chunks that hit): |L| = m plus the keys within the
# margin e below the shift, ≈ m at m ≥ 2,048 (|L| 1.7 m at m = 8,192, 2.1–2.3 m at 2,048) but ~700–1,000 keys at
# m = 128 (5.8 m / 7.7 m): m + max(m, LIST_EXTRA), taken where a side's uncommon set is not appended whole
LIST_EXTRA = 1024
# the keys of bin b1 (which _candidates copies to the sort buffer for the bisection) per key of m: that replay's
# mean at m = 8,192 (0.097; 0.13–0.15 at m = 2,048; at the 90th percentile 0.21 / 0.26–0.29: one 2,048-key tile at
# these m), taken also where the list holds a whole uncommon set
B1_SHARE = 0.10
# the share of chunks whose single pass hits on a side the hint serves, and the share of the misses that
# ops.hkl_kernel._rescue then lists (one of the 8 bins next to the hinted one holds m to capacity keys at and above
# it; the rest take _compact after its counting pass): the interpreted kernel on real bf16 logits
# (scripts/hint_paths.py, past each program's first two chunks). As in the defaults priced here, m = 128 = |U_T| (the
# teacher's set listed whole), uncommon_topk 8,192, the student's U a random 15 % of the vocabulary (capacity 20,480):
# SmolLM2-135M (196 chunks) hits 0.93, Gemma-3 270M (116) 0.91, every miss rescued (13 and 10). m = uncommon_topk
# (capacity 2 m + 4,096), U a random third on both sides, student / teacher: SmolLM2 0.89 / 0.87 at m = 2,048, every
# miss rescued; Gemma-3 0.67 / 0.69 at 2,048 (rescued 35 of 38 / 34 of 36), 0.70 / 0.66 at 8,192 (32 of 35 / 39 of
# 40). (At m = 128 with both sides hinted at the capacity 4,352: 0.93 / 0.89 and 0.86 / 0.88, 13 of 14 rescued on
# Gemma-3's teacher side, the rest all.) The model takes the lowest side's rates below m = 2,048, and from there on
HIT_RATE = (0.91, 0.66)
RESCUE_RATE = (1.0, 0.91)


@functools.lru_cache(maxsize=None)
def issue_counts() -> dict | None:
    """Instructions per thread per tile of each streaming pass (bench.sass: the kernels compiled offline for sm_90,
    loops read from their SASS), or None where that cannot run (no NVIDIA tools in the triton wheel). In a subprocess:
    this process may run Triton under its interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cwd:  # not a source checkout's root, whose xtoken_ext has no bench
        proc = subprocess.run([sys.executable, "-m", "xtoken_ext.bench.sass"], capture_output=True, text=True,
                              env=env, cwd=cwd)
    if proc.returncode != 0:
        print(f"(instruction issue not modelled: the offline sm_90 compile failed: {proc.stderr.strip()[-300:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def issue_time(body: int, warps: int, tiles: int) -> float:
    """Seconds an SM needs to issue ``tiles`` iterations of a loop of ``body`` instructions per thread (every warp
    issues the body once per iteration, ISSUE warp-instructions per clock)."""
    return body * warps * tiles / ISSUE / CLOCK


def sfu_time(mufu: int, warps: int, tiles: int) -> float:
    """Seconds an SM's special-function unit needs for ``tiles`` iterations of a loop of ``mufu`` MUFU instructions
    per thread (SFU results per clock)."""
    return mufu * 32 * warps * tiles / SFU / CLOCK


def warp_sectors(addr: torch.Tensor, spt: int, elem: int) -> torch.Tensor:
    """Per warp instruction, the distinct 32-byte sectors it touches, where a tile's lanes access elem-byte elements at
    the element indices ``addr`` (in the tile's order, whole tiles; -1: masked off) in Triton's blocked layout of
    ``spt`` adjacent elements a thread: each 32·spt elements are spt instructions whose 32 lanes lie spt apart."""
    a = torch.cat([addr, addr.new_full((-addr.numel() % (32 * spt),), -1)])
    a = a.view(-1, 32, spt).transpose(1, 2).reshape(-1, 32)  # [instruction, lane]
    sec, _ = torch.where(a >= 0, a * elem // SECTOR, -1).sort(1)
    return ((sec[:, 1:] != sec[:, :-1]) & (sec[:, 1:] >= 0)).sum(1) + (sec[:, 0] >= 0).long()


def w_stats(proj, block_t: int, block_e: int, block_s: int = 2048, elem: int = 2, slice_: int = 8) -> dict:
    """nnz, longest column, the P-KL kernel's dense teacher pass for this W (``ops.pkl_kernel._w_structure``): the
    column ELL's width K, the teacher tiles, the residual entries (past a column's first K, in pieces of P entries, the
    last one of a column padded: res counts the padded entries, pieces the pieces) and their entry blocks, the bytes of
    the column ELL's slot loads (every 32-byte sector of its K slot rows: 4 columns' 8-byte words, a column's words past
    its length 0, loaded without a mask, the tile past the last one included where C prefetches it), the first kernel's
    ragged-loop length (Σ over BLOCK_T=512 tiles of the longest column), and the distinct 32-byte sectors the gathers
    touch (a lower bound of their L2 traffic: every repeat within a tile an L1 hit): C's gathers of the z row (elem
    bytes) per teacher tile and R's per residual block, D's gathers of the fp32 scratch row per block_s student tile;
    and D's student tiles per ELL width run ({K: tiles}): a slice (slice_ tiles) runs as many slots as its widest
    student has (≥ 1). The gathers' bytes per warp instruction ({pass: bytes}; warp_sectors in Triton's layout SPT,
    and warp1 with one element a thread in C and D): C's slot gathers of the z row over the tiles (a slot past a
    column's length loads student 0), R's of its entries (the padding masked off), D's of the fp32 h row at each
    student's slots' keys (the kernel's: _w_structure's ranks, the long columns first; a slot past the student's
    count loads h[0]) over the slots each tile runs."""
    from xtoken_ext.ops.pkl_kernel import _column_slots, _residual_piece, _residual_pieces, _w_structure

    idx = proj.indices
    V_T = proj.teacher_vocab_size
    flat = idx.reshape(-1).long()
    slot = torch.nonzero(flat >= 0).squeeze(1)
    cols, order = torch.sort(flat[slot], stable=True)
    stud = (slot // idx.shape[1])[order]
    col_len = torch.bincount(cols, minlength=V_T)
    K = _column_slots(col_len, block_t, block_e)
    j = torch.arange(cols.numel()) - (torch.cumsum(col_len, 0) - col_len)[cols]  # position in its column
    res = j >= K
    P = _residual_piece(col_len, K, block_e)
    n_pc = _residual_pieces(col_len, K, P)
    pos = (torch.cumsum(n_pc, 0) - n_pc)[cols] * P + j - K  # a residual entry's place in R's padded list
    padded = torch.cat([col_len, col_len.new_zeros(-V_T % 512)])
    old = padded.view(-1, 512).amax(1).sum()
    z_sect, h_sect = SECTOR // elem, SECTOR // 4
    n_z = idx.shape[0] // z_sect + 1
    grp = torch.where(res, V_T // block_t + 1 + pos // block_e, cols // block_t)  # tile / block
    sect_c = torch.unique(grp * n_z + stud // z_sect).numel()
    sect_d = torch.unique(stud // block_s * (V_T // h_sect + 1) + cols // h_sect).numel()

    def sectors(n_per, mask):  # 32-byte sectors of n_per entries holding some masked one
        m = torch.cat([mask, mask.new_zeros(-mask.numel() % n_per)]).view(-1, n_per).any(1)
        return SECTOR * int(m.sum())

    # C's columns: its tiles and the padding tile past them, whose mask bytes it prefetches (and, K ≤ 2, its words
    # and ranks: ops.pkl_kernel._single_pass carries those to the next tile only for narrow column ELLs)
    cols_c = (math.ceil(V_T / block_t) + 1) * block_t
    cols_w = cols_c if K <= 2 else cols_c - block_t
    cell = K * SECTOR * cols_w // 4
    nslot = (idx >= 0).sum(1)
    span = block_s * slice_
    widest = torch.cat([nslot, nslot.new_zeros(-nslot.numel() % span)]).view(-1, span).amax(1).clamp(min=1)
    d_tiles = torch.bincount(widest[torch.arange(math.ceil(idx.shape[0] / block_s)) // slice_],
                             minlength=idx.shape[1] + 1)
    # the gradient pass's compact ELL (ops.pkl_kernel._ell_words): slot 0's words of every student (a vector load),
    # and in the tiles of slices with more slots nslot (1 B per student) and, per slot k ≥ 1, the 32-byte sectors (4
    # students' 8-byte words) where some student has more than k slots (the other loads are masked off)
    ell = (SECTOR * math.ceil(idx.shape[0] / 4) + block_s * int(d_tiles[2:].sum())
           + sum(sectors(4, nslot > k) for k in range(1, idx.shape[1])))
    pieces = int(n_pc.sum())
    n_res = pieces * P
    # per warp instruction, at the kernel's own arrays: C's slots over the tiles (a flat slot's student; no entry:
    # student 0), R's padded entry list (−1: masked off), D's keys over the tiles that run them (0: no slot)
    ws = _w_structure(idx.to(torch.int32).contiguous(), V_T, block_t, block_e)
    n_tiles_s = math.ceil(idx.shape[0] / block_s)
    c_addr = (ws["cell_slot"][:, :math.ceil(V_T / block_t) * block_t] // idx.shape[1]).clamp(min=0)
    r_addr = torch.where(ws["r_slot"] >= 0, ws["r_slot"] // idx.shape[1], -1)
    d_addr = torch.zeros(idx.shape[1], n_tiles_s * block_s, dtype=torch.long)
    d_addr[:, :idx.shape[0]] = ws["ell_keys"][1]
    runs = (torch.arange(idx.shape[1])[:, None] < widest[torch.arange(n_tiles_s) // slice_][None, :]).float()

    def gathers(spt_c: int, spt_d: int) -> dict:
        c = sum(int(warp_sectors(a, spt_c, elem).sum()) for a in c_addr)
        d = sum(float(warp_sectors(a, spt_d, 4).view(n_tiles_s, -1).sum(1).float() @ run)
                for a, run in zip(d_addr, runs))
        return dict(C=SECTOR * c, R=SECTOR * int(warp_sectors(r_addr, SPT["R"][P], elem).sum()), D=SECTOR * int(d))

    return dict(nnz=cols.numel(), max_col=int(col_len.max()), K=K, tiles=math.ceil(V_T / block_t), res=n_res,
                pieces=pieces, P=P, r_blocks=math.ceil(n_res / block_e), n_long=int((col_len > K).sum()), cell=cell,
                cols_c=cols_c, cols_w=cols_w, old_loop=int(old),
                sect_c=sect_c, sect_d=sect_d, ell=ell, cols=int((col_len > 0).sum()),
                warp=gathers(SPT["C"], SPT["D"]), warp1=gathers(1, 1),
                d_tiles={k: int(d_tiles[k]) for k in range(1, idx.shape[1] + 1)})


def simulate_live_rows(n_prog: int, n_chunks: int, t_a: float, t_c: float, t_d: float, slices: int,
                       help_others: bool = True, jitter: float = 0.1, seed: int = 0) -> tuple[float, float]:
    """Discrete-event run of ops.pkl_kernel's chunk protocol: program p owns chunks p, p + P, ...; per chunk it runs
    A and C and publishes the chunk, then, before its next chunk, takes open D slices of published chunks oldest
    first (help_others=False: only its own) until none is open, and waits for its previous chunk's slices still in
    flight. Phase times t_a, t_c and t_d / slices per slice, each scaled by a uniform ±jitter (seeded). -> the
    time-averaged number of z rows (half during A, whole through C) and of scratch rows h (half during C, whole from
    its publication to the end of its last slice) live at once."""
    rng = random.Random(seed)

    def dur(t):
        return t * (1 + rng.uniform(-jitter, jitter))

    own = [list(range(p, n_chunks, n_prog)) for p in range(n_prog)]
    nxt = [0] * n_prog  # each program's next own chunk
    taken, done_at = [0] * n_chunks, [0.0] * n_chunks
    a_at, c_at, pub_at = [0.0] * n_chunks, [0.0] * n_chunks, [0.0] * n_chunks
    open_ = []  # published chunks with a slice not yet taken, in publication order
    events = [(0.0, p, False) for p in range(n_prog)]  # (time, program, it just published)
    while events:
        t, p, publishing = heapq.heappop(events)
        prev = own[p][nxt[p] - 1] if nxt[p] else None
        if publishing:
            open_.append(prev)
        if prev is not None:  # the guard: one open slice, or wait for prev's slices and go on
            k = open_[0] if open_ and help_others else prev if taken[prev] < slices else None
            if k is not None:
                end = t + dur(t_d / slices)
                taken[k] += 1
                if taken[k] == slices:
                    open_.remove(k)
                done_at[k] = max(done_at[k], end)
                heapq.heappush(events, (end, p, False))
                continue
            t = max(t, done_at[prev])
        if nxt[p] < len(own[p]):
            k = own[p][nxt[p]]
            nxt[p] += 1
            a_at[k], c_at[k] = t, t + dur(t_a)
            pub_at[k] = c_at[k] + dur(t_c)
            heapq.heappush(events, (pub_at[k], p, True))
    total = max(done_at)
    z = sum((c_at[k] - a_at[k]) / 2 + pub_at[k] - c_at[k] for k in range(n_chunks)) / total
    h = sum((pub_at[k] - c_at[k]) / 2 + done_at[k] - pub_at[k] for k in range(n_chunks)) / total
    return z, h


def _pass_times(passes: dict, gpu: dict) -> tuple[dict, float, float]:
    """{pass: (HBM bytes, issue seconds or None, SFU seconds or None)} -> ({pass: (stream seconds at the SM's share of
    HBM bandwidth, issue seconds, SFU seconds)}, seconds per row: each pass the longest of the three, the passes one
    after another, and the bound the SFU sets: each pass the longer of its stream and its SFU time)."""
    bw_sm = gpu["hbm"] / gpu["sms"]
    out = {k: (b / bw_sm, t, f) for k, (b, t, f) in passes.items()}
    return (out, sum(max(a, b or 0.0, c or 0.0) for a, b, c in out.values()),
            sum(max(a, c or 0.0) for a, _, c in out.values()))


def pkl_model(proj, rows: int, elem: int = 2, cfg: dict = CONFIG, gpu: dict = GPU, issue: dict | None = None) -> dict:
    """Per-row model of ``_pkl_kernel`` (dense teacher, frozen W) for a 1-to-1 chunk: A streams z (online LSE), R sums
    the long columns' residual entries (entry blocks gathering p from the z row, pieces of P entries summed in
    their thread, a segmented scan over the pieces), C is one loop over the teacher tiles (per tile: the column ELL's K
    slots gathering p, R's sums of its long columns, the online KL pass, the column's h stored: u = x̄ − log q), D
    streams z again and writes dz (ELL gather of h, an exp2 per slot) in G slices that any program may compute.
    "Vocab tiles" are the tiles a row must stream anyway: ⌈V_S/BLOCK_S⌉ + ⌈V_T/BLOCK_T⌉.

    L2 working set: W's structure, and the z rows (gathered in C) and scratch rows h live at once, time-averaged
    over a simulated run of the kernel's protocol (simulate_live_rows; phase times ∝ their HBM bytes: A z, C t,
    D z + dz), with helping and, for comparison, with each owner computing its own D slices.

    Time per row and SM (``issue``: issue_counts()["P-KL"], for the first config's tiles): each pass the longest of
    its HBM stream, its instruction issue (loop body × warps × tiles) and its SFU time (MUFU instructions, sfu_time),
    passes back to back."""
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    st = w_stats(proj, cfg["BLOCK_T"], cfg["BLOCK_E"], cfg["BLOCK_S"], elem, cfg["SLICE"])
    floor = elem * (2 * V_S + V_T)
    stream = elem * (3 * V_S + V_T)  # z in A and D, t in C, dz in D
    # h written in C at the ranks of the columns with W entries, gathered in D (≤ the whole row)
    scratch = 4 * st["cols"] + min(4 * st["cols"], SECTOR * st["nnz"])
    res_row = 2 * SECTOR * st["n_long"]  # R's sums in the h row: written, read in C before h replaces them
    w_reads = (4 * V_S  # a in A
               + st["cell"] + st["cols_c"] + 4 * st["cols_w"]  # C: column ELL slots, mask, ranks (padded)
               + 8 * st["r_blocks"] * cfg["BLOCK_E"] + 4 * st["pieces"]  # R: entry words (whole blocks), piece keys
               + st["ell"])  # D: the compact ELL
    l2 = (w_reads + st["nnz"] * SECTOR  # p gathers in C and R
          + st["nnz"] * SECTOR  # D: h gathers
          + scratch + res_row)
    tiles_s, tiles_t = math.ceil(V_S / cfg["BLOCK_S"]), math.ceil(V_T / cfg["BLOCK_T"])
    slices = math.ceil(tiles_s / cfg["SLICE"])
    loops = {"A (student LSE)": tiles_s,
             f"R + C ({st['r_blocks']} residual blocks of {st['P']}-entry pieces, {st['tiles']} tiles of a "
             f"{st['K']}-slot column ELL)":
             st["r_blocks"] + st["tiles"], "D (gradient)": tiles_s}
    nprog = min(rows, gpu["sms"])  # one resident program per SM (ops.pkl_kernel._num_programs)
    t_a, t_c, t_d = elem * V_S, elem * V_T, 2 * elem * V_S  # phase times ∝ their HBM bytes
    z_rows, h_rows = simulate_live_rows(nprog, rows, t_a, t_c, t_d, slices)
    _, h_alone = simulate_live_rows(nprog, rows, t_a, t_c, t_d, slices, help_others=False)
    z_row, h_row = elem * V_S, 4 * st["cols"]
    l2_lo = l2 - 2 * SECTOR * st["nnz"] + SECTOR * (st["sect_c"] + st["sect_d"])  # gathers: distinct sectors
    w_bytes = w_reads  # W's structure, re-read for every row
    parts = {f"W structure (column ELL {st['cell'] / 2**20:.2f} MiB, ELL {st['ell'] / 2**20:.2f} MiB)": w_reads,
             "p and h gathers": (SECTOR * (st["sect_c"] + st["sect_d"]), 2 * SECTOR * st["nnz"]),
             "scratch": scratch + res_row}

    def per_pass(time, counts):  # {pass: seconds} of a loop's per-tile counts (instructions or MUFU)
        if counts is None:
            return {k: None for k in "ACD"}
        w = issue["warps"]
        return {"A": time(counts["A"], w, tiles_s),
                "D": sum(time(counts["D"][str(k)], w, n) for k, n in st["d_tiles"].items()),
                "C": (time(counts["C"][str(st["K"])], w, st["tiles"])
                      + time(counts["R"][str(st["P"])], w, st["r_blocks"]))}

    def times(counts):  # (passes, t_row, t_sfu) at these per-tile counts (None: bytes only)
        iss, sfu = per_pass(issue_time, counts), per_pass(sfu_time, counts and counts["sfu"])
        return _pass_times({"A": (elem * V_S, iss["A"], sfu["A"]), "C": (elem * V_T, iss["C"], sfu["C"]),
                            "D": (2 * elem * V_S, iss["D"], sfu["D"])}, gpu)

    passes, t_row, t_sfu = times(issue)
    # the LANE1 config's (ops.pkl_kernel._gather: C's and D's gathers one element a thread), A's and R's as above
    lane1 = issue and issue.get("LANE1")
    t_row1 = times(dict(issue, C=lane1["C"], D=lane1["D"], sfu=dict(issue["sfu"], **lane1["sfu"])))[1] if lane1 \
        else t_row
    l2_warp = l2 - 2 * SECTOR * st["nnz"] + sum(st["warp"].values())  # the gathers counted per warp instruction
    return dict(kernel="P-KL", floor=floor, hbm_l2=stream, passes=passes, t_row=t_row, t_row1=t_row1, t_sfu=t_sfu,
                issue=issue,
                hbm_spill=stream + scratch + res_row + SECTOR * st["nnz"], l2=l2, l2_warp=l2_warp,
                l2_warp1=l2_warp - sum(st["warp"].values()) + sum(st["warp1"].values()),
                l2_lo=l2_lo, l2_parts=parts, loops=loops, vocab_tiles=tiles_s + tiles_t, old_loop=st["old_loop"],
                footprint=z_rows * z_row + h_rows * h_row + w_bytes,
                footprint_alone=z_rows * z_row + h_alone * h_row + w_bytes, slices=slices, stats=st)


def _common(proj, pairs: str, uncovered: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The allowed teacher columns A (the covered ones, or all) and the common pairs (student, teacher ids) on A of
    the H-KL family's sorted-L1 term with this W, ``pairs`` ("relaxed": H-KL, "strict": GOLD)."""
    allowed = (proj.covered_columns() if uncovered == "renormalize"
               else torch.ones(proj.teacher_vocab_size, dtype=torch.bool))
    cs, ct = proj.common_pairs(pairs)
    keep = allowed[ct.long()]
    return allowed, cs[keep].long(), ct[keep].long()


def uncommon_masks(proj, pairs: str, uncovered: str = "renormalize") -> tuple[int, torch.Tensor, torch.Tensor]:
    """(common pairs, U_S, U_T as bool masks over the ids) of the H-KL family's sorted-L1 term with this W, ``pairs``
    and ``uncovered`` (_common)."""
    allowed, cs, ct = _common(proj, pairs, uncovered)
    u_s = torch.ones(proj.student_vocab_size, dtype=torch.bool)
    u_s[cs] = False
    u_t = allowed.clone()
    u_t[ct] = False
    return cs.numel(), u_s, u_t


def common_sectors(proj, pairs: str, uncovered: str, block: int, elem: int = 2) -> int:
    """The distinct 32-byte sectors of the teacher row that the gradient pass's gathers at the common pairs' teacher
    columns touch, per tile of ``block`` student ids (a lower bound of their L2 traffic: every repeat within a tile
    an L1 hit; a real W maps neighbouring ids to neighbouring ones: Llama-3 → Qwen3's 109,701 gathers touch 13,557
    sectors)."""
    _, cs, ct = _common(proj, pairs, uncovered)
    per = SECTOR // elem
    return torch.unique(cs // block * (proj.teacher_vocab_size // per + 1) + ct // per).numel()


def uncommon_sets(proj, pairs: str, uncovered: str = "renormalize") -> tuple[int, int, int]:
    """(common pairs, |U_S|, |U_T|) (uncommon_masks): m = min(|U_S|, |U_T|, uncommon_topk)."""
    n_common, u_s, u_t = uncommon_masks(proj, pairs, uncovered)
    return n_common, int(u_s.sum()), int(u_t.sum())


def tiles_with(mask: torch.Tensor, block: int) -> int:
    """The tiles of ``block`` ids holding a True of ``mask``."""
    n = -(-mask.numel() // block)
    return int(torch.nn.functional.pad(mask, (0, n * block - mask.numel())).view(n, block).any(1).sum())


def hkl_model(proj, rows: int, elem: int = 2, uncovered: str = "renormalize", topk: int | None = 8192,
              gpu: dict = GPU, loss: str = "H-KL", issue: dict | None = None) -> dict:
    """Per-row model of ``_hkl_kernel`` (dense teacher, H-KL: the relaxed common pairs, GOLD: the strict ones, ULD:
    none, the whole vocabularies uncommon; uncommon_topk ``topk``, None: uncapped) for a 1-to-1 chunk, from the pass
    table in ops.hkl_kernel's docstring, with the m a user gets from this W and ``uncovered`` (A = the covered columns,
    or all); an m above the largest sort network W (ULD) sorts both lists whole instead: ⌈|L|/W⌉ blocks in the W-lane
    network, then ⌈log₂ blocks⌉ merge rounds of as many W-key tiles, each the network's last merge stage (log₂ W steps;
    ops.hkl_kernel._sort_list; MERGE_INSTR per lane and step), each round a read and a write of the list. Common case
    (the single-pass compaction hits on both sides): student rows read in S1 (LSE, candidate list) and S3 (gradient,
    written), the teacher row in T1; the lists L_a (8 B) / L_b (4 B) written in S1 / T1 and read 3 times (level-1
    histogram, bin b1's key range and copy, gather; the ~3 bisection steps read bin b1's copied keys, B1_SHARE of m),
    or once where the small network (m ≤ W_SMALL) sorts the whole list (|L| ≤ W_SMALL), |L| = the side's uncommon set
    when it fits the list (the first pass appends it whole), else m + max(m, LIST_EXTRA) (m plus the keys within the
    hint's margin); the sort buffers, the gradient list G (8 B × m); S3 gathers the teacher at the common columns
    (from L2: the teacher row is part of the working set; a 32-byte sector per gather, or the distinct sectors per
    student tile, common_sectors, the lower figure; spilled, each gather is a sector from HBM).
    The fallback (a miss on both sides: S2 / T2 read the rows twice, for the level-1 histogram and the compaction) is
    returned as hbm_l2_fallback / hbm_spill_fallback.

    Time per row and SM: the streams S1, T1 and S3, each the longest of its bytes at the SM's share of HBM bandwidth,
    its instruction issue (``issue``: issue_counts()["H-KL"], the first config's tiles; S1 / T1 skip their append in the
    tiles without an id of U_S / U_T, which cluster in a real W) and its SFU time (issue["sfu"]), then the window (not
    overlapped: one program per SM): its list passes, the longer of their bytes at the SM's share of the assumed L2
    bandwidth and their instruction issue (issue["L"] per list and tile), and the sorts' issue time (SORT_INSTR per lane
    and stage; the network of W_SMALL lanes when m fits it, run for the ⌈log₂ n⌉ merge stages that sort its first n
    lanes, n the longer of a whole list and a window of m, both sides in it: one chain of stages, the b keys at the
    int64 rate; else the W-lane network twice, one window after the other). The working set is time-averaged over these
    phases: each per-program buffer counts for the fraction of a chunk's time it is live (L_a from its writes in S1 to
    the end of the window, L_b from T1, the sort buffers in the window, G from the window to the end of S3, the teacher
    row from T1 to the end of S3)."""
    from xtoken_ext.ops import hkl_kernel as H

    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    pairs = "relaxed" if loss == "H-KL" else "strict"
    if loss == "ULD":  # no common pairs: every student id and every allowed teacher column is uncommon
        allowed, _, _ = _common(proj, pairs, uncovered)
        n_common, us_mask, ut_mask = 0, torch.ones(V_S, dtype=torch.bool), allowed
    else:
        n_common, us_mask, ut_mask = uncommon_masks(proj, pairs, uncovered)
    u_s, u_t = int(us_mask.sum()), int(ut_mask.sum())
    cap_m = V_S if topk is None else topk
    m = min(u_s, u_t, cap_m)
    # the kernel's host bound m_up (m itself stays on the device): H-KL / GOLD's loss hands the op the cap _op_cap
    # gives (losses._uncommon_cap; the allowed columns here are the projection's, known on the host), ULD its option
    m_up = min(V_S, V_T, cap_m if loss == "ULD" else _op_cap(topk, min(u_s, u_t)))
    w_big, w_small = H.sort_widths(m_up)
    w_net = w_small if m <= w_small else w_big
    small = w_net < w_big  # the small network sorts both windows side by side, b's keys widened to int64
    cap = 2 * m_up + H._SLACK
    fit = min(cap, 2 * m + H._SLACK)  # an uncommon set this small is appended whole (ops.hkl_kernel._hint_bin)
    listed = min(m + max(m, LIST_EXTRA), cap)  # else the hint's list
    l_a = u_s if u_s <= fit else listed
    l_b = u_t if u_t <= fit else listed
    touched = min(m, w_net)
    merge = m > w_net  # m above the largest network (ULD): both lists merge-sorted whole
    # per list (a: 8 B keys, b: 4 B): sorted whole in the small network where both fit it (no pass over them),
    # merge-sorted (m > W: no pass but the sort's), else 3 passes (level-1 histogram, bin b1's key range and copy,
    # the gather of the window) and ~3 bisection steps over bin b1's keys
    n_pass = 0 if merge else 3
    n_b1 = math.ceil(B1_SHARE * m)
    whole = small and max(l_a, l_b) <= w_small
    sides = ((l_a, 8), (l_b, 4))  # (keys, bytes per key)
    passed = () if whole or merge else sides  # the lists the window passes over
    lg = math.ceil(math.log2(max(max(l_a, l_b) if whole else touched, 1)))
    stages = lg * (lg + 1) // 2
    # merge sort per list: (blocks, merge rounds, the block sorts' stages, the merge tiles' steps)
    msort = []
    for n, _ in sides if merge else ():
        k = math.ceil(n / w_net)
        r = math.ceil(math.log2(k)) if k > 1 else 0
        msort.append((k, r, k * stages, r * k * lg))
    floor = elem * (2 * V_S + V_T)
    stream = elem * (3 * V_S + V_T)
    if merge:  # written once; read and written by the block sorts and each round; read once where paired
        lists = sum(size * (n + 2 * n * (1 + r) + min(n, m)) for (n, size), (_, r, _, _) in zip(sides, msort))
    else:  # written once, read once or n_pass times; bin b1's keys copied and bisected
        lists = sum((2 if whole else 1 + n_pass) * size * n for n, size in sides)
        lists += sum((1 + SELECT_STEPS) * size * n_b1 for _, size in passed)
    bufs = sum(2 * size * touched for _, size in passed) + 2 * 8 * m  # the window's sort buffers and G
    stream_fb = elem * (5 * V_S + 3 * V_T)
    lists_fb = 5 * (8 + 4) * min(2 * m, cap) + 12 * min(2 * m, cap)
    l2 = lists + bufs + n_common * SECTOR + m * SECTOR  # S3's teacher gathers, the fix-up's student gathers
    l2_lo = l2 - n_common * SECTOR + (SECTOR * common_sectors(proj, pairs, uncovered, H._CONFIGS[0].kwargs["BLOCK_S"],
                                                              elem) if n_common else 0)
    # time per row and SM (s)
    l2_sm = gpu["l2_bw"] / gpu["sms"]
    lanes = max(w_net, SORT_THREADS) / 32 / ISSUE / CLOCK  # seconds per instruction per lane
    if merge:
        t_sort = sum(f * st + g * sm for f, g, (_, _, st, sm) in zip(SORT_INSTR, MERGE_INSTR, msort)) * lanes
    else:
        t_sort = (2 * SORT_INSTR[0] if small else sum(SORT_INSTR)) * stages * lanes
    block = H._CONFIGS[0].kwargs["BLOCK_L"]
    tiles_s, tiles_t = math.ceil(V_S / block), math.ceil(V_T / block)
    app_s, app_t = tiles_with(us_mask, block), tiles_with(ut_mask, block)  # the row passes' tiles that append
    iss = sfu = {k: None for k in ("S1", "T1", "S3")}
    if issue is not None:
        w, f = issue["warps"], issue["sfu"]
        iss = {"S1": issue_time(issue["S1"], w, tiles_s) - issue_time(issue["S1_skip"], w, tiles_s - app_s),
               "T1": issue_time(issue["T1"], w, tiles_t) - issue_time(issue["T1_skip"], w, tiles_t - app_t),
               "S3": issue_time(issue["S3"], w, tiles_s)}
        sfu = {"S1": sfu_time(f["S1"], w, tiles_s), "T1": sfu_time(f["T1"], w, tiles_t),
               "S3": sfu_time(f["S3"], w, tiles_s)}
    passes, t_streams, t_sfu = _pass_times({k: (elem * n, iss[k], sfu[k]) for k, n in
                                            (("S1", V_S), ("T1", V_T), ("S3", 2 * V_S))}, gpu)
    t_s1, t_t1, t_s3 = (max(a, b or 0.0, c or 0.0) for a, b, c in passes.values())
    t_lists = 0.0  # the list passes' instruction issue (tiles of BLOCK_L keys)
    if issue is not None:
        t_lists = sum(issue_time(L["hist"] + L["b1"] + L["gather"], issue["warps"], math.ceil(n / block))
                      + issue_time(SELECT_STEPS * L["select"], issue["warps"], math.ceil(n_b1 / block))
                      for (n, _), L in zip(passed, (issue["L"]["a"], issue["L"]["b"])))
    t_win = max(lists / l2_sm, t_lists) + bufs / l2_sm + t_sort
    t_row = t_streams + t_win
    # a miss on a side the hint serves (its uncommon set not listed whole): _rescue reads its row twice more, from
    # L2 (a count at 8 bins, then the append), or, where none of them holds the top m within the list
    # (1 − RESCUE_RATE), its count and then _compact's two passes (the level-1 histogram, the compaction), which
    # every miss took before _rescue (and takes where m is above the network: MERGE leaves _rescue out); each pass
    # bound by its issue
    t_miss = {}
    for side, n_u, tiles, n in (("a", u_s, tiles_s, V_S), ("b", u_t, tiles_t, V_T)):
        if n_u > fit and issue is not None:
            M, w, row = issue["miss"][side], issue["warps"], elem * n / l2_sm
            count = max(issue_time(M["count"], w, tiles), row)
            exact = max(issue_time(M["hist"] + M["gather"], w, tiles), 2 * row)
            t_miss[side] = dict(rescued=count + max(issue_time(M["append"], w, tiles), row),
                                exact=exact if merge else count + exact, before=exact)
    hit, rescue = HIT_RATE[m >= 2048], 0.0 if merge else RESCUE_RATE[m >= 2048]  # MERGE leaves _rescue out
    t_expect = t_row + (1 - hit) * sum(rescue * t["rescued"] + (1 - rescue) * t["exact"] for t in t_miss.values())
    t_before = t_row + (1 - hit) * sum(t["before"] for t in t_miss.values())
    live = ((1 + merge) * (8 * l_a * (t_s1 / 2 + t_t1 + t_win) + 4 * l_b * (t_t1 / 2 + t_win))
            + sum(size * touched for _, size in passed) * t_win
            + 8 * m * (t_win / 2 + t_s3) + elem * V_T * (t_t1 / 2 + t_win + t_s3)) / t_row + SCRATCH_FIXED
    shared = 4 * V_S + 5 * V_T  # smap, tmap, teacher classes
    chains = {}
    sorts = sum(st + sm for _, _, st, sm in msort) if merge else (1 if small else 2) * stages
    for cfg in H._CONFIGS:
        b = cfg.kwargs["BLOCK_L"]
        chains[b] = (sum(n_pass * math.ceil(n / b) + SELECT_STEPS * math.ceil(n_b1 / b) for n, _ in passed) + sorts,
                     math.ceil(V_S / b) + math.ceil(V_T / b))
    if merge:
        how = "both lists merge-sorted: " + " and ".join(
            f"{k} blocks x {stages} + {r} rounds x {k} tiles x {lg} stages" for k, r, _, _ in msort)
    else:
        how = ("both lists sorted whole" if whole else f"{n_pass} + {SELECT_STEPS} passes per list") + \
            f" + {1 if small else 2} x {stages} sort stages"
    loops = {"S1/S3 (student passes)": math.ceil(V_S / block), "T1 (teacher pass)": math.ceil(V_T / block),
             f"window ({how})": chains[block][0]}
    gathers = SECTOR * (n_common + 2 * m)  # spilled: S3's teacher gathers, the fix-up's student gathers and stores
    return dict(kernel=loss, floor=floor, hbm_l2=stream, hbm_spill=stream + lists + bufs + gathers, l2=l2, l2_lo=l2_lo,
                loops=loops, vocab_tiles=chains[block][1], chains=chains, old_loop=None,
                hbm_l2_fallback=stream_fb, hbm_spill_fallback=stream_fb + lists_fb + bufs + gathers,
                footprint=min(rows, gpu["sms"]) * live + shared, t_row=t_row, t_sfu=t_sfu, t_window=t_win,
                t_miss=t_miss, hit=hit, rescue=rescue, t_expect=t_expect, t_before=t_before,
                t_sort=t_sort,
                t_lists=t_lists,
                passes=passes, issue=issue,
                stats=dict(nnz=n_common, max_col=0, m=m, u_s=u_s, u_t=u_t, l_a=l_a, l_b=l_b, w_net=w_net,
                           uncovered=uncovered, app=(app_s, app_t), tiles=(tiles_s, tiles_t)))


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def _l2_range(m: dict) -> str:
    return _fmt_bytes(m["l2"]) if m["l2_lo"] == m["l2"] else f"{m['l2_lo'] / 2**20:.2f}–{_fmt_bytes(m['l2'])}"


def _time_line(m: dict, rows: int, gpu: dict) -> str:
    """Time per row and SM, pass by pass (stream vs instruction issue vs SFU), the total against the floor time, and
    the SFU's bound (the streaming passes, each the longer of its stream and its SFU time; H-KL's window, which has no
    MUFU, left out)."""
    us = 1e6
    parts = []
    for k, (a, b, c) in m["passes"].items():
        t = {"stream": a, "issue": b or 0.0, "SFU": c or 0.0}
        parts.append(f"{k} {max(t.values()) * us:.1f}" + (
            f" ({max(t, key=t.get)}; " + ", ".join(f"{n} {v * us:.1f}" for n, v in t.items()) + ")"
            if b is not None else ""))
    if "t_window" in m:
        parts.append(f"window {m['t_window'] * us:.1f} (sorts {m['t_sort'] * us:.1f}, list passes' issue "
                     f"{m['t_lists'] * us:.1f}) after the streams, "
                     "not overlapped")
    t_model = rows / gpu["sms"] * m["t_row"]
    how = ("instruction issue and SFU time from the sm_90 SASS" if m["issue"]
           else "bytes only: instruction issue NOT modelled")
    floor = rows * m["floor"] / gpu["hbm"]
    bound = (f"; the SFU's bound (the streaming passes back to back, each the longer of its stream and its SFU "
             f"time): "
             f"{rows / gpu['sms'] * m['t_sfu'] / floor:.2f}x" if m["issue"] else "")
    return (f"time per row and SM in us ({how}): " + ", ".join(parts) + f"; at {rows:,} rows {t_model * 1e3:.2f} ms "
            f"({t_model / floor:.2f}x the floor time), working set in L2" + bound)


def report(models: list[tuple[str, dict]], gpu: dict = GPU, rows: int = 8192) -> None:
    print(f"Cost model (no GPU needed), {rows:,} rows, bf16 logits, per 1-to-1 chunk; {gpu['name']}: "
          f"{gpu['hbm'] / 1e12:.2f} TB/s HBM, {gpu['l2'] >> 20} MiB L2; config {CONFIG}")
    head = ("kernel", "W", "floor/row", "HBM/row (working set in L2)", "x floor", "HBM/row (spilled)", "x floor",
            "L2<->SM/row", "longest loop", "vocab tiles", "old loop")
    print(" | ".join(head))
    for wname, m in models:
        loop_name, loop = max(m["loops"].items(), key=lambda kv: kv[1])
        print(" | ".join((m["kernel"], wname, _fmt_bytes(m["floor"]), _fmt_bytes(m["hbm_l2"]),
                          f"{m['hbm_l2'] / m['floor']:.2f}x", _fmt_bytes(m["hbm_spill"]),
                          f"{m['hbm_spill'] / m['floor']:.2f}x", _l2_range(m), f"{loop} ({loop_name})",
                          str(m["vocab_tiles"]), str(m["old_loop"] or "-"))))
        st = m["stats"]
        spare = (gpu["l2"] - m["footprint"]) / 2**20
        fits = f"fits ({spare:.1f} MiB to spare)" if spare >= 0 else "does NOT fit"
        if m["kernel"] == "P-KL":
            what = (f"W: nnz {st['nnz']:,}, longest column {st['max_col']}; D runs "
                    f"{' / '.join(map(str, st['d_tiles']))} ELL slots on "
                    f"{' / '.join(str(n) for n in st['d_tiles'].values())} of "
                    f"{m['loops']['D (gradient)']} student tiles (its slice's widest id)")
        else:
            what = (f"uncovered={st['uncovered']!r}: common pairs {st['nnz']:,}, |U_S| {st['u_s']:,}, |U_T| "
                    f"{st['u_t']:,} (in {st['app'][0]} / {st['app'][1]} of {st['tiles'][0]} / {st['tiles'][1]} "
                    f"tiles: the others skip the append), m = {st['m']:,}; lists {st['l_a']:,} / {st['l_b']:,} "
                    f"keys, sort network {st['w_net']:,} lanes")
            print("    longest chain vs vocab tiles per config: " + ", ".join(
                f"{b} lanes {c} vs {t} ({'met' if c <= t else 'NOT met'})" for b, (c, t) in m["chains"].items()))
        print("    " + _time_line(m, rows, gpu))
        if "hbm_l2_fallback" in m:
            print(f"    a miss of the single-pass compaction on both sides (S2 / T2 read the rows twice): "
                  f"{_fmt_bytes(m['hbm_l2_fallback'])} ({m['hbm_l2_fallback'] / m['floor']:.2f}x), spilled "
                  f"{_fmt_bytes(m['hbm_spill_fallback'])} ({m['hbm_spill_fallback'] / m['floor']:.2f}x)")
        t_floor = rows * m["floor"] / gpu["hbm"]
        if m.get("t_miss"):
            t_exp, t_bef = (rows / gpu["sms"] * m[k] for k in ("t_expect", "t_before"))
            print("    a miss on a side the hint serves (ops.hkl_kernel._rescue's count and append; where no bin holds "
                  "the top m, the count and the row's level-1 histogram and compaction), per row and SM: " + ", ".join(
                      f"{'student' if k == 'a' else 'teacher'} +{v['rescued'] * 1e6:.1f} us rescued, "
                      f"+{v['exact'] * 1e6:.1f} us not (+{v['before'] * 1e6:.1f} us before the rescue)"
                      for k, v in m["t_miss"].items())
                  + f"; at the hint's hit rate on real logits ({m['hit']:.2f}, scripts/hint_paths.py) and the "
                  f"rescue's ({m['rescue']:.2f}) {t_exp * 1e3:.2f} ms ({t_exp / t_floor:.2f}x the floor time; "
                  f"{t_bef / t_floor:.2f}x without the rescue)")
        if "footprint_alone" in m:
            alone = "fits" if m["footprint_alone"] <= gpu["l2"] else "does NOT fit"
            what += (f"; {m['slices']} D slices per chunk (without helping, each owner computing its own: "
                     f"{_fmt_bytes(m['footprint_alone'])}, {alone})")
        print(f"    {what}; working set "
              f"{_fmt_bytes(m['footprint'])} {fits} in L2; floor time at {rows:,} rows "
              f"{rows * m['floor'] / gpu['hbm'] * 1e3:.2f} ms, model {rows * m['hbm_l2'] / gpu['hbm'] * 1e3:.2f}"
              f"–{rows * m['hbm_spill'] / gpu['hbm'] * 1e3:.2f} ms")
        t_lo, t_hi = rows * m["l2_lo"] / gpu["l2_bw"], rows * m["l2"] / gpu["l2_bw"]
        if "l2_parts" in m:
            print("    L2<->SM per row: " + ", ".join(
                f"{k} {v[0] / 2**20:.2f}–{_fmt_bytes(v[1])}" if isinstance(v, tuple) else f"{k} {_fmt_bytes(v)}"
                for k, v in m["l2_parts"].items()))
        print(f"    L2<->SM traffic at an assumed {gpu['l2_bw'] / 1e12:.1f} TB/s: "
              f"{t_lo * 1e3:.2f}–{t_hi * 1e3:.2f} ms ({t_lo / t_floor:.1f}–{t_hi / t_floor:.1f}x the floor time)")
        if m["kernel"] == "P-KL":
            t_w, t_w1 = (max(rows * m[k] / L2_WARP, rows / gpu["sms"] * m[t]) for k, t in (("l2_warp", "t_row"),
                                                                                          ("l2_warp1", "t_row1")))
            print(f"    per warp instruction (the gathers' distinct sectors in Triton's layout, {SPT['C']} elements a "
                  f"thread): {_fmt_bytes(m['l2_warp'])}/row; with one element a thread in C's and D's gathers "
                  f"{_fmt_bytes(m['l2_warp1'])}")
            print(f"    calibrated (that count at the {L2_WARP / 1e12:.1f} TB/s the kernel moved it at on a GPU, or the"
                  f" time above where longer): {t_w * 1e3:.2f} ms ({t_w / t_floor:.1f}x the floor time); one element a "
                  f"thread (the LANE1 config; the time above at its instruction counts "
                  f"{rows / gpu['sms'] * m['t_row1'] * 1e3:.2f} ms): "
                  f"{t_w1 * 1e3:.2f} ms ({t_w1 / t_floor:.1f}x)")


def _real_w(quick: bool):
    from xtoken_ext.projection import Projection
    from xtoken_ext.testing import offline_tokenizer

    if quick:
        return "gpt2 x mistral-spm", Projection.from_tokenizers(offline_tokenizer("gpt2"),
                                                                 offline_tokenizer("mistral-spm"), progress=False)
    return "Llama-3 x Qwen3", Projection.from_tokenizers(offline_tokenizer("llama3"), offline_tokenizer("qwen3"),
                                                          128_256, 151_936, progress=False)


def run(quick: bool = False) -> None:
    from xtoken_ext.projection import Projection

    name, real = _real_w(quick)
    rand = Projection.random(real.student_vocab_size, real.teacher_vocab_size, seed=0, empty_rows=0.01)
    iss = issue_counts() or {}
    p, h = iss.get("P-KL"), iss.get("H-KL")
    if iss:
        print(f"instructions per thread per tile (sm_90 SASS, bench/sass.py; P-KL {p['warps']} warps, H-KL "
              f"{h['warps']}): P-KL A {p['A']}, C {' / '.join(str(v) for v in p['C'].values())} (column ELL of "
              f"{' / '.join(p['C'])} slots), R {' / '.join(str(v) for v in p['R'].values())} "
              f"({' / '.join(p['R'])}-entry pieces), D {' / '.join(str(v) for v in p['D'].values())} (ELL "
              f"slots {' / '.join(p['D'])}); LANE1 (C's and D's gathers one element a thread) C "
              f"{' / '.join(str(v) for v in p['LANE1']['C'].values())}, D "
              f"{' / '.join(str(v) for v in p['LANE1']['D'].values())}; H-KL S1 {h['S1']}, T1 {h['T1']} "
              f"({h['S1_skip']} / {h['T1_skip']} of "
              f"them the append, skipped in a tile without an uncommon id), S3 {h['S3']}")
    report([("Projection.random", pkl_model(rand, 8192, issue=p)), (name, pkl_model(real, 8192, issue=p)),
            ("Projection.random", hkl_model(rand, 8192, issue=h)), (name, hkl_model(real, 8192, issue=h)),
            (name, hkl_model(real, 8192, uncovered="epsilon", issue=h)),
            (name, hkl_model(real, 8192, loss="GOLD", issue=h)),
            (name, hkl_model(real, 8192, loss="ULD", topk=None, issue=h))])
