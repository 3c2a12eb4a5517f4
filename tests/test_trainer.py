"""xt.DistillTrainer (xtoken_ext/trainer.py) with tiny GPT-2 models on real offline tokenizers: exact gradient
accumulation, metrics through Trainer logging, raw dataset columns kept and never passed to the model, a learnable
W's optimizer group and saved file, evaluation, GGUF-dequantized models, TRL's SFTTrainer, and the examples/.

Gradient-accumulation tolerance: the accumulated run and the one-batch run (float64 models) compute the same
per-token quantities in batches of other shapes; every value is a sum or dot product of at most n = V_S + R terms
(R = rows of the batch), so an entry differs by at most C·n·u₆₄ times the largest magnitude among the summands,
bounded here by |g| + max|g| (C = 8)."""
from __future__ import annotations

import importlib
import math
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import xtoken_ext as xt
from xtoken_ext.distill import Distiller, Teacher

import transformers  # noqa: E402  (a core dependency)


def need_trl():
    """trl, imported plainly (a broken install fails); a skip below Python 3.11, where the test extra does not
    install it (TRL's own floor)."""
    if sys.version_info < (3, 11):
        pytest.skip("the test extra installs TRL on Python >= 3.11 only")
    import trl
    return trl
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
U64 = 2.0 ** -53
TEXTS = ["The year 2024 had 366 days; 12,345 apples cost $3.50.", "Q: what is 12 + 30? A: 42, and 7 pears.",
         "def area(r):\n    return 3.14159 * r ** 2", "Short one."]


def tiny(V: int, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).to(dtype)


@pytest.fixture(scope="module")
def toks(offline_tok):
    return offline_tok("gpt2"), offline_tok("mistral-spm")


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", max_grad_norm=0.0,
                learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**(base | kw))


