// Torch-free CPU loss kernels over chunks of logit rows, dense teacher: fused P-KL (the row-space op contract of
// ops.fallback.pkl_rows), H-KL / GOLD / ULD (ops.fallback.hkl_rows), and teacher_topk's columns. Logits fp32,
// bf16 or fp16 (student and teacher independently): math in fp32, every row converted where it is read, the gradient
// written once in the student's dtype (round to nearest even), so low-precision inputs need no fp32 copy.
// Chunk k = student rows [s_lo, s_hi), teacher rows [t_lo, t_hi); A = allowed teacher columns; merged rows: all
// rows ("mean") or the first ("first", "chain"); n_s / n_t = number of merged rows.
//
// P-KL, per chunk:
//   p_r = softmax(z_r/τ), kept as e_r = exp((z_r − max z_r)/τ) (in the gradient row for fp32 logits) and
//   c_r = 1/Σ e_r;  p̄ = Σ_r c_r e_r / n_s;  Qraw = Wᵀ p̄ over W's slots in A;  Σ = Σ_A Qraw = ⟨p̄, wsum⟩, wsum_s =
//   the sum of row s's weights in A;  T = mean_r log π_r, log π_r = t_r/τ − LSE_A(t_r/τ), −inf outside A ("chain":
//   first row + Σ chain scalars);  Q = Qraw/Σ, P = e^T;  L = τ² Σ_{P>0} P (T − log(Q + eps));
//   G = ∂L/∂Qraw = τ²/Σ · (M − r), r = P/(Q + eps) (0 where P = 0), M = Σ r Q (= Σ P for eps = 0);
//   g_s = Σ_slot W_s,slot G[col];  dz_r = c_r e_r ⊙ (g − c_r ⟨e_r, g⟩)/(n_s τ);  ∂L/∂W_s,slot = p̄_s G[col].
// Layout: chunks run in groups of kR, one per fp32 SIMD lane, so each random access of the projection serves kR
// chunks (one access per chunk and W entry, ≈ 1.3 ns each, was the largest cost). Per group:
//  - the student rows are scanned, e_r stored, and the kR p̄ rows transposed into pT[V_S][kR] (Σ on the way);
//  - the column space is A's columns when A holds at most half of V_T (teacher_topk), else all V_T columns; it is
//    cut into projection blocks of kPB columns, whose Qraw = Wᵀp̄ lanes (256 KiB) are accumulated in L2 from W's
//    entries of the block in row order (pT is swept forward), and KL blocks of kCB columns: the lanes' teacher
//    values of the block are scanned (bad input, max m_b) and transposed to lanes, and the KL terms summed
//    lane-wise with P' = e^{(t − m_b)/τ} while the next block's rows are prefetched; r' = P'/(Q + eps) goes to
//    rT[V_C][kR]. One teacher row is thus read once: the LSE, the blocks' scales f_b = e^{(m_b − max m_b)/τ} and
//    the chain enter per lane afterwards (k = e^{chain − LSE}: L = k (Σ f_b (S1_b + δ_b S0_b) + shift Σ P')).
//    Several teacher rows: Σ_r log π_r is formed first (one LSE pass per row), with f_b = 1;
//  - g = W G lane-wise from W's ELL rows (slots outside A read rT's zero row V_C; r = f_b r'), overwriting pT,
//    with ⟨p̄, g⟩ per lane on the way (= c ⟨e, g⟩ for a one-row chunk); for a small column space, from the list
//    of W's entries in A by row instead;
//  - g goes back to rows tile by tile for dz_r (a first sweep adds ⟨e_r, g⟩ up for chunks of several rows).
//
// Non-finite input (POLICY: issue 12): a chunk whose read rows hold NaN or +inf in any column (or a student row with
// no finite value), or whose chain scalars are NaN / +inf, gets loss NaN and exact-zero gradient rows (no grad_w /
// gsum part). P-KL then: no teacher mass on A (Σ P = 0) -> loss 0, zero gradient; Σ = 0 (so counted below 2^-180 and
// where τ max(1, |c|)/Σ passes fp32's range) or an infinite KL (P > 0 where Q + eps = 0) -> loss +inf, zero gradient.
// An optional chunk_scale[k] multiplies G (so the gradients, not the loss). Work items run in parallel: P-KL groups
// (fixed runs of kR chunks), H-KL chunks. SIMD lanes never mix, so a chunk's loss and gradient do not depend on its
// group, and grad_w is reduced over fixed runs of groups in a fixed order: the result is bitwise the same for every
// thread count. Long sums add fp32 partials of ≤ 1024 terms in double. exp / log are inline polynomials (fexp,
// flog) written once for scalars (loops over them vectorize) and lane vectors.
#include "losses.hpp"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "parallel.hpp"

namespace py = pybind11;

// Floating-point exceptions are never inspected here; without this GCC may not evaluate both arms of a select
// (P > 0 ? P/Q : 0, the clamps in fexp / flog), which blocks vectorization. Values are unaffected. Functions
// defined below must not call inline library code compiled with other options (e.g. std::min, std::fabs) in hot
// loops: GCC does not inline across that difference, hence fmin_ / fmax_ / fabs_.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
// The lane vectors never cross a non-inlined call by value between code built for different targets.
#pragma GCC diagnostic ignored "-Wpsabi"

#define XT_INLINE inline __attribute__((always_inline))
// Hot loops get x86-64-v4 (AVX-512) and x86-64-v3 (AVX2, FMA, F16C) clones next to the baseline one, picked at
// load time by an ifunc.
#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define XT_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XT_HOT
#endif
#if defined(__clang__)
#define XT_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define XT_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, VI{__VA_ARGS__})
#endif

