// Family 3 on NVIDIA GPUs: channel_shuffle and the PC-DARTS partial-channel shuffle as one row
// permutation (the plan, its formula and the argument checks are in channel_shuffle.h/.cpp).
//
// Pure data movement, dtype-agnostic and bandwidth bound. A row (b, c) is S contiguous
// elements; it is copied in the widest unit (16, 8, 4, 2 or 1 bytes) that divides the row's
// bytes, every base pointer and every batch/channel stride, so a 28x28 fp32 row moves as 196
// 16-byte vectors. A group of 2^k threads (k chosen so the group covers a short row in one pass,
// at most the whole block) copies one row: reads and writes are coalesced along the row, and
// short rows (7x7, 1x1) pack several rows per block instead of idling threads. Each thread
// loads up to kUnroll units before storing them (independent loads in flight). The row -> (b, c)
// split and the channel formula are computed once per thread, in 32-bit arithmetic when the
// row count allows (a uniform branch); all element offsets are 64-bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../channel_shuffle.h"

namespace toponas {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kMaxGridY = 65535;

// Everything the kernel needs; offsets and strides in units of the copy width.
struct PermuteArgs {
  const void* src[2];
  void* dst[2];
  int64_t src_sb[2], src_sc[2], dst_sb[2], dst_sc[2];
  int64_t rows, row_units;
  uint32_t channels, groups, channels_per_group, src_split, dst_split;
  int tpr_log2;  // threads per row = 1 << tpr_log2
};

template <typename V>
__global__ void __launch_bounds__(kThreads) permute_rows_kernel(const PermuteArgs a) {
  const int tpr = 1 << a.tpr_log2;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kThreads >> a.tpr_log2) + (threadIdx.x >> a.tpr_log2);
  if (row >= a.rows) return;
  int64_t b;
  uint32_t d;
  if (a.rows <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    const uint32_t r = static_cast<uint32_t>(row);
    const uint32_t q = r / a.channels;
    b = q;
    d = r - q * a.channels;
  } else {
    b = row / a.channels;
    d = static_cast<uint32_t>(row - b * a.channels);
  }
  const uint32_t s = (d % a.groups) * a.channels_per_group + d / a.groups;
  const V* __restrict__ src =
      s < a.src_split
          ? static_cast<const V*>(a.src[0]) + b * a.src_sb[0] + static_cast<int64_t>(s) * a.src_sc[0]
          : static_cast<const V*>(a.src[1]) + b * a.src_sb[1] + static_cast<int64_t>(s - a.src_split) * a.src_sc[1];
  V* __restrict__ dst =
      d < a.dst_split
          ? static_cast<V*>(a.dst[0]) + b * a.dst_sb[0] + static_cast<int64_t>(d) * a.dst_sc[0]
          : static_cast<V*>(a.dst[1]) + b * a.dst_sb[1] + static_cast<int64_t>(d - a.dst_split) * a.dst_sc[1];
  const int64_t chunk = static_cast<int64_t>(tpr) * kUnroll;
  const int64_t lane = threadIdx.x & (tpr - 1);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk + lane; c0 < a.row_units;
       c0 += static_cast<int64_t>(gridDim.y) * chunk) {
    V buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * tpr;
      if (c < a.row_units) buf[u] = src[c];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * tpr;
      if (c < a.row_units) dst[c] = buf[u];
    }
  }
}

// The widest copy unit that divides the row's bytes, every pointer and every stride in bytes.
int64_t copy_width(const RowPermutation& p) {
  const RowSide* sides[4] = {&p.src[0], &p.src[1], &p.dst[0], &p.dst[1]};
  for (int64_t v = 16; v > 1; v /= 2) {
    bool ok = p.row_bytes() % v == 0;
    for (const RowSide* side : sides) {
      ok = ok && reinterpret_cast<uintptr_t>(side->tensor.const_data_ptr()) % v == 0 &&
           (side->stride_b * p.elem_size) % v == 0 && (side->stride_c * p.elem_size) % v == 0;
    }
    if (ok) return v;
  }
  return 1;
}

template <typename V>
void launch(const PermuteArgs& a, dim3 grid, cudaStream_t stream) {
  permute_rows_kernel<V><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void permute_rows_cuda(const RowPermutation& p) {
  const int64_t rows = p.rows(), row_bytes = p.row_bytes();
  if (rows == 0 || row_bytes == 0) return;
  TORCH_CHECK(p.channels <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 channels are supported, got ",
              p.channels);
  const int64_t v = copy_width(p);
  const int64_t es = p.elem_size;  // strides are in elements: times es / v gives copy units
  PermuteArgs a{};
  for (int i = 0; i < 2; ++i) {
    a.src[i] = p.src[i].tensor.const_data_ptr();
    a.dst[i] = p.dst[i].tensor.mutable_data_ptr();
    a.src_sb[i] = p.src[i].stride_b * es / v;
    a.src_sc[i] = p.src[i].stride_c * es / v;
    a.dst_sb[i] = p.dst[i].stride_b * es / v;
    a.dst_sc[i] = p.dst[i].stride_c * es / v;
  }
  a.rows = rows;
  a.row_units = row_bytes / v;
  a.channels = static_cast<uint32_t>(p.channels);
  a.groups = static_cast<uint32_t>(p.groups);
  a.channels_per_group = static_cast<uint32_t>(p.channels / p.groups);
  a.src_split = static_cast<uint32_t>(p.src_split);
  a.dst_split = static_cast<uint32_t>(p.dst_split);
  int tpr_log2 = 0;
  while ((int64_t{1} << tpr_log2) < a.row_units && (1 << tpr_log2) < kThreads) ++tpr_log2;
  a.tpr_log2 = tpr_log2;
  const int64_t tpr = int64_t{1} << tpr_log2;
  const int64_t rows_per_block = kThreads / tpr;
  const int64_t grid_x = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(grid_x <= std::numeric_limits<int32_t>::max(), "too many rows (B*C = ", rows,
              ") for one launch");
  const int64_t grid_y = std::min<int64_t>(kMaxGridY, (a.row_units + tpr * kUnroll - 1) / (tpr * kUnroll));
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (v) {
    case 16: launch<uint4>(a, grid, stream); break;
    case 8: launch<uint2>(a, grid, stream); break;
    case 4: launch<uint32_t>(a, grid, stream); break;
    case 2: launch<uint16_t>(a, grid, stream); break;
    default: launch<uint8_t>(a, grid, stream); break;
  }
}

at::Tensor channel_shuffle_cuda(const at::Tensor& x, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto p = plan_channel_shuffle(x, groups);
  permute_rows_cuda(p);
  return p.outputs[0];
}

at::Tensor partial_channel_shuffle_cuda(const at::Tensor& processed, const at::Tensor& bypass, int64_t groups) {
  const c10::cuda::CUDAGuard guard(processed.device());
  auto p = plan_partial_channel_shuffle(processed, bypass, groups);
  permute_rows_cuda(p);
  return p.outputs[0];
}

std::vector<at::Tensor> partial_channel_unshuffle_cuda(const at::Tensor& grad, int64_t processed_channels,
                                                       int64_t groups) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto p = plan_partial_channel_unshuffle(grad, processed_channels, groups);
  permute_rows_cuda(p);
  return p.outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(toponas, CUDA, m) {
  m.impl("channel_shuffle_kernel", &channel_shuffle_cuda);
  m.impl("partial_channel_shuffle_kernel", &partial_channel_shuffle_cuda);
  m.impl("partial_channel_unshuffle_kernel", &partial_channel_unshuffle_cuda);
}

}  // namespace toponas
