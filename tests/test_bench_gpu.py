"""The one-command GPU check (xtoken_ext.bench.gpu): its --dry mode end to end in a fresh process (CPU, Triton
interpreter, every code path but timing; stage 6's lap counts), the timing and sweep stages' code at a tiny shape,
that a bound-sized error in a checked gradient FAILs, the tie mask of the sorted-L1 term, the bandwidth table and the
CLI plumbing (`xtoken bench --suite gpu [--dry]`, exit status, --stage)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import device
from xtoken_ext.bench import gpu, permute
from xtoken_ext.cli import main
from xtoken_ext.ops import hkl_kernel, pkl_kernel
from xtoken_ext.testing import loss_problem, sorted_l1_ambiguous, worst_ratio

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked interpreter lanes evaluate log(0)


def test_dry_run_passes_every_case(tmp_path):
    """~1 min on 2 cores: the CI guard that keeps the GPU check runnable. A fresh process outside the checkout (the
    installed package) without TRITON_INTERPRET: --dry must set it before the kernels are imported, and its spawned
    workers (--jobs 2, the GPU machine's way) inherit it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "xtoken_ext.bench.gpu", "--dry", "--jobs", "2"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = re.findall(r"^(\w+) +(\w+) +(bf16|fp16|fp32|fp64) (dense|sparse|narrow|wide|tinyq) .* (PASS|FAIL)$",
                      out.stdout, re.MULTILINE)
    cases = {r[:4] for r in rows if r[2] != "fp64" and r[3] in ("dense", "sparse")}
    assert len(cases) == len(gpu.LOSSES) * len(gpu.MERGES) * len(gpu.DTYPES) * len(gpu.TEACHERS)
    assert len({r[:3] for r in rows if r[3] == "narrow"}) == len(gpu.NARROW) * len(gpu.MERGES) * len(gpu.DTYPES)
    # ULD past the (lowered) sort network: the merge sort of both whole lists
    assert {r[:3] for r in rows if r[3] == "wide"} == {("uld", m, d) for m in gpu.MERGES for d in gpu.DTYPES}
    # P-KL where Q is subnormal (fp32)
    assert {r[:3] for r in rows if r[3] == "tinyq"} == {("pkl", m, "fp32") for m in gpu.MERGES}
    assert len([r for r in rows if r[2] == "fp64"]) == len(gpu.LOSSES) * len(gpu.MERGES) * len(gpu.TEACHERS)
    assert all(r[4] == "PASS" for r in rows) and "FAIL" not in out.stdout
    assert re.search(r"^\w+ +mean +bf16 dense .* yes +[\d.]+ +PASS$", out.stdout, re.MULTILINE)  # the repeat check ran
    # the pool printed every case as it finished (what a time limit would leave in the log), then the tables
    done = re.findall(r"^\[done (\d+)/(\d+), \d+ s\] (\w+ +\w+ +\w+ \w+) .* (PASS|FAIL)$", out.stdout, re.MULTILINE)
    assert sorted(int(d[0]) for d in done) == list(range(1, len(rows) + 1)) and {d[1] for d in done} == {str(len(rows))}
    assert out.stdout.index("[done") < out.stdout.index("float64 oracle")
    # the probe of P-KL's permutation, every kernel in both directions
    probe = re.findall(r"^random W +([CD]) +\d+ +(stream|lane gather|lane gather 1/thread|two-stage) +\d+ .* PASS$",
                       out.stdout, re.MULTILINE)
    assert set(probe) == {(d, k) for d in "CD" for k, _ in permute.KINDS}, out.stdout[-3000:]
    # stage 6, the fused kernels' phases: here the interpreter's lap counts (tests/test_phase_times.py pins them per
    # chunk): P-KL's A to tail once a chunk, a wait per slice taken and per chunk's guard, H-KL's every phase once a
    # chunk; then the step's ops with and without the stamps
    found = dict(re.findall(r"^(P-KL|H-KL) +2 programs: (.+); sum [\d.]+ laps$", out.stdout, re.MULTILINE))
    laps = {k: {p: float(v) for p, v in re.findall(r"(\w+) ([\d.]+) \(\d+ %\)", line)} for k, line in found.items()}
    assert list(laps) == ["P-KL", "H-KL"], out.stdout[-3000:]
    assert list(laps["P-KL"]) == list(pkl_kernel.PHASES) and list(laps["H-KL"]) == list(hkl_kernel.PHASES)
    pk, chunks = laps["P-KL"], laps["P-KL"]["A"]
    assert chunks > 1 and [pk[p] for p in ("B", "R", "C", "tail")] == [chunks] * 4
    assert pk["D"] >= chunks and pk["wait"] == pk["D"] + chunks and set(laps["H-KL"].values()) == {chunks}
    assert len(re.findall(r"^ +with the stamps: ops [\d.]+ ms of wall", out.stdout, re.MULTILINE)) == 2
    assert len(re.findall(r"^ +without: ops [\d.]+ ms of wall", out.stdout, re.MULTILINE)) == 2
    assert re.search(r"GPU check \(dry\): PASS in [\d.]+ s$", out.stdout.rstrip())


