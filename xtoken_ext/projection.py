"""Projection matrix W (student vocab -> teacher vocab), stored as ELL: <= 4 (teacher id, weight) slots per row.

Row s says where student token s's probability goes in the teacher vocabulary: q = Wᵀ p_S.
Rows sum to 1 or are empty (all slots -1 / 0).

Build (``Projection.from_tokenizers``, METHOD.md §3): pass 1 maps every student token whose canonical bytes equal
a teacher token's to that token (one-hot; among teacher ids with equal bytes the one the teacher emits for that
text; specials by role, an id that is both BOS and EOS as the EOS); pass 2 re-tokenizes the text of every other
student token with the teacher and keeps the first ``max_pieces`` ids with weights γ^i / Σγ^j (β cancels),
accumulating repeated ids. Student ids whose bytes
duplicate the id the student tokenizer emits (byte fallback ``<0x30>`` next to ``0``) are ``alias_rows``: same row,
but never in the common sets and not counted by the audit. Saved as safetensors with JSON metadata, never pickle.
"""
from __future__ import annotations

import dataclasses
import contextlib
import hashlib
import json
import numbers
import operator
import os
import re
import sys
import warnings
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

SLOTS = 4
RELAXED_THRESHOLD = 0.6
# Version 2 added the optional ``alias_rows`` tensor (version 1 files still load, without it); the version is part
# of the W cache key, so W cached before the emitted-duplicate rule is rebuilt.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_META_KEY = "xtoken_ext.projection"
_ROW_SUM_TOL = 1e-5
_ENCODE_CHUNK = 16384
# Audit: the fraction of critical (numeral) student tokens that must sit in the exact common set for H-KL.
HKL_MIN_COVERAGE = 0.9


_MAX_VOCAB = 2 ** 31 - 1  # W's teacher ids are int32


def check_save_path(path) -> Path:
    """A W file's path that ``save`` can write (checked before a long build too): not a folder, in one that exists.
    safetensors' own error names neither the path nor the cause."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give the W file's path (e.g. {path / 'W.safetensors'})")
    if not path.parent.is_dir():
        if path.parent.exists():
            raise NotADirectoryError(f"{path}: {path.parent} is a file, not a folder")
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    return path


def _as_tensor(x, dtype=None) -> torch.Tensor:
    """``torch.as_tensor`` on ``x``'s own device, the CPU for numpy arrays and lists: never the default device, which
    inside ``with torch.device("meta")`` would make W's data meta and every check on it fail."""
    return torch.as_tensor(x, dtype=dtype, device=x.device if isinstance(x, torch.Tensor) else "cpu")


class ProjectionFileError(ValueError):
    """A projection file that is corrupted, of another format version, or built for other tokenizers."""


