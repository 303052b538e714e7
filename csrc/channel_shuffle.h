// Family 3 (partial-channel shuffle): the plan shared by the CPU (channel_shuffle.cpp) and CUDA
// (cuda/channel_shuffle.cu) kernels.
//
// Every op of the family is one row permutation. A tensor [B, C, *spatial] is B*C rows of
// S = prod(spatial) contiguous elements; destination row (b, d) is a copy of source row (b, s)
// with
//     s = (d % G) * (C / G) + d / G
// G = groups gives channel_shuffle (view channels as (G, C/G), swap, flatten); G = C / groups
// gives its inverse. Either side may be split along channels into two tensors (the PC-DARTS
// [processed, bypass] concatenation, never materialised): channels below `split` live in
// side[0], the rest in side[1] (renumbered from 0).
//
// A side tensor needs only dense spatial dims: batch and channel strides are free, so the
// views x[:, :C/k] and x[:, C/k:] of PC-DARTS are read in place. Anything else is copied by
// contiguous() first (documented in the Python wrappers).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace toponas {

struct RowSide {
  at::Tensor tensor;     // the tensor read or written (a contiguous copy when one was needed)
  int64_t stride_b = 0;  // elements between batches (0 when B == 1)
  int64_t stride_c = 0;  // elements between channels (0 when this side has one channel)
};

struct RowPermutation {
  // A side that is not split (or whose split leaves one part empty) has split == channels and
  // side[1] a copy of side[0], never read or written: the kernels see one tensor.
  RowSide src[2], dst[2];
  std::vector<at::Tensor> outputs;  // the op's results, in the op's order (empty ones included)
  int64_t batch = 0;
  int64_t channels = 0;   // C, the channels of either side in total
  int64_t groups = 1;     // G of the formula above (divides C)
  int64_t src_split = 0;  // source channels [0, src_split) are in src[0], the rest in src[1]
  int64_t dst_split = 0;
  int64_t row_elems = 0;  // S
  int64_t elem_size = 0;  // bytes per element: the kernels move bits, whatever the dtype

  int64_t rows() const { return batch * channels; }
  int64_t row_bytes() const { return row_elems * elem_size; }
};

// Argument checks, row views (no copy when the spatial dims are dense) and output allocation
// (contiguous, on the inputs' device; not yet written).
RowPermutation plan_channel_shuffle(const at::Tensor& x, int64_t groups);
RowPermutation plan_partial_channel_shuffle(const at::Tensor& processed, const at::Tensor& bypass,
                                            int64_t groups);
RowPermutation plan_partial_channel_unshuffle(const at::Tensor& grad, int64_t processed_channels,
                                              int64_t groups);

}  // namespace toponas
