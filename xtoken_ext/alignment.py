"""Python face of the native span aligner (``xtoken_ext._C``) and the ``Alignment`` batch object the losses consume.

A chunk is a pair of token ranges (s_start, s_end, t_start, t_end), end exclusive, whose texts are equal; a gap
has one empty side. ``correct[k]`` = both sides non-empty and equal concatenated canonical bytes.

Methods (DESIGN.md §2, METHOD.md §4):
- ``"offsets"``: O(n+m) merge closing a chunk wherever both sides' byte ends coincide (``align(text)``: on the text
  byte offsets of both encodings, correct only where the chunk's canonical bytes are equal too, since a normalizing
  tokenizer (Qwen3's NFC) maps other bytes to the same offsets; ``align_ids``: on cumulative canonical byte
  lengths).
- ``"dp"``: the X-Token DP over canonical token bytes with unique-3-gram anchors, a band around the byte-offset
  guide path for segments larger than ``full_cells`` cells, and post-processing of mismatched runs.
- ``"auto"`` (default): for text, the offset merge (both encodings cover identical text spans); for ids, the merge
  where both canonical byte streams agree and the DP only over the windows where they differ.

Batches: ``align_batch(texts)`` and ``align_ids_batch(student_ids, teacher_ids)`` (pre-tokenized or generated ids,
the on-policy path) align every pair in C++ threads with the GIL released and return one ``Alignment``; the result
does not depend on the thread count.

Special tokens: in the id path a special stands for its literal text (``<|im_start|>``), so the streams stay in sync
where the other tokenizer spells the same markup as text pieces, but a special is never equal to text: a chunk that
holds one is correct only as a 1:1 pair of specials with the same role (BOS, end of sequence, end of turn -- a
family without an end-of-turn token ends turns with its EOS, one without an EOS ends sequences with its end-of-turn
token) or the same literal text. The offset path
(``align``/``align_batch``) applies the same rule, so both paths agree. Padding tokens are zero-width gaps.

Inputs the library rejects: non-str text, bytes that are not UTF-8, empty text, lone surrogates, ids out of
range, non-integer or non-1-D id arrays, parameters of the wrong type or out of range. Empty *id* sequences are
allowed (they align to zero chunks, or to gaps when only one side is empty).

Aligners and Alignments pickle (DataLoader workers with fork, spawn or forkserver): the native vocabularies are
rebuilt in the receiving process from the token tables.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import numpy as np
import torch

from . import _C
from .tokenizers import BOS, EOS, EOT, NORMAL, PAD, UNK, encode_batch_with_offsets, load_tokenizer, token_table

__all__ = ["Aligner", "Alignment"]

METHODS = ("auto", "offsets", "dp")
MAX_PARAM = (1 << 31) - 1  # csrc/align.hpp kMaxParam: band/lookahead/gram beyond it could overflow index math
_INT64_MAX = (1 << 63) - 1
_VOCABS: dict[tuple[str, int | None, tuple], _C.Vocab] = {}
# Special bits of csrc/align.hpp (enum Special): every special has _SPECIAL; role bits pair specials across families.
_SPECIAL, _ROLE_BITS = 1, {BOS: 2, EOS: 4, EOT: 8, UNK: 16}


def _vocab(table) -> _C.Vocab:
    """Native vocabulary of a token table: text tokens keep their canonical bytes; a special gets its literal text
    and its special bits (PAD stays zero-width). A family without an end-of-turn token ends turns with its EOS, so
    its EOS also carries the end-of-turn bit; one without an EOS (an instruct config whose eos_token is its
    end-of-turn token, Qwen3's <|im_end|>) ends sequences with its end-of-turn token, which carries the EOS bit (W's
    stand-in rule). The table's ``shared_bos`` id (GPT-2's <|endoftext|>) carries both
    roles: it starts and ends sequences."""
    shared = table.shared_bos
    roles = np.asarray(table.roles)
    ids = np.flatnonzero(roles != NORMAL)
    pieces = table.tokenizer.convert_ids_to_tokens(ids.tolist())
    # the fingerprint's roles give a shared id the BOS role alone, and its role markers stand for the specials'
    # texts ("<s>" and "<|begin_of_text|>" are one BOS marker): the literal texts are part of the key
    key = (table.fingerprint, shared, tuple(pieces))
    v = _VOCABS.get(key)
    if v is None:
        eos_ends_turns = not (roles == EOT).any()
        eot_ends_sequences = shared is None and not (roles == EOS).any()
        token_bytes, special = list(table.token_bytes), np.zeros(len(roles), np.uint8)
        for i, piece in zip(ids.tolist(), pieces):
            role = int(roles[i])
            bits = _SPECIAL | _ROLE_BITS.get(role, 0)
            if i == shared:
                bits, role = bits | _ROLE_BITS[EOS], EOS
            special[i] = bits | (_ROLE_BITS[EOT] if role == EOS and eos_ends_turns else 0) | \
                (_ROLE_BITS[EOS] if role == EOT and eot_ends_sequences else 0)
            if role != PAD:
                token_bytes[i] = (piece or "").encode("utf-8")
        v = _VOCABS[key] = _C.Vocab(token_bytes, special)
    return v


def _check_int(value, name: str, lo: int, hi: int | None = MAX_PARAM) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return int(value)


def _check_threads(threads) -> int:
    """``threads``: None or an int >= 0 (0 = all cores; more than the cores are capped in C++) -> C++'s int64."""
    return 0 if threads is None else min(_check_int(threads, "threads", 0, None), _INT64_MAX)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):  # 2 & flags would be 0: a truthy int acting as False
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _prefix_mode(tok, table) -> int:
    """SentencePiece-style tokenizers turn "a" into "▁a": their canonical stream starts with a space the text does
    not have. 0: no such space; 1: prepended to every text (" a" -> "▁▁a"); 2: prepended unless the text starts
    with a space (HF Metaspace prepend_scheme="first"). The id-based aligner drops that space (csrc/align.hpp)."""
    def stream(text):
        return b"".join(table.token_bytes[i] for i in tok(text, add_special_tokens=False)["input_ids"])

    if stream("a") != b" a":
        return 0
    return 1 if stream(" a") == b"  a" else 2