def test_cases_in_any_process_print_in_table_order():
    """Every case of stages 1-2 runs once whatever the pool's order: the first case of each kernel variant first
    (H-KL family before P-KL), the float64 oracles last; tables keep their printed order."""
    tables = gpu.sections(gpu.DRY, list(gpu.DTYPES))
    cases = [c for t in tables for c in t.cases]
    order = gpu._submission_order(cases)
    assert sorted(map(repr, order)) == sorted(map(repr, cases)) and len(set(cases)) == len(cases)
    firsts = {}
    for i, c in enumerate(order):
        if c.dtype != "fp64":
            firsts.setdefault((c.loss == "pkl", c.problem, c.merge, c.dtype), i)
    first = sorted(firsts.values())
    assert first == list(range(len(first)))  # one case per variant before any repeat of a variant
    assert all(order[i].loss != "pkl" for i in first[:len([k for k in firsts if not k[0]])])
    assert all(c.dtype == "fp64" for c in order[-len(gpu.LOSSES) * len(gpu.MERGES) * len(gpu.TEACHERS):])
    assert [t.problem for t in tables] == ["oracle dense", "oracle sparse", "dense", "sparse", "narrow", "wide",
                                           "tinyq"]


def test_run_case_reports_the_kernel_paths():
    """A case run in this process (as in a worker): its row, and on the narrow problem the paths every chunk took
    (the small sort network), which the table then checks."""
    case = gpu.Case("narrow", "gold", "first", "bf16")
    row, paths = gpu.run_case(case, gpu.DRY, device().type)
    assert row.ok and row.name.split() == ["gold", "first", "bf16", "narrow"]
    assert gpu._every_chunk_took(4, "the small sort network", row, paths)
    assert not gpu._every_chunk_took(16, "the merge sort", row, paths)
    assert gpu.run_case(gpu.Case("dense", "pkl", "mean", "bf16"), gpu.DRY, device().type)[1] is None


@pytest.mark.parametrize("loss,merge", [("pkl", "mean"), ("hkl", "first")])
def test_bound_sized_gradient_error_fails(loss, merge, capsys):
    """The same case passes as computed and fails once one checked gradient entry moves by 1.01 × its bound."""
    prob = loss_problem(0, gpu.DRY.V_S, gpu.DRY.V_T, gpu.DRY.chunks, hub=gpu.DRY.hub)
    good = gpu.check_case(prob, loss, merge, torch.bfloat16, gpu.DRY, device(), repeats=1)
    bad = gpu.check_case(prob, loss, merge, torch.bfloat16, gpu.DRY, device(), repeats=1, perturb=1.01)
    assert good.ok and good.grad <= 1 and good.checked > 0.9
    assert not bad.ok and bad.grad > 1 and bad.loss == good.loss
    assert gpu.report("t", [good])
    capsys.readouterr()
    assert not gpu.report("t", [good, bad])
    assert capsys.readouterr().out.rstrip().endswith("-> FAIL")


def test_nan_or_unequal_repeats_fail():
    one = torch.ones(2)
    assert worst_ratio(torch.tensor([float("nan"), 1.0]), one, one) != worst_ratio(one, one, one)  # NaN
    assert not gpu.Row("x", float("nan"), 0.0, 1.0, None, 0.0).ok
    assert not gpu.Row("x", 0.5, 0.5, 1.0, False, 0.0).ok
    assert gpu.Row("x", 0.5, 1.0, 1.0, True, 0.0).ok