namespace xt {
namespace {

constexpr int kLanes = 16;        // independent fp32 partial sums (vectorizable without reassociation)
constexpr int64_t kBlock = 1024;  // terms per fp32 partial before it is added to a double
constexpr int64_t kAhead = 48;    // prefetch distance of the random accesses (student rows in gather_lanes)
constexpr int64_t kAheadE = 128;  // (W entries in block_project)
constexpr int kR = 8;             // P-KL chunks per group = fp32 lanes of VF
constexpr int64_t kCB = 512;      // teacher columns per P-KL KL block
constexpr int64_t kPB = 8192;     // teacher columns per P-KL projection block (its Qraw lanes: 256 KiB, in L2)
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = hi + lo, hi with 9 significant bits

typedef float VF __attribute__((vector_size(4 * kR)));  // the lanes of one column
typedef int32_t VI __attribute__((vector_size(4 * kR)));
typedef uint32_t VU __attribute__((vector_size(4 * kR)));
typedef float V2 __attribute__((vector_size(8 * kR)));  // two columns (one AVX-512 register)
typedef int32_t VI2 __attribute__((vector_size(8 * kR)));
typedef uint32_t VU2 __attribute__((vector_size(8 * kR)));

// Scalar and vector forms of the few bit operations fexp / flog need, so one template serves all.
template <class F> struct IntOf { using type = int32_t; };
template <> struct IntOf<VF> { using type = VI; };
template <> struct IntOf<V2> { using type = VI2; };

XT_INLINE float as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
XT_INLINE VF as_float(VI i) { return (VF)i; }
XT_INLINE V2 as_float(VI2 i) { return (V2)i; }
XT_INLINE int32_t as_int(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
XT_INLINE VI as_int(VF f) { return (VI)f; }
XT_INLINE VI2 as_int(V2 f) { return (VI2)f; }
XT_INLINE uint32_t as_uint(float f) { return static_cast<uint32_t>(as_int(f)); }
XT_INLINE float to_float(int32_t i) { return static_cast<float>(i); }
XT_INLINE VF to_float(VI i) { return __builtin_convertvector(i, VF); }
XT_INLINE V2 to_float(VI2 i) { return __builtin_convertvector(i, V2); }
XT_INLINE float sel(bool m, float a, float b) { return m ? a : b; }
XT_INLINE VF sel(VI m, VF a, VF b) { return m ? a : b; }
XT_INLINE int32_t sel(bool m, int32_t a, int32_t b) { return m ? a : b; }
XT_INLINE VI sel(VI m, VI a, VI b) { return m ? a : b; }
XT_INLINE V2 sel(VI2 m, V2 a, V2 b) { return m ? a : b; }
XT_INLINE VI2 sel(VI2 m, VI2 a, VI2 b) { return m ? a : b; }
template <class F> XT_INLINE F fmin_(F a, F b) { return sel(b < a, b, a); }
template <class F> XT_INLINE F fmax_(F a, F b) { return sel(a < b, b, a); }
XT_INLINE float fabs_(float x) { return as_float(as_int(x) & 0x7fffffff); }

// 2^(e − 127) from a biased exponent e ∈ [1, 254]; the shift is unsigned, so out-of-range e (from a NaN argument,
// whose result is NaN anyway) is well defined.
XT_INLINE float exp2_bits(int32_t e) { return as_float(static_cast<int32_t>(static_cast<uint32_t>(e) << 23)); }
XT_INLINE VF exp2_bits(VI e) { return (VF)((VU)e << 23); }
XT_INLINE V2 exp2_bits(VI2 e) { return (V2)((VU2)e << 23); }

// e^x = 2^n e^r: n = rint(x/ln 2) (adding 1.5·2²³ rounds to an integer), r = x − n ln 2 ∈ [−ln2/2, ln2/2] in two
// exact-product steps, e^r by its degree-7 Taylor polynomial (truncation < 1e-8 relative), times 2^⌊n/2⌋ 2^⌈n/2⌉
// built in exponent bits (two factors, so results down to the subnormal range come out as libm's do). shift: e^x
// 2^shift, exact (n + shift), for x ≤ 88 − shift ln 2 (P-KL's 2^24 p: normal where p is subnormal; 2^88 p). x below
// lo = −104 − shift ln 2 (e^x 2^shift below half the smallest subnormal) gives 0, NaN stays NaN. Branch-free, so
// loops over it vectorize.
template <class F>
XT_INLINE F fexp(F x, int shift = 0) {
  using I = typename IntOf<F>::type;
  const float lo = -104.0f - 0.693147f * static_cast<float>(shift);
  const F xc = fmin_(fmax_(x, F{} + lo), F{} + 88.0f);
  const F t = xc * 1.44269504f + 12582912.0f;
  const F n = t - 12582912.0f;
  const I ni = as_int(t) - as_int(12582912.0f) + shift, n1 = ni >> 1;
  F r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  F p = F{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const F y = p * exp2_bits(n1 + 127) * exp2_bits(ni - n1 + 127);
  return sel(x < lo, F{}, y);
}

// ln x = e ln 2 + ln(1 + f) for x = 2^e (1 + f), 1 + f ∈ [√½, √2) (f exact); ln(1 + f) = f − f²/2 + f³ P(f) with
// P of degree 7 fitted to that interval (weighted least squares at Chebyshev nodes, rounded to fp32): error
// < 0.9 ulp of ln(1 + f) in fp32, no division. Subnormals are scaled by 2²⁴ first; ln 0 = −inf, ln inf = inf,
// negative or NaN → NaN.
template <class F>
XT_INLINE F flog(F x) {
  using I = typename IntOf<F>::type;
  const auto sub = x < 1.17549435e-38f;
  const I b = as_int(sel(sub, x * 16777216.0f, x));
  I e = (b >> 23) - sel(sub, I{} + (127 + 24), I{} + 127);
  F m = as_float((b & 0x007fffff) | 0x3f800000);
  const auto big = m > 1.41421356f;
  m = sel(big, 0.5f * m, m);
  e += sel(big, I{} + 1, I{});
  const F f = m - 1.0f, f2 = f * f;
  F p = F{} - 0.07362867891788483f;
  p = p * f + 0.1262032687664032f;
  p = p * f - 0.13202103972434998f;
  p = p * f + 0.14227114617824554f;
  p = p * f - 0.16621370613574982f;
  p = p * f + 0.19999825954437256f;
  p = p * f - 0.2500085234642029f;
  p = p * f + 0.3333335518836975f;
  const F ef = to_float(e);
  const F y = ef * kLn2Hi + (ef * kLn2Lo + (f + (f2 * (f * p) - 0.5f * f2)));
  return sel(x > 0.0f, sel(x < kInf, y, x), sel(x == 0.0f, F{} - kInf, F{} + kNaN));
}

// Logit dtypes: storage type T, get = exact conversion to fp32, put = fp32 rounded to nearest even (NaN stays NaN,
// overflow gives ±inf). Branch-free, so row loops over them vectorize.
typedef uint16_t VH2 __attribute__((vector_size(4 * kR)));  // 16 bf16 / fp16 words

struct Fp32 {
  using T = float;
  static XT_INLINE float get(float x) { return x; }
  static XT_INLINE V2 load16(const float* p) {
    V2 v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static XT_INLINE float put(float x) { return x; }
};
struct Bf16 {
  using T = uint16_t;
  static XT_INLINE float get(uint16_t h) { return as_float(static_cast<int32_t>(static_cast<uint32_t>(h) << 16)); }
  static XT_INLINE V2 load16(const uint16_t* p) {
    VH2 h;
    std::memcpy(&h, p, sizeof h);
    return (V2)(__builtin_convertvector(h, VU2) << 16);
  }
  static XT_INLINE uint16_t put(float f) {
    const uint32_t u = as_uint(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
  }
};
struct Fp16 {
  using T = uint16_t;
  // |h| << 13 is the value with exponent bias 15 in fp32's fields: × 2^112 rebiases normals and subnormals exactly;
  // exponent 31 (inf / NaN) becomes 255.
  static XT_INLINE float get(uint16_t h) {
    const uint32_t em = h & 0x7fffu, sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t finite = as_uint(as_float(static_cast<int32_t>(em << 13)) * 0x1p112f);
    return as_float(static_cast<int32_t>((em >= 0x7c00u ? (em << 13) | 0x7f800000u : finite) | sign));
  }
  static XT_INLINE V2 load16(const uint16_t* p) {
    VH2 h;
    std::memcpy(&h, p, sizeof h);
    const VU2 w = __builtin_convertvector(h, VU2), em = w & 0x7fffu, sign = (w & 0x8000u) << 16;
    const VU2 finite = (VU2)((V2)(em << 13) * 0x1p112f);
    return (V2)(((VI2)(em >= 0x7c00u) ? (em << 13) | 0x7f800000u : finite) | sign);
  }
  // |f| ≥ 2^16: inf (NaN: a quiet NaN); |f| < 2^-14: adding 0.5 puts the value in units of 2^-24 (the subnormal
  // spacing) in the mantissa, rounded to nearest even by the addition; otherwise rebias the exponent (−112 << 23)
  // and round the 13 dropped mantissa bits to nearest even (a carry into the exponent is the right result).
  static XT_INLINE uint16_t put(float f) {
    const uint32_t u = as_uint(f), x = u & 0x7fffffffu, sign = (u >> 16) & 0x8000u;
    const uint32_t normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;
    const uint32_t subnormal = as_uint(as_float(static_cast<int32_t>(x)) + 0.5f) - 0x3f000000u;
    const uint32_t big = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
    return static_cast<uint16_t>(sign | (x >= 0x47800000u ? big : (x < 0x38800000u ? subnormal : normal)));
  }
};

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

// max_i (x[i] + add[i]) (add = 0 / −inf column mask; nullptr = none) and whether any x[i] is NaN or +inf (over
// every column, masked or not).
struct RowScan {
  float max;
  bool nonfinite;
};

XT_INLINE V2 loadu16(const float* p) {
  V2 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class D>
XT_HOT RowScan row_scan(const typename D::T* x, const float* add, int64_t n) {
  V2 acc = V2{} - kInf;
  VI2 bad{};  // all ones in a lane once it saw NaN / +inf
  int64_t i = 0;
  if (add) {
    for (; i + 16 <= n; i += 16) {
      const V2 v = D::load16(x + i), a = v + loadu16(add + i);
      acc = sel(acc < a, a, acc);
      bad |= ~(v < kInf);
    }
  } else {
    for (; i + 16 <= n; i += 16) {
      const V2 v = D::load16(x + i);
      acc = sel(acc < v, v, acc);
      bad |= ~(v < kInf);
    }
  }
  RowScan r{-kInf, false};
  for (int l = 0; l < 16; ++l) {
    r.max = fmax_(r.max, acc[l]);
    r.nonfinite |= bad[l] != 0;
  }
  for (; i < n; ++i) {
    const float v = D::get(x[i]);
    r.max = fmax_(r.max, add ? v + add[i] : v);
    r.nonfinite |= !(v < kInf);
  }
  return r;
}

// out[i] = exp((x[i] − m)/τ) 2^shift (fexp); returns Σ out.
template <class D>
XT_HOT double exp_store(const typename D::T* x, float* out, int64_t n, float m, float inv_tau, int shift = 0) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    for (int64_t i = i0; i < i0 + len; ++i) out[i] = fexp((D::get(x[i]) - m) * inv_tau, shift);
    total += block_sum(out + i0, len);
  }
  return total;
}

// out[i] = exp((x[i] − m)/τ + add[i]) (out = nullptr: not stored); returns Σ out.
template <class D>
XT_HOT double masked_exp_sum(const typename D::T* x, const float* add, float* out, int64_t n, float m,
                             float inv_tau) {
  float tmp[kBlock];
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    float* o = out ? out + i0 : tmp;
    for (int64_t i = 0; i < len; ++i) o[i] = fexp((D::get(x[i0 + i]) - m) * inv_tau + add[i0 + i]);
    total += block_sum(o, len);
  }
  return total;
}

// acc[i] (= if first, else +=) (x[i] − m)/τ − shift: one row's log-softmax (without a column mask).
template <class D>
XT_HOT void add_log_probs(float* acc, const typename D::T* x, int64_t n, float m, float inv_tau, float shift,
                          bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) acc[i] = (D::get(x[i]) - m) * inv_tau - shift;
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += (D::get(x[i]) - m) * inv_tau - shift;
  }
}

template <class D>
XT_HOT void to_fp32(const typename D::T* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = D::get(x[i]);
}

// out[i] = x[cols[i]] in fp32.
template <class D>
XT_HOT void gather_fp32(const typename D::T* x, const int32_t* cols, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = D::get(x[cols[i]]);
}

// acc[i] (= if first, else +=) x[i]·f.
XT_HOT void add_scaled(float* acc, const float* x, int64_t n, float f, bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) acc[i] = x[i] * f;
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += x[i] * f;
  }
}

XT_HOT double plain_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) total += block_sum(x + i0, std::min(kBlock, n - i0));
  return total;
}

// Σ a[i] b[i], n ≤ kBlock, in kLanes fp32 partials.
XT_HOT float block_dot(const float* a, const float* b, int64_t n) {
  float tmp[kBlock];
  for (int64_t i = 0; i < n; ++i) tmp[i] = a[i] * b[i];
  return block_sum(tmp, n);
}

// out[i] ← (g[i] p − p d u) c, p = e[i] f: P-KL's softmax Jacobian p ⊙ (g − ⟨p, g⟩) with e f = p/u (u = 2^-24, or
// 2^-88 where Z is tiny), g scaled by 2^-24 / c and d = ⟨p, g⟩/u (unscaled it underflows where Z is tiny): the
// products are bounded where g is not (out may be e).
template <class D>
XT_HOT void write_grad(typename D::T* out, const float* e, const float* g, int64_t n, float f, float d, float u,
                       float c) {
  for (int64_t i = 0; i < n; ++i) {
    const float p = e[i] * f;
    out[i] = D::put((g[i] * p - (p * d) * u) * c);
  }
}

// out[i] ← (g[i] − d e[i]) f: the log-softmax Jacobian, d = p-scale · Σ g (out may be e).
template <class D>
XT_HOT void hkl_grad(typename D::T* out, const float* e, const float* g, int64_t n, float f, float d) {
  for (int64_t i = 0; i < n; ++i) out[i] = D::put((g[i] - d * e[i]) * f);
}

XT_HOT void exp_all(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = fexp(x[i]);
}

// ---- shared checks and helpers

void check(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("loss kernel: " + msg);
}
// A literal message builds no std::string unless the check fails (checks in per-entry loops stay cheap).
void check(bool ok, const char* msg) {
  if (!ok) check(false, std::string(msg));
}

// τ is used as fp32, with τ² and 1/τ: all three must be finite normal fp32 numbers (NaN fails the comparison).
void check_temperature(double temperature) {
  check(temperature >= 0x1p-63 && temperature < 0x1p64,
        "temperature must be a finite number in [2^-63, 2^64) (tau, tau^2 and 1/tau are fp32), got " +
            std::to_string(temperature));
}

// C-contiguous arrays of exactly these dtypes (the arguments are noconvert: never a silent copy).
using F32 = py::array_t<float, py::array::c_style>;
using I32 = py::array_t<int32_t, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;
using Bool = py::array_t<bool, py::array::c_style>;

enum class Dtype { kF32, kBF16, kF16 };

// A 2-D C-contiguous logits array: fp32, or the raw 16-bit words of bf16 / fp16 (an int16 / uint16 view).
struct Logits {
  const void* data;
  void* mut;  // non-null when writable was asked for
  int64_t rows, cols;
  Dtype dt;
};

Logits logits_arg(const py::array& x, const std::string& dtype, const char* name, bool writable) {
  const std::string n(name);
  check(x.ndim() == 2, n + " must be 2-D");
  check((x.flags() & py::array::c_style) != 0, n + " must be C-contiguous");
  Dtype dt;
  if (dtype == "float32") {
    dt = Dtype::kF32;
    check(x.dtype().is(py::dtype::of<float>()), n + ": dtype float32 needs a float32 array");
  } else {
    check(dtype == "bfloat16" || dtype == "float16",
          n + ": dtype must be 'float32', 'bfloat16' or 'float16', got '" + dtype + "'");
    dt = dtype == "bfloat16" ? Dtype::kBF16 : Dtype::kF16;
    check(x.dtype().is(py::dtype::of<int16_t>()) || x.dtype().is(py::dtype::of<uint16_t>()),
          n + ": dtype " + dtype + " needs the 16-bit words as an int16 / uint16 array");
  }
  Logits l{x.data(), nullptr, x.shape(0), x.shape(1), dt};
  if (writable) {
    check(x.writeable(), n + " must be writable");
    l.mut = const_cast<void*>(x.data());
  }
  return l;
}

size_t dtype_size(Dtype dt) { return dt == Dtype::kF32 ? 4 : 2; }

