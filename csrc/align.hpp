// Span aligner core (no Python): offset merge, the X-Token DP (METHOD.md §4) with anchors, banding and
// post-processing, and the `auto` stream-diff aligner. Mirrored line by line by xtoken_ext/reference/align.py;
// both must produce identical chunks.
//
// A chunk is (s_start, s_end, t_start, t_end), token indices, end exclusive; a gap has one empty side.
// correct[k] = both sides non-empty and their concatenated canonical bytes are equal (a gap is never correct).
//
// Deviations from the authors' released aligner (METHOD.md §2, §4.3), all deliberate:
// - Token strings are the exact canonical bytes of the token table (byte-level BPE decoded to bytes, so a UTF-8
//   char split over several tokens compares by bytes): no `_`->space or TAB->newline quirks, no mojibake tables,
//   no sequence-level byte merging (it is implied by byte equality of concatenations).
// - Anchors: a longest monotone chain (LIS) of anchored token pairs instead of the greedy selection.
// - Segments with n*m > full_cells run a banded DP (linear memory) instead of the full table.
// - Post-processing: no "last 20%" exemption; a window found equal becomes one chunk without re-running the DP on
//   it (its sub-path is already the DP optimum between the same corners, so a re-run cannot make it all-correct
//   up to ties).
// - `auto` (stream diff + resync) and the SentencePiece prefix-space handling are additions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace xt {

// The bindings bound band, lookahead and gram by kMaxParam, so index arithmetic with them cannot overflow.
constexpr int64_t kMaxParam = (int64_t{1} << 31) - 1;
struct Params {
  int64_t band = 64;              // band half-width (tokens) around the byte-offset guide path
  int64_t full_cells = 1 << 16;   // segments with n*m <= full_cells get the full DP (beyond: ~ the band cost)
  int64_t lookahead = 64;         // auto: tokens per side searched for a resync point
  int64_t gram = 16;              // auto: bytes that must agree after a resync point
};

// std::allocator whose resize() leaves new elements of trivial types uninitialized (they are written next).
template <class T>
struct NoInit : std::allocator<T> {
  template <class U>
  struct rebind { using other = NoInit<U>; };
  NoInit() = default;
  template <class U>
  NoInit(const NoInit<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }
  template <class U, class... A>
  void construct(U* p, A&&... a) { ::new (static_cast<void*>(p)) U(std::forward<A>(a)...); }
};
template <class T>
using Buf = std::vector<T, NoInit<T>>;

struct Result {
  Buf<int64_t> chunks;  // 4 per chunk
  Buf<uint8_t> correct;
  void push(int64_t s0, int64_t s1, int64_t t0, int64_t t1, bool ok) {
    chunks.push_back(s0);
    chunks.push_back(s1);
    chunks.push_back(t0);
    chunks.push_back(t1);
    correct.push_back(ok ? 1 : 0);
  }
  void reserve(int64_t k) {
    chunks.reserve(static_cast<size_t>(4 * k));
    correct.reserve(static_cast<size_t>(k));
  }
  // Room for k more chunks, growing the capacity at least 2x when it must grow (amortized O(1) per chunk).
  void make_room(int64_t k) {
    const size_t need = correct.size() + static_cast<size_t>(k);
    if (need > correct.capacity()) reserve(static_cast<int64_t>(std::max(need, 2 * correct.capacity())));
  }
  void append(const Result& o) {
    chunks.insert(chunks.end(), o.chunks.begin(), o.chunks.end());
    correct.insert(correct.end(), o.correct.begin(), o.correct.end());
  }
  int64_t size() const { return static_cast<int64_t>(correct.size()); }
};

// x[0, n) == y[0, n). Short ranges (most tokens) without a library call: two possibly overlapping words cover them.
inline bool bytes_eq(const char* x, const char* y, int64_t n) {
  if (n > 16) return std::memcmp(x, y, static_cast<size_t>(n)) == 0;
  if (n >= 8) {
    uint64_t a, b, c, d;
    std::memcpy(&a, x, 8), std::memcpy(&b, y, 8), std::memcpy(&c, x + n - 8, 8), std::memcpy(&d, y + n - 8, 8);
    return ((a ^ b) | (c ^ d)) == 0;
  }
  if (n >= 4) {
    uint32_t a, b, c, d;
    std::memcpy(&a, x, 4), std::memcpy(&b, y, 4), std::memcpy(&c, x + n - 4, 4), std::memcpy(&d, y + n - 4, 4);
    return ((a ^ b) | (c ^ d)) == 0;
  }
  for (int64_t k = 0; k < n; ++k)
    if (x[k] != y[k]) return false;
  return true;
}

inline uint64_t fnv1a(const char* p, int64_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (int64_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 1099511628211ULL;
  return h;
}

constexpr int64_t kBlock = 16;  // bytes read at once by block_eq and copied at once by Vocab::sequence

// x[0, n) == y[0, n) for n <= kBlock, reading kBlock bytes at x and at y (both must be readable): the first n bytes
// of the XOR of two 16-byte blocks are zero; no branch on n (token lengths are too irregular to predict).
inline bool block_eq(const char* x, const char* y, int64_t n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t a[2], b[2];
  std::memcpy(a, x, kBlock), std::memcpy(b, y, kBlock);
  auto low = [](int64_t k) {  // mask of the first k bytes of a word (byte q = bits [8q, 8q+8)), k clamped to [0, 8]
    return k <= 0 ? uint64_t{0} : k >= 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * k)) - 1;
  };
  return (((a[0] ^ b[0]) & low(n)) | ((a[1] ^ b[1]) & low(n - 8))) == 0;
#else
  return bytes_eq(x, y, n);
#endif
}

// Bytes x[0, n) == y[0, n) inside padded streams (Seq::bytes): blocks may read up to kBlock bytes past a position.
inline bool stream_eq(const char* x, const char* y, int64_t n) {
  return n <= kBlock ? block_eq(x, y, n) : bytes_eq(x, y, n);
}

