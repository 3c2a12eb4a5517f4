"""Instructions per loop iteration of the fused Triton kernels, read from their SASS for sm_90: the cost model's issue
time. No GPU needed: Triton compiles the kernel for sm_90, the ptxas shipped in the triton wheel assembles it with line
info, and nvdisasm (same place) prints every instruction with its source line. A loop is a backward branch, named by
the source line of that branch (its ``for`` header); its body is counted per thread: each warp issues it once per
iteration, so a pass costs body × warps × iterations warp-instructions on its SM."""
from __future__ import annotations

import base64
import concurrent.futures
import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile

# pointer arguments' element types (others fp32); scalars named here are fp32 (others i32)
PTR = {"z_ptr": "*bf16", "t_ptr": "*bf16", "dz_ptr": "*bf16", "widx_ptr": "*i32", "ell_ptr": "*i64",
       "nslot_ptr": "*i8", "ew_ptr": "*i64", "ek_ptr": "*i32", "cell_ptr": "*i64", "rank_ptr": "*i32",
       "rw_ptr": "*i64", "rk_ptr": "*i32", "mask_ptr": "*i8", "spans_ptr": "*i64",
       "tcnt_ptr": "*i32", "sync_ptr": "*i32", "prof_ptr": "*i64", "smap_ptr": "*i32", "tmap_ptr": "*i32",
       "tcls_ptr": "*i8", "m_ptr": "*i32", "path_ptr": "*i32", "la_ptr": "*i64", "lb_ptr": "*i32", "wa_ptr": "*i64",
       "wb_ptr": "*i32", "gc_ptr": "*i32", "ubs_ptr": "*i64", "ubt_ptr": "*i64",
       # bench.permute's probe kernels
       "x_ptr": "*bf16", "y_ptr": "*bf16", "scr_ptr": "*bf16", "map_ptr": "*i32", "src_ptr": "*i32", "perm_ptr": "*i16",
       "dst_ptr": "*i32", "start_ptr": "*i32", "loc_ptr": "*i16"}
F32 = {"inv_tau", "tau", "eps"}
# integer arguments Triton's launcher would not see as multiples of 16 at real shapes (no divisibility hint)
NO_HINT = {"k0", "k1", "NNZ", "NRES", "r_spare", "n_tiles_max", "K", "N", "N_s", "m_up", "cap_a", "cap_b",
           "g_len"}


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(kernel, consts: dict, num_warps: int, sparse: bool = False, lineinfo: bool = False,
                 maxnreg: int | None = None):
    """``kernel`` compiled by Triton for sm_90 with these constexprs (other arguments typed by PTR / F32, with the
    16-divisibility hints Triton's launcher gives real shapes) and assembled by ptxas -> (compiled kernel, cubin
    bytes, ptxas -v report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n == "tc_ptr":
            sig[n] = "*i64" if sparse else "*bf16"
        elif n.endswith("_ptr"):
            sig[n] = PTR.get(n, "*fp32")
        else:
            sig[n] = "fp32" if n in F32 else "i32"
    hints = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] not in ("constexpr", "fp32") and n not in NO_HINT}
    src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=hints)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, maxnreg=maxnreg))
    return c, *_assemble(c.asm["ptx"], lineinfo)


def _assemble(ptx: str, lineinfo: bool) -> tuple[bytes, str]:
    """ptxas on ``ptx`` for sm_90a -> (cubin bytes, its -v report), kept in Triton's cache beside the kernels Triton
    compiled (keyed by the PTX, the flags and the triton wheel whose ptxas it is): ptxas takes ~40 % of an H-KL
    variant's compile, and the Triton cache alone would serve only the PTX."""
    import triton
    from triton.runtime.cache import get_cache_manager

    flags = ["-v", *(["-lineinfo"] if lineinfo else []), "--gpu-name", "sm_90a"]
    cache = get_cache_manager(hashlib.sha256("\0".join([ptx, *flags, triton.__version__]).encode()).hexdigest())
    hit = cache.get_file("ptxas.json")
    if hit:
        with open(hit) as f:
            got = json.load(f)
        return base64.b64decode(got["cubin"]), got["report"]
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run([_bin("ptxas"), *flags, src, "-o", cubin], capture_output=True, text=True,
                                check=True).stderr
        with open(cubin, "rb") as f:
            data = f.read()
    cache.put(json.dumps(dict(cubin=base64.b64encode(data).decode(), report=report)), "ptxas.json", binary=False)
    return data, report


