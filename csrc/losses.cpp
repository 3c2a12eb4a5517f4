// Fused P-KL over chunks of logit rows (the row-space op contract of ops.fallback.pkl_rows), fp32, dense teacher.
// Chunk k = student rows [s_lo, s_hi), teacher rows [t_lo, t_hi); A = allowed teacher columns; merged rows: all
// rows ("mean") or the first ("first", "chain"); n_s / n_t = number of merged rows.
//   p_r = softmax(z_r/τ), kept as e_r = exp((z_r − max z_r)/τ) in the gradient row and c_r = 1/Σ e_r;
//   Qraw = Wᵀ p̄, p̄ = Σ_r c_r e_r / n_s: ≤ 4 slots per student token scattered into per-worker scratch q[V_T];
//   T = mean_r log π_r with log π_r = t_r/τ − LSE_A(t_r/τ), −inf outside A ("chain": first row + Σ chain scalars);
//   Σ = Σ_A Qraw, Q = Qraw/Σ, P = e^T (for one teacher row: the LSE pass's exponentials times e^{chain − LSE});
//   L = τ² Σ_{P>0} P (T − log(Q + eps));
//   G = ∂L/∂Qraw = τ²/Σ · (M − r) with r = P/(Q + eps) (0 where P = 0), M = Σ r Q (= Σ P for eps = 0);
//   g_s = Σ_slot W_s,slot G[col] (ELL gather over the slots whose column is in A; others contribute nothing);
//   dz_r = c_r e_r ⊙ (g − c_r ⟨e_r, g⟩)/(n_s τ);  ∂L/∂W_s,slot = p̄_s G[col].
// W enters as flat slot lists (see Slots); its scatter and gather are random accesses into q (≈ 1.3 ns each, the
// largest cost), software-prefetched. exp / log are inline polynomials that vectorize (fexp, flog).
// An optional chunk_scale[k] multiplies G (so the gradients, not the loss). Chunks run in parallel; each chunk's
// output depends only on its inputs, and grad_w is reduced over fixed chunk groups in a fixed order, so the result
// is bitwise the same for every thread count. Long sums add fp32 partials of ≤ 1024 terms (16 lanes) in double.
#include "losses.hpp"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "parallel.hpp"

namespace py = pybind11;

// Floating-point exceptions are never inspected here; without this GCC may not evaluate both arms of a select
// (P > 0 ? P/Q : 0, the clamps in fexp / flog), which blocks vectorization. Values are unaffected. Functions
// defined below must not call inline library code compiled with other options (e.g. std::min) in hot loops:
// GCC does not inline across that difference, hence fmin_ / fmax_.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#if defined(__GNUC__)
#define XT_INLINE inline __attribute__((always_inline))
#else
#define XT_INLINE inline
#endif
// Hot loops get an AVX2 clone next to the baseline one (picked at load time by an ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define XT_HOT __attribute__((target_clones("avx2", "default")))
#else
#define XT_HOT
#endif

namespace xt {
namespace {

constexpr int kLanes = 16;        // independent fp32 partial sums (vectorizable without reassociation)
constexpr int64_t kBlock = 1024;  // terms per fp32 partial before it is added to a double
constexpr size_t kAhead = 24;     // prefetch distance (slots) of the random accesses to q
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = hi + lo, hi with 9 significant bits

XT_INLINE float fmin_(float a, float b) { return b < a ? b : a; }
XT_INLINE float fmax_(float a, float b) { return a < b ? b : a; }

XT_INLINE float as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

XT_INLINE int32_t as_int(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// e^x = 2^n e^r: n = rint(x/ln 2) (adding 1.5·2²³ rounds to an integer), r = x − n ln 2 ∈ [−ln2/2, ln2/2] in two
// exact-product steps, e^r by its degree-7 Taylor polynomial (truncation < 1e-8 relative), times 2^⌊n/2⌋ 2^⌈n/2⌉
// built in exponent bits (two factors, so results down to the subnormal range come out as libm's do). x < −104
// (e^x below half the smallest subnormal) gives 0, NaN stays NaN. Branch-free, so loops over it vectorize.
XT_INLINE float fexp(float x) {
  const float xc = fmin_(fmax_(x, -104.0f), 88.0f);
  const float t = xc * 1.44269504f + 12582912.0f;
  const float n = t - 12582912.0f;
  const int32_t ni = as_int(t) - as_int(12582912.0f), n1 = ni >> 1;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float y = p * as_float((n1 + 127) << 23) * as_float((ni - n1 + 127) << 23);
  return x < -104.0f ? 0.0f : y;
}

// ln x = e ln 2 + ln m for x = 2^e m, m ∈ [√½, √2); ln m = 2 atanh(s) = 2(s + s³/3 + s⁵/5 + s⁷/7 + s⁹/9) with
// s = (m − 1)/(m + 1), |s| ≤ 0.172 (truncation < 1e-9). Subnormals are scaled by 2²⁴ first; ln 0 = −inf,
// ln inf = inf, negative or NaN → NaN.
XT_INLINE float flog(float x) {
  const bool sub = x < 1.17549435e-38f;
  const int32_t b = as_int(sub ? x * 16777216.0f : x);
  int32_t e = (b >> 23) - (sub ? 127 + 24 : 127);
  float m = as_float((b & 0x007fffff) | 0x3f800000);
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e += big ? 1 : 0;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float odd = s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f))));
  const float ef = static_cast<float>(e);
  const float y = ef * kLn2Hi + (ef * kLn2Lo + (2.0f * s + 2.0f * s * odd));
  return x > 0.0f ? (x < kInf ? y : x) : (x == 0.0f ? -kInf : std::numeric_limits<float>::quiet_NaN());
}