class Projection:
    """Sparse row-stochastic W in ELL form: ``indices`` int32 [V_S, 4] (-1 = empty), ``weights`` float32 [V_S, 4]."""

    def __init__(self, indices, weights, teacher_vocab_size: int, meta: dict[str, Any] | None = None, *,
                 exact_rows=None, alias_rows=None):
        if isinstance(teacher_vocab_size, bool):
            raise TypeError(f"teacher_vocab_size must be an int, got {teacher_vocab_size!r}")
        try:
            teacher_vocab_size = operator.index(teacher_vocab_size)  # an int, a numpy / 0-dim torch integer
        except TypeError:
            raise TypeError(f"teacher_vocab_size must be an int, got {teacher_vocab_size!r}") from None
        if not 0 <= teacher_vocab_size <= _MAX_VOCAB:
            raise ValueError(f"teacher_vocab_size must be in [0, {_MAX_VOCAB}] (ids are int32), got "
                             f"{teacher_vocab_size}")
        indices = _as_tensor(indices)
        if indices.device.type == "meta":
            raise ValueError("W's indices are meta tensors: W needs its data (load or build it outside "
                             "`with torch.device('meta')`, or pass CPU tensors)")
        if indices.is_complex() or indices.dtype == torch.bool or (
                indices.is_floating_point() and not bool((indices == indices.trunc()).all())):
            raise TypeError(f"indices must hold integers, got {indices.dtype}")
        weights = _as_tensor(weights, torch.float32)
        if indices.dim() != 2 or indices.shape[1] != SLOTS or weights.shape != indices.shape:
            raise ValueError(f"indices/weights must both be [V_S, {SLOTS}], got {tuple(indices.shape)} / "
                             f"{tuple(weights.shape)}")
        indices = indices.to(torch.float64 if indices.is_floating_point() else torch.int64)  # uint8..uint64 too
        if indices.numel() and (indices.min() < -1 or indices.max() >= teacher_vocab_size):  # before the int32 cast
            raise ValueError(f"teacher indices must lie in [-1, {teacher_vocab_size})")
        indices = indices.to(torch.int32)
        idx, w = indices.cpu().numpy(), weights.cpu().numpy()  # numpy: ~100x faster than torch's CPU reductions
        if bool(((idx < 0) & (w != 0)).any()):
            raise ValueError("empty slots (index -1) must have weight 0")
        if bool((w < 0).any()) or not bool(np.isfinite(w).all()):
            raise ValueError("weights must be finite and non-negative")
        if (bad := _bad_row_sums(idx, w)) is not None:
            raise ValueError(f"rows must sum to 1 (or be empty): {bad}")
        srt = np.sort(idx, axis=1)
        if (dup := np.flatnonzero(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(1))).size:
            r = int(dup[0])
            raise ValueError(f"{dup.size} rows repeat a teacher id (one slot per id: add the weights; unused slots "
                             f"are -1), e.g. row {r}: {idx[r].tolist()}")
        self.indices = indices
        self.weights = weights
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.meta = dict(meta or {})
        # bool [V_S] on the CPU: rows set by pass 1 (exact match / special role); None when unknown.
        self.exact_rows = None if exact_rows is None else _as_tensor(exact_rows).to("cpu", torch.bool)
        # bool [V_S] on the CPU: rows whose bytes duplicate the id the student tokenizer emits (None: unknown).
        self.alias_rows = None if alias_rows is None else _as_tensor(alias_rows).to("cpu", torch.bool)
        for name in ("exact_rows", "alias_rows"):
            mask = getattr(self, name)
            if mask is not None and mask.shape != (indices.shape[0],):
                raise ValueError(f"{name} must be bool [{indices.shape[0]}], got {tuple(mask.shape)}")
        self._student_table = None  # the student's TokenTable when built from tokenizers (for audit())
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
        if device.type == "meta":  # W's views (csc, common sets) are computed from its values
            raise ValueError("Projection.to('meta'): W needs its data; move it to a real device")
        if device == self.device:
            return self
        key = ("to", str(device))
        if key not in self._cache:
            out = Projection.__new__(Projection)
            out.__dict__.update(self.__dict__)
            out.indices, out.weights, out._cache = self.indices.to(device), self.weights.to(device), {}
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

    def _ell_numpy(self):
        """(indices, weights, used) as CPU numpy arrays; used = slot holds a teacher id with weight > 0.
        The views below are built with numpy: torch's multi-threaded CPU sorts are ~100x slower on a busy host."""
        idx, w = self.indices.cpu().numpy(), self.weights.cpu().numpy()
        return idx, w, (idx >= 0) & (w > 0)

    def csc(self, device=None):
        """Transposed view: (col_ptr int64 [V_T+1], row_idx int32 [nnz], val float32 [nnz]), cached per device.

        Column t's student rows are row_idx[col_ptr[t]:col_ptr[t+1]] (ascending), so q[t] = Σ val·p[row_idx]."""
        device = torch.device(device) if device is not None else self.device
        key = ("csc", str(device))
        if key not in self._cache:
            idx, w, keep = self._ell_numpy()
            rows = np.broadcast_to(np.arange(self.student_vocab_size)[:, None], idx.shape)[keep]
            cols = idx[keep].astype(np.int64)
            order = np.lexsort((rows, cols))
            col_ptr = np.zeros(self.teacher_vocab_size + 1, dtype=np.int64)
            np.cumsum(np.bincount(cols, minlength=self.teacher_vocab_size), out=col_ptr[1:])
            self._cache[key] = (torch.from_numpy(col_ptr).to(device),
                                torch.from_numpy(rows[order].astype(np.int32)).to(device),
                                torch.from_numpy(w[keep][order]).to(device))
        return self._cache[key]

    def covered_columns(self, device=None) -> torch.Tensor:
        """bool [V_T]: teacher columns that at least one student row reaches with weight > 0."""
        device = torch.device(device) if device is not None else self.device
        key = ("covered", str(device))
        if key not in self._cache:
            idx, _, keep = self._ell_numpy()
            cov = np.zeros(self.teacher_vocab_size, dtype=bool)
            cov[idx[keep]] = True
            self._cache[key] = torch.from_numpy(cov).to(device)
        return self._cache[key]

    def common_pairs(self, mode: str = "relaxed"):
        """Common (student, teacher) pairs for GOLD ("strict") and H-KL ("relaxed"), sorted by student id.

        strict: exact matches, i.e. rows that are one-hot with weight 1 and, when ``exact_rows`` is known, set by
        pass 1 (a repeated piece, "000" -> {"0": 1}, is one-hot but no string match). relaxed: each row's top-1
        teacher if its weight >= 0.6. Alias rows (``alias_rows``: a byte-fallback or unreachable duplicate of the
        token the student emits) are never candidates. One student per teacher: highest weight wins, then an exact
        row, then the lowest student id."""
        if mode not in ("strict", "relaxed"):
            raise ValueError(f"mode must be 'strict' or 'relaxed', got {mode!r}")
        key = ("common", mode)
        if key not in self._cache:
            masks = [None if m is None else m.numpy() for m in (self.alias_rows, self.exact_rows)]
            s, t = _common_pairs(*self._ell_numpy()[:2], mode, *masks)
            self._cache[key] = (torch.from_numpy(s), torch.from_numpy(t))
        return self._cache[key]

    # ------------------------------------------------------------------ build

    @classmethod
    def from_tokenizers(cls, student_tok, teacher_tok, student_vocab_size: int | None = None,
                        teacher_vocab_size: int | None = None, *, max_pieces: int = SLOTS, gamma: float = 0.1,
                        reverse_pass: bool = False, canonical_exact: bool = True, overflow: str = "truncate",
                        cache: bool = True, progress: bool = True) -> "Projection":
        """Build W for a student/teacher tokenizer pair (HF fast tokenizers, names or paths).

        ``student_vocab_size`` / ``teacher_vocab_size`` are the logit widths (default ``len(tokenizer)``); rows past
        the student tokenizer stay empty. ``overflow="drop"`` leaves a row empty when the teacher needs more than
        ``max_pieces`` pieces (default: keep the first ``max_pieces``). ``reverse_pass`` adds the release's
        teacher->student pass (METHOD.md §3.2). ``canonical_exact=False`` matches raw token strings in pass 1
        instead of canonical bytes (release default). With ``cache`` the result is stored under
        ``$XTOKEN_CACHE/projections`` keyed by both tokenizers' fingerprints and behaviour hashes (merges,
        normalizer, ...: ``TokenTable.behaviour``), the sizes, options and library version; a cache that cannot be
        written gives a warning, not an error."""
        from .alignment import _check_bool, _check_int
        from .tokenizers import load_tokenizer, token_table

        # Checked by type, not coerced: int(300.7) or bool("no") would build (and cache) a W nobody asked for.
        max_pieces = _check_int(max_pieces, "max_pieces", 1, SLOTS)
        _check_gamma(gamma)
        reverse_pass = _check_bool(reverse_pass, "reverse_pass")
        canonical_exact = _check_bool(canonical_exact, "canonical_exact")
        if overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        sizes = [None if v is None else _check_int(v, name, 0, _MAX_VOCAB) for v, name in
                 ((student_vocab_size, "student_vocab_size"), (teacher_vocab_size, "teacher_vocab_size"))]
        student_tok, teacher_tok = load_tokenizer(student_tok), load_tokenizer(teacher_tok)
        st, tt = token_table(student_tok), token_table(teacher_tok)
        V_S, V_T = (table.size if v is None else v for v, table in zip(sizes, (st, tt)))
        if V_S < st.size or V_T < tt.size:
            raise ValueError(f"vocab sizes ({V_S}, {V_T}) are smaller than the tokenizers ({st.size}, {tt.size})")
        options = {"max_pieces": max_pieces, "gamma": float(gamma), "reverse_pass": reverse_pass,
                   "canonical_exact": canonical_exact, "overflow": overflow}
        meta = _file_meta(st, tt, V_S, V_T, options)
        path = _cache_path(meta) if cache else None
        proj = None
        if path is not None and path.exists():
            try:
                proj = cls.load(path)
            except ProjectionFileError as e:
                warnings.warn(f"rebuilding W: ignoring the cached file ({e})", stacklevel=2)
            else:
                if {k: proj.meta.get(k) for k in meta} != meta:
                    proj = None
        if proj is None:
            proj = _build(st, tt, V_S, V_T, meta, progress=progress)
            if path is not None:
                _store(proj, path)
        proj._student_table = st
        return proj

    # ------------------------------------------------------------------ storage

    def save(self, path) -> None:
        """Write safetensors (indices int32 [V_S, 4], weights float32 [V_S, 4], exact_rows / alias_rows uint8 [V_S]
        if known) with the JSON metadata in the header."""
        from safetensors import SafetensorError

        from .tokenizers import save_tensors

        meta = dict(self.meta)
        meta.update(format_version=FORMAT_VERSION, library_version=_library_version(),
                    student_vocab_size=self.student_vocab_size, teacher_vocab_size=self.teacher_vocab_size)
        meta.pop("checksum", None)
        tensors = {"indices": self.indices.cpu().contiguous(), "weights": self.weights.cpu().contiguous()}
        for name in ("exact_rows", "alias_rows"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).to(torch.uint8)
        meta["checksum"] = _checksum(meta, {k: v.numpy() for k, v in tensors.items()})
        path = check_save_path(path)
        try:
            save_tensors(tensors, path, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        except SafetensorError as e:  # safetensors' own write error (read-only or full disk) is not an OSError
            raise OSError(f"{path}: cannot write it ({e})") from None

    @classmethod
    def load(cls, path, *, expect_student=None, expect_teacher=None) -> "Projection":
        """Read and validate a file written by ``save``. ``expect_student`` / ``expect_teacher`` (tokenizers or names)
        check that the file was built for them: another fingerprint is an error; another behaviour hash, when the
        file records one (files written before it existed do not), a warning. A file without ``alias_rows`` (version
        1) gets them from ``expect_student``. Raises ProjectionFileError on any problem with the file (OSError for a
        missing path or a directory)."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():  # else safetensors' "No such device (os error 19)"
            raise IsADirectoryError(f"{path} is a directory: give the W file's path (a .safetensors file in it)")
        try:
            with safe_open(str(path), framework="np") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises several types for truncated / garbled files
            raise ProjectionFileError(f"{path}: not a readable safetensors file ({e})") from e
        if _META_KEY not in header:
            raise ProjectionFileError(f"{path}: no '{_META_KEY}' metadata; not an xtoken_ext projection file")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as e:
            raise ProjectionFileError(f"{path}: metadata is not valid JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format_version") not in _READABLE_VERSIONS:
            raise ProjectionFileError(f"{path}: unsupported format version "
                                      f"{meta.get('format_version') if isinstance(meta, dict) else None!r} "
                                      f"(this library reads {', '.join(map(str, _READABLE_VERSIONS))})")
        _validate(path, meta, tensors)
        try:
            proj = cls(torch.from_numpy(tensors["indices"]), torch.from_numpy(tensors["weights"]),
                       meta["teacher_vocab_size"], meta, exact_rows=tensors.get("exact_rows"),
                       alias_rows=tensors.get("alias_rows"))
        except ValueError as e:  # index range, sign, finiteness, row sums
            raise ProjectionFileError(f"{path}: {e}") from e
        for side, tok in (("student", expect_student), ("teacher", expect_teacher)):
            if tok is not None:
                from .tokenizers import token_table

                table = token_table(tok)
                fp = table.fingerprint
                if meta.get(f"{side}_fingerprint") != fp:
                    raise ProjectionFileError(f"{path}: built for another {side} tokenizer (file fingerprint "
                                              f"{meta.get(f'{side}_fingerprint')}, given tokenizer {fp})")
                warn_behaviour(meta, side, table, str(path), stacklevel=3)
        if proj.alias_rows is None and expect_student is not None:
            from .tokenizers import token_table

            proj.alias_rows = torch.from_numpy(_alias_rows(token_table(expect_student), proj.student_vocab_size))
        return proj

    # ------------------------------------------------------------------ statistics and audit

    def stats(self) -> "ProjectionStats":
        """Row counts by kind (exact, 1-4 teacher ids, empty) and covered teacher columns."""
        idx, w = self.indices.cpu().numpy(), self.weights.cpu().numpy()
        nnz = ((idx >= 0) & (w > 0)).sum(1)
        top = w.max(1, initial=0.0)
        one_hot = (nnz == 1) & (top == 1.0)
        alias = np.zeros(len(w), bool) if self.alias_rows is None else self.alias_rows.numpy().astype(bool)
        exact = None if self.exact_rows is None else int((one_hot & self.exact_rows.numpy()).sum())
        return ProjectionStats(
            rows=self.student_vocab_size, exact=exact,
            one_piece=None if exact is None else int(one_hot.sum()) - exact,
            one_hot=int(one_hot.sum()), by_support=tuple(int((nnz == k).sum()) for k in range(1, SLOTS + 1)),
            empty=int((nnz == 0).sum()), relaxed=int(((top >= RELAXED_THRESHOLD) & ~alias).sum()),
            covered_columns=int(self.covered_columns("cpu").sum()), teacher_vocab_size=self.teacher_vocab_size,
            build=dict(self.meta.get("build", {})))

    def audit(self, student_tok=None, *, examples: int = 5) -> "AuditReport":
        """Coverage audit (METHOD.md §7, Table 8): per student token class, how many tokens sit in the exact
        (strict, GOLD) common set, and the loss to use: P-KL when numerals fall outside it, else H-KL. Each string
        counts once: alias rows (byte-fallback ``<0x30>`` beside ``0``) are left out of the classes.
        Needs the student tokenizer (``student_tok``) unless W was built with ``from_tokenizers``. ``examples``:
        how many tokens outside the exact set each class lists."""
        from .alignment import _check_int
        from .tokenizers import NORMAL, token_table

        examples = _check_int(examples, "examples", 0, None)

        if student_tok is not None:
            table = token_table(student_tok)
            fp = self.meta.get("student_fingerprint")
            if fp is not None and fp != table.fingerprint:
                raise ValueError(f"student tokenizer fingerprint {table.fingerprint} does not match W's ({fp})")
        elif self._student_table is not None:
            table = self._student_table
        else:
            raise ValueError("audit() needs the student tokenizer: W was not built from tokenizers here "
                             "(pass student_tok=...)")
        if table.size > self.student_vocab_size:  # W has no row for the tokenizer's last ids
            raise ValueError(f"W has {self.student_vocab_size} student rows but the student tokenizer has {table.size} "
                             "ids: W was built for a smaller vocabulary")
        if self.alias_rows is not None:
            alias = self.alias_rows.numpy()
            common = {mode: self.common_pairs(mode)[0].numpy() for mode in ("strict", "relaxed")}
        else:  # W without the mask (built by hand, version 1 file): derive it from the student tokenizer
            alias = _alias_rows(table, self.student_vocab_size)
            idx, w, _ = self._ell_numpy()
            exact = None if self.exact_rows is None else self.exact_rows.numpy()
            common = {mode: _common_pairs(idx, w, mode, alias, exact)[0] for mode in ("strict", "relaxed")}
        strict = np.zeros(self.student_vocab_size, dtype=bool)
        strict[common["strict"]] = True
        relaxed = np.zeros(self.student_vocab_size, dtype=bool)
        relaxed[common["relaxed"]] = True
        match = _AUDIT_PATTERN.fullmatch
        cls_of = np.array([_AUDIT_INDEX[match(b).lastgroup] if r == NORMAL and b and not a else -1
                           for b, r, a in zip(table.token_bytes, table.roles, alias)], dtype=np.int64)
        rows = []
        for c, name in enumerate(_AUDIT_LABELS):
            ids = np.flatnonzero(cls_of == c)
            outside = ids[~strict[ids]]
            rows.append(AuditClass(name, len(ids), int(strict[ids].sum()), int(relaxed[ids].sum()),
                                   [_show(table.token_bytes[i]) for i in outside[:examples]]))
        return AuditReport(rows, *_recommend(rows))

    @staticmethod
    def random(student_vocab_size: int, teacher_vocab_size: int, *, seed: int = 0, empty_rows: float = 0.0,
               max_pieces: int = SLOTS, gamma: float = 0.1) -> "Projection":
        """Synthetic W for tests and benchmarks: each row maps to 1..max_pieces distinct random teacher ids with
        the decay weights γ^i / Σγ^j; a fraction ``empty_rows`` of rows stays empty."""
        from .alignment import _check_int

        student_vocab_size = _check_int(student_vocab_size, "student_vocab_size", 0, _MAX_VOCAB)
        max_pieces = _check_int(max_pieces, "max_pieces", 1, SLOTS)
        teacher_vocab_size = _check_int(teacher_vocab_size, "teacher_vocab_size", max_pieces, _MAX_VOCAB)
        seed = _check_int(seed, "seed", 0, 2**63 - 1)  # torch's generator takes a 64-bit seed
        if isinstance(empty_rows, bool) or not isinstance(empty_rows, numbers.Real) or not 0 <= empty_rows <= 1:
            raise ValueError(f"empty_rows must be a fraction in [0, 1], got {empty_rows!r}")
        _check_gamma(gamma)
        with torch.device("cpu"):  # on the CPU whatever the default device, as the other constructors (.to() moves)
            g = torch.Generator().manual_seed(seed)
            V_S = student_vocab_size
            pieces = torch.randint(1, max_pieces + 1, (V_S,), generator=g)
            cols = torch.randint(0, teacher_vocab_size, (V_S, SLOTS), generator=g)
            for k in range(1, min(SLOTS, teacher_vocab_size)):  # redraw until the slots of a row are distinct (the
                # used ones: max_pieces <= V_T)
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


# ---------------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class ProjectionStats:
    """Row kinds of W. ``exact`` / ``one_piece`` (one-hot rows not from an exact match) are None when W does not
    record which rows pass 1 set; ``by_support[k-1]`` counts rows with k teacher ids."""

    rows: int
    exact: int | None
    one_piece: int | None
    one_hot: int
    by_support: tuple[int, ...]
    empty: int
    relaxed: int
    covered_columns: int
    teacher_vocab_size: int
    build: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        def pct(n):
            return f"{100 * n / max(self.rows, 1):6.2f}%"

        lines = []
        if self.exact is not None:
            lines += [("exact (pass 1)", self.exact, pct(self.exact)),
                      ("1 piece, not exact", self.one_piece, pct(self.one_piece))]
        else:
            lines.append(("one-hot", self.one_hot, pct(self.one_hot)))
        lines += [(f"{k} teacher ids", n, pct(n)) for k, n in enumerate(self.by_support[1:], 2)]
        lines += [("empty", self.empty, pct(self.empty)),
                  ("top-1 >= 0.6 (H-KL candidates)", self.relaxed, pct(self.relaxed)),
                  ("student rows", self.rows, ""),
                  ("covered teacher columns", self.covered_columns,
                   f"{100 * self.covered_columns / max(self.teacher_vocab_size, 1):6.2f}% of {self.teacher_vocab_size}")]
        lines += [(f"build: {k}", v, "") for k, v in sorted(self.build.items())]
        width = max(len(name) for name, _, _ in lines)
        return "\n".join(f"{name:<{width}}  {n:>8}  {p}" for name, n, p in lines)


@dataclasses.dataclass(frozen=True)
class AuditClass:
    """One token class: ``common`` of ``total`` student tokens sit in the exact (strict) common set,
    ``relaxed`` in H-KL's relaxed set; ``outside`` lists a few tokens outside the exact set."""

    name: str
    total: int
    common: int
    relaxed: int
    outside: list[str]

    @property
    def percent(self) -> float:
        return 100.0 * self.common / self.total if self.total else float("nan")


@dataclasses.dataclass(frozen=True)
class AuditReport:
    classes: list[AuditClass]
    recommendation: str  # "pkl" | "hkl"
    reason: str

    def to_dict(self) -> dict:
        return {"classes": [dict(dataclasses.asdict(c), percent=c.percent if c.total else None)  # JSON has no NaN
                            for c in self.classes],
                "recommendation": self.recommendation, "reason": self.reason}

    def __str__(self) -> str:
        head = ("class", "tokens", "exact common", "%", "relaxed", "examples outside the exact set")
        body = [(c.name, str(c.total), str(c.common), "-" if not c.total else f"{c.percent:.1f}", str(c.relaxed),
                 " ".join(c.outside)) for c in self.classes]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head) - 1)]
        fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths)) + "  {}"
        lines = [fmt.format(*head), *(fmt.format(*r) for r in body)]
        return "\n".join(lines) + f"\nrecommendation: {self.recommendation.upper()} ({self.reason})"


