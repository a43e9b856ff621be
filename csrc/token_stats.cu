// Per-token statistics (spec §4) and Min-K% selection on the GPU: one warp or block per row, 16-byte loads.
//
// Plain CUDA C++ behind extern "C" launchers on raw pointers and a stream (no torch headers): a CPU-only
// torch cannot build a CUDAExtension, but `nvcc -c` checks this file anywhere (tests/test_ext.py).
// The math is token_stats_cpu.cpp's: moments in log2 units relative to a running shift mL = fl(max log2 e).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxMinKT = 8192;  // Min-K% rows sort in shared memory up to this many tokens (32 KiB)

enum Status : uint8_t { kOk = 0, kNonFinite = 1, kBadTarget = 2, kNoFinite = 3 };

__device__ __forceinline__ float ex2(float x) {  // 2^x, ~2 ulp; -inf and x < -126 give 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float max_keep_nan(float x, float lo) {  // a max() would drop NaN
#if __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(lo));
  return y;
#else
  return x < lo ? lo : x;
#endif
}

// Element types: their widening to fp32, VEC elements per 16-byte load, and -inf as a 32-bit pattern.
struct F32 {
  using Raw = float;
  static constexpr int VEC = 4;
  static constexpr uint32_t NEG_INF = 0xff800000u;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ void unpack(const uint4& q, float* z) {
    z[0] = __uint_as_float(q.x), z[1] = __uint_as_float(q.y), z[2] = __uint_as_float(q.z), z[3] = __uint_as_float(q.w);
  }
};
struct BF16 {
  using Raw = uint16_t;
  static constexpr int VEC = 8;
  static constexpr uint32_t NEG_INF = 0xff80ff80u;
  static __device__ __forceinline__ float to_float(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
  static __device__ __forceinline__ void unpack(const uint4& q, float* z) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = __uint_as_float(w[i] << 16);
      z[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
struct F16 {
  using Raw = uint16_t;
  static constexpr int VEC = 8;
  static constexpr uint32_t NEG_INF = 0xfc00fc00u;
  static __device__ __forceinline__ float to_float(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ void unpack(const uint4& q, float* z) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = to_float(uint16_t(w[i] & 0xffffu));
      z[2 * i + 1] = to_float(uint16_t(w[i] >> 16));
    }
  }
};

// One thread's (or a merged group's) partial state. s_k = sum 2^x x^k with x = z log2e - mL; best/arg is the
// first maximum. mL starts at -FLT_MAX (not -inf) so -inf logits weigh 0 and NaN logits poison s0 without a
// per-element check; every merge keeps that: d * (2 s1 + d s0) is 0, not inf * 0, when s0 is 0.
struct State {
  float mL, s0, s1, s2, best;
  int64_t arg;

  __device__ __forceinline__ void init() {
    mL = -FLT_MAX, s0 = s1 = s2 = 0.0f, best = -INFINITY, arg = INT64_MAX;
  }

  // Fold in a run of n elements z[0..n) whose indices are idx0 + j * step, in increasing order.
  template <int n>
  __device__ __forceinline__ void add(const float* z, int64_t idx0, int64_t step) {
    float cm = z[0];
#pragma unroll
    for (int j = 1; j < n; ++j) cm = fmaxf(cm, z[j]);
    if (cm > best) {  // strict: on ties the earlier (lower) index stays
      int first = 0;  // unrolled with constant indices so that z stays in registers
#pragma unroll
      for (int j = n - 1; j >= 0; --j) first = z[j] == cm ? j : first;
      best = cm, arg = idx0 + first * step;
      const float new_mL = cm * kLog2e;
      const float d = mL - new_mL;
      const float c = ex2(d);
      s2 = c * (s2 + d * (2.0f * s1 + d * s0));
      s1 = c * (s1 + d * s0);
      s0 = c * s0;
      mL = new_mL;
    }
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const float x = max_keep_nan(fmaf(z[j], kLog2e, -mL), -128.0f);
      const float e = ex2(x);
      const float t = e * x;
      s0 += e;
      s1 += t;
      s2 = fmaf(t, x, s2);
    }
  }

  __device__ __forceinline__ void merge(const State& o) {
    const float m = fmaxf(mL, o.mL);
    const float da = mL - m, db = o.mL - m;
    const float ca = ex2(da), cb = ex2(db);
    const float n0 = ca * s0 + cb * o.s0;
    const float n1 = ca * (s1 + da * s0) + cb * (o.s1 + db * o.s0);
    const float n2 = ca * (s2 + da * (2.0f * s1 + da * s0)) + cb * (o.s2 + db * (2.0f * o.s1 + db * o.s0));
    // NaN stays NaN through the sums; a +inf maximum is caught through best
    s0 = n0, s1 = n1, s2 = n2, mL = m;
    if (o.best > best || (o.best == best && o.arg < arg)) best = o.best, arg = o.arg;
  }

  __device__ __forceinline__ void shfl_merge(int offset) {
    State o;
    o.mL = __shfl_xor_sync(0xffffffffu, mL, offset);
    o.s0 = __shfl_xor_sync(0xffffffffu, s0, offset);
    o.s1 = __shfl_xor_sync(0xffffffffu, s1, offset);
    o.s2 = __shfl_xor_sync(0xffffffffu, s2, offset);
    o.best = __shfl_xor_sync(0xffffffffu, best, offset);
    o.arg = __shfl_xor_sync(0xffffffffu, arg, offset);
    merge(o);
  }
};

struct Outputs {
  float *logp, *lse, *entropy, *mu, *sigma;
  uint8_t *top1, *status;
};

// ROW_THREADS threads per row (32: a warp, else the whole block); each block holds 256 / ROW_THREADS rows.
// Per row: a scalar head up to the first 16-byte boundary, UNROLL 16-byte loads per thread per step (each
// step's run is folded with one max and at most one rescale), a scalar tail; then a butterfly shuffle in
// each warp and, for a block per row, one more through shared memory.
template <typename T, int ROW_THREADS>
__global__ void __launch_bounds__(256) token_stats_kernel(const typename T::Raw* __restrict__ logits, int64_t N,
                                                          int64_t V, int64_t inner, int64_t stride_outer,
                                                          int64_t stride_inner, const int64_t* __restrict__ targets,
                                                          int64_t ignore_index, Outputs out) {
  constexpr int VEC = T::VEC, UNROLL = 4;
  constexpr int ROWS = 256 / ROW_THREADS;
  const int lane = threadIdx.x % ROW_THREADS;
  const int64_t r = int64_t(blockIdx.x) * ROWS + threadIdx.x / ROW_THREADS;
  if (r >= N) return;  // uniform per row group; only warp-per-row blocks have several rows
  const int64_t y = targets[r];
  if (y == ignore_index || y < 0 || y >= V) {  // uniform per row: no thread of the row reads it
    if (lane == 0) {
      out.logp[r] = out.lse[r] = out.entropy[r] = out.mu[r] = out.sigma[r] = 0.0f;
      out.top1[r] = 0;
      out.status[r] = y == ignore_index ? kOk : kBadTarget;
    }
    return;
  }
  const typename T::Raw* row = logits + (r / inner) * stride_outer + (r % inner) * stride_inner;

  State st;
  st.init();
  // Head: elements before the first 16-byte boundary (fewer than VEC <= ROW_THREADS; one per thread).
  const int64_t mis = (reinterpret_cast<uintptr_t>(row) & 15) / sizeof(typename T::Raw);
  const int64_t head = mis ? (VEC - mis < V ? VEC - mis : V) : 0;
  const int64_t nvec = (V - head) / VEC;
  const int64_t body_end = head + nvec * VEC;
  if (lane < head) {
    const float z = T::to_float(row[lane]);
    st.template add<1>(&z, lane, 0);
  }
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  for (int64_t v0 = lane; v0 < nvec; v0 += int64_t(ROW_THREADS) * UNROLL) {
    uint4 q[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      // Slots past the row read as -inf: weight 0, never the argmax
      q[u] = v < nvec ? __ldcs(body + v) : make_uint4(T::NEG_INF, T::NEG_INF, T::NEG_INF, T::NEG_INF);
    }
    float z[UNROLL * VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) T::unpack(q[u], z + u * VEC);
    // The UNROLL vectors of one step sit ROW_THREADS vectors apart: process them one vector at a time so
    // that every run has contiguous indices (the argmax search needs them in increasing order).
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) st.template add<VEC>(z + u * VEC, head + (v0 + int64_t(u) * ROW_THREADS) * VEC, 1);
  }
  if (body_end + lane < V) {  // tail: fewer than VEC elements
    const float z = T::to_float(row[body_end + lane]);
    st.template add<1>(&z, body_end + lane, 0);
  }

#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) st.shfl_merge(offset);
  if constexpr (ROW_THREADS > 32) {
    constexpr int WARPS = ROW_THREADS / 32;
    __shared__ State part[WARPS];
    if (lane % 32 == 0) part[lane / 32] = st;
    __syncthreads();
    if (lane >= 32) return;
    st = part[lane % WARPS];
#pragma unroll
    for (int offset = WARPS / 2; offset > 0; offset >>= 1) st.shfl_merge(offset);
  }
  if (lane != 0) return;