// Asks the kernel for 2 MiB pages over a large freshly allocated output that is about to be written (one page
// fault per 2 MiB instead of per 4 KiB; first-touch faults otherwise cost ≈ 0.2 s per GiB).
void advise_huge(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: failure changes nothing
#else
  (void)p;
  (void)bytes;
#endif
}

enum class Merge { kMean, kFirst, kChain };

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

// Exact-zero gradient rows [lo, hi) (all zero bits: +0 in every dtype).
void zero_rows(void* grad, size_t elem, int64_t lo, int64_t hi, int64_t V_S) {
  if (hi > lo) std::memset(static_cast<char*>(grad) + lo * V_S * elem, 0, (hi - lo) * V_S * elem);
}

// Rows outside every chunk get a zero gradient (call without the GIL).
void zero_idle_rows(void* grad, size_t elem, const std::vector<uint8_t>& covered, int64_t V_S, int64_t threads) {
  std::vector<int64_t> idle;
  for (size_t i = 0; i < covered.size(); ++i)
    if (!covered[i]) idle.push_back(static_cast<int64_t>(i));
  const int64_t idle_tasks = (static_cast<int64_t>(idle.size()) + 15) / 16;
  parallel_for(idle_tasks, threads, [&](int64_t b) {
    const int64_t hi = std::min<int64_t>(16 * (b + 1), idle.size());
    for (int64_t i = 16 * b; i < hi; ++i) zero_rows(grad, elem, idle[i], idle[i] + 1, V_S);
  });
}

double chain_sum(const float* chain, int64_t lo, int64_t hi) {
  double s = 0.0;
  if (chain)
    for (int64_t r = lo + 1; r < hi; ++r) s += chain[r];
  return s;
}

// The merged rows' maxima (student: of z_r, into m[0..ns); teacher: of t_r over A, into m[ns..ns+nt)); true when
// the chunk has bad input: a NaN or +inf in any column of those rows, or a student row without a finite value.
template <class S, class T>
bool scan_rows(const typename S::T* z, int64_t ns, int64_t V_S, const typename T::T* t, int64_t nt, int64_t V_T,
               const float* add, float* m) {
  bool bad = false;
  for (int64_t i = 0; i < ns; ++i) {
    const RowScan r = row_scan<S>(z + i * V_S, nullptr, V_S);
    m[i] = r.max;
    bad |= r.nonfinite || !(r.max > -kInf);
  }
  for (int64_t i = 0; i < nt; ++i) {
    const RowScan r = row_scan<T>(t + i * V_T, add, V_T);
    m[ns + i] = r.max;
    bad |= r.nonfinite;
  }
  return bad;
}

// Calls f.template operator()<S, T>() for the runtime dtypes (S: student logits and gradient, T: teacher).
template <class F>
void dispatch(Dtype s, Dtype t, F&& f) {
  auto with_t = [&](auto s_tag) {
    using S = decltype(s_tag);
    if (t == Dtype::kF32) return f(S{}, Fp32{});
    if (t == Dtype::kBF16) return f(S{}, Bf16{});
    return f(S{}, Fp16{});
  };
  if (s == Dtype::kF32) return with_t(Fp32{});
  if (s == Dtype::kBF16) return with_t(Bf16{});
  return with_t(Fp16{});
}

// ---- P-KL

// r[l][j] for 8 rows r[l] (8 lanes each) -> r[j][l].
XT_INLINE void transpose8(VF r[8]) {
  const VF t0 = XT_SHUFFLE(r[0], r[1], 0, 8, 1, 9, 4, 12, 5, 13), t1 = XT_SHUFFLE(r[0], r[1], 2, 10, 3, 11, 6, 14, 7, 15);
  const VF t2 = XT_SHUFFLE(r[2], r[3], 0, 8, 1, 9, 4, 12, 5, 13), t3 = XT_SHUFFLE(r[2], r[3], 2, 10, 3, 11, 6, 14, 7, 15);
  const VF t4 = XT_SHUFFLE(r[4], r[5], 0, 8, 1, 9, 4, 12, 5, 13), t5 = XT_SHUFFLE(r[4], r[5], 2, 10, 3, 11, 6, 14, 7, 15);
  const VF t6 = XT_SHUFFLE(r[6], r[7], 0, 8, 1, 9, 4, 12, 5, 13), t7 = XT_SHUFFLE(r[6], r[7], 2, 10, 3, 11, 6, 14, 7, 15);
  const VF u0 = XT_SHUFFLE(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13), u1 = XT_SHUFFLE(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const VF u2 = XT_SHUFFLE(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13), u3 = XT_SHUFFLE(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  const VF u4 = XT_SHUFFLE(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13), u5 = XT_SHUFFLE(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
  const VF u6 = XT_SHUFFLE(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13), u7 = XT_SHUFFLE(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
  r[0] = XT_SHUFFLE(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11);
  r[4] = XT_SHUFFLE(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15);
  r[1] = XT_SHUFFLE(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11);
  r[5] = XT_SHUFFLE(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15);
  r[2] = XT_SHUFFLE(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11);
  r[6] = XT_SHUFFLE(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15);
  r[3] = XT_SHUFFLE(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11);
  r[7] = XT_SHUFFLE(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15);
}
static_assert(kR == 8, "transpose8 is written for 8 lanes");

XT_INLINE VF loadu(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Column j of the kR rows src[l] as lanes, for columns [j, j + 8): out[i][l] = src[l][j + i].
XT_INLINE void lanes8(const float* const* src, int64_t j, VF out[8]) {
  for (int l = 0; l < kR; ++l) out[l] = loadu(src[l] + j);
  transpose8(out);
}

// out[j] = lanes (src[l][j] · scale[l]); Z[l] += Σ_j out[j][l] wsum[j] (fp32 partials of ≤ kBlock rows, 4 per lane).
XT_HOT void build_lanes(const float* const* src, const float* scale, int64_t n, const float* wsum, VF* out,
                        double* Z) {
  VF sc;
  for (int l = 0; l < kR; ++l) sc[l] = scale[l];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    VF acc[4] = {};
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      VF r[8];
      lanes8(src, j, r);
      for (int i = 0; i < 8; ++i) {
        out[j + i] = r[i] * sc;
        acc[i & 3] += out[j + i] * wsum[j + i];
      }
    }
    for (; j < j1; ++j) {
      for (int l = 0; l < kR; ++l) out[j][l] = src[l][j] * scale[l];
      acc[0] += out[j] * wsum[j];
    }
    const VF s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int l = 0; l < kR; ++l) Z[l] += s[l];
  }
}

// q[c] = Σ w pT[row] over the block's entries (columns relative to the block; q zeroed first, n columns).
XT_HOT void block_project(const int32_t* row, const int32_t* col, const float* w, int64_t n_entries, const VF* pT,
                          VF* q, int64_t n) {
  std::fill(q, q + n, VF{});
  for (int64_t j = 0; j < n_entries; ++j) {
    __builtin_prefetch(pT + row[j + kAheadE < n_entries ? j + kAheadE : j]);
    q[col[j]] += w[j] * pT[row[j]];
  }
}

// Per-lane teacher parameters of a P-KL group: T = (src − a)·b + c + mask; Q = q·inv, 2^24 Q = q·inv24.
template <class W>
struct KlLanes {
  W a, b, c, inv, inv24;
  float eps;
};

// Two adjacent columns' lanes as one vector, and back (register moves; GCC < 12 lacks __builtin_shufflevector).
XT_INLINE V2 join(VF a, VF b) {
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return V2{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]};
#endif
}
XT_INLINE VF half(V2 v, int h) {
#if defined(__clang__) || __GNUC__ >= 12
  return h ? __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
           : __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
#else
  const int o = 8 * h;
  return VF{v[o], v[o + 1], v[o + 2], v[o + 3], v[o + 4], v[o + 5], v[o + 6], v[o + 7]};
#endif
}

// The KL terms of one column (W = VF) or two (W = V2): r, and the sums' terms added to loss, p, rq.
template <class W>
XT_INLINE W kl_terms(W x, W add, W q, const KlLanes<W>& k, W& loss, W& p, W& rq) {
  const W T = (x - k.a) * k.b + k.c + add;
  const W P = fexp(T);
  const W Q = q * k.inv, Qe = Q + k.eps;
  // 2^24 (Q + eps) from the unrounded product: normal where Q + eps is subnormal (no bits lost to its rounding),
  // for r = 2^-24 P/(Q + eps) ≤ 2^125 and the log of a subnormal Q + eps (Q + eps = 0 keeps its −inf)
  const W Qse = q * k.inv24 + k.eps * 0x1p24f;
  const auto pos = P > 0.0f;
  const auto sub = (Qe < 0x1p-126f) & (Qe > 0.0f);
  const W r = sel(pos, P / Qse, W{});
  loss += sel(pos, P * (T - (flog(sel(sub, Qse, Qe)) - sel(sub, W{} + 16.635532f, W{}))), W{});
  p += P;
  rq += sel(pos, r * Q, W{});
  return r;
}

// The KL terms of one teacher-column block (n ≤ kCB columns; src[l] = lane l's teacher values of the block,
// add = the block's mask), two columns per vector: writes r into rT and returns the per-lane fp32 sums of
// P (T − log(Q + eps)), P and r Q over P > 0 (4 partials per lane, then the tail's, added in a fixed order).
// Prefetches next_bytes of each next[l] (the lanes' teacher rows in the next block).
struct KlSums {
  VF loss, p, rq;
};

XT_HOT void kl_block(const float* const* src, const float* add, int64_t n, const VF* q, const KlLanes<VF>& k,
                     VF* rT, KlSums* out, const char* const* next, int64_t next_bytes) {
  const KlLanes<V2> k2{join(k.a, k.a), join(k.b, k.b), join(k.c, k.c), join(k.inv, k.inv), join(k.inv24, k.inv24),
                      k.eps};
  V2 loss[2] = {}, p[2] = {}, rq[2] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    if (8 * j < next_bytes)  // one 64-byte line of each lane's next-block row per 8 columns
      for (int l = 0; l < kR; ++l) __builtin_prefetch(next[l] + 8 * j);
    VF x[8];
    lanes8(src, j, x);
    for (int i = 0; i < 8; i += 2) {
      V2 qq;
      std::memcpy(&qq, q + j + i, sizeof qq);
      const V2 r = kl_terms(join(x[i], x[i + 1]), join(VF{} + add[j + i], VF{} + add[j + i + 1]), qq, k2,
                            loss[i >> 1 & 1], p[i >> 1 & 1], rq[i >> 1 & 1]);
      std::memcpy(rT + j + i, &r, sizeof r);
    }
  }
  VF tail_loss{}, tail_p{}, tail_rq{};
  for (; j < n; ++j) {
    VF x;
    for (int l = 0; l < kR; ++l) x[l] = src[l][j];
    rT[j] = kl_terms(x, VF{} + add[j], q[j], k, tail_loss, tail_p, tail_rq);
  }
  auto total = [](const V2* v, VF tail) {
    return ((half(v[0], 0) + half(v[0], 1)) + (half(v[1], 0) + half(v[1], 1))) + tail;
  };
  out->loss = total(loss, tail_loss);
  out->p = total(p, tail_p);
  out->rq = total(rq, tail_rq);
}

