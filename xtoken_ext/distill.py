"""Training objective (METHOD.md §9–10): student next-token CE + a (multi-teacher) KD term.

  KD = Σ_m α_m KD_m                       (each KD_m a per-teacher loss, e.g. xt.pkl_loss / xt.hkl_loss, × τ²)
  dynamic (default):  L = sg(CE / KD)·KD + CE   (value 2·CE; KD's gradient is scaled by CE/KD; scale 1 if KD = 0)
  fixed:              L = kd_weight·KD + ce_weight·CE

Building blocks for any loop: ``next_token_ce``, ``weighted_kd``, ``combine_losses``. The whole objective from the
student's logits and an ``xt.Collator`` batch: ``xt.Distiller`` with one ``xt.Teacher`` per teacher.

Normalization. CE = Σ nll / N and KD_m = Σ_k L_k / K_m, where N counts the CE targets and K_m teacher m's valid
chunks. By default they count the batch, summed over all data-parallel ranks (one all-reduce). With gradient
accumulation, ``Distiller.normalizers(window)`` counts every micro-batch of the optimizer step (on every rank) and
each micro-batch contributes its local sums divided by those counts, so the contributions add up to the step's
objective and its gradient, exactly as one process with the whole batch would compute them. The dynamic scale
sg(CE/KD) is taken per forward call from the all-rank values of that call: exact for any number of ranks; under
gradient accumulation it is the scale of each micro-batch's contribution (the window's CE/KD is only known after
its last forward). Under data parallelism the returned loss is multiplied by the world size, because DDP / FSDP
average gradients over ranks. Chunks a loss excludes as non-finite or degenerate (POLICY.md) leave the KD
denominator of their forward call; under accumulation, those of the window's other micro-batches stay counted.
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import IGNORE_INDEX
from .losses import GOLDLoss, HKLLoss, LearnableProjection, PKLLoss, ULDLoss, pkl_loss
from .ops._common import nonfinite_rows
from .projection import Projection, warn_behaviour
from .tokenizers import token_table

__all__ = ["next_token_ce", "weighted_kd", "combine_losses", "Teacher", "Distiller", "Normalizers",
           "identity_projection"]

_KINDS = ("auto", "pkl", "hkl", "gold", "uld", "kl")
_MODULES = {"pkl": PKLLoss, "hkl": HKLLoss, "gold": GOLDLoss, "uld": ULDLoss, "kl": PKLLoss}
_CONFIDENCE = ("ce", "entropy", "max_prob")
_LOSS_OPTIONS = ("merge", "uncovered", "teacher_topk", "uncommon_topk", "backend", "nonfinite")
_ROW_BLOCK = 64  # rows per no-grad block in the metrics (bounds the [rows, V] temporaries)
_HAS_NONFINITE = "nonfinite" in inspect.signature(pkl_loss).parameters  # the losses' non-finite policy (POLICY.md)


def next_token_ce(logits: Tensor, ids: Tensor, attention_mask: Tensor | None = None,
                  normalizer: float | Tensor | None = None) -> Tensor:
    """Masked mean next-token cross-entropy: row p of ``logits`` [B, T, V] predicts ``ids`` [B, T] at p + 1.

    ``attention_mask`` [B, T] marks real tokens (targets that are padding are skipped), as do HF-style -100 labels
    in ``ids``. ``normalizer`` replaces the local count of predicted tokens (e.g. the global count across
    data-parallel ranks / accumulation steps)."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and ids [B, T], got {tuple(logits.shape)} / {tuple(ids.shape)}")
    target = ids[:, 1:].long()
    mask = target != IGNORE_INDEX
    mask = mask if attention_mask is None else mask & attention_mask[:, 1:].bool()
    target = target.masked_fill(~mask, 0)
    md = torch.promote_types(logits.dtype, torch.float32)  # float32 math (float64 for float64 logits)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].to(md).transpose(1, 2), target, reduction="none")
    count = mask.sum().clamp_min(1) if normalizer is None else normalizer  # no target: 0, never 0/0
    return (nll * mask).sum() / count


