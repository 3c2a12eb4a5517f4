"""Probe of the permutation the fused P-KL kernel does twice per row (issue 8): stage 5 of the GPU check
(``python -m xtoken_ext.bench.gpu --stage probe``).

P-KL's C gathers, per teacher column c, the student probability at W's student s(c); its D gathers, per student s, the
teacher-side h at W's column c(s). Both are a fixed, nearly one-to-one permutation between the two vocabularies of every
row, done by lanes that each load one 2- or 4-byte value. bench/costmodel.py counts what they move per warp instruction
(warp_sectors: the distinct 32-byte sectors of its 32 lanes, in the kernel's layout of 8 adjacent elements a thread);
that count put the P-KL kernel times of the second GPU session's run A on both W's at one rate (4.92 and 5.05 TB/s). The
probe times the access pattern alone, against the same rows streamed, with the lanes on adjacent ids, and against a
two-stage permutation that moves the values in runs: each against the count. Each kernel computes, per row r,

    out[r] = Σ_i [m_i ≥ 0] x[r, m_i] · y[r, i]

for a map m from y's index to x's: "C", x = z, y = t, m_c = the first (lowest) student of teacher column c; "D", x = t,
y = z, m_s = the first column of student s; over the timing stage's bf16 rows (those both sides have), for the real
Llama-3 × Qwen3 W and ``Projection.random``:
- ``stream``: Σ x[r] + Σ y[r]: both rows read once, coalesced: what a row must take;
- ``lane gather``: per tile of BLOCK indices i: m's tile, x gathered at m (a lane per value), y's tile (P-KL's C1),
  in Triton's layout for the loop (8 adjacent elements a thread: an instruction's lanes 8 ids apart);
- ``lane gather 1/thread``: the same with the tile's offsets declared non-contiguous (tl.max_contiguous): one element
  a thread, an instruction's lanes on 32 adjacent ids, the streamed loads unvectorized;
- ``two-stage``: the pairs (i, m_i), once per W sorted by m in tiles of BLOCK/2 pairs and given a place in a
  per-program scratch row ordered by (y-tile of i, pair tile, i). Stage 1 per pair tile, one element a thread: x
  loaded at the sorted m (nearly contiguous), reordered in registers (tl.gather, through shared memory) so that
  adjacent lanes store adjacent places: runs of the pairs that share a y-tile. Stage 2 per y-tile: its run of the
  scratch row (≤ BLOCK values, contiguous), reordered in registers to the order of i, times y's tile. Per pair it
  reads x at sorted places, stores and loads 2 bytes of scratch and reads 12 bytes of index (sorted m and place 4
  each, in-tile order and i's place 2 each), all in runs; the lane gather reads 4 bytes of index and gathers x.
If the times follow the count (``lane gather 1/thread`` faster than ``lane gather`` by the count's ratio on the real
W, equal on Projection.random), P-KL's gathers are to be laid out one element a thread; if ``two-stage`` comes close
to ``stream``, C and D are to be rebuilt on it. Every output is checked against float64 (bound: fp32 sums of
ceil(N/BLOCK) additions per lane, then a tree of log2(BLOCK) levels).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xtoken_ext.ops._common import cached_on_tensors, interpret

from .costmodel import warp_sectors

BLOCK_GPU, BLOCK_INTERP = 2048, 64
WARPS = 8
EF = tl.constexpr("evict_first")  # rows read once (and the scratch run, dead after stage 2), as ops.pkl_kernel's


@triton.jit
def _stream(x_ptr, y_ptr, out_ptr, R, N_x, N_y, stride_x, stride_y, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    for r in range(tl.program_id(0).to(tl.int64), R, tl.num_programs(0)):
        x_row, y_row = x_ptr + r * stride_x, y_ptr + r * stride_y
        acc = tl.zeros([BLOCK], tl.float32)
        for k in range(0, N_x, BLOCK):
            acc += tl.load(x_row + k + o, mask=k + o < N_x, other=0.0, eviction_policy=EF).to(tl.float32)
        for k in range(0, N_y, BLOCK):
            acc += tl.load(y_row + k + o, mask=k + o < N_y, other=0.0, eviction_policy=EF).to(tl.float32)
        tl.store(out_ptr + r, tl.sum(acc))


@triton.jit
def _lane_gather(x_ptr, y_ptr, map_ptr, out_ptr, R, N_y, stride_x, stride_y, BLOCK: tl.constexpr, ONE: tl.constexpr):
    o = tl.arange(0, BLOCK)
    if ONE:  # offsets declared non-contiguous: every access of the tile one element per thread (Triton's layout
        o = tl.max_contiguous(o, 1)  # for the loop), so that a gather instruction's 32 lanes take 32 adjacent i
    for r in range(tl.program_id(0).to(tl.int64), R, tl.num_programs(0)):
        x_row, y_row = x_ptr + r * stride_x, y_ptr + r * stride_y
        acc = tl.zeros([BLOCK], tl.float32)
        for k in range(0, N_y, BLOCK):
            m = tl.load(map_ptr + k + o, mask=k + o < N_y, other=-1)
            v = tl.load(x_row + m, mask=m >= 0, other=0.0).to(tl.float32)  # the gather
            acc += v * tl.load(y_row + k + o, mask=k + o < N_y, other=0.0, eviction_policy=EF).to(tl.float32)
        tl.store(out_ptr + r, tl.sum(acc))


@triton.jit
def _two_stage(x_ptr, y_ptr, src_ptr, perm_ptr, dst_ptr, start_ptr, loc_ptr, scr_ptr, out_ptr, R, N_y, NL, NP,
               stride_x, stride_y, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    # stage 1 one element per thread (an instruction's lanes take 32 adjacent pairs): offsets declared
    # non-contiguous; its tiles are half as long, so that Triton gives stage 2's (vectorized) tiles a layout of their
    # own (it unifies the memory accesses of one shape that share a range)
    o1 = tl.max_contiguous(tl.arange(0, BLOCK // 2), 1)
    scr = scr_ptr + tl.program_id(0).to(tl.int64) * NP  # this program's scratch row (NP: a multiple of 16)
    for r in range(tl.program_id(0).to(tl.int64), R, tl.num_programs(0)):
        x_row, y_row = x_ptr + r * stride_x, y_ptr + r * stride_y
        for k in range(0, NL, BLOCK // 2):  # stage 1: the pairs in m order, stored in runs of the scratch order
            s = tl.load(src_ptr + k + o1)  # ascending; -1 past the last pair
            v = tl.load(x_row + s, mask=s >= 0, other=0.0)
            d = tl.load(dst_ptr + k + o1)
            tl.store(scr + d, tl.gather(v, tl.load(perm_ptr + k + o1).to(tl.int32), 0), mask=d >= 0)
        tl.debug_barrier()  # the scratch row's stores seen by every thread of the program
        acc = tl.zeros([BLOCK], tl.float32)
        for k in range(0, N_y, BLOCK):  # stage 2: a y-tile's run, in i's order
            # the run starts at a multiple of 8 and the row holds BLOCK more: an unmasked 16-byte-vector load (the
            # lanes past the run, never gathered below, read whatever the row holds)
            run = tl.load(scr + tl.multiple_of(tl.load(start_ptr + k // BLOCK), 8) + o, eviction_policy=EF)
            loc = tl.load(loc_ptr + k + o, mask=k + o < N_y, other=-1)
            v = tl.gather(run, tl.maximum(loc, 0).to(tl.int32), 0).to(tl.float32)
            x = tl.load(y_row + k + o, mask=k + o < N_y, other=0.0, eviction_policy=EF).to(tl.float32)
            acc += tl.where(loc >= 0, v * x, 0.0)
        tl.store(out_ptr + r, tl.sum(acc))
        tl.debug_barrier()  # every read of the scratch row done before the next row's stage 1


def block() -> int:
    return BLOCK_INTERP if interpret() else BLOCK_GPU


def maps(proj) -> dict[str, torch.Tensor]:
    """{"C": per teacher column its first (lowest) student with a W entry, "D": per student its first (lowest) teacher
    column; -1 where none} (int32, on W's device)."""
    idx = proj.indices.long()
    V_S, V_T = idx.shape[0], proj.teacher_vocab_size
    ok = idx >= 0
    s = torch.arange(V_S, device=idx.device).unsqueeze(1).expand_as(idx)[ok]
    first_s = torch.full((V_T,), V_S, device=idx.device).scatter_reduce(0, idx[ok], s, "amin")
    first_c = torch.where(ok, idx, V_T).amin(1)
    return {"C": torch.where(first_s < V_S, first_s, -1).int(), "D": torch.where(first_c < V_T, first_c, -1).int()}


@cached_on_tensors(1)
def layout(m: torch.Tensor, blk: int) -> dict[str, torch.Tensor | int]:
    """The two-stage permutation's index arrays for the map m (y index -> x index or -1), y-tiles of ``blk`` and pair
    tiles of blk / 2: src (the pairs' x index ascending, padded with -1 to whole tiles: NL lanes), perm and dst (per
    pair tile, lane k stores the value of the tile's perm[k]-th pair at scratch place dst[k], ascending in the tile;
    -1: none), start (per y-tile, where its run begins in the scratch row, runs padded to multiples of 8 values), loc
    (per y index, its pair's place in its y-tile's run; -1: none), NP (the scratch row's length: a multiple of 16,
    blk past the last run's start). Int32, perm and loc int16."""
    assert blk <= 1 << 15  # perm and loc as int16
    dev = m.device
    m = m.long().cpu()
    i = torch.nonzero(m >= 0).squeeze(1)
    s, order = torch.sort(m[i], stable=True)
    i = i[order]
    n, half = i.numel(), blk // 2
    n_tiles = max(1, math.ceil(n / half))
    tile, cb = torch.arange(n) // half, i // blk
    key = (cb * n_tiles + tile) * blk + i % blk  # the scratch order: (y-tile, pair tile, i)
    place = torch.empty(n, dtype=torch.long)
    place[torch.argsort(key)] = torch.arange(n)
    count = torch.bincount(cb, minlength=math.ceil(m.numel() / blk))
    first = torch.cumsum(count, 0) - count  # each y-tile's first place, unpadded
    start = torch.cumsum(torch.cat([count.new_zeros(1), (count + 7) // 8 * 8]), 0)  # runs padded to 8 values
    place = place - first[cb] + start[cb]
    lanes = n_tiles * half
    src = torch.full((lanes,), -1, dtype=torch.long)
    src[:n] = s
    by_place = torch.argsort(tile * (int(start[-1]) + 1) + place)  # within each pair tile, its pairs by place
    perm = torch.arange(lanes) % half
    perm[:n] = by_place - tile * half
    dst = torch.full((lanes,), -1, dtype=torch.long)
    dst[:n] = place[by_place]
    loc = torch.full_like(m, -1)
    loc[i] = place - start[cb]
    out = dict(src=src.int(), perm=perm.short(), dst=dst.int(), start=start.int(), loc=loc.short())  # 12 B a pair
    row = (int(start[-1]) + blk + 15) // 16 * 16  # the last run's load of blk values stays in the row
    return {**{k: v.to(dev) for k, v in out.items()}, "NL": lanes, "NP": row}


def reference(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, rows: int = 256
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i [m_i ≥ 0] x[r, m_i] y[r, i] in float64, the rows' Σ |terms|), ``rows`` rows at a time."""
    out = []
    for r in range(0, x.shape[0], rows):
        terms = x[r:r + rows].double()[:, m.long().clamp(min=0)] * y[r:r + rows].double() * (m >= 0)
        out.append((terms.sum(1), terms.abs().sum(1)))
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def run_probe(kind: str, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, per_sm: int = 1) -> torch.Tensor:
    """One probe kernel ("stream", "lane gather", "two-stage") in ``per_sm`` persistent programs per SM (the CPU: 1
    SM) over the rows of x [R, N_x] and y [R, N_y] -> out [R] fp32."""
    R, blk = x.shape[0], block()
    assert y.shape[0] == R and m.numel() == y.shape[1], "x, y: the same rows; m: one entry per column of y"
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    out = torch.empty(R, dtype=torch.float32, device=x.device)
    grid = (max(1, min(R, per_sm * sms)),)
    meta = dict(BLOCK=blk) if interpret() else dict(BLOCK=blk, num_warps=WARPS)
    if kind == "stream":
        _stream[grid](x, y, out, R, x.shape[1], y.shape[1], x.stride(0), y.stride(0), **meta)
    elif kind.startswith("lane gather"):
        _lane_gather[grid](x, y, m, out, R, y.shape[1], x.stride(0), y.stride(0), ONE=kind.endswith("1/thread"),
                           **meta)
    else:
        lay = layout(m, blk)
        scratch = torch.empty(grid[0], lay["NP"], dtype=x.dtype, device=x.device)
        _two_stage[grid](x, y, lay["src"], lay["perm"], lay["dst"], lay["start"], lay["loc"], scratch, out, R,
                         y.shape[1], lay["NL"], lay["NP"], x.stride(0), y.stride(0), **meta)
    return out


# (kernel, programs per SM): the stream at the most resident warps (8-warp programs, ≤ 64 registers: 4 per SM), the
# others also at the fused P-KL kernel's one program per SM; the two-stage's scratch rows (2 bytes per pair and a
# tile) are live in L2 per program: 30-35 MB for the real W at one program per SM on 132 SMs, 4x that at 4
KINDS = (("stream", 4), ("lane gather", 1), ("lane gather", 4), ("lane gather 1/thread", 1),
         ("lane gather 1/thread", 4), ("two-stage", 1), ("two-stage", 2), ("two-stage", 4))


def sectors(kind: str, m: torch.Tensor, n_x: int) -> float:
    """The cost model (no GPU): 32-byte sectors a kernel moves between L2 and the SM per row, per pair. A warp
    instruction moves the distinct sectors its 32 lanes touch: contiguous arrays cost their bytes / 32 (the streams
    of x and y, the map, the two-stage's index arrays and stage 2's loads of BLOCK scratch values, 16-byte vectors
    from a multiple of 8); a gather or a scatter is counted instruction by instruction (costmodel.warp_sectors) in
    Triton's layout for its loop (sm_90 TTGIR): BLOCK / (32 WARPS) = 8 adjacent elements per thread for the lane
    gather, so that an instruction's lanes lie 8 elements apart; one per thread (32 adjacent elements per
    instruction) for the lane gather "1/thread" and the two-stage's stage 1 (tl.max_contiguous)."""
    per = BLOCK_GPU // (32 * WARPS)

    def count(addr: torch.Tensor, spt: int) -> int:  # element indices in lane order, -1: masked off
        return int(warp_sectors(addr, spt, 2).sum())

    n_y, pairs = m.numel(), max(1, int((m >= 0).sum()))
    if kind == "stream":
        total = 2 * (n_x + n_y) / 32
    elif kind.startswith("lane gather"):  # m (4 B) and y (2 B) streamed, x gathered
        total = 6 * n_y / 32 + count(m.long(), 1 if kind.endswith("1/thread") else per)
    else:  # stage 1: src, dst (4 B), perm (2 B) per lane, x at src, the scratch stores; stage 2: loc (2 B), y (2 B)
        lay = layout(m, BLOCK_GPU)  # and per y-tile BLOCK values of the scratch row (on a GPU run_probe's layout)
        total = (10 * lay["NL"] / 32 + count(lay["src"].long(), 1) + count(lay["dst"].long(), 1)
                 + (4 * n_y + 2 * (lay["start"].numel() - 1) * BLOCK_GPU) / 32)
    return total / pairs


def exact_sums(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> dict[bool, tuple]:
    """{stream: (float64 rows, Σ|terms|, terms per row)}: the stream kernel's Σ x[r] + Σ y[r] (True) and the
    permutation's Σ_i x[r, m_i] y[r, i] (False, ``reference``), each computed once for all the kernels."""
    return {True: (x.sum(1, dtype=torch.float64) + y.sum(1, dtype=torch.float64),
                   x.abs().sum(1, dtype=torch.float64) + y.abs().sum(1, dtype=torch.float64), x.shape[1] + y.shape[1]),
            False: (*reference(x, y, m), y.shape[1])}


def error_ratio(out: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor, n: int) -> float:
    """Worst |out - float64| / bound over the rows, the bound (k + 1) u Σ|terms| for fp32 sums of k = ceil(n/BLOCK)
    + log2(BLOCK) additions (each lane's running sum, then the tree), u = 2^-24; bf16 products are exact in fp32."""
    k = math.ceil(n / block()) + math.log2(block())
    return float(((out.double() - exact).abs() / ((k + 1) * 2.0**-24 * mag + 1e-30)).max())


def probe(dev: torch.device, runs: int = 10, shape=None, real: bool = True, random: bool = True) -> bool:
    """Stage 5: each probe kernel in both directions for each W (the real one where it loads, Projection.random
    unless ``random`` is False), its rows checked against float64 and (on CUDA) timed: median of ``runs`` after a
    warm-up (triton.testing.do_bench). -> False when a kernel disagrees or no W is there."""
    from . import gpu
    from .losses import GPU_SHAPE, _inputs

    shape = shape or GPU_SHAPE
    z, t, _, proj = _inputs(shape, torch.bfloat16, dev)
    n = min(z.shape[1], t.shape[1])  # student and teacher rows differ in number (the chunks of bench.losses)
    z, t = z.detach()[0, :n], t.detach()[0, :n]
    projections = [("random W", proj)] if random else []
    loaded = gpu._real_projection(dev) if real else None
    if loaded:
        projections.append(("real W", loaded[0]))
    if not projections:
        return False
    cuda = dev.type == "cuda"
    head = (f"{'W':<10}{'map':<5}{'pairs':>9}{'kernel':>22}{'per SM':>7}{'sectors':>9}{'ms':>9}{'x stream':>10}"
            f"{'GB/s':>8}{'vs float64':>13}")
    print(f"probe: the permutation of P-KL's C (student -> teacher column, x = z, y = t) and D (teacher -> student, "
          f"x = t, y = z) alone, {z.shape[0]:,} rows, BLOCK {block()}, {WARPS} warps (per SM: persistent programs); "
          f"sectors: L2<->SM sectors per row and pair (the cost model, ``sectors``); GB/s: the "
          f"rows' bytes (x and y read once) per second; vs float64: worst error / bound\n{head}\n{'-' * len(head)}",
          flush=True)
    ok = True
    for wname, pr in projections:
        for name, m in maps(pr).items():
            x, y = (z, t) if name == "C" else (t, z)
            moved = x.numel() * x.element_size() + y.numel() * y.element_size()
            base, model = None, {k: sectors(k, m, x.shape[1]) for k in dict.fromkeys(k for k, _ in KINDS)}
            exact = exact_sums(x, y, m)
            for kind, per_sm in KINDS:
                out = run_probe(kind, x, y, m, per_sm)
                ratio = error_ratio(out, *exact[kind == "stream"])
                ok &= ratio <= 1
                ms = (triton.testing.do_bench(lambda: run_probe(kind, x, y, m, per_sm), rep=runs * 20) if cuda
                      else math.nan)
                base = ms if kind == "stream" else base
                print(f"{wname:<10}{name:<5}{int((m >= 0).sum()):>9,}{kind:>22}{per_sm:>7}{model[kind]:>9.3f}"
                      f"{ms:>9.2f}{ms / base:>9.2f}x{moved / ms / 1e6:>8.0f}{ratio:>8.3f} "
                      f"{'PASS' if ratio <= 1 else 'FAIL'}", flush=True)
    return ok