  out.logp[r] = out.lse[r] = out.entropy[r] = out.mu[r] = out.sigma[r] = 0.0f;
  out.top1[r] = 0;
  if (!(isfinite(st.s0) && isfinite(st.s1) && isfinite(st.s2)) || st.best == INFINITY) {
    out.status[r] = kNonFinite;
    return;
  }
  if (st.best == -INFINITY) {  // no finite logit; NaNs would have poisoned s0 above
    out.status[r] = kNoFinite;
    return;
  }
  // Back to natural-log units in double (a few operations per row), dividing by the float log2e the pass
  // used, so the rounding of mL cancels out of every statistic.
  const double L = kLog2e, log2_s0 = log2(double(st.s0));
  const double mean = double(st.s1) / st.s0;
  const double var = fmax(double(st.s2) / st.s0 - mean * mean, 0.0);
  const double mu = (mean - log2_s0) / L;
  out.logp[r] = float((double(T::to_float(row[y])) * L - st.mL - log2_s0) / L);
  out.lse[r] = float((double(st.mL) + log2_s0) / L);
  out.entropy[r] = float(-mu);
  out.mu[r] = float(mu);
  out.sigma[r] = float(sqrt(var) / L);
  out.top1[r] = st.arg == y;
  out.status[r] = kOk;
}

