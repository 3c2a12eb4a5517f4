"""The one-command GPU check of the fused Triton losses (issue 8): ``xtoken bench --suite gpu`` or
``python -m xtoken_ext.bench.gpu`` [--quick] [--dry]. Exit status 0 when every check passes, 1 otherwise.

1. Correctness. Every loss (P-KL, H-KL, GOLD, ULD) × merge (mean, first, chain) × dtype (bf16, fp16, fp32) × teacher
   (dense, sparse top-k) through the public API with backend="triton", at multi-tile sizes (V_S 5,003 × V_T 6,007:
   several tiles of every autotune config, partial last tiles; 300 chunks of 1–4 rows per side in 2 sequences, every 8th
   invalid; a teacher column that 4,400 W entries reach; τ = 0.7; H-KL family with a dense teacher at uncommon_topk =
   1,000, with a sparse one at the API default); then H-KL and GOLD on a narrow dense teacher (V_T 1,031, most of its
   columns paired) at the API default uncommon_topk, where m = |U_T| (9 / 342) takes the kernel's small sort network;
   then ULD uncapped on a wider dense problem (V_S 20,011 × V_T 17,989, 40 chunks), where m exceeds the 8,192-lane
   network and the kernel merge-sorts both whole lists; then P-KL in fp32 with most student ids 85 nats below the rest
   (at τ) and the teacher unshifted, where Q is subnormal and P is not (h = P/Q up to 2^149). The per-chunk losses and
   the gradient of Σ_k w_k L_k (random w) are compared with the float64 torch backend on the same rounded inputs, per
   entry, against the bounds of xtoken_ext.testing (from the dtype's unit roundoff); the table gives the worst
   error/bound ratio (≤ 1 passes). H-KL / GOLD / ULD: entries where the sorted-L1 term is not differentiable within
   rounding (rank or sign ties, testing.sorted_l1_ambiguous) are skipped; "checked" is the share of gradient entries
   compared. The float64 oracle is itself checked against xt.reference (dense W, a Python loop over chunks) on a
   smaller problem.
2. Repeatability. Every case of the main matrix and of the ULD stage runs three times (the narrow-teacher cases
   once); losses and gradients must be bitwise equal (races; chunks of 4 teacher rows sum 3 later sparse rows per
   column, an order that float atomics would vary; the merge sort's rounds). The ULD stage also checks that every
   chunk took the merge sort, the narrow-teacher stage that every chunk took the small sort network
   (hkl_kernel.last_paths).
3. Timing (skipped with --dry). fwd+bwd at 8,192 rows × V_S 128,256 × V_T 151,936 bf16 (bench.losses inputs) for
   P-KL, H-KL and GOLD with Projection.random and the real Llama-3 × Qwen3 W (built from the offline tokenizers once,
   then read from the on-disk W cache): first call (compile + autotune) and best of the next runs, the multiple of the
   HBM floor (the bytes that must move: read the student and teacher rows, write the gradient rows, at the GPU's
   nominal bandwidth, or a measured device copy for GPUs not in the table), achieved GB/s and peak extra memory;
   beside the chunked torch backend and the unfused release-style baseline of bench.losses on the same GPU. The
   fused per-chunk losses must also agree with the torch backend's within the bound (both compute in fp32). Under
   each fused row, one more call profiled (torch.profiler): its kernels' device time by kernel, against its wall time;
   and for an autotuned kernel each configuration's time in its autotuning.
4. Sweep (skipped with --dry). Fused P-KL as in stage 3 under each launch configuration of pkl_sweep() (warps,
   register cap, programs per SM, teacher tile, gathers one element a thread or not: LANE1), each profiled and
   checked against the torch backend's losses: the data for tuning ops.pkl_kernel on the GPU at hand.

5. Probe (bench.permute): the permutation P-KL's C and D do per row, alone, timed three ways (gathered a lane per
   value, with the lanes of an instruction 8 or 1 elements apart, or moved in two stages through a scratch row)
   beside the rows streamed, each checked against float64, with the cost model's L2<->SM sectors beside the times: the
   data for deciding how P-KL's C and D are rebuilt. With --dry on the CPU at a tiny shape (Projection.random only).
6. Phases: fused P-KL and H-KL fwd+bwd as in stage 3 (the real W where it loads), their kernels timing their own
   phases (ops._tl.PhaseTimes: the GPU's global timer between stamps; a separately compiled variant): each phase's
   mean time per program and share, beside the kernel's time with and without the stamps. Where the time goes,
   which the cost model only estimates. With --dry at a tiny shape, the interpreter's lap counts instead of times.

--quick: bf16 only in the correctness stage, one timed run after the first call.
--real-only: the timing stage with the real W only (each W compiles its own H-KL kernel variant).
--stage correctness / timing / sweep / probe / phases: stages 1-2, stage 3, 4, 5 or 6 alone (e.g. timing first where GPU
time is short).
--jobs N: stages 1-2 in N spawned processes on the same device (default: one per core up to 16; 1 with --dry), the
kernel variants compiling in parallel (the stage is bound by compiling: about a minute per H-KL variant and autotune
configuration on an H200 machine); tables print in order, each case runs whole in one process.
--dry: the CPU under TRITON_INTERPRET=1 (set here, before the kernels are imported) at tiny sizes that still give
several tiles per row at the interpreter's BLOCK_S = 128 / BLOCK_T = 64 and more chunks than its 2 programs; every
code path but timing (the interpreter runs programs one after another, so only P-KL and H-KL with merge="mean" in
bf16 are repeated: the code path; the ULD stage lowers the sort network to 16 lanes, so that its tiny problem takes
the merge sort). CI runs it (tests/test_bench_gpu.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import platform
import re
import sys
import time
import warnings

import torch

LOSSES = ("pkl", "hkl", "gold", "uld")
MERGES = ("mean", "first", "chain")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEACHERS = ("dense", "sparse")
TAU = 0.7
REPEATS = 3  # runs of every case compared bitwise
TIMED_LOSSES = ("pkl", "hkl", "gold")
# Nominal HBM bandwidth (bytes/s) by device name; a plain H100 is the SXM part ("NVIDIA H100 80GB HBM3").
NOMINAL_HBM = ((r"\bH200\b", 4.8e12), (r"\bH100\b.*\bNVL\b", 3.9e12), (r"\bH100\b.*\bPCIe\b", 2.0e12),
               (r"\bH100\b", 3.35e12))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of the correctness stage."""
    V_S: int
    V_T: int
    chunks: int  # chunks in all, over 2 sequences
    sparse_k: int  # sparse teacher: columns per row
    hub: int  # W entries in the hub column: more than one entry block (BLOCK_E) of ops.pkl_kernel, on the GPU and
    # under the interpreter, so the dense pass's residual sums span several blocks
    topk: int  # uncommon_topk of H-KL / GOLD / ULD with a dense teacher
    V_T_narrow: int  # the narrow-teacher problem: most teacher columns paired, so m = |U_T| is far below its bound
    # (under --dry 38: m = 2 for H-KL, 16 for GOLD, the small network's width there; at 41 H-KL had m = 0)
    ref_chunks: int  # chunks of the problem on which the float64 oracle is checked against xt.reference
    repeat_all: bool  # every case runs REPEATS times; else only P-KL and H-KL with merge="mean" in bf16
    wide: tuple[int, int, int]  # ULD past the largest sort network: (V_S, V_T, chunks)
    sort_cap: int | None  # the kernel's largest sort network for that problem (None: ops.hkl_kernel's, 8,192)