// g = W G lane-wise, scaled by 2^-24/cg: g[s] = Σ_slot w (M − r[col]), r = fb[col's block] rT[col] (0 in lanes not
// kept; M, r scaled by 2^-24: r reaches 2^125 where Q is subnormal), from W's ELL rows (a slot outside A reads the
// zero row V_C), written over pT[s] (= 2^24 p̄[s]/unit: the products pT g stay bounded) after grad_w[4s + j] += Σ_l
// (pT_l[s] (M − r_l[col])) cg_l (lanes in order; slots outside A get none) when gw is given; dot[l] = Σ_s pT_l[s]
// g_l[s] (fp32 partials of ≤ kBlock rows, 4 per lane).
XT_HOT void gather_lanes(const int32_t* col, const float* w, int64_t V_S, int32_t V_C, const VF* rT, const VF* fb,
                         const VF& M, const VF& cg, const VI& keep, VF* pT, float* gw, double* dot) {
  for (int64_t s0 = 0; s0 < V_S; s0 += kBlock) {
    VF acc[4] = {};
    for (int64_t s = s0; s < std::min(V_S, s0 + kBlock); ++s) {
      const int32_t* c = col + 4 * s;
      const int32_t* ca = col + 4 * (s + kAhead < V_S ? s + kAhead : s);
      for (int j = 0; j < 4; ++j) __builtin_prefetch(rT + ca[j]);
      const float* ws = w + 4 * s;
      const VF d0 = M - fb[c[0] / kCB] * rT[c[0]], d1 = M - fb[c[1] / kCB] * rT[c[1]];
      const VF d2 = M - fb[c[2] / kCB] * rT[c[2]], d3 = M - fb[c[3] / kCB] * rT[c[3]];
      const VF p = pT[s];
      if (gw) {
        const VF d[4] = {d0, d1, d2, d3};
        for (int j = 0; j < 4; ++j) {
          if (c[j] == V_C) continue;
          const VF pg = sel(keep, (p * d[j]) * cg, VF{});
          float sum = pg[0];
          for (int l = 1; l < kR; ++l) sum += pg[l];
          gw[4 * s + j] += sum;
        }
      }
      const VF g = sel(keep, ((ws[0] * d0 + ws[1] * d1) + ws[2] * d2) + ws[3] * d3, VF{});
      acc[s & 3] += sel(keep, p * g, VF{});
      pT[s] = g;
    }
    const VF t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int l = 0; l < kR; ++l) dot[l] += t[l];
  }
}

// gather_lanes over W's entries in A listed by row (row ascending; slot = 4 row + j), for a small column space:
// runs of rows without an entry get g = 0 by a fill, without reading their p̄ (their p̄ g = 0 adds nothing to dot).
XT_HOT void gather_rows(const int32_t* slot, const int32_t* col, const float* w, int64_t n_entries, int64_t V_S,
                        const VF* rT, const VF* fb, const VF& M, const VF& cg, const VI& keep, VF* pT, float* gw,
                        double* dot) {
  int64_t e = 0;
  for (int64_t s0 = 0; s0 < V_S; s0 += kBlock) {
    const int64_t s1 = std::min(V_S, s0 + kBlock);
    VF part = {};
    for (int64_t s = s0;; ++s) {
      const int64_t next = e < n_entries ? std::min<int64_t>(slot[e] / 4, s1) : s1;  // the next row with an entry
      std::fill(pT + s, pT + next, VF{});
      if (next == s1) break;
      s = next;
      const VF p = pT[s];
      VF acc = {};
      for (; e < n_entries && slot[e] / 4 == s; ++e) {
        const VF d = M - fb[col[e] / kCB] * rT[col[e]];
        acc += w[e] * d;
        if (gw) {
          const VF pg = sel(keep, (p * d) * cg, VF{});
          float sum = pg[0];
          for (int l = 1; l < kR; ++l) sum += pg[l];
          gw[slot[e]] += sum;
        }
      }
      const VF g = sel(keep, acc, VF{});
      part += sel(keep, p * g, VF{});
      pT[s] = g;
    }
    for (int l = 0; l < kR; ++l) dot[l] += part[l];
  }
}

// out[l·stride + j] = in[j][l] for j < n.
XT_HOT void from_lanes(const VF* in, int64_t n, float* out, int64_t stride) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    VF r[8];
    for (int i = 0; i < 8; ++i) r[i] = in[j + i];
    transpose8(r);
    for (int l = 0; l < kR; ++l) std::memcpy(out + l * stride + j, &r[l], sizeof(VF));
  }
  for (; j < n; ++j)
    for (int l = 0; l < kR; ++l) out[l * stride + j] = in[j][l];
}

struct PklCall {
  const void *z, *t;  // [N_s, V_S] (student dtype), [N_t, V_T] (teacher dtype)
  void* grad;         // [N_s, V_S], student dtype
  const int64_t* spans;
  const float *t_chain, *chunk_scale;  // [N_t] / [K] or nullptr
  int64_t K, V_S, V_T;
  float tau, eps;
  Merge merge;
  std::vector<float> mask_add;        // [V_T]: 0 in A, −inf outside
  // The column space of the lane arrays: all V_T columns (a_idx empty, add_c = mask_add), or, when A holds at most
  // half of them, only A's (column j = teacher column a_idx[j], add_c = 0): the KL work then scales with |A|.
  int64_t V_C;
  std::vector<int32_t> a_idx;
  std::vector<float> add_c;           // [V_C]
  std::vector<int32_t> ell_col;       // [V_S, 4]: the slot's column (column space) if it is in A, else V_C
  std::vector<float> ell_w, wsum;     // [V_S, 4]: its weight if in A, else 0; [V_S]: Σ of the row's weights in A
  std::vector<int32_t> e_row, e_col;  // W's entries in A by (projection block, row); e_col within the block
  std::vector<float> e_w;
  std::vector<int64_t> e_blk;         // [blocks + 1]: block b's entries are [e_blk[b], e_blk[b + 1])
  std::vector<int32_t> r_slot, r_col;  // small column space: W's entries in A by row (slot 4 s + j, column)
  std::vector<float> r_w;
  float* loss;                 // [K]
};

// The column space and W in the two orders the group loops read (see PklCall).
void build_w(PklCall& a, const int32_t* idx, const float* wv, const bool* mask) {
  const int64_t V_S = a.V_S, V_T = a.V_T;
  std::vector<int32_t> remap(V_T, -1);  // teacher column -> column space, −1 outside A
  for (int64_t v = 0; v < V_T; ++v)
    if (mask[v]) remap[v] = static_cast<int32_t>(a.a_idx.size()), a.a_idx.push_back(static_cast<int32_t>(v));
  if (2 * static_cast<int64_t>(a.a_idx.size()) > V_T) {
    a.a_idx.clear();
    for (int64_t v = 0; v < V_T; ++v) remap[v] = mask[v] ? static_cast<int32_t>(v) : -1;
    a.V_C = V_T, a.add_c = a.mask_add;
  } else {
    a.V_C = static_cast<int64_t>(a.a_idx.size()), a.add_c.assign(a.V_C, 0.0f);
  }
  const int64_t V_C = a.V_C, blocks = (V_C + kPB - 1) / kPB;
  a.ell_col.assign(4 * V_S, static_cast<int32_t>(V_C));
  a.ell_w.assign(4 * V_S, 0.0f);
  a.wsum.assign(V_S, 0.0f);
  a.e_blk.assign(blocks + 1, 0);
  for (int64_t s = 0; s < V_S; ++s)
    for (int j = 0; j < 4; ++j) {
      const int32_t c = idx[4 * s + j];
      check(-1 <= c && c < V_T, "w_idx entries must lie in [-1, V_T)");
      if (c >= 0 && remap[c] >= 0) {
        a.ell_col[4 * s + j] = remap[c];
        a.ell_w[4 * s + j] = wv[4 * s + j];
        a.wsum[s] += wv[4 * s + j];
        ++a.e_blk[remap[c] / kPB + 1];
      }
    }
  for (int64_t b = 0; b < blocks; ++b) a.e_blk[b + 1] += a.e_blk[b];
  const size_t E = static_cast<size_t>(a.e_blk[blocks]);
  if (!a.a_idx.empty())
    for (int64_t i = 0; i < 4 * V_S; ++i)
      if (a.ell_col[i] != V_C)
        a.r_slot.push_back(static_cast<int32_t>(i)), a.r_col.push_back(a.ell_col[i]), a.r_w.push_back(a.ell_w[i]);
  a.e_row.resize(E), a.e_col.resize(E), a.e_w.resize(E);
  std::vector<int64_t> at(a.e_blk.begin(), a.e_blk.end() - 1);
  for (int64_t s = 0; s < V_S; ++s)  // rows ascending within each block
    for (int j = 0; j < 4; ++j) {
      const int32_t c = a.ell_col[4 * s + j];
      if (c == V_C) continue;
      const int64_t i = at[c / kPB]++;
      a.e_row[i] = static_cast<int32_t>(s), a.e_col[i] = static_cast<int32_t>(c % kPB), a.e_w[i] = a.ell_w[4 * s + j];
    }
}

// A growable heap array of lane vectors at their full size alignment: the baseline target gives VF only 16-byte
// alignment (so std::vector<VF> would too), while the AVX clones access it with 32-byte aligned loads.
class LaneArray {
 public:
  LaneArray() = default;
  LaneArray(LaneArray&& o) noexcept : p_(o.p_), cap_(o.cap_) { o.p_ = nullptr, o.cap_ = 0; }
  LaneArray& operator=(LaneArray&&) = delete;
  ~LaneArray() { std::free(p_); }
  VF* resize(size_t n) {
    if (n > cap_) {
      std::free(p_);
      p_ = static_cast<VF*>(std::aligned_alloc(64, (n * sizeof(VF) + 63) / 64 * 64));
      cap_ = p_ ? n : 0;
      if (!p_) throw std::bad_alloc();
    }
    return p_;
  }
  VF* data() const { return p_; }

 private:
  VF* p_ = nullptr;
  size_t cap_ = 0;
};

struct PklScratch {
  LaneArray pT, rT, q, fb;                   // [V_S], [V_C + 1], [kPB], [blocks + 1]
  std::vector<float> rows, tconv, gt, zero;  // lane rows (below), [kR·kCB], [kR·kBlock], [max(V_S, V_T)]
  std::vector<float> m, c;                   // row maxima; 1/Σ e_r of the group's merged student rows
  std::vector<double> dots, bsum;            // ⟨e_r, g⟩ of those rows; per block and lane: kl_block's sums
};

struct PklLane {
  enum State { kIdle, kDrop, kLive };
  State state = kIdle;
  int64_t k = 0, s_lo = 0, s_hi = 0, t_lo = 0, t_hi = 0, ns = 0, nt = 0;
  float loss = 0.0f;                 // of a dropped lane
  float* e = nullptr;                // ns fp32 rows e_r
  size_t c0 = 0;                     // its rows' c_r / dots start at ws.c[c0] / ws.dots[c0]
  const float* p = nullptr;          // p̄ = p · p_scale
  float p_scale = 0.0f;
  const void* t = nullptr;           // the teacher row when nt == 1
  float* tsum = nullptr;             // Σ_r log π_r when nt > 1
  float ta = 0.0f, tb = 0.0f, tc = -kInf;  // T = (src − ta)·tb + tc + mask (ta = m_b per block, one row)
  double chain = 0.0;                                    // Σ of its later rows' chain scalars
  double Z = 0.0, kl = 0.0, sum_p = 0.0, sum_rq = 0.0;  // Σ and the sums of kl_block
};

