"""Cross-tokenizer distillation with Accelerate: DDP and exact gradient accumulation.

    python examples/accelerate_loop.py                                      # one process, tiny models
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --cpu           # two CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py   # two GPUs

With several processes the Distiller all-reduces its counts and statistics (its loss is the rank's contribution
× world size, which DDP's gradient averaging turns into the global gradient). Gradient accumulation: the counts of
the whole optimizer step (``distiller.normalizers`` over the step's micro-batches, all ranks) normalize every
micro-batch, so the accumulated gradient is the one of the whole batch; ``no_sync`` skips the all-reduce of all but
the last micro-batch. The Accelerator is not told about the accumulation (it would divide the loss once more).
"""
from __future__ import annotations

import argparse
import itertools

import torch
from _common import description, load_model, math_texts, positive_int
from accelerate import Accelerator

import xtoken_ext as xt


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--student", default="tiny-gpt2:gpt2")
    ap.add_argument("--teacher", default="tiny-gpt2:qwen3")
    ap.add_argument("--steps", type=positive_int, default=5)
    ap.add_argument("--batch-size", type=positive_int, default=2)
    ap.add_argument("--accumulation", type=positive_int, default=2)
    ap.add_argument("--max-length", type=positive_int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cpu", action="store_true", help="run on CPU (several processes: gloo)")
    args = ap.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    student, student_tok = load_model(args.student)
    teacher, teacher_tok = load_model(args.teacher, seed=1)
    teacher.to(accelerator.device)
    distiller = xt.Distiller(student_tok, [xt.Teacher(teacher, teacher_tok)])
    n = args.steps * args.accumulation * args.batch_size * accelerator.num_processes
    loader = torch.utils.data.DataLoader(math_texts(n), batch_size=args.batch_size,
                                         collate_fn=distiller.collator(max_length=args.max_length))
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    student.train()
    history, batches = [], iter(loader)
    for step in range(args.steps):
        window = list(itertools.islice(batches, args.accumulation))
        if not window:
            break
        norm = distiller.normalizers(window)  # counts of the whole step, all ranks
        totals: dict[str, float] = {}
        for i, batch in enumerate(window):
            ctx = accelerator.no_sync(student) if i < len(window) - 1 else torch.enable_grad()
            with ctx:
                logits = student(**xt.Distiller.model_inputs(batch, accelerator.unwrap_model(student))).logits
                loss, metrics = distiller(logits, batch, normalizers=norm)
                accelerator.backward(loss)
            for k in ("loss", "ce", "kd"):  # contributions add up to the step's values
                totals[k] = totals.get(k, 0.0) + float(metrics[k])
        accelerator.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        history.append(totals | {"step": step})
        if accelerator.is_main_process:
            print({k: round(v, 4) for k, v in history[-1].items()}, f"({accelerator.num_processes} processes)",
                  flush=True)
    return history


if __name__ == "__main__":
    main()
