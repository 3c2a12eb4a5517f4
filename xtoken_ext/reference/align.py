"""Pure-Python reference aligner: the same rules as csrc/align.hpp (offset merge, DP with anchors, band and
post-processing, auto), written for clarity. It must produce identical chunks; tests compare the two.

Tokens are given as lists of canonical bytes. A chunk is (s_start, s_end, t_start, t_end), end exclusive; a gap has
one empty side. correct = both sides non-empty and their concatenated bytes are equal.
"""
from __future__ import annotations

import bisect

import numpy as np

__all__ = ["align_offsets", "align_tokens", "dp_path"]

MATCH, MISMATCH, GAP, COMB = 6, -6, -3, 3  # half units: +3 / -3 / -1.5 / +1.5 per combined token
MAX_COMB = 4
GRAM = 3
MAX_WINDOW = 10


def _result(chunks, correct):
    return np.asarray(chunks, dtype=np.int64).reshape(-1, 4), np.asarray(correct, dtype=bool)


def align_offsets(s_starts, s_ends, t_starts, t_ends):
    """Offset merge: close a chunk where both sides' byte ends coincide; zero-width tokens at a boundary become gaps
    (student first); a side that runs out leaves an incorrect open chunk and gaps for the other side's rest."""
    ss, se, ts, te = (list(map(int, a)) for a in (s_starts, s_ends, t_starts, t_ends))
    n, m = len(ss), len(ts)
    out, ok = [], []
    i = j = 0
    while i < n or j < m:
        if i < n and ss[i] == se[i]:
            out.append((i, i + 1, j, j)); ok.append(False); i += 1; continue
        if j < m and ts[j] == te[j]:
            out.append((i, i, j, j + 1)); ok.append(False); j += 1; continue
        if i == n:
            out.append((i, i, j, j + 1)); ok.append(False); j += 1; continue
        if j == m:
            out.append((i, i + 1, j, j)); ok.append(False); i += 1; continue
        i0, j0, a, b = i, j, se[i], te[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                if i == n:
                    break
                a = se[i]; i += 1
            else:
                if j == m:
                    break
                b = te[j]; j += 1
        out.append((i0, i, j0, j)); ok.append(a == b and ss[i0] == ts[j0])
    return _result(out, ok)


class _Seq:
    def __init__(self, toks):
        self.toks = [bytes(t) for t in toks]
        self.stream = b"".join(self.toks)
        self.off = [0]
        for t in self.toks:
            self.off.append(self.off[-1] + len(t))

    def span(self, a, b):
        return self.stream[self.off[a]:self.off[b]]


def _correct(S, s0, s1, T, t0, t1):
    return s1 > s0 and t1 > t0 and S.span(s0, s1) == T.span(t0, t1)


def _band(S, sa, n, T, ta, m, band, full_cells):
    """Rows [lo[i], hi[i]] of the DP: everything if n*m <= full_cells, else half-width `band` around the teacher
    boundary c(i) at byte floor(b_i * B_T / B_S), with hi(i) using c(i+1) (c(n+1) = m) and lo(0) = 0."""
    if n * m <= full_cells:
        return [0] * (n + 1), [m] * (n + 1)
    BS, BT = S.off[sa + n] - S.off[sa], T.off[ta + m] - T.off[ta]
    trel = [T.off[ta + j] - T.off[ta] for j in range(m + 1)]
    c = []
    for i in range(n + 1):
        b = (S.off[sa + i] - S.off[sa]) * BT // BS if BS > 0 else 0
        c.append(bisect.bisect_right(trel, b) - 1)
    c.append(m)
    lo = [0 if i == 0 else max(0, c[i] - band) for i in range(n + 1)]
    hi = [min(m, c[i + 1] + band) for i in range(n + 1)]
    return lo, hi


def _dp_segment(S, sa, n, T, ta, m, band, full_cells):
    """METHOD.md §4.1-4.2 over S[sa:sa+n] x T[ta:ta+m]: returns (pairs [(s0,s1,t0,t1,ok)], D(n,m) in half units).
    Candidates in order diag, up, left, 1-to-k (k=2..4), k-to-1 (k=2..4); a later one wins only if strictly
    greater; cells outside the band do not exist."""
    if n == 0 or m == 0:
        pairs = [(sa + i, sa + i + 1, ta, ta, False) for i in range(n)]
        pairs += [(sa, sa, ta + j, ta + j + 1, False) for j in range(m)]
        return pairs, GAP * (n + m)
    s = S.toks[sa:sa + n]
    t = T.toks[ta:ta + m]
    lo, hi = _band(S, sa, n, T, ta, m, band, full_cells)
    D, mv = {}, {}
    for i in range(n + 1):
        for j in range(lo[i], hi[i] + 1):
            if i == 0 and j == 0:
                D[0, 0] = 0
                continue
            cands = []
            if i > 0 and j > 0 and (i - 1, j - 1) in D:
                cands.append((D[i - 1, j - 1] + (MATCH if s[i - 1] == t[j - 1] else MISMATCH), ("diag",)))
            if i > 0 and (i - 1, j) in D:
                cands.append((D[i - 1, j] + GAP, ("up",)))
            if (i, j - 1) in D:
                cands.append((D[i, j - 1] + GAP, ("left",)))
            for k in range(2, min(j, MAX_COMB) + 1):
                if i > 0 and (i - 1, j - k) in D and s[i - 1] == b"".join(t[j - k:j]):
                    cands.append((D[i - 1, j - k] + COMB * k, ("1tok", k)))
            for k in range(2, min(i, MAX_COMB) + 1):
                if j > 0 and (i - k, j - 1) in D and b"".join(s[i - k:i]) == t[j - 1]:
                    cands.append((D[i - k, j - 1] + COMB * k, ("kto1", k)))
            best = cands[0]
            for c in cands[1:]:
                if c[0] > best[0]:
                    best = c
            D[i, j], mv[i, j] = best
    pairs = []
    i, j = n, m
    while i > 0 or j > 0:
        move = mv[i, j]
        di, dj = {"diag": (1, 1), "up": (1, 0), "left": (0, 1)}.get(move[0], (1, 1))
        if move[0] == "1tok":
            dj = move[1]
        elif move[0] == "kto1":
            di = move[1]
        ok = move[0] in ("1tok", "kto1") or (move[0] == "diag" and s[i - 1] == t[j - 1])
        pairs.append((sa + i - di, sa + i, ta + j - dj, ta + j, ok))
        i, j = i - di, j - dj
    return pairs[::-1], D[n, m]


def dp_path(s_tokens, t_tokens):
    """Raw DP (full table, no anchors, no post-processing): (pairs [P,4], ok [P], score)."""
    S, T = _Seq(s_tokens), _Seq(t_tokens)
    pairs, score = _dp_segment(S, 0, len(S.toks), T, 0, len(T.toks), 0, float("inf"))
    chunks, ok = _result([p[:4] for p in pairs], [p[4] for p in pairs])
    return chunks, ok, score / 2


def _anchor_chain(S, sa, sb, T, ta, tb):
    """Longest chain of token pairs anchored by 3-grams unique on both sides and equal: pairs sorted by
    (s asc, t desc), patience LIS on t (bisect_left), predecessor = current tail of the previous length."""
    def unique(X, a, b):
        seen = {}
        for p in range(a, b - GRAM + 1):
            g = tuple(X.toks[p:p + GRAM])
            seen[g] = -1 if g in seen else p
        return seen

    if sb - sa < GRAM or tb - ta < GRAM:
        return []
    us, ut = unique(S, sa, sb), unique(T, ta, tb)
    pairs = sorted({(p + d, ut[g] + d) for g, p in us.items() if p >= 0 and ut.get(g, -1) >= 0 for d in range(GRAM)},
                   key=lambda x: (x[0], -x[1]))
    tails_t, tails_i, prev = [], [], [-1] * len(pairs)
    for k, (_, t) in enumerate(pairs):
        pos = bisect.bisect_left(tails_t, t)
        if pos > 0:
            prev[k] = tails_i[pos - 1]
        if pos == len(tails_t):
            tails_t.append(t); tails_i.append(k)
        else:
            tails_t[pos] = t; tails_i[pos] = k
    chain, k = [], tails_i[-1] if tails_i else -1
    while k >= 0:
        chain.append(pairs[k])
        k = prev[k]
    return chain[::-1]


def _postprocess(S, T, pairs):
    """A maximal run of non-correct pairs with equal concatenated bytes -> one correct chunk; otherwise the smallest
    window (2..10 pairs, then leftmost) containing the pair, not reaching left of the last fixed chunk, with equal
    bytes -> one correct chunk; otherwise the pair stays."""
    out, ok = [], []

    def equal(l, h):
        return _correct(S, pairs[l][0], pairs[h - 1][1], T, pairs[l][2], pairs[h - 1][3])

    def emit(l, h, good):
        out.append((pairs[l][0], pairs[h - 1][1], pairs[l][2], pairs[h - 1][3])); ok.append(good)

    P, k, floor = len(pairs), 0, 0
    while k < P:
        if pairs[k][4]:
            emit(k, k + 1, True); k += 1; continue
        e = k
        while e < P and not pairs[e][4]:
            e += 1
        if equal(k, e):
            emit(k, e, True); k = floor = e; continue
        window = None
        for size in range(2, MAX_WINDOW + 1):
            for l in range(max(floor, k - size + 1), k + 1):
                if l + size <= P and equal(l, l + size):
                    window = (l, l + size)
                    break
            if window:
                break
        if window is None:
            emit(k, k + 1, False); k = floor = k + 1; continue
        del out[len(out) - (k - window[0]):], ok[len(ok) - (k - window[0]):]
        emit(*window, True)
        k = floor = window[1]
    return out, ok


def _dp_align(S, sa, sb, T, ta, tb, band, full_cells):
    pairs, i, j = [], sa, ta
    for s, t in _anchor_chain(S, sa, sb, T, ta, tb):
        pairs += _dp_segment(S, i, s - i, T, j, t - j, band, full_cells)[0]
        pairs.append((s, s + 1, t, t + 1, True))
        i, j = s + 1, t + 1
    pairs += _dp_segment(S, i, sb - i, T, j, tb - j, band, full_cells)[0]
    return _postprocess(S, T, pairs)


def _common_prefix(x, y):
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def _resync(S, i, T, j, lookahead, gram, agree):
    """Boundary pair (i', j') != (i, j) within `lookahead` tokens per side whose suffixes agree on the next `gram`
    bytes (or are equal and shorter), skipping the fewest bytes; ties -> smaller i', then j'. A candidate must skip
    at least `agree` bytes (the common prefix of both streams from (i, j)) on one side: inside that prefix another
    byte diagonal only repeats the same text. Default: the ends."""
    def synced(a, b):
        x, y = S.stream[S.off[a]:], T.stream[T.off[b]:]
        return x[:gram] == y[:gram] if len(x) >= gram and len(y) >= gram else x == y

    best = None
    for a in range(i, min(len(S.toks), i + lookahead) + 1):
        for b in range(j, min(len(T.toks), j + lookahead) + 1):
            skip_s, skip_t = S.off[a] - S.off[i], T.off[b] - T.off[j]
            if (a, b) != (i, j) and (skip_s >= agree or skip_t >= agree) and synced(a, b):
                key = (skip_s + skip_t, a, b)
                best = key if best is None or key < best else best
    return (len(S.toks), len(T.toks)) if best is None else best[1:]


def _auto(S, T, band, full_cells, lookahead, gram):
    """Chunks from the byte-stream merge where the streams agree; differing windows (up to the resync point) via
    the DP pipeline."""
    n, m = len(S.toks), len(T.toks)
    out, ok = [], []
    i = j = 0
    while i < n or j < m:
        if i < n and not S.toks[i]:
            out.append((i, i + 1, j, j)); ok.append(False); i += 1; continue
        if j < m and not T.toks[j]:
            out.append((i, i, j, j + 1)); ok.append(False); j += 1; continue
        if i < n and j < m:
            a, b = i + 1, j + 1
            while S.off[a] - S.off[i] != T.off[b] - T.off[j]:
                if S.off[a] - S.off[i] < T.off[b] - T.off[j]:
                    if a == n:
                        break
                    a += 1
                elif b == m:
                    break
                else:
                    b += 1
            if S.off[a] - S.off[i] == T.off[b] - T.off[j] and S.span(i, a) == T.span(j, b):
                out.append((i, a, j, b)); ok.append(True); i, j = a, b; continue
        agree = _common_prefix(S.stream[S.off[i]:], T.stream[T.off[j]:]) if i < n and j < m else 0
        i2, j2 = _resync(S, i, T, j, lookahead, gram, agree)
        o, c = _dp_align(S, i, i2, T, j, j2, band, full_cells)
        out += o; ok += c
        i, j = i2, j2
    return out, ok


def align_tokens(s_tokens, t_tokens, method="auto", band=64, full_cells=1 << 16, lookahead=64, gram=16):
    """Align two lists of canonical token bytes: method "dp" (anchors + DP + post-processing), "offsets" (merge on
    cumulative byte lengths, correct by bytes) or "auto". Returns (chunks int64 [K,4], correct bool [K])."""
    S, T = _Seq(s_tokens), _Seq(t_tokens)
    if method == "dp":
        return _result(*_dp_align(S, 0, len(S.toks), T, 0, len(T.toks), band, full_cells))
    if method == "offsets":
        chunks, _ = align_offsets(S.off[:-1], S.off[1:], T.off[:-1], T.off[1:])
        ok = [_correct(S, s0, s1, T, t0, t1) for s0, s1, t0, t1 in chunks.tolist()]
        return chunks, np.asarray(ok, dtype=bool)
    if method == "auto":
        return _result(*_auto(S, T, band, full_cells, lookahead, gram))
    raise ValueError(f"method must be 'auto', 'dp' or 'offsets', got {method!r}")
