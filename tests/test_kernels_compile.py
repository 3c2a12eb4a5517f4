"""The Triton kernels compile for the GPU path (sm_90, no GPU needed): Triton's own compiler down to a cubin with
the ptxas shipped in the triton wheel, for every constexpr variant and autotune config, with the 16-divisibility
hints Triton's launcher gives real shapes. Checks what the interpreter cannot: the kernel lowers at all, no
register spill inside P-KL's per-tile passes (read from the SASS; at most 64 B per chunk outside them), H-KL's
register-heavy configs within a spill bound, shared memory within sm_90's per-block limit, and the streamed rows are
read with vectorized (v4) loads.

Runs in a subprocess: the test session may run Triton under TRITON_INTERPRET=1, which replaces compilation."""
from __future__ import annotations

import triton  # the test extra pins it

from helpers import compiled_json
from xtoken_ext.bench.costmodel import SPT
from xtoken_ext.ops.pkl_kernel import _CONFIGS

_SCRIPT = r"""
import concurrent.futures, itertools, json, re, sys
from xtoken_ext.bench.sass import body, compile_sm90, cubin_loops, header_lines
from xtoken_ext.ops import pkl_kernel as P

# P-KL's per-tile passes: A (student LSE); C (teacher tiles: sparse or merged rows, single dense rows); D (gradient
# slices: merged rows, a single row); R (residual entry blocks, dense) or C1 (entry blocks, sparse); C3 (factors or
# rescaling); the owner's ⟨p_r, g⟩ (merged rows)
PASSES = ((P._row_stats, "for v0 in range"), (P._teacher_pass, "for t in range(0, tl.cdiv(C"),
          (P._single_pass, "for t in range(0, tl.cdiv(C"), (P._slice_rows, "for v0 in range(v_lo"),
          (P._slice_single, "for v0 in range("), (P._entries, "for i0 in range(0, n, N)"),
          (P._pkl_kernel, "for t0 in range(0, n_c2"),
          (P._pkl_kernel, "for t in range(0, n_c2)"), (P._pkl_kernel, "for v0 in range(0, V_S, BLOCK_S)"))


def compile_one(kernel, consts, num_warps, sparse, maxnreg=None):
    c, cubin, info = compile_sm90(kernel, consts, num_warps, sparse, lineinfo=True, maxnreg=maxnreg)
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    # 16-byte loads: direct (ld.global.v4) or the pipelined loops' asynchronous copies to shared memory
    v4 = len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4|cp\.async\.c[ag]\.shared\.global[^;]*, 0x10", c.asm["ptx"]))
    loops = {k: [v[1] for v in vs] for k, vs in cubin_loops(cubin).items()}
    found = [body(loops, fn, marker) for fn, marker in PASSES] if kernel is P._pkl_kernel else []
    # H-KL: local-memory accesses in loops other than the persistent chunk loop (per tile, per sort stage)
    inner = sum(sum(v) for k, v in loops.items() if k not in header_lines(kernel, "for k in range(pid, K"))
    # elements per thread of each load's layout, by tile length and element type (bench.costmodel.SPT's source)
    ttgir = c.asm["ttgir"]
    blocked = dict(re.findall(r"^#(blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\]", ttgir, re.M))
    loads = [(n, t, b) for n, t, b in
             re.findall(r"tt\.load .*: tensor<([\dx]+?)x!tt\.ptr<(\w+)>, #(blocked\d*)>", ttgir) if b in blocked]
    spt = sorted({f"{n}x{t}:{blocked[b]}" for n, t, b in loads})
    # the 2-D loads' whole layouts (ops.pkl_kernel._gather's [N/32, 32] views)
    full = dict(re.findall(r"^#(blocked\d*) = #ttg\.blocked<\{(.*)\}>$", ttgir, re.M))
    views = sorted({full[b] for n, _, b in loads if "x" in n})
    return dict(smem=c.metadata.shared, regs=regs, spill=spill, v4=v4, pass_spills=sum(map(sum, found)), spt=spt,
                views=views,
                passes=[bool(b) for b in found], sfu_log=len(re.findall(r"lg2\.approx", c.asm["ptx"])),
                inner_local=inner, timer=c.asm["ptx"].count("%globaltimer"))


jobs = []  # (what the result row says, compile_one's arguments)
if sys.argv[1] == "pkl":
    for cfg in P._CONFIGS:
        for sparse, grad_w, mean in itertools.product((False, True), (False, True), (True, False)):
            consts = dict(MEAN=mean, CHAIN=not mean, SPARSE=sparse, GRAD_W=grad_w, HAS_SCALE=grad_w, SLOTS=4,
                          CSLOTS=1 + (sparse + 2 * grad_w + mean) % 4, RPIECE=(1, 2, 4)[(grad_w + mean + 1) % 3],
                          EPS=0 if mean else 1 + sparse, HELP=0, PROFILE=0,
                          **P.TILES_GPU, **P.SLICES_GPU, **cfg.kwargs)  # every column-ELL width and eps kind;
            # the dense frozen-W merge="mean" one (RPIECE 4) is one bench.sass also compiles: the Triton cache serves it
            jobs.append((dict(kernel="pkl", cfg=cfg.kwargs, warps=cfg.num_warps, sparse=sparse, grad_w=grad_w,
                              mean=mean, rpiece=consts["RPIECE"]),
                         (P._pkl_kernel, consts, cfg.num_warps, sparse, cfg.maxnreg)))
    # the phase-timed variant (ops._tl.PhaseTimes on a GPU): the last config's dense frozen-W merge="mean" one
    timed = dict(consts, MEAN=True, CHAIN=False, SPARSE=False, GRAD_W=False, HAS_SCALE=False, RPIECE=4, EPS=0,
                 PROFILE=1)
    jobs.append((dict(kernel="pkl", cfg=cfg.kwargs, warps=cfg.num_warps, sparse=False, grad_w=False, mean=True,
                      rpiece=4), (P._pkl_kernel, timed, cfg.num_warps, False, cfg.maxnreg)))
    jobs.append((dict(kernel="pkl_grad_w", cfg={}, warps=8, sparse=False, grad_w=True),
                 (P._pkl_grad_w_kernel, dict(MEAN=True, BLOCK=1024, SLOTS=4), 8, False)))
elif sys.argv[1] == "probe":  # bench.permute's kernels (the GPU check's probe stage)
    from xtoken_ext.bench import permute as Q
    for kernel, consts in ((Q._stream, {}), (Q._lane_gather, dict(ONE=False)), (Q._lane_gather, dict(ONE=True)),
                           (Q._two_stage, {})):
        jobs.append((dict(kernel=kernel.__name__, consts=consts),
                     (kernel, dict(BLOCK=Q.BLOCK_GPU, **consts), Q.WARPS, False)))
else:  # H-KL: its main variant at the 8,192-lane window (both sort networks), the same with the merge sort of m
    # above it (ULD), and the smallest window
    from xtoken_ext.ops import hkl_kernel as H
    for ci, W, mean, chain, sparse, merge in ((0, 8192, False, False, False, False),
                                               (0, 8192, False, False, False, True), (1, 16, False, True, True, False)):
        cfg = H._CONFIGS[ci]
        consts = dict(MEAN=mean, CHAIN=chain, SPARSE=sparse, W=W, W_SMALL=H.sort_widths(W)[1], MERGE=merge,
                      PROFILE=0, **cfg.kwargs)
        jobs.append((dict(kernel="hkl", cfg=cfg.kwargs, warps=cfg.num_warps, sparse=sparse, W=W, merge=merge),
                     (H._hkl_kernel, consts, cfg.num_warps, sparse)))
# two compiles at a time, in threads: Triton and ptxas release the GIL for most of a compile (2 cores in CI)
with concurrent.futures.ThreadPoolExecutor(2) as pool:
    out = [dict(row, **r) for (row, _), r in zip(jobs, pool.map(lambda job: compile_one(*job[1]), jobs))]
print(json.dumps(out))
"""


