"""Native span aligner (torch-free C++17, csrc/). Chunks are int64 [K, 4] rows (s_start, s_end, t_start, t_end),
token indices, end exclusive; a gap has one empty side. correct[k] = non-gap and equal concatenated canonical bytes
(for merge_offsets_batch: both sides cover the same byte range). Batch outputs are flat: the chunks of pair b are
rows offsets[b]:offsets[b+1]. Arrays own their C++ buffers (zero-copy); the work runs with the GIL released."""
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_IntArray = npt.ArrayLike  # 1-D integers (converted to contiguous int64)

class Vocab:
    """Canonical bytes of every token id of one tokenizer. ``special`` (optional, one int per id): 0 for text, else
    1 (special) plus role bits 2 bos, 4 eos, 8 end of turn, 16 unk; a special's bytes should be its literal text.
    A chunk holding a special is correct only as a 1:1 pair of specials sharing a role bit (never unk) or with
    equal literal text; the DP scores role-sharing specials as a match. Picklable (token bytes + special bits)."""

    def __init__(self, token_bytes: Sequence[bytes], special: _IntArray | None = None) -> None: ...
    @property
    def size(self) -> int: ...
    def __len__(self) -> int: ...

def merge_offsets_batch(
    student_starts: Sequence[_IntArray],
    student_ends: Sequence[_IntArray],
    teacher_starts: Sequence[_IntArray],
    teacher_ends: Sequence[_IntArray],
    threads: int = 0,
    student_vocab: Vocab | None = None,
    teacher_vocab: Vocab | None = None,
    student_ids: Sequence[_IntArray] | None = None,
    teacher_ids: Sequence[_IntArray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """O(n+m) merge on byte offsets of B pairs -> (chunks int64 [K, 4], correct bool [K], offsets int64 [B+1]).
    With both vocabularies and the ids of every sequence, chunks holding special tokens follow the Vocab rule
    (as align_ids_batch). threads <= 0: all hardware threads; at most 4 per hardware thread and one per pair.
    ValueError on mismatched lengths, start > end, decreasing ends; RuntimeError if a thread cannot start."""

def align_ids_batch(
    student_vocab: Vocab,
    teacher_vocab: Vocab,
    student_ids: Sequence[_IntArray],
    teacher_ids: Sequence[_IntArray],
    method: str = "auto",
    student_prefix: int = 0,
    teacher_prefix: int = 0,
    threads: int = 0,
    band: int = 64,
    full_cells: int = 65536,
    lookahead: int = 64,
    gram: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align B id-sequence pairs over canonical bytes with method "auto" | "dp" | "offsets" ->
    (chunks, correct, offsets [B+1]). prefix: 0 none, 1 a space is prepended to every text, 2 prepended unless the
    text starts with one (SentencePiece). The ids are copied (with the GIL held) before they are checked, and the
    threads read only those copies (a concurrent writer cannot make C++ read out of bounds). Errors name the
    sequence, ``student ids[b]: id X at position k is out of range ...``: IndexError on ids out of range (unsigned
    ids with their value), TypeError on non-integer ids, ValueError on bad shapes/arguments (band, lookahead,
    gram <= 2**31 - 1), RuntimeError if a thread cannot start. ``IdAligner`` does the same with the arguments
    bound once."""

class IdAligner:
    """``align_ids_batch`` with the vocabularies, method, prefix modes and parameters checked and bound once (the
    object keeps both vocabularies alive): what ``Aligner.align_ids`` / ``align_ids_batch`` call. Ids: plain lists
    of ints are read directly; arrays as in align_ids_batch; errors name the side ("student ids: id X at position
    k is out of range ...")."""

    def __init__(
        self,
        student_vocab: Vocab,
        teacher_vocab: Vocab,
        method: str = "auto",
        student_prefix: int = 0,
        teacher_prefix: int = 0,
        band: int = 64,
        full_cells: int = 65536,
        lookahead: int = 64,
        gram: int = 16,
    ) -> None: ...
    def align(self, student_ids: _IntArray, teacher_ids: _IntArray) -> tuple[np.ndarray, np.ndarray]:
        """One pair -> (chunks int64 [K, 4], correct bool [K]); GIL released while aligning."""
    def align_batch(
        self, student_ids: Sequence[_IntArray], teacher_ids: Sequence[_IntArray], threads: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B pairs in C++ threads -> (chunks, correct, offsets [B+1]), as align_ids_batch."""

def align_tokens(
    student_tokens: Sequence[bytes],
    teacher_tokens: Sequence[bytes],
    method: str = "auto",
    band: int = 64,
    full_cells: int = 65536,
    lookahead: int = 64,
    gram: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Align two lists of canonical token bytes -> (chunks int64 [K, 4], correct bool [K])."""

def dp_path(student_tokens: Sequence[bytes], teacher_tokens: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, float]:
    """Raw DP of METHOD.md §4.1-4.2 (full table, no anchors, no post-processing) -> (pairs [P, 4], ok [P], score)."""

def pkl_rows(
    s_logits: np.ndarray,
    t_vals: np.ndarray,
    w_idx: np.ndarray,
    w_val: np.ndarray,
    col_mask: np.ndarray,
    spans: np.ndarray,
    temperature: float,
    merge: str,
    eps: float,
    t_chain: np.ndarray | None,
    chunk_scale: np.ndarray | None,
    loss: np.ndarray,
    grad: np.ndarray,
    grad_w: np.ndarray | None,
    threads: int = 0,
    s_dtype: str = "float32",
    t_dtype: str = "float32",
) -> None:
    """Fused P-KL loss + gradient over chunks of logit rows (ops.fallback.pkl_rows contract; dense teacher).
    Inputs: s_logits [N_s, V_S], t_vals [N_t, V_T] (float32, or bf16 / fp16 as their 16-bit words in int16 arrays,
    per s_dtype / t_dtype "float32" | "bfloat16" | "float16"), w_idx int32 [V_S, 4], w_val float32 [V_S, 4],
    col_mask bool [V_T], spans int64 [K, 4] (student rows of different chunks disjoint), merge "mean" | "first" |
    "chain", t_chain float32 [N_t] | None, chunk_scale float32 [K] | None. Writes loss float32 [K], grad [N_s, V_S]
    in the student's dtype (every row; rows outside the chunks get 0) and, if given, grad_w float32 [V_S, 4]. All
    arrays C-contiguous with exactly these dtypes (never converted). Bitwise the same for every thread count
    (threads <= 0: all hardware threads); runs with the GIL released. ValueError on bad shapes or spans."""

def teacher_topk_columns(
    t_vals: np.ndarray, rows: np.ndarray, k: int, out: np.ndarray, threads: int = 0, t_dtype: str = "float32"
) -> None:
    """teacher_topk's column set: out bool [V_T], out[c] = whether c is among the k columns with the largest
    max over the teacher rows ``rows`` (int64 [n]) of t_vals[r, c] (float32 [N_t, V_T], or bf16 / fp16 as 16-bit
    words with t_dtype), rows holding NaN or +inf ignored (max -inf when no row is left), ties -> lower c (the first
    k of a stable descending sort). Reads t_vals in place; the same for every thread count (threads <= 0: all
    hardware threads); runs with the GIL released. ValueError on bad shapes, rows or k < 1."""

def hkl_rows(
    s_logits: np.ndarray,
    t_vals: np.ndarray,
    col_mask: np.ndarray,
    spans: np.ndarray,
    temperature: float,
    merge: str,
    s_chain: np.ndarray | None,
    t_chain: np.ndarray | None,
    common_s: np.ndarray,
    common_t: np.ndarray,
    uncommon_topk: int,
    loss: np.ndarray,
    grad: np.ndarray,
    gsum: np.ndarray,
    threads: int = 0,
    s_dtype: str = "float32",
    t_dtype: str = "float32",
) -> None:
    """Fused H-KL / GOLD / ULD loss + gradient over chunks of logit rows (ops.fallback.hkl_rows contract; dense
    teacher). Inputs: s_logits [N_s, V_S], t_vals [N_t, V_T] (float32, or bf16 / fp16 as below), col_mask bool
    [V_T], spans int64
    [K, 4] (student rows of different chunks disjoint), merge "mean" | "first" | "chain", s_chain float32 [N_s] |
    None, t_chain float32 [N_t] | None, common_s / common_t int64 [C] (every common_t in col_mask), uncommon_topk
    (< 0: no cap). Writes loss float32 [K], grad [N_s, V_S] in s_logits' dtype (every row; rows outside the chunks get 0) and
    gsum float32 [K] (d loss_k / d chain scalar); bf16 / fp16 logits and grad as their 16-bit words per s_dtype /
    t_dtype, as for pkl_rows. All arrays C-contiguous with exactly these dtypes (never converted). Bitwise the same
    for every thread count (threads <= 0: all hardware threads); runs with the GIL released. ValueError on bad
    shapes, spans or common pairs."""
