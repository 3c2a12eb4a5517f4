"""ops._tl.Launch, the launcher of the autotuned kernels (H-KL's and P-KL's, two configurations each): before a key's
first call every configuration compiles at once, one thread each, with exactly the arguments Triton's autotuner then
runs it with (so that it finds them compiled), on the caller's device; once per key; a failure only warns. Checked
with a stand-in for the jitted kernel under Triton's real autotuner (its timing replaced: no GPU here)."""
from __future__ import annotations

import collections
import contextlib
import threading

import pytest
import torch
import triton
from triton.runtime.jit import KernelInterface

from xtoken_ext.ops import _tl

CONFIGS = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8, num_stages=2)]


def _source(x_ptr, n, BLOCK):
    pass


class FakeJit(KernelInterface):
    """Records what each run compiles (its constexprs and options, the Triton kernel cache's key material), from which
    thread and device; warmups meet at a barrier, which a one-after-another compile would never pass."""
    arg_names = ["x_ptr", "n", "BLOCK"]
    fn = staticmethod(_source)
    __name__ = "fake"

    def __init__(self, barrier_parties: int, fail: bool = False):
        self.runs, self.cache_makers = [], []
        self.device_caches = collections.defaultdict(lambda: self.cache_makers.append(threading.get_ident()) or {})
        self.barrier = threading.Barrier(barrier_parties, timeout=20)
        self.fail = fail

    def run(self, *args, grid, warmup, **kwargs):
        self.runs.append(dict(warmup=warmup, grid=grid, args=args, kw=kwargs, thread=threading.get_ident(),
                              device=torch.cuda.current_device()))
        if warmup:
            self.barrier.wait()
            if self.fail and kwargs["BLOCK"] == 128:
                raise RuntimeError("ptxas died")


@pytest.fixture
def cuda_device(monkeypatch):
    """torch.cuda's current device as a thread-local stand-in (no GPU here): device 3 in the caller."""
    local = threading.local()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: getattr(local, "device", 0))

    @contextlib.contextmanager
    def device(d):
        before = torch.cuda.current_device()
        local.device = d
        try:
            yield
        finally:
            local.device = before

    monkeypatch.setattr(torch.cuda, "device", device)
    local.device = 3


def _tuned(fake):
    def bench(kernel_call, **_):  # the autotuner's timing: one call, config BLOCK 128 "faster"
        kernel_call()
        return [2.0 if fake.runs[-1]["kw"]["BLOCK"] == 64 else 1.0] * 3
    return triton.autotune(CONFIGS, key=["n"], do_bench=bench)(fake)


def test_every_config_compiles_at_once_as_the_autotuner_runs_it(cuda_device):
    fake = FakeJit(len(CONFIGS))
    launch = _tl.Launch(_tuned(fake), {}, CONFIGS, ["n"])
    x = torch.zeros(8)
    launch((5,), x, 8)
    warm = [r for r in fake.runs if r["warmup"]]
    timed = [r for r in fake.runs if not r["warmup"]]
    assert len(warm) == len(CONFIGS) and len({r["thread"] for r in warm}) == len(CONFIGS)
    assert {r["device"] for r in fake.runs} == {3} and list(fake.device_caches) == [3]
    assert fake.cache_makers == [threading.get_ident()]  # Triton's per-device cache made by the caller, not a thread
    # the autotuner runs each config (timing), then the best: the same arguments and options the warmups compiled
    assert len(timed) == len(CONFIGS) + 1 and timed[-1]["kw"]["BLOCK"] == 128
    assert sorted(map(repr, (r["kw"] for r in warm))) == sorted(map(repr, (r["kw"] for r in timed[:-1])))
    assert all(r["args"] == (x, 8) and r["grid"] == (5,) for r in fake.runs)
    assert sorted((r["kw"]["BLOCK"], r["kw"]["num_warps"], r["kw"]["num_stages"]) for r in warm) == [
        (c.kwargs["BLOCK"], c.num_warps, c.num_stages) for c in CONFIGS]  # the launch options too
    # once per key: the same n again compiles nothing more, another n again ahead of its autotuning
    fake.runs.clear()
    launch((5,), x, 8)
    assert [r["warmup"] for r in fake.runs] == [False]
    fake.runs.clear()
    launch((5,), x, 9)
    assert sum(r["warmup"] for r in fake.runs) == len(CONFIGS)
    fake.runs.clear()
    launch((5,), x.double(), 9)  # the tensors' dtypes are part of the key
    assert sum(r["warmup"] for r in fake.runs) == len(CONFIGS)


def test_a_failed_compile_ahead_warns_and_the_call_still_runs(cuda_device):
    fake = FakeJit(len(CONFIGS), fail=True)
    launch = _tl.Launch(_tuned(fake), {}, CONFIGS, ["n"])
    with pytest.warns(RuntimeWarning, match=r"compiling the 2 configurations of fake at once failed .*ptxas died"):
        launch((1,), torch.zeros(4), 4)
    assert [r["warmup"] for r in fake.runs] == [True, True, False, False, False]


def test_single_config_and_interpreter_launch_directly():
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw))

    _tl.Launch(Kernel(), {"BLOCK": 16})((2,), 1, n=3)
    assert calls == [((2,), (1,), {"n": 3, "BLOCK": 16})]
    launch = _tl.launcher(Kernel(), {"BLOCK": 16}, CONFIGS, key=["n"])  # tests run under TRITON_INTERPRET=1
    assert launch.configs == [] and launch.meta == {"BLOCK": 16}


def test_launcher_compiles_ahead_only_with_several_configs(monkeypatch):
    """Off the interpreter: the kernel autotuned, compiled ahead where there is a choice; one config runs as is."""
    monkeypatch.setattr(_tl, "interpret", lambda: False)
    one, two = _tl.launcher(FakeJit(1), {}, CONFIGS[:1], key=["n"]), _tl.launcher(FakeJit(2), {}, CONFIGS, key=["n"])
    assert one.configs == [] and two.configs == CONFIGS and two.key == ["n"] and one.meta == two.meta == {}
    assert isinstance(two.kernel, triton.runtime.Autotuner) and two.kernel.configs == CONFIGS
