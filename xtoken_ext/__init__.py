"""xtoken_ext: cross-tokenizer knowledge distillation (X-Token, arXiv 2605.21699).

A sparse projection W (student vocab -> teacher vocab), a native span aligner, and fused P-KL / H-KL losses.
Public names load lazily so `import xtoken_ext` (and the `xtoken` CLI) stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Projection": "projection",
    "Aligner": "alignment",
    "Alignment": "alignment",
    "pkl_loss": "losses",
    "hkl_loss": "losses",
    "gold_loss": "losses",
    "uld_loss": "losses",
    "LearnableProjection": "losses",
    "PKLLoss": "losses",
    "HKLLoss": "losses",
    "GOLDLoss": "losses",
    "ULDLoss": "losses",
    "pkl_loss_from_hidden": "linear_head",
    "hkl_loss_from_hidden": "linear_head",
    "gold_loss_from_hidden": "linear_head",
    "uld_loss_from_hidden": "linear_head",
    "load_tokenizer": "tokenizers",
    "token_table": "tokenizers",
    "Collator": "data",
    "Batch": "data",
    "Distiller": "distill",
    "Teacher": "distill",
    "DistillTrainer": "trainer",  # imports transformers on first use only
}
_SUBMODULES = ("reference", "tokenizers", "projection", "alignment", "losses", "distill", "ops", "testing", "data",
               "teacher_cache", "trainer")

__all__ = [*_EXPORTS, "reference", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'xtoken_ext' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