// Token sequence as one byte stream: token i is bytes[off[i], off[i+1]); h[i] hashes it (equality = hash, length
// and memcmp, so a hash collision can never make unequal tokens equal). `bytes` holds at least kBlock bytes past
// the stream (padding: zeros, or whatever a reused buffer held), so block_eq may read a block at any position.
struct Seq {
  std::string bytes = std::string(kBlock, '\0');
  Buf<int64_t> off{0};
  Buf<uint64_t> h;
  Buf<uint8_t> cls;  // per token Special bits (see below); empty = all text (the bytes API)

  void add(const char* p, int64_t n) {
    bytes.insert(bytes.size() - kBlock, p, static_cast<size_t>(n));
    off.push_back(off.back() + n);
    h.push_back(fnv1a(p, n));
  }
  int64_t total() const { return off.back(); }  // bytes of the stream
  int64_t n() const { return static_cast<int64_t>(off.size()) - 1; }
  int64_t len(int64_t i) const { return off[i + 1] - off[i]; }
  const char* at(int64_t byte) const { return bytes.data() + byte; }
};

// Bytes of S tokens [a, b) == bytes of T tokens [c, d).
inline bool span_eq(const Seq& S, int64_t a, int64_t b, const Seq& T, int64_t c, int64_t d) {
  int64_t n = S.off[b] - S.off[a];
  return n == T.off[d] - T.off[c] && bytes_eq(S.at(S.off[a]), T.at(T.off[c]), n);
}
inline bool tok_eq(const Seq& S, int64_t i, const Seq& T, int64_t j) {
  return S.h[i] == T.h[j] && span_eq(S, i, i + 1, T, j, j + 1);
}
inline bool chunk_correct(const Seq& S, int64_t s0, int64_t s1, const Seq& T, int64_t t0, int64_t t1) {
  return s1 > s0 && t1 > t0 && span_eq(S, s0, s1, T, t0, t1);
}

// Special tokens (Vocab::cls, Seq::cls; 0 = text). A special's bytes are its literal text ("<|im_start|>"), so the
// streams stay in sync where the other side spells the same markup as text pieces; kSpecial keeps it from ever
// being equal to text (mark_specials). Role bits say which specials of two tokenizers stand for the same thing.
enum Special : uint8_t { kSpecial = 1, kBos = 2, kEos = 4, kEot = 8, kUnk = 16, kSpecialBits = 31 };
constexpr uint8_t kRoleBits = kBos | kEos | kEot;

// Two specials with a common role (never <unk>): the DP scores them as a match, so <|eot_id|> meets <|im_end|>.
inline bool role_eq(const Seq& S, int64_t i, const Seq& T, int64_t j) {
  if (S.cls.empty() || T.cls.empty()) return false;
  const uint8_t a = S.cls[i], b = T.cls[j];
  return (a & b & kRoleBits) && !((a | b) & kUnk);
}

// ---------------------------------------------------------------------------------------------------------------
// Offset merge, O(n+m). Closes a chunk wherever both sides' byte ends coincide. Zero-width tokens met at a chunk
// boundary become one-sided gap chunks (student side first); inside an open chunk they are absorbed. If one side
// runs out first (texts differ or were truncated) the open chunk is emitted incorrect and the rest become gaps.
// correct = ends coincide and the first tokens start at the same byte (both sides cover one byte range).
inline Result merge_offsets(const int64_t* ss, const int64_t* se, int64_t n, const int64_t* ts, const int64_t* te,
                            int64_t m) {
  Result r;
  r.chunks.reserve(static_cast<size_t>(4 * std::min(n, m) + 16));  // typical K <= min(n, m); grows if not
  r.correct.reserve(static_cast<size_t>(std::min(n, m) + 4));
  int64_t i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && ss[i] == se[i]) { r.push(i, i + 1, j, j, false); ++i; continue; }
    if (j < m && ts[j] == te[j]) { r.push(i, i, j, j + 1, false); ++j; continue; }
    if (i == n) { r.push(i, i, j, j + 1, false); ++j; continue; }
    if (j == m) { r.push(i, i + 1, j, j, false); ++i; continue; }
    int64_t i0 = i, j0 = j, a = se[i++], b = te[j++];
    while (a != b) {
      if (a < b) { if (i == n) break; a = se[i++]; }
      else { if (j == m) break; b = te[j++]; }
    }
    r.push(i0, i, j0, j, a == b && ss[i0] == ts[j0]);
  }
  return r;
}

inline void check_offsets(const int64_t* s, const int64_t* e, int64_t n, const char* side) {
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] < 0 || s[i] > e[i])
      throw std::invalid_argument(std::string(side) + " offsets: need 0 <= start <= end at token " + std::to_string(i));
    if (i > 0 && e[i] < e[i - 1])
      throw std::invalid_argument(std::string(side) + " offsets: ends must be non-decreasing (token " +
                                  std::to_string(i) + ")");
  }
}