class Grab(TrainerCallback):
    """The accumulated gradient of every step, before the optimizer uses it."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("scaling,batch,accumulation", [("fixed", 2, 2), ("dynamic", 4, 1)])
def test_gradient_accumulation_is_exact(toks, tmp_path, scaling, batch, accumulation):
    s, m = toks
    student, teacher = tiny(len(s), 0, torch.float64), tiny(len(m), 1, torch.float64)
    ref_student = tiny(len(s), 0, torch.float64)

    def distiller():
        return Distiller(s, [Teacher(teacher, m)], scaling=scaling)

    grab = Grab()
    trainer = xt.DistillTrainer(model=student, args=args(tmp_path, max_steps=1, per_device_train_batch_size=batch,
                                                         gradient_accumulation_steps=accumulation),
                                train_dataset=[{"text": t} for t in TEXTS], distiller=distiller(), max_length=24,
                                callbacks=[grab])
    trainer.train()
    d = distiller()
    full = d.collator(max_length=24)(TEXTS)  # the one-batch run: all 4 texts at once
    loss, metrics = d(ref_student(**Distiller.model_inputs(full, ref_student)).logits, full)
    loss.backward()
    R = full["input_ids"].numel()
    eps = 8 * (len(s) + R) * U64
    for name, p in ref_student.named_parameters():
        g, ref = grab.grads[0][name], p.grad
        assert bool(((g - ref).abs() <= eps * (ref.abs() + ref.abs().max())).all()), name
    logged = next(h for h in trainer.state.log_history if "ce" in h)
    # Trainer accumulates the loss in float32: one rounding per micro-batch and per addition
    assert math.isclose(logged["loss"], float(loss.detach()), rel_tol=2 * accumulation * 2.0 ** -24 + eps)
    assert math.isclose(logged["ce"], float(metrics["ce"]), rel_tol=eps * 10)
    if scaling == "fixed" or accumulation == 1:
        assert math.isclose(logged["kd/teacher0"], float(metrics["kd/teacher0"]), rel_tol=eps * 10)


def test_metrics_logged_columns_kept_and_model_inputs_clean(toks, tmp_path):
    from datasets import Dataset

    s, m = toks
    student = tiny(len(s), 0)
    seen = []
    forward = student.forward

    def spy(*a, **kw):
        seen.append(set(kw) | {f"arg{i}" for i in range(len(a))})
        return forward(*a, **kw)

    student.forward = spy
    d = Distiller(s, [Teacher(tiny(len(m), 1), m, name="spm", learnable=True), Teacher(tiny(len(s), 2), s,
                                                                                      name="same")],
                  student_vocab_size=len(s), weighting="confidence")
    ds = Dataset.from_dict({"text": TEXTS, "source": ["a", "b", "c", "d"]})  # default remove_unused_columns=True
    trainer = xt.DistillTrainer(model=student, args=args(tmp_path, max_steps=2, per_device_train_batch_size=2),
                                train_dataset=ds, eval_dataset=ds, distiller=d, max_length=24)
    trainer.train()
    assert seen and all(keys == {"input_ids", "attention_mask", "use_cache"} for keys in seen)
    logs = [h for h in trainer.state.log_history if "ce" in h]
    assert len(logs) == 2
    for h in logs:
        for k in ("loss", "ce", "kd", "kd_scale", "step_time", *(f"{p}/{n}" for n in ("spm", "same") for p in
                                                                  ("kd", "alpha", "valid_frac", "top1", "excluded"))):
            assert k in h and math.isfinite(h[k]), k
        assert math.isclose(h["loss"], 2 * h["ce"], rel_tol=1e-6)  # dynamic scaling: the loss is 2·CE ...
        assert h["kd"] > 0 and h["kd_scale"] > 0  # ... so KD and its scale are logged beside it
        assert math.isclose(h["alpha/spm"] + h["alpha/same"], 1.0, rel_tol=1e-9)
    # the learnable W: its own optimizer group, updated, saved with the model
    theta = d.kd_losses["spm"].proj.theta
    group = next(g for g in trainer.optimizer.param_groups if any(p is theta for p in g["params"]))
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.0
    assert not torch.equal(d.kd_losses["spm"].proj.weights.detach(), d.kd_losses["spm"].proj.base.weights)
    trainer.save_model(str(tmp_path / "out"))
    saved = xt.Projection.load(tmp_path / "out" / "xtoken_W_spm.safetensors")
    assert torch.equal(saved.weights, d.kd_losses["spm"].proj.projection().weights)
    # projection() takes θ's softmax in float64: within the fp32 softmax's few roundings of the training W
    torch.testing.assert_close(saved.weights, d.kd_losses["spm"].proj.weights.detach(), rtol=16 * 2.0 ** -24, atol=0)
    ev = trainer.evaluate()
    assert math.isfinite(ev["eval_loss"]) and "eval_ce" in ev and "eval_kd/spm" in ev


def test_learnable_w_gradient_cleared_each_step_and_restored_on_resume(toks, tmp_path):
    """θ is not the model's, so Trainer's model.zero_grad() missed it and each step used the sum of all earlier
    steps' gradients; and resume_from_checkpoint left θ at its initial value. Now θ starts every step without a
    gradient, and a run resumed at step 2 starts step 3 with the θ it had there and ends where the run did.
    A checkpoint of another W under the teacher's name (θ's shape is W's [V_S, 4] whatever the teacher) was resumed
    onto this one: now refused."""
    s, m = toks

    def run(seen, proj=None, **kw):
        teacher = Teacher(tiny(len(m), 1), m, name="spm", learnable=True) if proj is None else \
            Teacher(tiny(len(m), 1), m, name="spm", projection=xt.LearnableProjection(proj))
        d = Distiller(s, [teacher], student_vocab_size=len(s))
        lp = d.kd_losses["spm"].proj
        theta = lp.theta

        class Peek(TrainerCallback):
            def on_step_begin(self, *a, **k):
                seen.append((theta.grad, theta.detach().clone(), lp.weights.detach().clone()))

        kw_args = dict(max_steps=3, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
        trainer = xt.DistillTrainer(model=tiny(len(s), 0), args=args(tmp_path, **kw_args),
                                    train_dataset=[{"text": t} for t in TEXTS], distiller=d, max_length=24,
                                    callbacks=[Peek()])
        trainer.train(**kw)
        return theta.detach()

    first, resumed = [], []
    end = run(first)
    assert len(first) == 3 and all(g is None for g, _, _ in first)
    assert not torch.equal(first[2][1], first[0][1])  # θ trains
    end_resumed = run(resumed, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(resumed) == 1 and torch.equal(resumed[0][1], first[2][1])
    torch.testing.assert_close(end_resumed, end, rtol=2.0 ** -20, atol=0)
    other = xt.Projection.random(len(s), len(m), seed=5)
    with pytest.raises(ValueError, match="'spm''s learnable W was trained on another W"):
        run([], proj=other, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # a checkpoint written before θ was saved: θ = log W of its W file, the same W (θ up to a constant per row)
    (tmp_path / "checkpoint-2" / "xtoken_theta.safetensors").unlink()
    older = []
    run(older, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    torch.testing.assert_close(older[0][2], first[2][2], rtol=2.0 ** -20, atol=2.0 ** -30)
    assert not torch.equal(older[0][2], first[0][2])  # the trained W, not the initial one
    with pytest.raises(ValueError, match="trained on another W"):
        run([], proj=other, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_teachers_sharing_one_learnable_w_save_and_resume(toks, tmp_path):
    """Two teachers given one LearnableProjection: saving θ per name wrote one tensor twice, which safetensors
    refuses (shared memory), so the first checkpoint crashed."""
    s, m = toks
    lp = xt.LearnableProjection(xt.Projection.from_tokenizers(s, m, progress=False))
    d = Distiller(s, [Teacher(tiny(len(m), 1), m, name="a", projection=lp),
                      Teacher(tiny(len(m), 2), m, name="b", projection=lp)])
    trainer = xt.DistillTrainer(model=tiny(len(s), 0), args=args(
        tmp_path, max_steps=1, per_device_train_batch_size=2, save_strategy="steps", save_steps=1),
        train_dataset=[{"text": t} for t in TEXTS], distiller=d, max_length=24)
    trainer.train()
    saved = safetensors.torch.load_file(tmp_path / "checkpoint-1" / "xtoken_theta.safetensors")
    assert set(saved) == {"a", "b"}
    assert torch.equal(saved["a"], lp.theta.detach()) and torch.equal(saved["b"], saved["a"])


def test_a_given_optimizer_without_theta_warns(toks, tmp_path):
    """optimizers=(opt, None) skips create_optimizer, which adds θ's group: θ silently never trained."""
    s, m = toks
    d = Distiller(s, [Teacher(tiny(len(m), 1), m, name="spm", learnable=True)], student_vocab_size=len(s))
    model = tiny(len(s), 0)
    for params, warns in ((model.parameters(), True), ([*model.parameters(), *d.parameters()], False)):
        opt = torch.optim.SGD(params, lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            xt.DistillTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=[{"text": TEXTS[0]}],
                              distiller=d, max_length=24, optimizers=(opt, None))
        assert any("lacks the learnable W's θ" in str(w.message) for w in caught) == warns