# Token classes of the audit, tested in this order on the canonical bytes of each normal student token.
_AUDIT_CLASSES = (
    ("d1", "1-digit", rb"[0-9]"), ("sd1", "␣1-digit", rb" [0-9]"),
    ("d2", "2-digit", rb"[0-9]{2}"), ("sd2", "␣2-digit", rb" [0-9]{2}"),
    ("d3", "3-digit", rb"[0-9]{3}"), ("sd3", "␣3-digit", rb" [0-9]{3}"),
    ("alpha", "alphabetic word", rb" ?[A-Za-z]+"),
    ("punct", "ASCII punctuation", rb" ?[!-/:-@\[-`{-~]+"),
    ("space", "whitespace run", rb"[ \t\n\r\f\v]+"),
    ("multibyte", "non-ASCII / multi-byte", rb"(?s:.*[\x80-\xff].*)"),
    ("other", "other ASCII", rb"(?s:.+)"),
)
_AUDIT_PATTERN = re.compile(b"|".join(b"(?P<%s>%s)" % (g.encode(), p) for g, _, p in _AUDIT_CLASSES))
_AUDIT_INDEX = {g: i for i, (g, _, _) in enumerate(_AUDIT_CLASSES)}
_AUDIT_LABELS = [label for _, label, _ in _AUDIT_CLASSES]
_MULTI_DIGIT = {"2-digit", "␣2-digit", "3-digit", "␣3-digit"}