// Σ x[0..n), n ≤ kBlock, in kLanes fp32 partials.
XT_INLINE float block_sum(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  for (; i < n; ++i) acc[0] += x[i];
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// max_i (x[i] + add[i]) (add = 0 / −inf column mask; nullptr = none).
XT_HOT float row_max(const float* x, const float* add, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -kInf;
  int64_t i = 0;
  if (add) {
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] = fmax_(acc[l], x[i + l] + add[i + l]);
    for (; i < n; ++i) acc[0] = fmax_(acc[0], x[i] + add[i]);
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] = fmax_(acc[l], x[i + l]);
    for (; i < n; ++i) acc[0] = fmax_(acc[0], x[i]);
  }
  float m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = fmax_(m, acc[l]);
  return m;
}

// out[i] = exp((x[i] − m)/τ); returns Σ out.
XT_HOT double exp_store(const float* x, float* out, int64_t n, float m, float inv_tau) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    for (int64_t i = i0; i < i0 + len; ++i) out[i] = fexp((x[i] - m) * inv_tau);
    total += block_sum(out + i0, len);
  }
  return total;
}

// out[i] = exp((x[i] − m)/τ + add[i]); returns Σ out.
XT_HOT double masked_exp_store(const float* x, const float* add, float* out, int64_t n, float m, float inv_tau) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    for (int64_t i = i0; i < i0 + len; ++i) out[i] = fexp((x[i] - m) * inv_tau + add[i]);
    total += block_sum(out + i0, len);
  }
  return total;
}

// acc[i] (= if first, else +=) (x[i] − m)/τ − shift: one teacher row's log π (without the column mask).
XT_HOT void add_log_probs(float* acc, const float* x, int64_t n, float m, float inv_tau, float shift, bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) acc[i] = (x[i] - m) * inv_tau - shift;
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += (x[i] - m) * inv_tau - shift;
  }
}

XT_HOT double plain_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) total += block_sum(x + i0, std::min(kBlock, n - i0));
  return total;
}

XT_HOT double dot(const float* a, const float* b, int64_t n) {
  float tmp[kBlock];
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    for (int64_t i = 0; i < len; ++i) tmp[i] = a[i0 + i] * b[i0 + i];
    total += block_sum(tmp, len);
  }
  return total;
}

struct KlSums {
  double loss, sum_p, sum_rq;
};

// The pass over the teacher columns: T = (src − a)·b + c + add, P = e^T given as pe·p_scale (exponentials the
// LSE pass already computed), Q = q·inv_sigma; sums of P (T − log(Q + eps)), P and r Q over P > 0; q is
// overwritten with r = P/(Q + eps) (0 where P = 0).
XT_HOT KlSums kl_pass(const float* src, const float* add, float a, float b, float c, const float* pe,
                      float p_scale, float* q, int64_t n, float inv_sigma, float eps) {
  float t_loss[kBlock], t_p[kBlock], t_rq[kBlock];
  KlSums s{0.0, 0.0, 0.0};
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    for (int64_t i = 0; i < len; ++i) {
      const float T = (src[i0 + i] - a) * b + c + add[i0 + i];
      const float P = pe[i0 + i] * p_scale;
      const float Q = q[i0 + i] * inv_sigma, Qe = Q + eps;
      const bool pos = P > 0.0f;
      const float r = pos ? P / Qe : 0.0f;
      t_loss[i] = pos ? P * (T - flog(Qe)) : 0.0f;
      t_p[i] = P;
      t_rq[i] = pos ? r * Q : 0.0f;
      q[i0 + i] = r;
    }
    s.loss += block_sum(t_loss, len);
    s.sum_p += block_sum(t_p, len);
    s.sum_rq += block_sum(t_rq, len);
  }
  return s;
}

// e[i] ← (g[i] − d) · (e[i] f): the softmax Jacobian, the g − ⟨p, g⟩ difference taken before the product.
XT_HOT void write_grad(float* e, const float* g, int64_t n, float f, float d) {
  for (int64_t i = 0; i < n; ++i) e[i] = (g[i] - d) * (e[i] * f);
}