// Offset merge over cumulative canonical byte lengths (token streams, no text offsets); correct by bytes. A leading
// run of BOS-role specials and a trailing run of EOS / end-of-turn specials are zero-width here, as the text path's
// offsets give a template's BOS / EOS (0, 0): counted as their literal bytes, a BOS on one side only (Llama-3 against
// Qwen3) shifted every later byte end of that side and left no chunk correct. Other specials keep their literal
// bytes, so a special spelled as text pieces by the other side stays in sync.
inline const int64_t* text_ends(const Seq& X, std::vector<int64_t>& ends) {
  const int64_t n = X.n();
  if (X.cls.empty() || n == 0) return X.off.data();
  int64_t lead = 0, tail = n;
  while (lead < n && (X.cls[lead] & kBos)) ++lead;
  while (tail > lead && (X.cls[tail - 1] & (kEos | kEot))) --tail;
  if (lead == 0 && tail == n) return X.off.data();
  ends.resize(static_cast<size_t>(n + 1));
  ends[0] = 0;
  for (int64_t k = 0; k < n; ++k) ends[k + 1] = ends[k] + (k < lead || k >= tail ? 0 : X.len(k));
  return ends.data();
}
inline Result merge_streams(const Seq& S, const Seq& T) {
  std::vector<int64_t> s_ends, t_ends;
  const int64_t* so = text_ends(S, s_ends);
  const int64_t* to = text_ends(T, t_ends);
  Result r = merge_offsets(so, so + 1, S.n(), to, to + 1, T.n());
  for (int64_t k = 0; k < r.size(); ++k) {
    const int64_t* c = &r.chunks[4 * k];
    r.correct[k] = chunk_correct(S, c[0], c[1], T, c[2], c[3]);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// DP (METHOD.md §4.1-4.2). Scores in half units so everything is exact integer math:
// match (equal bytes, or two specials sharing a role: role_eq) +6 / mismatch -6 (alpha_exact 3), gap -3 (alpha_gap -1.5), 1-to-k / k-to-1 (k <= 4) +3k (alpha_comb*k),
// the latter only when the concatenations are equal. Tie-breaking: diag first, then up (student token unaligned),
// left (teacher token unaligned), 1-to-k for k=2..4, k-to-1 for k=2..4, each replacing only if strictly greater.
// Cell (i, j) = i student and j teacher tokens consumed. Row i is evaluated only for j in [lo[i], hi[i]].
constexpr int kMaxComb = 4;
enum Move : uint8_t { kDiag = 0, kUp = 1, kLeft = 2, kOneToK = 3 /* +k-2 */, kKToOne = 6 /* +k-2 */ };

struct Pair {
  int64_t s0, s1, t0, t1;
  bool ok;
};

// Rows of the band. Full DP when n*m <= full_cells, else a band of half-width W around the guide
// c(i) = teacher boundary at byte floor(b_i * B_T / B_S), b_i = student boundary byte (segment-relative):
// lo(i) = max(0, c(i) - W), hi(i) = min(m, c(i+1) + W), c(n+1) = m, lo(0) = 0. Then lo(i) <= hi(i-1), both are
// non-decreasing and hi(n) = m, so every in-band cell is reachable and (n, m) is in the band.
inline void band_rows(const Seq& S, int64_t sa, int64_t n, const Seq& T, int64_t ta, int64_t m, const Params& p,
                      std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
  lo.assign(n + 1, 0);
  hi.assign(n + 1, m);
  if (n * m <= p.full_cells) return;
  const int64_t BS = S.off[sa + n] - S.off[sa], BT = T.off[ta + m] - T.off[ta];
  std::vector<int64_t> c(n + 2, m);
  int64_t j = 0;
  for (int64_t i = 0; i <= n; ++i) {
    int64_t b = BS > 0 ? (S.off[sa + i] - S.off[sa]) * BT / BS : 0;
    while (j < m && T.off[ta + j + 1] - T.off[ta] <= b) ++j;
    c[i] = j;
  }
  for (int64_t i = 0; i <= n; ++i) {
    lo[i] = i == 0 ? 0 : std::max<int64_t>(0, c[i] - p.band);
    hi[i] = std::min(m, c[i + 1] + p.band);
  }
}

// Runs the DP over S[sa, sa+n) x T[ta, ta+m); appends the backtraced pairs (absolute indices); returns D(n, m)
// in half units. Memory: one move byte per in-band cell plus 5 score rows (k-to-1 looks back up to 4 rows).
inline int64_t dp_segment(const Seq& S, int64_t sa, int64_t n, const Seq& T, int64_t ta, int64_t m,
                          const Params& p, std::vector<Pair>& out) {
  if (n == 0 || m == 0) {  // only gaps are possible
    for (int64_t i = 0; i < n; ++i) out.push_back({sa + i, sa + i + 1, ta, ta, false});
    for (int64_t j = 0; j < m; ++j) out.push_back({sa, sa, ta + j, ta + j + 1, false});
    return -3 * (n + m);
  }
  std::vector<int64_t> lo, hi;
  band_rows(S, sa, n, T, ta, m, p, lo, hi);
  std::vector<int64_t> row_at(n + 2, 0);
  for (int64_t i = 0; i <= n; ++i) row_at[i + 1] = row_at[i] + (hi[i] - lo[i] + 1);
  std::vector<uint8_t> mv(static_cast<size_t>(row_at[n + 1]));
  std::vector<int64_t> ring[kMaxComb + 1];
  const int64_t* so = S.off.data() + sa;
  const int64_t* to = T.off.data() + ta;
  const uint64_t* sh = S.h.data() + sa;
  const uint64_t* th = T.h.data() + ta;

  for (int64_t i = 0; i <= n; ++i) {
    std::vector<int64_t>& cur = ring[i % (kMaxComb + 1)];
    cur.assign(hi[i] - lo[i] + 1, 0);
    int64_t* C = cur.data() - lo[i];  // C[j] = D(i, j)
    uint8_t* mrow = mv.data() + row_at[i] - lo[i];
    // Rows i-k (k = 1..4) that exist: R[k][j] = D(i-k, j) for j in [RL[k], RH[k]].
    const int64_t* R[kMaxComb + 1] = {};
    int64_t RL[kMaxComb + 1] = {}, RH[kMaxComb + 1] = {};
    const int64_t kmax_row = std::min<int64_t>(i, kMaxComb);
    for (int64_t k = 1; k <= kmax_row; ++k) {
      R[k] = ring[(i - k) % (kMaxComb + 1)].data() - lo[i - k];
      RL[k] = lo[i - k];
      RH[k] = hi[i - k];
    }
    const int64_t sl = i > 0 ? so[i] - so[i - 1] : 0;  // bytes of student token i-1
    for (int64_t j = lo[i]; j <= hi[i]; ++j) {
      if (i == 0 && j == 0) { C[0] = 0; mrow[0] = kDiag; continue; }
      int64_t best = 0;
      int mvb = -1;
      auto offer = [&](int64_t score, int code) {
        if (mvb < 0 || score > best) { best = score; mvb = code; }
      };
      const bool up_row = i > 0;
      if (up_row && j > 0 && j - 1 >= RL[1] && j - 1 <= RH[1]) {
        const bool eq = (sh[i - 1] == th[j - 1] && sl == to[j] - to[j - 1] &&
                         std::memcmp(S.at(so[i - 1]), T.at(to[j - 1]), static_cast<size_t>(sl)) == 0) ||
                        role_eq(S, sa + i - 1, T, ta + j - 1);
        offer(R[1][j - 1] + (eq ? 6 : -6), kDiag);
      }
      if (up_row && j >= RL[1] && j <= RH[1]) offer(R[1][j] - 3, kUp);
      if (j > lo[i]) offer(C[j - 1] - 3, kLeft);
      if (up_row) {  // 1-to-k: student token i-1 == teacher tokens [j-k, j)
        for (int64_t k = 2; k <= std::min<int64_t>(j, kMaxComb); ++k)
          if (j - k >= RL[1] && j - k <= RH[1] && to[j] - to[j - k] == sl &&
              (sl == 0 || *S.at(so[i - 1]) == *T.at(to[j - k])) &&
              std::memcmp(S.at(so[i - 1]), T.at(to[j - k]), static_cast<size_t>(sl)) == 0)
            offer(R[1][j - k] + 3 * k, kOneToK + static_cast<int>(k) - 2);
      }
      if (j > 0) {  // k-to-1: student tokens [i-k, i) == teacher token j-1
        const int64_t tl = to[j] - to[j - 1];
        for (int64_t k = 2; k <= kmax_row; ++k)
          if (j - 1 >= RL[k] && j - 1 <= RH[k] && so[i] - so[i - k] == tl &&
              (tl == 0 || *S.at(so[i - k]) == *T.at(to[j - 1])) &&
              std::memcmp(S.at(so[i - k]), T.at(to[j - 1]), static_cast<size_t>(tl)) == 0)
            offer(R[k][j - 1] + 3 * k, kKToOne + static_cast<int>(k) - 2);
      }
      C[j] = best;
      mrow[j] = static_cast<uint8_t>(mvb);
    }
  }
  const int64_t score = ring[n % (kMaxComb + 1)][m - lo[n]];
  std::vector<Pair> rev;
  for (int64_t i = n, j = m; i > 0 || j > 0;) {
    const int code = mv[row_at[i] + j - lo[i]];
    int64_t di = 1, dj = 1;
    bool ok = true;
    if (code == kDiag) ok = tok_eq(S, sa + i - 1, T, ta + j - 1) || role_eq(S, sa + i - 1, T, ta + j - 1);
    else if (code == kUp) { dj = 0; ok = false; }
    else if (code == kLeft) { di = 0; ok = false; }
    else if (code < kKToOne) dj = code - kOneToK + 2;
    else di = code - kKToOne + 2;
    rev.push_back({sa + i - di, sa + i, ta + j - dj, ta + j, ok});
    i -= di;
    j -= dj;
  }
  out.insert(out.end(), rev.rbegin(), rev.rend());
  return score;
}

// ---------------------------------------------------------------------------------------------------------------
// Anchors: 3-grams of tokens that occur exactly once on each side and are equal. Every such gram (p, q) anchors
// the token pairs (p+d, q+d), d = 0..2. The chain is a longest strictly increasing (in both sides) subsequence of
// the distinct anchored pairs: pairs sorted by (s asc, t desc), patience LIS on t with lower_bound, ties resolved
// by the first pair that reached a length (deterministic; the reference does exactly the same).
constexpr int kGram = 3;

inline uint64_t gram_key(const Seq& S, int64_t p) {
  uint64_t k = 0;
  for (int d = 0; d < kGram; ++d) k = (k ^ S.h[p + d]) * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(d);
  return k;
}

// Unique grams of S[a, b): key -> start, or -1 when the key repeats.
inline std::unordered_map<uint64_t, int64_t> unique_grams(const Seq& S, int64_t a, int64_t b) {
  std::unordered_map<uint64_t, int64_t> u;
  u.reserve(static_cast<size_t>(std::max<int64_t>(0, b - a)));
  for (int64_t p = a; p + kGram <= b; ++p) {
    auto it = u.emplace(gram_key(S, p), p);
    if (!it.second) it.first->second = -1;
  }
  return u;
}

inline std::vector<std::pair<int64_t, int64_t>> anchor_chain(const Seq& S, int64_t sa, int64_t sb, const Seq& T,
                                                             int64_t ta, int64_t tb) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  if (sb - sa < kGram || tb - ta < kGram) return pairs;
  auto us = unique_grams(S, sa, sb);
  auto ut = unique_grams(T, ta, tb);
  for (const auto& [key, p] : us) {
    if (p < 0) continue;
    auto it = ut.find(key);
    if (it == ut.end() || it->second < 0) continue;
    const int64_t q = it->second;
    bool eq = true;
    for (int d = 0; d < kGram && eq; ++d) eq = tok_eq(S, p + d, T, q + d);
    if (eq)
      for (int d = 0; d < kGram; ++d) pairs.emplace_back(p + d, q + d);
  }
  std::sort(pairs.begin(), pairs.end(), [](const auto& x, const auto& y) {
    return x.first != y.first ? x.first < y.first : x.second > y.second;
  });
  pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
  std::vector<int64_t> tails_t, tails_i, prev(pairs.size(), -1);
  for (size_t k = 0; k < pairs.size(); ++k) {
    const size_t pos = std::lower_bound(tails_t.begin(), tails_t.end(), pairs[k].second) - tails_t.begin();
    if (pos > 0) prev[k] = tails_i[pos - 1];
    if (pos == tails_t.size()) { tails_t.push_back(pairs[k].second); tails_i.push_back(static_cast<int64_t>(k)); }
    else { tails_t[pos] = pairs[k].second; tails_i[pos] = static_cast<int64_t>(k); }
  }
  std::vector<std::pair<int64_t, int64_t>> chain;
  for (int64_t k = tails_i.empty() ? -1 : tails_i.back(); k >= 0; k = prev[k]) chain.push_back(pairs[k]);
  std::reverse(chain.begin(), chain.end());
  return chain;
}

// ---------------------------------------------------------------------------------------------------------------
// Post-processing of the DP pairs (replaces the release's two steps, see METHOD.md §4.3; deviations: no
// "last 20%" exemption, windows may include correct neighbours):
// 1. a maximal run of consecutive non-correct pairs (mismatched diagonals, gaps) whose concatenated bytes are
//    equal on both sides becomes one correct many-to-many chunk (["ab","c"]|["a","bc"] -> 2-to-2; ["12345"] |
//    5 digits -> 1-to-5);
// 2. otherwise, for each non-correct pair k (left to right): the smallest window of 2..10 consecutive pairs that
//    contains k, does not reach left of the last chunk already fixed, and has equal bytes, becomes one correct
//    chunk (smallest size first, then leftmost start); with no such window the pair stays as it is (a lone BOS gap
//    stays a gap).
constexpr int64_t kMaxWindow = 10;

inline Result postprocess(const Seq& S, const Seq& T, const std::vector<Pair>& pr) {
  Result r;
  const int64_t P = static_cast<int64_t>(pr.size());
  auto equal = [&](int64_t l, int64_t h) {  // pairs [l, h)
    return chunk_correct(S, pr[l].s0, pr[h - 1].s1, T, pr[l].t0, pr[h - 1].t1);
  };
  auto emit = [&](int64_t l, int64_t h, bool ok) {
    r.push(pr[l].s0, pr[h - 1].s1, pr[l].t0, pr[h - 1].t1, ok);
  };
  // Step 1 asks, for every k of a run, whether the run's suffix [k, e) is equal. The run end e and the common
  // byte suffix of both sides ending at pair e-1 (`tail`) are computed once per run, so each question is O(1):
  // [k, e) is equal iff both sides have the same byte length and that length is <= tail. Linear in the run.
  int64_t e = 0, tail = 0;
  int64_t floor = 0;  // windows may not start before this pair index
  for (int64_t k = 0; k < P;) {
    if (pr[k].ok) { emit(k, k + 1, true); ++k; continue; }
    if (e <= k) {  // first visit of this run
      for (e = k; e < P && !pr[e].ok;) ++e;
      const int64_t se = S.off[pr[e - 1].s1], te = T.off[pr[e - 1].t1];
      const int64_t lim = std::min(se - S.off[pr[k].s0], te - T.off[pr[k].t0]);
      for (tail = 0; tail < lim && S.bytes[se - 1 - tail] == T.bytes[te - 1 - tail];) ++tail;
    }
    const int64_t ls = S.off[pr[e - 1].s1] - S.off[pr[k].s0], lt = T.off[pr[e - 1].t1] - T.off[pr[k].t0];
    if (pr[k].s0 < pr[e - 1].s1 && pr[k].t0 < pr[e - 1].t1 && ls == lt && ls <= tail) {
      emit(k, e, true);
      k = floor = e;
      continue;
    }
    int64_t wl = -1, wh = -1;
    for (int64_t size = 2; size <= kMaxWindow && wl < 0; ++size)
      for (int64_t l = std::max(floor, k - size + 1); l <= k && l + size <= P; ++l)
        if (equal(l, l + size)) { wl = l; wh = l + size; break; }
    if (wl < 0) { emit(k, k + 1, false); k = floor = k + 1; continue; }
    r.correct.resize(r.correct.size() - static_cast<size_t>(k - wl));  // un-emit the correct pairs [wl, k)
    r.chunks.resize(r.chunks.size() - static_cast<size_t>(4 * (k - wl)));
    emit(wl, wh, true);
    k = floor = wh;
  }
  return r;
}

// Full DP pipeline over S[sa, sb) x T[ta, tb): anchors, DP per segment between anchors, post-processing.
inline Result dp_align(const Seq& S, int64_t sa, int64_t sb, const Seq& T, int64_t ta, int64_t tb, const Params& p) {
  std::vector<Pair> pairs;
  int64_t i = sa, j = ta;
  for (const auto& [s, t] : anchor_chain(S, sa, sb, T, ta, tb)) {
    dp_segment(S, i, s - i, T, j, t - j, p, pairs);
    pairs.push_back({s, s + 1, t, t + 1, true});
    i = s + 1;
    j = t + 1;
  }
  dp_segment(S, i, sb - i, T, j, tb - j, p, pairs);
  return postprocess(S, T, pairs);
}

// ---------------------------------------------------------------------------------------------------------------
// auto: walk both byte streams; while they agree, chunks come from the offset merge on cumulative byte lengths.
// At a chunk whose bytes differ, resync: among boundary pairs (i', j') != (i, j) with i' - i <= lookahead and
// j' - j <= lookahead whose suffixes agree on their next `gram` bytes (or are equal and shorter than that),
// take the one skipping the fewest bytes (bytes(S[i:i']) + bytes(T[j:j'])), ties -> smaller i', then smaller j'.
// A candidate must skip at least `agree` bytes on one side, `agree` = the length of the common prefix of both
// streams from (i, j): inside that prefix the streams are the same text, so a candidate there on another byte
// diagonal is only a repeat of it (periodic text); skipping past it also bounds the work (each failed walk is paid
// for by the bytes it lets the next step skip, where re-walking after a 1-token step made repeats quadratic).
// The window [i, i') x [j, j') goes through dp_align. No resync point -> dp_align over the whole rest.

// Key of the suffix starting at byte b of a stream of total length B: hash of its next min(gram, B-b) bytes.
inline uint64_t suffix_key(const Seq& S, int64_t b, int64_t gram) {
  const int64_t n = std::min(gram, S.total() - b);
  return fnv1a(S.at(b), n) ^ static_cast<uint64_t>(n);
}
inline bool suffix_eq(const Seq& S, int64_t a, const Seq& T, int64_t b, int64_t gram) {
  const int64_t ra = S.total() - a, rb = T.total() - b;
  if (ra < gram || rb < gram) return ra == rb && std::memcmp(S.at(a), T.at(b), static_cast<size_t>(ra)) == 0;
  return std::memcmp(S.at(a), T.at(b), static_cast<size_t>(gram)) == 0;
}

inline std::pair<int64_t, int64_t> resync(const Seq& S, int64_t i, const Seq& T, int64_t j, int64_t agree,
                                          const Params& p) {
  const int64_t ie = std::min(S.n(), i + p.lookahead), je = std::min(T.n(), j + p.lookahead);
  std::vector<uint64_t> ks;
  for (int64_t a = i; a <= ie; ++a) ks.push_back(suffix_key(S, S.off[a], p.gram));
  int64_t bi = -1, bj = -1, bcost = 0;
  for (int64_t b = j; b <= je; ++b) {
    const int64_t ct = T.off[b] - T.off[j];
    if (bi >= 0 && ct > bcost) break;  // costs only grow with b
    const uint64_t kt = suffix_key(T, T.off[b], p.gram);
    for (int64_t a = i; a <= ie; ++a) {  // first (smallest-cost) verified match for this b
      const int64_t cs = S.off[a] - S.off[i], cost = cs + ct;
      if (bi >= 0 && (cost > bcost || (cost == bcost && a >= bi))) break;  // costs only grow with a
      if ((a == i && b == j) || (cs < agree && ct < agree) || ks[a - i] != kt ||
          !suffix_eq(S, S.off[a], T, T.off[b], p.gram))
        continue;
      bi = a; bj = b; bcost = cost;
      break;
    }
  }
  if (bi < 0) return {S.n(), T.n()};
  return {bi, bj};
}

// Appends the chunks to r (the batch API collects all pairs in one Result).
inline void auto_align(const Seq& S, const Seq& T, const Params& p, Result& r) {
  const int64_t n = S.n(), m = T.n();
  r.make_room(std::max(n, m) + 16);  // typical K <= max(n, m); grows if not
  const int64_t* so = S.off.data();
  const int64_t* to = T.off.data();
  int64_t i = 0, j = 0;
  // A chunk of > 1 token on a side from (i, j): the ends advance until they coincide, bytes compared as they go
  // (ea, eb = bytes of S[i, a), T[j, b)); false when they differ or a side runs out first.
  auto walk = [&](const char* x, const char* y, int64_t ea, int64_t eb, int64_t& a, int64_t& b) {
    for (int64_t done = 0;;) {
      const int64_t lim = std::min(ea, eb);
      if (!stream_eq(x + done, y + done, lim - done)) return false;
      done = lim;
      if (ea == eb) return true;
      if (ea < eb) {
        if (a == n) return false;
        ea = so[++a] - so[i];
      } else {
        if (b == m) return false;
        eb = to[++b] - to[j];
      }
    }
  };
  while (i < n || j < m) {
    // The common case first: a run of chunks whose bytes agree, starting with non-empty tokens on both sides
    // (1:1 equal tokens, or a successful walk). Each takes >= 1 token per side, so the run has at most `room`
    // chunks: they are written straight into that room (no per-chunk capacity check).
    const int64_t k0 = r.size(), room = std::min(n - i, m - j);
    r.make_room(room);
    r.chunks.resize(static_cast<size_t>(4 * (k0 + room)));
    r.correct.resize(static_cast<size_t>(k0 + room));
    int64_t* c = r.chunks.data() + 4 * k0;
    uint8_t* okk = r.correct.data() + k0;
    int64_t k = 0;
    while (i < n && j < m) {
      const int64_t sl = so[i + 1] - so[i], tl = to[j + 1] - to[j];
      if (sl == 0 || tl == 0) break;
      const char* x = S.at(so[i]);
      const char* y = T.at(to[j]);
      int64_t a = i + 1, b = j + 1;
      if (sl == tl ? !stream_eq(x, y, sl) : !walk(x, y, sl, tl, a, b)) break;
      c[4 * k] = i, c[4 * k + 1] = a, c[4 * k + 2] = j, c[4 * k + 3] = b;
      okk[k++] = 1;
      i = a;
      j = b;
    }
    r.chunks.resize(static_cast<size_t>(4 * (k0 + k)));
    r.correct.resize(static_cast<size_t>(k0 + k));
    if (i == n && j == m) break;
    if (i < n && S.len(i) == 0) { r.push(i, i + 1, j, j, false); ++i; continue; }  // zero-width: a gap
    if (j < m && T.len(j) == 0) { r.push(i, i, j, j + 1, false); ++j; continue; }
    // The run stopped at (i, j) on a chunk whose bytes differ (or a side ran out): resync from there. agree = the
    // common prefix of both streams from (i, j), compared a block at a time.
    int64_t agree = 0;
    if (i < n && j < m) {
      const char* x = S.at(so[i]);
      const char* y = T.at(to[j]);
      const int64_t lim = std::min(S.total() - so[i], T.total() - to[j]);
      while (agree + kBlock <= lim && block_eq(x + agree, y + agree, kBlock)) agree += kBlock;
      while (agree < lim && x[agree] == y[agree]) ++agree;
    }
    const auto [i2, j2] = resync(S, i, T, j, agree, p);
    r.append(dp_align(S, i, i2, T, j, j2, p));
    i = i2;
    j = j2;
  }
}

enum class Method { kAuto, kDp, kOffsets };

inline Method parse_method(const std::string& m) {
  if (m == "auto") return Method::kAuto;
  if (m == "dp") return Method::kDp;
  if (m == "offsets") return Method::kOffsets;
  throw std::invalid_argument("method must be 'auto', 'dp' or 'offsets', got '" + m + "'");
}

// Appends the chunks of S x T to r.
inline void align_streams(const Seq& S, const Seq& T, Method method, const Params& p, Result& r) {
  switch (method) {
    case Method::kDp: r.append(dp_align(S, 0, S.n(), T, 0, T.n(), p)); break;
    case Method::kOffsets: r.append(merge_streams(S, T)); break;
    default: auto_align(S, T, p, r);
  }
}
inline Result align_streams(const Seq& S, const Seq& T, Method method, const Params& p) {
  Result r;
  align_streams(S, T, method, p, r);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Vocabulary: canonical bytes (and special bits, if any) of every id, so id sequences turn into Seqs without Python.
struct Vocab {
  Seq table;  // token id -> bytes/hash; table.cls: empty (no specials) or one entry per id
  // What sequence() needs of a token, in one 32-byte aligned slot (never split across cache lines): hash, place in table.bytes,
  // length and, for tokens of <= kBlock bytes, the bytes themselves (zero-padded to kBlock).
  struct alignas(32) Entry {
    uint64_t h;
    uint32_t from, len;
    char head[kBlock];
  };
  Buf<Entry> entry;

  Vocab() = default;
  explicit Vocab(Seq t) : table(std::move(t)), entry(static_cast<size_t>(table.n())) {
    if (table.total() > int64_t{UINT32_MAX}) throw std::length_error("vocabulary: over 4 GiB of token bytes");
    for (int64_t id = 0; id < table.n(); ++id) {
      Entry& e = entry[id];
      e = {table.h[id], static_cast<uint32_t>(table.off[id]), static_cast<uint32_t>(table.len(id)), {}};
      std::memcpy(e.head, table.at(table.off[id]), static_cast<size_t>(std::min(table.len(id), kBlock)));
    }
  }

  // s = the Seq of ids [0, n) (in range), built in one pass over the ids into s's buffers (reused: no allocation
  // when they are large enough); specials = the positions of the special tokens. Token k's bytes go to
  // [off[k], off[k+1]), copied as one kBlock-byte block when short (the next token overwrites the excess).
  void sequence(const int64_t* ids, int64_t n, Seq& s, std::vector<int64_t>& specials) const {
    specials.clear();
    s.off.resize(static_cast<size_t>(n + 1));
    s.h.resize(static_cast<size_t>(n));
    const bool has_cls = !table.cls.empty();
    s.cls.resize(has_cls ? static_cast<size_t>(n) : 0);
    if (static_cast<int64_t>(s.bytes.size()) < 4 * n + kBlock) s.bytes.resize(static_cast<size_t>(4 * n + kBlock));
    // Locals, not members: the byte stores through char* could alias any member and force reloads.
    const Entry* ent = entry.data();
    const uint8_t* tcls = table.cls.data();
    int64_t* off = s.off.data();
    uint64_t* h = s.h.data();
    uint8_t* cls = s.cls.data();
    char* dst = &s.bytes[0];
    int64_t cap = static_cast<int64_t>(s.bytes.size()), pos = 0;
    off[0] = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t id = ids[k];
      const Entry& e = ent[id];
      const int64_t len = e.len;
      if (pos + len + kBlock > cap) {  // room for this token's copy and, after it, a block of padding
        s.bytes.resize(static_cast<size_t>(2 * (pos + len + kBlock)));
        dst = &s.bytes[0];
        cap = static_cast<int64_t>(s.bytes.size());
      }
      if (len <= kBlock) std::memcpy(dst + pos, e.head, kBlock);  // a constant size: one vector move, no call
      else std::memcpy(dst + pos, table.at(e.from), static_cast<size_t>(len));
      pos += len;
      off[k + 1] = pos;
      h[k] = e.h;
      if (has_cls && (cls[k] = tcls[id]) != 0) specials.push_back(k);
    }
    // The padding: cap >= pos + kBlock already. The buffer keeps its size (shrinking it would make the next call
    // zero-fill it again).
  }
  int64_t size() const { return table.n(); }
  uint8_t cls(int64_t id) const { return table.cls.empty() ? 0 : table.cls[id]; }
};

// Two specials make a correct 1:1 chunk when they share a role (BOS, end of sequence, end of turn) or have the
// same literal text; an unknown token never does (the texts behind two <unk>s need not be the same).
inline bool special_pair_ok(const Vocab& vs, int64_t a, const Vocab& vt, int64_t b) {
  const uint8_t cs = vs.cls(a), ct = vt.cls(b);
  if (!(cs & ct & kSpecial) || ((cs | ct) & kUnk)) return false;
  return (cs & ct & kRoleBits) || span_eq(vs.table, a, a + 1, vt.table, b, b + 1);
}

// Correct flags of the chunks that hold a special token on either side: a special is never equal to text, so
// only a 1:1 chunk of two specials can be correct (special_pair_ok). Chunks [k0, K) of r are over the ids s and t
// and tile both sides in order; s_pos / t_pos are the special positions (Vocab::sequence). Token q of a side
// lies in the first chunk whose end on that side exceeds q (binary search), so the cost is O(specials * log K).
inline void mark_specials(Result& r, const Vocab& vs, const int64_t* s, const std::vector<int64_t>& s_pos,
                          const Vocab& vt, const int64_t* t, const std::vector<int64_t>& t_pos, int64_t k0 = 0) {
  for (int side = 0; side < 2; ++side)
    for (const int64_t q : side == 0 ? s_pos : t_pos) {
      int64_t lo = k0, hi = r.size();  // first k in [lo, hi) with end_k > q
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (r.chunks[4 * mid + 2 * side + 1] > q) hi = mid;
        else lo = mid + 1;
      }
      const int64_t* c = &r.chunks[4 * lo];
      r.correct[lo] = c[1] - c[0] == 1 && c[3] - c[2] == 1 && special_pair_ok(vs, s[c[0]], vt, t[c[2]]);
    }
}