_SMEM_SM90 = 227 << 10  # the largest dynamic shared memory a block may opt in to on sm_90


def _compile(tmp_path, which):
    return compiled_json(tmp_path, _SCRIPT, which, timeout=600)


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    results = _compile(tmp_path, "pkl")
    assert len(results) == len(_CONFIGS) * 8 + 2
    # the phase-timed variant reads the global timer at its stamp and its 8 laps; the others never
    assert [r["timer"] for r in results] == [0] * len(_CONFIGS) * 8 + [9, 0]
    for r in results:
        # at 8 warps the kernel uses the whole register file (255): a few scalars live across the teacher loop
        # (A's results, the chunk's sums) may be spilled once per chunk, never an instruction in a per-tile pass
        assert r["pass_spills"] == 0 and r["spill"] <= 64, r
        if r["kernel"] == "pkl":  # the passes the variant has are found: C's merged-rows loop where sparse or
            # merged rows run (merge="mean"), D's where merged rows do; R (dense) or C1 (sparse) in every variant
            sparse, mean = r["sparse"], r["mean"]
            assert r["passes"][:6] == [True, sparse or mean, not sparse, mean, True, True], r
            assert r["sfu_log"] > 0, r  # C's ln(q + eps) on the SFU (ops._tl.fast_log), not a libm-style logf
        assert r["smem"] <= _SMEM_SM90, r  # the pipelined loops' buffers fit an H100 block's shared memory
        if r["kernel"] == "pkl" and not r["sparse"]:
            assert r["v4"] > 0, r  # dense rows streamed with 16-byte loads
            # the layouts the cost model counts the gathers in (bench.costmodel.SPT): C's z and D's h tiles, R's blocks;
            # LANE1: C's and D's gathers in [64, 32] views one element a thread (ops.pkl_kernel._gather), the 1-D
            # tiles (the streams) as before
            kinds = ("2048xbf16", "2048xf32", "4096xbf16", "64x32xbf16", "64x32xf32")
            tiles = {k: {x for x in r["spt"] if x.startswith(k + ":")} for k in kinds}
            lane1 = r["cfg"]["LANE1"]
            assert tiles == {"2048xbf16": {f"2048xbf16:{SPT['C']}"}, "2048xf32": {f"2048xf32:{SPT['D']}"},
                             "4096xbf16": {f"4096xbf16:{SPT['R'][r['rpiece']]}"},
                             "64x32xbf16": {"64x32xbf16:1, 1"} if lane1 else set(),
                             "64x32xf32": {"64x32xf32:1, 1"} if lane1 else set()}, r["spt"]
            # a gather instruction's 32 lanes on 32 adjacent positions of a row of the view
            view = "sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [8, 1], order = [1, 0]"
            assert r["views"] == ([view] if lane1 else []), r["views"]


