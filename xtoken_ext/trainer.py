"""Hugging Face Trainer integration: ``xt.DistillTrainer`` (a ``transformers.Trainer``) and ``DistillMixin`` for any
Trainer subclass (TRL's ``SFTTrainer``: ``xt.trainer.with_distillation(trl.SFTTrainer)``).

What the mixin changes:
- the data collator defaults to ``distiller.collator(max_length=...)`` and the dataset's columns are left alone (the
  collator reads ``text`` / ``prompt`` / ``completion`` / ``messages`` / ``xt_*``), whatever
  ``remove_unused_columns`` says;
- the student gets ``Distiller.model_inputs(batch)`` only (ids, mask or packed position ids): never labels,
  alignments or teacher fields; the loss is the Distiller's CE + KD;
- gradient accumulation is exact: each optimizer step's micro-batches are counted first (CE targets and valid chunks
  per teacher, all-reduced over ranks: ``Distiller.normalizers``) and every micro-batch is normalized by those
  counts, so the step's gradient equals the one of a single batch (the dynamic KD scale and confidence weights
  are per micro-batch, see ``xtoken_ext.distill``);
- every metric of the Distiller (CE, KD per teacher, KD scale, α, valid-chunk fraction, top-1 agreement, excluded
  chunks) and the mean optimizer-step time (without evaluation and checkpointing) go through ``Trainer.log``;
  additive metrics are summed over the step's micro-batches, the others averaged, then both averaged over the
  logged steps; an evaluation (``evaluate()``, ``predict()``) returns them under its prefix (``eval_ce``,
  ``eval_<name>_ce`` per named eval set, ``test_ce``), each batch weighted by its rows as Trainer weighs the loss;
- a learnable W gets its own optimizer group (lr 1e-2, no weight decay, outside gradient clipping), its gradients
  are averaged over ranks and cleared after each optimizer step, and it is saved beside checkpoints
  (``xtoken_W_<teacher>.safetensors``, and θ in ``xtoken_theta.safetensors``, which ``resume_from_checkpoint``
  loads back);
- ``label_smoothing_factor`` and ``compute_metrics`` have no effect (warned); ``packing=True`` in the arguments is
  refused (the collator packs: ``distiller.collator(max_length=..., packing=True)``);
- a model loaded from a GGUF file with its weights dequantized to float is no longer flagged as quantized, so the
  Trainer fine-tunes it (``clear_gguf_quantization``).

This module imports ``transformers``; ``import xtoken_ext`` does not.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import os
import time
import warnings
from collections.abc import Mapping

import torch
import transformers
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from .distill import Distiller
from .losses import LearnableProjection
from .projection import Projection
from .tokenizers import save_tensors

__all__ = ["DistillTrainer", "DistillMixin", "with_distillation", "clear_gguf_quantization"]

logger = logging.getLogger(__name__)
_ADDITIVE = ("loss", "ce", "kd", "kd/", "excluded/")  # metrics that add up over a step's micro-batches
_THETA_FILE = "xtoken_theta.safetensors"  # a checkpoint's learnable-W parameters, per teacher name


def clear_gguf_quantization(model) -> bool:
    """A model loaded with ``from_pretrained(..., gguf_file=...)`` whose weights were dequantized to float stays
    flagged as quantized (``model.is_quantized``, ``hf_quantizer``): ``Trainer`` then refuses to fine-tune it ("purely
    quantized models") and ``save_pretrained`` refuses to save it. When every parameter is floating point, remove the
    flag with the quantizer's own ``remove_quantization_config`` and return True. A model that still holds GGUF
    blocks (integer parameters, e.g. with the GGUF matmul kernels) is left as is."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return False
    if not all(p.is_floating_point() for p in model.parameters()):
        return False
    quantizer.remove_quantization_config(model)
    return True


class _SyncLearnedW(TrainerCallback):
    def __init__(self, distiller: Distiller):
        self.distiller = distiller

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.distiller.sync_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.distiller.zero_grad(set_to_none=True)  # θ is not the model's: Trainer's model.zero_grad() misses it


class DistillMixin:
    """Distillation for a ``transformers.Trainer`` subclass (put it first: ``class T(DistillMixin, SFTTrainer)``).
    Extra arguments: ``distiller`` (an ``xt.Distiller``, required) and ``max_length`` (of the default collator;
    default ``args.max_length`` where the arguments have one, as TRL's ``SFTConfig`` does, whose
    ``completion_only_loss`` also sets the collator's ``completion_only``)."""

    loss_is_scaled_for_ga = True  # every micro-batch is already normalized by its optimizer step's counts

    def __init__(self, *args, distiller: Distiller, max_length: int | None = None, **kwargs):
        if "loss_is_scaled_for_ga" not in vars(Trainer):  # before 5.19 Trainer divides the loss by the GA steps again
            raise ImportError(f"xtoken_ext.trainer needs transformers >= 5.19, found {transformers.__version__}")
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be an xt.Distiller, got {type(distiller).__name__}")
        kwargs, args = _keywords(type(self), super().__init__, args, kwargs)
        targs, model = kwargs.get("args"), kwargs.get("model")
        if model is not None and clear_gguf_quantization(model):
            logger.info("xtoken: the GGUF model's weights are float; cleared its quantization flag for training")
        for name, what in (("packing", "packs"), ("padding_free", "flattens")):  # TRL's SFTConfig
            if getattr(targs, name, False):
                raise ValueError(f"{name}=True in the trainer's arguments {what} the student's ids alone; leave it "
                                 "False and pass data_collator=distiller.collator(max_length=..., packing=True), "
                                 "which packs every side with one plan")
        if kwargs.get("data_collator") is None:
            max_length = getattr(targs, "max_length", None) if max_length is None else max_length
            kwargs["data_collator"] = distiller.collator(max_length=max_length,
                                                        completion_only=getattr(targs, "completion_only_loss", None))
        output = "the loss is the Distiller's and evaluation returns its metrics, not logits"
        for name, unused, why in (("label_smoothing_factor", getattr(targs, "label_smoothing_factor", 0), output),
                                  ("compute_metrics", kwargs.get("compute_metrics"), output),
                                  ("formatting_func", kwargs.get("formatting_func"),
                                   "the collator reads the rows as they are (format them with datasets.map)")):
            if unused:
                warnings.warn(f"{name} is ignored by distillation: {why}", stacklevel=2)
        self.distiller = distiller
        self._xt_window = None
        self._xt_metrics: dict[str, dict] = {"train": {}, "eval": {}}  # metric -> [weighted sum (tensor), weight]
        self._xt_steps = 0
        self._xt_clock: float | None = None  # start of the first step since the last log
        super().__init__(*args, **kwargs)
        self.distiller.to(self.args.device)
        if self.distiller.param_groups():
            self.add_callback(_SyncLearnedW(self.distiller))
            given = kwargs.get("optimizers", (None, None))[0]
            mine = {id(p) for g in getattr(given, "param_groups", ()) for p in g["params"]}
            if given is not None and any(id(p) not in mine for g in self.distiller.param_groups() for p in g["params"]):
                warnings.warn("the optimizer given in optimizers= lacks the learnable W's θ, which then never trains "
                              "(its checkpoints save the initial W): add distiller.param_groups() to it", stacklevel=2)

    def train(self, *args, **kwargs):
        self._xt_metrics["train"].clear()  # nothing of an earlier train() is logged in this one
        self._xt_steps, self._xt_clock = 0, None
        return super().train(*args, **kwargs)

    # -- data: the collator reads the raw columns --------------------------------------------------------------------
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _prepare_dataset(self, dataset, *args, **kwargs):
        """TRL's SFTTrainer prepares (tokenizes) the rows unless ``skip_prepare_dataset``, and appends the student's
        EOS text to each completion, which the collator would give every teacher as literal text: the collator
        reads the raw rows, whatever the arguments say."""
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """One optimizer step's micro-batches and their counts (all ranks) for exact accumulation."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        for b in batches:
            _check_batch(b)
        self._xt_window = self.distiller.normalizers(batches) if batches else None
        self._xt_steps += bool(batches)
        if self._xt_clock is None:
            self._xt_clock = time.perf_counter()
        return batches, None

    # -- loss ---------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _check_batch(inputs)
        outputs = model(**Distiller.model_inputs(inputs, self.accelerator.unwrap_model(model)))
        mode = "train" if model.training else "eval"
        loss, metrics = self.distiller(outputs.logits, inputs, normalizers=self._xt_window if mode == "train" else None)
        # train: summed per logged step; eval: each batch weighted by its rows, as Trainer weighs eval_loss
        weight = 1 if mode == "train" else inputs["input_ids"].shape[0]
        acc = self._xt_metrics[mode]
        for k, v in metrics.items():
            if k != "loss":  # Trainer logs the loss itself
                v = v.detach() * weight
                acc[k] = [v, weight] if k not in acc else [acc[k][0] + v, acc[k][1] + weight]
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop (evaluate() and predict()) with the Distiller's metrics of this loop, under the loop's
        prefix (``eval_ce``, ``eval_valid_kd/…`` for an eval set named "valid", ``test_ce`` from predict())."""
        self._xt_metrics["eval"].clear()
        start = time.perf_counter()
        out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        out.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._flush("eval").items()})
        self._pause(start)
        return out

    # -- learnable W ---------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            for group in self.distiller.param_groups():
                optimizer.add_param_group(group)
        return optimizer

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            thetas = {}
            for name, module in self.distiller.kd_losses.items():
                if isinstance(module.proj, LearnableProjection):
                    module.proj.projection().save(os.path.join(output_dir, f"xtoken_W_{name}.safetensors"))
                    thetas[name] = module.proj.theta.detach().cpu().clone()  # teachers may share one θ
            if thetas:  # θ itself, for resuming (the W file holds softmax(θ))
                save_tensors(thetas, os.path.join(output_dir, _THETA_FILE))

    def _save_checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        super()._save_checkpoint(*args, **kwargs)
        self._pause(start)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """On resume, the learnable W's θ from the checkpoint first (then the optimizer state that goes with it)."""
        self._load_theta(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_best_model(self):
        """load_best_model_at_end: the best checkpoint's θ with its model."""
        super()._load_best_model()
        self._load_theta(self.state.best_model_checkpoint)

    def _load_theta(self, checkpoint) -> None:
        """The learnable W's θ of a checkpoint: θ itself, or from a checkpoint written before θ was saved, log W of
        its W file (the same softmax). θ's slots mean W's entries: the W file must have this Distiller's W's."""
        if checkpoint is None:
            return
        thetas, saved = {}, {}
        for name, module in self.distiller.kd_losses.items():
            w_file = os.path.join(checkpoint, f"xtoken_W_{name}.safetensors")
            if isinstance(module.proj, LearnableProjection) and os.path.isfile(w_file):
                saved[name] = Projection.load(w_file)
                if (saved[name].teacher_vocab_size != module.proj.teacher_vocab_size
                        or not torch.equal(saved[name].indices, module.proj.indices.cpu())):
                    raise ValueError(f"{checkpoint}: teacher {name!r}'s learnable W was trained on another W (its "
                                     "entries differ from this Distiller's): another teacher or tokenizer under this "
                                     "name? Resume with the W it was trained on, or start a fresh run")
        if os.path.isfile(os.path.join(checkpoint, _THETA_FILE)):
            thetas = load_file(os.path.join(checkpoint, _THETA_FILE))
        else:
            thetas = {name: LearnableProjection(proj).theta.detach() for name, proj in saved.items()}  # log W
        for name, theta in thetas.items():
            module = self.distiller.kd_losses[name] if name in self.distiller.kd_losses else None
            mine = getattr(getattr(module, "proj", None), "theta", None)
            if mine is None or mine.shape != theta.shape:
                raise ValueError(f"{checkpoint}: teacher {name!r}'s learnable W {tuple(theta.shape)} does not match "
                                 f"this Distiller's ({None if mine is None else tuple(mine.shape)})")
            with torch.no_grad():
                mine.copy_(theta)

    # -- logging -------------------------------------------------------------------------------------------------------
    def log(self, logs, start_time=None):
        if "loss" in logs and self._xt_metrics["train"]:
            logs.update(self._flush("train"))
        super().log(logs, start_time)

    def _pause(self, start: float) -> None:
        """Evaluation and checkpointing since ``start`` are not training: step_time leaves them out."""
        if self._xt_clock is not None:
            self._xt_clock += time.perf_counter() - start

    def _flush(self, mode: str) -> dict[str, float]:
        """train: additive metrics summed over each step's micro-batches, the others averaged over them, both then
        averaged over the logged steps; eval: the mean over the loop's batches weighted by their rows."""
        acc, out = self._xt_metrics[mode], {}
        totals = torch.stack([v for v, _ in acc.values()]).tolist() if acc else []  # one host sync per log
        steps = max(self._xt_steps, 1)
        for (k, (_, n)), total in zip(acc.items(), totals):
            additive = mode == "train" and any(k == a or (a.endswith("/") and k.startswith(a)) for a in _ADDITIVE)
            out[k] = total / (steps if additive else n)
        acc.clear()
        if mode == "train":
            now = time.perf_counter()
            out["step_time"] = (now - (self._xt_clock or now)) / steps
            self._xt_clock, self._xt_steps = now, 0
        return out


def _takes_varargs(fn) -> bool:
    return any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())


