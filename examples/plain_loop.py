"""Cross-tokenizer distillation in a plain PyTorch loop.

    python examples/plain_loop.py                                   # tiny random models, offline, seconds
    python examples/plain_loop.py --student gguf:smollm2-135m --teacher gguf:gemma3-270m --steps 20

The collator tokenizes every text for the student and the teacher and aligns them; the Distiller runs the teacher
(no grad, its own device and dtype), builds W on the first batch (cached on disk), picks P-KL or H-KL from the
coverage audit and returns CE + KD with the dynamic scaling, plus metrics.
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import description, load_model, math_texts, positive_int

import xtoken_ext as xt


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--student", default="tiny-gpt2:gpt2")
    ap.add_argument("--teacher", default="tiny-llama:mistral-spm")
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--max-length", type=positive_int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    student, student_tok = load_model(args.student)
    teacher, teacher_tok = load_model(args.teacher, seed=1)
    distiller = xt.Distiller(student_tok, [xt.Teacher(teacher, teacher_tok)])
    loader = torch.utils.data.DataLoader(math_texts(args.steps * args.batch_size), batch_size=args.batch_size,
                                         collate_fn=distiller.collator(max_length=args.max_length))
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    student.train()
    history = []
    for step, batch in enumerate(loader):
        start = time.perf_counter()
        logits = student(**xt.Distiller.model_inputs(batch, student)).logits
        loss, metrics = distiller(logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        row = {k: float(v) for k, v in metrics.items()} | {"step": step, "step_time": time.perf_counter() - start}
        history.append(row)
        print({k: round(v, 4) for k, v in row.items()}, flush=True)
    print("loss:", distiller.teachers[0].kind.upper(), "for", args.teacher)
    return history


if __name__ == "__main__":
    main()
