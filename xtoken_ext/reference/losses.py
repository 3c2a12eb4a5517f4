"""Reference P-KL / H-KL / GOLD / ULD: dense W, a Python loop over chunks, autograd for gradients.

Obviously correct and slow; the oracle for ``xtoken_ext.losses`` (fallback and Triton). Math runs in float64 when
the student logits are float64, else in float32. Chunks are read from the alignment's chunk-id tensors (not from
``row_spans()``), so the fast path's span handling is checked independently.

Notation for one valid chunk with student rows R_S and teacher rows R_T, temperature τ, allowed teacher columns A:
  ℓ_r = log_softmax(z_r/τ), p_r = exp ℓ_r, q_r = Wᵀ p_r            (student row r)
  log π_r = log_softmax over A of t_r/τ  (−inf outside A)             (teacher row r)
  merge "mean":  Q = normalize(mean_r q_r |_A), T = mean_r log π_r, S = mean_r ℓ_r
  merge "first": first row of each side; "chain": first row's vector + Σ_{r>first} log p_r(realized token r+1)
  P = exp T (mass ≤ 1; NOT renormalized after the merge). Terms with P = 0 count as 0 (0·log 0 = 0).

Non-finite input and degenerate chunks (the policy of xtoken_ext.losses): a chunk reads its merged rows, and for
merge="chain" the later rows behind its chain scalars (the student's only for H-KL / GOLD / ULD). A read row with
NaN or +inf in any column, or a student row without a finite value, makes the chunk NaN: nonfinite="raise" raises
ValueError naming the tensor, batch, position and chunk; "mask" excludes it. P-KL: Σ_A P = 0 -> loss 0 (zero
gradient); else Z = Σ_A q = 0 or an infinite KL -> +inf. Every +inf chunk is excluded. Excluded chunks give 0
(reduction="none"), no gradient, and do not count in the "mean" denominator. Teacher rows with NaN / +inf are
ignored by the teacher_topk column ranking.
"""
from __future__ import annotations

import math

import torch

__all__ = ["pkl_loss", "hkl_loss", "gold_loss", "uld_loss"]

_NEG_INF = float("-inf")


def _dense_w(proj, dtype):
    """[V_S, V_T] W built from the ELL slots (differentiable in the weights of a LearnableProjection)."""
    idx, w = proj.indices.long(), proj.weights
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    keep = idx >= 0
    out = torch.zeros(idx.shape[0], proj.teacher_vocab_size, dtype=dtype)
    return out.index_put((rows[keep], idx[keep]), w[keep].to(dtype), accumulate=True)


def _masked_log_softmax(x, allowed):
    """log_softmax of x over the entries where ``allowed`` (and x > −inf); −inf elsewhere / for an empty row."""
    x = torch.where(allowed, x, torch.full_like(x, _NEG_INF))
    lse = torch.logsumexp(x, dim=-1)
    if torch.isinf(lse):
        return torch.full_like(x, _NEG_INF)
    return x - lse


def _plogq(p, a, b):
    """Σ p·(a − b) with the convention 0·(anything) = 0."""
    pos = p > 0
    zero = torch.zeros_like(p)
    return (p * (torch.where(pos, a, zero) - torch.where(pos, b, zero))).sum()


def _defect(row, student: bool) -> str | None:
    """Why a logit row is bad input ("NaN", "+inf", "no finite value" for a student row), or None."""
    if bool(torch.isnan(row).any()):
        return "NaN"
    if bool((row == math.inf).any()):
        return "+inf"
    if student and not bool((row > _NEG_INF).any()):
        return "no finite value"
    return None


def _chunks(alignment):
    """Yield (b, k, student_rows, teacher_rows) for every valid chunk in (b, k) order."""
    valid = alignment.chunk_valid
    for b in range(valid.shape[0]):
        for k in range(valid.shape[1]):
            if valid[b, k]:
                s_rows = torch.nonzero(alignment.student_chunk_ids[b] == k).squeeze(1)
                t_rows = torch.nonzero(alignment.teacher_chunk_ids[b] == k).squeeze(1)
                yield b, k, s_rows.tolist(), t_rows.tolist()