XT_HOT void exp_all(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = fexp(x[i]);
}

XT_HOT void scale_all(const float* x, float* out, int64_t n, float f) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * f;
}

// e[i] ← (g[i] − d e[i]) f: the log-softmax Jacobian, d = p-scale · Σ g.
XT_HOT void hkl_grad(float* e, const float* g, int64_t n, float f, float d) {
  for (int64_t i = 0; i < n; ++i) e[i] = (g[i] - d * e[i]) * f;
}

// The W slots whose column is in A as 4 levels: level k holds the k-th such slot of every student row that has
// more than k of them (rows ascending). Loops run over one level's flat list: no data-dependent inner loop (a
// branch miss per student token), and the gather's g[row] += … never hits one row twice in a row.
struct Slots {
  std::vector<int32_t> row[4], col[4], slot[4];
  std::vector<float> w[4];
};

enum class Merge { kMean, kFirst, kChain };

struct PklCall {
  const float* z;        // [N_s, V_S]
  const float* t;        // [N_t, V_T]
  const int64_t* spans;  // [K, 4]
  const float* t_chain;  // [N_t] or nullptr
  const float* chunk_scale;
  int64_t V_S, V_T;
  float tau, eps;
  Merge merge;
  std::vector<float> mask_add;  // [V_T]: 0 in A, −inf outside
  Slots W;
  float* loss;  // [K]
  float* grad;  // [N_s, V_S]
};

struct Scratch {
  std::vector<float> q, g, pe, tsum, c;  // [V_T], [V_S], [V_T], [V_T] (multi-row teacher merge), [n_s]
};

// One chunk; gw (grad_w partial [V_S·4]) is accumulated into when non-null.
void pkl_chunk(const PklCall& a, int64_t k, Scratch& ws, float* gw) {
  const int64_t s_lo = a.spans[4 * k], s_hi = a.spans[4 * k + 1];
  const int64_t t_lo = a.spans[4 * k + 2], t_hi = a.spans[4 * k + 3];
  const bool mean = a.merge == Merge::kMean;
  const int64_t ns = mean ? s_hi - s_lo : 1, nt = mean ? t_hi - t_lo : 1;
  const int64_t V_S = a.V_S, V_T = a.V_T;
  const float inv_tau = 1.0f / a.tau;
  const Slots& W = a.W;
  ws.q.assign(V_T, 0.0f);
  ws.g.resize(V_S);
  ws.c.resize(ns);
  float* q = ws.q.data();
  float* g = ws.g.data();
  float* e0 = a.grad + s_lo * V_S;  // e_r of merged row r lives in its gradient row until dz overwrites it
  std::fill(e0 + ns * V_S, a.grad + s_hi * V_S, 0.0f);  // rows outside the merge get no gradient

  for (int64_t i = 0; i < ns; ++i) {  // student softmax and the scatter q += Wᵀ (c_r e_r / n_s)
    const float* z = a.z + (s_lo + i) * V_S;
    float* e = e0 + i * V_S;
    const float m = row_max(z, nullptr, V_S);
    ws.c[i] = static_cast<float>(1.0 / exp_store(z, e, V_S, m, inv_tau));
    const float f = ws.c[i] / static_cast<float>(ns);
    for (int k = 0; k < 4; ++k) {
      const int32_t *row = W.row[k].data(), *col = W.col[k].data();
      const float* w = W.w[k].data();
      const size_t n = W.w[k].size();
      for (size_t j = 0; j < n; ++j) {
        __builtin_prefetch(q + col[j + kAhead < n ? j + kAhead : j], 1);
        q[col[j]] += w[j] * (e[row[j]] * f);
      }
    }
  }

  // teacher: T = (src − ta)·tb + tc + mask, src = the single merged row or the sum of the rows' log π;
  // P = e^T = pe·p_scale
  const float* add = a.mask_add.data();
  ws.pe.resize(V_T);
  float* pe = ws.pe.data();
  const float* src = nullptr;
  float ta = 0.0f, tb = 1.0f, tc = 0.0f, p_scale = 1.0f;
  for (int64_t i = 0; i < nt; ++i) {
    const float* t = a.t + (t_lo + i) * V_T;
    float m = row_max(t, add, V_T);
    if (!(m > -kInf)) m = 0.0f;  // no allowed column: every T is −inf through the mask, P = 0
    const double sum = masked_exp_store(t, add, pe, V_T, m, inv_tau);
    const double lse = sum > 0.0 ? std::log(sum) : 0.0;
    if (nt == 1) {
      double chain = 0.0;
      if (a.merge == Merge::kChain && a.t_chain)
        for (int64_t r = t_lo + 1; r < t_hi; ++r) chain += a.t_chain[r];
      src = t, ta = m, tb = inv_tau, tc = static_cast<float>(chain - lse);
      p_scale = static_cast<float>(std::exp(chain - lse));
    } else {
      ws.tsum.resize(V_T);
      add_log_probs(ws.tsum.data(), t, V_T, m, inv_tau, static_cast<float>(lse), i == 0);
      src = ws.tsum.data(), ta = 0.0f, tb = 1.0f / static_cast<float>(nt), tc = 0.0f;
    }
  }
  if (nt > 1) masked_exp_store(src, add, pe, V_T, 0.0f, tb);

  const double sigma = plain_sum(q, V_T);
  const KlSums s = kl_pass(src, add, ta, tb, tc, pe, p_scale, q, V_T, static_cast<float>(1.0 / sigma), a.eps);
  const double tt = static_cast<double>(a.tau) * a.tau;
  a.loss[k] = static_cast<float>(tt * s.loss);
  const float M = static_cast<float>(a.eps > 0.0f ? s.sum_rq : s.sum_p);
  const float cg = static_cast<float>(tt / sigma * (a.chunk_scale ? a.chunk_scale[k] : 1.0f));

  // g_s = Σ_slot w G[col] with G = (M − r)·cg (q holds r now); grad_w += p̄_s G[col]
  std::fill(g, g + V_S, 0.0f);
  for (int k = 0; k < 4; ++k) {
    const int32_t *row = W.row[k].data(), *col = W.col[k].data(), *slot = W.slot[k].data();
    const float* w = W.w[k].data();
    const size_t n = W.w[k].size();
    if (gw) {
      for (size_t j = 0; j < n; ++j) {
        const float G = (M - q[col[j]]) * cg;
        float pbar = 0.0f;
        for (int64_t i = 0; i < ns; ++i) pbar += e0[i * V_S + row[j]] * ws.c[i];
        g[row[j]] += w[j] * G;
        gw[slot[j]] += pbar / static_cast<float>(ns) * G;
      }
    } else {
      for (size_t j = 0; j < n; ++j) {
        __builtin_prefetch(q + col[j + kAhead < n ? j + kAhead : j]);
        g[row[j]] += w[j] * ((M - q[col[j]]) * cg);
      }
    }
  }
  for (int64_t i = 0; i < ns; ++i) {
    float* e = e0 + i * V_S;
    const float d = static_cast<float>(ws.c[i] * dot(e, g, V_S));
    write_grad(e, g, V_S, ws.c[i] / (static_cast<float>(ns) * a.tau), d);
  }
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("loss kernel: " + msg);
}

