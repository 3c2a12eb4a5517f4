"""Cross-tokenizer distillation with the Hugging Face Trainer (``xt.DistillTrainer``).

    python examples/hf_trainer.py                                       # tiny random models, offline
    python examples/hf_trainer.py --student gguf:smollm2-135m --teacher gguf:gemma3-270m --steps 20

The dataset keeps its raw ``text`` column (no ``remove_unused_columns`` setting needed), the student gets only its
ids and mask, gradient accumulation is exact, and every metric (CE, KD per teacher, KD scale, valid-chunk fraction,
top-1 agreement, step time) goes through the Trainer's logging. A GGUF-loaded student (flagged as quantized although
dequantized to float) is unflagged so the Trainer fine-tunes it. Several ``--teacher`` flags distil from several
teachers at once (``--weighting confidence`` for the release's adaptive weights).
"""
from __future__ import annotations

import argparse
import tempfile

from _common import description, load_model, math_texts, positive_int

import xtoken_ext as xt


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--student", default="tiny-gpt2:gpt2")
    ap.add_argument("--teacher", action="append", help="repeat for several teachers (default: tiny-llama:qwen3)")
    ap.add_argument("--weighting", choices=["static", "confidence"], default="static")
    ap.add_argument("--steps", type=positive_int, default=6)
    ap.add_argument("--batch-size", type=positive_int, default=2)
    ap.add_argument("--accumulation", type=positive_int, default=2)
    ap.add_argument("--max-length", type=positive_int, default=96)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--logging-steps", type=positive_int, default=1)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)

    from datasets import Dataset
    from transformers import TrainingArguments

    student, student_tok = load_model(args.student)
    specs = args.teacher or ["tiny-llama:qwen3"]
    names = [spec.split(":")[-1] for spec in specs]  # the tokenizer; numbered where two teachers share one
    teachers = []
    for j, spec in enumerate(specs):
        model, tok = load_model(spec, seed=1 + j)
        teachers.append(xt.Teacher(model, tok, name=names[j] if names.count(names[j]) == 1 else f"{names[j]}-{j}"))
    distiller = xt.Distiller(student_tok, teachers, weighting=args.weighting)
    n = args.steps * args.batch_size * args.accumulation
    dataset = Dataset.from_dict({"text": math_texts(n), "source": ["synthetic"] * n})  # extra columns are fine
    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="xtoken-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.accumulation,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=args.logging_steps, report_to="none",
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = xt.DistillTrainer(model=student, args=training_args, train_dataset=dataset, distiller=distiller,
                                max_length=args.max_length)
    trainer.train()
    print("losses:", {t.name: t.kind for t in distiller.teachers})
    return [h for h in trainer.state.log_history if "ce" in h]


if __name__ == "__main__":
    main()