def _check_text(text, where: str = "text") -> str:
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not valid UTF-8: {e}") from None
    if not isinstance(text, str):
        raise TypeError(f"{where} must be str (or UTF-8 bytes), got {type(text).__name__}")
    if not text:
        raise ValueError(f"{where} is empty; there is nothing to align")
    return _check_utf8(text, where)


def _check_utf8(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} cannot be encoded as UTF-8 (lone surrogate?): {e}") from None
    return text


def _check_int_dtype(a: np.ndarray, what: str) -> None:
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:  # would turn negative as int64
        k = tuple(int(i) for i in np.unravel_index(int(np.argmax(a > np.iinfo(np.int64).max)), a.shape))
        row = "".join(f"[{i}]" for i in k[:-1])  # 2-D: the row, as in "student_ids[1]"
        raise IndexError(f"{what}{row}: id {int(a[k])} at position {k[-1]} is out of range")


def _as_ids(x, side: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1:
        raise ValueError(f"{side} ids must be 1-D, got shape {a.shape}")
    _check_int_dtype(a, f"{side} ids")
    return np.ascontiguousarray(a, dtype=np.int64)


_INT64 = np.dtype(np.int64)


def _ids_arg(x, side: str):
    """Ids of one side of ``align_ids`` as C++ takes them: a plain list (tokenizer output) or a 1-D int64 array
    goes as is (C++ copies and checks it, naming the side in errors); anything else through ``_as_ids``."""
    if type(x) is list or (type(x) is np.ndarray and x.dtype is _INT64 and x.ndim == 1):
        return x
    return _as_ids(x, side)


def _id_rows(x, lengths, mask, side: str) -> list[np.ndarray]:
    """One side of ``align_ids_batch`` -> a list of int64 id rows that this call owns (copies: the ids stored in
    the Alignment are the ones aligned, whatever the caller does to its arrays meanwhile)."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{side}_ids must be a list of id sequences or a 2-D [B, T] array, got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        if lengths is None and mask is None:  # a list of rows (possibly ragged)
            return [_as_ids(r, f"{side}[{b}]").copy() for b, r in enumerate(x)]
        try:  # padded rows with their lengths / mask (a tokenizer's padding=True output): rectangular
            x = np.asarray(x)
        except ValueError:
            raise ValueError(f"{side}_lengths / {side}_attention_mask need rectangular {side}_ids [B, T], got "
                             "rows of different lengths") from None
    if x.ndim != 2:
        raise ValueError(f"{side}_ids as an array must be 2-D [B, T], got shape {x.shape}")
    if x.size:
        _check_int_dtype(x, f"{side}_ids")
    a = np.array(x, dtype=np.int64)  # our copy
    B, T = a.shape
    if lengths is not None and mask is not None:
        raise ValueError(f"give {side}_lengths or {side}_attention_mask, not both")
    if lengths is not None:  # right padding: row b is a[b, :lengths[b]]
        n = np.asarray(lengths.detach().cpu() if isinstance(lengths, torch.Tensor) else lengths)
        if n.shape != (B,) or (n.size and not np.issubdtype(n.dtype, np.integer)):
            raise ValueError(f"{side}_lengths must be {B} integers, got shape {n.shape} dtype {n.dtype}")
        if ((n < 0) | (n > T)).any():
            raise ValueError(f"{side}_lengths must lie in [0, {T}], got {n.tolist()}")
        return [a[b, :int(n[b])] for b in range(B)]
    if mask is not None:  # any padding (left for generated ids): row b is a[b][mask[b] != 0]
        m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        if m.shape != (B, T):
            raise ValueError(f"{side}_attention_mask {m.shape} must match {side}_ids {(B, T)}")
        return [a[b][m[b] != 0] for b in range(B)]
    return list(a)


class Aligner:
    """Aligns the student's and the teacher's tokenizations of the same text.

    ``band``/``full_cells`` bound the DP (segments with n*m > full_cells use a band of half-width ``band`` tokens
    around the byte-offset guide path), ``lookahead``/``gram`` the auto resync (tokens searched per side, bytes that
    must agree). ``include_mismatched`` makes ``align_batch`` count incorrect non-gap chunks as valid (the
    authors' release behaviour)."""

    def __init__(self, student_tok, teacher_tok, method: str = "auto", include_mismatched: bool = False, *,
                 band: int = 64, full_cells: int = 1 << 16, lookahead: int = 64, gram: int = 16):
        self._params = {"band": _check_int(band, "band", 0),
                        "full_cells": _check_int(full_cells, "full_cells", 0, _INT64_MAX),
                        "lookahead": _check_int(lookahead, "lookahead", 1), "gram": _check_int(gram, "gram", 1)}
        self.method = method
        self.include_mismatched = _check_bool(include_mismatched, "include_mismatched")
        self.student_tok = load_tokenizer(student_tok)
        self.teacher_tok = load_tokenizer(teacher_tok)
        self.student_table = token_table(self.student_tok)
        self.teacher_table = token_table(self.teacher_tok)
        self._prefix = (_prefix_mode(self.student_tok, self.student_table),
                        _prefix_mode(self.teacher_tok, self.teacher_table))
        self._bind()

    @property
    def method(self) -> str:
        """"auto" | "offsets" | "dp"; assigning it rebinds the native aligner."""
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        if value not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {value!r}")
        self._method = value
        if "_native" in self.__dict__:
            self._bind()

    def _bind(self):
        """The native vocabularies and the id aligner with this Aligner's method, prefix modes and parameters."""
        self._vs, self._vt = _vocab(self.student_table), _vocab(self.teacher_table)
        self._native = _C.IdAligner(self._vs, self._vt, self.method, *self._prefix, **self._params)

    # -- pickling: the native vocabularies are process-local caches, rebuilt from the token tables ---------------
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_vs"], state["_vt"], state["_native"]
        return state

    def __setstate__(self, state):
        if "method" in state:  # pickled before `method` became a property
            state = {**state, "_method": state["method"]}
            del state["method"]
        self.__dict__.update(state)
        self._bind()

    # -- one sequence pair ---------------------------------------------------------------------------------------
    def align(self, text, return_correct: bool = False):
        """Chunks int64 [K, 4] of ``text`` tokenized by both sides (default special tokens); with
        ``return_correct=True`` also ``correct`` bool [K]."""
        text = _check_text(text)
        (s,), (t,) = (encode_batch_with_offsets(tok, [text]) for tok in (self.student_tok, self.teacher_tok))
        chunks, correct, _ = self._align_encoded([s], [t], threads=1)
        return (chunks, correct) if return_correct else chunks

    def align_ids(self, student_ids, teacher_ids, return_correct: bool = False):
        """Chunks int64 [K, 4] for pre-tokenized ids (lists, numpy or torch), aligned over canonical bytes."""
        s, t = _ids_arg(student_ids, "student"), _ids_arg(teacher_ids, "teacher")
        with self._grown_hint():
            chunks, correct = self._native.align(s, t)
        return (chunks, correct) if return_correct else chunks

    @contextlib.contextmanager
    def _grown_hint(self):
        """An out-of-range id from a tokenizer that grew (``add_tokens``) after this Aligner was made says so."""
        try:
            yield
        except IndexError as e:
            grown = [f"the {side} tokenizer has {len(tok)} ids now, {table.size} when this Aligner was made"
                     for side, tok, table in (("student", self.student_tok, self.student_table),
                                              ("teacher", self.teacher_tok, self.teacher_table))
                     if len(tok) > table.size]
            if not grown:
                raise
            raise IndexError(f"{e} ({'; '.join(grown)}: make a new Aligner after adding tokens)") from e

    # -- batches -------------------------------------------------------------------------------------------------
    def align_ids_batch(self, student_ids, teacher_ids, *, student_lengths=None, teacher_lengths=None,
                        student_attention_mask=None, teacher_attention_mask=None,
                        threads: int | None = None) -> Alignment:
        """Align B pre-tokenized pairs in C++ threads (GIL released; ``threads=None``: all cores, the result does
        not depend on it) -> one ``Alignment``, equal to aligning each pair with ``align_ids`` and batching.

        Each side: a list of id sequences (lists, numpy or torch; ragged, empty allowed) or a 2-D integer array
        [B, T] with optionally ``*_lengths`` [B] (row b = its first lengths[b] columns) or ``*_attention_mask``
        [B, T] (row b = its columns where the mask is nonzero: left or right padding, e.g. ``generate`` output).
        The Alignment holds the rows compacted and right-padded (its ``student_ids``/``teacher_ids`` and attention
        masks): run the models on those."""
        threads = _check_threads(threads)
        s = _id_rows(student_ids, student_lengths, student_attention_mask, "student")
        t = _id_rows(teacher_ids, teacher_lengths, teacher_attention_mask, "teacher")
        if len(s) != len(t):
            raise ValueError(f"student and teacher batch sizes differ ({len(s)} vs {len(t)})")
        with self._grown_hint():
            chunks, correct, offsets = self._native.align_batch(s, t, threads)
        return Alignment._from_flat(chunks, correct, offsets, s, t, include_mismatched=self.include_mismatched)

    def align_batch(self, texts, threads: int | None = None, max_length: int | None = None) -> Alignment:
        """Encode ``texts`` with both tokenizers (truncated to ``max_length`` tokens per side), align every pair in
        C++ threads (``threads=None``: all cores; the result does not depend on it) and build an ``Alignment``."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("align_batch takes a list of texts; use align() for one text")
        texts = [_check_text(x, f"texts[{i}]") for i, x in enumerate(texts)]
        if max_length is not None:
            _check_int(max_length, "max_length", 1, None)
        threads = _check_threads(threads)
        if not texts:
            return Alignment._from_flat(np.zeros((0, 4), np.int64), np.zeros(0, bool), np.zeros(1, np.int64), [], [])
        cut = slice(None, max_length)
        enc_s = [tuple(a[cut] for a in e) for e in encode_batch_with_offsets(self.student_tok, texts)]
        enc_t = [tuple(a[cut] for a in e) for e in encode_batch_with_offsets(self.teacher_tok, texts)]
        chunks, correct, offsets = self._align_encoded(enc_s, enc_t, threads=threads)
        return Alignment._from_flat(chunks, correct, offsets, [e[0] for e in enc_s], [e[0] for e in enc_t],
                                    include_mismatched=self.include_mismatched)

    def _align_encoded(self, enc_s, enc_t, threads: int):
        with self._grown_hint():
            if self.method == "dp":
                return _C.align_ids_batch(self._vs, self._vt, [e[0] for e in enc_s], [e[0] for e in enc_t], "dp",
                                          *self._prefix, threads=threads, **self._params)
            return self._merge_offsets([e[1] for e in enc_s], [e[2] for e in enc_s], [e[1] for e in enc_t],
                                       [e[2] for e in enc_t], [e[0] for e in enc_s], [e[0] for e in enc_t], threads)

    def _merge_offsets(self, s_starts, s_ends, t_starts, t_ends, s_ids, t_ids, threads: int):
        """The offset merge of B pairs of byte offsets with this pair's correct flags (equal canonical bytes, the
        prefix modes, the specials' rule): (chunks, correct, offsets) as ``_C.merge_offsets_batch``."""
        return _C.merge_offsets_batch(s_starts, s_ends, t_starts, t_ends, threads=threads, student_vocab=self._vs,
                                      teacher_vocab=self._vt, student_ids=s_ids, teacher_ids=t_ids,
                                      student_prefix=self._prefix[0], teacher_prefix=self._prefix[1])


def _int_array(x, what: str) -> np.ndarray:
    """int64 copy of integer input (lists, numpy, torch); floats, bools and strings are refused, not truncated."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if a.size:
        _check_int_dtype(a, what)
    return a.astype(np.int64)


def _flag_array(x, what: str) -> np.ndarray:
    """Flags [K] as bools: bools, or integers 0 / 1."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x).reshape(-1)
    if a.size and a.dtype != np.bool_ and not (np.issubdtype(a.dtype, np.integer) and ((a == 0) | (a == 1)).all()):
        raise TypeError(f"{what} must be bools (or 0 / 1), got {a.dtype} {a[:4].tolist()}")
    return a.astype(bool)


def _pad(rows: list[np.ndarray], width: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


_BOOL_FIELDS = ("chunk_valid", "chunk_correct", "student_attention_mask", "teacher_attention_mask")


@dataclass(repr=False, eq=False)
class Alignment:
    """Chunk alignment of B sequence pairs, as CPU torch tensors (``.to(device)`` moves them). ``repr`` gives the
    batch size, rows per side and chunk counts, never the tensors; ``==`` is identity (field-wise equality of
    tensors has no single truth value: compare fields with ``torch.equal``).

    Chunk k of pair b is a pair of token ranges ``chunks[b, k] = (s_start, s_end, t_start, t_end)`` (end
    exclusive); the chunks of a pair tile both sides in order, and a gap has one empty side. Logit row p predicts
    token p+1, so a chunk's tokens [s, e) are predicted by rows [max(s-1, 0), e-1).

    Fields (B pairs, T_S / T_T padded widths, K_max = most chunks of any pair; padding positions hold -1/False/0):

    - ``student_chunk_ids`` int64 [B, T_S]: chunk id of student token p+1 at row p; -1 when p+1 is padding, past
      the end or in a gap. ``teacher_chunk_ids`` int64 [B, T_T]: the same for the teacher.
    - ``chunk_valid`` bool [B, K_max]: the chunk enters the losses: not a gap, correct (or ``include_mismatched``),
      and >= 1 predictive row on both sides; the Collator also clears chunks outside the completion or holding
      chat markup.
    - ``chunk_correct`` bool [B, K_max]: both sides non-empty with equal canonical bytes (specials: the same role
      or literal text, 1:1).
    - ``num_chunks`` int64 [B]: chunks of each pair (entries k < num_chunks[b] are real).
    - ``student_lengths`` / ``teacher_lengths`` int64 [B]: tokens of each sequence.
    - ``chunks`` int64 [B, K_max, 4]: the token ranges above, -1 padded.
    - ``student_ids`` / ``teacher_ids`` int64 [B, T_S] / [B, T_T] or None: the aligned token ids, right-padded
      with 0 (the models' inputs for these rows).
    - ``student_attention_mask`` / ``teacher_attention_mask`` bool [B, T_S] / [B, T_T] or None: True at real
      tokens.
    """

    student_chunk_ids: torch.Tensor
    teacher_chunk_ids: torch.Tensor
    chunk_valid: torch.Tensor
    chunk_correct: torch.Tensor
    num_chunks: torch.Tensor
    student_lengths: torch.Tensor
    teacher_lengths: torch.Tensor
    chunks: torch.Tensor
    student_ids: torch.Tensor | None = None
    teacher_ids: torch.Tensor | None = None
    student_attention_mask: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None

    def __repr__(self) -> str:
        """``Alignment(B=2, T_S=14, T_T=17, chunks=23: valid=18, excluded=3, gaps=2)``: chunks = sum(num_chunks);
        gaps have an empty side; excluded = non-gap chunks that are not valid (incorrect, no predictive row, or
        masked out)."""
        head = f"Alignment(B={self.batch_size}, T_S={self.student_chunk_ids.shape[1]}, " \
               f"T_T={self.teacher_chunk_ids.shape[1]}"
        dev = self.chunks.device
        where = "" if dev.type == "cpu" else f", device={dev}"
        if dev.type == "meta":  # shapes only: no values to count
            return f"{head}, K_max={self.chunks.shape[1]}{where})"
        real = torch.arange(self.chunks.shape[1], device=dev) < self.num_chunks[:, None]
        c = self.chunks
        gaps = int((real & ((c[..., 0] == c[..., 1]) | (c[..., 2] == c[..., 3]))).sum())
        total, valid = int(self.num_chunks.sum()), int(self.chunk_valid.sum())
        return f"{head}, chunks={total}: valid={valid}, excluded={total - gaps - valid}, gaps={gaps}{where})"

    def __post_init__(self):
        """A hand-built Alignment is checked where the losses would trust it: every valid chunk has non-empty,
        in-range token ranges on both sides, and the valid chunks of a sequence are in order without overlap (the
        kernels assume disjoint rows), on CPU tensors only (``to(device)`` copies a checked object); the types and
        dtypes on any device (an int64 chunk_valid would index the chunks instead of masking them)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"Alignment.{f.name} must be a torch tensor, got {type(v).__name__}")
            flag = f.name in _BOOL_FIELDS
            if (v.dtype == torch.bool) != flag or v.is_floating_point() or v.is_complex():
                kind = "a bool" if flag else "an integer"
                raise TypeError(f"Alignment.{f.name} must be {kind} tensor, got {v.dtype}")
        c = self.chunks
        if c.device.type != "cpu":
            return
        B = self.num_chunks.shape[0]
        if c.dim() != 3 or c.shape[0] != B or c.shape[2] != 4 or self.chunk_valid.shape != c.shape[:2]:
            raise ValueError(f"chunks must be [B, K, 4] with chunk_valid [B, K]; got {tuple(c.shape)} and "
                             f"{tuple(self.chunk_valid.shape)} for B={B}")
        # numpy views of the CPU tensors: these elementwise checks cost ~100x less than as torch ops
        b, k = self.chunk_valid.numpy().nonzero()
        v = c.numpy()[b, k]
        bad = (v[:, 0] < 0) | (v[:, 0] >= v[:, 1]) | (v[:, 1] > self.student_lengths.numpy()[b]) \
            | (v[:, 2] < 0) | (v[:, 2] >= v[:, 3]) | (v[:, 3] > self.teacher_lengths.numpy()[b])
        same = b[1:] == b[:-1]
        bad[1:] |= same & ((v[1:, 0] < v[:-1, 1]) | (v[1:, 2] < v[:-1, 3]))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"sequence {int(b[i])}, chunk {int(k[i])}: valid chunk {v[i].tolist()} is negative, "
                             "empty, out of range or overlaps the previous valid chunk")

    @property
    def batch_size(self) -> int:
        """B, the number of sequence pairs."""
        return self.num_chunks.shape[0]

    def row_spans(self) -> torch.Tensor:
        """int64 [N, 5] (b, s_lo, s_hi, t_lo, t_hi) per valid chunk in (b, k) order: the predictive logit rows
        (end exclusive) of the chunk's tokens [s, e) are [max(s-1, 0), e-1) on each side."""
        b, k = self.chunk_valid.nonzero(as_tuple=True)
        c = self.chunks[b, k]
        return torch.stack([b, (c[:, 0] - 1).clamp_min(0), c[:, 1] - 1, (c[:, 2] - 1).clamp_min(0), c[:, 3] - 1], 1)

    def to(self, device) -> Alignment:
        return Alignment(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device)
                            for f in fields(self)})

    @staticmethod
    def from_chunks(chunks_list, correct_list, student_lengths, teacher_lengths, T_S=None, T_T=None,
                    include_mismatched=False, student_ids=None, teacher_ids=None) -> Alignment:
        """Build from per-sequence chunks ([K_b, 4] arrays that partition [0, length) on each side, in order) and
        correct flags ([K_b] bools). Optional ``student_ids``/``teacher_ids``: per-sequence id lists to keep."""
        if not (len(chunks_list) == len(correct_list) == len(student_lengths) == len(teacher_lengths)):
            raise ValueError("chunks_list, correct_list and the length lists must have the same batch size")
        arrs = [_int_array(c, f"chunks_list[{b}]").reshape(-1, 4) for b, c in enumerate(chunks_list)]
        oks = [_flag_array(c, f"correct_list[{b}]") for b, c in enumerate(correct_list)]
        for b, (c, o) in enumerate(zip(arrs, oks)):
            if len(c) != len(o):
                raise ValueError(f"sequence {b}: {len(c)} chunks but {len(o)} correct flags")
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in arrs])]).astype(np.int64)
        chunks = np.concatenate(arrs) if arrs else np.zeros((0, 4), np.int64)
        correct = np.concatenate(oks) if oks else np.zeros(0, bool)
        sl, tl = _int_array(student_lengths, "student_lengths"), _int_array(teacher_lengths, "teacher_lengths")
        for lengths, name in ((sl, "student_lengths"), (tl, "teacher_lengths")):
            if (lengths < 0).any():
                raise ValueError(f"{name} must be >= 0, got {int(lengths.min())}")
        T_S, T_T = (None if T is None else _check_int(T, name, 0, None) for T, name in ((T_S, "T_S"), (T_T, "T_T")))
        s_ids = [np.zeros(n, np.int64) for n in sl] if student_ids is None else [_as_ids(x, "student")
                                                                                  for x in student_ids]
        t_ids = [np.zeros(n, np.int64) for n in tl] if teacher_ids is None else [_as_ids(x, "teacher")
                                                                                  for x in teacher_ids]
        if [len(x) for x in s_ids] != sl.tolist() or [len(x) for x in t_ids] != tl.tolist():
            raise ValueError("student_ids/teacher_ids lengths must equal student_lengths/teacher_lengths")
        out = Alignment._from_flat(chunks, correct, offsets, s_ids, t_ids, include_mismatched, T_S, T_T)
        if student_ids is None:
            out.student_ids = out.student_attention_mask = None
        if teacher_ids is None:
            out.teacher_ids = out.teacher_attention_mask = None
        return out

    @staticmethod
    def _from_flat(chunks, correct, offsets, s_ids, t_ids, include_mismatched=False, T_S=None, T_T=None):
        """Vectorized build from the flat C++ output: chunks [N, 4], correct [N], offsets [B+1]."""
        B = len(offsets) - 1
        counts = np.diff(offsets)
        lengths = [np.array([len(x) for x in ids], dtype=np.int64) for ids in (s_ids, t_ids)]
        widths = []
        for side, (L, T, name) in enumerate(zip(lengths, (T_S, T_T), ("T_S", "T_T"))):
            need = int(L.max(initial=0))
            if T is not None and T < need:
                raise ValueError(f"{name}={T} is smaller than the longest sequence ({need})")
            widths.append(need if T is None else int(T))
        bidx = np.repeat(np.arange(B), counts)
        kidx = np.arange(len(chunks)) - offsets[:-1][bidx]
        _check_partition(chunks, bidx, counts, offsets, lengths)
        gap = (chunks[:, 0] == chunks[:, 1]) | (chunks[:, 2] == chunks[:, 3])
        masks = [np.arange(w)[None, :] < L[:, None] for w, L in zip(widths, lengths)]
        # The chunks tile every sequence in order (checked above), so each chunk's id (-1 for a gap) repeated over
        # its tokens lists all tokens of all sequences in order: the True cells of the attention mask, row-major.
        chunk_id = np.where(gap, -1, kidx)
        ids = []
        for side in (0, 1):
            unshifted = np.full((B, widths[side] + 1), -1, dtype=np.int64)
            unshifted[:, :-1][masks[side]] = np.repeat(chunk_id, chunks[:, 2 * side + 1] - chunks[:, 2 * side])
            ids.append(unshifted[:, 1:])  # row p <- token p+1 (next-token shift)
        rows_s = chunks[:, 1] - 1 - np.maximum(chunks[:, 0] - 1, 0)
        rows_t = chunks[:, 3] - 1 - np.maximum(chunks[:, 2] - 1, 0)
        mismatched = _check_bool(include_mismatched, "include_mismatched")
        valid = ~gap & (rows_s >= 1) & (rows_t >= 1) & (correct | mismatched)
        K = int(counts.max(initial=0))
        grid = np.full((B, K, 4), -1, dtype=np.int64)
        flags = np.zeros((2, B, K), dtype=bool)
        for b in range(B):  # pair b's chunks are the flat rows offsets[b]:offsets[b+1]
            lo, hi = offsets[b], offsets[b + 1]
            grid[b, :hi - lo] = chunks[lo:hi]
            flags[0, b, :hi - lo] = valid[lo:hi]
            flags[1, b, :hi - lo] = correct[lo:hi]
        t = torch.from_numpy
        # _check_partition implies all that __post_init__ checks (a valid chunk is a non-gap chunk of a tiling, so
        # non-empty, in range and in order), so the object is assembled without running that check again.
        out = object.__new__(Alignment)
        out.__dict__.update(
            student_chunk_ids=t(np.ascontiguousarray(ids[0])), teacher_chunk_ids=t(np.ascontiguousarray(ids[1])),
            chunk_valid=t(flags[0]), chunk_correct=t(flags[1]), num_chunks=t(counts.astype(np.int64)),
            student_lengths=t(lengths[0]), teacher_lengths=t(lengths[1]), chunks=t(grid),
            student_ids=t(_pad(s_ids, widths[0], 0)), teacher_ids=t(_pad(t_ids, widths[1], 0)),
            student_attention_mask=t(masks[0]), teacher_attention_mask=t(masks[1]))
        return out


def _check_partition(chunks, bidx, counts, offsets, lengths) -> None:
    """Each sequence's chunks must tile [0, length) on both sides in order."""
    for side, L in enumerate(lengths):
        lo, hi = chunks[:, 2 * side], chunks[:, 2 * side + 1]
        first = np.zeros(len(chunks), dtype=bool)
        first[offsets[:-1][counts > 0]] = True
        prev_hi = np.concatenate([[0], hi[:-1]])
        bad = (hi < lo) | np.where(first, lo != 0, lo != prev_hi)
        last_hi = np.where(counts > 0, hi[np.maximum(offsets[1:] - 1, 0)] if len(chunks) else 0, 0)
        if bad.any() or (last_hi != L).any():
            b = int(bidx[np.argmax(bad)]) if bad.any() else int(np.argmax(last_hi != L))
            raise ValueError(f"sequence {b}: chunks do not partition the {('student', 'teacher')[side]} tokens "
                             f"[0, {int(L[b])}) in order")