// C-contiguous arrays of exactly these dtypes (the arguments are noconvert: never a silent copy).
using F32 = py::array_t<float, py::array::c_style>;
using I32 = py::array_t<int32_t, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;
using Bool = py::array_t<bool, py::array::c_style>;

Merge parse_merge(const std::string& merge) {
  if (merge == "mean") return Merge::kMean;
  if (merge == "first") return Merge::kFirst;
  check(merge == "chain", "merge must be 'mean', 'first' or 'chain', got '" + merge + "'");
  return Merge::kChain;
}

// Validates spans [K, 4]; returns which student rows lie in a chunk.
std::vector<uint8_t> check_spans(const I64& spans, int64_t N_s, int64_t N_t) {
  std::vector<uint8_t> covered(static_cast<size_t>(N_s), 0);
  for (int64_t k = 0; k < spans.shape(0); ++k) {
    const int64_t* r = spans.data() + 4 * k;
    check(0 <= r[0] && r[0] < r[1] && r[1] <= N_s && 0 <= r[2] && r[2] < r[3] && r[3] <= N_t,
          "span " + std::to_string(k) + " is empty or out of range");
    for (int64_t i = r[0]; i < r[1]; ++i) {
      check(!covered[i], "student row " + std::to_string(i) + " is in two chunks");
      covered[i] = 1;
    }
  }
  return covered;
}

// Rows outside every chunk get a zero gradient (call without the GIL).
void zero_idle_rows(float* grad, const std::vector<uint8_t>& covered, int64_t V_S, int64_t threads) {
  std::vector<int64_t> idle;
  for (size_t i = 0; i < covered.size(); ++i)
    if (!covered[i]) idle.push_back(static_cast<int64_t>(i));
  const int64_t idle_tasks = (static_cast<int64_t>(idle.size()) + 15) / 16;
  parallel_for(idle_tasks, threads, [&](int64_t b) {
    const int64_t hi = std::min<int64_t>(16 * (b + 1), idle.size());
    for (int64_t i = 16 * b; i < hi; ++i) std::fill(grad + idle[i] * V_S, grad + (idle[i] + 1) * V_S, 0.0f);
  });
}

