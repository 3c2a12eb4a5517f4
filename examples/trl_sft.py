"""Cross-tokenizer distillation inside TRL's SFTTrainer (TRL >= 1.16).

    python examples/trl_sft.py

``xt.trainer.with_distillation(SFTTrainer)`` puts the DistillTrainer behaviour on TRL's trainer class: SFTConfig,
TRL's callbacks and logging stay, the data collator is the xtoken collator (raw ``text`` / ``prompt`` +
``completion`` / ``messages`` rows, each tokenizer's own chat template) and the loss is the Distiller's CE + KD.
TRL's own dataset preparation is skipped (the mixin does it, whatever ``dataset_kwargs`` says): the collator
tokenizes and aligns every side itself. TRL's GKD/GOLD trainers assume one tokenizer or bring their own
cross-tokenizer loss; this is the route that keeps everything else of TRL.
"""
from __future__ import annotations

import argparse
import tempfile

from _common import description, load_model, math_texts, positive_int

import xtoken_ext as xt


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--student", default="tiny-gpt2:gpt2")
    ap.add_argument("--teacher", default="tiny-llama:mistral-spm")
    ap.add_argument("--steps", type=positive_int, default=4)
    ap.add_argument("--batch-size", type=positive_int, default=2)
    ap.add_argument("--max-length", type=positive_int, default=96)
    args = ap.parse_args(argv)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    student, student_tok = load_model(args.student)
    teacher, teacher_tok = load_model(args.teacher, seed=1)
    distiller = xt.Distiller(student_tok, [xt.Teacher(teacher, teacher_tok)])
    pairs = [t.split("\n", 1) for t in math_texts(args.steps * args.batch_size)]
    dataset = Dataset.from_dict({"prompt": [p + "\n" for p, _ in pairs], "completion": [c for _, c in pairs]})
    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="xtoken-trl-"), max_steps=args.steps,
                       per_device_train_batch_size=args.batch_size, learning_rate=5e-4, logging_steps=1,
                       report_to="none", save_strategy="no", use_cpu=True)
    trainer = xt.trainer.with_distillation(SFTTrainer)(model=student, args=config, train_dataset=dataset,
                                                       processing_class=student_tok, distiller=distiller,
                                                       max_length=args.max_length)
    trainer.train()
    return [h for h in trainer.state.log_history if "ce" in h]


if __name__ == "__main__":
    main()