def test_gguf_dequantized_model_trains(toks, tmp_path):
    """A GGUF-loaded model keeps a GgufHfQuantizer (model.is_quantized) although its weights are float: Trainer
    would refuse it. DistillTrainer clears the flag; a model that really holds quantized blocks keeps it."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig, QuantizationMethod

    s, m = toks

    def flagged(extra_int: bool):
        model = tiny(len(s), 0)  # what from_pretrained(gguf_file=...) leaves on the model
        model.hf_quantizer = GgufHfQuantizer(GgufConfig())
        model.is_quantized, model.quantization_method = True, QuantizationMethod.GGUF
        model.config.quantization_config = GgufConfig()
        if extra_int:
            model.register_parameter("blocks", torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8),
                                                                  requires_grad=False))
        return model

    d = Distiller(s, [Teacher(tiny(len(m), 1), m)])
    with pytest.raises(ValueError, match="quantized"):
        transformers.Trainer(model=flagged(False), args=args(tmp_path, max_steps=1))
    model = flagged(False)
    trainer = xt.DistillTrainer(model=model, args=args(tmp_path, max_steps=1, per_device_train_batch_size=2),
                                train_dataset=TEXTS, distiller=d, max_length=24)
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))  # save_pretrained refused GGUF-flagged models too
    assert (tmp_path / "saved" / "config.json").exists()
    with pytest.raises(ValueError, match="quantized"):
        xt.DistillTrainer(model=flagged(True), args=args(tmp_path, max_steps=1), train_dataset=TEXTS, distiller=d)


def run_example(name: str, *argv: str) -> list[dict]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name).main(list(argv))
    finally:
        sys.path.remove(str(EXAMPLES))


TINY = ("--steps", "1", "--batch-size", "2", "--max-length", "32")
SPM = "tiny-llama:mistral-spm"  # the examples' teachers at CI size: one W (GPT-2 -> Mistral) for all of them


def test_example_plain_loop():
    (h,) = run_example("plain_loop", *TINY, "--teacher", SPM)
    assert math.isfinite(h["kd"]) and h["kd"] > 0 and math.isclose(h["loss"], 2 * h["ce"], rel_tol=1e-9)


def test_example_accelerate_loop():
    (h,) = run_example("accelerate_loop", *TINY, "--teacher", SPM, "--accumulation", "2")
    assert math.isclose(h["loss"], 2 * h["ce"], rel_tol=1e-9)  # micro-batch contributions add up to 2·CE


def test_example_hf_trainer_two_teachers_confidence():
    (h,) = run_example("hf_trainer", *TINY, "--teacher", SPM, "--teacher", "tiny-gpt2:gpt2", "--weighting",
                       "confidence")
    assert {"kd/mistral-spm", "kd/gpt2", "alpha/gpt2", "top1/gpt2"} <= set(h)
    assert math.isclose(h["alpha/mistral-spm"] + h["alpha/gpt2"], 1.0, rel_tol=1e-9)
    # two teachers with one tokenizer were both named after it: "teacher names must be unique"
    (h,) = run_example("hf_trainer", *TINY, "--teacher", SPM, "--teacher", "tiny-gpt2:mistral-spm")
    assert {"kd/mistral-spm-0", "kd/mistral-spm-1"} <= set(h)


def test_example_two_teachers_learnable_w():
    (h,) = run_example("two_teachers", *TINY, "--teacher", SPM, "--teacher2", "tiny-gpt2:gpt2", "--learnable-w")
    assert h["alpha/t0"] == 0.8 and h["kd/t1"] >= 0


def test_example_two_teachers_refuses_static_weights_with_confidence_weighting(capsys):
    """--weights with --weighting confidence were silently unused."""
    with pytest.raises(SystemExit) as e:
        run_example("two_teachers", "--weights", "0.5", "0.5", "--weighting", "confidence")
    assert e.value.code == 2 and "--weighting confidence computes its own" in capsys.readouterr().err


def test_example_trl_sft():
    need_trl()
    (h,) = run_example("trl_sft", *TINY, "--teacher", SPM)
    assert math.isfinite(h["kd"]) and 0 < h["valid_frac/teacher0"] < 1  # completion-only chunks


@pytest.mark.parametrize("name", ["plain_loop", "accelerate_loop", "hf_trainer", "two_teachers", "trl_sft"])
def test_examples_refuse_zero_steps_and_describe_themselves(name, capsys):
    """--steps 0 ended in an AttributeError / StopIteration / a sampler error; --help cut a sentence at its line."""
    if name == "trl_sft":
        need_trl()
    with pytest.raises(SystemExit) as e:
        run_example(name, "--steps", "0")
    assert e.value.code == 2 and "argument --steps: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a traceback from the collator before
        run_example(name, "--max-length", "0")
    assert e.value.code == 2 and "argument --max-length: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_example(name, "--help")
    first = " ".join(importlib.import_module(name).__doc__.split("\n\n")[0].split())
    assert " ".join(capsys.readouterr().out.split()).count(first) == 1


def test_evaluation_metrics_per_loop_and_weighted_like_the_loss(toks, tmp_path):
    """Each evaluation loop returns the Distiller's metrics under its own prefix (named eval sets and predict() lost
    them, and predict()'s batches leaked into the next evaluate()); batches are weighted by their rows as Trainer
    weighs eval_loss, so under dynamic scaling eval_loss = 2·eval_ce (an unweighted mean of batch means broke it)."""
    s, m = toks
    d = Distiller(s, [Teacher(tiny(len(m), 1), m)])
    five = [{"text": t} for t in TEXTS + ["One more text, 5 of them."]]
    trainer = xt.DistillTrainer(tiny(len(s), 0), args(tmp_path, per_device_eval_batch_size=2), d.collator(
        max_length=24), train_dataset=five, eval_dataset={"a": five, "b": five[:2]}, distiller=d)  # collator 3rd
    ev = trainer.evaluate()
    for name in ("a", "b"):
        assert math.isclose(ev[f"eval_{name}_loss"], 2 * ev[f"eval_{name}_ce"], rel_tol=1e-6)
        assert math.isfinite(ev[f"eval_{name}_kd/teacher0"])
    alone = trainer.evaluate(five, metric_key_prefix="val")
    assert math.isclose(alone["val_loss"], 2 * alone["val_ce"], rel_tol=1e-6) and alone["val_ce"] == ev["eval_a_ce"]
    pred = trainer.predict(five[:1])
    assert "test_ce" in pred.metrics and pred.metrics["test_ce"] != alone["val_ce"]
    assert trainer.evaluate(five, metric_key_prefix="val")["val_ce"] == alone["val_ce"]  # predict() did not leak


def test_learnable_w_named_like_a_hub_id_saves_and_the_best_checkpoint_restores_theta(toks, tmp_path):
    """A teacher named "org/model" crashed every checkpoint save (the name was a path); load_best_model_at_end
    restored the best checkpoint's model with the last step's θ."""
    s, m = toks
    d = Distiller(s, [Teacher(tiny(len(m), 1), m, name="org/model", learnable=True)], student_vocab_size=len(s))
    theta = d.kd_losses["org_model"].proj.theta
    seen = {}

    class Best(TrainerCallback):  # step 1 is the best evaluation; keep each step's θ
        def on_step_end(self, a, state, control, **kw):
            seen[state.global_step] = theta.detach().clone()

        def on_evaluate(self, a, state, control, metrics=None, **kw):
            metrics["eval_loss"] = float(state.global_step)

    trainer = xt.DistillTrainer(model=tiny(len(s), 0), args=args(
        tmp_path, max_steps=3, per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
        eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=False), train_dataset=[{"text": t} for t in TEXTS], eval_dataset=[{"text": TEXTS[0]}],
        distiller=d, max_length=24, callbacks=[Best()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    assert (tmp_path / "checkpoint-3" / "xtoken_W_org_model.safetensors").is_file()
    assert not torch.equal(seen[1], seen[3]) and torch.equal(theta.detach(), seen[1])


def test_trainer_arguments_it_reads_refuses_or_ignores(toks, tmp_path, monkeypatch):
    """SFTConfig-style max_length / completion_only_loss reach the default collator (they were ignored: 201-token
    rows crashed the embedding); packing=True and padding_free=True are refused with the collator's way; label
    smoothing and compute_metrics warn; a batch from another collator is named (KeyError 'teachers'); transformers without
    loss_is_scaled_for_ga (< 5.19 halved the accumulated gradient) is refused."""
    s, m = toks
    d = Distiller(s, [Teacher(tiny(len(m), 1), m)])
    data = [{"prompt": "Q: what is 12 + 30?", "completion": " A: 42, and 7 pears."}]

    def make(targs, **kw):
        return xt.DistillTrainer(model=tiny(len(s), 0), args=targs, train_dataset=data, distiller=d, **kw)

    targs = args(tmp_path)
    targs.max_length, targs.completion_only_loss = 5, False
    collator = make(targs).data_collator
    assert collator.max_length == 5 and collator.completion_only is False
    # TRL's dataset preparation is skipped whatever the arguments (SFTConfig without skip_prepare_dataset, or plain
    # TrainingArguments, which TRL turns into one): it appended the student's EOS text to every completion. The
    # arguments are left as they are; formatting_func, applied only there, warns.
    trl = need_trl()
    from datasets import Dataset
    sft = trl.SFTConfig(str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_steps=1)
    plain = trl.SFTConfig(str(tmp_path), report_to=[], use_cpu=True, bf16=False, completion_only_loss=False)
    for sft_args, kw in ((sft, {}), (args(tmp_path), {}), (plain, {"formatting_func": lambda row: row["prompt"]})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = xt.trainer.with_distillation(trl.SFTTrainer)(
                model=tiny(len(s), 0), args=sft_args, train_dataset=Dataset.from_list(data),
                eval_dataset=Dataset.from_list(data), processing_class=s, distiller=d, **kw)
        assert trainer.train_dataset[0] == data[0] == trainer.eval_dataset[0]
        assert getattr(sft_args, "dataset_kwargs", None) is None  # not written into the caller's arguments
        assert any("formatting_func is ignored" in str(w.message) for w in caught) == bool(kw)

    class Forwarding(transformers.Trainer):  # a subclass passing *args on: its signature names no argument
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)

    fwd = xt.trainer.with_distillation(Forwarding)(tiny(len(s), 0), targs, None, data, distiller=d)
    assert isinstance(fwd.data_collator, xt.Collator) and fwd.data_collator.max_length == 5

    class Tagged(transformers.Trainer):  # its own leading parameter, the rest passed on
        def __init__(self, tag, *a, **kw):
            self.tag = tag
            super().__init__(*a, **kw)

    tagged = xt.trainer.with_distillation(Tagged)("run-1", tiny(len(s), 0), targs, train_dataset=data, distiller=d)
    assert tagged.tag == "run-1" and isinstance(tagged.data_collator, xt.Collator)
    with pytest.raises(TypeError, match=r"multiple values for argument\(s\) \['args'\]"):
        xt.DistillTrainer(tiny(len(s), 0), targs, args=targs, distiller=d)
    targs.packing = True
    with pytest.raises(ValueError, match="packing=True"):
        make(targs)
    # TRL's padding-free batches (SFTConfig(padding_free=True)): TRL refused "a custom data collator" the user never
    # passed; the collator's way instead
    free = trl.SFTConfig(str(tmp_path), report_to=[], use_cpu=True, bf16=False, padding_free=True)
    with pytest.raises(ValueError, match=r"padding_free=True .*=distiller\.collator\(max_length=\.\.\., packing=True\)"):
        xt.trainer.with_distillation(trl.SFTTrainer)(model=tiny(len(s), 0), args=free,
                                                     train_dataset=Dataset.from_list(data), processing_class=s,
                                                     distiller=d)
    with pytest.warns(UserWarning, match="label_smoothing_factor is ignored"):
        make(args(tmp_path, label_smoothing_factor=0.1))
    with pytest.warns(UserWarning, match="compute_metrics is ignored"):
        make(args(tmp_path), compute_metrics=lambda p: {})
    other = make(args(tmp_path, max_steps=1), data_collator=lambda rows: {"input_ids": torch.tensor([[1, 2, 3]])})
    with pytest.raises(TypeError, match="batches from an xt.Collator"):
        other.train()
    monkeypatch.delattr(transformers.Trainer, "loss_is_scaled_for_ga")
    with pytest.raises(ImportError, match="transformers >= 5.19"):
        make(args(tmp_path))
