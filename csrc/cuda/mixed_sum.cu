// Family 1 on NVIDIA GPUs: the weighted sum of K candidate outputs, its backward, and the
// masked softmax.
//
// Forward reads each candidate once and writes the sum once (memory bound). Up to kChunk
// candidate pointers travel in the kernel's parameter block; larger K runs in chunks with the
// running sum kept in the accumulation dtype. Backward writes grad_y_k = w_k * g and one
// partial <g, y_k> per (k, block) into a [K, blocks] buffer; the last block to finish the final
// launch sums that buffer in a fixed order and writes grad_w (no separate reduction launch; a
// fixed grid and a fixed order make it deterministic: the one atomic only elects that block).
// Each thread loads g and every y_j of an element (or vector unit) before it stores any
// grad_y_j, so all the loads are in flight together (a store first would have to be ordered
// before the next load).
// When every pointer of a launch is 16-byte aligned, both kernels move V = 16 / sizeof(scalar_t)
// elements per access (8 half/bf16, 4 float, 2 double; the fp32 running sum of half types as
// two 16-byte halves) and the last n % V elements take the scalar step; otherwise all of n does.
// Per-element arithmetic is the same either way; only the order in which a thread adds its
// elements into a partial dot differs (fixed for a given n and alignment).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace toponas {
namespace {

constexpr int kChunk = 16;
constexpr int kThreads = 256;
constexpr int kMaxBlocks = 2048;

template <typename T>
struct PtrPack {
  T* __restrict__ p[kChunk];  // distinct tensors: never aliasing each other or the other arguments
};

int64_t blocks_for(int64_t n, int per_thread) {
  const int64_t b = (n + static_cast<int64_t>(kThreads) * per_thread - 1) / (static_cast<int64_t>(kThreads) * per_thread);
  return std::max<int64_t>(1, std::min<int64_t>(b, kMaxBlocks * 8));
}

// N elements accessed as one unit: 16-byte (or narrower when the unit is) alignment, so a unit of
// 8 floats is two 16-byte accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Unit i (elements [i*V, i*V+V)) of the forward: the running sum over this launch's candidates.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void fwd_step(const PtrPack<const scalar_t>& ys, const acc_t* wk, int num,
                                         acc_t* __restrict__ acc_buf, scalar_t* __restrict__ out,
                                         int64_t i, bool accumulate, bool final) {
  using VS = Vec<scalar_t, V>;
  using VA = Vec<acc_t, V>;
  VA acc;
  if (accumulate) {
    acc = reinterpret_cast<const VA*>(acc_buf)[i];
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) acc.v[e] = acc_t(0);
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < num) {
      const VS y = reinterpret_cast<const VS*>(ys.p[j])[i];
#pragma unroll
      for (int e = 0; e < V; ++e) acc.v[e] += wk[j] * static_cast<acc_t>(y.v[e]);
    }
  }
  if (final) {
    VS o;
#pragma unroll
    for (int e = 0; e < V; ++e) o.v[e] = static_cast<scalar_t>(acc.v[e]);
    reinterpret_cast<VS*>(out)[i] = o;
  } else {
    reinterpret_cast<VA*>(acc_buf)[i] = acc;
  }
}

template <int V, typename scalar_t, typename acc_t>
__global__ void mixed_sum_fwd_kernel(PtrPack<const scalar_t> ys, const scalar_t* __restrict__ w,
                                     int num, int k0, acc_t* __restrict__ acc_buf,
                                     scalar_t* __restrict__ out, int64_t n, bool accumulate,
                                     bool final) {
  acc_t wk[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) wk[j] = j < num ? static_cast<acc_t>(w[k0 + j]) : acc_t(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t units = n / V;
  for (int64_t i = tid; i < units; i += stride)
    fwd_step<V>(ys, wk, num, acc_buf, out, i, accumulate, final);
  for (int64_t i = units * V + tid; i < n; i += stride)  // the tail (none when V == 1)
    fwd_step<1>(ys, wk, num, acc_buf, out, i, accumulate, final);
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  // Warp shuffle, then one warp over the warp sums: a fixed order for a fixed block size.
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[lane] : acc_t(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();
  return v;
}

// Unit i of the backward: every load of the unit first, then the stores and the dot updates.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void bwd_step(const scalar_t* __restrict__ g, const PtrPack<const scalar_t>& ys,
                                         const PtrPack<scalar_t>& gys, const acc_t* wk, acc_t* dot,
                                         int num, int64_t i) {
  using VS = Vec<scalar_t, V>;
  using Word = std::conditional_t<sizeof(VS) % 4 == 0, uint32_t, uint16_t>;
  using Bits = Vec<Word, sizeof(VS) / sizeof(Word)>;
  const VS gv = reinterpret_cast<const VS*>(g)[i];
  // The y_j are held as the raw words loaded (32-bit; 16-bit for a single half/bf16): held as
  // 16-bit fields, a conditional load gets split into one register per element (bf16: 214
  // registers instead of 148 on sm_90).
  Bits yv[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j)
    if (j < num) yv[j] = reinterpret_cast<const Bits*>(ys.p[j])[i];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < num) {
      VS y, o;
      memcpy(&y, &yv[j], sizeof(VS));
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc_t ge = static_cast<acc_t>(gv.v[e]);
        o.v[e] = static_cast<scalar_t>(wk[j] * ge);
        dot[j] += ge * static_cast<acc_t>(y.v[e]);
      }
      reinterpret_cast<VS*>(gys.p[j])[i] = o;
    }
  }
}

