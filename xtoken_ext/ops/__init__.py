"""Row-space loss ops, one ``torch.library`` custom op per loss family with three backends each:

- ``xtoken::pkl_rows`` (ops.pkl) — P-KL;  ``xtoken::hkl_rows`` (ops.hkl) — H-KL / GOLD / ULD.
- backends: "triton" (fused kernels in ops.pkl_kernel / ops.hkl_kernel, imported lazily; CUDA, or CPU tensors
  under TRITON_INTERPRET=1), "native" (torch-free C++ kernels in xtoken_ext._C; CPU), "torch" (chunked torch ops;
  any device and dtype). "auto" picks Triton on CUDA, native on CPU where it applies, torch otherwise.

Shared torch helpers: ops._common; shared Triton helpers: ops._tl.
"""
from . import hkl, pkl  # noqa: F401  (registers the two custom ops; no triton import)
