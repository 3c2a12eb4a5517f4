"""W build: ``Projection.from_tokenizers`` (batch re-tokenization + numpy) vs the authors' way of building W (a
Python loop that decodes and re-encodes one student token at a time), Llama-3 x Qwen3 at the models' logit widths
(128,256 x 151,936). Tokenizer loading is not timed."""
from __future__ import annotations

import os
import tempfile
import time


def _per_token_loop(student, teacher, ids, max_pieces=4, gamma=0.1) -> dict:
    """The release's pass 2: decode one student id, encode it with the teacher, add the decay weights."""
    counts: dict = {}
    for s in ids:
        pieces = teacher(student.decode([s]), add_special_tokens=False)["input_ids"][:max_pieces]
        z = sum(gamma ** i for i in range(len(pieces)))
        for i, t in enumerate(pieces):
            counts[s, t] = counts.get((s, t), 0.0) + gamma ** i / z
    return counts


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(quick: bool = False) -> None:
    from xtoken_ext.projection import Projection
    from xtoken_ext.testing import offline_tokenizer

    names, sizes, sample = (("gpt2", "mistral-spm"), (None, None), 200) if quick else (
        ("llama3", "qwen3"), (128256, 151936), 5000)
    student, teacher = offline_tokenizer(names[0]), offline_tokenizer(names[1])
    V_S = sizes[0] or len(student)

    def build(cache):
        return Projection.from_tokenizers(student, teacher, *sizes, cache=cache, progress=False)

    t_first = _best(lambda: build(False), 1)  # includes both token tables (computed once per tokenizer)
    t_cold = _best(lambda: build(False), 1 if quick else 3)
    saved = os.environ.get("XTOKEN_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XTOKEN_CACHE"] = tmp
        try:
            build(True)
            t_cached = _best(lambda: build(True), 5)
        finally:
            if saved is None:
                del os.environ["XTOKEN_CACHE"]
            else:
                os.environ["XTOKEN_CACHE"] = saved
    step = max(len(student) // sample, 1)
    ids = list(range(0, len(student), step))[:sample]
    t_loop = _best(lambda: _per_token_loop(student, teacher, ids), 1) * V_S / len(ids)

    print(f"W build, {names[0]} ({V_S:,} rows) x {names[1]} ({sizes[1] or len(teacher):,} columns)")
    rows = [
        (f"per-token decode+encode loop (authors' way): {len(ids):,}-token sample x {V_S / len(ids):.1f}",
         t_loop),
        ("from_tokenizers, cold, incl. both token tables", t_first),
        ("from_tokenizers, cold, token tables already built", t_cold),
        ("from_tokenizers, from the on-disk cache", t_cached),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'seconds':>8}  {'speed-up vs loop':>16}")
    for name, t in rows:
        print(f"{name:<{width}}  {t:>8.3f}  {t_loop / t:>15.1f}x")