// One block per row: load the valid values (+inf elsewhere) into shared memory, bitonic-sort P = 2^k >= T
// of them, then one block reduction (in double) per count.
__global__ void __launch_bounds__(512) min_k_kernel(const float* __restrict__ values, const uint8_t* __restrict__ mask,
                                                    int64_t T, int P, const int64_t* __restrict__ counts, int K,
                                                    float* __restrict__ out) {
  extern __shared__ float buf[];
  __shared__ double warp_sum[512 / 32];
  __shared__ int n_valid;
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) n_valid = 0;
  __syncthreads();
  int n = 0;
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const bool ok = i < T && mask[b * T + i];
    buf[i] = ok ? values[b * T + i] : INFINITY;
    n += ok;
  }
  atomicAdd(&n_valid, n);
  for (int k = 2; k <= P; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i) {
          const float a = buf[i], c = buf[partner];
          if ((a > c) == ((i & k) == 0)) buf[i] = c, buf[partner] = a;
        }
      }
    }
  }
  __syncthreads();
  for (int kk = 0; kk < K; ++kk) {
    const int64_t c = counts[b * K + kk];
    double s = 0.0;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += buf[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < int(blockDim.x / 32); ++w) total += warp_sum[w];
      out[b * K + kk] = n_valid ? float(total / double(c)) : 0.0f;
    }
    __syncthreads();
  }
}