FULL = Sizes(V_S=5003, V_T=6007, chunks=300, sparse_k=640, hub=4400, topk=1000, V_T_narrow=1031, ref_chunks=8,
             repeat_all=True, wide=(20011, 17989, 40), sort_cap=None)
DRY = Sizes(V_S=160, V_T=100, chunks=7, sparse_k=80, hub=100, topk=24, V_T_narrow=38, ref_chunks=4, repeat_all=False,
            wide=(96, 64, 5), sort_cap=16)
NARROW = ("hkl", "gold")  # the losses of the narrow-teacher problem


@dataclasses.dataclass
class Row:
    """One checked case: worst error/bound ratios (NaN: a NaN where the reference has none), the share of gradient
    entries compared, whether the repeated runs were bitwise equal (None: not repeated), first-call seconds."""
    name: str
    loss: float
    grad: float
    checked: float
    equal: bool | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.loss <= 1 and self.grad <= 1 and self.equal is not False


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _uncommon_topk(loss: str, prob, sizes: Sizes) -> int | None:
    """m of the sorted-L1 term: ``sizes.topk`` with a dense teacher (m < |U|: the top-m selection), else the API
    default (8,192 for H-KL / GOLD, None for ULD: all uncommon ids at these sizes)."""
    if prob.teacher_indices is None:
        return sizes.topk
    return None if loss == "uld" else 8192


def _api_kwargs(loss: str, merge: str, prob, sizes: Sizes) -> dict:
    kw = {"temperature": TAU, "reduction": "none", "merge": merge, "student_ids": prob.student_ids,
          "teacher_ids": prob.teacher_ids}
    if loss != "pkl":
        kw["uncommon_topk"] = _uncommon_topk(loss, prob, sizes)
    return kw


def _poison_free_blocks(dev) -> None:
    """NaN into the CUDA caching allocator's free blocks of the small pool (≤ 1 MiB), where a call's small scratch
    (torch.empty: per-row LSEs, counters) comes from: a kernel that reads such scratch before its own threads'
    stores are visible (a missing barrier) reads NaN, not the equal values a previous run left there."""
    if dev.type == "cuda":
        blocks = [torch.full((1 << 17,), float("nan"), device=dev) for _ in range(64)]  # 512 KiB each
        del blocks


def _forward_backward(fn, z, t, prob, kw, dev, **extra):
    """(per-chunk losses, d Σ_k w_k L_k / dz) of ``fn`` on ``dev``; the alignment and the token ids stay on the CPU
    (the losses move what they need, no host sync)."""
    x = z.detach().to(dev, copy=True).requires_grad_()
    if prob.teacher_indices is not None:
        kw = dict(kw, teacher_indices=prob.teacher_indices.to(dev))
    out = fn(x, t.to(dev), prob.alignment, prob.proj, **kw, **extra)
    (out * prob.weights.to(dev, out.dtype)).sum().backward()
    return out.detach(), x.grad


def _ambiguous(loss, prob, z, t, merge, sizes, rel, dev):
    from xtoken_ext.testing import sorted_l1_ambiguous

    if loss == "pkl":
        return None
    ti = None if prob.teacher_indices is None else prob.teacher_indices.to(dev)
    return sorted_l1_ambiguous(loss, z.to(dev), t.to(dev), prob.alignment, prob.proj, TAU, merge,
                               _uncommon_topk(loss, prob, sizes), rel, ti, prob.student_ids, prob.teacher_ids)


def check_case(prob, loss: str, merge: str, dtype: torch.dtype, sizes: Sizes, dev: torch.device,
               repeats: int = REPEATS, perturb: float = 0.0, teacher: str | None = None) -> Row:
    """One case: the public ``{loss}_loss`` with backend="triton" on ``dev`` vs the float64 torch backend on the same
    rounded inputs, then ``repeats`` − 1 more Triton runs compared bitwise with the first.

    ``perturb`` (for tests only, default 0): adds perturb × bound to the Triton gradient at its largest-bound checked
    entry, in the direction of its error, so that perturb > 1 must FAIL."""
    import xtoken_ext as xt
    from xtoken_ext.testing import C, grad_bound, kappa, loss_bound, math_roundoff, worst_ratio

    fn = getattr(xt, f"{loss}_loss")
    z, t = prob.z.to(dtype), prob.t.to(dtype)
    kw = _api_kwargs(loss, merge, prob, sizes)
    _poison_free_blocks(dev)
    _sync(dev)
    start = time.perf_counter()
    out, grad = _forward_backward(fn, z, t, prob, kw, dev, backend="triton")
    _sync(dev)
    seconds = time.perf_counter() - start
    ref, ref_grad = _forward_backward(fn, z.double(), t.double(), prob, kw, dev, backend="torch")
    kap = kappa(z, t, TAU, prob.proj.teacher_vocab_size)
    bound = grad_bound(ref_grad, z.to(dev), TAU, kap, dtype, "triton", float(prob.weights.max()))
    skip = _ambiguous(loss, prob, z, t, merge, sizes, C * math_roundoff(dtype) * kap, dev)
    g = grad.double()
    if perturb:
        i = int(bound.masked_fill(skip, 0.0).argmax() if skip is not None else bound.argmax())
        direction = 1.0 if float(g.view(-1)[i]) >= float(ref_grad.view(-1)[i]) else -1.0
        g.view(-1)[i] += direction * perturb * float(bound.view(-1)[i])
    equal = None
    if repeats > 1:
        again = []
        for _ in range(repeats - 1):
            _poison_free_blocks(dev)
            again.append(_forward_backward(fn, z, t, prob, kw, dev, backend="triton"))
        equal = all(torch.equal(o, out) and torch.equal(gg, grad) for o, gg in again)
    checked = 1.0 if skip is None else 1.0 - float(skip.double().mean())
    teacher = teacher or ("sparse" if prob.teacher_indices is not None else "dense")
    return Row(f"{loss:<5}{merge:<6}{_dtype_name(dtype):<5}{teacher}",
               worst_ratio(out, ref, loss_bound(ref, TAU, kap, dtype)), worst_ratio(g, ref_grad, bound, skip),
               checked, equal, seconds)