@functools.lru_cache(maxsize=None)
def _loops(kernel, consts: tuple, num_warps: int, sparse: bool, maxnreg: int | None
           ) -> dict[tuple[str, int], list[tuple[int, int]]]:
    return cubin_loops(compile_sm90(kernel, dict(consts), num_warps, sparse, lineinfo=True, maxnreg=maxnreg)[1])


def cubin_loops(cubin: bytes) -> dict[tuple[str, int], list[tuple[int, int, dict, frozenset, int]]]:
    """{(source file, line of a loop's backward branch): [(instructions, local-memory loads and stores, {source line
    of a forward branch inside the body: the instructions it jumps over}, the source lines of its instructions, its
    MUFU instructions: the SFU's ex2 / lg2 / rcp) of each such loop's body]} of a cubin compiled with line info."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        # -g: each instruction's own source line (-gi would name the outermost inlined call site instead)
        sass = subprocess.run([_bin("nvdisasm"), "-g", "-c", path], capture_output=True, text=True, check=True).stdout
    src, ins, labels, pending = None, [], {}, []
    for line in sass.splitlines():
        m = re.match(r'\s*//## File "(.*)", line (\d+)', line)
        if m:
            src = (os.path.basename(m.group(1)), int(m.group(2)))
            continue
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update((p, addr) for p in pending)
            pending = []
            ins.append((addr, m.group(2), src))
    def target(text):
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text)
        return labels.get(m.group(1)) if m else None

    out: dict[tuple[str, int], list[tuple[int, int, dict, frozenset, int]]] = {}
    for addr, text, where in ins:
        lo = target(text)
        if lo is not None and lo < addr:
            body = [(a, t, w) for a, t, w in ins if lo <= a <= addr]
            skips = {w: sum(a < b < to for b, _, _ in body) for a, t, w in body
                     if (to := target(t)) is not None and a < to <= addr}
            out.setdefault(where, []).append((len(body), sum(bool(re.search(r"\b(STL|LDL)\b", t)) for _, t, _ in body),
                                              skips, frozenset(w for _, _, w in body),
                                              sum(bool(re.search(r"\bMUFU\b", t)) for _, t, _ in body)))
    return out


def _field(i: int, kernel, consts: dict, num_warps: int, sparse: bool, maxnreg: int | None) -> dict:
    """Field i of cubin_loops' tuples for every loop body of the compiled kernel (cached per variant)."""
    return {k: [v[i] for v in vs] for k, vs in _loops(kernel, tuple(sorted(consts.items())), num_warps,
                                                       sparse, maxnreg).items()}


def loop_bodies(kernel, consts: dict, num_warps: int, sparse: bool = False, maxnreg: int | None = None
                ) -> dict[tuple[str, int], list[int]]:
    """{(source file name, line of the loop's backward branch): [instructions per thread of each such loop's body,
    in code order]} (a helper's loop appears once per inlined call). Inner loops count once in their outer loop's
    body."""
    return _field(0, kernel, consts, num_warps, sparse, maxnreg)


def loop_sfu(kernel, consts: dict, num_warps: int, sparse: bool = False, maxnreg: int | None = None
             ) -> dict[tuple[str, int], list[int]]:
    """As loop_bodies, each body's MUFU instructions per thread (the special-function unit's, which sm_90 runs at 16
    results per clock and SM: a warp's MUFU occupies it 2 clocks, the time of 8 issued instructions)."""
    return _field(4, kernel, consts, num_warps, sparse, maxnreg)


def loop_skips(kernel, consts: dict, num_warps: int, sparse: bool = False, maxnreg: int | None = None
                ) -> dict[tuple[str, int], list[dict]]:
    """As loop_bodies, each body's {source line of a forward branch inside it: the instructions it jumps over}."""
    return _field(2, kernel, consts, num_warps, sparse, maxnreg)


def loop_lines(kernel, consts: dict, num_warps: int, sparse: bool = False, maxnreg: int | None = None
                ) -> dict[tuple[str, int], list[frozenset]]:
    """As loop_bodies, the source lines of each body's instructions: which instantiation of an inlined helper a body
    is (the lines of a branch only one of them compiles)."""
    return _field(3, kernel, consts, num_warps, sparse, maxnreg)


def source_lines(fn, marker: str, headers: bool = False) -> list[tuple[str, int]]:
    """The source lines, in order, of ``fn`` (a @triton.jit function) that contain ``marker``; ``headers``: only
    ``for`` / ``if`` headers (a header on one line)."""
    py = getattr(fn, "fn", fn)
    lines, first = inspect.getsourcelines(py)
    name = os.path.basename(inspect.getsourcefile(py))
    return [(name, first + i) for i, s in enumerate(lines)
            if marker in s and (not headers or s.split("#")[0].rstrip().endswith(":"))]