def _recommend(classes: list[AuditClass]) -> tuple[str, str]:
    """P-KL when the critical class (multi-digit numerals, or single digits for a digit-splitting student) is
    mostly outside the exact common set, else H-KL."""
    crit = [c for c in classes if c.name in _MULTI_DIGIT and c.total]
    if not crit:
        crit = [c for c in classes if c.name in ("1-digit", "␣1-digit") and c.total]
    total, common = sum(c.total for c in crit), sum(c.common for c in crit)
    if not total:
        return "hkl", "the student has no numeral tokens"
    names = "/".join(c.name for c in crit)
    share = common / total
    verdict = "pkl" if share < HKL_MIN_COVERAGE else "hkl"
    side = "outside" if verdict == "pkl" else "inside"
    return verdict, (f"numerals ({names}): {common}/{total} = {100 * share:.1f}% in the exact common set, "
                     f"critical tokens {side} it")


_CONTROL_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(32), 127)} | {10: "\\n", 9: "\\t", 13: "\\r"}


def _show(b: bytes) -> str:
    """A token for a table: quoted, with invalid UTF-8 and control characters as escapes."""
    return "'" + b.decode("utf-8", errors="backslashreplace").translate(_CONTROL_ESCAPES) + "'"


# ---------------------------------------------------------------------- file format


