// Thin torch glue: argument checks, output allocation and dispatch of the csrc kernels as torch.ops.kdfast_ext.*
//
// Registered with TORCH_LIBRARY rather than pybind11: the light headers build in ~4 s instead of ~20 s.
// The CUDA launchers are declared only under KDFAST_WITH_CUDA, so a CPU-only torch builds this file too.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#ifdef KDFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

extern "C" int kdfast_token_stats_cuda(const void* logits, int dtype, int64_t N, int64_t V, int64_t inner,
                                       int64_t stride_outer, int64_t stride_inner, const int64_t* targets,
                                       int64_t ignore_index, float* logp, float* lse, float* entropy, float* mu,
                                       float* sigma, uint8_t* top1, uint8_t* status, void* stream);
extern "C" int kdfast_min_k_cuda_max_t();
extern "C" int kdfast_min_k_cuda(const float* values, const uint8_t* mask, int64_t B, int64_t T,
                                 const int64_t* counts, int64_t K, float* out, void* stream);
#endif

namespace kdfast {
namespace cpu {
void token_stats(const void* logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t stride_outer,
                 int64_t stride_inner, const int64_t* targets, int64_t ignore_index, float* const out[5],
                 uint8_t* top1, uint8_t* status, int num_threads);
void min_k(const float* values, const uint8_t* mask, int64_t B, int64_t T, const int64_t* counts, int64_t K,
           float* out, int num_threads);
}  // namespace cpu

namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "token_stats: logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// The [N, V] row geometry of a [N, V] or [B, T, V] tensor whose last dimension is contiguous.
struct Rows {
  int64_t n, v, inner, stride_outer, stride_inner;
};

Rows rows_of(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "token_stats: logits must be [N, V] or [B, T, V]");
  TORCH_CHECK(logits.stride(-1) == 1, "token_stats: the vocabulary dimension of logits must be contiguous");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "token_stats: targets must be contiguous int64");
  TORCH_CHECK(targets.device() == logits.device(), "token_stats: logits and targets must be on one device");
  Rows r;
  r.v = logits.size(-1);
  if (logits.dim() == 2) {
    r.n = logits.size(0), r.inner = std::max<int64_t>(r.n, 1), r.stride_outer = 0, r.stride_inner = logits.stride(0);
  } else {
    r.n = logits.size(0) * logits.size(1), r.inner = std::max<int64_t>(logits.size(1), 1);
    r.stride_outer = logits.stride(0), r.stride_inner = logits.stride(1);
  }
  TORCH_CHECK(targets.numel() == r.n, "token_stats: targets must have one entry per row of logits");
  TORCH_CHECK(r.v >= 1, "token_stats: the vocabulary is empty");
  return r;
}

Stats alloc_stats(const at::Tensor& logits, int64_t n) {
  const auto f = logits.options().dtype(at::kFloat);
  const auto b = logits.options().dtype(at::kBool);
  return {at::empty({n}, f), at::empty({n}, f), at::empty({n}, f), at::empty({n}, f), at::empty({n}, f),
          at::empty({n}, b), at::empty({n}, logits.options().dtype(at::kByte))};
}

// Returns (logp, lse, entropy, mu, sigma: [N] fp32; top1: [N] bool; status: [N] uint8, 0 = ok, 1 = NaN/+inf
// logits, 2 = target out of range, 3 = no finite logit).
Stats token_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  const Rows r = rows_of(logits, targets);
  Stats s = alloc_stats(logits, r.n);
  float* const out[5] = {std::get<0>(s).data_ptr<float>(), std::get<1>(s).data_ptr<float>(),
                         std::get<2>(s).data_ptr<float>(), std::get<3>(s).data_ptr<float>(),
                         std::get<4>(s).data_ptr<float>()};
  cpu::token_stats(logits.data_ptr(), dtype_code(logits), r.n, r.v, r.inner, r.stride_outer, r.stride_inner,
                   targets.data_ptr<int64_t>(), ignore_index, out,
                   reinterpret_cast<uint8_t*>(std::get<5>(s).data_ptr<bool>()), std::get<6>(s).data_ptr<uint8_t>(),
                   at::get_num_threads());
  return s;
}