def _keywords(cls: type, init, args: tuple, kwargs: dict) -> tuple[dict, tuple]:
    """(keyword arguments, positional-only arguments) of a call to ``init`` (the next ``__init__`` after the mixin
    in ``cls``'s MRO): positional arguments named by its signature; those it passes on through ``*args`` named by
    the first later ``__init__`` in the MRO that takes no ``*args`` (Trainer's, or SFTTrainer's, order)."""
    lead, named, rest = [], {}, list(args)
    params = list(inspect.signature(init).parameters.values())
    for p in params:
        if not rest or p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        if p.kind is p.POSITIONAL_ONLY:
            lead.append(rest.pop(0))
        else:
            named[p.name] = rest.pop(0)
    if rest and _takes_varargs(init):
        base = next((c.__init__ for c in cls.__mro__ if "__init__" in vars(c) and c is not DistillMixin
                     and not _takes_varargs(c.__init__)), None)
        names = [] if base is None else [q.name for q in list(inspect.signature(base).parameters.values())[1:]
                                         if q.kind is q.POSITIONAL_OR_KEYWORD and q.name not in named]
        for name in names[:len(rest)]:
            named[name] = rest.pop(0)
    if rest:
        raise TypeError(f"{len(args)} positional arguments: too many for {cls.__name__}")
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise TypeError(f"got multiple values for argument(s) {twice}")
    return {**named, **kwargs}, tuple(lead)


def _check_batch(batch) -> None:
    if not isinstance(batch, Mapping) or "teachers" not in batch:
        raise TypeError("distillation needs batches from an xt.Collator (the default data_collator, or "
                        f"distiller.collator(...)), got {type(batch).__name__} with keys "
                        f"{sorted(batch) if isinstance(batch, Mapping) else None}")


class DistillTrainer(DistillMixin, Trainer):
    """``transformers.Trainer`` that distils into ``model`` with an ``xt.Distiller``:

        trainer = xt.DistillTrainer(model=student, args=TrainingArguments(...), train_dataset=texts,
                                    distiller=xt.Distiller(student_tok, [xt.Teacher(teacher, teacher_tok)]),
                                    max_length=512)

    See ``xtoken_ext.trainer`` for what changes relative to ``Trainer``."""


def with_distillation(trainer_cls: type) -> type:
    """``DistillMixin`` on any ``transformers.Trainer`` subclass, e.g. ``with_distillation(trl.SFTTrainer)``."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"expected a transformers.Trainer subclass, got {trainer_cls!r}")
    return type(f"Distill{trainer_cls.__name__}", (DistillMixin, trainer_cls), {})