// One group: chunks [g kR, g kR + kR) ∩ [0, K); gw (grad_w partial [V_S·4]) is accumulated into when non-null.
template <class S, class T>
void pkl_group(const PklCall& a, int64_t g, PklScratch& ws, float* gw) {
  using ST = typename S::T;
  using TT = typename T::T;
  constexpr bool in_place = std::is_same<S, Fp32>::value;  // e_r lives in the fp32 gradient row
  const int64_t V_S = a.V_S, V_T = a.V_T, V_C = a.V_C;
  const bool compact = !a.a_idx.empty();
  const float inv_tau = 1.0f / a.tau;
  const float* mask = a.mask_add.data();  // over the teacher row
  const float* add = a.add_c.data();      // over the column space
  const ST* z = static_cast<const ST*>(a.z);
  const TT* t = static_cast<const TT*>(a.t);
  ST* out = static_cast<ST*>(a.grad);
  const size_t elem = sizeof(ST);
  const float* zero = ws.zero.data();

  PklLane lane[kR];
  size_t n_s_rows = 0, n_t_rows = 0, n_c = 0, n_m = 0;
  for (int l = 0; l < kR; ++l) {
    PklLane& L = lane[l];
    L.k = g * kR + l;
    if (L.k >= a.K) continue;
    const int64_t* sp = a.spans + 4 * L.k;
    L.s_lo = sp[0], L.s_hi = sp[1], L.t_lo = sp[2], L.t_hi = sp[3];
    const bool mean = a.merge == Merge::kMean;
    L.ns = mean ? L.s_hi - L.s_lo : 1, L.nt = mean ? L.t_hi - L.t_lo : 1;
    L.state = PklLane::kLive;
    L.c0 = n_c;
    n_c += L.ns;
    n_m = std::max<size_t>(n_m, L.ns + L.nt);
    n_s_rows += (in_place ? 0 : L.ns) + (L.ns > 1 ? 1 : 0);
    n_t_rows += L.nt > 1 ? 1 : 0;
  }
  ws.rows.resize(n_s_rows * V_S + n_t_rows * V_T);
  ws.m.resize(n_m);
  ws.c.resize(n_c);
  ws.dots.assign(n_c, 0.0);
  float* next_row = ws.rows.data();

  // e_r = 2^shift e^{(z − m)/τ} (m: the row maxima in ws.m), c_r = 2^(shift − 24)/Σ e_r, so 2^24 p_r = c_r e_r
  // 2^(24 − shift); p̄ (into pbar for several rows) and every sum of it below are 2^shift p̄. shift 24: normal where
  // p̄ is subnormal (Q = Wᵀp̄/Z keeps its bits, and its products with h, which reaches 2^149, stay bounded); 88
  // where Z is tiny (below).
  auto student_p = [&](PklLane& L, int shift, float* pbar) {
    float* c = ws.c.data() + L.c0;
    const double num = std::ldexp(1.0, shift - 24);
    for (int64_t i = 0; i < L.ns; ++i)
      c[i] = static_cast<float>(num / exp_store<S>(z + (L.s_lo + i) * V_S, L.e + i * V_S, V_S, ws.m[i], inv_tau,
                                                   shift));
    if (L.ns == 1) {
      L.p = L.e, L.p_scale = c[0] * 0x1p24f;
    } else {
      for (int64_t i = 0; i < L.ns; ++i)
        add_scaled(pbar, L.e + i * V_S, V_S, c[i] * 0x1p24f / static_cast<float>(L.ns), i == 0);
      L.p = pbar, L.p_scale = 1.0f;
    }
  };

  // per chunk: student scans (a bad row drops the chunk before any work), exponentials and p̄
  for (PklLane& L : lane) {
    if (L.state != PklLane::kLive) continue;
    L.chain = a.merge == Merge::kChain ? chain_sum(a.t_chain, L.t_lo, L.t_hi) : 0.0;
    if (scan_rows<S, T>(z + L.s_lo * V_S, L.ns, V_S, t, 0, V_T, mask, ws.m.data()) || !(L.chain < kInf)) {
      L.state = PklLane::kDrop, L.loss = kNaN;
      continue;
    }
    zero_rows(out, elem, L.s_lo + L.ns, L.s_hi, V_S);  // rows outside the merge get no gradient
    if (in_place) {
      L.e = reinterpret_cast<float*>(out) + L.s_lo * V_S;
    } else {
      L.e = next_row;
      next_row += L.ns * V_S;
    }
    student_p(L, 24, L.ns > 1 ? next_row : nullptr);
    next_row += L.ns > 1 ? V_S : 0;
  }

  bool any = false;
  for (const PklLane& L : lane) any |= L.state == PklLane::kLive;
  if (any) {
    // p̄ as lanes, and Σ
    const float* src[kR];
    float scale[kR];
    double Z[kR] = {};
    for (int l = 0; l < kR; ++l) {
      const bool live = lane[l].state == PklLane::kLive;
      src[l] = live ? lane[l].p : zero, scale[l] = live ? lane[l].p_scale : 0.0f;
    }
    VF* pT = ws.pT.resize(V_S);
    build_lanes(src, scale, V_S, a.wsum.data(), pT, Z);
    // Z below 2^-64 (the mass almost all on ids W maps nowhere, e.g. an empty W row's <|eot_id|>): that lane's e_r
    // and p̄ again as 2^88 (its products with g would be subnormal; p down to ~2^-238 kept), the lanes and Σ again
    // (Z: 2^24 Z, there 2^88 Z), unit = 2^-64 in the factors
    float unit[kR];
    bool biased = false;
    for (int l = 0; l < kR; ++l) {
      PklLane& L = lane[l];
      unit[l] = L.state == PklLane::kLive && Z[l] < 0x1p-40 ? 0x1p-64f : 1.0f;  // Z = 0 too: its p below 2^-174
      if (unit[l] == 1.0f) continue;
      biased = true;
      scan_rows<S, T>(z + L.s_lo * V_S, L.ns, V_S, t, 0, V_T, mask, ws.m.data());  // the rows' maxima again
      student_p(L, 88, const_cast<float*>(L.p));
      src[l] = L.p, scale[l] = L.p_scale;
    }
    if (biased) {
      std::fill(Z, Z + kR, 0.0);
      build_lanes(src, scale, V_S, a.wsum.data(), pT, Z);
    }

    // several teacher rows: scans, then Σ_r log π_r (one LSE pass each); a bad row drops the chunk (its lane's
    // results are discarded)
    for (PklLane& L : lane) {
      if (L.state != PklLane::kLive) continue;
      if (L.nt == 1) {
        L.t = t + L.t_lo * V_T, L.tb = inv_tau, L.tc = 0.0f;
        if (compact && row_scan<T>(t + L.t_lo * V_T, nullptr, V_T).nonfinite)  // the block scans see A only
          L.state = PklLane::kDrop, L.loss = kNaN;
        continue;
      }
      if (scan_rows<S, T>(z, 0, V_S, t + L.t_lo * V_T, L.nt, V_T, mask, ws.m.data())) {
        L.state = PklLane::kDrop, L.loss = kNaN;
        continue;
      }
      L.tsum = next_row;
      next_row += V_T;
      for (int64_t i = 0; i < L.nt; ++i) {
        const TT* ti = t + (L.t_lo + i) * V_T;
        float m = ws.m[i];
        if (!(m > -kInf)) m = 0.0f;  // no allowed column: every T is −inf through the mask, P = 0
        const double sum = masked_exp_sum<T>(ti, mask, nullptr, V_T, m, inv_tau);
        add_log_probs<T>(L.tsum, ti, V_T, m, inv_tau, static_cast<float>(sum > 0.0 ? std::log(sum) : 0.0), i == 0);
      }
      L.ta = 0.0f, L.tb = 1.0f / static_cast<float>(L.nt), L.tc = 0.0f;
    }

    // Wᵀp̄ and the KL terms, block by block. A one-row teacher is read once, here: each block b scans its values
    // (bad input, masked max m_b) and sums P' = e^{T'}, T' = (t − m_b)/τ, P' (T' − log(Q + eps)) and r' Q with
    // r' = P'/(Q + eps) written to rT; f_b = e^{(m_b − max_b m_b)/τ} brings them to one scale afterwards (and
    // scales rT's block where g reads it).
    const int64_t blocks = (V_C + kCB - 1) / kCB;
    KlLanes<VF> kp{};
    kp.eps = a.eps;
    for (int l = 0; l < kR; ++l) {
      PklLane& L = lane[l];
      L.Z = Z[l];  // 2^88 Z where Z < 2^-64: 2^24/Z is finite for Z above ~2^-190
      kp.a[l] = L.ta, kp.b[l] = L.tb, kp.c[l] = L.state == PklLane::kLive ? L.tc : -kInf;
      kp.inv[l] = L.Z > 0.0 ? static_cast<float>(1.0 / L.Z) : 0.0f;
      kp.inv24[l] = L.Z > 0.0 ? static_cast<float>(0x1p24 / L.Z) : 0.0f;
    }
    VF* rT = ws.rT.resize(V_C + 1);
    rT[V_C] = VF{};
    VF* q = ws.q.resize(kPB);
    VF* fb = ws.fb.resize(blocks + 1);  // per block: m_b, then f_b
    ws.tconv.resize(kR * kCB);
    ws.bsum.resize(3 * kR * blocks);
    bool bad[kR] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t v0 = b * kCB, n = std::min(kCB, V_C - v0);
      if (v0 % kPB == 0) {  // Qraw of the next projection block
        const int64_t pb = v0 / kPB, e0 = a.e_blk[pb];
        block_project(a.e_row.data() + e0, a.e_col.data() + e0, a.e_w.data() + e0, a.e_blk[pb + 1] - e0, pT, q,
                      std::min(kPB, V_C - v0));
      }
      for (int l = 0; l < kR; ++l) {
        const PklLane& L = lane[l];
        fb[b][l] = 0.0f;
        if (L.state != PklLane::kLive) {
          src[l] = zero + v0;
          continue;
        }
        float* conv = ws.tconv.data() + l * kCB;
        if (compact) {
          const int32_t* cols = a.a_idx.data() + v0;
          if (L.nt > 1) {
            gather_fp32<Fp32>(L.tsum, cols, conv, n);
          } else {
            gather_fp32<T>(static_cast<const TT*>(L.t), cols, conv, n);
          }
          src[l] = conv;
          if (L.nt > 1) continue;
        } else if (L.nt > 1) {
          src[l] = L.tsum + v0;
          continue;
        } else if (std::is_same<T, Fp32>::value) {
          src[l] = static_cast<const float*>(L.t) + v0;
        } else {
          to_fp32<T>(static_cast<const TT*>(L.t) + v0, conv, n);
          src[l] = conv;
        }
        const RowScan r = row_scan<Fp32>(src[l], add + v0, n);
        bad[l] |= r.nonfinite;
        fb[b][l] = r.max;
        kp.a[l] = r.max > -kInf ? r.max : 0.0f;  // no allowed column in the block: every T' is −inf, P' = 0
      }
      const char* next[kR];  // the rows' next block, prefetched during this one (all columns only)
      for (int l = 0; l < kR; ++l)
        next[l] = lane[l].state == PklLane::kLive && lane[l].nt == 1 && !compact
                      ? reinterpret_cast<const char*>(static_cast<const TT*>(lane[l].t) + std::min(v0 + kCB, V_C - 1))
                      : reinterpret_cast<const char*>(zero);
      KlSums sums;
      kl_block(src, add + v0, n, q + v0 % kPB, kp, rT + v0, &sums, next,
               compact ? 0 : std::min(kCB, V_C - v0 - kCB) * int64_t{sizeof(TT)});
      double* bs = ws.bsum.data() + 3 * kR * b;
      for (int l = 0; l < kR; ++l) bs[l] = sums.loss[l], bs[kR + l] = sums.p[l], bs[2 * kR + l] = sums.rq[l];
    }
    for (int l = 0; l < kR; ++l) {
      PklLane& L = lane[l];
      if (L.state != PklLane::kLive) continue;
      if (bad[l]) {
        L.state = PklLane::kDrop, L.loss = kNaN;
        continue;
      }
      float mx = -kInf;  // max_b m_b (one-row teacher)
      if (L.nt == 1)
        for (int64_t b = 0; b < blocks; ++b) mx = fmax_(mx, fb[b][l]);
      for (int64_t b = 0; b < blocks; ++b) {
        const double* bs = ws.bsum.data() + 3 * kR * b;
        // T' of block b = T' of the common scale + δ, δ = (m_b − max)/τ ≤ 0
        const double delta = L.nt == 1 && fb[b][l] > -kInf ? (static_cast<double>(fb[b][l]) - mx) * inv_tau : 0.0;
        const double f = L.nt > 1 ? 1.0 : fb[b][l] > -kInf ? std::exp(delta) : 0.0;
        fb[b][l] = static_cast<float>(f);
        if (fb[b][l] == 0.0f) {  // the block's P is below fp32's range, 0 as in the other backends: no terms, r = 0 (a
          // small τ: r' = P'/Q is +inf where Q = 0, and 0·inf was NaN in the sums and the gradient)
          for (int64_t j = b * kCB; j < std::min((b + 1) * kCB, V_C); ++j) rT[j][l] = 0.0f;
          continue;
        }
        L.kl += f * (bs[l] + delta * bs[kR + l]), L.sum_p += f * bs[kR + l], L.sum_rq += f * bs[2 * kR + l];
      }
    }
    fb[blocks] = VF{};  // the zero row V_C's block when kCB divides V_C

    // per chunk: the loss and what G needs
    const double tt = static_cast<double>(a.tau) * a.tau;
    VF M{}, cg{};
    VI keep{};
    any = false;
    for (int l = 0; l < kR; ++l) {
      PklLane& L = lane[l];
      if (L.state != PklLane::kLive) continue;
      // the sums are of P' = P/k, k = e^shift: one teacher row, shift = chain − LSE (LSE = log Σ_A P');
      // several, shift = 0. L = k (Σ P' (T' − log(Q + eps)) + shift Σ P'), r = k r', G = cg (M/k − r'), formed as
      // 2^-24 (M/k − r') with cg applied after the products with p (gather_lanes, write_grad)
      const double shift = L.nt == 1 && L.sum_p > 0.0 ? L.chain - std::log(L.sum_p) : 0.0, k = std::exp(shift);
      if (k * L.sum_p == 0.0) {  // no teacher mass on A
        L.state = PklLane::kDrop, L.loss = 0.0f;
        continue;
      }
      const double kl = k * (L.kl + shift * L.sum_p);
      // degenerate: Z = 0 (so counted, as in every backend, below 2^-180, where the products of 2^88 p with the
      // factors go subnormal, and where τ max(1, |c|) 2^24/Z (τ/Z', Z' = Z or 2^64 Z: the gradient's factor of 1/Z)
      // passes fp32's range), or an infinite KL
      const double c = a.chunk_scale ? a.chunk_scale[L.k] : 1.0, tz = a.tau * 0x1p24 / L.Z;  // τ/Z'
      if (L.Z < 0x1p-92 || !(tz * std::max(1.0, std::fabs(c)) <= std::numeric_limits<float>::max()) || L.kl == kInf) {
        L.state = PklLane::kDrop, L.loss = kInf;
      } else {
        a.loss[L.k] = static_cast<float>(tt * kl);
        M[l] = static_cast<float>(a.eps > 0.0f ? L.sum_rq : 0x1p-24 * L.sum_p);  // 2^-24 M, as r
        cg[l] = static_cast<float>(tz * k * c);  // unit τ c/Z
        keep[l] = -1;
        any = true;
      }
    }
    if (any) {
      double dot[kR] = {};
      if (compact) {
        gather_rows(a.r_slot.data(), a.r_col.data(), a.r_w.data(), static_cast<int64_t>(a.r_slot.size()), V_S, rT, fb,
                    M, cg, keep, pT, gw, dot);
      } else {
        gather_lanes(a.ell_col.data(), a.ell_w.data(), V_S, static_cast<int32_t>(V_C), rT, fb, M, cg, keep, pT, gw,
                     dot);
      }
      // dz_r = p_r ⊙ (g − ⟨p_r, g⟩)/(n_s τ), p_r = c_r e_r: g back to rows, one kBlock tile at a time; ⟨p_r, g⟩
      // came with g for one-row chunks, a first sweep adds it up for the rows of larger ones
      bool rows_dot = false;
      for (const PklLane& L : lane) rows_dot |= L.state == PklLane::kLive && L.ns > 1;
      ws.gt.resize(kR * kBlock);
      for (int pass = rows_dot ? 0 : 1; pass < 2; ++pass)
        for (int64_t s0 = 0; s0 < V_S; s0 += kBlock) {
          const int64_t n = std::min(kBlock, V_S - s0);
          from_lanes(pT + s0, n, ws.gt.data(), kBlock);
          for (int l = 0; l < kR; ++l) {
            const PklLane& L = lane[l];
            if (L.state != PklLane::kLive || (pass == 0 && L.ns == 1)) continue;
            const float* gl = ws.gt.data() + l * kBlock;
            for (int64_t i = 0; i < L.ns; ++i) {
              const float* e = L.e + i * V_S + s0;
              const size_t r = L.c0 + i;
              if (pass == 0) {
                ws.dots[r] += block_dot(e, gl, n);
              } else {
                const float f = ws.c[r] * 0x1p24f;  // e f = 2^24 p_r / unit (e_r: 2^88 where unit ≠ 1)
                const float d = static_cast<float>(L.ns == 1 ? dot[l] : f * ws.dots[r]);  // 2^24 ⟨p_r, g⟩ / unit
                write_grad<S>(out + (L.s_lo + i) * V_S + s0, e, gl, n, f, d, 0x1p-24f * unit[l],
                              cg[l] / static_cast<float>(L.ns));
              }
            }
          }
        }
    }
  }
  for (const PklLane& L : lane)
    if (L.state == PklLane::kDrop) {
      a.loss[L.k] = L.loss;
      zero_rows(out, elem, L.s_lo, L.s_hi, V_S);
    }
}

