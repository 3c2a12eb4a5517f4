"""ops._tl.PhaseTimes, the fused kernels' per-phase timing (the GPU check's phases stage). Under the interpreter its
programs run one after another and PROFILE 2's logical clock ticks once per stamp, so a phase's total is the number
of laps it took: where the stamps sit is pinned by those counts (every chunk's A, B, R, C and tail; D once per
slice, every slice taken once; a wait before each take and after each guard; H-KL's every phase once a chunk). On
CUDA the totals are nanoseconds of the global timer, whose variant (PROFILE 1) is also compiled here for sm_90.
Timing changes no result: the outputs are bitwise those of the untimed kernel."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
import triton
import triton.language as tl

from helpers import compiled_json, device, make_problem, pairs_of
from xtoken_ext.ops import _tl
from xtoken_ext.ops import pkl as _ops  # noqa: F401  (registers both xtoken:: ops)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked interpreter lanes evaluate log(0)


@triton.jit
def _laps_kernel(prof_ptr, PROFILE: tl.constexpr):
    """Three laps after a stamp: two to phase 0, one to phase 3."""
    t = _tl.stamp(prof_ptr, PROFILE)
    t = _tl.lap(t, prof_ptr, 0, PROFILE)
    t = _tl.lap(t, prof_ptr, 0, PROFILE)
    _tl.lap(t, prof_ptr, 3, PROFILE)


def test_lap_slots():
    """_tl.lap adds the time since the last stamp to this program's row (1 + program) at the phase's slot: on the
    logical clock (PROFILE 2) one tick a lap, the clock (row 0, slot 0) at every stamp of every program, and the
    phases in lap order after the trace's length (slot 8); PROFILE 0 writes nothing. Two programs under the
    interpreter (one after the other), one on a GPU (where programs would interleave their ticks)."""
    dev = device()
    n = 2 if _tl.interpret() else 1
    for profile in (0, 2):
        buf = torch.zeros(1 + n, _tl.ROW.value, dtype=torch.int64, device=dev)
        _laps_kernel[(n,)](buf, PROFILE=profile)
        want = torch.zeros_like(buf, device="cpu")
        if profile:
            want[0, 0] = 4 * n
            want[1:, 0], want[1:, 3], want[1:, 8] = 2, 1, 3
            want[1:, 9:12] = torch.tensor([0, 0, 3])
        assert torch.equal(buf.cpu(), want), (profile, buf)


def test_global_timer_variant_compiles_for_sm90(tmp_path):
    """PROFILE 1, the GPU's variant, which the interpreter cannot run (no inline assembly): compiled for sm_90 (no
    GPU needed, bench.sass.compile_sm90), it reads %globaltimer; PROFILE 0 reads no timer and no clock."""
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]); from test_phase_times import _laps_kernel; "
              "from xtoken_ext.bench.sass import compile_sm90; "
              "print(json.dumps([compile_sm90(_laps_kernel, {'PROFILE': p}, 1)[0].asm['ptx'] for p in (0, 1)]))")
    untimed, timed = compiled_json(tmp_path, script, os.path.dirname(__file__), timeout=300)
    assert "%globaltimer" in timed and "%globaltimer" not in untimed and "atom" not in untimed


def _to(dev, *xs):
    return [x.to(dev) if isinstance(x, torch.Tensor) else x for x in xs]


def _timed(op, args):
    """(untimed outputs, timed outputs, PhaseTimes) of one op call each."""
    untimed = op(*args, "triton")
    with _tl.PhaseTimes() as pt:
        timed = op(*args, "triton")
    for a, b in zip(untimed, timed, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    return pt


@pytest.mark.parametrize("merge,sparse_k,learn_w", [("mean", 0, False), ("first", 0, False), ("chain", 7, False),
                                                     ("mean", 0, True)])
def test_pkl_phases(merge, sparse_k, learn_w):
    from xtoken_ext.ops import pkl_kernel as K

    P = make_problem(seed=5, V_S=300, V_T=211, n_chunks=5, max_rows=2, sparse_k=sparse_k, mask_mode="covered",
                     empty_rows=0.0, hub=True)
    dev = device()
    args = _to(dev, P.z.to(torch.bfloat16), P.t.to(torch.bfloat16), P.t_cols, P.w_idx, P.w_val, P.col_mask, P.spans,
               0.7, merge, 0.0, P.t_chain, None, learn_w)
    pt = _timed(torch.ops.xtoken.pkl_rows, args)
    t, n_chunks = pt.totals["P-KL"], P.spans.shape[0]
    assert list(t) == list(K.PHASES) and pt.programs["P-KL"] == K._num_programs(n_chunks, torch.device(dev))
    if K.interpret():
        slices = math.ceil(math.ceil(300 / 128) / K._SLICES["SLICE"])  # the interpreter's BLOCK_S = 128
        assert [t[p] for p in ("A", "B", "R", "C", "tail")] == [n_chunks] * 5
        assert t["D"] == slices * n_chunks and t["wait"] == t["D"] + n_chunks
        # each program's laps in order: per chunk A, B, R, C, tail, then the guard before the next chunk (the last
        # round's after the last): a wait before each slice it takes, and one when done
        letter = dict(zip(K.PHASES, "ABRCtDw"))
        traces = ["".join(letter[p] for p in tr) for tr in pt.traces["P-KL"]]
        assert all(re.fullmatch(r"(ABRCt(?:wD)*w)+", tr) for tr in traces), traces
        assert sum(tr.count("ABRCt") for tr in traces) == n_chunks
    else:  # ns (the global timer may tick in µs: a phase of these tiny rows can read 0)
        assert min(t.values()) >= 0 and sum(t.values()) > 0


@pytest.mark.parametrize("merge,sparse_k", [("mean", 0), ("first", 7)])
def test_hkl_phases(merge, sparse_k):
    from xtoken_ext.ops import hkl_kernel as H

    P = make_problem(seed=7, V_S=97, V_T=61, n_chunks=3, max_rows=2, sparse_k=sparse_k, mask_mode="covered",
                     empty_rows=0.0, hub=True)
    dev = device()
    cs, ct = pairs_of(P, "relaxed")
    args = _to(dev, P.z, P.t, P.t_cols, P.col_mask, P.spans, 0.7, merge, None, P.t_chain, cs, ct, 20)
    pt = _timed(torch.ops.xtoken.hkl_rows, args)
    t, n_chunks = pt.totals["H-KL"], P.spans.shape[0]
    assert list(t) == list(H.PHASES)
    if H.interpret():  # every chunk valid with an uncommon top m: every lap taken once a chunk, in PHASES' order
        assert list(t.values()) == [n_chunks] * len(H.PHASES)
        traces = pt.traces["H-KL"]
        assert sum(len(tr) for tr in traces) == n_chunks * len(H.PHASES), traces
        assert all(tr == list(H.PHASES) * (len(tr) // len(H.PHASES)) for tr in traces), traces
    else:  # ns (the global timer may tick in µs: a phase of these tiny rows can read 0)
        assert min(t.values()) >= 0 and sum(t.values()) > 0


def test_untimed_launches_take_no_buffer():
    """Outside a PhaseTimes the kernels get the placeholder and PROFILE 0 (their untimed variant); inside, a zeroed
    buffer and the interpreter's logical clock or the GPU's timer. PhaseTimes nest (the inner one's launches are its
    own), and leave the outer one active."""
    dev = torch.device(device())
    placeholder = torch.zeros(1)
    assert _tl.phase_args("P-KL", ("A",), 4, dev, placeholder) == (placeholder, 0)
    with _tl.PhaseTimes() as outer:
        with _tl.PhaseTimes() as inner:
            buf, profile = _tl.phase_args("P-KL", ("A",), 4, dev, placeholder)
        assert _tl.PhaseTimes.active is outer
        _tl.phase_args("H-KL", ("x", "y"), 2, dev, placeholder)
    assert buf.shape == (5, _tl.ROW.value) and buf.dtype == torch.int64 and not buf.any()
    assert profile == (2 if _tl.interpret() else 1) and _tl.PhaseTimes.active is None
    assert inner.totals == {"P-KL": {"A": 0}} and inner.programs == {"P-KL": 4}
    assert outer.totals == {"H-KL": {"x": 0, "y": 0}} and outer.programs == {"H-KL": 2}


def test_a_timed_launch_needs_an_autotuned_shape():
    """An autotuned kernel's first call of a shape inside a PhaseTimes would autotune its timed variant, each timing
    run adding to the totals: ops._tl.Launch refuses it, and lets it through once the shape has run untimed."""
    import triton

    runs = []

    class Tuned:  # what Launch sees of an autotuned kernel: .fn (its arg names) and kernel[grid](...)
        fn = type("fn", (), {"arg_names": ["x_ptr", "n"], "__name__": "k"})

        def __getitem__(self, grid):
            return lambda *a, **kw: runs.append(kw.get("PROFILE", 0))

    launch = _tl.Launch(Tuned(), {}, [triton.Config({})] * 2, ["n"])
    launch._compile_ahead = lambda grid, args, kwargs: launch.warm.add(launch._key(args, kwargs))
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="not autotuned yet"):
        launch((1,), x, 4, PROFILE=1)
    launch((1,), x, 4, PROFILE=0)
    launch((1,), x, 4, PROFILE=1)
    with pytest.raises(RuntimeError, match="not autotuned yet"):
        launch((1,), x, 8, PROFILE=1)  # another shape
    assert runs == [0, 1]
