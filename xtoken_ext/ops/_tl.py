"""Triton helpers shared by the fused row-space kernels of ops.pkl and ops.hkl (``@triton.jit`` functions inline
at their call sites; constexpr arguments such as SPARSE / BLOCK specialize them). Imports triton: only the kernel
modules (ops.pkl_kernel / ops.hkl_kernel, imported lazily by their ops) import this module.

Notation: τ temperature (inv_tau = 1/τ), a chunk's rows [lo, hi) of a side, C teacher columns per row (V_T dense,
k sparse; sparse column ids are −1 padded), A the allowed teacher columns (mask[v] != 0).
"""
from __future__ import annotations

import concurrent.futures
import warnings

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda, libdevice

from ._common import interpret

NEG = tl.constexpr(-1.0e30)  # finite running-max seed: exp(-inf - NEG) = 0, never inf - inf
# the SFU forms (fast_exp, fast_log) on NVIDIA GPUs: the interpreter runs no extern (libdevice) call, and ROCm's
# libdevice has no fast_logf
SFU = tl.constexpr(not interpret() and torch.version.hip is None)


def launcher(kernel, interp_meta, configs, key=(), **autotune_kw) -> Launch:
    """(grid, *args, **kw) -> kernel[grid](*args, **kw): under the interpreter one fixed small config
    ``interp_meta`` (it is slow and cannot time configs), else autotuned over ``configs`` keyed on ``key``
    (a single config is used as is, without timing)."""
    if interpret():
        return Launch(kernel, interp_meta)
    tuned = triton.autotune(configs, key=list(key), **autotune_kw)(kernel)
    return Launch(tuned, {}, configs if len(configs) > 1 else (), key)


class Launch:
    """kernel[grid](*args, **kwargs, **meta). With several ``configs`` (``kernel`` autotuned over them on ``key``):
    before the first call of each key, every config compiles at once, one thread each, with the arguments the
    autotuner then times them with, so that it finds them compiled. Triton compiles a kernel on one core and releases
    the GIL for most of it (the H-KL kernel's two configs, first-row dense variant at the real Llama-3 × Qwen3 W's
    4,096-lane bound, for sm_90 on 2 cores: 44.5 s in two threads, 85.3 s one after the other); the autotuner
    compiles its configs one after another (150 s of a first call on an H200 machine). Compiling ahead only saves
    time: where it fails, a warning says so and the autotuner compiles as before."""

    def __init__(self, kernel, meta: dict, configs=(), key=()):
        self.kernel, self.meta, self.configs, self.key, self.warm = kernel, meta, list(configs), list(key), set()

    def __call__(self, grid, *args, **kwargs):
        if self.configs:
            if kwargs.get("PROFILE") and self._key(args, kwargs) not in self.warm:
                raise RuntimeError(f"{self.kernel.fn.__name__}: a timed launch (PhaseTimes) of a shape not autotuned "
                                   "yet; call the op once untimed first, so that autotuning times the untimed kernel")
            self._compile_ahead(grid, args, kwargs)
        self.kernel[grid](*args, **kwargs, **self.meta)

    def _key(self, args, kwargs) -> tuple:
        """The autotuner's key of a call: the values of the ``key`` arguments, the tensors' dtypes."""
        named = dict(zip(self.kernel.fn.arg_names, args), **kwargs)
        return (tuple(named[k] for k in self.key if k in named)
                + tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))

    def _compile_ahead(self, grid, args, kwargs) -> None:
        fn = self.kernel.fn  # the jitted kernel under the autotuner
        key = self._key(args, kwargs)
        if key in self.warm:
            return
        self.warm.add(key)
        device = torch.cuda.current_device()  # a new thread is on device 0: each sets the caller's
        if hasattr(fn, "device_caches"):  # Triton's per-device kernel cache, created here: two threads creating it at
            fn.device_caches[device]  # once would each fill a copy of their own

        def compile_one(config):
            with torch.cuda.device(device):
                fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())

        try:
            with concurrent.futures.ThreadPoolExecutor(len(self.configs)) as pool:
                for f in [pool.submit(compile_one, c) for c in self.configs]:
                    f.result()
        except Exception as e:  # e.g. a config's compile error, which autotuning then reports as it always did
            warnings.warn(f"compiling the {len(self.configs)} configurations of {fn.__name__} at once failed ({e!r});"
                          " autotuning compiles what is missing as usual", RuntimeWarning, stacklevel=3)