def _library_version() -> str:
    from . import __version__

    return __version__


def _file_meta(st, tt, V_S: int, V_T: int, options: dict) -> dict:
    """W's metadata from the two TokenTables; it is also the cache key (``_cache_path``)."""
    return {"format_version": FORMAT_VERSION, "library_version": _library_version(),
            "student_fingerprint": st.fingerprint, "teacher_fingerprint": tt.fingerprint,
            "student_behaviour": st.behaviour, "teacher_behaviour": tt.behaviour,
            "student_vocab_size": V_S, "teacher_vocab_size": V_T, "options": options}


def warn_behaviour(meta: dict, side: str, table, what: str, stacklevel: int) -> None:
    """Warn where W's metadata records another behaviour hash for its ``side`` tokenizer than ``table``'s (the
    fingerprints already equal). W without one (built by hand, or a file written before the hash existed) passes.
    A warning, not an error: the hash also covers settings the build overrides (add_prefix_space, Metaspace's
    prepend scheme), and a tokenizers release may serialize the same tokenizer otherwise."""
    behaviour = meta.get(f"{side}_behaviour")
    if behaviour is not None and behaviour != table.behaviour:
        warnings.warn(f"{what}: built for a {side} tokenizer with the same vocabulary but another behaviour hash "
                      f"(W {behaviour}, given tokenizer {table.behaviour}): its merges, normalizer, pre-tokenizer or "
                      "added tokens may differ (or only settings the build overrides, such as add_prefix_space); "
                      "rebuild W if the encodings differ", stacklevel=stacklevel + 1)


