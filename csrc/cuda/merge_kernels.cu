// Family 2 on NVIDIA GPUs: normalize K candidate conv kernels and merge them into one, and the
// backward to every candidate and to the weights (math: toponas_kernels/ops/merge.py).
//
// One thread block per output channel o; up to kSlots candidates per launch travel in the
// kernel's parameter block (pointer, size, dilation, first-tap offset), larger K runs in chunks.
//
// * forward, "channel"/"none": one launch. Each block reduces its channel's mean and centred sum
//   of squares for every candidate, then writes its I*kmax*kmax merged taps once, gathering
//   every candidate's taps; with K > kSlots the running sum is kept in the accumulation dtype.
// * "tensor" mode: a stats launch writes per-(candidate, channel) rows (mean_c, M2_c, sum G,
//   sum G (x - mean_c)); every block of the next launch combines the O rows of a candidate with
//   the same fixed-order block reduction (Chan's formula), so all blocks agree.
// * backward: per candidate a mean pass, one pass for M2, sum G and sum G (x - mean), and the
//   write pass; the partial weight gradient of (candidate, channel) goes to parts[j, o], summed
//   over o afterwards. Fixed grid, fixed block size, fixed reduction order, no atomics:
//   deterministic.
//
// Only the inputs are read: nothing from the forward is saved or needed in the backward.
//
// Accesses stay scalar (unlike mixed_sum and the shuffle): the tensors are small (at most
// 64*64*81 elements, about 1 MB in fp32), so launches and block reductions cost more than
// bandwidth; and a candidate's taps land in the merged kernel at dilated offsets (rows of k
// taps, d apart), so there are few aligned 16-byte runs to move anyway.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common.h"
#include "../merge_kernels.h"

namespace toponas {
namespace {

constexpr int kSlots = 8;
constexpr int kThreads = 256;  // a multiple of 32: block_allreduce relies on whole warps

template <typename scalar_t>
struct CandPack {
  const scalar_t* x[kSlots];
  scalar_t* dx[kSlots];
  int64_t ks[kSlots];
  int64_t dil[kSlots];
  int64_t start[kSlots];
};

// Sum over the block, returned to every thread. Every thread must call it (uniform control
// flow); the order of the additions is fixed for a fixed blockDim.
template <typename acc_t>
__device__ acc_t block_allreduce(acc_t v, acc_t* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with shared
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : acc_t(0);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) shared[32] = v;
  }
  __syncthreads();
  return shared[32];
}

// Merged-gradient offset (within channel o's slab) of candidate element t = (i, a, b).
__device__ __forceinline__ int64_t tap_offset(int64_t t, int64_t ks, int64_t d, int64_t st, int64_t km) {
  const int64_t i = t / (ks * ks), a = (t / ks) % ks, b = t % ks;
  return (i * km + st + a * d) * km + st + b * d;
}

// Channel o of candidate x (n elements): the mean (0 when !center), M2, sum G, sum G (x - mean).
template <typename scalar_t, typename acc_t>
__device__ void channel_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t n,
                             int64_t ks, int64_t d, int64_t st, int64_t km, bool center, acc_t* shared,
                             acc_t& mean, acc_t& m2, acc_t& sg, acc_t& sgx) {
  mean = acc_t(0);
  if (center) {
    acc_t s = 0;
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) s += static_cast<acc_t>(x[t]);
    mean = block_allreduce(s, shared) / static_cast<acc_t>(n);
  }
  acc_t a2 = 0, ag = 0, agx = 0;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    const acc_t dx = static_cast<acc_t>(x[t]) - mean;
    a2 += dx * dx;
    if (g != nullptr) {
      const acc_t gv = static_cast<acc_t>(g[tap_offset(t, ks, d, st, km)]);
      ag += gv;
      agx += gv * dx;
    }
  }
  m2 = block_allreduce(a2, shared);
  sg = g != nullptr ? block_allreduce(ag, shared) : acc_t(0);
  sgx = g != nullptr ? block_allreduce(agx, shared) : acc_t(0);
}