def check_oracle(prob, loss: str, merge: str, sizes: Sizes, dev: torch.device) -> Row:
    """The oracle of ``check_case`` (the float64 torch backend on ``dev``) against xt.reference (dense W, a Python loop
    over chunks, CPU) on fp32-valued inputs, with float64 bounds."""
    import xtoken_ext as xt
    from xtoken_ext.testing import C, grad_bound, kappa, loss_bound, math_roundoff, worst_ratio

    fn = getattr(xt, f"{loss}_loss")
    z, t = prob.z.double(), prob.t.double()
    kw = _api_kwargs(loss, merge, prob, sizes)
    start = time.perf_counter()
    out, grad = _forward_backward(fn, z, t, prob, kw, dev, backend="torch")
    seconds = time.perf_counter() - start
    ref, ref_grad = _forward_backward(getattr(xt.reference, f"{loss}_loss"), z, t, prob, kw, torch.device("cpu"))
    kap = kappa(z, t, TAU, prob.proj.teacher_vocab_size)
    bound = grad_bound(ref_grad, z, TAU, kap, torch.float64, "torch", float(prob.weights.max()))
    skip = _ambiguous(loss, prob, z, t, merge, sizes, C * math_roundoff(torch.float64) * kap, torch.device("cpu"))
    checked = 1.0 if skip is None else 1.0 - float(skip.double().mean())
    return Row(f"{loss:<5}{merge:<6}fp64 {'sparse' if prob.teacher_indices is not None else 'dense'}",
               worst_ratio(out.cpu(), ref, loss_bound(ref, TAU, kap, torch.float64)),
               worst_ratio(grad.cpu(), ref_grad, bound, skip), checked, None, seconds)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).replace("torch.", ""))


def _print_row(row: Row) -> None:
    equal = {None: "-", True: "yes", False: "NO"}[row.equal]
    print(f"{row.name:<24}{row.loss:>10.3f}{row.grad:>10.3f}{100 * row.checked:>9.1f}%{equal:>8}"
          f"{row.seconds:>10.2f}  {'PASS' if row.ok else 'FAIL'}", flush=True)


def report(title: str, rows: list[Row]) -> bool:
    """Prints the summary of a finished table: the worst ratios and how many cases passed. -> all passed."""
    ok = all(r.ok for r in rows)

    def worst(attr):  # NaN counts as the worst
        row = max(rows, key=lambda r: math.inf if math.isnan(getattr(r, attr)) else getattr(r, attr))
        return f"{getattr(row, attr):.3f} ({' '.join(row.name.split())})"

    print(f"{title}: {sum(r.ok for r in rows)}/{len(rows)} cases PASS; worst loss ratio {worst('loss')}, worst "
          f"gradient ratio {worst('grad')} -> {'PASS' if ok else 'FAIL'}\n", flush=True)
    return ok


def _header(what: str) -> None:
    print(f"{what}\n{'case':<24}{'loss':>10}{'grad':>10}{'checked':>10}{'equal':>8}{'first s':>10}")
    print("-" * 72)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of stages 1-2, all a worker process needs to rebuild and run it (``run_case``)."""
    problem: str  # a key of _problem: "oracle dense", "oracle sparse", "dense", "sparse", "narrow", "wide", "tinyq"
    loss: str
    merge: str
    dtype: str  # a key of DTYPES; "fp64": the oracle check
    repeats: int = 1


@functools.lru_cache(maxsize=None)
def _problem(name: str, sizes: Sizes):
    """The correctness stage's problems by name, from fixed seeds: the same in every process."""
    from xtoken_ext.testing import loss_problem

    if name.startswith("oracle"):
        sparse_k = sizes.sparse_k if name.endswith("sparse") else 0
        return loss_problem(1, sizes.V_S, sizes.V_T, sizes.ref_chunks, sparse_k=sparse_k, hub=sizes.hub)
    if name in TEACHERS:
        return loss_problem(0, sizes.V_S, sizes.V_T, sizes.chunks, sparse_k=sizes.sparse_k if name == "sparse" else 0,
                            hub=sizes.hub, max_rows=4)
    if name == "narrow":  # no hub: it would take the pairs of 4,400 ids
        return loss_problem(2, sizes.V_S, sizes.V_T_narrow, sizes.chunks)
    if name == "wide":
        return loss_problem(3, *sizes.wide)
    prob = loss_problem(4, sizes.V_S, sizes.V_T, sizes.chunks)  # tinyq
    prob.z[..., 8:] -= 85 * TAU
    return prob


def _case_sizes(problem: str, sizes: Sizes) -> Sizes:
    """The sizes a problem's cases run with: the API default uncommon_topk (8,192) on the narrow teacher, none on
    the wide one (ULD uncapped)."""
    return {"narrow": dataclasses.replace(sizes, topk=8192), "wide": dataclasses.replace(sizes, topk=None)}.get(
        problem, sizes)


def run_case(case: Case, sizes: Sizes, device: str) -> tuple[Row, list[int] | None]:
    """One case in this process -> (its row, hkl_kernel.last_paths after it on the narrow and wide problems). The
    wide problem runs with the kernel's largest sort network at ``sizes.sort_cap`` (--dry: 16 lanes, so that the
    interpreter's tiny problem takes the merge sort)."""
    from xtoken_ext.ops import hkl_kernel

    dev, prob = torch.device(device), _problem(case.problem, sizes)
    if case.dtype == "fp64":
        return check_oracle(prob, case.loss, case.merge, sizes, dev), None
    cap = hkl_kernel._SORT_CAP
    if case.problem == "wide":
        hkl_kernel._SORT_CAP = sizes.sort_cap or cap
    try:
        row = check_case(prob, case.loss, case.merge, DTYPES[case.dtype], _case_sizes(case.problem, sizes), dev,
                         case.repeats, teacher=case.problem if case.problem not in TEACHERS else None)
    finally:
        hkl_kernel._SORT_CAP = cap
    return row, hkl_kernel.last_paths.tolist() if case.problem in ("narrow", "wide") else None


@dataclasses.dataclass(frozen=True)
class Section:
    """A table of stages 1-2: its cases, the summary's title, and the path (hkl_kernel.last_paths bit, 0: none)
    that every chunk of each case must have taken."""
    problem: str
    title: str
    cases: tuple[Case, ...]
    bit: int = 0
    path: str = ""