def _store(proj: Projection, path: Path) -> None:
    """Write a built W to the cache. A cache that cannot be written (read-only, full, a file in the way) costs the
    next run a rebuild, not this one its W: warn and go on."""
    from .tokenizers import temp_sibling

    tmp = temp_sibling(path)  # unique per call: threads (or same-pid hosts) building one W do not collide
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        proj.save(tmp)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    except OSError as e:  # save turns safetensors' own write error into one
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(f"W was built but not cached: cannot write {path} ({e}); set XTOKEN_CACHE to a writable "
                      "folder, or pass cache=False", stacklevel=3)


def _cache_path(meta: dict) -> Path:
    from .tokenizers import cache_dir

    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir("projections", f"{key}.safetensors")


def _checksum(meta: dict, arrays: dict) -> str:
    """sha256 over the metadata (without the checksum) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _validate(path, meta: dict, tensors: dict) -> None:
    def fail(msg):
        raise ProjectionFileError(f"{path}: {msg}")

    for key in ("student_vocab_size", "teacher_vocab_size"):
        if not isinstance(meta.get(key), int) or isinstance(meta[key], bool) or meta[key] < 0:
            fail(f"metadata field {key!r} missing or not a non-negative int")
        if meta[key] > _MAX_VOCAB:  # checked before anything is sized by it
            fail(f"metadata field {key!r} = {meta[key]} exceeds {_MAX_VOCAB} (ids are stored as int32)")
    masks = ("exact_rows", "alias_rows") if meta["format_version"] >= 2 else ("exact_rows",)
    extra = set(tensors) - {"indices", "weights", *masks}
    if extra or not {"indices", "weights"} <= set(tensors):
        fail(f"expected tensors indices, weights[, {', '.join(masks)}], found {sorted(tensors)}")
    if meta.get("checksum") != _checksum({k: v for k, v in meta.items() if k != "checksum"}, tensors):
        fail("checksum mismatch: the file is corrupted or was edited")
    V_S = meta["student_vocab_size"]
    idx, w = tensors["indices"], tensors["weights"]
    for name, t, dtype in (("indices", idx, np.int32), ("weights", w, np.float32)):
        if t.dtype != dtype or t.shape != (V_S, SLOTS):
            fail(f"{name} must be {np.dtype(dtype)} [{V_S}, {SLOTS}], got {t.dtype} {list(t.shape)}")
    for name in masks:
        m = tensors.get(name)
        if m is not None and (m.dtype != np.uint8 or m.shape != (V_S,) or bool((m > 1).any())):
            fail(f"{name} must be uint8 0/1 [{V_S}]")


def _bad_row_sums(idx: np.ndarray, w: np.ndarray) -> str | None:
    """None when every row with a teacher id sums to 1 (±_ROW_SUM_TOL) and every other row to 0, else what fails."""
    sums = w.sum(1, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = np.where((idx >= 0).any(1), np.abs(sums - 1) > _ROW_SUM_TOL, sums != 0)
    if not bad.any():
        return None
    r = int(np.flatnonzero(bad)[0])
    return f"{int(bad.sum())} rows do not sum to 1 (or 0 when empty), e.g. row {r}: {sums[r]:.6g}"


# ---------------------------------------------------------------------- builder


def _build(st, tt, V_S: int, V_T: int, meta: dict, *, progress: bool) -> Projection:
    """Passes 1 and 2 (and the optional reverse pass) over two token tables; see ``from_tokenizers``."""
    from tqdm.auto import tqdm

    from .tokenizers import EOS_MARKER, EOT_MARKER, NORMAL, PAD, UNK

    opts = meta["options"]
    k, gamma = opts["max_pieces"], opts["gamma"]
    if opts["canonical_exact"]:
        s_keys, t_keys = st.token_bytes, tt.token_bytes
    else:
        s_keys, t_keys = _exact_keys(st), _exact_keys(tt)
    s_keys, t_keys = _eos_for_shared_bos(st, s_keys), _eos_for_shared_bos(tt, t_keys)
    # Pass 1: per key the teacher id the teacher emits for that text (never its byte-fallback twin <0x21> of
    # "!"), else the lowest id. Pad / unk / empty keys never match; specials carry role markers, so bos<->bos,
    # eos<->eos, end-of-turn<->end-of-turn, and other specials match same-content specials only.
    matchable_t = (tt.roles != PAD) & (tt.roles != UNK)
    is_rep = _representatives(tt) == np.arange(tt.size)
    order = np.lexsort((-np.arange(tt.size), is_rep))  # representatives last, then descending id: the last wins
    lowest = {t_keys[i]: int(i) for i in order if matchable_t[i] and t_keys[i]}
    # A family without an end-of-turn token ends turns with its EOS (Mistral's </s>), and an instruct config whose
    # EOS is its end-of-turn token has no other EOS: each marker stands in for the other where one is missing.
    for want, have in ((EOT_MARKER, EOS_MARKER), (EOS_MARKER, EOT_MARKER)):
        if want not in lowest and have in lowest:
            lowest[want] = lowest[have]
    matchable_s = (st.roles != PAD) & (st.roles != UNK)
    exact_t = np.array([lowest.get(key, -1) if ok and key else -1 for key, ok in zip(s_keys, matchable_s)],
                       dtype=np.int64)
    exact = exact_t >= 0
    # Pass 2: every normal student token without an exact match.
    todo = np.flatnonzero((st.roles == NORMAL) & ~exact)
    n_fwd = len(todo)
    n_rev = int((tt.roles == NORMAL).sum()) if opts["reverse_pass"] else 0
    bar = tqdm(total=n_fwd + n_rev, desc="building W", unit="tok", disable=not progress or not sys.stderr.isatty())
    with bar:
        s, t, w, counts = _pieces_to_entries(todo, [st.token_bytes[i] for i in todo], tt, k, gamma, opts["overflow"],
                                             bar, forward=True)
        if opts["reverse_pass"]:
            teach = np.flatnonzero(tt.roles == NORMAL)
            rs, rt, rw, rev_counts = _pieces_to_entries(teach, [tt.token_bytes[i] for i in teach], st, k, gamma,
                                                        opts["overflow"], bar, forward=False)
            counts.update(rev_counts)
            keep = (st.roles[rs] == NORMAL) & ~exact[rs]
            s, t, w = np.concatenate([s, rs[keep]]), np.concatenate([t, rt[keep]]), np.concatenate([w, rw[keep]])
    indices, weights = _ell(s, t, w, V_S)
    rows = np.flatnonzero(exact)
    indices[rows] = -1
    weights[rows] = 0
    indices[rows, 0], weights[rows, 0] = exact_t[rows], 1.0
    exact_rows = np.zeros(V_S, dtype=bool)
    exact_rows[rows] = True
    alias_rows = _alias_rows(st, V_S)
    counts["padding rows"] = V_S - st.size
    counts["duplicate bytes, not emitted"] = int(alias_rows.sum())
    meta = dict(meta, build=counts)
    return Projection(indices, weights, V_T, meta, exact_rows=exact_rows, alias_rows=alias_rows)


def _common_pairs(idx: np.ndarray, w: np.ndarray, mode: str, alias: np.ndarray | None,
                  exact: np.ndarray | None):
    """(student ids, teacher ids) of ``Projection.common_pairs`` from ELL arrays and the optional bool [V_S]
    alias / exact row masks, sorted by student id."""
    top_slot = w.argmax(1)  # first slot on ties
    rows = np.arange(len(idx))
    top_w, top_t = w[rows, top_slot], idx[rows, top_slot].astype(np.int64)
    if mode == "strict":
        cand = (top_w == 1.0) & ((idx >= 0).sum(1) == 1)
        if exact is not None:
            cand &= exact
    else:
        cand = (top_w >= RELAXED_THRESHOLD) & (top_t >= 0)
    if alias is not None:
        cand &= ~alias
    s = np.flatnonzero(cand)
    t, ws = top_t[s], top_w[s]
    inexact = np.zeros(len(s), dtype=bool) if exact is None else ~exact[s]
    # Sort by (teacher, -weight, not exact, student); the first of each teacher group wins.
    order = np.lexsort((s, inexact, -ws, t))
    s, t = s[order], t[order]
    first = np.ones(len(t), dtype=bool)
    first[1:] = t[1:] != t[:-1]
    s, t = s[first], t[first]
    by_student = np.argsort(s)
    return s[by_student], t[by_student]


def _representatives(table) -> np.ndarray:
    """int64 [size]: for every id, the id that stands for its canonical bytes. Among normal tokens with equal bytes
    (SentencePiece with byte fallback holds both "0" and <0x30>) it is the one the tokenizer emits for that text
    (literal ``encode(text) == [id]``); if it emits none of them, the lowest id that is not a byte-fallback token.
    Every other id stands for itself."""
    from .tokenizers import NORMAL

    rep = np.arange(table.size)
    groups: dict[bytes, list[int]] = {}
    for i, (b, r) in enumerate(zip(table.token_bytes, table.roles)):
        if r == NORMAL and b:
            groups.setdefault(b, []).append(i)
    dups = [ids for ids in groups.values() if len(ids) > 1]
    if not dups:
        return rep
    fallback = set(_byte_fallback_ids(table))
    for ids, emitted in zip(dups, _retokenize(table, [table.token_bytes[ids[0]] for ids in dups])):
        best = emitted[0] if len(emitted) == 1 and emitted[0] in ids else min(ids, key=lambda i: (i in fallback, i))
        rep[ids] = best
    return rep


def _alias_rows(table, V_S: int) -> np.ndarray:
    """bool [V_S]: student rows that are not their bytes' representative (padding rows past the tokenizer: no)."""
    alias = np.zeros(V_S, dtype=bool)
    alias[:table.size] = _representatives(table) != np.arange(table.size)
    return alias