void pkl_rows(const F32& s_logits, const F32& t_vals, const I32& w_idx, const F32& w_val, const Bool& col_mask,
              const I64& spans, double temperature, const std::string& merge, double eps,
              const std::optional<F32>& t_chain, const std::optional<F32>& chunk_scale, F32 loss, F32 grad,
              std::optional<F32> grad_w, int64_t threads) {
  check(s_logits.ndim() == 2 && t_vals.ndim() == 2, "logits must be 2-D");
  const int64_t N_s = s_logits.shape(0), V_S = s_logits.shape(1), N_t = t_vals.shape(0), V_T = t_vals.shape(1);
  check(w_idx.ndim() == 2 && w_idx.shape(0) == V_S && w_idx.shape(1) == 4 && w_val.ndim() == 2 &&
            w_val.shape(0) == V_S && w_val.shape(1) == 4,
        "w_idx / w_val must be [V_S, 4]");
  check(col_mask.ndim() == 1 && col_mask.shape(0) == V_T, "col_mask must be [V_T]");
  check(spans.ndim() == 2 && spans.shape(1) == 4, "spans must be [K, 4]");
  const int64_t K = spans.shape(0);
  check(loss.ndim() == 1 && loss.shape(0) == K, "loss must be [K]");
  check(grad.ndim() == 2 && grad.shape(0) == N_s && grad.shape(1) == V_S, "grad must be shaped like s_logits");
  check(!t_chain || (t_chain->ndim() == 1 && t_chain->shape(0) == N_t), "t_chain must be [N_t]");
  check(!chunk_scale || (chunk_scale->ndim() == 1 && chunk_scale->shape(0) == K), "chunk_scale must be [K]");
  check(!grad_w || (grad_w->ndim() == 2 && grad_w->shape(0) == V_S && grad_w->shape(1) == 4),
        "grad_w must be [V_S, 4]");
  check(temperature > 0.0 && eps >= 0.0, "need temperature > 0 and eps >= 0");
  PklCall a;
  a.merge = parse_merge(merge);
  const int64_t* sp = spans.data();
  const std::vector<uint8_t> covered = check_spans(spans, N_s, N_t);
  const int32_t* idx = w_idx.data();
  const float* wv = w_val.data();
  const bool* mask = col_mask.data();
  a.mask_add.resize(V_T);
  for (int64_t v = 0; v < V_T; ++v) a.mask_add[v] = mask[v] ? 0.0f : -kInf;
  for (int64_t s = 0; s < V_S; ++s) {
    int k = 0;
    for (int j = 0; j < 4; ++j) {
      const int32_t c = idx[4 * s + j];
      check(-1 <= c && c < V_T, "w_idx entries must lie in [-1, V_T)");
      if (c >= 0 && mask[c]) {
        a.W.row[k].push_back(static_cast<int32_t>(s));
        a.W.col[k].push_back(c);
        a.W.w[k].push_back(wv[4 * s + j]);
        a.W.slot[k++].push_back(static_cast<int32_t>(4 * s + j));
      }
    }
  }
  a.z = s_logits.data();
  a.t = t_vals.data();
  a.spans = sp;
  a.t_chain = t_chain ? t_chain->data() : nullptr;
  a.chunk_scale = chunk_scale ? chunk_scale->data() : nullptr;
  a.V_S = V_S;
  a.V_T = V_T;
  a.tau = static_cast<float>(temperature);
  a.eps = static_cast<float>(eps);
  a.loss = loss.mutable_data();
  a.grad = grad.mutable_data();
  float* gw_out = grad_w ? grad_w->mutable_data() : nullptr;

  py::gil_scoped_release nogil;
  zero_idle_rows(a.grad, covered, V_S, threads);
  std::vector<Scratch> scratch(static_cast<size_t>(resolve_threads(threads, std::max<int64_t>(K, 1))));
  if (!gw_out) {
    parallel_for_worker(K, threads, [&](int64_t k, int64_t w) { pkl_chunk(a, k, scratch[w], nullptr); });
    return;
  }
  // grad_w: fixed groups of consecutive chunks, one partial each, summed in group order
  const int64_t groups = std::min<int64_t>(K, 16);
  std::vector<std::vector<float>> part(static_cast<size_t>(groups));
  parallel_for_worker(groups, threads, [&](int64_t b, int64_t w) {
    part[b].assign(4 * V_S, 0.0f);
    for (int64_t k = K * b / groups; k < K * (b + 1) / groups; ++k) pkl_chunk(a, k, scratch[w], part[b].data());
  });
  for (int64_t j = 0; j < 4 * V_S; ++j) {
    double sum = 0.0;
    for (const auto& p : part) sum += p[j];
    gw_out[j] = static_cast<float>(sum);
  }
}


