"""Loss benchmark: forward+backward time and peak extra memory of P-KL / H-KL / GOLD, against this machine's floor
and against the authors' release computation, measured side by side in one run.

Floor (measured first): memory bandwidth from a streaming copy (torch, 256 MiB buffers, the thread count the
kernels use, best of 5; bytes counted as read + written), exp and log throughput per core (torch.exp / torch.log on
64k fp32 values in one thread, best of 50), cores = torch.get_num_threads(). A loss's floor is
max(bytes it must move / bandwidth, exps / (exp rate · cores) + logs / (log rate · cores)): it reads every student
and teacher logit once and writes the gradient once; it evaluates one exp per student logit of a merged row and per
allowed teacher column of a teacher row, and (P-KL) one log per chunk and allowed teacher column (log(Q + eps)).

Compared, on identical inputs (Projection.random W, one sequence of ~N rows per side, mostly 1-to-1 chunks):
  xtoken_ext: our op (on CPU the C++ kernels, xtoken_ext._C); with its defaults and, for P-KL, with the release's
    options (teacher_topk=8192, uncovered="epsilon");
  release: the authors' release computation (NeMo-RL X-Token, METHOD.md §6-7), re-implemented here with its
    defaults: P-KL = fp32 softmax of the student, the top-8192 teacher columns by max logit over the batch,
    torch.sparse.mm(W[:, I]ᵀ, p) (W built once, as the release caches it), fp32 log-softmax of the sliced teacher,
    chunk means by a dense one-hot [K, T] bmm, Q renormalized with + 1e-10 and log(Q + 1e-10); H-KL / GOLD = fp32
    log-softmax of both full rows, one-hot bmm chunk means, KL over the common pairs, and the sorted L1 over the
    top-m uncommon probabilities (torch.topk, m = min(|U_S|, |U_T|, 8192));
  reference: xt.reference (dense W, float64-capable loops), at a small shape only.
Every row prints the options it ran with. Numbers of the actual release measured elsewhere are not quoted here.

Memory: every CPU measurement runs in a fresh subprocess; after the inputs exist it resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs``) and reports VmHWM − VmRSS(before) = peak resident memory the loss
added on top of its inputs (gradient included). On CUDA: torch.cuda.max_memory_allocated() − allocated(before).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

CPU_SHAPE = (1024, 128_256, 151_646)  # rows, V_S, V_T (Llama-3 x Qwen3-like widths)
SMALL_SHAPE = (64, 4_099, 5_003)  # the reference needs a dense [V_S, V_T] W
QUICK_SHAPE = (16, 2_003, 3_001)
GPU_SHAPE = (8192, 128_256, 151_936)  # bf16
RELEASE_TOPK = 8192  # the release's vocab_topk (P-KL teacher columns) and uncommon_topk (H-KL / GOLD sorted L1)

# (label, impl, loss kind, options, what it runs)
_OURS = "xtoken_ext"
_RELEASE_OPTS = {"teacher_topk": RELEASE_TOPK, "uncovered": "epsilon"}
CONFIGS = {
    "pkl": [(_OURS, "xtoken", {}, "C++ kernel; all covered teacher columns, teacher renormalized on them"),
            (f"{_OURS}, release options", "xtoken", _RELEASE_OPTS,
             f"C++ kernel; teacher_topk={RELEASE_TOPK} (top columns by max logit), uncovered='epsilon' (1e-10)"),
            ("release", "release", {}, f"fp32 softmax, top-{RELEASE_TOPK} teacher slice + fp32 log-softmax, "
                                       "torch.sparse.mm, one-hot bmm pooling, eps 1e-10")],
    "hkl": [(_OURS, "xtoken", {}, f"C++ kernel; relaxed common pairs, uncommon top-{RELEASE_TOPK}, uncovered teacher "
                                  "columns dropped (renormalized)"),
            ("release", "release", {}, f"fp32 log-softmax of full rows, one-hot bmm pooling, topk-{RELEASE_TOPK} "
                                       "sorted L1")],
    "gold": [(_OURS, "xtoken", {}, f"C++ kernel; strict (exact) common pairs, uncommon top-{RELEASE_TOPK}, "
                                   "uncovered teacher columns dropped (renormalized)"),
             ("release", "release", {}, f"fp32 log-softmax of full rows, one-hot bmm pooling, topk-{RELEASE_TOPK} "
                                        "sorted L1")],
}


def _chunks(n_rows: int, seed: int = 0):
    """A single sequence of ~n_rows predictive rows per side: mostly 1-to-1 chunks, some 1-to-2 / 2-to-1."""
    g = torch.Generator().manual_seed(seed)
    chunks, s, t = [(0, 1, 0, 1)], 1, 1
    while s < n_rows + 1 and t < n_rows + 1:
        u = float(torch.rand((), generator=g))
        ns, nt = (1, 2) if u < 0.1 else (2, 1) if u < 0.2 else (1, 1)
        ns, nt = min(ns, n_rows + 1 - s), min(nt, n_rows + 1 - t)
        if ns == 0 or nt == 0:
            break
        chunks.append((s, s + ns, t, t + nt))
        s, t = s + ns, t + nt
    return chunks, s, t


def _inputs(shape, dtype, device, seed=0):
    import xtoken_ext as xt

    n, V_S, V_T = shape
    chunks, L_s, L_t = _chunks(n, seed)
    batch = xt.Alignment.from_chunks([chunks], [[True] * len(chunks)], [L_s], [L_t]).to(device)
    proj = xt.Projection.random(V_S, V_T, seed=seed, empty_rows=0.01).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(1, L_s, V_S, generator=g, device=device).mul_(2).to(dtype).requires_grad_()
    t = torch.randn(1, L_t, V_T, generator=g, device=device).mul_(2).to(dtype)
    return z, t, batch, proj


# ---------------------------------------------------------------------------------------------------------------
# the floor
# ---------------------------------------------------------------------------------------------------------------

def machine_floor(quick: bool = False) -> dict:
    """Streaming-copy bandwidth (bytes read + written per second, torch.get_num_threads() threads), exp and log
    values per second per core (one thread), and the core count the kernels use."""
    cores = torch.get_num_threads()
    n = (32 << 20) if quick else (64 << 20)  # fp32 values: 128 / 256 MiB per buffer, beyond the caches
    copy = _best_copy(n, 3 if quick else 5)
    rates = {}
    torch.set_num_threads(1)
    try:
        x = torch.randn(1 << 16).mul_(3)
        y = torch.empty_like(x)
        for name, fn, arg in (("exp", torch.exp, x), ("log", torch.log, x.abs().add_(1e-3))):
            fn(arg, out=y)
            rates[name] = x.numel() / min(_timed(lambda: fn(arg, out=y)) for _ in range(10 if quick else 50))
    finally:
        torch.set_num_threads(cores)
    return {"bandwidth": 2 * 4 * n / copy, "exp_rate": rates["exp"], "log_rate": rates["log"], "cores": cores}


def _best_copy(n: int, repeats: int) -> float:
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # first touch outside the timing
    return min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def work(kind: str, opts: dict, z, t, batch, proj) -> dict:
    """What the loss must do at least (module docstring): bytes moved, exps, logs."""
    valid = batch.chunk_valid
    rows = lambda ids: int(((ids >= 0) & valid.gather(1, ids.clamp_min(0))).sum())  # noqa: E731
    N_s, N_t, K = rows(batch.student_chunk_ids), rows(batch.teacher_chunk_ids), int(valid.sum())
    V_S, V_T = z.shape[-1], t.shape[-1]
    release = opts.get("release", False)  # the release: top-k columns (P-KL), no coverage restriction
    allowed = torch.ones(V_T, dtype=torch.bool, device=t.device) if release or \
        opts.get("uncovered") == "epsilon" else proj.covered_columns(t.device)
    topk = RELEASE_TOPK if release and kind == "pkl" else opts.get("teacher_topk")
    if topk is not None:
        top = torch.zeros_like(allowed)
        top[torch.topk(t.detach().float().reshape(-1, V_T).amax(0), min(topk, V_T)).indices] = True
        allowed &= top
    A = int(allowed.sum())
    return {"bytes": z.element_size() * 2 * N_s * V_S + t.element_size() * N_t * V_T,
            "exps": N_s * V_S + N_t * A, "logs": K * A if kind == "pkl" else 0}


def floor_seconds(w: dict, fl: dict) -> float:
    compute = w["exps"] / (fl["exp_rate"] * fl["cores"]) + w["logs"] / (fl["log_rate"] * fl["cores"])
    return max(w["bytes"] / fl["bandwidth"], compute)


# ---------------------------------------------------------------------------------------------------------------
# the release computation
# ---------------------------------------------------------------------------------------------------------------

_W_CACHE: dict = {}  # id(proj) -> (proj, W): the reference keeps the id from being reused


def _release_w(proj):
    """W as the release holds it: a coalesced fp32 COO [V_S, V_T] (empty slots dropped), built once."""
    key = id(proj)
    if key not in _W_CACHE or _W_CACHE[key][0] is not proj:
        V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
        keep = proj.indices >= 0
        rows = torch.arange(V_S, device=proj.indices.device).unsqueeze(1).expand_as(proj.indices)[keep]
        with warnings.catch_warnings():  # "sparse invariant checks are implicitly disabled"
            warnings.simplefilter("ignore")
            _W_CACHE[key] = (proj, torch.sparse_coo_tensor(torch.stack([rows, proj.indices[keep].long()]),
                                                           proj.weights[keep].float(), (V_S, V_T)).coalesce())
    return _W_CACHE[key][1]


def _release_style(kind, z, t, batch, proj, temperature: float = 1.0):
    """The authors' release computation with its defaults (module docstring), mean over valid chunks."""
    import torch.nn.functional as F

    K = batch.chunk_valid.shape[1]
    tau = temperature

    def pool(x, ids):  # chunk means via a dense one-hot [B, T, K] bmm, as the release does
        onehot = F.one_hot(ids + 1, K + 1)[..., 1:].to(x.dtype)
        return torch.bmm(onehot.transpose(1, 2), x) / onehot.sum(1).clamp_min(1).unsqueeze(-1)

    valid = batch.chunk_valid
    tf = t.float()
    if kind == "pkl":
        top = torch.topk(tf.amax((0, 1)), min(RELEASE_TOPK, tf.shape[-1])).indices.sort().values  # per batch
        W_top = _release_w(proj).index_select(1, top)  # [V_S, k]
        p = torch.softmax(z.float() / tau, -1)
        q = torch.stack([torch.sparse.mm(W_top.t(), p_b.t()).t() for p_b in p])  # [B, T, k]
        Q = pool(q, batch.student_chunk_ids)
        log_q = torch.log(Q / (Q.sum(-1, keepdim=True) + 1e-10) + 1e-10)
        log_t = pool(torch.log_softmax(tf[..., top] / tau, -1), batch.teacher_chunk_ids)
        per_chunk = (log_t.exp() * (log_t - log_q)).sum(-1)
    else:
        log_s = pool(torch.log_softmax(z.float() / tau, -1), batch.student_chunk_ids)
        log_t = pool(torch.log_softmax(tf / tau, -1), batch.teacher_chunk_ids)
        cs, ct = (x.to(z.device) for x in proj.common_pairs("relaxed" if kind == "hkl" else "strict"))
        kl = (log_t[..., ct].exp() * (log_t[..., ct] - log_s[..., cs])).sum(-1)
        us = torch.ones(z.shape[-1], dtype=torch.bool, device=z.device)
        us[cs] = False
        ut = torch.ones(t.shape[-1], dtype=torch.bool, device=z.device)
        ut[ct] = False
        m = min(int(us.sum()), int(ut.sum()), RELEASE_TOPK)
        a = torch.topk(log_s[..., us].exp(), m, sorted=True).values
        b = torch.topk(log_t[..., ut].exp(), m, sorted=True).values
        per_chunk = kl + (a - b).abs().sum(-1)
    return tau * tau * per_chunk[valid].sum() / valid.sum()


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------