template <int V, typename scalar_t, typename acc_t>
__global__ void mixed_sum_bwd_kernel(const scalar_t* __restrict__ g, PtrPack<const scalar_t> ys,
                                     PtrPack<scalar_t> gys, const scalar_t* __restrict__ w, int num,
                                     int k0, acc_t* parts, int64_t n, int num_total,
                                     unsigned int* __restrict__ done, scalar_t* __restrict__ grad_w) {
  __shared__ acc_t shared[32];
  __shared__ bool last;
  acc_t wk[kChunk], dot[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    wk[j] = j < num ? static_cast<acc_t>(w[k0 + j]) : acc_t(0);
    dot[j] = acc_t(0);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t units = n / V;
  for (int64_t i = tid; i < units; i += stride) bwd_step<V>(g, ys, gys, wk, dot, num, i);
  for (int64_t i = units * V + tid; i < n; i += stride) bwd_step<1>(g, ys, gys, wk, dot, num, i);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < num) {  // num is uniform across the block: every thread takes the same branches
      const acc_t total = block_sum(dot[j], shared);
      if (threadIdx.x == 0) parts[static_cast<int64_t>(k0 + j) * gridDim.x + blockIdx.x] = total;
    }
  }
  if (k0 + num != num_total) return;  // uniform: only the final chunk's launch reduces
  __threadfence();                    // this block's partials are visible before it counts itself
  if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const volatile acc_t* vparts = parts;
  for (int k = 0; k < num_total; ++k) {
    acc_t v = acc_t(0);
    for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x)
      v += vparts[static_cast<int64_t>(k) * gridDim.x + b];  // fixed order per thread
    v = block_sum(v, shared);                                 // fixed order across threads
    if (threadIdx.x == 0) grad_w[k] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void masked_softmax_fwd_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ m,
                                          scalar_t* __restrict__ p, int64_t rows, int64_t K,
                                          acc_t inv_tau) {
  // K is small (the candidates of an edge): one thread per row.
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const scalar_t* xr = x + r * K;
  const bool* mr = m + r * K;
  acc_t mx = -INFINITY;
  for (int64_t k = 0; k < K; ++k)
    if (mr[k]) mx = max(mx, static_cast<acc_t>(xr[k]) * inv_tau);
  acc_t sum = 0;
  for (int64_t k = 0; k < K; ++k)
    if (mr[k]) sum += exp(static_cast<acc_t>(xr[k]) * inv_tau - mx);
  for (int64_t k = 0; k < K; ++k)
    p[r * K + k] = mr[k] ? static_cast<scalar_t>(exp(static_cast<acc_t>(xr[k]) * inv_tau - mx) / sum)
                         : static_cast<scalar_t>(0);
}

template <typename scalar_t, typename acc_t>
__global__ void masked_softmax_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ p,
                                          scalar_t* __restrict__ gx, int64_t rows, int64_t K,
                                          acc_t inv_tau) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  acc_t dot = 0;
  for (int64_t k = 0; k < K; ++k) dot += static_cast<acc_t>(g[r * K + k]) * static_cast<acc_t>(p[r * K + k]);
  for (int64_t k = 0; k < K; ++k)
    gx[r * K + k] = static_cast<scalar_t>(static_cast<acc_t>(p[r * K + k]) *
                                          (static_cast<acc_t>(g[r * K + k]) - dot) * inv_tau);
}

