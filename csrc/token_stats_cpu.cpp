// Per-token statistics (spec §4) and Min-K% selection on the CPU: OpenMP over rows, one vectorized pass per row.
//
// Plain C++ on raw pointers (no torch headers, so it compiles in a second); bindings.cpp is the torch glue.
// Built with -O3 -march=native -ffp-contract=fast -fopenmp: the build is JIT on the user's own machine, so
// -march=native picks the widest vectors it has (AVX-512 / AVX2 / NEON), and `omp simd` lets gcc vectorize
// the float reductions without -ffast-math (which would also break the NaN checks below).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace kdfast {
namespace cpu {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
// Elements per block: block max, then block moments, while the block (4-8 KiB) is still in L1.
constexpr int64_t kBlock = 1024;
// Elements per fp32 partial sum of the moments (see row_stats).
constexpr int64_t kSub = 64;

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Input element types; `load` widens each to fp32 with branch-free bit operations gcc vectorizes.
struct F32 { float v; };
struct BF16 { uint16_t v; };
struct F16 { uint16_t v; };

inline float load(const F32* p, int64_t i) { return p[i].v; }
inline float load(const BF16* p, int64_t i) { return as_float(uint32_t(p[i].v) << 16); }
inline float load(const F16* p, int64_t i) {
  const uint32_t h = p[i].v;
  const uint32_t em = h & 0x7fffu;
  // Move exponent+mantissa into fp32 position, then rebias the exponent by 2^(127-15) with one multiply:
  // exact for normals and subnormals alike. Inf/NaN (exponent all ones) get the fp32 all-ones exponent.
  uint32_t bits = as_bits(as_float(em << 13) * 0x1p112f);
  bits = em >= 0x7c00u ? (bits | 0x7f800000u) : bits;
  return as_float(bits | ((h & 0x8000u) << 16));
}

// 2^x for x in [-127, 0.5] (not NaN) with a relative error below 1e-7 (measured max 8.1e-8: the degree-6
// minimax polynomial on [-1/2, 1/2] is good to 2e-9, the rest is fp32 rounding); x < -126.5 gives 0.
// torch's SLEEF exp is exact to 1 ulp but costs several times more: this is ~12 vector instructions.
inline float exp2_neg(float x) {
  const float r = (x + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23 trick)
  const float f = x - r;                             // exact, in [-1/2, 1/2]
  float p = 1.535086630610749e-4f;
  p = p * f + 1.339997397735715e-3f;
  p = p * f + 9.618470445275307e-3f;
  p = p * f + 5.550328642129898e-2f;
  p = p * f + 2.4022647738456726e-1f;
  p = p * f + 6.931471824645996e-1f;
  p = p * f + 1.0f;
  // 2^r from its exponent bits; r = -127 gives exponent field 0, i.e. the value 0
  return p * as_float(uint32_t(int(r) + 127) << 23);
}

// Moments of one row in log2 units relative to the shift mL = fl(max * log2 e):
// S_k = sum 2^x x^k with x = z log2e - mL, so every term is <= ~1 and x is computed by one fma from z.
struct Moments {
  double s0 = 0, s1 = 0, s2 = 0;

  // Re-express the sums relative to a larger shift: x_new = x_old + d with d = mL_old - mL_new <= 0.
  // Written as d * (2 s1 + d s0) so a zero s0 with a huge |d| (the -FLT_MAX start) stays 0, not inf * 0.
  void shift(double d) {
    const double c = std::exp2(d);
    s2 = c * (s2 + d * (2 * s1 + d * s0));
    s1 = c * (s1 + d * s0);
    s0 = c * s0;
  }
};

enum Status : uint8_t { kOk = 0, kNonFinite = 1, kBadTarget = 2, kNoFinite = 3 };

// One row: fills out5 = (logp, lse, entropy, mu, sigma), top1 and status; the caller zeroed them.
template <typename T>
void row_stats(const T* z, int64_t V, int64_t target, float* out5, uint8_t* top1, uint8_t* status) {
  // Start the shift at -FLT_MAX, not -inf: then x = z log2e - mL is -inf (weight 0) for -inf logits, and the
  // first rescale multiplies zero sums by 0 instead of meeting inf - inf.
  float mL = -std::numeric_limits<float>::max();
  float best = -kInf;
  int64_t arg = 0;
  Moments acc;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const T* p = z + b0;
    const int64_t len = std::min(kBlock, V - b0);
    float bm = -kInf;
    int nan = 0;
    // `a > b ? a : b` is exactly one max instruction (x86 max returns b when a is NaN): no if-conversion
#pragma omp simd reduction(max : bm) reduction(| : nan)
    for (int64_t i = 0; i < len; ++i) {
      const float zi = load(p, i);
      bm = zi > bm ? zi : bm;
      nan |= zi != zi;
    }
    if (nan) {
      *status = kNonFinite;
      return;
    }
    if (bm > best) {  // strict: an equal maximum later in the row keeps the lower index, as argmax does
      best = bm;
      arg = b0;
      while (load(p, arg - b0) != bm) ++arg;
      const float new_mL = bm * kLog2e;
      acc.shift(double(mL) - double(new_mL));
      mL = new_mL;
    }
    // fp32 partial sums over kSub elements only, then double: near-equal terms (a flat row) add their rounding
    // errors in one direction, and Var = E[x^2] - E[x]^2 magnifies them (AVX2's 8 lanes over a whole block put
    // sigma 6e-4 off on a flat 2600-entry row).
    for (int64_t s0 = 0; s0 < len; s0 += kSub) {
      const int64_t end = std::min(len, s0 + kSub);
      float a0 = 0, a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a0, a1, a2)
      for (int64_t i = s0; i < end; ++i) {
        float x = load(p, i) * kLog2e - mL;  // contracted to one fma: exact product, one rounding
        x = x > -127.0f ? x : -127.0f;       // -inf logits (and anything below 2^-127) weigh 0
        const float e = exp2_neg(x);
        const float t = e * x;
        a0 += e;
        a1 += t;
        a2 += t * x;
      }
      acc.s0 += a0;
      acc.s1 += a1;
      acc.s2 += a2;
    }
  }

  if (!(std::isfinite(acc.s0) && std::isfinite(acc.s1) && std::isfinite(acc.s2)) || best == kInf) {
    *status = kNonFinite;
    return;
  }
  if (best == -kInf) {  // every logit is -inf: no distribution
    *status = kNoFinite;
    return;
  }
  // Back to natural-log units: lse = (mL + log2 s0) / log2e, with the same float log2e the pass used, so
  // the rounding of mL cancels out of every statistic.
  const double L = kLog2e, log2_s0 = std::log2(acc.s0);
  const double mean = acc.s1 / acc.s0;  // E_p[x]
  const double var = std::max(acc.s2 / acc.s0 - mean * mean, 0.0);
  const double mu = (mean - log2_s0) / L;  // sum p log p
  out5[0] = float((double(load(z, target)) * L - mL - log2_s0) / L);  // logp of the target
  out5[1] = float((double(mL) + log2_s0) / L);                         // lse
  out5[2] = float(-mu);                                                 // entropy
  out5[3] = float(mu);
  out5[4] = float(std::sqrt(var) / L);  // sigma of log p (= of z) under p
  *top1 = arg == target;
  *status = kOk;
}