// "tensor" mode: combine the O rows (mean_c, M2_c, sG_c, sGx_c) of one candidate.
template <typename acc_t>
__device__ void combine_rows(const acc_t* __restrict__ rows, int64_t O, acc_t n_c, acc_t* shared,
                             acc_t& mean, acc_t& sd, acc_t& sg, acc_t& sgx) {
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < O; c += blockDim.x) s += rows[c * 4];
  mean = block_allreduce(s, shared) / static_cast<acc_t>(O);
  acc_t a2 = 0, ag = 0, agx = 0;
  for (int64_t c = threadIdx.x; c < O; c += blockDim.x) {
    const acc_t dm = rows[c * 4] - mean;
    a2 += rows[c * 4 + 1] + n_c * dm * dm;
    ag += rows[c * 4 + 2];
    agx += rows[c * 4 + 3] + dm * rows[c * 4 + 2];
  }
  sd = sqrt(block_allreduce(a2, shared) / (n_c * static_cast<acc_t>(O)));
  sg = block_allreduce(ag, shared);
  sgx = block_allreduce(agx, shared);
}

template <typename scalar_t, typename acc_t>
__global__ void merge_stats_kernel(CandPack<scalar_t> pack, int num, int64_t k0, const scalar_t* __restrict__ g,
                                   int64_t O, int64_t I, int64_t km, acc_t* __restrict__ rows) {
  __shared__ acc_t shared[33];
  const int64_t o = blockIdx.x;
  for (int j = 0; j < num; ++j) {  // num is uniform across the block
    const int64_t ks = pack.ks[j], n = I * ks * ks;
    acc_t mean, m2, sg, sgx;
    channel_sums<scalar_t, acc_t>(pack.x[j] + o * n, g != nullptr ? g + o * I * km * km : nullptr, n, ks,
                                  pack.dil[j], pack.start[j], km, true, shared, mean, m2, sg, sgx);
    if (threadIdx.x == 0) {
      acc_t* row = rows + ((k0 + j) * O + o) * 4;
      row[0] = mean;
      row[1] = m2;
      row[2] = sg;
      row[3] = sgx;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void merge_fwd_kernel(CandPack<scalar_t> pack, const scalar_t* __restrict__ w, int num, int64_t k0,
                                 const acc_t* __restrict__ rows, int64_t O, int64_t I, int64_t km, int mode,
                                 acc_t eps, acc_t* __restrict__ acc_buf, scalar_t* __restrict__ out,
                                 bool accumulate, bool final) {
  __shared__ acc_t shared[33];
  const int64_t o = blockIdx.x;
  acc_t mean[kSlots], coef[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    mean[j] = acc_t(0);
    coef[j] = acc_t(0);
    if (j < num) {
      const int64_t ks = pack.ks[j], n = I * ks * ks;
      const acc_t wj = static_cast<acc_t>(w[k0 + j]);
      acc_t m2, sg, sgx, sd;
      if (mode == 1) {
        channel_sums<scalar_t, acc_t>(pack.x[j] + o * n, nullptr, n, ks, 1, 0, ks, true, shared, mean[j], m2,
                                      sg, sgx);
        coef[j] = wj / (sqrt(m2 / static_cast<acc_t>(n)) + eps);
      } else if (mode == 2) {
        combine_rows<acc_t>(rows + (k0 + j) * O * 4, O, static_cast<acc_t>(n), shared, mean[j], sd, sg, sgx);
        coef[j] = wj / (sd + eps);
      } else {
        coef[j] = wj;
      }
    }
  }
  const int64_t n_out = I * km * km;
  for (int64_t t = threadIdx.x; t < n_out; t += blockDim.x) {
    const int64_t i = t / (km * km), r = (t / km) % km, c = t % km;
    const int64_t idx = o * n_out + t;
    acc_t acc = accumulate ? acc_buf[idx] : acc_t(0);
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (j < num) {
        const int64_t ks = pack.ks[j], d = pack.dil[j];
        const int64_t rr = r - pack.start[j], cc = c - pack.start[j], span = (ks - 1) * d + 1;
        if (rr >= 0 && rr < span && cc >= 0 && cc < span && rr % d == 0 && cc % d == 0) {
          const scalar_t v = pack.x[j][((o * I + i) * ks + rr / d) * ks + cc / d];
          acc += (static_cast<acc_t>(v) - mean[j]) * coef[j];
        }
      }
    }
    if (final)
      out[idx] = static_cast<scalar_t>(acc);
    else
      acc_buf[idx] = acc;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void merge_bwd_kernel(CandPack<scalar_t> pack, const scalar_t* __restrict__ w, int num, int64_t k0,
                                 const scalar_t* __restrict__ g, const acc_t* __restrict__ rows, int64_t O,
                                 int64_t I, int64_t km, int mode, acc_t eps, acc_t* __restrict__ parts) {
  __shared__ acc_t shared[33];
  const int64_t o = blockIdx.x;
  const scalar_t* go = g + o * I * km * km;
  for (int j = 0; j < num; ++j) {  // num is uniform across the block
    const int64_t ks = pack.ks[j], d = pack.dil[j], st = pack.start[j], n = I * ks * ks;
    const acc_t wj = static_cast<acc_t>(w[k0 + j]);
    const scalar_t* x = pack.x[j] + o * n;
    acc_t mean, sd = 0, inv = 1, sg, sgx, cnt = static_cast<acc_t>(n), part;
    if (mode == 2) {
      const acc_t* jrows = rows + (k0 + j) * O * 4;
      combine_rows<acc_t>(jrows, O, static_cast<acc_t>(n), shared, mean, sd, sg, sgx);
      inv = acc_t(1) / (sd + eps);
      cnt *= static_cast<acc_t>(O);
      const acc_t* own = jrows + o * 4;
      part = (own[3] + (own[0] - mean) * own[2]) * inv;
    } else {
      acc_t m2;
      channel_sums<scalar_t, acc_t>(x, go, n, ks, d, st, km, mode == 1, shared, mean, m2, sg, sgx);
      if (mode == 1) {
        sd = sqrt(m2 / cnt);
        inv = acc_t(1) / (sd + eps);
      }
      part = sgx * inv;
    }
    if (threadIdx.x == 0) parts[(k0 + j) * O + o] = part;
    acc_t c1 = 0, c2 = 0;
    if (mode != 0) {
      c1 = sg / cnt;
      // d std / d x = (x - mean) / (cnt std): undefined at std == 0, taken as 0 there.
      c2 = sd > acc_t(0) ? sgx * inv * inv / (cnt * sd) : acc_t(0);
    }
    scalar_t* dx = pack.dx[j] + o * n;
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
      const acc_t gv = static_cast<acc_t>(go[tap_offset(t, ks, d, st, km)]);
      const acc_t xc = static_cast<acc_t>(x[t]) - mean;
      dx[t] = static_cast<scalar_t>(wj * ((gv - c1) * inv - c2 * xc));
    }
  }
}

template <typename scalar_t>
CandPack<scalar_t> make_pack(const std::vector<at::Tensor>& xs, std::vector<at::Tensor>* dxs,
                             const MergeGeometry& geo, int64_t k0, int num) {
  CandPack<scalar_t> p{};
  for (int j = 0; j < kSlots; ++j) {
    const int64_t k = k0 + std::min(j, num - 1);  // unused slots repeat the last (never read)
    p.x[j] = xs[k].data_ptr<scalar_t>();
    p.dx[j] = dxs != nullptr ? (*dxs)[k].data_ptr<scalar_t>() : nullptr;
    p.ks[j] = geo.ks[k];
    p.dil[j] = geo.dil[k];
    p.start[j] = geo.start[k];
  }
  return p;
}

at::Tensor merge_kernels_cuda(at::TensorList kernels, const at::Tensor& weights, at::IntArrayRef dilations,
                              int64_t normalize, double eps) {
  const MergeGeometry geo = check_merge_args(kernels, weights, dilations, normalize, eps);
  const c10::cuda::CUDAGuard guard(kernels[0].device());
  auto xs = contiguous_all(kernels);
  auto w = weights.contiguous();
  const int64_t K = static_cast<int64_t>(xs.size()), O = geo.O, I = geo.I, km = geo.kmax;
  auto out = at::empty({O, I, km, km}, xs[0].options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(O <= std::numeric_limits<int32_t>::max(), "too many output channels: ", O);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "merge_kernels_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = out.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor rows, scratch;
    if (normalize == 2) {
      rows = at::empty({K, O, 4}, acc_opts);
      for (int64_t k0 = 0; k0 < K; k0 += kSlots) {
        const int num = static_cast<int>(std::min<int64_t>(kSlots, K - k0));
        merge_stats_kernel<scalar_t, acc_t><<<O, kThreads, 0, stream>>>(
            make_pack<scalar_t>(xs, nullptr, geo, k0, num), num, k0, nullptr, O, I, km, rows.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (K > kSlots) scratch = at::empty({O, I, km, km}, acc_opts);
    for (int64_t k0 = 0; k0 < K; k0 += kSlots) {
      const int num = static_cast<int>(std::min<int64_t>(kSlots, K - k0));
      merge_fwd_kernel<scalar_t, acc_t><<<O, kThreads, 0, stream>>>(
          make_pack<scalar_t>(xs, nullptr, geo, k0, num), w.data_ptr<scalar_t>(), num, k0,
          rows.defined() ? rows.data_ptr<acc_t>() : nullptr, O, I, km, static_cast<int>(normalize),
          static_cast<acc_t>(eps), scratch.defined() ? scratch.data_ptr<acc_t>() : nullptr,
          out.data_ptr<scalar_t>(), k0 > 0, k0 + num == K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::vector<at::Tensor> merge_kernels_backward_cuda(const at::Tensor& grad, at::TensorList kernels,
                                                    const at::Tensor& weights, at::IntArrayRef dilations,
                                                    int64_t normalize, double eps) {
  const MergeGeometry geo = check_merge_args(kernels, weights, dilations, normalize, eps);
  check_merge_grad(grad, kernels[0], geo);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto g = grad.contiguous();
  auto xs = contiguous_all(kernels);
  auto w = weights.contiguous();
  const int64_t K = static_cast<int64_t>(xs.size()), O = geo.O, I = geo.I, km = geo.kmax;
  std::vector<at::Tensor> result;
  for (const auto& x : xs) result.push_back(at::empty_like(x, at::MemoryFormat::Contiguous));
  if (g.numel() == 0) {
    for (auto& r : result) r.zero_();
    result.push_back(at::zeros_like(w));
    return result;
  }
  TORCH_CHECK(O <= std::numeric_limits<int32_t>::max(), "too many output channels: ", O);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "merge_kernels_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor rows;
    if (normalize == 2) {
      rows = at::empty({K, O, 4}, acc_opts);
      for (int64_t k0 = 0; k0 < K; k0 += kSlots) {
        const int num = static_cast<int>(std::min<int64_t>(kSlots, K - k0));
        merge_stats_kernel<scalar_t, acc_t><<<O, kThreads, 0, stream>>>(
            make_pack<scalar_t>(xs, nullptr, geo, k0, num), num, k0, g.data_ptr<scalar_t>(), O, I, km,
            rows.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    auto parts = at::empty({K, O}, acc_opts);
    for (int64_t k0 = 0; k0 < K; k0 += kSlots) {
      const int num = static_cast<int>(std::min<int64_t>(kSlots, K - k0));
      merge_bwd_kernel<scalar_t, acc_t><<<O, kThreads, 0, stream>>>(
          make_pack<scalar_t>(xs, &result, geo, k0, num), w.data_ptr<scalar_t>(), num, k0, g.data_ptr<scalar_t>(),
          rows.defined() ? rows.data_ptr<acc_t>() : nullptr, O, I, km, static_cast<int>(normalize),
          static_cast<acc_t>(eps), parts.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_w = parts.sum(1).to(w.scalar_type());
  });
  result.push_back(grad_w);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(toponas, CUDA, m) {
  m.impl("merge_kernels_kernel", &merge_kernels_cuda);
  m.impl("merge_kernels_backward_kernel", &merge_kernels_backward_cuda);
}

}  // namespace toponas