at::Tensor mixed_sum_cuda(at::TensorList outputs, const at::Tensor& weights) {
  check_candidates(outputs, weights);
  const c10::cuda::CUDAGuard guard(outputs[0].device());
  auto ys = contiguous_all(outputs);
  auto w = weights.contiguous();
  auto out = at::empty_like(ys[0], at::MemoryFormat::Contiguous);
  const int64_t n = out.numel();
  const int num_total = static_cast<int>(ys.size());
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  bool aligned = aligned16(out);
  for (const auto& y : ys) aligned = aligned && aligned16(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor scratch;
    if (num_total > kChunk) scratch = at::empty({n}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t blocks = blocks_for(n, std::max(4, V));
      for (int k0 = 0; k0 < num_total; k0 += kChunk) {
        const int num = std::min(kChunk, num_total - k0);
        PtrPack<const scalar_t> pack{};
        for (int j = 0; j < kChunk; ++j) pack.p[j] = ys[k0 + std::min(j, num - 1)].data_ptr<scalar_t>();
        mixed_sum_fwd_kernel<V, scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            pack, w.data_ptr<scalar_t>(), num, k0,
            scratch.defined() ? scratch.data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>(), n,
            k0 > 0, k0 + num == num_total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (aligned && (!scratch.defined() || aligned16(scratch)))
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return out;
}

std::vector<at::Tensor> mixed_sum_backward_cuda(const at::Tensor& grad, at::TensorList outputs,
                                                const at::Tensor& weights) {
  check_candidates(outputs, weights);
  check_grad_like(grad, outputs[0], "outputs[0]");
  const c10::cuda::CUDAGuard guard(grad.device());
  auto g = grad.contiguous();
  auto ys = contiguous_all(outputs);
  auto w = weights.contiguous();
  const int64_t n = g.numel();
  const int num_total = static_cast<int>(ys.size());
  std::vector<at::Tensor> result;
  for (const auto& y : ys) result.push_back(at::empty_like(y, at::MemoryFormat::Contiguous));
  if (n == 0) {
    result.push_back(at::zeros_like(w));
    return result;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  bool aligned = aligned16(g);
  for (size_t k = 0; k < ys.size(); ++k) aligned = aligned && aligned16(ys[k]) && aligned16(result[k]);
  auto grad_w = at::empty({num_total}, w.options());
  auto done = at::zeros({1}, g.options().dtype(at::kInt));  // blocks finished in the final launch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mixed_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t blocks = std::min<int64_t>(blocks_for(n, std::max(4, V)), kMaxBlocks);
      auto parts = at::empty({num_total, blocks}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      for (int k0 = 0; k0 < num_total; k0 += kChunk) {
        const int num = std::min(kChunk, num_total - k0);
        PtrPack<const scalar_t> yp{};
        PtrPack<scalar_t> gp{};
        for (int j = 0; j < kChunk; ++j) {
          yp.p[j] = ys[k0 + std::min(j, num - 1)].data_ptr<scalar_t>();
          gp.p[j] = result[k0 + std::min(j, num - 1)].data_ptr<scalar_t>();
        }
        mixed_sum_bwd_kernel<V, scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            g.data_ptr<scalar_t>(), yp, gp, w.data_ptr<scalar_t>(), num, k0, parts.data_ptr<acc_t>(), n,
            num_total, reinterpret_cast<unsigned int*>(done.data_ptr<int>()), grad_w.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (aligned)
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  result.push_back(grad_w);
  return result;
}

at::Tensor masked_softmax_cuda(const at::Tensor& logits, const at::Tensor& mask, double tau) {
  check_softmax_args(logits, mask, tau);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto x = logits.contiguous();
  auto m = mask.contiguous();
  auto p = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t K = x.size(-1), rows = x.numel() / K;
  if (rows == 0) return p;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_softmax_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    masked_softmax_fwd_kernel<scalar_t, acc_t><<<(rows + 127) / 128, 128, 0, stream>>>(
        x.data_ptr<scalar_t>(), m.data_ptr<bool>(), p.data_ptr<scalar_t>(), rows, K,
        static_cast<acc_t>(1.0 / tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

at::Tensor masked_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& probs, double tau) {
  check_grad_like(grad, probs, "probs");
  const c10::cuda::CUDAGuard guard(probs.device());
  auto g = grad.contiguous();
  auto p = probs.contiguous();
  auto gx = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t K = p.size(-1), rows = K == 0 ? 0 : p.numel() / K;
  if (rows == 0) return gx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_softmax_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    masked_softmax_bwd_kernel<scalar_t, acc_t><<<(rows + 127) / 128, 128, 0, stream>>>(
        g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), rows, K,
        static_cast<acc_t>(1.0 / tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(toponas, CUDA, m) {
  m.impl("mixed_sum_kernel", &mixed_sum_cuda);
  m.impl("mixed_sum_backward_kernel", &mixed_sum_backward_cuda);
  m.impl("masked_softmax_kernel", &masked_softmax_cuda);
  m.impl("masked_softmax_backward_kernel", &masked_softmax_backward_cuda);
}

}  // namespace toponas