// ---- H-KL / GOLD / ULD (the row-space op contract of ops.fallback.hkl_rows), fp32, dense teacher.
//   ℓ_r = (z_r − max z_r)/τ − log Σ e_r with e_r = exp((z_r − max z_r)/τ) kept in the gradient row;
//   S = mean_r ℓ_r ("chain": first row + Σ chain scalars), T = mean_r log π_r over A (−inf outside), P = e^T;
//   L = τ² (Σ_c [P_c > 0] P_c (T[t_c] − S[s_c]) + Σ_{i<m} |a_i − b_i|), a / b = top-m of e^S on U_S / P on U_T,
//   sorted descending (top_sorted: histogram select, then a radix sort of the candidates; ties in any order);
//   gS = ∂L/∂S: −τ² P_c at s_c, τ² sign(a_i − b_i) a_i at a_i's column; dz_r = (gS − p_r Σ gS)/(n_s τ).
struct HklCall {
  const float *z, *t, *s_chain, *t_chain;  // chains: [N_s] / [N_t] or nullptr
  const int64_t* spans;
  int64_t V_S, V_T, m;
  float tau;
  Merge merge;
  std::vector<float> mask_add;          // [V_T]: 0 in A, −inf outside
  std::vector<int64_t> cs, ct, us, ut;  // common pairs (t_c ∈ A), U_S, U_T = A \ {t_c}
  float *loss, *grad, *gsum;            // [K], [N_s, V_S], [K] (Σ gS = ∂L/∂chain scalar)
};

struct HklScratch {
  std::vector<float> S, gS, T, c, pe, eS;
  std::vector<uint32_t> b, b_tmp, hist;
  std::vector<uint64_t> key, key_tmp;
};

// Moves the m largest of x[0..n) (1 ≤ m ≤ n) to x[0..m), sorted descending. Keys hold the bits of a float ≥ 0
// (ordered as the value) from bit Low up. A histogram of the top 12 of them (sign, exponent, 3 mantissa bits) finds
// the bucket of the m-th largest; the keys from that bucket up are moved to the front and LSD-radix sorted on
// the 32 value bits (3 stable passes of 11 complemented bits = descending; equal values keep an arbitrary order).
template <int Low, typename Key>
void top_sorted(Key* x, size_t n, int64_t m, std::vector<uint32_t>& hist, std::vector<Key>& tmp) {
  hist.assign(4096, 0);
  for (size_t j = 0; j < n; ++j) ++hist[x[j] >> (Low + 20)];
  int64_t count = 0;
  size_t lo = 4096;
  while (count < m) count += hist[--lo];
  size_t c = 0;
  for (size_t j = 0; j < n; ++j)
    if ((x[j] >> (Low + 20)) >= lo) std::swap(x[c++], x[j]);
  tmp.resize(c);
  Key *src = x, *dst = tmp.data();
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = Low + 11 * pass;
    hist.assign(2049, 0);
    for (size_t j = 0; j < c; ++j) ++hist[1 + (~(src[j] >> shift) & 0x7ff)];
    for (int d = 0; d < 2048; ++d) hist[d + 1] += hist[d];
    for (size_t j = 0; j < c; ++j) dst[hist[~(src[j] >> shift) & 0x7ff]++] = src[j];
    std::swap(src, dst);
  }
  std::copy(src, src + c, x);  // 3 passes: the sorted keys are in tmp
}

double chain_sum(const float* chain, int64_t lo, int64_t hi) {
  double s = 0.0;
  if (chain)
    for (int64_t r = lo + 1; r < hi; ++r) s += chain[r];
  return s;
}