void pkl_rows(const py::array& s_logits, const py::array& t_vals, const I32& w_idx, const F32& w_val,
              const Bool& col_mask, const I64& spans, double temperature, const std::string& merge, double eps,
              const std::optional<F32>& t_chain, const std::optional<F32>& chunk_scale, F32 loss,
              const py::array& grad, std::optional<F32> grad_w, int64_t threads, const std::string& s_dtype,
              const std::string& t_dtype) {
  const Logits zs = logits_arg(s_logits, s_dtype, "s_logits", false);
  const Logits ts = logits_arg(t_vals, t_dtype, "t_vals", false);
  const Logits gs = logits_arg(grad, s_dtype, "grad", true);
  const int64_t N_s = zs.rows, V_S = zs.cols, N_t = ts.rows, V_T = ts.cols;
  check(w_idx.ndim() == 2 && w_idx.shape(0) == V_S && w_idx.shape(1) == 4 && w_val.ndim() == 2 &&
            w_val.shape(0) == V_S && w_val.shape(1) == 4,
        "w_idx / w_val must be [V_S, 4]");
  check(col_mask.ndim() == 1 && col_mask.shape(0) == V_T, "col_mask must be [V_T]");
  check(spans.ndim() == 2 && spans.shape(1) == 4, "spans must be [K, 4]");
  const int64_t K = spans.shape(0);
  check(loss.ndim() == 1 && loss.shape(0) == K, "loss must be [K]");
  check(gs.rows == N_s && gs.cols == V_S, "grad must be shaped like s_logits");
  check(!t_chain || (t_chain->ndim() == 1 && t_chain->shape(0) == N_t), "t_chain must be [N_t]");
  check(!chunk_scale || (chunk_scale->ndim() == 1 && chunk_scale->shape(0) == K), "chunk_scale must be [K]");
  check(!grad_w || (grad_w->ndim() == 2 && grad_w->shape(0) == V_S && grad_w->shape(1) == 4),
        "grad_w must be [V_S, 4]");
  check(V_S < (int64_t{1} << 29), "V_S must be < 2^29 (the W slot indices 4 V_S are int32)");
  check(V_T < (int64_t{1} << 31) - 1, "V_T must be < 2^31 - 1");
  check_temperature(temperature);
  check(eps >= 0.0, "need eps >= 0");
  PklCall a;
  a.merge = parse_merge(merge);
  const std::vector<uint8_t> covered = check_spans(spans, N_s, N_t);
  const bool* mask = col_mask.data();
  a.mask_add.resize(V_T);
  for (int64_t v = 0; v < V_T; ++v) a.mask_add[v] = mask[v] ? 0.0f : -kInf;
  a.z = zs.data, a.t = ts.data, a.grad = gs.mut;
  a.spans = spans.data();
  a.t_chain = t_chain ? t_chain->data() : nullptr;
  a.chunk_scale = chunk_scale ? chunk_scale->data() : nullptr;
  a.K = K, a.V_S = V_S, a.V_T = V_T;
  a.tau = static_cast<float>(temperature);
  a.eps = static_cast<float>(eps);
  a.loss = loss.mutable_data();
  float* gw_out = grad_w ? grad_w->mutable_data() : nullptr;
  build_w(a, w_idx.data(), w_val.data(), mask);

  py::gil_scoped_release nogil;
  const size_t elem = dtype_size(zs.dt);
  advise_huge(a.grad, static_cast<size_t>(N_s * V_S) * elem);
  zero_idle_rows(a.grad, elem, covered, V_S, threads);
  const int64_t groups = (K + kR - 1) / kR;
  std::vector<PklScratch> scratch(static_cast<size_t>(resolve_threads(threads, std::max<int64_t>(groups, 1))));
  for (auto& s : scratch) s.zero.assign(std::max(V_S, V_T), 0.0f);
  dispatch(zs.dt, ts.dt, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    if (!gw_out) {
      parallel_for_worker(groups, threads, [&](int64_t g, int64_t w) { pkl_group<S, T>(a, g, scratch[w], nullptr); });
      return;
    }
    // grad_w: fixed runs of consecutive groups, one partial each, summed in run order
    const int64_t runs = std::min<int64_t>(groups, 16);
    std::vector<std::vector<float>> part(static_cast<size_t>(runs));
    parallel_for_worker(runs, threads, [&](int64_t b, int64_t w) {
      part[b].assign(4 * V_S, 0.0f);
      for (int64_t g = groups * b / runs; g < groups * (b + 1) / runs; ++g)
        pkl_group<S, T>(a, g, scratch[w], part[b].data());
    });
    for (int64_t j = 0; j < 4 * V_S; ++j) {
      double sum = 0.0;
      for (const auto& p : part) sum += p[j];
      gw_out[j] = static_cast<float>(sum * a.tau);  // the parts hold (τ c/Z) p̄ (M − h): ∂L/∂W has τ² c/Z
    }
  });
}