# PhaseTimes' buffer row: TRACE phase slots, then (logical clock) the trace's length and its phases, up to ROW
ROW, TRACE = tl.constexpr(64), tl.constexpr(8)


class PhaseTimes:
    """``with PhaseTimes() as pt:`` the fused P-KL and H-KL kernels launched inside time their phases (their
    PHASES), each program summing the time between its stamps per phase (``lap``): the GPU's global timer (ns) on an
    NVIDIA GPU, else (the interpreter) a logical clock that ticks once per stamp of any program, each program also
    tracing the phases it lapped in order. A lap is taken when the program's thread 0 reaches it: time its other
    warps still spend in a phase goes to the next phase that waits for them at a barrier. On leaving (a host sync),
    ``pt.totals`` = {kernel: {phase: summed over its programs}}, ``pt.programs`` = {kernel: programs launched} and,
    on the logical clock, ``pt.traces`` = {kernel: [each program's phases in lap order, its first ROW - TRACE - 1]}.
    The timed variant compiles apart (PROFILE); its stamps cost a few instructions and a load and store each. The
    kernels must have been autotuned for the shape first (an untimed call): ops._tl.Launch refuses to autotune a
    timed one."""
    active = None

    def __init__(self):
        self.totals, self.programs, self.traces, self._runs, self._outer = {}, {}, {}, [], None

    def __enter__(self):
        self._outer, PhaseTimes.active = PhaseTimes.active, self
        return self

    def __exit__(self, exc_type, *exc):
        PhaseTimes.active = self._outer
        if exc_type is not None:  # reading the buffers would sync, and could hide the error
            return
        for name, phases, buf, profile in self._runs:
            rows = buf[1:].tolist()
            t = self.totals.setdefault(name, dict.fromkeys(phases, 0))
            for i, p in enumerate(phases):
                t[p] += sum(r[i] for r in rows)
            self.programs[name] = self.programs.get(name, 0) + len(rows)
            if profile == 2:
                t0 = TRACE.value + 1
                self.traces.setdefault(name, []).extend([phases[i] for i in r[t0:t0 + r[t0 - 1]]] for r in rows)


def phase_args(name: str, phases: tuple, nprog: int, device, placeholder: torch.Tensor):
    """A launch's (prof_ptr, PROFILE): the placeholder and 0 (no timing) unless a PhaseTimes is active, else a zeroed
    int64 [1 + nprog, ROW] buffer (row 0: the logical clock; row 1 + p: program p's phases, ``lap``) and 1 (the global
    timer, an NVIDIA GPU) or 2 (the logical clock, the interpreter)."""
    pt = PhaseTimes.active
    if pt is None:
        return placeholder, 0
    assert len(phases) <= TRACE.value
    if not interpret() and (device.type != "cuda" or torch.version.hip is not None):
        raise RuntimeError("phase timing reads an NVIDIA GPU's global timer (or runs under the Triton interpreter)")
    buf = torch.zeros(1 + nprog, ROW.value, dtype=torch.int64, device=device)
    profile = 2 if interpret() else 1
    pt._runs.append((name, phases, buf, profile))
    return buf, profile


@triton.jit
def stamp(prof_ptr, PROFILE: tl.constexpr):
    """Now, for lap: the global timer in ns (PROFILE 1), the logical clock's next tick (2), else 0."""
    if PROFILE == 1:
        now = cuda.globaltimer()
    elif PROFILE == 2:
        now = tl.atomic_add(prof_ptr, 1)
    else:
        now = tl.zeros((), tl.int64)
    return now