void hkl_chunk(const HklCall& a, int64_t k, HklScratch& ws) {
  const int64_t s_lo = a.spans[4 * k], s_hi = a.spans[4 * k + 1];
  const int64_t t_lo = a.spans[4 * k + 2], t_hi = a.spans[4 * k + 3];
  const bool mean = a.merge == Merge::kMean, chain = a.merge == Merge::kChain;
  const int64_t ns = mean ? s_hi - s_lo : 1, nt = mean ? t_hi - t_lo : 1;
  const int64_t V_S = a.V_S, V_T = a.V_T;
  const float inv_tau = 1.0f / a.tau;
  ws.S.resize(V_S);
  ws.gS.assign(V_S, 0.0f);
  ws.T.resize(V_T);
  ws.c.resize(ns);
  float *S = ws.S.data(), *gS = ws.gS.data(), *T = ws.T.data();
  float* e0 = a.grad + s_lo * V_S;
  std::fill(e0 + ns * V_S, a.grad + s_hi * V_S, 0.0f);  // rows outside the merge get no gradient

  const float fs = 1.0f / static_cast<float>(ns);
  const double s_chain = chain ? chain_sum(a.s_chain, s_lo, s_hi) : 0.0;
  for (int64_t i = 0; i < ns; ++i) {  // S = Σ_r ℓ_r / n_s
    const float* z = a.z + (s_lo + i) * V_S;
    const float m = row_max(z, nullptr, V_S);
    const double sum = exp_store(z, e0 + i * V_S, V_S, m, inv_tau);
    ws.c[i] = static_cast<float>(1.0 / sum);
    add_log_probs(S, z, V_S, m, inv_tau, static_cast<float>(std::log(sum) - s_chain), i == 0);
  }
  if (ns > 1)
    for (int64_t v = 0; v < V_S; ++v) S[v] *= fs;

  const float* add = a.mask_add.data();
  const float ft = 1.0f / static_cast<float>(nt);
  const double t_chain = chain ? chain_sum(a.t_chain, t_lo, t_hi) : 0.0;
  ws.pe.resize(V_T);
  float* P = ws.pe.data();
  double lse = 0.0;
  for (int64_t i = 0; i < nt; ++i) {  // T = Σ_r log π_r / n_t, −inf outside A
    const float* t = a.t + (t_lo + i) * V_T;
    float m = row_max(t, add, V_T);
    if (!(m > -kInf)) m = 0.0f;  // no allowed column: T = −inf, P = 0
    const double sum = masked_exp_store(t, add, P, V_T, m, inv_tau);
    lse = sum > 0.0 ? std::log(sum) : 0.0;
    add_log_probs(T, t, V_T, m, inv_tau, static_cast<float>(lse - t_chain), i == 0);
  }
  for (int64_t v = 0; v < V_T; ++v) T[v] = (nt > 1 ? T[v] * ft : T[v]) + add[v];
  if (nt > 1) {
    exp_all(T, P, V_T);
  } else {  // one row: P = e^{t/τ − m/τ} (the LSE pass's exponentials) · e^{chain − LSE}
    scale_all(P, P, V_T, static_cast<float>(std::exp(t_chain - lse)));
  }

  const double tt = static_cast<double>(a.tau) * a.tau;
  const float ttf = static_cast<float>(tt);
  double kl = 0.0;
  for (size_t c = 0; c < a.cs.size(); ++c) {
    const float Tc = T[a.ct[c]], Pc = P[a.ct[c]];
    if (Pc > 0.0f) kl += static_cast<double>(Pc) * (Tc - S[a.cs[c]]);
    gS[a.cs[c]] = -ttf * Pc;
  }
  double l1 = 0.0;
  const int64_t m = a.m;
  if (m > 0) {
    // keys ordered as the values (bits of a float ≥ 0): b = bits of P on U_T; a = bits of e^S on U_S << 32 | id
    ws.b.resize(a.ut.size());
    uint32_t* b = ws.b.data();
    for (size_t j = 0; j < a.ut.size(); ++j) b[j] = static_cast<uint32_t>(as_int(P[a.ut[j]]));
    top_sorted<0>(b, a.ut.size(), m, ws.hist, ws.b_tmp);
    ws.eS.resize(V_S);
    float* ex = ws.eS.data();
    if (ns > 1) {
      exp_all(S, ex, V_S);
    } else {  // one row: e^S = c e · e^{chain}
      scale_all(e0, ex, V_S, static_cast<float>(ws.c[0] * std::exp(s_chain)));
    }
    ws.key.resize(a.us.size());
    uint64_t* key = ws.key.data();
    for (size_t j = 0; j < a.us.size(); ++j)
      key[j] = static_cast<uint64_t>(static_cast<uint32_t>(as_int(ex[a.us[j]]))) << 32 |
               static_cast<uint64_t>(a.us[j]);
    top_sorted<32>(key, a.us.size(), m, ws.hist, ws.key_tmp);
    for (int64_t i = 0; i < m; ++i) {
      const float ai = as_float(static_cast<int32_t>(key[i] >> 32)), d = ai - as_float(static_cast<int32_t>(b[i]));
      l1 += std::fabs(d);
      gS[key[i] & 0xffffffffu] += d > 0.0f ? ttf * ai : (d < 0.0f ? -ttf * ai : 0.0f);
    }
  }
  a.loss[k] = static_cast<float>(tt * (kl + l1));
  const double gsum = plain_sum(gS, V_S);
  a.gsum[k] = static_cast<float>(gsum);
  for (int64_t i = 0; i < ns; ++i) {  // dz_r = (gS − p_r Σ gS)/(n_s τ), p_r = c_r e_r
    float* e = e0 + i * V_S;
    hkl_grad(e, gS, V_S, fs * inv_tau, static_cast<float>(gsum) * ws.c[i]);
  }
}