def _byte_fallback_ids(table) -> list[int]:
    """Ids of SentencePiece byte-fallback tokens <0x00>..<0xFF> (none for other kinds)."""
    if table.kind != "sentencepiece":
        return []
    backend = table.tokenizer.backend_tokenizer
    return [i for i in (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None]


def _eos_for_shared_bos(table, keys: list) -> list:
    """``keys`` with the EOS marker for the table's ``shared_bos`` id (GPT-2's <|endoftext|>). W maps what a model
    predicts, and it never predicts a BOS: as the EOS the id meets the other side's EOS (not its BOS, nor nothing)."""
    from .tokenizers import EOS_MARKER

    if table.shared_bos is None:
        return keys
    keys = list(keys)
    keys[table.shared_bos] = EOS_MARKER
    return keys


def _exact_keys(table) -> list:
    """Raw token strings (``convert_ids_to_tokens``) for normal ids, role markers for specials: the release's
    non-canonical exact match."""
    from .tokenizers import NORMAL

    pieces = table.tokenizer.convert_ids_to_tokens(list(range(table.size)))
    return [p if r == NORMAL else b for p, r, b in zip(pieces, table.roles, table.token_bytes)]


def _check_gamma(gamma) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a real number, got {gamma!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")


def _pieces_to_entries(rows: np.ndarray, datas: list[bytes], target, k: int, gamma: float, overflow: str, bar,
                       *, forward: bool):
    """Re-tokenize each byte string ``datas[j]`` (the token of id ``rows[j]``) with ``target``'s tokenizer and
    turn its first k pieces into weighted (student, teacher, weight) entries; ``forward`` says whether ``rows``
    are student ids (else teacher ids, for the reverse pass). A row whose pieces include a special token of the
    target, or that cannot be encoded, gets no entry."""
    from .tokenizers import NORMAL

    pieces = _retokenize(target, datas, bar)
    total = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    kept = np.minimum(total, k)
    flat = np.fromiter(chain.from_iterable(p[:k] for p in pieces), dtype=np.int64, count=int(kept.sum()))
    owner = np.repeat(np.arange(len(pieces)), kept)
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(kept) - kept, kept)
    bad = np.zeros(len(pieces), dtype=bool)
    bad[owner[target.roles[flat] != NORMAL]] = True
    unmappable = bad | (total == 0)
    dropped = (total > k) & ~unmappable if overflow == "drop" else np.zeros(len(pieces), dtype=bool)
    ok = ~(unmappable | dropped)[owner]
    decay = gamma ** np.arange(k, dtype=np.float64)
    norm = np.cumsum(decay)  # norm[n-1] = Σ_{j<n} γ^j
    w = decay[slot] / norm[kept[owner] - 1]
    other = rows[owner]
    s, t = (other, flat) if forward else (flat, other)
    prefix = "" if forward else "reverse: "
    counts = {f"{prefix}re-tokenized": len(pieces), f"{prefix}more than {k} pieces": int((total > k).sum()),
              f"{prefix}unmappable": int(unmappable.sum())}
    if overflow == "drop":
        counts[f"{prefix}dropped (> {k} pieces)"] = int(dropped.sum())
    return s[ok], t[ok], w[ok], counts


def _retokenize(target, datas: list[bytes], bar=None) -> list[list[int]]:
    """Token ids of each byte string under ``target`` (a TokenTable), encoded literally (no special tokens, no
    prefix space). Valid UTF-8 goes through the tokenizer's batch encode; the few strings that are not (pieces of
    a multi-byte character) are encoded at the byte level."""
    texts, where, raw = [], [], []
    for j, d in enumerate(datas):
        try:
            texts.append(d.decode("utf-8"))
            where.append(j)
        except UnicodeDecodeError:
            raw.append(j)
    out: list[list[int]] = [[] for _ in datas]
    backend = _literal_encoder(target)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    for lo in range(0, len(texts), _ENCODE_CHUNK):
        for j, e in zip(where[lo:lo + _ENCODE_CHUNK], encode(texts[lo:lo + _ENCODE_CHUNK], add_special_tokens=False)):
            out[j] = e.ids
        if bar is not None:
            bar.update(min(_ENCODE_CHUNK, len(texts) - lo))
    for j in raw:
        out[j] = _encode_bytes(backend, target, datas[j])
    if bar is not None:
        bar.update(len(raw))
    return out


def _encode_bytes(backend, target, data: bytes) -> list[int]:
    """Ids for a byte string that is not valid UTF-8: byte-level BPE runs its model on the mapped bytes;
    SentencePiece with byte fallback encodes the valid parts as text and the stray bytes as <0xHH>. Other
    tokenizers cannot represent it ([])."""
    if target.kind == "byte_level":
        from .tokenizers import _BYTE_DECODER

        to_char = {b: c for c, b in _BYTE_DECODER.items()}
        return [t.id for t in backend.model.tokenize("".join(to_char[b] for b in data))]
    if target.kind != "sentencepiece":
        return []
    ids: list[int] = []
    # surrogateescape turns each invalid byte into one lone surrogate U+DC80..U+DCFF.
    for part in re.split("([\udc80-\udcff])", data.decode("utf-8", errors="surrogateescape")):
        if len(part) == 1 and "\udc80" <= part <= "\udcff":
            tid = backend.token_to_id(f"<0x{ord(part) - 0xDC00:02X}>")
            if tid is None:
                return []
            ids.append(tid)
        elif part:
            ids += backend.encode(part, add_special_tokens=False).ids
    return ids


def _literal_encoder(table):
    """A private copy of ``table``'s backend that encodes text literally: special-token strings are plain text,
    and no prefix space is added (SentencePiece Metaspace / Prepend, ByteLevel add_prefix_space), so a token
    "the" stays "the" and " the" stays " the". A copy, never the caller's backend set and restored: another thread
    may be tokenizing with it meanwhile. Made once per table (copying Llama-3's backend takes ~1 s)."""
    if table._literal_backend is None:
        from tokenizers import Tokenizer, normalizers, pre_tokenizers

        backend = Tokenizer.from_str(table.tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = True
        for pre in _components(backend.pre_tokenizer):
            if isinstance(pre, pre_tokenizers.Metaspace):
                pre.prepend_scheme = "never"
            elif isinstance(pre, pre_tokenizers.ByteLevel):
                pre.add_prefix_space = False
        parts = list(_components(backend.normalizer))
        plain = [n for n in parts if not isinstance(n, normalizers.Prepend)]
        if len(plain) != len(parts):
            backend.normalizer = normalizers.Sequence(plain)
        table._literal_backend = backend
    return table._literal_backend


def _components(x):
    """The members of a normalizers/pre_tokenizers Sequence (recursively), or [x]."""
    if x is None:
        return
    if type(x).__name__ != "Sequence":
        yield x
        return
    i = 0
    while True:
        try:
            part = x[i]
        except IndexError:
            return
        yield from _components(part)
        i += 1


def _ell(s: np.ndarray, t: np.ndarray, w: np.ndarray, V_S: int):
    """Entries (student, teacher, weight) -> ELL [V_S, 4]: repeated (s, t) accumulate, each row keeps its 4
    largest weights (ties: lower teacher id first) and is normalized to 1."""
    indices = np.full((V_S, SLOTS), -1, dtype=np.int32)
    weights = np.zeros((V_S, SLOTS), dtype=np.float32)
    if not len(s):
        return indices, weights
    order = np.lexsort((t, s))
    s, t, w = s[order], t[order], w[order]
    new = np.ones(len(s), dtype=bool)
    new[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
    w = np.add.reduceat(w, np.flatnonzero(new))
    s, t = s[new], t[new]
    order = np.lexsort((t, -w, s))
    s, t, w = s[order], t[order], w[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(first)
    rank = np.arange(len(s)) - np.repeat(starts, np.diff(np.append(starts, len(s))))
    keep = rank < SLOTS
    s, t, w, rank = s[keep], t[keep], w[keep], rank[keep]
    total = np.bincount(s, weights=w, minlength=V_S)
    indices[s, rank] = t
    weights[s, rank] = w / total[s]
    return indices, weights
