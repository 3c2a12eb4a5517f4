"""xt.Distiller under torch.distributed: 2 CPU processes (gloo, torch.multiprocessing spawn) give the single-process
loss and gradient on the same data — with data parallelism alone (dynamic scaling, confidence weighting) and with
data parallelism plus gradient accumulation (fixed scaling, window normalizers).

The models are lookup tables (logits = table[ids mod M]): a row's logits are the same bits in every batch layout,
so the two runs differ only by the order of floating-point sums, and the tolerance follows from fp32 roundoff:
every global value is a sum of at most N_terms non-negative per-chunk / per-token terms (relative error ≤ γ_N), the
dynamic scale and the confidence weights are ratios / a softmax of such sums, each row's gradient is the same
kernel output times a scalar built from them, and a table entry's gradient is a sum over the R rows that read it.
Hence |Δg| ≤ C·u₃₂·(N_terms + R)·Σ_rows |∂L/∂z_row| per entry (the sum of magnitudes taken in float64 from the
single-process run), and |Δ| ≤ C·u₃₂·(N_terms + R)·|value| for the loss values."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import xtoken_ext as xt
from xtoken_ext.distill import Distiller, Teacher

M, V_S, V_T = 97, 53, (41, 67)
C, U32 = 8.0, 2.0 ** -24
TEXTS = ["The year 2024 had 366 days; 12,345 apples cost $3.50 in total.",
         "def area(r):\n    return 3.14159 * r ** 2",
         "Short one.",
         "Q: what is 12 + 30? A: 42, and 7 pears; then 1999 - 1000 = 999 and more text after that."]


class Table(torch.nn.Module):
    """logits[b, p] = table[ids[b, p] mod M]: no arithmetic, so every layout of the batch gives the same rows."""

    def __init__(self, V: int, seed: int, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(scale * torch.randn(M, V, generator=g))

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids % M]


def fold(batch):
    """Real token ids -> the small test vocabularies (labels mod V_S, teacher ids mod V_T)."""
    out = dict(batch)
    out["labels"] = torch.where(batch["labels"] >= 0, batch["labels"] % V_S, -100)
    out["teachers"] = [dict(td, input_ids=td["input_ids"] % v) for td, v in zip(batch["teachers"], V_T)]
    return out


def distiller(scaling: str, weighting: str):
    teachers = [Teacher(Table(v, seed=10 + j, scale=3.0), None, loss=loss, name=loss,
                        projection=xt.Projection.random(V_S, v, seed=j))
                for j, (v, loss) in enumerate(zip(V_T, ("pkl", "hkl")))]
    return Distiller(None, teachers, scaling=scaling, weighting=weighting, confidence="ce")


def run(student, d, micro_batches, no_sync=None):
    """Forward/backward every micro-batch with the window's normalizers; -> (summed loss values, metrics list)."""
    norm = d.normalizers(micro_batches) if len(micro_batches) > 1 else None
    metrics = []
    for i, b in enumerate(micro_batches):
        ctx = no_sync() if no_sync is not None and i < len(micro_batches) - 1 else torch.enable_grad()
        with ctx:
            loss, m = d(student(b["input_ids"]), b, normalizers=norm)
            loss.backward()
        metrics.append(m)
    return metrics


CONFIGS = {"dp": ("dynamic", "confidence"), "dp_ga": ("fixed", "static")}


def _worker(rank: int, world: int, init: str, shards: dict, out: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for name, (scaling, weighting) in CONFIGS.items():
            student = torch.nn.parallel.DistributedDataParallel(Table(V_S, seed=0))
            metrics = run(student, distiller(scaling, weighting), shards[name][rank], student.no_sync)
            results[name] = (student.module.table.grad.clone(), metrics)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still uses it (a std::terminate, ~1 run in 5)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(offline_tok):
    s, m, q = offline_tok("gpt2"), offline_tok("mistral-spm"), offline_tok("qwen3")
    col = xt.Collator(s, [m, q], max_length=40)
    full = fold(col(TEXTS))
    shards = {"dp": [[fold(col(TEXTS[:2]))], [fold(col(TEXTS[2:]))]],
              "dp_ga": [[fold(col([t])) for t in TEXTS[:2]], [fold(col([t])) for t in TEXTS[2:]]]}
    return full, shards


def single(full, scaling, weighting):
    """The single-process run on the whole batch: (gradient, metrics, Σ_rows |∂L/∂z| per table entry, N_terms, R)."""
    student = Table(V_S, seed=0)
    d = distiller(scaling, weighting)
    z = student(full["input_ids"])
    z.retain_grad()
    loss, metrics = d(z, full)
    loss.backward()
    ids = (full["input_ids"] % M).reshape(-1)
    mag = torch.zeros(M, V_S, dtype=torch.float64).index_add_(0, ids, z.grad.reshape(-1, V_S).double().abs())
    terms = int((full["labels"][:, 1:] >= 0).sum()) + sum(int(td["alignment"].chunk_valid.sum())
                                                          for td in full["teachers"])
    return student.table.grad, metrics, mag, terms, ids.numel()


def test_two_processes_equal_one(data, tmp_path):
    full, shards = data
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg", shards, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (scaling, weighting) in CONFIGS.items():
        grad, metrics, mag, terms, rows = single(full, scaling, weighting)
        eps = C * U32 * (terms + rows)
        for r in range(2):
            g = ranks[r][name][0]
            err = (g.double() - grad.double()).abs()
            ratio = float((err / (eps * mag + 1e-30)).max())
            assert ratio <= 1, f"{name} rank {r}: gradient off by {float(err.max()):.3e}, worst err/bound {ratio:.3f}"
        got = [rank[name][1] for rank in ranks]
        # both ranks hold the same all-reduced metrics
        for a, b in zip(*got):
            assert all(torch.equal(a[k], b[k]) for k in a)
        # additive metrics add up over the accumulated micro-batches; the others are the whole batch's
        window = got[0]
        for k, ref in metrics.items():
            if k in ("loss", "ce", "kd") or k.startswith(("kd/", "excluded/")):
                val = sum(m[k] for m in window)
            elif k.startswith(("valid_frac/", "top1/")) and len(window) > 1:
                continue  # per micro-batch ratios
            elif k == "kd_scale" and len(window) > 1:
                continue
            else:
                val = window[0][k]
            assert abs(float(val) - float(ref)) <= eps * abs(float(ref)) + 1e-30, (name, k, float(val), float(ref))
        if name == "dp":  # the confidence weights really differ from uniform, the scale from 1
            assert abs(float(metrics["alpha/pkl"]) - 0.5) > 1e-3 and float(metrics["kd_scale"]) != 1.0


def test_a_local_normalizer_would_be_caught(data):
    """The bound is tight enough to see the wrong normalization: the mean of per-rank means differs."""
    full, shards = data
    grad, _, mag, terms, rows = single(full, "dynamic", "static")
    eps = C * U32 * (terms + rows)
    g = torch.zeros_like(grad)
    for shard in shards["dp"]:  # two independent processes, each normalizing by its own counts, averaged
        student = Table(V_S, seed=0)
        run(student, distiller("dynamic", "static"), shard)
        g += student.table.grad / 2
    assert not bool(((g.double() - grad.double()).abs() <= eps * mag + 1e-30).all())