def test_sorted_l1_mask_flags_ties_only():
    """fp32 logits with distinct values: almost nothing is skipped; two top uncommon columns made equal in the
    first row of a chunk are both flagged there (rank tie), and nowhere else because of it."""
    S = gpu.DRY
    prob = loss_problem(3, S.V_S, S.V_T, S.chunks, hub=S.hub)
    kw = {"kind": "uld", "t": prob.t, "alignment": prob.alignment, "proj": prob.proj, "tau": gpu.TAU,
          "merge": "first", "uncommon_topk": S.topk, "rel": 1e-6, "student_ids": prob.student_ids,
          "teacher_ids": prob.teacher_ids}
    base = sorted_l1_ambiguous(z=prob.z, **kw)
    assert base.double().mean() < 0.02
    b, s_lo = (int(x) for x in prob.alignment.row_spans()[0, :2])
    z = prob.z.clone()
    top2 = torch.topk(z[b, s_lo], 2).indices
    z[b, s_lo, top2[1]] = z[b, s_lo, top2[0]]
    tied = sorted_l1_ambiguous(z=z, **kw)
    assert bool(tied[b, s_lo, top2].all())
    rest = torch.ones_like(tied)
    rest[b, s_lo] = False
    assert torch.equal(tied[rest], base[rest])


def test_nominal_bandwidth_table():
    assert gpu.nominal_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu.nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12  # SXM
    assert gpu.nominal_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu.nominal_bandwidth("NVIDIA H100 NVL") == 3.9e12
    assert gpu.nominal_bandwidth("NVIDIA GH200 480GB") is None  # measured instead
    assert gpu.nominal_bandwidth("NVIDIA A100-SXM4-80GB") is None


def test_floor_bytes_reads_both_sides_and_writes_the_gradient():
    z, t = torch.zeros(1, 3, 5, dtype=torch.bfloat16), torch.zeros(1, 2, 7, dtype=torch.bfloat16)
    assert gpu.floor_bytes(z, t) == 2 * (2 * 15 + 14)


def test_cli_passes_dry_and_maps_the_result_to_the_exit_status(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gpu, "run", lambda quick, dry: calls.append((quick, dry)) or len(calls) == 1)
    assert main(["bench", "--dry"]) == 0  # --dry alone runs the GPU check
    # A machine where the check cannot run is a setup error (2), not a failed check (1), and runs nothing.
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--suite", "gpu", "--quick"]) == 2
    assert capsys.readouterr().err == ("xtoken bench: error: the GPU check needs a CUDA device; --dry runs it on the "
                                       "CPU under the Triton interpreter\n")
    with pytest.raises(SystemExit) as e:
        gpu.main([])
    assert e.value.code == 2
    monkeypatch.setattr(gpu, "cannot_run", lambda dry: None)
    assert main(["bench", "--suite", "gpu", "--quick"]) == 1
    assert calls == [(False, True), (True, False)]
    assert main(["bench", "--suite", "align", "--dry"]) == 2
    assert "--dry applies to ['gpu'] only" in capsys.readouterr().err


def test_dry_refuses_a_process_whose_triton_is_not_interpreted(tmp_path):
    """--dry sets TRITON_INTERPRET itself, which works only before triton is imported: in a process that imported
    triton first (torch.compile, a test run) every case failed with the backend's error instead of exit 2."""
    code = "import triton\nfrom xtoken_ext.bench.gpu import cannot_run\nprint(cannot_run(True))\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # outside the checkout: its source folder has no bench subpackage and no built extension (the installed package)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert out.stdout.startswith("--dry needs TRITON_INTERPRET=1 before triton is imported"), out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**env, "TRITON_INTERPRET": "1"}, cwd=tmp_path)
    assert out.stdout == "None\n", out.stderr[-2000:]


