"""Two teachers with different tokenizers (and losses picked per teacher by the audit), in a plain loop, with
static or confidence-adaptive weights and a learnable W for the P-KL teacher.

    python examples/two_teachers.py
    python examples/two_teachers.py --weighting confidence
    python examples/two_teachers.py --student gguf:smollm2-135m --teacher gguf:gemma3-270m \\
        --teacher2 gguf:smollm2-135m --steps 20     # the 2nd teacher shares the student's tokenizer: plain KL

KD = Σ_m α_m KD_m (METHOD.md §9); the metrics show each teacher's KD, weight, valid-chunk fraction and top-1
agreement. The learnable W's θ gets its own optimizer group (lr 1e-2, no weight decay, no clipping).
"""
from __future__ import annotations

import argparse

import torch
from _common import description, load_model, math_texts, positive_int

import xtoken_ext as xt


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--student", default="tiny-gpt2:gpt2")
    ap.add_argument("--teacher", default="tiny-llama:mistral-spm")
    ap.add_argument("--teacher2", default="tiny-gpt2:qwen3")
    ap.add_argument("--weights", type=float, nargs=2, help="static weights of the two teachers (default: 0.8 0.2)")
    ap.add_argument("--weighting", choices=["static", "confidence"], default="static")
    ap.add_argument("--learnable-w", action="store_true", help="learn W of the first teacher (P-KL)")
    ap.add_argument("--steps", type=positive_int, default=8)
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--max-length", type=positive_int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if args.weights is not None and args.weighting == "confidence":
        ap.error("--weights are static weights: --weighting confidence computes its own")
    args.weights = args.weights or (0.8, 0.2)

    student, student_tok = load_model(args.student)
    teachers = []
    for j, (spec, w) in enumerate(zip((args.teacher, args.teacher2), args.weights)):
        model, tok = load_model(spec, seed=1 + j)
        learn = args.learnable_w and j == 0
        teachers.append(xt.Teacher(model, tok, weight=w, name=f"t{j}", learnable=learn,
                                   loss="pkl" if learn else "auto"))
    distiller = xt.Distiller(student_tok, teachers, weighting=args.weighting,
                             student_vocab_size=student.get_output_embeddings().weight.shape[0])
    loader = torch.utils.data.DataLoader(math_texts(args.steps * args.batch_size, seed=1), batch_size=args.batch_size,
                                         collate_fn=distiller.collator(max_length=args.max_length))
    optimizer = torch.optim.AdamW([{"params": list(student.parameters())}, *distiller.param_groups()], lr=args.lr)
    student.train()
    history = []
    for step, batch in enumerate(loader):
        logits = student(**xt.Distiller.model_inputs(batch, student)).logits
        loss, metrics = distiller(logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)  # θ of a learnable W stays out of clipping
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: float(v) for k, v in metrics.items()} | {"step": step})
        print({k: round(v, 4) for k, v in history[-1].items()}, flush=True)
    print("losses:", {t.name: t.kind for t in distiller.teachers})
    return history


if __name__ == "__main__":
    main()