// First text token: the first non-empty token that is neither a special nor a 0xFF role marker (-1 if none).
inline int64_t first_text_token(const Seq& S) {
  for (int64_t k = 0; k < S.n(); ++k)
    if (S.len(k) > 0 && (S.cls.empty() || S.cls[k] == 0) && static_cast<uint8_t>(S.bytes[S.off[k]]) != 0xFF)
      return k;
  return -1;
}
inline bool starts_with_space(const Seq& S) {
  const int64_t k = first_text_token(S);
  return k >= 0 && S.bytes[S.off[k]] == ' ';
}
// Drop the leading b' ' of the first text token (if it has one).
inline void strip_leading_space(Seq& S) {
  const int64_t k = first_text_token(S);
  if (k < 0 || S.bytes[S.off[k]] != ' ') return;
  // shift the used bytes only: the reused buffer's size stays (its tail is block padding)
  char* b = &S.bytes[0];
  std::memmove(b + S.off[k], b + S.off[k] + 1, static_cast<size_t>(S.off[S.n()] - S.off[k] - 1));
  for (int64_t q = k + 1; q <= S.n(); ++q) --S.off[q];
  S.h[k] = fnv1a(S.at(S.off[k]), S.len(k));
}

// SentencePiece-style prefix space of one side: kPrefixNone; kPrefixAlways (a space is prepended to every text:
// always strip it); kPrefixUnlessSpace (HF Metaspace prepend_scheme="first": prepended only when the text does not
// already start with a space; strip it when the other side's text does not start with a space; two such sides
// carry the same artifact and are left alone).
enum Prefix : int { kPrefixNone = 0, kPrefixAlways = 1, kPrefixUnlessSpace = 2 };