template <typename T>
void token_stats_impl(const T* logits, int64_t N, int64_t V, int64_t inner, int64_t stride_outer,
                      int64_t stride_inner, const int64_t* targets, int64_t ignore_index, float* const out[5],
                      uint8_t* top1, uint8_t* status, int num_threads) {
  // Dynamic schedule: ignored rows cost nothing, so static chunks could leave a thread idle.
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
  for (int64_t r = 0; r < N; ++r) {
    const int64_t y = targets[r];
    float o[5] = {0, 0, 0, 0, 0};
    top1[r] = 0;
    status[r] = kOk;
    if (y != ignore_index) {
      if (y < 0 || y >= V) {
        status[r] = kBadTarget;
      } else {
        const T* row = logits + (r / inner) * stride_outer + (r % inner) * stride_inner;
        row_stats(row, V, y, o, top1 + r, status + r);
      }
    }
    for (int j = 0; j < 5; ++j) out[j][r] = o[j];
  }
}

}  // namespace

// logits: element (r, v) of the [N, V] view is at logits[(r / inner) * stride_outer + (r % inner) * stride_inner
// + v] (elements), which covers [N, V] and [B, T, V] views such as logits[:, :-1] without a copy.
// dtype: 0 fp32, 1 bf16, 2 fp16. out: logp, lse, entropy, mu, sigma ([N] fp32 each); top1, status: [N] bytes.
void token_stats(const void* logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t stride_outer,
                 int64_t stride_inner, const int64_t* targets, int64_t ignore_index, float* const out[5],
                 uint8_t* top1, uint8_t* status, int num_threads) {
  switch (dtype) {
    case 0:
      token_stats_impl(static_cast<const F32*>(logits), N, V, inner, stride_outer, stride_inner, targets,
                       ignore_index, out, top1, status, num_threads);
      break;
    case 1:
      token_stats_impl(static_cast<const BF16*>(logits), N, V, inner, stride_outer, stride_inner, targets,
                       ignore_index, out, top1, status, num_threads);
      break;
    default:
      token_stats_impl(static_cast<const F16*>(logits), N, V, inner, stride_outer, stride_inner, targets,
                       ignore_index, out, top1, status, num_threads);
  }
}

// values, mask: [B, T] (mask as bytes); counts: [B, K] how many of the lowest valid values each mean takes
// (computed by the caller from reference.min_k_count, 1 <= count <= n valid; ignored when n == 0).
// out: [B, K] fp32, 0 for rows without valid values. Sort per row, then prefix sums in double.
void min_k(const float* values, const uint8_t* mask, int64_t B, int64_t T, const int64_t* counts, int64_t K,
           float* out, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf;
    std::vector<std::pair<int64_t, int64_t>> order;  // (count, k), smallest count first
    buf.reserve(T);
#pragma omp for schedule(dynamic, 8)
    for (int64_t b = 0; b < B; ++b) {
      buf.clear();
      for (int64_t t = 0; t < T; ++t)
        if (mask[b * T + t]) buf.push_back(values[b * T + t]);
      for (int64_t k = 0; k < K; ++k) out[b * K + k] = 0.0f;
      if (buf.empty() || K == 0) continue;
      const int64_t n = int64_t(buf.size());
      order.clear();
      for (int64_t k = 0; k < K; ++k) order.emplace_back(std::min(counts[b * K + k], n), k);
      std::sort(order.begin(), order.end());
      // Only the lowest max-count values matter, in order; then one walk of that prefix serves every k.
      std::partial_sort(buf.begin(), buf.begin() + order.back().first, buf.end());
      double sum = 0;
      int64_t done = 0;
      for (const auto& [c, k] : order) {
        for (; done < c; ++done) sum += buf[done];
        out[b * K + k] = float(sum / double(c));
      }
    }
  }
}

}  // namespace cpu
}  // namespace kdfast