def header_lines(fn, marker: str) -> list[tuple[str, int]]:
    """The source lines, in order, of the ``for`` / ``if`` headers in ``fn`` that contain ``marker``."""
    return source_lines(fn, marker, headers=True)


def body(bodies: dict, fn, marker: str, lines: dict | None = None, keep=None) -> list[int]:
    """The bodies of the loops whose branch lies on a ``for`` header of ``fn`` containing ``marker``, in code order
    (header by header); with ``lines`` (loop_lines) only those whose source lines ``keep`` accepts."""
    return [n for line in header_lines(fn, marker)
            for i, n in enumerate(bodies.get(line, [])) if keep is None or keep(lines[line][i])]


def pass_bodies() -> dict:
    """The cost model's per-pass loop bodies (instructions per thread per tile) of both kernels in the variant a 1-to-1
    chunk runs by default (merge="mean", dense teacher, frozen W), first autotune config (P-KL's C and D also in its
    LANE1 config, under "LANE1"): P-KL A (student LSE), C (teacher tiles, per column-ELL width 1..SLOTS), R
    (residual entry blocks, per piece size), D (gradient tiles, per ELL slots run, 1..SLOTS: a slice runs as many as
    its widest student has), C and D in their single-row instantiations; H-KL S1 / T1 (student / teacher row pass,
    the same helper inlined twice, in that order; S1_skip / T1_skip the instructions of their append, which a tile
    without an uncommon id skips), S3 (gradient pass: single rows and a dense teacher, _grad_one), L (the window's
    passes over each candidate list) and miss (a side's passes over its row where the single pass missed: _rescue's
    count and append, _compact's histogram and compaction). Under "sfu", the same loops' MUFU instructions per
    thread per tile (the streaming passes; the appends S1 / T1 skip hold none)."""
    from xtoken_ext.ops import hkl_kernel as H

    cfg = H._CONFIGS[0]
    w = H.sort_widths(H._SORT_CAP)
    consts = dict(MEAN=True, CHAIN=False, SPARSE=False, W=w[0], W_SMALL=w[1], MERGE=False, PROFILE=0, **cfg.kwargs)
    # H-KL's variant (the longest compile) in a thread beside P-KL's: Triton and ptxas release the GIL for most of it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hkl = pool.submit(loop_bodies, H._hkl_kernel, consts, cfg.num_warps)
        out = {"P-KL": _pkl_bodies()}
        hkl.result()
    out["H-KL"] = _hkl_bodies(consts, cfg.num_warps)
    return out


def _single_rows(cfg) -> tuple:
    """C per column-ELL width and D per ELL width in config ``cfg``, in their single-row loops (_single_pass,
    _slice_single: the latter instantiated for each ELL width 1..SLOTS), with their MUFU counts; and the 1-slot
    variant's (constexprs, loop bodies, MUFU counts)."""
    from xtoken_ext.ops import pkl_kernel as P

    c, cs = {}, {}
    for k in range(1, P.SLOTS + 1):  # the column ELL's width: C's body grows with it
        consts = dict(MEAN=True, CHAIN=False, SPARSE=False, GRAD_W=False, HAS_SCALE=False, SLOTS=P.SLOTS,
                      CSLOTS=k, RPIECE=max(P.ENTRY_COST), EPS=0, HELP=0, PROFILE=0, **P.TILES_GPU,
                      **P.SLICES_GPU, **cfg.kwargs)
        b, f = (get(P._pkl_kernel, consts, cfg.num_warps, maxnreg=cfg.maxnreg) for get in (loop_bodies, loop_sfu))
        (c[k],), (cs[k],) = (body(x, P._single_pass, "for t in range(0, tl.cdiv(C") for x in (b, f))
        if k == 1:
            first = consts, b, f
            # D per ELL width: more slots issue more (the MUFU counts go with their bodies)
            d, sd = (dict(zip(range(1, P.SLOTS + 1), v, strict=True)) for v in zip(*sorted(
                zip(*(body(x, P._slice_single, "for v0 in range(") for x in (b, f))))))
    return c, cs, d, sd, first