@triton.jit
def lap(t, prof_ptr, phase, PROFILE: tl.constexpr):
    """The time since stamp t added to this program's phase slot (prof_ptr[ROW (program + 1) + phase]; on the logical
    clock the phase also appended to its trace) -> now; nothing without PROFILE (t returned: Triton drops the constant
    that the loops carry)."""
    if PROFILE:
        now = stamp(prof_ptr, PROFILE)
        row = prof_ptr + ROW * (tl.program_id(0) + 1)
        tl.store(row + phase, tl.load(row + phase) + (now - t))
        if PROFILE == 2:
            n = tl.atomic_add(row + TRACE, 1)
            tl.store(row + TRACE + 1 + n, phase, mask=n < ROW - TRACE - 1)
    else:
        now = t
    return now


@triton.jit
def chunk_rows(spans_ptr, k, MEAN: tl.constexpr):
    """Chunk k's merged student rows [s_lo, s_hi) and teacher rows [t_lo, t_hi) (first/chain: first rows only)."""
    s_lo = tl.load(spans_ptr + 4 * k)
    s_hi = tl.load(spans_ptr + 4 * k + 1)
    t_lo = tl.load(spans_ptr + 4 * k + 2)
    t_hi = tl.load(spans_ptr + 4 * k + 3)
    if not MEAN:
        s_hi = s_lo + 1
        t_hi = t_lo + 1
    return s_lo, s_hi, t_lo, t_hi


@triton.jit
def chain_offset(chain_ptr, span_ptr, CHAIN: tl.constexpr, BLOCK: tl.constexpr):
    """Σ_{lo<r<hi} chain[r] for the full span [lo, hi) = span_ptr[0:2] (0 unless CHAIN)."""
    acc = tl.zeros((), tl.float32)
    if CHAIN:
        lo = tl.load(span_ptr)
        hi = tl.load(span_ptr + 1)
        offs = tl.arange(0, BLOCK)
        for r0 in range(lo + 1, hi, BLOCK):
            rr = r0 + offs
            acc += tl.sum(tl.load(chain_ptr + rr, mask=rr < hi, other=0.0))
    return acc


@triton.jit
def lse_step(m, l, x):
    """Fold tile x into an online LSE (running max m, reduced per tile; l per lane, Σ_lanes l = Σ exp(x − m): the
    LSE is m + log Σ l, one sum after the loop instead of one per tile) -> (m', l', exp(x − m'), exp(m − m'))."""
    m_new = tl.maximum(m, tl.max(x))
    alpha = fast_exp(m - m_new)
    e = fast_exp(x - m_new)
    return m_new, l * alpha + e, e, alpha


GROUP = tl.constexpr(8)  # lanes a thread holds of a 16-byte bf16 load: lse_groups' group