void check_min_k(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& counts) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "min_k: values must be contiguous float32 [B, T]");
  TORCH_CHECK(mask.sizes() == values.sizes() && mask.scalar_type() == at::kBool && mask.is_contiguous(),
              "min_k: mask must be contiguous bool, shaped like values");
  TORCH_CHECK(counts.dim() == 2 && counts.size(0) == values.size(0) && counts.scalar_type() == at::kLong &&
                  counts.is_contiguous(), "min_k: counts must be contiguous int64 [B, K]");
}

// values [B, T] fp32, mask [B, T] bool, counts [B, K] int64 -> [B, K] fp32 (see token_stats_cpu.cpp).
at::Tensor min_k_cpu(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& counts) {
  check_min_k(values, mask, counts);
  at::Tensor out = at::empty({values.size(0), counts.size(1)}, values.options());
  cpu::min_k(values.data_ptr<float>(), reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), values.size(0),
             values.size(1), counts.data_ptr<int64_t>(), counts.size(1), out.data_ptr<float>(), at::get_num_threads());
  return out;
}

#ifdef KDFAST_WITH_CUDA
void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA error ", err, " (", cudaGetErrorString(static_cast<cudaError_t>(err)), ")");
}

Stats token_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  const Rows r = rows_of(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  Stats s = alloc_stats(logits, r.n);
  check_cuda(kdfast_token_stats_cuda(
                 logits.data_ptr(), dtype_code(logits), r.n, r.v, r.inner, r.stride_outer, r.stride_inner,
                 targets.data_ptr<int64_t>(), ignore_index, std::get<0>(s).data_ptr<float>(),
                 std::get<1>(s).data_ptr<float>(), std::get<2>(s).data_ptr<float>(), std::get<3>(s).data_ptr<float>(),
                 std::get<4>(s).data_ptr<float>(), reinterpret_cast<uint8_t*>(std::get<5>(s).data_ptr<bool>()),
                 std::get<6>(s).data_ptr<uint8_t>(), c10::cuda::getCurrentCUDAStream().stream()),
             "token_stats");
  return s;
}

at::Tensor min_k_cuda(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& counts) {
  check_min_k(values, mask, counts);
  TORCH_CHECK(values.size(1) <= kdfast_min_k_cuda_max_t(), "min_k: rows longer than ", kdfast_min_k_cuda_max_t(),
              " tokens are not supported by the CUDA kernel");
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({values.size(0), counts.size(1)}, values.options());
  check_cuda(kdfast_min_k_cuda(values.data_ptr<float>(), reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
                               values.size(0), values.size(1), counts.data_ptr<int64_t>(), counts.size(1),
                               out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
             "min_k");
  return out;
}
#endif

// What this build holds, e.g. "cpu+cuda sources=<hash>" (the hash is set by kdfast/_ext.py and setup.py, so a
// stale ahead-of-time build is recognized).
std::string ext_info() {
#ifdef KDFAST_WITH_CUDA
  std::string kinds = "cpu+cuda";
#else
  std::string kinds = "cpu";
#endif
#ifdef KDFAST_SOURCE_HASH
#define KDFAST_STR(x) #x
#define KDFAST_XSTR(x) KDFAST_STR(x)
  return kinds + " sources=" KDFAST_XSTR(KDFAST_SOURCE_HASH);
#else
  return kinds + " sources=unknown";
#endif
}

int64_t min_k_max_t() {
#ifdef KDFAST_WITH_CUDA
  return kdfast_min_k_cuda_max_t();
#else
  return 0;
#endif
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY(kdfast_ext, m) {
  m.def("token_stats(Tensor logits, Tensor targets, int ignore_index) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("min_k(Tensor values, Tensor mask, Tensor counts) -> Tensor");
  m.def("ext_info() -> str", &kdfast::ext_info);
  m.def("min_k_cuda_max_t() -> int", &kdfast::min_k_max_t);
}

TORCH_LIBRARY_IMPL(kdfast_ext, CPU, m) {
  m.impl("token_stats", &kdfast::token_stats_cpu);
  m.impl("min_k", &kdfast::min_k_cpu);
}

#ifdef KDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(kdfast_ext, CUDA, m) {
  m.impl("token_stats", &kdfast::token_stats_cuda);
  m.impl("min_k", &kdfast::min_k_cuda);
}
#endif