def test_timing_stage_runs_on_the_cpu(capsys):
    """Stage 3's code path at a tiny shape (the interpreter on the CPU; CUDA where present): a row per loss and
    implementation, the fused losses checked against the torch backend's, each with its profiled call and its host
    time; without a W to time it fails."""
    dev = device()
    assert gpu.timing(dev, 1, shape=(10, 160, 100), real=False, bandwidth=(1e9, "test"))
    out = capsys.readouterr().out
    rows = re.findall(r"^random W +(pkl|hkl|gold) +(chunked torch|release-style unfused|xtoken fused \(Triton\)) "
                      r"+[\d.]+ +[\d.]+ +[\d.e+]+x +\d+ +(?:nan|[\d.]+) *([\d.]+ PASS)?$", out, re.MULTILINE)
    assert {r[:2] for r in rows} == {(k, i) for k in gpu.TIMED_LOSSES for i in
                                     ("chunked torch", "release-style unfused", "xtoken fused (Triton)")}, out
    assert all(bool(r[2]) == (r[1] == "xtoken fused (Triton)") for r in rows)
    assert re.search(r"HBM floor [\d.]+ GB at 0\.00 TB/s \(test\)", out), out  # the bandwidth given
    # under each fused row its profiled call: the time of its kernels (ops on the CPU) by name, within its wall time
    lines = out.splitlines()
    prof = [lines[i + 1] for i, line in enumerate(lines) if "xtoken fused (Triton)" in line]
    assert len(prof) == len(gpu.TIMED_LOSSES), out
    for line in prof:
        m = re.fullmatch(r" +(?:kernels|ops) ([\d.]+) ms of wall ([\d.]+) ms: (.+)", line)
        assert m and 0 < float(m[1]) <= float(m[2]) + 0.1 and re.match(r"\S.* [\d.]+ ms x\d+", m[3]), line
    # then the host's time to issue the forward and the backward
    host = [lines[i + 2] for i, line in enumerate(lines) if "xtoken fused (Triton)" in line]
    host_line = r" +host: forward [\d.]+ ms, backward [\d.]+ ms issued \(best of 3\)"
    assert all(re.fullmatch(host_line, h) for h in host), out
    assert not gpu.timing(dev, 1, shape=(10, 160, 100), real=False, random=False, bandwidth=(1e9, "test"))  # no W


def test_sweep_stage_runs_on_the_cpu(capsys, monkeypatch):
    """Stage 4's code path at a tiny shape: a row per configuration, checked against the torch backend, and
    ops.pkl_kernel's launch, program count and tiles restored afterwards (here a program count that the kernel
    records, as its scratch rows' count)."""
    from xtoken_ext.ops import pkl_kernel as pk

    dev = device()
    before = pk._launch, pk._num_programs, dict(pk._TILES)
    seen = []
    zeros = torch.zeros
    monkeypatch.setattr(pk.torch, "zeros", lambda *a, **k: seen.append(a[0]) or zeros(*a, **k))
    launched = []
    make = pk.launch_configs
    monkeypatch.setattr(pk, "launch_configs", lambda cfgs: launched.append(cfgs[0].kwargs["LANE1"]) or make(cfgs))
    configs = ((8, 255, 1, 2048, False), (4, 128, 3, 1024, True))
    assert gpu.sweep(dev, 1, shape=(10, 160, 100), real=False, configs=configs, bandwidth=(1e9, "test"))
    out = capsys.readouterr().out
    rows = re.findall(r"^ +(\d+) +(\d+) +(\d+) +(\d+) +(yes|no) +[\d.]+ +[\d.]+ +[\d.e+]+x  ([\d.]+) PASS\n +"
                      r"(?:kernels|ops) [\d.]+ ms of wall", out, re.MULTILINE)
    assert [(*(int(v) for v in r[:4]), r[4] == "yes") for r in rows] == [c for c in configs], out
    assert all(float(r[5]) <= 1 for r in rows)
    assert launched == [False, True]  # each row's kernel: the config's LANE1 (the interpreter's too)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    assert {1 * sms, 3 * sms} <= set(seen)  # the scratch rows [programs, V_T]: each config's program count
    assert (pk._launch, pk._num_programs, pk._TILES) == (before[0], before[1], before[2])


def test_sweep_starts_with_the_kernels_own_configs():
    """The sweep's default rows (the GPU's): ops.pkl_kernel's autotune configs as the kernel launches them (one
    program per SM, its GPU teacher tile), read from the kernel module, then the others."""
    from xtoken_ext.ops import pkl_kernel as pk

    rows, n = gpu.pkl_sweep(), len(pk._CONFIGS)
    assert rows[:n] == tuple((c.num_warps, c.maxnreg, 1, 2048, c.kwargs["LANE1"]) for c in pk._CONFIGS)
    assert {r[4] for r in rows[:n]} == {False, True} and rows[n:] == gpu.PKL_SWEEP_MORE and len(rows) == 8