def sections(sizes: Sizes, dtypes: list[str]) -> list[Section]:
    """Stages 1-2 as tables, in the order they print (module docstring)."""
    out = [Section(f"oracle {t}", "oracle", tuple(Case(f"oracle {t}", loss, merge, "fp64") for loss in LOSSES
                                                  for merge in MERGES)) for t in TEACHERS]
    out += [Section(t, f"triton, {t} teacher", tuple(Case(t, loss, merge, d, _repeats(sizes, merge, DTYPES[d], loss in (
        "pkl", "hkl"))) for loss in LOSSES for merge in MERGES for d in dtypes)) for t in TEACHERS]
    # H-KL / GOLD where m is set by the uncommon sets, not uncommon_topk (the API default, 8,192): a teacher narrower
    # than the student, most of its columns paired, as with a real W and uncovered="renormalize"; m then fits the
    # kernel's small sort network (ops.hkl_kernel: W_SMALL), which the problems above (m = topk) never take
    out.append(Section("narrow", "triton, narrow dense teacher", tuple(
        Case("narrow", loss, merge, d) for loss in NARROW for merge in MERGES for d in dtypes), 4,
        "the small sort network"))
    # ULD where m = min(|U_S|, |U_T|) exceeds the largest sort network: both whole lists merge-sorted
    # (ops.hkl_kernel._sorted_lists), which the problems above (m ≤ 1,000) never take
    out.append(Section("wide", "triton, ULD past the sort network", tuple(
        Case("wide", "uld", merge, d, _repeats(sizes, merge, DTYPES[d])) for merge in MERGES for d in dtypes), 16,
        "the merge sort"))
    # P-KL where Q is below the normal fp32 range and P is not: student ids from 8 on 85 nats below the rest (at τ),
    # the teacher unshifted, so h = P/Q reaches 2^149 (ops.pkl: only its scaled forms stay finite; on a GPU the SFU's
    # reciprocal, which the interpreter does not run); fp32 logits: those gradient entries are subnormal, where a
    # 16-bit store is exact to its own subnormal spacing only
    out.append(Section("tinyq", "triton, P-KL with subnormal Q", tuple(
        Case("tinyq", "pkl", merge, "fp32", _repeats(sizes, merge, DTYPES["fp32"])) for merge in MERGES)))
    return out


def _describe(problem: str, sizes: Sizes, dev: torch.device) -> str:
    """A table's header line."""
    from xtoken_ext.ops import hkl_kernel

    if problem.startswith("oracle"):
        return (f"float64 oracle (torch backend on {dev.type}) vs xt.reference, {problem.split()[1]} teacher, "
                f"{sizes.ref_chunks} chunks; ratio = worst |err| / float64 bound")
    if problem == "tinyq":
        return (f"backend='triton' vs float64, P-KL with subnormal Q: V_S {sizes.V_S:,} x V_T {sizes.V_T:,}, dense "
                f"teacher, student ids >= 8 shifted by -85 tau; ratio = worst |err| / bound")
    prob = _problem(problem, sizes)  # the others' headers describe the problem (with a pool, built here for that)
    if problem in TEACHERS:
        K, (B, T_S, _) = prob.alignment.row_spans().shape[0], prob.z.shape
        return (f"backend='triton' vs float64, {problem} teacher: V_S {sizes.V_S:,} x V_T {sizes.V_T:,}, {K} valid "
                f"chunks over {B} x {T_S} student rows, hub column with {int((prob.proj.indices == 0).sum())} W "
                f"entries, tau {TAU}; ratio = worst |err| / bound; equal = {REPEATS} runs bitwise equal")
    if problem == "narrow":
        return (f"backend='triton' vs float64, narrow dense teacher: V_S {sizes.V_S:,} x V_T {sizes.V_T_narrow:,}, "
                f"uncommon_topk 8,192, m = min(|U_S|, |U_T|) = {_m_of(prob, 'relaxed')} (H-KL), "
                f"{_m_of(prob, 'strict')} (GOLD); ratio = worst |err| / bound")
    V_S, V_T, chunks = sizes.wide
    return (f"backend='triton' vs float64, ULD past the sort network: V_S {V_S:,} x V_T {V_T:,}, dense teacher, "
            f"{chunks} chunks, uncommon_topk None: m = {min(V_S, int(prob.proj.covered_columns().sum())):,} > "
            f"{sizes.sort_cap or hkl_kernel._SORT_CAP:,} lanes (merge-sorted lists); ratio = worst |err| / bound")


def _submission_order(cases: list[Case]) -> list[Case]:
    """The order a pool takes the cases in: first one case per kernel variant (H-KL family first: it compiles for
    about a minute per autotune configuration on a GPU machine, P-KL for a few seconds; H-KL, GOLD and ULD of a
    problem, merge and dtype share one), then the cases whose variant is in Triton's cache by then, then the float64
    oracles (no kernel)."""
    seen = set()

    def rank(case: Case) -> int:
        if case.dtype == "fp64":
            return 3
        variant = (case.loss == "pkl", case.problem, case.merge, case.dtype)
        first = variant not in seen
        seen.add(variant)
        return (0 if case.loss != "pkl" else 1) if first else 2

    ranks = [rank(c) for c in cases]
    return [c for _, c in sorted(zip(ranks, cases), key=lambda rc: rc[0])]