def test_hkl_kernel_compiles_for_sm90(tmp_path):
    """The fused H-KL kernel lowers for sm_90 (the interpreter cannot tell), within shared memory, and its register
    spills stay within what ops.hkl_kernel's docstring reports (its configs use the whole register file: 8 warps at
    255 registers, 16 at 128): spill stores + loads ≤ 0.56 KB at 8 warps (the first-row dense variant: 0.41 KB;
    0.27 KB before _rescue, 0.39 KB before the window was one rank window, 0.51 KB before the row passes and S3 were
    pipelined by hand), ≤ 1 KB with the merge sort of m above the network (ULD: 0.86 KB), ≤ 1.5 KB at 16 (the chain
    sparse variant at W = 16: 0.55 KB; 0.48 KB before _rescue). In the default variant (8 warps, no merge sort) every
    spilled access lies in the once-per-chunk code: none in a per-tile loop or a sort stage (so also with Triton 3.6,
    the GPU machines' image, whose allocation spills 0.94 KB there: 0.41 / 0.53 KB stores / loads, all in the chunk
    loop)."""
    results = _compile(tmp_path, "hkl")
    assert len(results) == 3
    loose = triton.__version__.startswith("3.6.")  # its 0.94 KB (above), none of it in a per-tile loop (below)
    for r in results:
        assert r["smem"] <= _SMEM_SM90, r
        assert r["spill"] <= (1536 if r["warps"] == 16 else 1024 if r["merge"] or loose else 576), r
    assert results[0]["inner_local"] == 0, results[0]


def test_probe_kernels_compile_for_sm90(tmp_path):
    """The GPU check's probe kernels (bench.permute) lower for sm_90 with no spill and no local memory in a loop, the
    two-stage's in-register reorders (tl.gather) within shared memory; the streams read with 16-byte loads, and the
    lane gather "1/thread" with none (one element per thread, as its cost model assumes)."""
    results = {(r["kernel"], r["consts"].get("ONE")): r for r in _compile(tmp_path, "probe")}
    assert len(results) == 4
    for r in results.values():
        assert r["spill"] == 0 and r["inner_local"] == 0 and r["smem"] <= _SMEM_SM90, r
    assert results[("_stream", None)]["v4"] > 0 and results[("_lane_gather", False)]["v4"] > 0
    # the layouts permute.sectors counts in: 8 elements a thread (lanes 8 apart) for the lane gather, 1 for its
    # "1/thread" twin and the two-stage's stage 1 (its 1,024-pair tiles), 8 for stage 2 (vectorized scratch runs)
    assert results[("_lane_gather", False)]["spt"] == ["2048xbf16:8", "2048xi32:8"]
    assert results[("_lane_gather", True)]["spt"] == ["2048xbf16:1", "2048xi32:1"]
    assert results[("_lane_gather", True)]["v4"] == 0
    assert results[("_two_stage", None)]["spt"] == ["1024xbf16:1", "1024xi16:1", "1024xi32:1", "2048xbf16:8",
                                                    "2048xi16:8"]
    assert results[("_two_stage", None)]["smem"] > 0  # tl.gather through shared memory


def test_jit_helpers_take_no_defaulted_constexpr():
    """No Triton function of the package gives a constexpr parameter a default: Triton 3.6 (the GPU machines' image)
    fails to compile a call that omits one ("'str' object has no attribute 'type'"), while the pinned 3.7.1 accepts
    it, so the interpreter tests and the sm_90 compile here would not notice."""
    import inspect

    import triton.language as tl

    from xtoken_ext.ops import _tl, hkl_kernel, pkl_kernel

    found = []
    for mod in (_tl, hkl_kernel, pkl_kernel):
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if fn is None or getattr(fn, "__module__", None) != mod.__name__:
                continue
            for p in inspect.signature(fn).parameters.values():
                if p.default is not p.empty and p.annotation in (tl.constexpr, "tl.constexpr"):
                    found.append(f"{mod.__name__}.{name}({p.name}=...)")
    assert not found, found
    assert len([1 for mod in (_tl, hkl_kernel, pkl_kernel) for o in vars(mod).values() if hasattr(o, "fn")]) > 20