// ---- H-KL / GOLD / ULD, per chunk:
//   ℓ_r = (z_r − max z_r)/τ − log Σ e_r with e_r = exp((z_r − max z_r)/τ) kept in the gradient row (fp32 logits)
//   or a scratch row; S = mean_r ℓ_r ("chain": first row + Σ chain scalars), T = mean_r log π_r over A (−inf
//   outside), P = e^T; L = τ² (Σ_c [P_c > 0] P_c (T[t_c] − S[s_c]) + Σ_{i<m} |a_i − b_i|), a / b = top-m of e^S on
//   U_S / P on U_T, sorted descending (top_sorted: histogram select, then a radix sort of the candidates; ties in
//   any order); gS = ∂L/∂S: −τ² P_c at s_c, τ² sign(a_i − b_i) a_i at a_i's column; dz_r = (gS − p_r Σ gS)/(n_s τ).
struct HklCall {
  const void *z, *t;                 // [N_s, V_S] (student dtype), [N_t, V_T] (teacher dtype)
  void* grad;                        // [N_s, V_S], student dtype
  const float *s_chain, *t_chain;    // [N_s] / [N_t] or nullptr
  const int64_t* spans;
  int64_t V_S, V_T, m;
  float tau;
  Merge merge;
  std::vector<float> mask_add;          // [V_T]: 0 in A, −inf outside
  std::vector<int32_t> cs, ct, us, ut;  // common pairs (t_c ∈ A), U_S, U_T = A \ {t_c}
  float *loss, *gsum;                   // [K], [K] (Σ gS = ∂L/∂chain scalar)
};

struct HklScratch {
  std::vector<float> S, gS, T, c, pe, eS, m, e;
  std::vector<uint32_t> b, b_tmp, hist;
  std::vector<uint64_t> key, key_tmp;
};

// Moves the m largest of x[0..n) (1 ≤ m ≤ n) to x[0..m), sorted descending. Keys hold the bits of a float ≥ 0
// (ordered as the value) from bit Low up. A histogram of the top 12 of them (sign, exponent, 3 mantissa bits) finds
// the bucket of the m-th largest; the keys from that bucket up are copied out and LSD-radix sorted on the 32 value
// bits: 3 stable passes of 11 complemented bits = descending (equal values keep an arbitrary order), the three
// digit histograms counted in one pass.
template <int Low, typename Key>
void top_sorted(Key* x, size_t n, int64_t m, std::vector<uint32_t>& hist, std::vector<Key>& tmp) {
  constexpr size_t kTop = 4096, kDigit = 2048;
  hist.assign(kTop, 0);
  for (size_t j = 0; j < n; ++j) ++hist[x[j] >> (Low + 20)];
  int64_t count = 0;
  size_t lo = kTop;
  while (count < m) count += hist[--lo];
  tmp.resize(n);
  size_t c = 0;
  for (size_t j = 0; j < n; ++j)
    if ((x[j] >> (Low + 20)) >= lo) tmp[c++] = x[j];
  hist.assign(3 * kDigit, 0);
  for (size_t j = 0; j < c; ++j)
    for (int pass = 0; pass < 3; ++pass) ++hist[pass * kDigit + (~(tmp[j] >> (Low + 11 * pass)) & 0x7ff)];
  Key *src = tmp.data(), *dst = x;
  for (int pass = 0; pass < 3; ++pass) {  // tmp -> x -> tmp -> x
    uint32_t* h = hist.data() + pass * kDigit;
    uint32_t sum = 0;
    for (size_t d = 0; d < kDigit; ++d) {
      const uint32_t here = h[d];
      h[d] = sum;
      sum += here;
    }
    const int shift = Low + 11 * pass;
    for (size_t j = 0; j < c; ++j) dst[h[~(src[j] >> shift) & 0x7ff]++] = src[j];
    std::swap(src, dst);
  }
}

template <class S, class T>
void hkl_chunk(const HklCall& a, int64_t k, HklScratch& ws) {
  using ST = typename S::T;
  using TT = typename T::T;
  constexpr bool in_place = std::is_same<S, Fp32>::value;
  const int64_t s_lo = a.spans[4 * k], s_hi = a.spans[4 * k + 1];
  const int64_t t_lo = a.spans[4 * k + 2], t_hi = a.spans[4 * k + 3];
  const bool mean = a.merge == Merge::kMean, chain = a.merge == Merge::kChain;
  const int64_t ns = mean ? s_hi - s_lo : 1, nt = mean ? t_hi - t_lo : 1;
  const int64_t V_S = a.V_S, V_T = a.V_T;
  const float inv_tau = 1.0f / a.tau;
  const float* add = a.mask_add.data();
  const ST* zk = static_cast<const ST*>(a.z) + s_lo * V_S;
  const TT* tk = static_cast<const TT*>(a.t) + t_lo * V_T;
  ST* out = static_cast<ST*>(a.grad) + s_lo * V_S;
  const double s_chain = chain ? chain_sum(a.s_chain, s_lo, s_hi) : 0.0;
  const double t_chain = chain ? chain_sum(a.t_chain, t_lo, t_hi) : 0.0;
  ws.m.resize(ns + nt);
  if (scan_rows<S, T>(zk, ns, V_S, tk, nt, V_T, add, ws.m.data()) || !(s_chain < kInf) || !(t_chain < kInf)) {
    a.loss[k] = kNaN;
    a.gsum[k] = 0.0f;
    return zero_rows(out, sizeof(ST), 0, s_hi - s_lo, V_S);
  }
  ws.gS.assign(V_S, 0.0f);
  ws.c.resize(ns);
  float* gS = ws.gS.data();
  if (!in_place) ws.e.resize(ns * V_S);
  float* e0 = in_place ? reinterpret_cast<float*>(out) : ws.e.data();
  zero_rows(out, sizeof(ST), ns, s_hi - s_lo, V_S);  // rows outside the merge get no gradient

  // S = Σ_r ℓ_r / n_s, materialized for several rows; one row: S[v] = (z[v] − m)/τ − s_shift, read where needed
  const float fs = 1.0f / static_cast<float>(ns);
  float s_shift = 0.0f;
  if (ns > 1) ws.S.resize(V_S);
  for (int64_t i = 0; i < ns; ++i) {
    const ST* z = zk + i * V_S;
    const float m = ws.m[i];
    const double sum = exp_store<S>(z, e0 + i * V_S, V_S, m, inv_tau);
    ws.c[i] = static_cast<float>(1.0 / sum);
    s_shift = static_cast<float>(std::log(sum) - s_chain);
    if (ns > 1) add_log_probs<S>(ws.S.data(), z, V_S, m, inv_tau, s_shift, i == 0);
  }
  if (ns > 1)
    for (int64_t v = 0; v < V_S; ++v) ws.S[v] *= fs;

  // T = Σ_r log π_r / n_t (−inf outside A) and P = e^T, materialized for several rows; one row: P = e^{(t − m)/τ}
  // on A (the LSE pass's exponentials) · e^{chain − LSE}, T[v] = (t[v] − m)/τ − t_shift on A, read where needed
  ws.pe.resize(V_T);
  float* P = ws.pe.data();
  float t_m = 0.0f, t_shift = 0.0f, p_scale = 1.0f;
  if (nt > 1) ws.T.resize(V_T);
  for (int64_t i = 0; i < nt; ++i) {
    const TT* t = tk + i * V_T;
    float m = ws.m[ns + i];
    if (!(m > -kInf)) m = 0.0f;  // no allowed column: T = −inf, P = 0
    const double sum = masked_exp_sum<T>(t, add, P, V_T, m, inv_tau);
    const double lse = sum > 0.0 ? std::log(sum) : 0.0;
    t_m = m, t_shift = static_cast<float>(lse - t_chain), p_scale = static_cast<float>(std::exp(t_chain - lse));
    if (nt > 1) add_log_probs<T>(ws.T.data(), t, V_T, m, inv_tau, t_shift, i == 0);
  }
  if (nt > 1) {
    const float ft = 1.0f / static_cast<float>(nt);
    for (int64_t v = 0; v < V_T; ++v) ws.T[v] = ws.T[v] * ft + add[v];
    exp_all(ws.T.data(), P, V_T);
    p_scale = 1.0f;
  }
  const float* S_ = ws.S.data();
  const float* T_ = ws.T.data();
  auto S_at = [&](int32_t v) { return ns > 1 ? S_[v] : (S::get(zk[v]) - ws.m[0]) * inv_tau - s_shift; };
  auto T_at = [&](int32_t v) { return nt > 1 ? T_[v] : (T::get(tk[v]) - t_m) * inv_tau - t_shift; };

  const double tt = static_cast<double>(a.tau) * a.tau;
  const float ttf = static_cast<float>(tt);
  float tmp[kBlock];
  double kl = 0.0;
  const int32_t *cs = a.cs.data(), *ct = a.ct.data();
  const int64_t C = static_cast<int64_t>(a.cs.size());
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {  // the common KL (t_c ∈ A), in fp32 partials of ≤ kBlock pairs
    const int64_t len = std::min(kBlock, C - c0);
    for (int64_t c = c0; c < c0 + len; ++c) {
      const float Pc = P[ct[c]] * p_scale;
      tmp[c - c0] = Pc > 0.0f ? Pc * (T_at(ct[c]) - S_at(cs[c])) : 0.0f;
      gS[cs[c]] = -ttf * Pc;
    }
    kl += block_sum(tmp, len);
  }
  double l1 = 0.0;
  const int64_t m = a.m;
  if (m > 0) {
    // keys ordered as the values (bits of a float ≥ 0): b = bits of P on U_T; a = bits of e^S on U_S << 32 | id
    ws.b.resize(a.ut.size());
    uint32_t* b = ws.b.data();
    for (size_t j = 0; j < a.ut.size(); ++j) b[j] = as_uint(P[a.ut[j]] * p_scale);
    top_sorted<0>(b, a.ut.size(), m, ws.hist, ws.b_tmp);
    const float* ex = e0;  // one row: e^S = c e · e^{chain}
    float fx = static_cast<float>(ws.c[0] * std::exp(s_chain));
    if (ns > 1) {
      ws.eS.resize(V_S);
      exp_all(S_, ws.eS.data(), V_S);
      ex = ws.eS.data(), fx = 1.0f;
    }
    ws.key.resize(a.us.size());
    uint64_t* key = ws.key.data();
    for (size_t j = 0; j < a.us.size(); ++j)
      key[j] = static_cast<uint64_t>(as_uint(ex[a.us[j]] * fx)) << 32 | static_cast<uint64_t>(a.us[j]);
    top_sorted<32>(key, a.us.size(), m, ws.hist, ws.key_tmp);
    for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
      const int64_t len = std::min(kBlock, m - i0);
      for (int64_t i = i0; i < i0 + len; ++i) {
        const float ai = as_float(static_cast<int32_t>(key[i] >> 32)), d = ai - as_float(static_cast<int32_t>(b[i]));
        tmp[i - i0] = fabs_(d);
        gS[key[i] & 0xffffffffu] += d > 0.0f ? ttf * ai : (d < 0.0f ? -ttf * ai : 0.0f);
      }
      l1 += block_sum(tmp, len);
    }
  }
  a.loss[k] = static_cast<float>(tt * (kl + l1));
  const double gsum = plain_sum(gS, V_S);
  a.gsum[k] = static_cast<float>(gsum);
  for (int64_t i = 0; i < ns; ++i)  // dz_r = (gS − p_r Σ gS)/(n_s τ), p_r = c_r e_r
    hkl_grad<S>(out + i * V_S, e0 + i * V_S, gS, V_S, fs * inv_tau, static_cast<float>(gsum) * ws.c[i]);
}

