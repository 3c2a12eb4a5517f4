"""Row-space loss ops: fused Triton kernels (ops.pkl / ops.hkl) and the CPU path (ops.fallback: the C++ kernels of
xtoken_ext._C for fp32 dense-teacher inputs, else chunked pure torch).

All implement the row-space contract (student rows, teacher rows, [K, 4] chunk spans) and return the per-chunk loss
together with the gradient wrt the student logits; ``row_ops`` picks the registered custom ops for a device."""
from __future__ import annotations

import importlib.util
import os

import torch


def use_triton(device: torch.device) -> bool:
    """CUDA tensors with Triton importable, or XTOKEN_FORCE_TRITON=1 (interpreter on CPU tensors)."""
    if os.environ.get("XTOKEN_FORCE_TRITON") == "1":
        return True
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def row_ops(device: torch.device):
    """(pkl_rows_autograd, hkl_rows_autograd) for tensors on ``device``: differentiable per-chunk losses [K]."""
    if use_triton(device):
        from . import hkl, pkl

        return pkl.pkl_rows_autograd, hkl.hkl_rows_autograd
    from . import fallback

    return fallback.pkl_rows_autograd, fallback.hkl_rows_autograd