template <typename T, int ROW_THREADS>
void launch_token_stats(const void* logits, int64_t N, int64_t V, int64_t inner, int64_t so, int64_t si,
                        const int64_t* targets, int64_t ignore_index, Outputs out, cudaStream_t stream) {
  constexpr int ROWS = 256 / ROW_THREADS;
  const unsigned grid = unsigned((N + ROWS - 1) / ROWS);
  token_stats_kernel<T, ROW_THREADS><<<grid, 256, 0, stream>>>(
      static_cast<const typename T::Raw*>(logits), N, V, inner, so, si, targets, ignore_index, out);
}

template <typename T>
void dispatch_rows(const void* logits, int64_t N, int64_t V, int64_t inner, int64_t so, int64_t si,
                   const int64_t* targets, int64_t ignore_index, Outputs out, cudaStream_t stream) {
  // A warp per row while a row is at most 8 loads per lane; beyond that a 256-thread block per row keeps
  // enough bytes in flight per row (large vocabularies: 32k-256k entries).
  if (V <= 32 * 8 * T::VEC)
    launch_token_stats<T, 32>(logits, N, V, inner, so, si, targets, ignore_index, out, stream);
  else
    launch_token_stats<T, 256>(logits, N, V, inner, so, si, targets, ignore_index, out, stream);
}

}  // namespace

// logits: element (r, v) of the [N, V] view is at logits[(r / inner) * stride_outer + (r % inner) * stride_inner
// + v] (elements); its rows need only element alignment. dtype: 0 fp32, 1 bf16, 2 fp16. Outputs as in
// token_stats_cpu.cpp. Returns a cudaError_t (0 on success).
extern "C" int kdfast_token_stats_cuda(const void* logits, int dtype, int64_t N, int64_t V, int64_t inner,
                                       int64_t stride_outer, int64_t stride_inner, const int64_t* targets,
                                       int64_t ignore_index, float* logp, float* lse, float* entropy, float* mu,
                                       float* sigma, uint8_t* top1, uint8_t* status, void* stream) {
  if (N == 0) return 0;
  const Outputs out{logp, lse, entropy, mu, sigma, top1, status};
  const auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    dispatch_rows<F32>(logits, N, V, inner, stride_outer, stride_inner, targets, ignore_index, out, s);
  else if (dtype == 1)
    dispatch_rows<BF16>(logits, N, V, inner, stride_outer, stride_inner, targets, ignore_index, out, s);
  else
    dispatch_rows<F16>(logits, N, V, inner, stride_outer, stride_inner, targets, ignore_index, out, s);
  return int(cudaGetLastError());
}

// The largest T the Min-K% kernel takes; longer rows go to the caller's fallback.
extern "C" int kdfast_min_k_cuda_max_t() { return kMaxMinKT; }

// values, mask: [B, T] (contiguous; mask as bytes); counts: [B, K]; out: [B, K] fp32. Returns a cudaError_t.
extern "C" int kdfast_min_k_cuda(const float* values, const uint8_t* mask, int64_t B, int64_t T,
                                 const int64_t* counts, int64_t K, float* out, void* stream) {
  if (B == 0 || K == 0) return 0;
  if (T > kMaxMinKT) return int(cudaErrorInvalidValue);
  int P = 1;
  while (P < T) P <<= 1;
  const int threads = P >= 1024 ? 512 : (P >= 64 ? P / 2 : 32);
  min_k_kernel<<<unsigned(B), threads, P * sizeof(float), static_cast<cudaStream_t>(stream)>>>(
      values, mask, T, P, counts, int(K), out);
  return int(cudaGetLastError());
}