void hkl_rows(const py::array& s_logits, const py::array& t_vals, const Bool& col_mask, const I64& spans,
              double temperature, const std::string& merge, const std::optional<F32>& s_chain,
              const std::optional<F32>& t_chain, const I64& common_s, const I64& common_t, int64_t uncommon_topk,
              F32 loss, const py::array& grad, F32 gsum, int64_t threads, const std::string& s_dtype,
              const std::string& t_dtype) {
  const Logits zs = logits_arg(s_logits, s_dtype, "s_logits", false);
  const Logits ts = logits_arg(t_vals, t_dtype, "t_vals", false);
  const Logits gs = logits_arg(grad, s_dtype, "grad", true);
  const int64_t N_s = zs.rows, V_S = zs.cols, N_t = ts.rows, V_T = ts.cols;
  check(V_S < (int64_t{1} << 31) && V_T < (int64_t{1} << 31), "V_S and V_T must be < 2^31");
  check(col_mask.ndim() == 1 && col_mask.shape(0) == V_T, "col_mask must be [V_T]");
  check(spans.ndim() == 2 && spans.shape(1) == 4, "spans must be [K, 4]");
  const int64_t K = spans.shape(0), C = common_s.ndim() == 1 ? common_s.shape(0) : -1;
  check(C >= 0 && common_t.ndim() == 1 && common_t.shape(0) == C, "common_s / common_t must be [C]");
  check(loss.ndim() == 1 && loss.shape(0) == K && gsum.ndim() == 1 && gsum.shape(0) == K, "loss / gsum must be [K]");
  check(gs.rows == N_s && gs.cols == V_S, "grad must be shaped like s_logits");
  check(!s_chain || (s_chain->ndim() == 1 && s_chain->shape(0) == N_s), "s_chain must be [N_s]");
  check(!t_chain || (t_chain->ndim() == 1 && t_chain->shape(0) == N_t), "t_chain must be [N_t]");
  check_temperature(temperature);
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
    check(!common_s_[sc] && !common_t_[tc], "common pairs must use each student and each teacher id at most once");
    a.cs.push_back(static_cast<int32_t>(sc));
    a.ct.push_back(static_cast<int32_t>(tc));
    common_s_[sc] = common_t_[tc] = 1;
  }
  for (int64_t v = 0; v < V_S; ++v)
    if (!common_s_[v]) a.us.push_back(static_cast<int32_t>(v));
  for (int64_t v = 0; v < V_T; ++v)
    if (mask[v] && !common_t_[v]) a.ut.push_back(static_cast<int32_t>(v));
  a.m = std::min<int64_t>(std::min(a.us.size(), a.ut.size()), uncommon_topk < 0 ? V_S : uncommon_topk);
  a.z = zs.data, a.t = ts.data, a.grad = gs.mut;
  a.s_chain = s_chain ? s_chain->data() : nullptr;
  a.t_chain = t_chain ? t_chain->data() : nullptr;
  a.spans = spans.data();
  a.V_S = V_S;
  a.V_T = V_T;
  a.tau = static_cast<float>(temperature);
  a.loss = loss.mutable_data();
  a.gsum = gsum.mutable_data();

  py::gil_scoped_release nogil;
  const size_t elem = dtype_size(zs.dt);
  advise_huge(a.grad, static_cast<size_t>(N_s * V_S) * elem);
  zero_idle_rows(a.grad, elem, covered, V_S, threads);
  std::vector<HklScratch> scratch(static_cast<size_t>(resolve_threads(threads, std::max<int64_t>(K, 1))));
  dispatch(zs.dt, ts.dt, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    parallel_for_worker(K, threads, [&](int64_t k, int64_t w) { hkl_chunk<S, T>(a, k, scratch[w]); });
  });
}

// ---- teacher_topk's columns: the k columns c with the largest m[c] = max over the listed rows r of t[r][c], rows
// holding NaN or +inf ignored (m = −inf when no row is left), ties -> lower c (the first k of a stable descending
// sort). The rows are cut into one contiguous run per thread, each streamed once into its own maxima row (in L2); a
// run that met a row with NaN / +inf is swept again without such rows, and the runs' maxima are merged (max is
// exact, so m does not depend on the thread count). Selection: v = the k-th largest m (nth_element); every column
// with m > v, then the lowest columns with m = v until there are k.

// acc[i] = max(acc[i], x[i]) (a NaN x leaves acc as is); returns whether x holds NaN or +inf.
template <class D>
XT_HOT bool colmax_row(const typename D::T* x, float* acc, int64_t n) {
  VI2 bad{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V2 v = D::load16(x + i), a = loadu16(acc + i);
    const V2 m = sel(a < v, v, a);
    std::memcpy(acc + i, &m, sizeof m);
    bad |= ~(v < kInf);
  }
  bool nonfinite = false;
  for (int l = 0; l < 16; ++l) nonfinite |= bad[l] != 0;
  for (; i < n; ++i) {
    const float v = D::get(x[i]);
    acc[i] = fmax_(acc[i], v);
    nonfinite |= !(v < kInf);
  }
  return nonfinite;
}

XT_HOT void max_into(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = fmax_(acc[i], x[i]);
}

void teacher_topk_columns(const py::array& t_vals, const I64& rows, int64_t k, Bool out, int64_t threads,
                          const std::string& t_dtype) {
  const Logits ts = logits_arg(t_vals, t_dtype, "t_vals", false);
  const int64_t N_t = ts.rows, V_T = ts.cols, n = rows.ndim() == 1 ? rows.shape(0) : -1;
  check(n >= 0, "rows must be 1-D");
  check(out.ndim() == 1 && out.shape(0) == V_T, "out must be [V_T]");
  check(k >= 1, "need k >= 1");
  const int64_t* r = rows.data();
  for (int64_t i = 0; i < n; ++i) check(0 <= r[i] && r[i] < N_t, "rows must lie in [0, N_t)");
  bool* mask = out.mutable_data();
  py::gil_scoped_release nogil;
  if (k >= V_T) {
    std::fill(mask, mask + V_T, true);
    return;
  }
  const int64_t runs = resolve_threads(threads, std::max<int64_t>(n, 1));
  std::vector<std::vector<float>> part(static_cast<size_t>(runs));
  dispatch(ts.dt, ts.dt, [&](auto tag, auto) {
    using D = decltype(tag);
    const auto* t = static_cast<const typename D::T*>(ts.data);
    parallel_for(runs, threads, [&](int64_t b) {
      std::vector<float>& acc = part[b];
      const int64_t i0 = n * b / runs, i1 = n * (b + 1) / runs;
      acc.assign(V_T, -kInf);
      std::vector<uint8_t> bad(static_cast<size_t>(i1 - i0), 0);
      bool any = false;
      for (int64_t i = i0; i < i1; ++i) any |= bad[i - i0] = colmax_row<D>(t + r[i] * V_T, acc.data(), V_T);
      if (!any) return;
      acc.assign(V_T, -kInf);  // rare: again without the rows holding NaN / +inf
      for (int64_t i = i0; i < i1; ++i)
        if (!bad[i - i0]) colmax_row<D>(t + r[i] * V_T, acc.data(), V_T);
    });
  });
  std::vector<float> m(static_cast<size_t>(V_T), -kInf);
  for (const auto& acc : part) max_into(m.data(), acc.data(), V_T);
  std::vector<float> order(m);
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<float>());
  const float v = order[k - 1];
  int64_t ties = k;  // k − #(m > v): the columns with m = v that are kept
  for (int64_t c = 0; c < V_T; ++c) ties -= m[c] > v;
  for (int64_t c = 0; c < V_T; ++c) mask[c] = m[c] > v || (m[c] == v && ties-- > 0);
}

}  // namespace

void bind_losses(py::module_& m) {
  m.def("pkl_rows", &pkl_rows, py::arg("s_logits").noconvert(), py::arg("t_vals").noconvert(),
        py::arg("w_idx").noconvert(), py::arg("w_val").noconvert(), py::arg("col_mask").noconvert(),
        py::arg("spans").noconvert(), py::arg("temperature"), py::arg("merge"), py::arg("eps"),
        py::arg("t_chain").noconvert(), py::arg("chunk_scale").noconvert(), py::arg("loss").noconvert(),
        py::arg("grad").noconvert(), py::arg("grad_w").noconvert(), py::arg("threads") = 0,
        py::arg("s_dtype") = "float32", py::arg("t_dtype") = "float32",
        "Fused P-KL over chunks of logit rows (dense teacher): writes loss [K], grad [N_s, V_S] (every row, in the "
        "student's dtype) and, when given, grad_w [V_S, 4]. bf16 / fp16 logits and grad are passed as their 16-bit "
        "words (int16 arrays) with s_dtype / t_dtype. See csrc/losses.cpp for the math.");
  m.def("teacher_topk_columns", &teacher_topk_columns, py::arg("t_vals").noconvert(), py::arg("rows").noconvert(),
        py::arg("k"), py::arg("out").noconvert(), py::arg("threads") = 0, py::arg("t_dtype") = "float32",
        "teacher_topk's column set: out[c] = whether column c is among the k with the largest max over the teacher "
        "rows `rows` of t_vals[r, c] (rows holding NaN or +inf ignored), ties -> lower c. bf16 / fp16 rows as their "
        "16-bit words with t_dtype.");
  m.def("hkl_rows", &hkl_rows, py::arg("s_logits").noconvert(), py::arg("t_vals").noconvert(),
        py::arg("col_mask").noconvert(), py::arg("spans").noconvert(), py::arg("temperature"), py::arg("merge"),
        py::arg("s_chain").noconvert(), py::arg("t_chain").noconvert(), py::arg("common_s").noconvert(),
        py::arg("common_t").noconvert(), py::arg("uncommon_topk"), py::arg("loss").noconvert(),
        py::arg("grad").noconvert(), py::arg("gsum").noconvert(), py::arg("threads") = 0,
        py::arg("s_dtype") = "float32", py::arg("t_dtype") = "float32",
        "Fused H-KL / GOLD / ULD over chunks of logit rows (dense teacher): writes loss [K], grad [N_s, V_S] (every "
        "row, in the student's dtype) and gsum [K] (∂loss_k/∂chain scalar). bf16 / fp16 logits and grad are passed "
        "as their 16-bit words (int16 arrays) with s_dtype / t_dtype. See csrc/losses.cpp for the math.");
}

}  // namespace xt