def weighted_kd(kd_losses: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Σ_m α_m KD_m (static teacher weights; default 1 each, the release's ``kd_loss_mode="sum"``)."""
    if not kd_losses:
        raise ValueError("need at least one KD loss")
    weights = [1.0] * len(kd_losses) if weights is None else list(weights)
    if len(weights) != len(kd_losses):
        raise ValueError(f"{len(kd_losses)} KD losses but {len(weights)} weights")
    return sum(w * kd for w, kd in zip(weights, kd_losses))


def combine_losses(ce: Tensor, kd: Tensor, *, mode: str = "dynamic", kd_weight: float = 1.0,
                   ce_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """-> (total loss, the factor applied to KD). "dynamic": sg(|CE| / |KD|)·KD + CE (factor 1 when KD = 0);
    "fixed": kd_weight·KD + ce_weight·CE."""
    if mode == "fixed":
        return kd_weight * kd + ce_weight * ce, torch.as_tensor(kd_weight, dtype=kd.dtype)
    if mode != "dynamic":
        raise ValueError(f"mode must be 'dynamic' or 'fixed', got {mode!r}")
    ce_abs, kd_abs = ce.detach().abs(), kd.detach().abs()
    scale = torch.where(kd_abs > 0, ce_abs / torch.where(kd_abs > 0, kd_abs, torch.ones_like(kd_abs)),
                        torch.ones_like(kd_abs))
    return scale * kd + ce, scale


def identity_projection(student_vocab_size: int, teacher_vocab_size: int) -> Projection:
    """W = I (student id v -> teacher id v; ids past the teacher's width get empty rows): P-KL over 1:1 chunks with
    this W is the plain per-token KL(p_T ‖ p_S) of a teacher that shares the student's tokenizer."""
    ids = torch.arange(student_vocab_size)
    keep = ids < teacher_vocab_size
    indices = torch.full((student_vocab_size, 4), -1, dtype=torch.int32)
    weights = torch.zeros(student_vocab_size, 4)
    indices[keep, 0] = ids[keep].to(torch.int32)
    weights[keep, 0] = 1.0
    return Projection(indices, weights, teacher_vocab_size, {"kind": "identity"})


def _model_width(model) -> int | None:
    """Logit width of an HF-style model without running it (output embeddings, else config.vocab_size)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(getattr(head, "weight", None), Tensor):
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size is not None else None


def _device_of(model) -> torch.device:
    p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _number(value, name: str, *, positive: bool = False) -> float:
    """``value`` (a real number or a one-element tensor) as a float; refused unless finite and >= 0 (> 0)."""
    real = isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1
                                                and not value.dtype.is_complex)
    if not real or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not (math.isfinite(x) and (x > 0 if positive else x >= 0)):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return x


class Teacher:
    """One teacher of a ``Distiller``.

    - ``model``: called as ``model(input_ids=, attention_mask=)`` (``position_ids=`` instead of the mask for packed
      batches; ``use_cache=False`` for HF models) under ``no_grad`` on its own device and in its own dtype; returns
      logits [B, T, V_T] (a tensor or an object with ``.logits``). It is put in eval mode and frozen. ``None``: the
      batch must carry the teacher's cached top-k log-probs (``xt.Collator(teacher_caches=...)``; ``cache=`` here
      passes it to ``Distiller.collator``). A batch with cached values uses them even when a model is given.
    - ``tokenizer``: the teacher's tokenizer (object or any name ``xt.load_tokenizer`` accepts); needed to build W,
      for ``loss="auto"`` and to detect a shared tokenizer.
    - ``loss``: "pkl" | "hkl" | "gold" | "uld" | "kl" (per-token KL, for a teacher with the student's tokenizer) |
      "auto": "kl" when both tokenizers are the same, else the coverage audit's recommendation (P-KL when numerals
      fall outside the exact common set, else H-KL; METHOD.md §7).
    - ``weight`` α_m (static weighting), ``temperature`` τ (both sides, loss × τ²); both read at every call.
    - ``projection``: an ``xt.Projection``; ``None`` builds W with ``Projection.from_tokenizers`` (cached on disk)
      at the logit widths of the first batch (identity for "kl").
    - ``learnable``: a learnable W (P-KL only; METHOD.md §3.5), built at construction of the Distiller; its θ is
      exposed by ``Distiller.param_groups()``.
    - ``vocab_size``: the teacher's logit width when neither the model nor the cache gives it.
    - ``name``: the metric suffix (default ``teacher{j}`` at its position, kept in ``Distiller.names``; any text,
      e.g. "qwen2.5-7b": the loss module's key and a checkpoint's file names replace characters other than letters,
      digits, "_" and "-" by "_"); ``loss_options``: keyword options of the loss (``merge``, ``uncovered``,
      ``teacher_topk``, ``uncommon_topk``, ``backend``, ``nonfinite``), read at every call."""

    def __init__(self, model=None, tokenizer=None, *, loss: str = "auto", weight: float = 1.0,
                 temperature: float = 1.0, projection: Projection | None = None, learnable: bool = False,
                 name: str | None = None, cache=None, vocab_size: int | None = None, **loss_options):
        if loss not in _KINDS:
            raise ValueError(f"loss must be one of {_KINDS}, got {loss!r}")
        unknown = sorted(set(loss_options) - set(_LOSS_OPTIONS))
        if unknown:  # reduction and normalizer are the Distiller's
            raise TypeError(f"unknown loss option(s) {unknown}: a Teacher takes {list(_LOSS_OPTIONS)}")
        if name is not None and not (isinstance(name, str) and name):
            raise TypeError(f"name must be a non-empty str or None, got {name!r}")
        if learnable and loss not in ("auto", "pkl"):
            raise ValueError(f"a learnable W is trained under P-KL only (METHOD.md §3.5), got loss={loss!r}")
        if model is None and cache is None and vocab_size is None and projection is None:
            raise ValueError("a teacher without a model needs cache= or vocab_size= (the width of its top-k indices)")
        if cache is not None:
            from . import teacher_cache

            cache = cache if isinstance(cache, teacher_cache.TeacherCache) else teacher_cache.load(cache)
        if isinstance(model, nn.Module):
            model.eval().requires_grad_(False)
        self.model, self._tokenizer, self.cache = model, tokenizer, cache
        self.loss, self.weight, self.temperature = loss, weight, temperature
        self.projection, self.learnable, self.name = projection, bool(learnable), name
        self._vocab_size, self.loss_options = vocab_size, dict(loss_options)
        self.kind: str | None = None if loss == "auto" else loss  # resolved by the Distiller

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        self._weight = _number(value, "weight")

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value) -> None:
        self._temperature = _number(value, "temperature", positive=True)

    @property
    def tokenizer(self):
        if self._tokenizer is not None and not hasattr(self._tokenizer, "backend_tokenizer"):
            from .tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int | None:
        """The teacher's logit width: ``vocab_size=``, else the cache's, the model's, or W's."""
        if self._vocab_size is not None:
            return int(self._vocab_size)
        if self.cache is not None and self.cache.vocab_size is not None:
            return int(self.cache.vocab_size)
        width = None if self.model is None else _model_width(self.model)
        if width is None and self.projection is not None:
            width = self.projection.teacher_vocab_size
        return width

    def __repr__(self) -> str:
        return (f"Teacher(name={self.name!r}, loss={self.loss!r}, kind={self.kind!r}, weight={self.weight}, "
                f"temperature={self.temperature}, learnable={self.learnable})")


@dataclass
class Normalizers:
    """Counts of one optimizer step (all accumulated micro-batches, all ranks): CE targets and valid chunks per
    teacher (float64 tensors on the batch's device)."""

    tokens: Tensor   # 0-dim
    chunks: Tensor   # [M]


class Distiller(nn.Module):
    """CE + Σ_m α_m KD_m for one student and several teachers, from the student's logits and an ``xt.Collator``
    batch: ``loss, metrics = distiller(student_logits, batch)``.

    - ``scaling``: "dynamic" (default, L = sg(CE/KD)·KD + CE) | "fixed" (L = kd_weight·KD + ce_weight·CE; the two
      weights apply to this mode only).
    - ``weighting``: "static" (α_m = ``Teacher.weight``) | "confidence" (the release's adaptive weights,
      METHOD.md §9: α = softmax(score / ``confidence_temperature``) over teachers, the score being the teacher's
      all-rank mean over the rows of its valid chunks of −CE on its own next tokens (``confidence="ce"``),
      −entropy (``"entropy"``, default) or the max probability (``"max_prob"``), no gradient; a teacher served
      from a top-k cache gets the entropy of its top-k part and cannot use "ce"). ``Teacher.weight`` is then unused.
    - ``student_vocab_size``: the student's logit width, needed at construction only for a learnable W (default
      ``len(student_tok)``, or the rows of a ``LearnableProjection`` given as ``projection=``; both are made at
      construction); other projections are built at the widths of the first batch.
    - ``nonfinite``: passed to the losses ("raise" | "mask", POLICY.md) when they support it; excluded chunks leave
      the KD mean and are reported per teacher.
    - ``sync``: all-reduce the statistics over the default process group (None: when one is initialized with more
      than one rank). The returned loss is then the rank's contribution × world size, for DDP's gradient averaging.

    Returns ``(loss, metrics)``. ``loss`` is what to backpropagate; ``metrics`` holds detached 0-dim float64
    tensors (no host sync) of the objective over all ranks: ``loss``, ``ce``, ``kd`` (= Σ α_m KD_m), ``kd_scale``,
    and per teacher ``kd/<name>``, ``alpha/<name>``, ``valid_frac/<name>`` (valid / all chunks of the alignment),
    ``top1/<name>`` (on the first predictive row of every valid chunk: argmax of Wᵀp_S == the teacher's argmax,
    τ = 1) and ``excluded/<name>`` (chunks the losses excluded as non-finite or degenerate). With ``normalizers``
    the additive metrics (loss, ce, kd, kd/*, excluded/*) are this micro-batch's contributions to the step."""

    def __init__(self, student_tok, teachers: Sequence[Teacher], *, scaling: str = "dynamic",
                 ce_weight: float | None = None, kd_weight: float | None = None, weighting: str = "static",
                 confidence: str = "entropy", confidence_temperature: float = 1.0,
                 student_vocab_size: int | None = None, nonfinite: str | None = None, sync: bool | None = None):
        super().__init__()
        try:  # a generator is read once: list it before the checks
            teachers = None if isinstance(teachers, (Teacher, str)) else list(teachers)
        except TypeError:
            teachers = None
        if not teachers or not all(isinstance(t, Teacher) for t in teachers):
            raise TypeError("teachers must be a non-empty list of xt.Teacher")
        if scaling not in ("dynamic", "fixed"):
            raise ValueError(f"scaling must be 'dynamic' or 'fixed', got {scaling!r}")
        if scaling == "dynamic" and (ce_weight is not None or kd_weight is not None):
            raise ValueError("ce_weight / kd_weight apply to scaling='fixed' (dynamic scaling sets KD's factor)")
        if weighting not in ("static", "confidence"):
            raise ValueError(f"weighting must be 'static' or 'confidence', got {weighting!r}")
        if confidence not in _CONFIDENCE:
            raise ValueError(f"confidence must be one of {_CONFIDENCE}, got {confidence!r}")
        if nonfinite is not None and not _HAS_NONFINITE:
            raise ValueError("nonfinite= needs losses with the `nonfinite` keyword (not in this build)")
        self._student_tok = student_tok
        self.teachers = list(teachers)
        for j, t in enumerate(self.teachers):
            i = self.teachers.index(t)  # Teacher has no __eq__: the first position of this very object
            if i != j:  # one object holds one name, W and resolved loss: make a second Teacher(...) instead
                raise ValueError(f"teachers[{j}] is the same Teacher object as teachers[{i}]")
        self.names = [t.name or f"teacher{j}" for j, t in enumerate(self.teachers)]  # metric suffixes
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"teacher names must be unique, got {self.names}")
        self._keys = [re.sub(r"[^\w-]", "_", n, flags=re.ASCII) for n in self.names]  # module keys, file names
        if len(set(self._keys)) != len(self._keys):
            raise ValueError(f"teacher names {self.names} give the same key {self._keys} (characters other than "
                             "letters, digits, '_' and '-' become '_'): rename one")
        self.scaling, self.weighting = scaling, weighting
        self.ce_weight = 1.0 if ce_weight is None else _number(ce_weight, "ce_weight")
        self.kd_weight = 1.0 if kd_weight is None else _number(kd_weight, "kd_weight")
        self.confidence = confidence
        cut = [n for n, t in zip(self.names, self.teachers)
               if t.cache is not None and (t.cache.vocab_size is None or t.cache.k < t.cache.vocab_size)]
        if weighting == "confidence" and confidence == "entropy" and 0 < len(cut) < len(self.teachers):
            warnings.warn(f"confidence='entropy' scores teachers {cut} on their cached top-k log-probs, without the "
                          "tail's entropy: they look more confident than the teachers scored on full rows; "
                          "confidence='max_prob' is exact from a top-k cache", stacklevel=2)
        self.confidence_temperature = _number(confidence_temperature, "confidence_temperature", positive=True)
        self.student_vocab_size, self.nonfinite, self.sync = student_vocab_size, nonfinite, sync
        self.kd_losses = nn.ModuleDict()  # teacher key -> loss Module (a learnable W is its submodule)
        self._widths: dict[int, tuple[int, int]] = {}  # teacher position -> (V_S, V_T) of its loss Module
        self._label_widths: set[int] = set()  # student widths whose labels were checked on a non-CPU device
        for j, t in enumerate(self.teachers):
            if isinstance(t.projection, LearnableProjection):  # θ exists now: optimizers, checkpoints and .to() see it
                V_S = student_vocab_size if student_vocab_size is not None else t.projection.student_vocab_size
                self._resolve(j, V_S, t.vocab_size if t.vocab_size is not None else t.projection.teacher_vocab_size)
            elif t.learnable:
                V_S = student_vocab_size if student_vocab_size is not None else token_table(self.student_tok).size
                if t.vocab_size is None:
                    raise ValueError(f"teacher {self.names[j]!r}: a learnable W needs the teacher's width (model, "
                                     "cache or vocab_size=)")
                self._resolve(j, V_S, t.vocab_size)

    # -- public helpers -----------------------------------------------------------------------------------------------
    @property
    def student_tok(self):
        if self._student_tok is not None and not hasattr(self._student_tok, "backend_tokenizer"):
            from .tokenizers import load_tokenizer

            self._student_tok = load_tokenizer(self._student_tok)
        return self._student_tok

    def collator(self, **kwargs):
        """An ``xt.Collator`` for this student and these teachers (with the teachers' caches); ``kwargs`` go to it."""
        from .data import Collator

        if any(t.tokenizer is None for t in self.teachers) or self.student_tok is None:
            raise ValueError("Distiller.collator needs the student's and every teacher's tokenizer")
        caches = [t.cache for t in self.teachers]
        if any(c is not None for c in caches):
            kwargs.setdefault("teacher_caches", caches)
        return Collator(self.student_tok, [t.tokenizer for t in self.teachers], **kwargs)

    @staticmethod
    def model_inputs(batch: Mapping, model=None) -> dict:
        """The student's forward arguments from a collator batch: ``input_ids`` and ``attention_mask``, or for packed
        rows ``position_ids`` without the mask; never labels, alignments or teacher fields. Given the ``model``, an HF
        model also gets ``use_cache=False``: without a KV cache it builds per-document causal masks from the packed
        position ids (with one it would attend across documents)."""
        return _forward_args(batch, model)

    def param_groups(self, lr: float = 1e-2, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups of the learnable W's θ (METHOD.md §3.5: lr 1e-2, no weight decay; keep them
        out of gradient clipping). Empty when no teacher has a learnable W."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    def sync_grads(self) -> None:
        """Average the learnable W's gradients over ranks (θ lives outside the DDP-wrapped student); call before the
        optimizer step. A no-op without synchronization."""
        if not self._synced():
            return
        world = torch.distributed.get_world_size()
        for p in self.parameters():
            if p.requires_grad:
                if p.grad is None:  # a rank without valid chunks still joins the collective
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def normalizers(self, batches) -> Normalizers:
        """Counts of one optimizer step: CE targets and valid chunks per teacher over ``batches`` (a batch or the
        micro-batches of a gradient-accumulation window), summed over ranks. Pass to every forward of the step."""
        batches = [batches] if isinstance(batches, Mapping) else list(batches)
        if not batches:
            raise ValueError("normalizers needs at least one batch")
        dev = batches[0]["labels"].device
        counts = [sum((b["labels"][:, 1:] != IGNORE_INDEX).sum().to(dev) for b in batches)]
        for j in range(len(self.teachers)):
            counts.append(sum(b["teachers"][j]["alignment"].chunk_valid.sum().to(dev) for b in batches))
        v = torch.stack(counts).to(torch.float64)
        if self._synced():
            torch.distributed.all_reduce(v)
        return Normalizers(v[0], v[1:])

    # -- the objective ----------------------------------------------------------------------------------------------
    def forward(self, student_logits: Tensor, batch: Mapping, *,
                normalizers: Normalizers | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        tds = batch["teachers"]
        if len(tds) != len(self.teachers):
            raise ValueError(f"the batch has {len(tds)} teachers, the Distiller {len(self.teachers)}")
        if student_logits.dim() != 3 or student_logits.shape[:2] != batch["labels"].shape:
            raise ValueError(f"student_logits must be [B, T_S, V_S] matching labels {tuple(batch['labels'].shape)}, "
                             f"got {tuple(student_logits.shape)}")
        if normalizers is not None and (normalizers.tokens.dim() != 0
                                        or tuple(normalizers.chunks.shape) != (len(self.teachers),)):
            raise ValueError(f"normalizers must hold tokens [] and chunks [{len(self.teachers)}] (one per teacher), "
                             f"got {tuple(normalizers.tokens.shape)} and {tuple(normalizers.chunks.shape)}: make "
                             "them with this Distiller's normalizers()")
        dev, V_S = student_logits.device, student_logits.shape[-1]
        labels = batch["labels"].to(dev)
        keep = labels != IGNORE_INDEX
        self._check_labels(labels, V_S)
        ce_sum = next_token_ce(student_logits, labels.clamp_min(0), keep, normalizer=1.0)  # Σ nll
        stats = [ce_sum.detach(), keep[:, 1:].sum()]
        kd_sums = []
        for j, (t, td) in enumerate(zip(self.teachers, tds)):
            vals, idx, V_T = self._teacher_outputs(j, td, dev)
            module = self._resolve(j, V_S, V_T)
            ali = td["alignment"]
            kd_sum = module(student_logits, vals, ali, teacher_indices=idx, **self._options(t))
            excluded = getattr(module, "last_excluded", None)
            hits, n_top = self._top1(student_logits, vals, idx, ali, module.proj, V_T)
            score = self._score(j, vals, idx, td) if self.weighting == "confidence" else (torch.zeros(()),) * 2
            stats += [kd_sum.detach(), ali.chunk_valid.sum(), torch.zeros(()) if excluded is None else excluded,
                      ali.num_chunks.sum(), hits, n_top, *score]
            kd_sums.append(kd_sum)
        stats = torch.stack([s.to(dev, torch.float64) for s in stats])
        world = 1
        if self._synced():
            torch.distributed.all_reduce(stats)
            world = torch.distributed.get_world_size()
        M = len(self.teachers)
        per = stats[2:].view(M, 8)  # kd_sum, valid, excluded, chunks, hits, n_top, score_sum, score_n
        tokens = stats[1] if normalizers is None else normalizers.tokens.to(dev, torch.float64)
        valid = per[:, 1] if normalizers is None else normalizers.chunks.to(dev, torch.float64)
        den_ce = tokens.clamp_min(1)
        den_kd = (valid - per[:, 2]).clamp_min(1)  # excluded chunks leave the mean (POLICY.md)
        ce, kd_m = stats[0] / den_ce, per[:, 0] / den_kd
        alpha = self._alpha(per[:, 6], per[:, 7], dev)
        kd = weighted_kd(list(kd_m), list(alpha))
        ce_w = self.ce_weight if self.scaling == "fixed" else 1.0
        _, scale = combine_losses(ce, kd, mode=self.scaling, kd_weight=self.kd_weight, ce_weight=ce_w)
        scale = scale.to(dev, torch.float64)
        # d(loss)/d(kd_sum_m) = world·scale·α_m / den_m: the contributions of all ranks add up to the objective
        md = ce_sum.dtype
        coef = (world * scale * alpha / den_kd).to(md)
        loss = weighted_kd(kd_sums, list(coef)) + (world * ce_w / den_ce).to(md) * ce_sum
        metrics = {"loss": scale * kd + ce_w * ce, "ce": ce, "kd": kd, "kd_scale": scale}
        for name, row, kd_t, a in zip(self.names, per, kd_m, alpha):
            metrics[f"kd/{name}"] = kd_t
            metrics[f"alpha/{name}"] = a
            metrics[f"valid_frac/{name}"] = row[1] / row[3].clamp_min(1)
            metrics[f"top1/{name}"] = row[4] / row[5].clamp_min(1)
            metrics[f"excluded/{name}"] = row[2]
        return loss, metrics

    # -- internals ----------------------------------------------------------------------------------------------------
    def _synced(self) -> bool:
        if self.sync is False:
            return False
        on = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.sync and not on:
            raise RuntimeError("sync=True needs an initialized torch.distributed process group")
        return on and torch.distributed.get_world_size() > 1

    def _check_labels(self, labels: Tensor, V_S: int) -> None:
        """Labels past the student's logit width (tokens added to the tokenizer, embeddings not resized) would fail
        inside cross_entropy (a device assert on CUDA): checked on every CPU batch, once per width elsewhere (one
        host sync)."""
        if labels.numel() == 0 or (labels.device.type != "cpu" and V_S in self._label_widths):
            return
        top = int(labels.max())
        if top >= V_S:
            raise ValueError(f"the labels hold token id {top} but student_logits are {V_S} wide: resize the "
                             "student's embeddings to its tokenizer (model.resize_token_embeddings(len(tokenizer)))")
        self._label_widths.add(V_S)

    def _options(self, t: Teacher) -> dict:
        """The loss's keyword options for teacher ``t``, read at every call."""
        options = dict(t.loss_options, temperature=t.temperature)
        if self.nonfinite is not None:
            options["nonfinite"] = self.nonfinite
        return options

    def _resolve(self, j: int, V_S: int, V_T: int) -> nn.Module:
        """The loss Module of teacher j at logit widths (V_S, V_T): W and the loss kind, resolved once."""
        t, name, key = self.teachers[j], self.names[j], self._keys[j]
        if key in self.kd_losses:
            if self._widths[j] != (V_S, V_T):
                raise ValueError(f"teacher {name!r}: logit widths changed from {self._widths[j]} to "
                                 f"{(V_S, V_T)} (for a learnable W pass Distiller(student_vocab_size=...))")
            return self.kd_losses[key]
        same, tables = None, {}
        if t.tokenizer is not None and self.student_tok is not None:
            tables = {"student": token_table(self.student_tok), "teacher": token_table(t.tokenizer)}
            same = tables["student"].fingerprint == tables["teacher"].fingerprint
        kind = t.loss
        if kind == "kl" and same is False:
            raise ValueError(f"teacher {name!r}: loss='kl' needs the student's tokenizer (use pkl/hkl/auto)")
        if kind == "auto" and same:
            kind = "kl"
        proj = t.projection
        if proj is None:
            if kind == "kl":
                proj = identity_projection(V_S, V_T)
            elif same is None:
                raise ValueError(f"teacher {name!r}: building W needs the student's and the teacher's tokenizers "
                                 "(or pass projection=)")
            else:
                proj = Projection.from_tokenizers(self.student_tok, t.tokenizer, V_S, V_T, progress=False)
        learned = isinstance(proj, LearnableProjection)  # given as one: it trains (a module with θ), P-KL only
        base = proj.base if learned else proj
        for side, table in tables.items():  # a given W (its file's metadata) must be the one of these tokenizers
            built = base.meta.get(f"{side}_fingerprint")
            if built is not None and built != table.fingerprint:
                raise ValueError(f"teacher {name!r}: W was built for another {side} tokenizer (fingerprint {built}, "
                                 f"given tokenizer {table.fingerprint})")
            warn_behaviour(base.meta, side, table, f"teacher {name!r}: W", stacklevel=4)
        if (proj.student_vocab_size, proj.teacher_vocab_size) != (V_S, V_T):
            raise ValueError(f"teacher {name!r}: W is {proj.student_vocab_size} x {proj.teacher_vocab_size} but the "
                             f"logits are {V_S} (student) and {V_T} (teacher) wide")
        if kind == "auto":
            if self.student_tok is None:
                raise ValueError(f"teacher {name!r}: loss='auto' needs the student's tokenizer for the audit")
            kind = base.audit(self.student_tok).recommendation
        if t.learnable or learned:
            if kind != "pkl":
                raise ValueError(f"teacher {name!r}: a learnable W needs P-KL, but loss resolves to {kind!r} (the "
                                 "audit's choice); pass loss='pkl'")
            proj = proj if learned else LearnableProjection(proj)
        t.kind = kind
        self._widths[j] = (V_S, V_T)
        self.kd_losses[key] = _MODULES[kind](proj, reduction="sum", **self._options(t))
        return self.kd_losses[key]

    @torch.no_grad()
    def _teacher_outputs(self, j: int, td: Mapping, dev) -> tuple[Tensor, Tensor | None, int]:
        """(teacher j's values on ``dev``, top-k indices or None, V_T): the cached top-k log-probs of the batch, else
        the teacher's logits from a forward on its own device and dtype."""
        t, name = self.teachers[j], self.names[j]
        if "topk_logprobs" in td:
            if t.vocab_size is None:
                why = "its cache holds no token rows, so it records none: pass vocab_size=" if t.cache is not None \
                    else "pass cache= or vocab_size="
                raise ValueError(f"teacher {name!r}: cached top-k values need the teacher's width ({why})")
            return td["topk_logprobs"].to(dev), td["topk_indices"].to(dev), t.vocab_size
        if t.model is None:
            raise ValueError(f"teacher {name!r} has no model and the batch carries no cached top-k log-probs "
                             "(off-policy: xt.Collator(teacher_caches=...); an on_policy batch is in no cache: give "
                             "the teacher its model)")
        tdev = _device_of(t.model)
        args = {k: v.to(tdev) if isinstance(v, Tensor) else v for k, v in _forward_args(td, t.model).items()}
        out = t.model(**args)
        logits = out.logits if hasattr(out, "logits") else out
        if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != td["input_ids"].shape:
            raise TypeError(f"teacher {name!r} must return logits [B, T_T, V_T] for input_ids "
                            f"{tuple(td['input_ids'].shape)}")
        return logits.to(dev), None, logits.shape[-1]

    @torch.no_grad()
    def _top1(self, z: Tensor, vals: Tensor, idx: Tensor | None, ali, proj, V_T: int) -> tuple[Tensor, Tensor]:
        """(hits, chunks): argmax_v (Wᵀ softmax(z_r))_v == the teacher's argmax at the first predictive row pair
        (s_lo, t_lo) of every valid chunk; a pair with a non-finite row (a chunk nonfinite="mask" excludes) or a row
        without a finite value is not counted."""
        rs = ali.row_spans()  # planned where the alignment lives (CPU: no host sync), used on z's device
        if rs.shape[0] == 0:
            return torch.zeros((), device=z.device), torch.zeros((), device=z.device)
        if isinstance(proj, LearnableProjection):  # a module: .to() would move θ itself, under its optimizer
            w_idx, w_val = proj.indices.to(z.device), proj.weights.detach().to(z.device)
        else:
            proj = proj.to(z.device)  # a Projection caches its copy per device
            w_idx, w_val = proj.indices, proj.weights.detach()
        nz = (w_idx >= 0) & (w_val > 0)
        rows = torch.arange(w_idx.shape[0], device=z.device)[:, None].expand_as(w_idx)[nz]
        cols, w = w_idx[nz].long(), w_val[nz].float()
        hits = torch.zeros((), dtype=torch.int64, device=z.device)
        n = torch.zeros((), dtype=torch.int64, device=z.device)
        for i in range(0, rs.shape[0], _ROW_BLOCK):
            b, s0, t0 = (rs[i:i + _ROW_BLOCK, c].to(z.device) for c in (0, 1, 3))
            z_row, t_row = z[b, s0].float(), vals[b, t0].float()
            ok = ~(nonfinite_rows(z_row, True) | nonfinite_rows(t_row, True))  # a row without a finite value too
            p = torch.softmax(z_row, -1)
            q = torch.zeros(b.shape[0], V_T, device=z.device, dtype=p.dtype).index_add_(1, cols, p[:, rows] * w)
            t_top = t_row.argmax(1) if idx is None else idx[b, t0].gather(1, t_row.argmax(1, keepdim=True))[:, 0]
            hits += ((q.argmax(1) == t_top) & ok).sum()
            n += ok.sum()
        return hits, n

    @torch.no_grad()
    def _score(self, j: int, vals: Tensor, idx: Tensor | None, td: Mapping) -> tuple[Tensor, Tensor]:
        """(Σ score, rows) of the confidence weighting over the teacher rows of the valid chunks; a row with NaN or
        +inf (its chunk excluded under nonfinite="mask") or without a finite value is not scored."""
        rs = td["alignment"].row_spans()  # row planning where the alignment lives (CPU: no host sync)
        n = rs[:, 4] - rs[:, 3]
        b = rs[:, 0].repeat_interleave(n)
        p = rs[:, 3].repeat_interleave(n) + torch.arange(b.shape[0]) - (torch.cumsum(n, 0) - n).repeat_interleave(n)
        if self.confidence == "ce" and idx is not None:
            raise ValueError(f"teacher {self.names[j]!r}: confidence='ce' needs the teacher's full distribution, "
                             "not a top-k cache (use 'entropy' or 'max_prob')")
        total = torch.zeros((), dtype=torch.float64, device=vals.device)
        count = torch.zeros((), dtype=torch.int64, device=vals.device)
        for i in range(0, b.shape[0], _ROW_BLOCK):
            bb, pp = b[i:i + _ROW_BLOCK].to(vals.device), p[i:i + _ROW_BLOCK].to(vals.device)
            x = vals[bb, pp].float()
            ok = ~nonfinite_rows(x, True)  # NaN, +inf, or no finite value (all −inf: log_softmax is NaN)
            lp = x if idx is not None else torch.log_softmax(x, -1)  # a cache stores log-probs already
            if self.confidence == "max_prob":
                s = lp.max(1).values.exp()
            elif self.confidence == "entropy":
                s = (lp.exp() * torch.where(torch.isfinite(lp), lp, 0.0)).sum(1)  # −H
            else:
                nxt = td["input_ids"].to(vals.device)[bb, pp + 1]
                s = lp.gather(1, nxt[:, None])[:, 0]  # −CE = log π(next token)
            total += torch.where(ok, s.double(), 0.0).sum()
            count += ok.sum()
        return total, count

    def _alpha(self, score_sum: Tensor, score_n: Tensor, dev) -> Tensor:
        if self.weighting == "static":
            return torch.tensor([t.weight for t in self.teachers], dtype=torch.float64, device=dev)
        score = torch.where(score_n > 0, score_sum / score_n.clamp_min(1), float("-inf"))
        score = torch.where((score_n > 0).any(), score, 0.0)  # no teacher has a scored row: equal weights
        top = score.max()  # softmax((s − max) / T): a tiny T gives the argmax, not −inf / −inf
        return torch.softmax(torch.where(score == top, 0.0, score - top) / self.confidence_temperature, 0)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling!r}, weighting={self.weighting!r}, teachers={self.names}"


def _forward_args(batch: Mapping, model=None) -> dict:
    if "position_ids" in batch:
        args = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        args["use_cache"] = False
    return args