def test_probe_stage_runs_on_the_cpu(capsys):
    """Stage 5 at a tiny shape whose student and teacher rows differ in number (15 and 16: the probe takes the rows
    both have): a row per W, direction and kernel, each checked against float64."""
    assert permute.probe(device(), shape=(15, 160, 100), real=False)
    rows = re.findall(r"^random W +([CD]) +\d+ +(.+?) +(\d) +([\d.]+) +(?:nan|[\d.]+) .* ([\d.]+) PASS$",
                      capsys.readouterr().out, re.MULTILINE)
    assert [(r[0], r[1], int(r[2])) for r in rows] == [(d, k, n) for d in "CD" for k, n in permute.KINDS]
    assert not permute.probe(device(), shape=(10, 160, 100), real=False, random=False)  # no W


@pytest.mark.parametrize("blk", [64, 2048])
def test_probe_layout_moves_every_pair_to_its_place(blk):
    """The two-stage permutation's arrays, run as the kernel runs them (in torch): stage 1 stores each pair tile's
    values at ascending places, distinct, within their y-tile's run; stage 2 finds x[m_i] for every i with a pair in
    its y-tile's run of ≤ blk values, which starts at a multiple of 8 with blk values of the row past it."""
    import xtoken_ext as xt

    m = permute.maps(xt.Projection.random(3001, 5003, seed=1, empty_rows=0.05))["C"]
    lay = {k: v.long() if isinstance(v, torch.Tensor) else v for k, v in permute.layout(m, blk).items()}
    x, half = torch.randn(3001), blk // 2
    scratch = torch.full((lay["NP"],), float("nan"))
    for j in range(0, lay["src"].numel(), half):
        s, d = lay["src"][j:j + half], lay["dst"][j:j + half]
        v = torch.where(s >= 0, x[s.clamp(min=0)], 0.0)[lay["perm"][j:j + half]]
        assert bool((d[d >= 0].diff() > 0).all()) and bool((s[s >= 0].diff() >= 0).all())
        scratch[d[d >= 0]] = v[d >= 0]
    start, i, ok = lay["start"], torch.arange(m.numel()), m >= 0
    assert int((~scratch.isnan()).sum()) == int(ok.sum())  # every pair its own place
    assert bool((start % 8 == 0).all()) and int(start.diff().max()) <= blk and lay["NP"] % 16 == 0
    assert lay["NP"] >= int(start[-1]) + blk and lay["NL"] == lay["src"].numel()
    cb = i[ok] // blk  # each place inside its y-tile's run
    assert bool((lay["loc"][ok] < start[cb + 1] - start[cb]).all())
    assert torch.equal(lay["loc"] >= 0, ok)
    assert torch.equal(scratch[lay["start"][i // blk] + lay["loc"].clamp(min=0)][ok], x[m.long()[ok]])


def test_probe_fails_a_wrong_permutation(monkeypatch, capsys):
    """A two-stage layout whose places are off by one pair: its rows FAIL against float64."""
    layout = permute.layout

    def shifted(m, blk):
        lay = dict(layout(m, blk))
        lay["loc"] = torch.where(lay["loc"] > 0, lay["loc"] - 1, lay["loc"])
        return lay

    monkeypatch.setattr(permute, "layout", shifted)
    assert not permute.probe(device(), shape=(10, 160, 100), real=False)
    out = capsys.readouterr().out
    assert re.search(r"two-stage .* FAIL$", out, re.MULTILINE) and not re.search(r"lane gather .* FAIL$", out,
                                                                                   re.MULTILINE)


def test_probe_cost_model_counts_sectors_by_hand():
    """sectors() on maps whose counts are known: the identity (32 adjacent 2-byte values: 2 sectors an instruction
    one per thread, 16 with lanes 8 apart) and a random permutation (32 sectors an instruction either way); each
    plus the streamed map and y (6 bytes per index) per pair."""
    n = 4096 * 8
    ident = torch.arange(n, dtype=torch.int32)
    assert permute.sectors("lane gather 1/thread", ident, n) == pytest.approx(2 / 32 + 6 / 32)
    assert permute.sectors("lane gather", ident, n) == pytest.approx(16 / 32 + 6 / 32)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(0)).int()
    assert permute.sectors("lane gather", shuffled, n) == pytest.approx(1 + 6 / 32, abs=0.01)
    assert permute.sectors("stream", ident, n) == pytest.approx(4 / 32)
    # the two-stage: 12 index bytes a pair and the streams, plus its sorted loads and run stores (identity: adjacent)
    assert permute.sectors("two-stage", ident, n) == pytest.approx((10 + 4 + 2) / 32 + 2 / 32 + 2 / 32, abs=0.01)


def test_stage_option(monkeypatch):
    calls = []
    monkeypatch.setattr(permute, "probe", lambda *a, **k: calls.append("probe") or True)
    monkeypatch.setattr(gpu, "cannot_run", lambda dry: None)
    monkeypatch.setattr(gpu, "correctness", lambda *a: calls.append("correctness") or True)
    monkeypatch.setattr(gpu, "timing",
                        lambda *a, random=True: calls.append("timing" if random else "timing real") or False)
    monkeypatch.setattr(gpu, "sweep", lambda *a: calls.append("sweep") or True)
    monkeypatch.setattr(gpu, "phases", lambda *a, **k: calls.append("phases") or True)
    monkeypatch.setattr(gpu, "_configuration", lambda *a: None)
    assert gpu.main(["--stage", "correctness"]) == 0 and calls == ["correctness"]
    assert gpu.main(["--stage", "timing"]) == 1 and calls == ["correctness", "timing"]
    assert gpu.main(["--stage", "sweep"]) == 0 and calls == ["correctness", "timing", "sweep"]
    assert gpu.main(["--stage", "probe"]) == 0 and calls[3:] == ["probe"]
    assert gpu.main(["--stage", "phases"]) == 0 and calls[4:] == ["phases"]
    assert gpu.main([]) == 1 and calls[5:] == ["correctness", "timing", "sweep", "probe", "phases"]
    assert gpu.main(["--stage", "timing", "--real-only"]) == 1 and calls[10:] == ["timing real"]
    for stage in ("timing", "sweep"):
        with pytest.raises(SystemExit) as e:
            gpu.main(["--dry", "--stage", stage])
        assert e.value.code == 2


def test_jobs_option(monkeypatch):
    """--jobs reaches the correctness stage (default: one process per core this process may use, up to 16, on a GPU
    machine; 1 with --dry); below 1 it is a usage error."""
    jobs = []
    monkeypatch.setattr(gpu, "cannot_run", lambda dry: None)
    monkeypatch.setattr(gpu, "correctness", lambda sizes, dev, dtypes, n: jobs.append(n) or True)
    monkeypatch.setattr(gpu, "_configuration", lambda *a: None)
    monkeypatch.setattr(gpu, "_cores", lambda: 64)
    assert gpu.main(["--stage", "correctness", "--jobs", "3"]) == 0
    assert gpu.main(["--stage", "correctness"]) == 0
    monkeypatch.setattr(gpu, "_cores", lambda: 2)
    assert gpu.main(["--stage", "correctness"]) == 0
    assert jobs == [3, 16, 2] and gpu.default_jobs(True) == 1
    with pytest.raises(SystemExit) as e:
        gpu.main(["--jobs", "0"])
    assert e.value.code == 2


def test_autotuned_lists_each_configuration_fastest_first(monkeypatch):
    """The timing stage's line of autotuning's timings: from the tuned kernel's configs_timings (Triton's do_bench
    quantiles, median first), fastest first; nothing where no configuration was timed."""
    import types

    import triton

    from xtoken_ext.ops import hkl_kernel as hk

    a, b = triton.Config({"BLOCK_S": 2048}, num_warps=8), triton.Config({"BLOCK_S": 4096}, num_warps=16)
    tuner = types.SimpleNamespace(configs_timings={a: [3.5, 3.0, 4.0], b: [2.25, 2.0, 2.5]})
    monkeypatch.setattr(hk, "_launch", types.SimpleNamespace(kernel=tuner))
    assert gpu.autotuned("hkl") == ("autotuned: {'BLOCK_S': 4096} 16 warps 2.25 ms, {'BLOCK_S': 2048} 8 warps "
                                    "3.50 ms")
    monkeypatch.setattr(hk, "_launch", types.SimpleNamespace(kernel=types.SimpleNamespace()))
    assert gpu.autotuned("hkl") is None