def _worker_init(dry: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    if dry:  # masked lanes of the interpreter evaluate log(0), 0·inf, ... in numpy before tl.where drops them
        from xtoken_ext.testing import fast_interpreter

        warnings.simplefilter("ignore", RuntimeWarning)
        fast_interpreter()


def _cores() -> int:
    """The CPU cores this process may use (its affinity: a container's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(dry: bool) -> int:
    """Worker processes of stages 1-2: one per CPU core up to 16 on a GPU machine (Triton compiles each kernel
    variant on one core: about a minute per H-KL variant and configuration), 1 under --dry."""
    return 1 if dry else max(1, min(16, _cores()))


def _results(tables: list[Section], sizes: Sizes, dev: torch.device, jobs: int):
    """(case, (row, paths)) for every case: in this process one after another, in table order; with ``jobs`` > 1 in
    a pool as they finish, each printed at once as a progress line ("[done i/n, t s]" and the row), so that a stage
    cut off by a time limit still leaves what finished in its log."""
    cases = [c for t in tables for c in t.cases]
    if jobs <= 1:
        yield from ((c, run_case(c, sizes, dev.type)) for c in cases)
        return
    import concurrent.futures
    import multiprocessing

    start = time.perf_counter()
    pool = concurrent.futures.ProcessPoolExecutor(
        min(jobs, len(cases)), mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
        initargs=(dev.type == "cpu", max(1, _cores() // jobs)))
    try:
        futures = {pool.submit(run_case, c, sizes, dev.type): c for c in _submission_order(cases)}
        for i, f in enumerate(concurrent.futures.as_completed(futures), 1):
            row, paths = f.result()
            print(f"[done {i}/{len(cases)}, {time.perf_counter() - start:.0f} s] ", end="")
            _print_row(row)
            yield futures[f], (row, paths)
    finally:
        pool.shutdown(cancel_futures=True)


def correctness(sizes: Sizes, dev: torch.device, dtypes, jobs: int = 1) -> bool:
    """Stages 1 and 2: the oracle check, then every case of the matrix, printed table by table in order. With
    ``jobs`` > 1 the cases run in that many spawned processes on the same device (the kernel variants compile in
    parallel; every case still runs whole in one process, so its repeats are compared within it), each printed as
    it finishes, then the tables once all have; each case's "first s" then includes its wait for the device and the
    cores the others share."""
    tables = sections(sizes, [_dtype_name(d) for d in dtypes])
    done, ok = {}, True
    results = _results(tables, sizes, dev, jobs)
    if jobs > 1:
        done = dict(results)
        print()
    for table in tables:
        _header(_describe(table.problem, sizes, dev))
        rows = []
        for case in table.cases:
            row, paths = done[case] if done else next(results)[1]
            rows.append(_printed(row))
            if table.bit:
                ok &= _every_chunk_took(table.bit, table.path, row, paths)
        ok &= report(table.title, rows)
    _problem.cache_clear()
    return ok


def _every_chunk_took(bit: int, path: str, row: Row, paths: list[int]) -> bool:
    """Every chunk of the case's last H-KL-family launch with an L1 term (hkl_kernel.last_paths ``paths`` nonzero;
    0: m = 0) took ``path`` (its ``bit``: 4 the small network, 16 both lists merge-sorted), and at least one had the
    term."""
    paths = [p for p in paths if p]
    if paths and all(p & bit for p in paths):
        return True
    print(f"{row.name}: a chunk did not take {path} (hkl_kernel.last_paths) -> FAIL")
    return False


def _repeats(sizes: Sizes, merge: str, dtype: torch.dtype, repeated_loss: bool = True) -> int:
    """Runs of a case: REPEATS in a full run; under --dry (the interpreter runs programs one after another) only
    merge="mean" in bf16 of a repeated loss, the code path, else 1."""
    return REPEATS if sizes.repeat_all or (repeated_loss and merge == "mean" and dtype == torch.bfloat16) else 1


def _m_of(prob, pairs: str) -> int:
    """m of the sorted-L1 term with uncovered="renormalize" and no cap: min(|U_S|, |U_T|)."""
    from xtoken_ext.bench.costmodel import uncommon_sets

    return min(uncommon_sets(prob.proj, pairs)[1:])


def _printed(row: Row) -> Row:
    _print_row(row)
    return row


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------

def nominal_bandwidth(device_name: str) -> float | None:
    """Nominal HBM bytes/s of a GPU by its name (NOMINAL_HBM), None when it is not in the table."""
    return next((bw for pattern, bw in NOMINAL_HBM if re.search(pattern, device_name)), None)


def hbm_bandwidth(dev: torch.device) -> tuple[float, str]:
    """(bytes/s, source): the nominal figure, else the best of 5 copies of a 2 GiB buffer (read + write)."""
    bw = nominal_bandwidth(torch.cuda.get_device_name(dev))
    if bw is not None:
        return bw, "nominal"
    x = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(5):
        _sync(dev)
        start = time.perf_counter()
        y.copy_(x)
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() / best, "measured device copy"


def floor_bytes(z: torch.Tensor, t: torch.Tensor) -> int:
    """Bytes a fused fwd+bwd must move at least: read the student and teacher rows, write the gradient rows."""
    return z.element_size() * 2 * z.numel() + t.element_size() * t.numel()


def _time(step, runs: int, dev: torch.device, clear=None):
    """step() timed: (first call s, best of ``runs`` next calls s, peak bytes allocated beyond the state before
    those calls, the last output), or the error text. ``clear()`` drops what the first call left (the gradient)
    before that state is taken, so the peak counts it, as bench.losses' peak extra memory does."""
    try:
        _sync(dev)
        start = time.perf_counter()
        step()
        _sync(dev)
        first = time.perf_counter() - start
        if clear is not None:
            clear()
        cuda = dev.type == "cuda"  # the CPU (a test under the interpreter) reports no peak
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if cuda else 0
        best = math.inf
        for _ in range(runs):
            start = time.perf_counter()
            out = step()
            _sync(dev)
            best = min(best, time.perf_counter() - start)
        return first, best, torch.cuda.max_memory_allocated(dev) - base if cuda else math.nan, out
    except Exception as e:  # e.g. an out-of-memory baseline: reported in its row, the table goes on
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _step(z: torch.Tensor, loss):
    """One fwd+bwd: the per-chunk losses (or their mean) summed and differentiated; -> the losses."""
    z.grad = None
    out = loss()
    out.sum().backward()
    return out.detach()


