// Family 2 (merge_kernels): the argument checks and geometry shared by the CPU kernels
// (merge_kernels.cpp, which defines check_merge_args) and the CUDA kernels
// (cuda/merge_kernels.cu).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace toponas {

struct MergeGeometry {
  int64_t O = 0, I = 0;     // output and input channels, shared by every candidate
  int64_t kmax = 1;         // merged size: max_j (k_j - 1) d_j + 1
  int64_t max_ks = 1;       // largest candidate kernel size (work per (candidate, channel) item)
  std::vector<int64_t> ks;  // per candidate: kernel size (odd)
  std::vector<int64_t> dil;    // dilation (>= 1)
  std::vector<int64_t> start;  // row/column of its first tap in the merged kernel
};

// Checks what the Python wrapper checks (for direct torch.ops.toponas.* callers) and returns the
// geometry. normalize: 0 none, 1 per output channel, 2 per whole kernel.
MergeGeometry check_merge_args(at::TensorList kernels, const at::Tensor& weights,
                               at::IntArrayRef dilations, int64_t normalize, double eps);

// The backward's grad must be the merged kernel's gradient: [O, I, kmax, kmax], kernels' dtype.
void check_merge_grad(const at::Tensor& grad, const at::Tensor& like, const MergeGeometry& geo);

}  // namespace toponas