def _loss_fn(impl, kind, opts):
    import xtoken_ext as xt

    if impl == "release":
        return lambda z, t, b, p: _release_style(kind, z, t, b, p)
    mod = xt.reference if impl == "reference" else xt
    fn = getattr(mod, {"pkl": "pkl_loss", "hkl": "hkl_loss", "gold": "gold_loss"}[kind])
    return lambda z, t, b, p: fn(z, t, b, p, **opts)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


def _reset_peak_rss() -> int:
    """Reset this process's peak-RSS counter (VmHWM) to its current RSS (Linux) -> that RSS in bytes, the base of a
    peak-extra measurement."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def measure(impl: str, kind: str, shape, dtype: str = "float32", device: str = "cpu", repeats: int = 1,
            opts: dict | None = None) -> dict:
    """Fwd+bwd seconds (best of ``repeats``; with that repeat's forward seconds), peak extra bytes (and after the
    first forward) and the floor's work of one configuration, after a warm-up step at a tiny shape (lazy imports,
    custom-op and Triton first-call costs stay out of the timing)."""
    opts = dict(opts or {})
    dev = torch.device(device)
    fn = _loss_fn(impl, kind, opts)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(z, t, batch, proj, marks=None):  # marks: forward seconds and peak extra bytes after it
        z.grad = None
        t0 = time.perf_counter()
        loss = fn(z, t, batch, proj)
        sync()
        if marks is not None:
            marks.append((time.perf_counter() - t0, peak() - base))
        loss.backward()
        sync()

    step(*_inputs((4, 257, 263), getattr(torch, dtype), dev))
    z, t, batch, proj = _inputs(shape, getattr(torch, dtype), dev)
    w = work(kind, {**opts, "release": impl == "release"}, z, t, batch, proj)
    if impl == "release" and kind == "pkl":
        _release_w(proj)  # built once, outside the timing (the release caches it)
    peak = torch.cuda.max_memory_allocated if dev.type == "cuda" else lambda: _status("VmHWM")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    marks = []
    times = [_timed(lambda: step(z, t, batch, proj, marks)) for _ in range(repeats)]
    best = min(range(repeats), key=times.__getitem__)
    return {"seconds": times[best], "peak_extra_bytes": peak() - base, "forward_seconds": marks[best][0],
            "forward_peak_extra_bytes": marks[0][1], "work": w}


def _measure_subprocess(*args, suite: str = "losses") -> dict:
    """``xtoken_ext.bench.<suite>.measure(*args)`` in a fresh process (its own peak-RSS counter)."""
    code = (f"import json; from xtoken_ext.bench.{suite} import measure; "
            f"print(json.dumps(measure(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                         cwd=tempfile.gettempdir())  # outside a source checkout: import the installed package
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def _table(title, rows, ref_name, fl=None):
    """rows: (label, kind, result, options text). Speedup = the ``ref_name`` row's time / this row's time."""
    print(f"{title}; speedup = {ref_name} time / time; load average {_load()}")
    head = f"{'impl':<30}{'loss':<6}{'fwd+bwd s':>11}{'peak extra MiB':>16}"
    head += f"{'floor s':>9}{'x floor':>9}" if fl else ""
    head += f"{'speedup':>10}"
    print(head)
    print("-" * len(head))
    base = {kind: r for name, kind, r, _ in rows if name == ref_name and "seconds" in r}
    for name, kind, r, _ in rows:
        if "error" in r:
            print(f"{name:<30}{kind:<6}  failed: {r['error']}")
            continue
        line = f"{name:<30}{kind:<6}{r['seconds']:>11.3f}{r['peak_extra_bytes'] / 2**20:>16.0f}"
        if fl:
            f = floor_seconds(r["work"], fl)
            line += f"{f:>9.3f}{r['seconds'] / f:>8.1f}x"
        ratio = base[kind]["seconds"] / r["seconds"] if kind in base else float("nan")
        print(f"{line}{ratio:>9.1f}x")
    seen = set()
    for name, kind, _, text in rows:
        if text and (name, text) not in seen:
            seen.add((name, text))
            print(f"  {name} ({kind}): {text}")
    print()


def _print_floor(fl: dict) -> None:
    print(f"machine floor: streaming copy {fl['bandwidth'] / 1e9:.1f} GB/s (read + write, {fl['cores']} threads); "
          f"per core: exp {fl['exp_rate'] / 1e9:.2f} G/s, log {fl['log_rate'] / 1e9:.2f} G/s (torch, fp32, 1 thread); "
          f"{fl['cores']} cores used; load average {_load()}")
    print("floor of a loss = max(bytes / bandwidth, exps / (exp rate x cores) + logs / (log rate x cores)): one "
          "read of every logit, one gradient write, one exp per student logit and allowed teacher logit, "
          "(P-KL) one log per chunk and allowed column\n")


def run(quick: bool = False) -> None:
    fl = machine_floor(quick)
    _print_floor(fl)
    if quick:  # in-process smoke run at a tiny shape
        shape = QUICK_SHAPE
        rows = [(name, k, measure(impl, k, shape, opts=opts), text) for k in ("pkl", "hkl")
                for name, impl, opts, text in CONFIGS[k][:1] + CONFIGS[k][-1:] +
                [("reference (dense W, loops)", "reference", {}, "")]]
        _table(f"losses (quick): {shape[0]} rows x V_S {shape[1]:,} x V_T {shape[2]:,} fp32, CPU", rows,
               "reference (dense W, loops)", fl)
        return
    threads = torch.get_num_threads()
    shape = SMALL_SHAPE
    rows = [(name, "pkl", _measure_subprocess(impl, "pkl", shape, "float32", "cpu", 2, opts), text)
            for name, impl, opts, text in CONFIGS["pkl"][:1] + CONFIGS["pkl"][-1:] +
            [("reference (dense W, loops)", "reference", {}, "")]]
    _table(f"losses vs reference: {shape[0]} rows x V_S {shape[1]:,} x V_T {shape[2]:,} fp32, CPU ({threads} "
           "threads)", rows, "reference (dense W, loops)")
    shape = CPU_SHAPE
    n, V_S, V_T = shape
    reps = {"xtoken": 5, "pkl": 3, "hkl": 2, "gold": 2}  # the release's H-KL / GOLD take ~10 s each
    rows = [(name, kind, _measure_subprocess(impl, kind, shape, "float32", "cpu", reps.get(impl, reps[kind]), opts),
             text) for kind in ("pkl", "hkl", "gold") for name, impl, opts, text in CONFIGS[kind]]
    _table(f"losses: {n:,} rows x V_S {V_S:,} x V_T {V_T:,} fp32, CPU ({threads} threads), best of 5 (ours) / 3 "
           "(release P-KL) / 2 (release H-KL, GOLD)", rows, "release", fl)
    fp32 = next(r for name, kind, r, _ in rows if name == _OURS and kind == "pkl")
    rows = [(f"{_OURS} fp32", "pkl", fp32, "the row above"),
            (f"{_OURS} bf16", "pkl", _measure_subprocess("xtoken", "pkl", shape, "bfloat16", "cpu", 5, {}),
             "C++ kernel; bf16 student and teacher rows converted where the kernel reads them, bf16 gradient")]
    _table(f"P-KL with bf16 logits: {n:,} rows x V_S {V_S:,} x V_T {V_T:,}, CPU ({threads} threads); the bf16 "
           f"gradient alone is {n * V_S * 2 / 2**20:.0f} MiB", rows, f"{_OURS} fp32", fl)
    for name, _, r, _ in rows:
        if "forward_seconds" in r:
            print(f"{name}: forward (the op: kernel, gradient written) {r['forward_seconds']:.3f} s, peak extra "
                  f"{r['forward_peak_extra_bytes'] / 2**20:.0f} MiB after it; backward (in-place row scaling of the "
                  f"saved gradient) {r['seconds'] - r['forward_seconds']:.3f} s")
    print()
    if torch.cuda.is_available():
        _run_gpu()


def _run_gpu() -> None:
    shape = GPU_SHAPE
    n, V_S, V_T = shape
    rows = [(name, "pkl", measure(impl, "pkl", shape, "bfloat16", "cuda", 5, opts), text)
            for name, impl, opts, text in (("xtoken fused (Triton)", "xtoken", {}, ""),
                                           ("release", "release", {}, CONFIGS["pkl"][-1][3]))]
    _table(f"losses: {n} rows x V_S {V_S:,} x V_T {V_T:,} bf16, {torch.cuda.get_device_name()}", rows, "release")
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else 3.35e12  # DDR; H100 SXM fallback
    moved = 2 * n * (2 * V_S + V_T)  # read student + teacher logits once, write the bf16 gradient
    fused = rows[0][2]
    if "seconds" in fused:
        print(f"fused P-KL: {moved / 1e9:.2f} GB moved at the floor, {moved / fused['seconds'] / 1e9:.0f} GB/s = "
              f"{100 * moved / fused['seconds'] / peak:.0f}% of peak {peak / 1e12:.2f} TB/s")