def breakdown(step, dev: torch.device, top: int = 4) -> str:
    """One more step() under torch.profiler: "kernels X ms of wall Y ms: name a ms ×calls, ..." (the ``top`` longest,
    then the rest): the device time of each kernel on CUDA, where wall − X is the time the GPU waited on the host; on
    the CPU (a test) the ops' self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    _sync(dev)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        _sync(dev)
    wall = time.perf_counter() - start
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [(e.self_device_time_total if cuda else e.self_cpu_time_total, e.count, e.key)
              for e in prof.key_averages() if e.device_type == kind]
    events = sorted((e for e in events if e[0] > 0), reverse=True)
    total = sum(e[0] for e in events) / 1e3
    parts = [f"{name[:40]} {us / 1e3:.2f} ms x{n}" for us, n, name in events[:top]]
    if len(events) > top:
        parts.append(f"{len(events) - top} more {sum(e[0] for e in events[top:]) / 1e3:.2f} ms")
    return f"{'kernels' if cuda else 'ops'} {total:.1f} ms of wall {wall * 1e3:.1f} ms: {', '.join(parts)}"


def host_time(z: torch.Tensor, loss, dev: torch.device, runs: int = 3) -> str:
    """"host: forward a ms, backward b ms issued": the host's time to issue a step's forward and its backward, best of
    ``runs``, with no wait on the GPU (the losses make no host sync). The fused forward issues its long kernel last,
    so the GPU idles for about the forward's part at the start of every step: the step's best minus its kernels."""
    fwd = bwd = math.inf
    for _ in range(runs):
        _sync(dev)
        z.grad = None
        start = time.perf_counter()
        out = loss()
        issued = time.perf_counter()
        out.sum().backward()
        fwd, bwd = min(fwd, issued - start), min(bwd, time.perf_counter() - issued)
    _sync(dev)
    z.grad = None
    return f"host: forward {fwd * 1e3:.2f} ms, backward {bwd * 1e3:.2f} ms issued (best of {runs})"


def autotuned(kernel: str) -> str | None:
    """"autotuned: <config> <ms>, ..." for ops.<kernel>_kernel's main kernel: each configuration's time in its last
    autotuning (Triton's do_bench median), the one picked first; None without one (a single configuration, the
    interpreter)."""
    from importlib import import_module

    timings = getattr(import_module(f"xtoken_ext.ops.{kernel}_kernel")._launch.kernel, "configs_timings", None)
    if not timings:
        return None
    def ms(t):
        return t[0] if isinstance(t, (list, tuple)) else t
    ranked = sorted(timings.items(), key=lambda kv: ms(kv[1]))
    return "autotuned: " + ", ".join(f"{c.kwargs} {c.num_warps} warps {ms(t):.2f} ms" for c, t in ranked)


def _real_projection(dev: torch.device):
    """The Llama-3 -> Qwen3 W at the models' logit widths, from the offline tokenizers (on-disk W cache), on dev
    -> (W, seconds to build or load it), or None, the reason printed (e.g. the bench extra's tokenizer packages are
    not installed)."""
    from xtoken_ext.projection import Projection
    from xtoken_ext.testing import offline_tokenizer

    start = time.perf_counter()
    try:
        proj = Projection.from_tokenizers(offline_tokenizer("llama3"), offline_tokenizer("qwen3"), 128_256, 151_936,
                                          progress=False).to(dev)
    except Exception as e:
        print(f"real W: skipped ({type(e).__name__}: {e})")
        return None
    return proj, time.perf_counter() - start


def _one_w_inputs(dev: torch.device, shape, real: bool):
    """Stages 4 and 6's inputs: stage 3's bf16 rows at ``shape`` (default bench.losses.GPU_SHAPE) and one W, the real
    one unless ``real`` is False or it does not load, else Projection.random -> (z, t, the alignment on the CPU, W, its
    name)."""
    from .losses import GPU_SHAPE, _inputs

    z, t, batch_dev, proj = _inputs(shape or GPU_SHAPE, torch.bfloat16, dev)
    loaded = _real_projection(dev) if real else None
    return z, t, batch_dev.to("cpu"), *((loaded[0], "real W") if loaded else (proj, "random W"))


def _column_lengths(proj) -> str:
    n = torch.bincount(proj.indices[proj.indices >= 0].long().cpu(), minlength=proj.teacher_vocab_size)
    return f"{int(n.sum()):,} nonzeros, longest column {int(n.max())}"


def timing(dev: torch.device, runs: int, shape=None, real: bool = True, bandwidth=None, random: bool = True) -> bool:
    """Stage 3 at ``shape`` (rows, V_S, V_T; default bench.losses.GPU_SHAPE), with the real W unless ``real`` is
    False, with Projection.random unless ``random`` is False (then a real W that does not load fails);
    ``bandwidth``: (bytes/s, source) instead of hbm_bandwidth (a test on the CPU). -> False when the fused backend
    fails or its losses disagree with the torch backend's."""
    import xtoken_ext as xt
    from xtoken_ext.testing import kappa, loss_bound, worst_ratio

    from .losses import GPU_SHAPE, _inputs, _release_style

    shape = shape or GPU_SHAPE
    _, V_S, V_T = shape
    bw, source = bandwidth or hbm_bandwidth(dev)
    z, t, batch_dev, proj = _inputs(shape, torch.bfloat16, dev)
    batch = batch_dev.to("cpu")  # the losses plan on a CPU alignment (no host sync)
    moved = floor_bytes(z, t)
    floor = moved / bw
    kap = kappa(z, t, 1.0)
    print(f"timing: {z.shape[1]:,} student x {t.shape[1]:,} teacher rows, V_S {V_S:,} x V_T {V_T:,} bf16, "
          f"{batch.row_spans().shape[0]:,} chunks; HBM floor {moved / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s ({source}) "
          f"= {floor * 1e3:.2f} ms")
    projections = [("random W", proj)] if random else []
    loaded = _real_projection(dev) if real else None
    if not (loaded or random):
        return False
    if loaded:
        w, seconds = loaded
        projections.append(("real W", w))
        print(f"real W (Llama-3 x Qwen3, offline tokenizers): {seconds:.1f} s to build or load; "
              f"{_column_lengths(w)} (random W: {_column_lengths(proj)})")
    head = (f"{'W':<10}{'loss':<6}{'impl':<24}{'first s':>9}{'best ms':>10}{'x floor':>9}{'GB/s':>8}"
            f"{'peak GiB':>10}{'loss vs torch':>15}")
    print(f"first = first call (compile + autotune); best of {runs} next calls; loss vs torch = worst per-chunk "
          f"|fused - torch| / (2 x bound)\n{head}\n{'-' * len(head)}", flush=True)
    ok = True
    for wname, pr in projections:
        for kind in TIMED_LOSSES:
            fn = getattr(xt, f"{kind}_loss")
            torch_losses = None
            for label, impl in (("chunked torch", "torch"), ("release-style unfused", "release"),
                                ("xtoken fused (Triton)", "triton")):
                if impl == "release":
                    loss = functools.partial(_release_style, kind, z, t, batch_dev, pr)
                else:
                    loss = functools.partial(fn, z, t, batch, pr, reduction="none", backend=impl)
                z.grad = None
                r = _time(functools.partial(_step, z, loss), runs, dev,
                          clear=functools.partial(setattr, z, "grad", None))
                if isinstance(r, str):
                    print(f"{wname:<10}{kind:<6}{label:<24}  failed: {r}", flush=True)
                    ok &= impl != "triton"
                    continue
                first, best, peak, out = r
                agree = ""
                if impl == "torch":
                    torch_losses = out
                elif impl == "triton" and torch_losses is not None:
                    ratio = worst_ratio(out, torch_losses, 2 * loss_bound(torch_losses, 1.0, kap, torch.bfloat16))
                    ok &= ratio <= 1
                    agree = f"{ratio:.3f} {'PASS' if ratio <= 1 else 'FAIL'}"
                print(f"{wname:<10}{kind:<6}{label:<24}{first:>9.2f}{best * 1e3:>10.1f} {best / floor:>7.3g}x"
                      f"{moved / best / 1e9:>8.0f}{peak / 2**30:>10.2f}{agree:>15}", flush=True)
                if impl == "triton":
                    print(f"{'':<10}{'':<6}{breakdown(functools.partial(_step, z, loss), dev)}", flush=True)
                    print(f"{'':<16}{host_time(z, loss, dev)}", flush=True)
                    tuned = autotuned("pkl" if kind == "pkl" else "hkl")
                    if tuned:
                        print(f"{'':<16}{tuned}", flush=True)
    z.grad = None
    return ok