inline void canonical_pair(Seq& S, int s_prefix, Seq& T, int t_prefix) {
  if (s_prefix == kPrefixAlways) strip_leading_space(S);
  if (t_prefix == kPrefixAlways) strip_leading_space(T);
  if (s_prefix == kPrefixUnlessSpace && t_prefix != kPrefixUnlessSpace && !starts_with_space(T))
    strip_leading_space(S);
  else if (t_prefix == kPrefixUnlessSpace && s_prefix != kPrefixUnlessSpace && !starts_with_space(S))
    strip_leading_space(T);
}

// Per-thread buffers of align_ids, reused across calls (fresh ones cost page faults), dropped when they grow large.
// Out of line: the caller keeps the returned address instead of a TLS lookup per use.
struct IdScratch {
  Seq S, T;
  std::vector<int64_t> s_pos, t_pos;
};
[[gnu::noinline]] inline IdScratch& id_scratch() {
  thread_local IdScratch w;
  return w;
}
// After a pair: a thread keeps its buffers unless they grew past 2^18 tokens or 2^22 bytes (long tokens).
inline void trim_scratch(IdScratch& w) {
  constexpr size_t kKeep = size_t{1} << 18, kKeepBytes = size_t{1} << 22;
  if (w.S.off.capacity() > kKeep || w.T.off.capacity() > kKeep || w.S.bytes.capacity() > kKeepBytes ||
      w.T.bytes.capacity() > kKeepBytes)
    w.S = Seq(), w.T = Seq();
  if (w.s_pos.capacity() > kKeep) w.s_pos = std::vector<int64_t>();
  if (w.t_pos.capacity() > kKeep) w.t_pos = std::vector<int64_t>();
}

