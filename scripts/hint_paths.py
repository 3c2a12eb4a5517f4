"""Which path the fused H-KL kernel's top-m selection takes on real logits: per side, the chunks whose hinted single
pass hit, those _rescue listed after a miss, and those that took the exact path (ops.hkl_kernel.last_paths bits 0 / 1
and 5 / 6), past each program's first two chunks. Not part of `xtoken bench` (a test runs it on a tiny model): a
measurement for bench/costmodel.py's HIT_RATE and RESCUE_RATE. Results never depend on the path (the tests check
every path against float64); the largest relative difference of the loss from the torch backend's is printed beside.

Rows: bf16 logits of a real model (examples/_common.py specs, e.g. gguf:smollm2-135m, gguf:gemma3-270m) on prose
(README.md), code (xtoken_ext/losses.py) and math text, up to 700 tokens each (or the model's context), rows shuffled;
the teacher side takes the same rows in another order. Per run m:frac, a random share frac of the vocabulary is uncommon
on both sides (the rest paired one to one) and uncommon_topk = m (the lists' capacity 2 m + 4,096); per run m:frac:topk
(topk > m), as with Llama-3 → Qwen3 at the default options, the teacher's uncommon set is m random ids (listed whole;
the rest of its unpaired columns outside the allowed set), the student's a share frac (hinted, capacity 2 topk + 4,096),
uncommon_topk = topk. τ = 1, merge "first", 1-to-1 chunks. Without CUDA the kernel runs under TRITON_INTERPRET=1 (two
programs, as the tests), minutes per run; on a GPU (a program per SM) pass --chunks 2100, so that chunks remain past the
programs' first two.

    python scripts/hint_paths.py gguf:smollm2-135m 128:0.15 2048:0.333 --chunks 200
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def logits(spec: str) -> torch.Tensor:
    sys.path.insert(0, str(ROOT / "examples"))
    from _common import load_model, math_texts

    model, tok = load_model(spec)
    n = min(700, getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    texts = [(ROOT / "README.md").read_text()[:6000], (ROOT / "xtoken_ext" / "losses.py").read_text()[:6000],
             "\n".join(math_texts(40))]
    with torch.no_grad():
        return torch.cat([model(tok(t, return_tensors="pt").input_ids[:, :n]).logits[0].to(torch.bfloat16)
                          for t in texts])


def run_spec(text: str) -> tuple[int, float, int]:
    """argparse type: m:frac or m:frac:topk (checked before the model runs)."""
    parts = text.split(":")
    try:
        m, frac, topk = int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else 0
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected m:frac or m:frac:topk, got {text!r}") from None
    if len(parts) > 3 or m < 1 or not 0 < frac <= 1 or topk < 0:
        raise argparse.ArgumentTypeError(f"expected m >= 1, 0 < frac <= 1, topk >= 0, got {text!r}")
    return m, frac, topk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("runs", nargs="+", type=run_spec, help="m:frac or m:frac:topk (module docstring)")
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    from xtoken_ext.ops import hkl_kernel  # its package registers the xtoken:: ops

    z = logits(a.model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(a.seed)
    N, V = min(a.chunks, z.shape[0]), z.shape[1]
    zs, zt = (z[torch.randperm(z.shape[0], generator=g)[:N]].contiguous().to(dev) for _ in range(2))
    spans = torch.tensor([[i, i + 1, i, i + 1] for i in range(N)], device=dev)
    for m, frac, topk in a.runs:
        perm = torch.randperm(V, generator=g)
        n_s = int(frac * V)
        n_t = m if topk > m else n_s
        # pairs t = s on perm[n_s:]; with n_t < n_s the teacher columns perm[n_t:n_s] are outside the allowed set
        # (as uncovered="renormalize" drops a real W's uncovered columns), perm[:n_t] its uncommon ones
        common = perm[n_s:].sort().values.int().to(dev)
        allowed = torch.ones(V, dtype=torch.bool)
        allowed[perm[n_t:n_s]] = False
        args = (zt, None, allowed.to(dev), spans, 1.0, "first", None, None, common, common, max(topk, m))
        loss = torch.ops.xtoken.hkl_rows(zs, *args, "triton")[0]
        paths = hkl_kernel.last_paths.tolist()[2 * hkl_kernel._programs(zs.device, N, 0):]
        ref = torch.ops.xtoken.hkl_rows(zs, *args, "torch")[0]
        rel = float(((loss - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        sides = []
        for side, hit, res in (("student", 1, 32), ("teacher", 2, 64)):
            if any(p & hit and p & res for p in paths):
                raise AssertionError(f"a chunk both hit and was rescued on the {side} side: {paths}")
            h, r = sum(bool(p & hit) for p in paths), sum(bool(p & res) for p in paths)
            sides.append(f"{side} hit {h}, rescued {r}, exact {len(paths) - h - r}")
        print(f"{a.model} m = {m}, uncommon_topk = {max(topk, m)}, |U_S| = {n_s}, |U_T| = {n_t} of {V}, "
              f"{len(paths)} chunks: " + "; ".join(sides) + f" (loss vs the torch backend: {rel:.1e} relative at most)",
              flush=True)


if __name__ == "__main__":
    main()