# P-KL launch configurations of the sweep (stage 4) after ops.pkl_kernel's own autotune configs (pkl_sweep): (warps,
# register cap, programs per SM, BLOCK_T, LANE1). They trade registers for resident warps (the first GPU run,
# 2026-12-04 on an H200, measured P-KL 6.8-10.4x slower than bench/costmodel.py's issue-bound model, which assumes 4
# instructions per clock per SM with one 8-warp program resident) or shorten the teacher tile.
PKL_SWEEP_MORE = ((8, 128, 2, 2048, False), (8, 128, 2, 2048, True), (4, 255, 2, 2048, False),
                  (4, 128, 4, 2048, False), (16, 128, 1, 2048, False), (8, 255, 1, 1024, False))


def pkl_sweep() -> tuple:
    """The sweep's configurations: ops.pkl_kernel._CONFIGS as the kernel runs them (one program per SM, its GPU
    teacher tile; its gathers as Triton lays out the tile or one element a thread, LANE1), then PKL_SWEEP_MORE. Read
    at the call: importing the kernel module fixes its tiles for the interpreter or the GPU (--dry sets that later)."""
    from xtoken_ext.ops import pkl_kernel as pk

    return tuple((c.num_warps, c.maxnreg, 1, pk.TILES_GPU["BLOCK_T"], c.kwargs["LANE1"]) for c in pk._CONFIGS) \
        + PKL_SWEEP_MORE


def sweep(dev: torch.device, runs: int, shape=None, real: bool = True, configs=None, bandwidth=None) -> bool:
    """Stage 4: fused P-KL fwd+bwd (stage 3's inputs and W, the real one where it loads) under each launch
    configuration of ``configs`` (default pkl_sweep()) in turn, with the time of its kernels (breakdown) and its
    losses checked against the torch backend's; ops.pkl_kernel's own configuration is restored afterwards. -> False
    when a configuration fails or disagrees. Under the interpreter (a test) only the program count and LANE1 take
    effect; ``bandwidth`` as in timing."""
    import triton

    import xtoken_ext as xt
    from xtoken_ext.ops import pkl_kernel as pk
    from xtoken_ext.testing import kappa, loss_bound, worst_ratio

    z, t, batch, proj, wname = _one_w_inputs(dev, shape, real)
    floor = floor_bytes(z, t) / (bandwidth or hbm_bandwidth(dev))[0]
    loss = functools.partial(xt.pkl_loss, z, t, batch, proj, reduction="none")
    ref = loss(backend="torch").detach()
    bound = 2 * loss_bound(ref, 1.0, kappa(z, t, 1.0), torch.bfloat16)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    head = (f"{'warps':>5}{'maxnreg':>8}{'per SM':>7}{'BLOCK_T':>8}{'LANE1':>6}{'first s':>9}{'best ms':>9}"
            f"{'x floor':>9}  vs torch")
    print(f"sweep: fused P-KL fwd+bwd, {wname}, best of {runs}; {head.strip()} then its kernels\n{head}\n"
          f"{'-' * len(head)}", flush=True)
    saved = pk._launch, pk._num_programs, dict(pk._TILES)
    block_s = pk._CONFIGS[0].kwargs["BLOCK_S"]  # the student tile of every row (the kernel's)
    ok = True
    try:
        for warps, nreg, per_sm, block_t, lane1 in configs or pkl_sweep():
            pk._launch = pk.launch_configs([triton.Config({"BLOCK_S": block_s, "LANE1": lane1}, num_warps=warps,
                                                          maxnreg=nreg)])
            pk._num_programs = functools.partial(lambda n, K, device: max(1, min(K, n)), per_sm * sms)
            if not pk.interpret():
                pk._TILES["BLOCK_T"] = block_t
            step = functools.partial(_step, z, functools.partial(loss, backend="triton"))
            r = _time(step, runs, dev, clear=functools.partial(setattr, z, "grad", None))
            row = f"{warps:>5}{nreg:>8}{per_sm:>7}{block_t:>8}{'yes' if lane1 else 'no':>6}"
            if isinstance(r, str):
                print(f"{row}  failed: {r}", flush=True)
                ok = False
                continue
            first, best, _, out = r
            ratio = worst_ratio(out, ref, bound)
            ok &= ratio <= 1
            print(f"{row}{first:>9.2f}{best * 1e3:>9.1f} {best / floor:>7.3g}x  {ratio:.3f} "
                  f"{'PASS' if ratio <= 1 else 'FAIL'}\n{'':>12}{breakdown(step, dev)}", flush=True)
    finally:
        pk._launch, pk._num_programs = saved[:2]
        pk._TILES.update(saved[2])
        z.grad = None
    return ok


def phases(dev: torch.device, shape=None, real: bool = True) -> bool:
    """Stage 6 at ``shape`` (default bench.losses.GPU_SHAPE), with the real W unless ``real`` is False (then, or
    where it does not load, Projection.random): per fused kernel (P-KL, H-KL), on CUDA one fwd+bwd to compile its
    timed variant, then one profiled (breakdown) under ops._tl.PhaseTimes: each phase's total over the programs / their
    count (ms on CUDA; laps under the interpreter), beside the step's kernel times with the stamps and, profiled
    before, without. -> False when a step fails, its timed losses differ from the untimed (CUDA; the tests check it
    under the interpreter) or a phase total is negative."""
    import xtoken_ext as xt
    from xtoken_ext.ops import _tl

    z, t, batch, proj, wname = _one_w_inputs(dev, shape, real)
    cuda = dev.type == "cuda"
    unit, scale = ("ms", 1e-6) if cuda else ("laps", 1)
    print(f"phases: fused fwd+bwd, {wname}; per kernel its phases' mean per program ({unit}; "
          f"{'the GPU global timer' if cuda else 'the interpreter: laps taken'}) and share", flush=True)
    ok = True
    try:
        for kind, kernel in (("pkl", "P-KL"), ("hkl", "H-KL")):
            step = functools.partial(_step, z, functools.partial(getattr(xt, f"{kind}_loss"), z, t, batch, proj,
                                                                 reduction="none", backend="triton"))
            try:
                if cuda:  # both variants compiled (and autotuned: Launch refuses to autotune a timed launch)
                    ref = step()
                    with _tl.PhaseTimes():
                        same = torch.equal(step(), ref)  # timing changes no result
                    ok &= same
                    if not same:
                        print(f"{kernel:<6}timed losses differ from the untimed ones (FAIL)", flush=True)
                untimed = breakdown(step, dev)
                with _tl.PhaseTimes() as pt:
                    timed = breakdown(step, dev)
            except Exception as e:  # a failed compile or launch: report it, go on with the next kernel
                print(f"{kernel:<6} failed: {type(e).__name__}: {e}", flush=True)
                ok = False
                continue
            tot, n = pt.totals[kernel], pt.programs[kernel]
            whole = sum(tot.values()) or 1
            ok &= min(tot.values()) >= 0
            parts = ", ".join(f"{p} {v / n * scale:.{3 if cuda else 1}f} ({100 * v / whole:.0f} %)"
                              for p, v in tot.items())
            print(f"{kernel:<6}{n} programs: {parts}; sum {whole / n * scale:.{3 if cuda else 1}f} {unit}\n"
                  f"{'':<6}with the stamps: {timed}\n{'':<6}without: {untimed}", flush=True)
    finally:
        z.grad = None
    return ok