// Everything the id path does for one pair: ids (in range) -> canonical Seqs -> chunks (appended to r) ->
// special-token rule.
inline void align_ids(const Vocab& vs, const int64_t* s, int64_t n, const Vocab& vt, const int64_t* t, int64_t m,
                      Method method, int s_prefix, int t_prefix, const Params& p, Result& r) {
  IdScratch& w = id_scratch();
  Seq &S = w.S, &T = w.T;
  std::vector<int64_t> &s_pos = w.s_pos, &t_pos = w.t_pos;
  vs.sequence(s, n, S, s_pos);
  vt.sequence(t, m, T, t_pos);
  canonical_pair(S, s_prefix, T, t_prefix);
  const int64_t k0 = r.size();
  align_streams(S, T, method, p, r);
  mark_specials(r, vs, s, s_pos, vt, t, t_pos, k0);
  trim_scratch(w);
}

// A text side's prefix mode: with prepend_scheme="first" (kPrefixUnlessSpace) no prefix space follows a special
// the text itself starts with (its first token with width, byte offsets [st, en) of its n tokens).
inline int text_prefix(int prefix, const Seq& S, const int64_t* st, const int64_t* en, int64_t n) {
  int64_t k = 0;
  while (k < n && en[k] == st[k]) ++k;
  return prefix == kPrefixUnlessSpace && k < n && !S.cls.empty() && S.cls[k] ? kPrefixNone : prefix;
}