def _prepare(student_logits, teacher_logits, alignment, proj, temperature, merge, uncovered, teacher_topk,
             teacher_indices, student_ids, teacher_ids, student_chain):
    """Shared setup: [B,T,V] views in the math dtype, dense teacher (−inf outside a sparse teacher's columns),
    the allowed column set A, and per valid chunk (ℓ rows, log π rows, chain scalars, error) with error None or the
    bad-input message of its first bad row (student rows first). ``student_chain``: the student's later rows enter
    through a chain scalar (H-KL family)."""
    if merge not in ("mean", "first", "chain"):
        raise ValueError(f"merge must be 'mean', 'first' or 'chain', got {merge!r}")
    if uncovered not in ("renormalize", "epsilon"):
        raise ValueError(f"uncovered must be 'renormalize' or 'epsilon', got {uncovered!r}")
    if merge == "chain" and (student_ids is None or teacher_ids is None):
        raise ValueError("merge='chain' needs student_ids and teacher_ids")
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z = student_logits.to(dt)
    z = z.unsqueeze(0) if z.dim() == 2 else z
    t = teacher_logits.detach().to(dt)
    t = t.unsqueeze(0) if t.dim() == 2 else t
    V_T = proj.teacher_vocab_size
    if teacher_indices is not None:  # sparse teacher: dense with −inf outside its k columns
        ti = teacher_indices.long()
        ti = ti.unsqueeze(0) if ti.dim() == 2 else ti
        t = torch.full((*t.shape[:2], V_T), _NEG_INF, dtype=dt).scatter(-1, ti, t)
    W = _dense_w(proj, dt)
    A = (W > 0).any(0) if uncovered == "renormalize" else torch.ones(V_T, dtype=torch.bool)
    chunks = list(_chunks(alignment))
    if teacher_topk is not None and chunks:
        # topk set: the teacher_topk columns with the largest max-over-rows logit (rows of valid chunks without
        # NaN / +inf); ties -> lower id (stable sort keeps id order among equal values).
        good = [t[b, r] for b, _, _, rows in chunks for r in rows if _defect(t[b, r], False) is None]
        imp = torch.stack(good).amax(0) if good else torch.full((V_T,), _NEG_INF, dtype=dt)
        top = torch.sort(imp, descending=True, stable=True).indices[:teacher_topk]
        in_top = torch.zeros(V_T, dtype=torch.bool)
        in_top[top] = True
        A = A & in_top
    tau = float(temperature)
    out = []
    for b, k, s_rows, t_rows in chunks:
        s_read = s_rows if merge == "mean" or (merge == "chain" and student_chain) else s_rows[:1]
        t_read = t_rows if merge != "first" else t_rows[:1]
        error = None
        for name, x, read, student in (("student_logits", z, s_read, True), ("teacher_logits", t, t_read, False)):
            bad = [(r, _defect(x[b, r], student)) for r in read if _defect(x[b, r], student)]
            if bad and error is None:
                error = (f"non-finite logits: {name} at batch {b}, position {bad[0][0]} holds {bad[0][1]} (chunk {k} "
                         f"of sequence {b} reads that row); pass nonfinite='mask' to exclude such chunks")
        ell = [torch.log_softmax(z[b, r] / tau, -1) for r in s_rows]
        logpi = [_masked_log_softmax(t[b, r] / tau, A) for r in t_rows]
        s_chain = t_chain = None
        if merge == "chain":  # log-prob of the realized next token (input id at position r + 1) of each later row
            s_chain = sum((ell[i][student_ids[b, r + 1]] for i, r in enumerate(s_rows) if i > 0), z.new_zeros(()))
            t_chain = sum((logpi[i][teacher_ids[b, r + 1]] for i, r in enumerate(t_rows) if i > 0),
                          t.new_zeros(()))
        out.append((ell, logpi, s_chain, t_chain, error))
    return z, W, A, tau, out


def _merge(vecs, merge, chain):
    if merge == "mean":
        return torch.stack(vecs).mean(0)
    return vecs[0] if merge == "first" else vecs[0] + chain


def _reduce(losses, z, reduction, normalizer, nonfinite):
    """losses: per valid chunk, a loss tensor or the bad-input message (str). NaN chunks raise or are excluded,
    +inf ones are excluded: 0 with no gradient, not counted in the "mean" denominator."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if nonfinite not in ("raise", "mask"):
        raise ValueError(f"nonfinite must be 'raise' or 'mask', got {nonfinite!r}")
    if nonfinite == "raise":
        for x in losses:
            if isinstance(x, str):
                raise ValueError(x)
    zero = z.flatten()[:0].sum()  # a zero connected to the graph (zero gradient, never NaN)
    excluded = [isinstance(x, str) or float(x.detach()) == math.inf for x in losses]
    vals = [zero if e else x for x, e in zip(losses, excluded)]
    if reduction == "none":
        return torch.stack(vals) if vals else z.flatten()[:0]
    total = torch.stack(vals).sum() if vals else zero
    if reduction == "sum":
        return total
    return total / (max(excluded.count(False), 1) if normalizer is None else normalizer)


def pkl_loss(student_logits, teacher_logits, alignment, proj, temperature=1.0, reduction="mean", *, merge="mean",
             uncovered="renormalize", teacher_topk=None, uncommon_topk=None, normalizer=None, teacher_indices=None,
             student_ids=None, teacher_ids=None, nonfinite="raise"):
    """P-KL: L_k = τ² Σ_{v∈A} P[v] (T[v] − log(Q[v] + eps)), Q = normalize(merged Wᵀp_S over A),
    eps = 0 ("renormalize") or 1e-10 ("epsilon"). For merge="chain" the student scalar multiplies Q and cancels in
    its renormalization, so Q is the first row's projection. Σ_A P = 0: 0; Z = 0 or an infinite KL: +inf."""
    del uncommon_topk  # H-KL / GOLD / ULD only
    z, W, A, tau, chunks = _prepare(student_logits, teacher_logits, alignment, proj, temperature, merge, uncovered,
                                    teacher_topk, teacher_indices, student_ids, teacher_ids, False)
    eps = 0.0 if uncovered == "renormalize" else 1e-10
    losses = []
    for ell, logpi, _, t_chain, error in chunks:
        if error is not None:
            losses.append(error)
            continue
        T = _merge(logpi, merge, t_chain)[A]
        if float(torch.exp(T.detach()).sum()) == 0:  # no teacher mass on A
            losses.append(z.flatten()[:0].sum())
            continue
        q = [torch.exp(e) @ W for e in ell]
        q = (torch.stack(q).mean(0) if merge == "mean" else q[0])[A]
        if float(q.detach().sum()) == 0:  # no projected student mass (e.g. all of it on empty W rows)
            losses.append(torch.tensor(math.inf, dtype=z.dtype))
            continue
        Q, P = q / q.sum(), torch.exp(T)
        logq = torch.log(torch.where(P > 0, Q + eps, 1.0))  # log 0 only where it counts (no 0·inf gradient)
        losses.append(tau * tau * _plogq(P, T, logq))  # +inf (Q + eps = 0 where P > 0): excluded by _reduce
    return _reduce(losses, z, reduction, normalizer, nonfinite)