# ---------------------------------------------------------------------------------------------------------------

def _configuration(dev: torch.device, sizes: Sizes, dry: bool) -> None:
    import triton

    import xtoken_ext

    if dry:
        where = "CPU under the Triton interpreter (TRITON_INTERPRET=1; --dry: no timing)"
    else:
        p = torch.cuda.get_device_properties(dev)
        where = (f"{torch.cuda.get_device_name(dev)}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                 f"CUDA {torch.version.cuda}")
    print(f"GPU check: {where}\npython {platform.python_version()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, xtoken_ext {xtoken_ext.__version__}\ncorrectness sizes: {sizes}\n", flush=True)


def cannot_run(dry: bool) -> str | None:
    """Why the check cannot run in this process (None when it can): not a failed check, a setup error."""
    if dry:
        from xtoken_ext.ops._common import interpret  # no triton import

        if "triton" in sys.modules and not interpret():  # triton builds its library for the interpreter at import
            return ("--dry needs TRITON_INTERPRET=1 before triton is imported; run it in a fresh process "
                    "(python -m xtoken_ext.bench.gpu --dry)")
    elif not torch.cuda.is_available():
        return "the GPU check needs a CUDA device; --dry runs it on the CPU under the Triton interpreter"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: unset it for the GPU run, or use --dry"
    return None


def _setup_error(dry: bool, stage: str) -> str | None:
    """cannot_run's reason, or the stage that --dry lacks."""
    return cannot_run(dry) or (f"--dry has no {stage} stage" if dry and stage in ("timing", "sweep") else None)


def run(quick: bool = False, dry: bool = False, stage: str = "all", jobs: int | None = None,
        real_only: bool = False) -> bool:
    """The whole check (module docstring), or one ``stage`` of it ("correctness": stages 1 and 2, "timing": stage 3,
    "sweep": stage 4, "probe": stage 5, "phases": stage 6); prints its tables and returns True when everything
    passed. ``jobs``: worker processes of stages 1-2 (None: ``default_jobs``); ``real_only``: the timing stage without
    Projection.random. Raises RuntimeError when it cannot run here (``_setup_error``)."""
    reason = _setup_error(dry, stage)
    if reason:
        raise RuntimeError(reason)
    if dry:
        from xtoken_ext.testing import fast_interpreter

        os.environ["TRITON_INTERPRET"] = "1"
        fast_interpreter()
    dev = torch.device("cpu" if dry else "cuda")
    sizes = DRY if dry else FULL
    _configuration(dev, sizes, dry)
    start = time.perf_counter()
    dtypes = [DTYPES["bf16"]] if quick else list(DTYPES.values())
    ok = True
    if stage in ("all", "correctness"):
        with warnings.catch_warnings():
            if dry:  # masked lanes of the interpreter evaluate log(0), 0·inf, ... in numpy before tl.where drops them
                warnings.simplefilter("ignore", RuntimeWarning)
            ok = correctness(sizes, dev, dtypes, default_jobs(dry) if jobs is None else jobs)
        print(f"[correctness: {time.perf_counter() - start:.1f} s]\n", flush=True)
    if not dry and stage in ("all", "timing"):
        mid = time.perf_counter()
        ok &= timing(dev, 1 if quick else 3, random=not real_only)
        print(f"[timing: {time.perf_counter() - mid:.1f} s]")
    if not dry and stage in ("all", "sweep"):
        mid = time.perf_counter()
        ok &= sweep(dev, 2)
        print(f"[sweep: {time.perf_counter() - mid:.1f} s]")
    if stage in ("all", "probe"):
        from .permute import probe

        mid = time.perf_counter()
        ok &= probe(dev, shape=(12, sizes.V_S, sizes.V_T) if dry else None, real=not dry)
        print(f"[probe: {time.perf_counter() - mid:.1f} s]")
    if stage in ("all", "phases"):
        mid = time.perf_counter()
        ok &= phases(dev, shape=(12, sizes.V_S, sizes.V_T) if dry else None, real=not dry)
        print(f"[phases: {time.perf_counter() - mid:.1f} s]")
    print(f"\nGPU check{' (dry)' if dry else ''}: {'PASS' if ok else 'FAIL'} in {time.perf_counter() - start:.1f} s",
          flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xtoken_ext.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only in the correctness stage, one timed run")
    parser.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny sizes, no timing (CI)")
    parser.add_argument("--stage", choices=("all", "correctness", "timing", "sweep", "probe", "phases"),
                        default="all",
                        help="run stages 1-2 (correctness, repeatability), stage 3 (timing), stage 4 (sweep of "
                             "P-KL launch configurations), stage 5 (probe of P-KL's permutation) or stage 6 (the "
                             "fused kernels' time per phase) alone")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="processes that run the correctness cases side by side, compiling their kernels in "
                             f"parallel (default: one per core up to 16, here {default_jobs(False)}; 1 with --dry)")
    parser.add_argument("--real-only", action="store_true",
                        help="the timing stage with the real Llama-3 x Qwen3 W only (no Projection.random): each W "
                             "compiles its own H-KL variant, about two minutes")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    reason = _setup_error(args.dry, args.stage)
    if reason:
        parser.error(reason)  # exit 2: a setup error, not a failed check (1)
    return 0 if run(quick=args.quick, dry=args.dry, stage=args.stage, jobs=args.jobs, real_only=args.real_only) else 1


if __name__ == "__main__":
    sys.exit(main())
