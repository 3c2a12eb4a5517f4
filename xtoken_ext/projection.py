"""Projection matrix W (student vocab -> teacher vocab), stored as ELL: <= 4 (teacher id, weight) slots per row.

Row s says where student token s's probability goes in the teacher vocabulary: q = Wᵀ p_S.
Rows sum to 1 or are empty (all slots -1 / 0).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

SLOTS = 4
RELAXED_THRESHOLD = 0.6


class Projection:
    """Sparse row-stochastic W in ELL form: ``indices`` int32 [V_S, 4] (-1 = empty), ``weights`` float32 [V_S, 4]."""

    def __init__(self, indices, weights, teacher_vocab_size: int, meta: dict[str, Any] | None = None):
        indices = torch.as_tensor(indices, dtype=torch.int32)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if indices.dim() != 2 or indices.shape[1] != SLOTS or weights.shape != indices.shape:
            raise ValueError(f"indices/weights must both be [V_S, {SLOTS}], got {tuple(indices.shape)} / "
                             f"{tuple(weights.shape)}")
        if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= teacher_vocab_size):
            raise ValueError(f"teacher indices must lie in [-1, {teacher_vocab_size})")
        if bool(((indices < 0) & (weights != 0)).any()):
            raise ValueError("empty slots (index -1) must have weight 0")
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be finite and non-negative")
        self.indices = indices
        self.weights = weights
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.meta = dict(meta or {})
        self._cache: dict[tuple, Any] = {}

    @property
    def student_vocab_size(self) -> int:
        return self.indices.shape[0]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def __repr__(self) -> str:
        return (f"Projection(V_S={self.student_vocab_size}, V_T={self.teacher_vocab_size}, "
                f"nnz={int((self.indices >= 0).sum())})")

    def to(self, device) -> "Projection":
        device = torch.device(device)
        if device == self.device:
            return self
        key = ("to", str(device))
        if key not in self._cache:
            out = Projection.__new__(Projection)
            out.indices, out.weights = self.indices.to(device), self.weights.to(device)
            out.teacher_vocab_size, out.meta, out._cache = self.teacher_vocab_size, self.meta, {}
            self._cache[key] = out
        return self._cache[key]

    def row(self, student_id: int) -> dict[int, float]:
        """Teacher id -> weight for one student token (empty dict for an empty row)."""
        if not 0 <= student_id < self.student_vocab_size:
            raise IndexError(f"student id {student_id} out of range [0, {self.student_vocab_size})")
        idx, w = self.indices[student_id].tolist(), self.weights[student_id].tolist()
        return {i: v for i, v in zip(idx, w) if i >= 0}

    def dense(self, dtype=torch.float64) -> torch.Tensor:
        """Dense [V_S, V_T] W (for references and tests only: 78 GB at Llama x Qwen size)."""
        out = torch.zeros(self.student_vocab_size, self.teacher_vocab_size, dtype=dtype, device=self.device)
        rows = torch.arange(self.student_vocab_size, device=self.device).unsqueeze(1).expand_as(self.indices)
        keep = self.indices >= 0
        out.index_put_((rows[keep], self.indices[keep].long()), self.weights[keep].to(dtype), accumulate=True)
        return out

    def csc(self, device=None):
        """Transposed view: (col_ptr int64 [V_T+1], row_idx int32 [nnz], val float32 [nnz]), cached per device.

        Column t's student rows are row_idx[col_ptr[t]:col_ptr[t+1]] (ascending), so q[t] = Σ val·p[row_idx]."""
        device = torch.device(device) if device is not None else self.device
        key = ("csc", str(device))
        if key not in self._cache:
            keep = (self.indices >= 0) & (self.weights > 0)
            rows = torch.arange(self.student_vocab_size).unsqueeze(1).expand_as(self.indices)[keep.cpu()]
            cols = self.indices.cpu()[keep.cpu()].long()
            vals = self.weights.cpu()[keep.cpu()]
            order = torch.argsort(cols * self.student_vocab_size + rows, stable=True)
            counts = torch.bincount(cols, minlength=self.teacher_vocab_size)
            col_ptr = torch.zeros(self.teacher_vocab_size + 1, dtype=torch.int64)
            col_ptr[1:] = torch.cumsum(counts, 0)
            self._cache[key] = (col_ptr.to(device), rows[order].to(torch.int32).to(device), vals[order].to(device))
        return self._cache[key]

    def covered_columns(self, device=None) -> torch.Tensor:
        """bool [V_T]: teacher columns that at least one student row reaches with weight > 0."""
        device = torch.device(device) if device is not None else self.device
        key = ("covered", str(device))
        if key not in self._cache:
            keep = (self.indices >= 0) & (self.weights > 0)
            cov = torch.zeros(self.teacher_vocab_size, dtype=torch.bool, device=self.device)
            cov[self.indices[keep].long()] = True
            self._cache[key] = cov.to(device)
        return self._cache[key]

    def common_pairs(self, mode: str = "relaxed"):
        """Common (student, teacher) pairs for GOLD ("strict") and H-KL ("relaxed"), sorted by student id.

        strict: rows that are one-hot with weight 1 (exact matches). relaxed: each row's top-1 teacher if its
        weight >= 0.6. One student per teacher: highest weight wins, then the lowest student id."""
        if mode not in ("strict", "relaxed"):
            raise ValueError(f"mode must be 'strict' or 'relaxed', got {mode!r}")
        key = ("common", mode)
        if key not in self._cache:
            idx, w = self.indices.cpu(), self.weights.cpu()
            top_w, top_slot = w.max(dim=1)
            top_t = idx.gather(1, top_slot.unsqueeze(1)).squeeze(1).long()
            if mode == "strict":
                cand = (top_w == 1.0) & ((idx >= 0).sum(1) == 1)
            else:
                cand = (top_w >= RELAXED_THRESHOLD) & (top_t >= 0)
            s = torch.nonzero(cand).squeeze(1)
            t, ws = top_t[s], top_w[s]
            # Sort by (teacher, -weight, student); the first of each teacher group wins.
            order = torch.from_numpy(np.lexsort((s.numpy(), -ws.numpy(), t.numpy())))
            s, t = s[order], t[order]
            first = torch.ones_like(t, dtype=torch.bool)
            first[1:] = t[1:] != t[:-1]
            s, t = s[first], t[first]
            by_student = torch.argsort(s)
            self._cache[key] = (s[by_student], t[by_student])
        return self._cache[key]

    @staticmethod
    def random(student_vocab_size: int, teacher_vocab_size: int, *, seed: int = 0, empty_rows: float = 0.0,
               max_pieces: int = SLOTS, gamma: float = 0.1) -> "Projection":
        """Synthetic W for tests and benchmarks: each row maps to 1..max_pieces distinct random teacher ids with
        the decay weights γ^i / Σγ^j; a fraction ``empty_rows`` of rows stays empty."""
        if not 1 <= max_pieces <= SLOTS or teacher_vocab_size < max_pieces:
            raise ValueError("need 1 <= max_pieces <= 4 and teacher_vocab_size >= max_pieces")
        g = torch.Generator().manual_seed(seed)
        V_S = student_vocab_size
        pieces = torch.randint(1, max_pieces + 1, (V_S,), generator=g)
        cols = torch.randint(0, teacher_vocab_size, (V_S, SLOTS), generator=g)
        for k in range(1, SLOTS):  # redraw until the slots of a row are distinct
            while bool((dup := (cols[:, k:k + 1] == cols[:, :k]).any(1)).any()):
                cols[dup, k] = torch.randint(0, teacher_vocab_size, (int(dup.sum()),), generator=g)
        slot = torch.arange(SLOTS).unsqueeze(0)
        used = slot < pieces.unsqueeze(1)
        w = torch.where(used, gamma ** slot.to(torch.float64), torch.zeros((), dtype=torch.float64))
        w = w / w.sum(1, keepdim=True)
        empty = torch.rand(V_S, generator=g) < empty_rows
        used &= ~empty.unsqueeze(1)
        indices = torch.where(used, cols, torch.full_like(cols, -1)).to(torch.int32)
        weights = torch.where(used, w, torch.zeros_like(w)).to(torch.float32)
        return Projection(indices, weights, teacher_vocab_size, meta={"synthetic": True, "seed": seed})