def _hybrid(student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered, teacher_topk,
            uncommon_topk, normalizer, teacher_indices, student_ids, teacher_ids, nonfinite, pairs):
    """τ² (KL_common + L1_uncommon) per chunk over the common pairs ``pairs`` (None = empty: ULD)."""
    z, W, A, tau, chunks = _prepare(student_logits, teacher_logits, alignment, proj, temperature, merge, uncovered,
                                    teacher_topk, teacher_indices, student_ids, teacher_ids, True)
    V_S, V_T = W.shape
    cs, ct = (torch.zeros(0, dtype=torch.long),) * 2 if pairs is None else (pairs[0].long(), pairs[1].long())
    keep = A[ct]  # pairs whose teacher column is allowed
    cs, ct = cs[keep], ct[keep]
    U_S = torch.ones(V_S, dtype=torch.bool)
    U_S[cs] = False
    U_T = A.clone()
    U_T[ct] = False
    m = min(int(U_S.sum()), int(U_T.sum()), V_S if uncommon_topk is None else int(uncommon_topk))
    losses = []
    for ell, logpi, s_chain, t_chain, error in chunks:
        if error is not None:
            losses.append(error)
            continue
        S = _merge(ell, merge, s_chain)
        T = _merge(logpi, merge, t_chain)
        P = torch.exp(T)
        # KL over the common pairs, not renormalized to the common set (can be negative).
        kl = _plogq(P[ct], T[ct], S[cs])
        # Sorted L1 between the top-m uncommon probabilities of each side.
        a = torch.sort(torch.exp(S[U_S]), descending=True, stable=True).values[:m]
        b = torch.sort(P[U_T], descending=True, stable=True).values[:m]
        losses.append(tau * tau * (kl + (a - b).abs().sum()))
    return _reduce(losses, z, reduction, normalizer, nonfinite)


def hkl_loss(student_logits, teacher_logits, alignment, proj, temperature=1.0, reduction="mean", *, merge="mean",
             uncovered="renormalize", teacher_topk=None, uncommon_topk=8192, normalizer=None, teacher_indices=None,
             student_ids=None, teacher_ids=None, nonfinite="raise"):
    """H-KL: common set = W's relaxed top-1 pairs (weight ≥ 0.6);
    L_k = τ² (Σ_c P[t_c](T[t_c] − S[s_c]) + Σ_{i<m} |sort↓(exp S[U_S])_i − sort↓(P[U_T])_i|)."""
    return _hybrid(student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered,
                   teacher_topk, uncommon_topk, normalizer, teacher_indices, student_ids, teacher_ids, nonfinite,
                   proj.common_pairs("relaxed"))


def gold_loss(student_logits, teacher_logits, alignment, proj, temperature=1.0, reduction="mean", *, merge="mean",
              uncovered="renormalize", teacher_topk=None, uncommon_topk=8192, normalizer=None, teacher_indices=None,
              student_ids=None, teacher_ids=None, nonfinite="raise"):
    """GOLD: the H-KL formula over the strict (exact one-hot) common set."""
    return _hybrid(student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered,
                   teacher_topk, uncommon_topk, normalizer, teacher_indices, student_ids, teacher_ids, nonfinite,
                   proj.common_pairs("strict"))


def uld_loss(student_logits, teacher_logits, alignment, proj, temperature=1.0, reduction="mean", *, merge="mean",
             uncovered="renormalize", teacher_topk=None, uncommon_topk=None, normalizer=None, teacher_indices=None,
             student_ids=None, teacher_ids=None, nonfinite="raise"):
    """ULD: L_k = τ² Σ_{i<m} |sort↓(exp S)_i − sort↓(P[A])_i|, m = min(V_S, |A|, uncommon_topk) (no partition)."""
    return _hybrid(student_logits, teacher_logits, alignment, proj, temperature, reduction, merge, uncovered,
                   teacher_topk, uncommon_topk, normalizer, teacher_indices, student_ids, teacher_ids, nonfinite, None)