void hkl_rows(const F32& s_logits, const F32& t_vals, const Bool& col_mask, const I64& spans, double temperature,
              const std::string& merge, const std::optional<F32>& s_chain, const std::optional<F32>& t_chain,
              const I64& common_s, const I64& common_t, int64_t uncommon_topk, F32 loss, F32 grad, F32 gsum,
              int64_t threads) {
  check(s_logits.ndim() == 2 && t_vals.ndim() == 2, "logits must be 2-D");
  const int64_t N_s = s_logits.shape(0), V_S = s_logits.shape(1), N_t = t_vals.shape(0), V_T = t_vals.shape(1);
  check(V_S < (int64_t{1} << 32), "V_S must be < 2^32");
  check(col_mask.ndim() == 1 && col_mask.shape(0) == V_T, "col_mask must be [V_T]");
  check(spans.ndim() == 2 && spans.shape(1) == 4, "spans must be [K, 4]");
  const int64_t K = spans.shape(0), C = common_s.ndim() == 1 ? common_s.shape(0) : -1;
  check(C >= 0 && common_t.ndim() == 1 && common_t.shape(0) == C, "common_s / common_t must be [C]");
  check(loss.ndim() == 1 && loss.shape(0) == K && gsum.ndim() == 1 && gsum.shape(0) == K, "loss / gsum must be [K]");
  check(grad.ndim() == 2 && grad.shape(0) == N_s && grad.shape(1) == V_S, "grad must be shaped like s_logits");
  check(!s_chain || (s_chain->ndim() == 1 && s_chain->shape(0) == N_s), "s_chain must be [N_s]");
  check(!t_chain || (t_chain->ndim() == 1 && t_chain->shape(0) == N_t), "t_chain must be [N_t]");
  check(temperature > 0.0, "need temperature > 0");
  HklCall a;
  a.merge = parse_merge(merge);
  const std::vector<uint8_t> covered = check_spans(spans, N_s, N_t);
  const bool* mask = col_mask.data();
  a.mask_add.resize(V_T);
  for (int64_t v = 0; v < V_T; ++v) a.mask_add[v] = mask[v] ? 0.0f : -kInf;
  std::vector<uint8_t> common_s_(V_S, 0), common_t_(V_T, 0);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t sc = common_s.data()[c], tc = common_t.data()[c];
    check(0 <= sc && sc < V_S && 0 <= tc && tc < V_T && mask[tc], "common pairs must lie in [0, V) with t_c in A");
    a.cs.push_back(sc);
    a.ct.push_back(tc);
    common_s_[sc] = common_t_[tc] = 1;
  }
  for (int64_t v = 0; v < V_S; ++v)
    if (!common_s_[v]) a.us.push_back(v);
  for (int64_t v = 0; v < V_T; ++v)
    if (mask[v] && !common_t_[v]) a.ut.push_back(v);
  a.m = std::min<int64_t>(std::min(a.us.size(), a.ut.size()), uncommon_topk < 0 ? V_S : uncommon_topk);
  a.z = s_logits.data();
  a.t = t_vals.data();
  a.s_chain = s_chain ? s_chain->data() : nullptr;
  a.t_chain = t_chain ? t_chain->data() : nullptr;
  a.spans = spans.data();
  a.V_S = V_S;
  a.V_T = V_T;
  a.tau = static_cast<float>(temperature);
  a.loss = loss.mutable_data();
  a.grad = grad.mutable_data();
  a.gsum = gsum.mutable_data();

  py::gil_scoped_release nogil;
  zero_idle_rows(a.grad, covered, V_S, threads);
  std::vector<HklScratch> scratch(static_cast<size_t>(resolve_threads(threads, std::max<int64_t>(K, 1))));
  parallel_for_worker(K, threads, [&](int64_t k, int64_t w) { hkl_chunk(a, k, scratch[w]); });
}
}  // namespace

void bind_losses(py::module_& m) {
  m.def("pkl_rows", &pkl_rows, py::arg("s_logits").noconvert(), py::arg("t_vals").noconvert(),
        py::arg("w_idx").noconvert(), py::arg("w_val").noconvert(), py::arg("col_mask").noconvert(),
        py::arg("spans").noconvert(), py::arg("temperature"), py::arg("merge"), py::arg("eps"),
        py::arg("t_chain").noconvert(), py::arg("chunk_scale").noconvert(), py::arg("loss").noconvert(),
        py::arg("grad").noconvert(), py::arg("grad_w").noconvert(), py::arg("threads") = 0,
        "Fused P-KL over chunks of fp32 rows (dense teacher): writes loss [K], grad [N_s, V_S] (every row) and, "
        "when given, grad_w [V_S, 4]. See csrc/losses.cpp for the math.");
  m.def("hkl_rows", &hkl_rows, py::arg("s_logits").noconvert(), py::arg("t_vals").noconvert(),
        py::arg("col_mask").noconvert(), py::arg("spans").noconvert(), py::arg("temperature"), py::arg("merge"),
        py::arg("s_chain").noconvert(), py::arg("t_chain").noconvert(), py::arg("common_s").noconvert(),
        py::arg("common_t").noconvert(), py::arg("uncommon_topk"), py::arg("loss").noconvert(),
        py::arg("grad").noconvert(), py::arg("gsum").noconvert(), py::arg("threads") = 0,
        "Fused H-KL / GOLD / ULD over chunks of fp32 rows (dense teacher): writes loss [K], grad [N_s, V_S] (every "
        "row) and gsum [K] (∂loss_k/∂chain scalar). See csrc/losses.cpp for the math.");
}

}  // namespace xt