def _pkl_bodies() -> dict:
    """pass_bodies' P-KL part."""
    from xtoken_ext.ops import pkl_kernel as P

    cfg = P._CONFIGS[0]
    c, cs, d, sd, (consts, b, f) = _single_rows(cfg)
    # R: _entries' single-row instantiation (without _p_bar's loop over the merged rows)
    merged = set(source_lines(P._p_bar, "for r in range(s_lo, s_hi)"))
    (a,), (sa,) = (body(x, P._row_stats, "for v0 in range") for x in (b, f))
    r, sr = {}, {}
    for piece in P.ENTRY_COST:  # R per piece size (the C, D and A above: the largest)
        bp, fp, lp = (get(P._pkl_kernel, dict(consts, RPIECE=piece), cfg.num_warps, maxnreg=cfg.maxnreg)
                      for get in (loop_bodies, loop_sfu, loop_lines))
        (r[piece],), (sr[piece],) = (body(x, P._entries, "for i0 in range(0, n", lp, lambda y: not y & merged)
                                     for x in (bp, fp))
    out = dict(warps=cfg.num_warps, A=a, C=c, R=r, D=d, sfu=dict(A=sa, C=cs, R=sr, D=sd))
    # C and D with their gathers one element a thread (the LANE1 config, ops.pkl_kernel._gather; A and R gather
    # nothing through it)
    (cfg1,) = [x for x in P._CONFIGS if x.kwargs["LANE1"]]
    c1, cs1, d1, sd1, _ = _single_rows(cfg1)
    out["LANE1"] = dict(C=c1, D=d1, sfu=dict(C=cs1, D=sd1))
    return out


def _hkl_bodies(consts: dict, warps: int) -> dict:
    """pass_bodies' H-KL part, its variant ``consts`` at ``warps``."""
    from xtoken_ext.ops import hkl_kernel as H

    b, skips = loop_bodies(H._hkl_kernel, consts, warps), loop_skips(H._hkl_kernel, consts, warps)
    f = loop_sfu(H._hkl_kernel, consts, warps)
    (s1, t1), (fs1, ft1) = (body(x, H._row_pass, "for c0 in range(0, C, BLOCK)") for x in (b, f))
    (branch,) = header_lines(H._row_pass, "if _tile_has(")
    s1_skip, t1_skip = [sk[branch] for line in header_lines(H._row_pass, "for c0 in range(0, C, BLOCK)")
                        for sk in skips.get(line, [])]
    # the window's passes over each candidate list (a: the student's, b: the teacher's), per tile of BLOCK_L keys:
    # level-1 histogram and key range, bin b1's key range (_candidates' two loops), a bisection step (_select), the
    # gather into the sort buffer (_gather); a list's bodies are those that load its keys (_keys' line for that
    # source; _select's and _gather's others are _compact's over the rows), the costliest where it has several
    ls = loop_lines(H._hkl_kernel, consts, warps)
    hist, b1 = header_lines(H._candidates, "for i0 in range(0, cnt, BLOCK_L)")
    lst = {}
    for side, load in (("a", "e = tl.load(src + o, mask=valid, other=0)"), ("b", "k = tl.load(src + o, mask=valid")):
        (key,) = source_lines(H._keys, load)
        mine = lambda x, key=key: key in x  # noqa: E731
        lst[side] = dict(hist=max(n for n, x in zip(b[hist], ls[hist]) if mine(x)),
                         b1=max(n for n, x in zip(b[b1], ls[b1]) if mine(x)),
                         **{k: max(body(b, fn, "for c0 in range(0, n, BLOCK)", ls, mine))
                            for k, fn in (("select", H._select), ("gather", H._gather))})
    # a miss (_compact over a side's row): its level-1 histogram pass and its compaction (_gather); its rescue
    # (_rescue): the counting pass and the append pass; the bodies that load that side's logits (single rows; their
    # loop bodies also hold the merged rows' branch: an upper bound)
    (hist_r,), (gath_r,) = (header_lines(fn, "for c0 in range(0, n, BLOCK)") for fn in (H._compact, H._gather))
    count_r, app_r = header_lines(H._rescue, "for c0 in range(0, n, BLOCK)")
    miss = {}
    for side, fn, load in (("a", H._s_vals, "x = tl.load(z_ptr + s_lo * stride_z + o"),
                           ("b", H._t_vals, "x = tl.load(t_ptr + t_lo * stride_t + o")):
        rows = set(source_lines(fn, load))
        mine = lambda x, rows=rows: bool(rows & set(x))  # noqa: E731
        miss[side] = {k: max(n for n, x in zip(b[line], ls[line]) if mine(x))
                      for k, line in (("hist", hist_r), ("gather", gath_r), ("count", count_r), ("append", app_r))}
    (s3,), (fs3,) = (body(x, H._grad_one, "for v0 in range") for x in (b, f))
    return dict(warps=warps, S1=s1, T1=t1, S1_skip=s1_skip, T1_skip=t1_skip, S3=s3, L=lst, miss=miss,
                sfu=dict(S1=fs1, T1=ft1, S3=fs3))


if __name__ == "__main__":  # run by bench.costmodel in a subprocess (no TRITON_INTERPRET there)
    print(json.dumps(pass_bodies()))