@triton.jit
def lanes(v, G: tl.constexpr):
    """A per-group value [N / G] on each of its group's G lanes [N]."""
    N: tl.constexpr = v.shape[0] * G
    return tl.reshape(tl.broadcast_to(v[:, None], [N // G, G]), [N])


@triton.jit
def lse_groups(m, l, x, G: tl.constexpr):
    """lse_step with a running max per group of G consecutive lanes (m: [N / G]): with G the lanes a thread holds of
    a 16-byte bf16 load (8), a reduction inside the thread and one exp per thread for the rescale, where lse_step's
    tile max crosses threads (shuffles, shared memory, a barrier: ~35 instructions per thread per 2048-lane tile at
    8 warps, sm_90 SASS); the caller rescales the groups' sums to the row's max once after its loop (lse_merge).
    -> (the groups' max m', l', exp(x − m'), and per lane exp(m − m'), m − m' and m')."""
    N: tl.constexpr = x.shape[0]
    m_new = tl.maximum(m, tl.max(tl.reshape(x, [N // G, G]), 1))
    m_lane = lanes(m_new, G)
    e = fast_exp(x - m_lane)
    alpha = lanes(fast_exp(m - m_new), G)
    return m_new, l * alpha + e, e, alpha, lanes(m - m_new, G), m_lane


@triton.jit
def lse_merge(m_g, G: tl.constexpr):
    """The row's max m of lse_groups' group maxima m_g and, per lane, (exp(m_g − m), m_g − m): a lane's sums
    Σ e^{x − m_g} times the first are Σ e^{x − m}."""
    m = tl.max(m_g)
    return m, lanes(fast_exp(m_g - m), G), lanes(m_g - m, G)


@triton.jit
def probe_max(probe, x):
    """Fold x (fp32) into a per-lane running max that propagates NaN (max.NaN, one instruction per element): a NaN or
    +inf x leaves its lane NaN or +inf (probe_bad), −inf and finite values do not — the bad-input test of rows whose
    every column is not in the online sum (a teacher's outside A), where a compare per element cost ~2.4."""
    return tl.maximum(probe, x, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def probe_bad(probe):
    """1 if a lane of probe_max's running max is NaN or +inf, else 0 (one reduction per row)."""
    return tl.max(((probe != probe) | (probe == float("inf"))).to(tl.int32))


@triton.jit
def row_bad(row_ptr, C, l, BLOCK: tl.constexpr):
    """1 if a dense row's C logits hold a NaN or +inf, else 0, from l, the sum of its online softmax over every
    column (lse_step): such a logit makes it NaN (exp(NaN), exp(inf − inf) once the max is +inf; the sums only
    grow, never overflow), so the row is scanned only then — as it is when x/τ overflows a finite x, which is not
    bad input — instead of testing every element in the streaming pass (~2.4 instructions per element, 12 % of
    P-KL's A, sm_90 SASS)."""
    probe = tl.full((BLOCK,), float("-inf"), tl.float32)
    if l != l:
        for c0 in range(0, C, BLOCK):
            o = c0 + tl.arange(0, BLOCK)
            # fp32: the interpreter evaluates a bf16 NaN's x != x as False
            probe = probe_max(probe, tl.load(row_ptr + o, mask=o < C, other=0.0).to(tl.float32))
    return probe_bad(probe)


@triton.jit
def fast_exp(x):
    """e^x (fp32) for terms of a sum led by e^0 = 1 (online softmax): on a GPU ex2.approx.ftz of x·log₂e (libdevice
    fast_expf), 2 instructions where tl.exp's ex2.approx without .ftz rescales around it (~6): a result below 2^-126
    becomes 0, an absolute error < 2^-126 against a sum ≥ 1; tl.exp under the interpreter."""
    if SFU:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def fast_div(a, b):
    """a/b (fp32, b in [2^-126, 2^126]): on a GPU the SFU's reciprocal times a (libdevice fast_dividef,
    div.approx.ftz: ~2 ulp, a result below 2^-126 becomes 0) where a correctly rounded division takes ~10
    instructions; a / b under the interpreter."""
    if SFU:
        return libdevice.fast_dividef(a, b)
    else:
        return a / b


@triton.jit
def fast_log(x):
    """ln x (fp32, x ≥ 0), per element: on a GPU the SFU's lg2.approx times ln 2 (libdevice fast_logf; CUDA's __logf
    bound: absolute error ≤ 2^-21.41 on [0.5, 2], ≤ 3 ulp elsewhere), ~6 instructions where tl.log's correctly
    rounded logf takes ~25 (sm_90 SASS); tl.log under the interpreter. lg2.approx.ftz would flush a subnormal x to
    0 (ln = −inf): such x is scaled by 2^24 first, as logf does. (Triton's own tl.exp is the SFU's ex2.approx.)"""
    small = x < 1.1754943508222875e-38  # 2^-126
    y = fast_log_normal(tl.where(small, x * 16777216.0, x))
    return y - tl.where(small, 16.635532333438686, 0.0)  # 24 ln 2


@triton.jit
def fast_log_pair(x, x24):
    """fast_log(x) given x24 = 2^24 x as well, formed without x's rounding (a subnormal x keeps its bits there):
    the scaling's multiply saved, a subnormal x's log taken from x24."""
    small = x24 < 1.9721522630525295e-31  # 2^-102: x < 2^-126
    y = fast_log_normal(tl.where(small, x24, x))
    return y - tl.where(small, 16.635532333438686, 0.0)  # 24 ln 2


@triton.jit
def fast_log_normal(x):
    """fast_log for x ≥ 2^-126 or 0 (no subnormal x, whose scaling costs ~5 instructions per element)."""
    if SFU:
        return libdevice.fast_logf(x)
    else:
        return tl.log(x)


@triton.jit
def scatter(ptr, val, mask, R: tl.constexpr):
    """tl.store(ptr, val, mask=mask) of [N] operands held R consecutive lanes per thread (as a 16-byte vector load
    leaves them: R = 8 lanes of 16 bits, 4 of 32; mask None: every lane), stored in that layout. Triton gives a
    scatter (pointers of unknown contiguity) one lane per thread and converts its pointers, values and mask to it
    through shared memory (~90 instructions and 4 barriers per 2048-lane tile at 8 warps, sm_90 SASS) or recomputes
    them there; the same store of the [R, N/R] transpose of their [N/R, R] view gets a layout that holds each
    thread's R lanes where they are."""
    N: tl.constexpr = ptr.shape[0]
    p = tl.trans(tl.reshape(ptr, [N // R, R]))
    v = tl.trans(tl.reshape(val, [N // R, R]))
    if mask is None:
        tl.store(p, v)
    else:
        tl.store(p, v, mask=tl.trans(tl.reshape(mask, [N // R, R])))


@triton.jit
def softmax_tile(row_ptr, cols, mask, inv_tau, lse, EVICT: tl.constexpr):
    """softmax(row/τ)[cols] from the row's lse (0 on masked lanes); EVICT: the load's eviction policy (a row's last
    read: "evict_first")."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT)
    return softmax_of(x, inv_tau, lse)


@triton.jit
def softmax_of(x, inv_tau, lse):
    """softmax(row/τ) at logits x of the row (any float dtype) from its lse: exp(x/τ − lse). tl.exp: ex2.approx
    without .ftz, a p below 2^-126 kept (tl.exp2 of x·(log₂e/τ) − lse·log₂e compiles to the .ftz form, which would
    flush it: a p of 0 makes Q = 0 at a column only such students reach, with eps = 0 a loss of +inf; softmax_exp2
    shifts the exponent instead, where the caller can take the scale)."""
    return tl.exp(x.to(tl.float32) * inv_tau - lse)


LOG2E = tl.constexpr(1.4426950408889634)
P_SHIFT = tl.constexpr(24)  # softmax_exp2 returns 2^24 p; its callers fold P_UNIT = 2^-24 into a scalar factor
P_UNIT = tl.constexpr(2.0 ** -24)


@triton.jit
def softmax_exp2(x, a, b):
    """2^24 softmax(row/τ) at logits x (any float dtype) of a row from a = log₂e/τ and b = lse·log₂e − 24 (exp2_args):
    2^(x a − b), one multiply-add and ex2. On a GPU tl.exp2 is ex2.approx.ftz, which flushes a result below 2^-126:
    scaled by 2^24, only a p below 2^-150 is flushed, one that rounds to 0 in fp32 anyway, so the range is tl.exp's
    (ex2 without .ftz: ~5 more instructions per element) and the caller folds 2^-24 into a scalar factor. The shift
    costs argument bits: |x a − b| ≤ 24 + |log₂ p|, an error ≤ u (24 + |log₂ p|) ln 2 relative in p, against the
    u (|x|/τ + |lse|) log₂e that rounding x/τ − lse costs either way."""
    return tl.exp2(x.to(tl.float32) * a - b)


@triton.jit
def exp2_args(inv_tau, lse):
    """(a, b) of softmax_exp2 for a row of log-sum-exp lse at temperature 1/inv_tau."""
    return inv_tau * LOG2E, lse * LOG2E - P_SHIFT


@triton.jit
def softmax_tile_exp2(row_ptr, cols, mask, inv_tau, lse):
    """2^24 softmax(row/τ)[cols] from the row's lse (0 on masked lanes): softmax_tile's scaled twin."""
    a, b = exp2_args(inv_tau, lse)
    return softmax_exp2(tl.load(row_ptr + cols, mask=mask, other=float("-inf")), a, b)


@triton.jit
def logp_sum(x_ptr, stride, lse_ptr, lo, hi, cols, mask, inv_tau, BLOCK: tl.constexpr):
    """Σ_{lo≤r<hi} (x_r[cols]/τ − lse_r) on one tile (the row merge of log-softmax values, before the mean)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for r in range(lo, hi):
        acc += tl.load(x_ptr + r * stride + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau - tl.load(lse_ptr + r)
    return acc


@triton.jit
def col_tile(tc_row, mask_ptr, c0, C, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """Column tile at c0 of a teacher row -> (positions o, column ids v (dense: o; sparse: tc_row[o], padding
    -> 0), inside = lane holds a column, ok = inside ∧ v ∈ A)."""
    o = c0 + tl.arange(0, BLOCK)
    if SPARSE:
        v = tl.load(tc_row + o, mask=o < C, other=-1)
        inside = v >= 0
        v = tl.where(inside, v, 0)
    else:
        v = o
        inside = o < C
    return o, v, inside, inside & (tl.load(mask_ptr + v, mask=inside, other=0) != 0)


@triton.jit
def scatter_later_rows(t_ptr, stride_t, tc_ptr, stride_tc, mask_ptr, lse_t_ptr, tacc_row, tcnt_row, t_lo, t_hi, C,
                       inv_tau, BLOCK: tl.constexpr):
    """Sparse teacher, rows after the first: tacc[v] += t_r[v]/τ − lse_r and tcnt[v] += 1 on each row's allowed
    columns, so the merged T is finite only where every row of the chunk has column v. A row's columns are unique:
    plain read-add-writes, one row after the other (a barrier between rows), so each sum is added in row order on
    every run (float atomics would add three or more rows in an order that varies from run to run). The rows' lse
    were stored by single lanes: a barrier first."""
    tl.debug_barrier()
    for r in range(t_lo + 1, t_hi):
        lse_r = tl.load(lse_t_ptr + r)
        for c0 in range(0, C, BLOCK):
            o, v, inside, ok = col_tile(tc_ptr + r * stride_tc, mask_ptr, c0, C, True, BLOCK)
            x = tl.load(t_ptr + r * stride_t + o, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_r
            tl.store(tacc_row + v, tl.load(tacc_row + v, mask=ok, other=0.0) + x, mask=ok)
            tl.store(tcnt_row + v, tl.load(tcnt_row + v, mask=ok, other=0) + 1, mask=ok)
        tl.debug_barrier()  # row r's sums are read by other lanes at row r + 1 and after


@triton.jit
def clear_later_rows(tc_ptr, stride_tc, tacc_row, tcnt_row, t_lo, t_hi, C, BLOCK: tl.constexpr):
    """Zero the scratch that scatter_later_rows wrote (at every column of the rows after the first)."""
    offs = tl.arange(0, BLOCK)
    for r in range(t_lo + 1, t_hi):
        for c0 in range(0, C, BLOCK):
            o = c0 + offs
            v = tl.load(tc_ptr + r * stride_tc + o, mask=o < C, other=-1)
            tl.store(tacc_row + v, tl.zeros((BLOCK,), tl.float32), mask=v >= 0)
            tl.store(tcnt_row + v, tl.zeros((BLOCK,), tl.int32), mask=v >= 0)


@triton.jit
def teacher_merged(t_ptr, stride_t, lse_t_ptr, tacc_row, tcnt_row, t_lo, t_hi, o, v, ok, c_t, inv_tau,
                   SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """On a column tile of the first teacher row (col_tile): T = mean_r (t_r/τ − lse_r) + c_t -> (T, P = exp T on
    the live lanes else 0, live lanes = ok, sparse with n_t > 1: ∧ every later row has the column (tcnt))."""
    n_t = t_hi - t_lo
    if SPARSE:
        tv = tl.load(t_ptr + t_lo * stride_t + o, mask=ok, other=0.0).to(tl.float32) * inv_tau \
            - tl.load(lse_t_ptr + t_lo)
        if n_t > 1:
            tv += tl.load(tacc_row + v, mask=ok, other=0.0)
            ok = ok & (tl.load(tcnt_row + v, mask=ok, other=0) == n_t - 1)
    else:
        tv = logp_sum(t_ptr, stride_t, lse_t_ptr, t_lo, t_hi, v, ok, inv_tau, BLOCK)
    tv = tv / n_t.to(tl.float32) + c_t
    return tv, tl.where(ok, tl.exp(tv), 0.0), ok


@triton.jit
def zero_row(row_ptr, V, BLOCK: tl.constexpr):
    """row[0:V] = 0 in BLOCK tiles."""
    for v0 in range(0, V, BLOCK):
        o = v0 + tl.arange(0, BLOCK)
        tl.store(row_ptr + o, tl.zeros((BLOCK,), tl.float32).to(row_ptr.dtype.element_ty), mask=o < V)


@triton.jit
def zero_uncovered_rows(dz_ptr, stride_dz, covered_ptr, N, V, BLOCK: tl.constexpr):
    """dz_r = 0 for the rows r < N with covered[r] == 0, rows strided over the programs (also a kernel)."""
    for r in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        if tl.load(covered_ptr + r) == 0:
            zero_row(dz_ptr + r * stride_dz, V, BLOCK)


@triton.jit
def scale_rows_kernel(g_ptr, stride_g, scale_ptr, N, V, BLOCK: tl.constexpr):
    """g_r ← round(g_r · s_r) in place, the product in s's dtype (fp32 for 16-bit g) rounded once to g's, rows strided
    over the programs; a row with s_r = 1 is neither read nor written (x · 1 = x exactly, NaN included)."""
    for r in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        s = tl.load(scale_ptr + r)
        if s != 1:
            row = g_ptr + r * stride_g
            for v0 in range(0, V, BLOCK):
                o = v0 + tl.arange(0, BLOCK)
                x = tl.load(row + o, mask=o < V)
                tl.store(row + o, (x.to(s.dtype) * s).to(x.dtype), mask=o < V)


_scale_rows = launcher(scale_rows_kernel, dict(BLOCK=128), [triton.Config({"BLOCK": 4096}, num_warps=8)])
SCALE_PROGRAMS = 64 * 1024  # scale_rows' grid at most: more rows are strided over the programs


def scale_rows(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad [N, V] (unit column stride) times scale [N] per row, in place (scale_rows_kernel): what grad.mul_(scale[:,
    None]) gives, at one read and one write of the rows whose scale is not 1 and none of the others. torch's
    broadcasting mul_ of a 16-bit tensor by an fp32 column runs a non-vectorized kernel (measured on an H200: 4.44 ms
    for 8,161 × 128,256 bf16, 0.95 TB/s); in the common backward of a summed loss every scale is 1."""
    N, V = grad.shape
    if N and V:
        _scale_rows((max(1, min(N, SCALE_PROGRAMS)),), grad, grad.stride(0), scale.contiguous(), N, V)
    return grad