// The text path's correct flags for one pair (align_ids' twin): the chunks r of merge_offsets over the byte
// offsets of ids s [n] and t [m] stay correct only where their canonical bytes are equal too (a normalizing
// tokenizer, e.g. NFC, maps other bytes to the same offsets), with the id path's prefix handling; then the
// special-token rule.
inline void mark_text_pair(Result& r, const Vocab& vs, const int64_t* s, const int64_t* s_st, const int64_t* s_en,
                           int64_t n, int s_prefix, const Vocab& vt, const int64_t* t, const int64_t* t_st,
                           const int64_t* t_en, int64_t m, int t_prefix) {
  IdScratch& w = id_scratch();
  vs.sequence(s, n, w.S, w.s_pos);
  vt.sequence(t, m, w.T, w.t_pos);
  canonical_pair(w.S, text_prefix(s_prefix, w.S, s_st, s_en, n), w.T, text_prefix(t_prefix, w.T, t_st, t_en, m));
  for (int64_t k = 0; k < r.size(); ++k) {
    const int64_t* c = &r.chunks[4 * k];
    r.correct[k] = r.correct[k] && chunk_correct(w.S, c[0], c[1], w.T, c[2], c[3]);
  }
  mark_specials(r, vs, s, w.s_pos, vt, t, w.t_pos);
  trim_scratch(w);
}

}  // namespace xt
